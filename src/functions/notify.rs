//! The notification outbox ([`crate::domain::notification`]), the writers' side and the
//! dispatcher.
//!
//! **Writing.** A write that ends a request (pending to applied, expired, failed or
//! cancelled, or a pending request replaced: superseded or expired) carries that
//! transition's event ([`settled`], [`replaced`]), numbered by the record's
//! [`DesiredState::last_event_seq`], and the ledger stores it in the device's outbox in
//! the same atomic write. So an event exists exactly when its transition committed: none
//! names a transition that did not happen, and a write retried after a conflict
//! computes its event again from what it now replaces.
//!
//! **Dispatching.** [`dispatch`] publishes the device's whole outbox, oldest first, and
//! removes what the topic accepted. An event leaves the outbox only after the topic
//! accepted it, and every listing holds every event not yet removed, so the first
//! arrival of each event follows the device's transition order; a re-publish (a crash
//! between publishing and removing, two dispatchers at once) repeats an event with its
//! `id`.
//!
//! **Nothing undelivered is forgotten.** Before a write that carries events, its writer
//! files a due-index entry for the device one lease ahead ([`Backstop`]): an extra
//! entry, which no record names. Once its write committed the writer dispatches and
//! removes that entry. If it cannot (a crash, the topic down, a write whose outcome it
//! never learns), the sweep meets the entry: it dispatches the device's outbox before
//! it removes any entry of the device, and removes entries only after a fence at the
//! record it read (`drain_soc_timer::tidy`), so a transition still in flight cannot
//! commit its event after the entry that covers it is gone. While the topic refuses or
//! is down, the entries stay and each sweep run tries again; the outbox keeps its
//! events however long that takes (they are not part of the pruned history).

use chrono::{DateTime, Utc};
use tracing::{error, warn};

use crate::domain::due_index::DueEntry;
use crate::domain::history::HistoryEntry;
use crate::domain::notification::Notification;
use crate::domain::{DesiredState, DeviceId};
use crate::ports::{NotifyError, StoreError};

use super::set_soc_http::render::entry_view;
use super::Services;

/// Most events one publish carries (a device's outbox holds a handful; the topic takes
/// at most 1 MB per request, and an event is well under 1 kB).
pub const PUBLISH_BATCH: usize = 100;

/// The event of `record`'s request ending, when writing `record` over `stored` ends
/// it (and notifications are on); numbers it in `record`. Ending includes the one change
/// of a final status there is: `expired` to `applied`, for a PUT that landed while its
/// result write was failing (the device's truth wins, `apply`), so the app hears that too.
pub fn settled(
    svc: &Services,
    stored: Option<&DesiredState>,
    record: &mut DesiredState,
) -> Vec<Notification> {
    use crate::domain::RequestStatus::{Applied, Expired};
    let ends = stored.is_some_and(|s| {
        s.request_id == record.request_id
            && s.status != record.status
            && (s.is_pending() || (s.status == Expired && record.status == Applied))
            && !record.is_pending()
    });
    if svc.notifier.is_none() || !ends {
        return Vec::new();
    }
    let at = record.updated_at;
    vec![next(record, &HistoryEntry::of(record), at)]
}

/// The event of the request `stored` held ending as `entry` says (superseded, or
/// expired) when `record` is accepted in its place (and notifications are on);
/// numbers it in `record`.
pub fn replaced(
    svc: &Services,
    stored: Option<&DesiredState>,
    entry: Option<&HistoryEntry>,
    record: &mut DesiredState,
) -> Vec<Notification> {
    match (stored, entry) {
        (Some(stored), Some(entry)) if svc.notifier.is_some() && stored.is_pending() => {
            let at = record.requested_at;
            vec![next(record, entry, at)]
        }
        _ => Vec::new(),
    }
}

fn next(record: &mut DesiredState, entry: &HistoryEntry, at: DateTime<Utc>) -> Notification {
    record.last_event_seq += 1;
    Notification::request_settled(
        &record.device_id,
        &entry.request.request_id,
        entry.status(),
        record.last_event_seq,
        at,
        &entry_view(entry),
    )
}

/// Why a dispatch stopped; what it did not remove stays in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("could not read or clear the outbox: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Notify(#[from] NotifyError),
}

/// What one dispatch found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dispatched {
    /// Events the topic accepted (and the outbox no longer holds).
    pub published: usize,
    /// Events left in the outbox (the topic or the storage failed), and the time of
    /// the oldest of them.
    pub left: usize,
    pub oldest_left: Option<DateTime<Utc>>,
}

/// Publishes the device's outbox, oldest first, [`PUBLISH_BATCH`] events a request,
/// removing each batch once the topic accepted it. Nothing to do (and no read) when
/// notifications are off.
pub async fn dispatch(svc: &Services, device: &DeviceId) -> Result<Dispatched, DispatchError> {
    let Some(notifier) = &svc.notifier else {
        return Ok(Dispatched::default());
    };
    let events = svc.ledger.outbox(device).await?;
    let mut done = Dispatched::default();
    for batch in events.chunks(PUBLISH_BATCH) {
        let published = async {
            notifier.publish(batch).await?;
            let seqs: Vec<u64> = batch.iter().map(|e| e.seq).collect();
            svc.ledger.remove_outbox(device, &seqs).await?;
            Ok::<_, DispatchError>(())
        };
        if let Err(e) = published.await {
            let left = &events[done.published..];
            done.left = left.len();
            done.oldest_left = left.iter().map(|e| e.time).min();
            log_failure(device, &e, done.left);
            return Err(e);
        }
        done.published += batch.len();
    }
    Ok(done)
}

fn log_failure(device: &DeviceId, e: &DispatchError, left: usize) {
    match e {
        DispatchError::Notify(NotifyError::Refused(_)) => {
            error!(device = %device, error = %e, left, "notifications refused by the event topic; kept in the outbox")
        }
        _ => {
            warn!(device = %device, error = %e, left, "notifications not delivered yet; kept in the outbox")
        }
    }
}

/// The due-index entry that makes the sweep dispatch a device's outbox if the writer
/// of its events does not (module docs).
#[derive(Debug)]
#[must_use = "file it before the write, and call `committed` after it"]
pub struct Backstop(Option<DueEntry>);

impl Backstop {
    /// Files the entry for a write of `events` (none: nothing to do): before the write,
    /// which must not be sent if this fails.
    pub async fn file(
        svc: &Services,
        device: &DeviceId,
        events: &[Notification],
    ) -> Result<Self, StoreError> {
        if events.is_empty() {
            return Ok(Self(None));
        }
        let now = svc.clock.now();
        let entry = DueEntry::new(device.clone(), now + svc.policy.lease).filed(now);
        svc.ledger.file_due(&entry).await?;
        Ok(Self(Some(entry)))
    }

    /// After the write is known to have committed: dispatches the device's outbox and,
    /// if that delivered everything, removes the entry (else the sweep will retry).
    pub async fn committed(self, svc: &Services) {
        let Some(entry) = self.0 else {
            return;
        };
        if dispatch(svc, &entry.device_id).await.is_err() {
            return;
        }
        if let Err(e) = svc.ledger.unfile_due(&entry, None).await {
            warn!(device = %entry.device_id, error = %e, "could not remove a delivered outbox's due-index entry; the sweep will drop it");
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use crate::functions::drain_soc_timer;
    use crate::functions::fakes::{post_min_soc, Harness};
    use crate::functions::set_soc_http::{handle, ApiRequest};
    use crate::ports::Clock as _;

    fn id(body: &serde_json::Value) -> String {
        body["requestId"]
            .as_str()
            .expect("a request id")
            .to_string()
    }

    async fn entries(h: &Harness) -> usize {
        h.index_entries().await.len()
    }

    async fn cancel(h: &Harness, device: &str, request: &str) -> u16 {
        let req = ApiRequest {
            method: "DELETE".into(),
            device_id: device.into(),
            rest: Some(format!("requests/{request}")),
            ..Default::default()
        };
        handle(&h.svc, req).await.status
    }

    #[tokio::test]
    async fn an_applied_request_is_published_once_and_leaves_nothing_behind() {
        let h = Harness::new().notifying();
        h.device.set_online("d1", true);
        let body = post_min_soc(&h, "d1", 30).await;
        assert_eq!(body["status"], "applied");
        let r = id(&body);
        assert_eq!(h.notifier.ids(), vec![format!("{r}.applied")]);
        let event = &h.notifier.received()[0];
        assert_eq!(event.event_type, "com.socsettings.request.applied");
        assert_eq!(event.subject, format!("devices/d1/soc/requests/{r}"));
        let data: serde_json::Value = serde_json::from_str(&event.data).unwrap();
        assert_eq!(
            data["status"], "applied",
            "data is the request as GET shows it"
        );
        assert_eq!(data["minSoc"], 30);
        assert!(h.ledger.outboxes().is_empty(), "the outbox is emptied");
        assert_eq!(entries(&h).await, 0, "the backstop entry is removed");
    }

    #[tokio::test]
    async fn every_end_of_a_devices_requests_is_published_in_the_order_it_happened() {
        let h = Harness::new().notifying();
        h.device.set_online("d1", false);
        let a = id(&post_min_soc(&h, "d1", 30).await);
        let b = id(&post_min_soc(&h, "d1", 40).await);
        assert_eq!(cancel(&h, "d1", &b).await, 200);
        h.device.set_online("d1", true);
        let c = id(&post_min_soc(&h, "d1", 50).await);
        assert_eq!(
            h.notifier.ids(),
            vec![
                format!("{a}.superseded"),
                format!("{b}.cancelled"),
                format!("{c}.applied")
            ]
        );
        let seqs: Vec<u64> = h.notifier.received().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(h.ledger_record("d1").await.last_event_seq, 3);
    }

    #[tokio::test]
    async fn while_the_topic_is_down_events_wait_in_the_outbox_and_the_sweep_delivers_them_in_order(
    ) {
        let h = Harness::new().notifying();
        h.notifier.set_down(true);
        h.device.set_online("d1", false);
        let a = id(&post_min_soc(&h, "d1", 30).await);
        let b = id(&post_min_soc(&h, "d1", 40).await);
        assert_eq!(cancel(&h, "d1", &b).await, 200);
        assert!(h.notifier.received().is_empty());
        assert_eq!(h.ledger.outboxes().len(), 2, "kept, not dropped");
        // A run while the topic is still down leaves them (and their entries).
        h.clock.advance(h.svc.policy.lease + Duration::seconds(1));
        let report = drain_soc_timer::run(&h.svc).await.unwrap();
        assert_eq!(report.outbox_events, 2, "{report}");
        assert!(report.outbox_oldest_age_s > 0, "{report}");
        assert!(report.to_string().contains(" outbox_oldest_age_s="));
        assert_eq!(h.ledger.outboxes().len(), 2);
        assert!(entries(&h).await > 0);
        h.notifier.set_down(false);
        let report = drain_soc_timer::run(&h.svc).await.unwrap();
        assert_eq!(report.notified, 2, "{report}");
        assert_eq!(
            h.notifier.ids(),
            vec![format!("{a}.superseded"), format!("{b}.cancelled")]
        );
        assert!(h.ledger.outboxes().is_empty());
        assert_eq!(entries(&h).await, 0);
    }

    #[tokio::test]
    async fn the_sweep_removes_a_pending_devices_backstop_only_after_publishing_its_outbox() {
        let h = Harness::new().notifying();
        h.notifier.set_down(true);
        h.device.set_online("d1", false);
        let a = id(&post_min_soc(&h, "d1", 30).await);
        post_min_soc(&h, "d1", 40).await;
        // The newer request's entry, and the backstop filed with the write that
        // superseded the first, one lease ahead (the writer publishes first).
        assert_eq!(entries(&h).await, 2);
        let due_ats: Vec<_> = h.index_entries().await.iter().map(|e| e.due_at).collect();
        assert!(
            due_ats.contains(&(h.clock.now() + h.svc.policy.lease)),
            "{due_ats:?}"
        );
        // The backstop is due; the record is not (its wake-up chain looks after it).
        h.clock.advance(h.svc.policy.lease + Duration::seconds(1));
        drain_soc_timer::run(&h.svc).await.unwrap();
        assert_eq!(h.ledger.outboxes().len(), 1);
        assert_eq!(entries(&h).await, 2, "undelivered: the backstop stays");
        h.notifier.set_down(false);
        drain_soc_timer::run(&h.svc).await.unwrap();
        assert_eq!(h.notifier.ids(), vec![format!("{a}.superseded")]);
        assert!(h.ledger.outboxes().is_empty());
        assert_eq!(
            entries(&h).await,
            1,
            "the entry covering the pending request"
        );
    }

    #[test]
    fn a_request_ends_once_except_that_a_landed_put_turns_expired_into_applied() {
        use crate::domain::{DesiredState, MinSoc};
        let h = Harness::new().notifying();
        let now = h.clock.now();
        let pending = DesiredState::accept(
            h.id("d1"),
            MinSoc::new(30).unwrap(),
            now,
            h.svc.policy.request_ttl,
            None,
        );
        let mut expired = pending.clone();
        expired.mark_expired(now);
        let mut applied = expired.clone();
        applied.mark_applied(now);
        let ids = |stored: &DesiredState, written: &DesiredState| {
            let mut written = written.clone();
            super::settled(&h.svc, Some(stored), &mut written)
                .into_iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        };
        let r = pending.request_id.as_str();
        assert_eq!(ids(&pending, &expired), vec![format!("{r}.expired")]);
        assert_eq!(ids(&expired, &applied), vec![format!("{r}.applied")]);
        assert!(
            ids(&applied, &applied).is_empty(),
            "a rewrite of a final state"
        );
        assert!(ids(&pending, &pending).is_empty());
        let mut failed = pending.clone();
        failed.mark_failed("unknown device", now);
        assert!(
            ids(&failed, &applied).is_empty(),
            "only expired gives way to applied"
        );
    }

    #[tokio::test]
    async fn with_notifications_off_no_outbox_is_written_and_nothing_is_published() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        post_min_soc(&h, "d1", 30).await;
        h.device.set_online("d1", true);
        post_min_soc(&h, "d1", 40).await;
        assert!(h.ledger.outboxes().is_empty());
        assert_eq!(h.notifier.attempts(), 0);
        assert_eq!(h.ledger_record("d1").await.last_event_seq, 0);
    }
}
