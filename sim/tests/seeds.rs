//! The CI subset of the simulation: the first seeds, judged against S1-S11
//! (`scripts/sim --seeds N` runs more; BENCHMARKS.md records a long run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Seeds run on every `scripts/test` (a few thousand of the wide model: about 200 s on 2
/// cores in a debug build, BENCHMARKS.md).
const CI_SEEDS: u64 = 4_000;

/// How many seeds to run: `CI_SEEDS`, or `SOC_SIM_SEEDS` when set (`scripts/mutants`
/// runs a smaller subset per mutant, README "Mutation testing").
fn seeds_to_run() -> u64 {
    match std::env::var("SOC_SIM_SEEDS") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("SOC_SIM_SEEDS must be a number of seeds, not {n:?}")),
        Err(_) => CI_SEEDS,
    }
}

#[test]
fn the_first_seeds_keep_every_property() {
    let seeds = seeds_to_run();
    let next = Arc::new(AtomicU64::new(0));
    let failing: Arc<Mutex<Vec<String>>> = Arc::default();
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, failing) = (next.clone(), failing.clone());
            std::thread::spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                // The first violating seed is enough to fail (and to replay): the workers
                // stop taking seeds once one is found.
                if seed >= seeds || !failing.lock().unwrap().is_empty() {
                    return;
                }
                let report = soc_sim::run_seed(seed, false);
                for v in report.violations {
                    failing
                        .lock()
                        .unwrap()
                        .push(format!("seed {seed} (scripts/sim --seed {seed}): {v}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let failing = failing.lock().unwrap();
    assert!(failing.is_empty(), "{}", failing.join("\n"));
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let a = soc_sim::run_seed(7, true).trace.unwrap();
    let b = soc_sim::run_seed(7, true).trace.unwrap();
    assert!(a.len() > 10, "{a:?}");
    assert_eq!(a, b);
}

#[test]
fn the_vendors_connection_events_reach_the_devices_in_the_generated_worlds() {
    // The event path is exercised, not only generated: among the first seeds, event
    // invocations run, crash, and put requests on devices.
    let (mut invocations, mut crashed, mut landed) = (0, 0, 0);
    for seed in 0..300 {
        let report = soc_sim::run_seed(seed, false);
        let obs = &report.observations;
        for i in obs
            .invocations
            .iter()
            .filter(|i| i.label.starts_with("event#"))
        {
            invocations += 1;
            crashed += usize::from(i.crashed);
        }
        landed += obs
            .puts
            .iter()
            .filter(|p| p.inv.starts_with("event#"))
            .filter(|p| p.landing == Some(soc_sim::world::Landing::Applied))
            .count();
    }
    assert!(invocations > 100, "{invocations} event invocations");
    assert!(crashed > 0, "no event invocation crashed");
    assert!(landed > 10, "{landed} PUTs by event invocations landed");
    println!("{invocations} event invocations, {crashed} crashed, {landed} PUTs landed");
}
