//! The timer sweep's own record: who is sweeping now, and how far the reconciling
//! pass has got. One row, written with ETags like every ledger record.
//!
//! The lease keeps two sweeps from doing the same work: the host runs one timer
//! invocation at a time, but a run that outlives its schedule, a restarted instance or
//! a manual `POST /admin/functions/DrainSocTimer` may overlap another. A run that
//! finds a live lease held by someone else does nothing.

use chrono::{DateTime, Duration, Utc};

use super::input::DeviceId;
use super::ledger::LeaseHolder;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SweepState {
    /// The run sweeping now, and until when at the latest.
    pub holder: Option<LeaseHolder>,
    pub until: Option<DateTime<Utc>>,
    /// The reconciling pass in progress has filed every pending record up to and
    /// including this device; `None`: the next pass starts from the first device.
    pub reconcile_after: Option<DeviceId>,
    /// When the pass in progress started (`None`: no pass in progress).
    pub reconcile_started_at: Option<DateTime<Utc>>,
    /// When the last complete pass started (the next one starts an interval later).
    pub reconciled_at: Option<DateTime<Utc>>,
}

impl SweepState {
    /// Whether a run other than `holder` may be sweeping at `now`.
    pub fn held_by_other(&self, holder: &LeaseHolder, now: DateTime<Utc>) -> bool {
        match (&self.holder, self.until) {
            (Some(h), Some(until)) => h != holder && until > now,
            _ => false,
        }
    }

    pub fn take(&mut self, holder: &LeaseHolder, now: DateTime<Utc>, duration: Duration) {
        self.holder = Some(holder.clone());
        self.until = Some(now + duration);
    }

    pub fn release(&mut self, holder: &LeaseHolder) {
        if self.holder.as_ref() == Some(holder) {
            self.holder = None;
            self.until = None;
        }
    }

    /// Whether the reconciling pass has work to do at `now`: one is in progress, or
    /// the last one started at least `interval` ago (or never ran).
    pub fn reconcile_due(&self, now: DateTime<Utc>, interval: Duration) -> bool {
        self.reconcile_started_at.is_some()
            || self.reconciled_at.is_none_or(|at| at + interval <= now)
    }

    /// Records one slice of the pass: it filed every pending record up to `last`;
    /// `done` when the listing ended.
    pub fn reconciled_slice(&mut self, last: Option<DeviceId>, done: bool, now: DateTime<Utc>) {
        let started = *self.reconcile_started_at.get_or_insert(now);
        if done {
            self.reconcile_after = None;
            self.reconcile_started_at = None;
            self.reconciled_at = Some(started);
        } else if last.is_some() {
            self.reconcile_after = last;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_live_lease_of_another_run_keeps_this_run_out_until_it_lapses() {
        let (a, b) = (
            LeaseHolder::from_stored("sweep-a"),
            LeaseHolder::from_stored("sweep-b"),
        );
        let mut s = SweepState::default();
        assert!(!s.held_by_other(&b, t(0)));
        s.take(&a, t(0), Duration::seconds(60));
        assert!(s.held_by_other(&b, t(59)));
        assert!(!s.held_by_other(&a, t(10)));
        assert!(!s.held_by_other(&b, t(60)));
        s.release(&b);
        assert!(s.held_by_other(&b, t(1)), "only the holder releases");
        s.release(&a);
        assert!(!s.held_by_other(&b, t(1)));
    }

    #[test]
    fn a_pass_resumes_after_its_last_device_and_the_next_waits_an_interval() {
        let day = Duration::days(1);
        let mut s = SweepState::default();
        assert!(s.reconcile_due(t(0), day), "never ran");
        let d = DeviceId::parse("bat-7").unwrap();
        s.reconciled_slice(Some(d.clone()), false, t(0));
        assert_eq!(s.reconcile_after, Some(d));
        assert!(s.reconcile_due(t(1), day), "in progress");
        s.reconciled_slice(None, true, t(300));
        assert_eq!(s.reconcile_after, None);
        assert_eq!(s.reconciled_at, Some(t(0)), "counted from the pass's start");
        assert!(!s.reconcile_due(t(3600), day));
        assert!(s.reconcile_due(t(0) + day, day));
    }
}
