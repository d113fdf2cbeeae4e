//! Every payload in `tests/fixtures/host-payloads/` (copied from the shared
//! reference, see its SOURCE.md) goes through the typed parser of its binding,
//! pretty-printed as stored and compact as the host sends it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::http::{Method, Request};
use bytes::Bytes;
use serde_json::{json, Value};
use soc_settings::host::{
    HttpCall, HttpResponseOut, HttpTriggerRequest, InvocationRequest, InvocationResponse,
    ServiceBusDelivery, TimerInfo,
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/host-payloads")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The fixture as stored (pretty) and re-serialised compactly (as the host sends it).
fn both_forms(name: &str) -> [Vec<u8>; 2] {
    let pretty = read(name);
    let value: Value = serde_json::from_slice(&pretty).unwrap();
    let compact = serde_json::to_vec(&value).unwrap();
    assert!(
        compact.len() < pretty.len(),
        "{name}: compact form is not smaller"
    );
    [pretty, compact]
}

/// Parses an envelope and checks that `sys.MethodName` names a function in
/// `config/`; returns the envelope and that function's trigger binding name.
fn invocation(bytes: &[u8]) -> (InvocationRequest<'_>, String) {
    let inv = InvocationRequest::from_slice(bytes).unwrap();
    let function = inv.function_name().expect("sys.MethodName");
    let config = dir().join("config").join(&function).join("function.json");
    let config: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    let trigger = config["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["direction"] == "in" && b["type"].as_str().unwrap().ends_with("Trigger"))
        .expect("a trigger binding");
    (inv, trigger["name"].as_str().unwrap().to_string())
}

fn utc(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    Some(text.parse().unwrap())
}

const ORDER: &str = r#"{"orderId":"A-1001","amount":12.5,"currency":"EUR"}"#;

#[test]
fn every_fixture_file_has_a_test() {
    let covered = [
        "README.md",
        "SOURCE.md",
        "config",
        "http-trigger-forwarded.http",
        "http-trigger-not-forwarded.json",
        "invocation-request-envelope.http",
        "response-http-output.json",
        "response-minimal.json",
        "response-servicebus-output.json",
        "servicebus-trigger-binary.json",
        "servicebus-trigger-session.json",
        "servicebus-trigger.json",
        "timer-trigger-no-monitor.json",
        "timer-trigger-retry.json",
        "timer-trigger.json",
    ];
    for entry in std::fs::read_dir(dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(covered.contains(&name.as_str()), "no test covers {name}");
    }
}

#[test]
fn a_double_encoded_service_bus_message_yields_its_body_and_metadata() {
    for bytes in both_forms("servicebus-trigger.json") {
        let (inv, binding) = invocation(&bytes);
        assert_eq!(binding, "msg");
        let d = ServiceBusDelivery::from_invocation(&inv, &binding).unwrap();
        assert_eq!(d.body_text(), Some(ORDER));
        assert_eq!(
            d.message_id.as_deref(),
            Some("6b1e9f03a2d74c58b0e47d2c9a15f8e3")
        );
        assert_eq!(d.delivery_count, 1);
        assert_eq!(d.sequence_number, Some(734));
        assert_eq!(d.content_type.as_deref(), Some("application/json"));
        assert_eq!(d.correlation_id.as_deref(), Some("req-7f3a19"));
        assert_eq!(d.session_id, None);
        assert_eq!(d.enqueued_time, utc("2025-03-04T09:14:05Z"));
        assert_eq!(d.expires_at, utc("2025-03-18T09:14:05Z"));
        assert_eq!(d.application_properties["tenant"], json!("fabrikam"));
        assert_eq!(d.application_properties["attempt"], json!(1));
        // The leaked body properties are there, double-encoded, as the notes say.
        assert_eq!(inv.metadata_text("orderId").as_deref(), Some("A-1001"));
    }
}

#[test]
fn a_binary_service_bus_message_decodes_to_the_same_bytes() {
    let plain = {
        let bytes = read("servicebus-trigger.json");
        let (inv, binding) = invocation(&bytes);
        ServiceBusDelivery::from_invocation(&inv, &binding).unwrap()
    };
    for bytes in both_forms("servicebus-trigger-binary.json") {
        let (inv, binding) = invocation(&bytes);
        let d = ServiceBusDelivery::from_invocation(&inv, &binding).unwrap();
        assert_eq!(d.body, plain.body);
        assert_eq!(d.message_id, plain.message_id);
        assert_eq!(d.delivery_count, 1);
        assert_eq!(d.expires_at, plain.expires_at);
        assert!(
            inv.metadata("orderId").is_none(),
            "binary bodies do not leak"
        );
    }
}

#[test]
fn a_session_message_has_a_text_body_and_session_metadata() {
    for bytes in both_forms("servicebus-trigger-session.json") {
        let (inv, binding) = invocation(&bytes);
        assert_eq!(binding, "evt");
        let d = ServiceBusDelivery::from_invocation(&inv, &binding).unwrap();
        assert_eq!(d.body_text(), Some("customer 77 changed address"));
        assert_eq!(d.delivery_count, 2);
        assert_eq!(d.message_id.as_deref(), Some("evt-000981"));
        assert_eq!(d.session_id.as_deref(), Some("customer-77"));
        assert_eq!(d.subject.as_deref(), Some("address-changed"));
        assert_eq!(d.content_type.as_deref(), Some("text/plain"));
        assert_eq!(d.sequence_number, Some(5128));
        assert_eq!(d.expires_at, utc("9999-12-31T23:59:59Z"));
        assert!(d.application_properties.is_empty());
    }
}

#[test]
fn a_monitored_timer_has_its_schedule_status() {
    for bytes in both_forms("timer-trigger.json") {
        let (inv, binding) = invocation(&bytes);
        let t = TimerInfo::from_invocation(&inv, &binding).unwrap();
        assert!(!t.is_past_due);
        let s = t.schedule_status.unwrap();
        assert_eq!(s.last, utc("2025-03-03T02:00:00.0061817Z"));
        assert_eq!(s.next, utc("2025-03-04T02:00:00Z").unwrap());
        assert_eq!(s.last_updated, utc("2025-03-03T02:00:00.0061817Z").unwrap());
        assert_eq!(inv.retry_context(), None);
        assert_eq!(inv.host_utc_now(), utc("2025-03-04T02:00:00.012448Z"));
    }
}

#[test]
fn an_unmonitored_timer_has_no_schedule_status() {
    for bytes in both_forms("timer-trigger-no-monitor.json") {
        let (inv, binding) = invocation(&bytes);
        let t = TimerInfo::from_invocation(&inv, &binding).unwrap();
        assert_eq!(t.schedule_status, None);
        assert!(!t.is_past_due);
    }
}

#[test]
fn a_timer_with_a_retry_policy_carries_a_retry_context() {
    for bytes in both_forms("timer-trigger-retry.json") {
        let (inv, binding) = invocation(&bytes);
        let t = TimerInfo::from_invocation(&inv, &binding).unwrap();
        assert_eq!(
            t.schedule_status.unwrap().next,
            utc("2025-03-04T09:00:00Z").unwrap()
        );
        let retry = inv.retry_context().unwrap();
        assert_eq!(retry.retry_count, Some(0));
        assert_eq!(retry.max_retry_count, Some(3));
        assert_eq!(retry.raw["Exception"], Value::Null);
    }
}

#[test]
fn a_not_forwarded_http_request_yields_method_headers_params_query_and_body_and_never_the_url() {
    for bytes in both_forms("http-trigger-not-forwarded.json") {
        let (inv, binding) = invocation(&bytes);
        assert_eq!(binding, "req");
        let r = HttpTriggerRequest::from_invocation(&inv, &binding).unwrap();
        assert_eq!(r.method, Method::POST);
        // The URL carries the function key when one was used; nothing keeps it.
        assert!(!format!("{r:?}").contains("contoso-orders.azurewebsites.net/api"));
        assert_eq!(r.headers.get("content-type"), Some("application/json"));
        assert_eq!(r.headers.get_all("ACCEPT"), ["application/json"]);
        assert_eq!(r.params.get("tenant").map(String::as_str), Some("fabrikam"));
        assert_eq!(r.query.get("tag").map(String::as_str), Some("a,b"));
        assert_eq!(r.query.get("dryRun").map(String::as_str), Some("true"));
        let body = r.body.clone().unwrap();
        assert_eq!(body.len(), 78, "Content-Length header says 78");
        let parsed: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["sku"], json!("W-100"));
        // Metadata disagrees with Data on repeated keys: last value wins there.
        assert_eq!(inv.metadata_text("tag").as_deref(), Some("b"));
        assert_eq!(inv.metadata_text("express").as_deref(), Some("True"));

        let call = r.into_call();
        assert_eq!(call.method, Method::POST);
        assert_eq!(call.header("x-forwarded-proto"), Some("https"));
        assert_eq!(call.body.len(), 78);
        assert_eq!(
            call.params.get("tenant").map(String::as_str),
            Some("fabrikam")
        );
    }
}

/// Splits a raw HTTP/1.1 request fixture into request parts.
fn parse_http_fixture(name: &str) -> axum::http::request::Parts {
    let text = String::from_utf8(read(name)).unwrap();
    let mut lines = text.lines();
    let mut request_line = lines.next().unwrap().split(' ');
    let mut builder = Request::builder()
        .method(request_line.next().unwrap())
        .uri(request_line.next().unwrap());
    for line in lines.take_while(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').unwrap();
        builder = builder.header(name.trim(), value.trim());
    }
    builder.body(()).unwrap().into_parts().0
}

#[test]
fn a_forwarded_http_request_becomes_the_same_call_type() {
    let parts = parse_http_fixture("http-trigger-forwarded.http");
    assert_eq!(parts.uri.path(), "/api/health", "forwarded paths keep /api");
    let call = HttpCall::from_forwarded(&parts, BTreeMap::new(), Bytes::new());
    assert_eq!(call.method, Method::GET);
    assert_eq!(call.query.get("verbose").map(String::as_str), Some("1"));
    assert!(call
        .header("user-agent")
        .unwrap()
        .ends_with("Azure-Functions-Host/4.1037.0.22917"));
    assert!(call.header("X-Azure-Functions-InvocationId").is_some());
    assert!(call.body.is_empty());
}

#[test]
fn an_envelope_invocation_is_a_json_post_to_the_function_name() {
    let parts = parse_http_fixture("invocation-request-envelope.http");
    let bytes = read("http-trigger-not-forwarded.json");
    let (inv, _) = invocation(&bytes);
    assert_eq!(parts.method, Method::POST);
    assert_eq!(
        parts.uri.path(),
        format!("/{}", inv.function_name().unwrap())
    );
    let content_type = parts.headers["content-type"].to_str().unwrap();
    assert!(content_type.starts_with("application/json"));
    assert!(
        parts.headers.get("content-length").is_none(),
        "chunked: no length"
    );
}

fn response_fixture(name: &str) -> Value {
    serde_json::from_slice(&read(name)).unwrap()
}

#[test]
fn the_minimal_response_is_exactly_what_an_empty_success_renders() {
    assert_eq!(
        InvocationResponse::ok().to_json(),
        response_fixture("response-minimal.json")
    );
}

#[test]
fn the_http_output_response_round_trips_through_the_typed_output() {
    let fixture = response_fixture("response-http-output.json");
    let out = HttpResponseOut::from_output(&fixture["Outputs"]["res"]).unwrap();
    assert_eq!(out.status, 201);
    assert_eq!(out.body, r#"{"orderId":"A-1001","status":"accepted"}"#);
    let mut rendered = InvocationResponse::ok().with_http("res", out);
    for line in fixture["Logs"].as_array().unwrap() {
        rendered = rendered.with_log(line.as_str().unwrap());
    }
    let rendered = rendered.to_json();
    assert_eq!(rendered["Outputs"]["res"], fixture["Outputs"]["res"]);
    assert_eq!(rendered["Logs"], fixture["Logs"]);
    assert_eq!(rendered["ReturnValue"], fixture["ReturnValue"]);
}

#[test]
fn the_service_bus_output_response_is_what_queue_messages_render() {
    let fixture = response_fixture("response-servicebus-output.json");
    let messages = fixture["Outputs"]["outMsg"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    let rendered = InvocationResponse::ok()
        .with_queue_messages("outMsg", messages)
        .with_log("forwarded 2 orders to billing")
        .to_json();
    assert_eq!(rendered, fixture);
}
