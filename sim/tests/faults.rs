//! Each fault shape of the wide model (issue 17 part 2) happens in the generated worlds:
//! counted over the first seeds, from the simulator's own tally (`Observations::shapes`)
//! and its observations. A shape that stops happening (a generator change, a typo in a
//! rate) fails here instead of silently narrowing the model.

use std::collections::BTreeMap;

use soc_sim::world::{Kind, ReadKind};

const SEEDS: u64 = 400;

#[test]
fn every_fault_shape_of_the_wide_model_happens_in_the_first_seeds() {
    let mut shapes: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut latest_reads, mut request_reads, mut fleets) = (0, 0, 0);
    let mut killed: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut late_crash_sweeps = 0;
    let (mut confirmed, mut confirmation_reads) = (0, 0);
    for seed in 0..SEEDS {
        let report = soc_sim::run_seed(seed, false);
        let sc = &report.scenario;
        if sc.devices.len() >= 100 && sc.skews_ms.len() >= 3 {
            fleets += 1;
        }
        let obs = &report.observations;
        confirmed += obs.confirmations.len();
        confirmation_reads += obs
            .invocations
            .iter()
            .map(|i| i.confirmation_reads.len())
            .sum::<usize>();
        for (k, n) in &obs.shapes {
            *shapes.entry(k).or_default() += n;
        }
        for r in &obs.reads {
            match r.kind {
                ReadKind::Latest => latest_reads += 1,
                ReadKind::Request(_) => request_reads += 1,
            }
        }
        for i in &obs.invocations {
            if let Some(why) = i.killed {
                *killed.entry(why).or_default() += 1;
                if i.kind == Kind::Sweep && why == "crash" {
                    late_crash_sweeps += 1;
                }
            }
        }
    }
    println!("{shapes:#?}\nkilled {killed:?}\nreads: {latest_reads} latest, {request_reads} per request; {fleets} fleets; {late_crash_sweeps} sweeps crashed; {confirmation_reads} confirmation reads, {confirmed} confirmations");
    // Issue 21 item 3: the read after a PUT happens, and confirms (S11 judges each).
    assert!(
        confirmed > 0 && confirmation_reads > confirmed,
        "{confirmation_reads} confirmation reads, {confirmed} confirmations"
    );
    for shape in [
        "ledger write commits after the caller's timeout",
        "send enqueued after the caller's timeout",
        "ledger outage",
        "Service Bus outage",
        "device cloud outage",
        "5xx PUT lands after the answer",
        "restart kills invocations",
        "scale-in kills invocations",
        "functionTimeout kill",
        "past-due timer run",
        "timer fires twice back to back",
        "crash past the 14th operation",
        "late retry with the same key",
        "budget: PUT waited for its turn",
        "budget: PUT refused (no turn)",
        "budget: PUT refused during a Retry-After pause",
        "a writer removed the index entry its record had named",
        "sweep renews its lease",
        "sweep run stops starting work (its time ran out)",
        // Not "index batch filing commits": the reconciling pass files only records that
        // name no index entry (written before entries were named, issue 20), and the
        // generated worlds have none. Its batches are covered by the unit test
        // `the_reconciling_pass_files_its_slice_in_one_transaction_per_shard_and_hundred`
        // and the Azurite adapter test.
        "connection event deferred to the chain (answer due)",
        "cancel answered 200",
        "cancel refused: no longer pending",
        "cancel refused: a PUT of it may land (409 + Retry-After)",
        "event topic outage",
        "event topic keeps a publish whose caller timed out",
        "the sweep publishes events from an outbox",
    ] {
        assert!(
            shapes.get(shape).is_some_and(|n| *n > 0),
            "{shape} never happened in {SEEDS} seeds"
        );
    }
    assert!(
        latest_reads > 100,
        "{latest_reads} reads of the latest request"
    );
    assert!(
        request_reads > 100,
        "{request_reads} reads of a request's status"
    );
    assert!(fleets >= 5, "{fleets} seeds with a fleet");
}
