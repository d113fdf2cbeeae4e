//! A real Azurite Table service for tests, on a free loopback port, in memory: the process
//! is `devtools::azurite::AzuriteTable` (the one Azurite spawn, devhost's too); this adds the
//! free port with retries, one instance shared by parallel tests, and writing a foreign row.
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
//! or `$AZURITE_TABLE_BIN`. Each instance works in its own temporary folder (removed on drop)
//! with in-memory tables, so nothing touches the repository. Azurite cannot report the port
//! it picked for `--tablePort 0`, so a free port is chosen here and the start is retried on
//! another port if that one was taken in between.

use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use devtools::azurite::{AzuriteTable, Data, OAuthTls};
pub use devtools::azurite::{ACCOUNT, ACCOUNT_KEY};

use crate::free_port;

const START_ATTEMPTS: usize = 5;

/// A running in-memory `azurite-table`; killed (and its folder removed) on drop. Derefs to
/// the process for its port, endpoint and connection string.
#[derive(Debug)]
pub struct Azurite(AzuriteTable);

impl Deref for Azurite {
    type Target = AzuriteTable;

    fn deref(&self) -> &AzuriteTable {
        &self.0
    }
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
        let tls = OAuthTls { cert_pem, key_pem };
        Self::try_start_with(Some(tls)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_with(oauth_tls: Option<OAuthTls>) -> Result<Azurite, String> {
        let bin = devtools::azurite::binary(&crate::repo_root())?;
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            match AzuriteTable::start(&bin, free_port(), Data::Temporary, oauth_tls) {
                Ok(table) => return Ok(Azurite(table)),
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

    /// Merges `properties` into the existing entity `partition`/`row` of `table` (no ETag
    /// check), as a writer with another schema would. Lets a test plant a row the ledger
    /// cannot read.
    pub async fn merge_entity(
        &self,
        table: &str,
        partition: &str,
        row: &str,
        properties: serde_json::Value,
    ) {
        use soc_settings::adapters::table_rest::{IfMatch, TableClient, Update};
        let http =
            soc_settings::adapters::identity::transport(std::time::Duration::from_secs(10), None)
                .expect("an HTTP client");
        let endpoint = url::Url::parse(&self.table_endpoint()).expect("a URL");
        let client = TableClient::shared_key(http, &endpoint, table, ACCOUNT, ACCOUNT_KEY)
            .expect("the well-known key");
        let properties = properties.as_object().expect("properties are an object");
        client
            .update(Update::Merge, partition, row, properties, IfMatch::Any)
            .await
            .expect("Azurite merges the entity");
    }
}
