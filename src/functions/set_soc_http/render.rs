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

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::domain::history::HistoryEntry;
use crate::domain::{DesiredState, InputError, RequestId};

/// Every problem `type` starts so: a `tag:` URI (RFC 4151), as RFC 9457 suggests for types
/// that are identifiers, not pages.
pub const PROBLEM_TYPE_PREFIX: &str = "tag:soc-settings.api,2026:problem/";

/// The `type` of a problem with this title: the title in kebab case after
/// [`PROBLEM_TYPE_PREFIX`]. Titles are the kinds of problem: one per kind, never reworded.
pub fn problem_type(title: &str) -> String {
    let mut uri = String::with_capacity(PROBLEM_TYPE_PREFIX.len() + title.len());
    uri.push_str(PROBLEM_TYPE_PREFIX);
    for c in title.chars() {
        if c.is_ascii_alphanumeric() {
            uri.push(c.to_ascii_lowercase());
        } else if uri.len() > PROBLEM_TYPE_PREFIX.len() && !uri.ends_with('-') {
            uri.push('-');
        }
    }
    if uri.ends_with('-') {
        uri.pop();
    }
    uri
}

/// `Retry-After` (seconds) sent with `503`.
const RETRY_AFTER_SECONDS: u32 = 5;

/// The HTTP response, independent of how the host wants it back.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
}

impl ApiResponse {
    pub(crate) fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "application/json".into())],
            body,
        }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// No body and no `Content-Type` (rendered as an empty body).
    pub(crate) fn empty(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Value::Null,
        }
    }

    /// An RFC 9457 problem document.
    pub fn problem(status: u16, title: &str, detail: impl Into<String>) -> Self {
        Self::problem_body(
            status,
            json!({ "type": problem_type(title), "title": title, "status": status, "detail": detail.into() }),
        )
    }

    /// A problem document given whole (e.g. one stored for an idempotent replay).
    pub(super) fn problem_body(status: u16, body: Value) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "application/problem+json".into())],
            body,
        }
    }

    pub(crate) fn invalid(err: InputError) -> Self {
        let mut p = Self::problem(400, "Invalid request", err.to_string());
        p.body["field"] = json!(err.field);
        p
    }

    pub(crate) fn unavailable(detail: &str) -> Self {
        Self::problem(503, "Service unavailable", detail)
            .with_header("Retry-After", RETRY_AFTER_SECONDS.to_string())
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| *k == "Content-Type")
            .map(|(_, v)| v.as_str())
            .unwrap_or("application/json")
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
    }

    #[test]
    fn times_are_rfc_3339_utc_with_milliseconds() {
        let t = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 5).unwrap()
            + chrono::Duration::milliseconds(42);
        assert_eq!(ts(t), "2026-11-21T12:00:05.042Z");
    }
}
