//! In-memory ports for fast unit tests of the functions' decisions and races.
//! The integration tests run the same code against Azurite and loopback servers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Duration, TimeZone, Utc};

use crate::domain::due_index::{self, DueEntry};
use crate::domain::history::{self, HistoryEntry};
use crate::domain::notification::Notification;
use crate::domain::schedule::Backoff;
use crate::domain::sweep_state::SweepState;
use crate::domain::{DesiredState, DeviceId, IdempotencyKey, MinSoc, RequestId};
use crate::ports::*;

use super::{Policy, Services};

type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

#[derive(Default)]
struct DeviceState {
    online: HashMap<String, bool>,
    /// How devices nobody configured behave: `None` = unknown to the device cloud.
    default_online: Option<bool>,
    rejected: HashMap<String, String>,
    transient: HashMap<String, u32>,
    puts: HashMap<String, Vec<(u8, String)>>,
    status_calls: usize,
    put_calls: usize,
    hooks: HashMap<String, Hook>,
    latency: std::time::Duration,
    status_latency: std::time::Duration,
    /// Devices whose next PUT lands and is answered `502` (outcome unknown to the caller).
    unknown_next: std::collections::HashSet<String>,
    /// The `minSoc` each battery reports: the last value that landed, or one set behind
    /// the service's back ([`FakeDevice::set_reported`]).
    reported: HashMap<String, u8>,
    /// Batteries that keep reporting their old value after a PUT lands (slow to take it).
    lagging: std::collections::HashSet<String>,
    /// Budget turns asked for ([`DeviceApi::reserve_put`]), and whether they are refused.
    reservations: usize,
    refuse_turns: bool,
    /// How long each budget turn takes to come (tokio time).
    turn_wait: std::time::Duration,
    /// The `Retry-After` of the transient answers [`FakeDevice::fail_transiently`] makes.
    retry_after: Option<std::time::Duration>,
}

#[derive(Clone, Default)]
pub struct FakeDevice(Arc<Mutex<DeviceState>>);

impl FakeDevice {
    pub fn set_online(&self, id: &str, online: bool) {
        self.0.lock().unwrap().online.insert(id.into(), online);
    }
    /// Makes every device nobody configured known, online or offline.
    pub fn set_default_online(&self, online: bool) {
        self.0.lock().unwrap().default_online = Some(online);
    }
    pub fn forget(&self, id: &str) {
        self.0.lock().unwrap().online.remove(id);
    }
    pub fn reject(&self, id: &str, reason: &str) {
        self.0
            .lock()
            .unwrap()
            .rejected
            .insert(id.into(), reason.into());
    }
    /// The next `n` calls for `id` fail with a transient error.
    pub fn fail_transiently(&self, id: &str, n: u32) {
        self.0.lock().unwrap().transient.insert(id.into(), n);
    }
    /// The next PUT for `id` lands, but its answer is a gateway's `502`: to the caller
    /// its outcome is unknown.
    pub fn fail_next_put_unknown(&self, id: &str) {
        self.0.lock().unwrap().unknown_next.insert(id.into());
    }
    /// Every budget turn asked for from now on is refused, as a device-call budget with
    /// no turn left in its wait would ([`crate::adapters::device_budget`]).
    pub fn refuse_budget_turns(&self) {
        self.0.lock().unwrap().refuse_turns = true;
    }
    /// The transient answers of [`FakeDevice::fail_transiently`] ask to wait `after`.
    pub fn set_retry_after(&self, after: std::time::Duration) {
        self.0.lock().unwrap().retry_after = Some(after);
    }
    /// Each budget turn comes only after `wait` (a busy device-call budget).
    pub fn set_turn_wait(&self, wait: std::time::Duration) {
        self.0.lock().unwrap().turn_wait = wait;
    }
    /// How many budget turns were asked for.
    pub fn reservations(&self) -> usize {
        self.0.lock().unwrap().reservations
    }
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.0.lock().unwrap().latency = latency;
    }
    /// The battery reports `min_soc` from now on, as if set behind the service's back
    /// (an installer tool, the vendor's optimiser).
    pub fn set_reported(&self, id: &str, min_soc: u8) {
        self.0.lock().unwrap().reported.insert(id.into(), min_soc);
    }
    /// PUTs to `id` land but the battery goes on reporting its old value (until
    /// [`FakeDevice::set_reported`]).
    pub fn set_lagging(&self, id: &str) {
        self.0.lock().unwrap().lagging.insert(id.into());
    }
    /// Every status call takes `latency` (tokio time).
    pub fn set_status_latency(&self, latency: std::time::Duration) {
        self.0.lock().unwrap().status_latency = latency;
    }
    /// Runs `hook` while the next PUT for `id` is in flight (before it lands).
    pub fn on_next_put(
        &self,
        id: &str,
        hook: impl FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static,
    ) {
        self.0
            .lock()
            .unwrap()
            .hooks
            .insert(id.into(), Box::new(hook));
    }
    /// Successful PUTs, in order: (minSoc, idempotency key).
    pub fn puts(&self, id: &str) -> Vec<(u8, String)> {
        self.0
            .lock()
            .unwrap()
            .puts
            .get(id)
            .cloned()
            .unwrap_or_default()
    }
    pub fn calls(&self) -> (usize, usize) {
        let s = self.0.lock().unwrap();
        (s.status_calls, s.put_calls)
    }
    fn take_transient(&self, id: &str) -> bool {
        let mut s = self.0.lock().unwrap();
        match s.transient.get_mut(id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

#[async_trait]
impl DeviceApi for FakeDevice {
    async fn reserve_put(&self) -> Result<(), DeviceError> {
        let (refused, wait) = {
            let mut s = self.0.lock().unwrap();
            s.reservations += 1;
            (s.refuse_turns, s.turn_wait)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        if refused {
            return Err(DeviceError::not_sent("device-call budget: no turn free"));
        }
        Ok(())
    }

    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        let latency = {
            let mut s = self.0.lock().unwrap();
            s.status_calls += 1;
            s.status_latency
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if self.take_transient(device.as_str()) {
            return Err(DeviceError::Transient {
                reason: "503".into(),
                retry_after: None,
                unanswered: false,
            });
        }
        let s = self.0.lock().unwrap();
        match s.online.get(device.as_str()).copied().or(s.default_online) {
            None => Err(DeviceError::UnknownDevice),
            Some(online) => Ok(DeviceStatus {
                online,
                min_soc: s.reported.get(device.as_str()).copied(),
            }),
        }
    }

    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        let (hook, latency) = {
            let mut s = self.0.lock().unwrap();
            s.put_calls += 1;
            (s.hooks.remove(device.as_str()), s.latency)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if let Some(hook) = hook {
            hook().await;
        }
        if self.take_transient(device.as_str()) {
            return Err(DeviceError::Transient {
                reason: "503".into(),
                retry_after: self.0.lock().unwrap().retry_after,
                unanswered: false,
            });
        }
        let mut s = self.0.lock().unwrap();
        if let Some(reason) = s.rejected.get(device.as_str()) {
            return Err(DeviceError::Rejected(reason.clone()));
        }
        match s.online.get(device.as_str()).copied().or(s.default_online) {
            None => Err(DeviceError::UnknownDevice),
            Some(false) => Err(DeviceError::Offline),
            Some(true) => {
                s.puts
                    .entry(device.to_string())
                    .or_default()
                    .push((min_soc.percent(), request_id.to_string()));
                if !s.lagging.contains(device.as_str()) {
                    s.reported.insert(device.to_string(), min_soc.percent());
                }
                if s.unknown_next.remove(device.as_str()) {
                    return Err(DeviceError::Transient {
                        reason: "device API error (HTTP 502)".into(),
                        retry_after: None,
                        unanswered: true,
                    });
                }
                Ok(())
            }
        }
    }
}

/// One `send_batch`: the clock's reading when it was sent, and its messages'
/// scheduled delivery times.
pub type BatchSent = (DateTime<Utc>, Vec<Option<DateTime<Utc>>>);

/// The event topic: keeps every batch it accepted, in order; can be down.
#[derive(Clone, Default)]
pub struct FakeNotifier {
    received: Arc<Mutex<Vec<Notification>>>,
    down: Arc<Mutex<bool>>,
    attempts: Arc<Mutex<usize>>,
}

impl FakeNotifier {
    /// Every event accepted, in arrival order (repeats included).
    pub fn received(&self) -> Vec<Notification> {
        self.received.lock().unwrap().clone()
    }
    /// The ids of [`FakeNotifier::received`].
    pub fn ids(&self) -> Vec<String> {
        self.received().into_iter().map(|n| n.id).collect()
    }
    pub fn set_down(&self, down: bool) {
        *self.down.lock().unwrap() = down;
    }
    /// Publish requests made (accepted or not).
    pub fn attempts(&self) -> usize {
        *self.attempts.lock().unwrap()
    }
}

#[async_trait]
impl Notifier for FakeNotifier {
    async fn publish(&self, events: &[Notification]) -> Result<(), NotifyError> {
        *self.attempts.lock().unwrap() += 1;
        if *self.down.lock().unwrap() {
            return Err(NotifyError::Unavailable {
                reason: "HTTP 503".into(),
                retry_after: None,
            });
        }
        self.received.lock().unwrap().extend_from_slice(events);
        Ok(())
    }
}

#[derive(Clone, Default)]
pub struct FakeQueue {
    sent: Arc<Mutex<Vec<OutgoingMessage>>>,
    batches: Arc<Mutex<Vec<usize>>>,
    down: Arc<Mutex<bool>>,
    /// The clock reading at each `send_batch`, with its messages' scheduled times.
    batch_times: Arc<Mutex<Vec<BatchSent>>>,
    clock: Arc<Mutex<Option<FakeClock>>>,
    latency: Arc<Mutex<std::time::Duration>>,
}

impl FakeQueue {
    pub fn sent(&self) -> Vec<OutgoingMessage> {
        self.sent.lock().unwrap().clone()
    }
    /// The size of each batch sent with `send_batch`, in order.
    pub fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
    pub fn set_down(&self, down: bool) {
        *self.down.lock().unwrap() = down;
    }
    /// Every send takes `latency` (tokio time).
    pub fn set_latency(&self, latency: std::time::Duration) {
        *self.latency.lock().unwrap() = latency;
    }
    /// Each `send_batch`: the clock's reading when it was sent, and its messages'
    /// scheduled delivery times.
    pub fn batch_times(&self) -> Vec<BatchSent> {
        self.batch_times.lock().unwrap().clone()
    }
    async fn pause(&self) {
        let latency = *self.latency.lock().unwrap();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
    /// Takes the messages sent so far (what [`FakeQueue::sent`] lists), leaving none:
    /// for long runs that deliver them and must not keep them all.
    pub fn take_sent(&self) -> Vec<OutgoingMessage> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

#[async_trait]
impl SettingsQueue for FakeQueue {
    async fn send(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        self.pause().await;
        if *self.down.lock().unwrap() {
            return Err(QueueError::Status {
                status: 503,
                code: None,
            });
        }
        self.sent.lock().unwrap().push(message.clone());
        Ok(())
    }

    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<(), QueueError> {
        if let Some(clock) = self.clock.lock().unwrap().as_ref() {
            let at = messages.iter().map(|m| m.scheduled_at).collect();
            self.batch_times.lock().unwrap().push((clock.now(), at));
        }
        self.pause().await;
        if *self.down.lock().unwrap() {
            return Err(QueueError::Status {
                status: 503,
                code: None,
            });
        }
        self.batches.lock().unwrap().push(messages.len());
        self.sent.lock().unwrap().extend(messages.iter().cloned());
        Ok(())
    }
}

#[derive(Default)]
struct LedgerState {
    rows: HashMap<String, (DesiredState, u64)>,
    /// Record reads ([`Ledger::get`]) so far.
    reads: usize,
    idem: HashMap<(String, String), (IdempotencyRecord, u64)>,
    next: u64,
    down: bool,
    /// Devices whose `desired` row exists but does not read (`StoreError::Corrupt`).
    corrupt: HashMap<String, CorruptRow>,
    /// History entries by device, then request id, written with the record as the
    /// Table ledger does (see `domain::history`).
    history: HashMap<String, HashMap<String, HistoryEntry>>,
    /// The due index by (partition key, row key), as the Table ledger keeps it.
    due: BTreeMap<(String, String), (DueEntry, u64)>,
    sweep: Option<(SweepState, u64)>,
    /// Each device's anchor row ETag (`Ledger::anchor`).
    anchors: HashMap<String, u64>,
    /// Set by [`FakeLedger::defer_next_accept`]: the next accept times out and its
    /// write is kept here, to commit (or not) when the test says.
    defer_next_accept: bool,
    deferred: Option<DeferredAccept>,
    /// Set by [`FakeLedger::commit_next_accept_then_time_out`].
    commit_then_time_out: bool,
    /// Set by [`FakeLedger::commit_next_accept_then_time_out_replaced_by`].
    replaced_after_commit: Option<MinSoc>,
    /// Set by [`FakeLedger::commit_next_put_then_time_out`].
    put_commit_then_time_out: bool,
    /// Set by [`FakeLedger::time_out_next_put_and_go_down`].
    put_time_out_and_go_down: bool,
    /// Set by [`FakeLedger::lose_next_put_while_another_writes`].
    put_lost_while_another_writes: bool,
    /// Set by [`FakeLedger::race_next_puts`] and [`FakeLedger::race_next_accept`].
    puts_raced: usize,
    accept_raced: bool,
    /// Set by [`FakeLedger::defer_next_accept_and_go_down`].
    down_after_accept: bool,
    /// How long every operation takes ([`FakeLedger::set_latency`]).
    latency: std::time::Duration,
    /// Shards of the due index that cannot be listed ([`FakeLedger::fail_due_listing`])
    /// or filed in a batch ([`FakeLedger::fail_due_filing`]).
    unlisted_shards: std::collections::HashSet<u8>,
    unfiled_shards: std::collections::HashSet<u8>,
    /// Set by [`FakeLedger::commit_next_sweep_write_then_time_out`].
    sweep_commit_then_time_out: bool,
    /// The size of each `file_due_batch`, in order.
    due_batches: Vec<usize>,
    /// Every sweep state written, in order.
    sweep_writes: Vec<SweepState>,
    /// The devices' outboxes, by device and `seq`.
    outbox: BTreeMap<(String, u64), Notification>,
}

/// An accepting write that timed out at its caller and is still in flight.
#[derive(Clone)]
struct DeferredAccept {
    state: DesiredState,
    replaced: Option<HistoryEntry>,
    key: Option<(IdempotencyRecord, Option<ETag>)>,
    on: Precondition,
    events: Vec<Notification>,
}

impl LedgerState {
    /// Whether `on` still holds.
    fn holds(&self, device: &str, on: &Precondition) -> bool {
        match on {
            Precondition::Record(e) => self
                .rows
                .get(device)
                .is_some_and(|(_, n)| n.to_string() == e.0),
            Precondition::Anchor(e) => {
                !self.rows.contains_key(device)
                    && self
                        .anchors
                        .get(device)
                        .is_some_and(|n| n.to_string() == e.0)
            }
        }
    }

    /// The accepting transaction: all or nothing.
    /// Another writer rewrites `device`'s record as it was (or, with none, touches its
    /// anchor): a new ETag, the same contents, so a write conditional on the old one
    /// conflicts.
    fn written_by_another(&mut self, device: &str) {
        self.next += 1;
        let n = self.next;
        match self.rows.get_mut(device) {
            Some(row) => row.1 = n,
            None => {
                self.anchors.insert(device.to_string(), n);
            }
        }
    }

    fn accept(&mut self, a: &DeferredAccept) -> Result<ETag, StoreError> {
        let device = a.state.device_id.to_string();
        if self.corrupt.contains_key(&device) || !self.holds(&device, &a.on) {
            return Err(StoreError::Conflict);
        }
        if let Some((record, replaces)) = &a.key {
            let k = (device.clone(), record.key.as_str().to_string());
            check(self.idem.get(&k), replaces.as_ref())?;
            self.next += 1;
            let n = self.next;
            self.idem.insert(k, (record.clone(), n));
        }
        if let Precondition::Anchor(_) = a.on {
            self.next += 1;
            let n = self.next;
            self.anchors.insert(device.clone(), n);
        }
        let expected = match &a.on {
            Precondition::Record(e) => Some(e),
            Precondition::Anchor(_) => None,
        };
        let etag = self.write(&a.state, a.replaced.as_ref(), expected, &a.events)?;
        if a.state.prunes_history() {
            self.prune(&a.state.device_id, &a.state.request_id);
            let cutoff = a.state.requested_at - crate::domain::IDEMPOTENCY_KEY_RETENTION;
            self.idem
                .retain(|(d, _), (r, _)| *d != device || r.created_at >= cutoff);
        }
        Ok(etag)
    }

    /// One atomic write: the record, its request's entry, the `replaced` entry and the
    /// outbox rows of `events`.
    fn write(
        &mut self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        expected: Option<&ETag>,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        if self.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        if self.corrupt.contains_key(state.device_id.as_str()) {
            // The unreadable row's ETag was never handed out: no write can match it.
            return Err(StoreError::Conflict);
        }
        check(self.rows.get(state.device_id.as_str()), expected)?;
        self.next += 1;
        let n = self.next;
        self.rows
            .insert(state.device_id.to_string(), (state.clone(), n));
        self.keep_entry(HistoryEntry::of(state));
        if let Some(entry) = replaced {
            self.keep_entry(entry.clone());
        }
        for event in events {
            self.outbox
                .insert((event.device_id.to_string(), event.seq), event.clone());
        }
        Ok(ETag(n.to_string()))
    }

    fn keep_entry(&mut self, entry: HistoryEntry) {
        let device = entry.request.device_id.as_str();
        let entries = match self.history.get_mut(device) {
            Some(entries) => entries,
            None => self.history.entry(device.to_string()).or_default(),
        };
        entries.insert(entry.request.request_id.to_string(), entry);
    }

    /// Drops the device's entries beyond the bound, never the request it holds.
    fn prune(&mut self, device: &DeviceId, keep: &RequestId) {
        let Some(entries) = self.history.get_mut(device.as_str()) else {
            return;
        };
        let listed: Vec<_> = entries
            .values()
            .map(|e| (e.request.request_id.clone(), e.request.requested_at))
            .collect();
        for id in history::beyond_limit(listed, keep) {
            entries.remove(id.as_str());
        }
    }
}

#[derive(Clone, Default)]
pub struct FakeLedger(Arc<Mutex<LedgerState>>);

impl FakeLedger {
    pub fn set_down(&self, down: bool) {
        self.0.lock().unwrap().down = down;
    }
    /// Listing these shards of the due index fails as if the storage were unavailable
    /// (the rest of the ledger answers).
    pub fn fail_due_listing(&self, shards: impl IntoIterator<Item = u8>) {
        self.0.lock().unwrap().unlisted_shards = shards.into_iter().collect();
    }
    /// The next sweep-state write commits, but its caller hears `Unavailable`.
    pub fn commit_next_sweep_write_then_time_out(&self) {
        self.0.lock().unwrap().sweep_commit_then_time_out = true;
    }
    /// Batch filings ([`Ledger::file_due_batch`]) into these shards fail as if the
    /// storage were unavailable.
    pub fn fail_due_filing(&self, shards: impl IntoIterator<Item = u8>) {
        self.0.lock().unwrap().unfiled_shards = shards.into_iter().collect();
    }
    /// Every operation takes `latency` (tokio time) before it takes effect.
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.0.lock().unwrap().latency = latency;
    }
    async fn pause(&self) {
        let latency = self.0.lock().unwrap().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
    /// The size of each batch filing of the due index, in order.
    pub fn due_batches(&self) -> Vec<usize> {
        self.0.lock().unwrap().due_batches.clone()
    }
    /// Every sweep state written (taking, renewing and releasing the lease), in order.
    pub fn sweep_writes(&self) -> Vec<SweepState> {
        self.0.lock().unwrap().sweep_writes.clone()
    }
    /// Record reads ([`Ledger::get`]) so far.
    pub fn reads(&self) -> usize {
        self.0.lock().unwrap().reads
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().rows.len()
    }
    /// Makes the device's row unreadable, as a row written by another schema would be.
    pub fn corrupt(&self, device: &str, reason: &str) {
        let mut s = self.0.lock().unwrap();
        s.rows.remove(device);
        s.corrupt.insert(
            device.to_string(),
            CorruptRow {
                partition_key: device.to_string(),
                row_key: "desired".into(),
                reason: reason.to_string(),
            },
        );
    }
    /// The next `accept` answers a timeout; its write stays in flight until
    /// [`FakeLedger::land_deferred`] commits it (if its precondition still holds).
    pub fn defer_next_accept(&self) {
        self.0.lock().unwrap().defer_next_accept = true;
    }
    /// Like [`FakeLedger::defer_next_accept`], and the storage is down from then on.
    pub fn defer_next_accept_and_go_down(&self) {
        let mut s = self.0.lock().unwrap();
        s.defer_next_accept = true;
        s.down_after_accept = true;
    }
    /// The next `accept` commits, and its caller hears a timeout.
    pub fn commit_next_accept_then_time_out(&self) {
        self.0.lock().unwrap().commit_then_time_out = true;
    }
    /// The next `put` commits, and its caller hears a timeout.
    pub fn commit_next_put_then_time_out(&self) {
        self.0.lock().unwrap().put_commit_then_time_out = true;
    }
    /// The next `put` answers a timeout without committing, and the storage is down
    /// from then on: nobody can tell the caller what became of it.
    pub fn time_out_next_put_and_go_down(&self) {
        self.0.lock().unwrap().put_time_out_and_go_down = true;
    }
    /// As [`FakeLedger::commit_next_accept_then_time_out`], and before its caller can
    /// look, another POST's accepting write replaces it with a request for `min_soc`.
    pub fn commit_next_accept_then_time_out_replaced_by(&self, min_soc: u8) {
        let mut s = self.0.lock().unwrap();
        s.commit_then_time_out = true;
        s.replaced_after_commit = Some(MinSoc::new(min_soc).unwrap());
    }
    /// The next `n` record writes each lose a race: another writer rewrites the record
    /// as it was just before (a new ETag, the same contents), so they conflict.
    pub fn race_next_puts(&self, n: usize) {
        self.0.lock().unwrap().puts_raced = n;
    }
    /// The next accepting write loses a race: another writer changed the device's
    /// record (or anchor) just before, so it conflicts.
    pub fn race_next_accept(&self) {
        self.0.lock().unwrap().accept_raced = true;
    }
    /// The next `put` answers a timeout without committing, and meanwhile another
    /// writer rewrote the record as it was (a new ETag, the same contents).
    pub fn lose_next_put_while_another_writes(&self) {
        self.0.lock().unwrap().put_lost_while_another_writes = true;
    }
    /// Commits the accepting write kept by [`FakeLedger::defer_next_accept`] now, as a
    /// write delayed in the network would: only if its precondition still holds.
    pub fn land_deferred(&self) -> Result<ETag, StoreError> {
        let mut s = self.0.lock().unwrap();
        let a = s.deferred.take().expect("no accepting write in flight");
        s.accept(&a)
    }
    /// Every event in every outbox, by device and `seq`.
    pub fn outboxes(&self) -> Vec<Notification> {
        self.0.lock().unwrap().outbox.values().cloned().collect()
    }
    /// No desired-state record and no idempotency record.
    pub fn is_empty(&self) -> bool {
        let s = self.0.lock().unwrap();
        s.rows.is_empty() && s.idem.is_empty()
    }
}

fn check<T>(slot: Option<&(T, u64)>, expected: Option<&ETag>) -> Result<(), StoreError> {
    match (slot, expected) {
        (None, None) => Ok(()),
        (Some((_, v)), Some(e)) if v.to_string() == e.0 => Ok(()),
        _ => Err(StoreError::Conflict),
    }
}

#[async_trait]
impl Ledger for FakeLedger {
    async fn get(&self, device: &DeviceId) -> Result<Option<Versioned<DesiredState>>, StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        s.reads += 1;
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        if let Some(corrupt) = s.corrupt.get(device.as_str()) {
            return Err(StoreError::Corrupt(corrupt.clone()));
        }
        Ok(s.rows.get(device.as_str()).map(|(v, n)| Versioned {
            value: v.clone(),
            etag: ETag(n.to_string()),
        }))
    }

    async fn put(
        &self,
        state: &DesiredState,
        expected: Option<&ETag>,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if std::mem::take(&mut s.put_time_out_and_go_down) {
            s.down = true;
            return Err(StoreError::Unavailable("timed out".into()));
        }
        if s.puts_raced > 0 {
            s.puts_raced -= 1;
            s.written_by_another(state.device_id.as_str());
            return Err(StoreError::Conflict);
        }
        if std::mem::take(&mut s.put_lost_while_another_writes) {
            s.written_by_another(state.device_id.as_str());
            return Err(StoreError::Unavailable("timed out".into()));
        }
        let etag = s.write(state, None, expected, events)?;
        if std::mem::take(&mut s.put_commit_then_time_out) {
            return Err(StoreError::Unavailable("timed out".into()));
        }
        Ok(etag)
    }

    async fn anchor(&self, device: &DeviceId) -> Result<ETag, StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        let n = match s.anchors.get(device.as_str()) {
            Some(n) => *n,
            None => {
                s.next += 1;
                let n = s.next;
                s.anchors.insert(device.to_string(), n);
                n
            }
        };
        Ok(ETag(n.to_string()))
    }

    async fn accept(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        key: Option<KeyWrite<'_>>,
        on: &Precondition,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        if std::mem::take(&mut s.accept_raced) {
            s.written_by_another(state.device_id.as_str());
            return Err(StoreError::Conflict);
        }
        let write = DeferredAccept {
            state: state.clone(),
            replaced: replaced.cloned(),
            key: key.map(|k| (k.record.clone(), k.replaces.cloned())),
            on: on.clone(),
            events: events.to_vec(),
        };
        if std::mem::take(&mut s.commit_then_time_out) {
            let etag = s.accept(&write)?;
            if let Some(min_soc) = s.replaced_after_commit.take() {
                let ttl = state.expires_at - state.requested_at;
                let newer = DesiredState::accept(
                    state.device_id.clone(),
                    min_soc,
                    state.requested_at,
                    ttl,
                    Some(state),
                );
                let replaced = HistoryEntry::replaced(state, &newer.request_id, state.requested_at);
                s.accept(&DeferredAccept {
                    state: newer,
                    replaced: Some(replaced),
                    key: None,
                    on: Precondition::Record(etag),
                    events: Vec::new(),
                })?;
            }
            return Err(StoreError::Unavailable("timed out".into()));
        }
        if std::mem::take(&mut s.defer_next_accept) {
            s.deferred = Some(write);
            s.down = std::mem::take(&mut s.down_after_accept);
            return Err(StoreError::Unavailable("timed out".into()));
        }
        s.accept(&write)
    }

    async fn fence(&self, device: &DeviceId, on: &Precondition) -> Result<(), StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        if !s.holds(device.as_str(), on) {
            return Err(StoreError::Conflict);
        }
        s.next += 1;
        let n = s.next;
        match on {
            Precondition::Record(_) => {
                if let Some(row) = s.rows.get_mut(device.as_str()) {
                    row.1 = n;
                }
            }
            Precondition::Anchor(_) => {
                s.anchors.insert(device.to_string(), n);
            }
        }
        Ok(())
    }

    async fn outbox(&self, device: &DeviceId) -> Result<Vec<Notification>, StoreError> {
        self.pause().await;
        let s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        Ok(s.outbox
            .range((device.to_string(), 0)..=(device.to_string(), u64::MAX))
            .map(|(_, n)| n.clone())
            .collect())
    }

    async fn remove_outbox(&self, device: &DeviceId, seqs: &[u64]) -> Result<(), StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        for seq in seqs {
            s.outbox.remove(&(device.to_string(), *seq));
        }
        Ok(())
    }

    async fn history_entry(
        &self,
        device: &DeviceId,
        request: &RequestId,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        self.pause().await;
        let s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        Ok(s.history
            .get(device.as_str())
            .and_then(|entries| entries.get(request.as_str()))
            .cloned())
    }

    async fn pending_after(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<(PendingPage, Option<DeviceId>), StoreError> {
        self.pause().await;
        let s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        let after = after.map(|d| d.as_str()).unwrap_or("");
        // Device order, readable and unreadable rows together, as the Table lists them.
        // Chosen and sorted by reference, so that only the page is copied.
        type Row<'a> = (&'a String, Result<&'a (DesiredState, u64), &'a CorruptRow>);
        let mut rows: Vec<Row> = s
            .rows
            .iter()
            .filter(|(d, (v, _))| d.as_str() > after && v.is_pending())
            .map(|(d, row)| (d, Ok(row)))
            .chain(
                s.corrupt
                    .iter()
                    .filter(|(d, _)| d.as_str() > after)
                    .map(|(d, c)| (d, Err(c))),
            )
            .collect();
        let more = rows.len() > limit;
        if more {
            // The `limit` first devices, in any order (a device has one row).
            rows.select_nth_unstable_by(limit, |a, b| a.0.cmp(b.0));
            rows.truncate(limit);
        }
        rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let next = more
            .then(|| rows.last().and_then(|(d, _)| DeviceId::parse(d).ok()))
            .flatten();
        let mut page = PendingPage::default();
        for (_, row) in rows {
            match row {
                Ok((v, n)) => page.records.push(Versioned {
                    value: v.clone(),
                    etag: ETag(n.to_string()),
                }),
                Err(c) => page.corrupt.push(c.clone()),
            }
        }
        Ok((page, next))
    }

    async fn file_due(&self, entry: &DueEntry) -> Result<(), StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        s.next += 1;
        let n = s.next;
        s.due
            .insert((entry.partition_key(), entry.row_key()), (entry.clone(), n));
        Ok(())
    }

    async fn file_due_batch(&self, entries: &[DueEntry]) -> Result<(), StoreError> {
        self.pause().await;
        assert!(
            entries.len() <= due_index::MAX_BATCH
                && entries.iter().all(|e| e.shard() == entries[0].shard()),
            "a batch filing holds at most {} entries of one shard",
            due_index::MAX_BATCH
        );
        let mut s = self.0.lock().unwrap();
        if s.down || s.unfiled_shards.contains(&entries[0].shard()) {
            return Err(StoreError::Unavailable("down".into()));
        }
        s.due_batches.push(entries.len());
        for entry in entries {
            s.next += 1;
            let n = s.next;
            s.due
                .insert((entry.partition_key(), entry.row_key()), (entry.clone(), n));
        }
        Ok(())
    }

    async fn due_entries(
        &self,
        shard: u8,
        until: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<Versioned<DueEntry>>, StoreError> {
        self.pause().await;
        let s = self.0.lock().unwrap();
        if s.down || s.unlisted_shards.contains(&shard) {
            return Err(StoreError::Unavailable("down".into()));
        }
        let partition = due_index::partition_key(shard);
        let bound = due_index::row_key_bound(until);
        Ok(s.due
            .range((partition.clone(), String::new())..(partition, bound))
            .take(limit)
            .map(|(_, (e, n))| Versioned {
                value: e.clone(),
                etag: ETag(n.to_string()),
            })
            .collect())
    }

    async fn unfile_due(&self, entry: &DueEntry, etag: Option<&ETag>) -> Result<(), StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        let key = (entry.partition_key(), entry.row_key());
        match s.due.get(&key) {
            None => Ok(()),
            Some((_, n)) if etag.map_or(true, |e| n.to_string() == e.0) => {
                s.due.remove(&key);
                Ok(())
            }
            Some(_) => Err(StoreError::Conflict),
        }
    }

    async fn sweep_state(&self) -> Result<Option<Versioned<SweepState>>, StoreError> {
        self.pause().await;
        let s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        Ok(s.sweep.as_ref().map(|(v, n)| Versioned {
            value: v.clone(),
            etag: ETag(n.to_string()),
        }))
    }

    async fn put_sweep_state(
        &self,
        state: &SweepState,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError> {
        self.pause().await;
        let mut s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        check(s.sweep.as_ref(), expected)?;
        s.next += 1;
        let n = s.next;
        s.sweep = Some((state.clone(), n));
        s.sweep_writes.push(state.clone());
        if std::mem::take(&mut s.sweep_commit_then_time_out) {
            return Err(StoreError::Unavailable("timed out (committed)".into()));
        }
        Ok(ETag(n.to_string()))
    }

    async fn get_idempotency(
        &self,
        device: &DeviceId,
        key: &IdempotencyKey,
    ) -> Result<Option<Versioned<IdempotencyRecord>>, StoreError> {
        self.pause().await;
        let s = self.0.lock().unwrap();
        if s.down {
            return Err(StoreError::Unavailable("down".into()));
        }
        let k = (device.to_string(), key.as_str().to_string());
        Ok(s.idem.get(&k).map(|(v, n)| Versioned {
            value: v.clone(),
            etag: ETag(n.to_string()),
        }))
    }
}

/// A clock the test moves ([`FakeClock::advance`]); after [`FakeClock::follow_tokio_time`]
/// it also moves with tokio's time (paused in a test: virtual time that jumps while
/// every task waits, so slow fakes take their time without the test waiting).
#[derive(Clone)]
pub struct FakeClock(Arc<Mutex<(DateTime<Utc>, Option<tokio::time::Instant>)>>);

impl FakeClock {
    pub fn advance(&self, by: Duration) {
        self.0.lock().unwrap().0 += by;
    }
    /// From now on, the clock also moves with tokio's time.
    pub fn follow_tokio_time(&self) {
        self.0.lock().unwrap().1 = Some(tokio::time::Instant::now());
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        let (at, since) = *self.0.lock().unwrap();
        match since {
            Some(since) => at + Duration::from_std(since.elapsed()).unwrap_or_default(),
            None => at,
        }
    }
}

/// Services wired to fakes, with handles to steer and inspect them.
#[derive(Clone)]
pub struct Harness {
    pub svc: Services,
    pub device: FakeDevice,
    pub queue: FakeQueue,
    pub ledger: FakeLedger,
    pub clock: FakeClock,
    /// The event topic; the services publish to it only once [`Harness::notifying`].
    pub notifier: FakeNotifier,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub fn new() -> Self {
        let device = FakeDevice::default();
        let queue = FakeQueue::default();
        let ledger = FakeLedger::default();
        let clock = FakeClock(Arc::new(Mutex::new((
            Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
            None,
        ))));
        let policy = Policy {
            request_ttl: Duration::seconds(3600),
            backoff: Backoff {
                initial: Duration::seconds(60),
                max: Duration::seconds(600),
            },
            lease: Duration::seconds(15),
            put_window: Duration::seconds(5),
            device_timeout: Duration::seconds(1),
            max_clock_skew: Duration::zero(),
            wake_grace: Duration::seconds(60),
            drain_concurrency: 4,
            device_calls_per_second: 50.0,
            fleet_device_calls_per_second: 50.0,
            sweep_budget: super::SWEEP_BUDGET,
            sweep_max_due: 1000,
            sweep_fanout_above: 100,
            reconcile_rows_per_run: 1000,
            reconcile_budget: Duration::seconds(30),
            reconcile_interval: Duration::hours(24),
            events_answer_within: super::EVENTS_ANSWER_WITHIN,
            drift: super::DriftPolicy::Report,
        };
        *queue.clock.lock().unwrap() = Some(clock.clone());
        let svc = Services {
            device: Arc::new(device.clone()),
            queue: Arc::new(queue.clone()),
            ledger: Arc::new(ledger.clone()),
            clock: Arc::new(clock.clone()),
            notifier: None,
            policy,
        };
        Self {
            svc,
            device,
            queue,
            ledger,
            clock,
            notifier: FakeNotifier::default(),
        }
    }

    /// This harness with notifications on, published to [`Harness::notifier`].
    pub fn notifying(mut self) -> Self {
        self.svc.notifier = Some(Arc::new(self.notifier.clone()));
        self
    }

    pub fn id(&self, raw: &str) -> DeviceId {
        DeviceId::parse(raw).unwrap()
    }

    /// Writes a lease held by `holder` for `for_` into the device's stored record, as another
    /// invocation's lease-taking write would.
    pub async fn hold_lease(&self, device: &str, holder: &str, for_: Duration) {
        let mut held = self
            .ledger
            .get(&self.id(device))
            .await
            .unwrap()
            .expect("record");
        held.value.take_lease(
            &crate::domain::LeaseHolder::from_stored(holder),
            self.clock.now(),
            for_,
        );
        self.ledger
            .put(&held.value, Some(&held.etag), &[])
            .await
            .unwrap();
    }

    /// Every due-index entry, in every shard, whenever it is due.
    pub async fn index_entries(&self) -> Vec<DueEntry> {
        let far = self.clock.now() + Duration::days(3650);
        let mut all = Vec::new();
        for shard in 0..due_index::SHARDS {
            let listed = self.ledger.due_entries(shard, far, 10_000).await.unwrap();
            all.extend(listed.into_iter().map(|e| e.value));
        }
        all
    }

    /// While the next PUT to `device` is in flight, a newer request for `min_soc` is
    /// accepted (as a concurrent POST's write would), then `then` runs.
    pub fn accept_during_next_put(
        &self,
        device: &str,
        min_soc: u8,
        then: impl FnOnce(&Harness) + Send + 'static,
    ) {
        let h = self.clone();
        let device_id = device.to_string();
        self.device.on_next_put(device, move || {
            Box::pin(async move {
                accept_pending(&h, &device_id, min_soc).await;
                then(&h);
            })
        });
    }

    pub async fn ledger_record(&self, device: &str) -> DesiredState {
        self.ledger
            .get(&self.id(device))
            .await
            .unwrap()
            .expect("record")
            .value
    }
}

/// Writes a newly accepted pending request: the record and its due-index entry, as the
/// HTTP function does, but not its history entries (neither the new request's nor the
/// one it replaces, which `Ledger::accept` writes in the same transaction). Tests of
/// the history go through [`post_min_soc`] or `set_soc_http::handle`.
pub async fn accept_pending(h: &Harness, device: &str, min_soc: u8) -> DesiredState {
    loop {
        let current = h.ledger.get(&h.id(device)).await.unwrap();
        let mut rec = DesiredState::accept(
            h.id(device),
            MinSoc::new(min_soc).unwrap(),
            h.clock.now(),
            h.svc.policy.request_ttl,
            current.as_ref().map(|v| &v.value),
        );
        let stored = current.as_ref().map(|v| &v.value);
        let written =
            super::index::put_record(&h.svc, &mut rec, stored, current.as_ref().map(|v| &v.etag));
        match written.await {
            Ok(_) => return rec,
            Err(StoreError::Conflict) => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// POSTs `{"minSoc": min_soc}` through `SetSocHttp` and returns the response body.
pub async fn post_min_soc(h: &Harness, device: &str, min_soc: u8) -> serde_json::Value {
    let request = super::set_soc_http::ApiRequest {
        method: "POST".into(),
        device_id: device.into(),
        body: format!(r#"{{"minSoc":{min_soc}}}"#).into_bytes(),
        ..Default::default()
    };
    super::set_soc_http::handle(&h.svc, request)
        .await
        .body_json()
        .into_owned()
}
