//! THE properties. Every run is judged against these, and only these; the README's
//! "How it stays correct" states the same five in plain words.
//!
//! Words: a request's *age* is the order of its first ledger commit (newer = larger).
//! A request *lands* when the device cloud applies its PUT (the device's PUT history,
//! late landings included). *Answered 2xx* = `200` or `202`, replays included.
//! *Settle bound*: the run ends [`Scenario::settle_bound_ms`] after the faults stop
//! (no new requests, every device online, no faults); S1 and S3 are judged then.
//!
//! - **S1 convergence**: at the end, each device's ledger record is not older than
//!   its latest request answered 2xx, is not pending, and if it says `applied` the
//!   device holds exactly that request's value.
//! - **S2 no regression**: once a request has landed on a device, no older request
//!   lands on that device afterwards.
//! - **S3 nothing lost**: every request answered 2xx ends applied, superseded by a
//!   newer request, expired, or failed with a reason, within the settle bound (a
//!   request whose accepting write's outcome was unknown and that a newer request
//!   overtook while in flight counts as superseded, stored or not; a POST whose own
//!   undo took effect unbeknown to it is residual risk R6 and not judged here); and
//!   no invocation that finishes (rather than crashes) has walked away from a PUT
//!   it started (dropping work in flight leaves its lease and attempt behind).
//! - **S4 honest answers**: a request answered `503` or `4xx` never lands, is never
//!   marked applied, and after a `503` nothing of it is kept (it is not in the ledger
//!   at the end); a request answered `200 applied` had landed before the answer;
//!   `expired` is never written for a request whose landing the device cloud
//!   confirmed to a live invocation (a PUT that timed out, or whose caller crashed,
//!   can land unbeknown to anyone: residual risk R2 in the README).
//! - **S5 bounded work**: one invocation PUTs a request at most once, sends at most
//!   one wake-up message for it (a connection event's invocation sends none: it only
//!   applies), and the sweep makes at most one status call per device; over
//!   its life a request gets at most `2 + rechecks + sweep re-sends + faults` wake-up
//!   messages, where `rechecks` is how many back-off delays fit in its pending life
//!   and `faults` counts the faults injected on its device (or everywhere) meanwhile:
//!   duplicates alone never multiply messages.
//! - **S6 index coverage**: at every instant (checked after every ledger effect), every
//!   pending record has a due-index entry at or before its sweep-due time, so the sweep
//!   finds every record whose wake-up message is lost, and every record near expiry.

use std::collections::{BTreeMap, HashMap};

use soc_settings::domain::RequestStatus;
use soc_settings::functions::Policy;

use crate::scenario::Scenario;
use crate::world::{Kind, Landing, Observations, World};

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

/// Judges one run against S1-S6.
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

    // S1 + S3: the end state of every device.
    let mut latest_2xx: HashMap<&str, (usize, &str)> = HashMap::new();
    // Residual risk R6 (README): a POST whose undo took effect but answered a timeout
    // cannot tell its own undo from a newer request; its answer is not judged by S1/S3.
    let undo_unknown = |inv: &str| {
        obs.invocations
            .iter()
            .any(|i| i.label == inv && i.undo_unknown)
    };
    for a in obs
        .answers
        .iter()
        .filter(|a| matches!(a.status, 200 | 202) && !undo_unknown(&a.inv))
    {
        let Some(r) = a.request.as_deref() else {
            continue;
        };
        let Some(ra) = age(r) else {
            // Never stored: acceptable only as superseded, i.e. when a newer request
            // for the device was stored while it was in flight (its accepting write's
            // outcome was unknown and a newer request overtook it).
            // From its first write attempt, less four clock skews: the service compares
            // its clock with the other writer's (each up to the skew off), allowing
            // twice the skew, so it tells "written after" only that closely.
            let started = obs
                .first_tried
                .get(r)
                .map_or(a.t, |t| t.saturating_sub(4 * sc.bounds.max_skew_ms));
            let overtaken = obs
                .requests
                .values()
                .any(|q| q.device == a.device && q.created_t >= started && q.created_t <= a.t);
            if !overtaken {
                v("S3", format!("{r} answered {} but never stored", a.status));
            }
            continue;
        };
        let e = latest_2xx.entry(a.device.as_str()).or_insert((ra, r));
        if ra > e.0 {
            *e = (ra, r);
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
                "S3",
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

    // S4: answers are honest.
    for a in &obs.answers {
        let Some(r) = a.request.as_deref() else {
            continue;
        };
        match a.status {
            503 | 404 | 422 => {
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
                if a.status == 503 && end.records.get(&a.device).is_some_and(|(f, _, _)| f == r) {
                    v(
                        "S4",
                        format!("{r} answered 503 (nothing kept) but the ledger still holds it"),
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
    // A landing the service was told of: its PUT was answered `applied` to an
    // invocation that lived on to record it. (A PUT that timed out or whose caller
    // crashed may land unbeknown to the service: residual risk R2 in the README.)
    let confirmed = |r: &str| {
        landings
            .iter()
            .filter(|p| p.request == r && p.answered_ok)
            .filter(|p| {
                !obs.invocations
                    .iter()
                    .any(|i| i.label == p.inv && i.crashed)
            })
            .filter_map(|p| p.land_t)
            .min()
    };
    for c in obs
        .commits
        .iter()
        .filter(|c| c.status == Some(RequestStatus::Expired))
    {
        let r = c.request.as_deref().unwrap_or_default();
        if let Some(t) = confirmed(r) {
            v(
                "S4",
                format!(
                    "{r} written expired by {} at {} ms but it landed at {t} ms",
                    c.inv, c.t
                ),
            );
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
                (!still_current).then_some(last)
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
    out
}
