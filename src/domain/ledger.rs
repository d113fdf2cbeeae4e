//! The ledger: one desired-state record per device, the single source of truth.
//!
//! Service Bus messages are only wake-up calls for a device. Whoever applies a
//! setting reads the record and applies what it says *now*, never the value a
//! message was created for, so an old message can never overwrite a newer setting.
//!
//! Device PUTs are serialised per device by a short lease stored in the record:
//! only the lease holder talks to the device, and before it lets go it checks
//! that what it applied is still the desired value (and applies the newer one if
//! not). Every change is an optimistic-concurrency write (ETag) in the adapter.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

use super::input::{DeviceId, InputError, MinSoc};

/// Identifies one accepted request (UUID v4, simple form).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4().simple().to_string())
    }

    pub fn from_stored(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// A request id the API received (a path segment): 32 lower-case hex digits, the
    /// form [`RequestId::new_random`] makes.
    pub fn parse(raw: &str) -> Result<Self, InputError> {
        if raw.len() == 32 && raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(raw.to_string()))
        } else {
            Err(InputError::new(
                "requestId",
                "must be 32 lower-case hex digits",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Pending,
    Applied,
    Expired,
    Failed,
    /// Cancelled by the customer while pending (`DELETE …/soc/requests/{id}`): it is
    /// never PUT afterwards (`set_soc_http::cancel`).
    Cancelled,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Expired => "expired",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "pending" => Some(Self::Pending),
            "applied" => Some(Self::Applied),
            "expired" => Some(Self::Expired),
            "failed" => Some(Self::Failed),
            "cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// Which kind of invocation holds a lease (the prefix of its [`LeaseHolder`] id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderKind {
    /// `SetSocHttp` (`http-…`).
    Http,
    /// `SocQueueTrigger` (`sb-…`).
    Queue,
    /// `DrainSocTimer` (`sweep-…`).
    Sweep,
    /// `DeviceEventsHttp` (`ev-…`).
    Event,
}

/// Names the one invocation that may talk to a device while its lease lasts.
/// New holders are made only by [`LeaseHolder::new`]: unique per invocation, so two
/// invocations never both believe they hold the same lease.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseHolder(String);

impl LeaseHolder {
    /// A new holder, unique to one invocation of `kind`.
    pub fn new(kind: HolderKind) -> Self {
        let prefix = match kind {
            HolderKind::Http => "http",
            HolderKind::Queue => "sb",
            HolderKind::Sweep => "sweep",
            HolderKind::Event => "ev",
        };
        Self(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()))
    }

    /// A holder as read back from storage.
    pub fn from_stored(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Who may talk to the device right now, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: LeaseHolder,
    pub until: DateTime<Utc>,
}

/// The per-device desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub device_id: DeviceId,
    pub request_id: RequestId,
    pub min_soc: MinSoc,
    pub status: RequestStatus,
    pub requested_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub applied_at: Option<DateTime<Utc>>,
    /// Device apply attempts (PUTs, including those that found the device offline).
    pub attempts: u32,
    pub last_error: Option<String>,
    /// MessageId of the one wake-up message the queue chain expects next.
    /// A delivery carrying another id is a stale or duplicate chain and does not re-schedule.
    pub wake_message_id: Option<String>,
    /// When that message becomes due. Pending past this (plus a grace) means the message was lost.
    pub wake_due_at: Option<DateTime<Utc>>,
    pub lease: Option<Lease>,
    pub updated_at: DateTime<Utc>,
    /// The row key of the due-index entry that covers this record
    /// ([`super::due_index`]): filed by the writer of this version before its write, or
    /// kept from the version it replaced. `None` when settled (nothing to cover), or
    /// for a record written before entries were named.
    pub due_entry: Option<String>,
    /// Requests accepted on this device since its history and key rows were last
    /// pruned ([`super::history::prunes_after`]); 0 for the request whose accepting
    /// write prunes them.
    pub unpruned: u32,
    /// When they were last pruned (`None`: written before this was kept).
    pub pruned_at: Option<DateTime<Utc>>,
    /// The device's transition counter: the [`Notification::seq`](super::notification::Notification::seq)
    /// of the last event written to its outbox (0: none yet). Carried from version to
    /// version, so the events of a device are numbered in the order of its writes.
    pub last_event_seq: u64,
    /// When a status read showed the battery reporting this request's value after it
    /// was applied (`None`: not seen yet; `applied` only means the device cloud answered
    /// 2xx to the PUT).
    pub confirmed_at: Option<DateTime<Utc>>,
    /// Drift: the value the battery reported instead of this applied request's, and
    /// when that was first seen (both `None`: no drift seen). Device-level facts, kept
    /// on the record until a read shows the applied value again or a new request
    /// replaces this one.
    pub reported_min_soc: Option<u8>,
    pub drift_detected_at: Option<DateTime<Utc>>,
}

impl DesiredState {
    /// A freshly accepted request. It supersedes whatever `previous` held, but keeps
    /// the previous lease: a holder mid-PUT must still see that it has to converge.
    pub fn accept(
        device_id: DeviceId,
        min_soc: MinSoc,
        now: DateTime<Utc>,
        ttl: Duration,
        previous: Option<&DesiredState>,
    ) -> Self {
        let (unpruned, pruned_at) = super::history::prunes_after(previous, now);
        Self {
            device_id,
            request_id: RequestId::new_random(),
            min_soc,
            status: RequestStatus::Pending,
            requested_at: now,
            expires_at: now + ttl,
            applied_at: None,
            attempts: 0,
            last_error: None,
            wake_message_id: None,
            wake_due_at: None,
            lease: previous
                .and_then(|p| p.lease.clone())
                .filter(|l| l.until > now),
            updated_at: now,
            due_entry: None,
            unpruned,
            pruned_at,
            last_event_seq: previous.map_or(0, |p| p.last_event_seq),
            confirmed_at: None,
            reported_min_soc: None,
            drift_detected_at: None,
        }
    }

    /// Whether this request's accepting write prunes the device's history and key rows
    /// (the ledger does it right after the write, [`crate::ports::Ledger::accept`]).
    pub fn prunes_history(&self) -> bool {
        self.unpruned == 0
    }

    /// Keeps this request's identity but carries the lease of the record now stored.
    pub fn with_lease_of(mut self, stored: Option<&DesiredState>, now: DateTime<Utc>) -> Self {
        self.lease = stored
            .and_then(|p| p.lease.clone())
            .filter(|l| l.until > now);
        self
    }

    pub fn is_pending(&self) -> bool {
        self.status == RequestStatus::Pending
    }

    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }

    /// Whether `holder` may start talking to the device.
    pub fn lease_free_for(&self, holder: &LeaseHolder, now: DateTime<Utc>) -> bool {
        match &self.lease {
            None => true,
            Some(l) => l.holder == *holder || l.until <= now,
        }
    }

    /// Whether `holder` holds the lease with at least `window` of it left at `now`:
    /// enough for a whole PUT to land before anyone else may take the device over.
    pub fn lease_covers(&self, holder: &LeaseHolder, now: DateTime<Utc>, window: Duration) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.holder == *holder && l.until - now >= window)
    }

    /// Whether anyone (`holder` included) may still be talking to the device under
    /// this record's lease, allowing for `skew` between their clock and `now`.
    pub fn lease_may_be_live(&self, now: DateTime<Utc>, skew: Duration) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.until + skew * 2 > now)
    }

    pub fn take_lease(&mut self, holder: &LeaseHolder, now: DateTime<Utc>, duration: Duration) {
        self.lease = Some(Lease {
            holder: holder.clone(),
            until: now + duration,
        });
        self.updated_at = now;
    }

    pub fn release_lease(&mut self, holder: &LeaseHolder) {
        if self.lease.as_ref().is_some_and(|l| l.holder == *holder) {
            self.lease = None;
        }
    }

    pub fn holds_lease(&self, holder: &LeaseHolder, now: DateTime<Utc>) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.holder == *holder && l.until > now)
    }

    /// Takes (or renews) the lease for `holder` and counts one device attempt: done in
    /// the same write, so every PUT is counted before it is made.
    pub fn record_attempt(&mut self, holder: &LeaseHolder, now: DateTime<Utc>, duration: Duration) {
        self.take_lease(holder, now, duration);
        self.attempts += 1;
    }

    /// This freshly accepted request again, to be written over the record stored now
    /// (after losing a write race): it carries the stored lease and has no attempt yet.
    pub fn rebased_on(mut self, stored: Option<&DesiredState>, now: DateTime<Utc>) -> Self {
        self = self.with_lease_of(stored, now);
        self.attempts = 0;
        let (unpruned, pruned_at) = super::history::prunes_after(stored, now);
        self.unpruned = unpruned;
        self.pruned_at = pruned_at;
        self.last_event_seq = stored.map_or(0, |s| s.last_event_seq);
        self
    }

    /// The device was offline for this attempt; the request stays pending.
    pub fn record_offline(&mut self, now: DateTime<Utc>) {
        self.last_error = Some("device offline".into());
        self.updated_at = now;
    }

    /// The device cloud failed transiently (`reason`); the request stays pending.
    pub fn record_transient(&mut self, reason: impl Into<String>, now: DateTime<Utc>) {
        self.last_error = Some(reason.into());
        self.updated_at = now;
    }

    /// What a status read of the device showed (`reported`: its `minSoc`), for an
    /// applied request: the battery reporting this request's value confirms it (and ends
    /// any drift); another value is drift, recorded the first time it is seen. Returns
    /// whether the record changed, and whether that change is newly seen drift.
    pub fn observe_reported(&mut self, reported: u8, now: DateTime<Utc>) -> (bool, bool) {
        if self.status != RequestStatus::Applied {
            return (false, false);
        }
        if reported == self.min_soc.percent() {
            let changed = self.confirmed_at.is_none() || self.drift_detected_at.is_some();
            self.confirmed_at.get_or_insert(now);
            self.reported_min_soc = None;
            self.drift_detected_at = None;
            return (changed, false);
        }
        if self.reported_min_soc == Some(reported) {
            return (false, false);
        }
        self.reported_min_soc = Some(reported);
        self.drift_detected_at = Some(now);
        (true, true)
    }

    pub fn mark_applied(&mut self, now: DateTime<Utc>) {
        self.status = RequestStatus::Applied;
        self.applied_at = Some(now);
        self.last_error = None;
        self.clear_wake();
        self.updated_at = now;
    }

    pub fn mark_expired(&mut self, now: DateTime<Utc>) {
        self.status = RequestStatus::Expired;
        self.last_error = Some(format!(
            "expired at {} without the device coming online",
            self.expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
        self.clear_wake();
        self.updated_at = now;
    }

    pub fn mark_failed(&mut self, reason: impl Into<String>, now: DateTime<Utc>) {
        self.status = RequestStatus::Failed;
        self.last_error = Some(reason.into());
        self.clear_wake();
        self.updated_at = now;
    }

    /// The customer cancelled this pending request: it ends here, and its wake-up chain
    /// with it. The lease is left as stored (the caller writes this only when no lease
    /// may be live).
    pub fn mark_cancelled(&mut self, now: DateTime<Utc>) {
        self.status = RequestStatus::Cancelled;
        self.clear_wake();
        self.updated_at = now;
    }

    /// Records the wake-up message that is now expected for this request.
    pub fn expect_wake(
        &mut self,
        message_id: impl Into<String>,
        due_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) {
        self.wake_message_id = Some(message_id.into());
        self.wake_due_at = Some(due_at);
        self.updated_at = now;
    }

    fn clear_wake(&mut self) {
        self.wake_message_id = None;
        self.wake_due_at = None;
    }

    /// When this pending record's chain must have acted: when its wake-up message is
    /// due (when it was written, if it has none), or when its last re-check is due,
    /// `last_check` before expiry (that message writes it `expired`), whichever is
    /// first. `None` once it is settled.
    fn chain_due_at(&self, last_check: Duration) -> Option<DateTime<Utc>> {
        self.is_pending()
            .then(|| self.wake_expected_at().min(self.expires_at - last_check))
    }

    /// When the wake-up message is due; when the record was written, if it names none
    /// (a crash between the ledger write and the send).
    fn wake_expected_at(&self) -> DateTime<Utc> {
        self.wake_due_at.unwrap_or(self.updated_at)
    }

    /// When the timer sweep must look at this record (the due index files it there,
    /// [`super::due_index`]): `grace` after its chain should have acted (its wake-up
    /// message lost, dead-lettered or never sent; or its expiry not written by the
    /// chain's last re-check, due `last_check` before expiry). `None` once it is
    /// settled. A live chain, expiry included, never needs the sweep, so a campaign's
    /// requests expiring together cost the sweep nothing (BENCHMARKS "Fleet week").
    pub fn sweep_due_at(&self, grace: Duration, last_check: Duration) -> Option<DateTime<Utc>> {
        self.chain_due_at(last_check).map(|at| at + grace)
    }

    /// A pending request whose wake-up message should have arrived by now (plus `grace`)
    /// but the record shows no delivery: the message is lost (or was never sent). From
    /// the same instant as [`DesiredState::sweep_due_at`] lists it (its message due
    /// before its last useful moment), so the sweep never looks without acting.
    pub fn wake_overdue(&self, now: DateTime<Utc>, grace: Duration) -> bool {
        self.is_pending() && now >= self.wake_expected_at() + grace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn holder(id: &str) -> LeaseHolder {
        LeaseHolder::from_stored(id)
    }

    #[test]
    fn new_lease_holders_are_unique_and_name_their_kind() {
        let a = LeaseHolder::new(HolderKind::Http);
        let b = LeaseHolder::new(HolderKind::Http);
        assert_ne!(a, b);
        assert!(a.as_str().starts_with("http-"));
        assert!(LeaseHolder::new(HolderKind::Queue)
            .as_str()
            .starts_with("sb-"));
        assert!(LeaseHolder::new(HolderKind::Sweep)
            .as_str()
            .starts_with("sweep-"));
        assert!(LeaseHolder::new(HolderKind::Event)
            .as_str()
            .starts_with("ev-"));
    }

    #[test]
    fn a_new_request_carries_the_stored_lease_only_while_it_is_live() {
        let mut stored = DesiredState::accept(
            device(),
            MinSoc::new(30).unwrap(),
            t(0),
            Duration::days(7),
            None,
        );
        stored.record_attempt(&holder("h"), t(1), Duration::seconds(30));
        let next = |now| {
            DesiredState::accept(
                device(),
                MinSoc::new(40).unwrap(),
                now,
                Duration::days(7),
                Some(&stored),
            )
            .lease
        };
        assert_eq!(next(t(30)).map(|l| l.until), Some(t(31)));
        // A lease is free from the instant it ends (`lease_free_for`): not carried then.
        assert_eq!(next(t(31)), None);
        assert_eq!(
            stored.clone().with_lease_of(Some(&stored), t(31)).lease,
            None
        );
        assert!(stored
            .clone()
            .with_lease_of(Some(&stored), t(30))
            .lease
            .is_some());
        // Held until the instant it ends, and only by its holder.
        assert!(stored.holds_lease(&holder("h"), t(30)));
        assert!(!stored.holds_lease(&holder("h"), t(31)));
        assert!(!stored.holds_lease(&holder("other"), t(30)));
    }

    #[test]
    fn an_attempt_takes_the_lease_and_counts_and_a_rebase_forgets_it() {
        let mut r = DesiredState::accept(
            device(),
            MinSoc::new(30).unwrap(),
            t(0),
            Duration::days(7),
            None,
        );
        r.record_attempt(&holder("h"), t(1), Duration::seconds(30));
        assert_eq!(r.attempts, 1);
        assert!(r.holds_lease(&holder("h"), t(2)));
        r.record_offline(t(3));
        assert_eq!(
            (r.last_error.as_deref(), r.updated_at),
            (Some("device offline"), t(3))
        );
        r.record_transient("HTTP 503", t(4));
        assert_eq!(
            (r.last_error.as_deref(), r.updated_at),
            (Some("HTTP 503"), t(4))
        );
        assert!(r.is_pending());
        let rebased = r.rebased_on(None, t(5));
        assert_eq!(rebased.attempts, 0);
        assert!(rebased.lease.is_none());
    }

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn device() -> DeviceId {
        DeviceId::parse("bat-1").unwrap()
    }

    fn pending(at: i64) -> DesiredState {
        DesiredState::accept(
            device(),
            MinSoc::new(30).unwrap(),
            t(at),
            Duration::seconds(100),
            None,
        )
    }

    #[test]
    fn a_new_request_keeps_a_live_lease_so_the_holder_converges() {
        let mut old = pending(0);
        old.take_lease(&holder("holder-a"), t(1), Duration::seconds(30));
        let new = DesiredState::accept(
            device(),
            MinSoc::new(60).unwrap(),
            t(2),
            Duration::seconds(100),
            Some(&old),
        );
        assert_ne!(new.request_id, old.request_id);
        assert_eq!(new.lease.as_ref().unwrap().holder, holder("holder-a"));
        assert!(!new.lease_free_for(&holder("holder-b"), t(3)));
        assert!(new.lease_free_for(&holder("holder-a"), t(3)));
    }

    #[test]
    fn a_lease_covers_a_put_only_with_the_whole_window_left() {
        let mut r = pending(0);
        r.take_lease(&holder("holder-a"), t(0), Duration::seconds(30));
        assert!(r.lease_covers(&holder("holder-a"), t(10), Duration::seconds(20)));
        assert!(!r.lease_covers(&holder("holder-a"), t(11), Duration::seconds(20)));
        assert!(!r.lease_covers(&holder("holder-b"), t(0), Duration::seconds(1)));
    }

    #[test]
    fn a_lapsed_lease_may_still_be_live_within_the_clock_skew() {
        let mut r = pending(0);
        assert!(!r.lease_may_be_live(t(0), Duration::seconds(2)));
        r.take_lease(&holder("holder-a"), t(0), Duration::seconds(30));
        assert!(r.lease_may_be_live(t(33), Duration::seconds(2)));
        assert!(!r.lease_may_be_live(t(34), Duration::seconds(2)));
    }

    #[test]
    fn an_expired_lease_is_dropped_and_free_for_anyone() {
        let mut old = pending(0);
        old.take_lease(&holder("holder-a"), t(0), Duration::seconds(5));
        assert!(old.lease_free_for(&holder("holder-b"), t(5)));
        let new = DesiredState::accept(
            device(),
            MinSoc::new(60).unwrap(),
            t(6),
            Duration::seconds(100),
            Some(&old),
        );
        assert!(new.lease.is_none());
    }

    #[test]
    fn expiry_is_reached_exactly_at_the_ttl() {
        let r = pending(0);
        assert!(!r.is_expired_at(t(99)));
        assert!(r.is_expired_at(t(100)));
    }

    #[test]
    fn final_states_clear_the_expected_wake_message() {
        let mut r = pending(0);
        r.expect_wake("m1", t(60), t(0));
        r.mark_applied(t(10));
        assert_eq!(r.status, RequestStatus::Applied);
        assert!(r.wake_message_id.is_none());
        assert!(!r.wake_overdue(t(1000), Duration::seconds(1)));
        let mut c = pending(0);
        c.expect_wake("m1", t(60), t(0));
        c.mark_cancelled(t(10));
        assert_eq!(c.status, RequestStatus::Cancelled);
        assert!(c.wake_message_id.is_none());
        assert_eq!(
            c.sweep_due_at(Duration::seconds(1), Duration::seconds(1)),
            None
        );
    }

    #[test]
    fn a_wake_message_is_overdue_from_its_due_time_plus_grace() {
        let mut r = pending(0);
        r.expect_wake("m1", t(60), t(0));
        assert!(!r.wake_overdue(t(89), Duration::seconds(30)));
        // From the instant the sweep lists it (`sweep_due_at`): a look always acts.
        assert!(r.wake_overdue(t(90), Duration::seconds(30)));
        assert_eq!(
            r.sweep_due_at(Duration::seconds(30), Duration::seconds(1)),
            Some(t(90))
        );
    }

    #[test]
    fn the_sweep_is_due_a_grace_after_the_wake_up_or_the_last_re_check() {
        // Accepted at 0, expires at 100 (`pending`); grace 30, the last re-check 20
        // before expiry, at 80.
        let (grace, lease) = (Duration::seconds(30), Duration::seconds(20));
        let mut r = pending(0);
        r.expect_wake("m1", t(10), t(0));
        assert_eq!(r.sweep_due_at(grace, lease), Some(t(40)));
        // The chain's last message is due at 80 and expires the request: the sweep
        // looks a grace later, only if it did not.
        r.expect_wake("m2", t(80), t(0));
        assert_eq!(r.sweep_due_at(grace, lease), Some(t(110)));
        // A message due past it (a fan-out slot): the expiry is still the chain's deadline.
        r.expect_wake("m3", t(95), t(0));
        assert_eq!(r.sweep_due_at(grace, lease), Some(t(110)));
    }

    #[test]
    fn a_request_that_never_got_a_message_is_overdue_after_grace() {
        let r = pending(0);
        assert!(!r.wake_overdue(t(20), Duration::seconds(30)));
        assert!(!r.wake_overdue(t(29), Duration::seconds(30)));
        assert!(r.wake_overdue(t(30), Duration::seconds(30)));
    }

    #[test]
    fn status_round_trips_through_its_wire_name() {
        for s in [
            RequestStatus::Pending,
            RequestStatus::Applied,
            RequestStatus::Expired,
            RequestStatus::Failed,
            RequestStatus::Cancelled,
        ] {
            assert_eq!(RequestStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(RequestStatus::parse("done"), None);
    }

    #[test]
    fn request_ids_from_the_api_are_what_new_random_makes_and_nothing_else() {
        let fresh = RequestId::new_random();
        assert_eq!(RequestId::parse(fresh.as_str()), Ok(fresh));
        for bad in [
            "",
            "abc",
            &"A".repeat(32),
            &"g".repeat(32),
            &"a".repeat(33),
            "../x",
        ] {
            assert_eq!(
                RequestId::parse(bad).unwrap_err().field,
                "requestId",
                "{bad}"
            );
        }
    }
}
