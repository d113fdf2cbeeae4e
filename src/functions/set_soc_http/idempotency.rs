//! `Idempotency-Key` for `POST`: one key row per device and key, written in the same
//! atomic write as the request it creates ([`crate::ports::Ledger::accept`]).
//!
//! Invariants: a key names a request exactly when that request is stored (same
//! transaction), so there is no in-flight state to wait for or take over; two
//! concurrent first uses are settled by the transaction's insert conflict on the key
//! row; a retry with the same body answers from the request's *current* state
//! (`Idempotent-Replayed: true`, the status code that state has, [`super::requests`]),
//! so a replay never creates, re-applies or re-sends anything; the same key with
//! another body is `409`. A key expires
//! [`IDEMPOTENCY_KEY_RETENTION`](crate::domain::IDEMPOTENCY_KEY_RETENTION) after its
//! first use: then it is free again (its row is replaced, or deleted by the ledger
//! after a later request of the device).

use tracing::warn;

use crate::domain::{DeviceId, IdempotencyKey, IDEMPOTENCY_KEY_RETENTION};
use crate::ports::{ETag, IdempotencyRecord, StoreError, Versioned};

use super::render::ApiResponse;
use super::{requests, Services};

/// What a key means for a new `POST`.
pub(super) enum KeyUse {
    /// First use (or the earlier use has expired: its row, read with this ETag, is
    /// replaced in the accepting write).
    First(Option<ETag>),
    /// Answer without doing anything: a replay, or the key reused with another body.
    Answer(ApiResponse),
}

/// Looks the key up before a request is created.
pub(super) async fn look_up(
    svc: &Services,
    device: &DeviceId,
    key: &IdempotencyKey,
    fingerprint: &str,
) -> Result<KeyUse, StoreError> {
    match svc.ledger.get_idempotency(device, key).await? {
        None => Ok(KeyUse::First(None)),
        Some(row) if !is_live(svc, &row) => Ok(KeyUse::First(Some(row.etag))),
        Some(row) => Ok(KeyUse::Answer(
            answer(svc, device, &row.value, fingerprint).await,
        )),
    }
}

/// The key's row if it is live: after a write conflict, whether a concurrent first
/// use of the key won (then answer from its request).
pub(super) async fn live_row(
    svc: &Services,
    device: &DeviceId,
    key: &IdempotencyKey,
) -> Result<Option<IdempotencyRecord>, StoreError> {
    Ok(svc
        .ledger
        .get_idempotency(device, key)
        .await?
        .filter(|row| is_live(svc, row))
        .map(|row| row.value))
}

fn is_live(svc: &Services, row: &Versioned<IdempotencyRecord>) -> bool {
    svc.clock.now() - row.value.created_at < IDEMPOTENCY_KEY_RETENTION
}

/// The answer to a `POST` whose key was already used: `409` for another body, else the
/// current state of the request the key created, replayed.
pub(super) async fn answer(
    svc: &Services,
    device: &DeviceId,
    row: &IdempotencyRecord,
    fingerprint: &str,
) -> ApiResponse {
    if row.fingerprint != fingerprint {
        return ApiResponse::problem(
            409,
            "Idempotency-Key reused",
            "this Idempotency-Key was already used with a different request body",
        );
    }
    match requests::answer_for(svc, device, &row.request_id).await {
        Ok(answer) => answer.with_header("Idempotent-Replayed", "true"),
        // This retry created nothing; the request the key names stands.
        Err(e) => {
            warn!(device = %device, request_id = %row.request_id, error = %e, "ledger read failed");
            ApiResponse::unavailable("the settings store is unavailable; nothing new was kept")
        }
    }
}
