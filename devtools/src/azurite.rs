//! An Azurite Table service process on loopback: the one way this workspace starts Azurite.
//! devhost starts it with a persistent data folder (a developer's ledger survives restarts);
//! the tests and the benchmark driver start it in memory through `testkit::azurite`.
//!
//! ```text
//! let bin = azurite::binary(&app_root)?;     // $AZURITE_TABLE_BIN or tools/node/.../azurite-table
//! let table = AzuriteTable::start(&bin, port, Data::Temporary, None)?;   // or Data::Folder(dir),
//!                                           // Some(OAuthTls { .. }) for HTTPS with bearer tokens
//! table.connection_string();                // TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1
//! table.stop()?;                            // or drop: SIGINT, saved, exited; a temporary one is killed and its folder removed
//! ```
//!
//! Stopping: a [`Data::Folder`] Azurite is stopped so that it has saved everything. Azurite
//! keeps its tables in memory (LokiJS) and saves them to the folder every 5 s; on `SIGINT` it
//! closes its database, which saves what changed since, and says so in its log
//! ([`CLOSED`]). So [`AzuriteTable::stop`] (and the drop) sends `SIGINT` and waits for that
//! line and the exit (up to [`STOP_TIMEOUT`]) before it kills. Measured: a write answered an
//! instant before a kill is lost (the next start finds the table missing); before a `SIGINT`
//! and the wait it is kept (`devtools/tests/azurite.rs`). Azurite runs in its own process
//! group, so a terminal's Ctrl-C reaches only its owner, which stops it: a second `SIGINT`
//! (the terminal's, then the owner's) would kill Node mid-save. A [`Data::Temporary`]
//! Azurite has nothing to save and is killed at once.
//!
//! Invariants: it listens on 127.0.0.1 only and never sends telemetry (`--disableTelemetry`);
//! [`AzuriteTable::start`] returns only once this process has said it listens and the port
//! accepts connections (a port held by another process is an error, not a false start),
//! and otherwise leaves no process behind; the process is killed when its [`AzuriteTable`] is dropped, and
//! a [`Data::Temporary`] folder is removed then (a [`Data::Folder`] is kept). Azurite's
//! output goes to `azurite.log` in its folder and is quoted in the start error.
//! Azurite cannot report the port it picked for `--tablePort 0`: the caller picks the port
//! (see [`crate::free_port`]) and retries on another one if it was taken in between.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The development account Azurite serves and its publicly documented key.
pub const ACCOUNT: &str = "devstoreaccount1";
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// What Azurite (the version `scripts/setup` pins) prints once it listens, before the address.
const STARTED: &str = "Azurite Table service successfully started on";

/// What it prints once it has closed its database (saved) after a `SIGINT`.
const CLOSED: &str = "Azurite Table service successfully closed";

/// How long a start waits for the port to accept connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stop waits for Azurite to save and exit before it kills it.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the tables live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// In memory (`--inMemoryPersistence`), working in a fresh temporary folder that is
    /// removed on drop: tests and benchmarks.
    Temporary,
    /// On disk in this folder (`--location`, created if missing), kept on drop: devhost.
    Folder(PathBuf),
}

/// HTTPS with this certificate and key, accepting OAuth bearer tokens (`--oauth basic`:
/// their issuer, audience and lifetime are checked, not their signature): the
/// managed-identity path.
#[derive(Clone, Copy, Debug)]
pub struct OAuthTls<'a> {
    pub cert_pem: &'a Path,
    pub key_pem: &'a Path,
}

/// A running `azurite-table`; killed on drop.
#[derive(Debug)]
pub struct AzuriteTable {
    child: Child,
    port: u16,
    dir: PathBuf,
    remove_dir: bool,
    https: bool,
}

/// The `azurite-table` executable for the app at `app_root`: `$AZURITE_TABLE_BIN`, else
/// `tools/node/node_modules/.bin/azurite-table` (installed by `scripts/setup azurite`).
pub fn binary(app_root: &Path) -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("AZURITE_TABLE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let bin = app_root.join("tools/node/node_modules/.bin/azurite-table");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: run scripts/setup azurite (installs Azurite from npm) or set AZURITE_TABLE_BIN",
            bin.display()
        ));
    }
    Ok(bin)
}

impl AzuriteTable {
    /// Starts `bin` on `127.0.0.1:{port}` (HTTP, or HTTPS with OAuth when `oauth_tls` is given)
    /// and waits (blocking, up to [`READY_TIMEOUT`]) until it accepts connections. The error
    /// holds Azurite's own output.
    pub fn start(
        bin: &Path,
        port: u16,
        data: Data,
        oauth_tls: Option<OAuthTls>,
    ) -> Result<AzuriteTable, String> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let (dir, remove_dir) = match &data {
            Data::Temporary => (
                std::env::temp_dir().join(format!(
                    "azurite-{}-{}-{port}",
                    std::process::id(),
                    COUNTER.fetch_add(1, Ordering::SeqCst)
                )),
                true,
            ),
            Data::Folder(dir) => (dir.clone(), false),
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = dir.join("azurite.log");
        let log_file = std::fs::File::create(&log).map_err(|e| format!("log file: {e}"))?;
        let mut command = Command::new(bin);
        command.args([
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            &port.to_string(),
            "--skipApiVersionCheck",
            // No access log: the log file keeps startup messages and errors only.
            "--silent",
            // Loopback only: Azurite otherwise sends telemetry to Application Insights.
            "--disableTelemetry",
        ]);
        match &data {
            Data::Temporary => command.arg("--inMemoryPersistence"),
            Data::Folder(_) => command.arg("--location").arg(&dir),
        };
        if let Some(tls) = oauth_tls {
            command
                .arg("--cert")
                .arg(tls.cert_pem)
                .arg("--key")
                .arg(tls.key_pem)
                .args(["--oauth", "basic"]);
        }
        let child = command
            .current_dir(&dir)
            // Its own process group: a terminal's Ctrl-C is for its owner, which stops it.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        // From here on, Drop cleans up whatever happens.
        let mut table = AzuriteTable {
            child,
            port,
            dir,
            remove_dir,
            https: oauth_tls.is_some(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let started = format!("{STARTED} 127.0.0.1:{port}");
        loop {
            if let Ok(Some(status)) = table.child.try_wait() {
                return Err(format!("exited with {status}: {}", read_log(&log)));
            }
            // Azurite's own word first: a connection alone may reach whatever else holds
            // the port while this Azurite is failing with EADDRINUSE.
            if read_log(&log).contains(&started)
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            {
                return Ok(table);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not listening on {addr} after {READY_TIMEOUT:?}: {}",
                    read_log(&log)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id (for CPU and memory readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The folder Azurite works in (its tables for [`Data::Folder`], and `azurite.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `http://127.0.0.1:{port}/devstoreaccount1` (`https://` when started with [`OAuthTls`])
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
}

impl AzuriteTable {
    /// Stops it so that it has saved everything (module doc): `SIGINT`, then waits for its
    /// "closed" line and its exit, up to [`STOP_TIMEOUT`]; kills it after that. `Err` says
    /// what went wrong (it was killed, or had exited before); blocking.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_gracefully()
    }

    fn stop_gracefully(&mut self) -> Result<(), String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(format!("Azurite had already exited ({status})"));
        }
        if self.remove_dir {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Ok(());
        }
        let log = self.dir.join("azurite.log");
        let signalled = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while signalled && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return if read_log(&log).contains(CLOSED) {
                    Ok(())
                } else {
                    Err(format!(
                        "Azurite exited without closing: {}",
                        read_log(&log)
                    ))
                };
            }
            // Closed (saved) but still running: nothing is left to lose.
            if read_log(&log).contains(CLOSED) {
                std::thread::sleep(Duration::from_millis(100));
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        Err(format!(
            "Azurite did not close within {STOP_TIMEOUT:?} of SIGINT and was killed: the last seconds of writes may be lost"
        ))
    }
}

impl Drop for AzuriteTable {
    fn drop(&mut self) {
        if let Err(e) = self.stop_gracefully() {
            if !e.contains("already exited") {
                eprintln!("azurite: {e}");
            }
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
