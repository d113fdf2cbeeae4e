//! The CI subset of the simulation: the first seeds, judged against S1-S5
//! (`scripts/sim --seeds N` runs more; BENCHMARKS.md records a long run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Seeds run on every `scripts/test` (a few thousand: about 30 s on 2 cores, debug build).
const CI_SEEDS: u64 = 4_000;

#[test]
fn the_first_seeds_keep_every_property() {
    let next = Arc::new(AtomicU64::new(0));
    let failing: Arc<Mutex<Vec<String>>> = Arc::default();
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers: Vec<_> = (0..jobs)
        .map(|_| {
            let (next, failing) = (next.clone(), failing.clone());
            std::thread::spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= CI_SEEDS {
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
