//! `DrainSocTimer`: the sweep that keeps nothing pending forever.
//!
//! The sweep reads only what is due: the entries of the due index
//! ([`crate::domain::due_index`]) at or before now, oldest first, at most
//! `DRAIN_SOC_MAX_DUE` devices per run. Its cost follows the due devices `D`, not the
//! pending records `P` (README "The sweep at fleet scale"). A pending record is due
//! when its wake-up message is overdue (lost, dead-lettered, never sent) or when it
//! is one lease from expiry. For each due device:
//! - near or past expiry: mark it expired (no device call);
//! - another invocation holds its lease: leave it for the next run;
//! - up to `DRAIN_SOC_FANOUT_ABOVE` due devices: one status call each (at most
//!   `DRAIN_SOC_CONCURRENCY` at once); online: apply now; offline or unavailable:
//!   re-send its wake-up message; unknown device: fail the request with the reason;
//! - more than that: **fan out**: re-send their wake-up messages in batches of
//!   `FAN_OUT_BATCH` (100: one Service Bus request each), due from one lease after now and
//!   spread at the fleet's device-call ceiling (`Policy::fleet_device_calls_per_second`)
//!   by scheduled delivery, and let `SocQueueTrigger`, which the host scales out, make
//!   the device calls.
//!
//! Then it tidies the index: an entry whose record is settled or gone is removed; a
//! record not yet due (its chain moved on) is filed at its due time before its old
//! entries go; duplicates of a device go.
//!
//! **One run at a time, ending in time.** A run first takes the sweep lease
//! ([`SweepState`]); a run that finds another's live lease does nothing. The run
//! renews its lease every [`SWEEP_RENEW_EVERY`](super::SWEEP_RENEW_EVERY) while it
//! works (conditional on its ETag, never past `Policy::sweep_lease` from its start)
//! and starts work (a device, a fan-out batch, a batch of filings) only before
//! `Policy::sweep_budget` ends and only while its lease covers that work's tail
//! (`Policy::sweep_tail`); a run that loses its lease starts nothing more. Status calls
//! and device-call budget waits end when the run's time to start work ends, so the
//! work in flight ends within the tail, and the run within `Policy::sweep_run_bound`,
//! inside its lease and the host's `functionTimeout` (checked at start,
//! `Policy::design_problems`). What a run did not reach stays in the index, so the next
//! run resumes with the oldest due entries, never from the top.
//!
//! **Reconciling pass.** Beside the device work, each run also files a slice of the
//! pending records (`Policy::reconcile_rows_per_run`, in device order, resuming after
//! the last device the previous slice filed) in the index, once per
//! `Policy::reconcile_interval`, inside its own budget (`Policy::reconcile_budget`),
//! in batches (one entity-group transaction per shard partition and at most
//! [`due_index::MAX_BATCH`] filings): it repairs any drift and indexes records written
//! before the index existed.
//!
//! A row that does not read as a record ([`StoreError::Corrupt`]) is skipped, counted
//! in `corrupt` and logged with its device id, row key and reason; its entry stays,
//! so every run reports it until it is repaired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::domain::due_index::{self, DueEntry, SHARDS};
use crate::domain::notification::Notification;
use crate::domain::sweep_state::SweepState;
use crate::domain::{DesiredState, DeviceId, HolderKind, LeaseHolder, MinSoc, RequestId};
use crate::ports::{
    Clock, DeviceApi, DeviceError, DeviceStatus, ETag, Notifier, NotifyError, OutgoingMessage,
    Precondition, StoreError, Versioned,
};

use super::apply::{apply_latest, ApplyOutcome};
use super::wake::{self, Rescheduled};
use super::{index, notify};
use super::{Policy, Services, SWEEP_RENEW_EVERY};

/// Counts of what one sweep did (logged, and returned to the host in `Logs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Due devices taken from the index.
    pub due: usize,
    pub applied: usize,
    pub expired: usize,
    pub failed: usize,
    /// Overdue wake-up messages re-sent after a status call found the device offline.
    pub resent: usize,
    /// Wake-up messages sent instead of calling the device (fan-out).
    pub fanned_out: usize,
    pub still_offline: usize,
    pub busy: usize,
    pub errors: usize,
    /// Due rows that could not be read (not counted in `due`'s other columns).
    pub corrupt: usize,
    /// Not due yet (their chain moved on): filed again at their due time.
    pub refiled: usize,
    /// Index entries whose record is settled or gone, and duplicates, removed.
    pub dropped: usize,
    /// Due devices left for the next run (the run's time budget ran out).
    pub deferred: usize,
    /// Pending records the reconciling pass filed in this run.
    pub reconciled: usize,
    /// Device-cloud status calls made.
    pub status_calls: usize,
    /// Another run held the sweep lease; this one did nothing.
    pub skipped: bool,
    /// Another run took the sweep lease over while this one worked (this one's
    /// renewals failed until it lapsed): this one started no more work.
    pub lease_lost: bool,
    /// Events this run published from the devices' outboxes.
    pub notified: usize,
    /// Events this run found it could not publish (the topic refused or was down),
    /// left in their outboxes, and the age of the oldest of them in seconds (0: none):
    /// what the outbox-age alert watches.
    pub outbox_events: usize,
    pub outbox_oldest_age_s: i64,
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.skipped {
            return f.write_str("skipped=another sweep holds the lease");
        }
        write!(
            f,
            "due={} applied={} expired={} failed={} resent={} fanned_out={} still_offline={} busy={} errors={} corrupt={} refiled={} dropped={} deferred={} reconciled={} status_calls={} lease_lost={} notified={} outbox_oldest_age_s={} outbox_events={}",
            self.due, self.applied, self.expired, self.failed, self.resent, self.fanned_out,
            self.still_offline, self.busy, self.errors, self.corrupt, self.refiled, self.dropped,
            self.deferred, self.reconciled, self.status_calls, self.lease_lost, self.notified,
            self.outbox_oldest_age_s, self.outbox_events
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Applied,
    Expired,
    Failed,
    Resent,
    FannedOut,
    StillOffline,
    Busy,
    Error,
    /// The row did not read; skipped.
    Corrupt,
    /// Not due yet: filed again at its due time.
    Refiled,
    /// Settled or gone: its entries removed.
    Dropped,
    /// Not reached before the run's budget ran out.
    Deferred,
}

/// One due device: its index entries (earliest first) and whether it made a status call.
struct Due {
    device: DeviceId,
    entries: Vec<Versioned<DueEntry>>,
    /// The entry the record named when this run read it to act on it: once the record
    /// names another, whoever replaced it removes that one (`functions::index`).
    named_when_read: Option<String>,
}

/// Fan-out slots: wake-up messages due one after another at the fleet's device-call
/// rate. A message must not be delivered before the ledger names it (a delivery the
/// ledger does not expect is a no-op), and naming it takes a ledger write or a few
/// (each at most the storage timeout): so each batch's slots start no earlier than one
/// lease after that batch's clock reading, however far the previous batches' slots
/// got. A later batch never falls behind its slots, whatever the rate.
struct FanOut {
    per_second: f64,
    /// The first slot of the current run of slots, and how many were handed out since.
    base: Option<DateTime<Utc>>,
    handed: u32,
}

impl FanOut {
    fn new(per_second: f64) -> Self {
        Self {
            per_second: per_second.max(0.001),
            base: None,
            handed: 0,
        }
    }

    /// The next slot: `1 / rate` after the previous one, but no earlier than `floor`.
    fn next_slot(&mut self, floor: DateTime<Utc>) -> DateTime<Utc> {
        let ms = |i: u32| (f64::from(i) / self.per_second * 1000.0) as i64;
        let at = self
            .base
            .map(|base| base + chrono::Duration::milliseconds(ms(self.handed)));
        match at {
            Some(at) if at >= floor => {
                self.handed += 1;
                at
            }
            _ => {
                self.base = Some(floor);
                self.handed = 1;
                floor
            }
        }
    }
}

/// Runs one sweep. Fails only when the sweep lease cannot be read or no shard of the
/// index can be listed.
pub async fn run(svc: &Services) -> Result<SweepReport, StoreError> {
    let started = svc.clock.now();
    let holder = LeaseHolder::new(HolderKind::Sweep);
    let mut report = SweepReport::default();
    let Some(lease) = SweepLease::take(svc, holder, started).await? else {
        report.skipped = true;
        info!(%report, "sweep skipped");
        return Ok(report);
    };
    let lease = Arc::new(lease);
    let stop = Notify::new();
    let work = async {
        let result = sweep(svc, started, &lease, &mut report).await;
        stop.notify_one();
        result
    };
    let (result, ()) = tokio::join!(work, lease.keep_renewing(svc, &stop));
    report.lease_lost = lease.lost();
    lease.release(svc).await;
    result?;
    info!(%report, "sweep done");
    Ok(report)
}

async fn sweep(
    svc: &Services,
    started: DateTime<Utc>,
    lease: &Arc<SweepLease>,
    report: &mut SweepReport,
) -> Result<(), StoreError> {
    let deadline = started + svc.policy.sweep_budget;
    let due = list_due(svc, deadline, report).await?;
    report.due = due.len();
    let tally = Arc::new(Mutex::new(OutboxTally::default()));
    let cut = Services {
        device: Arc::new(SweepDevice {
            inner: svc.device.clone(),
            clock: svc.clock.clone(),
            lease: lease.clone(),
            policy: svc.policy,
            deadline,
        }),
        notifier: svc.notifier.clone().map(|inner| {
            Arc::new(TallyingNotifier {
                inner,
                tally: tally.clone(),
            }) as Arc<dyn Notifier>
        }),
        ..svc.clone()
    };
    let (steps, reconciled) = tokio::join!(
        work_through(&cut, due, lease, deadline),
        reconcile(svc, lease)
    );
    report.reconciled = reconciled;
    {
        let tally = tally.lock().unwrap();
        report.notified = tally.published;
        report.outbox_events = tally.left;
        report.outbox_oldest_age_s = tally
            .oldest_left
            .map_or(0, |at| (svc.clock.now() - at).num_seconds().max(0));
    }
    for (step, called) in steps {
        report.status_calls += usize::from(called);
        let count = match step {
            Step::Applied => &mut report.applied,
            Step::Expired => &mut report.expired,
            Step::Failed => &mut report.failed,
            Step::Resent => &mut report.resent,
            Step::FannedOut => &mut report.fanned_out,
            Step::StillOffline => &mut report.still_offline,
            Step::Busy => &mut report.busy,
            Step::Error => &mut report.errors,
            Step::Corrupt => &mut report.corrupt,
            Step::Refiled => &mut report.refiled,
            Step::Dropped => &mut report.dropped,
            Step::Deferred => &mut report.deferred,
        };
        *count += 1;
    }
    Ok(())
}

/// The due devices' work: each looked at in-process, or fanned out above the threshold.
/// Work starts only while the run may start work ([`SweepLease::may_start`]).
async fn work_through(
    svc: &Services,
    due: Vec<Due>,
    lease: &SweepLease,
    deadline: DateTime<Utc>,
) -> Vec<(Step, bool)> {
    if due.len() > svc.policy.sweep_fanout_above {
        let mut fan_out = FanOut::new(svc.policy.fleet_device_calls_per_second);
        return fan_out_all(svc, due, &mut fan_out, lease, deadline).await;
    }
    stream::iter(due)
        .map(|due| async move {
            if !lease.may_start(svc, deadline) {
                return (Step::Deferred, false);
            }
            sweep_device(svc, due).await
        })
        .buffer_unordered(svc.policy.drain_concurrency)
        // Every outcome is awaited: returning early would drop applies mid-PUT.
        .collect::<Vec<_>>()
        .await
}

/// The due devices of every shard, each once, earliest due first. A shard that cannot
/// be listed is counted as an error; the sweep fails only if none can.
async fn list_due(
    svc: &Services,
    deadline: DateTime<Utc>,
    report: &mut SweepReport,
) -> Result<Vec<Due>, StoreError> {
    let now = svc.clock.now();
    // Devices hash evenly over the shards, but not exactly: up to twice a shard's even
    // share from each, so a run takes its whole quota when that many are due, and never
    // more than the quota. Plus 16 entries, even with a small quota: a device may have
    // several entries (each write that made it due earlier filed one), and a run must
    // see them together to drop them together, or each stale entry would cost the
    // device behind it a run (simulation seed 84,424).
    let max = svc.policy.sweep_max_due.max(1);
    let per_shard = 2 * max.div_ceil(usize::from(SHARDS)) + 16;
    // Every shard at once, each cut when the run's time to start work ends (a listing
    // only reads: nothing is left half done).
    let left = (deadline - now).to_std().unwrap_or_default();
    let listings = futures::future::join_all((0..SHARDS).map(|shard| async move {
        let listed = svc.ledger.due_entries(shard, now, per_shard);
        match tokio::time::timeout(left, listed).await {
            Ok(listed) => (shard, listed),
            Err(_) => (
                shard,
                Err(StoreError::Unavailable(
                    "listing the due index ran past the sweep's budget".into(),
                )),
            ),
        }
    }))
    .await;
    let mut entries = Vec::new();
    let mut failure = None;
    for (shard, listed) in listings {
        match listed {
            Ok(listed) => entries.extend(listed),
            Err(e) => {
                warn!(shard, error = %e, "sweep could not read a shard of the due index");
                report.errors += 1;
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure.filter(|_| usize::from(SHARDS) == report.errors) {
        return Err(e);
    }
    entries.sort_by(|a, b| {
        (a.value.due_at, a.value.device_id.as_str())
            .cmp(&(b.value.due_at, b.value.device_id.as_str()))
    });
    let mut due: Vec<Due> = Vec::new();
    let mut at: HashMap<DeviceId, usize> = HashMap::new();
    for entry in entries {
        let device = entry.value.device_id.clone();
        match at.get(&device) {
            Some(&i) => due[i].entries.push(entry),
            None => {
                at.insert(device.clone(), due.len());
                due.push(Due {
                    device,
                    entries: vec![entry],
                    named_when_read: None,
                });
            }
        }
    }
    due.truncate(svc.policy.sweep_max_due);
    Ok(due)
}

/// What this run's publishes did (counted by [`TallyingNotifier`]).
#[derive(Debug, Default)]
struct OutboxTally {
    published: usize,
    left: usize,
    oldest_left: Option<DateTime<Utc>>,
}

/// The topic as the sweep's work sees it: counts what was published and what was not.
struct TallyingNotifier {
    inner: Arc<dyn Notifier>,
    tally: Arc<Mutex<OutboxTally>>,
}

#[async_trait]
impl Notifier for TallyingNotifier {
    async fn publish(&self, events: &[Notification]) -> Result<(), NotifyError> {
        let result = self.inner.publish(events).await;
        let mut tally = self.tally.lock().unwrap();
        match &result {
            Ok(()) => tally.published += events.len(),
            Err(_) => {
                tally.left += events.len();
                let oldest = events.iter().map(|e| e.time).min();
                tally.oldest_left = tally.oldest_left.into_iter().chain(oldest).min();
            }
        }
        result
    }
}

/// What a look at a due device's record decided.
enum Look {
    /// Done with this device: the step, and the record to tidy the index by (`None`:
    /// read it again; no tidy-up after an error or an unreadable row).
    Done(Step, Option<Option<Versioned<DesiredState>>>),
    /// Due and free: a device call is needed (in-process), or its wake-up message (fan-out).
    Due(Versioned<DesiredState>),
}

/// Reads a due device's record and settles what needs no device call: gone or
/// settled (drop its entries), not due yet (file it at its due time), near expiry
/// (expire it), someone else's live lease (leave it for the next run).
async fn look(svc: &Services, device: &DeviceId) -> Look {
    let current = match svc.ledger.get(device).await {
        Ok(c) => c,
        Err(StoreError::Corrupt(row)) => {
            warn!(
                device = %row.partition_key,
                row = %row.row_key,
                reason = %row.reason,
                "sweep skipped an unreadable ledger row"
            );
            return Look::Done(Step::Corrupt, None);
        }
        Err(e) => return Look::Done(log_error(device, &e.to_string()), None),
    };
    let now = svc.clock.now();
    let current = match current {
        Some(c) if c.value.is_pending() => c,
        other => return Look::Done(Step::Dropped, Some(other)),
    };
    if svc
        .policy
        .sweep_due(&current.value)
        .is_some_and(|at| at > now)
    {
        return Look::Done(Step::Refiled, Some(Some(current)));
    }
    let holder = LeaseHolder::new(HolderKind::Sweep);
    if current.value.is_expired_at(now + svc.policy.lease) {
        // apply_latest marks a record this close to expiry expired without a device call.
        return match apply_latest(svc, device, &holder, Some(current)).await {
            Ok(a) => Look::Done(step_of(&a.outcome), None),
            Err(e) => Look::Done(log_error(device, &e.to_string()), None),
        };
    }
    if !current.value.lease_free_for(&holder, now) {
        return Look::Done(Step::Busy, None);
    }
    Look::Due(current)
}

/// Looks at one due device in-process (one status call if it needs one), then tidies
/// its index entries. Returns what happened and whether a status call was made.
async fn sweep_device(svc: &Services, mut due: Due) -> (Step, bool) {
    let (step, called, read) = match look(svc, &due.device).await {
        Look::Done(step, read) => (step, false, read),
        Look::Due(current) => {
            due.named_when_read = current.value.due_entry.clone();
            let (step, called, written) = check_device(svc, current).await;
            (step, called, written.map(Some))
        }
    };
    tidy_after(svc, due, step, read).await;
    (step, called)
}

/// Fan-out: for each batch of due devices, one look at each record, one batch send of
/// the wake-up messages of those that need a device call (due at the next slots of the
/// fleet's call rate), then each record made to expect its message.
async fn fan_out_all(
    svc: &Services,
    mut due: Vec<Due>,
    fan_out: &mut FanOut,
    lease: &SweepLease,
    deadline: DateTime<Utc>,
) -> Vec<(Step, bool)> {
    // Every device of a batch at once, so that a batch takes at most `Policy::sweep_tail`
    // (its reads at once, one send, then each device's writes at once).
    let concurrency = FAN_OUT_BATCH;
    let mut steps = Vec::new();
    while !due.is_empty() {
        if !lease.may_start(svc, deadline) {
            steps.extend(due.iter().map(|_| (Step::Deferred, false)));
            break;
        }
        let rest = due.split_off(due.len().min(FAN_OUT_BATCH));
        let batch = std::mem::replace(&mut due, rest);
        let looked: Vec<(Due, Look)> = stream::iter(batch)
            .map(|d| async move {
                let look = look(svc, &d.device).await;
                (d, look)
            })
            .buffered(concurrency)
            .collect()
            .await;
        let now = svc.clock.now();
        let floor = now + svc.policy.lease;
        let mut sends = Vec::new();
        let mut done = Vec::new();
        for (d, look) in looked {
            match look {
                Look::Done(step, read) => done.push((d, step, read)),
                Look::Due(current) => {
                    let at = fan_out.next_slot(floor);
                    match wake::message_for(&current.value, Some(at), now) {
                        Some(message) => sends.push((d, current, message, at)),
                        None => done.push((d, Step::Busy, None)),
                    }
                }
            }
        }
        let messages: Vec<OutgoingMessage> = sends.iter().map(|s| s.2.clone()).collect();
        let sent = if messages.is_empty() {
            Ok(())
        } else {
            svc.queue.send_batch(&messages).await
        };
        if let Err(e) = &sent {
            warn!(error = %e, messages = messages.len(), "sweep could not send a batch of wake-up messages");
        }
        // One kind of work per device, so that both kinds run in one bounded stream.
        enum Finish {
            Sent(Due, Versioned<DesiredState>, OutgoingMessage, DateTime<Utc>),
            Done(Due, Step, Option<Option<Versioned<DesiredState>>>),
        }
        let sent_ok = sent.is_ok();
        let work = sends
            .into_iter()
            .map(|(d, c, m, at)| Finish::Sent(d, c, m, at))
            .chain(
                done.into_iter()
                    .map(|(d, step, read)| Finish::Done(d, step, read)),
            );
        let recorded: Vec<(Step, bool)> = stream::iter(work)
            .map(|work| async move {
                match work {
                    // Not sent (or maybe partly): nothing recorded; the entries stay.
                    Finish::Sent(..) if !sent_ok => (Step::Error, false),
                    Finish::Sent(mut d, current, message, at) => {
                        d.named_when_read = current.value.due_entry.clone();
                        let lost = current.value.wake_message_id.clone();
                        let recorded =
                            wake::record_sent(svc, current, lost.as_deref(), message, at).await;
                        let (step, written) = match recorded {
                            Ok(Rescheduled::Scheduled { written, .. }) => {
                                (Step::FannedOut, Some(Some(*written)))
                            }
                            Ok(Rescheduled::NoTimeLeft) | Ok(Rescheduled::Superseded) => {
                                (Step::Busy, None)
                            }
                            Err(e) => (log_error(&d.device, &e.to_string()), None),
                        };
                        tidy_after(svc, d, step, written).await;
                        (step, false)
                    }
                    Finish::Done(d, step, read) => {
                        tidy_after(svc, d, step, read).await;
                        (step, false)
                    }
                }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        steps.extend(recorded);
    }
    steps
}

/// Due wake-up messages one fan-out batch sends in one request.
const FAN_OUT_BATCH: usize = 100;

/// A due device with nobody on it: one status call; online, apply now; offline or
/// unavailable, re-send its overdue wake-up message; unknown, fail the request.
/// Returns what happened, whether a status call was made and, after a re-send, the
/// record as the write naming the message left it (the tidy-up needs no read then).
async fn check_device(
    svc: &Services,
    current: Versioned<DesiredState>,
) -> (Step, bool, Option<Versioned<DesiredState>>) {
    let device = current.value.device_id.clone();
    let holder = LeaseHolder::new(HolderKind::Sweep);
    // Whether the wake-up chain the sweep found was broken (no message, or overdue):
    // an apply that ends offline or transient writes the record again, which makes a
    // record that never had a message look freshly written, not overdue (seed 28,888).
    let chain_read = current.value.wake_message_id.clone();
    let broken = current
        .value
        .wake_overdue(svc.clock.now(), svc.policy.wake_grace);
    let status = svc.device.status(&device).await;
    let current = match status {
        Ok(s) if s.online => match apply_latest(svc, &device, &holder, Some(current)).await {
            Ok(a) => match a.outcome {
                ApplyOutcome::Offline(v) | ApplyOutcome::Transient(v, _) => v,
                other => return (step_of(&other), true, None),
            },
            Err(e) => return (log_error(&device, &e.to_string()), true, None),
        },
        Err(DeviceError::UnknownDevice) => {
            let mut failed = current.value.clone();
            failed.mark_failed(DeviceError::UnknownDevice.to_string(), svc.clock.now());
            let written =
                index::put_record(svc, &mut failed, Some(&current.value), Some(&current.etag));
            return match written.await {
                Ok(_) => (Step::Failed, true, None),
                // Changed meanwhile; the next run looks again.
                Err(StoreError::Conflict) => (Step::Busy, true, None),
                Err(e) => (log_error(&device, &e.to_string()), true, None),
            };
        }
        Ok(_) | Err(_) => current,
    };
    let still_broken = broken && current.value.wake_message_id == chain_read;
    if !still_broken
        && !current
            .value
            .wake_overdue(svc.clock.now(), svc.policy.wake_grace)
    {
        return (Step::StillOffline, true, None);
    }
    let lost = current.value.wake_message_id.clone();
    match wake::schedule_recheck(svc, current, lost.as_deref(), None).await {
        Ok(Rescheduled::Scheduled {
            message_id,
            written,
            ..
        }) => {
            info!(device = %device, lost = ?lost, message_id = %message_id, "overdue wake-up message re-sent");
            (Step::Resent, true, Some(*written))
        }
        Ok(Rescheduled::NoTimeLeft) | Ok(Rescheduled::Superseded) => {
            (Step::StillOffline, true, None)
        }
        Err(e) => (log_error(&device, &e.to_string()), true, None),
    }
}

/// Tidies a swept device's index entries by `read` (the record as it is now; `None`:
/// read it again), unless the step leaves them as they are (an error, an unreadable
/// row, a device not reached).
async fn tidy_after(
    svc: &Services,
    due: Due,
    step: Step,
    read: Option<Option<Versioned<DesiredState>>>,
) {
    if matches!(step, Step::Error | Step::Corrupt | Step::Deferred) {
        return;
    }
    let record = match read {
        Some(r) => Ok(r),
        None => svc.ledger.get(&due.device).await,
    };
    let mut entries = due.entries;
    if let (Ok(record), Some(before)) = (&record, &due.named_when_read) {
        // Replaced since (this run's own re-send or apply, most often): its writer
        // removed that entry, or left it as an extra for a later run; not fenced for here.
        if record.as_ref().and_then(|r| r.value.due_entry.as_ref()) != Some(before) {
            entries.retain(|e| e.value.row_key() != *before);
        }
    }
    match record {
        Ok(record) => tidy(svc, &due.device, entries, record.as_ref()).await,
        Err(e) => {
            warn!(device = %due.device, error = %e, "sweep left the device's index entries as they were")
        }
    }
}

/// Leaves the device's index as the invariants need it (`functions::index`), given
/// `record` read after the entries were listed:
/// - settled or gone: no entry;
/// - pending and not due yet (its chain moved on, or an extra entry): covered by the
///   entry it names if that one is still ahead; else by a new entry, which it is
///   rewritten to name; the listed ones go;
/// - still due: all of them stay.
///
/// Failures leave entries behind, which is harmless (the next run looks again).
///
/// Listed entries go only after a write conditional on the ETag the sweep read: the
/// rewrite, or a fence (a write that changes nothing, at the record's ETag or, with no
/// record, the device's anchor). So no write still in flight, conditional on what the
/// sweep saw, can commit afterwards a record those entries would have had to cover (a
/// writer files its entry *before* its write, and a write may commit long after its
/// caller's timeout): such a write conflicts, and its writer reads again and files
/// again before writing. No clock decides it.
async fn tidy(
    svc: &Services,
    device: &DeviceId,
    mut entries: Vec<Versioned<DueEntry>>,
    record: Option<&Versioned<DesiredState>>,
) {
    let now = svc.clock.now();
    // A young entry's writer may still be on its way to the record: left for later.
    entries.retain(|entry| !entry.value.is_young(now, svc.policy.lease));
    let pending = record.and_then(|r| svc.policy.sweep_due(&r.value).map(|at| (r, at)));
    // Entries are about to go (the record is not due now): the device's outbox first,
    // read after the record was, so it holds every event of every write the fence
    // below leaves committed (`functions::notify`). Undelivered: the entries stay.
    let removes = !entries.is_empty() && pending.map_or(true, |(_, at)| at > now);
    if removes && notify::dispatch(svc, device).await.is_err() {
        return;
    }
    let written = match pending {
        Some((record, at)) if at > now => {
            let ahead = index::named_entry(&record.value)
                .is_some_and(|named| named.due_at > now && named.due_at <= at);
            if entries.is_empty() {
                return;
            }
            if ahead {
                fence_read(svc, device, Some(record)).await
            } else {
                refile(svc, record).await
            }
        }
        // Still due (its work failed or was deferred): every entry stays for the next
        // run. Keeping only the earliest would rely on it surviving, and an earlier run's
        // delete of it may still be in flight (simulation seed 301,944).
        Some(_) => return,
        None => !entries.is_empty() && fence_read(svc, device, record).await,
    };
    if written {
        // At once: a run's work in flight ends within `Policy::sweep_tail`.
        futures::future::join_all(
            entries
                .iter()
                .map(|entry| unfile(svc, &entry.value, &entry.etag)),
        )
        .await;
    }
}

/// Files a pending record not due yet at its sweep-due time and rewrites it to name
/// that entry (conditional on the ETag read, so the rewrite is also the fence), then
/// removes the entry it named before. `false` when the filing or the rewrite failed.
async fn refile(svc: &Services, record: &Versioned<DesiredState>) -> bool {
    let device = &record.value.device_id;
    let mut renamed = record.value.clone();
    let moved = index::plan_refiling(svc, &mut renamed, Some(&record.value));
    if let Err(e) = moved.file(svc).await {
        warn!(device = %device, error = %e, "sweep could not file the device at its due time");
        return false;
    }
    // Renaming the entry changes nothing a reader sees: no transition, no event.
    match svc.ledger.put(&renamed, Some(&record.etag), &[]).await {
        Ok(_) => {
            moved.committed(svc).await;
            true
        }
        // Someone wrote meanwhile: the next run looks again.
        Err(StoreError::Conflict) => false,
        Err(e) => {
            warn!(device = %device, error = %e, "sweep left the device's index entries as they were");
            false
        }
    }
}

/// Consumes what a write in flight based on the sweep's read of `record` would be
/// conditional on. `false` (leave the entries) when someone wrote meanwhile or the
/// storage failed: the next run looks again.
async fn fence_read(
    svc: &Services,
    device: &DeviceId,
    record: Option<&Versioned<DesiredState>>,
) -> bool {
    let on = match record {
        Some(r) => Precondition::Record(r.etag.clone()),
        None => match svc.ledger.anchor(device).await {
            Ok(etag) => Precondition::Anchor(etag),
            Err(e) => {
                warn!(device = %device, error = %e, "sweep left the device's index entries as they were");
                return false;
            }
        },
    };
    match svc.ledger.fence(device, &on).await {
        Ok(()) => true,
        Err(StoreError::Conflict) => false,
        Err(e) => {
            warn!(device = %device, error = %e, "sweep left the device's index entries as they were");
            false
        }
    }
}

async fn unfile(svc: &Services, entry: &DueEntry, etag: &ETag) {
    match svc.ledger.unfile_due(entry, Some(etag)).await {
        Ok(()) | Err(StoreError::Conflict) => {}
        Err(e) => {
            warn!(device = %entry.device_id, error = %e, "sweep could not remove an index entry")
        }
    }
}

/// Files the next slice of pending records in the index if a reconciling pass is due,
/// and records how far it got in the sweep state (through this run's lease). Runs
/// beside the device work: it starts batch writes only inside its own budget and while
/// the run may start work; the filings go in batches ([`due_index::batches`]: one
/// entity-group transaction per shard partition, at most [`due_index::MAX_BATCH`]
/// each), up to one per shard at once. The slice counts as filed up to its first
/// record that was not (a batch failed or never started): the next run resumes there.
/// Returns how many records it filed.
async fn reconcile(svc: &Services, lease: &SweepLease) -> usize {
    let now = svc.clock.now();
    let state = lease.state().await;
    if svc.policy.reconcile_rows_per_run == 0
        || !state.reconcile_due(now, svc.policy.reconcile_interval)
    {
        return 0;
    }
    let deadline = now + svc.policy.reconcile_budget;
    if !lease.may_start(svc, deadline) {
        return 0;
    }
    let after = state.reconcile_after;
    let left = (deadline - now).to_std().unwrap_or_default();
    let listed = svc
        .ledger
        .pending_after(after.as_ref(), svc.policy.reconcile_rows_per_run);
    let (page, next) = match tokio::time::timeout(left, listed).await {
        Ok(Ok(listed)) => listed,
        Ok(Err(e)) => {
            warn!(error = %e, "reconciling pass could not list pending records");
            return 0;
        }
        Err(_) => {
            warn!("reconciling pass could not list pending records within its budget");
            return 0;
        }
    };
    // Which records of the slice are filed (a record not pending enough to be due
    // needs nothing), by their place in the slice.
    let mut filed: Vec<bool> = vec![true; page.records.len()];
    let mut place: HashMap<String, usize> = HashMap::new();
    let mut entries = Vec::new();
    for (i, record) in page.records.iter().enumerate() {
        // A record that names its entry is covered (`functions::index`): filing it again
        // would only leave an extra entry for a later run to drop.
        if record.value.due_entry.is_some() {
            continue;
        }
        if let Some(at) = svc.policy.sweep_due(&record.value) {
            let entry = DueEntry::new(record.value.device_id.clone(), at).filed(now);
            place.insert(entry.row_key(), i);
            filed[i] = false;
            entries.push(entry);
        }
    }
    let written: Vec<(Vec<DueEntry>, bool)> = stream::iter(due_index::batches(entries))
        .map(|batch| async move {
            if !lease.may_start(svc, deadline) {
                return (batch, false);
            }
            match svc.ledger.file_due_batch(&batch).await {
                Ok(()) => (batch, true),
                Err(e) => {
                    warn!(error = %e, entries = batch.len(), "reconciling pass could not file a batch");
                    (batch, false)
                }
            }
        })
        .buffered(usize::from(SHARDS))
        .collect()
        .await;
    let mut reconciled = 0;
    for (batch, _) in written.iter().filter(|(_, ok)| *ok) {
        reconciled += batch.len();
        for entry in batch {
            if let Some(&i) = place.get(&entry.row_key()) {
                filed[i] = true;
            }
        }
    }
    let (last, done) = match filed.iter().position(|f| !f) {
        // Nothing at the front of the slice was filed: no progress to record.
        Some(0) => return reconciled,
        Some(i) => (Some(page.records[i - 1].value.device_id.clone()), false),
        None => (next.clone(), next.is_none()),
    };
    lease
        .update(svc, |state| state.reconciled_slice(last, done, now))
        .await;
    if done {
        info!(reconciled, "reconciling pass finished");
    }
    reconciled
}

/// The sweep lease while this run holds it (module docs: "One run at a time, ending in
/// time"). Every write of the sweep state goes through it, conditional on the ETag of
/// the last: taking, renewing, the reconciling pass's progress and releasing.
struct SweepLease {
    holder: LeaseHolder,
    /// The run never holds its lease past this (`Policy::sweep_lease` after its start).
    cap: DateTime<Utc>,
    held: tokio::sync::Mutex<Versioned<SweepState>>,
    /// Until when other runs see the lease held (as far as this run knows).
    until: Mutex<DateTime<Utc>>,
    lost: AtomicBool,
}

impl SweepLease {
    /// Takes the sweep lease for the run that started at `started`, or `None` if
    /// another run holds it.
    async fn take(
        svc: &Services,
        holder: LeaseHolder,
        started: DateTime<Utc>,
    ) -> Result<Option<Self>, StoreError> {
        let stored = svc.ledger.sweep_state().await?;
        let mut state = stored.as_ref().map(|s| s.value.clone()).unwrap_or_default();
        if state.held_by_other(&holder, started) {
            return Ok(None);
        }
        let cap = started + svc.policy.sweep_lease();
        state.take(
            &holder,
            started,
            svc.policy.sweep_lease_grant().min(cap - started),
        );
        match svc
            .ledger
            .put_sweep_state(&state, stored.as_ref().map(|s| &s.etag))
            .await
        {
            Ok(etag) => Ok(Some(Self {
                holder,
                cap,
                until: Mutex::new(state.until.unwrap_or(started)),
                held: tokio::sync::Mutex::new(Versioned { value: state, etag }),
                lost: AtomicBool::new(false),
            })),
            // Another run took it first.
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn until(&self) -> DateTime<Utc> {
        *self.until.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sweep state as this run last wrote it.
    async fn state(&self) -> SweepState {
        self.held.lock().await.value.clone()
    }

    /// Until when this run may start work whose tail ends by `deadline`'s rules: before
    /// `deadline`, and while its lease still covers the work's tail
    /// (`Policy::sweep_tail`) by every instance's clock. Never, once the lease is lost.
    fn start_deadline(&self, policy: &Policy, deadline: DateTime<Utc>) -> DateTime<Utc> {
        if self.lost() {
            return DateTime::<Utc>::MIN_UTC;
        }
        let covered = self.until() - policy.sweep_tail() - policy.max_clock_skew * 2;
        deadline.min(covered)
    }

    /// Whether this run may start a piece of work now (see [`SweepLease::start_deadline`]).
    fn may_start(&self, svc: &Services, deadline: DateTime<Utc>) -> bool {
        svc.clock.now() < self.start_deadline(&svc.policy, deadline)
    }

    /// Renews the lease every [`SWEEP_RENEW_EVERY`] until `stop` is notified.
    async fn keep_renewing(&self, svc: &Services, stop: &Notify) {
        let every = SWEEP_RENEW_EVERY.to_std().unwrap_or_default();
        loop {
            tokio::select! {
                biased;
                () = stop.notified() => return,
                () = tokio::time::sleep(every) => {}
            }
            self.renew(svc).await;
        }
    }

    /// One grant from now (`Policy::sweep_lease_grant`), never past the cap.
    async fn renew(&self, svc: &Services) {
        let mut held = self.held.lock().await;
        if self.lost() {
            return;
        }
        let now = svc.clock.now();
        let grant = svc.policy.sweep_lease_grant().min(self.cap - now);
        if grant <= chrono::Duration::zero() {
            return;
        }
        let mut state = held.value.clone();
        state.take(&self.holder, now, grant);
        self.write(svc, &mut held, state).await;
    }

    /// Records the reconciling pass's progress (`change`) in the sweep state.
    async fn update(&self, svc: &Services, change: impl FnOnce(&mut SweepState)) {
        let mut held = self.held.lock().await;
        if self.lost() {
            return;
        }
        let mut state = held.value.clone();
        change(&mut state);
        self.write(svc, &mut held, state).await;
    }

    /// Writes `state` over the sweep state this run last wrote, conditional on its
    /// ETag. A conflict means someone else wrote: if the row still names this run (its
    /// own earlier write, answered as failed, committed after all), the write is tried
    /// again on that ETag; if it names another run, the lease is lost. Other failures
    /// leave the lease as it was (what others see may be either write: this run
    /// counts on the earlier `until`).
    async fn write(&self, svc: &Services, held: &mut Versioned<SweepState>, state: SweepState) {
        let mut etag = held.etag.clone();
        for _ in 0..2 {
            match svc.ledger.put_sweep_state(&state, Some(&etag)).await {
                Ok(written) => {
                    *self.until.lock().unwrap_or_else(|e| e.into_inner()) =
                        state.until.unwrap_or_else(|| self.until());
                    *held = Versioned {
                        value: state,
                        etag: written,
                    };
                    return;
                }
                Err(StoreError::Conflict) => match svc.ledger.sweep_state().await {
                    Ok(Some(stored)) if stored.value.holder.as_ref() == Some(&self.holder) => {
                        if let Some(until) = stored.value.until {
                            *self.until.lock().unwrap_or_else(|e| e.into_inner()) = until;
                        }
                        held.etag = stored.etag.clone();
                        etag = stored.etag;
                    }
                    Ok(_) => {
                        self.lost.store(true, Ordering::Relaxed);
                        warn!("another sweep run took the sweep lease over: this run starts no more work");
                        return;
                    }
                    Err(e) => {
                        warn!(error = %e, "sweep could not read its lease back");
                        return;
                    }
                },
                Err(e) => {
                    warn!(error = %e, "sweep could not renew its lease or record its progress");
                    return;
                }
            }
        }
    }

    async fn release(&self, svc: &Services) {
        let mut held = self.held.lock().await;
        if self.lost() {
            return;
        }
        held.value.release(&self.holder);
        if let Err(e) = svc
            .ledger
            .put_sweep_state(&held.value, Some(&held.etag))
            .await
        {
            // It lapses by itself.
            warn!(error = %e, "sweep could not release its lease");
        }
    }
}

/// The sweep's device port: a status call or a wait for a device-call budget turn
/// (neither makes a device act) ends when the run's time to start work ends
/// ([`SweepLease::start_deadline`]), as a transient answer that sent nothing, so a
/// device started just before then takes at most `Policy::sweep_tail`. A PUT is
/// never cut.
struct SweepDevice {
    inner: Arc<dyn DeviceApi>,
    clock: Arc<dyn Clock>,
    lease: Arc<SweepLease>,
    policy: Policy,
    deadline: DateTime<Utc>,
}

impl SweepDevice {
    async fn within<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<T, DeviceError>>,
    ) -> Result<T, DeviceError> {
        let end = self.lease.start_deadline(&self.policy, self.deadline);
        let out_of_time = || {
            DeviceError::not_sent(format!(
                "{what}: not made, the sweep run's time to start work ran out"
            ))
        };
        let Ok(left) = (end - self.clock.now()).to_std() else {
            return Err(out_of_time());
        };
        tokio::time::timeout(left, call)
            .await
            .unwrap_or_else(|_| Err(out_of_time()))
    }
}

#[async_trait]
impl DeviceApi for SweepDevice {
    async fn reserve_put(&self) -> Result<(), DeviceError> {
        self.within("PUT", self.inner.reserve_put()).await
    }

    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.within("status call", self.inner.status(device)).await
    }

    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.within("status call", self.inner.status_if_free(device))
            .await
    }

    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        self.inner.apply_min_soc(device, min_soc, request_id).await
    }
}

fn step_of(outcome: &ApplyOutcome) -> Step {
    match outcome {
        ApplyOutcome::Applied(_) => Step::Applied,
        ApplyOutcome::Expired(_) => Step::Expired,
        ApplyOutcome::Failed(..) => Step::Failed,
        ApplyOutcome::Busy(_) => Step::Busy,
        ApplyOutcome::AlreadyFinal(_) | ApplyOutcome::NoRecord => Step::Busy,
        ApplyOutcome::Offline(_) | ApplyOutcome::Transient(..) => Step::StillOffline,
    }
}

fn log_error(device: &DeviceId, error: &str) -> Step {
    warn!(device = %device, error, "sweep could not handle device");
    Step::Error
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestStatus;
    use crate::functions::fakes::{post_min_soc as post, Harness};
    use crate::ports::Ledger as _;

    /// Past the first wake-up message's due time plus the grace: a lost message is overdue.
    fn overdue(h: &Harness) -> chrono::Duration {
        h.svc.policy.backoff.initial + h.svc.policy.wake_grace + chrono::Duration::seconds(1)
    }

    async fn index_entries(h: &Harness) -> Vec<DueEntry> {
        h.index_entries().await
    }

    #[tokio::test]
    async fn due_devices_back_online_are_applied_and_the_others_resent() {
        let h = Harness::new();
        for d in ["a", "b", "c"] {
            h.device.set_online(d, false);
            post(&h, d, 50).await;
        }
        h.device.set_online("a", true);
        h.device.set_online("c", true);
        h.clock.advance(overdue(&h));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (
                report.due,
                report.applied,
                report.resent,
                report.status_calls
            ),
            (3, 2, 1, 3),
            "{report}"
        );
        assert_eq!(h.ledger_record("a").await.status, RequestStatus::Applied);
        assert_eq!(h.ledger_record("b").await.status, RequestStatus::Pending);
    }

    #[tokio::test]
    async fn a_run_reads_and_calls_only_the_devices_that_are_due() {
        let h = Harness::new();
        for i in 0..20 {
            h.device.set_online(&format!("old-{i}"), false);
            post(&h, &format!("old-{i}"), 50).await;
        }
        h.clock.advance(chrono::Duration::seconds(100));
        for i in 0..200 {
            h.device.set_online(&format!("new-{i}"), false);
            post(&h, &format!("new-{i}"), 50).await;
        }
        h.clock
            .advance(overdue(&h) - chrono::Duration::seconds(100));
        let (status_before, _) = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        let (status_after, _) = h.device.calls();
        assert_eq!((report.due, report.resent), (20, 20), "{report}");
        assert_eq!(
            status_after - status_before,
            20,
            "one status call per due device, none for the 200 others"
        );
    }

    #[tokio::test]
    async fn a_device_filed_twice_gets_one_status_call_and_keeps_one_entry() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        let rec = h.ledger_record("a").await;
        let due = h.svc.policy.sweep_due(&rec).unwrap();
        // A second entry for the same device (a reconciling pass, a crash after filing).
        h.ledger
            .file_due(&DueEntry::new(
                rec.device_id.clone(),
                due - chrono::Duration::seconds(5),
            ))
            .await
            .unwrap();
        h.clock.advance(overdue(&h));
        let (before, _) = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.resent), (1, 1), "{report}");
        assert_eq!(h.device.calls().0 - before, 1);
        let left = index_entries(&h).await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(
            Some(left[0].due_at),
            h.svc.policy.sweep_due(&h.ledger_record("a").await)
        );
    }

    #[tokio::test]
    async fn requests_near_expiry_are_marked_expired_without_a_device_call() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.clock
            .advance(h.svc.policy.request_ttl + chrono::Duration::seconds(1));
        h.device.set_online("a", true);
        let calls = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.expired, 1, "{report}");
        assert_eq!(h.device.calls(), calls);
        let rec = h.ledger_record("a").await;
        assert_eq!(rec.status, RequestStatus::Expired);
        assert!(rec.last_error.unwrap().contains("expired"));
        assert!(
            index_entries(&h).await.is_empty(),
            "a settled record leaves the index"
        );
    }

    #[tokio::test]
    async fn a_lost_wake_message_is_resent_once_overdue() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.resent), (0, 0), "not due yet: {report}");
        h.clock.advance(overdue(&h));
        let (statuses, puts) = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.resent, 1, "{report}");
        // One status call, which said offline: no PUT is tried on a device known offline.
        assert_eq!(h.device.calls(), (statuses + 1, puts));
        let sent = h.queue.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            h.ledger_record("a").await.wake_message_id.as_deref(),
            Some(sent[1].message_id.as_str())
        );
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.due, report.resent),
            (0, 0),
            "the new message is not overdue: {report}"
        );
    }

    #[tokio::test]
    async fn at_the_instant_a_wake_up_becomes_overdue_the_sweep_lists_it_and_mends_the_chain() {
        // Listed at its sweep-due time exactly (due time plus grace; the index lists at
        // or before now), and overdue from that same instant: a look always acts.
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.clock
            .advance(h.svc.policy.backoff.initial + h.svc.policy.wake_grace);
        let sent = h.queue.sent().len();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (
                report.due,
                report.status_calls,
                report.still_offline,
                report.resent
            ),
            (1, 1, 0, 1),
            "{report}"
        );
        assert_eq!(h.queue.sent().len(), sent + 1);
        // Its entry moved with the chain: nothing is due now.
        let entries = h.index_entries().await;
        assert!(
            entries.iter().all(|e| e.due_at > h.clock.now()),
            "{entries:?}"
        );
    }

    #[tokio::test]
    async fn an_entry_due_now_for_a_record_due_a_little_later_is_refiled_not_dropped() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        // A write that moves the sweep-due time 10 s later keeps the entry
        // (`index::KEEP_WITHIN`): here, its wake-up message due 10 s later.
        let stored = h.ledger.get(&h.id("a")).await.unwrap().unwrap();
        let mut moved = stored.value.clone();
        let due = moved.wake_due_at.unwrap() + chrono::Duration::seconds(10);
        moved.expect_wake("m-later", due, h.clock.now());
        index::put_record(&h.svc, &mut moved, Some(&stored.value), Some(&stored.etag))
            .await
            .unwrap();
        let entries = index_entries(&h).await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        let record = h.ledger_record("a").await;
        assert!(h.svc.policy.sweep_due(&record) > Some(entries[0].due_at));
        // The sweep at the entry's instant: the record is not due, and the entry it
        // names is not ahead of now, so it must file one at the record's time.
        h.clock.advance(entries[0].due_at - h.clock.now());
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.refiled, 1, "{report}");
        let record = h.ledger_record("a").await;
        let left = index_entries(&h).await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(record.due_entry, Some(left[0].row_key()));
        assert_eq!(Some(left[0].due_at), h.svc.policy.sweep_due(&record));
    }

    #[tokio::test]
    async fn a_sweep_that_can_list_no_shard_fails_and_one_that_can_list_some_goes_on() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.clock.advance(overdue(&h));
        let shard_a = due_index::shard_of(&h.id("a"));
        h.ledger.fail_due_listing(0..SHARDS);
        assert!(run(&h.svc).await.is_err());
        h.ledger
            .fail_due_listing((0..SHARDS).filter(|s| *s != shard_a));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.errors, report.due, report.resent),
            (usize::from(SHARDS) - 1, 1, 1),
            "{report}"
        );
    }

    #[tokio::test]
    async fn a_run_takes_up_to_twice_a_shards_even_share_of_the_quota_from_one_shard_plus_16() {
        let mut h = Harness::new();
        h.svc.policy.sweep_max_due = 160;
        // 40 due devices, all in shard 0: the run takes 2 * 160 / 16 + 16 = 36 of them.
        let mut ids = Vec::new();
        for i in 0.. {
            let id = format!("d{i}");
            if due_index::shard_of(&h.id(&id)) == 0 {
                ids.push(id);
            }
            if ids.len() == 40 {
                break;
            }
        }
        for id in &ids {
            h.device.set_online(id, false);
            post(&h, id, 50).await;
        }
        h.clock.advance(overdue(&h));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.due, 36, "{report}");
    }

    #[tokio::test]
    async fn at_the_fanout_threshold_the_sweep_still_looks_at_each_device_itself() {
        let mut h = Harness::new();
        h.svc.policy.sweep_fanout_above = 3;
        overdue_devices(&h, 3).await;
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.due, report.fanned_out, report.status_calls),
            (3, 0, 3),
            "{report}"
        );
    }

    #[tokio::test]
    async fn a_resent_device_is_read_once_its_entries_tidied_from_the_record_it_wrote() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.clock.advance(overdue(&h));
        let reads = h.ledger.reads();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.resent, 1, "{report}");
        assert_eq!(
            h.ledger.reads() - reads,
            1,
            "one read of the record: {report}"
        );
        // Tidied all the same: the record names one entry, the one the index holds.
        let record = h.ledger_record("a").await;
        let entries = index_entries(&h).await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(record.due_entry, Some(entries[0].row_key()));
    }

    #[tokio::test]
    async fn an_unknown_device_fails_its_pending_request() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.device.forget("a");
        h.clock.advance(overdue(&h));
        assert_eq!(run(&h.svc).await.unwrap().failed, 1);
        assert_eq!(h.ledger_record("a").await.status, RequestStatus::Failed);
    }

    #[tokio::test]
    async fn an_unreadable_row_is_skipped_and_counted_while_the_others_are_swept() {
        let h = Harness::new();
        for d in ["a", "b", "c"] {
            h.device.set_online(d, false);
            post(&h, d, 50).await;
        }
        h.ledger.corrupt("b", "MinSoc is out of range");
        h.device.set_online("a", true);
        h.device.set_online("c", true);
        h.clock.advance(overdue(&h));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.due, report.applied, report.corrupt, report.errors),
            (3, 2, 1, 0),
            "{report}"
        );
        assert!(report.to_string().contains("corrupt=1"), "{report}");
        assert_eq!(h.ledger_record("a").await.status, RequestStatus::Applied);
        assert_eq!(
            run(&h.svc).await.unwrap().corrupt,
            1,
            "reported every run until repaired"
        );
    }

    #[tokio::test]
    async fn a_ledger_outage_fails_the_sweep() {
        let h = Harness::new();
        h.ledger.set_down(true);
        assert!(run(&h.svc).await.is_err());
    }

    #[tokio::test]
    async fn a_settled_request_leaves_no_entry_for_the_sweep() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.device.set_online("a", true);
        post(&h, "a", 60).await; // applied at once: it removes the entry it replaced
        assert!(index_entries(&h).await.is_empty());
        h.clock.advance(overdue(&h));
        assert_eq!(run(&h.svc).await.unwrap().due, 0);
    }

    #[tokio::test]
    async fn extra_entries_of_settled_records_are_dropped_without_a_device_call() {
        let h = Harness::new();
        h.device.set_online("a", true);
        post(&h, "a", 60).await;
        // Left behind by a writer that could not remove it.
        file_extra_entry(&h, "a").await;
        h.clock.advance(overdue(&h));
        let calls = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.dropped), (1, 1), "{report}");
        assert_eq!(h.device.calls(), calls);
        assert!(index_entries(&h).await.is_empty());
    }

    #[tokio::test]
    async fn an_entry_filed_less_than_a_lease_ago_stays_though_the_record_it_was_filed_for_is_not_written_yet(
    ) {
        // A POST filed its entry and is on its way to write its request over a settled
        // record (seed 83,321): the sweep, reading the settled record, must not drop it.
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        h.device.set_online("a", true);
        post(&h, "a", 50).await; // applied: settled (its own entry comes due and ages)
        h.clock.advance(overdue(&h));
        let now = h.clock.now();
        h.ledger
            .file_due(&DueEntry::new(h.id("a"), now).filed(now))
            .await
            .unwrap();
        h.clock.advance(chrono::Duration::seconds(1));
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.dropped), (1, 1), "{report}");
        let left = index_entries(&h).await;
        assert_eq!(
            left.len(),
            1,
            "the young entry stays, the old one goes: {left:?}"
        );
        assert_eq!(left[0].filed_at, Some(now));
        h.clock.advance(h.svc.policy.lease);
        run(&h.svc).await.unwrap();
        assert!(
            index_entries(&h).await.is_empty(),
            "gone once older than a lease"
        );
    }

    /// An entry due now for `device`, filed long ago: one a writer could not remove.
    async fn file_extra_entry(h: &Harness, device: &str) {
        let long_ago = h.clock.now() - h.svc.policy.lease * 2;
        h.ledger
            .file_due(&DueEntry::new(h.id(device), h.clock.now()).filed(long_ago))
            .await
            .unwrap();
    }

    /// A device offline at its POST, whose chain ran its first re-check (offline again).
    async fn after_one_recheck(h: &Harness) {
        h.device.set_online("a", false);
        post(h, "a", 50).await;
        h.clock.advance(h.svc.policy.backoff.initial);
        let current = h.ledger.get(&h.id("a")).await.unwrap().unwrap();
        wake::schedule_recheck(&h.svc, current, None, None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_live_chain_moves_its_entry_so_the_sweep_never_meets_it() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        after_one_recheck(&h).await;
        let left = index_entries(&h).await;
        let record = h.ledger_record("a").await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(Some(left[0].due_at), h.svc.policy.sweep_due(&record));
        assert_eq!(record.due_entry, Some(left[0].row_key()));
        h.clock
            .advance(h.svc.policy.wake_grace + chrono::Duration::seconds(1));
        assert_eq!(run(&h.svc).await.unwrap().due, 0);
    }

    #[tokio::test]
    async fn an_extra_entry_of_a_record_not_due_yet_goes_and_the_entry_it_names_stays() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        after_one_recheck(&h).await;
        let named = index_entries(&h).await;
        file_extra_entry(&h, "a").await;
        h.clock.advance(chrono::Duration::seconds(1));
        let calls = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.refiled), (1, 1), "{report}");
        assert_eq!(h.device.calls(), calls, "not due: no device call");
        assert_eq!(index_entries(&h).await, named);
    }

    #[tokio::test]
    async fn a_record_not_due_yet_naming_no_entry_ahead_is_filed_at_its_due_time_and_names_it() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        after_one_recheck(&h).await;
        // As written before entries were named, with the entry that covered it then.
        let mut current = h.ledger.get(&h.id("a")).await.unwrap().unwrap();
        let named = index::named_entry(&current.value).unwrap();
        h.ledger.unfile_due(&named, None).await.unwrap();
        current.value.due_entry = None;
        h.ledger
            .put(&current.value, Some(&current.etag), &[])
            .await
            .unwrap();
        file_extra_entry(&h, "a").await;
        h.clock.advance(chrono::Duration::seconds(1));
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.refiled), (1, 1), "{report}");
        let left = index_entries(&h).await;
        let record = h.ledger_record("a").await;
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(Some(left[0].due_at), h.svc.policy.sweep_due(&record));
        assert_eq!(record.due_entry, Some(left[0].row_key()));
    }

    #[tokio::test]
    async fn above_the_fanout_threshold_the_sweep_sends_spread_wake_ups_and_calls_no_device() {
        let mut h = Harness::new();
        h.svc.policy.sweep_fanout_above = 2;
        h.svc.policy.fleet_device_calls_per_second = 10.0;
        for i in 0..5 {
            h.device.set_online(&format!("d{i}"), true);
            h.device.set_online(&format!("d{i}"), false);
            post(&h, &format!("d{i}"), 50).await;
        }
        h.clock.advance(overdue(&h));
        let sent_before = h.queue.sent().len();
        let calls = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.due, report.fanned_out, report.status_calls),
            (5, 5, 0),
            "{report}"
        );
        assert_eq!(h.device.calls(), calls);
        let mut slots: Vec<_> = h.queue.sent()[sent_before..]
            .iter()
            .map(|m| m.scheduled_at.unwrap() - h.clock.now() - h.svc.policy.lease)
            .map(|d| d.num_milliseconds())
            .collect();
        slots.sort();
        assert_eq!(
            slots,
            [0, 100, 200, 300, 400],
            "spread at 10 calls/s, a lease from now"
        );
        assert_eq!(h.queue.batches(), [5], "one batch send");
        for i in 0..5 {
            let rec = h.ledger_record(&format!("d{i}")).await;
            assert!(rec.wake_message_id.is_some() && rec.is_pending());
        }
    }

    #[tokio::test]
    async fn a_fan_out_batch_that_cannot_be_sent_records_nothing_and_leaves_the_devices_due() {
        let mut h = Harness::new();
        h.svc.policy.sweep_fanout_above = 1;
        h.svc.policy.reconcile_rows_per_run = 0;
        for i in 0..3 {
            h.device.set_online(&format!("d{i}"), false);
            post(&h, &format!("d{i}"), 50).await;
        }
        h.clock.advance(overdue(&h));
        let mut expected = Vec::new();
        for i in 0..3 {
            expected.push(h.ledger_record(&format!("d{i}")).await.wake_message_id);
        }
        h.queue.set_down(true);
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.due, report.errors, report.fanned_out),
            (3, 3, 0),
            "{report}"
        );
        for (i, before) in expected.iter().enumerate() {
            assert_eq!(
                &h.ledger_record(&format!("d{i}")).await.wake_message_id,
                before
            );
        }
        h.queue.set_down(false);
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.due, report.fanned_out),
            (3, 3),
            "the next run sends them: {report}"
        );
    }

    #[tokio::test]
    async fn a_settled_devices_stale_entries_go_in_one_run_and_do_not_hold_up_the_next_device() {
        // Simulation seed 84,424: with a quota of one device per run, each of a settled
        // device's stale entries cost a run, and the device behind it waited past the
        // settle bound.
        let mut h = Harness::new();
        h.svc.policy.sweep_max_due = 1;
        h.svc.policy.reconcile_rows_per_run = 0;
        h.device.set_online("settled", true);
        post(&h, "settled", 40).await;
        let settled = h.ledger_record("settled").await;
        assert_eq!(settled.status, crate::domain::RequestStatus::Applied);
        for back in 1..=5 {
            let at = h.clock.now() - chrono::Duration::seconds(back);
            h.ledger
                .file_due(
                    &DueEntry::new(settled.device_id.clone(), at).filed(at - h.svc.policy.lease),
                )
                .await
                .unwrap();
        }
        h.device.set_online("waiting", false);
        post(&h, "waiting", 50).await;
        h.clock.advance(overdue(&h));
        let first = run(&h.svc).await.unwrap();
        assert_eq!((first.dropped, first.resent), (1, 0), "{first}");
        let second = run(&h.svc).await.unwrap();
        assert_eq!(second.resent, 1, "the waiting device is next: {second}");
    }

    #[tokio::test]
    async fn entries_go_only_after_a_fence_so_a_write_still_in_flight_cannot_commit_uncovered() {
        // Simulation seed 108,927: a POST filed its entry, sent its accepting write and
        // was killed; the write committed 38 s later, after the sweep had read "no record"
        // and dropped the entry: a pending record the sweep could never find (S6).
        use crate::ports::Precondition;
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        let device = h.id("d1");
        let record = DesiredState::accept(
            device.clone(),
            crate::domain::MinSoc::new(40).unwrap(),
            h.clock.now(),
            h.svc.policy.request_ttl,
            None,
        );
        let on = Precondition::Anchor(h.ledger.anchor(&device).await.unwrap());
        let due = h.svc.policy.sweep_due(&record).unwrap();
        let long_ago = h.clock.now() - h.svc.policy.lease * 2;
        h.ledger
            .file_due(&DueEntry::new(device.clone(), due).filed(long_ago))
            .await
            .unwrap();
        h.ledger.defer_next_accept();
        assert!(h
            .ledger
            .accept(&record, None, None, &on, &[])
            .await
            .is_err());
        h.clock.advance(overdue(&h));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.dropped, 1, "{report}");
        assert!(index_entries(&h).await.is_empty());
        assert_eq!(
            h.ledger.land_deferred(),
            Err(StoreError::Conflict),
            "the write in flight must not commit after its entry went"
        );
        assert_eq!(h.ledger.get(&device).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_device_still_due_keeps_every_entry_for_the_next_run() {
        // Simulation seed 301,944: the run kept only the earliest entry, which an earlier
        // run's delete (timed out at its caller) removed moments later.
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        h.device.set_online("d1", false);
        post(&h, "d1", 50).await;
        let rec = h.ledger_record("d1").await;
        let due = h.svc.policy.sweep_due(&rec).unwrap();
        let long_ago = h.clock.now() - h.svc.policy.lease * 2;
        h.ledger
            .file_due(
                &DueEntry::new(rec.device_id.clone(), due - chrono::Duration::seconds(5))
                    .filed(long_ago),
            )
            .await
            .unwrap();
        h.clock.advance(overdue(&h));
        h.hold_lease("d1", "other", chrono::Duration::seconds(30))
            .await;
        let before = index_entries(&h).await.len();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.busy, 1, "{report}");
        assert_eq!(index_entries(&h).await.len(), before, "every entry stays");
    }

    #[tokio::test]
    async fn a_run_takes_at_most_its_share_and_the_next_resumes_with_the_rest() {
        let mut h = Harness::new();
        h.svc.policy.sweep_max_due = 3;
        h.svc.policy.reconcile_rows_per_run = 0;
        for i in 0..7 {
            h.device.set_online(&format!("d{i}"), false);
            post(&h, &format!("d{i}"), 50).await;
        }
        h.clock.advance(overdue(&h));
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(run(&h.svc).await.unwrap().resent);
        }
        assert_eq!(seen, [3, 3, 1]);
        assert_eq!(run(&h.svc).await.unwrap().due, 0);
    }

    #[tokio::test]
    async fn a_run_that_finds_another_runs_live_lease_does_nothing() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.clock.advance(overdue(&h));
        let mut other = SweepState::default();
        other.take(
            &LeaseHolder::new(HolderKind::Sweep),
            h.clock.now(),
            chrono::Duration::seconds(60),
        );
        h.ledger.put_sweep_state(&other, None).await.unwrap();
        let calls = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert!(report.skipped, "{report}");
        assert_eq!(h.device.calls(), calls);
        h.clock.advance(chrono::Duration::seconds(61));
        assert_eq!(run(&h.svc).await.unwrap().resent, 1, "the lease lapsed");
    }

    #[tokio::test]
    async fn the_reconciling_pass_indexes_records_the_index_does_not_know_a_slice_per_run() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 2;
        // Five pending records written without the index (as before it existed).
        unindexed_pending(&h, 5).await;
        assert!(index_entries(&h).await.is_empty());
        let filed: Vec<_> = [(); 4].iter().map(|_| 0).collect::<Vec<_>>();
        let mut counts = Vec::new();
        for _ in filed {
            counts.push(run(&h.svc).await.unwrap().reconciled);
        }
        assert_eq!(
            counts,
            [2, 2, 1, 0],
            "resumes after the last device; then waits an interval"
        );
        h.clock.advance(overdue(&h));
        let report = run(&h.svc).await.unwrap();
        assert_eq!((report.due, report.resent), (5, 5), "{report}");
    }

    /// `n` offline devices with a pending record each, written without the index (as
    /// before it existed).
    async fn unindexed_pending(h: &Harness, n: usize) {
        for i in 0..n {
            h.device.set_online(&format!("d{i}"), false);
            let rec = crate::domain::DesiredState::accept(
                h.id(&format!("d{i}")),
                crate::domain::MinSoc::new(40).unwrap(),
                h.clock.now(),
                h.svc.policy.request_ttl,
                None,
            );
            h.ledger.put(&rec, None, &[]).await.unwrap();
        }
    }

    /// `n` devices, each with a pending request whose wake-up message is overdue.
    #[tokio::test]
    async fn a_broken_chain_is_mended_though_the_sweeps_apply_wrote_the_record_again() {
        // Seed 28,888: the POST's wake-up message was never sent; each sweep found the
        // device online, its PUT got no turn (a transient answer, written down), and the
        // record then looked freshly written, so no message was sent: pending for ever.
        let h = Harness::new();
        h.device.set_online("a", false);
        h.queue.set_down(true);
        post(&h, "a", 50).await;
        h.queue.set_down(false);
        h.device.set_online("a", true);
        let device = h.device.clone();
        h.device.on_next_put("a", move || {
            Box::pin(async move { device.fail_transiently("a", 1) })
        });
        h.clock.advance(overdue(&h));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.resent, 1, "{report}");
        let record = h.ledger_record("a").await;
        assert!(record.wake_message_id.is_some(), "{record:?}");
        assert_eq!(
            h.queue.sent().last().map(|m| m.message_id.clone()),
            record.wake_message_id
        );
    }

    async fn overdue_devices(h: &Harness, n: usize) {
        for i in 0..n {
            h.device.set_online(&format!("d{i}"), false);
            post(h, &format!("d{i}"), 50).await;
        }
        h.clock.advance(overdue(h));
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_fan_out_batch_is_due_a_lease_after_it_is_sent_however_high_the_rate() {
        // Slots used to be computed once per run: at 1,000 calls/s a later batch's slots
        // were long past by the time it was sent, so its messages came before the ledger
        // named them and did nothing.
        let mut h = Harness::new();
        h.svc.policy.sweep_fanout_above = 1;
        h.svc.policy.reconcile_rows_per_run = 0;
        h.svc.policy.fleet_device_calls_per_second = 1000.0;
        overdue_devices(&h, 250).await;
        h.clock.follow_tokio_time();
        h.queue.set_latency(std::time::Duration::from_secs(20));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.fanned_out, 250, "{report}");
        let batches = h.queue.batch_times();
        assert_eq!(batches.len(), 3);
        let mut previous = None;
        for (sent_at, slots) in &batches {
            for at in slots {
                let at = at.expect("scheduled");
                assert!(
                    at >= *sent_at + h.svc.policy.lease,
                    "a message due {} ms after its batch was sent (a lease is {} s)",
                    (at - *sent_at).num_milliseconds(),
                    h.svc.policy.lease.num_seconds()
                );
                assert!(previous.map_or(true, |p| at > p), "slots follow each other");
                previous = Some(at);
            }
        }
    }

    #[test]
    fn fan_out_slots_follow_the_rate_and_never_start_before_the_floor() {
        let t0 = chrono::Utc::now();
        let ms = chrono::Duration::milliseconds;
        let mut slots = FanOut::new(10.0);
        let first: Vec<_> = (0..3).map(|_| slots.next_slot(t0)).collect();
        assert_eq!(first, [t0, t0 + ms(100), t0 + ms(200)]);
        // A later batch whose floor is behind the slots goes on from them...
        assert_eq!(slots.next_slot(t0 + ms(50)), t0 + ms(300));
        // ...and one whose floor is ahead starts at its floor.
        let later = t0 + ms(10_000);
        assert_eq!(slots.next_slot(later), later);
        assert_eq!(slots.next_slot(later), later + ms(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_with_every_call_at_its_slowest_ends_inside_its_renewed_lease_and_function_timeout(
    ) {
        use crate::adapters::{service_bus::SEND_TIMEOUT, table_ledger::STORAGE_TIMEOUT};
        let release = chrono::Duration::from_std(STORAGE_TIMEOUT).unwrap();
        // Budgets that end at every point of a device's work: some device always
        // starts just before its run's time to start work ends.
        for budget in (100..=190).step_by(3) {
            let mut h = Harness::new();
            h.svc.policy.reconcile_rows_per_run = 0;
            h.svc.policy.sweep_budget = chrono::Duration::seconds(budget);
            overdue_devices(&h, 40).await;
            for i in (0..40).step_by(2) {
                h.device.set_online(&format!("d{i}"), true);
            }
            h.clock.follow_tokio_time();
            // Every ledger call and send takes its whole timeout; device-call budget
            // turns are scarce, so status calls and PUTs wait their longest.
            h.ledger.set_latency(STORAGE_TIMEOUT);
            h.queue.set_latency(SEND_TIMEOUT);
            h.svc.device = Arc::new(crate::adapters::BudgetedDeviceApi::new(
                h.device.clone(),
                0.05,
            ));
            let start = h.clock.now();
            let report = run(&h.svc).await.unwrap();
            let end = h.clock.now();
            assert!(report.deferred > 0, "budget {budget} s ran out: {report}");
            let worked = end - release - start;
            assert!(
                worked <= h.svc.policy.sweep_run_bound(),
                "budget {budget} s: worked {} s, bound {} s",
                worked.num_seconds(),
                h.svc.policy.sweep_run_bound().num_seconds()
            );
            assert!(
                end - start + crate::functions::LEASE_MARGIN <= crate::functions::FUNCTION_TIMEOUT
            );
            let held: Vec<_> = h
                .ledger
                .sweep_writes()
                .iter()
                .filter_map(|s| s.until)
                .collect();
            assert!(held.len() >= 3, "taken and renewed: {held:?}");
            let until = *held.iter().max().unwrap();
            assert!(
                end - release <= until,
                "budget {budget} s: the work ended {} s after the lease",
                (end - release - until).num_seconds()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_call_waiting_for_a_budget_turn_ends_when_the_runs_time_to_start_work_does() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        h.svc.policy.sweep_budget = chrono::Duration::seconds(5);
        overdue_devices(&h, 1).await;
        h.clock.follow_tokio_time();
        // The next turn is 20 s away.
        let budget = crate::adapters::BudgetedDeviceApi::new(h.device.clone(), 0.05);
        budget.reserve_put().await.unwrap();
        h.svc.device = Arc::new(budget);
        let calls = h.device.calls();
        let started = tokio::time::Instant::now();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            started.elapsed(),
            std::time::Duration::from_secs(5),
            "cut at the end of the budget"
        );
        assert_eq!(h.device.calls(), calls, "no call was made");
        assert_eq!(report.resent, 1, "left to its wake-up chain: {report}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_loses_its_lease_starts_no_more_work_and_leaves_the_new_holders_lease() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 0;
        overdue_devices(&h, 40).await;
        h.clock.follow_tokio_time();
        h.ledger.set_latency(std::time::Duration::from_secs(5));
        let svc = h.svc.clone();
        let first = tokio::spawn(async move { run(&svc).await });
        tokio::time::sleep(std::time::Duration::from_secs(12)).await;
        // Another run holds the lease now (as after this one's renewals failed until
        // it lapsed).
        let stored = h.ledger.sweep_state().await.unwrap().unwrap();
        let other = LeaseHolder::new(HolderKind::Sweep);
        let mut state = stored.value.clone();
        state.take(&other, h.clock.now(), chrono::Duration::seconds(600));
        h.ledger
            .put_sweep_state(&state, Some(&stored.etag))
            .await
            .unwrap();
        let report = first.await.unwrap().unwrap();
        assert!(report.lease_lost, "{report}");
        assert!(
            report.deferred >= 30,
            "at most the devices started before its renewal failed: {report}"
        );
        let after = h.ledger.sweep_state().await.unwrap().unwrap().value;
        assert_eq!(after.holder, Some(other), "the new holder keeps its lease");
    }

    #[tokio::test]
    async fn a_run_starts_work_only_while_its_lease_covers_the_works_tail_by_every_clock() {
        let mut h = Harness::new();
        h.svc.policy.max_clock_skew = chrono::Duration::seconds(2);
        let now = h.clock.now();
        let lease = SweepLease::take(&h.svc, LeaseHolder::new(HolderKind::Sweep), now)
            .await
            .unwrap()
            .expect("the lease is free");
        let far = now + chrono::Duration::days(1);
        // The lease must outlast the tail of work started at the last moment, even by a
        // clock `2 S` ahead of ours.
        let last = lease.until() - h.svc.policy.sweep_tail() - chrono::Duration::seconds(4);
        assert!(last > now);
        h.clock
            .advance(last - now - chrono::Duration::milliseconds(1));
        assert!(lease.may_start(&h.svc, far));
        h.clock.advance(chrono::Duration::milliseconds(1));
        assert!(!lease.may_start(&h.svc, far));
        // Nor past the run's own deadline.
        assert_eq!(lease.start_deadline(&h.svc.policy, now), now);
    }

    #[tokio::test]
    async fn a_renewal_that_committed_unbeknown_to_the_run_does_not_lose_it_the_lease() {
        let h = Harness::new();
        let lease = SweepLease::take(&h.svc, LeaseHolder::new(HolderKind::Sweep), h.clock.now())
            .await
            .unwrap()
            .expect("the lease is free");
        h.clock.advance(chrono::Duration::seconds(30));
        h.ledger.commit_next_sweep_write_then_time_out();
        lease.renew(&h.svc).await;
        // The next write conflicts with the run's own earlier one: it names this run,
        // so the run writes again on its ETag and keeps the lease.
        h.clock.advance(chrono::Duration::seconds(30));
        lease.renew(&h.svc).await;
        assert!(!lease.lost());
        let stored = h.ledger.sweep_state().await.unwrap().unwrap().value;
        assert_eq!(stored.until, Some(lease.until()));
        assert_eq!(
            lease.until(),
            h.clock.now()
                + h.svc
                    .policy
                    .sweep_lease_grant()
                    .min(lease.cap - h.clock.now())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweeps_wait_for_a_budget_turn_ends_with_its_time_to_start_work() {
        let h = Harness::new();
        h.clock.follow_tokio_time();
        let now = h.clock.now();
        let lease = SweepLease::take(&h.svc, LeaseHolder::new(HolderKind::Sweep), now)
            .await
            .unwrap()
            .expect("the lease is free");
        let device = SweepDevice {
            inner: h.svc.device.clone(),
            clock: h.svc.clock.clone(),
            lease: Arc::new(lease),
            policy: h.svc.policy,
            deadline: now + chrono::Duration::seconds(10),
        };
        // A turn that would come only after a minute: refused at the run's deadline.
        h.device.set_turn_wait(std::time::Duration::from_secs(60));
        let turn = device.reserve_put().await;
        assert!(
            matches!(
                turn,
                Err(DeviceError::Transient {
                    unanswered: false,
                    ..
                })
            ),
            "{turn:?}"
        );
        assert_eq!(h.clock.now(), now + chrono::Duration::seconds(10));
        // Past it: refused at once, without asking the budget.
        h.clock.advance(chrono::Duration::seconds(1));
        let asked = h.device.reservations();
        assert!(device.reserve_put().await.is_err());
        assert_eq!(h.device.reservations(), asked);
        assert_eq!(h.clock.now(), now + chrono::Duration::seconds(11));
    }

    #[tokio::test]
    async fn the_reconciling_pass_resumes_at_the_first_record_it_could_not_file() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 500;
        unindexed_pending(&h, 40).await;
        // The slice comes in device order: only the first device's shard can be filed.
        let mut ids: Vec<String> = (0..40).map(|i| format!("d{i}")).collect();
        ids.sort();
        let first = due_index::shard_of(&h.id(&ids[0]));
        h.ledger
            .fail_due_filing((0..SHARDS).filter(|s| *s != first));
        run(&h.svc).await.unwrap();
        h.ledger.fail_due_filing([]);
        run(&h.svc).await.unwrap();
        // Every pending record is covered (S6), the ones after the first failure too.
        let entries = index_entries(&h).await;
        for id in &ids {
            let due = h.svc.policy.sweep_due(&h.ledger_record(id).await);
            assert!(
                entries
                    .iter()
                    .any(|e| e.device_id.as_str() == id && Some(e.due_at) <= due),
                "{id} has no entry at or before {due:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_reconciling_pass_files_its_slice_in_one_transaction_per_shard_and_hundred() {
        let mut h = Harness::new();
        h.svc.policy.reconcile_rows_per_run = 500;
        unindexed_pending(&h, 300).await;
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.reconciled, 300, "{report}");
        let batches = h.ledger.due_batches();
        assert_eq!(batches.iter().sum::<usize>(), 300);
        assert!(
            batches.len() <= 2 * usize::from(SHARDS) && batches.iter().all(|n| *n <= 100),
            "{batches:?}"
        );
        assert_eq!(index_entries(&h).await.len(), 300);
        let state = h.ledger.sweep_state().await.unwrap().unwrap().value;
        assert!(state.reconciled_at.is_some() && state.holder.is_none());
    }
}
