//! Service Bus stand-in: REST send contract (raw HTTP) and broker semantics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use devtools::servicebus::{
    format_http_date, json_send, sas_token, Broker, BrokerConfig, ConnectionString, SettleError,
};
use serde_json::{json, Value};

const KEY_NAME: &str = "RootManageSharedAccessKey";
const KEY: &str = "bG9jYWwtZGV2ZWxvcG1lbnQta2V5LW5vdC1hLXNlY3JldA==";

fn tmp_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("devtools-sb-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn config(dir: &std::path::Path) -> BrokerConfig {
    let mut c = BrokerConfig::new(dir, KEY_NAME, KEY);
    c.queues = vec!["soc-settings".into()];
    c
}

/// Sends an empty JSON message with `id` and says what the broker made of it.
fn send_id(b: &Broker, id: &str) -> devtools::servicebus::SendOutcome {
    b.send("soc-settings", json_send(&json!({}), id, None))
        .unwrap()
}

/// The sequence number a send of `id` was enqueued with (panics on a duplicate).
fn enqueued_as(b: &Broker, id: &str) -> i64 {
    match send_id(b, id) {
        devtools::servicebus::SendOutcome::Enqueued { sequence_number } => sequence_number,
        other => panic!("{other:?}"),
    }
}

fn token(resource: &str) -> String {
    sas_token(resource, KEY_NAME, KEY, Utc::now().timestamp() + 600)
}

async fn post(
    base: &str,
    auth: Option<&str>,
    broker_props: Option<&str>,
    body: &str,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/soc-settings/messages"))
        .header("Content-Type", "application/json")
        .body(body.to_string());
    if let Some(a) = auth {
        r = r.header("Authorization", a);
    }
    if let Some(b) = broker_props {
        r = r.header("BrokerProperties", b);
    }
    r.send().await.unwrap()
}

#[test]
fn the_connection_string_in_local_settings_parses_with_the_emulator_flag() {
    let raw: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../local.settings.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let cs =
        ConnectionString::parse(raw["Values"]["ServiceBusConnection"].as_str().unwrap()).unwrap();
    assert_eq!(cs.host, "127.0.0.1");
    assert_eq!(cs.port, Some(7072));
    assert_eq!(cs.key_name, KEY_NAME);
    assert!(cs.use_development_emulator);
    let moved = ConnectionString {
        port: Some(9999),
        ..cs.clone()
    };
    assert_eq!(
        ConnectionString::parse(&moved.render()).unwrap().port,
        Some(9999)
    );
}

#[tokio::test]
async fn a_send_with_a_valid_sas_and_broker_properties_is_stored_with_201() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let bp = json!({"MessageId": "m-1", "TimeToLive": 120.0, "CorrelationId": "c-9", "Label": "soc", "ForcePersistence": true}).to_string();
    let r = post(
        &base,
        Some(&token(&format!("{base}/soc-settings"))),
        Some(&bp),
        r#"{"requestId":"r1"}"#,
    )
    .await;
    assert_eq!(r.status(), 201);
    let msgs = b.messages("soc-settings");
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.message_id, "m-1");
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    assert_eq!(m.correlation_id.as_deref(), Some("c-9"));
    assert_eq!(m.label.as_deref(), Some("soc"));
    assert_eq!(m.body(), br#"{"requestId":"r1"}"#);
    let ttl = (m.expires_at.unwrap() - m.enqueued_time).num_seconds();
    assert_eq!(ttl, 120);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_namespace_wide_token_and_a_token_for_the_production_host_are_both_accepted() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    for res in [
        base.clone(),
        "https://myns.servicebus.windows.net/soc-settings/messages".to_string(),
    ] {
        let r = post(&base, Some(&token(&res)), None, "{}").await;
        assert_eq!(r.status(), 201, "resource {res}");
    }
    srv.shutdown().await;
}

#[tokio::test]
async fn sends_with_a_missing_wrong_expired_or_out_of_scope_sas_get_401() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    b.ensure_queue("other").unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let res = format!("{base}/soc-settings");
    let now = Utc::now().timestamp();
    let bad = [
        None,
        Some("Bearer abc".to_string()),
        Some(sas_token(&res, KEY_NAME, "another-key", now + 600)),
        Some(sas_token(&res, "OtherKeyName", KEY, now + 600)),
        Some(sas_token(&res, KEY_NAME, KEY, now - 5)),
        Some(sas_token(
            &format!("{base}/other"),
            KEY_NAME,
            KEY,
            now + 600,
        )),
        // tampered expiry: signature no longer matches
        Some(
            sas_token(&res, KEY_NAME, KEY, now + 600)
                .replace(&format!("se={}", now + 600), &format!("se={}", now + 6000)),
        ),
    ];
    for (i, auth) in bad.iter().enumerate() {
        let r = post(&base, auth.as_deref(), None, "{}").await;
        assert_eq!(r.status(), 401, "case {i}: {auth:?}");
    }
    assert!(b.messages("soc-settings").is_empty());
    srv.shutdown().await;
}

#[tokio::test]
async fn the_key_is_used_as_utf8_text_not_base64_decoded() {
    // A signature made with the base64-decoded key bytes (a known client bug) must be rejected.
    use base64::Engine;
    use hmac::{Hmac, Mac};
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let sr: String =
        url::form_urlencoded::byte_serialize(format!("{base}/soc-settings").as_bytes()).collect();
    let se = Utc::now().timestamp() + 600;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&decoded).unwrap();
    mac.update(format!("{sr}\n{se}").as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    let auth = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={KEY_NAME}");
    assert_eq!(post(&base, Some(&auth), None, "{}").await.status(), 401);
    srv.shutdown().await;
}

#[tokio::test]
async fn malformed_broker_properties_give_400_and_unknown_queues_404() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let auth = token(&base);
    assert_eq!(
        post(&base, Some(&auth), Some("not json"), "{}")
            .await
            .status(),
        400
    );
    assert_eq!(
        post(
            &base,
            Some(&auth),
            Some(r#"{"ScheduledEnqueueTimeUtc":"yesterday"}"#),
            "{}"
        )
        .await
        .status(),
        400
    );
    assert_eq!(
        post(&base, Some(&auth), Some(r#"{"TimeToLive":-1}"#), "{}")
            .await
            .status(),
        400
    );
    let r = reqwest::Client::new()
        .post(format!("{base}/nope/messages"))
        .header("Authorization", &auth)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_message_id_within_the_window_is_accepted_but_stored_once() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let auth = token(&base);
    for _ in 0..2 {
        let r = post(&base, Some(&auth), Some(r#"{"MessageId":"same"}"#), "{}").await;
        assert_eq!(r.status(), 201);
    }
    assert_eq!(
        post(&base, Some(&auth), Some(r#"{"MessageId":"other"}"#), "{}")
            .await
            .status(),
        201
    );
    assert_eq!(b.messages("soc-settings").len(), 2);
    srv.shutdown().await;
}

#[tokio::test]
async fn a_scheduled_message_is_invisible_until_its_rfc1123_time() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let at = Utc::now() + chrono::Duration::seconds(2);
    let bp =
        json!({"MessageId": "later", "ScheduledEnqueueTimeUtc": format_http_date(at)}).to_string();
    assert_eq!(
        post(&base, Some(&token(&base)), Some(&bp), "{}")
            .await
            .status(),
        201
    );
    assert!(b.receive("soc-settings").is_none());
    let snap = b.snapshot();
    assert_eq!(snap[0].scheduled.len(), 1);
    assert_eq!(snap[0].active.len(), 0);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let d = b.receive("soc-settings").expect("visible after its time");
    assert_eq!(d.message.message_id, "later");
    assert_eq!(d.message.delivery_count, 1);
    srv.shutdown().await;
}

#[tokio::test]
async fn rfc2822_dates_with_a_numeric_offset_are_accepted_too() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let mut req = json_send(&json!({}), "x", None);
    req.broker_properties.insert(
        "ScheduledEnqueueTimeUtc".into(),
        json!((Utc::now() + chrono::Duration::hours(1)).to_rfc2822()),
    );
    b.send("soc-settings", req).unwrap();
    assert_eq!(b.snapshot()[0].scheduled.len(), 1);
}

#[tokio::test]
async fn an_expired_message_is_dead_lettered_with_ttl_expired_counting_from_its_scheduled_time() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let mut req = json_send(&json!({"n": 1}), "sched-ttl", Some(1.0));
    req.broker_properties.insert(
        "ScheduledEnqueueTimeUtc".into(),
        // RFC 1123 has whole seconds: active between +1 s and +2 s, expired 1 s later
        json!(format_http_date(Utc::now() + chrono::Duration::seconds(2))),
    );
    b.send("soc-settings", req).unwrap();
    b.send(
        "soc-settings",
        json_send(&json!({"n": 2}), "plain-ttl", Some(1.0)),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    b.sweep();
    let dl = b.dead_letters("soc-settings");
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].message_id, "plain-ttl");
    assert_eq!(
        dl[0].dead_letter_reason.as_deref(),
        Some("TTLExpiredException")
    );
    tokio::time::sleep(Duration::from_millis(1800)).await;
    b.sweep();
    assert_eq!(b.dead_letters("soc-settings").len(), 2);
    assert!(b.receive("soc-settings").is_none());
}

#[tokio::test]
async fn failures_are_redelivered_with_a_growing_delivery_count_then_dead_lettered_at_max() {
    let dir = tmp_dir();
    let mut c = config(&dir);
    c.max_delivery_count = 3;
    let b = Broker::open(c).unwrap();
    b.send("soc-settings", json_send(&json!({}), "poison", None))
        .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let h = b.start_consumer("soc-settings", 4, move |d| {
        let s2 = s2.clone();
        async move {
            s2.lock().unwrap().push(d.message.delivery_count);
            false
        }
    });
    for _ in 0..50 {
        if !b.dead_letters("soc-settings").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.abort();
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    let dl = b.dead_letters("soc-settings");
    assert_eq!(
        dl[0].dead_letter_reason.as_deref(),
        Some("MaxDeliveryCountExceeded")
    );
    assert_eq!(dl[0].delivery_count, 3);
}

#[tokio::test]
async fn a_successful_delivery_completes_the_message() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    b.send("soc-settings", json_send(&json!({}), "ok", None))
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let h = b.start_consumer("soc-settings", 1, move |_| {
        c2.fetch_add(1, Ordering::SeqCst);
        async { true }
    });
    for _ in 0..50 {
        if b.messages("soc-settings").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    h.abort();
    assert!(b.messages("soc-settings").is_empty());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(!dir
        .join("soc-settings/messages")
        .read_dir()
        .unwrap()
        .any(|_| true));
}

#[tokio::test]
async fn a_lapsed_lock_makes_the_message_available_again_and_the_late_completion_fails() {
    let dir = tmp_dir();
    let mut c = config(&dir);
    c.lock_duration = Duration::from_millis(200);
    let b = Broker::open(c).unwrap();
    b.send("soc-settings", json_send(&json!({}), "slow", None))
        .unwrap();
    let first = b.receive("soc-settings").unwrap();
    assert!(
        b.receive("soc-settings").is_none(),
        "locked message must not be handed out twice"
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    b.sweep();
    let second = b.receive("soc-settings").unwrap();
    assert_eq!(second.message.delivery_count, 2);
    assert_eq!(b.complete(&first), Err(SettleError::LockLost));
    b.complete(&second).unwrap();
    assert!(b.messages("soc-settings").is_empty());
}

#[tokio::test]
async fn messages_delivery_counts_dedup_and_sequence_numbers_survive_a_restart() {
    let dir = tmp_dir();
    {
        let b = Broker::open(config(&dir)).unwrap();
        b.send("soc-settings", json_send(&json!({"a": 1}), "m1", None))
            .unwrap();
        b.send(
            "soc-settings",
            json_send(&json!({"a": 2}), "m2", Some(3600.0)),
        )
        .unwrap();
        let d = b.receive("soc-settings").unwrap();
        b.abandon(&d).unwrap();
    }
    let b = Broker::open(config(&dir)).unwrap();
    let msgs = b.messages("soc-settings");
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0].delivery_count, 1);
    assert!(msgs[1].expires_at.is_some());
    // duplicate detection remembers m1
    assert_eq!(
        send_id(&b, "m1"),
        devtools::servicebus::SendOutcome::Duplicate
    );
    assert_eq!(enqueued_as(&b, "m3"), 3);
    let d = b.receive("soc-settings").unwrap();
    assert_eq!(
        (d.message.message_id.as_str(), d.message.delivery_count),
        ("m1", 2)
    );
}

#[tokio::test]
async fn the_consumer_never_runs_more_than_max_concurrent_deliveries_at_once() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    for i in 0..12 {
        b.send(
            "soc-settings",
            json_send(&json!({}), &format!("m{i}"), None),
        )
        .unwrap();
    }
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n2, p2) = (now.clone(), peak.clone());
    let h = b.start_consumer("soc-settings", 3, move |_| {
        let (n2, p2) = (n2.clone(), p2.clone());
        async move {
            let cur = n2.fetch_add(1, Ordering::SeqCst) + 1;
            p2.fetch_max(cur, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(40)).await;
            n2.fetch_sub(1, Ordering::SeqCst);
            true
        }
    });
    for _ in 0..100 {
        if b.messages("soc-settings").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.abort();
    assert!(b.messages("soc-settings").is_empty());
    assert_eq!(peak.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn custom_property_headers_become_application_properties_and_the_queue_page_shows_them() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    let srv = b.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let base = format!("http://{}", srv.addr);
    let r = reqwest::Client::new()
        .post(format!("{base}/soc-settings/messages"))
        .header("Authorization", token(&base))
        .header("Content-Type", "application/json")
        .header("tenant", "\"contoso\"")
        .header("attempt", "2")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let page: Value = reqwest::get(format!("{base}/_devhost/queues"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let m = &page[0]["active"][0];
    assert_eq!(
        m["applicationProperties"],
        json!({"tenant": "contoso", "attempt": 2})
    );
    assert_eq!(m["bodyText"], "{}");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_send_writes_nothing_that_grows_with_the_messages_remembered() {
    let dir = tmp_dir();
    let b = Broker::open(config(&dir)).unwrap();
    for i in 0..2_000 {
        b.send(
            "soc-settings",
            json_send(&json!({}), &format!("m{i}"), None),
        )
        .unwrap();
    }
    // The sequence number alone; the 2,000 remembered ids are appended to their own log.
    let state = std::fs::metadata(dir.join("soc-settings").join("state.json")).unwrap();
    assert!(state.len() < 100, "state.json is {} bytes", state.len());
    assert_eq!(
        send_id(&b, "m7"),
        devtools::servicebus::SendOutcome::Duplicate
    );
}

#[tokio::test]
async fn forgotten_ids_are_compacted_out_of_the_dedup_log_and_the_rest_survive_a_restart() {
    let dir = tmp_dir();
    let mut c = config(&dir);
    c.duplicate_detection_window = Duration::from_millis(1);
    {
        let b = Broker::open(c.clone()).unwrap();
        for i in 0..3_000 {
            b.send(
                "soc-settings",
                json_send(&json!({}), &format!("old{i}"), None),
            )
            .unwrap();
        }
    }
    let log = dir.join("soc-settings").join("dedup.log");
    let lines = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(lines < 2_100, "{lines} lines: never compacted");
    c.duplicate_detection_window = Duration::from_secs(600);
    let b = Broker::open(c).unwrap();
    b.send("soc-settings", json_send(&json!({}), "kept", None))
        .unwrap();
    drop(b);
    let b = Broker::open(config(&dir)).unwrap();
    assert_eq!(
        send_id(&b, "kept"),
        devtools::servicebus::SendOutcome::Duplicate
    );
}

#[tokio::test]
async fn the_dedup_history_of_a_state_file_from_before_the_log_is_kept() {
    let dir = tmp_dir();
    let queue = dir.join("soc-settings");
    std::fs::create_dir_all(queue.join("messages")).unwrap();
    let seen = Utc::now().to_rfc3339();
    std::fs::write(
        queue.join("state.json"),
        format!(r#"{{"nextSequenceNumber":5,"dedup":{{"legacy":"{seen}"}}}}"#),
    )
    .unwrap();
    drop(Broker::open(config(&dir)).unwrap());
    // Opened twice: the second time from what the first one wrote.
    let b = Broker::open(config(&dir)).unwrap();
    assert_eq!(
        send_id(&b, "legacy"),
        devtools::servicebus::SendOutcome::Duplicate
    );
    assert_eq!(enqueued_as(&b, "new"), 5);
}
