//! Keeps the due index ([`crate::domain::due_index`]) in step with record writes.
//!
//! Every write of a desired-state record goes through [`put_record`] or calls
//! [`file_if_earlier`] itself before its write: when the write makes the record's
//! sweep-due time earlier than the stored record's, an index entry is filed at the
//! new time *first*, so a crash between the two leaves at worst an extra entry,
//! never a pending record the sweep cannot find. A write that moves the time later
//! files nothing: the entry that covers the stored record is at or before it.

use crate::domain::due_index::DueEntry;
use crate::domain::DesiredState;
use crate::ports::{ETag, StoreError};

use super::Services;

/// Files an index entry for `record` if it is pending and due earlier than `stored`
/// (the record its write will replace, `None` for an insert) was.
pub async fn file_if_earlier(
    svc: &Services,
    record: &DesiredState,
    stored: Option<&DesiredState>,
) -> Result<(), StoreError> {
    let Some(due) = svc.policy.sweep_due(record) else {
        return Ok(());
    };
    let covered = stored
        .and_then(|s| svc.policy.sweep_due(s))
        .is_some_and(|d| d <= due);
    if covered || cfg!(feature = "mutant-index-skips-filing") {
        return Ok(());
    }
    svc.ledger
        .file_due(&DueEntry::new(record.device_id.clone(), due).filed(svc.clock.now()))
        .await
}

/// Writes `record` over `stored` (read with `expected`; `None`: insert), filing it in
/// the due index first if the write makes it due earlier.
pub async fn put_record(
    svc: &Services,
    record: &DesiredState,
    stored: Option<&DesiredState>,
    expected: Option<&ETag>,
) -> Result<ETag, StoreError> {
    file_if_earlier(svc, record, stored).await?;
    svc.ledger.put(record, expected).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::fakes::{accept_pending, Harness};
    use crate::ports::{Clock as _, Ledger as _};

    async fn entries(h: &Harness) -> Vec<DueEntry> {
        let far = h.clock.now() + chrono::Duration::days(365);
        let mut all = Vec::new();
        for shard in 0..crate::domain::due_index::SHARDS {
            for e in h.ledger.due_entries(shard, far, 1000).await.unwrap() {
                all.push(e.value);
            }
        }
        all
    }

    #[tokio::test]
    async fn a_new_pending_record_is_filed_at_its_sweep_due_time_before_it_is_written() {
        let h = Harness::new();
        let rec = accept_pending(&h, "d1", 40).await;
        let filed = entries(&h).await;
        assert_eq!(filed.len(), 1, "{filed:?}");
        assert_eq!(filed[0].device_id, rec.device_id);
        assert_eq!(Some(filed[0].due_at), h.svc.policy.sweep_due(&rec));
    }

    #[tokio::test]
    async fn a_write_that_moves_the_due_time_later_files_nothing() {
        let h = Harness::new();
        let current = {
            accept_pending(&h, "d1", 40).await;
            h.ledger.get(&h.id("d1")).await.unwrap().unwrap()
        };
        let mut later = current.value.clone();
        later.expect_wake(
            "m1",
            h.clock.now() + chrono::Duration::seconds(600),
            h.clock.now(),
        );
        put_record(&h.svc, &later, Some(&current.value), Some(&current.etag))
            .await
            .unwrap();
        assert_eq!(entries(&h).await.len(), 1);
    }

    #[tokio::test]
    async fn a_write_that_moves_the_due_time_earlier_files_an_entry_there() {
        let h = Harness::new();
        accept_pending(&h, "d1", 40).await;
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        let mut later = current.value.clone();
        later.expect_wake(
            "m1",
            h.clock.now() + chrono::Duration::seconds(600),
            h.clock.now(),
        );
        let etag = put_record(&h.svc, &later, Some(&current.value), Some(&current.etag))
            .await
            .unwrap();
        let mut sooner = later.clone();
        sooner.expect_wake(
            "m2",
            h.clock.now() + chrono::Duration::seconds(5),
            h.clock.now(),
        );
        put_record(&h.svc, &sooner, Some(&later), Some(&etag))
            .await
            .unwrap();
        let dues: Vec<_> = entries(&h).await.iter().map(|e| e.due_at).collect();
        assert!(
            dues.contains(&h.svc.policy.sweep_due(&sooner).unwrap()),
            "{dues:?}"
        );
    }

    #[tokio::test]
    async fn a_settled_record_is_not_filed() {
        let h = Harness::new();
        let mut rec = accept_pending(&h, "d1", 40).await;
        let before = entries(&h).await.len();
        let current = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
        rec.mark_applied(h.clock.now());
        put_record(&h.svc, &rec, Some(&current.value), Some(&current.etag))
            .await
            .unwrap();
        assert_eq!(entries(&h).await.len(), before);
    }
}
