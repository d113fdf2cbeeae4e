//! Wiring: the axum router the host talks to.
//!
//! | route                               | who calls it                                     |
//! |-------------------------------------|--------------------------------------------------|
//! | `GET /`                             | host readiness probe and health ping (§1.3)      |
//! | `/api/devices/{id}/soc[/{*rest}]`   | `SetSocHttp`, forwarded (host.json default); any method: the function answers `405`/`404` itself |
//! | `POST /SetSocHttp`                  | `SetSocHttp`, envelope mode                      |
//! | `/api/device-events`                | `DeviceEventsHttp`, forwarded; any method: `POST`, `OPTIONS`, else `405` |
//! | `POST /DeviceEventsHttp`            | `DeviceEventsHttp`, envelope mode                |
//! | `POST /SocQueueTrigger`             | Service Bus trigger invocation                   |
//! | `POST /DrainSocTimer`               | timer trigger invocation                         |
//!
//! Function routes are the function folder names, case-sensitive, as the host
//! calls them. The services are built before serving but do no I/O until the
//! first invocation, so `GET /` answers at once. A broken configuration does not
//! stop the process (the host would restart it in a loop): every invocation
//! fails with the reason logged instead.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures::FutureExt;
use serde_json::json;
use tracing::{error, info};

use crate::adapters::BuildError;
use crate::config::{Config, ConfigError};
use crate::domain::device_event::{self, EventError};
use crate::domain::{InputError, SettingRequest};
use crate::functions::device_events_http::{self, EventsRequest};
use crate::functions::set_soc_http::{self, ApiRequest, ApiResponse};
use crate::functions::soc_queue_trigger::{self, Delivery, Settle};
use crate::functions::{drain_soc_timer, set_soc_checks, Policy, Services};
use crate::host::body::read_forwarded_body;
use crate::host::{
    HostError, HttpCall, HttpResponseOut, HttpTriggerRequest, InvocationFailure, InvocationRequest,
    InvocationResponse, ServiceBusDelivery, TimerInfo, DEVICE_EVENTS_HTTP_OUTPUT_BINDING,
    DEVICE_EVENTS_HTTP_TRIGGER_BINDING, DRAIN_SOC_TIMER_BINDING, IDEMPOTENCY_KEY,
    SET_SOC_HTTP_OUTPUT_BINDING, SET_SOC_HTTP_TRIGGER_BINDING, SOC_QUEUE_TRIGGER_BINDING,
};
use crate::ports::SystemClock;

/// Why the services could not be built at startup. The handler still serves
/// (readiness, failed invocations naming this); the text never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Adapters(#[from] BuildError),
}

impl StartupError {
    /// Every problem on one line (a log line is one `traces` row): `invalid configuration:
    /// A: ...; B: ...`.
    pub fn one_line(&self) -> String {
        let (what, problems) = match self {
            Self::Config(e) => ("invalid configuration", &e.0),
            Self::Adapters(e) => ("adapter configuration is invalid", &e.0),
        };
        format!("{what}: {}", problems.join("; "))
    }
}

/// Builds the services from app settings. Does no I/O: clients connect on first use.
pub fn services_from_env() -> Result<Services, StartupError> {
    let config = Config::from_env()?;
    services_from_config(&config)
}

pub fn services_from_config(config: &Config) -> Result<Services, StartupError> {
    let adapters = crate::adapters::build(config)?;
    Ok(Services {
        device: adapters.device,
        queue: adapters.queue,
        ledger: adapters.ledger,
        clock: Arc::new(SystemClock),
        notifier: adapters.notifier,
        policy: Policy::from_config(config),
    })
}

/// The function folders this handler serves; each has a `POST /{name}` route.
pub const FUNCTIONS: [&str; 4] = [
    "SetSocHttp",
    "SocQueueTrigger",
    "DrainSocTimer",
    "DeviceEventsHttp",
];

/// Largest invocation envelope read (the HTTP body inside is limited much lower by the domain).
const MAX_ENVELOPE_BYTES: usize = 1024 * 1024;
/// Largest forwarded request body read; the domain rejects anything above 1 KiB with a 400.
const MAX_FORWARDED_BODY_BYTES: usize = 64 * 1024;

/// Shared state: the services, or why they could not be built. Behind one `Arc`:
/// axum clones the state for every request.
#[derive(Clone)]
pub struct AppState {
    services: Arc<Result<Services, String>>,
}

impl AppState {
    pub fn new(services: Result<Services, StartupError>) -> Self {
        Self {
            services: Arc::new(services.map_err(|e| e.one_line())),
        }
    }

    fn services(&self) -> Result<&Services, &str> {
        self.services.as_ref().as_ref().map_err(String::as_str)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(ready))
        .route("/api/devices/{device_id}/soc", any(set_soc_forwarded))
        // With a trailing slash too: the host's route template (`soc/{*rest}`) matches it.
        .route("/api/devices/{device_id}/soc/", any(set_soc_forwarded))
        .route(
            "/api/devices/{device_id}/soc/{*rest}",
            any(set_soc_forwarded),
        )
        .route("/SetSocHttp", post(set_soc_envelope))
        .route("/api/device-events", any(device_events_forwarded))
        .route("/api/device-events/", any(device_events_forwarded))
        .route("/DeviceEventsHttp", post(device_events_envelope))
        .route("/SocQueueTrigger", post(soc_queue_trigger))
        .route("/DrainSocTimer", post(drain_soc_timer))
        .fallback(not_found)
        .layer(CatchPanicLayer)
        .with_state(state)
}

async fn ready() -> Json<serde_json::Value> {
    Json(json!({ "status": "ready" }))
}

async fn not_found() -> Response {
    let p = ApiResponse::problem(404, "Not found", "no such route");
    api_response(p)
}

/// A panic in one invocation must not take the process (and every other
/// in-flight invocation) down: it becomes a failed invocation. A tower layer rather than
/// `middleware::from_fn`, which clones the route and boxes a future on every request.
#[derive(Debug, Clone, Copy)]
struct CatchPanicLayer;

impl<S> tower_layer::Layer<S> for CatchPanicLayer {
    type Service = CatchPanic<S>;

    fn layer(&self, inner: S) -> CatchPanic<S> {
        CatchPanic(inner)
    }
}

/// The service [`CatchPanicLayer`] wraps a route in.
#[derive(Debug, Clone)]
struct CatchPanic<S>(S);

type Caught = std::thread::Result<Result<Response, std::convert::Infallible>>;

impl<S> tower_service::Service<Request> for CatchPanic<S>
where
    S: tower_service::Service<Request, Response = Response, Error = std::convert::Infallible>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Map<
        futures::future::CatchUnwind<AssertUnwindSafe<S::Future>>,
        fn(Caught) -> Result<Response, std::convert::Infallible>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        AssertUnwindSafe(self.0.call(req))
            .catch_unwind()
            .map(answer_panic as fn(Caught) -> _)
    }
}

fn answer_panic(caught: Caught) -> Result<Response, std::convert::Infallible> {
    let panic = match caught {
        Ok(answered) => return answered,
        Err(panic) => panic,
    };
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    error!(panic = %what, "invocation panicked");
    // A problem document, as every other error the API answers (docs/openapi.yaml).
    Ok(api_response(ApiResponse::problem(
        500,
        "Internal error",
        "the request failed unexpectedly; operators have been alerted",
    )))
}

// ------------------------------------------------------------------ SetSocHttp

async fn set_soc_forwarded(
    State(state): State<AppState>,
    params: Result<Path<BTreeMap<String, String>>, PathRejection>,
    req: Request,
) -> Response {
    // A path segment that does not percent-decode to UTF-8 is a bad deviceId, answered
    // like any other (axum's own rejection would be a text/plain 400).
    let Ok(Path(mut params)) = params else {
        let err = InputError::new("deviceId", "not valid UTF-8");
        return api_response(ApiResponse::invalid(err));
    };
    let device_id = params.remove("device_id").unwrap_or_default();
    // The route's catch-all, named as in function.json (`{*rest}`).
    let mut route_params = BTreeMap::from([("deviceId".to_string(), device_id)]);
    route_params.extend(params.remove("rest").map(|r| ("rest".to_string(), r)));
    let (parts, body) = req.into_parts();
    let body = match read_forwarded_body(body, MAX_FORWARDED_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return api_response(ApiResponse::invalid(SettingRequest::too_large()));
        }
    };
    let call = HttpCall::from_forwarded(&parts, route_params, body);
    api_response(set_soc(&state, call).await)
}

/// `SetSocHttp` in either mode: the request's HTTP-level checks, then the function.
async fn set_soc(state: &AppState, call: HttpCall) -> ApiResponse {
    if let Some(refused) = set_soc_checks::check(&call) {
        return refused;
    }
    match state.services() {
        Ok(services) => set_soc_http::handle(services, api_request(call)).await,
        Err(reason) => misconfigured("SetSocHttp", reason),
    }
}

async fn set_soc_envelope(
    State(state): State<AppState>,
    Trigger(req): Trigger<HttpTriggerRequest>,
) -> Response {
    let response = set_soc(&state, req.into_call()).await;
    InvocationResponse::ok()
        .with_http(SET_SOC_HTTP_OUTPUT_BINDING, http_output(response))
        .into_response()
}

/// An answer as the envelope's HTTP output (§3.5): its headers (a repeated name keeps
/// the last), and its body unless it has none.
fn http_output(response: ApiResponse) -> HttpResponseOut {
    let mut headers: Vec<(Cow<'static, str>, Cow<'static, str>)> =
        Vec::with_capacity(response.headers.len());
    for (name, value) in response.headers {
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        headers.push((Cow::Borrowed(name), value));
    }
    let body = if response.body.is_empty() {
        String::new()
    } else {
        crate::host::json_string(&response.body)
    };
    HttpResponseOut {
        status: response.status,
        headers,
        body,
    }
}

fn api_request(mut call: HttpCall) -> ApiRequest {
    ApiRequest {
        method: call.method.as_str().to_string(),
        device_id: call.params.remove("deviceId").unwrap_or_default(),
        idempotency_key: call
            .headers
            .get(IDEMPOTENCY_KEY)
            .map(|v| v.as_bytes().to_vec()),
        body: Vec::from(call.body),
        rest: call.params.remove("rest"),
    }
}

// ------------------------------------------------------------------ DeviceEventsHttp

async fn device_events_forwarded(State(state): State<AppState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_forwarded_body(body, device_event::MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            let err = EventError::too_large();
            let p = ApiResponse::problem(400, "Invalid request", err.to_string())
                .with_member("field", json!(err.error.field));
            return api_response(p);
        }
    };
    let call = HttpCall::from_forwarded(&parts, BTreeMap::new(), body);
    api_response(device_events(&state, call).await)
}

async fn device_events_envelope(
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, InvocationFailure> {
    let bytes = read_envelope(body).await?;
    let inv = InvocationRequest::from_slice(&bytes)?;
    let req = HttpTriggerRequest::from_invocation(&inv, DEVICE_EVENTS_HTTP_TRIGGER_BINDING)?;
    let response = device_events(&state, req.into_call()).await;
    Ok(InvocationResponse::ok()
        .with_http(DEVICE_EVENTS_HTTP_OUTPUT_BINDING, http_output(response))
        .into_response())
}

/// `DeviceEventsHttp`; the handshake (`OPTIONS`) needs no services.
async fn device_events(state: &AppState, call: HttpCall) -> ApiResponse {
    let req = EventsRequest {
        method: call.method.as_str().to_string(),
        content_type: call.content_type().map(str::to_string),
        webhook_request_origin: call
            .headers
            .get("webhook-request-origin")
            .map(|v| v.as_bytes().to_vec()),
        body: call.body.to_vec(),
    };
    if req.method.eq_ignore_ascii_case("OPTIONS") {
        return device_events_http::handshake(req.webhook_request_origin.as_deref());
    }
    match state.services() {
        Ok(services) => device_events_http::handle(services, req).await,
        Err(reason) => misconfigured("DeviceEventsHttp", reason),
    }
}

/// An HTTP invocation on a handler without a usable configuration: one ERROR line naming
/// every broken setting (so the handler-errors alert fires on the first call), and a `500`
/// that tells the caller nothing internal.
fn misconfigured(function: &str, reason: &str) -> ApiResponse {
    error!(function, "invocation failed: {reason}");
    ApiResponse::problem(
        500,
        "Service misconfigured",
        "the service is not configured correctly; operators have been alerted",
    )
}

fn api_response(r: ApiResponse) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    // No body: no Content-Type either (a String body would be text/plain).
    let body = if r.body.is_empty() {
        Body::empty()
    } else {
        Body::from(crate::host::json_bytes(&r.body))
    };
    let mut response = (status, body).into_response();
    for (name, value) in r.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(n, v);
        }
    }
    response
}

// ------------------------------------------------------------------ triggers

async fn soc_queue_trigger(
    State(state): State<AppState>,
    Trigger(delivery): Trigger<ServiceBusDelivery>,
) -> Result<Response, InvocationFailure> {
    let delivery = Delivery {
        body: delivery.body,
        message_id: delivery.message_id,
        delivery_count: delivery.delivery_count,
    };
    Ok(
        match soc_queue_trigger::handle(configured(&state, "SocQueueTrigger")?, delivery).await {
            Settle::Complete(log) => InvocationResponse::ok().with_log(log).into_response(),
            Settle::Retry(reason) => InvocationFailure::unavailable(reason).into_response(),
        },
    )
}

async fn drain_soc_timer(
    State(state): State<AppState>,
    Trigger(timer): Trigger<TimerInfo>,
) -> Result<Response, InvocationFailure> {
    if timer.is_past_due {
        info!("DrainSocTimer is running late (past due)");
    }
    let report = drain_soc_timer::run(configured(&state, "DrainSocTimer")?)
        .await
        .map_err(|e| {
            InvocationFailure::unavailable(format!("sweep could not list pending requests: {e}"))
        })?;
    Ok(InvocationResponse::ok()
        .with_log(format!("sweep: {report}"))
        .into_response())
}

/// The services, or a failed invocation naming the configuration problem (logged as one
/// ERROR line, like [`misconfigured`]).
fn configured<'a>(state: &'a AppState, function: &str) -> Result<&'a Services, InvocationFailure> {
    state.services().map_err(|reason| {
        error!(function, "invocation failed: {reason}");
        InvocationFailure::internal(format!("configuration: {reason}"))
    })
}

/// A trigger value decoded from the host's invocation envelope (extractor). A body
/// that is too large, not an envelope, or without a valid binding value is a failed
/// invocation (`400`), answered before the function runs.
struct Trigger<T>(T);

/// A trigger type and the `function.json` binding it is read from.
trait TriggerBinding: Sized {
    fn decode(inv: &InvocationRequest<'_>) -> Result<Self, HostError>;
}

impl TriggerBinding for ServiceBusDelivery {
    fn decode(inv: &InvocationRequest<'_>) -> Result<Self, HostError> {
        Self::from_invocation(inv, SOC_QUEUE_TRIGGER_BINDING)
    }
}

impl TriggerBinding for TimerInfo {
    fn decode(inv: &InvocationRequest<'_>) -> Result<Self, HostError> {
        Self::from_invocation(inv, DRAIN_SOC_TIMER_BINDING)
    }
}

impl TriggerBinding for HttpTriggerRequest {
    fn decode(inv: &InvocationRequest<'_>) -> Result<Self, HostError> {
        Self::from_invocation(inv, SET_SOC_HTTP_TRIGGER_BINDING)
    }
}

impl<S: Send + Sync, T: TriggerBinding> FromRequest<S> for Trigger<T> {
    type Rejection = InvocationFailure;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_envelope(req.into_body()).await?;
        let inv = InvocationRequest::from_slice(&bytes)?;
        Ok(Trigger(T::decode(&inv)?))
    }
}

/// The envelope's bytes, which [`InvocationRequest::from_slice`] then borrows from.
async fn read_envelope(body: Body) -> Result<axum::body::Bytes, InvocationFailure> {
    to_bytes(body, MAX_ENVELOPE_BYTES)
        .await
        .map_err(|_| InvocationFailure::bad_request("invocation body too large or unreadable"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::functions::fakes::Harness;
    use crate::ports::Ledger as _;
    use axum::http::Request as HttpRequest;
    use base64::Engine as _;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::ServiceExt;

    fn app(h: &Harness) -> Router {
        router(AppState::new(Ok(h.svc.clone())))
    }

    async fn call(
        app: Router,
        req: HttpRequest<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, body)
    }

    fn post_json(uri: &str, body: Value) -> HttpRequest<Body> {
        HttpRequest::post(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    fn sb_envelope(body: &Value, message_id: &str) -> Value {
        let b64 = base64::engine::general_purpose::STANDARD.encode(body.to_string());
        json!({
            "Data": { "msg": b64 },
            "Metadata": { "DeliveryCount": "1", "MessageId": format!("\"{message_id}\""), "sys": { "MethodName": "SocQueueTrigger" } }
        })
    }

    #[tokio::test]
    async fn every_function_route_is_served_at_its_exact_folder_name() {
        let h = Harness::new();
        for name in FUNCTIONS {
            let (status, _, _) = call(app(&h), post_json(&format!("/{name}"), json!({}))).await;
            assert_ne!(status, StatusCode::NOT_FOUND, "{name}");
            let (status, _, _) = call(
                app(&h),
                post_json(&format!("/{}", name.to_lowercase()), json!({})),
            )
            .await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{name} must be case-sensitive"
            );
        }
    }

    #[tokio::test]
    async fn the_readiness_probe_is_answered_even_when_misconfigured() {
        let broken = router(AppState::new(Err(StartupError::Config(
            crate::config::ConfigError(vec![
                "SOC_QUEUE_NAME: required app setting is missing".into()
            ]),
        ))));
        let (status, _, body) = call(
            broken.clone(),
            HttpRequest::get("/").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ready");
        let (status, _, _) = call(
            broken.clone(),
            post_json(
                "/DrainSocTimer",
                json!({"Data":{"timer":{"IsPastDue":false}},"Metadata":{}}),
            ),
        )
        .await;
        assert!(status.is_server_error());
        let (status, headers, body) = call(
            broken,
            post_json("/api/devices/d1/soc", json!({"minSoc": 5})),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert!(
            !body.to_string().contains("SOC_QUEUE_NAME"),
            "internals are not echoed to callers"
        );
    }

    #[tokio::test]
    async fn a_forwarded_post_applies_and_answers_json() {
        let h = Harness::new();
        h.device.set_online("bat-7", true);
        let (status, headers, body) = call(
            app(&h),
            post_json("/api/devices/bat-7/soc?code=secret", json!({"dod": 60})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body["minSoc"], 40);
        let (status, _, body) = call(
            app(&h),
            HttpRequest::get("/api/devices/bat-7/soc")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "applied");
    }

    #[tokio::test]
    async fn a_forwarded_offline_post_is_202_with_location() {
        let h = Harness::new();
        h.device.set_online("bat-7", false);
        let req = HttpRequest::post("/api/devices/bat-7/soc")
            .header("content-type", "application/json")
            .header("Idempotency-Key", "abc")
            .body(Body::from(r#"{"minSoc":30}"#))
            .unwrap();
        let (status, headers, body) = call(app(&h), req).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(
            headers["location"],
            format!(
                "/api/devices/bat-7/soc/requests/{}",
                body["requestId"].as_str().unwrap()
            )
        );
        assert_eq!(body["status"], "pending");
    }

    #[tokio::test]
    async fn an_oversized_forwarded_body_is_a_400_problem() {
        let h = Harness::new();
        let big = format!(r#"{{"minSoc":1,"x":"{}"}}"#, "a".repeat(100_000));
        let req = HttpRequest::post("/api/devices/d1/soc")
            .body(Body::from(big))
            .unwrap();
        let (status, headers, body) = call(app(&h), req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(body["field"], "body");
        assert_eq!(h.device.calls(), (0, 0));
    }

    #[tokio::test]
    async fn an_envelope_http_invocation_answers_with_an_http_output_inside_a_2xx() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let envelope = json!({
            "Data": { "req": {
                "Url": "https://x.azurewebsites.net/api/devices/d1/soc?code=k",
                "Method": "POST",
                "Query": { "code": "k" },
                "Headers": { "Content-Type": ["application/json"], "Idempotency-Key": ["key-1"] },
                "Params": { "deviceId": "d1" },
                "Body": "{\"minSoc\":45}"
            }},
            "Metadata": { "minSoc": "\"45\"", "deviceId": "\"d1\"", "sys": { "MethodName": "SetSocHttp" } }
        });
        let (status, headers, body) = call(app(&h), post_json("/SetSocHttp", envelope)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let res = &body["Outputs"]["res"];
        assert_eq!(res["statusCode"], 202);
        let inner: Value = serde_json::from_str(res["body"].as_str().unwrap()).unwrap();
        assert_eq!(
            res["headers"]["Location"],
            format!(
                "/api/devices/d1/soc/requests/{}",
                inner["requestId"].as_str().unwrap()
            )
        );
        assert_eq!(res["headers"]["Content-Type"], "application/json");
        assert_eq!(inner["minSoc"], 45);
        assert_eq!(
            h.ledger
                .get(&h.id("d1"))
                .await
                .unwrap()
                .unwrap()
                .value
                .min_soc
                .percent(),
            45
        );
    }

    #[tokio::test]
    async fn an_envelope_invalid_body_is_a_400_inside_a_2xx_invocation() {
        let h = Harness::new();
        let envelope = json!({
            "Data": { "req": { "Method": "POST", "Headers": { "Content-Type": ["application/json"] }, "Params": { "deviceId": "d1" }, "Body": "{\"dod\":500}" } },
            "Metadata": {}
        });
        let (status, _, body) = call(app(&h), post_json("/SetSocHttp", envelope)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["Outputs"]["res"]["statusCode"], 400);
        assert_eq!(
            body["Outputs"]["res"]["headers"]["Content-Type"],
            "application/problem+json"
        );
    }

    #[tokio::test]
    async fn a_forwarded_reconnect_event_applies_the_pending_request() {
        let h = Harness::new();
        h.device.set_online("bat-7", false);
        let (_, _, accepted) = call(
            app(&h),
            post_json("/api/devices/bat-7/soc", json!({"minSoc": 35})),
        )
        .await;
        h.device.set_online("bat-7", true);
        let event = json!({"specversion": "1.0", "id": "e-1", "source": "/vendor",
            "type": crate::domain::device_event::CONNECTED, "subject": "bat-7"});
        let req = HttpRequest::post("/api/device-events?code=k")
            .header(
                "content-type",
                "application/cloudevents+json; charset=utf-8",
            )
            .body(Body::from(event.to_string()))
            .unwrap();
        let (status, headers, body) = call(app(&h), req).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(body["events"][0]["result"], "applied");
        assert_eq!(body["events"][0]["requestId"], accepted["requestId"]);
    }

    #[tokio::test]
    async fn the_webhook_handshake_is_answered_even_when_misconfigured() {
        let broken = router(AppState::new(Err(StartupError::Config(
            crate::config::ConfigError(vec!["SOC_QUEUE_NAME: missing".into()]),
        ))));
        let req = HttpRequest::options("/api/device-events")
            .header("WebHook-Request-Origin", "eventgrid.azure.net")
            .body(Body::empty())
            .unwrap();
        let res = broken.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()["webhook-allowed-origin"],
            "eventgrid.azure.net"
        );
        assert_eq!(res.headers()["webhook-allowed-rate"], "*");
        assert!(res.headers().get("content-type").is_none());
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert!(bytes.is_empty());
    }

    #[tokio::test]
    async fn an_oversized_events_body_is_a_400_problem() {
        let h = Harness::new();
        let big = "x".repeat(crate::domain::device_event::MAX_BODY_BYTES + 1);
        let req = HttpRequest::post("/api/device-events")
            .header("content-type", "application/json")
            .body(Body::from(big))
            .unwrap();
        let (status, headers, body) = call(app(&h), req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(body["field"], "body");
    }

    #[tokio::test]
    async fn an_envelope_events_invocation_answers_inside_a_2xx() {
        let h = Harness::new();
        let handshake = json!({
            "Data": { "req": { "Method": "OPTIONS", "Headers": { "WebHook-Request-Origin": ["eventgrid.azure.net"] }, "Params": {} } },
            "Metadata": { "sys": { "MethodName": "DeviceEventsHttp" } }
        });
        let (status, _, body) = call(app(&h), post_json("/DeviceEventsHttp", handshake)).await;
        assert_eq!(status, StatusCode::OK);
        let res = &body["Outputs"]["res"];
        assert_eq!(res["statusCode"], 200);
        assert_eq!(
            res["headers"]["WebHook-Allowed-Origin"],
            "eventgrid.azure.net"
        );
        assert_eq!(res["body"], "");
        let bad = json!({
            "Data": { "req": { "Method": "POST", "Headers": { "Content-Type": ["application/cloudevents+json"] }, "Params": {}, "Body": "{\"specversion\":\"1.0\"}" } },
            "Metadata": {}
        });
        let (status, _, body) = call(app(&h), post_json("/DeviceEventsHttp", bad)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["Outputs"]["res"]["statusCode"], 400);
        assert_eq!(
            body["Outputs"]["res"]["headers"]["Content-Type"],
            "application/problem+json"
        );
    }

    #[tokio::test]
    async fn a_queue_delivery_is_completed_with_a_json_body_and_logs() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        let (_, _, accepted) = call(
            app(&h),
            post_json("/api/devices/d1/soc", json!({"minSoc": 20})),
        )
        .await;
        h.device.set_online("d1", true);
        let sent = h.queue.sent()[0].clone();
        let body = serde_json::to_value(&sent.body).unwrap();
        let (status, headers, out) = call(
            app(&h),
            post_json("/SocQueueTrigger", sb_envelope(&body, &sent.message_id)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        assert!(
            out["Logs"][0].as_str().unwrap().starts_with("applied"),
            "{out}"
        );
        assert_eq!(
            h.device.puts("d1")[0].1,
            accepted["requestId"].as_str().unwrap()
        );
    }

    /// The problem document of a `400`, forwarded (the body itself) or in an envelope.
    fn problem_field(status: StatusCode, body: &Value) -> (u16, Value) {
        match body.get("Outputs") {
            Some(outputs) => {
                let res = &outputs["res"];
                let inner: Value =
                    serde_json::from_str(res["body"].as_str().unwrap_or("null")).unwrap();
                (
                    res["statusCode"].as_u64().unwrap() as u16,
                    inner["field"].clone(),
                )
            }
            None => (status.as_u16(), body["field"].clone()),
        }
    }

    #[tokio::test]
    async fn an_all_dots_device_id_is_a_400_through_every_entry_point_and_touches_nothing() {
        let h = Harness::new();
        h.device.set_default_online(true);
        for dots in [".", "..", "..."] {
            let encoded = dots.replace('.', "%2E");
            // The route, forwarded: raw and percent-encoded, every method and sub-path.
            let mut answers = Vec::new();
            for id in [dots.to_string(), encoded] {
                let post = post_json(&format!("/api/devices/{id}/soc"), json!({"minSoc": 5}));
                answers.push(call(app(&h), post).await);
                for path in [
                    format!("/api/devices/{id}/soc"),
                    format!("/api/devices/{id}/soc/requests/{}", "0".repeat(32)),
                ] {
                    let get = HttpRequest::get(path).body(Body::empty()).unwrap();
                    answers.push(call(app(&h), get).await);
                }
            }
            // The route, in an envelope.
            let envelope = json!({
                "Data": { "req": { "Method": "POST", "Headers": { "Content-Type": ["application/json"] }, "Params": { "deviceId": dots },
                                   "Body": "{\"minSoc\":5}" } },
                "Metadata": {}
            });
            answers.push(call(app(&h), post_json("/SetSocHttp", envelope)).await);
            for (status, _, body) in &answers {
                assert_eq!(
                    problem_field(*status, body),
                    (400, json!("deviceId")),
                    "{dots:?}: {body}"
                );
            }
            // A connection event's subject, forwarded and in an envelope.
            let event = json!({"specversion": "1.0", "id": "e-1", "source": "/vendor",
                "type": crate::domain::device_event::CONNECTED, "subject": dots});
            let req = HttpRequest::post("/api/device-events")
                .header("content-type", "application/cloudevents+json")
                .body(Body::from(event.to_string()))
                .unwrap();
            let (status, _, body) = call(app(&h), req).await;
            assert_eq!(
                problem_field(status, &body),
                (400, json!("subject")),
                "{body}"
            );
            let envelope = json!({
                "Data": { "req": { "Method": "POST",
                                   "Headers": { "Content-Type": ["application/cloudevents+json"] },
                                   "Params": {}, "Body": event.to_string() } },
                "Metadata": {}
            });
            let (status, _, body) = call(app(&h), post_json("/DeviceEventsHttp", envelope)).await;
            assert_eq!(
                problem_field(status, &body),
                (400, json!("subject")),
                "{body}"
            );
            // A wake-up message naming one: completed, never applied.
            let message = json!({"requestId": "0".repeat(32), "deviceId": dots, "minSoc": 5,
                "requestedAt": "2026-01-01T00:00:00Z", "expiresAt": "2099-01-01T00:00:00Z"});
            let (status, _, out) = call(
                app(&h),
                post_json("/SocQueueTrigger", sb_envelope(&message, "m-1")),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{out}");
            assert!(
                out["Logs"][0]
                    .as_str()
                    .unwrap()
                    .contains("invalid device id"),
                "{out}"
            );
        }
        assert_eq!(h.device.calls(), (0, 0), "no device call");
        assert!(h.ledger.is_empty(), "nothing stored");
        assert!(h.queue.sent().is_empty(), "nothing sent");
    }

    #[tokio::test]
    async fn a_queue_delivery_that_must_be_retried_fails_the_invocation() {
        let h = Harness::new();
        h.device.set_online("d1", false);
        call(
            app(&h),
            post_json("/api/devices/d1/soc", json!({"minSoc": 20})),
        )
        .await;
        let sent = h.queue.sent()[0].clone();
        h.ledger.set_down(true);
        let body = serde_json::to_value(&sent.body).unwrap();
        let (status, _, _) = call(
            app(&h),
            post_json("/SocQueueTrigger", sb_envelope(&body, &sent.message_id)),
        )
        .await;
        assert!(!status.is_success(), "{status}");
    }

    #[tokio::test]
    async fn a_timer_invocation_runs_the_sweep_and_reports_it() {
        let h = Harness::new();
        let timer = json!({
            "Data": { "timer": { "Schedule": { "AdjustForDST": true }, "ScheduleStatus": null, "IsPastDue": false } },
            "Metadata": { "sys": { "MethodName": "DrainSocTimer", "UtcNow": "2026-11-21T12:00:00.1234567Z" } }
        });
        let (status, _, body) = call(app(&h), post_json("/DrainSocTimer", timer)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body["Logs"][0]
                .as_str()
                .unwrap()
                .starts_with("sweep: due=0"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn a_panicking_handler_becomes_a_500_and_the_server_keeps_serving() {
        let app = Router::new()
            .route("/boom", get(|| async { panic!("kaboom") as &str }))
            .route("/ok", get(|| async { "fine" }))
            .layer(CatchPanicLayer);
        let (status, _, _) = call(
            app.clone(),
            HttpRequest::get("/boom").body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let res = app
            .oneshot(HttpRequest::get("/ok").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}
