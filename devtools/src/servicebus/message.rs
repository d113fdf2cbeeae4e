//! The message model: what a send carries, what is stored, what a consumer receives, and the
//! wire formats of broker-property dates.
//!
//! Invariants:
//! - [`StoredMessage`] is also the on-disk format (one JSON file per message, camelCase); adding a
//!   field needs a serde default so older stores still load.
//! - A message's state is derived, never stored: dead-lettered if `dead_lettered`, else scheduled
//!   while `enqueued_time` is in the future, else active ([`StoredMessage::state`]).
//! - The body is kept as base64 of the raw bytes, so any payload round-trips unchanged.

use anyhow::anyhow;
use base64::Engine;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use uuid::Uuid;

pub(super) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

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
