//! THE properties. Every run is judged against these, and only these; the README's
//! "The properties" states the same nine in plain words. There are no exceptions for
//! unknown outcomes: an answer the service gives is judged as given.
//!
//! Words: a request's *age* is the order of its first ledger commit (newer = larger).
//! A request *lands* when the device cloud applies its PUT (the device's PUT history,
//! late landings included). *Answered 2xx* = `200` or `202`, replays included. A
//! request's *fate* is what the ledger and its history say became of it (the record
//! while it holds the request; after that the entry written when it was replaced).
//! *Settle bound*: the run ends [`Scenario::settle_bound_ms`] after the faults stop
//! (no new requests, every device online, no faults); S1 and S3 are judged then.
//! *Confirmed landing*: its PUT was answered `2xx` to an invocation that finished
//! (was not dropped). *Last useful moment*: `expiresAt` minus one lease, minus the
//! clock skew `S`.
//!
//! - **S1 convergence**: at the end, each device's ledger record is not older than
//!   its latest request answered 2xx, is not pending, and if it says `applied` the
//!   device holds exactly that request's value.
//! - **S2 no regression**: once a request has landed on a device, no older request
//!   lands on that device afterwards.
//! - **S3 nothing lost**: EVERY request answered 2xx was stored and ends applied,
//!   superseded by a newer request, expired, cancelled, or failed with a reason, within the
//!   settle bound (never still pending, never undone); and no invocation that
//!   finishes (rather than crashes) has walked away from a PUT it started.
//! - **S4 honest answers and end states**: a request answered `503`, or `4xx` without
//!   a `requestId` (`400`, `409`, `415`), is never visible in any ledger commit or read
//!   and never lands, at any instant (before or after the answer); a request answered
//!   `404`/`422` with a `requestId` never lands and is never marked applied; a request
//!   answered `200 applied` had landed before the answer; `failed` is written only
//!   after a permanent device answer (unknown device, rejected value) for that request
//!   (or an unknown-device status answer for its device); `expired` is written only at
//!   or after the request's last useful moment, and nothing of the request lands at or
//!   after its first `expired` write; and a request whose landing was
//!   confirmed never ends expired. (`500` "outcome unknown" promises nothing either
//!   way and is not judged; the run counts them.)
//! - **S5 bounded work**: one invocation PUTs a request at most once, sends at most
//!   one wake-up message for it (a connection event's invocation sends none: it only
//!   applies), and the sweep makes at most one status call per device; over
//!   its life a request gets at most `2 + rechecks + sweep re-sends + faults` wake-up
//!   messages, where `rechecks` is how many back-off delays fit in its pending life
//!   and `faults` counts the faults injected on its device (or everywhere) meanwhile:
//!   duplicates alone never multiply messages.
//! - **S6 index coverage**: at every instant (checked after every ledger effect), every
//!   pending record has a due-index entry at or before its sweep-due time, so the sweep
//!   finds every record whose wake-up message is lost, and every record near expiry;
//!   and the entry a pending record names exists (entries move with their records,
//!   `functions::index`: nobody removes an entry a record still names).
//! - **S7 reads never contradict**: a read (`GET …/soc`, `GET …/soc/requests/{id}`)
//!   shows only a request that was stored before it ended; per request, once a read
//!   has shown a final status, no read that starts after it shows pending or another
//!   final status (except `expired` then `applied` for a request that landed: the
//!   device's truth wins over bookkeeping); a read shows `applied` only after the
//!   request landed; `GET …/soc` never shows a request older than the newest request
//!   answered 2xx before the read started (nor `404` after one).
//! - **S8 one key, one request**: all the POSTs with one `Idempotency-Key` (per device)
//!   together create at most one request, ever.
//! - **S9 a cancel is final**: a request answered `200 cancelled` (by a `DELETE`) was
//!   written `cancelled` before that answer; it never lands at or after that write
//!   (so never after the answer), the ledger never says anything else of it afterwards,
//!   and no read that starts after the answer shows it other than `cancelled`. (S1 and
//!   S3 take `cancelled` as a final state.)
//! - **S10 notifications** (in worlds with notifications on): every committed write
//!   carries exactly the events of the request transitions it makes (a pending request
//!   applied, expired, failed, cancelled, superseded or expired by a newer one), named
//!   `{request}.{status}` and numbered on from the record it replaces; every event
//!   written reaches the topic by the end; the topic never gets an event no write made;
//!   and the first arrivals of a device's events follow their numbers (transition order).
//! - **S11 applied means reported**: a request is written confirmed (or drift recorded
//!   with a reported value) only after a status answer for its device, at or after the
//!   request's first PUT, showed that value; and an invocation makes at most one
//!   confirmation read of a device per PUT it made to it (judged with S5).

use std::collections::{BTreeMap, HashMap};

use soc_settings::domain::RequestStatus;
use soc_settings::functions::Policy;

use crate::scenario::Scenario;
use crate::world::{Fate, Kind, Landing, Observations, ReadKind, World};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub property: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.property, self.detail)
    }
}

/// The end state: each device's ledger record and what the device holds.
pub struct Finale {
    /// device -> (request, status, last error)
    pub records: BTreeMap<String, (String, RequestStatus, Option<String>)>,
    /// device -> request whose value the device holds
    pub devices: BTreeMap<String, Option<String>>,
}

impl Finale {
    pub fn of(w: &mut World) -> Self {
        let rows: Vec<_> = w
            .rows
            .iter()
            .map(|(d, (s, _))| {
                (
                    d.clone(),
                    s.request_id.as_str().to_string(),
                    s.status,
                    s.last_error.clone(),
                )
            })
            .collect();
        let records = rows
            .into_iter()
            .map(|(d, raw, status, err)| (d, (w.names.request(&raw), status, err)))
            .collect();
        let devices = w
            .devices
            .iter()
            .map(|(d, s)| (d.clone(), s.value.as_ref().map(|v| v.1.clone())))
            .collect();
        Self { records, devices }
    }
}

/// Judges one run against S1-S11.
pub fn judge(sc: &Scenario, policy: &Policy, obs: &Observations, end: &Finale) -> Vec<Violation> {
    let mut out = Vec::new();
    let mut v = |property: &'static str, detail: String| out.push(Violation { property, detail });
    let age = |r: &str| obs.requests.get(r).map(|i| i.age);
    let landings: Vec<_> = obs
        .puts
        .iter()
        .filter(|p| p.landing == Some(Landing::Applied))
        .collect();
    let first_landing = |r: &str| {
        landings
            .iter()
            .filter(|p| p.request == r)
            .filter_map(|p| p.land_t)
            .min()
    };
    let dropped = |inv: &str| obs.invocations.iter().any(|i| i.label == inv && i.crashed);
    // A landing the device cloud confirmed to an invocation that lived on to record it.
    let confirmed = |r: &str| {
        landings
            .iter()
            .filter(|p| p.request == r && p.answered_ok && !dropped(&p.inv))
            .filter_map(|p| p.land_t)
            .min()
    };

    // S1 + S3: every request answered 2xx, and the end state of every device.
    let mut latest_2xx: HashMap<&str, (usize, &str)> = HashMap::new();
    let mut judged: Vec<&str> = Vec::new();
    for a in obs.answers.iter().filter(|a| matches!(a.status, 200 | 202)) {
        let Some(r) = a.request.as_deref() else {
            v(
                "S3",
                format!("{} answered {} without a request", a.inv, a.status),
            );
            continue;
        };
        let Some(ra) = age(r) else {
            v(
                "S3",
                format!("{r} answered {} by {} but never stored", a.status, a.inv),
            );
            continue;
        };
        let e = latest_2xx.entry(a.device.as_str()).or_insert((ra, r));
        if ra > e.0 {
            *e = (ra, r);
        }
        if judged.contains(&r) {
            continue;
        }
        judged.push(r);
        match obs.fates.get(r) {
            Some(Fate::Status(RequestStatus::Pending)) => v(
                "S3",
                format!(
                    "{r} (answered {} by {}) still pending {} ms after the faults stopped",
                    a.status,
                    a.inv,
                    sc.settle_bound_ms()
                ),
            ),
            Some(Fate::Undone) | None => v(
                "S3",
                format!(
                    "{r} answered {} by {} but the ledger no longer holds it (undone)",
                    a.status, a.inv
                ),
            ),
            _ => {}
        }
    }
    for (device, (ra, r)) in &latest_2xx {
        match end.records.get(*device) {
            None => v(
                "S3",
                format!("{r} answered 2xx on {device}: the ledger holds nothing at the end"),
            ),
            Some((f, _, _)) if age(f).unwrap_or(0) < *ra => v(
                "S1",
                format!("{device}: the ledger ends at {f}, older than {r} answered 2xx"),
            ),
            _ => {}
        }
    }
    for (device, (f, status, err)) in &end.records {
        let held = end.devices.get(device).cloned().flatten();
        match status {
            RequestStatus::Pending => v(
                "S1",
                format!(
                    "{device}: {f} still pending {} ms after the faults stopped",
                    sc.settle_bound_ms()
                ),
            ),
            RequestStatus::Applied if held.as_deref() != Some(f.as_str()) => v(
                "S1",
                format!("{device}: the ledger says {f} applied, the device holds {held:?}"),
            ),
            RequestStatus::Failed if err.as_deref().is_none_or(str::is_empty) => {
                v("S3", format!("{device}: {f} failed without a reason"))
            }
            _ => {}
        }
    }

    for p in obs.puts.iter().filter(|p| !p.heard) {
        if let Some(i) = obs.invocations.iter().find(|i| i.label == p.inv) {
            if i.ended.is_some() && !i.crashed {
                v(
                    "S3",
                    format!(
                        "{} finished without waiting for its PUT of {}",
                        i.label, p.request
                    ),
                );
            }
        }
    }

    // S2: landings per device in landing order never go back in age.
    let mut by_device: BTreeMap<&str, Vec<(u64, usize, &str)>> = BTreeMap::new();
    for p in &landings {
        if let (Some(t), Some(a)) = (p.land_t, age(&p.request)) {
            by_device
                .entry(&p.device)
                .or_default()
                .push((t, a, &p.request));
        }
    }
    for (device, mut seq) in by_device {
        seq.sort_by_key(|x| x.0);
        let mut newest: Option<(usize, &str)> = None;
        for (t, a, r) in seq {
            if let Some((na, nr)) = newest {
                if a < na {
                    v(
                        "S2",
                        format!("{device}: {r} landed at {t} ms after the newer {nr} had landed"),
                    );
                }
            }
            if newest.is_none_or(|(na, _)| a > na) {
                newest = Some((a, r));
            }
        }
    }

    // S4: answers are honest, at every instant.
    for a in &obs.answers {
        let Some(r) = a.request.as_deref() else {
            continue;
        };
        let not_kept = a.status == 503 || ((400..500).contains(&a.status) && !a.carries_id);
        if not_kept {
            if let Some(c) = obs.commits.iter().find(|c| c.request.as_deref() == Some(r)) {
                v(
                    "S4",
                    format!(
                        "{r} answered {} at {} ms (not kept) but the ledger held it at {} ms ({})",
                        a.status, a.t, c.t, c.inv
                    ),
                );
            }
            if let Some(read) = obs.reads.iter().find(|x| x.request.as_deref() == Some(r)) {
                v(
                    "S4",
                    format!(
                        "{r} answered {} at {} ms (not kept) but a read at {} ms showed it",
                        a.status, a.t, read.start
                    ),
                );
            }
        }
        match a.status {
            _ if not_kept || matches!(a.status, 404 | 422) => {
                if let Some(t) = first_landing(r) {
                    v(
                        "S4",
                        format!(
                            "{r} answered {} at {} ms but landed at {t} ms",
                            a.status, a.t
                        ),
                    );
                }
                if obs.commits.iter().any(|c| {
                    c.request.as_deref() == Some(r) && c.status == Some(RequestStatus::Applied)
                }) {
                    v(
                        "S4",
                        format!("{r} answered {} but the ledger marked it applied", a.status),
                    );
                }
            }
            200 if a.applied => match first_landing(r) {
                Some(t) if t <= a.t => {}
                Some(t) => v(
                    "S4",
                    format!("{r} answered 200 at {} ms, landed only at {t} ms", a.t),
                ),
                None => v("S4", format!("{r} answered 200 but never landed")),
            },
            _ => {}
        }
    }
    let lease_ms = policy.lease.num_milliseconds();
    let skew_ms = sc.bounds.max_skew_ms as i64;
    let mut seen_failed: Vec<&str> = Vec::new();
    let mut seen_expired: Vec<&str> = Vec::new();
    for c in &obs.commits {
        let (Some(r), Some(info)) = (
            c.request.as_deref(),
            c.request.as_deref().and_then(|r| obs.requests.get(r)),
        ) else {
            continue;
        };
        match c.status {
            Some(RequestStatus::Failed) if !seen_failed.contains(&r) => {
                seen_failed.push(r);
                let permanent = obs.permanent.iter().any(|(t, d, q)| {
                    *t <= c.t && *d == c.device && q.as_deref().is_none_or(|q| q == r)
                });
                if !permanent {
                    v(
                        "S4",
                        format!(
                            "{r} written failed by {} at {} ms without a permanent device answer for it",
                            c.inv, c.t
                        ),
                    );
                }
            }
            Some(RequestStatus::Expired) if !seen_expired.contains(&r) => {
                seen_expired.push(r);
                let useful_until =
                    info.expires_at - chrono::Duration::milliseconds(lease_ms + skew_ms);
                let at = sc_time(c.t);
                if at < useful_until {
                    v(
                        "S4",
                        format!(
                            "{r} written expired by {} at {} ms, {} s before its last useful moment",
                            c.inv,
                            c.t,
                            (useful_until - at).num_seconds()
                        ),
                    );
                }
                // No PUT starts within one lease of expiry, and a lease covers a PUT's
                // landing, so an `expired` write is final on the device: nothing of the
                // request lands at or after it.
                if let Some(t) = landings
                    .iter()
                    .filter(|p| p.request == r)
                    .filter_map(|p| p.land_t)
                    .filter(|t| *t >= c.t)
                    .min()
                {
                    v(
                        "S4",
                        format!(
                            "{r} landed at {t} ms, after {} wrote it expired at {} ms",
                            c.inv, c.t
                        ),
                    );
                }
            }
            _ => {}
        }
    }
    for (r, fate) in &obs.fates {
        if *fate == Fate::Status(RequestStatus::Expired) {
            if let Some(t) = confirmed(r) {
                v(
                    "S4",
                    format!("{r} ends expired although its landing at {t} ms was confirmed"),
                );
            }
        }
    }

    // S5: bounded work.
    for i in &obs.invocations {
        for (what, list) in [("PUTs", &i.puts), ("wake-up sends", &i.sends)] {
            let mut n: HashMap<&str, usize> = HashMap::new();
            for r in list.iter() {
                *n.entry(r).or_default() += 1;
            }
            if let Some((r, k)) = n.into_iter().find(|(_, k)| *k > 1) {
                v("S5", format!("{} made {k} {what} for {r}", i.label));
            }
        }
        if i.kind == Kind::Event && !i.sends.is_empty() {
            v(
                "S5",
                format!(
                    "{} (a connection event) sent {} wake-up messages",
                    i.label,
                    i.sends.len()
                ),
            );
        }
        // The confirmation read: at most one per PUT the invocation made to the device.
        let mut reads: HashMap<&str, usize> = HashMap::new();
        for d in &i.confirmation_reads {
            *reads.entry(d).or_default() += 1;
        }
        for (d, k) in reads {
            let puts = i
                .puts
                .iter()
                .filter(|r| obs.requests.get(*r).is_some_and(|x| x.device == d))
                .count();
            if k > puts {
                v(
                    "S5",
                    format!(
                        "{} made {k} confirmation reads of {d} after {puts} PUTs",
                        i.label
                    ),
                );
            }
        }
        if i.kind == Kind::Sweep {
            let mut n: HashMap<&str, usize> = HashMap::new();
            for d in &i.status_calls {
                *n.entry(d).or_default() += 1;
            }
            if let Some((d, k)) = n.into_iter().find(|(_, k)| *k > 1) {
                v("S5", format!("{} made {k} status calls for {d}", i.label));
            }
        }
    }
    for (r, info) in &obs.requests {
        let sends: Vec<_> = obs.sends.iter().filter(|s| &s.request == r).collect();
        if sends.is_empty() {
            continue;
        }
        // Pending life: until it is settled, or last seen in the ledger (a request
        // superseded and then restored by an undo lives on).
        let mine: Vec<_> = obs
            .commits
            .iter()
            .filter(|c| c.request.as_deref() == Some(r.as_str()))
            .collect();
        let settled = mine
            .iter()
            .find(|c| c.status.is_some_and(|s| s != RequestStatus::Pending))
            .map(|c| c.t)
            .or_else(|| {
                let last = mine.last().map(|c| c.t)?;
                let still_current = end
                    .records
                    .get(&info.device)
                    .is_some_and(|(f, _, _)| f == r);
                // Replaced: its pending life lasts until the commit that replaced it (its
                // wake-up chain runs until then), not only until its own last commit
                // (simulation seed 467,445: faults after its last commit were not counted).
                (!still_current).then(|| {
                    obs.commits
                        .iter()
                        .filter(|c| c.device == info.device && c.t >= last)
                        .find(|c| c.request.as_deref() != Some(r.as_str()))
                        .map_or(last, |c| c.t)
                })
            })
            .unwrap_or(sc.end_ms);
        let life = settled.saturating_sub(info.created_t);
        let mut rechecks = 0u64;
        let mut spent = 0i64;
        while spent <= life as i64 && rechecks < 10_000 {
            spent += policy
                .backoff
                .delay(rechecks as u32)
                .num_milliseconds()
                .max(1);
            rechecks += 1;
        }
        let by_sweep = sends.iter().filter(|s| s.inv_kind == Kind::Sweep).count() as u64;
        let faults = obs
            .faults
            .iter()
            .filter(|(t, d)| {
                *t >= info.created_t && *t <= settled && (d == "*" || *d == info.device)
            })
            .count() as u64;
        let bound = 2 + rechecks + by_sweep + faults;
        if sends.len() as u64 > bound {
            v(
                "S5",
                format!(
                    "{r}: {} wake-up messages in {life} ms pending (bound {bound}: {rechecks} re-checks, {by_sweep} sweep re-sends, {faults} faults)",
                    sends.len()
                ),
            );
        }
    }
    // S6: the due index covers every pending record at every instant.
    for (t, device, detail) in &obs.index_gaps {
        v(
            "S6",
            format!("{device} at {:.3}s: {detail}", *t as f64 / 1000.0),
        );
    }

    // S7: reads never contradict.
    let mut reads: Vec<_> = obs.reads.iter().filter(|x| x.status == 200).collect();
    reads.sort_by_key(|x| (x.start, x.end));
    let mut final_shown: HashMap<&str, (&str, u64)> = HashMap::new();
    for x in &reads {
        let Some(r) = x.request.as_deref() else {
            continue;
        };
        let shown = x.shown.as_deref().unwrap_or_default();
        match obs.requests.get(r) {
            Some(i) if i.created_t <= x.end => {}
            _ => v(
                "S7",
                format!(
                    "a read at {} ms showed {r} ({shown}), never stored by then",
                    x.start
                ),
            ),
        }
        if let ReadKind::Request(q) = &x.kind {
            if q != r {
                v("S7", format!("a read of {q} at {} ms showed {r}", x.start));
            }
        }
        if shown == "applied" && first_landing(r).is_none_or(|t| t > x.end) {
            v(
                "S7",
                format!(
                    "a read at {} ms showed {r} applied before it landed",
                    x.start
                ),
            );
        }
        if let Some((before, ended)) = final_shown.get(r) {
            let device_wins =
                *before == "expired" && shown == "applied" && first_landing(r).is_some();
            if x.start > *ended && shown != *before && !device_wins {
                v(
                    "S7",
                    format!(
                        "{r}: a read at {} ms showed {shown} after a read ending at {ended} ms showed {before}",
                        x.start
                    ),
                );
            }
        }
        if shown != "pending" {
            let e = final_shown.entry(r).or_insert((shown, x.end));
            if e.0 != shown && x.start > e.1 {
                *e = (shown, x.end);
            }
            e.1 = e.1.min(x.end);
        }
    }
    for x in obs.reads.iter().filter(|x| x.kind == ReadKind::Latest) {
        let newest = obs
            .answers
            .iter()
            .filter(|a| a.device == x.device && matches!(a.status, 200 | 202) && a.t < x.start)
            .filter_map(|a| a.request.as_deref().and_then(|r| Some((age(r)?, r))))
            .max();
        let Some((na, nr)) = newest else {
            continue;
        };
        match (x.status, x.request.as_deref()) {
            (200, Some(r)) if age(r).is_some_and(|a| a >= na) => {}
            (200, Some(r)) => v(
                "S7",
                format!(
                    "GET {} at {} ms showed {r}, older than {nr} answered 2xx before",
                    x.device, x.start
                ),
            ),
            (404, _) => v(
                "S7",
                format!(
                    "GET {} at {} ms: 404 after {nr} was answered 2xx",
                    x.device, x.start
                ),
            ),
            _ => {}
        }
    }

    // S9: a cancel is final.
    for a in obs.cancels.iter().filter(|a| a.status == 200) {
        let r = a.request.as_str();
        if a.shown.as_deref() != Some("cancelled") {
            v(
                "S9",
                format!("{r}: {} answered 200 showing {:?}", a.inv, a.shown),
            );
        }
        let written = obs
            .commits
            .iter()
            .filter(|c| c.request.as_deref() == Some(r))
            .filter(|c| c.status == Some(RequestStatus::Cancelled))
            .map(|c| c.t)
            .min();
        let Some(tc) = written.filter(|tc| *tc <= a.t) else {
            v(
                "S9",
                format!(
                    "{r} answered 200 cancelled by {} at {} ms but not written cancelled by then",
                    a.inv, a.t
                ),
            );
            continue;
        };
        if let Some(t) = landings
            .iter()
            .filter(|p| p.request == r)
            .filter_map(|p| p.land_t)
            .filter(|t| *t >= tc)
            .min()
        {
            v(
                "S9",
                format!(
                    "{r} landed at {t} ms, after it was written cancelled at {tc} ms ({} answered 200 at {} ms)",
                    a.inv, a.t
                ),
            );
        }
        if let Some(c) = obs.commits.iter().find(|c| {
            c.t > tc
                && c.request.as_deref() == Some(r)
                && c.status != Some(RequestStatus::Cancelled)
        }) {
            v(
                "S9",
                format!(
                    "{r} written {:?} by {} at {} ms, after it was cancelled at {tc} ms",
                    c.status, c.inv, c.t
                ),
            );
        }
        if let Some(x) = obs.reads.iter().find(|x| {
            x.start > a.t
                && x.status == 200
                && x.request.as_deref() == Some(r)
                && x.shown.as_deref() != Some("cancelled")
        }) {
            v(
                "S9",
                format!(
                    "a read at {} ms showed {r} {:?} after {} answered it cancelled at {} ms",
                    x.start, x.shown, a.inv, a.t
                ),
            );
        }
    }

    // S10: notifications.
    if sc.notify.is_some() {
        for (t, device, what) in &obs.event_mismatches {
            v("S10", format!("{device} at {t} ms: {what}"));
        }
        let written: HashMap<&str, (u64, &str, u64)> = obs
            .events_written
            .iter()
            .map(|(t, e)| (e.id.as_str(), (*t, e.device_id.as_str(), e.seq)))
            .collect();
        let mut first: HashMap<&str, u64> = HashMap::new();
        let mut newest: HashMap<&str, u64> = HashMap::new();
        for (t, e) in &obs.arrivals {
            match written.get(e.id.as_str()) {
                Some(&(tw, d, seq)) if tw <= *t && d == e.device_id.as_str() && seq == e.seq => {}
                _ => v(
                    "S10",
                    format!("the topic got {} at {t} ms, an event no write made", e.id),
                ),
            }
            if first.insert(e.id.as_str(), *t).is_some() {
                continue;
            }
            let last = newest.entry(e.device_id.as_str()).or_insert(0);
            if e.seq < *last {
                v(
                    "S10",
                    format!(
                        "{}: event #{} ({}) first arrived at {t} ms, after #{last}",
                        e.device_id, e.seq, e.id
                    ),
                );
            }
            *last = (*last).max(e.seq);
        }
        for (t, e) in &obs.events_written {
            if !first.contains_key(e.id.as_str()) {
                v(
                    "S10",
                    format!(
                        "{}: event #{} ({}) written at {t} ms never reached the topic",
                        e.device_id, e.seq, e.id
                    ),
                );
            }
        }
    }

    // S11: confirmed and drift only from what the battery reported.
    let first_put = |r: &str| {
        obs.puts
            .iter()
            .filter(|p| p.request == r)
            .map(|p| p.sent_t)
            .min()
    };
    for (what, list) in [("confirmed", &obs.confirmations), ("drift", &obs.drifts)] {
        for (t, d, r, value) in list {
            let since = first_put(r).unwrap_or(u64::MAX);
            let seen = obs
                .status_answers
                .iter()
                .any(|(ts, sd, v)| sd == d && *v == Some(*value) && since <= *ts && ts <= t);
            if !seen {
                v(
                    "S11",
                    format!(
                        "{r} on {d}: written {what} with the battery reporting {value} at {t} ms, but no status read since its PUT showed {value}"
                    ),
                );
            }
        }
    }

    // S8: one Idempotency-Key, one request.
    let mut by_key: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    for i in obs.invocations.iter().filter(|i| i.kind == Kind::Post) {
        let Some(key) = i.key.as_deref() else {
            continue;
        };
        for r in &i.created {
            let device = obs.requests.get(r).map_or("?", |x| x.device.as_str());
            let list = by_key.entry((device, key)).or_default();
            if !list.contains(&r.as_str()) {
                list.push(r);
            }
        }
    }
    for ((device, key), requests) in by_key {
        if requests.len() > 1 {
            v(
                "S8",
                format!(
                    "Idempotency-Key {key} on {device} created {} requests: {}",
                    requests.len(),
                    requests.join(", ")
                ),
            );
        }
    }
    out
}

/// The true wall-clock time of virtual millisecond `t`.
fn sc_time(t: u64) -> chrono::DateTime<chrono::Utc> {
    crate::world::epoch() + chrono::Duration::milliseconds(t as i64)
}
