//! P2: invocation overhead of `handler` against the echo baseline answering the same bytes, on
//! paths that do no I/O: (a) a forwarded HTTP request with an invalid body (400 problem+json),
//! (b) the same as a `SetSocHttp` invocation envelope, (c) a `SocQueueTrigger` delivery that is
//! a no-op. Each is first checked to get the expected answer, then timed side by side.

use anyhow::{ensure, Context, Result};
use devtools::servicebus::json_send;
use serde_json::{json, Value};

use crate::env::Env;
use crate::envelopes::{sb_envelope, set_soc_envelope};
use crate::http::{request, Conn};
use crate::latency::{side_by_side, Latencies};
use crate::procs::Proc;
use crate::report::{row, us, Row};
use crate::QUEUE;

const INVALID_BODY: &[u8] = br#"{"minSoc":101}"#;

/// `POST /api/devices/bat-1/soc` with an out-of-range value: rejected before any I/O.
pub fn invalid_forwarded_request() -> Vec<u8> {
    request(
        "POST",
        "/api/devices/bat-1/soc",
        &[("Content-Type", "application/json")],
        INVALID_BODY,
    )
}

pub async fn run(env: &Env, ours: &Proc, base: &Proc, rows: &mut Vec<Row>) -> Result<()> {
    forwarded_invalid(ours, base, rows).await?;
    envelope_invalid(ours, base, rows).await?;
    no_op_delivery(env, ours, base, rows).await
}

/// (a) forwarded HTTP, rejected input: 400 problem+json, no I/O.
async fn forwarded_invalid(ours: &Proc, base: &Proc, rows: &mut Vec<Row>) -> Result<()> {
    let fwd = invalid_forwarded_request();
    let r = Conn::connect(ours.port).await?.send(&fwd).await?;
    ensure!(
        r.status == 400 && r.content_type == "application/problem+json",
        "forwarded invalid input: {} {}",
        r.status,
        r.content_type
    );
    let (o, b) = side_by_side(ours.port, base.port, &fwd, &fwd, 400, 10, 2000).await?;
    overhead_rows(rows, "forwarded POST, invalid body → 400", &o, &b);
    Ok(())
}

/// (b) the same request as a SetSocHttp invocation envelope.
async fn envelope_invalid(ours: &Proc, base: &Proc, rows: &mut Vec<Row>) -> Result<()> {
    let envl = set_soc_envelope("bat-1", INVALID_BODY);
    let req = request(
        "POST",
        "/SetSocHttp",
        &[("Content-Type", "application/json")],
        &envl,
    );
    let r = Conn::connect(ours.port).await?.send(&req).await?;
    let v: Value = serde_json::from_slice(&r.body)?;
    ensure!(
        r.status == 200 && v["Outputs"]["res"]["statusCode"] == 400,
        "envelope invalid input: {} {v}",
        r.status
    );
    let (o, b) = side_by_side(ours.port, base.port, &req, &req, 200, 10, 2000).await?;
    overhead_rows(
        rows,
        "SetSocHttp envelope, invalid body → 400 in 200",
        &o,
        &b,
    );
    Ok(())
}

/// (c) a SocQueueTrigger delivery that is a no-op (not a wake-up message: dropped).
async fn no_op_delivery(env: &Env, ours: &Proc, base: &Proc, rows: &mut Vec<Row>) -> Result<()> {
    env.broker.send(
        QUEUE,
        json_send(&json!({"hello": "world"}), "bench-p2-noop", None),
    )?;
    let m = env
        .broker
        .messages(QUEUE)
        .into_iter()
        .find(|m| m.message_id == "bench-p2-noop")
        .context("no-op message")?;
    let req = request(
        "POST",
        "/SocQueueTrigger",
        &[("Content-Type", "application/json")],
        &sb_envelope(&m),
    );
    let r = Conn::connect(ours.port).await?.send(&req).await?;
    ensure!(
        r.status == 200 && String::from_utf8_lossy(&r.body).contains("dropped"),
        "no-op delivery: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    let (o, b) = side_by_side(ours.port, base.port, &req, &req, 200, 10, 2000).await?;
    overhead_rows(rows, "SocQueueTrigger no-op delivery", &o, &b);
    Ok(())
}

fn overhead_rows(rows: &mut Vec<Row>, what: &str, o: &Latencies, b: &Latencies) {
    let r50 = o.p(0.5).as_secs_f64() / b.p(0.5).as_secs_f64();
    let r99 = o.p(0.99).as_secs_f64() / b.p(0.99).as_secs_f64();
    rows.push(
        row("P2", format!("{what} p50"), us(o.p(0.5)))
            .base(us(b.p(0.5)))
            .ratio(r50)
            .target("≤ 1.25x", r50 <= 1.25 && o.errors == 0),
    );
    rows.push(
        row("P2", format!("{what} p99"), us(o.p(0.99)))
            .base(us(b.p(0.99)))
            .ratio(r99)
            .target("≤ 1.5x", r99 <= 1.5 && o.errors == 0),
    );
}
