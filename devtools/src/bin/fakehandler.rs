//! `fakehandler` — a tiny custom handler used by devtools' own tests (NOT the product).
//! Logs every request it receives as a JSON line to `$FAKE_HANDLER_LOG`, plus one `startup`
//! line with its environment. Behaviour via app settings:
//! - `FAKE_CRASH=1`: exit(3) at once (crash-restart tests)
//! - `FAKE_SB_FAIL_FIRST=n`: fail the first n Service Bus invocations with 500
//! - `FAKE_SB_MODE=ok|fail|empty|text`: how to answer Service Bus invocations after that
//! - `FAKE_HTTP_EXIT=1`: exit(3) on a forwarded HTTP request instead of answering (the
//!   connection closes under devhost)

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

struct St {
    sb_calls: AtomicU64,
}

fn log(v: &Value) {
    if let Ok(p) = std::env::var("FAKE_HANDLER_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{v}");
        }
    }
}

async fn any(State(st): State<Arc<St>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body: Bytes = axum::body::to_bytes(body, 1 << 26)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    if path == "/" && parts.method == "GET" {
        return StatusCode::OK.into_response();
    }
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    let body_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    log(&json!({
        "kind": "request",
        "method": parts.method.as_str(),
        "path": path,
        "query": parts.uri.query(),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "json": body_json,
    }));
    println!("fakehandler: {} {}", parts.method, path);
    if path.starts_with("/api/") && std::env::var("FAKE_HTTP_EXIT").as_deref() == Ok("1") {
        std::process::exit(3);
    }
    let ok = || {
        (
            [("content-type", "application/json")],
            r#"{"Outputs":{},"Logs":["fake ok"],"ReturnValue":null}"#,
        )
            .into_response()
    };
    match path.as_str() {
        "/SocQueueTrigger" => {
            let n = st.sb_calls.fetch_add(1, Ordering::SeqCst);
            let fail_first: u64 = std::env::var("FAKE_SB_FAIL_FIRST")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if n < fail_first {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            match std::env::var("FAKE_SB_MODE").as_deref().unwrap_or("ok") {
                "fail" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                "empty" => {
                    (StatusCode::OK, [("content-type", "application/json")], "").into_response()
                }
                "text" => (StatusCode::OK, [("content-type", "text/plain")], "{}").into_response(),
                _ => ok(),
            }
        }
        "/DrainSocTimer" => ok(),
        "/SetSocHttp" => {
            // envelope mode: answer through Outputs.res
            let device = body_json["Metadata"]["deviceId"].clone();
            (
                [("content-type", "application/json")],
                json!({
                    "Outputs": {"res": {
                        "statusCode": 202,
                        "headers": {"Content-Type": "application/json", "X-Fake": "yes"},
                        "body": {"device": device}
                    }},
                    "Logs": [],
                    "ReturnValue": null
                })
                .to_string(),
            )
                .into_response()
        }
        p if p.starts_with("/api/") => (
            StatusCode::CREATED,
            [
                ("content-type", "application/json"),
                ("x-fake", "forwarded"),
            ],
            json!({"path": p, "method": parts.method.as_str()}).to_string(),
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::main]
async fn main() {
    let env: serde_json::Map<String, Value> =
        std::env::vars().map(|(k, v)| (k, json!(v))).collect();
    log(&json!({"kind": "startup", "pid": std::process::id(), "env": env}));
    if std::env::var("FAKE_CRASH").as_deref() == Ok("1") {
        std::process::exit(3);
    }
    let port: u16 = std::env::var("FUNCTIONS_CUSTOMHANDLER_PORT")
        .expect("FUNCTIONS_CUSTOMHANDLER_PORT")
        .parse()
        .expect("port");
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let app = Router::new().fallback(any).with_state(Arc::new(St {
        sb_calls: AtomicU64::new(0),
    }));
    axum::serve(listener, app).await.expect("serve");
}
