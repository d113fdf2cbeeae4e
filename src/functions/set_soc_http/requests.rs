//! `GET /api/devices/{deviceId}/soc/requests/{requestId}`: what became of one request
//! (the target of a `202`'s `Location`), and the same state as the answer to a `POST`
//! replayed by its `Idempotency-Key` ([`answer_for`]).
//!
//! Reads the ledger record first and the request's history entry second, so a request
//! the ledger no longer holds is read after the write that replaced it, which also
//! settled its entry (see [`crate::domain::history`]). A request's entry is written in
//! the same write that stores it, so a request without one was never stored.

use tracing::warn;

use crate::domain::history::{self, HistoryEntry, ShownStatus, HISTORY_LIMIT};
use crate::domain::{DeviceId, RequestId};
use crate::ports::DeviceError;

use super::render::{entry_view, location, ApiResponse};
use super::Services;

pub(super) async fn get(svc: &Services, device: &DeviceId, raw_id: &str) -> ApiResponse {
    let id = match RequestId::parse(raw_id) {
        Ok(id) => id,
        Err(e) => return ApiResponse::invalid(e),
    };
    match lookup(svc, device, &id).await {
        Ok(Some(entry)) => ApiResponse::json(200, entry_view(&entry)),
        Ok(None) => not_found(device, &id),
        Err(e) => {
            warn!(device = %device, request_id = %id, error = %e, "ledger read failed");
            ApiResponse::unavailable("the settings store is unavailable")
        }
    }
}

/// No such request for the device: never accepted, or older than the history kept.
pub(super) fn not_found(device: &DeviceId, id: &RequestId) -> ApiResponse {
    ApiResponse::problem(
        404,
        "Not found",
        format!("no request {id} for device {device} (at least the last {HISTORY_LIMIT} are kept)"),
    )
}

/// A stored request's current state as the answer to the `POST` that created it: `202`
/// while pending (with `Location`), `200` once applied, superseded, expired or
/// cancelled (showing that status), the
/// refusal (`404` unknown device, `422` rejected value, naming the request) once
/// failed; `409` if it is older than the history kept (it was superseded then). A
/// read failure is the caller's to answer: the request is stored either way.
pub(super) async fn answer_for(
    svc: &Services,
    device: &DeviceId,
    id: &RequestId,
) -> Result<ApiResponse, crate::ports::StoreError> {
    let Some(entry) = lookup(svc, device, id).await? else {
        return Ok(ApiResponse::problem(
            409,
            "Request no longer kept",
            format!(
                "request {id} was superseded and is older than the requests kept \
                 for device {device} (at least the last {HISTORY_LIMIT})"
            ),
        ));
    };
    Ok(match entry.status() {
        ShownStatus::Pending => ApiResponse::json(202, entry_view(&entry))
            .with_header("Location", location(device.as_str(), id)),
        ShownStatus::Failed => refused(&entry),
        _ => ApiResponse::json(200, entry_view(&entry)),
    })
}

/// A request the device cloud refused permanently, in our words (its own text stays
/// in the request's `lastError`): `404` for an unknown device, `422` otherwise; both
/// name the request and where to read it.
pub(super) fn refused(entry: &HistoryEntry) -> ApiResponse {
    let r = &entry.request;
    let device = r.device_id.as_str();
    let unknown = r.last_error.as_deref() == Some(&DeviceError::UnknownDevice.to_string());
    let problem = if unknown {
        ApiResponse::problem(
            404,
            "Unknown device",
            format!(
                "the device cloud does not know device {device}; request {} is failed",
                r.request_id
            ),
        )
    } else {
        ApiResponse::problem(
            422,
            "Setting rejected",
            format!(
                "the device cloud refused minSoc {} for device {device}; request {} is failed, \
                 and the device cloud's reason is in its lastError",
                r.min_soc.percent(),
                r.request_id
            ),
        )
    };
    problem
        .with_member("requestId", serde_json::json!(r.request_id))
        .with_header("Location", location(device, &r.request_id))
}

async fn lookup(
    svc: &Services,
    device: &DeviceId,
    id: &RequestId,
) -> Result<Option<HistoryEntry>, crate::ports::StoreError> {
    let current = svc.ledger.get(device).await?.map(|v| v.value);
    if current.as_ref().is_some_and(|c| c.request_id == *id) {
        return Ok(history::lookup(id, current.as_ref(), None));
    }
    let entry = svc.ledger.history_entry(device, id).await?;
    Ok(history::lookup(id, current.as_ref(), entry))
}

#[cfg(test)]
mod tests {
    use super::super::{handle, ApiRequest};
    use crate::functions::fakes::Harness;

    fn post(device: &str, min_soc: u8) -> ApiRequest {
        ApiRequest {
            method: "POST".into(),
            device_id: device.into(),
            body: format!(r#"{{"minSoc":{min_soc}}}"#).into_bytes(),
            ..Default::default()
        }
    }

    fn get(device: &str, rest: &str) -> ApiRequest {
        ApiRequest {
            method: "GET".into(),
            device_id: device.into(),
            rest: Some(rest.into()),
            ..Default::default()
        }
    }

    fn rest_of(location: &str) -> String {
        location.split("/soc/").nth(1).unwrap().to_string()
    }

    fn location(r: &super::ApiResponse) -> String {
        r.headers
            .iter()
            .find(|(k, _)| *k == "Location")
            .map(|(_, v)| v.to_string())
            .expect("a Location")
    }

    #[tokio::test]
    async fn a_202_location_shows_the_request_until_a_newer_one_supersedes_it() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let a = handle(&h.svc, post("d1", 10)).await;
        let a_at = rest_of(&location(&a));
        let shown = handle(&h.svc, get("d1", &a_at)).await;
        assert_eq!(shown.status, 200);
        for field in [
            "requestId",
            "minSoc",
            "dod",
            "status",
            "requestedAt",
            "expiresAt",
        ] {
            assert_eq!(
                shown.body_json()[field],
                a.body_json()[field],
                "{field} as in the 202"
            );
        }
        assert_eq!(
            shown.body_json()["lastError"],
            "device offline",
            "what the POST's try found"
        );
        let b = handle(&h.svc, post("d1", 20)).await;
        let shown = handle(&h.svc, get("d1", &a_at)).await;
        assert_eq!(shown.body_json()["status"], "superseded");
        assert_eq!(
            shown.body_json()["supersededBy"],
            b.body_json()["requestId"]
        );
        assert_eq!(shown.body_json()["minSoc"], 10);
        let latest = handle(
            &h.svc,
            ApiRequest {
                method: "GET".into(),
                device_id: "d1".into(),
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            latest.body_json()["requestId"],
            b.body_json()["requestId"],
            "GET /soc keeps its meaning"
        );
    }

    #[tokio::test]
    async fn a_pending_request_replaced_after_its_expiry_shows_expired() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let a = handle(&h.svc, post("d1", 10)).await;
        h.clock.advance(h.svc.policy.request_ttl);
        handle(&h.svc, post("d1", 20)).await;
        let shown = handle(&h.svc, get("d1", &rest_of(&location(&a)))).await;
        assert_eq!(shown.body_json()["status"], "expired");
        assert!(shown.body_json().get("supersededBy").is_none());
    }

    #[tokio::test]
    async fn an_unknown_id_is_404_a_malformed_one_400_and_other_paths_404() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        handle(&h.svc, post("d1", 10)).await;
        let unknown = handle(&h.svc, get("d1", &format!("requests/{}", "0".repeat(32)))).await;
        assert_eq!(unknown.status, 404);
        assert_eq!(unknown.content_type(), "application/problem+json");
        let bad = handle(&h.svc, get("d1", "requests/NOPE")).await;
        assert_eq!(
            (bad.status, bad.body_json()["field"].as_str()),
            (400, Some("requestId"))
        );
        for rest in ["requests", "requests/a/b", "history"] {
            assert_eq!(handle(&h.svc, get("d1", rest)).await.status, 404, "{rest}");
        }
    }

    #[tokio::test]
    async fn only_get_and_delete_are_allowed_on_a_request() {
        let h = Harness::new();
        let mut req = get("d1", &format!("requests/{}", "a".repeat(32)));
        req.method = "PUT".into();
        let r = handle(&h.svc, req).await;
        assert_eq!(r.status, 405);
        assert!(r.headers.contains(&("Allow", "GET, DELETE".into())));
        assert_eq!(h.device.calls(), (0, 0));
    }

    #[tokio::test]
    async fn the_store_down_is_503_with_retry_after() {
        let h = Harness::new();
        h.ledger.set_down(true);
        let r = handle(&h.svc, get("d1", &format!("requests/{}", "a".repeat(32)))).await;
        assert_eq!(r.status, 503);
        assert!(r.headers.iter().any(|(k, _)| *k == "Retry-After"));
    }
}
