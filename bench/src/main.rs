//! The benchmark driver behind `scripts/bench`. Measures the release `handler` side by
//! side with a bare axum echo server (`echo-baseline`) built in the same run, and prints
//! one table. Everything is on 127.0.0.1; every loop is bounded in count or time.
//!
//! Settings (environment):
//! - `BENCH_LOAD_SECS` (60): duration of the R4 load run;
//! - `BENCH_FUZZ_SECS` (60): duration of the bounded fuzz run;
//! - `BENCH_STARTS` (60): starts per binary for P1;
//! - `BENCH_SWEEPS` (`1000:16,10000:64`): the P5 sweeps as `N:C` pairs (L is 50 ms);
//! - `CARGO_TARGET_DIR`: where the release binaries are (default `target/`).

mod http;
mod procs;
mod stub;

#[path = "../../tests/support/fuzz.rs"]
mod fuzz;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use chrono::Utc;
use devtools::devhost::payloads::{self, HttpIn};
use devtools::servicebus::{json_send, Broker, BrokerConfig, Delivery, StoredMessage};
use serde_json::{json, Value};

use http::{request, Conn};
use procs::{cpu_time, free_port, memory_kib, spawn_ready, Azurite, Proc};
use stub::Stub;

const QUEUE: &str = "soc-settings";
const SB_KEY_NAME: &str = "RootManageSharedAccessKey";
const SB_KEY: &str = "YmVuY2gtb25seS1rZXktbm90LWEtc2VjcmV0";
const LATENCY_MS: u64 = 50;
const LOAD_CONNECTIONS: usize = 32;

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ------------------------------------------------------------------ statistics

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ------------------------------------------------------------------ the table

struct Row {
    id: &'static str,
    metric: String,
    ours: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

fn row(id: &'static str, metric: impl Into<String>, ours: impl Into<String>) -> Row {
    Row {
        id,
        metric: metric.into(),
        ours: ours.into(),
        baseline: String::new(),
        ratio: String::new(),
        target: String::new(),
        met: None,
    }
}

impl Row {
    fn base(mut self, b: impl Into<String>) -> Self {
        self.baseline = b.into();
        self
    }
    fn ratio(mut self, r: f64) -> Self {
        self.ratio = format!("{r:.2}x");
        self
    }
    fn target(mut self, t: impl Into<String>, met: bool) -> Self {
        self.target = t.into();
        self.met = Some(met);
        self
    }
}

fn print_table(rows: &[Row]) {
    let headers = [
        "id", "metric", "handler", "baseline", "ratio", "target", "met",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                r.id.to_string(),
                r.metric.clone(),
                r.ours.clone(),
                r.baseline.clone(),
                r.ratio.clone(),
                r.target.clone(),
                match r.met {
                    Some(true) => "yes".into(),
                    Some(false) => "NO".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let mut width = headers.map(|h| h.chars().count());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            width[i] = width[i].max(s.chars().count());
        }
    }
    let line = |cols: &[String]| {
        let parts: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = width[i]))
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(&headers.map(String::from));
    println!(
        "|{}|",
        width
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    for c in &cells {
        line(c);
    }
}

// ------------------------------------------------------------------ the environment

struct Env {
    root: PathBuf,
    handler: PathBuf,
    baseline: PathBuf,
    scratch: PathBuf,
    azurite: Azurite,
    broker: Broker,
    stub: Arc<Stub>,
    stub_url: String,
    sb_port: u16,
}

impl Env {
    fn handler_env(&self, table: &str, concurrency: usize) -> Vec<(String, String)> {
        [
            ("AzureWebJobsStorage", self.azurite.connection_string()),
            (
                "ServiceBusConnection",
                format!(
                    "Endpoint=sb://127.0.0.1:{};SharedAccessKeyName={SB_KEY_NAME};SharedAccessKey={SB_KEY};UseDevelopmentEmulator=true",
                    self.sb_port
                ),
            ),
            ("SOC_QUEUE_NAME", QUEUE.into()),
            ("SOC_STATE_TABLE", table.into()),
            ("DEVICE_API_BASE_URL", self.stub_url.clone()),
            ("DEVICE_API_KEY", "bench-key".into()),
            ("DRAIN_SOC_CONCURRENCY", concurrency.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn start_handler(&self, table: &str, concurrency: usize) -> Result<Proc> {
        let (p, _) = spawn_ready(
            &self.handler,
            &self.handler_env(table, concurrency),
            free_port(),
        )?;
        Ok(p)
    }

    fn start_baseline(&self) -> Result<Proc> {
        let (p, _) = spawn_ready(&self.baseline, &[], free_port())?;
        Ok(p)
    }
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let handler = target.join("release/handler");
    let baseline = target.join("release/echo-baseline");
    for b in [&handler, &baseline] {
        ensure!(
            b.exists(),
            "{} missing: build with scripts/bench",
            b.display()
        );
    }
    let scratch = std::env::temp_dir().join(format!("soc-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(root, handler, baseline, scratch.clone()));
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn run(root: PathBuf, handler: PathBuf, baseline: PathBuf, scratch: PathBuf) -> Result<()> {
    let load_secs = env_num("BENCH_LOAD_SECS", 60);
    let fuzz_secs = env_num("BENCH_FUZZ_SECS", 60);
    let starts = env_num("BENCH_STARTS", 60) as usize;
    let sweeps: Vec<(usize, usize)> = std::env::var("BENCH_SWEEPS")
        .unwrap_or_else(|_| "1000:16,10000:64".into())
        .split(',')
        .filter_map(|p| {
            let (n, c) = p.split_once(':')?;
            Some((n.trim().parse().ok()?, c.trim().parse().ok()?))
        })
        .collect();

    eprintln!("bench: starting Azurite, the Service Bus stand-in and the device stub");
    let azurite = Azurite::start(&root, &scratch)?;
    let mut bc = BrokerConfig::new(scratch.join("servicebus"), SB_KEY_NAME, SB_KEY);
    bc.queues = vec![QUEUE.into()];
    let broker = Broker::open(bc)?;
    let sb_port = free_port();
    let sb_server = broker
        .serve(std::net::SocketAddr::from(([127, 0, 0, 1], sb_port)))
        .await?;
    let stub = Arc::new(Stub::default());
    let stub_url = stub::serve(stub.clone()).await?;
    let env = Env {
        root,
        handler,
        baseline,
        scratch,
        azurite,
        broker,
        stub,
        stub_url,
        sb_port,
    };

    let mut rows = Vec::new();
    let mut notes = Vec::new();
    p1_start(&env, starts, &mut rows)?;
    p4_size(&env, &mut rows, &mut notes)?;
    p2_p3_r4(&env, load_secs, &mut rows, &mut notes).await?;
    p6_cost(&env, &mut rows).await?;
    for (n, c) in sweeps {
        p5_sweep(&env, n, c, &mut rows, &mut notes).await?;
    }
    fuzz_run(&env, fuzz_secs, &mut rows, &mut notes).await?;

    sb_server.shutdown().await;
    println!();
    println!(
        "SoC settings handler benchmark — {} — nproc {}, {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!();
    print_table(&rows);
    println!();
    for n in notes {
        println!("- {n}");
    }
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

// ------------------------------------------------------------------ P1 start

fn p1_start(env: &Env, starts: usize, rows: &mut Vec<Row>) -> Result<()> {
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

// ------------------------------------------------------------------ P4 size

fn p4_size(env: &Env, rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    let size = std::fs::metadata(&env.handler)?.len();
    let base_size = std::fs::metadata(&env.baseline)?.len();
    // The release profile strips already; strip a copy to prove it.
    let copy = env.scratch.join("handler.stripped");
    std::fs::copy(&env.handler, &copy)?;
    let stripped = match std::process::Command::new("strip").arg(&copy).status() {
        Ok(s) if s.success() => std::fs::metadata(&copy)?.len(),
        _ => size,
    };
    let mb = |b: u64| format!("{:.2} MB", b as f64 / 1e6);
    rows.push(
        row("P4", "stripped release binary", mb(stripped))
            .base(mb(base_size))
            .target("≤ 12 MB", stripped <= 12_000_000),
    );
    if stripped != size {
        notes.push(format!(
            "P4: target/release/handler is {size} bytes; `strip` makes it {stripped}"
        ));
    }
    let package = env.root.join("scripts/package");
    let (zip, how) = if std::env::var("BENCH_PACKAGE").as_deref() == Ok("1") {
        // The real publish build (cargo zigbuild against glibc 2.31): a second release build.
        let st = std::process::Command::new(&package)
            .current_dir(&env.root)
            .status()?;
        ensure!(st.success(), "scripts/package failed");
        (
            env.root.join("publish.zip"),
            "scripts/package (zigbuild, glibc 2.31)".to_string(),
        )
    } else {
        // What scripts/package zips (host.json, handler, <Function>/function.json, deflate),
        // around the release handler built here; then checked by `scripts/package --verify`.
        let stage = env.scratch.join("publish");
        for f in ["SetSocHttp", "SocQueueTrigger", "DrainSocTimer"] {
            std::fs::create_dir_all(stage.join(f))?;
            std::fs::copy(
                env.root.join(f).join("function.json"),
                stage.join(f).join("function.json"),
            )?;
        }
        std::fs::copy(env.root.join("host.json"), stage.join("host.json"))?;
        std::fs::copy(&copy, stage.join("handler"))?;
        let zip = env.scratch.join("publish.zip");
        let script = "import os, sys, zipfile\n\
            with zipfile.ZipFile(sys.argv[1], 'w', zipfile.ZIP_DEFLATED) as z:\n\
            \x20   for root, _, files in os.walk('.'):\n\
            \x20       for name in sorted(files):\n\
            \x20           p = os.path.join(root, name)\n\
            \x20           z.write(p, os.path.relpath(p, '.'))\n";
        let st = std::process::Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&zip)
            .current_dir(&stage)
            .status()
            .context("python3 for the zip")?;
        ensure!(st.success(), "zipping failed");
        let mut how = "the zip step of scripts/package around target/release/handler".to_string();
        if package.exists() {
            let st = std::process::Command::new(&package)
                .arg("--verify")
                .arg(&zip)
                .stdout(std::process::Stdio::null())
                .status()?;
            ensure!(st.success(), "scripts/package --verify rejected the zip");
            how.push_str(", layout verified by `scripts/package --verify` (BENCH_PACKAGE=1 runs the full scripts/package)");
        }
        (zip, how)
    };
    let zsize = std::fs::metadata(&zip)?.len();
    rows.push(row("P4", "publish zip", mb(zsize)).target("≤ 5 MB", zsize <= 5_000_000));
    notes.push(format!("P4: publish zip built with {how}"));
    Ok(())
}

// ------------------------------------------------------------------ P2, P3, R4

struct Latencies {
    sorted: Vec<Duration>,
    errors: usize,
}

impl Latencies {
    fn from(mut v: Vec<Duration>, errors: usize) -> Self {
        v.sort();
        Self { sorted: v, errors }
    }
    fn p(&self, q: f64) -> Duration {
        percentile(&self.sorted, q)
    }
}

/// `rounds` × `per_round` sequential requests on one keep-alive connection to each
/// server, alternating which goes first. Returns (handler, baseline).
async fn side_by_side(
    ours: u16,
    base: u16,
    req_ours: &[u8],
    req_base: &[u8],
    expect_ours: u16,
    rounds: usize,
    per_round: usize,
) -> Result<(Latencies, Latencies)> {
    let mut co = Conn::connect(ours).await?;
    let mut cb = Conn::connect(base).await?;
    for _ in 0..500 {
        co.send(req_ours).await?;
        cb.send(req_base).await?;
    }
    let (mut lo, mut lb, mut errors) = (Vec::new(), Vec::new(), 0usize);
    for r in 0..rounds {
        for first in [r % 2 == 0, r % 2 == 1] {
            if first {
                for _ in 0..per_round {
                    let (resp, t) = co.timed(req_ours).await?;
                    errors += usize::from(resp.status != expect_ours);
                    lo.push(t);
                }
            } else {
                for _ in 0..per_round {
                    let (resp, t) = cb.timed(req_base).await?;
                    errors += usize::from(resp.status != 200);
                    lb.push(t);
                }
            }
        }
    }
    Ok((Latencies::from(lo, errors), Latencies::from(lb, 0)))
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

fn delivery_of(m: &StoredMessage) -> Delivery {
    let mut message = m.clone();
    message.delivery_count = message.delivery_count.max(1);
    Delivery {
        queue: QUEUE.into(),
        message,
        lock_token: uuid::Uuid::new_v4(),
        locked_until: Utc::now() + chrono::Duration::minutes(5),
    }
}

fn sb_envelope(m: &StoredMessage) -> Vec<u8> {
    payloads::servicebus_envelope(
        "SocQueueTrigger",
        "msg",
        Some("binary"),
        &delivery_of(m),
        "127.0.0.1",
        "bench",
        Utc::now(),
    )
    .to_value()
    .to_string()
    .into_bytes()
}

fn set_soc_envelope(device: &str, body: &[u8]) -> Vec<u8> {
    let r = HttpIn {
        method: "POST".into(),
        path: format!("/api/devices/{device}/soc"),
        query: None,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_vec(),
        has_length: true,
        params: vec![("deviceId".into(), device.into())],
        key_level: Some("Function".into()),
    };
    payloads::http_envelope("SetSocHttp", "req", &r, Utc::now())
        .to_value()
        .to_string()
        .into_bytes()
}

/// Closed-loop load: `conns` connections, each sending its own request until `until`.
async fn load(
    port: u16,
    conns: usize,
    until: Instant,
    make: impl Fn(usize, u64) -> Vec<u8> + Send + Sync + 'static,
    expect: u16,
) -> Result<(Latencies, u64)> {
    let make = Arc::new(make);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let mut errors = 0usize;
            let mut conn = Conn::connect(port).await.ok();
            let mut i = 0u64;
            while Instant::now() < until {
                let req = make(c, i);
                i += 1;
                let Some(cn) = conn.as_mut() else {
                    errors += 1;
                    conn = Conn::connect(port).await.ok();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                match cn.timed(&req).await {
                    Ok((resp, t)) => {
                        lat.push(t);
                        errors += usize::from(resp.status != expect);
                    }
                    Err(_) => {
                        errors += 1;
                        conn = None;
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let n = all.len() as u64;
    Ok((Latencies::from(all, errors), n))
}

async fn p2_p3_r4(
    env: &Env,
    load_secs: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    eprintln!("bench: P2 invocation overhead, P3 memory, R4 load ({load_secs} s)");
    let ours = env.start_handler("benchload", 16)?;
    let base = env.start_baseline()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle, _) = memory_kib(ours.pid());
    let (base_idle, _) = memory_kib(base.pid());
    rows.push(
        row("P3", "RSS idle after start", mib(idle))
            .base(mib(base_idle))
            .target("≤ 15 MB", idle * 1024 <= 15_000_000),
    );

    // (a) forwarded HTTP, rejected input: 400 problem+json, no I/O.
    let bad = br#"{"minSoc":101}"#;
    let fwd = request(
        "POST",
        "/api/devices/bat-1/soc",
        &[("Content-Type", "application/json")],
        bad,
    );
    let r = Conn::connect(ours.port).await?.send(&fwd).await?;
    ensure!(
        r.status == 400 && r.content_type == "application/problem+json",
        "forwarded invalid input: {} {}",
        r.status,
        r.content_type
    );
    let (o, b) = side_by_side(ours.port, base.port, &fwd, &fwd, 400, 10, 2000).await?;
    overhead_rows(rows, "forwarded POST, invalid body → 400", &o, &b);

    // (b) the same request as a SetSocHttp invocation envelope.
    let envl = set_soc_envelope("bat-1", bad);
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

    // (c) a SocQueueTrigger delivery that is a no-op (not a wake-up message: dropped).
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

    // R4b: the rejected-input path under the R4 concurrency, both servers: our own cost.
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

    // R4: the real HTTP path, device online and fast: status + ledger writes + PUT → 200.
    env.stub.online.store(true, Ordering::SeqCst);
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    env.stub.reset_counters();
    // R4c: the same real path on one connection: the per-request floor without queueing.
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
    env.stub.reset_counters();
    let cpu0 = (
        cpu_time(ours.pid()),
        cpu_time(env.azurite.proc.pid()),
        cpu_time(std::process::id()),
    );
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
    let cpu1 = (
        cpu_time(ours.pid()),
        cpu_time(env.azurite.proc.pid()),
        cpu_time(std::process::id()),
    );
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
    let (_, peak) = memory_kib(ours.pid());
    let (_, base_peak) = memory_kib(base.pid());
    rows.push(
        row("P3", "peak RSS (VmHWM) after P2 + R4", mib(peak))
            .base(mib(base_peak))
            .target("≤ 40 MB", peak * 1024 <= 40_000_000),
    );
    Ok(())
}

// ------------------------------------------------------------------ P6 cost

async fn post_soc(port: u16, device: &str, min_soc: u8) -> Result<http::Response> {
    let req = request(
        "POST",
        &format!("/api/devices/{device}/soc"),
        &[("Content-Type", "application/json")],
        format!("{{\"minSoc\":{min_soc}}}").as_bytes(),
    );
    Ok(Conn::connect(port).await?.send(&req).await?)
}

fn messages_for(broker: &Broker, device: &str) -> Vec<StoredMessage> {
    let mut v: Vec<StoredMessage> = broker
        .messages(QUEUE)
        .into_iter()
        .filter(|m| {
            serde_json::from_slice::<Value>(&m.body())
                .map(|b| b["deviceId"] == device)
                .unwrap_or(false)
        })
        .collect();
    v.sort_by_key(|m| m.sequence_number);
    v
}

async fn p6_cost(env: &Env, rows: &mut Vec<Row>) -> Result<()> {
    eprintln!("bench: P6 cost of an offline request");
    let h = env.start_handler("benchcost", 16)?;
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    // "Applied after k re-checks": k = 0 is a device online at the POST (applied at
    // once); k >= 1 is an offline POST whose k-th wake-up delivery finds the device
    // back (the k-1 before it find it still offline).
    for k in [0usize, 1, 3] {
        let device = format!("cost-k{k}");
        env.stub.online.store(k == 0, Ordering::SeqCst);
        env.stub.reset_counters();
        let r = post_soc(h.port, &device, 40).await?;
        let expected = if k == 0 { 200 } else { 202 };
        ensure!(
            r.status == expected,
            "POST: {} (expected {expected})",
            r.status
        );
        let deliver = |online: bool| {
            let device = device.clone();
            async move {
                env.stub.online.store(online, Ordering::SeqCst);
                let m = messages_for(&env.broker, &device)
                    .pop()
                    .context("no wake-up message")?;
                let req = request(
                    "POST",
                    "/SocQueueTrigger",
                    &[("Content-Type", "application/json")],
                    &sb_envelope(&m),
                );
                let r = Conn::connect(h.port).await?.send(&req).await?;
                ensure!(r.status == 200, "delivery: {}", r.status);
                anyhow::Ok(())
            }
        };
        for _ in 1..k {
            deliver(false).await?;
        }
        if k > 0 {
            deliver(true).await?;
        }
        let get = request("GET", &format!("/api/devices/{device}/soc"), &[], b"");
        let r = Conn::connect(h.port).await?.send(&get).await?;
        let v: Value = serde_json::from_slice(&r.body)?;
        ensure!(v["status"] == "applied", "not applied: {v}");
        let sends = messages_for(&env.broker, &device).len() as u64;
        let (gets, puts) = env.stub.calls();
        let bound = k as u64 + 1;
        rows.push(
            row(
                "P6",
                format!("applied after k={k} re-checks: Service Bus sends"),
                sends.to_string(),
            )
            .target(format!("≤ {bound}"), sends <= bound),
        );
        rows.push(
            row(
                "P6",
                format!("applied after k={k} re-checks: device calls (GET + PUT)"),
                format!("{} ({gets} + {puts})", gets + puts),
            )
            .target(format!("≤ {bound}"), gets + puts <= bound),
        );
    }
    Ok(())
}

// ------------------------------------------------------------------ P5 sweep

async fn p5_sweep(
    env: &Env,
    n: usize,
    c: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    eprintln!("bench: P5 sweep N={n} C={c}: seeding through the handler");
    let table = format!("benchsweep{n}");
    let h = env.start_handler(&table, c)?;
    env.stub.online.store(false, Ordering::SeqCst);
    env.stub.latency_ms.store(0, Ordering::SeqCst);
    // Seed: N offline POSTs through the real HTTP path (ledger in Azurite + wake-up message).
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..LOAD_CONNECTIONS {
        let next = next.clone();
        let port = h.port;
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(port).await?;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return anyhow::Ok(());
                }
                let req = request(
                    "POST",
                    &format!("/api/devices/sweep-{i:05}/soc"),
                    &[("Content-Type", "application/json")],
                    br#"{"dod":70}"#,
                );
                let r = conn.send(&req).await?;
                ensure!(r.status == 202, "seed {i}: {}", r.status);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
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
    let sweep = |latency: u64| {
        let req = req.clone();
        async move {
            env.stub.latency_ms.store(latency, Ordering::SeqCst);
            env.stub.reset_counters();
            let mut conn = Conn::connect(h.port).await?;
            let (r, t) = conn.timed(&req).await?;
            let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            let log = v["Logs"][0].as_str().unwrap_or("").to_string();
            ensure!(r.status == 200, "sweep: {} {log}", r.status);
            ensure!(
                log.contains(&format!("pending={n} "))
                    && log.contains(&format!("still_offline={n} ")),
                "sweep did not check every request: {log}"
            );
            let (gets, puts) = env.stub.calls();
            ensure!(
                gets == n as u64 && puts == 0,
                "device calls {gets} GET {puts} PUT"
            );
            anyhow::Ok((t, env.stub.max_in_flight.load(Ordering::SeqCst)))
        }
    };
    eprintln!("bench: P5 sweep N={n} C={c}: sweeping");
    let (t0_lat, _) = sweep(0).await?;
    let (t, inflight) = sweep(LATENCY_MS).await?;
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
        "P5 N={n} C={c}: seeding {n} offline requests through POST took {:.1} s; the same sweep with L=0 takes {:.3} s (listing {n} pending rows from Azurite + our per-device work); max device calls in flight {inflight}",
        seed_time.as_secs_f64(),
        t0_lat.as_secs_f64()
    ));
    Ok(())
}

// ------------------------------------------------------------------ fuzz

async fn fuzz_run(
    env: &Env,
    secs: u64,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
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
