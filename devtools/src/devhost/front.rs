//! devhost's HTTP front end: an axum `Router` with devhost's own pages and admin endpoint, and a
//! fallback that routes everything else to the HTTP-triggered functions.
//!
//! - `GET /_devhost/queues`: every message with its fate ([`super::queues`]); pretty JSON, or an
//!   HTML table when the client asks for `text/html` (a browser).
//! - `GET /_devhost/events[?subject=S][&subjectBeginsWith=P]`: the events the app published to the Event Grid topic
//!   stand-in ([`super::events`]), oldest first; JSON or HTML likewise.
//! - `GET /_devhost/status`, `GET /admin/host/status`: handler state, pid, restarts.
//! - `POST /admin/functions/{name}` (master key): fire a function now, `202` at once.
//! - anything else: matched against the functions' route templates under `routePrefix`
//!   (function.json semantics, which axum's router cannot express: case-insensitive literals,
//!   `{p?}`, `{p:constraint}`, `{*rest}`), then `authLevel` (`401`, empty body), then the
//!   methods (`405`, empty body, when the route matched but not the method), then forwarded or
//!   invoked with the envelope.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::config::Trigger;
use super::payloads::{self, HttpIn};
use super::{events, fire_timer, invoke, page, queues, Inner, HOST_VERSION};
use crate::eventgrid::SubjectFilter;

/// The front end's router.
pub(super) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/_devhost/queues", get(queues_page))
        .route("/_devhost/events", get(events_page))
        .route("/_devhost/status", get(status_page))
        .route("/admin/host/status", get(status_page))
        .route("/admin/functions/{name}", post(fire_function))
        .fallback(http_trigger)
        .with_state(inner)
}

/// What the presented key (`x-functions-key` header, else `?code=`) grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Anonymous,
    Function,
    Admin,
}

impl Caller {
    /// The name the envelope's `Identities`/key level uses.
    fn key_level(self) -> Option<&'static str> {
        match self {
            Caller::Anonymous => None,
            Caller::Function => Some("Function"),
            Caller::Admin => Some("Admin"),
        }
    }

    fn may_call(self, auth_level: &str) -> bool {
        match auth_level {
            "anonymous" => true,
            "admin" => self == Caller::Admin,
            _ => self != Caller::Anonymous,
        }
    }
}

impl FromRequestParts<Arc<Inner>> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        inner: &Arc<Inner>,
    ) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get("x-functions-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                parts.uri.query().and_then(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == "code")
                        .map(|(_, v)| v.into_owned())
                })
            });
        Ok(match key {
            Some(k) if k == inner.master_key => Caller::Admin,
            Some(k) if k == inner.function_key => Caller::Function,
            _ => Caller::Anonymous,
        })
    }
}

async fn queues_page(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.broker.sweep();
    let snapshot = inner.broker.snapshot();
    let ledger = match &inner.ledger {
        Some(source) => source
            .read(&inner.storage_client)
            .await
            .map_err(|e| format!("{e:#}")),
        None => Err("no storage connection in the app settings".into()),
    };
    let pages = queues::page(snapshot, &ledger);
    page::respond(&headers, &pages, || queues::html(&pages, Utc::now()))
}

async fn events_page(
    State(inner): State<Arc<Inner>>,
    Query(filter): Query<SubjectFilter>,
    headers: HeaderMap,
) -> Response {
    let list = inner
        .topic
        .as_ref()
        .map(|t| t.events_matching(&filter))
        .unwrap_or_default();
    page::respond(&headers, &list, || events::html(&list, &filter, Utc::now()))
}

async fn status_page(State(inner): State<Arc<Inner>>) -> Response {
    axum::Json(json!({
        "state": format!("{:?}", inner.supervisor.state()),
        "handlerPid": inner.supervisor.pid(),
        "handlerRestarts": inner.supervisor.restarts(),
        "stopped": inner.supervisor.fatal(),
        "functions": inner.config.functions.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
    }))
    .into_response()
}

async fn fire_function(
    State(inner): State<Arc<Inner>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Response {
    if caller != Caller::Admin {
        return text(
            StatusCode::UNAUTHORIZED,
            "admin endpoints need the master key (x-functions-key or ?code=)",
        );
    }
    if inner.config.function(&name).is_none() {
        return text(StatusCode::NOT_FOUND, "no such function");
    }
    tokio::spawn(async move {
        let _ = fire_timer(&inner, &name, false).await;
    });
    StatusCode::ACCEPTED.into_response()
}

async fn http_trigger(State(inner): State<Arc<Inner>>, caller: Caller, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_ascii_lowercase();
    let prefix = if inner.config.route_prefix.is_empty() {
        String::new()
    } else {
        format!("/{}", inner.config.route_prefix)
    };
    let Some(rel) = path.strip_prefix(&prefix) else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let mut route_matched = false;
    for f in &inner.config.functions {
        let Trigger::Http {
            binding,
            auth_level,
            methods,
            route,
            forwarded,
            out_binding,
        } = &f.trigger
        else {
            continue;
        };
        let Some(params) = match_route(route, rel) else {
            continue;
        };
        route_matched = true;
        if !methods.is_empty() && !methods.contains(&method) {
            continue;
        }
        if !caller.may_call(auth_level) {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        return if *forwarded {
            forward(&inner, req).await
        } else {
            envelope_http(
                &inner,
                &f.name,
                binding,
                out_binding.as_deref().unwrap_or("res"),
                params,
                caller.key_level(),
                req,
            )
            .await
        };
    }
    if route_matched {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    text(StatusCode::NOT_FOUND, "no function matches this route")
}

/// Match a route template (`devices/{deviceId}/soc`, `{*rest}`, `{id?}`, `{id:int}`) against a path.
pub fn match_route(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    let t: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
    let p: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut params = Vec::new();
    let mut i = 0;
    for (ti, seg) in t.iter().enumerate() {
        if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let catch_all = inner.starts_with('*');
            let inner = inner.trim_start_matches('*');
            let optional = inner.ends_with('?');
            let name = inner
                .trim_end_matches('?')
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            if catch_all {
                let rest = p[i.min(p.len())..].join("/");
                params.push((name, rest));
                return if ti == t.len() - 1 {
                    Some(params)
                } else {
                    None
                };
            }
            match p.get(i) {
                Some(v) => {
                    let v = percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned();
                    params.push((name, v));
                    i += 1;
                }
                None if optional => {}
                None => return None,
            }
        } else {
            match p.get(i) {
                Some(v) if v.eq_ignore_ascii_case(seg) => i += 1,
                _ => return None,
            }
        }
    }
    if i == p.len() {
        Some(params)
    } else {
        None
    }
}

fn text(status: StatusCode, s: &str) -> Response {
    (status, s.to_string()).into_response()
}

fn has_length(req: &Request) -> bool {
    req.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

async fn forward(inner: &Arc<Inner>, req: Request) -> Response {
    let Some(port) = inner.supervisor.wait_ready(Duration::from_secs(120)).await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "handler is not running");
    };
    let with_len = has_length(&req);
    let (parts, body) = req.into_parts();
    let query = payloads::query_joined(parts.uri.query());
    let qs = if query.is_empty() {
        String::new()
    } else {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &query {
            s.append_pair(k, v);
        }
        format!("?{}", s.finish())
    };
    let url = format!("http://127.0.0.1:{port}{}{qs}", parts.uri.path());
    let body = match axum::body::to_bytes(body, 100 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let mut rb = inner.client.request(parts.method.clone(), &url);
    let mut ua = None;
    for (k, v) in parts.headers.iter() {
        let n = k.as_str();
        if matches!(n, "content-length" | "transfer-encoding" | "connection") {
            continue;
        }
        if n == "user-agent" {
            ua = v.to_str().ok().map(str::to_string);
            continue;
        }
        rb = rb.header(k, v);
    }
    rb = rb
        .header(
            "User-Agent",
            match ua {
                Some(u) => format!("{u} Azure-Functions-Host/{HOST_VERSION}"),
                None => format!("Azure-Functions-Host/{HOST_VERSION}"),
            },
        )
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("X-Azure-Functions-InvocationId", Uuid::new_v4().to_string());
    if with_len {
        rb = rb.body(body);
    }
    match rb.send().await {
        Ok(r) => {
            let status = r.status();
            let headers = r.headers().clone();
            let bytes = r.bytes().await.unwrap_or_default();
            let mut resp = Response::new(Body::from(bytes));
            *resp.status_mut() = status;
            for (k, v) in headers.iter() {
                if matches!(
                    k.as_str(),
                    "transfer-encoding" | "connection" | "content-length"
                ) {
                    continue;
                }
                resp.headers_mut().append(k, v.clone());
            }
            resp
        }
        Err(e) => {
            if e.is_timeout() {
                inner.supervisor.restart();
            }
            handler_connection_failed(inner, &parts.method, parts.uri.path(), e)
        }
    }
}

/// The handler's connection failed (reset, closed, timed out) before it answered: a logged
/// `502` problem+json, as a gateway answers. Neither the log line nor the answer names the
/// handler's internal address (`reqwest::Error::without_url`).
fn handler_connection_failed(
    inner: &Inner,
    method: &axum::http::Method,
    path: &str,
    e: reqwest::Error,
) -> Response {
    let e = e.without_url();
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "connection failed"
    };
    let source = std::error::Error::source(&e).map_or(String::new(), |s| format!(": {s}"));
    inner.output.line(&format!(
        "[devhost] ERROR {method} {path}: the handler {what} before answering ({e}{source}); answered 502"
    ));
    let body = json!({
        "type": "about:blank",
        "title": "Bad Gateway",
        "status": 502,
        "detail": format!("the function's handler {what} before answering"),
    });
    (
        StatusCode::BAD_GATEWAY,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

async fn envelope_http(
    inner: &Arc<Inner>,
    function: &str,
    binding: &str,
    out_binding: &str,
    params: Vec<(String, String)>,
    level: Option<&str>,
    req: Request,
) -> Response {
    let with_len = has_length(&req);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 100 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (payloads::canonical_header(k.as_str()), v.to_string()))
        })
        .collect();
    let input = HttpIn {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body: body.to_vec(),
        has_length: with_len,
        params,
        key_level: level.map(str::to_string),
    };
    let env = payloads::http_envelope(function, binding, &input, Utc::now());
    let result = match invoke(inner, function, &env).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(function, "devhost: HTTP invocation failed: {e:#}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    match payloads::interpret_http_output(&result, out_binding) {
        Ok(out) => {
            let mut resp = Response::new(Body::from(out.body));
            *resp.status_mut() =
                StatusCode::from_u16(out.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (k, v) in out.headers {
                if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            resp
        }
        Err(e) => {
            tracing::warn!(function, "devhost: bad HTTP output: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
