//! How `SetSocHttp` answers: [`ApiResponse`] (JSON or RFC 9457 problem+json) and the
//! JSON representations of a request.
//!
//! Invariants: every error is a problem document with `type`, `status`, `title`, `detail`
//! (and `field` for invalid input), never internals; `type` is a stable URI per kind of
//! problem, [`PROBLEM_TYPE_PREFIX`] + the title in kebab case (`Invalid request` ->
//! `tag:soc-settings.api,2026:problem/invalid-request`; the list is `Problem.type` in
//! `docs/openapi.yaml`), so clients branch on it rather than on the wording; timestamps are RFC 3339 UTC with
//! milliseconds; every answer that shows a request shows the same representation
//! (`SocRequest` in `docs/openapi.yaml`); a `202` carries `Location`, the request's
//! own status (`/api/devices/{deviceId}/soc/requests/{requestId}`).

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Value};

use crate::domain::history::HistoryEntry;
use crate::domain::{DesiredState, InputError, RequestId};

/// Every problem `type` starts so: a `tag:` URI (RFC 4151), as RFC 9457 suggests for types
/// that are identifiers, not pages.
pub const PROBLEM_TYPE_PREFIX: &str = "tag:soc-settings.api,2026:problem/";

/// The `type` of a problem with this title: the title in kebab case after
/// [`PROBLEM_TYPE_PREFIX`]. Titles are the kinds of problem: one per kind, never reworded.
pub fn problem_type(title: &str) -> String {
    ProblemType(title).to_string()
}

/// `Retry-After` (seconds) sent with `503`.
const RETRY_AFTER_SECONDS: u32 = 5;

/// The HTTP response, independent of how the host wants it back.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    pub body: ResponseBody,
}

/// What an answer carries. A problem stays typed until it is written: an error answer
/// builds no JSON tree (P2 in BENCHMARKS.md measures the rejected-input path).
#[derive(Debug, Clone)]
pub enum ResponseBody {
    /// No body (and no `Content-Type`).
    Empty,
    Json(Value),
    Problem(Problem),
}

/// An RFC 9457 problem document: `type` (derived from `title`, see [`problem_type`]),
/// `title`, `status`, `detail`, then its extension members (`field`, `requestId`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub status: u16,
    /// The kind of problem; never reworded (it names the `type`).
    pub title: &'static str,
    pub detail: String,
    /// Extension members in the order they were set; setting one again replaces it.
    pub extensions: Vec<(&'static str, Value)>,
}

impl ResponseBody {
    /// No body to write: empty, or a JSON `null`.
    pub fn is_empty(&self) -> bool {
        matches!(self, Self::Empty | Self::Json(Value::Null))
    }

    /// The body as a JSON value (`null` when empty): for tests and for readers that
    /// need a tree; answers are written with [`Serialize`] instead.
    pub fn to_value(&self) -> Cow<'_, Value> {
        match self {
            Self::Empty => Cow::Owned(Value::Null),
            Self::Json(v) => Cow::Borrowed(v),
            Self::Problem(p) => Cow::Owned(serde_json::to_value(p).unwrap_or(Value::Null)),
        }
    }
}

/// The body's JSON text (empty for no body).
impl fmt::Display for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return Ok(());
        }
        f.write_str(&crate::host::json_string(self))
    }
}

/// Equal when they would read the same as JSON (a problem and its tree are equal).
impl PartialEq for ResponseBody {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Problem(a), Self::Problem(b)) => a == b,
            _ => self.to_value() == other.to_value(),
        }
    }
}

impl Serialize for ResponseBody {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Empty => serializer.serialize_unit(),
            Self::Json(v) => v.serialize(serializer),
            Self::Problem(p) => p.serialize(serializer),
        }
    }
}

impl Serialize for Problem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(4 + self.extensions.len()))?;
        map.serialize_entry("type", &ProblemType(self.title))?;
        map.serialize_entry("title", self.title)?;
        map.serialize_entry("status", &self.status)?;
        map.serialize_entry("detail", &self.detail)?;
        for (name, value) in &self.extensions {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

/// A problem's `type`, written without building the string first.
struct ProblemType<'a>(&'a str);

impl Serialize for ProblemType<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // On the stack: a title is a few words (a longer one takes a `String`).
        let mut buf = [0u8; 128];
        let mut len = PROBLEM_TYPE_PREFIX.len();
        buf[..len].copy_from_slice(PROBLEM_TYPE_PREFIX.as_bytes());
        let mut fits = true;
        self.kebab(|b| match buf.get_mut(len) {
            Some(slot) => {
                *slot = b;
                len += 1;
            }
            None => fits = false,
        });
        match std::str::from_utf8(&buf[..len]) {
            Ok(text) if fits => serializer.serialize_str(text),
            _ => serializer.serialize_str(&self.to_string()),
        }
    }
}

impl ProblemType<'_> {
    /// The title in kebab case, byte by byte: ASCII letters and digits lowercased,
    /// every run of anything else one `-` between words.
    fn kebab(&self, mut push: impl FnMut(u8)) {
        let mut dash = false;
        let mut started = false;
        for b in self.0.bytes() {
            if b.is_ascii_alphanumeric() {
                if dash && started {
                    push(b'-');
                }
                push(b.to_ascii_lowercase());
                (dash, started) = (false, true);
            } else {
                dash = true;
            }
        }
    }
}

impl fmt::Display for ProblemType<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROBLEM_TYPE_PREFIX)?;
        let mut result = Ok(());
        self.kebab(|b| {
            if result.is_ok() {
                result = f.write_char(char::from(b));
            }
        });
        result
    }
}

impl ApiResponse {
    pub(crate) fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", Cow::Borrowed("application/json"))],
            body: ResponseBody::Json(body),
        }
    }

    pub(crate) fn with_header(
        mut self,
        name: &'static str,
        value: impl Into<Cow<'static, str>>,
    ) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// No body and no `Content-Type` (rendered as an empty body).
    pub(crate) fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: ResponseBody::Empty,
        }
    }

    /// An RFC 9457 problem document.
    pub fn problem(status: u16, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", Cow::Borrowed("application/problem+json"))],
            body: ResponseBody::Problem(Problem {
                status,
                title,
                detail: detail.into(),
                extensions: Vec::new(),
            }),
        }
    }

    /// Sets an extension member of a problem (`field`, `requestId`, ...), or a member
    /// of a JSON object body; replaces one of the same name.
    pub(crate) fn with_member(mut self, name: &'static str, value: Value) -> Self {
        debug_assert!(
            !matches!(name, "type" | "title" | "status" | "detail"),
            "{name} is a problem's own member, set by `problem`"
        );
        match &mut self.body {
            ResponseBody::Problem(p) => match p.extensions.iter_mut().find(|(n, _)| *n == name) {
                Some(existing) => existing.1 = value,
                None => p.extensions.push((name, value)),
            },
            ResponseBody::Json(Value::Object(members)) => {
                members.insert(name.to_string(), value);
            }
            ResponseBody::Json(_) | ResponseBody::Empty => {
                debug_assert!(false, "member {name} set on a body that is not an object")
            }
        }
        self
    }

    pub(crate) fn invalid(err: InputError) -> Self {
        // `err.to_string()` in one allocation, without the formatter.
        let detail = [err.field, ": ", &err.reason].concat();
        Self::problem(400, "Invalid request", detail).with_member("field", json!(err.field))
    }

    pub(crate) fn unavailable(detail: &str) -> Self {
        Self::problem(503, "Service unavailable", detail.to_string())
            .with_header("Retry-After", RETRY_AFTER_SECONDS.to_string())
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| *k == "Content-Type")
            .map(|(_, v)| v.as_ref())
            .unwrap_or("application/json")
    }

    /// The body as JSON (`null` when empty); see [`ResponseBody::to_value`].
    pub fn body_json(&self) -> Cow<'_, Value> {
        self.body.to_value()
    }
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The request's own status: where a `202`'s `Location` points.
pub(super) fn location(device: &str, request: &RequestId) -> String {
    format!("/api/devices/{device}/soc/requests/{request}")
}

/// The one representation of a request, shown with `status`.
fn representation(r: &DesiredState, status: &str, superseded_by: Option<&RequestId>) -> Value {
    let mut v = json!({
        "requestId": r.request_id,
        "deviceId": r.device_id.as_str(),
        "minSoc": r.min_soc.percent(),
        "dod": r.min_soc.dod(),
        "status": status,
        "requestedAt": ts(r.requested_at),
        "expiresAt": ts(r.expires_at),
        "attempts": r.attempts,
    });
    if let Some(at) = r.applied_at {
        v["appliedAt"] = json!(ts(at));
    }
    if let Some(err) = &r.last_error {
        v["lastError"] = json!(err);
    }
    if let Some(by) = superseded_by {
        v["supersededBy"] = json!(by);
    }
    if status == "applied" {
        v["confirmed"] = json!(r.confirmed_at.is_some());
        if let Some(at) = r.confirmed_at {
            v["confirmedAt"] = json!(ts(at));
        }
    }
    v
}

pub(super) fn applied_response(r: &DesiredState) -> ApiResponse {
    let mut body = representation(r, "applied", None);
    body["appliedAt"] = json!(ts(r.applied_at.unwrap_or(r.updated_at)));
    ApiResponse::json(200, body)
}

pub(super) fn pending_response(r: &DesiredState) -> ApiResponse {
    ApiResponse::json(202, representation(r, "pending", None))
        .with_header("Location", location(r.device_id.as_str(), &r.request_id))
}

/// The view of a history entry (`GET .../soc/requests/{requestId}`).
pub fn entry_view(e: &HistoryEntry) -> Value {
    representation(&e.request, e.status().as_str(), e.superseded_by.as_ref())
}

/// The `GET` view of a record: its status as the ledger holds it ([`HistoryEntry::status`]),
/// and the drift seen on the device, if any (`GET …/soc` only).
pub fn view(r: &DesiredState) -> Value {
    let mut v = entry_view(&HistoryEntry::of(r));
    if let (Some(reported), Some(at)) = (r.reported_min_soc, r.drift_detected_at) {
        v["reportedMinSoc"] = json!(reported);
        v["driftDetectedAt"] = json!(ts(at));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_problem_type_is_its_title_in_kebab_case() {
        assert_eq!(
            problem_type("Service unavailable"),
            format!("{PROBLEM_TYPE_PREFIX}service-unavailable")
        );
        // Runs of other characters, at either end too, make one dash or none.
        assert_eq!(
            problem_type(" Idempotency-Key  reused (again) "),
            format!("{PROBLEM_TYPE_PREFIX}idempotency-key-reused-again")
        );
        // Written as JSON the same way, whether it fits the stack buffer or not.
        for title in ["Not found", &"Very long title ".repeat(20)] {
            assert_eq!(
                serde_json::to_value(ProblemType(title)).unwrap(),
                problem_type(title),
            );
        }
    }

    #[test]
    fn a_problem_is_written_type_title_status_detail_then_its_members_once_each() {
        let p = ApiResponse::problem(409, "Request not pending", "request r1 is applied")
            .with_member("requestId", json!("r1"))
            .with_member("requestStatus", json!("pending"))
            .with_member("requestStatus", json!("applied"));
        assert_eq!(
            p.body.to_string(),
            format!(
                r#"{{"type":"{PROBLEM_TYPE_PREFIX}request-not-pending","title":"Request not pending","status":409,"detail":"request r1 is applied","requestId":"r1","requestStatus":"applied"}}"#
            )
        );
        assert_eq!(p.content_type(), "application/problem+json");
        // The same document as a tree, and equal to that tree as a JSON body.
        let tree = p.body_json().into_owned();
        assert_eq!(tree["type"], problem_type("Request not pending"));
        assert_eq!(p.body, ResponseBody::Json(tree));
        assert_ne!(p.body, ResponseBody::Empty);
    }

    #[test]
    fn an_invalid_input_is_a_400_whose_detail_is_the_error_and_field_names_it() {
        let err = InputError::new("minSoc", "must be a whole number from 0 to 100");
        let p = ApiResponse::invalid(err.clone()).body_json().into_owned();
        assert_eq!(p["detail"], err.to_string());
        assert_eq!(
            (p["status"].as_u64(), p["field"].as_str()),
            (Some(400), Some("minSoc"))
        );
    }

    #[test]
    fn times_are_rfc_3339_utc_with_milliseconds() {
        let t = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 5).unwrap()
            + chrono::Duration::milliseconds(42);
        assert_eq!(ts(t), "2026-11-21T12:00:05.042Z");
    }
}
