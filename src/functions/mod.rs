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
    /// `DEVICE_API_TIMEOUT_MS`.
    pub device_timeout: Duration,
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
    /// Pending records the reconciling pass files per sweep run at most, how long it
    /// may work (what it did not reach, the next run resumes), and how often a pass starts.
    pub reconcile_rows_per_run: usize,
    pub reconcile_budget: Duration,
    pub reconcile_interval: Duration,
}

/// How long after the device client's timeout a PUT may still land on the device (the
/// device cloud's contract, `docs/device-api.md`). A later landing is the residual risk.
pub const LATE_LANDING: Duration = Duration::seconds(10);
/// Assumed bound on the clock difference between two instances (NTP-synchronised hosts).
pub const MAX_CLOCK_SKEW: Duration = Duration::seconds(2);
/// Safety margin added to each lease bound.
pub const LEASE_MARGIN: Duration = Duration::seconds(5);

impl Policy {
    pub fn from_config(config: &Config) -> Self {
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
            device_timeout: secs(config.device_api_timeout),
            max_clock_skew: MAX_CLOCK_SKEW,
            wake_grace: secs(config.recheck_initial),
            drain_concurrency: config.drain_concurrency.max(1),
            device_calls_per_second: config.device_budget.per_instance(),
            fleet_device_calls_per_second: f64::from(config.device_budget.fleet_calls_per_second),
            sweep_budget: SWEEP_BUDGET,
            sweep_max_due: config.drain_max_due.max(1),
            sweep_fanout_above: config.drain_fanout_above,
            reconcile_rows_per_run: RECONCILE_ROWS_PER_RUN,
            reconcile_budget: RECONCILE_BUDGET,
            reconcile_interval: RECONCILE_INTERVAL,
        }
    }

    /// How long an apply the sweep started just before its budget ran out may still
    /// take: its PUT under one lease, then its result write.
    pub fn sweep_tail(&self) -> Duration {
        self.lease + secs(STORAGE_TIMEOUT)
    }

    /// The longest a sweep run takes: its budget, the tail of the applies in flight
    /// and the reconciling pass. Its sweep lease lasts this long (plus a margin).
    pub fn sweep_run_bound(&self) -> Duration {
        self.sweep_budget + self.sweep_tail() + self.reconcile_budget
    }

    /// Settings under which the design's promises cannot hold, each as a sentence
    /// naming the settings: refused at start (`Config::from_vars`).
    pub fn design_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.device_timeout > MAX_DEVICE_TIMEOUT {
            problems.push(format!(
                "DEVICE_API_TIMEOUT_MS: {} ms is over {} s, the device-call budget's longest wait and the vendor's late-landing contract",
                self.device_timeout.num_milliseconds(),
                MAX_DEVICE_TIMEOUT.num_seconds()
            ));
        }
        let shortest = self.lease + self.backoff.max;
        if self.request_ttl < shortest {
            problems.push(format!(
                "SOC_REQUEST_TTL_SECONDS: {} s is shorter than one device lease ({} s) plus the longest re-check delay SOC_RECHECK_MAX_SECONDS ({} s): a request could expire before its first re-check",
                self.request_ttl.num_seconds(),
                self.lease.num_seconds(),
                self.backoff.max.num_seconds()
            ));
        }
        if self.sweep_run_bound() + LEASE_MARGIN > FUNCTION_TIMEOUT {
            problems.push(format!(
                "DEVICE_API_TIMEOUT_MS: a sweep run (budget {} s + applies in flight {} s + reconciling pass {} s) would outlast the host's functionTimeout ({} s); lower the device timeout",
                self.sweep_budget.num_seconds(),
                self.sweep_tail().num_seconds(),
                self.reconcile_budget.num_seconds(),
                FUNCTION_TIMEOUT.num_seconds()
            ));
        }
        problems
    }

    /// When the sweep must look at `record` ([`DesiredState::sweep_due_at`] with this policy).
    pub fn sweep_due(&self, record: &DesiredState) -> Option<chrono::DateTime<chrono::Utc>> {
        record.sweep_due_at(self.wake_grace, self.lease)
    }
}

/// The host's `functionTimeout` (`host.json`): an invocation still running then is killed.
pub const FUNCTION_TIMEOUT: Duration = Duration::seconds(300);
/// The longest device call timeout the design allows (`DEVICE_API_TIMEOUT_MS`).
pub const MAX_DEVICE_TIMEOUT: Duration = Duration::seconds(30);
/// A sweep run's working time (it stops starting devices then): with the tail of the
/// applies in flight and the reconciling pass, inside [`FUNCTION_TIMEOUT`]
/// ([`Policy::sweep_run_bound`], checked at start).
pub const SWEEP_BUDGET: Duration = Duration::seconds(200);
/// How long the reconciling pass of one sweep run may work.
pub const RECONCILE_BUDGET: Duration = Duration::seconds(30);
/// Pending records the reconciling pass files per sweep run: with the 5-minute
/// schedule, a pass over a million pending records takes about 1.7 days.
pub const RECONCILE_ROWS_PER_RUN: usize = 2000;
/// A reconciling pass starts at most this often.
pub const RECONCILE_INTERVAL: Duration = Duration::hours(24);

fn secs(d: std::time::Duration) -> Duration {
    Duration::milliseconds(d.as_millis() as i64)
}

#[cfg(any(test, feature = "test-fakes"))]
pub mod fakes;
