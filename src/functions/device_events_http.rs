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
//! - **Answered in time.** A request is answered within `Policy::events_answer_within`
//!   (20 s), well under Event Grid's 30 s delivery timeout (after which it would send
//!   the whole batch again while the first still runs). No PUT starts after
//!   `Policy::events_put_cutoff` (3 s with the defaults): a PUT started by then is
//!   answered within the device timeout and its result written within the slowest
//!   ledger write, leaving a margin. At the cutoff, a device not reached yet, or whose
//!   apply has not started its PUT (reading the ledger, waiting for a device-call budget
//!   turn, taking the device's lease), is left as it is: `deferred`. That is safe
//!   because an event is only a shortcut: the record is pending and in the due index,
//!   and its wake-up chain (or the sweep) applies it; an apply cut before its PUT is
//!   like a crash there, which every apply survives (a lease it took lapses). An apply
//!   whose PUT started is always awaited and its result written. The answer is still
//!   `200`: Event Grid counts the events delivered, and nothing is lost.
//!
//! Answers `200` with a summary: one entry per event saying what became of it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::domain::device_event::{self, DeviceEvent, Encoding, EventError, EventKind};
use crate::domain::{DeviceId, HolderKind, InputError, LeaseHolder, MinSoc, RequestId};
use crate::ports::{DeviceApi, DeviceError, DeviceStatus, StoreError};

use super::apply::{apply_latest, ApplyOutcome};
use super::set_soc_http::ApiResponse;
use super::{drift, Services};

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
    /// Not handled before the answer was due; a pending request stays with its chain.
    Deferred,
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
            Fate::Deferred => "deferred",
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
            Fate::Deferred => v["reason"] = json!(DEFERRED),
            Fate::NothingPending(None) | Fate::Duplicate => {}
        }
        v
    }
}

/// Why a `deferred` event was not handled.
const DEFERRED: &str =
    "not reached before the answer was due: a pending request stays with its wake-up chain";

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
            return ApiResponse::problem(415, "Unsupported media type", e.to_string())
                .with_member("field", json!(e.field));
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
    let cutoff = Instant::now() + svc.policy.events_put_cutoff().to_std().unwrap_or_default();
    let fates: Vec<Result<Fate, StoreError>> = futures::stream::iter(devices.clone())
        .map(|device| async move {
            if Instant::now() >= cutoff {
                return Ok(Fate::Deferred);
            }
            let gate = Arc::new(PutGate {
                cutoff,
                started: AtomicBool::new(false),
            });
            let gated = Services {
                device: Arc::new(GatedDevice {
                    inner: svc.device.clone(),
                    gate: gate.clone(),
                }),
                ..svc.clone()
            };
            let work = reconnected(&gated, &device, holder);
            until_cutoff(work, &gate)
                .await
                .unwrap_or(Ok(Fate::Deferred))
        })
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
            "deferred": count("deferred"),
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
        // Back online with nothing pending: does it still report what was applied?
        let request = current.value.request_id.clone();
        return Ok(match drift::check_settled(svc, device, current).await {
            Ok(drift::Checked::Drift {
                reasserted:
                    Some(drift::Reasserted {
                        status,
                        request_id: Some(id),
                    }),
                ..
            }) => match status {
                200 => Fate::Applied(id),
                _ => Fate::Pending(id, "reasserted"),
            },
            Ok(_) => Fate::NothingPending(Some(request)),
            Err(StoreError::Corrupt(row)) => unreadable(device, &row),
            Err(e) => return Err(e),
        });
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

/// When a request's PUTs must have started, and whether one device's apply started one.
struct PutGate {
    cutoff: Instant,
    started: AtomicBool,
}

/// `work` (one device's apply) to its end if it started a PUT before the cutoff;
/// otherwise `None` at the cutoff, dropping it before any PUT (like a crash there).
async fn until_cutoff<T>(work: impl std::future::Future<Output = T>, gate: &PutGate) -> Option<T> {
    tokio::pin!(work);
    tokio::select! {
        biased;
        out = &mut work => return Some(out),
        () = tokio::time::sleep_until(gate.cutoff) => {}
    }
    if gate.started.load(Ordering::Relaxed) {
        // Never walk away from a PUT: it is awaited and its result written.
        Some(work.await)
    } else {
        None
    }
}

/// An event invocation's device port for one device: records that a PUT started,
/// and sends none after the cutoff (a transient answer that sent nothing).
struct GatedDevice {
    inner: Arc<dyn DeviceApi>,
    gate: Arc<PutGate>,
}

#[async_trait]
impl DeviceApi for GatedDevice {
    async fn reserve_put(&self) -> Result<(), DeviceError> {
        self.inner.reserve_put().await
    }

    /// Not after the cutoff either: a read started by then ends within the device
    /// timeout, as a PUT started by then would (a confirmation read follows a PUT).
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        if Instant::now() >= self.gate.cutoff {
            return Err(DeviceError::not_sent(
                "status not read: the connection event's answer is due",
            ));
        }
        self.inner.status(device).await
    }

    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        if Instant::now() >= self.gate.cutoff {
            return Err(DeviceError::not_sent(
                "status not read: the connection event's answer is due",
            ));
        }
        self.inner.status_if_free(device).await
    }

    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        if Instant::now() >= self.gate.cutoff {
            return Err(DeviceError::not_sent(
                "PUT not sent: the connection event's answer is due",
            ));
        }
        self.gate.started.store(true, Ordering::Relaxed);
        self.inner.apply_min_soc(device, min_soc, request_id).await
    }
}

fn unreadable(device: &DeviceId, row: &crate::ports::CorruptRow) -> Fate {
    warn!(device = %device, error = %row, "device event for an unreadable ledger row ignored");
    Fate::Ignored("ledger record unreadable")
}

/// A `400` naming the event (its position in a batch) and the attribute.
fn rejected(e: &EventError) -> ApiResponse {
    warn!(index = ?e.index, field = e.error.field, "device events rejected");
    let mut p = ApiResponse::problem(400, "Invalid request", e.to_string())
        .with_member("field", json!(e.error.field));
    if let Some(i) = e.index {
        p = p.with_member("index", json!(i));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::device_event::{CONNECTED, DISCONNECTED};
    use crate::domain::RequestStatus;
    use crate::functions::fakes::{post_min_soc, Harness};
    use crate::ports::{Clock as _, Ledger as _};

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
        assert_eq!(r.body_json()["applied"], 1);
        assert_eq!(r.body_json()["events"][0]["result"], "applied");
        assert_eq!(r.body_json()["events"][0]["requestId"], id.as_str());
        assert_eq!(r.body_json()["events"][0]["deviceId"], "d1");
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
        assert_eq!(r.body_json()["events"][0]["requestId"], newest.as_str());
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
        assert_eq!(r.body_json()["events"][0]["result"], "pending");
        assert_eq!(r.body_json()["events"][0]["reason"], "busy");
        assert_eq!(r.body_json()["events"][0]["requestId"], id.as_str());
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
                &r.body_json()["events"][0]["result"],
                &r.body_json()["events"][0]["reason"]
            ),
            (&json!("pending"), &json!("offline"))
        );
        h.device.set_online("d1", true);
        h.device.fail_transiently("d1", 1);
        let r = handle(&h.svc, online("e2", "d1")).await;
        assert_eq!(r.body_json()["events"][0]["reason"], "transient");
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
        assert_eq!(r.body_json()["events"][0]["result"], "nothing-pending");
        let applied = post_min_soc(&h, "d1", 30).await;
        assert_eq!(applied["status"], "applied");
        let r = handle(&h.svc, online("e2", "d1")).await;
        assert_eq!(r.body_json()["events"][0]["result"], "nothing-pending");
        assert_eq!(
            r.body_json()["events"][0]["requestId"],
            applied["requestId"]
        );
        assert_eq!(
            h.device.calls(),
            (2, 1),
            "the POST's PUT and confirmation read, and the event's one status read"
        );
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
        assert_eq!(r.body_json()["received"], 2);
        assert_eq!(r.body_json()["ignored"], 2);
        assert_eq!(r.body_json()["events"][0]["reason"], "unknown event type");
        assert!(r.body_json()["events"][0].get("deviceId").is_none());
        assert_eq!(r.body_json()["events"][1]["result"], "ignored");
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
        let body = r.body_json();
        let results: Vec<&str> = body["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["result"].as_str().unwrap())
            .collect();
        assert_eq!(results, ["applied", "duplicate", "applied"]);
        assert_eq!(h.device.puts("d1"), vec![(40, id)]);
        // Delivered again (a sender's retry): harmless.
        let again = handle(&h.svc, post("application/json", &batch)).await;
        assert_eq!(again.body_json()["events"][0]["result"], "nothing-pending");
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
        assert_eq!(r.body_json()["applied"], 2);
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
        assert_eq!(r.body_json()["field"], "specversion");
        assert_eq!(r.body_json()["index"], 1);
        let after = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        assert_eq!(after, before, "the ledger is untouched");
        assert_eq!(h.device.calls(), (0, 1), "only the POST's PUT");
    }

    #[tokio::test]
    async fn another_content_type_is_415_naming_it() {
        let h = Harness::new();
        let r = handle(&h.svc, post("text/plain", &event("e", CONNECTED, "d1"))).await;
        assert_eq!(r.status, 415);
        assert_eq!(r.body_json()["field"], "Content-Type");
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
        assert_eq!(
            r.body_json()["events"][0]["result"],
            "applied",
            "the retry works"
        );
    }

    #[tokio::test]
    async fn an_unreadable_record_is_ignored_not_retried() {
        let h = Harness::new();
        h.ledger.corrupt("d1", "minSoc missing");
        let r = handle(&h.svc, online("e1", "d1")).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body_json()["events"][0]["reason"],
            "ledger record unreadable"
        );
    }

    /// The harness with the production device timeout (5 s: the last PUT starts 3 s
    /// after a request arrives), its clock moving with tokio's paused time, and `n`
    /// pending requests whose devices are back online.
    async fn slow_world(n: usize) -> (Harness, Vec<String>) {
        let mut h = Harness::new();
        h.svc.policy.device_timeout = chrono::Duration::seconds(5);
        let mut ids = Vec::new();
        for i in 0..n {
            ids.push(pending(&h, &format!("d{i}"), 40).await);
            h.device.set_online(&format!("d{i}"), true);
        }
        h.clock.follow_tokio_time();
        (h, ids)
    }

    fn batch_for(n: usize) -> EventsRequest {
        let events: Vec<Value> = (0..n)
            .map(|i| event(&format!("e{i}"), CONNECTED, &format!("d{i}")))
            .collect();
        post("application/cloudevents-batch+json", &json!(events))
    }

    /// Every device the answer did not apply is still pending with the same wake-up
    /// chain, and the due index covers it: its chain or the sweep applies it.
    async fn left_to_their_chains(h: &Harness, chains: &[Option<String>]) {
        let far = h.clock.now() + chrono::Duration::days(30);
        let mut indexed = Vec::new();
        for shard in 0..crate::domain::due_index::SHARDS {
            indexed.extend(h.ledger.due_entries(shard, far, 10_000).await.unwrap());
        }
        for (i, chain) in chains.iter().enumerate() {
            let rec = h.ledger_record(&format!("d{i}")).await;
            if rec.status == RequestStatus::Applied {
                continue;
            }
            assert_eq!(rec.status, RequestStatus::Pending);
            assert_eq!(&rec.wake_message_id, chain, "d{i}'s chain is untouched");
            let due = h.svc.policy.sweep_due(&rec).unwrap();
            assert!(
                indexed
                    .iter()
                    .any(|e| e.value.device_id == rec.device_id && e.value.due_at <= due),
                "d{i} is in the due index"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_of_a_hundred_is_answered_in_time_however_slow_the_device_cloud() {
        let (mut h, _) = slow_world(100).await;
        let mut chains = Vec::new();
        for i in 0..100 {
            chains.push(h.ledger_record(&format!("d{i}")).await.wake_message_id);
        }
        // Every PUT takes the whole device timeout, the ledger is slow, and the
        // device-call budget gives two turns a second.
        h.device.set_latency(std::time::Duration::from_secs(5));
        h.ledger.set_latency(std::time::Duration::from_millis(900));
        h.svc.device = std::sync::Arc::new(crate::adapters::BudgetedDeviceApi::new(
            h.device.clone(),
            2.0,
        ));
        let started = tokio::time::Instant::now();
        let r = handle(&h.svc, batch_for(100)).await;
        let took = started.elapsed();
        assert!(
            took <= h.svc.policy.events_answer_within.to_std().unwrap(),
            "answered after {took:?}"
        );
        assert_eq!(r.status, 200, "{r:?}");
        let (applied, deferred) = (
            r.body_json()["applied"].as_u64(),
            r.body_json()["deferred"].as_u64(),
        );
        assert!(applied > Some(0) && deferred > Some(50), "{}", r.body);
        for e in r.body_json()["events"].as_array().unwrap() {
            assert!(
                ["applied", "deferred", "pending"].contains(&e["result"].as_str().unwrap()),
                "{e}"
            );
        }
        let puts: usize = (0..100)
            .map(|i| h.device.puts(&format!("d{i}")).len())
            .sum();
        assert_eq!(
            puts as u64,
            applied.unwrap(),
            "every PUT made was awaited and recorded"
        );
        left_to_their_chains(&h, &chains).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_apply_still_waiting_for_a_budget_turn_at_the_cutoff_is_left_to_its_chain() {
        let (mut h, ids) = slow_world(1).await;
        let chain = h.ledger_record("d0").await.wake_message_id;
        // No turn for a long while: the wait would outlast the answer.
        let budget = crate::adapters::BudgetedDeviceApi::new(h.device.clone(), 0.05);
        budget.reserve_put().await.unwrap();
        h.svc.device = std::sync::Arc::new(budget);
        let started = tokio::time::Instant::now();
        let r = handle(&h.svc, online("e1", "d0")).await;
        assert!(
            started.elapsed()
                <= h.svc.policy.events_put_cutoff().to_std().unwrap()
                    + std::time::Duration::from_millis(1)
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body_json()["events"][0]["result"],
            "deferred",
            "{}",
            r.body
        );
        assert_eq!(r.body_json()["deferred"], 1);
        assert!(h.device.puts("d0").is_empty());
        let rec = h.ledger_record("d0").await;
        assert_eq!(rec.request_id.as_str(), ids[0]);
        left_to_their_chains(&h, &[chain]).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_put_in_flight_at_the_cutoff_is_awaited_and_its_result_written() {
        let (h, ids) = slow_world(1).await;
        // The record read and the lease write take 1.4 s each: the PUT starts 0.2 s
        // before the cutoff and lasts the whole device timeout.
        h.ledger.set_latency(std::time::Duration::from_millis(1400));
        h.device.set_latency(std::time::Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let r = handle(&h.svc, online("e1", "d0")).await;
        assert!(started.elapsed() <= h.svc.policy.events_answer_within.to_std().unwrap());
        assert_eq!(
            r.body_json()["events"][0]["result"],
            "applied",
            "{}",
            r.body
        );
        assert_eq!(h.device.puts("d0").len(), 1);
        let rec = h.ledger_record("d0").await;
        assert_eq!(
            (rec.status, rec.request_id.as_str()),
            (RequestStatus::Applied, ids[0].as_str())
        );
    }

    #[test]
    fn the_handshake_echoes_the_origin_and_allows_any_rate() {
        let r = handshake(Some(b"eventgrid.azure.net"));
        assert_eq!(r.status, 200);
        assert!(r.body.is_empty());
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
            assert_eq!(r.body_json()["field"], "WebHook-Request-Origin");
        }
        let longest = handshake(Some(&[b'a'; 255]));
        assert_eq!(longest.status, 200);
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
        assert!(r.headers.contains(&("Allow", ALLOW.into())));
    }
}
