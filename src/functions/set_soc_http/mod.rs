//! `SetSocHttp`: `GET|POST /api/devices/{deviceId}/soc` and
//! `GET /api/devices/{deviceId}/soc/requests/{requestId}` (the function's route is
//! `devices/{deviceId}/soc/{*rest}`; every method reaches the handler, which answers
//! `405` with `Allow` itself and `404` for anything else under the route). The
//! contract is `docs/openapi.yaml`.
//!
//! POST validates, then writes the request to the ledger as the device's desired
//! value, holding the device's lease, in one conditional write, and makes exactly
//! one device call (a PUT; there is no separate status check):
//! - applied: `200`;
//! - offline (`409`) or the device cloud unavailable: a wake-up message is sent and
//!   the ledger names it: `202`. If the message cannot be sent, the ledger is put
//!   back as it was before the request (`503`, nothing left that would apply it);
//!   only if even that fails does the request stay stored, and then it is a `202`,
//!   because the timer sweep re-sends a pending request that has no message:
//!   a `202` is never a lie;
//! - unknown device: the ledger write is undone: `404`; value rejected: `422`.
//!
//! Writing the ledger before the device call is what keeps the newest setting
//! winning: an older message delivered meanwhile reads the newer value, and device
//! calls are serialised by the lease (see [`super::apply`]).
//!
//! The function works on [`ApiRequest`]/[`ApiResponse`]; the router converts the
//! forwarded HTTP request and the host's envelope into them.
//!
//! - this module: the accept/undo flow above;
//! - [`idempotency`]: `Idempotency-Key` reservation, replay and release;
//! - [`requests`]: one request's status (`GET .../soc/requests/{requestId}`);
//! - [`render`]: the responses and the JSON views of a request.

mod idempotency;
mod render;
mod requests;

use chrono::{DateTime, Utc};
use tracing::{info, warn};

use crate::domain::history::HistoryEntry;
use crate::domain::{
    DesiredState, DeviceId, HolderKind, IdempotencyKey, LeaseHolder, MinSoc, RequestStatus,
    SettingRequest,
};
use crate::ports::{DeviceError, StoreError, Versioned};

use super::apply::{apply_latest, read_back, ApplyOutcome};
use super::index;
use super::wake::{self, Rescheduled};
use super::Services;
use idempotency::{finish, reserve, Reservation};
use render::{applied_response, pending_response};
pub use render::{entry_view, problem_type, view, ApiResponse, PROBLEM_TYPE_PREFIX};

/// Bounded retries of a ledger write that lost an optimistic-concurrency race.
const MAX_WRITE_ROUNDS: usize = 8;

/// The HTTP request, independent of how the host delivered it.
#[derive(Debug, Clone, Default)]
pub struct ApiRequest {
    pub method: String,
    pub device_id: String,
    /// Raw `Idempotency-Key` header value, if present.
    pub idempotency_key: Option<Vec<u8>>,
    pub body: Vec<u8>,
    /// The route's catch-all after `soc/` (`requests/{requestId}`); `None` or empty for
    /// the device's own resource.
    pub rest: Option<String>,
}

/// What a path under the function's route names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resource<'a> {
    /// `/soc`: the device's latest request (GET) and new requests (POST).
    Device,
    /// `/soc/requests/{requestId}`: one request (GET).
    Request(&'a str),
    /// Anything else under the route.
    Unknown,
}

impl<'a> Resource<'a> {
    fn of(rest: Option<&'a str>) -> Self {
        match rest.map(|r| r.trim_end_matches('/')) {
            None | Some("") => Self::Device,
            Some(r) => match r.strip_prefix("requests/") {
                Some(id) if !id.is_empty() && !id.contains('/') => Self::Request(id),
                _ => Self::Unknown,
            },
        }
    }

    fn allow(self) -> &'static str {
        match self {
            Self::Device => "GET, POST",
            Self::Request(_) | Self::Unknown => "GET",
        }
    }
}

pub async fn handle(svc: &Services, req: ApiRequest) -> ApiResponse {
    let resource = Resource::of(req.rest.as_deref());
    let method = req.method.to_ascii_uppercase();
    match (resource, method.as_str()) {
        (Resource::Unknown, _) => return ApiResponse::problem(404, "Not found", "no such route"),
        (Resource::Device, "GET" | "POST") | (Resource::Request(_), "GET") => {}
        _ => {
            return ApiResponse::problem(
                405,
                "Method not allowed",
                format!("{method} is not allowed here; use {}", resource.allow()),
            )
            .with_header("Allow", resource.allow())
        }
    }
    let device = match DeviceId::parse(&req.device_id) {
        Ok(d) => d,
        Err(e) => return ApiResponse::invalid(e),
    };
    match (resource, method.as_str()) {
        (Resource::Request(id), _) => requests::get(svc, &device, id).await,
        (_, "POST") => post(svc, device, req.idempotency_key.as_deref(), &req.body).await,
        _ => get(svc, &device).await,
    }
}

async fn get(svc: &Services, device: &DeviceId) -> ApiResponse {
    match svc.ledger.get(device).await {
        Ok(Some(v)) => ApiResponse::json(200, view(&v.value, svc.clock.now())),
        Ok(None) => ApiResponse::problem(
            404,
            "Not found",
            format!("no settings request for device {device}"),
        ),
        Err(e) => {
            warn!(device = %device, error = %e, "ledger read failed");
            ApiResponse::unavailable("the settings store is unavailable")
        }
    }
}

async fn post(svc: &Services, device: DeviceId, key: Option<&[u8]>, body: &[u8]) -> ApiResponse {
    let key = match key.map(IdempotencyKey::parse).transpose() {
        Ok(k) => k,
        Err(e) => return ApiResponse::invalid(e),
    };
    let setting = match SettingRequest::parse(body) {
        Ok(s) => s,
        Err(e) => return ApiResponse::invalid(e),
    };
    let Some(key) = key else {
        return accept(svc, device, setting).await;
    };
    let fingerprint = format!("minSoc={}", setting.min_soc.percent());
    let reservation = match reserve(svc, &device, &key, &fingerprint).await {
        Ok(Reservation::Fresh(etag)) => etag,
        Ok(Reservation::Answer(response)) => return response,
        Err(e) => {
            warn!(device = %device, error = %e, "idempotency record unavailable");
            return ApiResponse::unavailable("the settings store is unavailable");
        }
    };
    let response = accept(svc, device.clone(), setting).await;
    finish(svc, &device, &key, &fingerprint, reservation, &response).await;
    response
}

/// Writes the request to the ledger holding the device's lease, then makes one
/// device call: applied (`200`); offline or unavailable (wake-up message, `202`);
/// unknown device (ledger write undone, `404`); value rejected (`422`).
async fn accept(svc: &Services, device: DeviceId, setting: SettingRequest) -> ApiResponse {
    let now = svc.clock.now();
    let holder = LeaseHolder::new(HolderKind::Http);
    let (accepted, previous) = match write_accepted(svc, &device, setting, now, &holder).await {
        Ok(Accepted::Written(written)) => *written,
        Ok(Accepted::Overtaken(ours)) => {
            // Whether our write landed is unknown, but a newer request is there now:
            // either way ours is superseded, as if it had been stored first.
            warn!(device = %device, request_id = %ours.request_id, "accepting write of unknown outcome overtaken by a newer request");
            return pending_response(&ours);
        }
        Err(e) => return store_failed(&device, &e.to_string()),
    };
    let ours = accepted.value.request_id.clone();
    let applied = match apply_latest(svc, &device, &holder, Some(accepted.clone())).await {
        Ok(a) => a,
        Err(e) => {
            // The request is in the ledger; the sweep finds it (no wake message yet) and re-sends.
            warn!(device = %device, request_id = %ours, error = %e, "ledger failed during apply; the sweep will pick the request up");
            return pending_response(&accepted.value);
        }
    };
    if applied.delivered.contains(&ours) {
        let mut shown = accepted.value.clone();
        shown.mark_applied(svc.clock.now());
        if let ApplyOutcome::Applied(r) = &applied.outcome {
            if r.request_id == ours {
                shown = r.clone();
            }
        }
        return applied_response(&shown);
    }
    // A PUT of ours that got no answer may have landed: then nothing may be undone.
    let maybe_landed = matches!(
        applied.outcome,
        ApplyOutcome::Transient(
            _,
            DeviceError::Transient {
                unanswered: true,
                ..
            }
        )
    );
    let (current, not_before) = match applied.outcome {
        ApplyOutcome::Failed(r, DeviceError::UnknownDevice) if r.request_id == ours => {
            // Not a request we accept: leave nothing behind.
            let undone = undo(svc, &device, &ours, previous, |r| {
                r.status == RequestStatus::Failed
            })
            .await;
            if !undone {
                warn!(device = %device, request_id = %ours, "could not undo the ledger write for an unknown device; it stays recorded as failed");
            }
            return refused(&device, r.min_soc, &DeviceError::UnknownDevice);
        }
        ApplyOutcome::Failed(r, e) if r.request_id == ours => {
            return refused(&device, r.min_soc, &e)
        }
        ApplyOutcome::Offline(v) => (v, None),
        // The holder converges; look again once its lease lapses, in case it died.
        ApplyOutcome::Busy(v) => {
            let lapses = v.value.lease.as_ref().map(|l| l.until);
            (v, lapses)
        }
        ApplyOutcome::Transient(v, DeviceError::Transient { retry_after, .. }) => {
            let at = retry_after
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| svc.clock.now() + d);
            (v, at)
        }
        ApplyOutcome::Transient(v, _) => (v, None),
        // Superseded by a newer request or settled by someone else meanwhile.
        other => return response_for_settled(svc, &accepted.value, other),
    };
    if current.value.request_id != ours {
        return pending_response(&accepted.value);
    }
    match wake::schedule_recheck(svc, current, None, not_before).await {
        Ok(Rescheduled::Scheduled { .. } | Rescheduled::Superseded | Rescheduled::NoTimeLeft) => {
            info!(device = %device, request_id = %ours, min_soc = setting.min_soc.percent(), "request stored until the device is back");
            pending_response(&accepted.value)
        }
        Err(wake::WakeError::Store(e)) => {
            // The message is out; the ledger holds the request without naming it, so the
            // delivery treats it as the chain (and the sweep would re-send otherwise).
            warn!(device = %device, request_id = %ours, error = %e, "could not record the wake-up message");
            pending_response(&accepted.value)
        }
        Err(wake::WakeError::Queue(e)) => {
            // Nothing may stay behind that would apply this request later.
            if !maybe_landed && undo(svc, &device, &ours, previous, DesiredState::is_pending).await
            {
                store_failed(&device, &e.to_string())
            } else {
                warn!(device = %device, request_id = %ours, "could not undo the ledger write; the request stays stored and the sweep will re-send it");
                pending_response(&accepted.value)
            }
        }
    }
}

/// Writes a new pending request over whatever the ledger holds, taking the device's
/// lease for `holder` (and counting the attempt) when nobody else holds it, with a
/// clock reading taken right before each write. Returns the written record and the
/// one it replaced. A write whose outcome is unknown (timed out) is read back: the
/// error stands only when the record certainly is not ours (it still holds the request
/// we wrote over).
async fn write_accepted(
    svc: &Services,
    device: &DeviceId,
    setting: SettingRequest,
    now: DateTime<Utc>,
    holder: &LeaseHolder,
) -> Result<Accepted, StoreError> {
    let mut current = svc.ledger.get(device).await?;
    let mut record = DesiredState::accept(
        device.clone(),
        setting.min_soc,
        now,
        svc.policy.request_ttl,
        current.as_ref().map(|v| &v.value),
    );
    for _ in 0..MAX_WRITE_ROUNDS {
        // Filed in the due index first (nothing is written yet if this fails), as
        // stamped now: the stamp below is later, so the record is due no earlier than
        // its entry. The stamp is taken after the filing, right before the write.
        let mut provisional = record.clone();
        let filed_at = svc.clock.now();
        provisional.updated_at = filed_at;
        provisional.expires_at = filed_at + svc.policy.request_ttl;
        index::file_if_earlier(svc, &provisional, current.as_ref().map(|v| &v.value)).await?;
        let now = svc.clock.now();
        // The request is accepted by the round whose write lands: it is stamped with
        // that round's clock reading, taken after it read the record it writes over
        // (the read-back below relies on it).
        record.requested_at = now;
        record.expires_at = now + svc.policy.request_ttl;
        record.updated_at = now;
        if record.lease_free_for(holder, now) {
            record.record_attempt(holder, now, svc.policy.lease);
        }
        // What became of the request this one replaces, written in the same write.
        let replaced = current
            .as_ref()
            .map(|v| HistoryEntry::replaced(&v.value, &record.request_id, now));
        match svc
            .ledger
            .accept(
                &record,
                replaced.as_ref(),
                current.as_ref().map(|v| &v.etag),
            )
            .await
        {
            Ok(etag) => {
                return Ok(Accepted::Written(Box::new((
                    Versioned {
                        value: record,
                        etag,
                    },
                    current.map(|v| v.value),
                ))))
            }
            Err(StoreError::Conflict) => {
                current = svc.ledger.get(device).await?;
                record = record.rebased_on(current.as_ref().map(|v| &v.value), now);
            }
            Err(e @ StoreError::Unavailable(_)) if cfg!(feature = "mutant-no-read-back") => {
                return Err(e)
            }
            Err(e @ StoreError::Unavailable(_)) => {
                let before = current.as_ref().map(|v| &v.value.request_id);
                return match read_back(svc, device).await? {
                    Some(stored) if stored.value.request_id == record.request_id => Ok(
                        Accepted::Written(Box::new((stored, current.map(|v| v.value)))),
                    ),
                    // Gone, or still the request we wrote over: had ours landed, every
                    // later write would have been over ours (ETags), none puts that one
                    // back, and only ours would delete ours.
                    None => Err(e),
                    Some(stored) if Some(&stored.value.request_id) == before => Err(e),
                    // Accepted by a round that read the record before ours could have
                    // landed (or put back by an undo): had ours landed, that write would
                    // have conflicted.
                    Some(stored)
                        if stored.value.requested_at + svc.policy.max_clock_skew * 2 < now =>
                    {
                        Err(e)
                    }
                    // Written after ours may have landed, over it or not.
                    _ => Ok(Accepted::Overtaken(Box::new(record))),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

/// What [`write_accepted`] did.
enum Accepted {
    /// The request is stored (with the record it replaced).
    Written(Box<(Versioned<DesiredState>, Option<DesiredState>)>),
    /// The write's outcome is unknown and a newer request is stored now.
    Overtaken(Box<DesiredState>),
}

/// Puts the ledger back as it was before `ours` was written, if the record still is
/// `ours` in the state `still` and no lease on it may be live (a holder may be
/// PUTting `ours` right now: then it stays, and converges). `true` only when this
/// call took `ours` out (so nothing can bring it back); an unknown outcome is read back.
async fn undo(
    svc: &Services,
    device: &DeviceId,
    ours: &crate::domain::RequestId,
    previous: Option<DesiredState>,
    still: impl Fn(&DesiredState) -> bool,
) -> bool {
    let mut restored = false;
    for _ in 0..MAX_WRITE_ROUNDS {
        let current = match read_back(svc, device).await {
            Ok(Some(c)) => c,
            // Only the request that inserted the record deletes it: ours, here.
            Ok(None) => return true,
            Err(_) => return false,
        };
        if current.value.request_id != *ours {
            // Our own restore may have landed (its answer was lost); anything else is a
            // newer request that superseded ours, and an undo of that one would put
            // ours back: ours was accepted, not "not kept".
            return restored
                && previous
                    .as_ref()
                    .is_some_and(|p| p.request_id == current.value.request_id);
        }
        if !still(&current.value) {
            // Settled meanwhile (e.g. applied by another invocation): not ours to undo.
            return false;
        }
        if current
            .value
            .lease_may_be_live(svc.clock.now(), svc.policy.max_clock_skew)
            && !cfg!(feature = "mutant-undo-ignores-lease")
        {
            return false;
        }
        let result = match &previous {
            Some(prev) => {
                let restored = current.value.restore(prev, svc.clock.now());
                index::put_record(svc, &restored, Some(&current.value), Some(&current.etag))
                    .await
                    .map(|_| ())
            }
            None => svc.ledger.delete(device, &current.etag).await,
        };
        match result {
            Ok(()) => return true,
            Err(StoreError::Conflict) => continue,
            // Unknown: look again.
            Err(StoreError::Unavailable(_)) => restored = true,
            Err(_) => return false,
        }
    }
    false
}

fn response_for_settled(svc: &Services, ours: &DesiredState, outcome: ApplyOutcome) -> ApiResponse {
    match outcome {
        ApplyOutcome::Applied(r) | ApplyOutcome::AlreadyFinal(r)
            if r.request_id == ours.request_id =>
        {
            match r.status {
                RequestStatus::Applied => applied_response(&r),
                _ => ApiResponse::json(200, view(&r, svc.clock.now())),
            }
        }
        _ => pending_response(ours),
    }
}

/// A permanent refusal, in our words. The device cloud's own text is not echoed: it stays in
/// the record's `lastError` (trimmed and redacted by the device client).
fn refused(device: &DeviceId, min_soc: MinSoc, error: &DeviceError) -> ApiResponse {
    match error {
        DeviceError::UnknownDevice => ApiResponse::problem(
            404,
            "Unknown device",
            format!("the device cloud does not know device {device}"),
        ),
        _ => ApiResponse::problem(
            422,
            "Setting rejected",
            format!(
                "the device cloud refused minSoc {} for device {device}; the request is failed, \
                 and the device cloud's reason is in its lastError (GET {})",
                min_soc.percent(),
                render::device_url(device.as_str())
            ),
        ),
    }
}

fn store_failed(device: &DeviceId, why: &str) -> ApiResponse {
    warn!(device = %device, reason = %why, "request not stored");
    ApiResponse::unavailable("the request could not be stored; nothing was changed, retry later")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::fakes::Harness;
    use crate::ports::Clock as _;

    fn post_req(device: &str, body: &str, key: Option<&str>) -> ApiRequest {
        ApiRequest {
            method: "POST".into(),
            device_id: device.into(),
            idempotency_key: key.map(|k| k.as_bytes().to_vec()),
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    fn get_req(device: &str) -> ApiRequest {
        ApiRequest {
            method: "GET".into(),
            device_id: device.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_online_device_gets_the_setting_at_once() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let r = handle(&h.svc, post_req("d1", r#"{"dod":70}"#, None)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["status"], "applied");
        assert_eq!(r.body["minSoc"], 30);
        assert_eq!(r.body["dod"], 70);
        assert!(r.body["appliedAt"].is_string());
        assert_eq!(
            h.device.puts("d1"),
            vec![(30, r.body["requestId"].as_str().unwrap().to_string())]
        );
        assert!(
            h.queue.sent().is_empty(),
            "no message needed for an applied request"
        );
    }

    #[tokio::test]
    async fn an_offline_device_gets_a_stored_request_and_one_scheduled_message() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(r.body["status"], "pending");
        assert!(r.headers.contains(&(
            "Location",
            format!(
                "/api/devices/d1/soc/requests/{}",
                r.body["requestId"].as_str().unwrap()
            )
        )));
        let sent = h.queue.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].body.request_id.as_str(),
            r.body["requestId"].as_str().unwrap()
        );
        assert_eq!(
            sent[0].scheduled_at,
            Some(h.clock.now() + chrono::Duration::seconds(60))
        );
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.wake_message_id.as_deref(),
            Some(sent[0].message_id.as_str())
        );
        assert!(h.device.puts("d1").is_empty());
    }

    #[tokio::test]
    async fn a_transient_device_error_stores_the_request() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.fail_transiently("d1", 2);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        assert_eq!(h.queue.sent().len(), 1);
    }

    #[tokio::test]
    async fn an_unknown_device_is_404_and_nothing_is_stored() {
        let h = Harness::new();
        let r = handle(&h.svc, post_req("ghost", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.content_type(), "application/problem+json");
        assert_eq!(h.ledger.len(), 0);
        assert!(h.queue.sent().is_empty());
    }

    #[tokio::test]
    async fn invalid_input_is_400_naming_the_field_and_touches_nothing() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        for (device, body, key, field) in [
            ("d1", r#"{"dod":101}"#, None, "dod"),
            ("d1", r#"{"dod":1,"minSoc":2}"#, None, "body"),
            ("bad id", r#"{"dod":1}"#, None, "deviceId"),
            ("d1", r#"{"dod":1}"#, Some("has space"), "Idempotency-Key"),
            ("d1", "{nope", None, "body"),
        ] {
            let r = handle(&h.svc, post_req(device, body, key)).await;
            assert_eq!(r.status, 400, "{body}");
            assert_eq!(r.body["field"], field);
            assert_eq!(r.content_type(), "application/problem+json");
        }
        assert_eq!(h.device.calls(), (0, 0));
        assert_eq!(h.ledger.len(), 0);
        assert!(h.queue.sent().is_empty());
    }

    #[tokio::test]
    async fn a_queue_outage_for_an_offline_device_is_503_with_nothing_stored() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.queue.set_down(true);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 503);
        assert!(r.headers.iter().any(|(k, _)| *k == "Retry-After"));
        assert_eq!(h.ledger.len(), 0);
    }

    #[tokio::test]
    async fn a_queue_outage_after_a_failed_apply_restores_the_previous_request() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let a = handle(&h.svc, post_req("d1", r#"{"minSoc":10}"#, None)).await;
        assert_eq!(a.status, 202);
        // The device reports online but the PUT finds it offline (it flapped); the queue is down.
        h.device.set_online("d1", true);
        h.device.on_next_put("d1", {
            let d = h.device.clone();
            move || Box::pin(async move { d.set_online("d1", false) })
        });
        h.queue.set_down(true);
        let b = handle(&h.svc, post_req("d1", r#"{"minSoc":90}"#, None)).await;
        assert_eq!(b.status, 503, "{b:?}");
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.request_id.as_str(),
            a.body["requestId"].as_str().unwrap(),
            "A is desired again"
        );
        assert_eq!(rec.min_soc.percent(), 10);
    }

    #[tokio::test]
    async fn a_storage_outage_is_503() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.ledger.set_down(true);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 503);
    }

    #[tokio::test]
    async fn the_same_idempotency_key_and_body_returns_the_first_answer() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let first = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1"))).await;
        let again = handle(&h.svc, post_req("d1", r#"{"dod":75}"#, Some("k-1"))).await;
        assert_eq!(first.status, 202);
        assert_eq!(again.status, 202);
        assert_eq!(again.body["requestId"], first.body["requestId"]);
        assert_eq!(again.body["status"], "pending");
        assert_eq!(h.queue.sent().len(), 1, "no second request");
    }

    #[tokio::test]
    async fn the_same_idempotency_key_with_another_body_is_409() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1"))).await;
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":26}"#, Some("k-1"))).await;
        assert_eq!(r.status, 409);
        assert_eq!(r.content_type(), "application/problem+json");
        assert_eq!(h.queue.sent().len(), 1);
    }

    #[tokio::test]
    async fn a_key_whose_first_use_failed_can_be_retried() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.queue.set_down(true);
        assert_eq!(
            handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1")))
                .await
                .status,
            503
        );
        h.queue.set_down(false);
        assert_eq!(
            handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1")))
                .await
                .status,
            202
        );
    }

    #[tokio::test]
    async fn a_post_costs_exactly_one_device_call_online_or_offline() {
        let h = Harness::new();
        h.device.set_online("on", true);
        h.device.set_online("off", false);
        assert_eq!(
            handle(&h.svc, post_req("on", r#"{"minSoc":25}"#, None))
                .await
                .status,
            200
        );
        assert_eq!(h.device.calls(), (0, 1));
        assert_eq!(
            handle(&h.svc, post_req("off", r#"{"minSoc":25}"#, None))
                .await
                .status,
            202
        );
        assert_eq!(h.device.calls(), (0, 2));
    }

    #[tokio::test]
    async fn an_unknown_device_leaves_the_previous_request_in_place() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let a = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        h.device.forget("d1");
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":35}"#, None)).await;
        assert_eq!(r.status, 404);
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.request_id.as_str(),
            a.body["requestId"].as_str().unwrap()
        );
        assert_eq!(rec.status, RequestStatus::Pending);
    }

    #[tokio::test]
    async fn a_post_while_another_invocation_holds_the_lease_is_stored_for_it_to_converge() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        h.hold_lease("d1", "queue-delivery", chrono::Duration::seconds(30))
            .await;
        h.device.set_online("d1", true);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":35}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        assert!(
            h.device.puts("d1").is_empty(),
            "only the lease holder talks to the device"
        );
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.min_soc.percent(), 35);
        assert_eq!(
            rec.lease.unwrap().holder.as_str(),
            "queue-delivery",
            "the holder's lease is kept so it converges"
        );
    }

    #[tokio::test]
    async fn a_queue_outage_never_rolls_back_a_request_under_another_holders_live_lease() {
        // Issue 8, bug 1: the holder may be PUTting this very request; rolling it back
        // would leave the device and the ledger disagreeing after a 503.
        let h = Harness::new();
        h.device.set_online("d1", false);
        handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        h.hold_lease("d1", "queue-delivery", chrono::Duration::seconds(30))
            .await;
        h.queue.set_down(true);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":35}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.min_soc.percent(),
            35,
            "the request stays for the holder"
        );
        assert_eq!(rec.lease.unwrap().holder.as_str(), "queue-delivery");
    }

    #[tokio::test]
    async fn get_shows_the_latest_request_or_404() {
        let h = Harness::new();
        assert_eq!(handle(&h.svc, get_req("d1")).await.status, 404);
        h.device.set_online("d1", false);
        handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        let b = handle(&h.svc, post_req("d1", r#"{"minSoc":35}"#, None)).await;
        let r = handle(&h.svc, get_req("d1")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body["requestId"], b.body["requestId"]);
        assert_eq!(r.body["status"], "pending");
        assert_eq!(r.body["attempts"], 1, "the POST tried the device once");
        assert_eq!(r.body["lastError"], "device offline");
        h.clock.advance(h.svc.policy.request_ttl);
        assert_eq!(
            handle(&h.svc, get_req("d1")).await.body["status"],
            "expired"
        );
    }
}
