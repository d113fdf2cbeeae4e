//! The bare baseline for the benchmarks: listens where a custom handler would
//! (`127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT`), answers `GET /` like `handler`'s readiness
//! probe, and echoes every other request's body back as JSON. No state, no I/O.

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let app = Router::new()
        .route(
            "/",
            get(|| async { Json(serde_json::json!({ "status": "ready" })) }),
        )
        .fallback(echo);
    axum::serve(listener, app).await.expect("serve");
}

async fn echo(body: Bytes) -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/json")], body)
}
