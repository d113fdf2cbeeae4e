//! An in-bench device cloud stub (the contract of docs/device-api.md, nothing more):
//! a settable latency before every answer, one online flag for all devices, and call
//! counters including the most calls in flight at once.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::json;

#[derive(Default)]
pub struct Stub {
    pub latency_ms: AtomicU64,
    pub online: AtomicBool,
    pub status_calls: AtomicU64,
    pub put_calls: AtomicU64,
    in_flight: AtomicI64,
    pub max_in_flight: AtomicI64,
}

impl Stub {
    pub fn reset_counters(&self) {
        self.status_calls.store(0, Ordering::SeqCst);
        self.put_calls.store(0, Ordering::SeqCst);
        self.max_in_flight.store(0, Ordering::SeqCst);
    }

    pub fn calls(&self) -> (u64, u64) {
        (
            self.status_calls.load(Ordering::SeqCst),
            self.put_calls.load(Ordering::SeqCst),
        )
    }

    async fn wait(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let ms = self.latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn status(State(s): State<Arc<Stub>>, Path(id): Path<String>) -> impl IntoResponse {
    s.status_calls.fetch_add(1, Ordering::SeqCst);
    s.wait().await;
    Json(json!({"deviceId": id, "online": s.online.load(Ordering::SeqCst), "minSoc": null}))
}

async fn apply(
    State(s): State<Arc<Stub>>,
    Path(id): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> impl IntoResponse {
    s.put_calls.fetch_add(1, Ordering::SeqCst);
    s.wait().await;
    if s.online.load(Ordering::SeqCst) {
        (
            StatusCode::OK,
            Json(json!({"deviceId": id, "minSoc": body["minSoc"], "applied": true})),
        )
    } else {
        (
            StatusCode::CONFLICT,
            Json(json!({"error": "device offline"})),
        )
    }
}

/// Serves the stub on a free loopback port; returns its base URL.
pub async fn serve(stub: Arc<Stub>) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/devices/{id}", get(status))
        .route("/devices/{id}/settings/min-soc", put(apply))
        .with_state(stub);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{addr}"))
}
