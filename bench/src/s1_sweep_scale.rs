//! S1: one sweep over P pending records of which D = 1% are due, for several P: ledger
//! operations, device calls, messages and wall time per run. The goal is that the cost
//! follows D, not P.
//!
//! The real `drain_soc_timer::run` over the real Table ledger in Azurite, in-process
//! (so every ledger operation can be counted at the port); the device cloud answers
//! "offline" at once and the queue only counts sends, so the time is the ledger's.
//! Records are seeded straight into the table (with their due-index entries, as a POST
//! files them): 99% with their wake-up message due in an hour, 1% overdue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Result};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use soc_settings::adapters::connection_string::StorageConnection;
use soc_settings::adapters::table_ledger::TableLedger;
use soc_settings::domain::due_index::DueEntry;
use soc_settings::domain::history::HistoryEntry;
use soc_settings::domain::notification::Notification;
use soc_settings::domain::sweep_state::SweepState;
use soc_settings::domain::{DesiredState, DeviceId, IdempotencyKey, MinSoc, RequestId};
use soc_settings::functions::{drain_soc_timer, index, Services};
use soc_settings::ports::*;

use crate::env::Env;
use crate::report::{row, Row};

/// Ledger operations by kind, counted at the port.
#[derive(Default)]
pub struct Ops {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub queries: AtomicU64,
    pub rows_listed: AtomicU64,
    /// Calls by port method.
    pub by_method: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Ops {
    fn count(&self, kind: &AtomicU64, method: &'static str) {
        inc(kind);
        *self.by_method.lock().unwrap().entry(method).or_default() += 1;
    }

    /// Calls by port method since `before` (a copy of `by_method`), as `name ×n` text.
    pub fn since(&self, before: &std::collections::BTreeMap<&'static str, u64>) -> String {
        let now = self.by_method.lock().unwrap().clone();
        let parts: Vec<String> = now
            .iter()
            .filter_map(|(m, n)| {
                let d = n - before.get(m).copied().unwrap_or(0);
                (d > 0).then(|| format!("{m} ×{d}"))
            })
            .collect();
        parts.join(", ")
    }

    pub fn methods(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.by_method.lock().unwrap().clone()
    }

    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.reads.load(Ordering::Relaxed),
            self.writes.load(Ordering::Relaxed),
            self.queries.load(Ordering::Relaxed),
            self.rows_listed.load(Ordering::Relaxed),
        )
    }
}

/// A ledger that counts what passes through it.
pub struct Counting<L> {
    pub inner: L,
    pub ops: Arc<Ops>,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[async_trait]
impl<L: Ledger> Ledger for Counting<L> {
    async fn get(&self, device: &DeviceId) -> Result<Option<Versioned<DesiredState>>, StoreError> {
        self.ops.count(&self.ops.reads, "get");
        self.inner.get(device).await
    }
    async fn put(
        &self,
        state: &DesiredState,
        expected: Option<&ETag>,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        self.ops.count(&self.ops.writes, "put");
        self.inner.put(state, expected, events).await
    }
    async fn anchor(&self, device: &DeviceId) -> Result<ETag, StoreError> {
        self.ops.count(&self.ops.reads, "anchor");
        self.inner.anchor(device).await
    }
    async fn accept(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        key: Option<KeyWrite<'_>>,
        on: &Precondition,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        self.ops.count(&self.ops.writes, "accept");
        self.inner.accept(state, replaced, key, on, events).await
    }
    async fn outbox(&self, device: &DeviceId) -> Result<Vec<Notification>, StoreError> {
        self.ops.count(&self.ops.queries, "outbox");
        self.inner.outbox(device).await
    }
    async fn remove_outbox(&self, device: &DeviceId, seqs: &[u64]) -> Result<(), StoreError> {
        self.ops.count(&self.ops.writes, "remove_outbox");
        self.inner.remove_outbox(device, seqs).await
    }
    async fn fence(&self, device: &DeviceId, on: &Precondition) -> Result<(), StoreError> {
        self.ops.count(&self.ops.writes, "fence");
        self.inner.fence(device, on).await
    }
    async fn history_entry(
        &self,
        device: &DeviceId,
        request: &RequestId,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        self.ops.count(&self.ops.reads, "history_entry");
        self.inner.history_entry(device, request).await
    }
    async fn pending_after(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<(PendingPage, Option<DeviceId>), StoreError> {
        self.ops.count(&self.ops.queries, "pending_after");
        let r = self.inner.pending_after(after, limit).await?;
        let n = (r.0.records.len() + r.0.corrupt.len()) as u64;
        self.ops.rows_listed.fetch_add(n, Ordering::Relaxed);
        Ok(r)
    }
    async fn file_due(&self, entry: &DueEntry) -> Result<(), StoreError> {
        self.ops.count(&self.ops.writes, "file_due");
        self.inner.file_due(entry).await
    }
    async fn file_due_batch(&self, entries: &[DueEntry]) -> Result<(), StoreError> {
        // One entity-group transaction: one write.
        self.ops.count(&self.ops.writes, "file_due_batch");
        self.inner.file_due_batch(entries).await
    }
    async fn due_entries(
        &self,
        shard: u8,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Versioned<DueEntry>>, StoreError> {
        self.ops.count(&self.ops.queries, "due_entries");
        let r = self.inner.due_entries(shard, until, limit).await?;
        self.ops
            .rows_listed
            .fetch_add(r.len() as u64, Ordering::Relaxed);
        Ok(r)
    }
    async fn unfile_due(&self, entry: &DueEntry, etag: Option<&ETag>) -> Result<(), StoreError> {
        self.ops.count(&self.ops.writes, "unfile_due");
        self.inner.unfile_due(entry, etag).await
    }
    async fn sweep_state(&self) -> Result<Option<Versioned<SweepState>>, StoreError> {
        self.ops.count(&self.ops.reads, "sweep_state");
        self.inner.sweep_state().await
    }
    async fn put_sweep_state(
        &self,
        state: &SweepState,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError> {
        self.ops.count(&self.ops.writes, "put_sweep_state");
        self.inner.put_sweep_state(state, expected).await
    }
    async fn get_idempotency(
        &self,
        device: &DeviceId,
        key: &IdempotencyKey,
    ) -> Result<Option<Versioned<IdempotencyRecord>>, StoreError> {
        self.ops.count(&self.ops.reads, "get_idempotency");
        self.inner.get_idempotency(device, key).await
    }
}

/// A device cloud where every device is offline; counts calls.
#[derive(Default)]
pub struct OfflineFleet {
    pub calls: AtomicU64,
}

#[async_trait]
impl DeviceApi for OfflineFleet {
    async fn status(&self, _: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        inc(&self.calls);
        Ok(DeviceStatus {
            online: false,
            min_soc: None,
        })
    }
    async fn apply_min_soc(
        &self,
        _: &DeviceId,
        _: MinSoc,
        _: &RequestId,
    ) -> Result<(), DeviceError> {
        inc(&self.calls);
        Err(DeviceError::Offline)
    }
}

/// A queue that only counts sends.
#[derive(Default)]
pub struct CountingQueue {
    pub sends: AtomicU64,
}

#[async_trait]
impl SettingsQueue for CountingQueue {
    async fn send(&self, _: &OutgoingMessage) -> Result<(), QueueError> {
        inc(&self.sends);
        Ok(())
    }
}

pub async fn run(
    env: &Env,
    sizes: &[usize],
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let policy = crate::s2_offline_calls::default_policy()?;
    let mut measured = Vec::new();
    for &p in sizes {
        let d = (p / 100).max(1);
        eprintln!("bench: S1 sweep with P={p} pending, D={d} due: seeding");
        let table = format!("benchscale{p}");
        let connection = StorageConnection::parse(&env.azurite.connection_string())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ledger = TableLedger::new(&connection, &table).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ops = Arc::new(Ops::default());
        let device = Arc::new(OfflineFleet::default());
        let queue = Arc::new(CountingQueue::default());
        let mut svc = Services {
            device: device.clone(),
            queue: queue.clone(),
            ledger: Arc::new(Counting {
                inner: ledger,
                ops: ops.clone(),
            }),
            clock: Arc::new(SystemClock),
            notifier: None,
            policy,
        };
        // The sweep's own cost: the reconciling pass is measured on its own below.
        svc.policy.reconcile_rows_per_run = 0;
        let seeded = Instant::now();
        seed(&svc, p, d).await?;
        let seed_time = seeded.elapsed();
        let before = ops.snapshot();
        let t = Instant::now();
        let report = drain_soc_timer::run(&svc).await?;
        let took = t.elapsed();
        let after = ops.snapshot();
        let (reads, writes, queries, listed) = (
            after.0 - before.0,
            after.1 - before.1,
            after.2 - before.2,
            after.3 - before.3,
        );
        ensure!(
            report.due == d,
            "S1 P={p}: the sweep took {} due, expected {d}: {report}",
            report.due
        );
        let calls = device.calls.load(Ordering::Relaxed);
        let sends = queue.sends.load(Ordering::Relaxed);
        let text = format!(
            "{} ms; ledger {reads} reads, {writes} writes, {queries} queries ({listed} rows); {calls} device calls, {sends} messages",
            took.as_millis()
        );
        notes.push(format!(
            "S1 P={p}: seeding {p} records + index entries took {:.1} s; sweep report: {report}",
            seed_time.as_secs_f64()
        ));
        measured.push((p, d, reads + writes + queries, text));
        // The reconciling pass's slice, for the record: a fixed cost per run.
        svc.policy.reconcile_rows_per_run = policy.reconcile_rows_per_run;
        let before = ops.snapshot();
        let t = Instant::now();
        let report = drain_soc_timer::run(&svc).await?;
        let after = ops.snapshot();
        notes.push(format!(
            "S1 P={p}: a run with the reconciling pass on ({} rows per run) filed {} records in {} ms with {} more ledger operations",
            policy.reconcile_rows_per_run,
            report.reconciled,
            t.elapsed().as_millis(),
            (after.0 + after.1 + after.2) - (before.0 + before.1 + before.2)
        ));
    }
    // Met when the operations per due device stay flat while P grows (within 20%).
    let per_due = |m: &(usize, usize, u64, String)| m.2 as f64 / m.1 as f64;
    let flat = match (measured.first(), measured.last()) {
        (Some(first), Some(last)) => {
            notes.push(format!(
                "S1 slope: {:.2} ledger operations per due device at P={} and {:.2} at P={} (P grew {}x, D grew {}x, operations grew {:.1}x); none per pending record that is not due",
                per_due(first),
                first.0,
                per_due(last),
                last.0,
                last.0 / first.0.max(1),
                last.1 / first.1.max(1),
                last.2 as f64 / first.2.max(1) as f64
            ));
            per_due(last) <= per_due(first) * 1.2
        }
        _ => false,
    };
    for (p, d, _, text) in measured {
        rows.push(
            row("S1", format!("sweep P={p} pending, D={d} due (1%)"), text)
                .target("cost grows with D, not P", flat),
        );
    }
    Ok(())
}

/// `p` pending records, `d` of them with their wake-up message overdue, each filed in
/// the due index as a POST files it.
async fn seed(svc: &Services, p: usize, d: usize) -> Result<()> {
    let now = Utc::now();
    let results: Vec<Result<(), StoreError>> = futures::stream::iter(0..p)
        .map(|i| async move {
            let id = DeviceId::parse(&format!("scale-{i:07}")).expect("valid id");
            let mut rec = DesiredState::accept(
                id,
                MinSoc::new(30).expect("valid"),
                now - chrono::Duration::minutes(10),
                svc.policy.request_ttl,
                None,
            );
            let due = if i % (p / d) == 0 {
                now - chrono::Duration::minutes(8)
            } else {
                now + chrono::Duration::hours(1)
            };
            rec.expect_wake(format!("m{i}"), due, now - chrono::Duration::minutes(10));
            index::put_record(svc, &mut rec, None, None)
                .await
                .map(|_| ())
        })
        .buffer_unordered(64)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}
