//! F: the bounded fuzz run of the payload parsers (`testkit::fuzz`, the long version of the
//! run in `tests/robustness.rs`). Any panic is a finding; a run of no input is an error.

use std::time::Duration;

use anyhow::{bail, Result};
use testkit::fuzz;

use crate::env::Env;
use crate::report::{row, Row};

pub async fn run(env: &Env, secs: u64, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    eprintln!("bench: fuzzing the parsers for {secs} s");
    let root = env.root.clone();
    let report = tokio::task::spawn_blocking(move || {
        let seeds = fuzz::seeds(&root);
        fuzz::run(&seeds, 0xbe7c_4001, Duration::from_secs(secs), u64::MAX)
    })
    .await?;
    rows.push(
        row(
            "F",
            format!(
                "fuzz {:.0} s: {} inputs, {} distinct outcomes",
                report.elapsed.as_secs_f64(),
                report.execs,
                report.outcomes
            ),
            format!("{} panics", report.findings.len()),
        )
        .target("0 panics", report.findings.is_empty()),
    );
    notes.push(format!(
        "fuzz: {} readable envelopes, {} valid setting bodies among the inputs; pool {}",
        report.envelopes_ok, report.settings_ok, report.pool
    ));
    for f in &report.findings {
        notes.push(format!(
            "fuzz finding in {}: {} — input {:?}",
            f.target,
            f.message,
            String::from_utf8_lossy(&f.input)
        ));
    }
    if report.execs == 0 {
        bail!("the fuzzer ran no input");
    }
    Ok(())
}
