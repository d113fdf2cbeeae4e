//! `Idempotency-Key` for `POST`: one record per device and key in the ledger.
//!
//! Invariants: a key is reserved (record without a response) before the request is
//! accepted, so two concurrent uses cannot both go ahead; the same key with the same
//! body replays the first answer (`Idempotent-Replayed: true`), with another body it
//! is `409`; a reservation older than `Policy::idempotency_in_flight` (longer than
//! the slowest POST) is taken over (its
//! invocation is presumed dead). Only answers that settled the request (`200`, `202`,
//! `422`) are kept; any other answer frees the key for a retry.

use serde_json::Value;
use tracing::warn;

use crate::domain::{DeviceId, IdempotencyKey, RequestId};
use crate::ports::{ETag, IdempotencyRecord, StoreError, StoredResponse};

use super::render::{location, ApiResponse};
use super::{Services, MAX_WRITE_ROUNDS};

pub(super) enum Reservation {
    /// First use of the key: go ahead; finish with this ETag.
    Fresh(ETag),
    /// Answer without doing anything (replay, different body, or still in flight).
    Answer(ApiResponse),
}

pub(super) async fn reserve(
    svc: &Services,
    device: &DeviceId,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<Reservation, StoreError> {
    for _ in 0..MAX_WRITE_ROUNDS {
        let now = svc.clock.now();
        match svc.ledger.get_idempotency(device, key).await? {
            None => {
                let record = IdempotencyRecord {
                    device_id: device.clone(),
                    key: key.clone(),
                    fingerprint: fingerprint.to_string(),
                    response: None,
                    created_at: now,
                };
                match svc.ledger.put_idempotency(&record, None).await {
                    Ok(etag) => return Ok(Reservation::Fresh(etag)),
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e),
                }
            }
            Some(existing) if existing.value.fingerprint != fingerprint => {
                return Ok(Reservation::Answer(ApiResponse::problem(
                    409,
                    "Idempotency-Key reused",
                    "this Idempotency-Key was already used with a different request body",
                )));
            }
            Some(existing) => {
                if let Some(stored) = &existing.value.response {
                    return Ok(Reservation::Answer(replay(stored)));
                }
                if now - existing.value.created_at < svc.policy.idempotency_in_flight {
                    return Ok(Reservation::Answer(
                        ApiResponse::problem(
                            409,
                            "Request in progress",
                            "a request with this Idempotency-Key is still being processed",
                        )
                        .with_header("Retry-After", "1"),
                    ));
                }
                // The first attempt died mid-way: take the key over.
                let mut record = existing.value.clone();
                record.created_at = now;
                match svc
                    .ledger
                    .put_idempotency(&record, Some(&existing.etag))
                    .await
                {
                    Ok(etag) => return Ok(Reservation::Fresh(etag)),
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
    Err(StoreError::Conflict)
}

/// Keeps the answer for accepted (and permanently refused) requests; frees the key otherwise.
pub(super) async fn finish(
    svc: &Services,
    device: &DeviceId,
    key: &IdempotencyKey,
    fingerprint: &str,
    etag: ETag,
    response: &ApiResponse,
) {
    let result = if matches!(response.status, 200 | 202 | 422) {
        let record = IdempotencyRecord {
            device_id: device.clone(),
            key: key.clone(),
            fingerprint: fingerprint.to_string(),
            response: Some(StoredResponse {
                status: response.status,
                body: response.body.clone(),
            }),
            created_at: svc.clock.now(),
        };
        svc.ledger
            .put_idempotency(&record, Some(&etag))
            .await
            .map(|_| ())
    } else {
        svc.ledger.delete_idempotency(device, key, &etag).await
    };
    if let Err(e) = result {
        warn!(device = %device, error = %e, "could not record the idempotent response");
    }
}

/// The stored answer again, as first given: a stored `422` is a problem document
/// (`application/problem+json`), a `202` names the request's own status.
fn replay(stored: &StoredResponse) -> ApiResponse {
    let mut response = if stored.status >= 400 {
        ApiResponse::problem_body(stored.status, stored.body.clone())
    } else {
        ApiResponse::json(stored.status, stored.body.clone())
    }
    .with_header("Idempotent-Replayed", "true");
    if stored.status == 202 {
        let device = stored.body.get("deviceId").and_then(Value::as_str);
        let request = stored.body.get("requestId").and_then(Value::as_str);
        if let (Some(device), Some(request)) = (device, request) {
            let request = RequestId::from_stored(request);
            response = response.with_header("Location", location(device, &request));
        }
    }
    response
}
