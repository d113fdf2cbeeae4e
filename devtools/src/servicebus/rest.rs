//! The REST front end: `POST /{queue}/messages` (single or batch "Send Message"), and
//! `GET /_devhost/queues` (inspection).
//!
//! Invariants:
//! - Nothing is enqueued unless the `Authorization` SAS token verifies for `{queue}/messages`
//!   (else 401); a send to a missing queue is 404, a malformed request 400, success 201 — errors
//!   have Service Bus' XML error body.
//! - `BrokerProperties` maps to broker properties; every other header not in
//!   [`NON_PROPERTY_HEADERS`] becomes a custom property (JSON-typed when it parses as JSON).
//! - A batch is applied item by item: the items before a failing one stay enqueued (as sent).

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{Map, Value};

use super::auth::authorize;
use super::broker::{Broker, QueueNotFound, QueueSnapshot};
use super::message::SendRequest;
use crate::server::ServerHandle;

impl Broker {
    /// The REST router (`POST /{queue}/messages` and `GET /_devhost/queues`).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/_devhost/queues", get(rest_snapshot))
            .route("/{queue}/messages", post(rest_send))
            .with_state(self.clone())
    }

    /// Serve the REST endpoint on `addr` (`127.0.0.1:0` for a free port).
    pub async fn serve(&self, addr: SocketAddr) -> anyhow::Result<ServerHandle> {
        crate::server::serve(addr, self.router(), "Service Bus stand-in").await
    }
}

fn xml_error(status: StatusCode, detail: &str) -> Response {
    (
        status,
        [("content-type", "application/xml; charset=utf-8")],
        format!(
            "<Error><Code>{}</Code><Detail>{}</Detail></Error>",
            status.as_u16(),
            detail
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        ),
    )
        .into_response()
}

/// Headers that are part of HTTP or the REST protocol, not custom message properties.
const NON_PROPERTY_HEADERS: &[&str] = &[
    "authorization",
    "brokerproperties",
    "content-type",
    "content-length",
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
    "transfer-encoding",
    "x-ms-retrypolicy",
    "traceparent",
    "tracestate",
    "expect",
];

async fn rest_send(
    State(b): State<Broker>,
    Path(queue): Path<String>,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let cfg = b.config();
    let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        tracing::warn!(queue, "servicebus: send without Authorization -> 401");
        return xml_error(
            StatusCode::UNAUTHORIZED,
            "MissingToken: the Authorization header is required",
        );
    };
    if let Err(e) = authorize(
        auth,
        cfg,
        Utc::now().timestamp(),
        &format!("{queue}/messages"),
    ) {
        tracing::warn!(queue, "servicebus: send rejected -> 401: {e}");
        return xml_error(StatusCode::UNAUTHORIZED, &format!("InvalidToken: {e}"));
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut requests = Vec::new();
    if content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("application/vnd.microsoft.servicebus.json"))
    {
        // Send Message Batch: [{"Body": "...", "BrokerProperties": {...}, "UserProperties": {...}}]
        let items: Vec<Value> = match serde_json::from_slice(&body) {
            Ok(Value::Array(a)) => a,
            _ => return xml_error(StatusCode::BAD_REQUEST, "batch body must be a JSON array"),
        };
        for it in items {
            let body = it
                .get("Body")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .as_bytes()
                .to_vec();
            let bp = it
                .get("BrokerProperties")
                .and_then(|v| v.as_object())
                .cloned()
                .unwrap_or_default();
            let up = it
                .get("UserProperties")
                .and_then(|v| v.as_object())
                .cloned()
                .unwrap_or_default();
            requests.push(SendRequest {
                body,
                content_type: bp
                    .get("ContentType")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                broker_properties: bp,
                application_properties: up,
            });
        }
    } else {
        let bp = match headers.get("brokerproperties") {
            None => Map::new(),
            Some(v) => match v
                .to_str()
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
            {
                Some(Value::Object(m)) => m,
                _ => {
                    return xml_error(
                        StatusCode::BAD_REQUEST,
                        "BrokerProperties header is not a JSON object",
                    )
                }
            },
        };
        let mut props = Map::new();
        for (name, value) in headers.iter() {
            let n = name.as_str();
            if NON_PROPERTY_HEADERS.contains(&n) {
                continue;
            }
            if let Ok(v) = value.to_str() {
                // Custom properties: JSON-typed when the value parses as JSON (quoted strings,
                // numbers, booleans), else the raw text.
                let parsed = serde_json::from_str::<Value>(v).unwrap_or(Value::String(v.into()));
                props.insert(n.to_string(), parsed);
            }
        }
        requests.push(SendRequest {
            body: body.to_vec(),
            content_type,
            broker_properties: bp,
            application_properties: props,
        });
    }
    for r in requests {
        match b.send(&queue, r) {
            Ok(_) => {}
            Err(e) if e.downcast_ref::<QueueNotFound>().is_some() => {
                return xml_error(StatusCode::NOT_FOUND, &e.to_string());
            }
            Err(e) => {
                tracing::warn!(queue, "servicebus: send rejected -> 400: {e:#}");
                return xml_error(StatusCode::BAD_REQUEST, &format!("{e:#}"));
            }
        }
    }
    StatusCode::CREATED.into_response()
}

async fn rest_snapshot(State(b): State<Broker>) -> Json<Vec<QueueSnapshot>> {
    b.sweep();
    Json(b.snapshot())
}
