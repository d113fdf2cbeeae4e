//! A local stand-in for an Azure Event Grid custom topic whose input schema is CloudEvents 1.0:
//! the publish endpoint the service's notifications go to, and a durable record of every event
//! it accepted. devhost serves it (`SOC_NOTIFY_TOPIC_ENDPOINT`, 127.0.0.1:7074) and shows the
//! events at `/_devhost/events`. The publish facts it follows are listed in
//! `devtools/README.md` ("Event Grid topic stand-in").
//!
//! - `POST /api/events`: header `aeg-sas-key` = the topic's key (else `401`); body at most
//!   1 MiB (else `413`); `Content-Type: application/cloudevents-batch+json` (a JSON array of
//!   events) or `application/cloudevents+json` (one event), charset utf-8 if one is named;
//!   every event an object with the required attributes `id`, `source`, `type`, `specversion`
//!   (non-empty strings), `specversion` `1.0`, the optional `subject`, `time` (RFC 3339),
//!   `datacontenttype`, `dataschema` strings, not both `data` and `data_base64` (else `400`).
//!   Success: `200`, empty body. Errors carry Event Grid's JSON error body
//!   (`{"error":{"code","message","details":[{"code","message"}]}}`).
//! - `POST /_control/fail?count=N&status=S[&retryAfter=SECONDS]` (the topic's key required):
//!   the next N publishes that pass the key and size checks answer S (default 1 and 503) with
//!   an error body, and `Retry-After` when given; `GET` shows what is left, `DELETE` clears it.
//!
//! Invariants:
//! - A rejected publish keeps nothing: a batch is validated whole before any event is kept.
//! - Accepted events are kept in arrival order with the time they were received and a sequence
//!   number that only grows (also across restarts): [`Topic::events`] lists them oldest first.
//! - With a directory ([`Topic::open`]) every accepted batch is appended to `events.jsonl`
//!   (one event a line) before the publish is answered, in one write; at open the file is read
//!   back, a torn last line (a crash mid-append) skipped. Not fsynced.
//! - Injected faults live in memory only (in-flight test behaviour, like devicesim's scripted
//!   faults); a restart forgets them.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::server::ServerHandle;

/// The key devhost's topic expects when the app settings name none (`SOC_NOTIFY_TOPIC_KEY`
/// in local.settings.json).
pub const DEFAULT_TOPIC_KEY: &str = "devhost-local-topic-key";
/// Where events are published (`https://{topic}.{region}-1.eventgrid.azure.net/api/events`).
pub const PUBLISH_PATH: &str = "/api/events";
/// The header carrying the topic's access key.
pub const KEY_HEADER: &str = "aeg-sas-key";
/// A batch of CloudEvents in structured mode: a JSON array.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// One CloudEvent in structured mode: a JSON object.
pub const SINGLE_CONTENT_TYPE: &str = "application/cloudevents+json";
/// The most a publish may carry: the whole array, and so each event, at most 1 MB.
pub const MAX_PUBLISH_BYTES: usize = 1024 * 1024;
/// The CloudEvents attributes every event must have.
pub const REQUIRED_ATTRIBUTES: [&str; 4] = ["id", "source", "type", "specversion"];

/// One event the topic accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReceivedEvent {
    /// 1, 2, ...: arrival order, across batches and restarts.
    pub seq: u64,
    pub received_at: DateTime<Utc>,
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub source: String,
    pub subject: Option<String>,
    /// The event as published.
    pub event: Value,
}

/// Which events to list by `subject`, named like an Event Grid subscription's filter: equal
/// to `subject`, beginning with `subjectBeginsWith` (both, when both are given; none: all).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SubjectFilter {
    pub subject: Option<String>,
    pub subject_begins_with: Option<String>,
}

impl SubjectFilter {
    pub fn admits(&self, subject: Option<&str>) -> bool {
        let equal = self.subject.as_deref().is_none_or(|s| subject == Some(s));
        let begins = self
            .subject_begins_with
            .as_deref()
            .is_none_or(|p| subject.is_some_and(|s| s.starts_with(p)));
        equal && begins
    }

    /// How the filter reads in a heading: ` with subject S` / ` with subject beginning P`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.subject {
            out.push_str(&format!(" with subject {s}"));
        }
        if let Some(p) = &self.subject_begins_with {
            out.push_str(&format!(" with subject beginning {p}"));
        }
        out
    }
}

/// Publishes that will fail on purpose (`/_control/fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectedFailure {
    pub remaining: u32,
    pub status: u16,
    pub retry_after: Option<u64>,
}

/// Why a publish was refused: the status and Event Grid's error body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl Rejection {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Rejection {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
    }

    fn too_large(len: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!(
                "the request body is {len} bytes or more; a publish may carry at most \
                 {MAX_PUBLISH_BYTES} bytes (1 MB), each event too"
            ),
        )
    }

    /// `{"error":{"code","message","details":[{"code","message"}]}}`.
    pub fn body(&self) -> Value {
        let detail = match self.code {
            "BadRequest" => "InputJsonInvalid",
            other => other,
        };
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "details": [{"code": detail, "message": self.message}],
        }})
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut resp = (
            self.status,
            [("content-type", "application/json; charset=utf-8")],
            body,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("digits"));
        }
        resp
    }
}

struct TopicState {
    events: Vec<ReceivedEvent>,
    next_seq: u64,
    failure: Option<InjectedFailure>,
}

struct Inner {
    key: String,
    /// `{dir}/events.jsonl`, when durable.
    log: Option<PathBuf>,
    state: Mutex<TopicState>,
}

/// The topic: its key, the events it accepted, the failures it will inject. Cheap to clone
/// (shared state).
#[derive(Clone)]
pub struct Topic {
    inner: Arc<Inner>,
}

impl Topic {
    /// A topic that keeps its events in memory only.
    pub fn in_memory(key: &str) -> Topic {
        Self::with(key, None, Vec::new())
    }

    /// A topic that keeps its events in `dir/events.jsonl`, reading back what a previous run
    /// kept there.
    pub fn open(key: &str, dir: &Path) -> anyhow::Result<Topic> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = dir.join("events.jsonl");
        let events = match std::fs::read(&log) {
            // A torn last line (a crash mid-append) does not parse and is skipped.
            Ok(bytes) => bytes
                .split(|b| *b == b'\n')
                .filter_map(|line| serde_json::from_slice::<ReceivedEvent>(line).ok())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", log.display())),
        };
        Ok(Self::with(key, Some(log), events))
    }

    fn with(key: &str, log: Option<PathBuf>, events: Vec<ReceivedEvent>) -> Topic {
        let next_seq = events.iter().map(|e| e.seq).max().unwrap_or(0) + 1;
        Topic {
            inner: Arc::new(Inner {
                key: key.to_string(),
                log,
                state: Mutex::new(TopicState {
                    events,
                    next_seq,
                    failure: None,
                }),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TopicState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn key(&self) -> &str {
        &self.inner.key
    }

    /// Every accepted event, oldest first.
    pub fn events(&self) -> Vec<ReceivedEvent> {
        self.state().events.clone()
    }

    /// The accepted events with this `subject`, oldest first.
    pub fn events_with_subject(&self, subject: &str) -> Vec<ReceivedEvent> {
        self.events_matching(&SubjectFilter {
            subject: Some(subject.to_string()),
            ..SubjectFilter::default()
        })
    }

    /// The accepted events whose `subject` passes `filter`, oldest first.
    pub fn events_matching(&self, filter: &SubjectFilter) -> Vec<ReceivedEvent> {
        self.state()
            .events
            .iter()
            .filter(|e| filter.admits(e.subject.as_deref()))
            .cloned()
            .collect()
    }

    /// The next `count` publishes (past the key and size checks) answer `status`.
    pub fn fail_next(&self, count: u32, status: u16, retry_after: Option<u64>) {
        self.state().failure = (count > 0).then_some(InjectedFailure {
            remaining: count,
            status,
            retry_after,
        });
    }

    /// What is left of the injected failures.
    pub fn injected_failure(&self) -> Option<InjectedFailure> {
        self.state().failure
    }

    /// Whether `presented` is the topic's key.
    pub fn authorize(&self, presented: Option<&str>) -> Result<(), Rejection> {
        match presented {
            None => Err(Rejection::unauthorized(
                "the request carries no aeg-sas-key header (nor a bearer token this stand-in accepts)",
            )),
            Some(k) if k == self.inner.key => Ok(()),
            Some(_) => Err(Rejection::unauthorized(
                "the aeg-sas-key is not this topic's key",
            )),
        }
    }

    /// Publishes an authorized body of at most [`MAX_PUBLISH_BYTES`]: an injected failure if
    /// one is due, else the batch validated whole and kept. Returns how many events were kept.
    pub fn publish(&self, content_type: Option<&str>, body: &[u8]) -> Result<usize, Rejection> {
        if body.len() > MAX_PUBLISH_BYTES {
            return Err(Rejection::too_large(body.len()));
        }
        let mut state = self.state();
        if let Some(f) = state.failure.as_mut() {
            f.remaining -= 1;
            let f = *f;
            if f.remaining == 0 {
                state.failure = None;
            }
            let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut r = Rejection::new(
                status,
                "InjectedFailure",
                format!("failure injected through /_control/fail ({status})"),
            );
            r.retry_after = f.retry_after;
            return Err(r);
        }
        let events = parse_publish(content_type, body)?;
        let now = Utc::now();
        let first = state.next_seq;
        let received: Vec<ReceivedEvent> = events
            .into_iter()
            .zip(first..)
            .map(|(event, seq)| received(seq, now, event))
            .collect();
        if let Some(log) = &self.inner.log {
            append(log, &received).map_err(|e| {
                Rejection::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    format!("{e:#}"),
                )
            })?;
        }
        state.next_seq = first + received.len() as u64;
        let n = received.len();
        state.events.extend(received);
        Ok(n)
    }

    /// The topic's router: `POST /api/events` and the control endpoints.
    pub fn router(&self) -> Router {
        Router::new()
            .route(PUBLISH_PATH, post(rest_publish))
            .route(
                "/_control/fail",
                post(ctl_fail).get(ctl_fail_show).delete(ctl_fail_clear),
            )
            .with_state(self.clone())
    }

    /// Serves the topic on `addr` (`127.0.0.1:0` for a free port).
    pub async fn serve(&self, addr: SocketAddr) -> anyhow::Result<ServerHandle> {
        crate::server::serve(addr, self.router(), "Event Grid topic stand-in").await
    }
}

fn received(seq: u64, at: DateTime<Utc>, event: Value) -> ReceivedEvent {
    let text = |name: &str| event.get(name).and_then(Value::as_str).map(str::to_string);
    ReceivedEvent {
        seq,
        received_at: at,
        id: text("id").unwrap_or_default(),
        event_type: text("type").unwrap_or_default(),
        source: text("source").unwrap_or_default(),
        subject: text("subject"),
        event,
    }
}

/// Appends the batch to the log in one write: one event a line.
fn append(log: &Path, events: &[ReceivedEvent]) -> anyhow::Result<()> {
    let mut lines = Vec::new();
    for e in events {
        serde_json::to_writer(&mut lines, e)?;
        lines.push(b'\n');
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(&lines))
        .with_context(|| format!("appending to {}", log.display()))
}

/// The events of a publish body, every one valid, or why not.
pub fn parse_publish(content_type: Option<&str>, body: &[u8]) -> Result<Vec<Value>, Rejection> {
    let raw = content_type.unwrap_or("");
    let mut parts = raw.split(';').map(str::trim);
    let media = parts.next().unwrap_or("").to_ascii_lowercase();
    for param in parts.filter(|p| !p.is_empty()) {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name.trim().eq_ignore_ascii_case("charset")
            && !value.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        {
            return Err(Rejection::bad_request(format!(
                "unsupported charset in Content-Type {raw:?}: only utf-8"
            )));
        }
    }
    let batch = match media.as_str() {
        BATCH_CONTENT_TYPE => true,
        SINGLE_CONTENT_TYPE => false,
        _ => {
            return Err(Rejection::bad_request(format!(
                "Content-Type {raw:?} is not {BATCH_CONTENT_TYPE} (an array of CloudEvents) or \
                 {SINGLE_CONTENT_TYPE} (one CloudEvent): this topic's input schema is CloudEvents 1.0"
            )))
        }
    };
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Rejection::bad_request(format!("the body is not JSON: {e}")))?;
    let events = match (batch, value) {
        (true, Value::Array(items)) if items.is_empty() => {
            return Err(Rejection::bad_request("the batch holds no event"))
        }
        (true, Value::Array(items)) => items,
        (true, _) => {
            return Err(Rejection::bad_request(format!(
                "a {BATCH_CONTENT_TYPE} body must be a JSON array of events"
            )))
        }
        (false, v @ Value::Object(_)) => vec![v],
        (false, _) => {
            return Err(Rejection::bad_request(format!(
                "a {SINGLE_CONTENT_TYPE} body must be one JSON object"
            )))
        }
    };
    for (i, e) in events.iter().enumerate() {
        validate_event(e).map_err(|m| Rejection::bad_request(format!("event {i}: {m}")))?;
    }
    Ok(events)
}

/// One CloudEvent 1.0 in structured JSON: the required attributes and the types of the
/// optional ones Event Grid reads.
fn validate_event(e: &Value) -> Result<(), String> {
    let Some(obj) = e.as_object() else {
        return Err("an event must be a JSON object".into());
    };
    for name in REQUIRED_ATTRIBUTES {
        match obj.get(name) {
            None | Some(Value::Null) => {
                return Err(format!("required attribute '{name}' is missing"))
            }
            Some(Value::String(s)) if !s.is_empty() => {}
            Some(_) => return Err(format!("attribute '{name}' must be a non-empty string")),
        }
    }
    if obj["specversion"] != "1.0" {
        return Err(format!(
            "specversion {} is not supported: this topic accepts CloudEvents 1.0",
            obj["specversion"]
        ));
    }
    for name in ["subject", "time", "datacontenttype", "dataschema"] {
        match obj.get(name) {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err(format!("attribute '{name}' must be a string")),
        }
    }
    if let Some(Value::String(t)) = obj.get("time") {
        DateTime::parse_from_rfc3339(t)
            .map_err(|_| format!("attribute 'time' {t:?} is not an RFC 3339 timestamp"))?;
    }
    if obj.contains_key("data") && obj.contains_key("data_base64") {
        return Err("an event carries 'data' or 'data_base64', not both".into());
    }
    Ok(())
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    headers.get(KEY_HEADER).and_then(|v| v.to_str().ok())
}

async fn rest_publish(State(t): State<Topic>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = t.authorize(presented_key(&headers)) {
        tracing::warn!("eventgrid: publish refused -> 401: {}", r.message);
        return r.into_response();
    }
    let bytes = match axum::body::to_bytes(body, MAX_PUBLISH_BYTES).await {
        Ok(b) => b,
        Err(_) => return Rejection::too_large(MAX_PUBLISH_BYTES + 1).into_response(),
    };
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
    match t.publish(content_type, &bytes) {
        Ok(n) => {
            tracing::info!(events = n, "eventgrid: published");
            StatusCode::OK.into_response()
        }
        Err(r) => {
            tracing::warn!("eventgrid: publish refused -> {}: {}", r.status, r.message);
            r.into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FailQuery {
    count: Option<u32>,
    status: Option<u16>,
    retry_after: Option<u64>,
}

async fn ctl_fail(
    State(t): State<Topic>,
    headers: HeaderMap,
    Query(q): Query<FailQuery>,
) -> Response {
    if let Err(r) = t.authorize(presented_key(&headers)) {
        return r.into_response();
    }
    let status = q.status.unwrap_or(503);
    if !(400..=599).contains(&status) {
        return Rejection::bad_request(format!("status {status} is not a 4xx or 5xx"))
            .into_response();
    }
    t.fail_next(q.count.unwrap_or(1), status, q.retry_after);
    Json(t.injected_failure()).into_response()
}

async fn ctl_fail_show(State(t): State<Topic>, headers: HeaderMap) -> Response {
    match t.authorize(presented_key(&headers)) {
        Ok(()) => Json(t.injected_failure()).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn ctl_fail_clear(State(t): State<Topic>, headers: HeaderMap) -> Response {
    match t.authorize(presented_key(&headers)) {
        Ok(()) => {
            t.fail_next(0, 0, None);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(r) => r.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/soc-settings", "type": "t", "subject": "bat-1"})
    }

    fn batch(events: &[Value]) -> Vec<u8> {
        serde_json::to_vec(events).unwrap()
    }

    #[test]
    fn content_types_with_charset_are_understood_and_others_refused() {
        let one = serde_json::to_vec(&event("a")).unwrap();
        let many = batch(&[event("a"), event("b")]);
        let ok = |ct, body: &[u8]| parse_publish(Some(ct), body).map(|v| v.len());
        assert_eq!(
            ok("application/cloudevents-batch+json; charset=utf-8", &many),
            Ok(2)
        );
        assert_eq!(ok("Application/CloudEvents+JSON", &one), Ok(1));
        for (ct, body) in [
            ("application/json", &many),
            ("application/cloudevents-batch+json; charset=latin1", &many),
            ("application/cloudevents-batch+json", &one),
            ("application/cloudevents+json", &many),
        ] {
            let r = parse_publish(Some(ct), body).unwrap_err();
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{ct}");
        }
        assert!(parse_publish(None, &many).is_err());
    }

    #[test]
    fn every_required_attribute_and_the_optional_types_are_checked() {
        for name in REQUIRED_ATTRIBUTES {
            let mut e = event("a");
            e.as_object_mut().unwrap().remove(name);
            let m = validate_event(&e).unwrap_err();
            assert!(m.contains(name) && m.contains("missing"), "{m}");
            e[name] = json!("");
            assert!(validate_event(&e).is_err());
        }
        let mut e = event("a");
        e["specversion"] = json!("0.3");
        assert!(validate_event(&e).unwrap_err().contains("1.0"));
        let mut e = event("a");
        e["time"] = json!("yesterday");
        assert!(validate_event(&e).unwrap_err().contains("time"));
        e["time"] = json!("2026-01-02T03:04:05.123Z");
        assert_eq!(validate_event(&e), Ok(()));
        e["subject"] = json!(7);
        assert!(validate_event(&e).is_err());
        let mut e = event("a");
        e["data"] = json!({});
        e["data_base64"] = json!("AA==");
        assert!(validate_event(&e).is_err());
        assert!(validate_event(&json!("event")).is_err());
    }

    #[test]
    fn an_injected_failure_is_consumed_once_per_publish_and_keeps_nothing() {
        let t = Topic::in_memory("k");
        t.fail_next(2, 503, Some(4));
        let body = batch(&[event("a")]);
        for left in [Some(1), None] {
            let r = t.publish(Some(BATCH_CONTENT_TYPE), &body).unwrap_err();
            assert_eq!((r.status.as_u16(), r.retry_after), (503, Some(4)));
            assert_eq!(t.injected_failure().map(|f| f.remaining), left);
        }
        assert!(t.events().is_empty());
        assert_eq!(t.publish(Some(BATCH_CONTENT_TYPE), &body), Ok(1));
        assert_eq!(t.events()[0].seq, 1);
    }

    #[test]
    fn a_subject_filter_admits_equal_subjects_and_prefixes() {
        let f = |subject: Option<&str>, begins: Option<&str>| SubjectFilter {
            subject: subject.map(str::to_string),
            subject_begins_with: begins.map(str::to_string),
        };
        let s = Some("devices/bat-1/soc/requests/r1");
        assert!(f(None, None).admits(s) && f(None, None).admits(None));
        assert!(f(s, None).admits(s) && !f(Some("devices/bat-1"), None).admits(s));
        assert!(f(None, Some("devices/bat-1/")).admits(s));
        assert!(!f(None, Some("devices/bat-2/")).admits(s) && !f(None, Some("d")).admits(None));
        assert!(!f(Some("x"), Some("devices/")).admits(s));
        assert_eq!(
            f(s, Some("devices/")).describe(),
            " with subject devices/bat-1/soc/requests/r1 with subject beginning devices/"
        );
    }

    #[test]
    fn the_error_body_has_event_grids_shape() {
        let b = Rejection::bad_request("nope").body();
        assert_eq!(b["error"]["code"], "BadRequest");
        assert_eq!(b["error"]["message"], "nope");
        assert_eq!(b["error"]["details"][0]["code"], "InputJsonInvalid");
    }
}
