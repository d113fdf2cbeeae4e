//! S3: reconnect event → applied. N devices with a pending request (seeded through the
//! real `POST /api/devices/{id}/soc` while the device stub says offline, ledger in
//! Azurite); then the stub says online and the vendor's `com.vendor.device.connected`
//! CloudEvent for each device is POSTed to the handler's `DeviceEventsHttp` route
//! (forwarded HTTP, as the host sends it), one at a time. The latency of one event is
//! from sending it until its answer says `applied`: `DeviceEventsHttp` answers after the
//! device PUT landed and the ledger says applied.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::Value;

use crate::env::Env;
use crate::http::{request, Conn};
use crate::report::{ms, percentile, row, Row};
use crate::seed;
use crate::LATENCY_MS;

pub async fn run(env: &Env, n: usize, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    eprintln!("bench: S3 reconnect events: seeding {n} pending requests");
    let h = env.start_handler("benchevents", 16)?;
    env.stub.online.store(false, Ordering::SeqCst);
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    seed::offline_posts(h.port, "ev-", n, br#"{"minSoc":35}"#).await?;

    eprintln!("bench: S3 reconnect events: {n} connected events, device latency {LATENCY_MS} ms");
    env.stub.online.store(true, Ordering::SeqCst);
    env.stub.latency_ms.store(LATENCY_MS, Ordering::SeqCst);
    env.stub.reset_counters();
    let mut conn = Conn::connect(h.port).await?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let event = serde_json::json!({
            "specversion": "1.0",
            "id": format!("bench-{i}"),
            "source": "/vendor/bench",
            "type": "com.vendor.device.connected",
            "subject": format!("ev-{i:05}"),
        })
        .to_string();
        let req = request(
            "POST",
            "/api/device-events",
            &[("Content-Type", "application/cloudevents+json")],
            event.as_bytes(),
        );
        let t = Instant::now();
        let r = conn.send(&req).await?;
        let took = t.elapsed();
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        ensure!(
            r.status == 200 && v["events"][0]["result"] == "applied",
            "event {i}: {} {v}",
            r.status
        );
        times.push(took);
    }
    let (_, puts) = env.stub.calls();
    ensure!(puts == n as u64, "{puts} PUTs for {n} events");
    times.sort();
    let p99 = percentile(&times, 0.99);
    rows.push(
        row(
            "S3",
            format!("reconnect event → applied, {n} events (device {LATENCY_MS} ms, Azurite)"),
            format!(
                "p50 {}, p99 {}, max {}",
                ms(percentile(&times, 0.5)),
                ms(p99),
                ms(*times.last().unwrap_or(&Duration::ZERO))
            ),
        )
        .target("p99 ≤ 1 s", p99 <= Duration::from_secs(1)),
    );
    notes.push(format!(
        "S3: each event's time includes the device stub's {LATENCY_MS} ms PUT and the ledger reads and writes in Azurite (read, lease write, answer write); {puts} PUTs for {n} events"
    ));
    Ok(())
}
