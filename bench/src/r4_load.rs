//! R4: load. R4b: the rejected-input path (no I/O) under the R4 concurrency, `handler` and the
//! echo baseline: our own cost. R4c: the real accepting path on one connection: the per-request
//! floor without queueing. R4: the real path (status check, ledger writes in Azurite, device
//! PUT → 200) on `LOAD_CONNECTIONS` connections for `BENCH_LOAD_SECS`, with CPU per process.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::env::Env;
use crate::http::request;
use crate::latency::load;
use crate::p2_overhead::invalid_forwarded_request;
use crate::procs::{cpu_time, Proc};
use crate::report::{ms, row, Row};
use crate::LOAD_CONNECTIONS;

pub async fn run(
    env: &Env,
    ours: &Proc,
    base: &Proc,
    load_secs: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    rejected_input(ours, base, load_secs, rows, notes).await?;
    // The real HTTP path, device online and fast: status + ledger writes + PUT → 200.
    env.stub.online.store(true, Ordering::SeqCst);
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    env.stub.reset_counters();
    one_connection_floor(ours, load_secs, rows, notes).await?;
    env.stub.reset_counters();
    accepting_path(env, ours, load_secs, rows, notes).await
}

/// R4b: the rejected-input path under the R4 concurrency, both servers.
async fn rejected_input(
    ours: &Proc,
    base: &Proc,
    load_secs: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let fwd = invalid_forwarded_request();
    let secs = load_secs.clamp(1, 10);
    let mut r4b = Vec::new();
    for port in [ours.port, base.port] {
        let f = fwd.clone();
        let expect = if port == ours.port { 400 } else { 200 };
        let (l, n) = load(
            port,
            LOAD_CONNECTIONS,
            Instant::now() + Duration::from_secs(secs),
            move |_, _| f.clone(),
            expect,
        )
        .await?;
        r4b.push((l, n));
    }
    let ((ol, on), (bl, bn)) = (&r4b[0], &r4b[1]);
    rows.push(
        row(
            "R4b",
            format!("{LOAD_CONNECTIONS} conns, invalid body → 400 (no I/O), {secs} s: p50 / p99"),
            format!("{} / {}", ms(ol.p(0.5)), ms(ol.p(0.99))),
        )
        .base(format!("{} / {}", ms(bl.p(0.5)), ms(bl.p(0.99))))
        .ratio(ol.p(0.99).as_secs_f64() / bl.p(0.99).as_secs_f64()),
    );
    notes.push(format!(
        "R4b: {on} requests ({:.0}/s, {} errors) vs baseline {bn} ({:.0}/s)",
        *on as f64 / secs as f64,
        ol.errors,
        *bn as f64 / secs as f64
    ));
    Ok(())
}

/// R4c: the real path on one connection: one request's own latency.
async fn one_connection_floor(
    ours: &Proc,
    load_secs: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let floor_secs = load_secs.clamp(1, 5);
    let (l1, n1) = load(
        ours.port,
        1,
        Instant::now() + Duration::from_secs(floor_secs),
        |_, i| {
            request(
                "POST",
                "/api/devices/floor-1/soc",
                &[("Content-Type", "application/json")],
                format!("{{\"minSoc\":{}}}", i % 101).as_bytes(),
            )
        },
        200,
    )
    .await?;
    rows.push(row(
        "R4c",
        format!("1 conn, POST /api/devices/{{id}}/soc → 200, {floor_secs} s: p50 / p99"),
        format!("{} / {}", ms(l1.p(0.5)), ms(l1.p(0.99))),
    ));
    notes.push(format!(
        "R4c: {n1} requests, {} errors: one request's own latency (one device PUT, a ledger read and two conditional writes in Azurite)",
        l1.errors
    ));
    Ok(())
}

/// R4: the real path on `LOAD_CONNECTIONS` connections, with the CPU each process used.
async fn accepting_path(
    env: &Env,
    ours: &Proc,
    load_secs: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    // CPU used so far by the handler, Azurite and this process (client + device stub).
    let cpu = || {
        (
            cpu_time(ours.pid()),
            cpu_time(env.azurite.pid()),
            cpu_time(std::process::id()),
        )
    };
    let cpu0 = cpu();
    let t0 = Instant::now();
    let (l, n) = load(
        ours.port,
        LOAD_CONNECTIONS,
        t0 + Duration::from_secs(load_secs),
        |c, i| {
            request(
                "POST",
                &format!("/api/devices/load-{c}/soc"),
                &[("Content-Type", "application/json")],
                format!("{{\"minSoc\":{}}}", (c as u64 + i) % 101).as_bytes(),
            )
        },
        200,
    )
    .await?;
    let wall = t0.elapsed();
    let cpu1 = cpu();
    rows.push(
        row(
            "R4",
            format!("{LOAD_CONNECTIONS} conns, POST /api/devices/{{id}}/soc → 200, {load_secs} s: errors"),
            l.errors.to_string(),
        )
        .target("0", l.errors == 0),
    );
    rows.push(
        row(
            "R4",
            "… p50 / p99",
            format!("{} / {}", ms(l.p(0.5)), ms(l.p(0.99))),
        )
        .target("p99 ≤ 2 ms", l.p(0.99) <= Duration::from_millis(2)),
    );
    let per = |d: Duration| format!("{:.0} µs/req", d.as_secs_f64() * 1e6 / n.max(1) as f64);
    let (hs, hp) = env.stub.calls();
    notes.push(format!(
        "R4: {n} requests in {:.1} s ({:.0}/s), max {}; CPU: handler {:.1} s ({}), Azurite {:.1} s ({}), bench client+stub {:.1} s; device calls {hs} GET + {hp} PUT",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        ms(l.p(1.0)),
        (cpu1.0 - cpu0.0).as_secs_f64(),
        per(cpu1.0 - cpu0.0),
        (cpu1.1 - cpu0.1).as_secs_f64(),
        per(cpu1.1 - cpu0.1),
        (cpu1.2 - cpu0.2).as_secs_f64(),
    ));
    Ok(())
}
