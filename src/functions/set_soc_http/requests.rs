//! `GET /api/devices/{deviceId}/soc/requests/{requestId}`: what became of one request
//! (the target of a `202`'s `Location`).
//!
//! Reads the ledger record first and the request's history entry second, so a request
//! the ledger no longer holds is read after the write that replaced it, which also
//! settled its entry (see [`crate::domain::history`]). A request that looks undone may
//! instead have been put back by an undo between the two reads: the record is read
//! once more before answering `404`.

use tracing::warn;

use crate::domain::history::{self, HistoryEntry};
use crate::domain::{DeviceId, RequestId};

use super::render::{entry_view, ApiResponse};
use super::Services;

pub(super) async fn get(svc: &Services, device: &DeviceId, raw_id: &str) -> ApiResponse {
    let id = match RequestId::parse(raw_id) {
        Ok(id) => id,
        Err(e) => return ApiResponse::invalid(e),
    };
    for _ in 0..2 {
        match lookup(svc, device, &id).await {
            Ok(Some(entry)) => return ApiResponse::json(200, entry_view(&entry, svc.clock.now())),
            Ok(None) => continue,
            Err(e) => {
                warn!(device = %device, request_id = %id, error = %e, "ledger read failed");
                return ApiResponse::unavailable("the settings store is unavailable");
            }
        }
    }
    ApiResponse::problem(
        404,
        "Not found",
        format!("no request {id} for device {device} (the last 20 are kept)"),
    )
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
