//! P5: the timer sweep over N *due* pending requests with device latency L and
//! concurrency C, against the ideal N·L/C. The requests are seeded through the real HTTP
//! path with a 1 s back-off; their wake-up messages are never delivered, so each is
//! overdue 2 s later and the sweep checks all N in-process (the fan-out threshold is
//! set above N: P5 measures the sweep's own device calls; S1 measures the index).
//!
//! P5m is the same sweep with the ledger and the queue in memory (`functions::fakes`,
//! every operation counted at the port) and the same device latency in real time: the
//! handler's own share, without Azurite or the Service Bus stand-in.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use chrono::Utc;
use devtools::devhost::payloads;
use serde_json::Value;

use crate::env::Env;
use crate::http::{request, Conn};
use crate::procs::cpu_time;
use crate::report::{row, Row};
use crate::s2_offline_calls::{counted_harness, policy_with};
use crate::seed;
use crate::LATENCY_MS;

pub async fn run(
    env: &Env,
    n: usize,
    c: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    eprintln!("bench: P5 sweep N={n} C={c}: seeding through the handler");
    let table = format!("benchsweep{n}");
    let n_str = n.to_string();
    let h = env.start_handler_with(
        &table,
        c,
        &[
            ("SOC_RECHECK_INITIAL_SECONDS", "1"),
            ("SOC_RECHECK_MAX_SECONDS", "1"),
            ("DRAIN_SOC_FANOUT_ABOVE", &n_str),
            ("DRAIN_SOC_MAX_DUE", &n_str),
        ],
    )?;
    env.stub.online.store(false, Ordering::SeqCst);
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    // Seed: N offline POSTs through the real HTTP path (ledger in Azurite + wake-up message).
    let t0 = Instant::now();
    seed::offline_posts(h.port, "sweep-", n, br#"{"dod":70}"#).await?;
    let seed_time = t0.elapsed();

    let timer = payloads::timer_envelope("DrainSocTimer", "timer", None, false, Utc::now())
        .to_value()
        .to_string();
    let req = request(
        "POST",
        "/DrainSocTimer",
        &[("Content-Type", "application/json")],
        timer.as_bytes(),
    );
    let handler_pid = h.pid();
    let sweep = |latency: u64| {
        let req = req.clone();
        async move {
            // Every request's (undelivered) wake-up message overdue: due after 1 s + 1 s grace.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            env.stub.latency_ms.store(latency, Ordering::SeqCst);
            env.stub.reset_counters();
            let mut conn = Conn::connect(h.port).await?;
            let cpu = || {
                [
                    cpu_time(handler_pid),
                    cpu_time(env.azurite.pid()),
                    cpu_time(std::process::id()),
                ]
            };
            let before = cpu();
            let (r, t) = conn.timed(&req).await?;
            let after = cpu();
            let used: Vec<f64> = after
                .iter()
                .zip(before)
                .map(|(a, b)| a.saturating_sub(b).as_secs_f64())
                .collect();
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let log = v["Logs"][0].as_str().unwrap_or("").to_string();
            ensure!(r.status == 200, "sweep: {} {log}", r.status);
            ensure!(
                log.contains(&format!("due={n} ")) && log.contains(&format!("resent={n} ")),
                "sweep did not check every request: {log}"
            );
            let (gets, puts) = env.stub.calls();
            ensure!(
                gets == n as u64 && puts == 0,
                "device calls {gets} GET {puts} PUT"
            );
            anyhow::Ok((t, env.stub.max_in_flight.load(Ordering::SeqCst), used))
        }
    };
    eprintln!("bench: P5 sweep N={n} C={c}: sweeping");
    let (t0_lat, _, cpu0) = sweep(0).await?;
    let (t, inflight, cpu) = sweep(LATENCY_MS).await?;
    let ideal = Duration::from_millis(LATENCY_MS) * n as u32 / c as u32;
    let ratio = t.as_secs_f64() / ideal.as_secs_f64();
    rows.push(
        row(
            "P5",
            format!(
                "sweep N={n} L={LATENCY_MS} ms C={c} (ideal {:.3} s)",
                ideal.as_secs_f64()
            ),
            format!("{:.3} s", t.as_secs_f64()),
        )
        .ratio(ratio)
        .target("≤ 1.15x ideal", ratio <= 1.15),
    );
    notes.push(format!(
        "P5 N={n} C={c}: seeding {n} offline requests through POST took {:.1} s; the same sweep with L=0 takes {:.3} s (listing {n} due index entries from Azurite + our per-device work, re-sends included); max device calls in flight {inflight}",
        seed_time.as_secs_f64(),
        t0_lat.as_secs_f64()
    ));
    // Where the time goes: CPU seconds per process during each sweep (the driver runs the
    // Service Bus stand-in, the device stub and the client).
    for (latency, used) in [(0, &cpu0), (LATENCY_MS, &cpu)] {
        notes.push(format!(
            "P5 N={n} C={c} L={latency} ms CPU: handler {:.2} s, Azurite {:.2} s, driver (Service Bus stand-in, device stub, client) {:.2} s",
            used[0], used[1], used[2]
        ));
    }
    Ok(())
}

/// P5m: the P5 sweep over the in-memory ports, in real time on this thread (the device's
/// status calls take L each): the handler's own time against N·L/C, and what the sweep
/// asks of the ledger and the queue per device.
pub async fn run_in_memory(
    n: usize,
    c: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    use soc_settings::functions::drain_soc_timer;
    use soc_settings::functions::fakes::post_min_soc;

    eprintln!("bench: P5m sweep N={n} C={c} over in-memory ports");
    let (n_str, c_str) = (n.to_string(), c.to_string());
    let (h, ops) = counted_harness(policy_with(&[
        ("SOC_RECHECK_INITIAL_SECONDS", "1"),
        ("SOC_RECHECK_MAX_SECONDS", "1"),
        ("DRAIN_SOC_FANOUT_ABOVE", &n_str),
        ("DRAIN_SOC_MAX_DUE", &n_str),
        ("DRAIN_SOC_CONCURRENCY", &c_str),
        ("DEVICE_API_MAX_CALLS_PER_SECOND", "100000"),
    ])?);
    h.device.set_default_online(false);
    for i in 0..n {
        let posted = post_min_soc(&h, &format!("sweep-{i}"), 30).await;
        ensure!(posted["status"] == "pending", "P5m: {posted}");
    }
    let mut measured = Vec::new();
    for latency in [0, LATENCY_MS] {
        // The wake-up messages are never delivered: every request is overdue.
        h.queue.take_sent();
        h.clock.advance(chrono::Duration::milliseconds(2500));
        h.device.set_status_latency(Duration::from_millis(latency));
        let before = (
            ops.snapshot(),
            h.device.calls(),
            cpu_time(std::process::id()),
        );
        let t0 = Instant::now();
        let report = drain_soc_timer::run(&h.svc).await?;
        let t = t0.elapsed();
        let cpu = cpu_time(std::process::id()).saturating_sub(before.2);
        let after = (ops.snapshot(), h.device.calls());
        let sent = h.queue.sent().len();
        ensure!(
            report.due == n && report.resent == n,
            "P5m: the sweep did not check every request: {report:?}"
        );
        ensure!(
            after.1 .0 - before.1 .0 == n,
            "P5m: {} status calls",
            after.1 .0 - before.1 .0
        );
        let per = |a: u64, b: u64| (a - b) as f64 / n as f64;
        let (o, b) = (after.0, before.0);
        measured.push((
            latency,
            t,
            cpu,
            per(o.0, b.0),
            per(o.1, b.1),
            o.2 - b.2,
            sent,
        ));
    }
    let ideal = Duration::from_millis(LATENCY_MS) * n as u32 / c as u32;
    let (_, t, ..) = measured[1];
    let ratio = t.as_secs_f64() / ideal.as_secs_f64();
    rows.push(
        row(
            "P5m",
            format!(
                "sweep N={n} L={LATENCY_MS} ms C={c}, ledger and queue in memory (ideal {:.3} s)",
                ideal.as_secs_f64()
            ),
            format!("{:.3} s", t.as_secs_f64()),
        )
        .ratio(ratio)
        .target("≤ 1.15x ideal", ratio <= 1.15),
    );
    for (latency, t, cpu, reads, writes, queries, sent) in measured {
        notes.push(format!(
            "P5m N={n} C={c} L={latency} ms: {:.3} s, handler code CPU {:.2} s ({:.0} µs per device); per device {reads:.2} ledger reads and {writes:.2} writes, {queries} queries in all, {sent} wake-up messages sent",
            t.as_secs_f64(),
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / n as f64
        ));
    }
    Ok(())
}
