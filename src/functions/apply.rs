//! Apply the device's *current* desired value: the only code that PUTs to a device.
//!
//! All three functions come here. The procedure never applies a value taken from
//! a message; it reads the ledger and applies what the ledger says now. Device
//! calls are serialised per device by the ledger lease, and every ledger change is
//! a conditional (ETag) write. When a write conflicts after a device call, the
//! record is read again and the holder converges: if a newer request arrived while
//! it was talking to the device, it applies that one too before it lets go.

use tracing::{info, warn};

use crate::domain::{DesiredState, DeviceId, LeaseHolder, RequestId};
use crate::ports::{DeviceError, StoreError, Versioned};

use super::Services;

/// How many conflicting ledger writes one apply tolerates before giving up (as transient).
const MAX_ROUNDS: usize = 12;

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
    /// The device cloud had a transient problem; the record stays pending.
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
pub async fn apply_latest(
    svc: &Services,
    device: &DeviceId,
    holder: &LeaseHolder,
    start: Option<Versioned<DesiredState>>,
) -> Result<Applied, StoreError> {
    let mut delivered: Vec<RequestId> = Vec::new();
    // A start record that already holds our lease was written by the caller together
    // with the attempt it counts (SetSocHttp does that in its accepting write).
    let mut leased_by_caller = start
        .as_ref()
        .is_some_and(|s| s.value.holds_lease(holder, svc.clock.now()));
    let mut next = start;
    for _ in 0..MAX_ROUNDS {
        let current = match next.take() {
            Some(v) => v,
            None => match svc.ledger.get(device).await? {
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
        let mut record = current.value.clone();

        // Settled already: only let go of a lease we might still hold.
        if !record.is_pending() {
            if record.holds_lease(holder, now) {
                record.release_lease(holder);
                if let Err(e) = write(svc, &record, &current.etag).await {
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

        if record.is_expired_at(now) {
            record.mark_expired(now);
            record.release_lease(holder);
            match write(svc, &record, &current.etag).await {
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

        // We already put exactly this request on the device in an earlier round:
        // only the bookkeeping is left.
        if delivered.contains(&record.request_id) {
            record.mark_applied(now);
            record.release_lease(holder);
            match write(svc, &record, &current.etag).await {
                Ok(_) => {
                    return Ok(Applied {
                        outcome: ApplyOutcome::Applied(record),
                        delivered,
                    })
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }

        if !record.lease_free_for(holder, now) {
            return Ok(Applied {
                outcome: ApplyOutcome::Busy(current),
                delivered,
            });
        }

        // Take (or renew) the lease and count the attempt, in one conditional write.
        let etag = if leased_now {
            current.etag.clone()
        } else {
            record.record_attempt(holder, now, svc.policy.lease);
            match write(svc, &record, &current.etag).await {
                Ok(etag) => etag,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        };

        let result = svc
            .device
            .apply_min_soc(device, record.min_soc, &record.request_id)
            .await;
        let now = svc.clock.now();
        record.release_lease(holder);
        let outcome = match result {
            Ok(()) => {
                delivered.push(record.request_id.clone());
                record.mark_applied(now);
                info!(device = %device, request_id = %record.request_id, min_soc = record.min_soc.percent(), attempts = record.attempts, "setting applied");
                None
            }
            Err(DeviceError::Offline) => {
                record.record_offline(now);
                Some(Err(DeviceError::Offline))
            }
            Err(e @ DeviceError::Transient { .. }) => {
                warn!(device = %device, request_id = %record.request_id, error = %e, "device cloud transient error");
                record.record_transient(e.to_string(), now);
                Some(Err(e))
            }
            Err(e) => {
                warn!(device = %device, request_id = %record.request_id, error = %e, "device cloud refused the setting");
                record.mark_failed(e.to_string(), now);
                Some(Ok(e))
            }
        };
        match write(svc, &record, &etag).await {
            Ok(etag) => {
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
                return Ok(Applied { outcome, delivered });
            }
            // Someone changed the record while we talked to the device (a newer
            // request, most likely). Read again and converge; our lease is still in it.
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    warn!(device = %device, "giving up after repeated concurrent ledger updates");
    Err(StoreError::Conflict)
}

async fn write(
    svc: &Services,
    record: &DesiredState,
    etag: &crate::ports::ETag,
) -> Result<crate::ports::ETag, StoreError> {
    svc.ledger.put(record, Some(etag)).await
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
    async fn a_newer_request_arriving_during_the_put_is_applied_before_the_lease_is_released() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let a = accept_pending(&h, "d1", 10).await;
        // While the device call for A is in flight, B is accepted (by HTTP).
        let h2 = h.clone();
        h.device.on_next_put("d1", move || {
            let h2 = h2.clone();
            Box::pin(async move {
                accept_pending(&h2, "d1", 90).await;
            })
        });
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
        assert!(matches!(out.outcome, ApplyOutcome::Applied(ref r) if r.min_soc.percent() == 90));
    }

    #[tokio::test]
    async fn a_second_holder_backs_off_while_the_lease_is_held() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let rec = accept_pending(&h, "d1", 10).await;
        let mut held = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        held.value.take_lease(
            &holder("other"),
            h.clock.now(),
            chrono::Duration::seconds(30),
        );
        h.ledger.put(&held.value, Some(&held.etag)).await.unwrap();
        let out = apply_latest(&h.svc, &h.id("d1"), &holder("h1"), None)
            .await
            .unwrap();
        assert!(
            matches!(out.outcome, ApplyOutcome::Busy(ref v) if v.value.request_id == rec.request_id)
        );
        assert!(h.device.puts("d1").is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_lease_is_taken_over_after_it_lapses() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        accept_pending(&h, "d1", 10).await;
        let mut held = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        held.value.take_lease(
            &holder("crashed"),
            h.clock.now(),
            chrono::Duration::seconds(30),
        );
        h.ledger.put(&held.value, Some(&held.etag)).await.unwrap();
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
