//! `docs/openapi.yaml` and the handler cannot drift apart.
//!
//! The handler's router (with the in-memory ports) is driven through one scenario per
//! status each public operation can answer; every answer is then held to the document
//! (status listed, content type, headers, body valid against the documented schema),
//! and the other way round: every documented status, header and schema property was
//! produced by some scenario, every documented path routes to the handler, and no
//! route under the function's template exists that the document does not list. The
//! one exception is `401`, which the Functions host answers before the handler runs
//! (`tests/e2e/contract.rs` sees it through devhost). Schemathesis
//! (`tests/e2e/contract.rs`) does the rest: generated input through the real host path.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use soc_settings::app::{router, AppState, StartupError};
use soc_settings::config::ConfigError;
use soc_settings::functions::fakes::Harness;

fn document() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    serde_yaml::from_str(&text).expect("docs/openapi.yaml is YAML")
}

/// Follows a local `$ref` (`#/components/...`) until a non-reference is reached.
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        v = doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    v
}

/// A validator for `schema` (found at `pointer` in the document), with the whole
/// document as the root so its `#/components/...` references resolve.
fn validator(doc: &Value, pointer: &str) -> jsonschema::Validator {
    let mut root = doc.clone();
    // As a URI fragment, the pointer's `{`/`}` (path templates) are percent-encoded.
    let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
    root["$ref"] = json!(format!("#{fragment}"));
    jsonschema::draft202012::new(&root).unwrap_or_else(|e| panic!("{pointer}: {e}"))
}

/// JSON-pointer escaping of one path segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Every operation of the document: (operationId, path template, method).
fn operations(doc: &Value) -> Vec<(String, String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            if let Some(id) = op.get("operationId").and_then(Value::as_str) {
                ops.push((id.to_string(), path.clone(), method.clone()));
            }
        }
    }
    ops
}

struct Observed {
    operation: &'static str,
    scenario: &'static str,
    status: u16,
    headers: HeaderMap,
    body: Option<Value>,
}

async fn call(
    app: axum::Router,
    operation: &'static str,
    scenario: &'static str,
    req: Request<Body>,
) -> Observed {
    let res = app.oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let body = (!bytes.is_empty()).then(|| {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{operation}/{scenario}: body is not JSON ({e})"))
    });
    Observed {
        operation,
        scenario,
        status,
        headers,
        body,
    }
}

fn post(device: &str, body: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::post(format!("/api/devices/{device}/soc?code=k"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("Idempotency-Key", k);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn events(content_type: &str, body: &Value) -> Request<Body> {
    Request::post("/api/device-events?code=k")
        .header("content-type", content_type)
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn options(origin: Option<&str>) -> Request<Body> {
    let mut b = Request::builder()
        .method(Method::OPTIONS)
        .uri("/api/device-events?code=k");
    if let Some(o) = origin {
        b = b.header("WebHook-Request-Origin", o);
    }
    b.body(Body::empty()).unwrap()
}

fn cloud_event(id: &str, ty: &str, device: &str) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "/vendor", "type": ty, "subject": device})
}

fn app(h: &Harness) -> axum::Router {
    router(AppState::new(Ok(h.svc.clone())))
}

/// One scenario per status each operation answers; the tests below hold them to the document.
async fn scenarios() -> Vec<Observed> {
    let mut seen = Vec::new();
    let h = Harness::new();
    h.device.set_online("on", true);
    h.device.set_online("off", false);
    h.device.reject("picky", "value not allowed");
    h.device.set_online("picky", true);

    // setSoc
    seen.push(
        call(
            app(&h),
            "setSoc",
            "online",
            post("on", r#"{"dod":70}"#, Some("k0")),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "setSoc",
            "online replay",
            post("on", r#"{"dod":70}"#, Some("k0")),
        )
        .await,
    );
    let first = call(
        app(&h),
        "setSoc",
        "offline",
        post("off", r#"{"minSoc":30}"#, Some("k1")),
    )
    .await;
    let first_id = first.body.as_ref().unwrap()["requestId"]
        .as_str()
        .unwrap()
        .to_string();
    seen.push(first);
    seen.push(
        call(
            app(&h),
            "setSoc",
            "replay",
            post("off", r#"{"minSoc":30}"#, Some("k1")),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "setSoc",
            "key reused",
            post("off", r#"{"minSoc":31}"#, Some("k1")),
        )
        .await,
    );
    // A replay of a request older than the history kept for its device.
    h.device.set_online("busy", false);
    call(
        app(&h),
        "setSoc",
        "oldest",
        post("busy", r#"{"minSoc":1}"#, Some("old")),
    )
    .await;
    for i in 0..soc_settings::domain::history::HISTORY_KEPT_AT_MOST {
        let body = format!(r#"{{"minSoc":{}}}"#, 2 + i);
        h.clock.advance(chrono::Duration::seconds(1));
        call(app(&h), "setSoc", "newer", post("busy", &body, None)).await;
    }
    seen.push(
        call(
            app(&h),
            "setSoc",
            "replay no longer kept",
            post("busy", r#"{"minSoc":1}"#, Some("old")),
        )
        .await,
    );
    // The accepting write times out and the store stays down through the fence.
    h.ledger.defer_next_accept_and_go_down();
    tokio::time::pause();
    seen.push(
        call(
            app(&h),
            "setSoc",
            "outcome unknown",
            post("off", r#"{"minSoc":33}"#, None),
        )
        .await,
    );
    tokio::time::resume();
    h.ledger.set_down(false);
    seen.push(
        call(
            app(&h),
            "setSoc",
            "bad body",
            post("off", r#"{"dod":101}"#, None),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "setSoc",
            "unknown device",
            post("ghost", r#"{"dod":1}"#, None),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "setSoc",
            "rejected",
            post("picky", r#"{"dod":1}"#, Some("k2")),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "setSoc",
            "rejected replay",
            post("picky", r#"{"dod":1}"#, Some("k2")),
        )
        .await,
    );
    let second = call(
        app(&h),
        "setSoc",
        "supersedes",
        post("off", r#"{"minSoc":40}"#, None),
    )
    .await;
    let second_id = second.body.as_ref().unwrap()["requestId"]
        .as_str()
        .unwrap()
        .to_string();
    seen.push(second);

    // getSoc
    seen.push(call(app(&h), "getSoc", "latest", get("/api/devices/off/soc")).await);
    seen.push(call(app(&h), "getSoc", "applied", get("/api/devices/on/soc")).await);
    seen.push(call(app(&h), "getSoc", "none", get("/api/devices/nobody/soc")).await);
    seen.push(call(app(&h), "getSoc", "bad id", get("/api/devices/b%20d/soc")).await);

    // getSocRequest
    let of = |id: &str| format!("/api/devices/off/soc/requests/{id}");
    seen.push(call(app(&h), "getSocRequest", "superseded", get(&of(&first_id))).await);
    seen.push(call(app(&h), "getSocRequest", "pending", get(&of(&second_id))).await);
    seen.push(
        call(
            app(&h),
            "getSocRequest",
            "unknown",
            get(&of(&"0".repeat(32))),
        )
        .await,
    );
    seen.push(call(app(&h), "getSocRequest", "bad id", get(&of("not-an-id"))).await);

    // cancelSocRequest
    let cancel = |path: &str| Request::delete(path).body(Body::empty()).unwrap();
    let cancelling = |scenario: &'static str, path: String| {
        call(app(&h), "cancelSocRequest", scenario, cancel(&path))
    };
    let pending_on = |device: &'static str| {
        let h = h.clone();
        async move {
            h.device.set_online(device, false);
            let r = call(
                app(&h),
                "setSoc",
                "to cancel",
                post(device, r#"{"minSoc":30}"#, None),
            )
            .await;
            let id = r.body.as_ref().unwrap()["requestId"]
                .as_str()
                .unwrap()
                .to_string();
            format!("/api/devices/{device}/soc/requests/{id}")
        }
    };
    let undo = pending_on("undo").await;
    seen.push(cancelling("pending", undo.clone()).await);
    seen.push(cancelling("again", undo.clone()).await);
    seen.push(call(app(&h), "getSocRequest", "cancelled", get(&undo)).await);
    seen.push(cancelling("superseded", of(&first_id)).await);
    seen.push(cancelling("unknown", of(&"0".repeat(32))).await);
    seen.push(cancelling("bad id", of("not-an-id")).await);
    let busy = pending_on("bat-busy").await;
    h.hold_lease("bat-busy", "sb-busy", chrono::Duration::seconds(30))
        .await;
    tokio::time::pause();
    seen.push(cancelling("being applied", busy).await);
    let unsure = pending_on("unsure").await;
    h.ledger.time_out_next_put_and_go_down();
    seen.push(cancelling("outcome unknown", unsure).await);
    tokio::time::resume();
    h.ledger.set_down(false);

    h.clock.advance(h.svc.policy.request_ttl);
    seen.push(call(app(&h), "getSocRequest", "expired", get(&of(&second_id))).await);
    let picky = h.ledger_record("picky").await.request_id;
    seen.push(
        call(
            app(&h),
            "getSocRequest",
            "failed",
            get(&format!("/api/devices/picky/soc/requests/{picky}")),
        )
        .await,
    );

    // receiveDeviceEvents: "off" has a pending request (above); it comes back online.
    const CONNECTED: &str = "com.vendor.device.connected";
    h.device.set_online("off", true);
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "reconnect after the request expired",
            events(
                "application/cloudevents+json",
                &cloud_event("e1", CONNECTED, "off"),
            ),
        )
        .await,
    );
    h.device.set_online("off", false);
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "batch: duplicate, other type, disconnect, nothing pending",
            events(
                "application/cloudevents-batch+json",
                &json!([
                    cloud_event("e1", CONNECTED, "off"),
                    cloud_event("e1", CONNECTED, "off"),
                    cloud_event("e2", "com.vendor.firmware.updated", "x"),
                    cloud_event("e3", "com.vendor.device.disconnected", "on"),
                ]),
            ),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "bad event in a batch",
            events(
                "application/json",
                &json!([cloud_event("e1", CONNECTED, "off"), {"specversion": "1.0"}]),
            ),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "binary mode",
            events("text/plain", &json!("online")),
        )
        .await,
    );
    seen.push(
        call(
            app(&h),
            "validateEventsWebhook",
            "handshake",
            options(Some("eventgrid.azure.net")),
        )
        .await,
    );
    seen.push(call(app(&h), "validateEventsWebhook", "plain", options(None)).await);
    seen.push(
        call(
            app(&h),
            "validateEventsWebhook",
            "bad origin",
            options(Some(&"o".repeat(256))),
        )
        .await,
    );

    // The store down: 503 everywhere.
    h.ledger.set_down(true);
    seen.push(
        call(
            app(&h),
            "setSoc",
            "store down",
            post("off", r#"{"dod":1}"#, None),
        )
        .await,
    );
    seen.push(call(app(&h), "getSoc", "store down", get("/api/devices/off/soc")).await);
    seen.push(call(app(&h), "getSocRequest", "store down", get(&of(&second_id))).await);
    seen.push(cancelling("store down", of(&second_id)).await);
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "store down",
            events(
                "application/cloudevents+json",
                &cloud_event("e9", "com.vendor.device.connected", "off"),
            ),
        )
        .await,
    );
    h.ledger.set_down(false);

    // Misconfigured: 500 everywhere.
    let broken = || {
        let missing = ConfigError(vec![
            "SOC_QUEUE_NAME: required app setting is missing".into()
        ]);
        router(AppState::new(Err(StartupError::Config(missing))))
    };
    seen.push(
        call(
            broken(),
            "setSoc",
            "misconfigured",
            post("off", r#"{"dod":1}"#, None),
        )
        .await,
    );
    seen.push(
        call(
            broken(),
            "getSoc",
            "misconfigured",
            get("/api/devices/off/soc"),
        )
        .await,
    );
    seen.push(
        call(
            broken(),
            "getSocRequest",
            "misconfigured",
            get(&of(&second_id)),
        )
        .await,
    );
    seen.push(
        call(
            broken(),
            "cancelSocRequest",
            "misconfigured",
            cancel(&of(&second_id)),
        )
        .await,
    );
    // A batch: a reconnect that applies a pending request, and a disconnect (ignored).
    h.device.set_online("back", false);
    let pending = call(
        app(&h),
        "setSoc",
        "for the batch",
        post("back", r#"{"minSoc":30}"#, None),
    )
    .await;
    assert_eq!(pending.status, 202);
    h.device.set_online("back", true);
    let batch = json!([
        cloud_event("b1", "com.vendor.device.connected", "back"),
        cloud_event("b2", "com.vendor.device.disconnected", "on"),
    ]);
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "batch",
            events("application/cloudevents-batch+json", &batch),
        )
        .await,
    );
    let back_id = pending.body.as_ref().unwrap()["requestId"]
        .as_str()
        .unwrap()
        .to_string();
    seen.push(
        call(
            app(&h),
            "getSocRequest",
            "applied when the battery returned",
            get(&format!("/api/devices/back/soc/requests/{back_id}")),
        )
        .await,
    );
    // Drift: the battery reports another value at its next reconnect.
    h.device.set_reported("back", 45);
    let drift = json!([cloud_event("b3", "com.vendor.device.connected", "back")]);
    seen.push(
        call(
            app(&h),
            "receiveDeviceEvents",
            "drift seen",
            events("application/cloudevents-batch+json", &drift),
        )
        .await,
    );
    seen.push(call(app(&h), "getSoc", "drift", get("/api/devices/back/soc")).await);
    // A method no operation of the path lists: 405 + Allow, documented on each operation.
    for (operation, path) in [
        ("setSoc", "/api/devices/on/soc"),
        ("getSoc", "/api/devices/on/soc"),
        (
            "getSocRequest",
            "/api/devices/off/soc/requests/0a1b2c3d4e5f40718293a4b5c6d7e8f9",
        ),
        (
            "cancelSocRequest",
            "/api/devices/off/soc/requests/0a1b2c3d4e5f40718293a4b5c6d7e8f9",
        ),
        ("receiveDeviceEvents", "/api/device-events"),
        ("validateEventsWebhook", "/api/device-events"),
    ] {
        let patch = Request::patch(path).body(Body::empty()).unwrap();
        seen.push(call(app(&h), operation, "other method", patch).await);
    }
    // setSoc with another content type, a repeated Idempotency-Key, a key twice.
    let text = Request::post("/api/devices/on/soc")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"minSoc":30}"#))
        .unwrap();
    seen.push(call(app(&h), "setSoc", "not JSON", text).await);
    let twice = Request::post("/api/devices/on/soc")
        .header("content-type", "application/json")
        .header("Idempotency-Key", "a")
        .header("Idempotency-Key", "b")
        .body(Body::from(r#"{"minSoc":30}"#))
        .unwrap();
    seen.push(call(app(&h), "setSoc", "key header twice", twice).await);
    seen.push(
        call(
            app(&h),
            "setSoc",
            "duplicate JSON key",
            post("on", r#"{"minSoc":30,"minSoc":40}"#, None),
        )
        .await,
    );
    seen.push(
        call(
            broken(),
            "receiveDeviceEvents",
            "misconfigured",
            events(
                "application/cloudevents+json",
                &cloud_event("e9", "com.vendor.device.connected", "off"),
            ),
        )
        .await,
    );
    seen
}

/// The documented response of an operation for a status, if any (`$ref` resolved).
fn response_doc<'a>(doc: &'a Value, op_pointer: &str, status: u16) -> Option<&'a Value> {
    doc.pointer(&format!("{op_pointer}/responses/{status}"))?;
    doc.pointer(&response_pointer(doc, op_pointer, status))
}

fn pointer_of_operation(doc: &Value, id: &str) -> (String, Value) {
    for (op_id, path, method) in operations(doc) {
        if op_id == id {
            let pointer = format!("/paths/{}/{method}", escape(&path));
            return (pointer.clone(), doc.pointer(&pointer).unwrap().clone());
        }
    }
    panic!("operation {id} is not in the document")
}

/// Where a response (status of an operation) is in the document, resolving a `$ref`.
fn response_pointer(doc: &Value, op_pointer: &str, status: u16) -> String {
    let at = format!("{op_pointer}/responses/{status}");
    match doc
        .pointer(&at)
        .and_then(|r| r.get("$ref"))
        .and_then(Value::as_str)
    {
        Some(r) => r.trim_start_matches('#').to_string(),
        None => at,
    }
}

#[tokio::test]
async fn every_answer_of_the_handler_is_described_by_the_document() {
    let doc = document();
    for o in scenarios().await {
        let what = format!("{} [{}] -> {}", o.operation, o.scenario, o.status);
        let (op_pointer, _) = pointer_of_operation(&doc, o.operation);
        let response = response_doc(&doc, &op_pointer, o.status)
            .unwrap_or_else(|| panic!("{what}: status not in the document"));
        let rp = response_pointer(&doc, &op_pointer, o.status);
        let content_type = o
            .headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        match (&o.body, response.get("content")) {
            (Some(body), Some(content)) => {
                let ct = content_type.unwrap_or_else(|| panic!("{what}: no content type"));
                assert!(
                    content.get(&ct).is_some(),
                    "{what}: content type {ct} not documented"
                );
                let v = validator(&doc, &format!("{rp}/content/{}/schema", escape(&ct)));
                let errors: Vec<String> = v.iter_errors(body).map(|e| e.to_string()).collect();
                assert!(
                    errors.is_empty(),
                    "{what}: {body} does not match: {errors:?}"
                );
            }
            (None, None) => {}
            (body, content) => panic!("{what}: body {body:?} vs documented content {content:?}"),
        }
        let documented: BTreeSet<String> = response
            .get("headers")
            .and_then(Value::as_object)
            .map(|h| h.keys().map(|k| k.to_ascii_lowercase()).collect())
            .unwrap_or_default();
        for name in o.headers.keys() {
            let name = name.as_str();
            if matches!(name, "content-type" | "content-length") {
                continue;
            }
            assert!(
                documented.contains(name),
                "{what}: header {name} is not documented for this status"
            );
        }
    }
}

#[tokio::test]
async fn every_status_header_and_field_the_document_promises_is_produced() {
    let doc = document();
    let seen = scenarios().await;
    let mut statuses: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    let mut headers: BTreeSet<(String, u16, String)> = BTreeSet::new();
    let mut fields: BTreeSet<String> = BTreeSet::new();
    for o in &seen {
        statuses.entry(o.operation).or_default().insert(o.status);
        for name in o.headers.keys() {
            headers.insert((o.operation.to_string(), o.status, name.as_str().to_string()));
        }
        if let Some(Value::Object(body)) = &o.body {
            fields.extend(body.keys().cloned());
            // A device events summary: the fields of each event's entry too.
            for entry in body
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                fields.extend(
                    entry
                        .as_object()
                        .into_iter()
                        .flat_map(|e| e.keys().cloned()),
                );
            }
        }
    }
    for (id, _, _) in operations(&doc) {
        let (_, op) = pointer_of_operation(&doc, &id);
        for (status, response) in op["responses"].as_object().unwrap() {
            let status: u16 = status.parse().unwrap();
            if status == 401 {
                // Answered by the Functions host before the handler runs; no body.
                assert!(deref(&doc, response).get("content").is_none());
                continue;
            }
            assert!(
                statuses
                    .get(id.as_str())
                    .is_some_and(|s| s.contains(&status)),
                "{id}: documented status {status} is never produced"
            );
            for name in deref(&doc, response)
                .get("headers")
                .and_then(Value::as_object)
                .into_iter()
                .flat_map(|h| h.keys())
            {
                assert!(
                    headers.contains(&(id.clone(), status, name.to_ascii_lowercase())),
                    "{id}: header {name} documented for {status} is never sent"
                );
            }
        }
    }
    for schema in [
        "SocRequest",
        "Problem",
        "DeviceEventsSummary",
        "DeviceEventResult",
    ] {
        for name in doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap()
            .keys()
        {
            assert!(fields.contains(name), "{schema}.{name} is never emitted");
        }
    }
}

#[tokio::test]
async fn every_documented_path_is_routed_to_the_handler_and_nothing_else_under_the_function() {
    let doc = document();
    let h = Harness::new();
    let concrete = |template: &str| {
        format!(
            "/api{}",
            template
                .replace("{deviceId}", "bat-1")
                .replace("{requestId}", &"a".repeat(32))
        )
    };
    let mut methods_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, path, method) in operations(&doc) {
        methods_of
            .entry(path)
            .or_default()
            .insert(method.to_uppercase());
    }
    for (path, methods) in &methods_of {
        let url = concrete(path);
        let o = call(app(&h), "route", "get", get(&url)).await;
        let body = o.body.unwrap_or(Value::Null);
        assert_ne!(body["detail"], "no such route", "{url} is not routed");
        // A method the document does not list: 405 naming exactly the documented ones.
        let o = call(
            app(&h),
            "route",
            "put",
            Request::builder()
                .method(Method::PUT)
                .uri(&url)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(o.status, 405, "{url}");
        let allow: BTreeSet<String> = o.headers["allow"]
            .to_str()
            .unwrap()
            .split(',')
            .map(|m| m.trim().to_string())
            .collect();
        assert_eq!(&allow, methods, "{url}: Allow");
        assert_eq!(o.headers["content-type"], "application/problem+json");
        // With a trailing slash: the same answer, as the host's route matches it too.
        let slashed = call(app(&h), "route", "get/", get(&format!("{url}/"))).await;
        let plain = call(app(&h), "route", "get", get(&url)).await;
        assert_eq!(
            (slashed.status, slashed.body),
            (plain.status, plain.body),
            "{url}/"
        );
    }
    // The function's route is `devices/{deviceId}/soc/{*rest}`: what is not documented is 404.
    for undocumented in [
        "/api/devices/bat-1/soc/history",
        "/api/devices/bat-1/soc/requests",
        "/api/devices/bat-1/soc/requests/aaaa/more",
    ] {
        let o = call(app(&h), "route", "undocumented", get(undocumented)).await;
        assert_eq!(o.status, 404, "{undocumented}");
        assert_eq!(o.headers["content-type"], "application/problem+json");
    }
    // The event route is exact: anything below it is not routed.
    let o = call(
        app(&h),
        "route",
        "undocumented",
        get("/api/device-events/x"),
    )
    .await;
    assert_eq!(o.status, 404);
    let route_of = |function: &str| -> String {
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(format!(
                "{}/{function}/function.json",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap(),
        )
        .unwrap();
        config["bindings"][0]["route"].as_str().unwrap().to_string()
    };
    let routes = [route_of("SetSocHttp"), route_of("DeviceEventsHttp")];
    for path in methods_of.keys() {
        assert!(
            routes.iter().any(|route| {
                let base = route.trim_end_matches("/{*rest}");
                path.trim_start_matches('/').starts_with(base)
            }),
            "{path} is served by an HTTP function's route ({routes:?})"
        );
    }
}

#[test]
fn every_example_in_the_document_matches_its_schema() {
    let doc = document();
    let mut checked = 0;
    for (id, path, method) in operations(&doc) {
        let op_pointer = format!("/paths/{}/{method}", escape(&path));
        let op = doc.pointer(&op_pointer).unwrap();
        let mut media: Vec<String> = Vec::new();
        if op.get("requestBody").is_some() {
            for ct in op["requestBody"]["content"].as_object().unwrap().keys() {
                media.push(format!("{op_pointer}/requestBody/content/{}", escape(ct)));
            }
        }
        for status in op["responses"].as_object().unwrap().keys() {
            let rp = response_pointer(&doc, &op_pointer, status.parse().unwrap());
            if let Some(content) = doc.pointer(&rp).unwrap().get("content") {
                for ct in content.as_object().unwrap().keys() {
                    media.push(format!("{rp}/content/{}", escape(ct)));
                }
            }
        }
        for m in media {
            let node = doc.pointer(&m).unwrap();
            let v = validator(&doc, &format!("{m}/schema"));
            let mut examples: Vec<&Value> = node.get("example").into_iter().collect();
            if let Some(named) = node.get("examples").and_then(Value::as_object) {
                examples.extend(named.values().map(|e| &e["value"]));
            }
            for example in examples {
                let errors: Vec<String> = v.iter_errors(example).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{id} {m}: example {example}: {errors:?}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} examples checked");
}

/// A value's shape: an object's keys with their values' shapes, an array's element shapes,
/// a scalar's JSON type.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => {
            let mut shapes: Vec<Value> = a.iter().map(shape).collect();
            shapes.sort_by_key(|s| s.to_string());
            shapes.dedup();
            Value::Array(shapes)
        }
        Value::String(_) => json!("string"),
        Value::Number(_) => json!("number"),
        Value::Bool(_) => json!("bool"),
        Value::Null => json!("null"),
    }
}

/// The values an example must share with the answer it shows: what a client branches on.
fn identity(v: &Value) -> Value {
    json!([v["type"], v["title"], v["status"], v["field"], v["result"]])
}

#[tokio::test]
async fn every_response_example_in_the_document_is_a_captured_answer() {
    let doc = document();
    let seen = scenarios().await;
    let mut checked = 0;
    for (id, path, method) in operations(&doc) {
        let op_pointer = format!("/paths/{}/{method}", escape(&path));
        let op = doc.pointer(&op_pointer).unwrap();
        for status in op["responses"].as_object().unwrap().keys() {
            let status: u16 = status.parse().unwrap();
            let rp = response_pointer(&doc, &op_pointer, status);
            let Some(content) = doc.pointer(&rp).unwrap().get("content") else {
                continue;
            };
            for (ct, media) in content.as_object().unwrap() {
                let mut examples: Vec<(String, &Value)> = media
                    .get("example")
                    .map(|e| ("example".to_string(), e))
                    .into_iter()
                    .collect();
                if let Some(named) = media.get("examples").and_then(Value::as_object) {
                    examples.extend(named.iter().map(|(n, e)| (n.clone(), &e["value"])));
                }
                // A shared response (`$ref`) is held to the answers of every operation using it.
                let answers: Vec<&Value> = seen
                    .iter()
                    .filter(|o| {
                        let (o_pointer, _) = pointer_of_operation(&doc, o.operation);
                        response_pointer(&doc, &o_pointer, o.status) == rp
                    })
                    .filter(|o| {
                        o.headers
                            .get("content-type")
                            .is_some_and(|v| v == ct.as_str())
                    })
                    .filter_map(|o| o.body.as_ref())
                    .collect();
                for (name, example) in examples {
                    let matched = answers
                        .iter()
                        .any(|a| shape(a) == shape(example) && identity(a) == identity(example));
                    assert!(
                        matched,
                        "{id} {status} {ct} example {name}: no captured answer has its fields and kind\n\
                         example: {example}\ncaptured: {answers:#?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 15, "only {checked} examples checked");
}

/// The events a request's end publishes are the `webhooks` section's `requestSettled`
/// batch: applied, superseded and cancelled ones, as the service renders them.
#[tokio::test]
async fn published_events_match_the_webhooks_request_settled_batch() {
    use soc_settings::functions::fakes::post_min_soc;
    use soc_settings::functions::set_soc_http::{handle, ApiRequest};
    let doc = document();
    let v = validator(
        &doc,
        "/webhooks/requestSettled/post/requestBody/content/application~1cloudevents-batch+json/schema",
    );
    let h = Harness::new().notifying();
    h.device.set_online("d1", false);
    post_min_soc(&h, "d1", 30).await;
    let pending = post_min_soc(&h, "d1", 40).await;
    let cancel = ApiRequest {
        method: "DELETE".into(),
        device_id: "d1".into(),
        rest: Some(format!(
            "requests/{}",
            pending["requestId"].as_str().unwrap()
        )),
        ..Default::default()
    };
    assert_eq!(handle(&h.svc, cancel).await.status, 200);
    h.device.set_online("d1", true);
    post_min_soc(&h, "d1", 50).await;
    let batch: Vec<Value> = h
        .notifier
        .received()
        .iter()
        .map(|e| e.cloud_event("https://soc-settings.azurewebsites.net"))
        .collect();
    let types: Vec<&str> = batch.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "com.socsettings.request.superseded",
            "com.socsettings.request.cancelled",
            "com.socsettings.request.applied"
        ]
    );
    let batch = Value::Array(batch);
    let errors: Vec<String> = v.iter_errors(&batch).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:#?}\n{batch:#}");
}
