//! The traits the functions need from the outside world. Adapters in
//! [`crate::adapters`] implement them for Azure and the device cloud; tests may
//! implement them in memory.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::domain::due_index::DueEntry;
use crate::domain::history::HistoryEntry;
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
        /// The request went out and no answer came back (a timeout, a broken
        /// connection): a PUT may have been applied, and may still land within the
        /// late-landing bound. `false` when the device cloud answered, or when nothing
        /// was sent (no connection).
        unanswered: bool,
    },
}

impl DeviceError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::UnknownDevice | Self::Rejected(_))
    }
}

/// The vendor's device cloud (contract in `docs/device-api.md`).
#[async_trait]
pub trait DeviceApi: Send + Sync {
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError>;
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

/// What an `Idempotency-Key` was first used for, and the answer given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub device_id: DeviceId,
    pub key: IdempotencyKey,
    /// Canonical form of the request the key was first used with (e.g. `minSoc=35`).
    pub fingerprint: String,
    /// `None` while the first request is still in flight.
    pub response: Option<StoredResponse>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

/// The desired-state ledger (Azure Table Storage in production).
///
/// A ledger may keep the per-request history of [`crate::domain::history`]: then
/// every [`Ledger::put`] and [`Ledger::accept`] writes the entries it implies in the
/// same atomic write as the record. The history methods have defaults for a ledger
/// that keeps none (it then knows only each device's latest request).
#[async_trait]
pub trait Ledger: Send + Sync {
    /// The device's record; [`StoreError::Corrupt`] when its row does not read.
    async fn get(&self, device: &DeviceId) -> Result<Option<Versioned<DesiredState>>, StoreError>;
    /// Inserts when `expected` is `None` (Conflict if a record exists), otherwise
    /// replaces only if the stored ETag still equals `expected` (Conflict if not).
    /// With history: also writes the entry of `state`'s request, in the same write.
    async fn put(&self, state: &DesiredState, expected: Option<&ETag>) -> Result<ETag, StoreError>;
    /// Writes a newly accepted request like [`Ledger::put`] and, in the same atomic
    /// write, `replaced`: the entry of the request it takes the place of
    /// ([`HistoryEntry::replaced`]). With history, it also keeps the device's entries
    /// within [`crate::domain::history::HISTORY_LIMIT`] afterwards.
    async fn accept(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError> {
        let _ = replaced;
        self.put(state, expected).await
    }
    /// The history entry of one of the device's requests, if kept (none by default).
    async fn history_entry(
        &self,
        device: &DeviceId,
        request: &RequestId,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        let _ = (device, request);
        Ok(None)
    }
    /// Deletes only if the stored ETag equals `expected` (Conflict if not; Ok if already gone).
    async fn delete(&self, device: &DeviceId, expected: &ETag) -> Result<(), StoreError>;
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

    // ------------------------------------------------ the due index (domain::due_index)

    /// Files `entry` (an upsert: filing the same entry twice leaves one).
    async fn file_due(&self, entry: &DueEntry) -> Result<(), StoreError>;
    /// Up to `limit` entries of `shard` due at or before `until`, oldest first.
    async fn due_entries(
        &self,
        shard: u8,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Versioned<DueEntry>>, StoreError>;
    /// Removes `entry` only if unchanged since it was listed with `etag` (Ok if gone).
    async fn unfile_due(&self, entry: &DueEntry, etag: &ETag) -> Result<(), StoreError>;

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
    /// Same insert/replace semantics as [`Ledger::put`].
    async fn put_idempotency(
        &self,
        record: &IdempotencyRecord,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError>;
    async fn delete_idempotency(
        &self,
        device: &DeviceId,
        key: &IdempotencyKey,
        expected: &ETag,
    ) -> Result<(), StoreError>;
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
