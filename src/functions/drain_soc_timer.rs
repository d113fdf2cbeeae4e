//! `DrainSocTimer`: the sweep that keeps nothing pending forever.
//!
//! For every pending request (one per device, the ledger holds only the latest):
//! - past expiry: mark it expired;
//! - otherwise one status call to the device cloud (never more per device per run,
//!   at most `DRAIN_SOC_CONCURRENCY` at once);
//! - online: apply now instead of waiting for the back-off;
//! - offline, or status unavailable, with its wake-up message overdue (lost,
//!   dead-lettered, or never sent): re-send it;
//! - unknown device: fail the request with the reason.
//!
//! A row that does not read as a record ([`CorruptRow`]) is skipped, counted in
//! `corrupt` and logged with its device id, row key and reason; it never fails its
//! page or the sweep. The sweep fails only when the ledger cannot be listed at all.

use futures::stream::{self, StreamExt};
use tracing::{info, warn};

use crate::domain::{DesiredState, HolderKind, LeaseHolder};
use crate::ports::{CorruptRow, DeviceError, StoreError, Versioned};

use super::apply::{apply_latest, ApplyOutcome};
use super::wake::{self, Rescheduled};
use super::Services;

/// Counts of what one sweep did (logged, and returned to the host in `Logs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub pending: usize,
    pub applied: usize,
    pub expired: usize,
    pub failed: usize,
    pub resent: usize,
    pub still_offline: usize,
    pub busy: usize,
    pub errors: usize,
    /// Pending rows that could not be read (not counted in `pending`).
    pub corrupt: usize,
}

impl std::fmt::Display for SweepReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pending={} applied={} expired={} failed={} resent={} still_offline={} busy={} errors={} corrupt={}",
            self.pending, self.applied, self.expired, self.failed, self.resent, self.still_offline, self.busy, self.errors, self.corrupt
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Applied,
    Expired,
    Failed,
    Resent,
    StillOffline,
    Busy,
    Error,
    /// The row did not read; skipped.
    Corrupt,
}

/// One row of the pending listing.
enum Listed {
    Record(Versioned<DesiredState>),
    Corrupt(CorruptRow),
}

/// Runs one sweep. Device calls start as soon as the first page of pending
/// requests is read. Fails only when the ledger cannot be listed at all.
pub async fn run(svc: &Services) -> Result<SweepReport, StoreError> {
    let rows = svc.ledger.pending_pages().flat_map(|page| match page {
        Ok(page) => {
            let records = page.records.into_iter().map(Listed::Record);
            let corrupt = page.corrupt.into_iter().map(Listed::Corrupt);
            stream::iter(records.chain(corrupt).map(Ok).collect::<Vec<_>>())
        }
        Err(e) => stream::iter(vec![Err(e)]),
    });
    let mut outcomes = rows
        .map(|row| async move {
            match row? {
                Listed::Record(record) => Ok(sweep_one(svc, record).await),
                Listed::Corrupt(row) => {
                    warn!(
                        device = %row.partition_key,
                        row = %row.row_key,
                        reason = %row.reason,
                        "sweep skipped an unreadable ledger row"
                    );
                    Ok(Step::Corrupt)
                }
            }
        })
        .buffer_unordered(svc.policy.drain_concurrency);
    let mut report = SweepReport::default();
    let mut listed_any = false;
    let mut page_error = None;
    // Every outcome is awaited, errors included: returning early would drop applies
    // that are mid-PUT (lease left behind, attempt counted).
    while let Some(outcome) = outcomes.next().await {
        let step = match outcome {
            Ok(step) => step,
            Err(e) if cfg!(feature = "mutant-sweep-aborts-on-page-error") && !listed_any => {
                return Err(e)
            }
            Err(e) => {
                warn!(error = %e, "sweep could not read a page of pending requests");
                report.errors += 1;
                page_error.get_or_insert(e);
                continue;
            }
        };
        listed_any = true;
        if step != Step::Corrupt {
            report.pending += 1;
        }
        let count = match step {
            Step::Applied => &mut report.applied,
            Step::Expired => &mut report.expired,
            Step::Failed => &mut report.failed,
            Step::Resent => &mut report.resent,
            Step::StillOffline => &mut report.still_offline,
            Step::Busy => &mut report.busy,
            Step::Error => &mut report.errors,
            Step::Corrupt => &mut report.corrupt,
        };
        *count += 1;
    }
    // Nothing read at all: the sweep failed.
    if let (false, Some(e)) = (listed_any, page_error) {
        return Err(e);
    }
    info!(%report, "sweep done");
    Ok(report)
}

async fn sweep_one(svc: &Services, current: Versioned<DesiredState>) -> Step {
    let device = current.value.device_id.clone();
    let now = svc.clock.now();
    let holder = LeaseHolder::new(HolderKind::Sweep);
    if current.value.is_expired_at(now) {
        // apply_latest marks an expired record without calling the device.
        return match apply_latest(svc, &device, &holder, Some(current)).await {
            Ok(a) => step_of(&a.outcome),
            Err(e) => log_error(&device, &e.to_string()),
        };
    }
    if !current.value.lease_free_for(&holder, now) {
        return Step::Busy;
    }
    let status = svc.device.status(&device).await;
    let current = match status {
        Ok(s) if s.online => match apply_latest(svc, &device, &holder, Some(current)).await {
            Ok(a) => match a.outcome {
                ApplyOutcome::Offline(v) | ApplyOutcome::Transient(v, _) => v,
                other => return step_of(&other),
            },
            Err(e) => return log_error(&device, &e.to_string()),
        },
        Err(DeviceError::UnknownDevice) => {
            let mut failed = current.value.clone();
            failed.mark_failed(DeviceError::UnknownDevice.to_string(), now);
            return match svc.ledger.put(&failed, Some(&current.etag)).await {
                Ok(_) => Step::Failed,
                // Changed meanwhile; the next run looks again.
                Err(StoreError::Conflict) => Step::Busy,
                Err(e) => log_error(&device, &e.to_string()),
            };
        }
        Ok(_) | Err(_) => current,
    };
    if !current
        .value
        .wake_overdue(svc.clock.now(), svc.policy.wake_grace)
    {
        return Step::StillOffline;
    }
    let lost = current.value.wake_message_id.clone();
    match wake::schedule_recheck(svc, current, lost.as_deref(), None).await {
        Ok(Rescheduled::Scheduled { message_id, .. }) => {
            info!(device = %device, lost = ?lost, message_id = %message_id, "overdue wake-up message re-sent");
            Step::Resent
        }
        Ok(Rescheduled::NoTimeLeft) | Ok(Rescheduled::Superseded) => Step::StillOffline,
        Err(e) => log_error(&device, &e.to_string()),
    }
}

fn step_of(outcome: &ApplyOutcome) -> Step {
    match outcome {
        ApplyOutcome::Applied(_) => Step::Applied,
        ApplyOutcome::Expired(_) => Step::Expired,
        ApplyOutcome::Failed(..) => Step::Failed,
        ApplyOutcome::Busy(_) => Step::Busy,
        ApplyOutcome::AlreadyFinal(_) | ApplyOutcome::NoRecord => Step::Busy,
        ApplyOutcome::Offline(_) | ApplyOutcome::Transient(..) => Step::StillOffline,
    }
}

fn log_error(device: &crate::domain::DeviceId, error: &str) -> Step {
    warn!(device = %device, error, "sweep could not handle device");
    Step::Error
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestStatus;
    use crate::functions::fakes::{post_min_soc as post, Harness};

    #[tokio::test]
    async fn devices_back_online_are_applied_without_waiting_for_their_backoff() {
        let h = Harness::new();
        for d in ["a", "b", "c"] {
            h.device.set_online(d, false);
            post(&h, d, 50).await;
        }
        h.device.set_online("a", true);
        h.device.set_online("c", true);
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (report.pending, report.applied, report.still_offline),
            (3, 2, 1),
            "{report}"
        );
        assert_eq!(h.ledger_record("a").await.status, RequestStatus::Applied);
        assert_eq!(h.ledger_record("b").await.status, RequestStatus::Pending);
    }

    #[tokio::test]
    async fn each_device_gets_at_most_one_status_call_per_run() {
        let h = Harness::new();
        for d in ["a", "b", "c", "d"] {
            h.device.set_online(d, false);
            post(&h, d, 50).await;
        }
        let (status_before, _) = h.device.calls();
        run(&h.svc).await.unwrap();
        let (status_after, _) = h.device.calls();
        assert_eq!(status_after - status_before, 4);
    }

    #[tokio::test]
    async fn requests_past_expiry_are_marked_expired_without_a_device_call() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.clock
            .advance(h.svc.policy.request_ttl + chrono::Duration::seconds(1));
        h.device.set_online("a", true);
        let calls = h.device.calls();
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.expired, 1);
        assert_eq!(h.device.calls(), calls);
        let rec = h.ledger_record("a").await;
        assert_eq!(rec.status, RequestStatus::Expired);
        assert!(rec.last_error.unwrap().contains("expired"));
    }

    #[tokio::test]
    async fn a_lost_wake_message_is_resent_once_overdue() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        assert_eq!(run(&h.svc).await.unwrap().resent, 0, "not overdue yet");
        // The message was due after 60 s; grace is 60 s.
        h.clock.advance(chrono::Duration::seconds(121));
        let report = run(&h.svc).await.unwrap();
        assert_eq!(report.resent, 1, "{report}");
        let sent = h.queue.sent();
        assert_eq!(sent.len(), 2);
        assert_eq!(
            h.ledger_record("a").await.wake_message_id.as_deref(),
            Some(sent[1].message_id.as_str())
        );
        assert_eq!(
            run(&h.svc).await.unwrap().resent,
            0,
            "the new message is not overdue"
        );
    }

    #[tokio::test]
    async fn an_unknown_device_fails_its_pending_request() {
        let h = Harness::new();
        h.device.set_online("a", false);
        post(&h, "a", 50).await;
        h.device.forget("a");
        assert_eq!(run(&h.svc).await.unwrap().failed, 1);
        assert_eq!(h.ledger_record("a").await.status, RequestStatus::Failed);
    }

    #[tokio::test]
    async fn an_unreadable_row_is_skipped_and_counted_while_the_others_are_swept() {
        let h = Harness::new();
        for d in ["a", "b", "c"] {
            h.device.set_online(d, false);
            post(&h, d, 50).await;
        }
        h.ledger.corrupt("b", "MinSoc is out of range");
        h.device.set_online("a", true);
        h.device.set_online("c", true);
        let report = run(&h.svc).await.unwrap();
        assert_eq!(
            (
                report.pending,
                report.applied,
                report.corrupt,
                report.errors
            ),
            (2, 2, 1, 0),
            "{report}"
        );
        assert!(report.to_string().contains("corrupt=1"), "{report}");
        assert_eq!(h.ledger_record("a").await.status, RequestStatus::Applied);
    }

    #[tokio::test]
    async fn a_ledger_outage_fails_the_sweep() {
        let h = Harness::new();
        h.ledger.set_down(true);
        assert!(run(&h.svc).await.is_err());
    }
}
