//! `DeviceEventsHttp`: `POST|OPTIONS /api/device-events`, the vendor's device connection
//! events (CloudEvents 1.0 over HTTP, structured or batched, or Azure Event Grid's
//! CloudEvents schema). The contract is `docs/device-api.md` ("Connection events") and
//! `docs/openapi.yaml`.
//!
//! A reconnect event is a shortcut, never the only way: the wake-up chain and the timer
//! sweep still apply a pending request if the event is lost, late or never sent. So:
//! - `OPTIONS` is the CloudEvents webhook validation handshake: `WebHook-Request-Origin`
//!   is answered with `WebHook-Allowed-Origin` (the same value) and `WebHook-Allowed-Rate: *`.
//!   Who may send is decided by the function key, as for every function.
//! - `POST`: the whole request is validated first ([`crate::domain::device_event`]); one
//!   bad event is a `400` naming it, and nothing is done for any event of the request.
//! - A `connected` event for a device whose ledger record is pending applies it now,
//!   through [`apply_latest`]: the same lease and latest-wins rules as every other
//!   apply, under a holder of its own (`ev-…`). Anything else changes nothing: a settled
//!   or absent record, a `disconnected` event (the re-checks continue), an event of
//!   another type (logged and counted), a repeated event id (CloudEvents `source` +
//!   `id`). One request acts at most once per device, however many events name it.
//! - An event invocation sends no wake-up message: offline, busy or a transient
//!   device-cloud error leave the request pending for the chain that already exists.
//! - The ledger unavailable: `503` with `Retry-After`, so the sender delivers again; a
//!   repeated event is harmless (the ledger says what is still pending).
//!
//! Answers `200` with a summary: one entry per event saying what became of it.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::domain::device_event::{self, DeviceEvent, Encoding, EventError, EventKind};
use crate::domain::{DeviceId, HolderKind, InputError, LeaseHolder, RequestId};
use crate::ports::StoreError;

use super::apply::{apply_latest, ApplyOutcome};
use super::set_soc_http::ApiResponse;
use super::Services;

/// The methods the route serves.
pub const ALLOW: &str = "POST, OPTIONS";

/// The HTTP request, independent of how the host delivered it.
#[derive(Debug, Clone, Default)]
pub struct EventsRequest {
    pub method: String,
    pub content_type: Option<String>,
    /// Raw `WebHook-Request-Origin` header value (the validation handshake).
    pub webhook_request_origin: Option<Vec<u8>>,
    pub body: Vec<u8>,
}

pub async fn handle(svc: &Services, req: EventsRequest) -> ApiResponse {
    match req.method.to_ascii_uppercase().as_str() {
        "OPTIONS" => handshake(req.webhook_request_origin.as_deref()),
        "POST" => receive(svc, req.content_type.as_deref(), &req.body).await,
        other => ApiResponse::problem(
            405,
            "Method not allowed",
            format!("{other} is not allowed here; use {ALLOW}"),
        )
        .with_header("Allow", ALLOW),
    }
}

/// The CloudEvents webhook validation handshake (`OPTIONS`). Without
/// `WebHook-Request-Origin` it is a plain `OPTIONS`: `200` with `Allow`, no permission.
/// The origin is echoed as given (1-255 visible ASCII characters, like Event Grid's
/// `eventgrid.azure.net`); the function key is the access control.
pub fn handshake(origin: Option<&[u8]>) -> ApiResponse {
    let answer = ApiResponse::empty(200).with_header("Allow", ALLOW);
    let Some(raw) = origin else {
        return answer;
    };
    match parse_origin(raw) {
        Ok(origin) => {
            info!(origin = %origin, "webhook validation handshake: delivery allowed");
            answer
                .with_header("WebHook-Allowed-Origin", origin)
                .with_header("WebHook-Allowed-Rate", "*")
        }
        Err(e) => ApiResponse::invalid(e),
    }
}

fn parse_origin(raw: &[u8]) -> Result<String, InputError> {
    if raw.is_empty() || raw.len() > 255 || !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(InputError::new(
            "WebHook-Request-Origin",
            "must be 1-255 visible ASCII characters",
        ));
    }
    // Every byte is visible ASCII, so this is the same text.
    Ok(String::from_utf8_lossy(raw).into_owned())
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// The pending request was applied now.
    Applied(RequestId),
    /// Still pending: offline, busy (another invocation holds the lease) or transient.
    Pending(RequestId, &'static str),
    Expired(RequestId),
    Failed(RequestId),
    /// No pending request for the device (none, or settled).
    NothingPending(Option<RequestId>),
    /// Nothing to do for this event (`disconnected`, another type, unreadable record).
    Ignored(&'static str),
    /// The same event (`source` + `id`) earlier in the request.
    Duplicate,
}

impl Fate {
    fn result(&self) -> &'static str {
        match self {
            Fate::Applied(_) => "applied",
            Fate::Pending(..) => "pending",
            Fate::Expired(_) => "expired",
            Fate::Failed(_) => "failed",
            Fate::NothingPending(_) => "nothing-pending",
            Fate::Ignored(_) => "ignored",
            Fate::Duplicate => "duplicate",
        }
    }

    fn view(&self, event: &DeviceEvent) -> Value {
        let mut v = json!({ "id": event.id, "type": event.event_type, "result": self.result() });
        if let Some(d) = event.device() {
            v["deviceId"] = json!(d.as_str());
        }
        match self {
            Fate::Applied(r) | Fate::Expired(r) | Fate::Failed(r) => v["requestId"] = json!(r),
            Fate::NothingPending(Some(r)) => v["requestId"] = json!(r),
            Fate::Pending(r, why) => {
                v["requestId"] = json!(r);
                v["reason"] = json!(why);
            }
            Fate::Ignored(why) => v["reason"] = json!(why),
            Fate::NothingPending(None) | Fate::Duplicate => {}
        }
        v
    }
}

/// Longest event id or type quoted in a log line.
const LOGGED_CHARS: usize = 128;

fn clipped(text: &str) -> &str {
    match text.char_indices().nth(LOGGED_CHARS) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

async fn receive(svc: &Services, content_type: Option<&str>, body: &[u8]) -> ApiResponse {
    let encoding = match Encoding::of(content_type) {
        Ok(e) => e,
        Err(e) => {
            let mut p = ApiResponse::problem(415, "Unsupported media type", e.to_string());
            p.body["field"] = json!(e.field);
            return p;
        }
    };
    let events = match device_event::parse(encoding, body) {
        Ok(events) => events,
        Err(e) => return rejected(&e),
    };

    // What each event asks for; one apply per device, whatever the number of events.
    let mut seen: HashSet<(&str, &str)> = HashSet::new();
    let mut devices: Vec<DeviceId> = Vec::new();
    let mut plan: Vec<Result<usize, Fate>> = Vec::with_capacity(events.len());
    for event in &events {
        if !seen.insert((event.source.as_str(), event.id.as_str())) {
            plan.push(Err(Fate::Duplicate));
            continue;
        }
        plan.push(match &event.kind {
            EventKind::Connected(device) => {
                Ok(match devices.iter().position(|d| d == device) {
                    Some(i) => i,
                    None => {
                        devices.push(device.clone());
                        devices.len() - 1
                    }
                })
            }
            EventKind::Disconnected(_) => Err(Fate::Ignored("disconnected: re-checks continue")),
            EventKind::Other => {
                info!(event_id = %clipped(&event.id), event_type = %clipped(&event.event_type), "device event of an unknown type ignored");
                Err(Fate::Ignored("unknown event type"))
            }
        });
    }

    let holder = LeaseHolder::new(HolderKind::Event);
    let holder = &holder;
    let fates: Vec<Result<Fate, StoreError>> = futures::stream::iter(devices.clone())
        .map(|device| async move { reconnected(svc, &device, holder).await })
        .buffered(svc.policy.drain_concurrency)
        .collect()
        .await;
    let mut by_device: HashMap<usize, Fate> = HashMap::new();
    for (i, fate) in fates.into_iter().enumerate() {
        match fate {
            Ok(f) => {
                by_device.insert(i, f);
            }
            Err(e) => {
                warn!(device = %devices[i], error = %e, "ledger unavailable for a device event; the sender will deliver it again");
                return ApiResponse::unavailable(
                    "the settings store is unavailable; deliver the events again later",
                );
            }
        }
    }

    let mut views = Vec::with_capacity(events.len());
    let mut counts: HashMap<&'static str, usize> = HashMap::new();
    for (event, planned) in events.iter().zip(plan) {
        let fate = match planned {
            Ok(i) => by_device[&i].clone(),
            Err(f) => f,
        };
        info!(event_id = %clipped(&event.id), event_type = %clipped(&event.event_type), device = ?event.device().map(DeviceId::as_str), result = fate.result(), "device event");
        *counts.entry(fate.result()).or_default() += 1;
        views.push(fate.view(event));
    }
    let count = |r: &str| counts.get(r).copied().unwrap_or(0);
    ApiResponse::json(
        200,
        json!({
            "received": events.len(),
            "applied": count("applied"),
            "pending": count("pending"),
            "ignored": count("ignored") + count("duplicate"),
            "events": views,
        }),
    )
}

/// A device reconnected: apply its pending request now, if it has one.
async fn reconnected(
    svc: &Services,
    device: &DeviceId,
    holder: &LeaseHolder,
) -> Result<Fate, StoreError> {
    let current = match svc.ledger.get(device).await {
        Ok(Some(c)) => c,
        Ok(None) => return Ok(Fate::NothingPending(None)),
        Err(StoreError::Corrupt(row)) => return Ok(unreadable(device, &row)),
        Err(e) => return Err(e),
    };
    if !current.value.is_pending() {
        return Ok(Fate::NothingPending(Some(current.value.request_id)));
    }
    let applied = match apply_latest(svc, device, holder, Some(current)).await {
        Ok(a) => a,
        Err(StoreError::Corrupt(row)) => return Ok(unreadable(device, &row)),
        Err(e) => return Err(e),
    };
    Ok(match applied.outcome {
        ApplyOutcome::Applied(r) => {
            info!(device = %device, request_id = %r.request_id, "applied on the device's reconnect event");
            Fate::Applied(r.request_id)
        }
        ApplyOutcome::AlreadyFinal(r) => Fate::NothingPending(Some(r.request_id)),
        ApplyOutcome::Expired(r) => Fate::Expired(r.request_id),
        ApplyOutcome::Failed(r, _) => Fate::Failed(r.request_id),
        ApplyOutcome::Offline(v) => Fate::Pending(v.value.request_id, "offline"),
        ApplyOutcome::Busy(v) => Fate::Pending(v.value.request_id, "busy"),
        ApplyOutcome::Transient(v, _) => Fate::Pending(v.value.request_id, "transient"),
        ApplyOutcome::NoRecord => Fate::NothingPending(None),
    })
}

fn unreadable(device: &DeviceId, row: &crate::ports::CorruptRow) -> Fate {
    warn!(device = %device, error = %row, "device event for an unreadable ledger row ignored");
    Fate::Ignored("ledger record unreadable")
}

/// A `400` naming the event (its position in a batch) and the attribute.
fn rejected(e: &EventError) -> ApiResponse {
    warn!(index = ?e.index, field = e.error.field, "device events rejected");
    let mut p = ApiResponse::problem(400, "Invalid request", e.to_string());
    p.body["field"] = json!(e.error.field);
    if let Some(i) = e.index {
        p.body["index"] = json!(i);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device_event::{CONNECTED, DISCONNECTED};
    use crate::domain::RequestStatus;
    use crate::functions::fakes::{post_min_soc, Harness};
    use crate::ports::Ledger as _;

    fn event(id: &str, ty: &str, device: &str) -> Value {
        json!({"specversion": "1.0", "id": id, "source": "/vendor", "type": ty, "subject": device})
    }

    fn post(content_type: &str, body: &Value) -> EventsRequest {
        EventsRequest {
            method: "POST".into(),
            content_type: Some(content_type.into()),
            webhook_request_origin: None,
            body: body.to_string().into_bytes(),
        }
    }

    fn online(id: &str, device: &str) -> EventsRequest {
        post(
            "application/cloudevents+json",
            &event(id, CONNECTED, device),
        )
    }

    /// A request stored pending for an offline device, as SetSocHttp leaves it.
    async fn pending(h: &Harness, device: &str, min_soc: u8) -> String {
        h.device.set_online(device, false);
        let body = post_min_soc(h, device, min_soc).await;
        assert_eq!(body["status"], "pending", "{body}");
        body["requestId"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn an_online_event_applies_the_pending_request_at_once() {
        let h = Harness::new();
        let id = pending(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["applied"], 1);
        assert_eq!(r.body["events"][0]["result"], "applied");
        assert_eq!(r.body["events"][0]["requestId"], id.as_str());
        assert_eq!(r.body["events"][0]["deviceId"], "d1");
        assert_eq!(h.device.puts("d1"), vec![(40, id.clone())]);
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.status, RequestStatus::Applied);
        assert!(rec.lease.is_none());
        assert_eq!(h.queue.sent().len(), 1, "only the POST's wake-up message");
    }

    #[tokio::test]
    async fn the_newest_request_is_what_the_event_applies() {
        let h = Harness::new();
        pending(&h, "d1", 10).await;
        let newest = pending(&h, "d1", 90).await;
        h.device.set_online("d1", true);
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.body["events"][0]["requestId"], newest.as_str());
        assert_eq!(h.device.puts("d1"), vec![(90, newest)]);
    }

    #[tokio::test]
    async fn another_holders_live_lease_is_respected() {
        let h = Harness::new();
        let id = pending(&h, "d1", 40).await;
        h.hold_lease("d1", "sb-other", chrono::Duration::seconds(30))
            .await;
        h.device.set_online("d1", true);
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["events"][0]["result"], "pending");
        assert_eq!(r.body["events"][0]["reason"], "busy");
        assert_eq!(r.body["events"][0]["requestId"], id.as_str());
        assert!(h.device.puts("d1").is_empty(), "only the holder PUTs");
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.lease.unwrap().holder.as_str(), "sb-other");
    }

    #[tokio::test]
    async fn a_device_still_offline_or_a_transient_error_leaves_the_request_pending() {
        let h = Harness::new();
        pending(&h, "d1", 40).await;
        // A stale event: the device is offline again by the time it arrives.
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(
            (
                &r.body["events"][0]["result"],
                &r.body["events"][0]["reason"]
            ),
            (&json!("pending"), &json!("offline"))
        );
        h.device.set_online("d1", true);
        h.device.fail_transiently("d1", 1);
        let r = handle(&h.svc, online("e2", "d1")).await;
        assert_eq!(r.body["events"][0]["reason"], "transient");
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.status, RequestStatus::Pending);
        assert_eq!(rec.attempts, 3, "the POST's try and one per event");
        assert_eq!(
            h.queue.sent().len(),
            1,
            "an event never sends wake-up messages"
        );
    }

    #[tokio::test]
    async fn no_pending_request_means_nothing_to_do() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.body["events"][0]["result"], "nothing-pending");
        let applied = post_min_soc(&h, "d1", 30).await;
        assert_eq!(applied["status"], "applied");
        let r = handle(&h.svc, online("e2", "d1")).await;
        assert_eq!(r.body["events"][0]["result"], "nothing-pending");
        assert_eq!(r.body["events"][0]["requestId"], applied["requestId"]);
        assert_eq!(h.device.calls(), (0, 1), "only the POST's PUT");
    }

    #[tokio::test]
    async fn unknown_types_and_disconnects_are_ignored_and_counted() {
        let h = Harness::new();
        pending(&h, "d1", 40).await;
        let batch = json!([
            event("e1", "com.vendor.firmware.updated", "d1"),
            event("e2", DISCONNECTED, "d1"),
        ]);
        let r = handle(&h.svc, post("application/cloudevents-batch+json", &batch)).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["received"], 2);
        assert_eq!(r.body["ignored"], 2);
        assert_eq!(r.body["events"][0]["reason"], "unknown event type");
        assert!(r.body["events"][0].get("deviceId").is_none());
        assert_eq!(r.body["events"][1]["result"], "ignored");
        assert_eq!(h.device.calls(), (0, 1), "only the POST's PUT");
    }

    #[tokio::test]
    async fn a_duplicate_event_and_many_events_for_one_device_act_once() {
        let h = Harness::new();
        let id = pending(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        let batch = json!([
            event("e1", CONNECTED, "d1"),
            event("e1", CONNECTED, "d1"),
            event("e3", CONNECTED, "d1"),
        ]);
        let r = handle(&h.svc, post("application/json", &batch)).await;
        let results: Vec<&str> = r.body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["result"].as_str().unwrap())
            .collect();
        assert_eq!(results, ["applied", "duplicate", "applied"]);
        assert_eq!(h.device.puts("d1"), vec![(40, id)]);
        // Delivered again (a sender's retry): harmless.
        let again = handle(&h.svc, post("application/json", &batch)).await;
        assert_eq!(again.body["events"][0]["result"], "nothing-pending");
        assert_eq!(h.device.puts("d1").len(), 1);
    }

    #[tokio::test]
    async fn events_for_several_devices_apply_each() {
        let h = Harness::new();
        let a = pending(&h, "a", 10).await;
        let b = pending(&h, "b", 20).await;
        h.device.set_online("a", true);
        h.device.set_online("b", true);
        let batch = json!([event("1", CONNECTED, "a"), event("2", CONNECTED, "b")]);
        let r = handle(&h.svc, post("application/cloudevents-batch+json", &batch)).await;
        assert_eq!(r.body["applied"], 2);
        assert_eq!(h.device.puts("a"), vec![(10, a)]);
        assert_eq!(h.device.puts("b"), vec![(20, b)]);
    }

    #[tokio::test]
    async fn a_bad_event_rejects_the_whole_batch_and_changes_nothing() {
        let h = Harness::new();
        pending(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        let before = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let mut bad = event("e2", CONNECTED, "d1");
        bad["specversion"] = json!("0.3");
        let batch = json!([event("e1", CONNECTED, "d1"), bad]);
        let r = handle(&h.svc, post("application/cloudevents-batch+json", &batch)).await;
        assert_eq!(r.status, 400);
        assert_eq!(r.content_type(), "application/problem+json");
        assert_eq!(r.body["field"], "specversion");
        assert_eq!(r.body["index"], 1);
        let after = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        assert_eq!(after, before, "the ledger is untouched");
        assert_eq!(h.device.calls(), (0, 1), "only the POST's PUT");
    }

    #[tokio::test]
    async fn another_content_type_is_415_naming_it() {
        let h = Harness::new();
        let r = handle(&h.svc, post("text/plain", &event("e", CONNECTED, "d1"))).await;
        assert_eq!(r.status, 415);
        assert_eq!(r.body["field"], "Content-Type");
        assert_eq!(r.content_type(), "application/problem+json");
    }

    #[tokio::test]
    async fn the_ledger_unavailable_is_503_with_retry_after() {
        let h = Harness::new();
        pending(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        h.ledger.set_down(true);
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.status, 503);
        assert!(r.headers.iter().any(|(k, _)| *k == "Retry-After"));
        h.ledger.set_down(false);
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.body["events"][0]["result"], "applied", "the retry works");
    }

    #[tokio::test]
    async fn an_unreadable_record_is_ignored_not_retried() {
        let h = Harness::new();
        h.ledger.corrupt("d1", "minSoc missing");
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["events"][0]["reason"], "ledger record unreadable");
    }

    #[test]
    fn the_handshake_echoes_the_origin_and_allows_any_rate() {
        let r = handshake(Some(b"eventgrid.azure.net"));
        assert_eq!(r.status, 200);
        assert!(r.body.is_null());
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header("WebHook-Allowed-Origin").as_deref(),
            Some("eventgrid.azure.net")
        );
        assert_eq!(header("WebHook-Allowed-Rate").as_deref(), Some("*"));
        assert_eq!(header("Allow").as_deref(), Some(ALLOW));
        assert!(header("Content-Type").is_none());
        let long = "a".repeat(200);
        assert_eq!(
            handshake(Some(long.as_bytes())).headers[1].1,
            long,
            "up to 255 characters"
        );
    }

    #[test]
    fn a_plain_options_grants_nothing_and_a_bad_origin_is_400() {
        let plain = handshake(None);
        assert_eq!(plain.status, 200);
        assert!(!plain.headers.iter().any(|(k, _)| k.starts_with("WebHook-")));
        for bad in [&b""[..], b"has space", &[b'a'; 256]] {
            let r = handshake(Some(bad));
            assert_eq!(r.status, 400);
            assert_eq!(r.body["field"], "WebHook-Request-Origin");
        }
    }

    #[tokio::test]
    async fn other_methods_are_405_with_allow() {
        let h = Harness::new();
        let r = handle(
            &h.svc,
            EventsRequest {
                method: "GET".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", ALLOW.to_string())));
    }
}
