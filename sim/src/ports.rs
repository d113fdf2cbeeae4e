//! The product's ports, simulated: a ledger with real ETag semantics, a device
//! cloud, a Service Bus queue and per-instance clocks. Each invocation gets its own
//! set (they know who calls, for the trace, the observations and the crash point).
//!
//! Every operation follows one plan drawn from its [`Dice`]: when it takes effect
//! (a read reads, a write commits, a PUT lands) and when the caller hears back. A
//! fault changes the plan: an error before any effect, an effect followed by a
//! timeout (ambiguous), a slow answer within the timeout, a PUT landing after the
//! caller's timeout (within the late-landing bound).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use soc_settings::adapters::device_budget::BudgetedDeviceApi;
use soc_settings::domain::due_index::{self, DueEntry};
use soc_settings::domain::history::HistoryEntry;
use soc_settings::domain::notification::Notification;
use soc_settings::domain::sweep_state::SweepState;
use soc_settings::domain::{DesiredState, DeviceId, IdempotencyKey, MinSoc, RequestId};
use soc_settings::functions::{Policy, Services};
use soc_settings::ports::{
    Clock, DeviceApi, DeviceError, DeviceStatus, ETag, IdempotencyRecord, KeyWrite, Ledger,
    Notifier, NotifyError, OutgoingMessage, PendingPage, Precondition, QueueError, SettingsQueue,
    StoreError, Versioned,
};
use tokio::sync::{oneshot, Notify};

use crate::scenario::{Dependency, Forced};
use crate::world::{Dice, Inv, Kind, Landing, PutRecord, QueuedMessage, SendRecord, Shared, World};

/// The ports of one invocation, and the scope its code must run in ([`Caller::scope`]).
pub fn services(
    world: &Shared,
    inv: &Arc<Inv>,
    policy: Policy,
    notify: &Arc<Notify>,
) -> (Services, Caller) {
    let port = Port {
        world: world.clone(),
        inv: inv.clone(),
        notify: notify.clone(),
        policy,
    };
    let budget = {
        let mut w = world.lock().unwrap();
        let rate = w.sc.device_rate;
        rate.map(|rate| {
            w.instances[inv.instance]
                .budget
                .get_or_insert_with(|| Arc::new(BudgetedDeviceApi::new(ScopedDevice, rate)))
                .clone()
        })
    };
    let device: Arc<dyn DeviceApi> = match budget {
        Some(inner) => Arc::new(Observed {
            port: port.clone(),
            inner,
        }),
        None => Arc::new(SimDevice(port.clone())),
    };
    let services = Services {
        device,
        queue: Arc::new(SimQueue(port.clone())),
        ledger: Arc::new(SimLedger(port.clone())),
        clock: Arc::new(SimClock(port.clone())),
        notifier: world
            .lock()
            .unwrap()
            .sc
            .notify
            .map(|_| Arc::new(SimTopic(port.clone())) as Arc<dyn Notifier>),
        policy,
    };
    (services, Caller(port))
}

tokio::task_local! {
    /// The invocation whose code is running: the instance's device-call budget (shared
    /// by its invocations, as in one process) calls the device cloud on its behalf.
    static CALLER: Port;
}

/// The invocation a future runs as.
pub struct Caller(Port);

impl Caller {
    /// Runs `fut` as this invocation's code.
    pub fn scope<F: std::future::Future>(
        self,
        fut: F,
    ) -> impl std::future::Future<Output = F::Output> {
        CALLER.scope(self.0, fut)
    }
}

/// The device cloud as the instance's budget sees it: whichever invocation calls.
struct ScopedDevice;

#[async_trait]
impl DeviceApi for ScopedDevice {
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        SimDevice(CALLER.with(Port::clone)).status(device).await
    }
    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        SimDevice(CALLER.with(Port::clone))
            .status_if_free(device)
            .await
    }
    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        SimDevice(CALLER.with(Port::clone))
            .apply_min_soc(device, min_soc, request_id)
            .await
    }
}

/// The product's device-call budget ([`BudgetedDeviceApi`], one per instance process)
/// around the simulated device cloud, with its waits, refusals and `Retry-After`
/// pauses counted as fault shapes.
struct Observed {
    port: Port,
    inner: Arc<dyn DeviceApi>,
}

impl Observed {
    fn count(&self, what: &'static str) {
        self.port.world.lock().unwrap().shape(what);
        self.port.log(|_| format!("BUDGET {what}"));
    }
}

#[async_trait]
impl DeviceApi for Observed {
    async fn reserve_put(&self) -> Result<(), DeviceError> {
        let started = tokio::time::Instant::now();
        let r = self.inner.reserve_put().await;
        if r.is_err() {
            self.count("budget: PUT refused (no turn)");
        } else if started.elapsed() >= Duration::from_millis(1) {
            self.count("budget: PUT waited for its turn");
        }
        r
    }
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        let started = tokio::time::Instant::now();
        let r = self.inner.status(device).await;
        if started.elapsed() >= Duration::from_millis(1) {
            let waited = matches!(&r, Err(DeviceError::Transient { reason, .. }) if reason.contains("budget"));
            if waited {
                self.count("budget: status call refused (no turn)");
            }
        }
        r
    }
    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.inner.status_if_free(device).await
    }
    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        let r = self.inner.apply_min_soc(device, min_soc, request_id).await;
        if matches!(&r, Err(DeviceError::Transient { reason, .. }) if reason.contains("Retry-After"))
        {
            self.count("budget: PUT refused during a Retry-After pause");
        }
        r
    }
}

#[derive(Clone)]
struct Port {
    world: Shared,
    inv: Arc<Inv>,
    notify: Arc<Notify>,
    /// For the index check (S6) after every ledger effect.
    policy: Policy,
}

/// When an operation takes effect and when its caller hears back (ms from its start).
/// `effect_at > total`: a late commit, after the caller's timeout.
struct Plan {
    effect_at: u64,
    total: u64,
    effect: bool,
    error: Option<String>,
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

impl Port {
    fn begin(&self) -> (u32, Dice, u64) {
        let seed = self.world.lock().unwrap().sc.seed;
        let (n, dice) = self.inv.op(seed);
        (n, dice, seed)
    }

    fn log(&self, what: impl FnOnce(&mut World) -> String) {
        let who = self.inv.who();
        self.world.lock().unwrap().log(&who, what);
    }

    /// The plan of ledger operation `op`: a scripted fault, an outage, a drawn fault, or
    /// a plain answer. Only a `write` can take effect after its caller's timeout.
    fn storage_plan(&self, op: u32, dice: &mut Dice, device: &str, write: bool) -> Plan {
        let mut w = self.world.lock().unwrap();
        let f = w.sc.faults;
        let timeout = w.sc.bounds.storage_timeout_ms;
        let late = w.sc.bounds.late_commit_ms;
        let who = self.inv.who();
        match w.forced(&self.inv.label, op) {
            Some(Forced::Fails) => {
                w.fault(device, &who, "ledger: fails (scripted)");
                return Plan {
                    effect_at: 1,
                    total: 1,
                    effect: false,
                    error: Some("503 server busy".into()),
                };
            }
            Some(Forced::CommitsLate(after)) if write => {
                w.fault(device, &who, "ledger: times out, commits late (scripted)");
                w.shape("ledger write commits after the caller's timeout");
                return Plan {
                    effect_at: timeout + after,
                    total: timeout,
                    effect: true,
                    error: Some(format!("timed out after {timeout} ms")),
                };
            }
            _ => {}
        }
        if !w.faults_on {
            let total = dice.int(1, 30);
            return Plan {
                effect_at: dice.int(0, total),
                total,
                effect: true,
                error: None,
            };
        }
        if let Some(outage) = w.outage(Dependency::Ledger) {
            w.shape("ledger outage");
            if write && dice.chance(outage.late_commit) {
                w.fault(device, &who, "ledger outage: times out, commits late");
                w.shape("ledger write commits after the caller's timeout");
                return Plan {
                    effect_at: timeout + dice.int(1, late),
                    total: timeout,
                    effect: true,
                    error: Some(format!("timed out after {timeout} ms")),
                };
            }
            w.fault(device, &who, "ledger outage: fails");
            let total = if dice.chance(0.5) {
                timeout
            } else {
                dice.int(1, 50)
            };
            return Plan {
                effect_at: total,
                total,
                effect: false,
                error: Some("unreachable (outage)".into()),
            };
        }
        if dice.chance(f.store_unavailable) {
            w.fault(device, &who, "ledger: 503 before any effect");
            let total = dice.int(1, 50);
            return Plan {
                effect_at: total,
                total,
                effect: false,
                error: Some("503 server busy".into()),
            };
        }
        if dice.chance(f.store_ambiguous) {
            let effect = dice.chance(0.7);
            let mut effect_at = dice.int(1, timeout - 1);
            if effect && write && dice.chance(f.late_commit) {
                // Committed after the caller gave up, and after its read-back started.
                effect_at = timeout + dice.int(1, late);
                w.shape("ledger write commits after the caller's timeout");
            }
            w.fault(
                device,
                &who,
                match (effect, effect_at > timeout) {
                    (true, true) => "ledger: caller sees a timeout, commits later",
                    (true, false) => "ledger: takes effect, caller sees a timeout",
                    _ => "ledger: times out without effect",
                },
            );
            return Plan {
                effect_at,
                total: timeout,
                effect,
                error: Some(format!("timed out after {timeout} ms")),
            };
        }
        let total = if dice.chance(f.store_slow) {
            dice.int(1, timeout - 1)
        } else {
            dice.int(1, 40)
        };
        Plan {
            effect_at: dice.int(0, total),
            total,
            effect: true,
            error: None,
        }
    }

    /// Runs a ledger operation: `effect` is applied at the plan's effect time, in a task
    /// of its own (once sent, a write commits whether or not its caller lives on to
    /// hear the answer, and it may commit after the caller's timeout). The effect is
    /// evaluated when it commits: against the row's ETag at that moment.
    ///
    /// Every ledger operation of [`SimLedger`] goes through here: a new port method only
    /// has to call it with its effect (`write`: whether it may change the ledger).
    async fn storage<T: Send + 'static>(
        &self,
        device: &str,
        write: bool,
        effect: impl FnOnce(&mut World, &Inv) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (op, mut dice, _) = self.begin();
        self.inv.crash_point(&self.world, op, false).await;
        let plan = self.storage_plan(op, &mut dice, device, write);
        let (tx, rx) = oneshot::channel();
        if plan.effect {
            let (world, inv, policy) = (self.world.clone(), self.inv.clone(), self.policy);
            let late = plan.effect_at > plan.total;
            tokio::spawn(async move {
                sleep_ms(plan.effect_at).await;
                let mut w = world.lock().unwrap();
                let commits = w.obs.commits.len();
                let r = effect(&mut w, &inv);
                w.check_index(&policy);
                if late {
                    let landed = w.obs.commits.len() > commits;
                    w.log(&inv.who(), |_| {
                        format!(
                            "LATE ledger write lands now: {}",
                            if landed { "committed" } else { "no effect" }
                        )
                    });
                }
                let _ = tx.send(r);
            });
        }
        sleep_ms(plan.total.min(plan.effect_at)).await;
        let result = if plan.effect && plan.effect_at <= plan.total {
            rx.await.ok()
        } else {
            None
        };
        sleep_ms(plan.total.saturating_sub(plan.effect_at)).await;
        self.inv.crash_point(&self.world, op, true).await;
        match (plan.error, result) {
            (Some(e), _) => Err(StoreError::Unavailable(e)),
            (None, Some(r)) => r,
            (None, None) => Err(StoreError::Unavailable("no effect".into())),
        }
    }
}

/// Whether `on` still holds: the record at that ETag, or no record and the anchor at it.
fn holds(w: &World, device: &str, on: &Precondition) -> bool {
    match on {
        Precondition::Record(e) => w.rows.get(device).is_some_and(|r| r.1.to_string() == e.0),
        Precondition::Anchor(e) => {
            !w.rows.contains_key(device)
                && w.anchors.get(device).is_some_and(|n| n.to_string() == e.0)
        }
    }
}

fn etag_matches(slot: Option<u64>, expected: Option<&ETag>) -> bool {
    match (slot, expected) {
        (None, None) => true,
        (Some(v), Some(e)) => v.to_string() == e.0,
        _ => false,
    }
}

fn describe(w: &mut World, s: &DesiredState) -> String {
    let request = w.names.request(s.request_id.as_str());
    let lease = match &s.lease {
        None => String::new(),
        Some(l) => {
            let holder = w.names.holder_name(l.holder.as_str());
            let left = (l.until - w.true_now()).num_milliseconds();
            format!(" lease={holder}({:+.1}s)", left as f64 / 1000.0)
        }
    };
    format!(
        "{request}={} {}{lease} attempts={}",
        s.min_soc.percent(),
        s.status.as_str(),
        s.attempts
    )
}

fn show<T>(r: &Result<T, StoreError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(StoreError::Conflict) => "CONFLICT".into(),
        Err(e) => format!("ERR {e}"),
    }
}

// ------------------------------------------------------------------ ledger

struct SimLedger(Port);

/// Files `entry` in the index (an upsert by row key, with a new ETag).
fn upsert_due(w: &mut World, entry: DueEntry) {
    w.next_etag += 1;
    let n = w.next_etag;
    let key = entry.row_key();
    w.due.retain(|(e, _)| e.row_key() != key);
    w.due.push((entry, n));
}

/// The request a POST writes first is the one it tries to store (for the checker's
/// answers: a `503` names no request in its body).
fn note_tried(port: &Port, state: &DesiredState) {
    let mut w = port.world.lock().unwrap();
    let name = w.names.request(state.request_id.as_str());
    let t = w.ms();
    w.obs.first_tried.entry(name.clone()).or_insert(t);
    let i = port.inv.index;
    if port.inv.kind == Kind::Post && w.obs.invocations[i].tried.is_none() {
        w.obs.invocations[i].tried = Some(name);
    }
}

#[async_trait]
impl Ledger for SimLedger {
    async fn get(&self, device: &DeviceId) -> Result<Option<Versioned<DesiredState>>, StoreError> {
        let d = device.as_str().to_string();
        let key = d.clone();
        let r = self
            .0
            .storage(&d, false, move |w, _| {
                Ok(w.rows.get(&key).map(|(v, n)| Versioned {
                    value: v.clone(),
                    etag: ETag(n.to_string()),
                }))
            })
            .await;
        self.0.log(|w| match &r {
            Ok(Some(v)) => format!(
                "ledger.get {d} -> {} (e{})",
                describe(w, &v.value),
                v.etag.0
            ),
            Ok(None) => format!("ledger.get {d} -> none"),
            Err(e) => format!("ledger.get {d} -> ERR {e}"),
        });
        r
    }

    async fn put(
        &self,
        state: &DesiredState,
        expected: Option<&ETag>,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        self.write_record(state, None, expected, false, events)
            .await
    }

    async fn anchor(&self, device: &DeviceId) -> Result<ETag, StoreError> {
        let d = device.as_str().to_string();
        let key = d.clone();
        let r = self
            .0
            .storage(&d, true, move |w, _| {
                let n = match w.anchors.get(&key) {
                    Some(n) => *n,
                    None => {
                        w.next_etag += 1;
                        let n = w.next_etag;
                        w.anchors.insert(key, n);
                        n
                    }
                };
                Ok(ETag(n.to_string()))
            })
            .await;
        self.0.log(|_| format!("ledger.anchor {d} -> {}", show(&r)));
        r
    }

    async fn accept(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        key: Option<KeyWrite<'_>>,
        on: &Precondition,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        let d = state.device_id.as_str().to_string();
        note_tried(&self.0, state);
        let row_key = key.map(|k| (k.record.clone(), k.replaces.cloned()));
        let (device, value, entry, cond, key_row, events) = (
            d.clone(),
            state.clone(),
            replaced.cloned(),
            on.clone(),
            row_key.clone(),
            events.to_vec(),
        );
        let r = self
            .0
            .storage(&d, true, move |w, inv| {
                // One entity-group transaction: every condition first, then every write.
                if !holds(w, &device, &cond) {
                    return Err(StoreError::Conflict);
                }
                if let Some((record, replaces)) = &key_row {
                    let k = (device.clone(), record.key.as_str().to_string());
                    if !etag_matches(w.idem.get(&k).map(|r| r.1), replaces.as_ref()) {
                        return Err(StoreError::Conflict);
                    }
                    w.next_etag += 1;
                    let n = w.next_etag;
                    w.idem.insert(k, (record.clone(), n));
                }
                if let Precondition::Anchor(_) = cond {
                    w.next_etag += 1;
                    let n = w.next_etag;
                    w.anchors.insert(device.clone(), n);
                }
                let trim = value.prunes_history();
                let n = w.write_record(&device, Some(&value), entry.as_ref(), trim, &events, inv);
                Ok(ETag(n.to_string()))
            })
            .await;
        self.0.log(|w| {
            let on = match on {
                Precondition::Record(e) => format!("e{}", e.0),
                Precondition::Anchor(e) => format!("anchor e{}", e.0),
            };
            let keyed = row_key
                .as_ref()
                .map(|(k, _)| format!(" key {}", k.key.as_str()))
                .unwrap_or_default();
            format!(
                "ledger.accept {d} {}{keyed} if {on} -> {}",
                describe(w, state),
                show(&r)
            )
        });
        r
    }

    async fn fence(&self, device: &DeviceId, on: &Precondition) -> Result<(), StoreError> {
        let d = device.as_str().to_string();
        let (key, cond) = (d.clone(), on.clone());
        let r = self
            .0
            .storage(&d, true, move |w, _| {
                if !holds(w, &key, &cond) {
                    return Err(StoreError::Conflict);
                }
                w.next_etag += 1;
                let n = w.next_etag;
                match cond {
                    Precondition::Record(_) => {
                        if let Some(row) = w.rows.get_mut(&key) {
                            row.1 = n;
                        }
                    }
                    Precondition::Anchor(_) => {
                        w.anchors.insert(key, n);
                    }
                }
                Ok(())
            })
            .await;
        self.0.log(|_| format!("ledger.fence {d} -> {}", show(&r)));
        r
    }

    async fn history_entry(
        &self,
        device: &DeviceId,
        request: &RequestId,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        let key = (device.as_str().to_string(), request.as_str().to_string());
        let d = key.0.clone();
        let r = self
            .0
            .storage(&d, false, move |w, _| Ok(w.history.get(&key).cloned()))
            .await;
        self.0.log(|w| {
            let name = w.names.request(request.as_str());
            match &r {
                Ok(Some(e)) => format!(
                    "history.get {d} {name} -> {}{}",
                    e.request.status.as_str(),
                    if e.superseded_by.is_some() {
                        " superseded"
                    } else {
                        ""
                    }
                ),
                other => format!("history.get {d} {name} -> {}", show(other)),
            }
        });
        r
    }

    async fn pending_after(
        &self,
        after: Option<&DeviceId>,
        limit: usize,
    ) -> Result<(PendingPage, Option<DeviceId>), StoreError> {
        let after = after.map(|d| d.as_str().to_string());
        let page_error = {
            let (_, mut dice, _) = self.0.begin();
            let w = self.0.world.lock().unwrap();
            w.faults_on && dice.chance(w.sc.faults.page_error)
        };
        let from = after.clone();
        let r = self
            .0
            .storage("*", false, move |w, inv| {
                if page_error {
                    let who = inv.who();
                    w.fault("*", &who, "ledger: listing of pending fails");
                    return Err(StoreError::Unavailable("listing failed".into()));
                }
                let mut listed: Vec<Versioned<DesiredState>> = w
                    .rows
                    .iter()
                    .filter(|(k, (v, _))| from.as_ref().is_none_or(|a| *k > a) && v.is_pending())
                    .take(limit + 1)
                    .map(|(_, (v, n))| Versioned {
                        value: v.clone(),
                        etag: ETag(n.to_string()),
                    })
                    .collect();
                let more = listed.len() > limit;
                listed.truncate(limit);
                let next = more
                    .then(|| listed.last().map(|v| v.value.device_id.clone()))
                    .flatten();
                Ok((
                    PendingPage {
                        records: listed,
                        corrupt: Vec::new(),
                    },
                    next,
                ))
            })
            .await;
        self.0.log(|w| match &r {
            Ok((page, next)) => {
                let items: Vec<String> =
                    page.records.iter().map(|v| describe(w, &v.value)).collect();
                format!(
                    "ledger.pending_after {after:?} -> [{}] next {:?}",
                    items.join(", "),
                    next.as_ref().map(|d| d.as_str())
                )
            }
            Err(e) => format!("ledger.pending_after {after:?} -> ERR {e}"),
        });
        r
    }

    async fn outbox(&self, device: &DeviceId) -> Result<Vec<Notification>, StoreError> {
        let d = device.as_str().to_string();
        let key = d.clone();
        let r = self
            .0
            .storage(&d, false, move |w, _| {
                Ok(w.outbox
                    .range((key.clone(), 0)..=(key, u64::MAX))
                    .map(|(_, n)| n.clone())
                    .collect::<Vec<_>>())
            })
            .await;
        self.0.log(|_| match &r {
            Ok(events) => {
                let seqs: Vec<String> = events.iter().map(|e| e.seq.to_string()).collect();
                format!("outbox.list {d} -> [{}]", seqs.join(", "))
            }
            Err(e) => format!("outbox.list {d} -> ERR {e}"),
        });
        r
    }

    async fn remove_outbox(&self, device: &DeviceId, seqs: &[u64]) -> Result<(), StoreError> {
        let d = device.as_str().to_string();
        let (key, gone) = (d.clone(), seqs.to_vec());
        let r = self
            .0
            .storage(&d, true, move |w, _| {
                for seq in gone {
                    w.outbox.remove(&(key.clone(), seq));
                }
                Ok(())
            })
            .await;
        self.0
            .log(|_| format!("outbox.remove {d} {seqs:?} -> {}", show(&r)));
        r
    }

    async fn file_due(&self, entry: &DueEntry) -> Result<(), StoreError> {
        let d = entry.device_id.as_str().to_string();
        let filed = entry.clone();
        let r = self
            .0
            .storage(&d, true, move |w, _| {
                upsert_due(w, filed);
                Ok(())
            })
            .await;
        self.0.log(|w| {
            let at = (entry.due_at - w.epoch).num_milliseconds() as f64 / 1000.0;
            format!("index.file {d} at {at:.1}s -> {}", show(&r))
        });
        r
    }

    async fn file_due_batch(&self, entries: &[DueEntry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        assert!(
            entries.len() <= due_index::MAX_BATCH
                && entries.iter().all(|e| e.shard() == first.shard()),
            "a batch filing holds at most {} entries of one shard",
            due_index::MAX_BATCH
        );
        // One entity-group transaction: one operation, all of it taking effect at once
        // (or not at all), late commits included, like every other write.
        let filed = entries.to_vec();
        let r = self
            .0
            .storage(first.device_id.as_str(), true, move |w, _| {
                w.shape("index batch filing commits");
                for entry in filed {
                    upsert_due(w, entry);
                }
                Ok(())
            })
            .await;
        self.0.log(|_| {
            let devices: Vec<&str> = entries.iter().map(|e| e.device_id.as_str()).collect();
            format!(
                "index.file_batch shard {} [{}] -> {}",
                first.shard(),
                devices.join(", "),
                show(&r)
            )
        });
        r
    }

    async fn due_entries(
        &self,
        shard: u8,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<Versioned<DueEntry>>, StoreError> {
        let r = self
            .0
            .storage("*", false, move |w, _| {
                let mut listed: Vec<&(DueEntry, u64)> = w
                    .due
                    .iter()
                    .filter(|(e, _)| e.shard() == shard && e.due_at <= until)
                    .collect();
                listed.sort_by(|a, b| {
                    (a.0.due_at, a.0.device_id.as_str(), a.1).cmp(&(
                        b.0.due_at,
                        b.0.device_id.as_str(),
                        b.1,
                    ))
                });
                Ok(listed
                    .into_iter()
                    .take(limit)
                    .map(|(e, n)| Versioned {
                        value: e.clone(),
                        etag: ETag(n.to_string()),
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        if r.as_ref().map_or(true, |v| !v.is_empty()) {
            self.0.log(|_| match &r {
                Ok(v) => {
                    let items: Vec<&str> = v.iter().map(|e| e.value.device_id.as_str()).collect();
                    format!("index.due shard {shard} -> [{}]", items.join(", "))
                }
                Err(e) => format!("index.due shard {shard} -> ERR {e}"),
            });
        }
        r
    }

    async fn unfile_due(&self, entry: &DueEntry, etag: Option<&ETag>) -> Result<(), StoreError> {
        let d = entry.device_id.as_str().to_string();
        let (key, exp) = (entry.row_key(), etag.cloned());
        let r = self
            .0
            .storage(&d, true, move |w, _| {
                match w.due.iter().position(|(e, _)| e.row_key() == key) {
                    None => Ok(()),
                    Some(i) if exp.as_ref().is_none_or(|e| w.due[i].1.to_string() == e.0) => {
                        w.due.remove(i);
                        if exp.is_none() {
                            w.shape("a writer removed the index entry its record had named");
                        }
                        Ok(())
                    }
                    Some(_) => Err(StoreError::Conflict),
                }
            })
            .await;
        self.0.log(|w| {
            let at = (entry.due_at - w.epoch).num_milliseconds() as f64 / 1000.0;
            format!("index.unfile {d} at {at:.1}s -> {}", show(&r))
        });
        r
    }

    async fn sweep_state(&self) -> Result<Option<Versioned<SweepState>>, StoreError> {
        let r = self
            .0
            .storage("*", false, |w, _| {
                Ok(w.sweep_state.as_ref().map(|(v, n)| Versioned {
                    value: v.clone(),
                    etag: ETag(n.to_string()),
                }))
            })
            .await;
        self.0.log(|_| format!("sweep_state.get -> {}", show(&r)));
        r
    }

    async fn put_sweep_state(
        &self,
        state: &SweepState,
        expected: Option<&ETag>,
    ) -> Result<ETag, StoreError> {
        let (value, exp) = (state.clone(), expected.cloned());
        let r = self
            .0
            .storage("*", true, move |w, _| {
                if !etag_matches(w.sweep_state.as_ref().map(|s| s.1), exp.as_ref()) {
                    return Err(StoreError::Conflict);
                }
                let renewed = w.sweep_state.as_ref().is_some_and(|(held, _)| {
                    held.holder.is_some() && held.holder == value.holder && held.until < value.until
                });
                if renewed {
                    w.shape("sweep renews its lease");
                }
                w.next_etag += 1;
                let n = w.next_etag;
                w.sweep_state = Some((value, n));
                Ok(ETag(n.to_string()))
            })
            .await;
        self.0.log(|w| {
            let holder = state
                .holder
                .as_ref()
                .map(|h| w.names.holder_name(h.as_str()))
                .unwrap_or_else(|| "none".into());
            format!("sweep_state.put holder={holder} -> {}", show(&r))
        });
        r
    }

    async fn get_idempotency(
        &self,
        device: &DeviceId,
        key: &IdempotencyKey,
    ) -> Result<Option<Versioned<IdempotencyRecord>>, StoreError> {
        let k = (device.as_str().to_string(), key.as_str().to_string());
        let row = k.clone();
        let r = self
            .0
            .storage(&k.0, false, move |w, _| {
                Ok(w.idem.get(&row).map(|(v, n)| Versioned {
                    value: v.clone(),
                    etag: ETag(n.to_string()),
                }))
            })
            .await;
        self.0.log(|_| match &r {
            Ok(Some(v)) => {
                let request = v.value.request_id.as_str().to_string();
                format!("idem.get {}/{} -> {request}", k.0, k.1)
            }
            other => format!("idem.get {}/{} -> {}", k.0, k.1, show(other)),
        });
        r
    }
}

impl SimLedger {
    /// A record write (`put`): conditional on `expected` (insert if `None`), with its
    /// history in the same atomic write; `trim`: keep the history bounded.
    async fn write_record(
        &self,
        state: &DesiredState,
        replaced: Option<&HistoryEntry>,
        expected: Option<&ETag>,
        trim: bool,
        events: &[Notification],
    ) -> Result<ETag, StoreError> {
        let d = state.device_id.as_str().to_string();
        note_tried(&self.0, state);
        let (key, value, entry, exp, events) = (
            d.clone(),
            state.clone(),
            replaced.cloned(),
            expected.cloned(),
            events.to_vec(),
        );
        let r = self
            .0
            .storage(&d, true, move |w, inv| {
                if !etag_matches(w.rows.get(&key).map(|r| r.1), exp.as_ref()) {
                    return Err(StoreError::Conflict);
                }
                let n = w.write_record(&key, Some(&value), entry.as_ref(), trim, &events, inv);
                Ok(ETag(n.to_string()))
            })
            .await;
        self.0.log(|w| {
            let exp = expected
                .map(|e| format!("e{}", e.0))
                .unwrap_or("insert".into());
            format!(
                "ledger.{} {d} {} if {exp} -> {}",
                if trim { "accept" } else { "put" },
                describe(w, state),
                show(&r)
            )
        });
        r
    }
}

// ------------------------------------------------------------------ event topic

/// The app's event topic: keeps what it accepts, in arrival order
/// ([`crate::world::Observations::arrivals`]). A publish is refused before anything is
/// kept, or kept while its caller hears a timeout; during a topic outage every publish
/// fails, a share of them kept all the same.
struct SimTopic(Port);

#[async_trait]
impl Notifier for SimTopic {
    async fn publish(&self, events: &[Notification]) -> Result<(), NotifyError> {
        let port = &self.0;
        let (op, mut dice, _) = port.begin();
        port.inv.crash_point(&port.world, op, false).await;
        let device = events
            .first()
            .map_or("*".to_string(), |e| e.device_id.as_str().to_string());
        let (keep_at, total, error) = {
            let mut w = port.world.lock().unwrap();
            let who = port.inv.who();
            let timeout = 10_000;
            let topic = w.sc.notify.filter(|_| w.faults_on);
            let normal = dice.int(1, 50);
            match topic {
                _ if w.outage(Dependency::Topic).is_some() => {
                    w.shape("event topic outage");
                    let late = w.outage(Dependency::Topic).map_or(0.0, |o| o.late_commit);
                    if dice.chance(late) {
                        w.fault(&device, &who, "topic outage: times out, keeps the events");
                        (Some(dice.int(1, timeout)), timeout, Some("timed out"))
                    } else {
                        w.fault(&device, &who, "topic outage: fails");
                        (None, normal, Some("503 (outage)"))
                    }
                }
                Some(t) if dice.chance(t.unavailable) => {
                    w.fault(&device, &who, "topic: 503 before keeping anything");
                    (None, normal, Some("503"))
                }
                Some(t) if dice.chance(t.ambiguous) => {
                    w.fault(
                        &device,
                        &who,
                        "topic: keeps the events, caller sees a timeout",
                    );
                    w.shape("event topic keeps a publish whose caller timed out");
                    (Some(dice.int(1, timeout)), timeout, Some("timed out"))
                }
                _ => (Some(dice.int(0, normal - 1)), normal, None),
            }
        };
        if let Some(at) = keep_at {
            // Kept at its time whether or not the caller lives on to hear it.
            let (world, batch) = (port.world.clone(), events.to_vec());
            let who = port.inv.who();
            tokio::spawn(async move {
                sleep_ms(at).await;
                let mut w = world.lock().unwrap();
                let t = w.ms();
                w.log(&who, |_| {
                    let ids: Vec<String> = batch
                        .iter()
                        .map(|e| format!("{}#{}", e.device_id, e.seq))
                        .collect();
                    format!("TOPIC keeps [{}]", ids.join(", "))
                });
                w.obs.arrivals.extend(batch.into_iter().map(|e| (t, e)));
            });
        }
        sleep_ms(total).await;
        port.inv.crash_point(&port.world, op, true).await;
        if error.is_none() && port.inv.kind == Kind::Sweep {
            port.world
                .lock()
                .unwrap()
                .shape("the sweep publishes events from an outbox");
        }
        port.log(|_| {
            format!(
                "topic.publish {device} {} events -> {}",
                events.len(),
                error.unwrap_or("ok")
            )
        });
        match error {
            None => Ok(()),
            Some(reason) => Err(NotifyError::Unavailable {
                reason: reason.into(),
                retry_after: None,
            }),
        }
    }
}

// ------------------------------------------------------------------ device cloud

struct SimDevice(Port);

/// Whether the device adapter reports a PUT answered `408/500/502/503/504` as an
/// unknown outcome (`unanswered: true`). The sim device stands in for the adapter
/// (`adapters::device_api`), so it must map statuses the way the adapter does
/// (`adapters::device_api::outcome_unknown`).
pub const PUT_5XX_IS_UNKNOWN_OUTCOME: bool = true;

/// The adapter's error for an answered error status (`429` or `5xx`).
fn answered_error(what: &str, status: u16, retry_after: Option<Duration>) -> DeviceError {
    DeviceError::Transient {
        reason: format!("{what}: device API error (HTTP {status})"),
        retry_after,
        unanswered: PUT_5XX_IS_UNKNOWN_OUTCOME
            && what == "PUT"
            && matches!(status, 408 | 500 | 502 | 503 | 504),
    }
}

fn land(w: &mut World, index: usize) -> Landing {
    let t = w.ms();
    let put = &w.obs.puts[index];
    let (device, min_soc, request) = (put.device.clone(), put.min_soc, put.request.clone());
    let landing = match w.devices.get_mut(&device) {
        None => Landing::Unknown,
        Some(d) if !d.known => Landing::Unknown,
        Some(d) if !d.online => Landing::Offline,
        Some(d) if d.reject_below.is_some_and(|floor| min_soc < floor) => Landing::Rejected,
        Some(d) => {
            d.value = Some((min_soc, request.clone()));
            Landing::Applied
        }
    };
    if matches!(landing, Landing::Unknown | Landing::Rejected) {
        w.obs
            .permanent
            .push((t, device.clone(), Some(request.clone())));
    }
    let put = &mut w.obs.puts[index];
    put.landing = Some(landing.clone());
    if landing == Landing::Applied {
        put.land_t = Some(t);
    }
    let inv = put.inv.clone();
    w.log("device", |_| {
        format!("PUT {device} {request}={min_soc} (sent by {inv}) lands: {landing:?}")
    });
    landing
}

/// Lands PUT `index` `at` ms from now, whatever becomes of its caller.
fn land_later(world: &Shared, index: usize, at: u64) {
    let world = world.clone();
    tokio::spawn(async move {
        sleep_ms(at).await;
        land(&mut world.lock().unwrap(), index);
    });
}

/// A call during a device-cloud outage: a timeout, or a `503` (maybe with `Retry-After`).
async fn outage_answer<T>(dice: &mut Dice, what: &str, timeout: u64) -> Result<T, DeviceError> {
    if dice.chance(0.5) {
        sleep_ms(timeout).await;
        return Err(DeviceError::Transient {
            reason: format!("timed out after {timeout} ms"),
            retry_after: None,
            unanswered: true,
        });
    }
    sleep_ms(dice.int(1, 300)).await;
    let retry_after = dice
        .chance(0.5)
        .then(|| Duration::from_secs(dice.int(1, 60)));
    Err(answered_error(what, 503, retry_after))
}

#[async_trait]
impl DeviceApi for SimDevice {
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.read(device, false).await
    }

    /// The confirmation read after a PUT (`apply`): counted apart from the status calls
    /// that decide what to do (S5).
    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.read(device, true).await
    }

    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        self.put(device, min_soc, request_id).await
    }
}

impl SimDevice {
    /// `GET /devices/{id}`; `confirming`: the read after a PUT.
    async fn read(&self, device: &DeviceId, confirming: bool) -> Result<DeviceStatus, DeviceError> {
        let d = device.as_str().to_string();
        let (op, mut dice, _) = self.0.begin();
        self.0.inv.crash_point(&self.0.world, op, false).await;
        let (faults, timeout, on, outage) = {
            let mut w = self.0.world.lock().unwrap();
            let i = self.0.inv.index;
            let calls = &mut w.obs.invocations[i];
            if confirming {
                calls.confirmation_reads.push(d.clone());
            } else {
                calls.status_calls.push(d.clone());
            }
            let outage = w.outage(Dependency::DeviceCloud).is_some();
            (
                w.sc.faults,
                w.sc.bounds.device_timeout_ms,
                w.faults_on,
                outage,
            )
        };
        let fault = |what: &str| {
            let who = self.0.inv.who();
            self.0.world.lock().unwrap().fault(&d, &who, what);
        };
        let result = if outage {
            fault("device cloud outage: status fails");
            self.0.world.lock().unwrap().shape("device cloud outage");
            outage_answer(&mut dice, "GET", timeout).await
        } else if on && dice.chance(faults.device_timeout) {
            fault("device: status times out");
            sleep_ms(timeout).await;
            Err(DeviceError::Transient {
                reason: "timed out".into(),
                retry_after: None,
                unanswered: true,
            })
        } else if on && dice.chance(faults.device_transient) {
            fault("device: status 503");
            sleep_ms(dice.int(1, 300)).await;
            let retry_after = dice
                .chance(0.5)
                .then(|| Duration::from_secs(dice.int(1, 30)));
            Err(answered_error("GET", 503, retry_after))
        } else {
            let lat = if on && dice.chance(faults.device_slow) {
                dice.int(1, timeout - 1)
            } else {
                dice.int(5, 200)
            };
            sleep_ms(lat).await;
            let mut w = self.0.world.lock().unwrap();
            let t = w.ms();
            match w.devices.get(&d) {
                Some(s) if s.known => {
                    let status = DeviceStatus {
                        online: s.online,
                        min_soc: s.value.as_ref().map(|v| v.0),
                    };
                    w.obs.status_answers.push((t, d.clone(), status.min_soc));
                    Ok(status)
                }
                _ => {
                    let t = w.ms();
                    w.obs.permanent.push((t, d.clone(), None));
                    Err(DeviceError::UnknownDevice)
                }
            }
        };
        self.0.inv.crash_point(&self.0.world, op, true).await;
        self.0.log(|_| {
            format!(
                "device.status {d} -> {:?}",
                result.as_ref().map(|s| s.online)
            )
        });
        result
    }

    /// `PUT /devices/{id}/settings/min-soc`.
    async fn put(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        let d = device.as_str().to_string();
        let (op, mut dice, _) = self.0.begin();
        self.0.inv.crash_point(&self.0.world, op, false).await;
        let (index, faults, bounds, on, request, forced, outage) = {
            let mut w = self.0.world.lock().unwrap();
            let request = w.names.request(request_id.as_str());
            let t = w.ms();
            let index = w.obs.puts.len();
            w.obs.puts.push(PutRecord {
                device: d.clone(),
                request: request.clone(),
                min_soc: min_soc.percent(),
                inv: self.0.inv.label.clone(),
                sent_t: t,
                land_t: None,
                landing: None,
                answered_ok: false,
                heard: false,
            });
            let i = self.0.inv.index;
            w.obs.invocations[i].puts.push(request.clone());
            let forced = w.forced(&self.0.inv.label, op);
            let outage = w.outage(Dependency::DeviceCloud).is_some();
            (
                index,
                w.sc.faults,
                w.sc.bounds,
                w.faults_on,
                request,
                forced,
                outage,
            )
        };
        self.0
            .log(|_| format!("device.PUT {d} {request}={} sent", min_soc.percent()));
        let fault = |what: &str| {
            let who = self.0.inv.who();
            self.0.world.lock().unwrap().fault(&d, &who, what);
        };
        let lost = || self.0.world.lock().unwrap().obs.puts[index].landing = Some(Landing::Lost);
        let timeout = bounds.device_timeout_ms;
        let result = if let Some(Forced::Put5xxLands(status, after)) = forced {
            fault("device: PUT answered 5xx, lands later (scripted)");
            self.0
                .world
                .lock()
                .unwrap()
                .shape("5xx PUT lands after the answer");
            let answer_at = dice.int(1, 300);
            land_later(&self.0.world, index, answer_at + after);
            sleep_ms(answer_at).await;
            Err(answered_error("PUT", status, None))
        } else if outage {
            fault("device cloud outage: PUT fails, not applied");
            self.0.world.lock().unwrap().shape("device cloud outage");
            lost();
            outage_answer(&mut dice, "PUT", timeout).await
        } else if on && dice.chance(faults.device_transient) {
            let answer_at = dice.int(1, 300);
            let retry_after = dice
                .chance(0.5)
                .then(|| Duration::from_secs(dice.int(1, 30)));
            let status = [429, 500, 502, 503, 504][dice.int(0, 4) as usize];
            if status != 429 && dice.chance(faults.put_5xx_lands) {
                // The gateway answered 5xx, the backend applies it anyway, within Lt.
                fault("device: PUT answered 5xx; it still lands");
                self.0
                    .world
                    .lock()
                    .unwrap()
                    .shape("5xx PUT lands after the answer");
                land_later(
                    &self.0.world,
                    index,
                    answer_at + dice.int(1, bounds.late_landing_ms),
                );
            } else {
                fault("device: PUT 429/5xx, not applied");
                lost();
            }
            sleep_ms(answer_at).await;
            Err(answered_error("PUT", status, retry_after))
        } else if on && dice.chance(faults.device_timeout) {
            let lands = dice.chance(faults.late_landing);
            let at = dice.int(1, timeout + bounds.late_landing_ms);
            fault(if lands {
                "device: PUT times out; it still lands (maybe after the timeout)"
            } else {
                "device: PUT times out and is lost"
            });
            if lands {
                land_later(&self.0.world, index, at);
            } else {
                lost();
            }
            sleep_ms(timeout).await;
            Err(DeviceError::Transient {
                reason: format!("timed out after {timeout} ms"),
                retry_after: None,
                unanswered: true,
            })
        } else {
            let total = if on && dice.chance(faults.device_slow) {
                dice.int(2, timeout - 1)
            } else {
                dice.int(20, 500)
            };
            let at = dice.int(1, total - 1);
            // The PUT lands whether or not its caller is still there to hear the answer.
            let (tx, rx) = oneshot::channel();
            let world = self.0.world.clone();
            tokio::spawn(async move {
                sleep_ms(at).await;
                let _ = tx.send(land(&mut world.lock().unwrap(), index));
            });
            let landing = rx.await.unwrap_or(Landing::Lost);
            sleep_ms(total - at).await;
            match landing {
                Landing::Applied => Ok(()),
                Landing::Offline => Err(DeviceError::Offline),
                Landing::Unknown => Err(DeviceError::UnknownDevice),
                Landing::Rejected => Err(DeviceError::Rejected("below the vendor floor".into())),
                Landing::Lost => Err(DeviceError::Transient {
                    reason: "lost".into(),
                    retry_after: None,
                    unanswered: false,
                }),
            }
        };
        self.0.inv.crash_point(&self.0.world, op, true).await;
        {
            let mut w = self.0.world.lock().unwrap();
            w.obs.puts[index].heard = true;
            w.obs.puts[index].answered_ok = result.is_ok();
        }
        self.0
            .log(|_| format!("device.PUT {d} {request} answered {result:?}"));
        result
    }
}

// ------------------------------------------------------------------ Service Bus

struct SimQueue(Port);

#[async_trait]
impl SettingsQueue for SimQueue {
    async fn send(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        let d = message.body.device_id.clone();
        let (op, mut dice, _) = self.0.begin();
        self.0.inv.crash_point(&self.0.world, op, false).await;
        let (faults, timeout, late, on, forced, outage) = {
            let w = self.0.world.lock().unwrap();
            (
                w.sc.faults,
                w.sc.bounds.send_timeout_ms,
                w.sc.bounds.late_commit_ms,
                w.faults_on,
                w.forced(&self.0.inv.label, op),
                w.outage(Dependency::Bus),
            )
        };
        let fault = |what: &str| {
            let who = self.0.inv.who();
            self.0.world.lock().unwrap().fault(&d, &who, what);
        };
        let shape = |what: &'static str| self.0.world.lock().unwrap().shape(what);
        // (enqueued at, answered at, error): enqueued after the answer = a late send.
        let (enqueue_at, total, error) = match forced {
            Some(Forced::Fails) => {
                fault("queue: send fails (scripted)");
                (None, 1, Some("503 from broker"))
            }
            Some(Forced::CommitsLate(after)) => {
                fault("queue: send times out, enqueued later (scripted)");
                shape("send enqueued after the caller's timeout");
                (Some(timeout + after), timeout, Some("timed out"))
            }
            _ if outage.is_some() => {
                shape("Service Bus outage");
                let o = outage.expect("outage");
                if dice.chance(o.late_commit) {
                    fault("Service Bus outage: send times out, enqueued later");
                    shape("send enqueued after the caller's timeout");
                    (
                        Some(timeout + dice.int(1, late)),
                        timeout,
                        Some("timed out"),
                    )
                } else {
                    fault("Service Bus outage: send fails");
                    let total = if dice.chance(0.5) {
                        timeout
                    } else {
                        dice.int(1, 200)
                    };
                    (None, total, Some("unreachable (outage)"))
                }
            }
            _ if on && dice.chance(faults.send_fail) => {
                fault("queue: send fails, nothing enqueued");
                (None, dice.int(1, 200), Some("503 from broker"))
            }
            _ if on && dice.chance(faults.send_ambiguous) => {
                let mut at = dice.int(1, timeout - 1);
                if dice.chance(faults.late_send) {
                    at = timeout + dice.int(1, late);
                    fault("queue: caller sees a timeout, enqueued later");
                    shape("send enqueued after the caller's timeout");
                } else {
                    fault("queue: enqueued, caller sees a timeout");
                }
                (Some(at), timeout, Some("timed out"))
            }
            _ => {
                let total = dice.int(1, 100);
                (Some(dice.int(0, total)), total, None)
            }
        };
        if let Some(at) = enqueue_at {
            // Sent: it is enqueued whatever becomes of the caller, maybe after its timeout.
            let jitter = if on { dice.int(0, 3_000) } else { 0 };
            let (queue, message) = (SimQueue(self.0.clone()), message.clone());
            tokio::spawn(async move {
                sleep_ms(at).await;
                queue.enqueue(&message, jitter);
            });
        }
        sleep_ms(total).await;
        self.0.inv.crash_point(&self.0.world, op, true).await;
        let result = match error {
            Some(_) => Err(QueueError::Unreachable),
            None => Ok(()),
        };
        self.0.log(|w| {
            let m = w.names.message(&message.message_id);
            format!(
                "queue.send {m} -> {}",
                if result.is_ok() { "ok" } else { "ERR" }
            )
        });
        result
    }
}

impl SimQueue {
    fn enqueue(&self, message: &OutgoingMessage, jitter: u64) {
        let mut w = self.0.world.lock().unwrap();
        let now = w.ms();
        let name = w.names.message(&message.message_id);
        let request = w.names.request(message.body.request_id.as_str());
        let device = message.body.device_id.clone();
        let enqueued = !w
            .queue
            .iter()
            .any(|m| m.message_id == message.message_id && !m.done);
        w.obs.sends.push(SendRecord {
            t: now,
            request: request.clone(),
            device: device.clone(),
            message: name.clone(),
            inv: self.0.inv.label.clone(),
            inv_kind: self.0.inv.kind,
            enqueued,
        });
        let i = self.0.inv.index;
        w.obs.invocations[i].sends.push(request.clone());
        if !enqueued {
            w.log("broker", |_| format!("{name}: duplicate send dropped"));
            return;
        }
        // The broker reads the schedule on its own (true) clock.
        let nominal = message
            .scheduled_at
            .map(|at: DateTime<Utc>| w.ms_of(at))
            .unwrap_or(now)
            .max(now);
        let expires_at = nominal + message.ttl.as_millis() as u64;
        w.next_seq += 1;
        let seq = w.next_seq;
        w.queue.push(QueuedMessage {
            seq,
            message_id: message.message_id.clone(),
            name: name.clone(),
            request: request.clone(),
            device,
            body: serde_json::to_vec(&message.body).expect("wake message serialises"),
            active_at: nominal + jitter,
            expires_at,
            delivery_count: 0,
            locked_until: None,
            lock_token: 0,
            done: false,
        });
        w.log("broker", |_| {
            format!(
                "{name} ({request}) enqueued, active at {:.1}s",
                (nominal + jitter) as f64 / 1000.0
            )
        });
        drop(w);
        self.0.notify.notify_one();
    }
}

// ------------------------------------------------------------------ clock

/// The instance's wall clock: true time plus the instance's skew.
struct SimClock(Port);

impl Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        let w = self.0.world.lock().unwrap();
        let skew = w.instances[self.0.inv.instance].skew_ms;
        w.true_now() + chrono::Duration::milliseconds(skew)
    }
}
