//! The desired-state ledger in Azure Table Storage, through our own Table REST client
//! ([`super::table_rest`]).
//!
//! Entity design (one partition per device):
//!
//! | PartitionKey | RowKey            | holds                                   |
//! |--------------|-------------------|-----------------------------------------|
//! | `{deviceId}` | `desired`         | [`DesiredState`]                        |
//! | `{deviceId}` | `anchor`          | nothing: exists before the device's first request, so that request's write is conditional too (`Ledger::anchor`, `Ledger::fence`) |
//! | `{deviceId}` | `idem-{hex(key)}` | [`IdempotencyRecord`]: the request the key created, written with it |
//! | `{deviceId}` | `req-{requestId}` | [`HistoryEntry`]: the record's fields + `SupersededBy` |
//! | `!due-{00..15}` | `{dueAt}~{deviceId}~{nonce}` | a due-index entry ([`crate::domain::due_index`]): `FiledAt` only |
//! | `!sweep`     | `state`           | [`SweepState`]: the sweep lease and the reconciling pass's progress |
//!
//! History (see [`crate::domain::history`]): `put` and `accept` write the `desired`
//! row and the history rows they imply in one entity-group transaction (same
//! partition: all or nothing, the `desired` row's or the anchor's condition deciding),
//! so an entry never disagrees with the ledger about the request the ledger holds;
//! `accept` also inserts the request's key row in it. After an accepted request that
//! prunes (one in ten, [`DesiredState::prunes_history`]), entries beyond the newest
//! [`HISTORY_LIMIT`](crate::domain::history::HISTORY_LIMIT) and key rows older than the
//! retention are deleted, in one query and one batch (best effort, outside the
//! transaction: a failure leaves them for the next request that prunes). `fence` merges
//! nothing into a row at an ETag: only the ETag changes.
//!
//! Idempotency keys are hex-encoded because keys may contain `/`, `\`, `#`, `?`,
//! which RowKey forbids. Timestamps are stored as RFC 3339 strings (nanosecond-exact,
//! unlike `Edm.DateTime`), `Attempts` as `Edm.Int64`, absent optionals as absent
//! properties. Every write is conditional: insert (`POST`, 409 when present) or
//! replace with `If-Match: {etag}` (412 when someone wrote first).
//!
//! A row that exists but does not read as a record (a field missing, mistyped or out
//! of range, e.g. after a schema change) is [`StoreError::Corrupt`] naming the row's
//! keys and the field, never its values: `get` returns it as the error, and the
//! pending listing reports it in its page's `corrupt` list while the page's other
//! rows are returned as usual.
//!
//! The table is created lazily on first use (construction does no I/O), once per process.

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::OnceCell;

use super::connection_string::StorageConnection;
use super::identity::transport;
use super::table_rest::{
    BatchOp, BatchOutcome, Continuation, Entity, IfMatch, Query, TableClient, TableError, Update,
};
use crate::domain::due_index::{self, DueEntry};
use crate::domain::history::{self, HistoryEntry};
use crate::domain::ledger::{Lease, LeaseHolder};
use crate::domain::notification::Notification;
use crate::domain::sweep_state::SweepState;
use crate::domain::{
    DesiredState, DeviceId, IdempotencyKey, MinSoc, RequestId, RequestStatus,
    IDEMPOTENCY_KEY_RETENTION,
};
use crate::ports::{
    CorruptRow, ETag, IdempotencyRecord, KeyWrite, Ledger, PendingPage, Precondition, StoreError,
    Versioned,
};
use azure_core::auth::TokenCredential;
use std::path::Path;

/// Timeout of one storage request.
pub const STORAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// RowKey prefix of history entries (`req-{requestId}`).
pub const HISTORY_ROW_PREFIX: &str = "req-";
/// RowKey of the desired-state record.
pub const DESIRED_ROW: &str = "desired";
/// The query `pending()` runs.
pub const PENDING_FILTER: &str = "RowKey eq 'desired' and Status eq 'pending'";
/// Where the sweep's own record lives (`!` cannot start a device id).
/// The device's anchor row: exists before its first request, so that request's write
/// is conditional on an ETag too (`Ledger::anchor`, `Ledger::fence`).
pub const ANCHOR_ROW: &str = "anchor";
/// Row keys of `Idempotency-Key` rows start with this.
pub const IDEMPOTENCY_ROW_PREFIX: &str = "idem-";
/// Row keys of the device's outbox (`evt-{seq, 20 digits}`: sorts in `seq` order;
/// outside the range history pruning reads).
pub const OUTBOX_ROW_PREFIX: &str = "evt-";
pub const SWEEP_PARTITION: &str = "!sweep";
pub const SWEEP_ROW: &str = "state";

/// The Table Storage ledger.
#[derive(Debug)]
pub struct TableLedger {
    table: TableClient,
    created: OnceCell<()>,
    logged: WriteLog,
}

/// What was last logged per device, so that a write that changes only coordination fields
/// (lease, wake-up message) logs nothing: one line per change of what a reader of the logs
/// sees (request, status, attempts, last error, applied time). Bounded: forgotten wholesale
/// at [`WriteLog::CAPACITY`] devices (a forgotten device's next write logs again).
#[derive(Debug, Default)]
struct WriteLog {
    last: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl WriteLog {
    const CAPACITY: usize = 4096;

    /// Logs the write (`log_written`) unless it shows the same as the device's last line.
    fn write(&self, state: &DesiredState) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            state.request_id.as_str(),
            state.status.as_str(),
            state.attempts,
            &state.last_error,
            state.applied_at,
        )
            .hash(&mut h);
        let seen = h.finish();
        let changed = match self.last.lock() {
            Ok(mut last) => {
                if last.len() >= Self::CAPACITY {
                    last.clear();
                }
                last.insert(state.device_id.as_str().to_string(), seen) != Some(seen)
            }
            Err(_) => true,
        };
        if changed {
            log_written(state);
        }
    }
}

impl TableLedger {
    /// Builds the client. Does no I/O: the table is created on first use.
    pub fn new(connection: &StorageConnection, table_name: &str) -> Result<Self, StoreError> {
        Self::with_connection(connection, table_name, None)
    }

    /// [`TableLedger::new`], trusting the extra CA certificates in `extra_ca_pem` too.
    pub fn with_connection(
        connection: &StorageConnection,
        table_name: &str,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, StoreError> {
        let http = transport(STORAGE_TIMEOUT, extra_ca_pem).map_err(StoreError::Unavailable)?;
        let table = TableClient::shared_key(
            http,
            &connection.table_endpoint,
            table_name,
            &connection.account,
            connection.key.expose(),
        )
        .map_err(StoreError::Unavailable)?;
        Ok(Self::on(table))
    }

    /// Builds the client for the app's managed identity (bearer tokens for
    /// `https://storage.azure.com`) against a table service URL. Does no I/O.
    pub fn with_identity(
        table_endpoint: &url::Url,
        table_name: &str,
        credential: Arc<dyn TokenCredential>,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, StoreError> {
        let http = transport(STORAGE_TIMEOUT, extra_ca_pem).map_err(StoreError::Unavailable)?;
        let table = TableClient::bearer(http, table_endpoint, table_name, credential)
            .map_err(StoreError::Unavailable)?;
        Ok(Self::on(table))
    }

    fn on(table: TableClient) -> Self {
        Self {
            table,
            created: OnceCell::new(),
            logged: WriteLog::default(),
        }
    }

    /// Creates the table the first time any operation needs it. A failure is not
    /// remembered, so the next call tries again.
    async fn table(&self) -> Result<&TableClient, StoreError> {
        self.created
            .get_or_try_init(|| async {
                match self.table.create_table().await {
                    Ok(true) => {
                        tracing::info!(table = %self.table.table_name(), "ledger table created");
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(unavailable("create table", &e)),
                }
            })
            .await?;
        Ok(&self.table)
    }

    async fn get_row(
        &self,
        partition: &str,
        row: &str,
    ) -> Result<Option<(Entity, ETag)>, StoreError> {
        let table = self.table().await?;
        match table.get(partition, row).await {
            Ok(found) => Ok(found.map(|(entity, etag)| (entity, ETag(etag)))),
            Err(e) => Err(unavailable("get", &e)),
        }
    }

    async fn put_row(
        &self,
        partition: &str,
        row: &str,
        entity: Entity,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError> {
        let table = self.table().await?;
        match expected {
            None => match table.insert(&entity).await {
                Ok(etag) => Ok(ETag(etag)),
                Err(e) if status_of(&e) == Some(409) => Err(StoreError::Conflict),
                Err(e) => Err(unavailable("insert", &e)),
            },
            Some(etag) => match table
                .update(
                    Update::Replace,
                    partition,
                    row,
                    &entity,
                    IfMatch::Etag(&etag.0),
                )
                .await
            {
                Ok(etag) => Ok(ETag(etag)),
                // 412: someone wrote first. 404: someone deleted it; the ETag cannot match either.
                Err(e) if matches!(status_of(&e), Some(412 | 404)) => Err(StoreError::Conflict),
                Err(e) => Err(unavailable("replace", &e)),
            },
        }
    }

    /// Writes the `desired` row (insert, or replace at `expected`) and `entries` in one
    /// entity-group transaction. A failed changeset answers with the failing
    /// operation's status: `409` (inserting over a row), `412` (another writer first)
    /// or `404` (the row is gone) are a [`StoreError::Conflict`], as for a single write.
    async fn put_with_history(
        &self,
        state: &DesiredState,
        expected: Option<&ETag>,
        entries: &[HistoryEntry],
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        let on = expected.map(|e| Precondition::Record(e.clone()));
        self.transaction(state, on.as_ref(), entries, None, events)
            .await
    }

    /// One entity-group transaction in the device's partition: the `desired` row
    /// (inserted when `on` is `None` or the anchor, else replaced at the record's ETag),
    /// the anchor row touched at its ETag when `on` is the anchor, the history
    /// `entries`, the `key` row (inserted, or replacing an expired one at its ETag) and
    /// the outbox rows of `events`.
    async fn transaction(
        &self,
        state: &DesiredState,
        on: Option<&Precondition>,
        entries: &[HistoryEntry],
        key: Option<KeyWrite<'_>>,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        let table = self.table().await?;
        let device = state.device_id.as_str();
        let desired = desired_to_entity(state);
        let anchor = anchor_entity(device);
        let key_row = key.as_ref().map(|k| {
            (
                idempotency_row(&k.record.key),
                idempotency_to_entity(k.record),
            )
        });
        let history: Vec<(String, Entity)> = entries
            .iter()
            .map(|e| (history_row(&e.request.request_id), history_to_entity(e)))
            .collect();
        let outbox: Vec<(String, Entity)> = events
            .iter()
            .map(|e| (outbox_row(e.seq), outbox_to_entity(e)))
            .collect();

        let mut ops = Vec::with_capacity(3 + history.len() + outbox.len());
        match on {
            None => ops.push(BatchOp::Insert(&desired)),
            Some(Precondition::Anchor(etag)) => {
                ops.push(BatchOp::Insert(&desired));
                ops.push(BatchOp::Merge {
                    row: ANCHOR_ROW,
                    entity: &anchor,
                    if_match: IfMatch::Etag(&etag.0),
                });
            }
            Some(Precondition::Record(etag)) => ops.push(BatchOp::Replace {
                row: DESIRED_ROW,
                entity: &desired,
                if_match: IfMatch::Etag(&etag.0),
            }),
        }
        if let (Some(key), Some((row, entity))) = (&key, &key_row) {
            ops.push(match key.replaces {
                None => BatchOp::Insert(entity),
                Some(etag) => BatchOp::Replace {
                    row,
                    entity,
                    if_match: IfMatch::Etag(&etag.0),
                },
            });
        }
        for (row, entity) in history.iter().chain(&outbox) {
            ops.push(BatchOp::InsertOrReplace { row, entity });
        }
        let outcome = table
            .batch(device, &ops)
            .await
            .map_err(|e| unavailable("transaction", &e))?;
        match outcome {
            BatchOutcome::Failed(failed) if matches!(failed.status, 409 | 412 | 404) => {
                Err(StoreError::Conflict)
            }
            BatchOutcome::Failed(failed) => {
                let reason = format!("table transaction: HTTP {}", failed.status);
                tracing::warn!(error = %reason, operation = ?failed.index, "ledger: storage error");
                Err(StoreError::Unavailable(reason))
            }
            BatchOutcome::Committed(etags) => {
                let etag = etags.into_iter().next().flatten().ok_or_else(|| {
                    StoreError::Unavailable("table transaction: no ETag for the record".into())
                })?;
                self.logged.write(state);
                Ok(ETag(etag))
            }
        }
    }

    /// Hands every page of what `query` matches to `take`, page after page, until
    /// `take` says it has enough (then the listing did not end: `Ok(false)`) or the pages
    /// end (`Ok(true)`).
    async fn query_pages(
        &self,
        what: &str,
        query: Query<'_>,
        mut take: impl FnMut(Vec<Entity>) -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let table = self.table().await?;
        let mut from: Option<Continuation> = None;
        loop {
            let page = table
                .query(&query, from.as_ref())
                .await
                .map_err(|e| unavailable(what, &e))?;
            if take(page.entities)? {
                return Ok(false);
            }
            match page.next {
                Some(next) => from = Some(next),
                None => return Ok(true),
            }
        }
    }

    /// Deletes the device's history entries beyond the bound (never `keep`'s) and its
    /// key rows first used before `keys_before`, in one range query (`idem-…` and
    /// `req-…` rows sort together). Best effort: a failure is logged and left for the
    /// next accepted request.
    async fn prune(&self, device: &DeviceId, keep: &RequestId, keys_before: DateTime<Utc>) {
        // Device ids are [A-Za-z0-9._-]: nothing to escape in the filter.
        let filter = format!(
            "PartitionKey eq '{device}' and RowKey ge '{IDEMPOTENCY_ROW_PREFIX}' and RowKey lt 'req.'"
        );
        let query = Query {
            filter: &filter,
            select: Some("RowKey,RequestId,RequestedAt,CreatedAt"),
            top: None,
        };
        let mut entries = Vec::new();
        let mut doomed = Vec::new();
        let read = self.query_pages("query history", query, |page| {
            for entity in &page {
                let row = Row { entity };
                let Ok(row_key) = row.str("RowKey") else {
                    continue;
                };
                if row_key.starts_with(IDEMPOTENCY_ROW_PREFIX) {
                    if row.time("CreatedAt").is_ok_and(|at| at < keys_before) {
                        doomed.push(row_key);
                    }
                } else if let (Ok(id), Ok(at)) = (row.str("RequestId"), row.time("RequestedAt")) {
                    entries.push((RequestId::from_stored(id), at));
                }
            }
            Ok(false)
        });
        if read.await.is_err() {
            return;
        }
        doomed.extend(history::beyond_limit(entries, keep).iter().map(history_row));
        if doomed.is_empty() {
            return;
        }
        // One entity-group transaction (same partition); if a row is gone already (a
        // concurrent prune), the transaction fails as a whole and the rows go one by one.
        if doomed.len() <= due_index::MAX_BATCH && self.delete_batch(device.as_str(), &doomed).await
        {
            return;
        }
        let Ok(table) = self.table().await else {
            return;
        };
        for row in doomed {
            let result = table.delete(device.as_str(), &row, IfMatch::Any).await;
            if let Err(e) = result.map_err(|e| status_of(&e).unwrap_or(0)) {
                if e != 404 {
                    tracing::warn!(device = %device, status = e, "ledger: could not prune a history entry or key row");
                    return;
                }
            }
        }
    }

    /// Deletes `rows` of one partition in one transaction; `false` if it did not commit.
    async fn delete_batch(&self, partition: &str, rows: &[String]) -> bool {
        let Ok(table) = self.table().await else {
            return false;
        };
        let ops: Vec<BatchOp<'_>> = rows
            .iter()
            .map(|row| BatchOp::Delete {
                row,
                if_match: IfMatch::Any,
            })
            .collect();
        matches!(
            table.batch(partition, &ops).await,
            Ok(BatchOutcome::Committed(_))
        )
    }

    async fn delete_row(
        &self,
        partition: &str,
        row: &str,
        expected: Option<&ETag>,
    ) -> Result<(), StoreError> {
        let table = self.table().await?;
        let condition = match expected {
            Some(etag) => IfMatch::Etag(&etag.0),
            None => IfMatch::Any,
        };
        match table.delete(partition, row, condition).await {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) if status_of(&e) == Some(412) => Err(StoreError::Conflict),
            Err(e) => Err(unavailable("delete", &e)),
        }
    }
}

#[async_trait]
impl Ledger for TableLedger {
    async fn get(&self, device: &DeviceId) -> Result<Option<Versioned<DesiredState>>, StoreError> {
        match self.get_row(device.as_str(), DESIRED_ROW).await? {
            None => Ok(None),
            Some((entity, etag)) => Ok(Some(Versioned {
                value: desired_from_entity(&entity)?,
                etag,
            })),
        }
    }

    async fn put(
        &self,
        state: &DesiredState,
        expected: Option<&ETag>,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        self.put_with_history(state, expected, &[HistoryEntry::of(state)], events)
            .await
    }

    async fn anchor(&self, device: &DeviceId) -> Result<ETag, StoreError> {
        for _ in 0..2 {
            if let Some((_, etag)) = self.get_row(device.as_str(), ANCHOR_ROW).await? {
                return Ok(etag);
            }
            match self
                .put_row(
                    device.as_str(),
                    ANCHOR_ROW,
                    anchor_entity(device.as_str()),
                    None,
                )
                .await
            {
                Ok(etag) => return Ok(etag),
                // Another writer created it first: read it.
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn accept(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        key: Option<KeyWrite<'_>>,
        on: &Precondition,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        let mut entries = vec![HistoryEntry::of(state)];
        entries.extend(replaced.cloned());
        let etag = self
            .transaction(state, Some(on), &entries, key, events)
            .await?;
        if state.prunes_history() {
            self.prune(
                &state.device_id,
                &state.request_id,
                state.requested_at - IDEMPOTENCY_KEY_RETENTION,
            )
            .await;
        }
        Ok(etag)
    }

    async fn fence(&self, device: &DeviceId, on: &Precondition) -> Result<(), StoreError> {
        let table = self.table().await?;
        let (row, etag) = match on {
            Precondition::Record(etag) => (DESIRED_ROW, etag),
            Precondition::Anchor(etag) => (ANCHOR_ROW, etag),
        };
        // A merge of the keys alone changes nothing but the row's ETag.
        let mut keys = Map::new();
        keys.insert("PartitionKey".into(), device.as_str().into());
        keys.insert("RowKey".into(), row.into());
        match table
            .update(
                Update::Merge,
                device.as_str(),
                row,
                &keys,
                IfMatch::Etag(&etag.0),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(status_of(&e), Some(412 | 404)) => Err(StoreError::Conflict),
            Err(e) => Err(unavailable("fence", &e)),
        }
    }

    async fn history_entry(
        &self,
        device: &DeviceId,
        request: &RequestId,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        match self.get_row(device.as_str(), &history_row(request)).await? {
            None => Ok(None),
            Some((entity, _)) => Ok(Some(history_from_entity(&entity)?)),
        }
    }

    async fn pending_after(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<(PendingPage, Option<DeviceId>), StoreError> {
        // Device ids are [A-Za-z0-9._-]: nothing to escape in the filter.
        let filter = match after {
            Some(d) => format!("PartitionKey gt '{d}' and {PENDING_FILTER}"),
            None => PENDING_FILTER.to_string(),
        };
        let query = Query {
            filter: &filter,
            select: None,
            top: Some(limit.min(1000) as u32),
        };
        let mut entities = Vec::new();
        let ended = self
            .query_pages("query pending", query, |page| {
                entities.extend(page);
                Ok(entities.len() >= limit)
            })
            .await?;
        entities.truncate(limit);
        let next = if ended {
            None
        } else {
            entities
                .last()
                .and_then(|e| e.get("PartitionKey"))
                .and_then(Value::as_str)
                .and_then(|d| DeviceId::parse(d).ok())
        };
        Ok((pending_page(&entities), next))
    }

    async fn outbox(&self, device: &DeviceId) -> Result<Vec<Notification>, StoreError> {
        // Device ids are [A-Za-z0-9._-]: nothing to escape in the filter.
        let filter = format!(
            "PartitionKey eq '{device}' and RowKey ge '{OUTBOX_ROW_PREFIX}' and RowKey lt 'evt.'"
        );
        let query = Query {
            filter: &filter,
            select: None,
            top: None,
        };
        let mut events = Vec::new();
        self.query_pages("query outbox", query, |page| {
            for entity in &page {
                events.push(outbox_from_entity(entity)?);
            }
            Ok(false)
        })
        .await?;
        events.sort_by_key(|e| e.seq);
        Ok(events)
    }

    async fn remove_outbox(&self, device: &DeviceId, seqs: &[u64]) -> Result<(), StoreError> {
        let rows: Vec<String> = seqs.iter().map(|s| outbox_row(*s)).collect();
        for chunk in rows.chunks(due_index::MAX_BATCH) {
            // One transaction; if a row is gone already (another dispatcher removed it),
            // it fails as a whole and the rows go one by one.
            if self.delete_batch(device.as_str(), chunk).await {
                continue;
            }
            for row in chunk {
                self.delete_row(device.as_str(), row, None).await?;
            }
        }
        Ok(())
    }

    async fn file_due(&self, entry: &DueEntry) -> Result<(), StoreError> {
        let table = self.table().await?;
        table
            .insert_or_replace(&entry.partition_key(), &entry.row_key(), &due_entity(entry))
            .await
            .map(|_| ())
            .map_err(|e| unavailable("file due", &e))
    }

    async fn file_due_batch(&self, entries: &[DueEntry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let partition = first.partition_key();
        if entries.len() > due_index::MAX_BATCH
            || entries.iter().any(|e| e.shard() != first.shard())
        {
            return Err(StoreError::Unavailable(format!(
                "file due batch: {} entries, not at most {} of one shard",
                entries.len(),
                due_index::MAX_BATCH
            )));
        }
        let table = self.table().await?;
        let rows: Vec<(String, Entity)> = entries
            .iter()
            .map(|e| (e.row_key(), due_entity(e)))
            .collect();
        let ops: Vec<BatchOp<'_>> = rows
            .iter()
            .map(|(row, entity)| BatchOp::InsertOrReplace { row, entity })
            .collect();
        match table
            .batch(&partition, &ops)
            .await
            .map_err(|e| unavailable("file due batch", &e))?
        {
            BatchOutcome::Failed(failed) => {
                let reason = format!("file due batch: HTTP {}", failed.status);
                tracing::warn!(error = %reason, operation = ?failed.index, "ledger: storage error");
                Err(StoreError::Unavailable(reason))
            }
            BatchOutcome::Committed(_) => Ok(()),
        }
    }

    async fn due_entries(
        &self,
        shard: u8,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Versioned<DueEntry>>, StoreError> {
        let filter = format!(
            "PartitionKey eq '{}' and RowKey lt '{}'",
            due_index::partition_key(shard),
            due_index::row_key_bound(until)
        );
        let query = Query {
            filter: &filter,
            select: Some("RowKey,FiledAt"),
            top: Some(limit.min(1000) as u32),
        };
        let mut entries = Vec::new();
        self.query_pages("query due", query, |page| {
            for entity in &page {
                let row = entity.get("RowKey").and_then(Value::as_str).unwrap_or("");
                let etag = entity.get("odata.etag").and_then(Value::as_str);
                let filed_at = Row { entity }.opt_time("FiledAt").ok().flatten();
                match (DueEntry::from_row_key(row), etag) {
                    (Some(mut value), Some(etag)) => {
                        value.filed_at = filed_at;
                        entries.push(Versioned {
                            value,
                            etag: ETag(etag.to_string()),
                        })
                    }
                    _ => tracing::warn!(
                        shard,
                        row,
                        "ledger: skipped an index row that does not read"
                    ),
                }
            }
            Ok(entries.len() >= limit)
        })
        .await?;
        entries.truncate(limit);
        Ok(entries)
    }

    async fn unfile_due(&self, entry: &DueEntry, etag: Option<&ETag>) -> Result<(), StoreError> {
        self.delete_row(&entry.partition_key(), &entry.row_key(), etag)
            .await
    }

    async fn sweep_state(&self) -> Result<Option<Versioned<SweepState>>, StoreError> {
        match self.get_row(SWEEP_PARTITION, SWEEP_ROW).await? {
            None => Ok(None),
            Some((entity, etag)) => Ok(Some(Versioned {
                value: sweep_from_entity(&entity)?,
                etag,
            })),
        }
    }

    async fn put_sweep_state(
        &self,
        state: &SweepState,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError> {
        self.put_row(SWEEP_PARTITION, SWEEP_ROW, sweep_to_entity(state), expected)
            .await
    }

    async fn get_idempotency(
        &self,
        device: &DeviceId,
        key: &IdempotencyKey,
    ) -> Result<Option<Versioned<IdempotencyRecord>>, StoreError> {
        match self.get_row(device.as_str(), &idempotency_row(key)).await? {
            None => Ok(None),
            Some((entity, etag)) => Ok(Some(Versioned {
                value: idempotency_from_entity(&entity)?,
                etag,
            })),
        }
    }
}

// ---------------------------------------------------------------- errors

fn status_of(err: &TableError) -> Option<u16> {
    err.status()
}

/// One line per ledger write: the device's request and the status the ledger now holds.
/// The on-call queries and alerts (docs/operations.md) read `device=`, `request_id=`,
/// `outcome=` and, last on the line, `last_error=`.
fn log_written(state: &DesiredState) {
    match &state.last_error {
        Some(last_error) => tracing::info!(
            device = %state.device_id,
            request_id = %state.request_id,
            outcome = %state.status.as_str(),
            attempts = state.attempts,
            last_error = ?last_error,
            "ledger: request state written"
        ),
        None => tracing::info!(
            device = %state.device_id,
            request_id = %state.request_id,
            outcome = %state.status.as_str(),
            attempts = state.attempts,
            "ledger: request state written"
        ),
    }
}

/// Everything that is not a conflict is "unavailable": network, 5xx, auth, throttling.
/// Built from status, service error code and error kind only ([`TableError`]'s text),
/// never a URL or a response body.
fn unavailable(op: &str, err: &TableError) -> StoreError {
    let reason = format!("table {op}: {err}");
    tracing::warn!(error = %reason, "ledger: storage error");
    StoreError::Unavailable(reason)
}

// ---------------------------------------------------------------- entity mapping

/// RowKey of an idempotency record: `idem-` and the key's bytes in lower-case hex.
pub fn idempotency_row(key: &IdempotencyKey) -> String {
    let mut row = String::with_capacity(5 + key.as_str().len() * 2);
    row.push_str(IDEMPOTENCY_ROW_PREFIX);
    for b in key.as_str().bytes() {
        row.push_str(&format!("{b:02x}"));
    }
    row
}

fn time(at: DateTime<Utc>) -> Value {
    Value::String(at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

fn put_opt(entity: &mut Map<String, Value>, name: &str, value: Option<Value>) {
    if let Some(v) = value {
        entity.insert(name.to_string(), v);
    }
}

/// RowKey of a request's history entry.
pub fn outbox_row(seq: u64) -> String {
    format!("{OUTBOX_ROW_PREFIX}{seq:020}")
}

fn outbox_to_entity(n: &Notification) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), n.device_id.as_str().into());
    e.insert("RowKey".into(), outbox_row(n.seq).into());
    e.insert("Seq".into(), n.seq.to_string().into());
    e.insert("Seq@odata.type".into(), "Edm.Int64".into());
    e.insert("EventId".into(), n.id.clone().into());
    e.insert("EventType".into(), n.event_type.clone().into());
    e.insert("Subject".into(), n.subject.clone().into());
    e.insert("Time".into(), time(n.time));
    e.insert("Data".into(), n.data.clone().into());
    e
}

fn outbox_from_entity(entity: &Map<String, Value>) -> Result<Notification, CorruptRow> {
    let row = Row { entity };
    Ok(Notification {
        device_id: DeviceId::parse(&row.str("PartitionKey")?)
            .map_err(|_| row.bad("PartitionKey", "is not a device id"))?,
        seq: u64::try_from(row.int("Seq")?).map_err(|_| row.bad("Seq", "is out of range"))?,
        id: row.str("EventId")?,
        event_type: row.str("EventType")?,
        subject: row.str("Subject")?,
        time: row.time("Time")?,
        data: row.str("Data")?,
    })
}

pub fn history_row(request: &RequestId) -> String {
    format!("{HISTORY_ROW_PREFIX}{request}")
}

fn history_to_entity(e: &HistoryEntry) -> Map<String, Value> {
    let mut entity = desired_to_entity(&e.request);
    // The index bookkeeping belongs to the live record, not to what is kept of a request.
    entity.remove("DueEntry");
    entity.insert("RowKey".into(), history_row(&e.request.request_id).into());
    put_opt(
        &mut entity,
        "SupersededBy",
        e.superseded_by.as_ref().map(|id| id.as_str().into()),
    );
    entity
}

fn history_from_entity(entity: &Map<String, Value>) -> Result<HistoryEntry, CorruptRow> {
    Ok(HistoryEntry {
        request: desired_from_entity(entity)?,
        superseded_by: Row { entity }
            .opt_str("SupersededBy")?
            .map(RequestId::from_stored),
    })
}

fn desired_to_entity(s: &DesiredState) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), s.device_id.as_str().into());
    e.insert("RowKey".into(), DESIRED_ROW.into());
    e.insert("RequestId".into(), s.request_id.as_str().into());
    e.insert("MinSoc".into(), s.min_soc.percent().into());
    e.insert("Status".into(), s.status.as_str().into());
    e.insert("RequestedAt".into(), time(s.requested_at));
    e.insert("ExpiresAt".into(), time(s.expires_at));
    put_opt(&mut e, "AppliedAt", s.applied_at.map(time));
    e.insert("Attempts".into(), s.attempts.to_string().into());
    e.insert("Attempts@odata.type".into(), "Edm.Int64".into());
    put_opt(&mut e, "LastError", s.last_error.clone().map(Value::from));
    put_opt(
        &mut e,
        "WakeMessageId",
        s.wake_message_id.clone().map(Value::from),
    );
    put_opt(&mut e, "WakeDueAt", s.wake_due_at.map(time));
    if let Some(lease) = &s.lease {
        e.insert("LeaseHolder".into(), lease.holder.as_str().into());
        e.insert("LeaseUntil".into(), time(lease.until));
    }
    e.insert("UpdatedAt".into(), time(s.updated_at));
    put_opt(&mut e, "DueEntry", s.due_entry.clone().map(Value::from));
    if s.unpruned > 0 {
        e.insert("Unpruned".into(), s.unpruned.into());
    }
    put_opt(&mut e, "PrunedAt", s.pruned_at.map(time));
    if s.last_event_seq > 0 {
        e.insert("LastEventSeq".into(), s.last_event_seq.to_string().into());
        e.insert("LastEventSeq@odata.type".into(), "Edm.Int64".into());
    }
    put_opt(&mut e, "ConfirmedAt", s.confirmed_at.map(time));
    put_opt(
        &mut e,
        "ReportedMinSoc",
        s.reported_min_soc.map(Value::from),
    );
    put_opt(&mut e, "DriftDetectedAt", s.drift_detected_at.map(time));
    e
}

/// Reads a row back; a row that does not parse is reported (not silently skipped).
struct Row<'a> {
    entity: &'a Map<String, Value>,
}

impl Row<'_> {
    fn key(&self, name: &str) -> String {
        self.entity
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    }

    fn bad(&self, field: &str, what: &str) -> CorruptRow {
        CorruptRow {
            partition_key: self.key("PartitionKey"),
            row_key: self.key("RowKey"),
            reason: format!("{field} {what}"),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<String>, CorruptRow> {
        match self.entity.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.bad(field, "is not a string")),
        }
    }

    fn str(&self, field: &str) -> Result<String, CorruptRow> {
        self.opt_str(field)?
            .ok_or_else(|| self.bad(field, "is missing"))
    }

    fn opt_time(&self, field: &str) -> Result<Option<DateTime<Utc>>, CorruptRow> {
        self.opt_str(field)?
            .map(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| self.bad(field, "is not an RFC 3339 time"))
            })
            .transpose()
    }

    fn time(&self, field: &str) -> Result<DateTime<Utc>, CorruptRow> {
        self.opt_time(field)?
            .ok_or_else(|| self.bad(field, "is missing"))
    }

    /// Int32 arrives as a JSON number; Int64 as a string (with an `@odata.type` annotation).
    fn opt_int(&self, field: &str) -> Result<Option<i64>, CorruptRow> {
        match self.entity.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.bad(field, "is not an integer")),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| self.bad(field, "is not an integer")),
            Some(_) => Err(self.bad(field, "is not an integer")),
        }
    }

    fn int(&self, field: &str) -> Result<i64, CorruptRow> {
        self.opt_int(field)?
            .ok_or_else(|| self.bad(field, "is missing"))
    }
}

fn desired_from_entity(entity: &Map<String, Value>) -> Result<DesiredState, CorruptRow> {
    let row = Row { entity };
    let device_id = DeviceId::parse(&row.str("PartitionKey")?)
        .map_err(|_| row.bad("PartitionKey", "is not a device id"))?;
    let min_soc = u8::try_from(row.int("MinSoc")?)
        .ok()
        .and_then(MinSoc::new)
        .ok_or_else(|| row.bad("MinSoc", "is out of range"))?;
    let status = RequestStatus::parse(&row.str("Status")?)
        .ok_or_else(|| row.bad("Status", "is not a known status"))?;
    let attempts =
        u32::try_from(row.int("Attempts")?).map_err(|_| row.bad("Attempts", "is out of range"))?;
    let lease = match (row.opt_str("LeaseHolder")?, row.opt_time("LeaseUntil")?) {
        (Some(holder), Some(until)) => Some(Lease {
            holder: LeaseHolder::from_stored(holder),
            until,
        }),
        (None, None) => None,
        _ => {
            return Err(row.bad(
                "LeaseHolder/LeaseUntil",
                "must be both present or both absent",
            ))
        }
    };
    Ok(DesiredState {
        device_id,
        request_id: RequestId::from_stored(row.str("RequestId")?),
        min_soc,
        status,
        requested_at: row.time("RequestedAt")?,
        expires_at: row.time("ExpiresAt")?,
        applied_at: row.opt_time("AppliedAt")?,
        attempts,
        last_error: row.opt_str("LastError")?,
        wake_message_id: row.opt_str("WakeMessageId")?,
        wake_due_at: row.opt_time("WakeDueAt")?,
        lease,
        updated_at: row.time("UpdatedAt")?,
        due_entry: row.opt_str("DueEntry")?,
        unpruned: match row.opt_int("Unpruned")? {
            None => 0,
            Some(n) => u32::try_from(n).map_err(|_| row.bad("Unpruned", "is out of range"))?,
        },
        pruned_at: row.opt_time("PrunedAt")?,
        last_event_seq: match row.opt_int("LastEventSeq")? {
            None => 0,
            Some(n) => u64::try_from(n).map_err(|_| row.bad("LastEventSeq", "is out of range"))?,
        },
        confirmed_at: row.opt_time("ConfirmedAt")?,
        reported_min_soc: row
            .opt_int("ReportedMinSoc")?
            .map(|n| {
                u8::try_from(n)
                    .ok()
                    .filter(|n| *n <= 100)
                    .ok_or_else(|| row.bad("ReportedMinSoc", "is out of range"))
            })
            .transpose()?,
        drift_detected_at: row.opt_time("DriftDetectedAt")?,
    })
}

fn sweep_to_entity(s: &SweepState) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), SWEEP_PARTITION.into());
    e.insert("RowKey".into(), SWEEP_ROW.into());
    put_opt(
        &mut e,
        "Holder",
        s.holder.as_ref().map(|h| h.as_str().into()),
    );
    put_opt(&mut e, "Until", s.until.map(time));
    put_opt(
        &mut e,
        "ReconcileAfter",
        s.reconcile_after.as_ref().map(|d| d.as_str().into()),
    );
    put_opt(
        &mut e,
        "ReconcileStartedAt",
        s.reconcile_started_at.map(time),
    );
    put_opt(&mut e, "ReconciledAt", s.reconciled_at.map(time));
    e
}

fn sweep_from_entity(entity: &Map<String, Value>) -> Result<SweepState, CorruptRow> {
    let row = Row { entity };
    Ok(SweepState {
        holder: row.opt_str("Holder")?.map(LeaseHolder::from_stored),
        until: row.opt_time("Until")?,
        reconcile_after: row
            .opt_str("ReconcileAfter")?
            .map(|d| {
                DeviceId::parse(&d).map_err(|_| row.bad("ReconcileAfter", "is not a device id"))
            })
            .transpose()?,
        reconcile_started_at: row.opt_time("ReconcileStartedAt")?,
        reconciled_at: row.opt_time("ReconciledAt")?,
    })
}

/// The row of a due-index entry: its keys and when it was filed.
fn due_entity(entry: &DueEntry) -> Map<String, Value> {
    let mut entity = Map::new();
    entity.insert("PartitionKey".into(), entry.partition_key().into());
    entity.insert("RowKey".into(), entry.row_key().into());
    put_opt(&mut entity, "FiledAt", entry.filed_at.map(time));
    entity
}

fn anchor_entity(device: &str) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), device.into());
    e.insert("RowKey".into(), ANCHOR_ROW.into());
    e
}

fn idempotency_to_entity(r: &IdempotencyRecord) -> Map<String, Value> {
    let mut e = Map::new();
    e.insert("PartitionKey".into(), r.device_id.as_str().into());
    e.insert("RowKey".into(), idempotency_row(&r.key).into());
    e.insert("Key".into(), r.key.as_str().into());
    e.insert("Fingerprint".into(), r.fingerprint.clone().into());
    e.insert("RequestId".into(), r.request_id.as_str().into());
    e.insert("CreatedAt".into(), time(r.created_at));
    e
}

fn idempotency_from_entity(entity: &Map<String, Value>) -> Result<IdempotencyRecord, CorruptRow> {
    let row = Row { entity };
    let device_id = DeviceId::parse(&row.str("PartitionKey")?)
        .map_err(|_| row.bad("PartitionKey", "is not a device id"))?;
    let key = IdempotencyKey::parse(row.str("Key")?.as_bytes())
        .map_err(|_| row.bad("Key", "is not an idempotency key"))?;
    Ok(IdempotencyRecord {
        device_id,
        key,
        fingerprint: row.str("Fingerprint")?,
        request_id: RequestId::from_stored(row.str("RequestId")?),
        created_at: row.time("CreatedAt")?,
    })
}

/// A queried `desired` row with the ETag the query returned for it.
fn versioned_desired(entity: &Map<String, Value>) -> Result<Versioned<DesiredState>, CorruptRow> {
    let etag = entity
        .get("odata.etag")
        .and_then(Value::as_str)
        .map(|s| ETag(s.to_string()))
        .ok_or_else(|| Row { entity }.bad("odata.etag", "is missing"))?;
    Ok(Versioned {
        value: desired_from_entity(entity)?,
        etag,
    })
}

/// One page of the pending query: readable rows as records, the rest (logged) as corrupt.
fn pending_page(entities: &[Map<String, Value>]) -> PendingPage {
    let mut page = PendingPage::default();
    for entity in entities {
        match versioned_desired(entity) {
            Ok(record) => page.records.push(record),
            Err(corrupt) => {
                tracing::warn!(
                    device = %corrupt.partition_key,
                    row = %corrupt.row_key,
                    reason = %corrupt.reason,
                    "ledger: unreadable pending row"
                );
                page.corrupt.push(corrupt);
            }
        }
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_that_changes_nothing_a_reader_sees_logs_no_second_line() {
        let log = WriteLog::default();
        let mut state = crate::domain::DesiredState::accept(
            DeviceId::parse("bat-7").unwrap(),
            MinSoc::new(35).unwrap(),
            Utc::now(),
            chrono::Duration::hours(1),
            None,
        );
        let first = crate::telemetry::capture_logs(None, || log.write(&state));
        state.wake_message_id = Some("m1".into());
        let same = crate::telemetry::capture_logs(None, || log.write(&state));
        state.attempts += 1;
        let changed = crate::telemetry::capture_logs(None, || log.write(&state));

        assert_eq!(first.lines().count(), 1, "{first}");
        assert_eq!(same, "", "only the wake-up message changed");
        assert!(changed.contains(" attempts="), "{changed}");
    }

    #[test]
    fn every_ledger_write_logs_the_fields_the_on_call_queries_extract() {
        let mut state = crate::domain::DesiredState::accept(
            DeviceId::parse("bat-7.x").unwrap(),
            MinSoc::new(35).unwrap(),
            Utc::now(),
            chrono::Duration::hours(1),
            None,
        );
        let pending = crate::telemetry::capture_logs(None, || log_written(&state));
        let line = pending.trim_end();
        assert!(line.contains(" INFO "), "{line}");
        let request = format!(" request_id={} ", state.request_id);
        for field in [" device=bat-7.x ", request.as_str(), " outcome=pending"] {
            assert!(line.contains(field), "{field:?} not in {line}");
        }
        assert!(!line.contains("last_error="), "{line}");

        state.status = RequestStatus::Failed;
        state.last_error = Some("device cloud refused: value not allowed".into());
        let failed = crate::telemetry::capture_logs(None, || log_written(&state));
        let line = failed.trim_end();
        assert!(line.contains(" outcome=failed "), "{line}");
        assert!(
            line.ends_with(r#" last_error="device cloud refused: value not allowed""#),
            "last_error must be the last field: {line}"
        );
    }
    use chrono::TimeZone;

    fn full_state() -> DesiredState {
        let t = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 123_456_789).unwrap();
        DesiredState {
            device_id: DeviceId::parse("bat-1").unwrap(),
            request_id: RequestId::from_stored("abc123"),
            min_soc: MinSoc::new(35).unwrap(),
            status: RequestStatus::Failed,
            requested_at: t(0),
            expires_at: t(604_800),
            applied_at: Some(t(5)),
            attempts: u32::MAX,
            last_error: Some("HTTP 422: nope".into()),
            wake_message_id: Some("abc123:wake-2".into()),
            wake_due_at: Some(t(60)),
            lease: Some(Lease {
                holder: LeaseHolder::from_stored("invocation-9"),
                until: t(30),
            }),
            updated_at: t(6),
            due_entry: Some("2027-01-15T08:01:00.123Z~bat-1~0a1b2c3d4e5f".into()),
            unpruned: 7,
            pruned_at: Some(t(1)),
            last_event_seq: 12,
            confirmed_at: Some(t(3)),
            reported_min_soc: Some(45),
            drift_detected_at: Some(t(4)),
        }
    }

    #[test]
    fn a_row_filed_under_an_all_dots_partition_is_unreadable_not_a_device() {
        for key in [".", "..", "..."] {
            let mut entity = desired_to_entity(&full_state());
            entity.insert("PartitionKey".into(), key.into());
            entity.insert("odata.etag".into(), "W/\"1\"".into());
            let corrupt = desired_from_entity(&entity).unwrap_err();
            assert_eq!(corrupt.partition_key, key);
            assert_eq!(corrupt.reason, "PartitionKey is not a device id");
            let page = pending_page(&[entity]);
            assert!(page.records.is_empty(), "{key:?}");
            assert_eq!(page.corrupt, vec![corrupt]);
        }
    }

    #[test]
    fn a_desired_state_maps_to_an_entity_and_back_without_loss() {
        let s = full_state();
        let e = desired_to_entity(&s);
        assert_eq!(e["Status"], "failed");
        assert_eq!(e["RowKey"], "desired");
        assert_eq!(e["Attempts@odata.type"], "Edm.Int64");
        assert_eq!(e["RequestedAt"], "2027-01-15T08:00:00.123456789Z");
        assert_eq!(desired_from_entity(&e).unwrap(), s);
    }

    #[test]
    fn absent_optionals_are_absent_properties() {
        let mut s = full_state();
        s.applied_at = None;
        s.last_error = None;
        s.wake_message_id = None;
        s.wake_due_at = None;
        s.lease = None;
        s.due_entry = None;
        let e = desired_to_entity(&s);
        for absent in [
            "AppliedAt",
            "LastError",
            "WakeMessageId",
            "WakeDueAt",
            "LeaseHolder",
            "LeaseUntil",
            "DueEntry",
        ] {
            assert!(!e.contains_key(absent), "{absent}");
        }
        assert_eq!(desired_from_entity(&e).unwrap(), s);
    }

    #[test]
    fn an_unreadable_row_is_an_error_naming_the_field() {
        let mut e = desired_to_entity(&full_state());
        e.insert("Status".into(), "weird".into());
        let err = desired_from_entity(&e).unwrap_err().to_string();
        assert!(err.contains("Status"), "{err}");
        let mut e = desired_to_entity(&full_state());
        e.insert("MinSoc".into(), 101.into());
        assert!(desired_from_entity(&e)
            .unwrap_err()
            .to_string()
            .contains("MinSoc"));
    }

    #[test]
    fn idempotency_row_keys_are_hex_so_forbidden_characters_cannot_appear() {
        let key = IdempotencyKey::parse(br"a/b#c?d\e").unwrap();
        let row = idempotency_row(&key);
        assert_eq!(row, "idem-612f6223633f645c65");
        assert!(row.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    }
}
