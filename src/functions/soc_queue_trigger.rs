//! `SocQueueTrigger`: a wake-up message for a pending request was delivered.
//!
//! The message only says which device to look at. What is applied is whatever
//! the ledger holds now, so a late, duplicate or stale message can never put an
//! older value on the device:
//! - the ledger has no record, a newer request, or a settled one: no-op (complete);
//! - the message is not the one the ledger's wake-up chain expects: no-op, so a
//!   duplicate delivery never forks the chain into two;
//! - otherwise apply now; if the device is offline, continue the chain with the
//!   next back-off and complete; on a transient error fail the invocation so that
//!   Service Bus redelivers (and dead-letters after its max delivery count; the
//!   timer sweep then re-sends, so the request is not lost).
//!
//! A ledger row that does not read ([`StoreError::Corrupt`]) is not an outage:
//! redelivering cannot fix it, so the message is completed with the reason logged
//! (device id, row key, field). Nothing is written over the row: the handler cannot
//! tell what it held (possibly a newer request than the message's), and a person
//! repairing it needs it as it is. The timer sweep keeps reporting the row in its
//! `corrupt` count until it is repaired or removed.

use std::time::Duration;

use tracing::{info, warn};

use crate::domain::{DeviceId, HolderKind, LeaseHolder};
use crate::ports::{CorruptRow, StoreError, WakeMessage};

use super::apply::{apply_latest, ApplyOutcome};
use super::wake::{self, Rescheduled};
use super::Services;

/// Longest a delivery waits before giving a message back after a transient error.
const MAX_TRANSIENT_WAIT: Duration = Duration::from_secs(10);
/// First wait after a transient error without `Retry-After`; doubles with each delivery.
const FIRST_TRANSIENT_WAIT: Duration = Duration::from_millis(500);

/// How long to hold a message before abandoning it after a transient device-cloud
/// error. Service Bus redelivers an abandoned message at once, so without this an
/// outage of a few seconds would use up the queue's max delivery count. The wait
/// honours `Retry-After`, else doubles per delivery, capped (the lock is renewed
/// by the host meanwhile). Past the max delivery count the message is
/// dead-lettered and the timer sweep re-sends it.
pub fn transient_wait(delivery_count: u32, retry_after: Option<Duration>) -> Duration {
    let backoff =
        FIRST_TRANSIENT_WAIT.saturating_mul(1u32 << delivery_count.saturating_sub(1).min(16));
    retry_after.unwrap_or(backoff).min(MAX_TRANSIENT_WAIT)
}

/// A delivered message, independent of the host's envelope.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub delivery_count: u32,
}

/// What the host should do with the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Success: the host completes the message. The text is logged.
    Complete(String),
    /// Failure: the host abandons it and Service Bus redelivers.
    Retry(String),
}

pub async fn handle(svc: &Services, delivery: Delivery) -> Settle {
    match read(&delivery) {
        // Boxed: the ledger and device path's future is several KB, and the caller's
        // futures are moved around per invocation; a dropped message never builds it.
        Ok((message, device)) => Box::pin(wake_up(svc, delivery, message, device)).await,
        Err(dropped) => dropped,
    }
}

/// The message and its device, or why it is dropped (completed).
fn read(delivery: &Delivery) -> Result<(WakeMessage, DeviceId), Settle> {
    let message: WakeMessage = match serde_json::from_slice(&delivery.body) {
        Ok(m) => m,
        Err(e) => {
            // Redelivering cannot fix a malformed body; complete it and say so loudly.
            warn!(message_id = ?delivery.message_id, error = %e, "malformed wake-up message dropped");
            return Err(Settle::Complete(format!("malformed message dropped: {e}")));
        }
    };
    match DeviceId::parse(&message.device_id) {
        Ok(device) => Ok((message, device)),
        Err(e) => {
            warn!(message_id = ?delivery.message_id, error = %e, "wake-up message with an invalid device id dropped");
            Err(Settle::Complete(format!("invalid device id dropped: {e}")))
        }
    }
}

async fn wake_up(
    svc: &Services,
    delivery: Delivery,
    message: WakeMessage,
    device: DeviceId,
) -> Settle {
    let current = match svc.ledger.get(&device).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return noop(
                &device,
                &message,
                "no ledger record (its request was never stored)",
            )
        }
        Err(StoreError::Corrupt(row)) => return unreadable(&message, &row),
        Err(e) => return Settle::Retry(format!("ledger unavailable: {e}")),
    };
    let record = &current.value;
    if record.request_id != message.request_id {
        return noop(
            &device,
            &message,
            &format!(
                "not the device's latest request (that is {})",
                record.request_id
            ),
        );
    }
    if !record.is_pending() {
        return noop(
            &device,
            &message,
            &format!("request already {}", record.status.as_str()),
        );
    }
    let chain = delivery.message_id.as_deref();
    if let (Some(expected), Some(got)) = (record.wake_message_id.as_deref(), chain) {
        if expected != got {
            return noop(
                &device,
                &message,
                &format!("stale wake-up; the ledger expects message {expected}"),
            );
        }
    }

    let holder = LeaseHolder::new(HolderKind::Queue);
    let applied = match apply_latest(svc, &device, &holder, Some(current)).await {
        Ok(a) => a,
        Err(StoreError::Corrupt(row)) => return unreadable(&message, &row),
        Err(e) => return Settle::Retry(format!("ledger unavailable: {e}")),
    };
    let (pending, not_before) = match applied.outcome {
        ApplyOutcome::Applied(r) => {
            return Settle::Complete(format!(
                "applied minSoc {} (request {}) to {device}",
                r.min_soc.percent(),
                r.request_id
            ))
        }
        ApplyOutcome::AlreadyFinal(r) => {
            return noop(
                &device,
                &message,
                &format!("request already {}", r.status.as_str()),
            )
        }
        ApplyOutcome::NoRecord => return noop(&device, &message, "no ledger record"),
        ApplyOutcome::Expired(r) => {
            return Settle::Complete(format!("request {} expired", r.request_id))
        }
        ApplyOutcome::Failed(r, e) => {
            return Settle::Complete(format!("request {} failed permanently: {e}", r.request_id))
        }
        ApplyOutcome::Transient(_, e) => {
            tokio::time::sleep(transient_wait(delivery.delivery_count, e.retry_after())).await;
            return Settle::Retry(format!("device cloud unavailable: {e}"));
        }
        ApplyOutcome::Offline(v) => (v, None),
        // Someone else is talking to the device and will converge; look again once its lease lapses, in case it died.
        ApplyOutcome::Busy(v) => {
            let lapses = v.value.lease.as_ref().map(|l| l.until);
            (v, lapses)
        }
    };
    match wake::schedule_recheck(svc, pending, chain, not_before).await {
        Ok(Rescheduled::Scheduled { message_id, at, .. }) => Settle::Complete(format!(
            "device {device} offline; re-check at {at} (message {message_id})"
        )),
        Ok(Rescheduled::NoTimeLeft) => Settle::Complete(format!(
            "device {device} offline and no re-check fits before expiry; the sweep will expire it"
        )),
        Ok(Rescheduled::Superseded) => {
            noop(&device, &message, "chain continued by another invocation")
        }
        Err(e) => Settle::Retry(format!("could not schedule the re-check: {e}")),
    }
}

/// The device's ledger row does not read: complete the message, say why, write nothing.
fn unreadable(message: &WakeMessage, row: &CorruptRow) -> Settle {
    warn!(
        device = %row.partition_key,
        row = %row.row_key,
        reason = %row.reason,
        request_id = %message.request_id,
        "wake-up message completed: the ledger row is unreadable"
    );
    Settle::Complete(format!("request {} not applied: {row}", message.request_id))
}

fn noop(device: &DeviceId, message: &WakeMessage, why: &str) -> Settle {
    info!(device = %device, request_id = %message.request_id, reason = why, "wake-up message is a no-op");
    Settle::Complete(format!("no-op for request {}: {why}", message.request_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestStatus;
    use crate::functions::fakes::{post_min_soc as post, Harness};
    use crate::ports::Clock as _;
    use crate::ports::OutgoingMessage;

    fn delivery_of(m: &OutgoingMessage) -> Delivery {
        Delivery {
            body: serde_json::to_vec(&m.body).unwrap(),
            message_id: Some(m.message_id.clone()),
            delivery_count: 1,
        }
    }

    #[tokio::test]
    async fn a_message_for_a_returned_device_applies_the_setting() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(
            matches!(settle, Settle::Complete(ref s) if s.starts_with("applied")),
            "{settle:?}"
        );
        assert_eq!(h.device.puts("d1").len(), 1);
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Applied);
    }

    #[tokio::test]
    async fn a_message_for_a_cancelled_request_is_a_noop_and_puts_nothing() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let id = post(&h, "d1", 40).await["requestId"]
            .as_str()
            .unwrap()
            .to_string();
        let cancel = crate::functions::set_soc_http::ApiRequest {
            method: "DELETE".into(),
            device_id: "d1".into(),
            rest: Some(format!("requests/{id}")),
            ..Default::default()
        };
        let cancelled = crate::functions::set_soc_http::handle(&h.svc, cancel).await;
        assert_eq!(cancelled.status, 200, "{cancelled:?}");
        first_message_completes_without_a_put(&h, "already cancelled").await;
    }

    /// The first wake-up message, delivered with d1 back online, is completed saying
    /// `why`; nothing is PUT and no re-check is scheduled.
    async fn first_message_completes_without_a_put(h: &Harness, why: &str) {
        h.device.set_online("d1", true);
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(
            matches!(settle, Settle::Complete(ref s) if s.contains(why)),
            "{settle:?}"
        );
        assert!(h.device.puts("d1").is_empty());
        assert_eq!(h.queue.sent().len(), 1, "no re-check scheduled");
    }

    #[tokio::test]
    async fn a_still_offline_device_gets_one_later_recheck_with_growing_backoff() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        let first = h.queue.sent()[0].clone();
        let settle = handle(&h.svc, delivery_of(&first)).await;
        assert!(matches!(settle, Settle::Complete(_)));
        let sent = h.queue.sent();
        assert_eq!(sent.len(), 2);
        // attempts = 1 after the PUT found the device offline: delay = 2 x initial.
        assert_eq!(
            sent[1].scheduled_at,
            Some(h.clock.now() + chrono::Duration::seconds(120))
        );
        let second = handle(&h.svc, delivery_of(&sent[1])).await;
        assert!(matches!(second, Settle::Complete(_)));
        assert_eq!(
            h.queue.sent()[2].scheduled_at,
            Some(h.clock.now() + chrono::Duration::seconds(240))
        );
    }

    #[tokio::test]
    async fn a_duplicate_delivery_after_the_chain_moved_on_is_a_noop() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        let first = h.queue.sent()[0].clone();
        handle(&h.svc, delivery_of(&first)).await;
        let again = handle(&h.svc, delivery_of(&first)).await;
        assert!(
            matches!(again, Settle::Complete(ref s) if s.contains("stale")),
            "{again:?}"
        );
        assert_eq!(
            h.queue.sent().len(),
            2,
            "the duplicate must not fork the chain"
        );
    }

    #[tokio::test]
    async fn two_concurrent_deliveries_of_one_message_fork_no_chain_and_put_once() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        let m = h.queue.sent()[0].clone();
        h.device.set_online("d1", true);
        h.device.set_latency(std::time::Duration::from_millis(20));
        let (a, b) = tokio::join!(
            handle(&h.svc, delivery_of(&m)),
            handle(&h.svc, delivery_of(&m))
        );
        assert!(
            matches!(a, Settle::Complete(_)) && matches!(b, Settle::Complete(_)),
            "{a:?} {b:?}"
        );
        assert_eq!(h.device.puts("d1").len(), 1);
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Applied);
    }

    #[tokio::test]
    async fn an_old_message_never_overwrites_a_newer_setting() {
        // A queued offline, device back, B applied directly by HTTP, then A's message delivered.
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 10).await;
        let a_msg = h.queue.sent()[0].clone();
        h.device.set_online("d1", true);
        let b = post(&h, "d1", 90).await;
        assert_eq!(b["status"], "applied");
        let settle = handle(&h.svc, delivery_of(&a_msg)).await;
        assert!(
            matches!(settle, Settle::Complete(ref s) if s.contains("not the device's latest request")),
            "{settle:?}"
        );
        let puts: Vec<u8> = h.device.puts("d1").into_iter().map(|p| p.0).collect();
        assert_eq!(puts, vec![90]);
    }

    #[tokio::test]
    async fn a_older_queued_request_is_superseded_by_a_newer_queued_one() {
        // A offline, B offline, then online: only B reaches the device.
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 10).await;
        post(&h, "d1", 90).await;
        h.device.set_online("d1", true);
        for m in h.queue.sent() {
            handle(&h.svc, delivery_of(&m)).await;
        }
        let puts: Vec<u8> = h.device.puts("d1").into_iter().map(|p| p.0).collect();
        assert_eq!(puts, vec![90]);
    }

    #[test]
    fn transient_waits_double_per_delivery_honour_retry_after_and_are_capped() {
        let ms = |n| transient_wait(n, None).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(6), ms(10)],
            [500, 1000, 2000, 4000, 8000, 10_000, 10_000]
        );
        assert_eq!(
            transient_wait(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            transient_wait(1, Some(Duration::from_secs(300))),
            MAX_TRANSIENT_WAIT
        );
        assert_eq!(transient_wait(u32::MAX, None), MAX_TRANSIENT_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_device_error_asks_for_redelivery() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        h.device.fail_transiently("d1", 1);
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(matches!(settle, Settle::Retry(_)), "{settle:?}");
        // The device cloud answered (a 503): the PUT did not land, the lease is let go.
        let again = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(
            matches!(again, Settle::Complete(ref s) if s.starts_with("applied")),
            "{again:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_answer_is_redelivered_after_the_retry_after_it_asks_for() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        h.device.fail_transiently("d1", 1);
        h.device.set_retry_after(Duration::from_secs(7));
        let started = tokio::time::Instant::now();
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(matches!(settle, Settle::Retry(_)), "{settle:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test]
    async fn a_rejected_value_fails_the_request_without_retrying() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.device.reject("d1", "value outside device limits");
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(
            matches!(settle, Settle::Complete(ref s) if s.contains("failed permanently")),
            "{settle:?}"
        );
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.status, RequestStatus::Failed);
        assert!(rec.last_error.unwrap().contains("device limits"));
        assert_eq!(h.queue.sent().len(), 1, "no further re-check");
    }

    #[tokio::test]
    async fn a_message_delivered_after_expiry_marks_the_request_expired() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.device.set_online("d1", true);
        h.clock.advance(h.svc.policy.request_ttl);
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(
            matches!(settle, Settle::Complete(ref s) if s.contains("expired")),
            "{settle:?}"
        );
        assert!(h.device.puts("d1").is_empty());
    }

    #[tokio::test]
    async fn a_live_chain_expires_its_request_with_its_last_re_check_leaving_the_sweep_nothing() {
        // A campaign's requests expire together: their chains, which the host scales
        // out, write the expiries, not the sweep with its per-run quota.
        let mut h = Harness::new();
        h.svc.policy.max_clock_skew = chrono::Duration::seconds(2);
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        let expires_at = h.ledger_record("d1").await.expires_at;
        let mut deliveries = 0;
        let mut calls_before_last = h.device.calls();
        while h.ledger_record("d1").await.status == RequestStatus::Pending {
            let next = h.queue.sent().last().unwrap().clone();
            h.clock.advance(next.scheduled_at.unwrap() - h.clock.now());
            calls_before_last = h.device.calls();
            handle(&h.svc, delivery_of(&next)).await;
            deliveries += 1;
            assert!(deliveries < 1000, "the chain never ends");
        }
        assert_eq!(h.ledger_record("d1").await.status, RequestStatus::Expired);
        assert_eq!(
            h.clock.now(),
            expires_at - h.svc.policy.last_check_before_expiry()
        );
        assert_eq!(
            h.device.calls(),
            calls_before_last,
            "expired without a device call"
        );
        assert!(h.index_entries().await.is_empty());
        h.clock.advance(h.svc.policy.wake_grace);
        let report = crate::functions::drain_soc_timer::run(&h.svc)
            .await
            .unwrap();
        assert_eq!(report.due, 0, "{report}");
    }

    #[tokio::test]
    async fn a_malformed_message_is_completed_not_retried_forever() {
        let h = Harness::new();
        let settle = handle(
            &h.svc,
            Delivery {
                body: b"{oops".to_vec(),
                message_id: None,
                delivery_count: 1,
            },
        )
        .await;
        assert!(matches!(settle, Settle::Complete(ref s) if s.contains("malformed")));
    }

    #[tokio::test]
    async fn a_message_for_an_unreadable_row_is_completed_with_the_reason_not_redelivered() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.ledger.corrupt("d1", "Status is not a known status");
        first_message_completes_without_a_put(&h, "d1/desired is unreadable: Status").await;
    }

    #[tokio::test]
    async fn a_ledger_outage_asks_for_redelivery() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post(&h, "d1", 40).await;
        h.ledger.set_down(true);
        let settle = handle(&h.svc, delivery_of(&h.queue.sent()[0])).await;
        assert!(matches!(settle, Settle::Retry(_)));
    }
}
