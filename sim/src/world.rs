//! The simulated world's state (ledger rows, devices, queue, instances) and what the
//! checker observes of it (commits, PUT landings, sends, answers). One `World` per
//! run behind a mutex; the run is single-threaded, so the mutex never contends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use chrono::{DateTime, TimeZone, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use soc_settings::domain::due_index::DueEntry;
use soc_settings::domain::history::{self, HistoryEntry};
use soc_settings::domain::notification::Notification;
use soc_settings::domain::sweep_state::SweepState;
use soc_settings::domain::{DesiredState, RequestId, RequestStatus};
use soc_settings::ports::DeviceApi;
use soc_settings::ports::IdempotencyRecord;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::scenario::{Dependency, Forced, Scenario, MAX_CRASH_OP};

pub type Shared = Arc<Mutex<World>>;

/// True wall-clock time at the start of every run (virtual millisecond 0).
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
}

/// What kind of invocation of the function app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Post,
    Delivery,
    Sweep,
    /// `DeviceEventsHttp`: the vendor's connection event.
    Event,
    /// `GET` of the device's latest request or of one request's status.
    Get,
    /// `DELETE` of one request: the client cancels it.
    Cancel,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Post => "post",
            Kind::Delivery => "deliv",
            Kind::Sweep => "sweep",
            Kind::Event => "event",
            Kind::Get => "get",
            Kind::Cancel => "cancel",
        }
    }
}

/// Short, run-stable names for the random ids the product makes (request ids,
/// message ids, lease holders): named in order of first appearance, so a replayed
/// seed prints the same trace although the uuids differ.
#[derive(Default)]
pub struct Names {
    map: HashMap<String, String>,
    requests: usize,
    messages: usize,
}

impl Names {
    pub fn request(&mut self, raw: &str) -> String {
        if let Some(n) = self.map.get(raw) {
            return n.clone();
        }
        self.requests += 1;
        let n = format!("R{}", self.requests);
        self.map.insert(raw.to_string(), n.clone());
        n
    }
    pub fn message(&mut self, raw: &str) -> String {
        if let Some(n) = self.map.get(raw) {
            return n.clone();
        }
        self.messages += 1;
        let n = format!("M{}", self.messages);
        self.map.insert(raw.to_string(), n.clone());
        n
    }
    pub fn holder(&mut self, raw: &str, by: &str) -> String {
        self.map
            .entry(raw.to_string())
            .or_insert_with(|| by.to_string())
            .clone()
    }
    /// `text` with every product id in it (32 hex digits, a uuid's simple form)
    /// replaced by its short name, so that traces do not depend on the uuids.
    pub fn replace_ids(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find(|c: char| c.is_ascii_hexdigit()) {
            out.push_str(&rest[..start]);
            rest = &rest[start..];
            let len = rest
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(rest.len());
            let token = &rest[..len];
            if len == 32 {
                let short = self
                    .map
                    .iter()
                    .find(|(k, _)| k.ends_with(token))
                    .map(|(_, v)| v.as_str());
                out.push_str(short.unwrap_or("<id>"));
            } else {
                out.push_str(token);
            }
            rest = &rest[len..];
        }
        out.push_str(rest);
        out
    }

    pub fn holder_name(&self, raw: &str) -> String {
        self.map
            .get(raw)
            .cloned()
            .unwrap_or_else(|| "?".to_string())
    }
}

/// One committed ledger change of a desired-state record.
#[derive(Debug, Clone)]
pub struct Commit {
    pub t: u64,
    pub device: String,
    /// `None`: the record was deleted.
    pub request: Option<String>,
    pub status: Option<RequestStatus>,
    pub lease: Option<(String, DateTime<Utc>)>,
    pub inv: String,
}

#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub device: String,
    pub min_soc: u8,
    /// Order of first commit across the run: the request's age (larger = newer).
    pub age: usize,
    pub created_by: String,
    pub created_t: u64,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Landing {
    Applied,
    Offline,
    Unknown,
    Rejected,
    /// Timed out and never reached the device.
    Lost,
}

#[derive(Debug, Clone)]
pub struct PutRecord {
    pub device: String,
    pub request: String,
    pub min_soc: u8,
    pub inv: String,
    pub sent_t: u64,
    pub land_t: Option<u64>,
    pub landing: Option<Landing>,
    /// The caller heard `applied` (and so could record it).
    pub answered_ok: bool,
    /// The caller heard the answer at all.
    pub heard: bool,
}

#[derive(Debug, Clone)]
pub struct SendRecord {
    pub t: u64,
    pub request: String,
    pub device: String,
    pub message: String,
    pub inv: String,
    pub inv_kind: Kind,
    pub enqueued: bool,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub inv: String,
    pub t: u64,
    pub status: u16,
    pub device: String,
    /// From the body, or else the request this invocation created.
    pub request: Option<String>,
    pub replayed: bool,
    /// The body says `"status": "applied"`.
    pub applied: bool,
    /// The body names a `requestId`.
    pub carries_id: bool,
}

/// The answer to one `DELETE .../soc/requests/{request}` (a cancel).
#[derive(Debug, Clone)]
pub struct CancelAnswer {
    pub inv: String,
    /// When the `DELETE` was sent and answered.
    pub start: u64,
    pub t: u64,
    pub status: u16,
    pub device: String,
    pub request: String,
    /// The body's `status` (`200`) or `requestStatus` (`409`).
    pub shown: Option<String>,
}

#[derive(Debug, Clone)]
pub struct InvRecord {
    pub label: String,
    pub kind: Kind,
    pub started: u64,
    pub ended: Option<u64>,
    pub crashed: bool,
    /// Requests this invocation created with a new ledger record.
    pub created: Vec<String>,
    /// A POST: the first request it wrote (tried to store), stored or not.
    pub tried: Option<String>,
    /// A POST: its `Idempotency-Key`.
    pub key: Option<String>,
    pub puts: Vec<String>,
    pub sends: Vec<String>,
    pub status_calls: Vec<String>,
    /// Devices it read right after a PUT of theirs (`apply`'s confirmation read).
    pub confirmation_reads: Vec<String>,
    /// Why it was dropped, if it was: `crash`, `restart`, `scale-in`, `functionTimeout`.
    pub killed: Option<&'static str>,
}

/// What became of a request, as the ledger and its history say (without the history's
/// bound: the checker's own copy, kept on every ledger effect).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// The last status the ledger held for it (the record, or its history entry).
    Status(RequestStatus),
    /// A newer request replaced it while it was pending.
    Superseded(String),
    /// The record was put back to an older request, or deleted (an undo).
    Undone,
}

/// Which resource a reader read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKind {
    /// `GET /api/devices/{id}/soc`.
    Latest,
    /// `GET /api/devices/{id}/soc/requests/{requestId}`.
    Request(String),
}

/// One answered `GET`: its time span and what it showed.
#[derive(Debug, Clone)]
pub struct Read {
    pub kind: ReadKind,
    pub device: String,
    pub start: u64,
    pub end: u64,
    pub status: u16,
    /// The request shown (`requestId` of the body).
    pub request: Option<String>,
    /// Its shown status (`pending`, `applied`, `superseded`, ...).
    pub shown: Option<String>,
}

/// Everything the checker judges.
#[derive(Default)]
pub struct Observations {
    pub commits: Vec<Commit>,
    pub requests: BTreeMap<String, RequestInfo>,
    pub puts: Vec<PutRecord>,
    pub sends: Vec<SendRecord>,
    pub answers: Vec<Answer>,
    /// Every answered cancel.
    pub cancels: Vec<CancelAnswer>,
    pub invocations: Vec<InvRecord>,
    /// (t, device or "*") of every injected fault, for the work bound S5.
    pub faults: Vec<(u64, String)>,
    pub sweeps: Vec<u64>,
    /// When each request was first written (tried), stored or not.
    pub first_tried: HashMap<String, u64>,
    /// Moments the due index did not cover a pending record (S6): (t, device, detail).
    pub index_gaps: Vec<(u64, String, String)>,
    /// What became of each request (see [`Fate`]).
    pub fates: BTreeMap<String, Fate>,
    /// Permanent device answers heard: (t, device, the PUT's request or `None` for a
    /// status call) of every `404 unknown device` and `422 rejected`.
    pub permanent: Vec<(u64, String, Option<String>)>,
    /// Every answered `GET`.
    pub reads: Vec<Read>,
    /// How often each fault shape happened (the tests show each one does).
    pub shapes: BTreeMap<&'static str, u64>,
    /// Every event written to an outbox, with the time its write committed.
    pub events_written: Vec<(u64, Notification)>,
    /// Every event the topic kept, in arrival order, with the time (repeats included).
    pub arrivals: Vec<(u64, Notification)>,
    /// Committed writes whose events are not exactly the request transitions they made
    /// (S10): (t, device, what differs).
    pub event_mismatches: Vec<(u64, String, String)>,
    /// Every status the device cloud answered: (t, device, the `minSoc` it reported).
    pub status_answers: Vec<(u64, String, Option<u8>)>,
    /// Every write that confirmed a request or recorded drift (S11): (t, device,
    /// request, the value it says the battery reported).
    pub confirmations: Vec<(u64, String, String, u8)>,
    pub drifts: Vec<(u64, String, String, u8)>,
}

pub struct DeviceState {
    pub known: bool,
    pub online: bool,
    pub reject_below: Option<u8>,
    /// The value on the device and the request that put it there.
    pub value: Option<(u8, String)>,
}

pub struct QueuedMessage {
    pub seq: u64,
    pub message_id: String,
    pub name: String,
    pub request: String,
    pub device: String,
    pub body: Vec<u8>,
    pub active_at: u64,
    pub expires_at: u64,
    pub delivery_count: u32,
    pub locked_until: Option<u64>,
    pub lock_token: u64,
    pub done: bool,
}

pub struct Instance {
    pub skew_ms: i64,
    pub generation: u32,
    pub running: Vec<Arc<Inv>>,
    /// Scaled in: takes no new invocations.
    pub removed: bool,
    /// The instance's device-call budget (a new one per process: a restart empties it).
    pub budget: Option<Arc<dyn DeviceApi>>,
}

pub struct World {
    pub sc: Arc<Scenario>,
    pub start: Instant,
    pub epoch: DateTime<Utc>,
    pub rows: BTreeMap<String, (DesiredState, u64)>,
    /// The ledger's history rows: (device, raw request id) -> entry, at most
    /// `HISTORY_KEPT_AT_MOST` per device (the accepting writes that prune keep the
    /// newest `HISTORY_LIMIT`), written in the same atomic write as the record.
    pub history: BTreeMap<(String, String), HistoryEntry>,
    pub idem: BTreeMap<(String, String), (IdempotencyRecord, u64)>,
    /// Each device's anchor row ETag (`Ledger::anchor`).
    pub anchors: BTreeMap<String, u64>,
    /// The due index: entries in filing order, each with its ETag.
    pub due: Vec<(DueEntry, u64)>,
    pub sweep_state: Option<(SweepState, u64)>,
    /// The devices' outboxes: (device, seq) -> event.
    pub outbox: BTreeMap<(String, u64), Notification>,
    pub next_etag: u64,
    pub devices: BTreeMap<String, DeviceState>,
    pub queue: Vec<QueuedMessage>,
    pub next_seq: u64,
    pub instances: Vec<Instance>,
    pub obs: Observations,
    pub names: Names,
    pub trace: Option<Vec<String>>,
    pub next_inv: u64,
    pub counts: HashMap<Kind, u64>,
    pub faults_on: bool,
    pub rng: ChaCha8Rng,
    /// The vendor's connection events draw here, so a world without events draws as before.
    pub event_rng: ChaCha8Rng,
    pub next_event: u64,
}

impl World {
    /// S6 at this instant: every pending record has a due-index entry at or before its
    /// sweep-due time, and the entry it names exists. Checked after every ledger
    /// effect; the first gap per device is kept.
    pub fn check_index(&mut self, policy: &soc_settings::functions::Policy) {
        let t = self.ms();
        let mut gaps = Vec::new();
        // Once per check, not per record: the earliest entry of each device, and every
        // entry's nonce (unique to one filing: what a record's named row key ends with).
        let mut earliest: HashMap<&str, DateTime<Utc>> = HashMap::new();
        let mut nonces: HashSet<&str> = HashSet::new();
        for (e, _) in &self.due {
            let at = earliest.entry(e.device_id.as_str()).or_insert(e.due_at);
            *at = (*at).min(e.due_at);
            nonces.insert(e.nonce.as_str());
        }
        for (device, (record, _)) in &self.rows {
            let Some(due) = policy.sweep_due(record) else {
                continue;
            };
            let covered = earliest.get(device.as_str()).is_some_and(|at| *at <= due);
            // The entry a pending record names exists (`functions::index`).
            let named = record
                .due_entry
                .as_ref()
                .is_none_or(|key| key.rsplit('~').next().is_some_and(|n| nonces.contains(n)));
            if (!covered || !named) && !self.obs.index_gaps.iter().any(|g| &g.1 == device) {
                let request = self.names.request(record.request_id.as_str());
                let gap = if covered {
                    "names an index entry that was removed"
                } else {
                    "has no index entry at or before its sweep-due time"
                };
                gaps.push((t, device.clone(), format!("pending {request} {gap}")));
            }
        }
        self.obs.index_gaps.extend(gaps);
    }

    pub fn new(sc: Arc<Scenario>, trace: bool) -> Self {
        let devices = sc
            .devices
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    DeviceState {
                        known: d.known,
                        online: d.online,
                        reject_below: d.reject_below,
                        value: None,
                    },
                )
            })
            .collect();
        let instances = sc
            .skews_ms
            .iter()
            .map(|&skew_ms| Instance {
                skew_ms,
                generation: 0,
                running: Vec::new(),
                removed: false,
                budget: None,
            })
            .collect();
        Self {
            rng: ChaCha8Rng::seed_from_u64(sc.seed ^ 0x5eed_0fc0_ffee),
            event_rng: ChaCha8Rng::seed_from_u64(sc.seed ^ 0x0e7e_47d1_ce00),
            next_event: 0,
            sc,
            start: Instant::now(),
            epoch: epoch(),
            rows: BTreeMap::new(),
            history: BTreeMap::new(),
            idem: BTreeMap::new(),
            anchors: BTreeMap::new(),
            due: Vec::new(),
            sweep_state: None,
            outbox: BTreeMap::new(),
            next_etag: 0,
            devices,
            queue: Vec::new(),
            next_seq: 0,
            instances,
            obs: Observations::default(),
            names: Names::default(),
            trace: trace.then(Vec::new),
            next_inv: 0,
            counts: HashMap::new(),
            faults_on: true,
        }
    }

    /// Virtual milliseconds since the run started (true time).
    pub fn ms(&self) -> u64 {
        (Instant::now() - self.start).as_millis() as u64
    }

    pub fn true_now(&self) -> DateTime<Utc> {
        self.epoch + chrono::Duration::milliseconds(self.ms() as i64)
    }

    /// Converts a wall-clock time (as the broker reads it: true time) to virtual ms.
    pub fn ms_of(&self, at: DateTime<Utc>) -> u64 {
        (at - self.epoch).num_milliseconds().max(0) as u64
    }

    pub fn tracing(&self) -> bool {
        self.trace.is_some()
    }

    pub fn log(&mut self, who: &str, what: impl FnOnce(&mut Self) -> String) {
        if self.trace.is_some() {
            let line = what(self);
            let line = self.names.replace_ids(&line);
            let t = self.ms();
            if let Some(trace) = self.trace.as_mut() {
                trace.push(format!(
                    "{:>5}.{:03}s  {:<10} {}",
                    t / 1000,
                    t % 1000,
                    who,
                    line
                ));
            }
        }
    }

    pub fn fault(&mut self, device: &str, who: &str, what: &str) {
        let t = self.ms();
        self.obs.faults.push((t, device.to_string()));
        let what = what.to_string();
        self.log(who, |_| format!("FAULT {what}"));
    }

    /// Counts one occurrence of a fault shape.
    pub fn shape(&mut self, what: &'static str) {
        *self.obs.shapes.entry(what).or_default() += 1;
    }

    /// The outage of `dependency` at this instant, if one is on (only while faults are).
    pub fn outage(&self, dependency: Dependency) -> Option<crate::scenario::Outage> {
        let t = self.ms();
        self.faults_on
            .then(|| {
                self.sc
                    .outages
                    .iter()
                    .find(|o| o.dependency == dependency && o.from_ms <= t && t < o.until_ms)
                    .copied()
            })
            .flatten()
    }

    /// The fault forced on operation `op` of `inv`, if a script names one.
    pub fn forced(&self, inv: &str, op: u32) -> Option<Forced> {
        self.sc
            .script
            .iter()
            .find(|s| s.inv == inv && s.op == op)
            .map(|s| s.fault)
    }

    /// Writes a device's record (or deletes it: `None`) as one atomic ledger write with
    /// its history: the entry of the request it stores and, when given, `replaced`
    /// (the entry of the request it takes the place of); keeps the newest `HISTORY_LIMIT`
    /// entries when `trim` (an accepting write that prunes). Returns the new ETag. Records the commit for the checker.
    pub fn write_record(
        &mut self,
        device: &str,
        state: Option<&DesiredState>,
        replaced: Option<&HistoryEntry>,
        trim: bool,
        events: &[Notification],
        inv: &Inv,
    ) -> u64 {
        self.next_etag += 1;
        let n = self.next_etag;
        let previous = match state {
            Some(s) => self.rows.insert(device.to_string(), (s.clone(), n)),
            None => self.rows.remove(device),
        }
        .map(|p| p.0);
        if let Some(s) = state {
            self.history.insert(
                (device.to_string(), s.request_id.as_str().to_string()),
                HistoryEntry::of(s),
            );
        }
        if let Some(e) = replaced {
            self.history.insert(
                (
                    device.to_string(),
                    e.request.request_id.as_str().to_string(),
                ),
                e.clone(),
            );
        }
        if let (true, Some(s)) = (trim, state) {
            let entries: Vec<(RequestId, _)> = self
                .history
                .range((device.to_string(), String::new())..)
                .take_while(|((d, _), _)| d == device)
                .map(|(_, e)| (e.request.request_id.clone(), e.request.requested_at))
                .collect();
            for id in history::beyond_limit(entries, &s.request_id) {
                self.history
                    .remove(&(device.to_string(), id.as_str().to_string()));
            }
        }
        let t = self.ms();
        for event in events {
            self.outbox
                .insert((device.to_string(), event.seq), event.clone());
            self.obs.events_written.push((t, event.clone()));
        }
        let ended = self.commit(device, state, previous.as_ref(), replaced, inv);
        self.check_events(device, state, previous.as_ref(), &ended, events);
        n
    }

    /// S10 for one committed write: with notifications on, its events are exactly the
    /// request transitions it made (`ended`: `{request id}.{status}`), numbered on from
    /// the record it replaced, and the new record carries the last number.
    fn check_events(
        &mut self,
        device: &str,
        state: Option<&DesiredState>,
        previous: Option<&DesiredState>,
        ended: &[String],
        events: &[Notification],
    ) {
        if self.sc.notify.is_none() {
            return;
        }
        let t = self.ms();
        // A drift event's id ends in its number, which the numbering check below judges.
        let mut written: Vec<String> = events
            .iter()
            .map(|e| match e.event_type.ends_with(".device.drifted") {
                true => format!("{device}.drifted"),
                false => e.id.clone(),
            })
            .collect();
        let mut made = ended.to_vec();
        written.sort();
        made.sort();
        let mut problems = Vec::new();
        if written != made {
            problems.push(format!(
                "wrote events {written:?} for the transitions {made:?}"
            ));
        }
        let before = previous.map_or(0, |p| p.last_event_seq);
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        let expected: Vec<u64> = (1..=events.len() as u64).map(|i| before + i).collect();
        if seqs != expected {
            problems.push(format!("numbered {seqs:?} after {before}"));
        }
        if let Some(s) = state {
            let last = before + events.len() as u64;
            if s.last_event_seq != last {
                problems.push(format!(
                    "the record says {} events, not {last}",
                    s.last_event_seq
                ));
            }
        }
        for p in problems {
            self.obs
                .event_mismatches
                .push((t, device.to_string(), self.names.replace_ids(&p)));
        }
    }

    /// Records a committed desired-state write (or deletion) for the checker, and what
    /// it means for the request it replaced.
    fn commit(
        &mut self,
        device: &str,
        state: Option<&DesiredState>,
        previous: Option<&DesiredState>,
        replaced: Option<&HistoryEntry>,
        inv: &Inv,
    ) -> Vec<String> {
        let t = self.ms();
        let mut ended = Vec::new();
        if let (Some(s), Some(p)) = (state, previous) {
            // Pending to final, or the landed PUT's `applied` over an `expired`.
            let late_applied =
                p.status == RequestStatus::Expired && s.status == RequestStatus::Applied;
            if (p.is_pending() || late_applied) && p.request_id == s.request_id && !s.is_pending() {
                ended.push(format!("{}.{}", s.request_id.as_str(), s.status.as_str()));
            }
        }
        if let Some(s) = state {
            let same = previous.filter(|p| p.request_id == s.request_id);
            let name = self.names.request(s.request_id.as_str());
            if s.confirmed_at.is_some() && same.is_none_or(|p| p.confirmed_at.is_none()) {
                self.obs.confirmations.push((
                    t,
                    device.to_string(),
                    name.clone(),
                    s.min_soc.percent(),
                ));
            }
            if let (Some(at), Some(v)) = (s.drift_detected_at, s.reported_min_soc) {
                let before = same.and_then(|p| p.drift_detected_at.zip(p.reported_min_soc));
                if before != Some((at, v)) {
                    self.obs.drifts.push((t, device.to_string(), name, v));
                    ended.push(format!("{device}.drifted"));
                }
            }
        }
        let (request, status, lease) = match state {
            None => (None, None, None),
            Some(s) => {
                let raw = s.request_id.as_str().to_string();
                let name = self.names.request(&raw);
                if !self.obs.requests.contains_key(&name) {
                    let age = self.obs.requests.len();
                    self.obs.requests.insert(
                        name.clone(),
                        RequestInfo {
                            device: device.to_string(),
                            min_soc: s.min_soc.percent(),
                            age,
                            created_by: inv.label.clone(),
                            created_t: t,
                            expires_at: s.expires_at,
                        },
                    );
                    if let Some(r) = self.inv_record(inv) {
                        r.created.push(name.clone());
                    }
                }
                self.obs.fates.insert(name.clone(), Fate::Status(s.status));
                let lease = s
                    .lease
                    .as_ref()
                    .map(|l| (self.names.holder(l.holder.as_str(), &inv.label), l.until));
                (Some(name), Some(s.status), lease)
            }
        };
        if let Some(p) = previous {
            let q = self.names.request(p.request_id.as_str());
            if request.as_deref() != Some(q.as_str()) {
                let age = |r: &str| self.obs.requests.get(r).map_or(0, |i| i.age);
                let newer = request.as_deref().is_some_and(|r| age(r) > age(&q));
                let fate = match (newer, replaced) {
                    (false, _) => Fate::Undone,
                    (true, Some(e)) if e.request.request_id == p.request_id => {
                        match &e.superseded_by {
                            Some(by) => Fate::Superseded(self.names.request(by.as_str())),
                            None => Fate::Status(e.request.status),
                        }
                    }
                    (true, _) => {
                        let e = HistoryEntry::replaced(
                            p,
                            &state.expect("newer").request_id,
                            self.true_now(),
                        );
                        match e.superseded_by {
                            Some(_) => Fate::Superseded(request.clone().unwrap_or_default()),
                            None => Fate::Status(e.request.status),
                        }
                    }
                };
                if p.is_pending() {
                    let raw = p.request_id.as_str();
                    match &fate {
                        Fate::Superseded(_) => ended.push(format!("{raw}.superseded")),
                        Fate::Status(s) if *s != RequestStatus::Pending => {
                            ended.push(format!("{raw}.{}", s.as_str()))
                        }
                        _ => {}
                    }
                }
                self.obs.fates.insert(q, fate);
            }
        }
        self.obs.commits.push(Commit {
            t,
            device: device.to_string(),
            request,
            status,
            lease,
            inv: inv.label.clone(),
        });
        ended
    }

    pub fn inv_record(&mut self, inv: &Inv) -> Option<&mut InvRecord> {
        self.obs.invocations.get_mut(inv.index)
    }

    /// A random draw for the world itself (not for one operation).
    pub fn draw(&mut self) -> f64 {
        self.rng.gen_range(0.0..1.0)
    }

    /// A random draw for the vendor's connection events.
    pub fn event_draw(&mut self) -> f64 {
        self.event_rng.gen_range(0.0..1.0)
    }
}

/// One invocation of a function: its identity, instance, and where it crashes.
pub struct Inv {
    pub id: u64,
    pub index: usize,
    pub label: String,
    pub kind: Kind,
    pub instance: usize,
    pub generation: u32,
    /// Crash at this operation number, before (false) or after (true) it takes effect.
    pub crash_at: Option<(u32, bool)>,
    /// At `crash_at` the invocation hangs (until the functionTimeout) instead.
    pub hangs: bool,
    pub ops: Mutex<u32>,
    pub abort: OnceLock<AbortHandle>,
    pub crashed: Mutex<bool>,
}

impl Inv {
    pub fn new(world: &mut World, kind: Kind) -> Arc<Inv> {
        world.next_inv += 1;
        let id = world.next_inv;
        let n = world.counts.entry(kind).or_insert(0);
        *n += 1;
        let label = format!("{}#{}", kind.name(), n);
        let live: Vec<usize> = (0..world.instances.len())
            .filter(|&i| !world.instances[i].removed)
            .collect();
        let instance = live[(world.draw() * live.len() as f64) as usize % live.len()];
        let mut dice = Dice::new(world.sc.seed, id, 0);
        // Any operation of any invocation: log-uniform over 1..=MAX_CRASH_OP, so early
        // points stay as likely as before and late ones (a sweep's 200th call) happen.
        let crash_at = (world.faults_on && dice.chance(world.sc.faults.crash)).then(|| {
            let op = (MAX_CRASH_OP as f64).powf(dice.frac()) as u32;
            (op.max(1), dice.chance(0.5))
        });
        // A fifth of them hang there instead (a stalled worker, a call that never
        // returns) until the host's functionTimeout kills them.
        let hangs = crash_at.is_some() && dice.chance(0.2);
        let scripted = world.sc.script.iter().find_map(|s| match s.fault {
            Forced::Crash(after) if s.inv == label => Some((s.op, after)),
            _ => None,
        });
        let hangs = hangs && scripted.is_none();
        let crash_at = scripted.or(crash_at);
        let index = world.obs.invocations.len();
        world.obs.invocations.push(InvRecord {
            label: label.clone(),
            kind,
            started: world.ms(),
            ended: None,
            crashed: false,
            created: Vec::new(),
            tried: None,
            key: None,
            puts: Vec::new(),
            sends: Vec::new(),
            status_calls: Vec::new(),
            confirmation_reads: Vec::new(),
            killed: None,
        });
        let inv = Arc::new(Inv {
            id,
            index,
            label,
            kind,
            instance,
            generation: world.instances[instance].generation,
            crash_at,
            hangs,
            ops: Mutex::new(0),
            abort: OnceLock::new(),
            crashed: Mutex::new(false),
        });
        world.instances[instance].running.push(inv.clone());
        inv
    }

    /// The label with the instance it runs on, for the trace.
    pub fn who(&self) -> String {
        format!("{}@i{}", self.label, self.instance)
    }

    /// Starts the next operation: its number and its dice.
    pub fn op(&self, seed: u64) -> (u32, Dice) {
        let mut n = self.ops.lock().unwrap();
        *n += 1;
        (*n, Dice::new(seed, self.id, *n))
    }

    /// Drops the invocation here if this is where it is to crash.
    pub async fn crash_point(&self, world: &Shared, op: u32, after: bool) {
        if self.crash_at == Some((op, after)) {
            if self.hangs {
                let mut w = world.lock().unwrap();
                w.shape("invocation hangs");
                w.log(&self.who(), |_| "HANGS (until the functionTimeout)".into());
            } else {
                crash(world, self, "crash");
            }
            std::future::pending::<()>().await;
        }
    }
}

/// Drops `inv` (its task is aborted at its next await) and records why.
pub fn crash(world: &Shared, inv: &Inv, why: &'static str) {
    {
        let mut crashed = inv.crashed.lock().unwrap();
        if *crashed {
            return;
        }
        *crashed = true;
    }
    let mut w = world.lock().unwrap();
    let t = w.ms();
    if let Some(r) = w.inv_record(inv) {
        r.crashed = true;
        r.ended = Some(t);
        r.killed = Some(why);
    }
    w.obs.faults.push((t, "*".into()));
    w.shape(match why {
        "crash" => "crash",
        "functionTimeout" => "functionTimeout kill",
        _ => "instance-wide kill",
    });
    if why == "crash" && *inv.ops.lock().unwrap() > 14 {
        w.shape("crash past the 14th operation");
    }
    w.log(&inv.who(), |_| format!("CRASH (invocation dropped: {why})"));
    w.instances[inv.instance].running.retain(|i| i.id != inv.id);
    drop(w);
    if let Some(h) = inv.abort.get() {
        h.abort();
    }
}

/// Deterministic randomness for one operation: the same (seed, invocation,
/// operation) always draws the same numbers, whatever else happened in the run.
pub struct Dice(ChaCha8Rng);

impl Dice {
    pub fn new(seed: u64, inv: u64, op: u32) -> Self {
        let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17)
            ^ inv.wrapping_mul(0xbf58_476d_1ce4_e5b9)
            ^ (op as u64).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self(ChaCha8Rng::seed_from_u64(mixed))
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.0.gen_range(0.0..1.0) < p
    }
    /// Uniform in `lo..=hi`.
    pub fn int(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            self.0.gen_range(lo..=hi)
        }
    }
    pub fn frac(&mut self) -> f64 {
        self.0.gen_range(0.0..1.0)
    }
}
