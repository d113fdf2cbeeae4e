//! The broker: sends, peek-lock delivery and settlement, with Service Bus' rules.
//!
//! Invariants:
//! - Duplicate detection: a MessageId seen within `duplicate_detection_window` is dropped, and the
//!   sender still sees success ([`SendOutcome::Duplicate`]).
//! - A message's TTL is the smaller of its own and the queue default, counted from when it becomes
//!   active (its scheduled time, else the send).
//! - Delivery is in sequence-number order among active, unlocked, unexpired messages; each receive
//!   increments the delivery count and writes it to the store before the consumer sees the
//!   message (a failed write is logged, the delivery goes ahead).
//! - Settling needs the current lock token and an unexpired lock, else [`SettleError::LockLost`].
//! - A message whose delivery count reached `max_delivery_count` is dead-lettered
//!   (`MaxDeliveryCountExceeded`) when abandoned or when its lock lapses; an expired, unlocked
//!   message is dead-lettered (`TTLExpiredException`) or dropped per `dead_letter_on_expiration`.
//! - One mutex guards every queue; it is never held across an `.await`, and consumers are woken
//!   only after it is released.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::message::{
    parse_http_date, Delivery, MessageState, SendOutcome, SendRequest, SettleError, StoredMessage,
    B64,
};
use super::store::{Lock, QueueState};

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
    /// Accept `Authorization: Bearer` tokens signed with this key (the managed-identity
    /// stand-in's, [`crate::identity`]) besides SAS; `None`: SAS only.
    pub bearer_key: Option<Vec<u8>>,
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
            bearer_key: None,
        }
    }
}

pub(super) struct BrokerInner {
    pub(super) config: BrokerConfig,
    queues: Mutex<HashMap<String, QueueState>>,
    notify: Notify,
}

/// The broker. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    pub(super) inner: Arc<BrokerInner>,
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
        q.dedup.forget_before(now, window);
        if q.dedup.contains(&message_id) {
            tracing::info!(queue, message_id, "servicebus: duplicate MessageId dropped");
            return Ok(SendOutcome::Duplicate);
        }
        let seq = q.meta.next_sequence_number;
        q.meta.next_sequence_number += 1;
        q.remember(&message_id, now)?;
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
}

#[derive(Debug)]
pub(super) struct QueueNotFound(pub(super) String);
impl std::fmt::Display for QueueNotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue {:?} does not exist", self.0)
    }
}
impl std::error::Error for QueueNotFound {}
