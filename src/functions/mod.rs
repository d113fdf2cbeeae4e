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
//! messages and records them in the ledger; [`index`] keeps the due index in step
//! with record writes. They are shared by the functions (a device event never sends a
//! wake-up message: it only applies).

pub mod apply;
pub mod device_events_http;
pub mod drain_soc_timer;
pub mod index;
pub mod set_soc_checks;
pub mod set_soc_http;
pub mod soc_queue_trigger;
pub mod wake;

use std::sync::Arc;

use chrono::Duration;

use crate::adapters::table_ledger::STORAGE_TIMEOUT;
use crate::config::Config;
use crate::domain::schedule::Backoff;
use crate::domain::DesiredState;
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
    /// Device calls per second this instance may make (`DEVICE_API_MAX_CALLS_PER_SECOND`
    /// / `DEVICE_API_INSTANCES`): the rate of its token bucket
    /// ([`crate::adapters::device_budget`]).
    pub device_calls_per_second: f64,
    /// Device calls per second all instances together may make
    /// (`DEVICE_API_MAX_CALLS_PER_SECOND`): what spreading work over time across the
    /// fleet (scheduled wake-up messages) should stay under.
    pub fleet_device_calls_per_second: f64,
    /// How long a first request with an `Idempotency-Key` may stay in flight before a
    /// retry with the same key may take over: longer than the slowest POST can take.
    pub idempotency_in_flight: Duration,
    /// How long one sweep run works before it stops starting new devices (what is
    /// left stays in the due index for the next run); its lease is this plus one
    /// [`Policy::lease`].
    pub sweep_budget: Duration,
    /// Due devices one sweep run takes from the index at most.
    pub sweep_max_due: usize,
    /// Above this many due devices that need a device call, the sweep fans out:
    /// it sends their wake-up messages, spread at [`Policy::fleet_device_calls_per_second`],
    /// and `SocQueueTrigger` (scaled by the host) makes the calls.
    pub sweep_fanout_above: usize,
    /// Pending records the reconciling pass files per sweep run, and how often a pass starts.
    pub reconcile_rows_per_run: usize,
    pub reconcile_interval: Duration,
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
            device_calls_per_second: config.device_budget.per_instance(),
            fleet_device_calls_per_second: f64::from(config.device_budget.fleet_calls_per_second),
            idempotency_in_flight: SLOWEST_POST + MAX_CLOCK_SKEW * 2,
            sweep_budget: SWEEP_BUDGET,
            sweep_max_due: config.drain_max_due.max(1),
            sweep_fanout_above: config.drain_fanout_above,
            reconcile_rows_per_run: RECONCILE_ROWS_PER_RUN,
            reconcile_interval: RECONCILE_INTERVAL,
        }
    }

    /// When the sweep must look at `record` ([`DesiredState::sweep_due_at`] with this policy).
    pub fn sweep_due(&self, record: &DesiredState) -> Option<chrono::DateTime<chrono::Utc>> {
        record.sweep_due_at(self.wake_grace, self.lease)
    }
}

/// A sweep run's working time: inside the host's 5 min `functionTimeout` with a
/// lease to spare for the applies it awaits after it stops starting new ones.
pub const SWEEP_BUDGET: Duration = Duration::seconds(240);
/// Pending records the reconciling pass files per sweep run: with the 5-minute
/// schedule, a pass over a million pending records takes about 1.7 days.
pub const RECONCILE_ROWS_PER_RUN: usize = 2000;
/// A reconciling pass starts at most this often.
pub const RECONCILE_INTERVAL: Duration = Duration::hours(24);

#[cfg(any(test, feature = "test-fakes"))]
pub mod fakes;
