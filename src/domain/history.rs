//! Per-request history: what became of each of a device's recent requests
//! (`GET /api/devices/{deviceId}/soc/requests/{requestId}`).
//!
//! The ledger record holds only the device's latest request. Beside it the ledger keeps
//! one [`HistoryEntry`] per request, under these invariants:
//!
//! - **Written with the ledger, atomically.** Every ledger write also writes the entry
//!   of the request it stores (a snapshot of the record), in the same atomic operation
//!   (Table Storage: one entity-group transaction in the device's partition). So the
//!   entry of the request the ledger holds never disagrees with the ledger.
//! - **A replaced request is settled in the same write.** Accepting a request over
//!   another writes the replaced request's entry as what became of it
//!   ([`HistoryEntry::replaced`]): `superseded` by the new request if it was still
//!   pending, `expired` if it was pending past its expiry, else its final state.
//! - **An entry exists exactly when its request was stored.** It is written in the
//!   request's own accepting write (one commit point, no undo), which is also how a
//!   POST whose write timed out tells, after fencing it, whether it committed.
//! - **Bounded.** At least the newest [`HISTORY_LIMIT`] entries per device are kept,
//!   and at most [`HISTORY_KEPT_AT_MOST`]: every [`PRUNE_EVERY`]th accepted request
//!   (and the first one a day after the last prune, for the expired `Idempotency-Key`
//!   rows) deletes the entries beyond the newest [`HISTORY_LIMIT`] (by `requestedAt`),
//!   so pruning costs a POST a query only once in ten ([`prunes_after`]; the record
//!   counts the requests since). There is no time-based retention beyond that; a
//!   request's own lifetime (the TTL, 7 days by default) ends long before a device
//!   makes 20 more requests at any realistic rate, and a device without new requests
//!   keeps its last 20 to 29.
//!
//! Reading: [`lookup`] takes the ledger record first and the entry second. Because a
//! replaced request's entry is settled in the same write that replaces it, an entry
//! read after a ledger read that no longer holds its request already says what became
//! of it.

use chrono::{DateTime, Utc};

use super::ledger::{DesiredState, RequestId};

/// Entries kept per device, at least (the newest).
pub const HISTORY_LIMIT: usize = 20;
/// Accepted requests between two prunes of a device's history and key rows.
pub const PRUNE_EVERY: u32 = 10;
/// Entries a device may have at most: the newest [`HISTORY_LIMIT`] after a prune,
/// and the requests accepted until the next one.
pub const HISTORY_KEPT_AT_MOST: usize = HISTORY_LIMIT + PRUNE_EVERY as usize - 1;
/// A prune is due at least this long after the last one, so that expired
/// `Idempotency-Key` rows do not linger on a device with few requests.
pub const PRUNE_AT_LEAST_EVERY: chrono::Duration = crate::domain::IDEMPOTENCY_KEY_RETENTION;

/// The record's pruning state once the request accepted at `now` over `previous` is
/// written: (requests accepted since the last prune, that prune's time). A count of 0
/// means this request's accepting write prunes ([`DesiredState::prunes_history`]). A
/// device's first request has nothing to prune; a record written before the counter
/// was kept (`pruned_at` unknown) prunes at once.
pub fn prunes_after(
    previous: Option<&DesiredState>,
    now: DateTime<Utc>,
) -> (u32, Option<DateTime<Utc>>) {
    let Some(previous) = previous else {
        return (1, Some(now));
    };
    let due = match previous.pruned_at {
        None => true,
        Some(at) => previous.unpruned + 1 >= PRUNE_EVERY || now - at >= PRUNE_AT_LEAST_EVERY,
    };
    if due {
        (0, Some(now))
    } else {
        (previous.unpruned + 1, previous.pruned_at)
    }
}

/// What is known about one request: the last state the ledger held for it, and the
/// request that replaced it while it was pending, if one did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub request: DesiredState,
    pub superseded_by: Option<RequestId>,
}

/// How a request is shown: the ledger's statuses plus `superseded`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShownStatus {
    Pending,
    Applied,
    Expired,
    Failed,
    Cancelled,
    Superseded,
}

impl ShownStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Superseded => "superseded",
        }
    }
}

impl HistoryEntry {
    /// The entry of the request `state` holds, as the ledger stores it now.
    pub fn of(state: &DesiredState) -> Self {
        let mut request = state.clone();
        // Coordination fields say nothing about the request's fate.
        request.lease = None;
        request.due_entry = None;
        request.unpruned = 0;
        request.pruned_at = None;
        request.last_event_seq = 0;
        // Drift is about the device, shown with its latest request (`GET …/soc`).
        request.reported_min_soc = None;
        request.drift_detected_at = None;
        Self {
            request,
            superseded_by: None,
        }
    }

    /// The entry of `replaced` once `by` takes its place in the ledger at `now`.
    pub fn replaced(replaced: &DesiredState, by: &RequestId, now: DateTime<Utc>) -> Self {
        let mut entry = Self::of(replaced);
        if entry.request.is_pending() {
            if entry.request.is_expired_at(now) {
                entry.request.mark_expired(now);
            } else {
                entry.superseded_by = Some(by.clone());
            }
        }
        entry
    }

    /// The status shown: exactly what the ledger says. A pending request shows as
    /// pending until expiry is written (by the sweep, from one lease before
    /// `expiresAt`): a status computed from each instance's clock would flip between
    /// `expired` and `pending` across instances whose clocks differ, and reads must
    /// never contradict each other (README, S7).
    pub fn status(&self) -> ShownStatus {
        if self.superseded_by.is_some() {
            return ShownStatus::Superseded;
        }
        use super::ledger::RequestStatus as S;
        match self.request.status {
            S::Pending => ShownStatus::Pending,
            S::Applied => ShownStatus::Applied,
            S::Expired => ShownStatus::Expired,
            S::Failed => ShownStatus::Failed,
            S::Cancelled => ShownStatus::Cancelled,
        }
    }
}

/// What `GET .../requests/{id}` shows, from the ledger record (read first) and the
/// request's entry (read after it). `None`: no such request (never accepted, or older
/// than the bound).
pub fn lookup(
    id: &RequestId,
    current: Option<&DesiredState>,
    entry: Option<HistoryEntry>,
) -> Option<HistoryEntry> {
    if let Some(current) = current.filter(|c| c.request_id == *id) {
        return Some(HistoryEntry::of(current));
    }
    entry
}

/// Which entries to delete so that at most [`HISTORY_LIMIT`] remain: the oldest by
/// `requestedAt`, never `keep` (the request the ledger holds).
pub fn beyond_limit(
    mut entries: Vec<(RequestId, DateTime<Utc>)>,
    keep: &RequestId,
) -> Vec<RequestId> {
    if entries.len() <= HISTORY_LIMIT {
        return Vec::new();
    }
    // Newest first; ties broken by id so the choice is deterministic.
    entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.as_str().cmp(a.0.as_str())));
    entries
        .into_iter()
        .skip(HISTORY_LIMIT)
        .map(|(id, _)| id)
        .filter(|id| id != keep)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DeviceId, MinSoc};
    use chrono::{Duration, TimeZone};

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_device_holds_at_most_history_kept_at_most_entries() {
        // Each accepted request adds an entry; an accepting write that prunes keeps the
        // newest HISTORY_LIMIT (its own included).
        let (mut kept, mut most) = (0usize, 0usize);
        let mut previous: Option<DesiredState> = None;
        for i in 0..100 {
            let r = request(i, previous.as_ref());
            kept += 1;
            if r.prunes_history() {
                kept = kept.min(HISTORY_LIMIT);
            }
            most = most.max(kept);
            previous = Some(r);
        }
        assert_eq!(most, HISTORY_KEPT_AT_MOST);
    }

    fn request(at: i64, previous: Option<&DesiredState>) -> DesiredState {
        DesiredState::accept(
            DeviceId::parse("bat-1").unwrap(),
            MinSoc::new(30).unwrap(),
            t(at),
            Duration::seconds(100),
            previous,
        )
    }

    #[test]
    fn a_pending_request_replaced_in_time_is_superseded_by_the_new_one() {
        let old = request(0, None);
        let new = request(10, Some(&old));
        let entry = HistoryEntry::replaced(&old, &new.request_id, t(10));
        assert_eq!(entry.superseded_by.as_ref(), Some(&new.request_id));
        assert_eq!(entry.status(), ShownStatus::Superseded);
        assert_eq!(
            entry.status(),
            ShownStatus::Superseded,
            "superseded stays superseded after its expiry"
        );
    }

    #[test]
    fn a_pending_request_replaced_after_its_expiry_is_expired_not_superseded() {
        let old = request(0, None);
        let new = request(200, Some(&old));
        let entry = HistoryEntry::replaced(&old, &new.request_id, t(200));
        assert_eq!(entry.superseded_by, None);
        assert_eq!(entry.request.status.as_str(), "expired");
        assert_eq!(entry.status(), ShownStatus::Expired);
    }

    #[test]
    fn every_tenth_accepted_request_prunes_and_the_first_never_does() {
        let mut previous = request(0, None);
        assert!(!previous.prunes_history(), "a device's first request");
        let mut pruning = Vec::new();
        for i in 1..=25 {
            let next = request(i, Some(&previous));
            if next.prunes_history() {
                pruning.push(i);
                assert_eq!(next.pruned_at, Some(t(i)));
            } else {
                assert_eq!(next.pruned_at, previous.pruned_at, "request {i}");
            }
            previous = next;
        }
        assert_eq!(pruning, vec![9, 19]);
        assert_eq!(previous.unpruned, 6);
    }

    #[test]
    fn a_request_a_day_after_the_last_prune_prunes_for_the_expired_key_rows() {
        let first = request(0, None);
        let second = request(60, Some(&first));
        assert!(!second.prunes_history());
        let late = PRUNE_AT_LEAST_EVERY.num_seconds();
        assert!(!request(late - 1, Some(&second)).prunes_history());
        assert!(request(late, Some(&second)).prunes_history());
    }

    #[test]
    fn a_record_written_before_the_counter_prunes_at_once() {
        let mut legacy = request(0, None);
        legacy.unpruned = 0;
        legacy.pruned_at = None;
        assert!(request(1, Some(&legacy)).prunes_history());
    }

    #[test]
    fn a_rebased_request_counts_from_the_record_it_now_replaces() {
        let base = request(0, None);
        let nine = (1..8).fold(request(1, Some(&base)), |p, i| request(i + 1, Some(&p)));
        assert_eq!(nine.unpruned, 9);
        // Written over `base`, it would not prune; rebased over `nine`, it is the tenth.
        let ours = request(20, Some(&base));
        assert!(!ours.prunes_history());
        assert!(ours.rebased_on(Some(&nine), t(20)).prunes_history());
    }

    #[test]
    fn a_settled_request_keeps_its_final_state_when_replaced() {
        let mut old = request(0, None);
        old.mark_applied(t(5));
        let new = request(10, Some(&old));
        let entry = HistoryEntry::replaced(&old, &new.request_id, t(10));
        assert_eq!(entry.superseded_by, None);
        assert_eq!(entry.status(), ShownStatus::Applied);
        let mut failed = request(20, None);
        failed.mark_failed("unknown device", t(21));
        let entry = HistoryEntry::replaced(&failed, &new.request_id, t(30));
        assert_eq!(entry.status(), ShownStatus::Failed);
        let mut cancelled = request(40, None);
        cancelled.mark_cancelled(t(41));
        let entry = HistoryEntry::replaced(&cancelled, &new.request_id, t(50));
        assert_eq!(entry.status(), ShownStatus::Cancelled);
    }

    #[test]
    fn the_request_the_ledger_holds_is_shown_from_the_ledger_without_its_lease() {
        let mut current = request(0, None);
        current.take_lease(
            &crate::domain::LeaseHolder::new(crate::domain::HolderKind::Http),
            t(0),
            Duration::seconds(30),
        );
        let stale = HistoryEntry {
            request: request(0, None),
            superseded_by: None,
        };
        let shown = lookup(&current.request_id, Some(&current), Some(stale)).unwrap();
        assert_eq!(shown.request.request_id, current.request_id);
        assert_eq!(shown.request.lease, None);
        assert_eq!(shown.status(), ShownStatus::Pending);
    }

    #[test]
    fn settled_and_superseded_entries_are_shown_after_the_ledger_moved_on() {
        let old = request(0, None);
        let new = request(10, Some(&old));
        let superseded = HistoryEntry::replaced(&old, &new.request_id, t(10));
        let shown = lookup(&old.request_id, Some(&new), Some(superseded)).unwrap();
        assert_eq!(shown.status(), ShownStatus::Superseded);
        let mut applied = request(20, None);
        applied.mark_applied(t(21));
        let entry = HistoryEntry::of(&applied);
        assert!(lookup(&applied.request_id, Some(&new), Some(entry)).is_some());
    }

    #[test]
    fn only_entries_beyond_the_newest_twenty_are_pruned_and_never_the_current_one() {
        let ids: Vec<RequestId> = (0..25).map(|_| RequestId::new_random()).collect();
        let entries: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), t(i as i64)))
            .collect();
        let mut pruned = beyond_limit(entries.clone(), &ids[24]);
        pruned.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut oldest: Vec<RequestId> = ids[..5].to_vec();
        oldest.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        assert_eq!(pruned, oldest);
        assert!(beyond_limit(entries[..20].to_vec(), &ids[0]).is_empty());
        let pruned = beyond_limit(entries, &ids[0]);
        assert_eq!(pruned.len(), 4, "the held request is kept even when old");
        assert!(!pruned.contains(&ids[0]));
    }
}
