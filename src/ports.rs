//! The traits the functions need from the outside world. Adapters in
//! [`crate::adapters`] implement them for Azure and the device cloud; tests may
//! implement them in memory.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::domain::due_index::DueEntry;
use crate::domain::history::HistoryEntry;
use crate::domain::notification::Notification;
use crate::domain::sweep_state::SweepState;
use crate::domain::{DesiredState, DeviceId, IdempotencyKey, MinSoc, RequestId};

// ---------------------------------------------------------------- device API

/// What `GET /devices/{id}` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub online: bool,
    pub min_soc: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// `409` on PUT: the device is offline; try again later.
    #[error("device is offline")]
    Offline,
    /// `404`: the device cloud does not know this device (permanent).
    #[error("unknown device")]
    UnknownDevice,
    /// `400`/`422`: the device cloud rejected the value (permanent).
    #[error("value rejected by the device cloud: {0}")]
    Rejected(String),
    /// `429`, `5xx`, timeouts, connection errors: try again, not before `retry_after` if given.
    #[error("device cloud unavailable: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
        /// The request went out and its outcome is unknown: no answer came back (a
        /// timeout, a broken connection) or the answer does not say (`408`, `500`,
        /// `502`, `503`, `504`). A PUT may have been applied, and may still land within
        /// the late-landing bound. `false` when the device cloud answered with a final
        /// status, or when nothing was sent (no connection, no budget turn).
        unanswered: bool,
    },
}

impl DeviceError {
    /// A transient failure of a call that was never sent (nothing can land).
    pub fn not_sent(reason: impl Into<String>) -> Self {
        Self::Transient {
            reason: reason.into(),
            retry_after: None,
            unanswered: false,
        }
    }

    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::UnknownDevice | Self::Rejected(_))
    }

    /// How long the device cloud asked to wait before the next call (`Retry-After` on a
    /// transient answer).
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The vendor's device cloud (contract in `docs/device-api.md`).
#[async_trait]
pub trait DeviceApi: Send + Sync {
    /// Waits for a turn to make one PUT under the device-call budget, and takes it.
    /// Called before the lease for that PUT is taken ([`crate::functions::apply`]), so
    /// the wait never eats the lease's PUT window; the PUT that follows then does not
    /// wait. An error (no turn within the budget's longest wait) means nothing was sent.
    /// Without a budget there is nothing to wait for.
    async fn reserve_put(&self) -> Result<(), DeviceError> {
        Ok(())
    }
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError>;
    /// [`DeviceApi::status`] only if the device-call budget has a turn free now (never
    /// waits for one; an error without sending anything if not): for reads that are
    /// worth making only when they cost nobody a PUT (the confirmation read after a PUT).
    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.status(device).await
    }
    /// `PUT /devices/{id}/settings/min-soc` with `Idempotency-Key: {request_id}`.
    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError>;
}

// ---------------------------------------------------------------- settings queue

/// The JSON body of a wake-up message. Its field names must not collide
/// (case-insensitively) with Service Bus metadata keys the handler reads
/// (`MessageId`, `DeliveryCount`): the host copies body properties into Metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeMessage {
    pub request_id: RequestId,
    pub device_id: String,
    pub min_soc: u8,
    pub requested_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// One send to the settings queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Unique per logical send; reused when that same send is retried, so the
    /// broker's duplicate detection drops a retry whose first try did land.
    pub message_id: String,
    pub body: WakeMessage,
    /// `ScheduledEnqueueTimeUtc`; `None` = deliver now.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// `TimeToLive`, counted from when the message becomes active.
    pub ttl: Duration,
}

/// Why a send to the settings queue failed. Texts name statuses and kinds only,
/// never the SDK's messages (which may carry URLs or bodies).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// Connection failed or timed out.
    #[error("settings queue unavailable: Service Bus could not be reached (connection failed or timed out)")]
    Unreachable,
    /// The broker answered with an error status (`code`: its error code, if any).
    #[error("settings queue unavailable: Service Bus answered HTTP {status}{}", code.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Status { status: u16, code: Option<String> },
    /// The send or the client could not be built here (serialisation, HTTP client,
    /// another SDK failure): a fault of this process, not of the broker.
    #[error("settings queue unavailable: {0}")]
    Local(String),
}

impl QueueError {
    /// Whether the same send may succeed later: no connection, `408`, `429`, `5xx`.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500..=599),
            Self::Local(_) => false,
        }
    }
}

#[async_trait]
pub trait SettingsQueue: Send + Sync {
    async fn send(&self, message: &OutgoingMessage) -> Result<(), QueueError>;
    /// Sends `messages` in one request where the broker allows it (Service Bus "Send
    /// Message Batch"). On an error any of them may have been sent: each is only a
    /// wake-up call that the ledger does not name yet, a no-op when delivered.
    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<(), QueueError> {
        for message in messages {
            self.send(message).await?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- ledger

/// Opaque optimistic-concurrency token (the storage ETag).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(pub String);

/// A stored value and the ETag it was read or written with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub etag: ETag,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The ETag did not match (someone else wrote first), or an insert found a row.
    #[error("concurrent update")]
    Conflict,
    /// The storage could not be used (network, 5xx, auth, throttling): try again later.
    #[error("state storage unavailable: {0}")]
    Unavailable(String),
    /// The row exists but does not read as a record (a field missing, of the wrong
    /// type or out of range). Trying again cannot help; the row needs a person.
    #[error(transparent)]
    Corrupt(#[from] CorruptRow),
}

impl StoreError {
    /// Whether trying again later may succeed (`Unavailable`), as opposed to a
    /// conflict to re-read or a row that will never read.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// A stored row that cannot be read as a record, and why. Names the row by its
/// keys only (the device id and row name), never its contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger row {partition_key}/{row_key} is unreadable: {reason}")]
pub struct CorruptRow {
    /// The device id the row is filed under (as stored; it may itself be the bad field).
    pub partition_key: String,
    pub row_key: String,
    pub reason: String,
}

/// One page of the pending listing: the records that read, and the rows that did
/// not. One unreadable row never hides the rest of its page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingPage {
    pub records: Vec<Versioned<DesiredState>>,
    pub corrupt: Vec<CorruptRow>,
}

impl PendingPage {
    /// Adds the rows of `other` to this page.
    pub fn extend(&mut self, other: PendingPage) {
        self.records.extend(other.records);
        self.corrupt.extend(other.corrupt);
    }
}

/// What an `Idempotency-Key` was first used for: the request it created. Written in
/// the same atomic write as that request ([`Ledger::accept`]), so a key names a
/// request exactly when the request is stored, and a retry answers from the request's
/// current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub device_id: DeviceId,
    pub key: IdempotencyKey,
    /// Canonical form of the request the key was first used with (e.g. `minSoc=35`).
    pub fingerprint: String,
    /// The request the key created.
    pub request_id: RequestId,
    pub created_at: DateTime<Utc>,
}

/// The key row an accepted request writes with it: inserted, or replacing an expired
/// row of the same key read with `replaces`.
#[derive(Debug, Clone, Copy)]
pub struct KeyWrite<'a> {
    pub record: &'a IdempotencyRecord,
    pub replaces: Option<&'a ETag>,
}

/// What a request write is conditional on, and so what [`Ledger::fence`] consumes: the
/// device's record at an ETag, or, for a device's first request, its anchor row (a
/// row that exists before any request, [`Ledger::anchor`]). Every request write is
/// thus conditional on an ETag, and a write whose outcome is unknown can be fenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    Record(ETag),
    Anchor(ETag),
}

/// The desired-state ledger (Azure Table Storage in production).
///
/// It keeps the per-request history of [`crate::domain::history`]: every
/// [`Ledger::put`] and [`Ledger::accept`] writes the entries it implies in the same
/// atomic write as the record, so a request's entry exists exactly when the request
/// was stored (what decides a fenced write's outcome, `set_soc_http`).
#[async_trait]
pub trait Ledger: Send + Sync {
    /// The device's record; [`StoreError::Corrupt`] when its row does not read.
    async fn get(&self, device: &DeviceId) -> Result<Option<Versioned<DesiredState>>, StoreError>;
    /// Inserts when `expected` is `None` (Conflict if a record exists), otherwise
    /// replaces only if the stored ETag still equals `expected` (Conflict if not).
    /// Also writes the entry of `state`'s request and `events` into the device's
    /// outbox, in the same write.
    async fn put(
        &self,
        state: &DesiredState,
        expected: Option<&ETag>,
        events: &[Notification],
    ) -> Result<ETag, StoreError>;
    /// The device's anchor row, created if missing, and its ETag: what a device's
    /// first request is written conditionally on ([`Precondition::Anchor`]).
    async fn anchor(&self, device: &DeviceId) -> Result<ETag, StoreError>;
    /// Writes a newly accepted request in ONE atomic write (an entity-group transaction
    /// in the device's partition), all or nothing, only if `on` still holds: the record
    /// (replacing the one at `on`'s ETag, or inserted when `on` is the anchor, whose
    /// ETag then changes too), the history entry of the request and `replaced` (the
    /// entry of the request it takes the place of, [`HistoryEntry::replaced`]), and
    /// the `key` row if any, and `events` into the device's outbox. `Conflict` when `on`
    /// no longer holds or the key row is there already. Afterwards, when `state` says so
    /// ([`DesiredState::prunes_history`]: once in ten requests, or a day after the last
    /// time), best effort and outside the write, the device's history is cut to the
    /// newest [`crate::domain::history::HISTORY_LIMIT`] entries and key rows older than
    /// [`crate::domain::IDEMPOTENCY_KEY_RETENTION`] are deleted.
    async fn accept(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        key: Option<KeyWrite<'_>>,
        on: &Precondition,
        events: &[Notification],
    ) -> Result<ETag, StoreError>;
    /// Consumes `on`: changes the ETag of the row it names (nothing else) only if it
    /// still holds. `Ok` means no write conditional on `on` can commit any more (one
    /// whose outcome was unknown never did, and never will); `Conflict` means a write
    /// consumed `on` first (which one, [`Ledger::history_entry`] tells).
    async fn fence(&self, device: &DeviceId, on: &Precondition) -> Result<(), StoreError>;
    /// The history entry of one of the device's requests (written with the request).
    async fn history_entry(
        &self,
        device: &DeviceId,
        request: &RequestId,
    ) -> Result<Option<HistoryEntry>, StoreError>;
    /// Up to `limit` pending records of the devices after `after` (all devices if
    /// `None`), in device-id order, and the device to continue after (`None` when the
    /// listing reached the last device). The reconciling pass reads the ledger this
    /// way, a slice per sweep. An unreadable row is listed in the page's `corrupt`.
    async fn pending_after(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<(PendingPage, Option<DeviceId>), StoreError>;

    /// Every record whose status is pending, across all devices, as one page.
    async fn pending(&self) -> Result<PendingPage, StoreError> {
        let mut all = PendingPage::default();
        let mut after: Option<DeviceId> = None;
        loop {
            let (page, next) = self.pending_after(after.as_ref(), 1000).await?;
            all.extend(page);
            match next {
                Some(next) => after = Some(next),
                None => return Ok(all),
            }
        }
    }

    // ------------------------------------------------ the outbox (domain::notification)

    /// The device's undelivered events, oldest ([`Notification::seq`]) first.
    async fn outbox(&self, device: &DeviceId) -> Result<Vec<Notification>, StoreError>;
    /// Removes these events (by `seq`) from the device's outbox (`Ok` if gone).
    async fn remove_outbox(&self, device: &DeviceId, seqs: &[u64]) -> Result<(), StoreError>;

    // ------------------------------------------------ the due index (domain::due_index)

    /// Files `entry` (an upsert: filing the same entry twice leaves one).
    async fn file_due(&self, entry: &DueEntry) -> Result<(), StoreError>;
    /// Files `entries` in ONE atomic write (an entity-group transaction of upserts),
    /// all or nothing: they must all be of one shard, at most
    /// [`crate::domain::due_index::MAX_BATCH`] ([`crate::domain::due_index::batches`]
    /// groups them so). The reconciling pass files its slice this way.
    async fn file_due_batch(&self, entries: &[DueEntry]) -> Result<(), StoreError>;
    /// Up to `limit` entries of `shard` due at or before `until`, oldest first.
    async fn due_entries(
        &self,
        shard: u8,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Versioned<DueEntry>>, StoreError>;
    /// Removes `entry` (Ok if gone): only if unchanged since it was listed with `etag`,
    /// or whatever its ETag when `etag` is `None` (a writer removing the entry a record
    /// version it replaced named, which it never listed).
    async fn unfile_due(&self, entry: &DueEntry, etag: Option<&ETag>) -> Result<(), StoreError>;

    // ------------------------------------------------ the sweep's own record

    async fn sweep_state(&self) -> Result<Option<Versioned<SweepState>>, StoreError>;
    /// Same insert/replace semantics as [`Ledger::put`].
    async fn put_sweep_state(
        &self,
        state: &SweepState,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError>;

    async fn get_idempotency(
        &self,
        device: &DeviceId,
        key: &IdempotencyKey,
    ) -> Result<Option<Versioned<IdempotencyRecord>>, StoreError>;
}

// ---------------------------------------------------------------- clock

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

// ---------------------------------------------------------------- notifications

/// Why a publish to the event topic failed. Texts name statuses and kinds only, never
/// the topic's key or a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotifyError {
    /// Network, timeout, `408`, `429`, `5xx`: try again later (not before `retry_after`
    /// if the topic said so).
    #[error("event topic unavailable: {reason}")]
    Unavailable {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// `400`, `401`, `403`, `404`, `413`: the topic refused the events. Kept and tried
    /// again too (nothing is dropped), but an operator must act: logged as an error.
    #[error("event topic refused the events: {0}")]
    Refused(String),
}

/// The app's event topic (Azure Event Grid, CloudEvents 1.0 input schema).
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Publishes `events` in the order given, in one request
    /// (`application/cloudevents-batch+json`): `Ok` when the topic accepted all of them.
    async fn publish(&self, events: &[Notification]) -> Result<(), NotifyError>;
}
