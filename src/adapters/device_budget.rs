//! The device-call budget: a per-instance token bucket around every call this
//! process makes to the vendor's device cloud (README "Device-call budget").
//!
//! The vendor allows so many calls per second for the whole fleet
//! (`DEVICE_API_MAX_CALLS_PER_SECOND`). Each instance gets an equal share, the
//! ceiling divided by the most instances that may run (`DEVICE_API_INSTANCES`,
//! the Flex `maximumInstanceCount`), so the instances stay under the ceiling
//! together without talking to each other. [`BudgetedDeviceApi`] wraps the HTTP
//! client and enforces the share:
//!
//! - **Rate and burst.** Tokens refill at the share's rate, up to one second's
//!   worth (at least one token): a quiet instance may make that many calls at
//!   once, then one per `1/rate`. Waiters queue in arrival order (a fair async
//!   mutex held while a waiter sleeps for its token; no busy loop).
//! - **Bounded wait.** A call that gets no turn within [`MAX_WAIT`] fails as a
//!   transient error that sent nothing (`unanswered: false`): the queue path
//!   redelivers, the sweep counts it, a POST answers `202`. [`MAX_WAIT`] is far
//!   below the host's `functionTimeout` and the queue's lock renewal.
//! - **Retry-After.** When any call comes back transient with a `Retry-After`
//!   (a `429`, or a `503` that names one), the whole bucket pauses until then,
//!   for every caller of this process, and restarts empty. A pause is capped at
//!   [`MAX_PAUSE`] (a bogus header must not stop an instance for hours); the next
//!   `429` pauses again. The pause is logged once when it starts
//!   (`device API throttled: pausing ...`), which is what on-call searches for.
//!
//! **Where the wait happens, and the lease.** A PUT must start with at least the
//! lease's PUT window left (`functions::apply`). Waiting for a token between the
//! lease write and the PUT would eat that window (and the margin that covers
//! process pauses). So a PUT's turn is taken *before* the lease:
//! [`DeviceApi::reserve_put`] waits for and takes a token, `apply` calls it
//! before its lease write, and [`DeviceApi::apply_min_soc`] itself never waits:
//! it only refuses at once (transient, nothing sent) if a `Retry-After` pause
//! began since the reservation. A status call has no lease to protect and waits
//! inside [`DeviceApi::status`]. A reservation that ends up not PUTting (the
//! lease write lost a race) is a token spent for nothing: the budget errs on the
//! side of fewer calls, never more.

use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tracing::warn;

use crate::domain::{DeviceId, MinSoc, RequestId};
use crate::ports::{DeviceApi, DeviceError, DeviceStatus};

/// Longest a call waits for its turn before it gives up (transient, nothing sent).
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Longest pause one `Retry-After` imposes.
pub const MAX_PAUSE: Duration = Duration::from_secs(60);

/// A [`DeviceApi`] that makes at most `rate` calls per second (module docs).
pub struct BudgetedDeviceApi<D> {
    inner: D,
    rate: f64,
    burst: f64,
    max_wait: Duration,
    /// The tokens; held by the waiter at the head of the queue while it sleeps.
    bucket: tokio::sync::Mutex<Tokens>,
    /// End of the current `Retry-After` pause, if any.
    paused_until: std::sync::Mutex<Option<Instant>>,
}

struct Tokens {
    available: f64,
    /// When `available` was last brought up to date (may be in the future: the end
    /// of a pause, from which the bucket refills).
    at: Instant,
}

impl<D: DeviceApi> BudgetedDeviceApi<D> {
    /// `rate`: calls per second this instance may make (> 0); the burst is one
    /// second's worth, at least one call. The bucket starts full.
    pub fn new(inner: D, rate: f64) -> Self {
        let rate = if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            1.0
        };
        let burst = rate.max(1.0).floor();
        Self {
            inner,
            rate,
            burst,
            max_wait: MAX_WAIT,
            bucket: tokio::sync::Mutex::new(Tokens {
                available: burst,
                at: Instant::now(),
            }),
            paused_until: std::sync::Mutex::new(None),
        }
    }

    /// The calls per second this budget allows.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Calls that may go out at once after a quiet period.
    pub fn burst(&self) -> u32 {
        self.burst as u32
    }

    fn pause_end(&self, now: Instant) -> Option<Instant> {
        let paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        paused.filter(|until| *until > now)
    }

    /// Pauses every call of this process until `now + wait` (never shortens a pause).
    fn pause(&self, wait: Duration) {
        let wait = wait.min(MAX_PAUSE);
        let now = Instant::now();
        let until = now + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        let current = paused.filter(|u| *u > now);
        if current.is_some_and(|c| c >= until) {
            return;
        }
        *paused = Some(until);
        // Once per pause, and again only when the vendor pushes its end out by a second or more.
        if current.map_or(true, |c| until - c >= Duration::from_secs(1)) {
            warn!(
                pause_ms = wait.as_millis() as u64,
                rate = self.rate,
                "device API throttled: pausing all device calls of this instance for {:.1} s (Retry-After)",
                wait.as_secs_f64()
            );
        }
    }

    /// Waits for a token and takes it, or gives up at [`MAX_WAIT`].
    async fn acquire(&self, what: &str) -> Result<(), DeviceError> {
        let deadline = Instant::now() + self.max_wait;
        let outcome = match tokio::time::timeout_at(deadline, self.bucket.lock()).await {
            Ok(mut tokens) => self.take(&mut tokens, deadline).await,
            Err(_) => Err(None),
        };
        outcome.map_err(|retry_after| {
            warn!(
                rate = self.rate,
                "device-call budget: {what} got no turn within {} s",
                self.max_wait.as_secs()
            );
            DeviceError::Transient {
                reason: format!(
                    "{what}: not sent, the device-call budget ({:.2} calls/s on this instance) had no turn within {} s",
                    self.rate,
                    self.max_wait.as_secs()
                ),
                retry_after,
                unanswered: false,
            }
        })
    }

    /// Takes a token, sleeping (holding the queue) until one is there. `Err` when it
    /// cannot be had by `deadline`, with how long until the pause ends if that is why.
    async fn take(&self, tokens: &mut Tokens, deadline: Instant) -> Result<(), Option<Duration>> {
        loop {
            let now = Instant::now();
            if let Some(until) = self.pause_end(now) {
                // The bucket restarts empty when the pause ends.
                tokens.available = 0.0;
                tokens.at = until;
                if until + self.token_time(1.0) > deadline {
                    return Err(Some(until - now));
                }
                tokio::time::sleep_until(until).await;
                continue;
            }
            if now > tokens.at {
                let refill = (now - tokens.at).as_secs_f64() * self.rate;
                tokens.available = (tokens.available + refill).min(self.burst);
                tokens.at = now;
            }
            // Float rounding must not leave a waiter short of a token by a hair forever.
            if tokens.available >= 1.0 - 1e-9 {
                tokens.available = (tokens.available - 1.0).max(0.0);
                return Ok(());
            }
            let ready = tokens.at.max(now) + self.token_time(1.0 - tokens.available);
            if ready > deadline {
                return Err(None);
            }
            tokio::time::sleep_until(ready).await;
        }
    }

    /// How long the bucket takes to refill `tokens`, at least a millisecond (the timer's grain).
    fn token_time(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(tokens.max(0.0) / self.rate).max(Duration::from_millis(1))
    }

    /// Pauses the bucket if the device cloud asked us to wait.
    fn observe<T>(&self, result: &Result<T, DeviceError>) {
        if let Err(DeviceError::Transient {
            retry_after: Some(wait),
            ..
        }) = result
        {
            self.pause(*wait);
        }
    }
}

#[async_trait]
impl<D: DeviceApi> DeviceApi for BudgetedDeviceApi<D> {
    async fn reserve_put(&self) -> Result<(), DeviceError> {
        self.acquire("PUT min-soc").await
    }

    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        self.acquire("GET device status").await?;
        let result = self.inner.status(device).await;
        self.observe(&result);
        result
    }

    async fn status_if_free(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        let free = match self.bucket.try_lock() {
            Ok(mut tokens) => self.take(&mut tokens, Instant::now()).await.is_ok(),
            Err(_) => false,
        };
        if !free {
            return Err(DeviceError::not_sent(
                "GET device status: not sent, the device-call budget has no turn free now",
            ));
        }
        let result = self.inner.status_if_free(device).await;
        self.observe(&result);
        result
    }

    /// Never waits (its turn was taken by [`DeviceApi::reserve_put`] before the lease);
    /// refuses without sending while a `Retry-After` pause lasts.
    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        let now = Instant::now();
        if let Some(until) = self.pause_end(now) {
            return Err(DeviceError::Transient {
                reason: "PUT min-soc: not sent, the device cloud asked us to wait (Retry-After)"
                    .into(),
                retry_after: Some(until - now),
                unanswered: false,
            });
        }
        let result = self.inner.apply_min_soc(device, min_soc, request_id).await;
        self.observe(&result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    /// Records when each call reached it; answers from a script, else online.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<Instant>>>,
        /// `Retry-After` seconds to answer the n-th call (0-based) with a 429.
        throttle: Arc<Mutex<Vec<(usize, u64)>>>,
        seen: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn answer(&self) -> Result<(), DeviceError> {
            let n = self.seen.fetch_add(1, Ordering::SeqCst);
            self.calls.lock().unwrap().push(Instant::now());
            match self.throttle.lock().unwrap().iter().find(|(i, _)| *i == n) {
                Some((_, secs)) => Err(DeviceError::Transient {
                    reason: "GET device status: throttled (HTTP 429)".into(),
                    retry_after: Some(Duration::from_secs(*secs)),
                    unanswered: false,
                }),
                None => Ok(()),
            }
        }
        fn times(&self) -> Vec<Instant> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl DeviceApi for Recorder {
        async fn status(&self, _: &DeviceId) -> Result<DeviceStatus, DeviceError> {
            self.answer().map(|()| DeviceStatus {
                online: true,
                min_soc: None,
            })
        }
        async fn apply_min_soc(
            &self,
            _: &DeviceId,
            _: MinSoc,
            _: &RequestId,
        ) -> Result<(), DeviceError> {
            self.answer()
        }
    }

    fn dev() -> DeviceId {
        DeviceId::parse("bat-1").unwrap()
    }

    fn budget(rate: f64) -> (Arc<BudgetedDeviceApi<Recorder>>, Recorder) {
        let rec = Recorder::default();
        (Arc::new(BudgetedDeviceApi::new(rec.clone(), rate)), rec)
    }

    /// `n` status calls at once, each on its own task; returns when all answered.
    async fn concurrent_status(api: &Arc<BudgetedDeviceApi<Recorder>>, n: usize) -> Vec<bool> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let api = api.clone();
                tokio::spawn(async move { api.status(&dev()).await.is_ok() })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    /// Most calls in any window of `window` (sliding over the call times).
    fn most_in(times: &[Instant], window: Duration) -> usize {
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| **t - times[i] < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_calls_at_ten_per_second_take_about_nine_seconds_after_the_burst()
    {
        let (api, rec) = budget(10.0);
        let t0 = Instant::now();
        let ok = concurrent_status(&api, 100).await;
        assert!(ok.iter().all(|o| *o));
        let took = Instant::now() - t0;
        // 10 at once (the burst), then 90 more at 10/s.
        assert!(
            took >= Duration::from_millis(8_990) && took <= Duration::from_millis(9_100),
            "{took:?}"
        );
        let times = rec.times();
        assert_eq!(times.len(), 100);
        // A token bucket's bound: in any window w, at most burst + rate * w calls.
        for secs in [1, 2, 5] {
            let most = most_in(&times, Duration::from_secs(secs));
            assert!(most <= 10 + 10 * secs as usize, "{most} calls in {secs} s");
        }
        // Once the burst is spent, the rate alone.
        assert_eq!(most_in(&times[10..], Duration::from_secs(1)), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_bucket_allows_one_seconds_worth_at_once_then_the_rate() {
        let (api, rec) = budget(5.0);
        assert_eq!(api.burst(), 5);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        concurrent_status(&api, 7).await;
        let offsets: Vec<u128> = rec.times().iter().map(|t| (*t - t0).as_millis()).collect();
        assert_eq!(offsets, vec![0, 0, 0, 0, 0, 200, 400]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fractional_rate_spaces_calls_and_allows_a_burst_of_one() {
        let (api, rec) = budget(0.5);
        assert_eq!(api.burst(), 1);
        let t0 = Instant::now();
        concurrent_status(&api, 3).await;
        let offsets: Vec<u128> = rec.times().iter().map(|t| (*t - t0).as_millis()).collect();
        assert_eq!(offsets, vec![0, 2000, 4000]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_pauses_every_caller_and_the_bucket_restarts_empty() {
        let (api, rec) = budget(10.0);
        // The first call is answered 429 Retry-After: 3.
        rec.throttle.lock().unwrap().push((0, 3));
        let t0 = Instant::now();
        let err = api.status(&dev()).await.unwrap_err();
        assert!(
            matches!(err, DeviceError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
        let ok = concurrent_status(&api, 5).await;
        assert!(ok.iter().all(|o| *o));
        let offsets: Vec<u128> = rec.times().iter().map(|t| (*t - t0).as_millis()).collect();
        // Nothing between the 429 and its Retry-After; then one every 100 ms (no burst).
        assert_eq!(offsets, vec![0, 3100, 3200, 3300, 3400, 3500]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_put_during_a_pause_is_refused_at_once_without_being_sent() {
        let (api, rec) = budget(10.0);
        rec.throttle.lock().unwrap().push((0, 5));
        api.status(&dev()).await.unwrap_err();
        let t0 = Instant::now();
        let err = api
            .apply_min_soc(&dev(), MinSoc::new(30).unwrap(), &RequestId::new_random())
            .await
            .unwrap_err();
        assert_eq!(Instant::now(), t0, "a PUT never waits");
        assert!(matches!(
            err,
            DeviceError::Transient { retry_after: Some(d), unanswered: false, .. } if d == Duration::from_secs(5)
        ));
        assert_eq!(rec.times().len(), 1, "the PUT was not sent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_put_after_its_reservation_goes_out_at_once_and_costs_no_second_token() {
        let (api, rec) = budget(1.0);
        let t0 = Instant::now();
        api.reserve_put().await.unwrap();
        api.apply_min_soc(&dev(), MinSoc::new(30).unwrap(), &RequestId::new_random())
            .await
            .unwrap();
        api.reserve_put().await.unwrap();
        let reserved = Instant::now();
        api.apply_min_soc(&dev(), MinSoc::new(31).unwrap(), &RequestId::new_random())
            .await
            .unwrap();
        let offsets: Vec<u128> = rec.times().iter().map(|t| (*t - t0).as_millis()).collect();
        // The second reservation waited for the refill; its PUT did not wait again.
        assert_eq!(offsets, vec![0, 1000]);
        assert_eq!(reserved - t0, Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_gets_no_turn_within_the_longest_wait_fails_without_being_sent() {
        // 1 call/s, 32 callers at once: the k-th gets its turn at k s; the 32nd's
        // would come at 31 s, past its 30 s.
        let (api, rec) = budget(1.0);
        let t0 = Instant::now();
        let ok = concurrent_status(&api, 32).await;
        assert_eq!(ok.iter().filter(|o| **o).count(), 31);
        assert_eq!(rec.times().len(), 31);
        assert!(Instant::now() - t0 <= MAX_WAIT + Duration::from_millis(10));
        let (api, rec) = budget(10.0);
        rec.throttle.lock().unwrap().push((0, 45));
        api.status(&dev()).await.unwrap_err();
        let t1 = Instant::now();
        let err = api.status(&dev()).await.unwrap_err();
        assert_eq!(
            Instant::now(),
            t1,
            "a pause longer than the wait is refused at once"
        );
        assert!(matches!(
            err,
            DeviceError::Transient { retry_after: Some(d), unanswered: false, ref reason }
                if d == Duration::from_secs(45) && reason.contains("no turn within 30 s")
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_bogus_retry_after_pauses_for_at_most_a_minute() {
        let (api, rec) = budget(10.0);
        rec.throttle.lock().unwrap().push((0, 86_400));
        let t0 = Instant::now();
        api.status(&dev()).await.unwrap_err();
        assert_eq!(api.pause_end(t0), Some(t0 + MAX_PAUSE));
    }

    // ------------------------------------------------------------ through `apply`

    use crate::domain::{LeaseHolder, RequestStatus};
    use crate::functions::apply::{apply_latest, ApplyOutcome};
    use crate::functions::fakes::{accept_pending, FakeDevice, FakeLedger, Harness};
    use crate::ports::{Clock, Ledger};
    use chrono::{DateTime, Utc};

    /// A wall clock that moves with tokio's (paused) time.
    struct TokioClock {
        base: DateTime<Utc>,
        start: Instant,
    }

    impl Clock for TokioClock {
        fn now(&self) -> DateTime<Utc> {
            self.base + chrono::Duration::from_std(Instant::now() - self.start).unwrap()
        }
    }

    /// When each PUT came and how much of its lease was left then.
    type PutLog = Arc<Mutex<Vec<(Instant, chrono::Duration)>>>;

    /// The fake device, noting for each PUT when it came and how much of its lease was left.
    struct LeaseProbe {
        inner: FakeDevice,
        ledger: FakeLedger,
        clock: Arc<TokioClock>,
        puts: PutLog,
    }

    #[async_trait]
    impl DeviceApi for LeaseProbe {
        async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
            self.inner.status(device).await
        }
        async fn apply_min_soc(
            &self,
            device: &DeviceId,
            min_soc: MinSoc,
            request_id: &RequestId,
        ) -> Result<(), DeviceError> {
            let record = self.ledger.get(device).await.unwrap().unwrap().value;
            let left = record.lease.map(|l| l.until - self.clock.now());
            self.puts
                .lock()
                .unwrap()
                .push((Instant::now(), left.unwrap_or(chrono::Duration::MIN)));
            self.inner.apply_min_soc(device, min_soc, request_id).await
        }
    }

    /// The harness with its device behind a budget of `rate` and a clock that follows tokio's.
    fn budgeted(rate: f64) -> (Harness, PutLog) {
        let mut h = Harness::new();
        h.device.set_default_online(true);
        let clock = Arc::new(TokioClock {
            base: h.clock.now(),
            start: Instant::now(),
        });
        let puts = Arc::new(Mutex::new(Vec::new()));
        let probe = LeaseProbe {
            inner: h.device.clone(),
            ledger: h.ledger.clone(),
            clock: clock.clone(),
            puts: puts.clone(),
        };
        h.svc.device = Arc::new(BudgetedDeviceApi::new(probe, rate));
        h.svc.clock = clock;
        (h, puts)
    }

    #[tokio::test(start_paused = true)]
    async fn puts_through_apply_keep_the_rate_and_each_starts_with_a_whole_put_window_of_lease() {
        // One PUT per 10 s against a 15 s lease: a wait after the lease write would
        // leave the third PUT with no lease at all.
        let (h, puts) = budgeted(0.1);
        let devices = ["d1", "d2", "d3", "d4"];
        for d in devices {
            accept_pending(&h, d, 40).await;
        }
        let t0 = Instant::now();
        let applies = devices.map(|d| {
            let svc = h.svc.clone();
            let id = h.id(d);
            tokio::spawn(async move {
                apply_latest(
                    &svc,
                    &id,
                    &LeaseHolder::from_stored(format!("h-{id}")),
                    None,
                )
                .await
            })
        });
        for a in applies {
            let out = a.await.unwrap().unwrap();
            assert!(
                matches!(out.outcome, ApplyOutcome::Applied(_)),
                "{:?}",
                out.outcome
            );
        }
        let puts = puts.lock().unwrap().clone();
        let offsets: Vec<u64> = puts.iter().map(|(t, _)| (*t - t0).as_secs()).collect();
        assert_eq!(offsets, vec![0, 10, 20, 30]);
        for (_, left) in &puts {
            assert!(
                *left >= h.svc.policy.put_window,
                "lease left at the PUT: {left}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_put_that_gets_no_turn_is_recorded_as_transient_with_no_attempt_and_no_lease() {
        // One PUT per 50 s: the second apply would wait past the 30 s limit.
        let (h, _) = budgeted(0.02);
        accept_pending(&h, "d1", 40).await;
        accept_pending(&h, "d2", 50).await;
        let first = apply_latest(&h.svc, &h.id("d1"), &LeaseHolder::from_stored("h1"), None)
            .await
            .unwrap();
        assert!(matches!(first.outcome, ApplyOutcome::Applied(_)));
        let t0 = Instant::now();
        let second = apply_latest(&h.svc, &h.id("d2"), &LeaseHolder::from_stored("h2"), None)
            .await
            .unwrap();
        assert!(Instant::now() - t0 <= MAX_WAIT);
        assert!(
            matches!(
                second.outcome,
                ApplyOutcome::Transient(
                    _,
                    DeviceError::Transient {
                        unanswered: false,
                        ..
                    }
                )
            ),
            "{:?}",
            second.outcome
        );
        let stored = h.ledger_record("d2").await;
        assert_eq!(stored.status, RequestStatus::Pending);
        assert_eq!(stored.attempts, 0);
        assert!(stored.lease.is_none());
        assert!(
            stored
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("device-call budget")),
            "{:?}",
            stored.last_error
        );
        assert!(h.device.puts("d2").is_empty());
    }
}
