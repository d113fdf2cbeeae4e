//! Latency measurement on keep-alive connections: two servers side by side (sequential), and a
//! closed-loop load (`conns` connections, each sending its next request when the last answered).
//! Every loop is bounded by a count or a deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::http::Conn;
use crate::report::percentile;

/// Sorted latencies of one series and the answers that were not the expected status.
pub struct Latencies {
    sorted: Vec<Duration>,
    pub errors: usize,
}

impl Latencies {
    pub fn from(mut v: Vec<Duration>, errors: usize) -> Self {
        v.sort();
        Self { sorted: v, errors }
    }
    pub fn p(&self, q: f64) -> Duration {
        percentile(&self.sorted, q)
    }
}

/// `rounds` × `per_round` sequential requests on one keep-alive connection to each
/// server, alternating which goes first. Returns (handler, baseline).
pub async fn side_by_side(
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

/// Closed-loop load: `conns` connections, each sending its own request until `until`.
pub async fn load(
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
