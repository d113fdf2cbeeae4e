//! `SetSocHttp`: `GET|POST /api/devices/{deviceId}/soc` and
//! `GET|DELETE /api/devices/{deviceId}/soc/requests/{requestId}` (the function's route is
//! `devices/{deviceId}/soc/{*rest}`; every method reaches the handler, which answers
//! `405` with `Allow` itself and `404` for anything else under the route). The
//! contract is `docs/openapi.yaml`.
//!
//! POST validates, then commits the request: ONE atomic, conditional ledger write
//! (the record as the device's desired value holding the device's lease, its history
//! entry, the entry of the request it replaces, its `Idempotency-Key` row). That
//! write is the commit point: once it is known to have committed, the answer is the
//! request's own state, never `503`. Then exactly one device call (a PUT):
//! - applied: `200`;
//! - offline (`409`) or the device cloud unavailable: a wake-up message is sent and
//!   the ledger names it: `202`. If the message cannot be sent it is still `202`: the
//!   request's due-index entry (filed before the write) brings the timer sweep;
//! - unknown device (`404`) or value rejected (`422`): the request is recorded as
//!   failed, and the answer names it.
//!
//! A write whose outcome is unknown (timed out) is fenced: the precondition it was
//! conditional on is consumed, so it can never commit later, and only then is `503`
//! certain; if another write consumed it first, the request's history entry says
//! whether ours committed. Storage unreachable throughout: `500` "outcome unknown".
//!
//! Writing the ledger before the device call is what keeps the newest setting
//! winning: an older message delivered meanwhile reads the newer value, and device
//! calls are serialised by the lease (see [`super::apply`]).
//!
//! The function works on [`ApiRequest`]/[`ApiResponse`]; the router converts the
//! forwarded HTTP request and the host's envelope into them.
//!
//! - this module: the commit and the device call above;
//! - [`idempotency`]: `Idempotency-Key` look-up and replay;
//! - [`requests`]: one request's status (`GET .../soc/requests/{requestId}`), also as a replayed answer;
//! - [`cancel`]: cancelling a pending request (`DELETE .../soc/requests/{requestId}`);
//! - [`render`]: the responses and the JSON views of a request.

mod cancel;
mod idempotency;
pub(crate) mod render;
mod requests;

use tracing::{info, warn};

use crate::domain::history::HistoryEntry;
use crate::domain::{
    DesiredState, DeviceId, HolderKind, IdempotencyKey, LeaseHolder, RequestId, SettingRequest,
};
use crate::ports::{ETag, IdempotencyRecord, KeyWrite, Precondition, StoreError, Versioned};

use super::apply::{apply_latest, read_back, ApplyOutcome};
use super::wake;
use super::Services;
use super::{index, notify};
use idempotency::KeyUse;
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
    /// `/soc/requests/{requestId}`: one request (GET, DELETE).
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
            Self::Request(_) => "GET, DELETE",
            Self::Unknown => "GET",
        }
    }
}

pub async fn handle(svc: &Services, mut req: ApiRequest) -> ApiResponse {
    req.method.make_ascii_uppercase();
    let method = req.method.as_str();
    let resource = Resource::of(req.rest.as_deref());
    match (resource, method) {
        (Resource::Unknown, _) => return ApiResponse::problem(404, "Not found", "no such route"),
        (Resource::Device, "GET" | "POST") | (Resource::Request(_), "GET" | "DELETE") => {}
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
    // Each store path boxed: their futures are several KB, and the caller's futures are
    // moved around per invocation; a request refused above or by `post_input` never
    // builds one.
    match (resource, method) {
        (Resource::Request(id), "DELETE") => Box::pin(cancel::delete(svc, &device, id)).await,
        (Resource::Request(id), _) => Box::pin(requests::get(svc, &device, id)).await,
        (_, "POST") => match post_input(req.idempotency_key.as_deref(), &req.body) {
            Ok((key, setting)) => Box::pin(post(svc, device, key, setting)).await,
            Err(refused) => refused,
        },
        _ => Box::pin(get(svc, &device)).await,
    }
}

async fn get(svc: &Services, device: &DeviceId) -> ApiResponse {
    match svc.ledger.get(device).await {
        Ok(Some(v)) => ApiResponse::json(200, view(&v.value)),
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

/// A POST's own input: its `Idempotency-Key` and setting, or the `400` that refuses it.
fn post_input(
    key: Option<&[u8]>,
    body: &[u8],
) -> Result<(Option<IdempotencyKey>, SettingRequest), ApiResponse> {
    let key = key
        .map(IdempotencyKey::parse)
        .transpose()
        .map_err(ApiResponse::invalid)?;
    let setting = SettingRequest::parse(body).map_err(ApiResponse::invalid)?;
    Ok((key, setting))
}

async fn post(
    svc: &Services,
    device: DeviceId,
    key: Option<IdempotencyKey>,
    setting: SettingRequest,
) -> ApiResponse {
    let fingerprint = format!("minSoc={}", setting.min_soc.percent());
    let key = match key {
        None => None,
        Some(key) => match idempotency::look_up(svc, &device, &key, &fingerprint).await {
            Ok(KeyUse::First(replaces)) => Some(KeyToWrite {
                key,
                fingerprint,
                replaces,
            }),
            Ok(KeyUse::Answer(response)) => return response,
            Err(e) => return store_failed(&device, &e.to_string()),
        },
    };
    accept(svc, device, setting, key).await
}

/// The `Idempotency-Key` a new request writes with it.
struct KeyToWrite {
    key: IdempotencyKey,
    fingerprint: String,
    /// The key's expired row, replaced by the accepting write.
    replaces: Option<ETag>,
}

/// Commits the request (the one commit point), then makes one device call: applied
/// (`200`); offline or unavailable (wake-up message, `202`); refused (`404`/`422`, the
/// request stays recorded as failed).
async fn accept(
    svc: &Services,
    device: DeviceId,
    setting: SettingRequest,
    key: Option<KeyToWrite>,
) -> ApiResponse {
    let holder = LeaseHolder::new(HolderKind::Http);
    let accepted = match commit(svc, &device, setting, &holder, key.as_ref()).await {
        Committed::Current(v) => *v,
        Committed::Answer(response) => return response,
    };
    let ours = accepted.value.request_id.clone();
    let applied = match apply_latest(svc, &device, &holder, Some(accepted.clone())).await {
        Ok(a) => a,
        Err(e) => {
            // Committed: the due index entry filed before the write brings the sweep.
            warn!(device = %device, request_id = %ours, error = %e, "ledger failed during apply; the sweep will pick the request up");
            return pending_response(&accepted.value);
        }
    };
    if applied.delivered.contains(&ours) {
        return match &applied.outcome {
            ApplyOutcome::Applied(r) if r.request_id == ours => applied_response(r),
            _ => {
                let mut shown = accepted.value.clone();
                shown.mark_applied(svc.clock.now());
                applied_response(&shown)
            }
        };
    }
    let (current, not_before) = match applied.outcome {
        ApplyOutcome::Failed(r, _) if r.request_id == ours => {
            return requests::refused(&HistoryEntry::of(&r))
        }
        ApplyOutcome::Offline(v) => (v, None),
        // The holder converges; look again once its lease lapses, in case it died.
        ApplyOutcome::Busy(v) => {
            let lapses = v.value.lease.as_ref().map(|l| l.until);
            (v, lapses)
        }
        ApplyOutcome::Transient(v, e) => {
            let at = e
                .retry_after()
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| svc.clock.now() + d);
            (v, at)
        }
        // Superseded by a newer request or settled by someone else meanwhile.
        _ => return settled_answer(svc, &accepted.value).await,
    };
    if current.value.request_id != ours {
        return settled_answer(svc, &accepted.value).await;
    }
    match wake::schedule_recheck(svc, current, None, not_before).await {
        Ok(_) => {
            info!(device = %device, request_id = %ours, min_soc = setting.min_soc.percent(), "request stored until the device is back");
        }
        Err(e) => {
            // Committed all the same: the request's due-index entry, filed before the
            // accepting write, brings the sweep within one wake grace plus one sweep
            // interval (README "How it stays correct").
            warn!(device = %device, request_id = %ours, error = %e, "no wake-up message for the request; the sweep will re-send it");
        }
    }
    pending_response(&accepted.value)
}

/// The answer for a committed request another invocation has moved on meanwhile: its
/// state now, or, if that cannot be read, `202` as accepted (it is stored either way).
async fn settled_answer(svc: &Services, ours: &DesiredState) -> ApiResponse {
    match requests::answer_for(svc, &ours.device_id, &ours.request_id).await {
        Ok(answer) => answer,
        Err(e) => {
            warn!(device = %ours.device_id, request_id = %ours.request_id, error = %e, "ledger read failed after the request was stored");
            pending_response(ours)
        }
    }
}

/// What [`commit`] decided.
enum Committed {
    /// The request is stored and is the device's current request.
    Current(Box<Versioned<DesiredState>>),
    /// The answer is known without a device call: `503` (certainly not kept), `500`
    /// (outcome unknown), a stored request's state (superseded meanwhile), or the
    /// answer to a concurrent first use of the same key.
    Answer(ApiResponse),
}

/// The one commit point: writes a new pending request (with its history entry, the
/// entry of the request it replaces and its key row, in one atomic write) over
/// whatever the ledger holds, conditional on the record's ETag, or on the device's
/// anchor row for its first request. The device's lease is taken for `holder` (the
/// attempt counted) when nobody else holds it, with a clock reading taken right
/// before the write. A write whose outcome is unknown is fenced ([`fence`]), never
/// judged from timestamps.
async fn commit(
    svc: &Services,
    device: &DeviceId,
    setting: SettingRequest,
    holder: &LeaseHolder,
    key: Option<&KeyToWrite>,
) -> Committed {
    let not_kept = |e: StoreError| Committed::Answer(store_failed(device, &e.to_string()));
    // The first round files the new request's due-index entry while it reads the
    // record: a new request's sweep-due time depends only on when it is stamped, so
    // the entry needs nothing from the record (one round trip less before the commit).
    let mut early = DesiredState::accept(
        device.clone(),
        setting.min_soc,
        svc.clock.now(),
        svc.policy.request_ttl,
        None,
    );
    let early_move = index::plan(svc, &mut early, None);
    let (read, filed) = futures::join!(svc.ledger.get(device), early_move.file(svc));
    let mut current = match (read, filed) {
        (Ok(c), Ok(())) => c,
        // An entry filed for nothing is an extra one, which the sweep drops.
        (Err(e), _) | (_, Err(e)) => return not_kept(e),
    };
    let mut prefiled = Some((
        early.due_entry,
        early_move.retiring(current.as_ref().map(|v| &v.value)),
    ));
    let mut record = DesiredState::accept(
        device.clone(),
        setting.min_soc,
        svc.clock.now(),
        svc.policy.request_ttl,
        current.as_ref().map(|v| &v.value),
    );
    for _ in 0..MAX_WRITE_ROUNDS {
        let on = match &current {
            Some(v) => Precondition::Record(v.etag.clone()),
            None => match svc.ledger.anchor(device).await {
                Ok(etag) => Precondition::Anchor(etag),
                Err(e) => return not_kept(e),
            },
        };
        // Filed in the due index first (nothing is written yet if this fails), as
        // stamped now: the stamp below is later, so the record is due no earlier than
        // its entry. The stamp is taken after the filing, right before the write.
        let moved = match prefiled.take() {
            Some((entry, moved)) => {
                record.due_entry = entry;
                moved
            }
            None => {
                let mut provisional = record.clone();
                let filed_at = svc.clock.now();
                provisional.updated_at = filed_at;
                provisional.expires_at = filed_at + svc.policy.request_ttl;
                let moved = index::plan(svc, &mut provisional, current.as_ref().map(|v| &v.value));
                if let Err(e) = moved.file(svc).await {
                    return not_kept(e);
                }
                record.due_entry = provisional.due_entry;
                moved
            }
        };
        let now = svc.clock.now();
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
        // Ending it, if it was pending: its event goes in the same write.
        let events = notify::replaced(
            svc,
            current.as_ref().map(|v| &v.value),
            replaced.as_ref(),
            &mut record,
        );
        let backstop = match notify::Backstop::file(svc, device, &events).await {
            Ok(b) => b,
            Err(e) => return not_kept(e),
        };
        let key_row = key.map(|k| IdempotencyRecord {
            device_id: device.clone(),
            key: k.key.clone(),
            fingerprint: k.fingerprint.clone(),
            request_id: record.request_id.clone(),
            created_at: now,
        });
        let key_write = key.zip(key_row.as_ref()).map(|(k, record)| KeyWrite {
            record,
            replaces: k.replaces.as_ref(),
        });
        match svc
            .ledger
            .accept(&record, replaced.as_ref(), key_write, &on, &events)
            .await
        {
            Ok(etag) => {
                tokio::join!(moved.committed(svc), backstop.committed(svc));
                return Committed::Current(Box::new(Versioned {
                    value: record,
                    etag,
                }));
            }
            Err(StoreError::Conflict) => {
                if let Some(k) = key {
                    // A concurrent first use of the key may have won: answer from it.
                    match idempotency::live_row(svc, device, &k.key).await {
                        Ok(Some(row)) => {
                            return Committed::Answer(
                                idempotency::answer(svc, device, &row, &k.fingerprint).await,
                            )
                        }
                        Ok(None) => {}
                        Err(e) => return not_kept(e),
                    }
                }
                current = match svc.ledger.get(device).await {
                    Ok(c) => c,
                    Err(e) => return not_kept(e),
                };
                record = record.rebased_on(current.as_ref().map(|v| &v.value), now);
            }
            Err(e @ StoreError::Unavailable(_)) => {
                let stored = |_: &HistoryEntry| true;
                return match fence(svc, device, &on, &record.request_id, stored).await {
                    Fenced::NotCommitted => not_kept(e),
                    Fenced::Committed => {
                        tokio::join!(moved.committed(svc), backstop.committed(svc));
                        match read_back(svc, device).await {
                            Ok(Some(stored)) if stored.value.request_id == record.request_id => {
                                Committed::Current(Box::new(stored))
                            }
                            // Stored, and already replaced or settled by someone else.
                            _ => Committed::Answer(settled_answer(svc, &record).await),
                        }
                    }
                    Fenced::Unknown => Committed::Answer(outcome_unknown(
                        device,
                        &record.request_id,
                        "was being written: it may or may not be stored; retry with the same \
                         Idempotency-Key, or read the device's latest request",
                    )),
                };
            }
            Err(e) => return not_kept(e),
        }
    }
    not_kept(StoreError::Conflict)
}

/// Tries to fence an accepting write of unknown outcome, about as long as a read-back.
const FENCE_TRIES: u32 = 14;

/// What became of a write whose outcome was unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fenced {
    /// It never committed and never will (the precondition it needed is consumed).
    NotCommitted,
    /// It committed (its request's history entry, written with it, is there).
    Committed,
    /// The storage stayed unreachable: nobody can tell yet.
    Unknown,
}

/// Settles a write conditional on `on` whose outcome is unknown: consumes `on` so that
/// the write, if still in flight, can never commit; if a write consumed it first, ours
/// committed exactly when the history entry of `ours` (written in the same
/// transaction) is there and `shows_ours` (an accepting write: any entry; a cancel:
/// one that says `cancelled`). Retries while the storage is unavailable (0.1 s
/// doubling to 5 s, about 50 s).
async fn fence(
    svc: &Services,
    device: &DeviceId,
    on: &Precondition,
    ours: &RequestId,
    shows_ours: impl Fn(&HistoryEntry) -> bool,
) -> Fenced {
    let mut wait = std::time::Duration::from_millis(100);
    for _ in 0..FENCE_TRIES {
        match svc.ledger.fence(device, on).await {
            Ok(()) => return Fenced::NotCommitted,
            Err(StoreError::Conflict) => match svc.ledger.history_entry(device, ours).await {
                Ok(Some(entry)) if shows_ours(&entry) => return Fenced::Committed,
                Ok(_) => return Fenced::NotCommitted,
                Err(StoreError::Unavailable(_)) => {}
                Err(_) => return Fenced::Unknown,
            },
            Err(StoreError::Unavailable(_)) => {}
            Err(_) => return Fenced::Unknown,
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(std::time::Duration::from_secs(5));
    }
    Fenced::Unknown
}

fn store_failed(device: &DeviceId, why: &str) -> ApiResponse {
    warn!(device = %device, reason = %why, "request not stored");
    ApiResponse::unavailable("the request could not be stored; nothing was changed, retry later")
}

/// The storage stayed unreachable after a write timed out: it may or may not have
/// committed, and no answer can be honest but this one. An accepting write: if it is
/// stored, the sweep applies it like any other; a retry with the same
/// `Idempotency-Key` answers from it once the storage is back (or creates it if it
/// never was). A cancel: a repeated `DELETE` tells. `what` says what the write was
/// doing to the request.
fn outcome_unknown(device: &DeviceId, request: &RequestId, what: &str) -> ApiResponse {
    warn!(device = %device, request_id = %request, "write of unknown outcome: the storage stayed unreachable");
    let problem = ApiResponse::problem(
        500,
        "Outcome unknown",
        format!(
            "the settings store stopped answering while request {request} {what}, once the \
             store is back"
        ),
    );
    problem
        .with_member("requestId", serde_json::json!(request))
        .with_header("Retry-After", "30")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestStatus;
    use crate::functions::fakes::Harness;
    use crate::ports::{Clock as _, Ledger as _};

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
        assert_eq!(r.body_json()["status"], "applied");
        assert_eq!(r.body_json()["minSoc"], 30);
        assert_eq!(r.body_json()["dod"], 70);
        assert!(r.body_json()["appliedAt"].is_string());
        assert_eq!(
            h.device.puts("d1"),
            vec![(30, r.body_json()["requestId"].as_str().unwrap().to_string())]
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
        assert_eq!(r.body_json()["status"], "pending");
        assert!(r.headers.contains(&(
            "Location",
            format!(
                "/api/devices/d1/soc/requests/{}",
                r.body_json()["requestId"].as_str().unwrap()
            )
            .into()
        )));
        let sent = h.queue.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].body.request_id.as_str(),
            r.body_json()["requestId"].as_str().unwrap()
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
    async fn an_unknown_device_is_404_naming_the_request_which_stays_failed() {
        let h = Harness::new();
        let r = handle(&h.svc, post_req("ghost", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 404);
        assert_eq!(r.content_type(), "application/problem+json");
        let body = r.body_json();
        let id = body["requestId"]
            .as_str()
            .expect("the 404 names the request");
        let location = r.headers.iter().find(|(k, _)| *k == "Location").unwrap();
        assert_eq!(location.1, format!("/api/devices/ghost/soc/requests/{id}"));
        let rec = h.ledger_record("ghost").await;
        assert_eq!(rec.request_id.as_str(), id);
        assert_eq!(rec.status, RequestStatus::Failed);
        assert!(h.queue.sent().is_empty());
        assert!(h.device.puts("ghost").is_empty());
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
            assert_eq!(r.body_json()["field"], field);
            assert_eq!(r.content_type(), "application/problem+json");
        }
        assert_eq!(h.device.calls(), (0, 0));
        assert_eq!(h.ledger.len(), 0);
        assert!(h.queue.sent().is_empty());
    }

    #[tokio::test]
    async fn a_queue_outage_for_an_offline_device_is_202_and_leaves_the_request_to_the_sweep() {
        // One commit point: once the request is stored, no failure after it is a 503.
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.queue.set_down(true);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.request_id.as_str(),
            r.body_json()["requestId"].as_str().unwrap()
        );
        assert_eq!(rec.status, RequestStatus::Pending);
        assert!(rec.wake_message_id.is_none(), "no message was sent");
        // Its due-index entry (filed before the write) brings the sweep once overdue.
        let due = h.svc.policy.sweep_due(&rec).unwrap();
        assert!(due <= h.clock.now() + h.svc.policy.wake_grace, "{due}");
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
        assert_eq!(
            again.body_json()["requestId"],
            first.body_json()["requestId"]
        );
        assert_eq!(again.body_json()["status"], "pending");
        assert_eq!(h.queue.sent().len(), 1, "no second request");
    }

    #[tokio::test(start_paused = true)]
    async fn two_first_uses_of_a_key_at_once_make_one_request_and_the_loser_replays_it() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        // Every ledger call takes a moment, so both POSTs find the key unused before
        // either writes; the second accepting write then conflicts on the key row.
        h.ledger.set_latency(std::time::Duration::from_millis(10));
        let (a, b) = tokio::join!(
            handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1"))),
            handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1")))
        );
        assert_eq!((a.status, b.status), (202, 202), "{a:?} {b:?}");
        assert_eq!(a.body_json()["requestId"], b.body_json()["requestId"]);
        let replayed = |r: &ApiResponse| {
            r.headers
                .iter()
                .any(|(k, v)| *k == "Idempotent-Replayed" && v == "true")
        };
        assert!(replayed(&a) != replayed(&b), "one made it, one replayed it");
        assert_eq!(h.ledger_record("d1").await.attempts, 1);
    }

    #[tokio::test]
    async fn a_replay_of_a_refused_request_is_refused_again() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.reject("d1", "minSoc below the installer's floor");
        let first = handle(&h.svc, post_req("d1", r#"{"minSoc":5}"#, Some("k-1"))).await;
        assert_eq!(first.status, 422, "{first:?}");
        let replay = handle(&h.svc, post_req("d1", r#"{"minSoc":5}"#, Some("k-1"))).await;
        assert_eq!(replay.status, 422, "{replay:?}");
        assert_eq!(
            replay.body_json()["requestId"],
            first.body_json()["requestId"]
        );
    }

    #[tokio::test]
    async fn a_key_is_kept_until_the_instant_its_retention_ends() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let first = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(first.body_json()["requestedAt"], "2026-11-21T12:00:00.000Z");
        h.clock
            .advance(crate::domain::IDEMPOTENCY_KEY_RETENTION - chrono::Duration::milliseconds(1));
        let replay = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(
            replay.body_json()["requestId"],
            first.body_json()["requestId"]
        );
        h.clock.advance(chrono::Duration::milliseconds(1));
        let fresh = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_ne!(
            fresh.body_json()["requestId"],
            first.body_json()["requestId"]
        );
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
    async fn a_key_whose_first_use_was_not_kept_can_be_retried() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.ledger.set_down(true);
        assert_eq!(
            handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1")))
                .await
                .status,
            503
        );
        h.ledger.set_down(false);
        assert_eq!(
            handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1")))
                .await
                .status,
            202
        );
    }

    #[tokio::test]
    async fn a_retry_answers_from_the_requests_current_state_and_never_creates_another() {
        // Issue 17, case 3: the first invocation applied {30} and died before it could
        // answer; the user then set 50. The retry of the first POST must not put 30 back.
        let h = Harness::new();
        h.device.set_online("d1", true);
        let first = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(first.status, 200);
        let newer = handle(&h.svc, post_req("d1", r#"{"minSoc":50}"#, None)).await;
        assert_eq!(newer.status, 200);
        h.clock.advance(chrono::Duration::hours(2));
        let retry = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(retry.status, 200, "{retry:?}");
        assert_eq!(
            retry.body_json()["requestId"],
            first.body_json()["requestId"]
        );
        // It was applied before the newer one replaced it: its history says so.
        assert_eq!(retry.body_json()["status"], "applied");
        assert!(retry
            .headers
            .contains(&("Idempotent-Replayed", "true".into())));
        let puts: Vec<u8> = h.device.puts("d1").into_iter().map(|p| p.0).collect();
        assert_eq!(puts, vec![30, 50], "the retry PUT nothing");
        assert_eq!(h.ledger_record("d1").await.min_soc.percent(), 50);
    }

    #[tokio::test]
    async fn a_replay_shows_the_state_now_and_a_key_is_free_again_after_its_retention() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let first = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(first.status, 202);
        h.device.set_online("d1", true);
        h.clock.advance(chrono::Duration::seconds(61));
        crate::functions::apply::apply_latest(
            &h.svc,
            &h.id("d1"),
            &LeaseHolder::from_stored("q"),
            None,
        )
        .await
        .unwrap();
        let replay = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(replay.status, 200, "applied now: {replay:?}");
        assert_eq!(replay.body_json()["status"], "applied");
        h.clock.advance(crate::domain::IDEMPOTENCY_KEY_RETENTION);
        let fresh = handle(&h.svc, post_req("d1", r#"{"minSoc":30}"#, Some("k-1"))).await;
        assert_eq!(fresh.status, 200);
        assert_ne!(
            fresh.body_json()["requestId"],
            first.body_json()["requestId"]
        );
        assert!(!fresh
            .headers
            .iter()
            .any(|(k, _)| *k == "Idempotent-Replayed"));
    }

    #[tokio::test]
    async fn a_write_that_times_out_is_fenced_so_a_503_is_never_stored_later() {
        // Issue 17, case 1: the accepting write reaches the storage after the caller
        // gave up. The fence consumes the ETag it was conditional on, so it cannot commit.
        for earlier in [false, true] {
            let h = Harness::new();
            h.device.set_online("d1", false);
            if earlier {
                handle(&h.svc, post_req("d1", r#"{"minSoc":20}"#, None)).await;
            }
            h.ledger.defer_next_accept();
            let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1"))).await;
            assert_eq!(r.status, 503, "{r:?}");
            assert_eq!(
                h.ledger.land_deferred(),
                Err(StoreError::Conflict),
                "the late write must fail"
            );
            let kept = h.ledger.get(&h.id("d1")).await.unwrap();
            assert!(
                kept.is_none_or(|k| k.value.min_soc.percent() == 20),
                "earlier={earlier}"
            );
            // The key is free: the retry creates the request now.
            let retry = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, Some("k-1"))).await;
            assert_eq!(retry.status, 202, "{retry:?}");
            assert!(!retry
                .headers
                .iter()
                .any(|(k, _)| *k == "Idempotent-Replayed"));
        }
    }

    #[tokio::test]
    async fn a_write_that_committed_but_timed_out_is_answered_as_stored() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.ledger.commit_next_accept_then_time_out();
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.request_id.as_str(),
            r.body_json()["requestId"].as_str().unwrap()
        );
        assert_eq!(h.queue.sent().len(), 1, "its wake-up chain started");
    }

    #[tokio::test]
    async fn a_write_that_committed_but_timed_out_and_was_replaced_at_once_answers_for_itself() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.ledger.commit_next_accept_then_time_out_replaced_by(80);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":20}"#, None)).await;
        let newer = h.ledger_record("d1").await;
        assert_eq!(newer.min_soc.percent(), 80);
        assert_eq!(r.body_json()["minSoc"], 20, "{r:?}");
        assert_ne!(
            r.body_json()["requestId"],
            serde_json::json!(newer.request_id.as_str())
        );
        assert_eq!(r.body_json()["status"], "superseded", "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_whose_outcome_stays_unknown_is_a_500_naming_the_request() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.ledger.defer_next_accept_and_go_down();
        let started = tokio::time::Instant::now();
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 500, "{r:?}");
        assert_eq!(r.content_type(), "application/problem+json");
        assert!(r.body_json()["requestId"].is_string());
        assert!(r.headers.iter().any(|(k, _)| *k == "Retry-After"));
        // The fence kept trying for its whole window first: 0.1 s doubling to 5 s,
        // 14 tries (46.3 s).
        assert_eq!(started.elapsed(), std::time::Duration::from_millis(46_300));
    }

    #[tokio::test]
    async fn a_request_whose_wake_up_could_not_be_sent_is_covered_from_its_accepting_write() {
        // Its index entry, filed before the accepting write, is at the sweep-due time of
        // the record as accepted: the sweep finds it once the wake-up is overdue.
        let h = Harness::new();
        h.device.set_online("d1", false);
        h.queue.set_down(true);
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        let record = h.ledger_record("d1").await;
        assert!(record.wake_message_id.is_none());
        let entries = h.index_entries().await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(Some(entries[0].due_at), h.svc.policy.sweep_due(&record));
    }

    #[tokio::test]
    async fn an_accepting_write_tried_again_after_a_race_files_its_entry_at_its_own_due_time() {
        // Under another holder's lease the POST makes no later write that would move
        // the entry: the one its accepting write named must be at the record's time.
        let h = Harness::new();
        h.device.set_online("d1", false);
        handle(&h.svc, post_req("d1", r#"{"minSoc":15}"#, None)).await;
        h.hold_lease("d1", "sb-busy", chrono::Duration::seconds(30))
            .await;
        h.queue.set_down(true);
        h.ledger.race_next_accept();
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        let record = h.ledger_record("d1").await;
        assert_eq!(record.min_soc.percent(), 25);
        let named = h
            .index_entries()
            .await
            .into_iter()
            .find(|e| record.due_entry == Some(e.row_key()))
            .map(|e| e.due_at);
        assert_eq!(named, h.svc.policy.sweep_due(&record), "{record:?}");
    }

    #[tokio::test]
    async fn a_post_costs_one_put_and_an_applied_one_one_confirmation_read() {
        let h = Harness::new();
        h.device.set_online("on", true);
        h.device.set_online("off", false);
        assert_eq!(
            handle(&h.svc, post_req("on", r#"{"minSoc":25}"#, None))
                .await
                .status,
            200
        );
        assert_eq!(
            h.device.calls(),
            (1, 1),
            "its PUT and its confirmation read"
        );
        assert_eq!(
            handle(&h.svc, post_req("off", r#"{"minSoc":25}"#, None))
                .await
                .status,
            202
        );
        assert_eq!(h.device.calls(), (1, 2), "offline: its PUT only");
    }

    #[tokio::test]
    async fn an_unknown_device_supersedes_the_previous_request_and_fails_the_new_one() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let a = handle(&h.svc, post_req("d1", r#"{"minSoc":25}"#, None)).await;
        h.device.forget("d1");
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":35}"#, None)).await;
        assert_eq!(r.status, 404);
        let rec = h.ledger_record("d1").await;
        assert_eq!(
            rec.request_id.as_str(),
            r.body_json()["requestId"].as_str().unwrap()
        );
        assert_eq!(rec.status, RequestStatus::Failed);
        let old = requests::answer_for(
            &h.svc,
            &h.id("d1"),
            &RequestId::from_stored(a.body_json()["requestId"].as_str().unwrap()),
        )
        .await
        .unwrap();
        assert_eq!(old.body_json()["status"], "superseded");
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
        let lease = rec.lease.clone().unwrap();
        assert_eq!(
            lease.holder.as_str(),
            "queue-delivery",
            "the holder's lease is kept so it converges"
        );
        // In case the holder died: a wake-up message for this request, not before the
        // holder's lease lapses.
        let sent = h.queue.sent();
        let last = sent.last().expect("a wake-up message");
        assert_eq!(
            rec.wake_message_id.as_deref(),
            Some(last.message_id.as_str())
        );
        assert!(last.scheduled_at.unwrap() >= lease.until, "{last:?}");
    }

    #[tokio::test]
    async fn a_post_the_device_cloud_answers_transiently_is_kept_with_a_wake_up_after_its_retry_after(
    ) {
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.fail_transiently("d1", 1);
        h.device
            .set_retry_after(std::time::Duration::from_secs(600));
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":35}"#, None)).await;
        assert_eq!(r.status, 202, "{r:?}");
        let rec = h.ledger_record("d1").await;
        let sent = h.queue.sent();
        let last = sent.last().expect("a wake-up message");
        assert_eq!(
            rec.wake_message_id.as_deref(),
            Some(last.message_id.as_str())
        );
        assert!(
            last.scheduled_at.unwrap() >= h.clock.now() + chrono::Duration::seconds(600),
            "{last:?}"
        );
    }

    #[tokio::test]
    async fn a_post_superseded_during_its_put_answers_for_itself_when_the_newer_one_is_refused() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        // While this POST's PUT is in flight a newer request is accepted, and the
        // device cloud starts refusing the value: the POST's apply goes on to PUT the
        // newer request (it holds the lease), which is refused.
        h.accept_during_next_put("d1", 90, |h| h.device.reject("d1", "value not allowed"));
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":10}"#, None)).await;
        let newer = h.ledger_record("d1").await;
        assert_eq!(newer.status, RequestStatus::Failed);
        assert_eq!(r.body_json()["minSoc"], 10, "{r:?}");
        assert_ne!(
            r.body_json()["requestId"],
            serde_json::json!(newer.request_id.as_str())
        );
        assert_ne!(
            r.status, 422,
            "the refusal was not of this POST's request: {r:?}"
        );
    }

    #[tokio::test]
    async fn a_post_whose_put_landed_before_a_newer_request_was_applied_answers_for_itself() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        // While this POST's PUT is in flight, a newer request is accepted; the POST's
        // apply then puts the newer one too (it holds the lease).
        h.accept_during_next_put("d1", 90, |_| {});
        let r = handle(&h.svc, post_req("d1", r#"{"minSoc":10}"#, None)).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body_json()["status"], "applied");
        assert_eq!(
            r.body_json()["minSoc"],
            10,
            "the answer is about this POST's request"
        );
        assert_ne!(
            r.body_json()["requestId"],
            serde_json::json!(h.ledger_record("d1").await.request_id.as_str())
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
        assert_eq!(r.body_json()["requestId"], b.body_json()["requestId"]);
        assert_eq!(r.body_json()["status"], "pending");
        assert_eq!(
            r.body_json()["attempts"],
            1,
            "the POST tried the device once"
        );
        assert_eq!(r.body_json()["lastError"], "device offline");
        // Reads show what the ledger says, so instances with different clocks never
        // disagree: pending past `expiresAt` until the sweep writes the expiry.
        h.clock.advance(h.svc.policy.request_ttl);
        assert_eq!(
            handle(&h.svc, get_req("d1")).await.body_json()["status"],
            "pending"
        );
        crate::functions::drain_soc_timer::run(&h.svc)
            .await
            .unwrap();
        assert_eq!(
            handle(&h.svc, get_req("d1")).await.body_json()["status"],
            "expired"
        );
    }
}
