//! A real Azurite Table service for tests, on a free loopback port, in memory.
//!
//! ```text
//! let azurite = Azurite::start();            // owned: killed when dropped (panics if it cannot start)
//! let azurite = Azurite::try_start()?;       // the same, with the failure as an error
//! let conn = azurite.connection_string();    // TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1
//! // or, to share one process between tests running at the same time:
//! let azurite = Azurite::shared();           // Arc<Azurite>: killed when the last user drops it
//! // HTTPS with OAuth (`--oauth basic`: bearer tokens' issuer, audience and lifetime are
//! // checked, not their signature), for the managed-identity path:
//! let azurite = Azurite::start_oauth(&cert_pem, &key_pem);   // table_endpoint() is https://
//! ```
//!
//! The binary is `tools/node/node_modules/.bin/azurite-table` (installed by `scripts/setup`),
//! or `$AZURITE_TABLE_BIN`. Each instance runs in its own temporary working directory
//! (removed on drop) with `--inMemoryPersistence`, so nothing touches the repository.
//! Azurite cannot report the port it picked for `--tablePort 0`, so a free port is chosen
//! here and the start is retried on another port if that one was taken in between.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::free_port;

/// The development account Azurite serves and its publicly documented key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

const START_ATTEMPTS: usize = 5;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `azurite-table`; killed (and its directory removed) on drop.
#[derive(Debug)]
pub struct Azurite {
    child: Child,
    port: u16,
    dir: PathBuf,
    https: bool,
}

impl Azurite {
    /// Starts a fresh instance and waits until it accepts connections. Panics with
    /// Azurite's own output if it cannot be started.
    pub fn start() -> Azurite {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a fresh instance (retrying on another port up to 5 times) and waits until it
    /// accepts connections; the error holds Azurite's own output.
    pub fn try_start() -> Result<Azurite, String> {
        Self::try_start_with(None)
    }

    /// Starts an instance serving HTTPS with the certificate `cert_pem` (its key `key_pem`)
    /// and accepting OAuth bearer tokens (`--oauth basic`). Panics if it cannot start.
    pub fn start_oauth(cert_pem: &Path, key_pem: &Path) -> Azurite {
        Self::try_start_with(Some((cert_pem, key_pem))).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_with(tls: Option<(&Path, &Path)>) -> Result<Azurite, String> {
        let bin = binary()?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&bin, tls) {
                Ok(azurite) => return Ok(azurite),
                Err(e) => last_error = e,
            }
        }
        Err(format!(
            "azurite-table did not start after {START_ATTEMPTS} attempts: {last_error}"
        ))
    }

    /// One instance shared by every caller that holds it at the same time. Tests running
    /// in parallel share it; when the last `Arc` is dropped the process is killed, so no
    /// instance outlives the test binary. Give each test its own table name.
    pub fn shared() -> Arc<Azurite> {
        static SHARED: Mutex<Weak<Azurite>> = Mutex::new(Weak::new());
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = slot.upgrade() {
            return existing;
        }
        let fresh = Arc::new(Azurite::start());
        *slot = Arc::downgrade(&fresh);
        fresh
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:{port}/devstoreaccount1` (`https://` for [`Azurite::start_oauth`])
    pub fn table_endpoint(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// An explicit connection string for this instance (the form local.settings.json uses).
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};TableEndpoint={};",
            self.table_endpoint()
        )
    }

    /// Writes `properties` into the entity `partition`/`row` of `table` (insert or merge,
    /// no ETag check), as a writer with another schema would. Lets a test plant a row
    /// the ledger cannot read.
    pub async fn merge_entity(
        &self,
        table: &str,
        partition: &str,
        row: &str,
        properties: serde_json::Value,
    ) {
        let credentials = azure_storage::StorageCredentials::access_key(
            ACCOUNT,
            azure_core::auth::Secret::new(ACCOUNT_KEY),
        );
        let location = azure_storage::CloudLocation::Custom {
            account: ACCOUNT.into(),
            uri: self.table_endpoint(),
        };
        azure_data_tables::clients::TableServiceClientBuilder::with_location(location, credentials)
            .build()
            .table_client(table)
            .partition_key_client(partition)
            .entity_client(row)
            .insert_or_merge(properties)
            .expect("entity serialises")
            .await
            .expect("Azurite accepts the entity");
    }

    fn start_once(bin: &PathBuf, tls: Option<(&Path, &Path)>) -> Result<Azurite, String> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "azurite-test-{}-{}-{port}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let log = dir.join("azurite.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let mut command = Command::new(bin);
        command.args([
            "--inMemoryPersistence",
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            &port.to_string(),
            "--skipApiVersionCheck",
            "--disableTelemetry",
        ]);
        if let Some((cert, key)) = tls {
            command
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key)
                .args(["--oauth", "basic"]);
        }
        let child = command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        // From here on, Drop cleans up whatever happens.
        let mut azurite = Azurite {
            child,
            port,
            dir,
            https: tls.is_some(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        loop {
            if let Ok(Some(status)) = azurite.child.try_wait() {
                return Err(format!("exited with {status}: {}", read_log(&log)));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(azurite);
            }
            if Instant::now() > deadline {
                let output = read_log(&log);
                let _ = azurite.child.kill();
                return Err(format!("not listening after {READY_TIMEOUT:?}: {output}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("AZURITE_TABLE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let bin = crate::repo_root().join("tools/node/node_modules/.bin/azurite-table");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: run scripts/setup (installs Azurite from npm) or set AZURITE_TABLE_BIN",
            bin.display()
        ));
    }
    Ok(bin)
}

fn read_log(path: &PathBuf) -> String {
    let mut out = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut out);
    }
    out
}
