//! devicesim: a local stand-in for the vendor's device cloud (the contract in issue 2), with a
//! control API for tests and demos. Real HTTP server on loopback; also usable in-process through
//! [`DeviceSim`].
//!
//! Device API (requires `x-api-key`):
//! - `GET /devices/{id}` -> `200 {"deviceId","online","minSoc"}` | `404`
//! - `PUT /devices/{id}/settings/min-soc` `{"minSoc":n}` + `Idempotency-Key` ->
//!   `200`/`204` applied (online only), `409` offline, `404` unknown, `422` rejected, or an injected
//!   fault (`5xx`, `429` + `Retry-After`, hang = timeout), after optional latency.
//!
//! Control API: see `devtools/README.md` (`/_control/...`).
//!
//! Connection events (optional, [`SimState::emit_events_to`]; the binary's `--events-url`):
//! when a device goes online or offline through the control API (or the in-process
//! `set_online`, `set_all_online`, `patch`), the simulator POSTs a CloudEvent
//! (`com.vendor.device.connected` / `...disconnected`, the device id as `subject`, the
//! contract in `docs/device-api.md`) to the URL, one at a time in order, retrying a `5xx`,
//! `429` or connection error a few times like Event Grid. `?events=false` on the control
//! API's online/offline changes the state without an event (a lost event). Fleet flapping
//! emits nothing. `GET /_control/events` lists what was sent and how it was answered.
//!
//! Saved state (optional, [`DeviceSim::start_saved`]; the `devicesim` binary's `--state FILE`):
//! the devices (online, minSoc, applyCount, behaviour), the applied idempotency keys and the PUT
//! history are written to one JSON file after every change, atomically (temp file + rename), and
//! read back at start, so a restarted simulator remembers what its batteries hold, like the
//! ledger does. Scripted one-shot faults and fleet flapping are not saved (they are in-flight
//! test behaviour, not device state).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::server::{serve, ServerHandle};
use anyhow::Context;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinHandle;

/// Default API key (matches `DEVICE_API_KEY` in local.settings.json).
pub const DEFAULT_API_KEY: &str = "local-dev-key";
/// The event types of `docs/device-api.md` ("Connection events").
pub const CONNECTED_EVENT: &str = "com.vendor.device.connected";
pub const DISCONNECTED_EVENT: &str = "com.vendor.device.disconnected";
/// Deliveries of one event before giving up (the first try and the retries).
const EVENT_TRIES: u32 = 5;

/// One connection event the simulator sent, and how it was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EmittedEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub device_id: String,
    pub at: DateTime<Utc>,
    /// The receiver's last HTTP status; `None` while in flight or after connection errors.
    pub status: Option<u16>,
    pub tries: u32,
    /// The receiver's answer (its JSON, or its text), or the last connection error.
    pub answer: Option<serde_json::Value>,
}

/// Which device endpoints the random/scripted faults apply to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FaultScope {
    /// GET and PUT.
    #[default]
    All,
    /// Only `PUT .../settings/min-soc`.
    Put,
    /// Only `GET /devices/{id}`.
    Get,
}

/// A one-shot fault, consumed by the next matching request of a device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Answer with this 5xx (or any) status.
    Status { status: u16 },
    /// `429 Too Many Requests` with `Retry-After: {retry_after_seconds}`.
    TooMany {
        #[serde(rename = "retryAfterSeconds", default = "one")]
        retry_after_seconds: u64,
    },
    /// Hang for the device's `hangMs` (default 30 s) then answer 504; nothing applied.
    Timeout,
    /// Apply the setting, then hang like `Timeout` (the client never sees the success).
    TimeoutAfterApply,
}

fn one() -> u64 {
    1
}

/// Per-device behaviour. All rates are probabilities in 0..=1 drawn from the seeded RNG.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct DeviceConfig {
    pub latency_ms: u64,
    pub error_5xx_rate: f64,
    pub error_5xx_status: u16,
    pub rate_429: f64,
    pub retry_after_seconds: u64,
    pub timeout_rate: f64,
    pub hang_ms: u64,
    /// `Some(reason)`: every PUT is rejected with 422 and this reason.
    pub reject: Option<String>,
    pub fault_scope: FaultScope,
    /// 200 (with body) or 204 on success.
    pub success_status: u16,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            latency_ms: 0,
            error_5xx_rate: 0.0,
            error_5xx_status: 503,
            rate_429: 0.0,
            retry_after_seconds: 1,
            timeout_rate: 0.0,
            hang_ms: 30_000,
            reject: None,
            fault_scope: FaultScope::All,
            success_status: 200,
        }
    }
}

/// Partial update of a device (control API `PATCH /_control/devices/{id}`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevicePatch {
    pub online: Option<bool>,
    pub min_soc: Option<Option<i64>>,
    pub latency_ms: Option<u64>,
    pub error_5xx_rate: Option<f64>,
    pub error_5xx_status: Option<u16>,
    pub rate_429: Option<f64>,
    pub retry_after_seconds: Option<u64>,
    pub timeout_rate: Option<f64>,
    pub hang_ms: Option<u64>,
    /// `"reject": "reason"` sets, `"reject": null` clears.
    #[serde(default, with = "double_option")]
    pub reject: Option<Option<String>>,
    pub fault_scope: Option<FaultScope>,
    pub success_status: Option<u16>,
}

mod double_option {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Option<String>>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Option<String>>, D::Error> {
        Ok(Some(Option::<String>::deserialize(d)?))
    }
}

/// What a device looks like from outside (control API / in-process API).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceView {
    pub device_id: String,
    pub online: bool,
    pub min_soc: Option<i64>,
    /// How many times a setting was actually applied (idempotent replays do not count).
    pub apply_count: u64,
    pub config: DeviceConfig,
    pub scripted_faults: Vec<Fault>,
}

/// One received settings PUT.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PutRecord {
    pub seq: u64,
    pub device_id: String,
    /// `None` when the body was not a valid `{"minSoc": n}`.
    pub min_soc: Option<i64>,
    pub idempotency_key: Option<String>,
    pub at: DateTime<Utc>,
    /// `applied`, `replayed`, `offline`, `unknown-device`, `rejected`, `fault-5xx`, `fault-429`,
    /// `timeout`, `timeout-after-apply`, `unauthorized`, `bad-request`, `key-reused`
    pub outcome: String,
    pub status: u16,
}

/// Fleet mode: N devices flapping randomly.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct FleetConfig {
    pub count: usize,
    pub prefix: String,
    pub interval_ms: u64,
    /// Probability that a device toggles at each tick.
    pub flip_probability: f64,
    /// Probability that a device starts online.
    pub initial_online_ratio: f64,
    pub seed: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            count: 10,
            prefix: "fleet-".into(),
            interval_ms: 1000,
            flip_probability: 0.3,
            initial_online_ratio: 0.5,
            seed: 1,
        }
    }
}

impl FleetConfig {
    /// The device ids this fleet creates (`{prefix}{i:04}`).
    pub fn device_ids(&self) -> Vec<String> {
        (0..self.count)
            .map(|i| format!("{}{:04}", self.prefix, i))
            .collect()
    }
}

#[derive(Debug)]
struct Device {
    online: bool,
    min_soc: Option<i64>,
    apply_count: u64,
    config: DeviceConfig,
    scripted: VecDeque<Fault>,
}

impl Device {
    fn new(online: bool) -> Self {
        Device {
            online,
            min_soc: None,
            apply_count: 0,
            config: DeviceConfig::default(),
            scripted: VecDeque::new(),
        }
    }
}

/// The saved-state file format (see the module doc).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    devices: BTreeMap<String, SavedDevice>,
    idempotency: Vec<SavedKey>,
    history: Vec<PutRecord>,
    next_seq: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedDevice {
    online: bool,
    min_soc: Option<i64>,
    apply_count: u64,
    config: DeviceConfig,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SavedKey {
    device_id: String,
    key: String,
    min_soc: i64,
    status: u16,
}

struct Inner {
    api_key: Option<String>,
    /// Where the state is saved after every change (`None`: in memory only).
    state_file: Option<PathBuf>,
    devices: HashMap<String, Device>,
    history: Vec<PutRecord>,
    /// (deviceId, Idempotency-Key) -> (minSoc, status) of the applied result.
    idempotency: HashMap<(String, String), (i64, u16)>,
    rng: StdRng,
    fleet: Option<JoinHandle<()>>,
    next_seq: u64,
    /// Where connection events go (`None`: not sent).
    events: Option<tokio::sync::mpsc::UnboundedSender<EmittedEvent>>,
    emitted: Vec<EmittedEvent>,
}

impl Inner {
    /// Queues a connection event for the device's new state, if events are on.
    fn emit(&mut self, device_id: &str, online: bool) {
        let Some(tx) = &self.events else {
            return;
        };
        let event = EmittedEvent {
            id: uuid::Uuid::new_v4().to_string(),
            event_type: if online {
                CONNECTED_EVENT
            } else {
                DISCONNECTED_EVENT
            }
            .to_string(),
            device_id: device_id.to_string(),
            at: Utc::now(),
            status: None,
            tries: 0,
            answer: None,
        };
        if tx.send(event.clone()).is_ok() {
            self.emitted.push(event);
        }
    }

    /// Sets a device's state; an event when it changed and `emit` is set.
    fn set_online(&mut self, id: &str, online: bool, emit: bool) -> bool {
        let Some(d) = self.devices.get_mut(id) else {
            return false;
        };
        let changed = d.online != online;
        d.online = online;
        tracing::info!(device = id, online, "devicesim device state");
        if changed && emit {
            self.emit(id, online);
        }
        true
    }

    fn record(
        &mut self,
        device_id: &str,
        min_soc: Option<i64>,
        key: Option<&str>,
        outcome: &str,
        status: u16,
    ) {
        self.next_seq += 1;
        let rec = PutRecord {
            seq: self.next_seq,
            device_id: device_id.to_string(),
            min_soc,
            idempotency_key: key.map(str::to_string),
            at: Utc::now(),
            outcome: outcome.to_string(),
            status,
        };
        tracing::info!(
            device = device_id,
            min_soc = ?min_soc,
            key = ?key,
            outcome,
            status,
            "devicesim PUT"
        );
        self.history.push(rec);
        self.save();
    }

    /// Writes the saved state, if this simulator keeps one. A failed write is logged, not fatal:
    /// the simulator keeps serving from memory.
    fn save(&self) {
        let Some(path) = &self.state_file else {
            return;
        };
        let saved = Saved {
            devices: self
                .devices
                .iter()
                .map(|(id, d)| {
                    let saved = SavedDevice {
                        online: d.online,
                        min_soc: d.min_soc,
                        apply_count: d.apply_count,
                        config: d.config.clone(),
                    };
                    (id.clone(), saved)
                })
                .collect(),
            idempotency: self
                .idempotency
                .iter()
                .map(|((device_id, key), (min_soc, status))| SavedKey {
                    device_id: device_id.clone(),
                    key: key.clone(),
                    min_soc: *min_soc,
                    status: *status,
                })
                .collect(),
            history: self.history.clone(),
            next_seq: self.next_seq,
        };
        if let Err(e) = write_atomically(path, &saved) {
            tracing::warn!("devicesim: could not save its state: {e:#}");
        }
    }

    fn restore(&mut self, saved: Saved) {
        self.devices = saved
            .devices
            .into_iter()
            .map(|(id, d)| {
                let device = Device {
                    online: d.online,
                    min_soc: d.min_soc,
                    apply_count: d.apply_count,
                    config: d.config,
                    scripted: VecDeque::new(),
                };
                (id, device)
            })
            .collect();
        self.idempotency = saved
            .idempotency
            .into_iter()
            .map(|k| ((k.device_id, k.key), (k.min_soc, k.status)))
            .collect();
        self.history = saved.history;
        self.next_seq = saved.next_seq;
    }

    fn view(&self, id: &str) -> Option<DeviceView> {
        self.devices.get(id).map(|d| DeviceView {
            device_id: id.to_string(),
            online: d.online,
            min_soc: d.min_soc,
            apply_count: d.apply_count,
            config: d.config.clone(),
            scripted_faults: d.scripted.iter().cloned().collect(),
        })
    }
}

/// Shared simulator state; cheap to clone.
#[derive(Clone)]
pub struct SimState {
    inner: Arc<Mutex<Inner>>,
}

impl SimState {
    /// A new, empty simulator requiring `api_key` (`None` disables the key check).
    pub fn new(api_key: Option<String>, seed: u64) -> Self {
        SimState {
            inner: Arc::new(Mutex::new(Inner {
                api_key,
                state_file: None,
                devices: HashMap::new(),
                history: Vec::new(),
                idempotency: HashMap::new(),
                rng: StdRng::seed_from_u64(seed),
                fleet: None,
                next_seq: 0,
                events: None,
                emitted: Vec::new(),
            })),
        }
    }

    /// A simulator that keeps its state in `state_file` (see the module doc): what the file
    /// holds is loaded first, when it exists. A file that cannot be read is an error (start
    /// afresh by removing it).
    pub fn saved(api_key: Option<String>, seed: u64, state_file: &FsPath) -> anyhow::Result<Self> {
        let state = Self::new(api_key, seed);
        {
            let mut g = state.lock();
            if state_file.exists() {
                let text = std::fs::read_to_string(state_file)
                    .with_context(|| format!("reading {}", state_file.display()))?;
                let saved: Saved = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{} is not a devicesim state file (remove it to start afresh)",
                        state_file.display()
                    )
                })?;
                g.restore(saved);
            }
            g.state_file = Some(state_file.to_path_buf());
            g.save();
        }
        Ok(state)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a change of the device state and saves the result.
    fn change<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.lock();
        let r = f(&mut g);
        g.save();
        r
    }

    /// Create (or replace) a device.
    pub fn add_device(&self, id: &str, online: bool) {
        self.add_device_with(id, online, None);
    }

    /// Create (or replace) a device with a current minSoc.
    pub fn add_device_with(&self, id: &str, online: bool, min_soc: Option<i64>) {
        let mut d = Device::new(online);
        d.min_soc = min_soc;
        self.change(|g| g.devices.insert(id.to_string(), d));
    }

    pub fn remove_device(&self, id: &str) -> bool {
        self.change(|g| g.devices.remove(id).is_some())
    }

    /// Returns false when the device does not exist. A change of state sends a connection
    /// event when events are on ([`SimState::emit_events_to`]).
    pub fn set_online(&self, id: &str, online: bool) -> bool {
        self.change(|g| g.set_online(id, online, true))
    }

    /// Like [`SimState::set_online`] but never sends an event (as if the vendor's were lost).
    pub fn set_online_quietly(&self, id: &str, online: bool) -> bool {
        self.change(|g| g.set_online(id, online, false))
    }

    /// Set every device online (or offline) and stop fleet flapping.
    pub fn set_all_online(&self, online: bool) {
        self.stop_fleet();
        self.change(|g| {
            let ids: Vec<String> = g.devices.keys().cloned().collect();
            for id in ids {
                g.set_online(&id, online, true);
            }
        });
    }

    /// From now on, POST a CloudEvent to `url` (header `x-functions-key: key` when given)
    /// whenever a device's state changes through the control API (see the module doc).
    /// Needs a tokio runtime (the sender is a task of it).
    pub fn emit_events_to(&self, url: &str, key: Option<String>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(send_events(self.clone(), url.to_string(), key, rx));
        self.lock().events = Some(tx);
    }

    /// Every connection event sent, oldest first, with its answer.
    pub fn events(&self) -> Vec<EmittedEvent> {
        self.lock().emitted.clone()
    }

    /// Apply a partial update; false when the device does not exist.
    pub fn patch(&self, id: &str, p: &DevicePatch) -> bool {
        self.change(|g| Self::patch_device(g, id, p))
    }

    fn patch_device(g: &mut Inner, id: &str, p: &DevicePatch) -> bool {
        if !g.devices.contains_key(id) {
            return false;
        }
        if let Some(v) = p.online {
            g.set_online(id, v, true);
        }
        let Some(d) = g.devices.get_mut(id) else {
            return false;
        };
        if let Some(v) = p.min_soc {
            d.min_soc = v;
        }
        let c = &mut d.config;
        if let Some(v) = p.latency_ms {
            c.latency_ms = v;
        }
        if let Some(v) = p.error_5xx_rate {
            c.error_5xx_rate = v;
        }
        if let Some(v) = p.error_5xx_status {
            c.error_5xx_status = v;
        }
        if let Some(v) = p.rate_429 {
            c.rate_429 = v;
        }
        if let Some(v) = p.retry_after_seconds {
            c.retry_after_seconds = v;
        }
        if let Some(v) = p.timeout_rate {
            c.timeout_rate = v;
        }
        if let Some(v) = p.hang_ms {
            c.hang_ms = v;
        }
        if let Some(v) = &p.reject {
            c.reject = v.clone();
        }
        if let Some(v) = p.fault_scope {
            c.fault_scope = v;
        }
        if let Some(v) = p.success_status {
            c.success_status = v;
        }
        true
    }

    /// Replace a device's behaviour config.
    pub fn configure(&self, id: &str, config: DeviceConfig) -> bool {
        self.change(|g| match g.devices.get_mut(id) {
            Some(d) => {
                d.config = config;
                true
            }
            None => false,
        })
    }

    /// Queue `count` one-shot faults for the next matching requests of a device.
    pub fn script_faults(&self, id: &str, fault: Fault, count: usize) -> bool {
        match self.lock().devices.get_mut(id) {
            Some(d) => {
                for _ in 0..count {
                    d.scripted.push_back(fault.clone());
                }
                true
            }
            None => false,
        }
    }

    pub fn device(&self, id: &str) -> Option<DeviceView> {
        self.lock().view(id)
    }

    pub fn devices(&self) -> Vec<DeviceView> {
        let g = self.lock();
        let mut ids: Vec<&String> = g.devices.keys().collect();
        ids.sort();
        ids.into_iter().filter_map(|id| g.view(id)).collect()
    }

    /// Every settings PUT received, in arrival order.
    pub fn history(&self) -> Vec<PutRecord> {
        self.lock().history.clone()
    }

    pub fn history_for(&self, id: &str) -> Vec<PutRecord> {
        self.lock()
            .history
            .iter()
            .filter(|r| r.device_id == id)
            .cloned()
            .collect()
    }

    pub fn clear_history(&self) {
        self.change(|g| g.history.clear());
    }

    /// Remove all devices, history, idempotency records; stop the fleet.
    pub fn reset(&self) {
        self.stop_fleet();
        self.change(|g| {
            g.devices.clear();
            g.history.clear();
            g.idempotency.clear();
            g.next_seq = 0;
        });
    }

    /// Create the fleet's devices and start flapping them every `interval_ms` (0 = no flapping).
    pub fn start_fleet(&self, cfg: FleetConfig) -> Vec<String> {
        self.stop_fleet();
        let ids = cfg.device_ids();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        self.change(|g| {
            for id in &ids {
                let online = rng.gen_bool(cfg.initial_online_ratio.clamp(0.0, 1.0));
                g.devices.insert(id.clone(), Device::new(online));
            }
        });
        if cfg.interval_ms > 0 {
            let state = self.clone();
            let ids2 = ids.clone();
            let handle = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(cfg.interval_ms));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    state.change(|g| {
                        for id in &ids2 {
                            if rng.gen_bool(cfg.flip_probability.clamp(0.0, 1.0)) {
                                if let Some(d) = g.devices.get_mut(id) {
                                    d.online = !d.online;
                                }
                            }
                        }
                    });
                }
            });
            self.lock().fleet = Some(handle);
        }
        tracing::info!(
            count = cfg.count,
            interval_ms = cfg.interval_ms,
            "devicesim fleet started"
        );
        ids
    }

    /// Stop flapping (devices keep their current state).
    pub fn stop_fleet(&self) {
        if let Some(h) = self.lock().fleet.take() {
            h.abort();
        }
    }

    fn check_key(&self, headers: &HeaderMap) -> bool {
        let g = self.lock();
        match &g.api_key {
            None => true,
            Some(k) => headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == k),
        }
    }

    /// Decide which fault (if any) the next request of `id` gets. Returns (fault, latency, hang).
    fn draw_fault(&self, id: &str, is_put: bool) -> (Option<Fault>, u64, u64) {
        let mut g = self.lock();
        let Inner { devices, rng, .. } = &mut *g;
        let Some(d) = devices.get_mut(id) else {
            return (None, 0, 0);
        };
        let c = d.config.clone();
        let applies = match c.fault_scope {
            FaultScope::All => true,
            FaultScope::Put => is_put,
            FaultScope::Get => !is_put,
        };
        if !applies {
            return (None, c.latency_ms, c.hang_ms);
        }
        if let Some(f) = d.scripted.pop_front() {
            // A TimeoutAfterApply on a GET behaves like a plain timeout.
            let f = if !is_put && f == Fault::TimeoutAfterApply {
                Fault::Timeout
            } else {
                f
            };
            return (Some(f), c.latency_ms, c.hang_ms);
        }
        let roll: f64 = rng.gen();
        let mut acc = c.error_5xx_rate;
        let f = if roll < acc {
            Some(Fault::Status {
                status: c.error_5xx_status,
            })
        } else {
            acc += c.rate_429;
            if roll < acc {
                Some(Fault::TooMany {
                    retry_after_seconds: c.retry_after_seconds,
                })
            } else {
                acc += c.timeout_rate;
                if roll < acc {
                    Some(Fault::Timeout)
                } else {
                    None
                }
            }
        };
        (f, c.latency_ms, c.hang_ms)
    }
}

/// Writes `value` as pretty JSON to a temp file beside `path`, then renames it over `path`, so
/// a reader (or a crash) never sees half a file.
fn write_atomically(path: &FsPath, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn problem(status: StatusCode, detail: &str) -> Response {
    (status, Json(json!({"error": detail}))).into_response()
}

async fn get_device(
    State(s): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !s.check_key(&headers) {
        return problem(StatusCode::UNAUTHORIZED, "missing or wrong x-api-key");
    }
    let (fault, latency, hang) = s.draw_fault(&id, false);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if let Some(f) = fault {
        return fault_response(&f, hang).await;
    }
    match s.device(&id) {
        Some(d) => Json(json!({"deviceId": d.device_id, "online": d.online, "minSoc": d.min_soc}))
            .into_response(),
        None => problem(StatusCode::NOT_FOUND, "unknown device"),
    }
}

async fn fault_response(f: &Fault, hang_ms: u64) -> Response {
    match f {
        Fault::Status { status } => problem(
            StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "injected fault",
        ),
        Fault::TooMany {
            retry_after_seconds,
        } => (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", retry_after_seconds.to_string())],
            Json(json!({"error": "injected throttling"})),
        )
            .into_response(),
        Fault::Timeout | Fault::TimeoutAfterApply => {
            tokio::time::sleep(Duration::from_millis(hang_ms)).await;
            problem(StatusCode::GATEWAY_TIMEOUT, "injected timeout")
        }
    }
}

async fn put_min_soc(
    State(s): State<SimState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let min_soc = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("minSoc").and_then(|m| m.as_i64()));
    if !s.check_key(&headers) {
        s.lock()
            .record(&id, min_soc, key.as_deref(), "unauthorized", 401);
        return problem(StatusCode::UNAUTHORIZED, "missing or wrong x-api-key");
    }
    let (fault, latency, hang) = s.draw_fault(&id, true);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let Some(value) = min_soc.filter(|v| (0..=100).contains(v)) else {
        s.lock()
            .record(&id, min_soc, key.as_deref(), "bad-request", 400);
        return problem(
            StatusCode::BAD_REQUEST,
            "body must be {\"minSoc\": 0..=100}",
        );
    };
    match fault {
        Some(Fault::TimeoutAfterApply) => {
            // Apply like a success, then never answer in time.
            let _ = apply(&s, &id, value, key.as_deref(), "timeout-after-apply");
            return fault_response(&Fault::Timeout, hang).await;
        }
        Some(f) => {
            let outcome = match f {
                Fault::Status { .. } => "fault-5xx",
                Fault::TooMany { .. } => "fault-429",
                _ => "timeout",
            };
            let status = match &f {
                Fault::Status { status } => *status,
                Fault::TooMany { .. } => 429,
                _ => 504,
            };
            s.lock()
                .record(&id, Some(value), key.as_deref(), outcome, status);
            return fault_response(&f, hang).await;
        }
        None => {}
    }
    apply(&s, &id, value, key.as_deref(), "applied")
}

/// The non-fault part of a PUT: idempotency, unknown/offline/rejected, apply.
fn apply(s: &SimState, id: &str, value: i64, key: Option<&str>, applied_outcome: &str) -> Response {
    let mut g = s.lock();
    if let Some(k) = key {
        if let Some((prev_value, prev_status)) =
            g.idempotency.get(&(id.to_string(), k.to_string())).cloned()
        {
            if prev_value == value {
                g.record(id, Some(value), key, "replayed", prev_status);
                return success(id, value, prev_status);
            }
            g.record(id, Some(value), key, "key-reused", 422);
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Idempotency-Key reused with a different body",
            );
        }
    }
    let Some(d) = g.devices.get_mut(id) else {
        g.record(id, Some(value), key, "unknown-device", 404);
        return problem(StatusCode::NOT_FOUND, "unknown device");
    };
    if let Some(reason) = d.config.reject.clone() {
        g.record(id, Some(value), key, "rejected", 422);
        return problem(StatusCode::UNPROCESSABLE_ENTITY, &reason);
    }
    if !d.online {
        g.record(id, Some(value), key, "offline", 409);
        return problem(StatusCode::CONFLICT, "device offline");
    }
    d.min_soc = Some(value);
    d.apply_count += 1;
    let status = if d.config.success_status == 204 {
        204
    } else {
        200
    };
    if let Some(k) = key {
        g.idempotency
            .insert((id.to_string(), k.to_string()), (value, status));
    }
    g.record(id, Some(value), key, applied_outcome, status);
    success(id, value, status)
}

fn success(id: &str, value: i64, status: u16) -> Response {
    if status == 204 {
        StatusCode::NO_CONTENT.into_response()
    } else {
        Json(json!({"deviceId": id, "minSoc": value, "applied": true})).into_response()
    }
}

// ---------------------------------------------------------------- control API

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateDevice {
    device_id: String,
    #[serde(default)]
    online: bool,
    #[serde(default)]
    min_soc: Option<i64>,
    #[serde(default)]
    config: Option<DeviceConfig>,
}

async fn ctl_create(State(s): State<SimState>, Json(body): Json<serde_json::Value>) -> Response {
    // Accept a single object or an array of objects.
    let items: Vec<serde_json::Value> = match body {
        serde_json::Value::Array(a) => a,
        other => vec![other],
    };
    let mut created = Vec::new();
    for it in items {
        let c: CreateDevice = match serde_json::from_value(it) {
            Ok(c) => c,
            Err(e) => return problem(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        s.add_device_with(&c.device_id, c.online, c.min_soc);
        if let Some(cfg) = c.config {
            s.configure(&c.device_id, cfg);
        }
        created.push(s.device(&c.device_id));
    }
    (StatusCode::CREATED, Json(created)).into_response()
}

async fn ctl_list(State(s): State<SimState>) -> Json<Vec<DeviceView>> {
    Json(s.devices())
}

async fn ctl_get(State(s): State<SimState>, Path(id): Path<String>) -> Response {
    match s.device(&id) {
        Some(d) => Json(d).into_response(),
        None => problem(StatusCode::NOT_FOUND, "unknown device"),
    }
}

async fn ctl_patch(
    State(s): State<SimState>,
    Path(id): Path<String>,
    Json(p): Json<DevicePatch>,
) -> Response {
    if s.patch(&id, &p) {
        Json(s.device(&id)).into_response()
    } else {
        problem(StatusCode::NOT_FOUND, "unknown device")
    }
}

async fn ctl_delete(State(s): State<SimState>, Path(id): Path<String>) -> Response {
    if s.remove_device(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem(StatusCode::NOT_FOUND, "unknown device")
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    /// `false`: change the state without a connection event.
    #[serde(default = "yes")]
    events: bool,
}

fn yes() -> bool {
    true
}

async fn ctl_online(
    State(s): State<SimState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    set_online_resp(&s, &id, true, q.events)
}

async fn ctl_offline(
    State(s): State<SimState>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Response {
    set_online_resp(&s, &id, false, q.events)
}

async fn ctl_events(State(s): State<SimState>) -> Json<Vec<EmittedEvent>> {
    Json(s.events())
}

/// Sends the queued connection events one at a time, in order (see the module doc).
async fn send_events(
    sim: SimState,
    url: String,
    key: Option<String>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<EmittedEvent>,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    while let Some(event) = rx.recv().await {
        let body = json!({
            "specversion": "1.0",
            "id": event.id,
            "source": "/devicesim",
            "type": event.event_type,
            "subject": event.device_id,
            "time": event.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "datacontenttype": "application/json",
            "data": {"deviceId": event.device_id, "online": event.event_type == CONNECTED_EVENT},
        });
        let mut wait = Duration::from_millis(500);
        for tries in 1..=EVENT_TRIES {
            let mut req = http
                .post(&url)
                .header("content-type", "application/cloudevents+json")
                .body(body.to_string());
            if let Some(k) = &key {
                req = req.header("x-functions-key", k);
            }
            let (status, answer) = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    let answer = serde_json::from_str(&text).unwrap_or(json!(text));
                    (Some(status), answer)
                }
                Err(e) => (None, json!(e.to_string())),
            };
            tracing::info!(device = %event.device_id, event_id = %event.id, event_type = %event.event_type, status = ?status, tries, "devicesim connection event sent");
            {
                let mut g = sim.lock();
                if let Some(e) = g.emitted.iter_mut().find(|e| e.id == event.id) {
                    e.status = status;
                    e.tries = tries;
                    e.answer = Some(answer);
                }
            }
            let retry = match status {
                None => true,
                Some(s) => s == 429 || s >= 500,
            };
            if !retry {
                break;
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
}

fn set_online_resp(s: &SimState, id: &str, online: bool, events: bool) -> Response {
    let changed = if events {
        s.set_online(id, online)
    } else {
        s.set_online_quietly(id, online)
    };
    if changed {
        Json(s.device(id)).into_response()
    } else {
        problem(StatusCode::NOT_FOUND, "unknown device")
    }
}

#[derive(Deserialize)]
struct ScriptFaults {
    #[serde(flatten)]
    fault: Fault,
    #[serde(default = "one_usize")]
    count: usize,
}

fn one_usize() -> usize {
    1
}

async fn ctl_faults(
    State(s): State<SimState>,
    Path(id): Path<String>,
    Json(f): Json<ScriptFaults>,
) -> Response {
    if s.script_faults(&id, f.fault, f.count) {
        Json(s.device(&id)).into_response()
    } else {
        problem(StatusCode::NOT_FOUND, "unknown device")
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryQuery {
    device_id: Option<String>,
}

async fn ctl_history(
    State(s): State<SimState>,
    Query(q): Query<HistoryQuery>,
) -> Json<Vec<PutRecord>> {
    Json(match q.device_id {
        Some(id) => s.history_for(&id),
        None => s.history(),
    })
}

async fn ctl_clear_history(State(s): State<SimState>) -> StatusCode {
    s.clear_history();
    StatusCode::NO_CONTENT
}

async fn ctl_reset(State(s): State<SimState>) -> StatusCode {
    s.reset();
    StatusCode::NO_CONTENT
}

async fn ctl_fleet(State(s): State<SimState>, Json(cfg): Json<FleetConfig>) -> Response {
    let ids = s.start_fleet(cfg);
    (StatusCode::CREATED, Json(json!({"deviceIds": ids}))).into_response()
}

async fn ctl_fleet_stop(State(s): State<SimState>) -> StatusCode {
    s.stop_fleet();
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct AllOnline {
    online: bool,
}

async fn ctl_all_online(State(s): State<SimState>, Json(b): Json<AllOnline>) -> StatusCode {
    s.set_all_online(b.online);
    StatusCode::NO_CONTENT
}

/// The axum router of the simulator (device API + control API).
pub fn router(state: SimState) -> Router {
    Router::new()
        .route("/devices/{id}", get(get_device))
        .route("/devices/{id}/settings/min-soc", put(put_min_soc))
        .route("/_control/reset", post(ctl_reset))
        .route("/_control/devices", get(ctl_list).post(ctl_create))
        .route(
            "/_control/devices/{id}",
            get(ctl_get).patch(ctl_patch).delete(ctl_delete),
        )
        .route("/_control/devices/{id}/online", post(ctl_online))
        .route("/_control/devices/{id}/offline", post(ctl_offline))
        .route("/_control/devices/{id}/faults", post(ctl_faults))
        .route("/_control/all-online", post(ctl_all_online))
        .route("/_control/events", get(ctl_events))
        .route("/_control/fleet", post(ctl_fleet).delete(ctl_fleet_stop))
        .route(
            "/_control/history",
            get(ctl_history).delete(ctl_clear_history),
        )
        .with_state(state)
}

/// A running simulator. Dropping it does not stop the server; call [`DeviceSim::shutdown`].
pub struct DeviceSim {
    state: SimState,
    server: ServerHandle,
}

impl DeviceSim {
    /// Start on `addr` (use `127.0.0.1:0` for a free port) with the default API key.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<DeviceSim> {
        Self::start_with(addr, Some(DEFAULT_API_KEY.to_string()), 1).await
    }

    /// Start with an explicit API key (`None` = no key check) and RNG seed for random faults.
    pub async fn start_with(
        addr: SocketAddr,
        api_key: Option<String>,
        seed: u64,
    ) -> anyhow::Result<DeviceSim> {
        Self::start_state(addr, SimState::new(api_key, seed)).await
    }

    /// Like [`DeviceSim::start_with`], keeping the state in `state_file` across restarts
    /// ([`SimState::saved`]).
    pub async fn start_saved(
        addr: SocketAddr,
        api_key: Option<String>,
        seed: u64,
        state_file: &FsPath,
    ) -> anyhow::Result<DeviceSim> {
        Self::start_state(addr, SimState::saved(api_key, seed, state_file)?).await
    }

    async fn start_state(addr: SocketAddr, state: SimState) -> anyhow::Result<DeviceSim> {
        let server = serve(addr, router(state.clone()), "devicesim").await?;
        Ok(DeviceSim { state, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://127.0.0.1:{port}` — what `DEVICE_API_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The shared state: all in-process control methods live there.
    pub fn state(&self) -> &SimState {
        &self.state
    }

    pub async fn shutdown(self) {
        self.state.stop_fleet();
        self.server.shutdown().await;
    }
}

impl std::ops::Deref for DeviceSim {
    type Target = SimState;
    fn deref(&self) -> &SimState {
        &self.state
    }
}
