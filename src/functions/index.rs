//! Keeps the due index ([`crate::domain::due_index`]) in step with record writes:
//! an entry moves with its record.
//!
//! Each pending record names the entry that covers it ([`DesiredState::due_entry`]).
//! Every write of a record goes through [`put_record`] (or [`plan`], [`IndexMove::file`]
//! and [`IndexMove::committed`] around a write of its own):
//! - **before the write**, if the new version is pending and the entry the stored
//!   version names does not fit its sweep-due time (at it, or at most [`KEEP_WITHIN`]
//!   before it), an entry is filed at the new time and the new version names it; a
//!   crash between the two leaves at worst an extra entry;
//! - **once the write is known to have committed**, the entry the replaced version
//!   named is removed if the new version names another (or, settled, none). Best
//!   effort: one left behind is an extra entry, which the sweep drops.
//!
//! So whoever moves a record's sweep-due time later (every re-check of an offline
//! device does) moves its entry too, and whoever settles a record removes it: the
//! sweep meets the records that are due, not every live wake-up chain once per
//! back-off period (issue 20; extra entries come only from failures and crashes).
//!
//! **The invariants** (S6 in the simulator, checked after every ledger effect):
//! - every pending record has an entry at or before its sweep-due time;
//! - the entry a pending record names exists. Only two removals touch entries: a
//!   writer's, of the entry named by the version its own committed write replaced (no
//!   later version can name it: names are kept only from the version replaced); and
//!   the sweep's, of entries it listed, after a conditional write at the version it
//!   read that names none of them (`drain_soc_timer`).

use chrono::Duration;
use tracing::warn;

use crate::domain::due_index::DueEntry;
use crate::domain::DesiredState;
use crate::ports::{ETag, StoreError};

use super::{notify, Services};

/// How much earlier than a record's sweep-due time the entry it names may be and still
/// be kept: an early entry costs the sweep a look only if a run lists it in between,
/// and the writes that move a record's time by seconds (a lease taken before its
/// first wake-up message is named) are followed by one that moves it for real.
pub const KEEP_WITHIN: Duration = Duration::seconds(30);

/// What one record write does to the due index: the entry to file before it (which the
/// new version names) and the one to remove after it.
#[derive(Debug)]
#[must_use = "file the entry before the write, and call `committed` after it"]
pub struct IndexMove {
    file: Option<DueEntry>,
    retire: Option<DueEntry>,
}

/// Decides what writing `record` over `stored` (`None`: an insert) does to the index,
/// and names the covering entry in `record`.
pub fn plan(svc: &Services, record: &mut DesiredState, stored: Option<&DesiredState>) -> IndexMove {
    plan_keeping(svc, record, stored, true)
}

/// [`plan`], except that the stored version's entry is never kept: for the sweep,
/// which may be about to remove it.
pub fn plan_refiling(
    svc: &Services,
    record: &mut DesiredState,
    stored: Option<&DesiredState>,
) -> IndexMove {
    plan_keeping(svc, record, stored, false)
}

fn plan_keeping(
    svc: &Services,
    record: &mut DesiredState,
    stored: Option<&DesiredState>,
    may_keep: bool,
) -> IndexMove {
    let named = stored.and_then(named_entry);
    let due = svc.policy.sweep_due(record);
    let kept = named.clone().filter(|e| {
        may_keep && due.is_some_and(|due| e.due_at <= due && due - e.due_at <= KEEP_WITHIN)
    });
    let file = match (due, &kept) {
        (Some(due), None) => {
            Some(DueEntry::new(record.device_id.clone(), due).filed(svc.clock.now()))
        }
        _ => None,
    };
    record.due_entry = kept.as_ref().or(file.as_ref()).map(DueEntry::row_key);
    let retire = named.filter(|e| record.due_entry.as_deref() != Some(e.row_key().as_str()));
    IndexMove { file, retire }
}

/// The entry `record` names, if it names one that reads.
pub fn named_entry(record: &DesiredState) -> Option<DueEntry> {
    record.due_entry.as_deref().and_then(DueEntry::from_row_key)
}

impl IndexMove {
    /// This move (planned as for an insert, `plan(svc, record, None)`), made over
    /// `stored` instead: the entry `stored` names is removed once the write has
    /// committed, unless it is the one filed. Never keeps `stored`'s entry, so the
    /// filing need not wait for the read.
    pub fn retiring(mut self, stored: Option<&DesiredState>) -> Self {
        let filed = self.file.as_ref().map(DueEntry::row_key);
        self.retire = stored
            .and_then(named_entry)
            .filter(|e| filed.as_deref() != Some(e.row_key().as_str()));
        self
    }

    /// Files the new entry, if any: before the write, which must not be sent if this fails.
    pub async fn file(&self, svc: &Services) -> Result<(), StoreError> {
        match &self.file {
            Some(entry) => svc.ledger.file_due(entry).await,
            None => Ok(()),
        }
    }

    /// After the write is known to have committed: removes the entry only the replaced
    /// version named. A failure leaves an extra entry behind (logged), nothing worse.
    pub async fn committed(self, svc: &Services) {
        let Some(entry) = self.retire else {
            return;
        };
        if let Err(e) = svc.ledger.unfile_due(&entry, None).await {
            warn!(device = %entry.device_id, error = %e, "could not remove a record's old due-index entry; the sweep will drop it");
        }
    }
}

/// Writes `record` over `stored` (read with `expected`; `None`: insert), moving its
/// due-index entry with it ([`plan`]) and, if the write ends its request, with that
/// transition's event ([`notify::settled`], published once the write committed);
/// `record` comes back naming its entry.
pub async fn put_record(
    svc: &Services,
    record: &mut DesiredState,
    stored: Option<&DesiredState>,
    expected: Option<&ETag>,
) -> Result<ETag, StoreError> {
    let events = notify::settled(svc, stored, record);
    put_record_with(svc, record, stored, expected, events).await
}

/// [`put_record`] with the `events` the write carries given (numbered in `record`
/// already) instead of computed from the request's transition.
pub async fn put_record_with(
    svc: &Services,
    record: &mut DesiredState,
    stored: Option<&DesiredState>,
    expected: Option<&ETag>,
    events: Vec<crate::domain::notification::Notification>,
) -> Result<ETag, StoreError> {
    let moved = plan(svc, record, stored);
    moved.file(svc).await?;
    let backstop = notify::Backstop::file(svc, &record.device_id, &events).await?;
    let etag = svc.ledger.put(record, expected, &events).await?;
    tokio::join!(moved.committed(svc), backstop.committed(svc));
    Ok(etag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::fakes::{accept_pending, Harness};
    use crate::ports::{Clock as _, Ledger as _, Versioned};

    async fn entries(h: &Harness) -> Vec<DueEntry> {
        h.index_entries().await
    }

    async fn stored(h: &Harness, device: &str) -> Versioned<DesiredState> {
        h.ledger.get(&h.id(device)).await.unwrap().unwrap()
    }

    /// d1 accepted, then written waiting for a wake-up message due `secs` from now.
    async fn waiting(h: &Harness, secs: i64) -> (DesiredState, ETag) {
        accept_pending(h, "d1", 40).await;
        let current = stored(h, "d1").await;
        let mut waking = waking_in(h, &current.value, secs);
        let etag = put_record(
            &h.svc,
            &mut waking,
            Some(&current.value),
            Some(&current.etag),
        )
        .await
        .unwrap();
        (waking, etag)
    }

    /// `current` with its next wake-up message due `secs` from now.
    fn waking_in(h: &Harness, current: &DesiredState, secs: i64) -> DesiredState {
        let mut next = current.clone();
        next.expect_wake(
            format!("m{secs}"),
            h.clock.now() + chrono::Duration::seconds(secs),
            h.clock.now(),
        );
        next
    }

    #[tokio::test]
    async fn a_new_pending_record_is_filed_at_its_sweep_due_time_and_names_the_entry() {
        let h = Harness::new();
        let rec = accept_pending(&h, "d1", 40).await;
        let filed = entries(&h).await;
        assert_eq!(filed.len(), 1, "{filed:?}");
        assert_eq!(filed[0].device_id, rec.device_id);
        assert_eq!(Some(filed[0].due_at), h.svc.policy.sweep_due(&rec));
        assert_eq!(
            stored(&h, "d1").await.value.due_entry,
            Some(filed[0].row_key())
        );
    }

    #[tokio::test]
    async fn a_move_planned_before_the_read_retires_the_stored_entry_and_never_the_filed_one() {
        let h = Harness::new();
        let (waiting, _) = waiting(&h, 600).await;
        let stored_entry = named_entry(&waiting).unwrap();
        let mut fresh = waking_in(&h, &waiting, 1200);
        let moved = plan(&h.svc, &mut fresh, None).retiring(Some(&waiting));
        let filed = fresh.due_entry.clone().unwrap();
        assert_ne!(filed, stored_entry.row_key());
        moved.file(&h.svc).await.unwrap();
        moved.committed(&h.svc).await;
        let left: Vec<String> = entries(&h).await.iter().map(DueEntry::row_key).collect();
        assert_eq!(left, vec![filed]);
    }

    #[tokio::test]
    async fn a_write_that_moves_the_due_time_later_moves_the_entry() {
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        let current = stored(&h, "d1").await;
        let mut later = waking_in(&h, &current.value, 600);
        put_record(
            &h.svc,
            &mut later,
            Some(&current.value),
            Some(&current.etag),
        )
        .await
        .unwrap();
        let filed = entries(&h).await;
        assert_eq!(filed.len(), 1, "the old entry goes: {filed:?}");
        assert_eq!(Some(filed[0].due_at), h.svc.policy.sweep_due(&later));
        assert_eq!(
            stored(&h, "d1").await.value.due_entry,
            Some(filed[0].row_key())
        );
    }

    #[tokio::test]
    async fn a_write_that_moves_the_due_time_earlier_moves_the_entry_there() {
        let h = Harness::new();
        let (later, etag) = waiting(&h, 600).await;
        let mut sooner = waking_in(&h, &later, 5);
        put_record(&h.svc, &mut sooner, Some(&later), Some(&etag))
            .await
            .unwrap();
        let dues: Vec<_> = entries(&h).await.iter().map(|e| e.due_at).collect();
        assert_eq!(dues, vec![h.svc.policy.sweep_due(&sooner).unwrap()]);
    }

    #[tokio::test]
    async fn a_write_that_keeps_the_due_time_keeps_the_entry() {
        let h = Harness::new();
        let (waking, etag) = waiting(&h, 600).await;
        let before = entries(&h).await;
        let mut leased = waking.clone();
        h.clock.advance(chrono::Duration::seconds(3));
        leased.take_lease(
            &crate::domain::LeaseHolder::new(crate::domain::HolderKind::Queue),
            h.clock.now(),
            h.svc.policy.lease,
        );
        put_record(&h.svc, &mut leased, Some(&waking), Some(&etag))
            .await
            .unwrap();
        assert_eq!(entries(&h).await, before);
        assert_eq!(leased.due_entry, waking.due_entry);
    }

    #[tokio::test]
    async fn settling_a_record_removes_its_entry() {
        let h = Harness::new();
        let mut rec = accept_pending(&h, "d1", 40).await;
        let current = stored(&h, "d1").await;
        rec.mark_applied(h.clock.now());
        put_record(&h.svc, &mut rec, Some(&current.value), Some(&current.etag))
            .await
            .unwrap();
        assert_eq!(entries(&h).await, vec![]);
        assert_eq!(stored(&h, "d1").await.value.due_entry, None);
    }

    #[tokio::test]
    async fn a_write_that_did_not_commit_leaves_the_entry_the_record_names() {
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        let current = stored(&h, "d1").await;
        let mut later = waking_in(&h, &current.value, 600);
        let stale = ETag("not-the-stored-one".into());
        let written = put_record(&h.svc, &mut later, Some(&current.value), Some(&stale)).await;
        assert_eq!(written, Err(StoreError::Conflict));
        let named = named_entry(&current.value).unwrap();
        let keys: Vec<String> = entries(&h).await.iter().map(DueEntry::row_key).collect();
        assert!(
            keys.contains(&named.row_key()),
            "the named entry must stay: {keys:?}"
        );
    }

    #[tokio::test]
    async fn the_sweeps_refiling_never_keeps_the_entry_it_may_remove() {
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        let current = stored(&h, "d1").await;
        let mut renamed = current.value.clone();
        let moved = plan_refiling(&h.svc, &mut renamed, Some(&current.value));
        assert_ne!(renamed.due_entry, current.value.due_entry);
        moved.file(&h.svc).await.unwrap();
        h.ledger
            .put(&renamed, Some(&current.etag), &[])
            .await
            .unwrap();
        moved.committed(&h.svc).await;
        let filed = entries(&h).await;
        assert_eq!(filed.len(), 1, "{filed:?}");
        assert_eq!(renamed.due_entry, Some(filed[0].row_key()));
    }
}
