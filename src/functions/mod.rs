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
//! with record writes; [`notify`] keeps the notification outbox and publishes it. They are shared by the functions (a device event never sends a
//! wake-up message: it only applies).

pub mod apply;
pub mod device_events_http;
pub mod drain_soc_timer;
pub mod drift;
pub mod index;
pub mod notify;
pub mod set_soc_checks;
pub mod set_soc_http;
pub mod soc_queue_trigger;
pub mod wake;

use std::sync::Arc;

use chrono::Duration;

use crate::adapters::service_bus::SEND_TIMEOUT;
use crate::adapters::table_ledger::STORAGE_TIMEOUT;
use crate::config::Config;
use crate::domain::schedule::Backoff;
use crate::domain::DesiredState;
use crate::ports::{Clock, DeviceApi, Ledger, Notifier, SettingsQueue};

/// Everything a function needs: the ports and the policy.
#[derive(Clone)]
pub struct Services {
    pub device: Arc<dyn DeviceApi>,
    pub queue: Arc<dyn SettingsQueue>,
    pub ledger: Arc<dyn Ledger>,
    pub clock: Arc<dyn Clock>,
    /// The app's event topic; `None` when notifications are off (no outbox is written).
    pub notifier: Option<Arc<dyn Notifier>>,
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
    /// How long after its start one sweep run may start work (a device, a fan-out
    /// batch); what is left stays in the due index for the next run. The work in
    /// flight then ends within [`Policy::sweep_tail`] ([`Policy::sweep_run_bound`]).
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
    /// How long a `DeviceEventsHttp` request may take before it is answered, well under
    /// Event Grid's 30 s delivery timeout ([`EVENTS_ANSWER_WITHIN`]): no PUT starts
    /// after [`Policy::events_put_cutoff`], and what the request did not finish is
    /// left to each request's wake-up chain.
    pub events_answer_within: Duration,
    /// `SOC_DRIFT_POLICY` ([`drift`]).
    pub drift: DriftPolicy,
}

/// What drift (a battery reporting another value than its applied request's while
/// nothing is pending) leads to, besides being recorded and published ([`drift`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftPolicy {
    /// Only recorded and published (the default).
    Report,
    /// Also a new request for the applied value, through the normal path.
    Reassert,
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
            lease: secs(STORAGE_TIMEOUT) + put_window + LEASE_MARGIN,
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
            events_answer_within: EVENTS_ANSWER_WITHIN,
            drift: if config.drift_reassert {
                DriftPolicy::Reassert
            } else {
                DriftPolicy::Report
            },
        }
    }

    /// How long one piece of sweep work started just before the start deadline may
    /// still take, each call at its slowest but answered (`W`: the Table adapter's
    /// [`STORAGE_TIMEOUT`], `Q`: the Service Bus sender's [`SEND_TIMEOUT`]). Status
    /// calls and device-call budget waits end at the start deadline (they send
    /// nothing, so the sweep cuts them); after it, the longest path of an in-process
    /// device is: its lease write (`W`), its PUT (the device timeout), the result
    /// write (`W`), the re-sent wake-up message (`Q`) and its record write (`W`), then
    /// the index tidy-up: a record read, a filing, a fence and the removals (`4W`,
    /// removals at once). A fan-out batch (its records read at once, one batch send,
    /// then each device's record write and tidy-up at once) takes `6W + Q` at most.
    /// Conflicting writers (a POST to the same device meanwhile) and storage outages
    /// (read-backs) can make it longer; the run's lease renewals cover that, and
    /// `functionTimeout` ends it at the latest.
    pub fn sweep_tail(&self) -> Duration {
        self.device_timeout + secs(STORAGE_TIMEOUT) * 7 + secs(SEND_TIMEOUT)
    }

    /// All of a sweep run's work ends within this of its start: it starts work during
    /// its budget, and the work in flight then ends within [`Policy::sweep_tail`]; the
    /// reconciling pass runs beside it, inside its own budget plus its last batch
    /// write and its progress write.
    pub fn sweep_run_bound(&self) -> Duration {
        let reconcile = self.reconcile_budget + secs(STORAGE_TIMEOUT) * 2;
        self.sweep_budget + self.sweep_tail().max(reconcile)
    }

    /// The longest a run holds the sweep lease, renewals included: its work plus the
    /// clock skew between instances (another run reads the lease by its own clock)
    /// and [`LEASE_MARGIN`]. Inside the host's `functionTimeout` (checked at start).
    pub fn sweep_lease(&self) -> Duration {
        self.sweep_run_bound() + self.max_clock_skew * 2 + LEASE_MARGIN
    }

    /// One grant of the sweep lease: the run renews it every [`SWEEP_RENEW_EVERY`]
    /// (a write of at most `W`), and starts work only while what is left covers that
    /// work's tail; a crashed run's lease lapses this long after its last renewal.
    pub fn sweep_lease_grant(&self) -> Duration {
        let grant = self.sweep_tail()
            + SWEEP_RENEW_EVERY
            + secs(STORAGE_TIMEOUT)
            + self.max_clock_skew * 2
            + LEASE_MARGIN;
        grant.min(self.sweep_lease())
    }

    /// How long after a `DeviceEventsHttp` request arrives its last PUT may start: a
    /// PUT started then is answered within the device timeout and its result written
    /// within `W`, leaving [`EVENTS_MARGIN`] of [`Policy::events_answer_within`].
    pub fn events_put_cutoff(&self) -> Duration {
        self.events_answer_within - self.device_timeout - secs(STORAGE_TIMEOUT) - EVENTS_MARGIN
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
        let release = secs(STORAGE_TIMEOUT);
        if self.sweep_run_bound() + release + LEASE_MARGIN > FUNCTION_TIMEOUT
            || self.sweep_lease() > FUNCTION_TIMEOUT
        {
            problems.push(format!(
                "DEVICE_API_TIMEOUT_MS: a sweep run (budget {} s + work in flight {} s + releasing its lease {} s + margin {} s) would outlast the host's functionTimeout ({} s); lower the device timeout",
                self.sweep_budget.num_seconds(),
                (self.sweep_run_bound() - self.sweep_budget).num_seconds(),
                release.num_seconds(),
                LEASE_MARGIN.num_seconds(),
                FUNCTION_TIMEOUT.num_seconds()
            ));
        }
        if self.events_put_cutoff() < EVENTS_MIN_CUTOFF {
            problems.push(format!(
                "DEVICE_API_TIMEOUT_MS: {} ms leaves connection events less than {} s to start a PUT: DeviceEventsHttp answers within {} s (Event Grid waits 30 s), after the device timeout, the result write ({} s) and a {} s margin; at most {} ms",
                self.device_timeout.num_milliseconds(),
                EVENTS_MIN_CUTOFF.num_seconds(),
                self.events_answer_within.num_seconds(),
                release.num_seconds(),
                EVENTS_MARGIN.num_seconds(),
                (self.events_answer_within - release - EVENTS_MARGIN - EVENTS_MIN_CUTOFF)
                    .num_milliseconds()
            ));
        }
        problems
    }

    /// When the sweep must look at `record` ([`DesiredState::sweep_due_at`] with this policy).
    pub fn sweep_due(&self, record: &DesiredState) -> Option<chrono::DateTime<chrono::Utc>> {
        record.sweep_due_at(self.wake_grace, self.last_check_before_expiry())
    }

    /// How long before expiry a request's last re-check is due: one lease (no PUT starts
    /// closer to expiry than that, `apply`) less the clock skew, so that whichever
    /// instance receives it reads the last useful moment or later and writes `expired`
    /// without a device call (`wake::schedule_recheck`).
    pub fn last_check_before_expiry(&self) -> Duration {
        self.lease - self.max_clock_skew
    }
}

/// The host's `functionTimeout` (`host.json`): an invocation still running then is killed.
pub const FUNCTION_TIMEOUT: Duration = Duration::seconds(300);
/// The longest device call timeout the design allows (`DEVICE_API_TIMEOUT_MS`).
pub const MAX_DEVICE_TIMEOUT: Duration = Duration::seconds(30);
/// How long a sweep run starts work (it stops starting devices then): with the tail
/// of the work in flight, inside [`FUNCTION_TIMEOUT`] ([`Policy::sweep_run_bound`],
/// checked at start).
pub const SWEEP_BUDGET: Duration = Duration::seconds(190);
/// How often a sweep run renews its lease while it works.
pub const SWEEP_RENEW_EVERY: Duration = Duration::seconds(30);
/// How long the reconciling pass of one sweep run may start batch writes.
pub const RECONCILE_BUDGET: Duration = Duration::seconds(30);
/// A `DeviceEventsHttp` request is answered within this ([`Policy::events_answer_within`]):
/// well under Event Grid's 30 s delivery timeout, after which it would send the batch again.
pub const EVENTS_ANSWER_WITHIN: Duration = Duration::seconds(20);
/// What [`EVENTS_ANSWER_WITHIN`] keeps back for the host and the network.
pub const EVENTS_MARGIN: Duration = Duration::seconds(2);
/// The least time a connection-event request must have to start a PUT (checked at start).
pub const EVENTS_MIN_CUTOFF: Duration = Duration::seconds(1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn defaults() -> Policy {
        let vars: HashMap<String, String> = [
            ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
            ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true"),
            ("SOC_QUEUE_NAME", "soc"),
            ("DEVICE_API_BASE_URL", "http://127.0.0.1:1"),
            ("DEVICE_API_KEY", "k"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Policy::from_config(&Config::from_vars(&vars).expect("the defaults are valid"))
    }

    #[test]
    fn a_sweep_run_ends_inside_its_lease_and_the_lease_inside_function_timeout() {
        let p = defaults();
        let s = |d: Duration| d.num_seconds();
        // T + 7W + Q: 5 + 70 + 10.
        assert_eq!(s(p.sweep_tail()), 85);
        // Budget + the longer of the tail and the reconciling pass (30 + 2W).
        assert_eq!(s(p.sweep_run_bound()), 190 + 85);
        // The run's work, the clock skew twice and the margin.
        assert_eq!(s(p.sweep_lease()), 275 + 4 + 5);
        assert_eq!(s(p.sweep_lease_grant()), 85 + 30 + 10 + 4 + 5);
        // Its release write after the work, and the margin, inside functionTimeout.
        assert!(p.sweep_run_bound() + Duration::seconds(10) + LEASE_MARGIN <= FUNCTION_TIMEOUT);
        assert!(p.sweep_lease() <= FUNCTION_TIMEOUT);
        assert!(p.sweep_lease_grant() <= p.sweep_lease());
        assert!(p.design_problems().is_empty());
    }

    #[test]
    fn the_lease_is_sized_from_the_bounds_as_the_readme_states() {
        let p = defaults();
        // T + Lt + 2S + M = 5 + 10 + 4 + 5.
        assert_eq!(p.put_window.num_seconds(), 24);
        // W + window + M = 10 + 24 + 5.
        assert_eq!(p.lease.num_seconds(), 39);
    }

    #[test]
    fn a_reconciling_pass_longer_than_the_tail_bounds_the_sweep_run() {
        let mut p = defaults();
        p.reconcile_budget = Duration::seconds(100);
        // Budget 190 + the pass's 100 s and two writes (2W), longer than the tail (85).
        assert_eq!(p.sweep_run_bound().num_seconds(), 190 + 100 + 20);
    }

    #[test]
    fn the_settings_are_refused_only_past_their_limits() {
        let over = |p: &Policy, what: &str| p.design_problems().iter().any(|e| e.contains(what));
        let mut p = defaults();
        p.device_timeout = MAX_DEVICE_TIMEOUT;
        assert!(!over(&p, "is over"), "{:?}", p.design_problems());
        p.device_timeout = MAX_DEVICE_TIMEOUT + Duration::seconds(1);
        assert!(over(&p, "is over"));
        let mut p = defaults();
        p.request_ttl = p.lease + p.backoff.max;
        assert!(
            !over(&p, "SOC_REQUEST_TTL_SECONDS"),
            "{:?}",
            p.design_problems()
        );
        p.request_ttl -= Duration::seconds(1);
        assert!(over(&p, "SOC_REQUEST_TTL_SECONDS"));
        // A 15 s device timeout ends a sweep run (275 + 10 s more of tail), its release
        // and the margin exactly at functionTimeout: allowed; 16 s is not (below).
        let mut p = defaults();
        p.device_timeout = Duration::seconds(15);
        assert_eq!(
            p.sweep_run_bound() + Duration::seconds(10) + LEASE_MARGIN,
            FUNCTION_TIMEOUT
        );
        assert!(!over(&p, "functionTimeout"), "{:?}", p.design_problems());
        // A 7 s device timeout leaves connection events exactly 1 s to start a PUT.
        let mut p = defaults();
        p.device_timeout = Duration::seconds(7);
        assert_eq!(p.events_put_cutoff(), EVENTS_MIN_CUTOFF);
        assert!(!over(&p, "connection events"), "{:?}", p.design_problems());
    }

    #[test]
    fn connection_events_start_their_last_put_in_time_to_answer_within_twenty_seconds() {
        let mut p = defaults();
        assert_eq!(p.events_answer_within.num_seconds(), 20);
        // 20 - T (5) - W (10) - margin (2).
        assert_eq!(p.events_put_cutoff().num_seconds(), 3);
        p.device_timeout = Duration::seconds(8);
        let problems = p.design_problems();
        assert!(
            problems
                .iter()
                .any(|e| e.contains("DEVICE_API_TIMEOUT_MS") && e.contains("connection events")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_device_timeout_that_would_push_a_sweep_run_past_function_timeout_is_refused() {
        let mut p = defaults();
        p.device_timeout = Duration::seconds(16);
        let problems = p.design_problems();
        assert!(
            problems.iter().any(|e| e.contains("functionTimeout")),
            "{problems:?}"
        );
    }
}
