//! What one seed simulates: the world (devices, instances, clients, timer) and how
//! often each fault happens. Everything here is plain data drawn from the seed, so a
//! scripted schedule is the same data written by hand (see `tests/regressions.rs`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The physical bounds of the simulated world. The service's policy must be safe
/// for every world inside them; the checker judges it only inside them.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// `DEVICE_API_TIMEOUT_MS`: the device client gives up after this.
    pub device_timeout_ms: u64,
    /// How long after the client's timeout a PUT may still land on the device.
    pub late_landing_ms: u64,
    /// Timeout of one ledger (Table Storage) request.
    pub storage_timeout_ms: u64,
    /// Timeout of one Service Bus send.
    pub send_timeout_ms: u64,
    /// Largest difference between an instance's clock and true time.
    pub max_skew_ms: u64,
    /// Service Bus peek-lock duration and max delivery count.
    pub lock_ms: u64,
    pub max_deliveries: u32,
    /// The host renews a delivery's lock for at most this long (`maxAutoLockRenewalDuration`).
    pub max_lock_renewal_ms: u64,
    /// A ledger write (or a Service Bus send) whose caller timed out may still take
    /// effect up to this long after the caller's timeout (Table Storage's own server
    /// timeout is 30 s; a request delayed in the network arrives later still).
    pub late_commit_ms: u64,
    /// The host's `functionTimeout`: an invocation still running is killed.
    pub function_timeout_ms: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            device_timeout_ms: 5_000,
            late_landing_ms: 10_000,
            storage_timeout_ms: 10_000,
            send_timeout_ms: 10_000,
            max_skew_ms: 2_000,
            lock_ms: 60_000,
            max_deliveries: 10,
            max_lock_renewal_ms: 300_000,
            late_commit_ms: 40_000,
            function_timeout_ms: 300_000,
        }
    }
}

/// Probabilities of each fault, per operation (or per invocation for crashes).
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Ledger: error before anything happened.
    pub store_unavailable: f64,
    /// Ledger: the write commits but the caller sees a timeout.
    pub store_ambiguous: f64,
    /// Ledger: slow, up to the storage timeout, but answered.
    pub store_slow: f64,
    /// Ledger: a page of the pending listing fails.
    pub page_error: f64,
    /// Device cloud: 429/5xx.
    pub device_transient: f64,
    /// Device cloud: the call times out (a PUT may still land late).
    pub device_timeout: f64,
    /// Device cloud: slow, up to the timeout, but answered.
    pub device_slow: f64,
    /// Of timed-out PUTs, the share that still lands (within the late-landing bound).
    pub late_landing: f64,
    /// Service Bus send: fails (nothing enqueued).
    pub send_fail: f64,
    /// Service Bus send: enqueued but the caller sees a timeout.
    pub send_ambiguous: f64,
    /// Delivery: the host loses the lock (the message is redelivered while still running).
    pub lock_loss: f64,
    /// Delivery: the completion is lost (the message is delivered again after its lock).
    pub complete_lost: f64,
    /// Invocation: dropped at one of its await points (any of them: the crash point
    /// is drawn log-uniformly from 1 to [`MAX_CRASH_OP`], before or after the effect).
    pub crash: f64,
    /// Of ledger writes that take effect but whose caller sees a timeout, the share
    /// that commits only after the caller's timeout (and so after its read-back
    /// started), within [`Bounds::late_commit_ms`], detached from the caller.
    pub late_commit: f64,
    /// Of ambiguous Service Bus sends, the share enqueued after the caller's timeout.
    pub late_send: f64,
    /// Of PUTs answered `500/502/503/504`, the share the device cloud still applies
    /// within the late-landing bound after the answer.
    pub put_5xx_lands: f64,
}

/// Crash points are drawn among the first this many port operations of an invocation.
pub const MAX_CRASH_OP: u64 = 400;

/// A dependency that can be down for everybody at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependency {
    /// Table Storage: every ledger operation fails or times out; a share of the
    /// writes sent during the outage commit late (after it, within the late bound).
    Ledger,
    /// Service Bus: sends fail or time out (a share enqueue late), nothing is
    /// delivered and completions are lost.
    Bus,
    /// The vendor's device cloud: every call is answered `503` or times out, and no
    /// PUT lands; no connection event is sent.
    DeviceCloud,
    /// The app's event topic: every publish fails or times out (a share of them is
    /// accepted all the same: the caller hears a timeout).
    Topic,
}

/// The app's event topic (notifications on), and how it fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Topic {
    /// A publish is refused (`503`) before anything is kept.
    pub unavailable: f64,
    /// A publish is kept, but the caller hears a timeout.
    pub ambiguous: f64,
}

/// A correlated outage: `dependency` is down for every instance in `from_ms..until_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    pub dependency: Dependency,
    pub from_ms: u64,
    pub until_ms: u64,
    /// Of the writes (sends) issued during the outage, the share that still takes
    /// effect, late: after the outage ends, within [`Bounds::late_commit_ms`] of the
    /// caller's timeout.
    pub late_commit: f64,
}

/// A fault forced on one operation of one invocation, for scripted schedules: the
/// `op`-th port operation (1-based, as the trace counts them) of the invocation
/// labelled `inv` (`post#1`, `deliv#3`, ...).
#[derive(Debug, Clone)]
pub struct Scripted {
    pub inv: String,
    pub op: u32,
    pub fault: Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forced {
    /// A ledger operation or send fails before any effect.
    Fails,
    /// A ledger write or send: the caller times out; it takes effect this many ms
    /// after the caller's timeout (detached: a crash of the caller does not stop it).
    CommitsLate(u64),
    /// A device PUT answered with this status (`500/502/503/504`) that the device
    /// cloud applies this many ms after the answer.
    Put5xxLands(u16, u64),
    /// The invocation is dropped at this operation, before (`false`) or after it.
    Crash(bool),
}

/// A reader of the API: `GET /api/devices/{device}/soc` every `every_ms` from
/// `from_ms` to `until_ms` (each client also polls its own request's status).
#[derive(Debug, Clone, Copy)]
pub struct ReaderSpec {
    pub device: usize,
    pub from_ms: u64,
    pub every_ms: u64,
    pub until_ms: u64,
}

/// The vendor's connection events: when a device comes online (while faults are on),
/// the device cloud may send a `connected` CloudEvent to `DeviceEventsHttp`, late,
/// duplicated (each copy with its own delay, so copies and other events reorder) or not
/// at all; the sender delivers again after a `503` or no answer (Event Grid's retries).
#[derive(Debug, Clone, Copy, Default)]
pub struct Events {
    /// Chance that a device coming online is announced (0: the world has no events).
    pub emit: f64,
    /// Of announced reconnects, the share whose event is lost.
    pub lost: f64,
    /// Of sent events, the share delivered twice.
    pub duplicate: f64,
    /// Each copy arrives up to this long after the device came online.
    pub max_delay_ms: u64,
    /// Deliveries after the first, after a `503` or no answer.
    pub retries: u32,
}

#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub name: String,
    /// `false`: the device cloud answers 404.
    pub known: bool,
    /// The device cloud rejects (422) values below this.
    pub reject_below: Option<u8>,
    pub online: bool,
    /// (at ms, online) toggles while faults are on.
    pub flaps: Vec<(u64, bool)>,
}

#[derive(Debug, Clone)]
pub struct PostSpec {
    pub at_ms: u64,
    pub device: usize,
    pub min_soc: u8,
    pub idempotency_key: Option<String>,
    /// Client retries (same key) after a 503, 409 or no answer.
    pub retries: u32,
    /// Later retries with the same key and body, this many ms after the first
    /// answer (minutes to hours), whatever it was: a client that lost the answer, a
    /// replayed job. Only with a key.
    pub late_retries: Vec<u64>,
    /// After a `2xx` with a `requestId`, the client polls
    /// `GET .../soc/requests/{requestId}` this many times.
    pub polls: u32,
    pub poll_every_ms: u64,
    /// After its first `2xx` naming a request, the client cancels that request
    /// (`DELETE .../soc/requests/{requestId}`) this many ms after the answer, once per
    /// entry (a second entry repeats the cancel), while the faults are on.
    pub cancels: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub bounds: Bounds,
    pub faults: Faults,
    pub devices: Vec<DeviceSpec>,
    pub posts: Vec<PostSpec>,
    /// Clock skew of each instance at start (ms, signed); restarts draw a new one.
    pub skews_ms: Vec<i64>,
    pub restarts: Vec<(u64, usize)>,
    /// (at ms, instance): scale-in: every invocation running on the instance dies and
    /// it takes no new ones (instance 0 is never removed).
    pub scale_ins: Vec<(u64, usize)>,
    /// Correlated outages of the ledger, Service Bus and the device cloud.
    pub outages: Vec<Outage>,
    /// Faults forced on named operations (scripted schedules; empty in generated worlds).
    pub script: Vec<Scripted>,
    /// Readers that GET the device's latest request while things happen.
    pub readers: Vec<ReaderSpec>,
    /// The device-call budget per instance (`DEVICE_API_MAX_CALLS_PER_SECOND` /
    /// instances), calls per second; `None`: no budget (the port has none).
    pub device_rate: Option<f64>,
    /// Of timer runs, the share that fires late (past due, up to two intervals),
    /// and the share that fires twice back to back (the host's catch-up of a missed run).
    pub late_sweeps: f64,
    pub double_sweeps: f64,
    pub sweep_every_ms: u64,
    pub sweep_first_ms: u64,
    pub ttl_s: u64,
    pub recheck_initial_s: u64,
    pub recheck_max_s: u64,
    pub drain_concurrency: usize,
    /// The vendor's connection events.
    pub events: Events,
    /// Notifications: `None` = off (no outbox, no topic).
    pub notify: Option<Topic>,
    /// `DRAIN_SOC_MAX_DUE` and `DRAIN_SOC_FANOUT_ABOVE`: small, so that runs that
    /// stop early and fan out happen with a handful of devices.
    pub sweep_max_due: usize,
    pub fanout_above: usize,
    /// The sweep's time budget (its lease is this plus one device lease).
    pub sweep_budget_s: u64,
    /// Pending records the reconciling pass files per sweep (0: the pass is off).
    pub reconcile_rows: usize,
    /// Faults, flaps and restarts stop here; every device is online from here on.
    pub faults_until_ms: u64,
    /// The run ends (and is judged) here.
    pub end_ms: u64,
}

impl Scenario {
    /// A quiet world: no faults, one instance, nothing scheduled. Scripts fill it in.
    pub fn quiet(seed: u64) -> Self {
        Self {
            seed,
            bounds: Bounds::default(),
            faults: Faults::default(),
            devices: Vec::new(),
            posts: Vec::new(),
            skews_ms: vec![0],
            restarts: Vec::new(),
            scale_ins: Vec::new(),
            outages: Vec::new(),
            script: Vec::new(),
            readers: Vec::new(),
            device_rate: None,
            late_sweeps: 0.0,
            double_sweeps: 0.0,
            sweep_every_ms: 120_000,
            sweep_first_ms: 120_000,
            ttl_s: 3600,
            recheck_initial_s: 30,
            recheck_max_s: 300,
            drain_concurrency: 4,
            events: Events::default(),
            notify: None,
            sweep_max_due: 1000,
            fanout_above: 1000,
            sweep_budget_s: 60,
            reconcile_rows: 1000,
            faults_until_ms: 600_000,
            end_ms: 0,
        }
        .settled()
    }

    /// Sets `end_ms` so that everything accepted can settle after the faults stop:
    /// the settle bound of property S3.
    pub fn settled(mut self) -> Self {
        self.end_ms = self.faults_until_ms + self.settle_bound_ms();
        self
    }

    /// How long after the faults stop every accepted request must be settled (S3).
    /// A device that comes back is found by its next re-check (at most the longest
    /// back-off away) or by the sweep once that message is overdue (plus the grace);
    /// a crashed sweep's lease lapses first (its budget plus a device lease); the
    /// sweep may need a run per device when it takes fewer than all; two more sweeps
    /// (a lease held by a crashed or timed-out holder lapses in between) plus the
    /// longest single apply.
    pub fn settle_bound_ms(&self) -> u64 {
        let b = &self.bounds;
        let device_lease = b.device_timeout_ms
            + b.late_landing_ms
            + b.storage_timeout_ms
            + 4 * b.max_skew_ms
            + 10_000;
        let runs = self.devices.len().div_ceil(self.sweep_max_due.max(1)) as u64;
        (2 + runs) * self.sweep_every_ms
            + (self.recheck_max_s.max(self.recheck_initial_s) + self.recheck_initial_s) * 1000
            + self.sweep_budget_s * 1000
            + device_lease
            + 2 * (b.device_timeout_ms + b.late_landing_ms + 3 * b.storage_timeout_ms)
            + 60_000
            // A write sent before the faults stopped may commit this much later; a call
            // may wait its full turn in the device-call budget after a Retry-After pause.
            + b.storage_timeout_ms
            + b.late_commit_ms
            + if self.device_rate.is_some() { 90_000 } else { 0 }
    }

    /// The same world without connection events (the regression seeds of issue 8 were
    /// found before the events existed, and replay so).
    pub fn without_events(mut self) -> Self {
        self.events = Events::default();
        self
    }

    /// This world with notifications off (as before issue 21: no outbox, no topic).
    pub fn without_notifications(mut self) -> Self {
        self.notify = None;
        self.outages.retain(|o| o.dependency != Dependency::Topic);
        self
    }

    /// The world of one seed.
    pub fn generate(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bounds = Bounds::default();
        let level = |rng: &mut ChaCha8Rng, low: f64, high: f64| match rng.gen_range(0..4) {
            0 => 0.0,
            1 | 2 => low,
            _ => high,
        };
        let faults = Faults {
            store_unavailable: level(&mut rng, 0.02, 0.1),
            store_ambiguous: level(&mut rng, 0.02, 0.08),
            store_slow: level(&mut rng, 0.05, 0.3),
            page_error: level(&mut rng, 0.05, 0.3),
            device_transient: level(&mut rng, 0.05, 0.2),
            device_timeout: level(&mut rng, 0.05, 0.2),
            device_slow: level(&mut rng, 0.1, 0.4),
            late_landing: rng.gen_range(0.0..1.0),
            send_fail: level(&mut rng, 0.05, 0.3),
            send_ambiguous: level(&mut rng, 0.02, 0.1),
            lock_loss: level(&mut rng, 0.05, 0.2),
            complete_lost: level(&mut rng, 0.05, 0.2),
            crash: level(&mut rng, 0.03, 0.15),
            ..Faults::default()
        };
        let active_ms = rng.gen_range(60_000..1_200_000u64);
        let faults_until_ms = active_ms + rng.gen_range(0..600_000u64);
        let n_devices = rng.gen_range(1..=3usize);
        let devices = (0..n_devices)
            .map(|i| {
                let mut flaps = Vec::new();
                let mean = rng.gen_range(5_000..300_000u64);
                let start = rng.gen_bool(0.5);
                flap(&mut rng, &mut flaps, start, 1..=2 * mean, faults_until_ms);
                DeviceSpec {
                    name: format!("d{i}"),
                    known: rng.gen_bool(0.97),
                    reject_below: rng.gen_bool(0.2).then_some(10),
                    online: start,
                    flaps,
                }
            })
            .collect();
        // Posts come in bursts so that they race each other and the timer.
        let n_posts = rng.gen_range(1..=7usize);
        let bursts: Vec<u64> = (0..rng.gen_range(1..=3))
            .map(|_| rng.gen_range(0..active_ms))
            .collect();
        let mut posts: Vec<PostSpec> = (0..n_posts)
            .map(|i| {
                let centre = bursts[rng.gen_range(0..bursts.len())];
                PostSpec {
                    at_ms: (centre + rng.gen_range(0..15_000)).min(active_ms),
                    device: rng.gen_range(0..n_devices),
                    min_soc: rng.gen_range(0..=100),
                    idempotency_key: rng.gen_bool(0.5).then(|| format!("k{i}")),
                    retries: rng.gen_range(0..=2),
                    late_retries: Vec::new(),
                    polls: 0,
                    poll_every_ms: 0,
                    cancels: Vec::new(),
                }
            })
            .collect();
        posts.sort_by_key(|p| p.at_ms);
        let n_instances = rng.gen_range(1..=3usize);
        let skew = bounds.max_skew_ms as i64;
        let skews_ms = (0..n_instances)
            .map(|_| rng.gen_range(-skew..=skew))
            .collect();
        let restarts = (0..rng.gen_range(0..=2))
            .map(|_| {
                (
                    rng.gen_range(0..faults_until_ms.max(1)),
                    rng.gen_range(0..n_instances),
                )
            })
            .collect();
        let sweep_every_ms = rng.gen_range(30_000..=300_000u64);
        let ttl_s = if rng.gen_bool(0.3) {
            rng.gen_range(60..=900)
        } else {
            86_400
        };
        // Drawn from a stream of their own, so the rest of the world is what it was
        // before events existed.
        let mut ev = ChaCha8Rng::seed_from_u64(seed ^ 0x0e7e_47e5_c0de_cafe);
        let events = if ev.gen_bool(0.25) {
            Events::default()
        } else {
            Events {
                emit: ev.gen_range(0.3..=1.0),
                lost: level(&mut ev, 0.1, 0.4),
                duplicate: level(&mut ev, 0.1, 0.5),
                max_delay_ms: ev.gen_range(0..=60_000),
                retries: ev.gen_range(0..=3),
            }
        };
        Self {
            seed,
            bounds,
            faults,
            devices,
            posts,
            skews_ms,
            restarts,
            sweep_every_ms,
            sweep_first_ms: rng.gen_range(0..sweep_every_ms),
            ttl_s,
            recheck_initial_s: rng.gen_range(5..=60),
            recheck_max_s: rng.gen_range(60..=600),
            drain_concurrency: rng.gen_range(1..=4),
            events,
            notify: None,
            sweep_max_due: rng.gen_range(1..=4),
            fanout_above: rng.gen_range(0..=3),
            sweep_budget_s: rng.gen_range(20..=120),
            reconcile_rows: rng.gen_range(0..=2),
            faults_until_ms,
            end_ms: 0,
            scale_ins: Vec::new(),
            outages: Vec::new(),
            script: Vec::new(),
            readers: Vec::new(),
            device_rate: None,
            late_sweeps: 0.0,
            double_sweeps: 0.0,
        }
        .widen()
        .cancelling()
        .notifying()
        .valid()
        .settled()
    }

    /// The settings the service would refuse at start (`Policy::design_problems`)
    /// made valid: a request lives at least one lease (under a minute here) plus the
    /// longest re-check delay.
    fn valid(mut self) -> Self {
        let longest = self.recheck_max_s.max(self.recheck_initial_s);
        self.ttl_s = self.ttl_s.max(longest + 60);
        self
    }

    /// Issue 17's fault shapes, drawn from a stream of their own (so the world above is
    /// drawn as before): late commits and sends, 5xx PUTs that land, correlated outages,
    /// scale-in, past-due and doubled timer runs, late retries with the same key,
    /// readers, the device-call budget, and in a share of seeds a fleet of hundreds of
    /// devices on several instances.
    fn widen(mut self) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x0517_3d1d_e000_0017);
        let level = |rng: &mut ChaCha8Rng, low: f64, high: f64| match rng.gen_range(0..4) {
            0 => 0.0,
            1 | 2 => low,
            _ => high,
        };
        self.faults.late_commit = level(&mut rng, 0.3, 0.8);
        self.faults.late_send = level(&mut rng, 0.3, 0.8);
        self.faults.put_5xx_lands = level(&mut rng, 0.2, 0.6);
        let fleet = rng.gen_bool(0.05);
        if fleet {
            self.fleet(&mut rng);
        }
        let active_ms = self.posts.iter().map(|p| p.at_ms).max().unwrap_or(0);
        // Clients retry with the same key minutes to hours later (log-uniform).
        let late_share = level(&mut rng, 0.2, 0.6);
        let mut last = 0;
        for p in &mut self.posts {
            p.polls = if fleet { 0 } else { rng.gen_range(0..=3) };
            p.poll_every_ms = rng.gen_range(1_000..=60_000);
            if p.idempotency_key.is_some() && !fleet && rng.gen_bool(late_share) {
                let n = rng.gen_range(1..=2);
                p.late_retries = (0..n)
                    .map(|_| (60_000f64 * 120f64.powf(rng.gen_range(0.0..1.0))) as u64)
                    .collect();
                p.late_retries.sort_unstable();
                last = last.max(p.at_ms + p.late_retries.last().copied().unwrap_or(0));
            }
        }
        // The faults last until the late retries are in (the run judges after them).
        self.faults_until_ms = self.faults_until_ms.max(last + 60_000);
        let until = self.faults_until_ms;
        // Correlated outages: seconds to minutes, some longer than the read-back window
        // (~50 s) and the lease (39 s).
        let n_outages = match rng.gen_range(0..10) {
            0..=3 => 0,
            4..=7 => 1,
            _ => rng.gen_range(2..=4),
        };
        for _ in 0..n_outages {
            let dependency = match rng.gen_range(0..3) {
                0 => Dependency::Ledger,
                1 => Dependency::Bus,
                _ => Dependency::DeviceCloud,
            };
            let len = (2_000f64 * 150f64.powf(rng.gen_range(0.0..1.0))) as u64;
            let from = rng.gen_range(0..active_ms.max(1) + 60_000).min(until);
            self.outages.push(Outage {
                dependency,
                from_ms: from,
                until_ms: (from + len).min(until),
                late_commit: rng.gen_range(0.0..0.5),
            });
        }
        let n = self.skews_ms.len();
        if n > 1 && rng.gen_bool(0.2) {
            self.scale_ins
                .push((rng.gen_range(0..until.max(1)), rng.gen_range(1..n)));
        }
        // Instance-wide restarts while work is in flight (deployments, worker recycling).
        if rng.gen_bool(0.3) {
            let around = self.posts[rng.gen_range(0..self.posts.len())].at_ms;
            self.restarts
                .push((around + rng.gen_range(0..20_000), rng.gen_range(0..n)));
        }
        self.late_sweeps = level(&mut rng, 0.05, 0.3);
        self.double_sweeps = level(&mut rng, 0.05, 0.2);
        for _ in 0..rng.gen_range(0..=2usize) {
            let from = rng.gen_range(0..active_ms.max(1));
            self.readers.push(ReaderSpec {
                device: rng.gen_range(0..self.devices.len()),
                from_ms: from,
                every_ms: rng.gen_range(2_000..=60_000),
                until_ms: (from + rng.gen_range(30_000..=1_200_000)).min(until),
            });
        }
        // The device-call budget: most seeds without; some with a small share, so
        // calls wait, are refused (no turn within 30 s) and pause on Retry-After.
        if rng.gen_bool(0.3) {
            self.device_rate = Some(rng.gen_range(0.05..=2.0));
        }
        self
    }

    /// Issue 21's cancels, drawn from a stream of their own (so the world above is drawn
    /// as before): in most worlds a share of the clients cancel their request after its
    /// `2xx`, from a tenth of a second to twenty minutes later (log-uniform), some twice.
    /// Not in fleets, whose model is the sweep's work at scale (a cancelled request is
    /// work the sweep no longer has).
    fn cancelling(mut self) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x00ca_ce11_0000_0021);
        let share = match rng.gen_range(0..4) {
            _ if self.devices.len() > 3 => 0.0,
            0 => 0.0,
            1 | 2 => 0.3,
            _ => 0.7,
        };
        for p in &mut self.posts {
            if rng.gen_bool(share) {
                let first = (100f64 * 12_000f64.powf(rng.gen_range(0.0..1.0))) as u64;
                p.cancels.push(first);
                if rng.gen_bool(0.3) {
                    p.cancels.push(first + rng.gen_range(0..30_000));
                }
            }
        }
        self
    }

    /// Issue 21's notifications, drawn from a stream of their own (the world above is
    /// drawn as before): on in most seeds, with a topic that refuses, keeps a publish
    /// whose caller hears a timeout, and is sometimes down for minutes.
    fn notifying(mut self) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x0e7e_0700_0000_0021);
        if rng.gen_bool(0.2) {
            return self;
        }
        let level = |rng: &mut ChaCha8Rng, low: f64, high: f64| match rng.gen_range(0..4) {
            0 => 0.0,
            1 | 2 => low,
            _ => high,
        };
        self.notify = Some(Topic {
            unavailable: level(&mut rng, 0.05, 0.3),
            ambiguous: level(&mut rng, 0.05, 0.2),
        });
        if rng.gen_bool(0.3) {
            let until = self.faults_until_ms;
            let len = (2_000f64 * 300f64.powf(rng.gen_range(0.0..1.0))) as u64;
            let from = rng.gen_range(0..until.max(1));
            self.outages.push(Outage {
                dependency: Dependency::Topic,
                from_ms: from,
                until_ms: (from + len).min(until),
                late_commit: rng.gen_range(0.0..0.5),
            });
        }
        self
    }

    /// A fleet: hundreds of devices on several instances, about one request each, most
    /// devices steady (flaps hours apart), the sweep taking a share of them per run.
    fn fleet(&mut self, rng: &mut ChaCha8Rng) {
        let n_devices = rng.gen_range(100..=200usize);
        let until = self.faults_until_ms;
        let active_ms = self.posts.iter().map(|p| p.at_ms).max().unwrap_or(60_000);
        self.devices = (0..n_devices)
            .map(|i| {
                let start = rng.gen_bool(0.5);
                let mut flaps = Vec::new();
                if rng.gen_bool(0.2) {
                    flap(rng, &mut flaps, start, 30_000..=900_000, until);
                }
                DeviceSpec {
                    name: format!("d{i}"),
                    known: rng.gen_bool(0.98),
                    reject_below: rng.gen_bool(0.1).then_some(10),
                    online: start,
                    flaps,
                }
            })
            .collect();
        let n_posts = rng.gen_range(n_devices / 2..=n_devices);
        self.posts = (0..n_posts)
            .map(|i| PostSpec {
                at_ms: rng.gen_range(0..active_ms.max(1)),
                device: rng.gen_range(0..n_devices),
                min_soc: rng.gen_range(0..=100),
                idempotency_key: rng.gen_bool(0.5).then(|| format!("k{i}")),
                retries: rng.gen_range(0..=2),
                late_retries: Vec::new(),
                polls: 0,
                poll_every_ms: 0,
                cancels: Vec::new(),
            })
            .collect();
        self.posts.sort_by_key(|p| p.at_ms);
        let skew = self.bounds.max_skew_ms as i64;
        self.skews_ms = (0..rng.gen_range(3..=6))
            .map(|_| rng.gen_range(-skew..=skew))
            .collect();
        self.sweep_max_due = rng.gen_range(n_devices / 4..=n_devices);
        self.fanout_above = rng.gen_range(5..=50);
        self.drain_concurrency = rng.gen_range(2..=8);
        self.reconcile_rows = rng.gen_range(0..=50);
    }
}

/// A device's online/offline toggles until `until`, each `gap` after the last.
fn flap(
    rng: &mut ChaCha8Rng,
    flaps: &mut Vec<(u64, bool)>,
    mut online: bool,
    gap: std::ops::RangeInclusive<u64>,
    until: u64,
) {
    let mut t = 0u64;
    loop {
        t += rng.gen_range(gap.clone());
        if t >= until {
            return;
        }
        online = !online;
        flaps.push((t, online));
    }
}
