//! One module per function folder, plus what they share.
//!
//! | folder            | module                | trigger                        |
//! |-------------------|-----------------------|--------------------------------|
//! | `SetSocHttp`      | [`set_soc_http`]      | HTTP `devices/{deviceId}/soc`  |
//! | `SocQueueTrigger` | [`soc_queue_trigger`] | Service Bus `%SOC_QUEUE_NAME%` |
//! | `DrainSocTimer`   | [`drain_soc_timer`]   | timer `%DRAIN_SOC_SCHEDULE%`   |
//!
//! [`apply`] is the one procedure that talks to a device; [`wake`] sends wake-up
//! messages and records them in the ledger. Both are shared by all three functions.

pub mod apply;
pub mod drain_soc_timer;
pub mod set_soc_http;
pub mod soc_queue_trigger;
pub mod wake;

use std::sync::Arc;

use chrono::Duration;

use crate::config::Config;
use crate::domain::schedule::Backoff;
use crate::ports::{Clock, DeviceApi, Ledger, SettingsQueue};

/// Everything a function needs: the ports and the policy.
#[derive(Clone)]
pub struct Services {
    pub device: Arc<dyn DeviceApi>,
    pub queue: Arc<dyn SettingsQueue>,
    pub ledger: Arc<dyn Ledger>,
    pub clock: Arc<dyn Clock>,
    pub policy: Policy,
}

/// Timing and concurrency rules, derived from [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub request_ttl: Duration,
    pub backoff: Backoff,
    /// How long a holder may talk to a device before others may take over.
    pub lease: Duration,
    /// How late a wake-up message may be before the sweep considers it lost and re-sends.
    pub wake_grace: Duration,
    /// Device API calls the timer sweep makes at once.
    pub drain_concurrency: usize,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        let secs = |d: std::time::Duration| Duration::milliseconds(d.as_millis() as i64);
        Self {
            request_ttl: secs(config.request_ttl),
            backoff: Backoff {
                initial: secs(config.recheck_initial),
                max: secs(config.recheck_max),
            },
            // A PUT is bounded by the device timeout; the margin covers the ledger writes around it.
            lease: secs(config.device_api_timeout) + Duration::seconds(10),
            wake_grace: secs(config.recheck_initial),
            drain_concurrency: config.drain_concurrency.max(1),
        }
    }
}

#[cfg(any(test, feature = "test-fakes"))]
pub mod fakes;
