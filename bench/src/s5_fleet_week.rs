//! S5: a fleet watched for a week, in virtual time (issue 20, item 2).
//!
//! N devices, a tenth of them offline with live wake-up chains, over the 7-day life of
//! their requests and the day those requests end. The real `SetSocHttp` (POST),
//! `SocQueueTrigger` (each wake-up message delivered when it is due) and `DrainSocTimer`
//! (every 5 minutes, the schedule's default) over the in-memory ports of
//! `functions::fakes`, with the production default policy, in virtual time (the fake
//! clock moves from one event to the next). The ledger is counted at the port as in S1;
//! the queue's sends and the device cloud's calls are counted too.
//!
//! The world around the functions:
//! - every device POSTs once on day 1. Online devices (9 in 10) at uniformly random
//!   times over the day; they apply at once (and leave whatever index entry their POST
//!   filed). Offline devices (every 10th) likewise in the **steady** scenario, or all at
//!   the same instant, the start, in the **burst** scenario (a fleet-wide campaign);
//! - a share of the wake-up messages is lost (never delivered), [`LOSS`] by default;
//! - a share of the offline devices comes back online each day ([`RETURN_PER_DAY`],
//!   at uniformly random times over the first 7 days), without a connection event:
//!   their chain's next delivery applies the setting.
//!
//! Per sweep run it records the devices visited (`SweepReport::due` and its columns),
//! the ledger operations, the messages sent and device calls the run made, the quota's
//! headroom (`DRAIN_SOC_MAX_DUE` − visited) and **D**, the devices that need the sweep
//! at that run, judged from the world (not from the index):
//! - *lost*: pending, the wake-up message its record expects was lost, and it is
//!   overdue (past its due time plus the wake grace);
//! - *near expiry*: pending and within one lease of its expiry;
//! - *returned*: a device that came back online and whose request its chain has since
//!   applied, at the first run after (its index entry has to go: one visit). One the
//!   previous run counted as lost (and so applied itself) is not counted again.
//!
//! The goal (issue 20): visits per run within 2x of D, whatever the offline count, and
//! the quota never saturated at 1,000,000 devices.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use chrono::{DateTime, Duration, Utc};
use soc_settings::domain::{DeviceId, RequestStatus};
use soc_settings::functions::drain_soc_timer::{self, SweepReport};
use soc_settings::functions::fakes::{post_min_soc, Harness};
use soc_settings::functions::soc_queue_trigger::{self, Delivery, Settle};
use soc_settings::ports::{Clock as _, Ledger as _, OutgoingMessage};

use crate::report::{row, Row};
use crate::s1_sweep_scale::{Counting, Ops};

/// Share of the wake-up messages lost (never delivered): 0.1 %.
pub const LOSS: f64 = 0.001;
/// Share of the offline devices that come back online per day, over the first 7 days.
pub const RETURN_PER_DAY: f64 = 0.01;
/// Every `OFFLINE_EVERY`-th device is offline: 10 %.
const OFFLINE_EVERY: usize = 10;
/// The sweep schedule's default (`DRAIN_SOC_SCHEDULE`, every 5 minutes).
const SWEEP_EVERY_MS: i64 = 5 * 60 * 1000;
const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Every POST at a random time over day 1.
    Steady,
    /// Online devices over day 1, every offline device's POST at the start.
    Burst,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Burst => "burst",
        }
    }
}

/// One fleet-week run's settings.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub devices: usize,
    pub scenario: Scenario,
    /// Virtual days simulated (the requests of day 1 end during day 8).
    pub days: i64,
    pub loss: f64,
    pub return_per_day: f64,
    /// Days over which offline devices return.
    pub return_days: i64,
    pub seed: u64,
}

impl Fleet {
    pub fn new(devices: usize, scenario: Scenario, days: i64) -> Self {
        Self {
            devices,
            scenario,
            days,
            loss: LOSS,
            return_per_day: RETURN_PER_DAY,
            return_days: 7,
            seed: 20,
        }
    }
}

/// What one sweep run did, and what the world said it had to do.
#[derive(Debug, Clone)]
pub struct RunRec {
    /// Milliseconds of virtual time since the start.
    pub at_ms: i64,
    pub report: SweepReport,
    pub reads: u64,
    pub writes: u64,
    pub queries: u64,
    pub rows_listed: u64,
    pub sent: u64,
    pub device_calls: u64,
    pub d_lost: u64,
    pub d_expiry: u64,
    pub d_returned: u64,
    /// POSTs applied at once since the previous run (each leaves an index entry behind).
    pub posts_applied: u64,
}

impl RunRec {
    pub fn visits(&self) -> u64 {
        self.report.due as u64
    }
    pub fn d(&self) -> u64 {
        self.d_lost + self.d_expiry + self.d_returned
    }
    fn ops(&self) -> u64 {
        self.reads + self.writes + self.queries
    }
}

/// Totals of one virtual day, by who spent them.
#[derive(Debug, Clone, Default)]
pub struct DayRec {
    pub post_ops: u64,
    pub queue_ops: u64,
    pub sweep_ops: u64,
    pub posts: u64,
    pub deliveries: u64,
    pub sent: u64,
    pub lost: u64,
    pub device_calls: u64,
    pub returned: u64,
}

impl DayRec {
    pub fn ops(&self) -> u64 {
        self.post_ops + self.queue_ops + self.sweep_ops
    }
}

/// A fleet-week run: every sweep run, every day, and how it ended.
#[derive(Debug, Clone)]
pub struct Week {
    pub fleet: Fleet,
    pub quota: usize,
    pub runs: Vec<RunRec>,
    pub days: Vec<DayRec>,
    pub wall: std::time::Duration,
    /// Final statuses: pending, applied, expired, failed.
    pub end: [u64; 4],
    /// POSTs answered `applied` and `pending`.
    pub posted: (u64, u64),
    /// Deliveries the trigger asked to retry (none expected: no faults here).
    pub retries: u64,
}

/// Smallest first: at one instant, returns, then deliveries, then POSTs, then the sweep
/// (like S2, a message due at the sweep's time is delivered before it runs). POSTs and
/// returns are known from the start and wait in [`Schedule`]s; the heap holds the rest.
struct Event {
    at: i64,
    seq: u64,
    what: What,
}

enum What {
    Return(u32),
    Deliver(Box<OutgoingMessage>),
    Post(u32),
    Sweep,
}

impl What {
    fn order(&self) -> u8 {
        match self {
            Self::Return(_) => 0,
            Self::Deliver(_) => 1,
            Self::Post(_) => 2,
            Self::Sweep => 3,
        }
    }
}

impl Event {
    /// An event from a [`Schedule`] (the heap numbers its own).
    fn scheduled(at: i64, what: What) -> Self {
        Self { at, seq: 0, what }
    }
    fn key(&self) -> (i64, u8, u64) {
        (self.at, self.what.order(), self.seq)
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// Who an invocation's ledger operations are booked to (the sweep's are per run).
enum Spender {
    Post,
    Queue,
}

/// Events known from the start, in time order: (at, device).
struct Schedule {
    events: Vec<(i64, u32)>,
    next: usize,
}

impl Schedule {
    fn new(mut events: Vec<(i64, u32)>) -> Self {
        events.sort_unstable();
        Self { events, next: 0 }
    }
    fn peek(&self) -> Option<(i64, u32)> {
        self.events.get(self.next).copied()
    }
    fn take(&mut self) -> (i64, u32) {
        self.next += 1;
        self.events[self.next - 1]
    }
}

/// splitmix64: a fixed seed gives the same world (POST times, losses, returns).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The world around the functions: the event queue and what D is judged from.
struct World {
    h: Harness,
    ops: Arc<Ops>,
    ids: Vec<DeviceId>,
    rng: Rng,
    loss: f64,
    start: DateTime<Utc>,
    now_ms: i64,
    seq: u64,
    events: BinaryHeap<Reverse<Event>>,
    posts: Schedule,
    returns: Schedule,
    /// Lost messages: (device, message id), while the device's record may still expect it.
    lost: Vec<(u32, String)>,
    /// Pending requests in expiry order (POSTs come in time order), and how far the
    /// near-expiry watch has taken them.
    by_expiry: Vec<(DateTime<Utc>, u32)>,
    expiry_taken: usize,
    near_expiry: Vec<u32>,
    /// Returned devices whose request is still pending.
    returned: Vec<u32>,
    /// Devices the previous run's D counted as lost or near expiry.
    counted_before: HashSet<u32>,
    posts_applied_since_run: u64,
    days: Vec<DayRec>,
    posted: (u64, u64),
    retries: u64,
}

impl World {
    /// The next event: the earliest of the heap's and the schedules'.
    fn pop(&mut self) -> Option<Event> {
        let heap = self.events.peek().map(|Reverse(e)| e.key());
        let posts = self.posts.peek().map(|(at, _)| (at, 2u8, 0u64));
        let returns = self.returns.peek().map(|(at, _)| (at, 0u8, 0u64));
        let first = [heap, posts, returns].into_iter().flatten().min()?;
        if returns == Some(first) {
            let (at, i) = self.returns.take();
            return Some(Event::scheduled(at, What::Return(i)));
        }
        if posts == Some(first) {
            let (at, i) = self.posts.take();
            return Some(Event::scheduled(at, What::Post(i)));
        }
        self.events.pop().map(|Reverse(e)| e)
    }

    fn push(&mut self, at: i64, what: What) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            at,
            seq: self.seq,
            what,
        }));
    }

    fn day(&mut self) -> &mut DayRec {
        let i = (self.now_ms / DAY_MS).max(0) as usize;
        if self.days.len() <= i {
            self.days.resize(i + 1, DayRec::default());
        }
        &mut self.days[i]
    }

    fn ops_total(&self) -> u64 {
        let (r, w, q, _) = self.ops.snapshot();
        r + w + q
    }

    fn device_calls(&self) -> u64 {
        let (status, puts) = self.h.device.calls();
        (status + puts) as u64
    }

    fn index_of(device: &str) -> Option<u32> {
        device.strip_prefix("fw")?.parse().ok()
    }

    /// Takes what the functions sent: each message is lost or delivered when due.
    /// Returns how many were sent.
    fn take_sent(&mut self) -> u64 {
        let sent = self.h.queue.take_sent();
        let n = sent.len() as u64;
        let mut lost = 0;
        for m in sent {
            if self.rng.unit() < self.loss {
                lost += 1;
                if let Some(i) = Self::index_of(&m.body.device_id) {
                    self.lost.push((i, m.message_id.clone()));
                }
                continue;
            }
            let at = m.scheduled_at.map_or(self.now_ms, |t| {
                (t - self.start).num_milliseconds().max(self.now_ms)
            });
            self.push(at, What::Deliver(Box::new(m)));
        }
        let day = self.day();
        day.sent += n;
        day.lost += lost;
        n
    }

    async fn record(&self, i: u32) -> Option<soc_settings::domain::DesiredState> {
        self.h
            .ledger
            .get(&self.ids[i as usize])
            .await
            .ok()
            .flatten()
            .map(|v| v.value)
    }

    async fn post(&mut self, i: u32) -> Result<()> {
        let before = self.counters();
        let id = self.ids[i as usize].to_string();
        let answer = post_min_soc(&self.h, &id, 30).await;
        match answer["status"].as_str() {
            Some("applied") => {
                self.posted.0 += 1;
                self.posts_applied_since_run += 1;
            }
            Some("pending") => {
                self.posted.1 += 1;
                let record = self
                    .record(i)
                    .await
                    .context("a pending POST left no record")?;
                self.by_expiry.push((record.expires_at, i));
            }
            _ => anyhow::bail!("S5: POST for {id} answered {answer}"),
        }
        self.book(before, Spender::Post);
        Ok(())
    }

    async fn deliver(&mut self, m: OutgoingMessage) -> Result<()> {
        let before = self.counters();
        let delivery = Delivery {
            body: serde_json::to_vec(&m.body)?,
            message_id: Some(m.message_id.clone()),
            delivery_count: 1,
        };
        if let Settle::Retry(_) = soc_queue_trigger::handle(&self.h.svc, delivery).await {
            // Nothing here fails on purpose; Service Bus would deliver it again.
            self.retries += 1;
            let at = self.now_ms + 1000;
            self.push(at, What::Deliver(Box::new(m)));
        }
        self.book(before, Spender::Queue);
        Ok(())
    }

    /// Ledger operations and device calls so far.
    fn counters(&self) -> (u64, u64) {
        (self.ops_total(), self.device_calls())
    }

    /// Books what one invocation spent since `before` to today, and takes what it sent.
    fn book(&mut self, before: (u64, u64), by: Spender) {
        let (ops, calls) = self.counters();
        let (ops, calls) = (ops - before.0, calls - before.1);
        let day = self.day();
        day.device_calls += calls;
        match by {
            Spender::Post => {
                day.post_ops += ops;
                day.posts += 1;
            }
            Spender::Queue => {
                day.queue_ops += ops;
                day.deliveries += 1;
            }
        }
        self.take_sent();
    }

    async fn come_back(&mut self, i: u32) {
        self.h
            .device
            .set_online(self.ids[i as usize].as_str(), true);
        self.day().returned += 1;
        if self.record(i).await.is_some_and(|r| r.is_pending()) {
            self.returned.push(i);
        }
    }

    /// D at this instant: (lost, near expiry, returned), each device counted once.
    async fn due_now(&mut self) -> (u64, u64, u64) {
        let now = self.h.clock.now();
        let policy = self.h.svc.policy;
        let mut counted = HashSet::new();
        while let Some(&(expires, i)) = self.by_expiry.get(self.expiry_taken) {
            if expires - policy.lease > now {
                break;
            }
            self.near_expiry.push(i);
            self.expiry_taken += 1;
        }
        let mut expiry = 0;
        let mut keep = Vec::new();
        for i in std::mem::take(&mut self.near_expiry) {
            if let Some(r) = self.record(i).await.filter(|r| r.is_pending()) {
                if r.expires_at - policy.lease <= now && counted.insert(i) {
                    expiry += 1;
                }
                keep.push(i);
            }
        }
        self.near_expiry = keep;
        let mut lost = 0;
        let mut keep = Vec::new();
        for (i, message) in std::mem::take(&mut self.lost) {
            let Some(r) = self.record(i).await else {
                continue;
            };
            if !r.is_pending() || r.wake_message_id.as_deref() != Some(message.as_str()) {
                continue;
            }
            if r.wake_overdue(now, policy.wake_grace) && counted.insert(i) {
                lost += 1;
            }
            keep.push((i, message));
        }
        self.lost = keep;
        let mut returned = 0;
        let mut keep = Vec::new();
        for i in std::mem::take(&mut self.returned) {
            match self.record(i).await.map(|r| r.status) {
                Some(RequestStatus::Pending) => keep.push(i),
                // Applied by its chain since the last run (not by the sweep itself).
                Some(RequestStatus::Applied)
                    if !self.counted_before.contains(&i) && !counted.contains(&i) =>
                {
                    returned += 1
                }
                _ => {}
            }
        }
        self.returned = keep;
        self.counted_before = counted;
        (lost, expiry, returned)
    }

    async fn sweep(&mut self) -> Result<RunRec> {
        let (d_lost, d_expiry, d_returned) = self.due_now().await;
        let before = self.ops.snapshot();
        let calls = self.device_calls();
        let report = drain_soc_timer::run(&self.h.svc)
            .await
            .map_err(|e| anyhow::anyhow!("S5: sweep failed: {e}"))?;
        ensure!(!report.skipped, "S5: a sweep run found the lease taken");
        let after = self.ops.snapshot();
        let device_calls = self.device_calls() - calls;
        let sent = self.take_sent();
        let rec = RunRec {
            at_ms: self.now_ms,
            report,
            reads: after.0 - before.0,
            writes: after.1 - before.1,
            queries: after.2 - before.2,
            rows_listed: after.3 - before.3,
            sent,
            device_calls,
            d_lost,
            d_expiry,
            d_returned,
            posts_applied: std::mem::take(&mut self.posts_applied_since_run),
        };
        let ops = rec.ops();
        let day = self.day();
        day.sweep_ops += ops;
        day.device_calls += device_calls;
        Ok(rec)
    }
}

/// Runs one fleet week.
pub async fn simulate(fleet: &Fleet) -> Result<Week> {
    let wall = Instant::now();
    let mut h = Harness::new();
    h.svc.policy = crate::s2_offline_calls::default_policy()?;
    let ops = Arc::new(Ops::default());
    h.svc.ledger = Arc::new(Counting {
        inner: h.ledger.clone(),
        ops: ops.clone(),
    });
    h.device.set_default_online(true);
    let ids: Vec<DeviceId> = (0..fleet.devices)
        .map(|i| DeviceId::parse(&format!("fw{i:07}")).expect("valid id"))
        .collect();
    let offline: Vec<u32> = (0..fleet.devices)
        .step_by(OFFLINE_EVERY)
        .map(|i| i as u32)
        .collect();
    for &i in &offline {
        h.device.set_online(ids[i as usize].as_str(), false);
    }
    let start = h.clock.now();
    let mut rng = Rng(fleet.seed);
    let posts = (0..fleet.devices)
        .map(|i| {
            let at = if fleet.scenario == Scenario::Burst && i % OFFLINE_EVERY == 0 {
                0
            } else {
                rng.below(DAY_MS as u64) as i64
            };
            (at, i as u32)
        })
        .collect();
    // Returning devices: a random share of the offline ones, at random times.
    let mut pool = offline;
    let returning = ((pool.len() as f64) * fleet.return_per_day * fleet.return_days as f64)
        .round()
        .min(pool.len() as f64) as usize;
    let mut returns = Vec::with_capacity(returning);
    for k in 0..returning {
        let pick = k + rng.below((pool.len() - k) as u64) as usize;
        pool.swap(k, pick);
        let at = rng.below((fleet.return_days * DAY_MS) as u64) as i64;
        returns.push((at, pool[k]));
    }
    let mut world = World {
        h,
        ops,
        ids,
        rng,
        loss: fleet.loss,
        start,
        now_ms: 0,
        seq: 0,
        events: BinaryHeap::new(),
        posts: Schedule::new(posts),
        returns: Schedule::new(returns),
        lost: Vec::new(),
        by_expiry: Vec::new(),
        expiry_taken: 0,
        near_expiry: Vec::new(),
        returned: Vec::new(),
        counted_before: HashSet::new(),
        posts_applied_since_run: 0,
        days: Vec::new(),
        posted: (0, 0),
        retries: 0,
    };
    // The timer's first run at the start, then every 5 minutes until the last day ends.
    world.push(0, What::Sweep);
    let end_ms = fleet.days * DAY_MS;
    let mut runs = Vec::new();
    while let Some(event) = world.pop() {
        if event.at >= end_ms {
            break;
        }
        if event.at > world.now_ms {
            world
                .h
                .clock
                .advance(Duration::milliseconds(event.at - world.now_ms));
            world.now_ms = event.at;
        }
        match event.what {
            What::Post(i) => world.post(i).await?,
            What::Deliver(m) => world.deliver(*m).await?,
            What::Return(i) => world.come_back(i).await,
            What::Sweep => {
                runs.push(world.sweep().await?);
                let next = world.now_ms + SWEEP_EVERY_MS;
                world.push(next, What::Sweep);
            }
        }
    }
    let mut end = [0u64; 4];
    for id in &world.ids {
        if let Some(r) = world.h.ledger.get(id).await.ok().flatten() {
            let slot = match r.value.status {
                RequestStatus::Pending => 0,
                RequestStatus::Applied => 1,
                RequestStatus::Expired => 2,
                _ => 3,
            };
            end[slot] += 1;
        }
    }
    Ok(Week {
        fleet: fleet.clone(),
        quota: world.h.svc.policy.sweep_max_due,
        runs,
        days: world.days,
        wall: wall.elapsed(),
        end,
        posted: world.posted,
        retries: world.retries,
    })
}

/// What the rows show of one week.
pub struct Summary {
    pub runs: usize,
    pub mean_visits: f64,
    pub max_visits: u64,
    pub mean_d: f64,
    pub max_d: u64,
    /// Runs with D > 0, and the largest visits/D among them.
    pub runs_with_d: usize,
    pub max_ratio: f64,
    /// Visits in runs with D = 0: mean and max.
    pub idle_mean: f64,
    pub idle_max: u64,
    /// Runs with more than 2·D visits.
    pub missed: usize,
    /// Runs that took the whole quota, and the smallest headroom.
    pub saturated: usize,
    pub min_headroom: i64,
    /// Runs whose D alone exceeded the quota.
    pub d_over_quota: usize,
    pub mean: ColumnMeans,
}

/// Mean per run of the report's columns that say where visits go.
#[derive(Default)]
pub struct ColumnMeans {
    pub refiled: f64,
    pub dropped: f64,
    pub worked: f64,
    pub posts_applied: f64,
    pub ops: f64,
    pub sent: f64,
    pub device_calls: f64,
}

/// Visits that did work on the device: expired, applied, failed, re-sent, fanned out,
/// found still offline, busy or in error.
fn worked(r: &SweepReport) -> usize {
    r.expired + r.applied + r.failed + r.resent + r.fanned_out + r.still_offline + r.busy + r.errors
}

pub fn summarise(week: &Week) -> Summary {
    let runs = &week.runs;
    let n = runs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RunRec) -> f64| runs.iter().map(f).sum::<f64>() / n;
    let with_d: Vec<&RunRec> = runs.iter().filter(|r| r.d() > 0).collect();
    let idle: Vec<&RunRec> = runs.iter().filter(|r| r.d() == 0).collect();
    Summary {
        runs: runs.len(),
        mean_visits: mean(&|r| r.visits() as f64),
        max_visits: runs.iter().map(RunRec::visits).max().unwrap_or(0),
        mean_d: mean(&|r| r.d() as f64),
        max_d: runs.iter().map(RunRec::d).max().unwrap_or(0),
        runs_with_d: with_d.len(),
        max_ratio: with_d
            .iter()
            .map(|r| r.visits() as f64 / r.d() as f64)
            .fold(0.0, f64::max),
        idle_mean: idle.iter().map(|r| r.visits() as f64).sum::<f64>() / idle.len().max(1) as f64,
        idle_max: idle.iter().map(|r| r.visits()).max().unwrap_or(0),
        missed: runs.iter().filter(|r| r.visits() > 2 * r.d()).count(),
        saturated: runs.iter().filter(|r| r.report.due >= week.quota).count(),
        min_headroom: runs
            .iter()
            .map(|r| week.quota as i64 - r.visits() as i64)
            .min()
            .unwrap_or(week.quota as i64),
        d_over_quota: runs.iter().filter(|r| r.d() > week.quota as u64).count(),
        mean: ColumnMeans {
            refiled: mean(&|r| r.report.refiled as f64),
            dropped: mean(&|r| r.report.dropped as f64),
            worked: mean(&|r| worked(&r.report) as f64),
            posts_applied: mean(&|r| r.posts_applied as f64),
            ops: mean(&|r| r.ops() as f64),
            sent: mean(&|r| r.sent as f64),
            device_calls: mean(&|r| r.device_calls as f64),
        },
    }
}

/// The per-run records as CSV, for a closer look.
pub fn csv(week: &Week) -> String {
    let mut out = String::from(
        "run,hours,visits,applied,expired,failed,resent,fanned_out,still_offline,busy,errors,corrupt,refiled,dropped,deferred,reconciled,status_calls,reads,writes,queries,rows_listed,sent,device_calls,headroom,d,d_lost,d_expiry,d_returned,posts_applied\n",
    );
    for (k, r) in week.runs.iter().enumerate() {
        let p = &r.report;
        let _ = writeln!(
            out,
            "{k},{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.at_ms as f64 / 3_600_000.0,
            p.due,
            p.applied,
            p.expired,
            p.failed,
            p.resent,
            p.fanned_out,
            p.still_offline,
            p.busy,
            p.errors,
            p.corrupt,
            p.refiled,
            p.dropped,
            p.deferred,
            p.reconciled,
            p.status_calls,
            r.reads,
            r.writes,
            r.queries,
            r.rows_listed,
            r.sent,
            r.device_calls,
            week.quota as i64 - p.due as i64,
            r.d(),
            r.d_lost,
            r.d_expiry,
            r.d_returned,
            r.posts_applied,
        );
    }
    out
}

/// The rows and notes of one week.
pub fn report(week: &Week, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let f = &week.fleet;
    let s = summarise(week);
    let name = format!(
        "fleet {}, {} offline, {}, {} days",
        f.devices,
        f.devices.div_ceil(OFFLINE_EVERY),
        f.scenario.name(),
        f.days
    );
    rows.push(
        row(
            "S5",
            format!("{name}: visits per run mean / max (D mean / max)"),
            format!(
                "{:.0} / {} (D {:.1} / {}); per run {:.0} refiled, {:.0} dropped, {:.0} worked",
                s.mean_visits,
                s.max_visits,
                s.mean_d,
                s.max_d,
                s.mean.refiled,
                s.mean.dropped,
                s.mean.worked
            ),
        )
        .target("≤ 2·D every run", s.missed == 0),
    );
    rows.push(
        row(
            "S5",
            format!("{name}: max visits/D (runs with D>0); visits when D=0 mean / max"),
            format!(
                "{:.1}x over {} runs; {:.0} / {} over {} runs; {} of {} runs above 2·D",
                s.max_ratio,
                s.runs_with_d,
                s.idle_mean,
                s.idle_max,
                s.runs - s.runs_with_d,
                s.missed,
                s.runs
            ),
        )
        .ratio(s.max_ratio),
    );
    let days = week.days.len().max(1) as f64;
    let ops_day = week.days.iter().map(DayRec::ops).sum::<u64>() as f64 / days;
    let sweep_day = week.days.iter().map(|d| d.sweep_ops).sum::<u64>() as f64 / days;
    rows.push(
        row(
            "S5",
            format!(
                "{name}: runs at the quota ({}); ledger ops per day (sweep); wall",
                week.quota
            ),
            format!(
                "{} of {} (min headroom {}, D > quota in {}); {:.0} ({:.0}); {:.0} s",
                s.saturated,
                s.runs,
                s.min_headroom,
                s.d_over_quota,
                ops_day,
                sweep_day,
                week.wall.as_secs_f64()
            ),
        )
        .target("never at the quota", s.saturated == 0),
    );
    notes.push(format!(
        "S5 {name}: {} POSTs applied at once, {} pending; at the end {} pending, {} applied, {} expired, {} failed; {} deliveries retried; the sweep per run: {:.0} ledger ops, {:.1} messages, {:.1} device calls; {:.0} POSTs applied at once between runs; D over all runs: {} lost, {} near expiry, {} returned; wall {:.1} s",
        week.posted.0,
        week.posted.1,
        week.end[0],
        week.end[1],
        week.end[2],
        week.end[3],
        week.retries,
        s.mean.ops,
        s.mean.sent,
        s.mean.device_calls,
        s.mean.posts_applied,
        week.runs.iter().map(|r| r.d_lost).sum::<u64>(),
        week.runs.iter().map(|r| r.d_expiry).sum::<u64>(),
        week.runs.iter().map(|r| r.d_returned).sum::<u64>(),
        week.wall.as_secs_f64()
    ));
    let mut by_day = String::new();
    for (k, d) in week.days.iter().enumerate() {
        let runs: Vec<&RunRec> = week
            .runs
            .iter()
            .filter(|r| r.at_ms / DAY_MS == k as i64)
            .collect();
        let n = runs.len().max(1) as f64;
        let visits = runs.iter().map(|r| r.visits()).sum::<u64>() as f64 / n;
        let dd = runs.iter().map(|r| r.d()).sum::<u64>() as f64 / n;
        let _ = write!(
            by_day,
            "; day {}: visits {visits:.0}, D {dd:.1} per run, ops {} (POST {}, queue {}, sweep {}), {} sent ({} lost), {} device calls, {} returned",
            k + 1,
            d.ops(),
            d.post_ops,
            d.queue_ops,
            d.sweep_ops,
            d.sent,
            d.lost,
            d.device_calls,
            d.returned
        );
    }
    notes.push(format!("S5 {name} by day{by_day}"));
}

/// Runs `fleets` on `jobs` threads (each week on a single-threaded runtime of its own),
/// largest first; the weeks come back in the order given.
fn simulate_all(fleets: &[Fleet], jobs: usize) -> Vec<Result<Week>> {
    let mut order: Vec<usize> = (0..fleets.len()).collect();
    order.sort_by_key(|&i| Reverse(fleets[i].devices));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<Vec<Option<Result<Week>>>> =
        std::sync::Mutex::new(fleets.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, fleets.len().max(1)) {
            scope.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&i) = order.get(k) else { break };
                let fleet = &fleets[i];
                eprintln!(
                    "bench: S5 fleet week, {} devices, {}, {} virtual days",
                    fleet.devices,
                    fleet.scenario.name(),
                    fleet.days
                );
                let week = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(simulate(fleet)));
                done.lock().unwrap()[i] = Some(week);
            });
        }
    });
    done.into_inner()
        .unwrap()
        .into_iter()
        .map(|w| w.unwrap_or_else(|| Err(anyhow::anyhow!("S5: a week did not run"))))
        .collect()
}

/// The S5 rows: `BENCH_FLEET` devices (`100000,1000000`), `BENCH_FLEET_SCENARIOS`
/// (`steady,burst`), `BENCH_FLEET_DAYS` (8), `BENCH_FLEET_JOBS` (weeks run at once on
/// their own threads, 1), and `BENCH_FLEET_CSV` (a folder for the per-run records, one
/// file per week).
pub fn run(rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let sizes: Vec<usize> = std::env::var("BENCH_FLEET")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let scenarios: Vec<Scenario> = std::env::var("BENCH_FLEET_SCENARIOS")
        .unwrap_or_else(|_| "steady,burst".into())
        .split(',')
        .filter_map(|s| match s.trim() {
            "steady" => Some(Scenario::Steady),
            "burst" => Some(Scenario::Burst),
            _ => None,
        })
        .collect();
    let days = std::env::var("BENCH_FLEET_DAYS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(8);
    let jobs = std::env::var("BENCH_FLEET_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(1);
    let csv_dir = std::env::var_os("BENCH_FLEET_CSV").map(std::path::PathBuf::from);
    let fleets: Vec<Fleet> = sizes
        .iter()
        .flat_map(|&n| scenarios.iter().map(move |&s| Fleet::new(n, s, days)))
        .collect();
    let started = Instant::now();
    // The weeks run on threads of their own; nothing else runs meanwhile.
    let weeks = simulate_all(&fleets, jobs);
    notes.push(format!(
        "S5: {} weeks in {:.0} s wall on {jobs} thread(s)",
        fleets.len(),
        started.elapsed().as_secs_f64()
    ));
    for week in weeks {
        let week = week?;
        let (n, scenario) = (week.fleet.devices, week.fleet.scenario);
        ensure!(
            week.retries == 0,
            "S5: {} deliveries asked to be retried in a world without faults",
            week.retries
        );
        if let Some(dir) = &csv_dir {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("s5-{n}-{}.csv", scenario.name()));
            std::fs::write(&path, csv(&week))?;
            notes.push(format!("S5: per-run records in {}", path.display()));
        }
        report(&week, rows, notes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fleet week end to end, small: 2,000 devices over 2 virtual days, both
    /// scenarios, with more losses and returns than the recorded run so that every
    /// part of D shows up.
    #[tokio::test]
    async fn a_small_fleet_week_counts_visits_and_what_is_due() {
        for scenario in [Scenario::Steady, Scenario::Burst] {
            let mut fleet = Fleet::new(2_000, scenario, 2);
            fleet.loss = 0.01;
            fleet.return_per_day = 0.1;
            fleet.return_days = 1;
            let week = simulate(&fleet).await.unwrap();
            assert_eq!(week.runs.len(), 2 * 288, "a run every 5 minutes");
            // Online devices apply at once, offline ones wait (unless back already).
            let (applied, pending) = week.posted;
            assert_eq!(applied + pending, 2_000);
            assert!(applied >= 1_800 && pending > 150, "{:?}", week.posted);
            assert_eq!(week.retries, 0);
            let s = summarise(&week);
            assert!(s.max_visits > 0 && s.max_visits as usize <= week.quota);
            assert!(week.runs.iter().any(|r| r.d_lost > 0), "lost messages");
            assert!(week.runs.iter().any(|r| r.d_returned > 0), "returned");
            let day = &week.days[0];
            assert!(day.sent > 200 && day.lost > 0 && day.device_calls >= 2_000);
            assert!(day.post_ops > 0 && day.queue_ops > 0 && day.sweep_ops > 0);
            // Returned devices are applied by their chains: none is still pending.
            assert!(week.end[1] >= 1_800 + 20, "{:?}", week.end);
            let mut rows = Vec::new();
            let mut notes = Vec::new();
            report(&week, &mut rows, &mut notes);
            assert_eq!(rows.len(), 3);
            assert!(csv(&week).lines().count() == week.runs.len() + 1);
        }
    }
}
