//! `DELETE /api/devices/{deviceId}/soc/requests/{requestId}`: cancels a pending request.
//!
//! A cancel is ONE conditional write, like every settling write: the record, still
//! holding that request as pending, written `cancelled` together with the request's
//! history entry (same transaction), conditional on the ETag it was read with, and
//! moving its due-index entry out ([`super::index::put_record`]: a settled record
//! names none). Its wake-up messages then find a settled request and are no-ops, the
//! sweep drops a leftover entry, and no holder starts a PUT of it again.
//!
//! **A cancel never races a PUT into a lie.** It writes only when no lease on the
//! record may be live ([`DesiredState::lease_may_be_live`]: its `until` plus twice the
//! clock skew is past). The argument, against [`super::super::apply`]:
//! - every PUT of a request starts only after its holder's conditional write stored
//!   that request with the holder's lease and a whole PUT window of it left (the
//!   accepting write of `SetSocHttp`, or the lease-taking write in `apply_latest`);
//!   the PUT lands, late landings included, before that lease lapses (the bounds in
//!   [`super::super::Policy`]);
//! - a holder lets its lease go only once its PUT was answered (nothing more can
//!   land) and keeps it when the answer is in doubt, until it lapses;
//! - so when the cancel reads a version that holds the request pending with no lease
//!   that may be live, no PUT of it is in flight or can land later; and a holder that
//!   would start one must first write at an ETag the cancel's committed write has
//!   changed, re-read, and find the request settled. Once `cancelled` is answered,
//!   the value never lands.
//!
//! While a lease may be live the cancel re-reads for up to [`WAIT_FOR_LEASE`]; if it
//! still may be, the answer is `409` with `Retry-After` (the seconds until it lapses)
//! and nothing is written. Other answers: `200` with the request showing `cancelled`
//! (again for a repeated `DELETE`), `409` naming the status of a request that is no
//! longer pending (`requestStatus`), `404` for an unknown one. A write whose outcome is
//! unknown is fenced as a `POST`'s is ([`super::fence`]): the cancel then knows whether
//! it committed; only storage unreachable throughout is `500` "outcome unknown", and a
//! `503` means nothing was changed.
//!
//! Cancelling does not restore an older value on the device: it only stops this one.
//! A PUT that landed before the cancel (its answer lost with its holder, or its result
//! not written before its lease lapsed) stays on the device (README, R6).

use tracing::{info, warn};

use crate::domain::history::{HistoryEntry, ShownStatus};
use crate::domain::{DeviceId, RequestId, RequestStatus};
use crate::ports::{Precondition, StoreError};

use super::render::{entry_view, ApiResponse};
use super::{fence, outcome_unknown, requests, Fenced, Services, MAX_WRITE_ROUNDS};
use crate::functions::index;

/// How long a cancel waits for a live lease to lapse before answering `409`.
pub const WAIT_FOR_LEASE: chrono::Duration = chrono::Duration::seconds(5);
/// How often it re-reads the record meanwhile.
const RE_READ_EVERY: chrono::Duration = chrono::Duration::seconds(1);

pub(super) async fn delete(svc: &Services, device: &DeviceId, raw_id: &str) -> ApiResponse {
    let id = match RequestId::parse(raw_id) {
        Ok(id) => id,
        Err(e) => return ApiResponse::invalid(e),
    };
    // Measured on the runtime's monotonic clock: how long this invocation waited.
    let give_up = tokio::time::Instant::now() + WAIT_FOR_LEASE.to_std().unwrap_or_default();
    // Every write of ours that may still commit has been fenced by then (below), so a
    // failure is certainly "nothing changed".
    let unavailable = |e: &StoreError| {
        warn!(device = %device, request_id = %id, error = %e, "cancel: nothing written");
        ApiResponse::unavailable("the settings store is unavailable; nothing was changed")
    };
    let mut rounds = 0;
    loop {
        let current = match svc.ledger.get(device).await {
            Ok(c) => c,
            Err(e) => return unavailable(&e),
        };
        let Some(current) = current.filter(|c| c.value.request_id == id) else {
            // Not the device's current request: its history entry says what became of it.
            return match svc.ledger.history_entry(device, &id).await {
                Ok(Some(entry)) => settled(&entry),
                Ok(None) => requests::not_found(device, &id),
                Err(e) => unavailable(&e),
            };
        };
        if !current.value.is_pending() {
            return settled(&HistoryEntry::of(&current.value));
        }
        let now = svc.clock.now();
        if current
            .value
            .lease_may_be_live(now, svc.policy.max_clock_skew)
        {
            let lapses = current.value.lease.as_ref().map_or(now, |l| l.until)
                + svc.policy.max_clock_skew * 2;
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return being_applied(&HistoryEntry::of(&current.value), lapses - now);
            }
            let nap = (lapses - now)
                .min(RE_READ_EVERY)
                .to_std()
                .unwrap_or_default();
            tokio::time::sleep(nap.min(left)).await;
            continue;
        }
        rounds += 1;
        if rounds > MAX_WRITE_ROUNDS {
            return unavailable(&StoreError::Conflict);
        }
        let mut cancelled = current.value.clone();
        cancelled.mark_cancelled(now);
        match index::put_record(
            svc,
            &mut cancelled,
            Some(&current.value),
            Some(&current.etag),
        )
        .await
        {
            Ok(_) => {
                info!(device = %device, request_id = %id, "request cancelled");
                return ApiResponse::json(200, entry_view(&HistoryEntry::of(&cancelled)));
            }
            Err(StoreError::Conflict) => continue,
            Err(StoreError::Unavailable(_)) => {
                let on = Precondition::Record(current.etag.clone());
                let ours = |e: &HistoryEntry| e.request.status == RequestStatus::Cancelled;
                match fence(svc, device, &on, &id, ours).await {
                    // Certainly not written, and the storage answers again: try again.
                    Fenced::NotCommitted => continue,
                    Fenced::Committed => {
                        info!(device = %device, request_id = %id, "request cancelled (write confirmed by its fence)");
                        return ApiResponse::json(200, entry_view(&HistoryEntry::of(&cancelled)));
                    }
                    Fenced::Unknown => return outcome_unknown(
                        device,
                        &id,
                        "was being cancelled: it may or may not be cancelled; repeat the DELETE",
                    ),
                }
            }
            Err(e) => return unavailable(&e),
        }
    }
}

/// A request that is no longer pending: `200` once cancelled (a repeated `DELETE`),
/// else `409` naming what became of it.
fn settled(entry: &HistoryEntry) -> ApiResponse {
    let status = entry.status();
    if status == ShownStatus::Cancelled {
        return ApiResponse::json(200, entry_view(entry));
    }
    let r = &entry.request;
    ApiResponse::problem(
        409,
        "Request not pending",
        format!(
            "request {} for device {} is {}: only a pending request can be cancelled",
            r.request_id,
            r.device_id,
            status.as_str()
        ),
    )
    .with_member("requestId", serde_json::json!(r.request_id))
    .with_member("requestStatus", serde_json::json!(status.as_str()))
}

/// A pending request a PUT of which may still land: nothing is written; try again
/// once the lease lapses (`after`).
fn being_applied(entry: &HistoryEntry, after: chrono::Duration) -> ApiResponse {
    let r = &entry.request;
    let seconds = (after.num_milliseconds() + 999).div_euclid(1000).max(1);
    ApiResponse::problem(
        409,
        "Request being applied",
        format!(
            "request {} for device {} is being applied to the device right now; it can be \
             cancelled (if it is still pending) once that attempt is over, in {seconds} s",
            r.request_id, r.device_id
        ),
    )
    .with_member("requestId", serde_json::json!(r.request_id))
    .with_member(
        "requestStatus",
        serde_json::json!(ShownStatus::Pending.as_str()),
    )
    .with_header("Retry-After", seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::{handle, ApiRequest, ApiResponse};
    use crate::domain::{LeaseHolder, RequestStatus};
    use crate::functions::apply::{apply_latest, ApplyOutcome};
    use crate::functions::fakes::Harness;
    use crate::ports::Ledger as _;

    fn req(method: &str, device: &str, rest: Option<String>, body: &str) -> ApiRequest {
        ApiRequest {
            method: method.into(),
            device_id: device.into(),
            rest,
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    async fn post(h: &Harness, min_soc: u8) -> ApiResponse {
        let body = format!(r#"{{"minSoc":{min_soc}}}"#);
        handle(&h.svc, req("POST", "d1", None, &body)).await
    }

    fn at(id: &str) -> Option<String> {
        Some(format!("requests/{id}"))
    }

    async fn delete(h: &Harness, id: &str) -> ApiResponse {
        handle(&h.svc, req("DELETE", "d1", at(id), "")).await
    }

    fn id_of(r: &ApiResponse) -> String {
        r.body_json()["requestId"]
            .as_str()
            .expect("a request id")
            .to_string()
    }

    async fn due_entries(h: &Harness) -> usize {
        h.index_entries().await.len()
    }

    /// d1 offline, one request accepted and waiting: its id.
    async fn pending(h: &Harness) -> String {
        h.device.set_online("d1", false);
        let r = post(h, 30).await;
        assert_eq!(r.status, 202, "{r:?}");
        id_of(&r)
    }

    #[tokio::test]
    async fn a_pending_request_is_cancelled_everywhere_and_never_applied_afterwards() {
        let h = Harness::new();
        let id = pending(&h).await;
        assert!(due_entries(&h).await > 0);
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body_json()["status"], "cancelled");
        assert_eq!(r.body_json()["requestId"], id.as_str());
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.status, RequestStatus::Cancelled);
        assert!(rec.wake_message_id.is_none(), "its wake-up chain ends");
        assert_eq!(due_entries(&h).await, 0, "its due-index entry moved out");
        let latest = handle(&h.svc, req("GET", "d1", None, "")).await;
        assert_eq!(latest.body_json()["status"], "cancelled");
        let one = handle(&h.svc, req("GET", "d1", at(&id), "")).await;
        assert_eq!(one.body_json()["status"], "cancelled");
        // The device comes back: a wake-up, the sweep or an event finds nothing to do.
        h.device.set_online("d1", true);
        h.clock.advance(chrono::Duration::minutes(10));
        let holder = LeaseHolder::from_stored("sb-late");
        let applied = apply_latest(&h.svc, &h.id("d1"), &holder, None).await;
        assert!(matches!(
            applied.unwrap().outcome,
            ApplyOutcome::AlreadyFinal(_)
        ));
        crate::functions::drain_soc_timer::run(&h.svc)
            .await
            .unwrap();
        assert!(h.device.puts("d1").is_empty(), "never PUT after the cancel");
    }

    #[tokio::test]
    async fn a_repeated_delete_answers_200_again_and_so_does_a_replay_of_its_post() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let key = |r: ApiRequest| ApiRequest {
            idempotency_key: Some(b"k-1".to_vec()),
            ..r
        };
        let first = handle(&h.svc, key(req("POST", "d1", None, r#"{"minSoc":30}"#))).await;
        let id = id_of(&first);
        assert_eq!(delete(&h, &id).await.status, 200);
        let again = delete(&h, &id).await;
        assert_eq!(
            (again.status, &again.body_json()["status"]),
            (200, &"cancelled".into())
        );
        let replay = handle(&h.svc, key(req("POST", "d1", None, r#"{"minSoc":30}"#))).await;
        assert_eq!(replay.status, 200, "{replay:?}");
        assert_eq!(replay.body_json()["status"], "cancelled");
        assert_eq!(replay.body_json()["requestId"], id.as_str());
        // Replaced by a newer request, it is still cancelled.
        post(&h, 40).await;
        assert_eq!(delete(&h, &id).await.status, 200);
    }

    #[tokio::test]
    async fn a_request_no_longer_pending_is_409_naming_its_status() {
        let h = Harness::new();
        let old = pending(&h).await;
        h.device.set_online("d1", true);
        let applied = post(&h, 40).await;
        assert_eq!(applied.status, 200);
        for (id, status) in [(old, "superseded"), (id_of(&applied), "applied")] {
            let r = delete(&h, &id).await;
            assert_eq!(r.status, 409, "{r:?}");
            assert_eq!(r.content_type(), "application/problem+json");
            assert_eq!(r.body_json()["requestStatus"], status);
            assert_eq!(r.body_json()["requestId"], id.as_str());
        }
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Applied);
    }

    #[tokio::test]
    async fn an_unknown_request_is_404_and_a_malformed_id_400() {
        let h = Harness::new();
        assert_eq!(delete(&h, &"0".repeat(32)).await.status, 404);
        pending(&h).await;
        let r = delete(&h, &"0".repeat(32)).await;
        assert_eq!(
            (r.status, r.content_type()),
            (404, "application/problem+json")
        );
        assert_eq!(delete(&h, "NOPE").await.body_json()["field"], "requestId");
    }

    /// A pending request whose record another holder leased just now, for `secs`.
    async fn leased_for(secs: i64) -> (Harness, String) {
        let h = Harness::new();
        h.clock.follow_tokio_time();
        let id = pending(&h).await;
        h.hold_lease("d1", "sb-busy", chrono::Duration::seconds(secs))
            .await;
        (h, id)
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_lease_is_waited_for_then_409_with_retry_after_and_nothing_written() {
        let (h, id) = leased_for(30).await;
        let before = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 409, "{r:?}");
        assert_eq!(r.body_json()["requestStatus"], "pending");
        assert_eq!(
            r.body_json()["type"],
            "tag:soc-settings.api,2026:problem/request-being-applied"
        );
        let waited = started.elapsed();
        assert!(
            waited >= super::WAIT_FOR_LEASE.to_std().unwrap(),
            "{waited:?}"
        );
        let after = r.headers.iter().find(|(k, _)| *k == "Retry-After").unwrap();
        assert_eq!(after.1, "25", "the lease lapses 30 s after it was taken");
        let now = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        assert_eq!(now.etag, before.etag, "nothing written");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_counts_the_clock_skew_twice_past_the_lease() {
        let (mut h, id) = leased_for(30).await;
        h.svc.policy.max_clock_skew = chrono::Duration::seconds(2);
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 409, "{r:?}");
        let after = r.headers.iter().find(|(k, _)| *k == "Retry-After").unwrap();
        // 30 s lease, 5 s waited, plus twice the 2 s skew.
        assert_eq!(after.1, "29");
    }

    #[tokio::test]
    async fn a_cancel_that_keeps_losing_races_gives_up_after_its_rounds_unwritten() {
        let h = Harness::new();
        let id = pending(&h).await;
        h.ledger.race_next_puts(super::MAX_WRITE_ROUNDS - 1);
        assert_eq!(delete(&h, &id).await.status, 200, "the last round writes");
        let h = Harness::new();
        let id = pending(&h).await;
        h.ledger.race_next_puts(super::MAX_WRITE_ROUNDS);
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Pending);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_that_lapses_within_the_wait_lets_the_cancel_through() {
        let (h, id) = leased_for(3).await;
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Cancelled);
    }

    #[tokio::test]
    async fn a_cancel_whose_write_timed_out_but_committed_is_200() {
        let h = Harness::new();
        let id = pending(&h).await;
        h.ledger.commit_next_put_then_time_out();
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_whose_write_was_lost_while_the_record_moved_on_writes_again_before_its_200() {
        // The fence conflicts (someone wrote meanwhile), so the request's history entry
        // decides: it does not say `cancelled`, so the cancel did not commit, and it
        // must write again (not answer `cancelled` for a request still pending).
        let h = Harness::new();
        let id = pending(&h).await;
        h.ledger.lose_next_put_while_another_writes();
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Cancelled);
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_down_is_503_and_nothing_changes() {
        let h = Harness::new();
        let id = pending(&h).await;
        h.ledger.set_down(true);
        let r = delete(&h, &id).await;
        assert_eq!(r.status, 503, "{r:?}");
        assert!(r.headers.iter().any(|(k, _)| *k == "Retry-After"));
        h.ledger.set_down(false);
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Pending);
    }
}
