//! The environment every measurement shares: the two binaries, Azurite, the Service Bus
//! stand-in, the device stub, a scratch directory (removed at the end).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use devtools::servicebus::Broker;
use testkit::azurite::Azurite;
use testkit::free_port;

use crate::procs::{spawn_ready, Proc};
use crate::stub::Stub;
use crate::{QUEUE, SB_KEY, SB_KEY_NAME};

pub struct Env {
    pub root: PathBuf,
    pub handler: PathBuf,
    pub baseline: PathBuf,
    pub scratch: PathBuf,
    pub azurite: Azurite,
    pub broker: Broker,
    pub stub: Arc<Stub>,
    pub stub_url: String,
    pub sb_port: u16,
}

impl Env {
    pub fn handler_env(&self, table: &str, concurrency: usize) -> Vec<(String, String)> {
        [
            ("AzureWebJobsStorage", self.azurite.connection_string()),
            (
                "ServiceBusConnection",
                format!(
                    "Endpoint=sb://127.0.0.1:{};SharedAccessKeyName={SB_KEY_NAME};SharedAccessKey={SB_KEY};UseDevelopmentEmulator=true",
                    self.sb_port
                ),
            ),
            ("SOC_QUEUE_NAME", QUEUE.into()),
            ("SOC_STATE_TABLE", table.into()),
            ("DEVICE_API_BASE_URL", self.stub_url.clone()),
            ("DEVICE_API_KEY", "bench-key".into()),
            ("DRAIN_SOC_CONCURRENCY", concurrency.to_string()),
            // The rows measure the handler, not the device-call budget (S4b turns it on).
            ("DEVICE_API_MAX_CALLS_PER_SECOND", "100000".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn start_handler(&self, table: &str, concurrency: usize) -> Result<Proc> {
        self.start_handler_with(table, concurrency, &[])
    }

    /// A handler with `extra` app settings on top of [`Env::handler_env`].
    pub fn start_handler_with(
        &self,
        table: &str,
        concurrency: usize,
        extra: &[(&str, &str)],
    ) -> Result<Proc> {
        let mut vars = self.handler_env(table, concurrency);
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let (p, _) = spawn_ready(&self.handler, &vars, free_port())?;
        Ok(p)
    }

    /// Starts `handler` with exactly these app settings.
    pub fn start_handler_env(&self, vars: &[(String, String)]) -> Result<Proc> {
        let (p, _) = spawn_ready(&self.handler, vars, free_port())?;
        Ok(p)
    }

    pub fn start_baseline(&self) -> Result<Proc> {
        let (p, _) = spawn_ready(&self.baseline, &[], free_port())?;
        Ok(p)
    }
}
