//! Wake-up messages: the chain of Service Bus messages that brings a pending
//! request back to [`super::apply`] while its device is offline.
//!
//! Invariant: the ledger names the one message the chain expects next
//! (`wake_message_id`). A message is always sent *before* the ledger names it,
//! so a crash in between leaves at worst an orphan message, which is a no-op
//! when delivered (its id is not the expected one), and never a record that
//! waits for a message that does not exist for longer than the sweep's grace.

use chrono::{DateTime, Utc};
use tracing::info;

use crate::domain::DesiredState;
use crate::ports::{OutgoingMessage, QueueError, StoreError, Versioned, WakeMessage};

use super::Services;

/// A wake-up message for `record`'s request, due at `at` (now if `None`).
/// `None` when the request has no lifetime left for a message.
pub fn message_for(
    record: &DesiredState,
    at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<OutgoingMessage> {
    let active_from = at.unwrap_or(now).max(now);
    let ttl = crate::domain::schedule::ttl_until(active_from, record.expires_at)?;
    Some(OutgoingMessage {
        message_id: uuid::Uuid::new_v4().simple().to_string(),
        body: WakeMessage {
            request_id: record.request_id.clone(),
            device_id: record.device_id.to_string(),
            min_soc: record.min_soc.percent(),
            requested_at: record.requested_at,
            expires_at: record.expires_at,
        },
        scheduled_at: at.filter(|a| *a > now),
        ttl: ttl.to_std().unwrap_or_default(),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`schedule_recheck`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rescheduled {
    /// A message was sent and the ledger now expects it.
    Scheduled {
        message_id: String,
        at: DateTime<Utc>,
        /// The record as the write that names the message left it (what a read right
        /// after it would return), so the caller need not read it again.
        written: Box<Versioned<DesiredState>>,
    },
    /// The request's last useful moment has come: no re-check is left, its expiry is due
    /// (written by the delivery or sweep that sees it next).
    NoTimeLeft,
    /// The record moved on (newer request, settled, or another chain took over); nothing to do.
    Superseded,
}

/// Continues the wake-up chain of a pending request after a check found the device
/// unavailable: sends the next message after the back-off, then records it.
/// `chain` is the message id the caller was delivered for (`None` from the sweep),
/// used to tell whether another invocation has already continued the chain.
pub async fn schedule_recheck(
    svc: &Services,
    current: Versioned<DesiredState>,
    chain: Option<&str>,
    not_before: Option<DateTime<Utc>>,
) -> Result<Rescheduled, WakeError> {
    let now = svc.clock.now();
    // The first re-check after the first attempt waits `initial`, then it doubles.
    let checks_done = current.value.attempts.saturating_sub(1);
    // No PUT starts within one lease of expiry (see `apply`), so a re-check never
    // straddles expiry. The last one is due when every instance's clock reads the last
    // useful moment or later: it expires the request without a device call (the sweep,
    // a grace later, only if it is lost), whichever instance receives it.
    let last_useful = current.value.expires_at - svc.policy.lease;
    let last = current.value.expires_at - svc.policy.last_check_before_expiry();
    let Some(recheck) = svc.policy.backoff.next_recheck(checks_done, now, last) else {
        return Ok(Rescheduled::NoTimeLeft);
    };
    let at = match not_before {
        Some(t) if t > recheck && t < last_useful => t,
        _ => recheck,
    };
    send_and_record(svc, current, chain, at).await
}

/// Sends the next message of `current`'s chain, due at `at`, then makes the ledger
/// expect it (unless another invocation continued the chain meanwhile).
async fn send_and_record(
    svc: &Services,
    current: Versioned<DesiredState>,
    chain: Option<&str>,
    at: DateTime<Utc>,
) -> Result<Rescheduled, WakeError> {
    let now = svc.clock.now();
    let Some(message) = message_for(&current.value, Some(at), now) else {
        return Ok(Rescheduled::NoTimeLeft);
    };
    svc.queue.send(&message).await?;
    record_sent(svc, current, chain, message, at).await
}

/// Makes the ledger expect `message` (already sent, due at `at`) as `current`'s next
/// wake-up, unless another invocation continued the chain meanwhile.
pub async fn record_sent(
    svc: &Services,
    mut current: Versioned<DesiredState>,
    chain: Option<&str>,
    message: OutgoingMessage,
    at: DateTime<Utc>,
) -> Result<Rescheduled, WakeError> {
    let now = svc.clock.now();
    let request_id = current.value.request_id.clone();
    loop {
        let mut record = current.value.clone();
        record.expect_wake(message.message_id.clone(), at, now);
        let written =
            super::index::put_record(svc, &mut record, Some(&current.value), Some(&current.etag));
        match written.await {
            Ok(etag) => {
                info!(device = %record.device_id, request_id = %request_id, message_id = %message.message_id, at = %at, "re-check scheduled");
                return Ok(Rescheduled::Scheduled {
                    message_id: message.message_id,
                    at,
                    written: Box::new(Versioned {
                        value: record,
                        etag,
                    }),
                });
            }
            Err(StoreError::Conflict) => {
                let Some(fresh) = svc.ledger.get(&record.device_id).await? else {
                    return Ok(Rescheduled::Superseded);
                };
                let same_chain = fresh.value.wake_message_id.as_deref() == chain
                    || fresh.value.wake_message_id == current.value.wake_message_id;
                if fresh.value.request_id != request_id || !fresh.value.is_pending() || !same_chain
                {
                    return Ok(Rescheduled::Superseded);
                }
                current = fresh;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::fakes::{accept_pending, Harness};
    use crate::ports::{Clock as _, Ledger as _};

    #[tokio::test]
    async fn the_message_never_outlives_the_request() {
        let h = Harness::new();
        let rec = accept_pending(&h, "d1", 20).await;
        let m = message_for(
            &rec,
            Some(h.clock.now() + chrono::Duration::seconds(600)),
            h.clock.now(),
        )
        .unwrap();
        let active = m.scheduled_at.unwrap();
        assert_eq!(
            active + chrono::Duration::from_std(m.ttl).unwrap(),
            rec.expires_at
        );
        assert_eq!(m.body.request_id, rec.request_id);
    }

    #[tokio::test]
    async fn the_chain_is_recorded_after_the_message_is_sent() {
        let h = Harness::new();
        accept_pending(&h, "d1", 20).await;
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let out = schedule_recheck(&h.svc, current, None, None).await.unwrap();
        let Rescheduled::Scheduled { message_id, at, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(h.queue.sent()[0].message_id, message_id);
        let rec = h.ledger_record("d1").await;
        assert_eq!(rec.wake_message_id.as_deref(), Some(message_id.as_str()));
        assert_eq!(rec.wake_due_at, Some(at));
        assert_eq!(at, h.clock.now() + chrono::Duration::seconds(60));
    }

    #[tokio::test]
    async fn nothing_is_recorded_when_the_queue_is_down() {
        let h = Harness::new();
        accept_pending(&h, "d1", 20).await;
        h.queue.set_down(true);
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        assert!(matches!(
            schedule_recheck(&h.svc, current, None, None).await,
            Err(WakeError::Queue(_))
        ));
        assert!(h.ledger_record("d1").await.wake_message_id.is_none());
    }

    #[tokio::test]
    async fn the_last_re_check_falls_where_every_instance_sees_the_request_too_late_to_put() {
        // A PUT may not start within one lease of expiry (`apply`): however long the
        // back-off would wait, the last re-check is due a clock skew after the last
        // useful moment, so even a receiver whose clock is that far behind expires it.
        let mut h = Harness::new();
        h.svc.policy.max_clock_skew = chrono::Duration::seconds(2);
        let rec = accept_pending(&h, "d1", 20).await;
        let last_useful = rec.expires_at - h.svc.policy.lease;
        h.clock
            .advance(last_useful - h.clock.now() - chrono::Duration::seconds(30));
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let out = schedule_recheck(&h.svc, current, None, None).await.unwrap();
        let Rescheduled::Scheduled { at, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(at, last_useful + chrono::Duration::seconds(2));
        // Delivered then to an instance whose clock is the skew behind: too late to PUT.
        h.clock.advance(last_useful - h.clock.now());
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        assert!(current
            .value
            .is_expired_at(h.clock.now() + h.svc.policy.lease));
        // Once its due time has come, no re-check is left.
        h.clock.advance(at - h.clock.now());
        assert_eq!(
            schedule_recheck(&h.svc, current, None, None).await.unwrap(),
            Rescheduled::NoTimeLeft
        );
    }

    /// `record_sent` for a new message of `d1`'s request, from the version read before
    /// `meanwhile` rewrote the record (so its write conflicts), continuing `chain`.
    async fn record_after(
        chain: Option<&str>,
        meanwhile: impl FnOnce(&mut crate::domain::DesiredState, &Harness),
    ) -> (Rescheduled, crate::domain::DesiredState) {
        let h = Harness::new();
        accept_pending(&h, "d1", 20).await;
        let read = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let mut other = read.value.clone();
        meanwhile(&mut other, &h);
        h.ledger.put(&other, Some(&read.etag), &[]).await.unwrap();
        let at = h.clock.now() + chrono::Duration::seconds(60);
        let message = message_for(&read.value, Some(at), h.clock.now()).unwrap();
        let out = record_sent(&h.svc, read, chain, message, at).await.unwrap();
        (out, h.ledger_record("d1").await)
    }

    #[tokio::test]
    async fn a_sent_message_is_recorded_after_a_race_only_while_the_chain_is_still_its_own() {
        let now = |h: &Harness| h.clock.now();
        // A rewrite that leaves the chain alone: written again, naming the new message.
        let (out, rec) = record_after(None, |_, _| {}).await;
        let Rescheduled::Scheduled { message_id, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(rec.wake_message_id.as_deref(), Some(message_id.as_str()));
        // The message this one continues was recorded meanwhile (the chain is still ours).
        let (out, _) = record_after(Some("m1"), |r, h| r.expect_wake("m1", now(h), now(h))).await;
        assert!(matches!(out, Rescheduled::Scheduled { .. }), "{out:?}");
        // Another invocation continued the chain with a message of its own.
        let (out, rec) = record_after(None, |r, h| r.expect_wake("theirs", now(h), now(h))).await;
        assert!(matches!(out, Rescheduled::Superseded), "{out:?}");
        assert_eq!(rec.wake_message_id.as_deref(), Some("theirs"));
        // The request was settled, or replaced by a newer one.
        let (out, _) = record_after(None, |r, h| r.mark_applied(now(h))).await;
        assert!(matches!(out, Rescheduled::Superseded), "{out:?}");
        let (out, _) = record_after(None, |r, h| {
            *r = crate::domain::DesiredState::accept(
                r.device_id.clone(),
                crate::domain::MinSoc::new(70).unwrap(),
                now(h),
                h.svc.policy.request_ttl,
                Some(r),
            )
        })
        .await;
        assert!(matches!(out, Rescheduled::Superseded), "{out:?}");
    }

    #[tokio::test]
    async fn a_retry_after_later_than_the_backoff_is_honoured() {
        let h = Harness::new();
        accept_pending(&h, "d1", 20).await;
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let later = h.clock.now() + chrono::Duration::seconds(300);
        let out = schedule_recheck(&h.svc, current, None, Some(later))
            .await
            .unwrap();
        assert!(matches!(out, Rescheduled::Scheduled { at, .. } if at == later));
    }

    #[tokio::test]
    async fn a_not_before_is_used_only_between_the_back_off_and_the_last_useful_moment() {
        let at_for = |offset: chrono::Duration| async move {
            let h = Harness::new();
            let rec = accept_pending(&h, "d1", 20).await;
            let last_useful = rec.expires_at - h.svc.policy.lease;
            let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
            let out = schedule_recheck(&h.svc, current, None, Some(last_useful + offset))
                .await
                .unwrap();
            let Rescheduled::Scheduled { at, .. } = out else {
                panic!("{out:?}")
            };
            (at, h.clock.now(), last_useful)
        };
        // The back-off's first re-check is 60 s from now.
        let backoff = |now| now + chrono::Duration::seconds(60);
        let (at, now, last_useful) = at_for(-chrono::Duration::seconds(1)).await;
        assert_eq!(at, last_useful - chrono::Duration::seconds(1));
        let (at, now2, _) = at_for(chrono::Duration::zero()).await;
        assert_eq!(at, backoff(now2), "not at the last useful moment itself");
        let (at, now3, _) = at_for(chrono::Duration::seconds(10)).await;
        assert_eq!(at, backoff(now3), "never past it");
        // Earlier than the back-off's own time: the back-off's time.
        let (at, _, _) = at_for(now - last_useful).await;
        assert_eq!(at, backoff(now));
    }
}
