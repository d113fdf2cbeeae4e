//! Apply the device's *current* desired value: the only code that PUTs to a device.
//!
//! All three functions come here. The procedure never applies a value taken from
//! a message; it reads the ledger and applies what the ledger says now. Device
//! calls are serialised per device by the ledger lease, and every ledger change is
//! a conditional (ETag) write. When a write conflicts after a device call, the
//! record is read again and the holder converges: if a newer request arrived while
//! it was talking to the device, it applies that one too before it lets go.

use tracing::{info, warn};

use crate::domain::{DesiredState, DeviceId, LeaseHolder, RequestId, RequestStatus};
use crate::ports::{DeviceError, StoreError, Versioned};

use super::Services;

/// How many conflicting ledger writes one apply tolerates before giving up (as transient).
const MAX_ROUNDS: usize = 12;
/// Reads of an unknown write's outcome before giving up (see [`read_back`]).
const READ_BACK_TRIES: u32 = 14;

/// What [`apply_latest`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOutcome {
    /// The device now holds the latest desired value; the record says applied.
    Applied(DesiredState),
    /// Nothing to do: the latest request is already applied, expired or failed.
    AlreadyFinal(DesiredState),
    /// The latest request was past its expiry; now marked expired.
    Expired(DesiredState),
    /// The device cloud refused permanently (unknown device, value rejected); marked failed.
    Failed(DesiredState, DeviceError),
    /// The device is offline; the record stays pending (attempt counted, lease released).
    Offline(Versioned<DesiredState>),
    /// The device cloud had a transient problem; the record stays pending. If the PUT
    /// got no answer it keeps this call's lease until it lapses (it may still land).
    Transient(Versioned<DesiredState>, DeviceError),
    /// Another invocation holds the device's lease and will converge to the latest value.
    Busy(Versioned<DesiredState>),
    /// The ledger has no record for this device.
    NoRecord,
}

/// The result of one apply, with the requests whose values reached the device during it.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub outcome: ApplyOutcome,
    /// Request ids this call PUT successfully (usually zero or one; more if it converged).
    pub delivered: Vec<RequestId>,
}

/// Applies the latest desired value of `device`. `start` may carry a record just
/// read or written by the caller, saving a read. `holder` must be unique per invocation.
///
/// Lease rules (the bounds are in [`super::Policy`]):
/// - before each PUT the lease is taken or renewed with a fresh clock reading, and the
///   PUT starts only if [`super::Policy::put_window`] of it is left after that write;
/// - a PUT that got no answer (it timed out and may land late) keeps the lease, which
///   covers the late landing, and this call PUTs nothing more;
/// - nothing is settled (expired) over another holder's live lease, and no PUT starts
///   within one lease of the request's expiry, so no PUT straddles it;
/// - one call PUTs a request at most once.
pub async fn apply_latest(
    svc: &Services,
    device: &DeviceId,
    holder: &LeaseHolder,
    start: Option<Versioned<DesiredState>>,
) -> Result<Applied, StoreError> {
    let mut delivered: Vec<RequestId> = Vec::new();
    // The requests this call PUT without them landing for sure, and the answers.
    let mut tried: Vec<(RequestId, DeviceError)> = Vec::new();
    // A start record that already holds our lease was written by the caller together
    // with the attempt it counts (SetSocHttp does that in its accepting write).
    let mut leased_by_caller = start
        .as_ref()
        .is_some_and(|s| s.value.holds_lease(holder, svc.clock.now()));
    let mut next = start;
    // This call's turn in the device-call budget for its next PUT, taken before the
    // lease (see below); or why it got none.
    let mut reserved = false;
    let mut refused: Option<DeviceError> = None;
    for _ in 0..MAX_ROUNDS {
        let current = match next.take() {
            Some(v) => v,
            // A landing this call confirmed must be written down (the device's truth
            // wins over bookkeeping): then it keeps trying for as long as the host lets
            // an invocation run, rather than walk away from what only it knows.
            None => match if delivered.is_empty() {
                read_back(svc, device).await?
            } else {
                read_back_for(svc, device, super::FUNCTION_TIMEOUT).await?
            } {
                Some(v) => v,
                None => {
                    return Ok(Applied {
                        outcome: ApplyOutcome::NoRecord,
                        delivered,
                    })
                }
            },
        };
        let now = svc.clock.now();
        // Only the first round can use the caller's lease; later rounds re-read the record.
        let leased_now = std::mem::take(&mut leased_by_caller);
        let in_doubt = tried.iter().any(|(_, e)| {
            matches!(
                e,
                DeviceError::Transient {
                    unanswered: true,
                    ..
                }
            )
        });
        let mut record = current.value.clone();

        // We already put exactly this request on the device in an earlier round:
        // only the bookkeeping is left. The device's truth wins over bookkeeping: that
        // includes an `expired` the sweep wrote while our result write was failing.
        let ours_landed = delivered.contains(&record.request_id);
        if ours_landed
            && matches!(
                record.status,
                RequestStatus::Pending | RequestStatus::Expired
            )
        {
            record.mark_applied(now);
            record.release_lease(holder);
            match write(svc, &mut record, &current.value, &current.etag).await {
                Ok(_) => {
                    return Ok(Applied {
                        outcome: ApplyOutcome::Applied(record),
                        delivered,
                    })
                }
                // What landed must be written down (see below): unknown outcomes too.
                Err(StoreError::Conflict | StoreError::Unavailable(_)) => continue,
                Err(e) => return Err(e),
            }
        }

        // Settled already: only let go of a lease we might still hold (never while a
        // PUT of ours may still land: the lease is what keeps others off the device).
        if !record.is_pending() {
            if record.holds_lease(holder, now) && !in_doubt {
                record.release_lease(holder);
                if let Err(e) = write(svc, &mut record, &current.value, &current.etag).await {
                    if e == StoreError::Conflict {
                        continue;
                    }
                    return Err(e);
                }
            }
            return Ok(Applied {
                outcome: ApplyOutcome::AlreadyFinal(record),
                delivered,
            });
        }

        // A request this call already PUT (its write lost a race, or the record came
        // back to it): never PUT twice; record the same answer on the record read now.
        if let Some((_, error)) = tried.iter().find(|(id, _)| *id == record.request_id) {
            let outcome = record_answer(&mut record, holder, Err(error.clone()), now);
            match write(svc, &mut record, &current.value, &current.etag).await {
                Ok(etag) => return Ok(finish(record, etag, outcome, delivered)),
                Err(StoreError::Conflict | StoreError::Unavailable(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        if let Some((_, error)) = tried.iter().find(|(_, e)| {
            matches!(
                e,
                DeviceError::Transient {
                    unanswered: true,
                    ..
                }
            )
        }) {
            // Another request; our lease is in its record and keeps everyone off the
            // device until our PUT can no longer land. Whoever comes next applies it.
            return Ok(Applied {
                outcome: ApplyOutcome::Transient(current, error.clone()),
                delivered,
            });
        }

        if !record.lease_free_for(holder, now) {
            return Ok(Applied {
                outcome: ApplyOutcome::Busy(current),
                delivered,
            });
        }

        // Expired, or so close to expiry that a PUT started now could land after it:
        // decided before a turn in the device-call budget is taken (a request that will
        // not be PUT must not wait for one), and again after the wait below.
        let cut = svc.policy.lease;
        let mut too_late = record.is_expired_at(now + cut);

        // Wait for the PUT's turn in the device-call budget now, before the lease is taken
        // or renewed, so the wait cannot eat the lease's PUT window
        // (`adapters::device_budget`). No turn: a transient answer that sent nothing,
        // recorded like one (once per call). The wait may have been long: read the clock again.
        if !reserved && !too_late {
            let turn = match &refused {
                Some(e) => Err(e.clone()),
                None => svc.device.reserve_put().await,
            };
            if let Err(e) = turn {
                refused = Some(e.clone());
                let outcome = record_answer(&mut record, holder, Err(e), svc.clock.now());
                match write(svc, &mut record, &current.value, &current.etag).await {
                    Ok(etag) => return Ok(finish(record, etag, outcome, delivered)),
                    Err(StoreError::Conflict | StoreError::Unavailable(_)) => continue,
                    Err(e) => return Err(e),
                }
            }
            reserved = true;
        }
        let now = svc.clock.now();

        // Mark it expired (nobody else holds a live lease, checked just above).
        too_late = too_late || record.is_expired_at(now + cut);
        if too_late {
            record.mark_expired(now);
            record.release_lease(holder);
            match write(svc, &mut record, &current.value, &current.etag).await {
                Ok(_) => {
                    info!(device = %device, request_id = %record.request_id, "request expired before its device came online");
                    return Ok(Applied {
                        outcome: ApplyOutcome::Expired(record),
                        delivered,
                    });
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }

        // Take (or renew) the lease with a fresh clock reading, counting the attempt,
        // in one conditional write; the caller's lease is kept if it still covers a PUT.
        let caller_lease_covers = record.lease_covers(holder, now, svc.policy.put_window);
        // The record as stored when the PUT starts, and its ETag.
        let (stored, etag) = if leased_now && caller_lease_covers {
            (current.value.clone(), current.etag.clone())
        } else {
            let now = svc.clock.now();
            if leased_now {
                record.take_lease(holder, now, svc.policy.lease);
            } else {
                record.record_attempt(holder, now, svc.policy.lease);
            }
            match write(svc, &mut record, &current.value, &current.etag).await {
                Ok(etag) => (record.clone(), etag),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        };
        // The write may have been slow: PUT only with a whole PUT's worth of lease left.
        if !record.lease_covers(holder, svc.clock.now(), svc.policy.put_window) {
            warn!(device = %device, "lease too short for a PUT after a slow ledger write; renewing");
            continue;
        }

        let result = svc
            .device
            .apply_min_soc(device, record.min_soc, &record.request_id)
            .await;
        reserved = false;
        let now = svc.clock.now();
        // The one extra read per applied request: does the battery report it yet?
        let confirmed = match &result {
            Ok(()) => confirmation_read(svc, device, record.min_soc.percent()).await,
            Err(_) => None,
        };
        match &result {
            Ok(()) => {
                delivered.push(record.request_id.clone());
                info!(device = %device, request_id = %record.request_id, min_soc = record.min_soc.percent(), attempts = record.attempts, "setting applied");
            }
            Err(e) => {
                warn!(device = %device, request_id = %record.request_id, error = %e, "device call failed");
                tried.push((record.request_id.clone(), e.clone()));
            }
        }
        let outcome = record_answer(&mut record, holder, result, now);
        record.confirmed_at = confirmed;
        match write(svc, &mut record, &stored, &etag).await {
            Ok(etag) => return Ok(finish(record, etag, outcome, delivered)),
            // Someone changed the record while we talked to the device (a newer
            // request, most likely), or the write's outcome is unknown. Read again
            // (with retries) and converge; our lease is still in it. What the device
            // answered must be written down: a landed value left pending could later
            // be marked expired.
            Err(StoreError::Conflict | StoreError::Unavailable(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    warn!(device = %device, "giving up after repeated concurrent ledger updates");
    Err(StoreError::Conflict)
}

/// After a PUT the device cloud accepted: one status read, and when it was made if it
/// shows the battery reporting `min_soc` (`None`: another value, which may only mean the
/// battery has not taken it yet, offline, or the read failed; a later read may confirm
/// it, `device_events_http`). Only with a turn of the device-call budget free now: it
/// never makes a PUT wait.
async fn confirmation_read(
    svc: &Services,
    device: &DeviceId,
    min_soc: u8,
) -> Option<chrono::DateTime<chrono::Utc>> {
    match svc.device.status_if_free(device).await {
        Ok(status) if status.min_soc == Some(min_soc) => Some(svc.clock.now()),
        Ok(status) => {
            info!(device = %device, reported = ?status.min_soc, online = status.online, "applied, not confirmed yet: the battery reports another value");
            None
        }
        Err(e) => {
            info!(device = %device, error = %e, "applied, not confirmed yet: status not read");
            None
        }
    }
}

/// Records the device's answer to a PUT of `record`'s request made under `holder`'s
/// lease, and says what it means. The lease is let go, except when no answer came
/// back (a timeout): that PUT may still land, and the lease, sized to cover the late
/// landing, keeps everyone off the device until it lapses.
fn record_answer(
    record: &mut DesiredState,
    holder: &LeaseHolder,
    result: Result<(), DeviceError>,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Result<DeviceError, DeviceError>> {
    match result {
        Ok(()) => {
            record.release_lease(holder);
            record.mark_applied(now);
            None
        }
        Err(DeviceError::Offline) => {
            record.release_lease(holder);
            record.record_offline(now);
            Some(Err(DeviceError::Offline))
        }
        Err(e @ DeviceError::Transient { unanswered, .. }) => {
            if !unanswered {
                record.release_lease(holder);
            }
            record.record_transient(e.to_string(), now);
            Some(Err(e))
        }
        Err(e) => {
            record.release_lease(holder);
            record.mark_failed(e.to_string(), now);
            Some(Ok(e))
        }
    }
}

/// The outcome of a written answer (see [`record_answer`]).
fn finish(
    record: DesiredState,
    etag: crate::ports::ETag,
    outcome: Option<Result<DeviceError, DeviceError>>,
    delivered: Vec<RequestId>,
) -> Applied {
    let stored = Versioned {
        value: record.clone(),
        etag,
    };
    let outcome = match outcome {
        None => ApplyOutcome::Applied(record),
        Some(Ok(permanent)) => ApplyOutcome::Failed(record, permanent),
        Some(Err(DeviceError::Offline)) => ApplyOutcome::Offline(stored),
        Some(Err(transient)) => ApplyOutcome::Transient(stored, transient),
    };
    Applied { outcome, delivered }
}

/// Reads the device's record, trying again (0.1 s doubling to 5 s, about 50 s in
/// all) while the storage is unavailable: used wherever the outcome of a write is
/// unknown and must be known before going on.
pub(crate) async fn read_back(
    svc: &Services,
    device: &DeviceId,
) -> Result<Option<Versioned<DesiredState>>, StoreError> {
    let mut wait = std::time::Duration::from_millis(100);
    let mut tries = 0;
    loop {
        match svc.ledger.get(device).await {
            Err(StoreError::Unavailable(_)) if tries < READ_BACK_TRIES => {
                tries += 1;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// [`read_back`] for up to `patience` instead of ~50 s. Measured on the runtime's
/// monotonic clock, as every wait of an invocation is: a wall clock that jumps or stands
/// still (a test's) can neither cut the wait short nor make it endless.
async fn read_back_for(
    svc: &Services,
    device: &DeviceId,
    patience: chrono::Duration,
) -> Result<Option<Versioned<DesiredState>>, StoreError> {
    let give_up = tokio::time::Instant::now() + patience.to_std().unwrap_or_default();
    loop {
        match read_back(svc, device).await {
            Err(StoreError::Unavailable(_)) if tokio::time::Instant::now() < give_up => {
                warn!(device = %device, "storage still unavailable; a confirmed landing waits to be recorded");
            }
            other => return other,
        }
    }
}

/// Writes `record` over `stored` (read or written with `etag`), keeping the due index in step.
async fn write(
    svc: &Services,
    record: &mut DesiredState,
    stored: &DesiredState,
    etag: &crate::ports::ETag,
) -> Result<crate::ports::ETag, StoreError> {
    super::index::put_record(svc, record, Some(stored), Some(etag)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestStatus;
    use crate::functions::fakes::{accept_pending, Harness};
    use crate::ports::{Clock as _, Ledger as _};

    fn holder(id: &str) -> LeaseHolder {
        LeaseHolder::from_stored(id)
    }

    #[tokio::test]
    async fn the_latest_value_is_applied_and_recorded() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let rec = accept_pending(&h, "d1", 40).await;
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(
            matches!(out.outcome, ApplyOutcome::Applied(ref r) if r.request_id == rec.request_id)
        );
        assert_eq!(out.delivered, vec![rec.request_id.clone()]);
        assert_eq!(h.device.puts("d1"), vec![(40, rec.request_id.to_string())]);
        let stored = h.ledger_record("d1").await;
        assert_eq!(stored.status, RequestStatus::Applied);
        assert_eq!(stored.attempts, 1);
        assert!(stored.lease.is_none());
    }

    #[tokio::test]
    async fn an_offline_device_keeps_the_request_pending_and_counts_the_attempt() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        accept_pending(&h, "d1", 40).await;
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Offline(_)));
        let stored = h.ledger_record("d1").await;
        assert_eq!(stored.status, RequestStatus::Pending);
        assert_eq!(stored.attempts, 1);
        assert_eq!(stored.last_error.as_deref(), Some("device offline"));
        assert!(stored.lease.is_none());
    }

    #[tokio::test]
    async fn a_rejected_value_fails_the_request_with_the_reason() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.reject("d1", "minSoc below vendor floor");
        accept_pending(&h, "d1", 3).await;
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(
            out.outcome,
            ApplyOutcome::Failed(_, DeviceError::Rejected(_))
        ));
        let stored = h.ledger_record("d1").await;
        assert_eq!(stored.status, RequestStatus::Failed);
        assert!(stored.last_error.unwrap().contains("vendor floor"));
    }

    #[tokio::test]
    async fn an_expired_request_is_never_sent_to_the_device() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        h.clock.advance(h.svc.policy.request_ttl);
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Expired(_)));
        assert!(h.device.puts("d1").is_empty());
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Expired);
    }

    #[tokio::test]
    async fn no_put_starts_within_one_lease_of_expiry() {
        // Issue 8, bug 3: a PUT started then could land after the sweep wrote `expired`.
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        h.clock
            .advance(h.svc.policy.request_ttl - h.svc.policy.lease / 2);
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Expired(_)), "{out:?}");
        assert!(h.device.puts("d1").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_comes_within_a_lease_of_expiry_while_waiting_for_a_turn_is_not_put() {
        let h = Harness::new();
        h.clock.follow_tokio_time();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        // Two seconds before the last moment a PUT may start; the budget turn takes ten.
        h.clock
            .advance(h.svc.policy.request_ttl - h.svc.policy.lease - chrono::Duration::seconds(2));
        h.device.set_turn_wait(std::time::Duration::from_secs(10));
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Expired(_)), "{out:?}");
        assert!(h.device.puts("d1").is_empty());
        assert_eq!(h.device.reservations(), 1);
    }

    #[tokio::test]
    async fn a_request_too_close_to_expiry_for_a_put_takes_no_budget_turn() {
        // Decided before the budget wait: a request that will not be PUT must not wait
        // for a turn (nor be recorded as refused one).
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.refuse_budget_turns();
        accept_pending(&h, "d1", 40).await;
        h.clock
            .advance(h.svc.policy.request_ttl - h.svc.policy.lease / 2);
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Expired(_)), "{out:?}");
        assert_eq!(h.device.reservations(), 0);
    }

    #[tokio::test]
    async fn expiry_is_never_written_over_another_holders_live_lease() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        h.hold_lease("d1", "other", h.svc.policy.request_ttl * 2)
            .await;
        h.clock.advance(h.svc.policy.request_ttl);
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Busy(_)), "{out:?}");
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Pending);
    }

    #[tokio::test]
    async fn a_caller_lease_too_short_for_a_put_is_renewed_first() {
        // Issue 8, bug 2: the caller's lease was taken before slow ledger calls.
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        let mut start = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let h1 = holder("h1");
        start
            .value
            .record_attempt(&h1, h.clock.now(), h.svc.policy.put_window);
        start.etag = h
            .ledger
            .put(&start.value, Some(&start.etag), &[])
            .await
            .unwrap();
        h.clock.advance(chrono::Duration::seconds(1));
        let renewed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = renewed.clone();
        let h2 = h.clone();
        h.device.on_next_put("d1", move || {
            Box::pin(async move {
                let rec = h2.ledger_record("d1").await;
                *seen.lock().unwrap() = rec.lease.map(|l| l.until);
            })
        });
        let out = apply_latest(&h.svc, &h.id("d1"), &h1, Some(start))
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Applied(_)), "{out:?}");
        let until = renewed.lock().unwrap().expect("lease held during the PUT");
        assert_eq!(until, h.clock.now() + h.svc.policy.lease);
    }

    #[tokio::test]
    async fn a_newer_request_arriving_during_the_put_is_applied_before_the_lease_is_released() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let a = accept_pending(&h, "d1", 10).await;
        // While the device call for A is in flight, B is accepted (by HTTP).
        h.accept_during_next_put("d1", 90, |_| {});
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        let stored = h.ledger_record("d1").await;
        assert_ne!(stored.request_id, a.request_id);
        assert_eq!(stored.status, RequestStatus::Applied);
        let puts: Vec<u8> = h.device.puts("d1").into_iter().map(|p| p.0).collect();
        assert_eq!(
            puts,
            vec![10, 90],
            "the device must end at the newest value"
        );
        // Every PUT is counted (and its lease renewed) in a write before it is made,
        // the newer request's too, although the lease carried into it still covered a PUT.
        assert_eq!(stored.attempts, 1);
        assert!(matches!(out.outcome, ApplyOutcome::Applied(ref r) if r.min_soc.percent() == 90));
    }

    #[tokio::test]
    async fn a_confirmed_landing_is_written_applied_even_over_an_expired_written_meanwhile() {
        // Issue 17, case 5: the sweep wrote `expired` while the holder's result write
        // was failing; the device holds the value, so the ledger must say applied.
        let h = Harness::new();
        h.device.set_online("d1", true);
        let rec = accept_pending(&h, "d1", 40).await;
        let h2 = h.clone();
        h.device.on_next_put("d1", move || {
            Box::pin(async move {
                let mut stored = h2.ledger.get(&h2.id("d1")).await.unwrap().unwrap();
                let now = h2.clock.now();
                stored.value.mark_expired(now);
                stored.value.lease = None;
                h2.ledger
                    .put(&stored.value, Some(&stored.etag), &[])
                    .await
                    .unwrap();
            })
        });
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Applied(_)), "{out:?}");
        let stored = h.ledger_record("d1").await;
        assert_eq!(stored.request_id, rec.request_id);
        assert_eq!(stored.status, RequestStatus::Applied);
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirmed_landing_is_recorded_after_a_storage_outage_longer_than_the_read_back() {
        // Found by the simulation (seed 24,067): the holder gave up after ~50 s, the
        // device went offline, and the request later expired although it had landed.
        let h = Harness::new();
        h.device.set_online("d1", true);
        let rec = accept_pending(&h, "d1", 40).await;
        let ledger = h.ledger.clone();
        h.device.on_next_put("d1", move || {
            Box::pin(async move {
                ledger.set_down(true);
                let back = ledger.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(std::time::Duration::from_secs(180)).await;
                    back.set_down(false);
                });
            })
        });
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Applied(_)), "{out:?}");
        let stored = h.ledger_record("d1").await;
        assert_eq!(stored.request_id, rec.request_id);
        assert_eq!(stored.status, RequestStatus::Applied);
    }

    #[tokio::test]
    async fn a_put_whose_outcome_is_unknown_keeps_the_lease() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        h.device.fail_next_put_unknown("d1");
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(
            matches!(out.outcome, ApplyOutcome::Transient(..)),
            "{out:?}"
        );
        let stored = h.ledger_record("d1").await;
        assert!(
            stored.holds_lease(&holder("h1"), h.clock.now()),
            "{stored:?}"
        );
    }

    #[tokio::test]
    async fn a_put_whose_outcome_is_unknown_keeps_the_lease_even_if_the_request_was_settled_meanwhile(
    ) {
        // Nobody settles a request over a live lease (so this cannot happen today); if
        // anything ever did, the lease must still cover the PUT that may land late.
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 40).await;
        h.device.fail_next_put_unknown("d1");
        let h2 = h.clone();
        h.device.on_next_put("d1", move || {
            let h2 = h2.clone();
            Box::pin(async move {
                let mut v = h2.ledger.get(&h2.id("d1")).await.unwrap().unwrap();
                v.value.mark_cancelled(h2.clock.now());
                h2.ledger.put(&v.value, Some(&v.etag), &[]).await.unwrap();
            })
        });
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(
            matches!(out.outcome, ApplyOutcome::AlreadyFinal(..)),
            "{out:?}"
        );
        let stored = h.ledger_record("d1").await;
        assert_eq!(stored.status, RequestStatus::Cancelled);
        assert!(
            stored.holds_lease(&holder("h1"), h.clock.now()),
            "{stored:?}"
        );
    }

    #[tokio::test]
    async fn a_lease_left_on_a_settled_request_is_released_even_when_the_release_races() {
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        h.hold_lease("d1", "h1", chrono::Duration::seconds(30))
            .await;
        let mut v = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let stale_etag = v.etag.clone();
        v.value.mark_applied(h.clock.now());
        h.ledger.put(&v.value, Some(&v.etag), &[]).await.unwrap();
        // The caller's copy is the settled record under the ETag before that write: the
        // release write conflicts, and the call reads again and releases on what it reads.
        let start = crate::ports::Versioned {
            value: v.value,
            etag: stale_etag,
        };
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), Some(start))
            .await
            .unwrap();
        assert!(
            matches!(out.outcome, ApplyOutcome::AlreadyFinal(..)),
            "{out:?}"
        );
        let stored = h.ledger_record("d1").await;
        assert_eq!(
            (stored.status, stored.lease),
            (RequestStatus::Applied, None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_back_rides_out_a_short_outage_and_gives_up_after_about_46_s() {
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        h.ledger.set_down(true);
        let ledger = h.ledger.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            ledger.set_down(false);
        });
        assert!(read_back(&h.svc, &h.id("d1")).await.unwrap().is_some());

        h.ledger.set_down(true);
        let started = tokio::time::Instant::now();
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(300),
            read_back(&h.svc, &h.id("d1")),
        )
        .await
        .expect("a read-back gives up while the storage stays down");
        assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
        // 0.1 s doubling to 5 s, 14 waits: 46.3 s.
        let took = started.elapsed().as_secs_f64();
        assert!((46.0..47.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_confirmed_landing_waits_to_be_recorded_for_its_patience_and_no_longer() {
        // `read_back_for`: whole read-backs (46.3 s each) until the patience is spent.
        // The ledger's clock stands still: the patience runs on the runtime's clock.
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        h.ledger.set_down(true);
        let started = tokio::time::Instant::now();
        let patience = chrono::Duration::milliseconds(2 * 46_300);
        let out = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            read_back_for(&h.svc, &h.id("d1"), patience),
        )
        .await
        .expect("gives up once its patience is spent");
        assert!(matches!(out, Err(StoreError::Unavailable(_))), "{out:?}");
        // Two read-backs end exactly at the patience: no third one starts.
        assert_eq!(
            started.elapsed(),
            std::time::Duration::from_millis(2 * 46_300)
        );
    }

    #[tokio::test]
    async fn a_second_holder_backs_off_while_the_lease_is_held() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let rec = accept_pending(&h, "d1", 10).await;
        h.hold_lease("d1", "other", chrono::Duration::seconds(30))
            .await;
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(
            matches!(out.outcome, ApplyOutcome::Busy(ref v) if v.value.request_id == rec.request_id)
        );
        // Handed the record with that lease in it (as a POST's accepting write carries
        // it, `DesiredState::accept`), it backs off too: the lease is not taken over.
        let start = h.ledger.get(&h.id("d1")).await.unwrap();
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), start)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Busy(_)), "{out:?}");
        assert!(h.device.puts("d1").is_empty());
        let stored = h.ledger_record("d1").await;
        assert!(stored.holds_lease(&holder("other"), h.clock.now()));
    }

    #[tokio::test]
    async fn an_abandoned_lease_is_taken_over_after_it_lapses() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 10).await;
        h.hold_lease("d1", "crashed", chrono::Duration::seconds(30))
            .await;
        h.clock.advance(chrono::Duration::seconds(31));
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(matches!(out.outcome, ApplyOutcome::Applied(_)));
    }

    #[tokio::test]
    async fn two_concurrent_appliers_put_the_value_once() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.set_latency(std::time::Duration::from_millis(30));
        accept_pending(&h, "d1", 55).await;
        let d1 = h.id("d1");
        let (h1, h2) = (holder("h1"), holder("h2"));
        let (a, b) = tokio::join!(
            apply_latest(&h.svc, &d1, &h1, None),
            apply_latest(&h.svc, &d1, &h2, None)
        );
        let outcomes = [a.unwrap().outcome, b.unwrap().outcome];
        assert_eq!(h.device.puts("d1").len(), 1, "{outcomes:?}");
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Applied);
    }
}
