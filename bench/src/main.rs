//! The benchmark driver behind `scripts/bench`. Measures the release `handler` side by
//! side with a bare axum echo server (`echo-baseline`) built in the same run, and prints
//! one table. Everything is on 127.0.0.1; every loop is bounded in count or time.
//!
//! Settings (environment):
//! - `BENCH_LOAD_SECS` (60): duration of the R4 load run;
//! - `BENCH_FUZZ_SECS` (60): duration of the bounded fuzz run;
//! - `BENCH_STARTS` (60): starts per binary for P1;
//! - `BENCH_SWEEPS` (`1000:16,10000:64`): the P5 sweeps as `N:C` pairs (L is 50 ms);
//! - `BENCH_SCALE` (`1000,10000,100000`): the pending counts P of S1 (1% of each due);
//! - `BENCH_EVENTS` (1000): reconnect events of S3;
//! - `BENCH_ONLY` (all): a comma list of the rows to run, e.g. `S1,S2` or `P5`; a list of
//!   in-memory rows only (`S2`, `S5`) starts no process and needs no release binaries;
//! - `BENCH_FLEET` (`100000,1000000`), `BENCH_FLEET_SCENARIOS` (`steady,burst`),
//!   `BENCH_FLEET_DAYS` (8), `BENCH_FLEET_CSV` (a folder for per-run records): S5, the
//!   fleet week, which runs only when `BENCH_ONLY` names it (it takes many minutes);
//! - `BENCH_SCALE_DEVICES` (2000): pending requests per S4 run; `0` skips S4;
//! - `BENCH_SCALE_PROCS` (`1,2,4`): the S4 handler process counts;
//! - `BENCH_SCALE_LATENCY_MS` (50): device stub latency in S4;
//! - `BENCH_SCALE_BUDGET` (`100:1000`): S4b's fleet ceiling and requests per run as `C:K`;
//!   `0` skips S4b;
//! - `CARGO_TARGET_DIR`: where the release binaries are (default `target/`).
//!
//! One module per measurement (`p1_start` … `p6_cost`, `r4_load`, `s1_sweep_scale`, `s2_offline_calls`, `s3_reconnect`, `s4_queue_scale`, `s5_fleet_week`, `fuzz_run`), each adding rows
//! to the [`report`] table; the shared pieces are [`env`] (the processes every measurement
//! uses), [`latency`] (side-by-side and closed-loop timing), [`envelopes`] (host payloads),
//! [`http`] (a minimal keep-alive client), [`procs`] and [`stub`] (the device cloud stub).

mod env;
mod envelopes;
mod fuzz_run;
mod http;
mod latency;
mod p1_start;
mod p2_overhead;
mod p3_memory;
mod p4_size;
mod p5_sweep;
mod p6_cost;
mod procs;
mod r4_load;
mod report;
mod s1_sweep_scale;
mod s2_offline_calls;
mod s3_reconnect;
mod s4_queue_scale;
mod s5_fleet_week;
mod seed;
mod stub;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use chrono::Utc;
use devtools::servicebus::{Broker, BrokerConfig};
use testkit::azurite::Azurite;
use testkit::free_port;

use env::Env;
use report::{print_table, Row};
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

/// Rows that run the functions over in-memory ports: they need no process.
const IN_MEMORY: [&str; 3] = ["P5M", "S2", "S5"];

/// `BENCH_SWEEPS`: the P5 sweeps as (N, C).
fn sweeps() -> Vec<(usize, usize)> {
    std::env::var("BENCH_SWEEPS")
        .unwrap_or_else(|_| "1000:16,10000:64".into())
        .split(',')
        .filter_map(|p| {
            let (n, c) = p.split_once(':')?;
            Some((n.trim().parse().ok()?, c.trim().parse().ok()?))
        })
        .collect()
}

/// `BENCH_ONLY`'s row ids, upper-cased; `None`: every row.
fn only() -> Option<Vec<String>> {
    std::env::var("BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_uppercase()).collect())
}

fn wanted(only: &Option<Vec<String>>, id: &str) -> bool {
    only.as_ref().is_none_or(|o| o.iter().any(|w| w == id))
}

/// Rows that run only when `BENCH_ONLY` names them (long ones).
fn named(only: &Option<Vec<String>>, id: &str) -> bool {
    only.as_ref().is_some_and(|o| o.iter().any(|w| w == id))
}

fn main() -> Result<()> {
    let only = only();
    if only
        .as_ref()
        .is_some_and(|o| o.iter().all(|id| IN_MEMORY.contains(&id.as_str())))
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        return rt.block_on(in_memory(&only));
    }
    let root = testkit::repo_root();
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
    let sweeps = sweeps();
    let events = env_num("BENCH_EVENTS", 1000) as usize;
    let scale_sizes: Vec<usize> = std::env::var("BENCH_SCALE")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let list = |name: &str, default: &str| -> Vec<usize> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect()
    };
    let scale = s4_queue_scale::Scale {
        devices: env_num("BENCH_SCALE_DEVICES", 2000) as usize,
        latency_ms: env_num("BENCH_SCALE_LATENCY_MS", LATENCY_MS),
        procs: list("BENCH_SCALE_PROCS", "1,2,4"),
        budget: std::env::var("BENCH_SCALE_BUDGET")
            .unwrap_or_else(|_| "100:1000".into())
            .split_once(':')
            .and_then(|(c, k)| Some((c.trim().parse().ok()?, k.trim().parse().ok()?)))
            .filter(|&(c, k): &(u32, usize)| c > 0 && k > 0),
    };

    eprintln!("bench: starting Azurite, the Service Bus stand-in and the device stub");
    let azurite = Azurite::try_start().map_err(anyhow::Error::msg)?;
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

    let only = only();
    let wanted = |id: &str| wanted(&only, id);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    // A failing row still prints the rows measured before it.
    let outcome: Result<()> = async {
        if wanted("P1") {
            p1_start::run(&env, starts, &mut rows)?;
        }
        if wanted("P4") {
            p4_size::run(&env, &mut rows, &mut notes)?;
        }
        if wanted("P2") || wanted("P3") || wanted("R4") {
            p2_p3_r4(&env, load_secs, &mut rows, &mut notes).await?;
        }
        if wanted("P6") {
            p6_cost::run(&env, &mut rows).await?;
        }
        if wanted("P5") {
            for &(n, c) in &sweeps {
                p5_sweep::run(&env, n, c, &mut rows, &mut notes).await?;
            }
        }
        if wanted("P5M") {
            for &(n, c) in &sweeps {
                p5_sweep::run_in_memory(n, c, &mut rows, &mut notes).await?;
            }
        }
        if wanted("S2") {
            s2_offline_calls::run(&mut rows, &mut notes).await?;
        }
        if named(&only, "S5") {
            s5_fleet_week::run(&mut rows, &mut notes)?;
        }
        if wanted("S3") {
            s3_reconnect::run(&env, events, &mut rows, &mut notes).await?;
        }
        if wanted("S4") && scale.devices > 0 {
            s4_queue_scale::run(&env, &scale, &mut rows, &mut notes).await?;
        }
        if wanted("FUZZ") {
            fuzz_run::run(&env, fuzz_secs, &mut rows, &mut notes).await?;
        }
        // S1 last: its 100,000-row tables make the in-memory Azurite slow for what runs after.
        if wanted("S1") {
            s1_sweep_scale::run(&env, &scale_sizes, &mut rows, &mut notes).await?;
        }

        Ok(())
    }
    .await;
    sb_server.shutdown().await;
    print_report(&rows, &notes, &outcome);
    outcome
}

/// The in-memory rows alone (`BENCH_ONLY=S5`, `S2,S5`): no Azurite, no broker, no stub.
async fn in_memory(only: &Option<Vec<String>>) -> Result<()> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let outcome: Result<()> = async {
        if wanted(only, "P5M") {
            for (n, c) in sweeps() {
                p5_sweep::run_in_memory(n, c, &mut rows, &mut notes).await?;
            }
        }
        if wanted(only, "S2") {
            s2_offline_calls::run(&mut rows, &mut notes).await?;
        }
        if named(only, "S5") {
            s5_fleet_week::run(&mut rows, &mut notes)?;
        }
        Ok(())
    }
    .await;
    print_report(&rows, &notes, &outcome);
    outcome
}

/// The table and its notes; a failed row's error last.
fn print_report(rows: &[Row], notes: &[String], outcome: &Result<()>) {
    println!();
    println!(
        "SoC settings handler benchmark — {} — nproc {}, {}",
        Utc::now().format("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!();
    print_table(rows);
    println!();
    for n in notes {
        println!("- {n}");
    }
    if let Err(e) = outcome {
        println!();
        println!("- STOPPED: {e:#}");
    }
}

/// P2, P3 and R4 share one `handler` and one baseline process: P3 reads their memory idle,
/// then after P2 and R4 have run on them.
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
    p3_memory::idle(&ours, &base, rows);
    p2_overhead::run(env, &ours, &base, rows).await?;
    r4_load::run(env, &ours, &base, load_secs, rows, notes).await?;
    p3_memory::peak(&ours, &base, rows);
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
