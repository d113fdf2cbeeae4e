//! Seeding pending requests through the real HTTP path: `n` offline POSTs to
//! `/api/devices/{prefix}{i:05}/soc` (a ledger record and a wake-up message each) over
//! [`LOAD_CONNECTIONS`] keep-alive connections. A `503` means "not kept, try again" (the
//! API contract), so a POST answered `503` is retried a few times; anything but `202` fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};

use crate::http::{request, Conn};
use crate::LOAD_CONNECTIONS;

pub async fn offline_posts(port: u16, prefix: &str, n: usize, body: &'static [u8]) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..LOAD_CONNECTIONS {
        let next = next.clone();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::connect(port).await?;
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return anyhow::Ok(());
                }
                let req = request(
                    "POST",
                    &format!("/api/devices/{prefix}{i:05}/soc"),
                    &[("Content-Type", "application/json")],
                    body,
                );
                let mut r = conn.send(&req).await?;
                for _ in 0..5 {
                    if r.status != 503 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    r = conn.send(&req).await?;
                }
                ensure!(r.status == 202, "seed {i}: {}", r.status);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
