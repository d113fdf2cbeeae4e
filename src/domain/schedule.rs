//! Re-check back-off and message time-to-live arithmetic.

use chrono::{DateTime, Duration, Utc};

/// The re-check policy for a device that is offline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before re-check number `checks_done + 1`: initial, 2x, 4x, ... capped at `max`.
    pub fn delay(&self, checks_done: u32) -> Duration {
        let factor = 1i64.checked_shl(checks_done.min(30)).unwrap_or(i64::MAX);
        let initial = self.initial.num_milliseconds().max(1);
        let ms = initial
            .saturating_mul(factor)
            .min(self.max.num_milliseconds().max(initial));
        Duration::milliseconds(ms)
    }

    /// When to look at the device next: after the back-off delay, and at `last` at the
    /// latest (the request's last useful moment, where the chain's final re-check finds
    /// it expiring). `None` when `last` has come: the chain has nothing left to do.
    pub fn next_recheck(
        &self,
        checks_done: u32,
        now: DateTime<Utc>,
        last: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let at = (now + self.delay(checks_done)).min(last);
        (at > now).then_some(at)
    }
}

/// TTL for a message sent now for a request that expires at `expires_at`.
pub fn ttl_until(now: DateTime<Utc>, expires_at: DateTime<Utc>) -> Option<Duration> {
    let ttl = expires_at - now;
    (ttl > Duration::zero()).then_some(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    const POLICY: Backoff = Backoff {
        initial: Duration::seconds(60),
        max: Duration::seconds(1800),
    };

    #[test]
    fn delay_doubles_from_initial_and_stops_at_max() {
        let secs: Vec<i64> = (0..8).map(|n| POLICY.delay(n).num_seconds()).collect();
        assert_eq!(secs, [60, 120, 240, 480, 960, 1800, 1800, 1800]);
        assert_eq!(POLICY.delay(10_000).num_seconds(), 1800);
    }

    #[test]
    fn the_last_recheck_falls_on_the_last_useful_moment() {
        assert_eq!(POLICY.next_recheck(5, t(0), t(100)), Some(t(100)));
        assert_eq!(POLICY.next_recheck(0, t(0), t(10_000)), Some(t(60)));
        assert_eq!(POLICY.next_recheck(0, t(99), t(100)), Some(t(100)));
    }

    #[test]
    fn no_recheck_once_the_last_useful_moment_has_come() {
        assert_eq!(POLICY.next_recheck(0, t(100), t(100)), None);
        assert_eq!(POLICY.next_recheck(0, t(200), t(100)), None);
    }

    #[test]
    fn ttl_is_the_remaining_lifetime() {
        assert_eq!(ttl_until(t(0), t(30)), Some(Duration::seconds(30)));
        assert_eq!(ttl_until(t(30), t(30)), None);
    }
}
