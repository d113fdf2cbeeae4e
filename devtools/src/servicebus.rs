//! A local Service Bus stand-in: the REST "Send Message" endpoint (SAS-authenticated,
//! `BrokerProperties`), a durable on-disk queue store, and peek-lock delivery with the broker's
//! settlement rules (complete, abandon, dead-letter at max delivery count or on TTL expiry,
//! scheduled messages, lock expiry, duplicate detection).
//!
//! The REST facts it relies on are listed in `devtools/README.md`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::server::ServerHandle;
use anyhow::{anyhow, bail, Context};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use uuid::Uuid;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---------------------------------------------------------------- connection string + SAS

/// A parsed `Endpoint=sb://host[:port];SharedAccessKeyName=..;SharedAccessKey=..[;UseDevelopmentEmulator=true]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionString {
    pub host: String,
    pub port: Option<u16>,
    pub key_name: String,
    pub key: String,
    pub use_development_emulator: bool,
}

impl ConnectionString {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut emu = false;
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("bad connection string part {part:?}"))?;
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.to_string()),
                "sharedaccesskeyname" => key_name = Some(v.to_string()),
                "sharedaccesskey" => key = Some(v.to_string()),
                "usedevelopmentemulator" => emu = v.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or_else(|| anyhow!("connection string has no Endpoint"))?;
        let url = url::Url::parse(&endpoint).context("Endpoint is not a URL")?;
        Ok(ConnectionString {
            host: url
                .host_str()
                .ok_or_else(|| anyhow!("Endpoint has no host"))?
                .to_string(),
            port: url.port(),
            key_name: key_name.ok_or_else(|| anyhow!("no SharedAccessKeyName"))?,
            key: key.ok_or_else(|| anyhow!("no SharedAccessKey"))?,
            use_development_emulator: emu,
        })
    }

    /// Render back, e.g. after changing the port.
    pub fn render(&self) -> String {
        let hp = match self.port {
            Some(p) => format!("{}:{}", self.host, p),
            None => self.host.clone(),
        };
        let mut s = format!(
            "Endpoint=sb://{hp};SharedAccessKeyName={};SharedAccessKey={}",
            self.key_name, self.key
        );
        if self.use_development_emulator {
            s.push_str(";UseDevelopmentEmulator=true");
        }
        s
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Signature over `{url-encoded resource}\n{expiry}` with HMAC-SHA256 keyed by the UTF-8 bytes of
/// the key string (the key is *not* base64-decoded), base64-encoded.
pub fn sas_signature(encoded_resource: &str, expiry: i64, key: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac takes any key");
    mac.update(format!("{encoded_resource}\n{expiry}").as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// A `SharedAccessSignature sr=..&sig=..&se=..&skn=..` header value, as Service Bus documents it.
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry_unix: i64) -> String {
    let sr = urlencode(resource_uri);
    let sig = sas_signature(&sr, expiry_unix, key);
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry_unix}&skn={key_name}",
        urlencode(&sig)
    )
}

/// Check an `Authorization` header value for a request to `/{entity_path...}`.
/// Checks: scheme, all four fields present, `skn` equals the key name, signature matches
/// (computed over `sr` exactly as sent), not expired, and the decoded `sr` path is a prefix of the
/// requested entity path (host part is not compared: emulator endpoints vary).
pub fn verify_sas(
    header: &str,
    key_name: &str,
    key: &str,
    now_unix: i64,
    entity_path: &str,
) -> Result<(), String> {
    let rest = header
        .strip_prefix("SharedAccessSignature ")
        .ok_or("Authorization is not a SharedAccessSignature")?;
    let mut sr = None;
    let mut sig = None;
    let mut se = None;
    let mut skn = None;
    for kv in rest.split('&') {
        let (k, v) = kv.split_once('=').ok_or("malformed SAS token")?;
        match k.trim() {
            "sr" => sr = Some(v.to_string()),
            "sig" => sig = Some(v.to_string()),
            "se" => se = Some(v.to_string()),
            "skn" => skn = Some(v.to_string()),
            _ => {}
        }
    }
    let (sr, sig, se, skn) = match (sr, sig, se, skn) {
        (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
        _ => return Err("SAS token needs sr, sig, se and skn".into()),
    };
    if skn != key_name {
        return Err(format!("unknown key name {skn:?}"));
    }
    let expiry: i64 = se.parse().map_err(|_| "se is not a unix time")?;
    let sig_decoded = percent_encoding::percent_decode_str(&sig)
        .decode_utf8()
        .map_err(|_| "sig is not valid percent-encoding")?
        .to_string();
    let expected = sas_signature(&sr, expiry, key);
    if expected != sig_decoded {
        return Err("invalid signature".into());
    }
    if expiry <= now_unix {
        return Err("token expired".into());
    }
    let resource: String = url::form_urlencoded::parse(format!("r={sr}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let without_scheme = resource
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(&resource);
    let res_path = without_scheme
        .split_once('/')
        .map(|(_, p)| p.trim_end_matches('/'))
        .unwrap_or("");
    let entity = entity_path.trim_start_matches('/').to_ascii_lowercase();
    let scope = res_path.to_ascii_lowercase();
    let covered = scope.is_empty() || entity == scope || entity.starts_with(&format!("{scope}/"));
    if !covered {
        return Err(format!(
            "token scope {resource:?} does not cover {entity:?}"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------- messages

/// Where a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MessageState {
    Active,
    Scheduled,
    DeadLettered,
}

/// A stored message (also the on-disk format, one JSON file per message).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredMessage {
    pub sequence_number: i64,
    pub message_id: String,
    /// Base64 of the raw body bytes.
    pub body_base64: String,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    /// `Label` in BrokerProperties = `Subject` in the newer SDKs.
    pub label: Option<String>,
    pub reply_to: Option<String>,
    pub to: Option<String>,
    pub session_id: Option<String>,
    pub partition_key: Option<String>,
    pub reply_to_session_id: Option<String>,
    pub application_properties: Map<String, Value>,
    /// When the send was accepted.
    pub sent_at: DateTime<Utc>,
    /// When the message became (or becomes) active: the scheduled time, or `sent_at`.
    pub enqueued_time: DateTime<Utc>,
    pub scheduled_enqueue_time: Option<DateTime<Utc>>,
    pub time_to_live_seconds: Option<f64>,
    /// `None` = never expires.
    pub expires_at: Option<DateTime<Utc>>,
    pub delivery_count: u32,
    pub dead_lettered: bool,
    pub dead_letter_reason: Option<String>,
    pub dead_letter_error_description: Option<String>,
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

impl StoredMessage {
    pub fn body(&self) -> Vec<u8> {
        B64.decode(&self.body_base64).unwrap_or_default()
    }

    pub fn state(&self, now: DateTime<Utc>) -> MessageState {
        if self.dead_lettered {
            MessageState::DeadLettered
        } else if self.enqueued_time > now {
            MessageState::Scheduled
        } else {
            MessageState::Active
        }
    }
}

/// One locked delivery handed to a consumer.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub queue: String,
    pub message: StoredMessage,
    pub lock_token: Uuid,
    pub locked_until: DateTime<Utc>,
}

/// What a send request carries (parsed from the REST request, or built in-process).
#[derive(Clone, Debug, Default)]
pub struct SendRequest {
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// The parsed `BrokerProperties` JSON object.
    pub broker_properties: Map<String, Value>,
    pub application_properties: Map<String, Value>,
}

/// Result of a send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Enqueued {
        sequence_number: i64,
    },
    /// Dropped by duplicate detection (the sender still sees 201).
    Duplicate,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SettleError {
    LockLost,
    NotFound,
}

impl std::error::Error for SettleError {}

impl std::fmt::Display for SettleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettleError::LockLost => write!(f, "the message lock was lost (expired or superseded)"),
            SettleError::NotFound => write!(f, "no such message"),
        }
    }
}

// ---------------------------------------------------------------- broker

/// Broker settings.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Directory for the durable store (e.g. `.devhost/servicebus`).
    pub data_dir: PathBuf,
    pub key_name: String,
    pub key: String,
    /// Queues that exist. Sends to others get 404 unless `auto_create_queues`.
    pub queues: Vec<String>,
    pub auto_create_queues: bool,
    /// Default 10 (the Service Bus default).
    pub max_delivery_count: u32,
    /// How long a delivery may take before the lock lapses and the message is delivered again.
    pub lock_duration: Duration,
    /// Default 10 minutes.
    pub duplicate_detection_window: Duration,
    /// Queue default TTL; `None` = infinite (the Service Bus default).
    pub default_ttl: Option<Duration>,
    /// Dead-letter (true) or drop (false) expired messages. Service Bus' own default is false;
    /// the devhost default is true so expiry is visible.
    pub dead_letter_on_expiration: bool,
    /// Shown as `Client.FullyQualifiedNamespace` in trigger metadata.
    pub namespace: String,
}

impl BrokerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, key_name: &str, key: &str) -> Self {
        BrokerConfig {
            data_dir: data_dir.into(),
            key_name: key_name.to_string(),
            key: key.to_string(),
            queues: Vec::new(),
            auto_create_queues: false,
            max_delivery_count: 10,
            lock_duration: Duration::from_secs(300),
            duplicate_detection_window: Duration::from_secs(600),
            default_ttl: None,
            dead_letter_on_expiration: true,
            namespace: "127.0.0.1".to_string(),
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct QueueMeta {
    next_sequence_number: i64,
    /// MessageId -> time first seen.
    dedup: HashMap<String, DateTime<Utc>>,
}

struct Lock {
    token: Uuid,
    until: DateTime<Utc>,
}

struct QueueState {
    dir: PathBuf,
    messages: BTreeMap<i64, StoredMessage>,
    locks: HashMap<i64, Lock>,
    meta: QueueMeta,
}

struct BrokerInner {
    config: BrokerConfig,
    queues: Mutex<HashMap<String, QueueState>>,
    notify: Notify,
}

/// The broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

/// Snapshot of one queue for inspection.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueSnapshot {
    pub name: String,
    pub active: Vec<MessageView>,
    pub scheduled: Vec<MessageView>,
    pub dead_lettered: Vec<MessageView>,
}

/// A message as shown by the inspection page.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    #[serde(flatten)]
    pub message: StoredMessage,
    /// Body as UTF-8 text when it is valid UTF-8.
    pub body_text: Option<String>,
    pub locked: bool,
    pub locked_until: Option<DateTime<Utc>>,
}

fn atomic_write(path: &FsPath, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", Uuid::new_v4().simple()));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn msg_path(dir: &FsPath, seq: i64) -> PathBuf {
    dir.join("messages").join(format!("{seq:020}.json"))
}

impl QueueState {
    fn open(dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("messages"))?;
        let meta: QueueMeta = match std::fs::read(dir.join("state.json")) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => QueueMeta::default(),
        };
        let mut messages = BTreeMap::new();
        for e in std::fs::read_dir(dir.join("messages"))? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                // leftover temp file of an interrupted write
                let _ = std::fs::remove_file(&p);
                continue;
            }
            let m: StoredMessage = serde_json::from_slice(&std::fs::read(&p)?)
                .with_context(|| format!("reading {}", p.display()))?;
            messages.insert(m.sequence_number, m);
        }
        let mut q = QueueState {
            dir,
            messages,
            locks: HashMap::new(),
            meta,
        };
        let max_seq = q.messages.keys().next_back().copied().unwrap_or(0);
        if q.meta.next_sequence_number <= max_seq {
            q.meta.next_sequence_number = max_seq + 1;
        }
        if q.meta.next_sequence_number < 1 {
            q.meta.next_sequence_number = 1;
        }
        Ok(q)
    }

    fn save_meta(&self) -> anyhow::Result<()> {
        atomic_write(
            &self.dir.join("state.json"),
            &serde_json::to_vec(&self.meta)?,
        )
    }

    fn save_msg(&self, m: &StoredMessage) -> anyhow::Result<()> {
        atomic_write(
            &msg_path(&self.dir, m.sequence_number),
            &serde_json::to_vec_pretty(m)?,
        )
    }

    fn delete_msg(&mut self, seq: i64) {
        self.messages.remove(&seq);
        self.locks.remove(&seq);
        let _ = std::fs::remove_file(msg_path(&self.dir, seq));
    }

    fn dead_letter(&mut self, seq: i64, reason: &str, description: &str, now: DateTime<Utc>) {
        self.locks.remove(&seq);
        if let Some(m) = self.messages.get_mut(&seq) {
            m.dead_lettered = true;
            m.dead_letter_reason = Some(reason.to_string());
            m.dead_letter_error_description = Some(description.to_string());
            m.dead_lettered_at = Some(now);
            tracing::warn!(
                seq,
                message_id = %m.message_id,
                reason,
                "servicebus: message dead-lettered"
            );
            let m = m.clone();
            if let Err(e) = self.save_msg(&m) {
                tracing::error!("servicebus: persisting dead-letter failed: {e:#}");
            }
        }
    }
}

type DeliverFn = Arc<dyn Fn(Delivery) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

impl Broker {
    /// Open (or create) the durable store and load every queue found on disk plus the
    /// configured ones.
    pub fn open(config: BrokerConfig) -> anyhow::Result<Broker> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let mut queues = HashMap::new();
        for q in &config.queues {
            queues.insert(q.clone(), QueueState::open(config.data_dir.join(q))?);
        }
        for e in std::fs::read_dir(&config.data_dir)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                let name = e.file_name().to_string_lossy().to_string();
                if !queues.contains_key(&name) {
                    queues.insert(name.clone(), QueueState::open(e.path())?);
                }
            }
        }
        let n: usize = queues.values().map(|q| q.messages.len()).sum();
        tracing::info!(dir = %config.data_dir.display(), messages = n, "servicebus store opened");
        Ok(Broker {
            inner: Arc::new(BrokerInner {
                config,
                queues: Mutex::new(queues),
                notify: Notify::new(),
            }),
        })
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, QueueState>> {
        self.inner.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make sure a queue exists.
    pub fn ensure_queue(&self, name: &str) -> anyhow::Result<()> {
        let mut g = self.lock();
        if !g.contains_key(name) {
            g.insert(
                name.to_string(),
                QueueState::open(self.inner.config.data_dir.join(name))?,
            );
        }
        Ok(())
    }

    /// Enqueue a message (what the REST endpoint calls after authentication).
    pub fn send(&self, queue: &str, req: SendRequest) -> anyhow::Result<SendOutcome> {
        self.send_at(queue, req, Utc::now())
    }

    fn send_at(
        &self,
        queue: &str,
        req: SendRequest,
        now: DateTime<Utc>,
    ) -> anyhow::Result<SendOutcome> {
        let cfg = &self.inner.config;
        let bp = &req.broker_properties;
        let s = |k: &str| -> Option<String> {
            bp.get(k).and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            })
        };
        let ttl = match bp.get("TimeToLive") {
            None | Some(Value::Null) => None,
            Some(v) => {
                let secs = v
                    .as_f64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| anyhow!("TimeToLive must be a number of seconds"))?;
                if secs <= 0.0 || !secs.is_finite() {
                    bail!("TimeToLive must be positive");
                }
                Some(secs)
            }
        };
        let ttl = match (ttl, cfg.default_ttl) {
            (Some(t), Some(d)) => Some(t.min(d.as_secs_f64())),
            (Some(t), None) => Some(t),
            (None, Some(d)) => Some(d.as_secs_f64()),
            (None, None) => None,
        };
        let scheduled = match s("ScheduledEnqueueTimeUtc") {
            None => None,
            Some(t) => Some(parse_http_date(&t)?),
        };
        let enqueued_time = match scheduled {
            Some(t) if t > now => t,
            _ => now,
        };
        let expires_at =
            ttl.map(|t| enqueued_time + chrono::Duration::milliseconds((t * 1000.0) as i64));
        let message_id = s("MessageId").unwrap_or_else(|| Uuid::new_v4().simple().to_string());

        let mut g = self.lock();
        if !g.contains_key(queue) {
            if cfg.auto_create_queues {
                g.insert(
                    queue.to_string(),
                    QueueState::open(cfg.data_dir.join(queue))?,
                );
            } else {
                bail!(QueueNotFound(queue.to_string()));
            }
        }
        let q = g.get_mut(queue).expect("queue exists");
        let window = chrono::Duration::from_std(cfg.duplicate_detection_window)?;
        q.meta.dedup.retain(|_, t| now - *t < window);
        if q.meta.dedup.contains_key(&message_id) {
            tracing::info!(queue, message_id, "servicebus: duplicate MessageId dropped");
            return Ok(SendOutcome::Duplicate);
        }
        let seq = q.meta.next_sequence_number;
        q.meta.next_sequence_number += 1;
        q.meta.dedup.insert(message_id.clone(), now);
        let m = StoredMessage {
            sequence_number: seq,
            message_id,
            body_base64: B64.encode(&req.body),
            content_type: req.content_type.clone(),
            correlation_id: s("CorrelationId"),
            label: s("Label").or_else(|| s("Subject")),
            reply_to: s("ReplyTo"),
            to: s("To"),
            session_id: s("SessionId"),
            partition_key: s("PartitionKey"),
            reply_to_session_id: s("ReplyToSessionId"),
            application_properties: req.application_properties.clone(),
            sent_at: now,
            enqueued_time,
            scheduled_enqueue_time: scheduled,
            time_to_live_seconds: ttl,
            expires_at,
            delivery_count: 0,
            dead_lettered: false,
            dead_letter_reason: None,
            dead_letter_error_description: None,
            dead_lettered_at: None,
        };
        q.save_msg(&m)?;
        q.save_meta()?;
        tracing::info!(
            queue,
            seq,
            message_id = %m.message_id,
            scheduled = ?scheduled,
            ttl_seconds = ?ttl,
            "servicebus: message enqueued"
        );
        q.messages.insert(seq, m);
        drop(g);
        self.inner.notify.notify_waiters();
        Ok(SendOutcome::Enqueued {
            sequence_number: seq,
        })
    }

    /// Expire messages past their TTL and release lapsed locks. Called by consumers; call it
    /// yourself when using `receive` directly.
    pub fn sweep(&self) {
        let now = Utc::now();
        let cfg = &self.inner.config;
        let mut g = self.lock();
        for (name, q) in g.iter_mut() {
            // lapsed locks
            let lapsed: Vec<i64> = q
                .locks
                .iter()
                .filter(|(_, l)| l.until <= now)
                .map(|(s, _)| *s)
                .collect();
            for seq in lapsed {
                q.locks.remove(&seq);
                let dc = q.messages.get(&seq).map(|m| m.delivery_count).unwrap_or(0);
                tracing::warn!(queue = %name, seq, "servicebus: lock expired, message available again");
                if dc >= cfg.max_delivery_count {
                    q.dead_letter(
                        seq,
                        "MaxDeliveryCountExceeded",
                        &format!("Message could not be consumed after {dc} delivery attempts."),
                        now,
                    );
                }
            }
            // expired messages (not while locked)
            let expired: Vec<i64> = q
                .messages
                .values()
                .filter(|m| !m.dead_lettered && !q.locks.contains_key(&m.sequence_number))
                .filter(|m| m.expires_at.is_some_and(|e| e <= now))
                .map(|m| m.sequence_number)
                .collect();
            for seq in expired {
                if cfg.dead_letter_on_expiration {
                    q.dead_letter(
                        seq,
                        "TTLExpiredException",
                        "The message expired and was dead lettered.",
                        now,
                    );
                } else {
                    tracing::info!(queue = %name, seq, "servicebus: message expired and dropped");
                    q.delete_msg(seq);
                }
            }
        }
    }

    /// Peek-lock the next active message (lowest sequence number), incrementing its delivery count.
    pub fn receive(&self, queue: &str) -> Option<Delivery> {
        let now = Utc::now();
        let lock_for = chrono::Duration::from_std(self.inner.config.lock_duration).ok()?;
        let mut g = self.lock();
        let q = g.get_mut(queue)?;
        let seq = q
            .messages
            .values()
            .find(|m| {
                !m.dead_lettered
                    && m.enqueued_time <= now
                    && !q.locks.contains_key(&m.sequence_number)
                    && m.expires_at.is_none_or(|e| e > now)
            })?
            .sequence_number;
        let token = Uuid::new_v4();
        let until = now + lock_for;
        q.locks.insert(seq, Lock { token, until });
        let m = q.messages.get_mut(&seq)?;
        m.delivery_count += 1;
        let m = m.clone();
        if let Err(e) = q.save_msg(&m) {
            tracing::error!("servicebus: persisting delivery count failed: {e:#}");
        }
        Some(Delivery {
            queue: queue.to_string(),
            message: m,
            lock_token: token,
            locked_until: until,
        })
    }

    fn check_lock(q: &QueueState, seq: i64, token: Uuid) -> Result<(), SettleError> {
        if !q.messages.contains_key(&seq) {
            return Err(SettleError::NotFound);
        }
        match q.locks.get(&seq) {
            Some(l) if l.token == token && l.until > Utc::now() => Ok(()),
            _ => Err(SettleError::LockLost),
        }
    }

    /// Complete (delete) a delivered message.
    pub fn complete(&self, d: &Delivery) -> Result<(), SettleError> {
        let mut g = self.lock();
        let q = g.get_mut(&d.queue).ok_or(SettleError::NotFound)?;
        Self::check_lock(q, d.message.sequence_number, d.lock_token)?;
        q.delete_msg(d.message.sequence_number);
        tracing::info!(queue = %d.queue, seq = d.message.sequence_number, "servicebus: message completed");
        Ok(())
    }

    /// Abandon: release the lock for immediate redelivery, or dead-letter at max delivery count.
    pub fn abandon(&self, d: &Delivery) -> Result<(), SettleError> {
        let now = Utc::now();
        let max = self.inner.config.max_delivery_count;
        let mut g = self.lock();
        let q = g.get_mut(&d.queue).ok_or(SettleError::NotFound)?;
        let seq = d.message.sequence_number;
        Self::check_lock(q, seq, d.lock_token)?;
        q.locks.remove(&seq);
        let dc = q.messages.get(&seq).map(|m| m.delivery_count).unwrap_or(0);
        if dc >= max {
            q.dead_letter(
                seq,
                "MaxDeliveryCountExceeded",
                &format!("Message could not be consumed after {dc} delivery attempts."),
                now,
            );
        } else {
            tracing::info!(queue = %d.queue, seq, delivery_count = dc, "servicebus: message abandoned");
        }
        drop(g);
        self.inner.notify.notify_waiters();
        Ok(())
    }

    /// Deletes one message whatever its state (an operator purge; tests use it to
    /// simulate a lost message or a host that completed it). `false` if absent.
    pub fn remove(&self, queue: &str, sequence_number: i64) -> bool {
        let mut g = self.lock();
        let Some(q) = g.get_mut(queue) else {
            return false;
        };
        let present = q.messages.contains_key(&sequence_number);
        q.delete_msg(sequence_number);
        present
    }

    /// All stored messages of a queue (any state).
    pub fn messages(&self, queue: &str) -> Vec<StoredMessage> {
        self.lock()
            .get(queue)
            .map(|q| q.messages.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn dead_letters(&self, queue: &str) -> Vec<StoredMessage> {
        self.messages(queue)
            .into_iter()
            .filter(|m| m.dead_lettered)
            .collect()
    }

    /// Messages not yet completed nor dead-lettered (active, scheduled or locked).
    pub fn pending_count(&self, queue: &str) -> usize {
        self.messages(queue)
            .iter()
            .filter(|m| !m.dead_lettered)
            .count()
    }

    /// Inspection snapshot of every queue, sorted by name.
    pub fn snapshot(&self) -> Vec<QueueSnapshot> {
        let now = Utc::now();
        let g = self.lock();
        let mut names: Vec<&String> = g.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let q = &g[name];
                let mut snap = QueueSnapshot {
                    name: name.clone(),
                    active: vec![],
                    scheduled: vec![],
                    dead_lettered: vec![],
                };
                for m in q.messages.values() {
                    let lock = q.locks.get(&m.sequence_number);
                    let view = MessageView {
                        body_text: String::from_utf8(m.body()).ok(),
                        message: m.clone(),
                        locked: lock.is_some(),
                        locked_until: lock.map(|l| l.until),
                    };
                    match m.state(now) {
                        MessageState::Active => snap.active.push(view),
                        MessageState::Scheduled => snap.scheduled.push(view),
                        MessageState::DeadLettered => snap.dead_lettered.push(view),
                    }
                }
                snap
            })
            .collect()
    }

    /// Start a peek-lock consumer on `queue` with at most `max_concurrent` deliveries in flight.
    /// `deliver` returns true for success (complete) and false for failure (abandon).
    pub fn start_consumer<F, Fut>(
        &self,
        queue: &str,
        max_concurrent: usize,
        deliver: F,
    ) -> JoinHandle<()>
    where
        F: Fn(Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let deliver: DeliverFn = Arc::new(move |d| Box::pin(deliver(d)));
        let broker = self.clone();
        let queue = queue.to_string();
        let sem = Arc::new(Semaphore::new(max_concurrent.max(1)));
        tokio::spawn(async move {
            loop {
                let permit = match sem.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => return,
                };
                broker.sweep();
                let notified = broker.inner.notify.notified();
                match broker.receive(&queue) {
                    Some(d) => {
                        let b = broker.clone();
                        let f = deliver.clone();
                        tokio::spawn(async move {
                            let ok = f(d.clone()).await;
                            let r = if ok { b.complete(&d) } else { b.abandon(&d) };
                            if let Err(e) = r {
                                tracing::warn!(
                                    queue = %d.queue,
                                    seq = d.message.sequence_number,
                                    "servicebus: settlement failed: {e}"
                                );
                            }
                            drop(permit);
                        });
                    }
                    None => {
                        drop(permit);
                        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
                    }
                }
            }
        })
    }

    /// The REST router (`POST /{queue}/messages` and `GET /_devhost/queues`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/_devhost/queues", get(rest_snapshot))
            .route("/{queue}/messages", post(rest_send))
            .with_state(self.clone())
    }

    /// Serve the REST endpoint on `addr` (`127.0.0.1:0` for a free port).
    pub async fn serve(&self, addr: SocketAddr) -> anyhow::Result<ServerHandle> {
        crate::server::serve(addr, self.router(), "Service Bus stand-in").await
    }
}

#[derive(Debug)]
struct QueueNotFound(String);
impl std::fmt::Display for QueueNotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue {:?} does not exist", self.0)
    }
}
impl std::error::Error for QueueNotFound {}

/// Parse `ScheduledEnqueueTimeUtc`: RFC 1123 (`Tue, 04 Mar 2025 09:14:05 GMT`, what the REST docs
/// show) or RFC 2822 with a numeric offset (what some SDKs send).
pub fn parse_http_date(s: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(s.trim())
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| anyhow!("ScheduledEnqueueTimeUtc {s:?} is not an RFC 1123 date: {e}"))
}

/// Format as RFC 1123 (`Tue, 04 Mar 2025 09:14:05 GMT`).
pub fn format_http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

fn xml_error(status: StatusCode, detail: &str) -> Response {
    (
        status,
        [("content-type", "application/xml; charset=utf-8")],
        format!(
            "<Error><Code>{}</Code><Detail>{}</Detail></Error>",
            status.as_u16(),
            detail
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        ),
    )
        .into_response()
}

/// Headers that are part of HTTP or the REST protocol, not custom message properties.
const NON_PROPERTY_HEADERS: &[&str] = &[
    "authorization",
    "brokerproperties",
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
    "transfer-encoding",
    "x-ms-retrypolicy",
    "traceparent",
    "tracestate",
    "expect",
];

async fn rest_send(
    State(b): State<Broker>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let cfg = b.config();
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        tracing::warn!(queue, "servicebus: send without Authorization -> 401");
        return xml_error(
            StatusCode::UNAUTHORIZED,
            "MissingToken: the Authorization header is required",
        );
    };
    if let Err(e) = verify_sas(
        auth,
        &cfg.key_name,
        &cfg.key,
        Utc::now().timestamp(),
        &format!("{queue}/messages"),
    ) {
        tracing::warn!(queue, "servicebus: send rejected -> 401: {e}");
        return xml_error(StatusCode::UNAUTHORIZED, &format!("InvalidSignature: {e}"));
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut requests = Vec::new();
    if content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/vnd.microsoft.servicebus.json"))
    {
        // Send Message Batch: [{"Body": "...", "BrokerProperties": {...}, "UserProperties": {...}}]
        let items: Vec<Value> = match serde_json::from_slice(&body) {
            Ok(Value::Array(a)) => a,
            _ => return xml_error(StatusCode::BAD_REQUEST, "batch body must be a JSON array"),
        };
        for it in items {
            let body = it
                .get("Body")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .as_bytes()
                .to_vec();
            let bp = it
                .get("BrokerProperties")
                .and_then(|v| v.as_object())
                .cloned()
                .unwrap_or_default();
            let up = it
                .get("UserProperties")
                .and_then(|v| v.as_object())
                .cloned()
                .unwrap_or_default();
            requests.push(SendRequest {
                body,
                content_type: bp
                    .get("ContentType")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                broker_properties: bp,
                application_properties: up,
            });
        }
    } else {
        let bp = match headers.get("brokerproperties") {
            None => Map::new(),
            Some(v) => match v
                .to_str()
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
            {
                Some(Value::Object(m)) => m,
                _ => {
                    return xml_error(
                        StatusCode::BAD_REQUEST,
                        "BrokerProperties header is not a JSON object",
                    )
                }
            },
        };
        let mut props = Map::new();
        for (name, value) in headers.iter() {
            let n = name.as_str();
            if NON_PROPERTY_HEADERS.contains(&n) {
                continue;
            }
            if let Ok(v) = value.to_str() {
                // Custom properties: JSON-typed when the value parses as JSON (quoted strings,
                // numbers, booleans), else the raw text.
                let parsed = serde_json::from_str::<Value>(v).unwrap_or(Value::String(v.into()));
                props.insert(n.to_string(), parsed);
            }
        }
        requests.push(SendRequest {
            body: body.to_vec(),
            content_type,
            broker_properties: bp,
            application_properties: props,
        });
    }
    for r in requests {
        match b.send(&queue, r) {
            Ok(_) => {}
            Err(e) if e.downcast_ref::<QueueNotFound>().is_some() => {
                return xml_error(StatusCode::NOT_FOUND, &e.to_string());
            }
            Err(e) => {
                tracing::warn!(queue, "servicebus: send rejected -> 400: {e:#}");
                return xml_error(StatusCode::BAD_REQUEST, &format!("{e:#}"));
            }
        }
    }
    StatusCode::CREATED.into_response()
}

async fn rest_snapshot(State(b): State<Broker>) -> Json<Vec<QueueSnapshot>> {
    b.sweep();
    Json(b.snapshot())
}

/// Helper for tests and tools: a `SendRequest` for a JSON body with the usual properties.
pub fn json_send(body: &Value, message_id: &str, ttl_seconds: Option<f64>) -> SendRequest {
    let mut bp = Map::new();
    bp.insert("MessageId".into(), json!(message_id));
    if let Some(t) = ttl_seconds {
        bp.insert("TimeToLive".into(), json!(t));
    }
    SendRequest {
        body: serde_json::to_vec(body).unwrap_or_default(),
        content_type: Some("application/json".into()),
        broker_properties: bp,
        application_properties: Map::new(),
    }
}

/// `DateTime::MAX_UTC`-like value the host shows for "never expires".
pub fn never() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
        .single()
        .expect("valid date")
}
