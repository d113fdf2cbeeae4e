//! The interleavings of issue 8, as named regression seeds. Each was found by the
//! simulator with the old logic brought back (the `mutant-*` feature named with it,
//! see `scripts/sim-mutants`): built with that feature its test fails, as the old
//! code did; built normally it passes.
//!
//! The seeds were found before the vendor's connection events existed and replay without
//! them (`Scenario::without_events`); `scripts/sim --seed S --no-events` replays a seed
//! with its trace;
//! `cargo test -p soc-sim --features mutant-undo-ignores-lease --test regressions`
//! shows the old logic failing.

/// Whether any mutation is built in: then only the tests of that mutation judge.
const MUTANT: bool = cfg!(any(
    feature = "mutant-no-lease-check",
    feature = "mutant-delivered-ignores-request-id",
    feature = "mutant-transient-releases-lease",
    feature = "mutant-undo-ignores-lease",
    feature = "mutant-expiry-over-lease",
    feature = "mutant-no-read-back",
    feature = "mutant-put-on-caller-lease",
    feature = "mutant-sweep-drops-before-filing",
    feature = "mutant-index-skips-filing",
    feature = "mutant-no-chain-check",
    feature = "mutant-undo-forgets-landing",
));

/// Runs `seed`: with its own mutation built in it must violate `property`; without
/// any mutation it must keep every property.
fn judged(seed: u64, old_logic: bool, property: &str) {
    let report = soc_sim::run(soc_sim::Scenario::generate(seed).without_events(), false);
    let found: Vec<String> = report.violations.iter().map(ToString::to_string).collect();
    if old_logic {
        assert!(
            report.violations.iter().any(|v| v.property == property),
            "the old logic must violate {property} on seed {seed}; found {found:?}"
        );
    } else if !MUTANT {
        assert!(found.is_empty(), "seed {seed}: {}", found.join("\n"));
    }
}

/// Bug 1: a `503` rollback wrote the previous request back over another holder's live
/// lease while that holder was putting the newer request on the device. With the undo's
/// lease check removed, seed 408 lets the restored older request R2 land after the newer
/// R4 had landed (S2). The seeds were re-found with `scripts/sim-mutants` on the final
/// code (the generator changed since the first ones); `scripts/sim --seed 408` with
/// `SIM_FEATURES=mutant-undo-ignores-lease` shows the interleaving.
#[test]
fn a_503_rollback_never_writes_over_another_holders_live_lease() {
    judged(408, cfg!(feature = "mutant-undo-ignores-lease"), "S2");
}

/// Bug 2: the POST PUT on the lease its accepting write took (the old lease: device
/// timeout + 10 s, from a clock reading before slow ledger calls) without renewing it:
/// the PUT outlived the lease and R1 landed after the newer R2 (seed 2,715, S2).
#[test]
fn a_put_never_starts_on_an_almost_spent_lease() {
    judged(2_715, cfg!(feature = "mutant-put-on-caller-lease"), "S2");
}

/// Bug 3: expiry was written over a live lease, and the last re-check straddled expiry:
/// the sweep wrote R4 expired while its PUT landed (seed 38,059, S4).
#[test]
fn expiry_is_never_written_over_a_put_that_lands() {
    judged(38_059, cfg!(feature = "mutant-expiry-over-lease"), "S4");
}

/// The ambiguous write: the accepting write committed but timed out, and the POST answered
/// `503` ("nothing was kept") while the ledger held the request (seed 118, S4).
#[test]
fn an_accepting_write_of_unknown_outcome_is_read_back_before_answering() {
    judged(118, cfg!(feature = "mutant-no-read-back"), "S4");
}

/// A PUT that timed out released the lease at once although it could still land: it
/// landed after a later PUT, and the ledger says R4 applied while the device holds R3
/// (seed 330, S1).
#[test]
fn a_timed_out_put_keeps_the_lease_until_it_can_no_longer_land() {
    judged(330, cfg!(feature = "mutant-transient-releases-lease"), "S1");
}

/// Found by the long run (seed 823,533 of 1,000,000): post#3 PUT R2 and it landed, but its
/// bookkeeping write lost to post#5's accepting write of R4, so post#3 converged to R4
/// (answering `200 applied` for R2); post#5's send failed and its undo put R2 back as it
/// had read it, *pending*; the device stayed offline and the sweep wrote R2 `expired`
/// although it was on the device. The converging holder now notes R2 in R4's record
/// (`landed`), and the undo restores R2 as applied.
#[test]
fn an_undo_restores_a_request_that_landed_meanwhile_as_applied() {
    judged(823_533, cfg!(feature = "mutant-undo-forgets-landing"), "S4");
}
