//! Robustness: property tests through the real router with in-memory ports, and a short
//! bounded fuzz run of the payload parsers (the long run is in the benchmark command).
//!
//! 1. HTTP input (forwarded `POST /api/devices/{id}/soc` and the `/SetSocHttp` envelope):
//!    deviceIds, `Idempotency-Key` headers and bodies, valid or not. An independent oracle
//!    written from the API contract decides validity. Invalid -> only 4xx
//!    `application/problem+json`, nothing stored, nothing sent, no device call. Valid ->
//!    `200 applied` (so the oracle and the service agree in both directions).
//! 2. Host payload variations for `/SocQueueTrigger`, `/DrainSocTimer` and `/SetSocHttp`:
//!    missing optional metadata, odd timestamps, base64 / double-encoded / object bodies,
//!    random JSON. No panic (a panic hook counts them, including ones the router's panic
//!    layer turns into 500s); a 2xx is always a non-empty JSON body.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode};
use base64::Engine as _;
use http_body_util::BodyExt;
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use testkit::fuzz;
use tower::ServiceExt;

use soc_settings::app::{router, AppState};
use soc_settings::functions::fakes::Harness;

// ------------------------------------------------------------------ the app on in-memory ports

/// The router on the crate's in-memory ports (`functions::fakes`), every device known and online.
struct World {
    h: Harness,
    app: axum::Router,
}

impl World {
    fn new() -> Self {
        let h = Harness::new();
        h.device.set_default_online(true);
        let app = router(AppState::new(Ok(h.svc.clone())));
        Self { h, app }
    }

    fn device_calls(&self) -> usize {
        let (status, put) = self.h.device.calls();
        status + put
    }

    fn put_calls(&self) -> usize {
        self.h.device.calls().1
    }

    fn sent(&self) -> usize {
        self.h.queue.sent().len()
    }

    fn nothing_stored_or_sent(&self) -> bool {
        self.h.ledger.is_empty() && self.sent() == 0 && self.device_calls() == 0
    }
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Sends one request through the router on this thread; returns the answer and
/// how many panics happened meanwhile (caught by the router's panic layer or not).
fn send(rt: &tokio::runtime::Runtime, app: &axum::Router, req: Request<Body>) -> (Answer, usize) {
    fuzz::install_panic_hook();
    let before = fuzz::panics_on_this_thread();
    let answer = rt.block_on(async {
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let content_type = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
        Answer {
            status,
            content_type,
            body,
        }
    });
    (answer, fuzz::panics_on_this_thread() - before)
}

// ------------------------------------------------------------------ the oracle (from the contract)

fn valid_device_id(raw: &[u8]) -> bool {
    (1..=64).contains(&raw.len())
        && raw
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !raw.iter().all(|b| *b == b'.')
}

fn valid_key(raw: &[u8]) -> bool {
    (1..=128).contains(&raw.len()) && raw.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// `Some(minSoc)` when the body is a JSON object with exactly one of `dod`/`minSoc`,
/// a whole number from 0 to 100, nothing else, at most 1 KiB.
fn valid_body(raw: &[u8]) -> Option<u8> {
    if raw.len() > 1024 {
        return None;
    }
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(raw) else {
        return None;
    };
    if m.len() != 1 {
        return None;
    }
    let (k, v) = m.iter().next()?;
    // A JSON Schema integer: no fractional part, however written (50, 50.0, 5e1).
    let n = match v.as_u64() {
        Some(n) => n as f64,
        None => v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0)?,
    };
    let n = (n <= 100.0).then_some(n as u8)?;
    match k.as_str() {
        "minSoc" => Some(n),
        "dod" => Some(100 - n),
        _ => None,
    }
}

// ------------------------------------------------------------------ generators

fn device_id() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => "[A-Za-z0-9._-]{1,64}".prop_map(String::into_bytes),
        1 => "[.]{1,3}".prop_map(String::into_bytes),
        1 => "[A-Za-z0-9._-]{65,70}".prop_map(String::into_bytes),
        2 => "[A-Za-z0-9._/ %~:@!$&'()*+,;=-]{1,12}".prop_map(String::into_bytes),
        1 => "\\PC{1,8}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 1..12),
    ]
}

/// Header value bytes HTTP can carry (no controls but tab, no DEL).
fn key() -> impl Strategy<Value = Option<Vec<u8>>> {
    let byte = prop_oneof![
        20 => 0x21u8..=0x7e,
        1 => Just(b' '),
        1 => Just(b'\t'),
        1 => 0x80u8..=0xff,
    ];
    prop_oneof![
        3 => Just(None),
        4 => "[!-~]{1,128}".prop_map(|s| Some(s.into_bytes())),
        2 => prop::collection::vec(byte, 0..140).prop_map(Some),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (-5i64..=110).prop_map(|n| json!(n)),
        1 => any::<u64>().prop_map(|n| json!(n)),
        1 => any::<i64>().prop_map(|n| json!(n)),
        1 => prop_oneof![Just(50.0f64), Just(0.5), Just(-0.0), Just(100.000001), Just(1e2)]
            .prop_map(|f| json!(f)),
        1 => "[0-9]{1,3}".prop_map(|s| json!(s)),
        1 => any::<bool>().prop_map(|b| json!(b)),
        1 => Just(Value::Null),
        1 => Just(json!([50])),
        1 => Just(json!({"minSoc": 50})),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        5 => Just("minSoc".to_string()),
        5 => Just("dod".to_string()),
        1 => Just("minsoc".to_string()),
        1 => Just("DOD".to_string()),
        1 => Just(String::new()),
        1 => "[a-z]{1,6}",
    ];
    prop_oneof![
        6 => prop::collection::btree_map(field, json_value(), 0..4)
            .prop_map(|m| serde_json::to_vec(&m).unwrap()),
        2 => prop::collection::vec(any::<u8>(), 0..48),
        1 => (0u8..=100, 1000usize..1100)
            .prop_map(|(n, pad)| format!("{{\"minSoc\":{n}}}{}", " ".repeat(pad)).into_bytes()),
        2 => (0u8..=100, any::<usize>(), any::<u8>()).prop_map(|(n, i, b)| {
            let mut v = format!("{{\"dod\":{n}}}").into_bytes();
            let at = i % v.len();
            v[at] = b;
            v
        }),
        1 => prop_oneof![Just(b"".to_vec()), Just(b"  \n".to_vec()), Just(b"null".to_vec()), Just(b"[]".to_vec())],
    ]
}

fn percent_encode(raw: &[u8]) -> String {
    raw.iter()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') {
                (*b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ------------------------------------------------------------------ checks

fn check_http_answer(
    world: &World,
    status: u16,
    content_type: &str,
    body: &[u8],
    expected: Option<u8>,
) -> Result<(), TestCaseError> {
    match expected {
        None => {
            prop_assert!((400..500).contains(&status), "status {status}");
            prop_assert!(
                content_type.starts_with("application/problem+json"),
                "content type {content_type:?}"
            );
            let problem: Value = serde_json::from_slice(body)
                .map_err(|e| TestCaseError::fail(format!("problem body is not JSON: {e}")))?;
            prop_assert_eq!(problem["status"].as_u64(), Some(status as u64));
            prop_assert!(problem["title"].is_string());
            prop_assert!(
                world.nothing_stored_or_sent(),
                "invalid input stored or sent something: ledger empty {}, queue {}, device calls {}",
                world.h.ledger.is_empty(),
                world.sent(),
                world.device_calls()
            );
        }
        Some(min_soc) => {
            let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            prop_assert_eq!(status, 200, "valid input not applied: {}", body);
            prop_assert_eq!(&body["status"], "applied");
            prop_assert_eq!(body["minSoc"].as_u64(), Some(min_soc as u64));
            prop_assert_eq!(world.put_calls(), 1);
            prop_assert_eq!(world.sent(), 0);
        }
    }
    Ok(())
}

fn expected_outcome(device: &[u8], key: &Option<Vec<u8>>, body: &[u8]) -> Option<u8> {
    if !valid_device_id(device) || key.as_deref().is_some_and(|k| !valid_key(k)) {
        return None;
    }
    valid_body(body)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn forwarded_http_input_is_either_applied_or_a_4xx_problem_with_nothing_stored(
        device in device_id(), key in key(), body in body(),
    ) {
        let rt = runtime();
        let world = World::new();
        let mut req = Request::post(format!("/api/devices/{}/soc", percent_encode(&device)))
            .header("content-type", "application/json");
        if let Some(k) = &key {
            req = req.header("Idempotency-Key", HeaderValue::from_bytes(k).unwrap());
        }
        let (answer, panics) = send(&rt, &world.app, req.body(Body::from(body.clone())).unwrap());
        prop_assert_eq!(panics, 0);
        check_http_answer(
            &world,
            answer.status.as_u16(),
            &answer.content_type,
            &answer.body,
            expected_outcome(&device, &key, &body),
        )?;
    }

    #[test]
    fn envelope_http_input_is_either_applied_or_a_4xx_problem_with_nothing_stored(
        device in device_id(), key in key(), body in body(), omit_empty_body in any::<bool>(),
    ) {
        let rt = runtime();
        let world = World::new();
        // The envelope carries text: what the host would have decoded from the request.
        let device = String::from_utf8_lossy(&device).into_owned();
        let body = String::from_utf8_lossy(&body).into_owned();
        // Kestrel refuses non-ASCII header values before the host sees them.
        let key = key.filter(|k| k.is_ascii()).map(|k| String::from_utf8(k).unwrap());
        let mut headers = json!({"Content-Type": ["application/json"]});
        if let Some(k) = &key {
            headers["Idempotency-Key"] = json!([k]);
        }
        let mut req = json!({
            "Url": "http://localhost:7071/api/devices/x/soc",
            "Method": "POST",
            "Query": {},
            "Headers": headers,
            "Params": {"deviceId": device},
            "Identities": [],
        });
        if !(body.is_empty() && omit_empty_body) {
            req["Body"] = json!(body);
        }
        let envelope = json!({"Data": {"req": req}, "Metadata": {"deviceId": format!("{device:?}"), "sys": {"MethodName": "SetSocHttp"}}});
        let (answer, panics) = send(
            &rt,
            &world.app,
            Request::post("/SetSocHttp")
                .header("content-type", "application/json")
                .body(Body::from(envelope.to_string()))
                .unwrap(),
        );
        prop_assert_eq!(panics, 0);
        prop_assert_eq!(answer.status, StatusCode::OK);
        let out: Value = serde_json::from_slice(&answer.body).unwrap();
        let res = &out["Outputs"]["res"];
        let status = res["statusCode"].as_u64().unwrap_or(0) as u16;
        let content_type = res["headers"]["Content-Type"].as_str().unwrap_or("").to_string();
        let inner = res["body"].as_str().unwrap_or("").as_bytes().to_vec();
        let key_bytes = key.map(String::into_bytes);
        check_http_answer(
            &world,
            status,
            &content_type,
            &inner,
            expected_outcome(device.as_bytes(), &key_bytes, body.as_bytes()),
        )?;
    }
}

// ------------------------------------------------------------------ host payload variations

fn odd_time() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!("2025-03-04T09:14:05.1234567Z")),
        Just(json!("2025-03-04T09:14:05")),
        Just(json!("2025-03-04T09:14:05+14:00")),
        Just(json!("\"2025-03-04T09:14:05.12Z\"")),
        Just(json!("0001-01-01T00:00:00")),
        Just(json!("0001-01-01T00:00:00-14:00")),
        Just(json!("9999-12-31T23:59:59.9999999Z")),
        Just(json!("9999-12-31T23:59:59.9999999+00:00")),
        Just(json!("2025-02-30T10:00:00Z")),
        Just(json!("yesterday")),
        Just(json!("")),
        Just(json!(1_741_079_645)),
        Just(Value::Null),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        odd_time(),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("Data".to_string()),
                    Just("Metadata".to_string()),
                    Just("msg".to_string()),
                    Just("timer".to_string()),
                    Just("req".to_string()),
                    "[A-Za-z]{1,8}",
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A wake-up message body, valid or bent.
fn wake_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => ("[a-z0-9-]{1,10}", "[A-Za-z0-9._/-]{0,10}", any::<u8>(), odd_time(), odd_time()).prop_map(
            |(rid, dev, soc, req, exp)| {
                json!({"requestId": rid, "deviceId": dev, "minSoc": soc, "requestedAt": req, "expiresAt": exp})
                    .to_string()
                    .into_bytes()
            }
        ),
        1 => any_json().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..32),
    ]
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn casing(name: &str, variant: u8) -> String {
    match variant % 3 {
        0 => name.to_string(),
        1 => name.to_ascii_lowercase(),
        _ => name.to_ascii_uppercase(),
    }
}

fn sb_envelope() -> impl Strategy<Value = Value> {
    let metadata_value = prop_oneof![
        Just(None),
        Just(Some(json!("1"))),
        Just(Some(json!(1))),
        Just(Some(json!("\"1\""))),
        Just(Some(json!("-1"))),
        Just(Some(json!("99999999999"))),
        Just(Some(json!("x"))),
        odd_time().prop_map(Some),
    ];
    (
        wake_body(),
        0u8..5,
        metadata_value.clone(),
        prop_oneof![Just(None), Just(Some(json!("\"m-1\""))), Just(Some(json!("m-1"))), Just(Some(json!(5)))],
        prop::option::of(odd_time()),
        prop::option::of(odd_time()),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(body, form, count, id, enq, exp, sys, case)| {
            let text = String::from_utf8_lossy(&body).into_owned();
            let data = match form {
                0 => json!(b64(&body)),
                1 => json!(serde_json::to_string(&text).unwrap()),
                2 => serde_json::from_slice(&body).unwrap_or(json!(text)),
                3 => json!(text),
                _ => Value::Null,
            };
            let mut md = Map::new();
            if let Some(c) = count {
                md.insert("DeliveryCount".into(), c);
            }
            if let Some(i) = id {
                md.insert("MessageId".into(), i);
            }
            if let Some(t) = enq {
                md.insert("EnqueuedTimeUtc".into(), t);
            }
            if let Some(t) = exp {
                md.insert("ExpiresAtUtc".into(), t);
            }
            if sys {
                md.insert("sys".into(), json!({"MethodName": "SocQueueTrigger", "UtcNow": "2025-03-04T09:14:05.1234567Z"}));
            }
            json!({ casing("Data", case): { casing("msg", case / 3): data }, casing("Metadata", case / 9): md })
        })
}

fn timer_envelope() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(json!(true)), Just(json!(false)), Just(json!("true")), Just(Value::Null), Just(json!(1))],
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            (odd_time(), odd_time(), odd_time()).prop_map(|(l, n, u)| Some(json!({"Last": l, "Next": n, "LastUpdated": u}))),
            any_json().prop_map(Some),
        ],
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(past_due, has_past_due, status, sys, case)| {
            let mut timer = Map::new();
            timer.insert("Schedule".into(), json!({"AdjustForDST": true}));
            if has_past_due {
                timer.insert(casing("IsPastDue", case), past_due);
            }
            if let Some(s) = status {
                timer.insert("ScheduleStatus".into(), s);
            }
            let mut md = Map::new();
            if sys {
                md.insert("sys".into(), json!({"MethodName": "DrainSocTimer", "UtcNow": "2025-03-04T09:15:00.0000002Z"}));
            }
            json!({"Data": {casing("timer", case / 3): timer}, "Metadata": md})
        })
}

fn http_envelope() -> impl Strategy<Value = Value> {
    (
        prop_oneof![Just(json!("POST")), Just(json!("GET")), Just(json!("G E T")), Just(json!("")), Just(json!(1))],
        prop_oneof![
            Just(json!({"Content-Type": ["application/json"]})),
            Just(json!({"Content-Type": ["application/octet-stream"]})),
            Just(json!({"Idempotency-Key": [null, 1, {}]})),
            Just(json!({"Idempotency-Key": "k"})),
            Just(json!([])),
            any_json(),
        ],
        prop_oneof![Just(json!({"deviceId": "bat-1"})), Just(json!({})), Just(json!({"deviceId": 7})), any_json()],
        prop_oneof![
            Just(Some(json!("{\"minSoc\":35}"))),
            Just(Some(json!(b64(b"{\"minSoc\":35}")))),
            Just(Some(json!({"minSoc": 35}))),
            Just(Some(Value::Null)),
            Just(None),
            any_json().prop_map(Some),
        ],
    )
        .prop_map(|(method, headers, params, body)| {
            let mut req = json!({"Url": "http://localhost/api/devices/bat-1/soc", "Method": method, "Query": {}, "Headers": headers, "Params": params});
            if let Some(b) = body {
                req["Body"] = b;
            }
            json!({"Data": {"req": req}, "Metadata": {}})
        })
}

fn check_invocation_answer(answer: &Answer, panics: usize) -> Result<(), TestCaseError> {
    prop_assert_eq!(panics, 0, "a panic (the router's panic layer answers 500)");
    if answer.status.is_success() {
        prop_assert!(
            answer.content_type.starts_with("application/json"),
            "2xx with content type {:?}",
            answer.content_type
        );
        prop_assert!(!answer.body.is_empty(), "2xx with an empty body");
        let v: Result<Value, _> = serde_json::from_slice(&answer.body);
        prop_assert!(v.is_ok(), "2xx body is not JSON");
        prop_assert!(v.unwrap().is_object());
    }
    Ok(())
}

fn invoke(
    rt: &tokio::runtime::Runtime,
    world: &World,
    route: &str,
    body: Vec<u8>,
) -> (Answer, usize) {
    send(
        rt,
        &world.app,
        Request::post(route)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap(),
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn service_bus_payload_variations_never_panic_and_change_nothing(env in sb_envelope()) {
        let rt = runtime();
        let world = World::new();
        let (answer, panics) = invoke(&rt, &world, "/SocQueueTrigger", env.to_string().into_bytes());
        check_invocation_answer(&answer, panics)?;
        // The ledger is empty: whatever the message says, there is nothing to apply.
        prop_assert!(world.nothing_stored_or_sent());
    }

    #[test]
    fn timer_payload_variations_never_panic_and_change_nothing(env in timer_envelope()) {
        let rt = runtime();
        let world = World::new();
        let (answer, panics) = invoke(&rt, &world, "/DrainSocTimer", env.to_string().into_bytes());
        check_invocation_answer(&answer, panics)?;
        prop_assert!(world.nothing_stored_or_sent());
    }

    #[test]
    fn http_envelope_variations_never_panic(env in http_envelope()) {
        let rt = runtime();
        let world = World::new();
        let (answer, panics) = invoke(&rt, &world, "/SetSocHttp", env.to_string().into_bytes());
        check_invocation_answer(&answer, panics)?;
    }

    #[test]
    fn random_json_and_bytes_on_every_function_route_never_panic(
        route in prop_oneof![
            Just("/SocQueueTrigger"),
            Just("/DrainSocTimer"),
            Just("/SetSocHttp"),
            Just("/DeviceEventsHttp"),
        ],
        body in prop_oneof![
            any_json().prop_map(|v| v.to_string().into_bytes()),
            any_json().prop_map(|v| json!({"Data": v.clone(), "Metadata": v}).to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
    ) {
        let rt = runtime();
        let world = World::new();
        let (answer, panics) = invoke(&rt, &world, route, body);
        check_invocation_answer(&answer, panics)?;
    }
}

// ------------------------------------------------------------------ device events

/// A CloudEvent, often valid, often with one attribute changed to any JSON or removed.
fn cloud_event() -> impl Strategy<Value = Value> {
    let attribute = prop_oneof![
        Just("specversion"),
        Just("id"),
        Just("source"),
        Just("type"),
        Just("subject"),
        Just("time"),
    ];
    (
        prop_oneof![
            Just("com.vendor.device.connected"),
            Just("com.vendor.device.disconnected"),
            Just("com.vendor.other"),
        ],
        device_id(),
        prop::option::of((attribute, prop::option::of(any_json()))),
    )
        .prop_map(|(ty, device, change)| {
            let mut e = json!({"specversion": "1.0", "id": "e1", "source": "/vendor", "type": ty,
                "subject": String::from_utf8_lossy(&device)});
            if let Some((name, value)) = change {
                match value {
                    Some(v) => e[name] = v,
                    None => drop(e.as_object_mut().unwrap().remove(name)),
                }
            }
            e
        })
}

proptest! {
    #![proptest_config(config())]

    /// With no request stored, no event can change anything: whatever arrives is `200`,
    /// or a `400`/`415` problem document, and nothing is stored, sent or PUT.
    #[test]
    fn device_events_never_panic_and_change_nothing_without_a_pending_request(
        content_type in prop_oneof![
            Just("application/cloudevents+json"),
            Just("application/cloudevents-batch+json"),
            Just("application/json"),
            Just("text/plain"),
        ],
        body in prop_oneof![
            cloud_event().prop_map(|e| e.to_string().into_bytes()),
            prop::collection::vec(cloud_event(), 0..4).prop_map(|v| json!(v).to_string().into_bytes()),
            any_json().prop_map(|v| v.to_string().into_bytes()),
            prop::collection::vec(any::<u8>(), 0..64),
        ],
    ) {
        let rt = runtime();
        let world = World::new();
        let req = Request::post("/api/device-events")
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        let (answer, panics) = send(&rt, &world.app, req);
        prop_assert_eq!(panics, 0);
        let status = answer.status.as_u16();
        prop_assert!(matches!(status, 200 | 400 | 415), "{}", status);
        let expected = if status == 200 { "application/json" } else { "application/problem+json" };
        prop_assert_eq!(answer.content_type.as_str(), expected);
        prop_assert!(world.nothing_stored_or_sent());
    }
}

// ------------------------------------------------------------------ bounded fuzz (short)

/// The short version of the benchmark command's fuzz run. Fails on any parser panic,
/// and when the mutator stops reaching the parsers (so it cannot pass by doing nothing).
#[test]
fn bounded_fuzz_of_the_payload_parsers_finds_no_panic() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let seeds = fuzz::seeds(root);
    assert!(seeds.len() >= 10, "fixtures missing: {}", seeds.len());
    let report = fuzz::run(&seeds, 0x5eed_0001, Duration::from_secs(4), 200_000);
    for f in &report.findings {
        eprintln!(
            "fuzz finding in {}: {}\ninput: {:?}",
            f.target,
            f.message,
            String::from_utf8_lossy(&f.input)
        );
    }
    assert!(
        report.findings.is_empty(),
        "{} panics",
        report.findings.len()
    );
    assert!(report.execs >= 1_000, "only {} inputs ran", report.execs);
    assert!(
        report.envelopes_ok > 0 && report.settings_ok > 0,
        "{report:?}"
    );
    assert!(
        report.outcomes > 20,
        "mutations reach few outcomes: {report:?}"
    );
}

#[test]
fn the_oracle_agrees_with_the_contract_examples() {
    // The oracle must itself be right, or the properties above prove nothing.
    assert_eq!(valid_body(br#"{"dod":80}"#), Some(20));
    assert_eq!(valid_body(br#"{"minSoc":35}"#), Some(35));
    assert_eq!(valid_body(br#"{"minSoc":35.0}"#), Some(35));
    for bad in [
        &br#"{"dod":80,"minSoc":20}"#[..],
        br#"{}"#,
        br#"{"minSoc":101}"#,
        br#"{"minSoc":50.5}"#,
        br#"{"minSoc":-1}"#,
        br#"{"minSoc":"50"}"#,
        br#"[{"minSoc":50}]"#,
        br#"{"minSoc":50"#,
    ] {
        assert_eq!(valid_body(bad), None, "{}", String::from_utf8_lossy(bad));
    }
    assert!(valid_device_id(b"bat-01.A_z") && !valid_device_id(b"a/b") && !valid_device_id(b""));
    assert!(valid_key(b"k-1") && !valid_key(b"a b") && !valid_key(&[b'a'; 129]));
}

/// Found by the forwarded-input property: a deviceId segment that does not percent-decode
/// to UTF-8 was answered by axum's own `text/plain` rejection instead of a problem document.
#[test]
fn a_device_id_that_is_not_utf8_is_a_problem_document() {
    let rt = runtime();
    let world = World::new();
    let (answer, panics) = send(
        &rt,
        &world.app,
        Request::post("/api/devices/%80%FF/soc")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"minSoc":50}"#))
            .unwrap(),
    );
    assert_eq!(panics, 0);
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.content_type, "application/problem+json");
    let problem: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(problem["field"], "deviceId");
    assert!(world.nothing_stored_or_sent());
}
