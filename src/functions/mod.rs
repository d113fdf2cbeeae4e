//! One module per function folder, plus what they share.
//!
//! | folder            | module                | trigger                        |
//! |-------------------|-----------------------|--------------------------------|
//! | `SetSocHttp`      | [`set_soc_http`]      | HTTP `devices/{deviceId}/soc`  |
//! | `SocQueueTrigger` | [`soc_queue_trigger`] | Service Bus `%SOC_QUEUE_NAME%` |
//! | `DrainSocTimer`   | [`drain_soc_timer`]   | timer `%DRAIN_SOC_SCHEDULE%`   |
//! | `DeviceEventsHttp`| [`device_events_http`]| HTTP `device-events` (CloudEvents) |
//!
//! [`apply`] is the one procedure that talks to a device; [`wake`] sends wake-up
//! messages and records them in the ledger. `apply` is shared by all four functions,
//! `wake` by the first three (a device event never sends a wake-up message).

pub mod apply;
pub mod device_events_http;
pub mod drain_soc_timer;
pub mod set_soc_http;
pub mod soc_queue_trigger;
pub mod wake;

use std::sync::Arc;

use chrono::Duration;

use crate::adapters::table_ledger::STORAGE_TIMEOUT;
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

/// Timing and concurrency rules, derived from [`Config`] and the physical bounds below.
///
/// The lease is what keeps device PUTs in order, so it is sized from explicit bounds
/// (README "How it stays correct" states them and what is left if one is broken):
/// a holder takes or renews it with a fresh clock right before each PUT and PUTs
/// only if at least [`Policy::put_window`] of it is left *after* that write, so
/// no other instance can take the device over while the PUT may still land.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub request_ttl: Duration,
    pub backoff: Backoff,
    /// How long a lease lasts from the holder's clock reading just before its lease
    /// write: the slowest ledger write (the Table adapter's
    /// [`STORAGE_TIMEOUT`](crate::adapters::table_ledger::STORAGE_TIMEOUT)) plus [`Policy::put_window`]
    /// plus [`LEASE_MARGIN`].
    pub lease: Duration,
    /// What must be left of the lease, by the holder's clock, when a PUT starts: the
    /// device timeout, the [`LATE_LANDING`] bound, twice [`MAX_CLOCK_SKEW`] (the
    /// holder's clock may be behind, the next holder's ahead) and [`LEASE_MARGIN`].
    /// A PUT whose answer is in doubt (timed out) keeps the lease until it lapses.
    pub put_window: Duration,
    /// Largest difference between two instances' clocks.
    pub max_clock_skew: Duration,
    /// How late a wake-up message may be before the sweep considers it lost and re-sends.
    pub wake_grace: Duration,
    /// Device API calls the timer sweep makes at once.
    pub drain_concurrency: usize,
    /// How long a first request with an `Idempotency-Key` may stay in flight before a
    /// retry with the same key may take over: longer than the slowest POST can take.
    pub idempotency_in_flight: Duration,
}

/// How long after the device client's timeout a PUT may still land on the device (the
/// device cloud's contract, `docs/device-api.md`). A later landing is the residual risk.
pub const LATE_LANDING: Duration = Duration::seconds(10);
/// Assumed bound on the clock difference between two instances (NTP-synchronised hosts).
pub const MAX_CLOCK_SKEW: Duration = Duration::seconds(2);
/// Safety margin added to each lease bound.
pub const LEASE_MARGIN: Duration = Duration::seconds(5);
/// The slowest POST: the host's `functionTimeout` (5 min, `host.json`) plus a margin.
pub const SLOWEST_POST: Duration = Duration::seconds(360);

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        let secs = |d: std::time::Duration| Duration::milliseconds(d.as_millis() as i64);
        let put_window =
            secs(config.device_api_timeout) + LATE_LANDING + MAX_CLOCK_SKEW * 2 + LEASE_MARGIN;
        Self {
            request_ttl: secs(config.request_ttl),
            backoff: Backoff {
                initial: secs(config.recheck_initial),
                max: secs(config.recheck_max),
            },
            lease: if cfg!(feature = "mutant-put-on-caller-lease") {
                // The old lease: the device timeout plus 10 s, no bound for slow writes.
                secs(config.device_api_timeout) + Duration::seconds(10)
            } else {
                secs(STORAGE_TIMEOUT) + put_window + LEASE_MARGIN
            },
            put_window,
            max_clock_skew: MAX_CLOCK_SKEW,
            wake_grace: secs(config.recheck_initial),
            drain_concurrency: config.drain_concurrency.max(1),
            idempotency_in_flight: SLOWEST_POST + MAX_CLOCK_SKEW * 2,
        }
    }
}

#[cfg(any(test, feature = "test-fakes"))]
pub mod fakes;
