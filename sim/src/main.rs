//! `soc-sim`: runs seeds of the deterministic simulation (see `scripts/sim`).
//!
//! ```text
//! soc-sim --seeds N [--from S] [--jobs J] [--keep-going]   run seeds S..S+N
//! soc-sim --seed S                                          replay one seed with its trace
//! ```
//! `--no-events` (with either): the worlds without the vendor's connection events, as
//! the seeds were before `DeviceEventsHttp`; `--no-notifications`: without notifications
//! (as before issue 21). The regression seeds of `sim/tests/regressions.rs` replay with
//! both.
//! Exit status 1 when any seed violates a property. Without `--keep-going` the run
//! stops at the lowest violating seed and prints it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

fn usage() -> ! {
    eprintln!(
        "usage: soc-sim --seeds N [--from S] [--jobs J] [--keep-going] | --seed S  [--no-events] [--no-notifications]"
    );
    std::process::exit(2)
}

/// Set by `--no-events`.
static NO_EVENTS: AtomicBool = AtomicBool::new(false);
/// Set by `--no-notifications`.
static NO_NOTIFICATIONS: AtomicBool = AtomicBool::new(false);

/// The report of `seed`, with or without the connection events and the notifications.
fn run_one(seed: u64, trace: bool) -> soc_sim::Report {
    let mut scenario = soc_sim::Scenario::generate(seed);
    if NO_EVENTS.load(Ordering::SeqCst) {
        scenario = scenario.without_events();
    }
    if NO_NOTIFICATIONS.load(Ordering::SeqCst) {
        scenario = scenario.without_notifications();
    }
    soc_sim::run(scenario, trace)
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--no-events") {
        args.remove(at);
        NO_EVENTS.store(true, Ordering::SeqCst);
    }
    if let Some(at) = args.iter().position(|a| a == "--no-notifications") {
        args.remove(at);
        NO_NOTIFICATIONS.store(true, Ordering::SeqCst);
    }
    let mut seeds: Option<u64> = None;
    let mut one: Option<u64> = None;
    let mut from = 0u64;
    let mut jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut keep_going = false;
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| -> u64 {
            args.get(i + 1)
                .and_then(|v| v.replace('_', "").parse().ok())
                .unwrap_or_else(|| usage())
        };
        match args[i].as_str() {
            "--seeds" => seeds = Some(value(i)),
            "--seed" => one = Some(value(i)),
            "--from" => from = value(i),
            "--jobs" => jobs = value(i).max(1) as usize,
            "--keep-going" => {
                keep_going = true;
                i += 1;
                continue;
            }
            _ => usage(),
        }
        i += 2;
    }
    if let Some(seed) = one {
        replay(seed);
    } else if let Some(n) = seeds {
        many(from, n, jobs, keep_going);
    } else {
        usage();
    }
}

fn replay(seed: u64) {
    let report = run_one(seed, true);
    println!("seed {seed}\n{:#?}\n", report.scenario);
    for line in report.trace.unwrap_or_default() {
        println!("{line}");
    }
    println!();
    if report.violations.is_empty() {
        println!("seed {seed}: no violations");
    } else {
        for v in &report.violations {
            println!("VIOLATION {v}");
        }
        std::process::exit(1);
    }
}

/// A violating seed and what it violated.
type Failing = (u64, Vec<soc_sim::Violation>);

fn many(from: u64, n: u64, jobs: usize, keep_going: bool) {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(from));
    let stop = Arc::new(AtomicBool::new(false));
    let failing: Arc<Mutex<Vec<Failing>>> = Arc::default();
    let done = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, stop, failing, done) =
                (next.clone(), stop.clone(), failing.clone(), done.clone());
            std::thread::spawn(move || loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= from + n {
                    return;
                }
                let report = run_one(seed, false);
                let k = done.fetch_add(1, Ordering::SeqCst) + 1;
                if k % 100_000 == 0 {
                    eprintln!("{k} seeds, {:.0} s", started.elapsed().as_secs_f64());
                }
                if !report.violations.is_empty() {
                    failing.lock().unwrap().push((seed, report.violations));
                    if !keep_going {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut failing = failing.lock().unwrap().clone();
    failing.sort_by_key(|f| f.0);
    let ran = done.load(Ordering::SeqCst);
    println!(
        "{ran} seeds from {from} in {elapsed:.1} s ({:.0} seeds/s, {jobs} jobs): {} violating",
        ran as f64 / elapsed.max(1e-9),
        failing.len()
    );
    for (seed, violations) in failing.iter().take(500) {
        println!("seed {seed} (replay: scripts/sim --seed {seed}):");
        for v in violations {
            println!("  {v}");
        }
    }
    if !failing.is_empty() {
        std::process::exit(1);
    }
}
