//! Child processes (handler, baseline) and /proc readings. Free ports and Azurite come from
//! `testkit`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child that is killed when dropped.
pub struct Proc {
    pub child: Child,
    pub port: u16,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `bin` with exactly `env` (plus PATH) and waits for the first `200` to `GET /`,
/// polling every 100 µs. Returns the process and the time from spawn to that answer.
pub fn spawn_ready(bin: &Path, env: &[(String, String)], port: u16) -> Result<(Proc, Duration)> {
    let t0 = Instant::now();
    let child = Command::new(bin)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let mut proc = Proc { child, port };
    let deadline = t0 + Duration::from_secs(10);
    loop {
        if let Ok(200) = crate::http::probe_root(port) {
            return Ok((proc, t0.elapsed()));
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            bail!("{} exited early: {status}", bin.display());
        }
        if Instant::now() > deadline {
            bail!("{} not ready after 10 s", bin.display());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// `(VmRSS, VmHWM)` in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// User + system CPU time of a process so far (clock ticks of 10 ms, the Linux default).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // After ")": state(0) ppid(1) ... utime(11) stime(12)
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}
