//! The Event Grid topic stand-in held to the publish contract of a custom topic with the
//! CloudEvents 1.0 input schema (devtools/README.md, "Event Grid topic stand-in"): the key
//! header, the content types, the required attributes, the 1 MB limit, nothing kept from a
//! refused publish; its injected failures, its record across restarts, and devhost serving it
//! where `SOC_NOTIFY_TOPIC_ENDPOINT` points and showing what it received at `/_devhost/events`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use devtools::devhost::{DevHost, DevHostOptions};
use devtools::eventgrid::{Topic, MAX_PUBLISH_BYTES};
use devtools::servicebus::ServerHandle;
use reqwest::StatusCode;
use serde_json::{json, Value};

const KEY: &str = "topic-key";
const BATCH: &str = "application/cloudevents-batch+json; charset=utf-8";

fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("devtools-eg-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn event(id: &str, subject: &str) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": "urn:soc-settings:local",
        "type": "com.socsettings.request.applied",
        "subject": subject,
        "time": "2026-03-01T10:00:00Z",
        "datacontenttype": "application/json",
        "data": {"deviceId": subject, "minSoc": 30},
    })
}

struct Running {
    topic: Topic,
    server: ServerHandle,
}

impl Running {
    async fn start(dir: Option<&Path>) -> Running {
        let topic = match dir {
            Some(d) => Topic::open(KEY, d).unwrap(),
            None => Topic::in_memory(KEY),
        };
        let server = topic.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
        Running { topic, server }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr)
    }

    async fn publish(&self, key: Option<&str>, content_type: &str, body: Vec<u8>) -> Answer {
        post(
            &self.url("/api/events?api-version=2018-01-01"),
            key,
            content_type,
            body,
        )
        .await
    }

    async fn publish_batch(&self, events: &[Value]) -> Answer {
        self.publish(Some(KEY), BATCH, serde_json::to_vec(events).unwrap())
            .await
    }

    /// `POST /_control/fail?{query}` with `key` as `aeg-sas-key`.
    async fn fail(&self, query: &str, key: Option<&str>) -> Answer {
        let url = self.url(&format!("/_control/fail?{query}"));
        post(&url, key, "text/plain", vec![]).await
    }

    fn ids(&self) -> Vec<String> {
        self.topic.events().into_iter().map(|e| e.id).collect()
    }
}

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn post(url: &str, key: Option<&str>, content_type: &str, body: Vec<u8>) -> Answer {
    let mut rb = reqwest::Client::new()
        .post(url)
        .header("content-type", content_type)
        .body(body);
    if let Some(k) = key {
        rb = rb.header("aeg-sas-key", k);
    }
    let r = rb.send().await.unwrap();
    Answer {
        status: r.status(),
        retry_after: r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string()),
        body: r.text().await.unwrap(),
    }
}

#[tokio::test]
async fn a_batch_and_a_single_event_are_accepted_and_kept_in_arrival_order() {
    let t = Running::start(None).await;
    let before = chrono::Utc::now();

    let a = t
        .publish_batch(&[
            event("e1", "bat-1"),
            event("e2", "bat-2"),
            event("e3", "bat-1"),
        ])
        .await;
    let b = t
        .publish(
            Some(KEY),
            "application/cloudevents+json",
            serde_json::to_vec(&event("e4", "bat-2")).unwrap(),
        )
        .await;

    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, ""));
    assert_eq!((b.status, b.body.as_str()), (StatusCode::OK, ""));
    let events = t.topic.events();
    assert_eq!(t.ids(), ["e1", "e2", "e3", "e4"]);
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(events
        .windows(2)
        .all(|w| w[0].received_at <= w[1].received_at));
    assert!(events[0].received_at >= before);
    assert_eq!(events[3].event, event("e4", "bat-2"), "kept as published");
    assert_eq!(events[0].event_type, "com.socsettings.request.applied");
    assert_eq!(
        t.topic
            .events_with_subject("bat-1")
            .iter()
            .map(|e| e.id.as_str())
            .collect::<Vec<_>>(),
        ["e1", "e3"]
    );
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_401_and_nothing_is_kept() {
    let t = Running::start(None).await;
    let body = serde_json::to_vec(&[event("e1", "bat-1")]).unwrap();
    for key in [None, Some("not-the-key")] {
        let a = t.publish(key, BATCH, body.clone()).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(a.json()["error"]["code"], "Unauthorized");
    }
    assert!(t.topic.events().is_empty());
}

#[tokio::test]
async fn an_invalid_event_anywhere_in_a_batch_is_400_and_nothing_of_the_batch_is_kept() {
    let t = Running::start(None).await;
    let mut cases: Vec<(String, Value)> = Vec::new();
    for name in ["id", "source", "type", "specversion"] {
        let mut e = event("bad", "bat-1");
        e.as_object_mut().unwrap().remove(name);
        cases.push((format!("'{name}' is missing"), e));
    }
    let mut e = event("bad", "bat-1");
    e["specversion"] = json!("0.3");
    cases.push(("CloudEvents 1.0".into(), e));

    for (expected, bad) in cases {
        let a = t
            .publish_batch(&[event("good-1", "bat-1"), bad, event("good-2", "bat-1")])
            .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{expected}");
        let body = a.json();
        assert_eq!(body["error"]["code"], "BadRequest");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("event 1") && message.contains(&expected),
            "{message}"
        );
    }
    // Not the shape the topic's schema takes: an object as a batch, an array as one event, an
    // Event Grid schema event, another content type, no JSON at all.
    let eg_schema = json!([{"id": "x", "eventType": "t", "subject": "s", "eventTime": "2026-03-01T10:00:00Z", "data": {}, "dataVersion": "1"}]);
    for (ct, body) in [
        (BATCH, serde_json::to_vec(&event("x", "bat-1")).unwrap()),
        (
            "application/cloudevents+json",
            serde_json::to_vec(&[event("x", "bat-1")]).unwrap(),
        ),
        (BATCH, serde_json::to_vec(&eg_schema).unwrap()),
        (
            "application/json",
            serde_json::to_vec(&[event("x", "bat-1")]).unwrap(),
        ),
        (BATCH, b"[{".to_vec()),
        (BATCH, b"[]".to_vec()),
    ] {
        let a = t.publish(Some(KEY), ct, body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{ct}: {}", a.body);
        assert_eq!(a.json()["error"]["code"], "BadRequest");
    }
    assert!(t.topic.events().is_empty(), "{:?}", t.ids());
}

#[tokio::test]
async fn a_publish_over_1_mb_is_413_and_one_just_under_is_accepted() {
    let t = Running::start(None).await;
    let sized = |total: usize| {
        let mut e = event("big", "bat-1");
        e["data"] = json!("");
        let empty = serde_json::to_vec(&[e.clone()]).unwrap().len();
        e["data"] = json!("x".repeat(total - empty));
        let body = serde_json::to_vec(&[e]).unwrap();
        assert_eq!(body.len(), total);
        body
    };

    let over = t
        .publish(Some(KEY), BATCH, sized(MAX_PUBLISH_BYTES + 1))
        .await;
    assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(over.json()["error"]["code"], "PayloadTooLarge");
    assert!(t.topic.events().is_empty());

    let at = t.publish(Some(KEY), BATCH, sized(MAX_PUBLISH_BYTES)).await;
    assert_eq!(at.status, StatusCode::OK, "{}", at.body);
    assert_eq!(t.ids(), ["big"]);
}

#[tokio::test]
async fn injected_failures_answer_the_next_publishes_and_need_the_key() {
    let t = Running::start(None).await;
    let control = "count=2&status=503&retryAfter=7";
    let refused = t.fail(control, None).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(t.topic.injected_failure(), None);

    let set = t.fail(control, Some(KEY)).await;
    assert_eq!(set.status, StatusCode::OK);
    assert_eq!(
        set.json(),
        json!({"remaining": 2, "status": 503, "retryAfter": 7})
    );
    for id in ["f1", "f2"] {
        let a = t.publish_batch(&[event(id, "bat-1")]).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.retry_after.as_deref(), Some("7"));
        assert!(a.json()["error"]["message"].is_string());
    }
    let ok = t.publish_batch(&[event("f3", "bat-1")]).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(t.ids(), ["f3"], "nothing kept from a failed publish");

    // Another status, then cleared before it is used.
    let set = t.fail("count=5&status=500", Some(KEY)).await;
    assert_eq!(set.json()["remaining"], 5);
    let cleared = reqwest::Client::new()
        .delete(t.url("/_control/fail"))
        .header("aeg-sas-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(cleared.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        t.publish_batch(&[event("f4", "bat-1")]).await.status,
        StatusCode::OK
    );
    let bad = t.fail("status=200", Some(KEY)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn received_events_are_kept_across_a_restart_and_a_torn_last_line_is_skipped() {
    let dir = tmp();
    let first = Running::start(Some(&dir)).await;
    first
        .publish_batch(&[event("p1", "bat-1"), event("p2", "bat-2")])
        .await;
    let kept = first.topic.events();
    first.server.shutdown().await;
    // A crash mid-append leaves half a line.
    let log = dir.join("events.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"seq\":3,\"receivedAt\":");
    std::fs::write(&log, text).unwrap();

    let again = Running::start(Some(&dir)).await;
    assert_eq!(again.topic.events(), kept);
    again.publish_batch(&[event("p3", "bat-1")]).await;
    let events = again.topic.events();
    assert_eq!(again.ids(), ["p1", "p2", "p3"]);
    assert_eq!(events[2].seq, 3);
    again.server.shutdown().await;

    let fresh = Running::start(Some(&tmp())).await;
    assert!(fresh.topic.events().is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- through devhost

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// devhost on the repo's app (its local.settings.json) with the fake handler, keeping its
/// state in `data`; `settings` win over local.settings.json.
async fn devhost_with(data: &Path, settings: &[(&str, &str)]) -> DevHost {
    let mut o = DevHostOptions::for_tests(repo_root(), data);
    o.handler = Some(PathBuf::from(env!("CARGO_BIN_EXE_fakehandler")));
    o.timers = false;
    o.init_timeout = Duration::from_secs(10);
    let log = data.join("fake.jsonl").to_string_lossy().into_owned();
    for (k, v) in [("FAKE_HANDLER_LOG", log.as_str())].iter().chain(settings) {
        o.overrides.push((k.to_string(), v.to_string()));
    }
    DevHost::start(o).await.unwrap()
}

async fn devhost(data: &Path) -> DevHost {
    devhost_with(data, &[]).await
}

async fn get(url: &str, accept: &str) -> (StatusCode, String, String) {
    let r = reqwest::Client::new()
        .get(url)
        .header("accept", accept)
        .send()
        .await
        .unwrap();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.status(), ct, r.text().await.unwrap())
}

#[tokio::test]
async fn devhost_serves_the_topic_where_the_setting_points_and_lists_its_events() {
    let data = tmp();
    let host = devhost(&data.join("state")).await;
    let addr = host.eventgrid_addr().expect("the topic runs");
    // The handler gets the endpoint rewritten to the port bound, and the key of local.settings.json.
    let endpoint = host.settings()["SOC_NOTIFY_TOPIC_ENDPOINT"].clone();
    let key = host.settings()["SOC_NOTIFY_TOPIC_KEY"].clone();
    assert_eq!(endpoint, format!("http://{addr}/api/events"));
    assert_eq!(key, "devhost-local-topic-key");
    let page = format!("{}/_devhost/events", host.base_url());

    let (status, ct, body) = get(&page, "application/json").await;
    assert_eq!((status, ct.as_str()), (StatusCode::OK, "application/json"));
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!([]));
    let (_, ct, html) = get(&page, "text/html,application/xhtml+xml").await;
    assert!(
        ct.starts_with("text/html") && html.contains("no events"),
        "{html}"
    );

    let mut weird = event("<e2>", "bat-2");
    weird["type"] = json!("com.socsettings.request.expired");
    let a = post(
        &endpoint,
        Some(&key),
        BATCH,
        serde_json::to_vec(&[event("e1", "bat-1"), weird, event("e3", "bat-1")]).unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    let (_, _, body) = get(&page, "application/json").await;
    let list: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["e1", "<e2>", "e3"], "newest last");
    let first = &list[0];
    assert_eq!(first["seq"], 1);
    assert_eq!(first["type"], "com.socsettings.request.applied");
    assert_eq!(first["subject"], "bat-1");
    assert_eq!(first["source"], "urn:soc-settings:local");
    assert_eq!(first["event"]["data"]["minSoc"], 30);
    assert!(first["receivedAt"].as_str().unwrap().ends_with('Z'));

    let (_, _, body) = get(&format!("{page}?subject=bat-1"), "application/json").await;
    let filtered: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(filtered.as_array().unwrap().len(), 2);
    assert!(filtered
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["subject"] == "bat-1"));
    let (_, _, body) = get(
        &format!("{page}?subjectBeginsWith=bat-"),
        "application/json",
    )
    .await;
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), list);
    let (_, _, body) = get(
        &format!("{page}?subjectBeginsWith=bat-2"),
        "application/json",
    )
    .await;
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()[0]["id"],
        "<e2>"
    );

    let (_, _, html) = get(&page, "text/html").await;
    assert!(
        html.contains("<th>received (UTC)</th><th>type</th><th>subject</th><th>id</th>"),
        "{html}"
    );
    assert!(
        html.find(">e1<") < html.find("&lt;e2&gt;") && html.find("&lt;e2&gt;") < html.find(">e3<"),
        "{html}"
    );
    assert!(
        html.contains("<td>com.socsettings.request.expired</td><td>bat-2</td>"),
        "{html}"
    );
    let (_, _, none) = get(&format!("{page}?subject=bat-9"), "text/html").await;
    assert!(
        none.contains("no events") && none.contains("bat-9"),
        "{none}"
    );

    // devhost keeps them across its restarts (the data dir), like its queues.
    host.shutdown().await;
    let again = devhost(&data.join("state")).await;
    assert_eq!(again.topic().unwrap().events().len(), 3);
    again.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
}

#[tokio::test]
async fn without_an_endpoint_setting_devhost_runs_no_topic_and_lists_no_events() {
    let data = tmp();
    let host = devhost_with(&data.join("state"), &[("SOC_NOTIFY_TOPIC_ENDPOINT", "")]).await;
    assert!(host.eventgrid_addr().is_none() && host.topic().is_none());
    let (status, _, body) = get(
        &format!("{}/_devhost/events", host.base_url()),
        "application/json",
    )
    .await;
    assert_eq!((status, body.trim()), (StatusCode::OK, "[]"));
    host.shutdown().await;
    let _ = std::fs::remove_dir_all(&data);
}
