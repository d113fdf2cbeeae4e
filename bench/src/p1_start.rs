//! P1: start time, `handler` against the echo baseline: spawn → first `200` to `GET /`,
//! alternating which binary goes first; median and p99.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use testkit::free_port;

use crate::env::Env;
use crate::procs::spawn_ready;
use crate::report::{ms, percentile, row, Row};

pub fn run(env: &Env, starts: usize, rows: &mut Vec<Row>) -> Result<()> {
    eprintln!("bench: P1 {starts} starts each");
    let henv = env.handler_env("benchstart", 16);
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for i in 0..starts {
        // Alternate which binary goes first so drift hits both alike.
        for which in [i % 2, 1 - i % 2] {
            let (bin, e): (&Path, &[(String, String)]) = if which == 0 {
                (&env.handler, &henv)
            } else {
                (&env.baseline, &[])
            };
            let (p, t) = spawn_ready(bin, e, free_port())?;
            drop(p);
            if which == 0 {
                ours.push(t)
            } else {
                base.push(t)
            }
        }
    }
    ours.sort();
    base.sort();
    let (m, b) = (percentile(&ours, 0.5), percentile(&base, 0.5));
    rows.push(
        row("P1", "start → first GET / (median)", ms(m))
            .base(ms(b))
            .ratio(m.as_secs_f64() / b.as_secs_f64()),
    );
    let (p, bp) = (percentile(&ours, 0.99), percentile(&base, 0.99));
    rows.push(
        row(
            "P1",
            format!("start → first GET / (p99, n={starts})"),
            ms(p),
        )
        .base(ms(bp))
        .ratio(p.as_secs_f64() / bp.as_secs_f64())
        .target("≤ 25 ms", p <= Duration::from_millis(25)),
    );
    Ok(())
}
