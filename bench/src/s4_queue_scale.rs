//! S4: applies per second through the queue path with 1, 2, 4 `handler` processes sharing one
//! ledger table (how throughput scales with instances), and S4b: the same with the
//! device-call budget on, showing the fleet ceiling holds whatever the process count.
//!
//! Per process count N: a fresh table; K devices get a pending request through the real
//! `POST /api/devices/{id}/soc` while the stub says offline (a ledger record and a wake-up
//! message each); then the stub says online and each wake-up message is delivered once as a
//! `POST /SocQueueTrigger` host invocation (`payloads::servicebus_envelope`, built before the
//! clock starts), spread over the N processes with the host's concurrency: 16 deliveries in
//! flight per process (`host.json` `maxConcurrentCalls`), each on its own keep-alive
//! connection. Every delivery must answer `200` with an `applied ...` log, and the stub must
//! see exactly K PUTs. Applies/s = K / wall time from the first delivery to the last answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::Value;

use crate::env::Env;
use crate::envelopes::sb_envelope;
use crate::http::{request, Conn};
use crate::procs::{cpu_time, Proc};
use crate::report::{row, Row};
use crate::seed;
use crate::QUEUE;

/// Deliveries in flight per process: `host.json` `extensions.serviceBus.maxConcurrentCalls`.
pub const MAX_CONCURRENT_CALLS: usize = 16;

/// What one S4 run is asked to do.
pub struct Scale {
    /// Pending requests (devices) per process count.
    pub devices: usize,
    /// Device stub latency on every call.
    pub latency_ms: u64,
    /// Process counts to compare.
    pub procs: Vec<usize>,
    /// S4b: the fleet ceiling (`DEVICE_API_MAX_CALLS_PER_SECOND`) and the devices per run;
    /// `None` skips S4b.
    pub budget: Option<(u32, usize)>,
}

struct Measured {
    applies: usize,
    wall: Duration,
    handler_cpu: Duration,
    azurite_cpu: Duration,
}

pub async fn run(env: &Env, s: &Scale, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let mut base_rate = None;
    for &n in &s.procs {
        let m = measure(env, n, s.devices, s.latency_ms, None).await?;
        let rate = m.applies as f64 / m.wall.as_secs_f64();
        let base = *base_rate.get_or_insert(rate);
        rows.push(
            row(
                "S4",
                format!(
                    "queue path, K={} L={} ms, {n} proc × {MAX_CONCURRENT_CALLS}: applies/s",
                    s.devices, s.latency_ms
                ),
                format!("{rate:.0}/s"),
            )
            .ratio(rate / base),
        );
        notes.push(format!(
            "S4 N={n}: {} applies in {:.2} s; CPU: handlers {:.1} s together, Azurite {:.1} s (of {:.1} s wall × {} cores)",
            m.applies,
            m.wall.as_secs_f64(),
            m.handler_cpu.as_secs_f64(),
            m.azurite_cpu.as_secs_f64(),
            m.wall.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, |c| c.get())
        ));
    }
    if let Some((ceiling, devices)) = s.budget {
        for &n in &s.procs {
            let m = measure(env, n, devices, s.latency_ms, Some(ceiling)).await?;
            // The buckets start full: one second's worth of the ceiling may go at once.
            // Past that burst, the calls must keep to the ceiling.
            let steady = m.applies.saturating_sub(ceiling as usize) as f64 / m.wall.as_secs_f64();
            rows.push(
                row(
                    "S4b",
                    format!(
                        "… budget {ceiling}/s shared by {n} proc (DEVICE_API_INSTANCES={n}): device calls/s past the burst"
                    ),
                    format!("{steady:.0}/s"),
                )
                .target(format!("≤ {ceiling}/s"), steady <= f64::from(ceiling) * 1.02),
            );
            notes.push(format!(
                "S4b N={n}: {} PUTs in {:.2} s ({:.0}/s overall, burst included) with DEVICE_API_MAX_CALLS_PER_SECOND={ceiling}, DEVICE_API_INSTANCES={n} (each process {:.1}/s, burst {})",
                m.applies,
                m.wall.as_secs_f64(),
                m.applies as f64 / m.wall.as_secs_f64(),
                f64::from(ceiling) / n as f64,
                ((f64::from(ceiling) / n as f64).floor() as u64).max(1)
            ));
        }
    }
    Ok(())
}

/// Seeds `k` pending requests in a fresh table, then delivers their wake-up messages to `n`
/// processes, `MAX_CONCURRENT_CALLS` at a time each; returns the applies and the time taken.
async fn measure(
    env: &Env,
    n: usize,
    k: usize,
    latency_ms: u64,
    ceiling: Option<u32>,
) -> Result<Measured> {
    let tag = match ceiling {
        None => format!("scale{n}"),
        Some(c) => format!("scale{n}b{c}"),
    };
    eprintln!("bench: S4 {tag}: {n} handler(s), seeding {k} pending requests");
    let table = format!("bench{tag}");
    let mut vars = env.handler_env(&table, 16);
    if let Some(c) = ceiling {
        vars.retain(|(k, _)| k != "DEVICE_API_MAX_CALLS_PER_SECOND");
        vars.push(("DEVICE_API_MAX_CALLS_PER_SECOND".into(), c.to_string()));
        vars.push(("DEVICE_API_INSTANCES".into(), n.to_string()));
    }
    let procs: Vec<Proc> = (0..n)
        .map(|_| env.start_handler_env(&vars))
        .collect::<Result<_>>()?;

    env.stub.online.store(false, Ordering::SeqCst);
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    let prefix = format!("{tag}-");
    seed::offline_posts(procs[0].port, &prefix, k, br#"{"minSoc":35}"#).await?;

    // The latest wake-up message of each device, as the host would deliver it.
    let mut latest: std::collections::BTreeMap<String, devtools::servicebus::StoredMessage> =
        Default::default();
    for m in env.broker.messages(QUEUE) {
        let Ok(body) = serde_json::from_slice::<Value>(&m.body()) else {
            continue;
        };
        let Some(device) = body["deviceId"].as_str() else {
            continue;
        };
        if device.starts_with(&prefix) {
            let keep = latest
                .get(device)
                .is_none_or(|o| o.sequence_number < m.sequence_number);
            if keep {
                latest.insert(device.to_string(), m);
            }
        }
    }
    ensure!(
        latest.len() == k,
        "{tag}: {} wake-up messages for {k} devices",
        latest.len()
    );
    let envelopes: Arc<Vec<Vec<u8>>> = Arc::new(
        latest
            .values()
            .map(|m| {
                request(
                    "POST",
                    "/SocQueueTrigger",
                    &[("Content-Type", "application/json")],
                    &sb_envelope(m),
                )
            })
            .collect(),
    );

    if ceiling.is_some() {
        // Seeding spent tokens (each offline POST tries a PUT): let every bucket fill up, so
        // the run starts with the whole burst the budget allows.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    env.stub.online.store(true, Ordering::SeqCst);
    env.stub.latency_ms.store(latency_ms, Ordering::SeqCst);
    env.stub.reset_counters();
    eprintln!("bench: S4 {tag}: delivering {k} wake-up messages");
    let cpu = || {
        (
            procs.iter().map(|p| cpu_time(p.pid())).sum::<Duration>(),
            cpu_time(env.azurite.pid()),
        )
    };
    let cpu0 = cpu();
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for p in &procs {
        for _ in 0..MAX_CONCURRENT_CALLS {
            let (port, next, envelopes) = (p.port, next.clone(), envelopes.clone());
            workers.push(tokio::spawn(async move {
                let mut conn = Conn::connect(port).await?;
                let mut applied = 0usize;
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(req) = envelopes.get(i) else {
                        return anyhow::Ok(applied);
                    };
                    let r = conn.send(req).await?;
                    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                    let log = v["Logs"][0].as_str().unwrap_or("");
                    ensure!(
                        r.status == 200 && log.starts_with("applied"),
                        "delivery {i}: {} {log}",
                        r.status
                    );
                    applied += 1;
                }
            }));
        }
    }
    let mut applies = 0;
    for w in workers {
        applies += w.await??;
    }
    let wall = t0.elapsed();
    let cpu1 = cpu();
    let (gets, puts) = env.stub.calls();
    ensure!(
        // One PUT per device, and (verified apply, issue 21) at most one confirmation read.
        applies == k && puts == k as u64 && gets <= k as u64,
        "{tag}: {applies} applied, device calls {gets} GET {puts} PUT (expected {k} PUTs, at most {k} GETs)"
    );
    Ok(Measured {
        applies,
        wall,
        handler_cpu: cpu1.0 - cpu0.0,
        azurite_cpu: cpu1.1 - cpu0.1,
    })
}
