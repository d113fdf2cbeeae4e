//! Envelope shapes built without a handler, compared with the host-payload fixtures.

use std::path::Path;

use chrono::Utc;
use devtools::devhost::payloads::{interpret_http_output, servicebus_envelope};
use devtools::servicebus::{json_send, Broker, BrokerConfig};
use serde_json::{json, Value};

fn fixture(name: &str) -> Value {
    // The repo's copy of the host payload fixtures (see its SOURCE.md).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/host-payloads");
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

fn delivery(body: Value) -> devtools::servicebus::Delivery {
    let dir = std::env::temp_dir().join(format!("devtools-pl-{}", uuid::Uuid::new_v4().simple()));
    let mut c = BrokerConfig::new(&dir, "k", "v");
    c.queues = vec!["orders".into()];
    let b = Broker::open(c).unwrap();
    let mut req = json_send(&body, "6b1e9f03", Some(3600.0));
    req.broker_properties
        .insert("CorrelationId".into(), json!("req-7f3a19"));
    req.application_properties
        .insert("tenant".into(), json!("fabrikam"));
    b.send("orders", req).unwrap();
    b.receive("orders").unwrap()
}

#[test]
fn a_json_body_without_data_type_is_double_encoded_and_its_properties_leak_into_metadata() {
    let d = delivery(json!({"orderId": "A-1001", "amount": 12.5, "currency": "EUR"}));
    let env = servicebus_envelope("ProcessOrder", "msg", None, &d, "ns", "id", Utc::now());
    let text = serde_json::to_string(&env).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let fx = fixture("servicebus-trigger.json");
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&v["Metadata"]), keys(&fx["Metadata"]));
    // Data.msg: a JSON string whose content is a JSON string whose content is the body
    let once: String = serde_json::from_str(v["Data"]["msg"].as_str().unwrap()).unwrap();
    let body: Value = serde_json::from_str(&once).unwrap();
    assert_eq!(body["orderId"], "A-1001");
    assert_eq!(v["Metadata"]["orderId"], "\"A-1001\"");
    assert_eq!(v["Metadata"]["amount"], "\"12.5\"");
    assert_eq!(v["Metadata"]["SequenceNumber"], "1");
    assert_eq!(
        v["Metadata"]["ApplicationProperties"],
        json!({"tenant": "fabrikam"})
    );
    // host key order: Data first, MessageReceiver first in Metadata, sys before body props
    assert!(text.starts_with("{\"Data\":{\"msg\":"));
    assert!(text.contains("\"Metadata\":{\"MessageReceiver\":{}"));
    assert!(text.find("\"sys\"").unwrap() < text.find("\"orderId\":\"\\\"A-1001").unwrap());
}

#[test]
fn a_body_property_named_like_a_metadata_key_overwrites_it_as_the_host_does() {
    let d = delivery(json!({"MessageId": "from-body"}));
    let env =
        servicebus_envelope("ProcessOrder", "msg", None, &d, "ns", "id", Utc::now()).to_value();
    assert_eq!(env["Metadata"]["MessageId"], "\"from-body\"");
}

#[test]
fn http_outputs_map_status_headers_and_body_and_non_objects_fail() {
    let fx = fixture("response-http-output.json");
    let out = interpret_http_output(&fx, "res").unwrap();
    assert_eq!(out.status, 201);
    assert!(out.headers.contains(&(
        "Location".into(),
        "/api/tenants/fabrikam/orders/A-1001".into()
    )));
    assert_eq!(out.body, br#"{"orderId":"A-1001","status":"accepted"}"#);
    let out =
        interpret_http_output(&json!({"Outputs": {"res": {"statusCode": "404"}}}), "res").unwrap();
    assert_eq!((out.status, out.body.len()), (404, 0));
    let out = interpret_http_output(&fixture("response-minimal.json"), "res").unwrap();
    assert_eq!((out.status, out.body.as_slice()), (200, b"{}".as_slice()));
    assert!(interpret_http_output(&json!({"Outputs": {"res": "hello"}}), "res").is_err());
}
