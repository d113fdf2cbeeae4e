//! Integration tests: the real `handler` binary, real Azurite, loopback stand-ins for
//! the device cloud and Service Bus, driven through the host protocol (see `support`).
//! `identity`: the same with the managed identity instead of keys. `keyvault_ref`: a
//! handler given an unresolved Key Vault reference.

mod identity;
mod keyvault_ref;
mod support;

use std::time::Duration;

use devtools::devicesim::{DeviceConfig, Fault};
use serde_json::Value;
use support::{minsoc, Options, TestApp};

#[tokio::test]
async fn an_online_device_is_set_at_once_and_the_device_sees_exactly_that_value() {
    let app = TestApp::start().await;
    app.device("bat-1", true);
    let (status, _, body) = app.post_soc("bat-1", r#"{"dod":65}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "applied");
    assert_eq!(body["minSoc"], 35);
    let history = app.history("bat-1");
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].min_soc, Some(35));
    assert_eq!(
        history[0].idempotency_key.as_deref(),
        body["requestId"].as_str(),
        "PUT carries Idempotency-Key = requestId"
    );
    assert!(
        app.messages().is_empty(),
        "no Service Bus message for an applied request"
    );
    let (status, record) = app.get_soc("bat-1").await;
    assert_eq!(status, 200);
    assert_eq!(record["status"], "applied");
    assert_eq!(record["attempts"], 1);
}

#[tokio::test]
async fn an_offline_request_waits_in_service_bus_and_is_applied_when_the_device_returns() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    let (status, headers, body) = app.post_soc("bat-1", &minsoc(20)).await;
    assert_eq!(status, 202, "{body}");
    location(&headers, &body);
    assert_eq!(body["status"], "pending");

    let messages = app.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.content_type.as_deref(), Some("application/json"));
    let payload = TestApp::message_body(m);
    assert_eq!(payload["requestId"], body["requestId"]);
    assert_eq!(payload["deviceId"], "bat-1");
    let sent_expiry: chrono::DateTime<chrono::Utc> =
        payload["expiresAt"].as_str().unwrap().parse().unwrap();
    let told_expiry: chrono::DateTime<chrono::Utc> =
        body["expiresAt"].as_str().unwrap().parse().unwrap();
    assert!(
        (sent_expiry - told_expiry).num_milliseconds().abs() < 1,
        "the message carries the request's expiry"
    );
    let scheduled = m
        .scheduled_enqueue_time
        .expect("the first re-check is scheduled");
    let expires: chrono::DateTime<chrono::Utc> =
        body["expiresAt"].as_str().unwrap().parse().unwrap();
    assert!(
        m.expires_at.unwrap() <= expires,
        "the message never outlives the request"
    );
    assert!(scheduled > chrono::Utc::now() + chrono::Duration::seconds(50));

    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(record["status"], "pending");

    app.set_online("bat-1", true);
    let (status, out) = app.invoke_queue(&app.lock(m)).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(app.applied_values("bat-1"), vec![20]);
    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(record["status"], "applied");
    assert!(record["appliedAt"].is_string());
}

#[tokio::test]
async fn the_timer_applies_a_returned_device_once_its_wake_up_is_overdue_and_the_late_message_is_a_noop(
) {
    let app = TestApp::start_with(Options {
        recheck_initial_seconds: 1,
        ..Options::default()
    })
    .await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(44)).await;
    app.set_online("bat-1", true);
    // Not due yet (its wake-up message is not overdue): the sweep does not touch it.
    let (status, out) = app.fire_timer().await;
    assert_eq!(status, 200, "{out}");
    let logs = out["Logs"][0].as_str().unwrap();
    assert!(
        logs.contains("due=0 ") && logs.contains("status_calls=0"),
        "{out}"
    );
    // The message (due after 1 s) was never delivered: overdue after the 1 s grace.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (status, out) = app.fire_timer().await;
    assert_eq!(status, 200, "{out}");
    assert!(
        out["Logs"][0].as_str().unwrap().contains("due=1 applied=1"),
        "{out}"
    );
    assert_eq!(app.applied_values("bat-1"), vec![44]);
    // The scheduled message arrives later: nothing more reaches the device.
    let before = app.history("bat-1").len();
    assert_eq!(app.deliver_all().await, vec![200]);
    assert_eq!(app.history("bat-1").len(), before);
}

#[tokio::test]
async fn latest_wins_when_two_requests_queue_while_offline() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(10)).await;
    let (_, _, b) = app.post_soc("bat-1", &minsoc(90)).await;
    app.set_online("bat-1", true);
    // Deliver newest first, then the older one: the older message must not win.
    let mut messages = app.messages();
    messages.reverse();
    for m in &messages {
        let (status, _) = app.invoke_queue(&app.lock(m)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(app.applied_values("bat-1"), vec![90]);
    assert_eq!(app.get_soc("bat-1").await.1["requestId"], b["requestId"]);
}

#[tokio::test]
async fn an_old_queued_request_never_overwrites_a_newer_direct_one() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(10)).await;
    app.set_online("bat-1", true);
    let (status, _, b) = app.post_soc("bat-1", &minsoc(90)).await;
    assert_eq!(status, 200);
    assert_eq!(b["status"], "applied");
    // A's message is delivered, then the timer sweeps.
    assert_eq!(app.deliver_all().await, vec![200]);
    assert_eq!(app.fire_timer().await.0, 200);
    assert_eq!(
        app.applied_values("bat-1"),
        vec![90],
        "A must never reach the device"
    );
    assert_eq!(app.device_value("bat-1"), Some(90));
}

#[tokio::test]
async fn two_concurrent_deliveries_of_the_same_message_apply_once() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(33)).await;
    app.set_online("bat-1", true);
    app.configure(
        "bat-1",
        DeviceConfig {
            latency_ms: 150,
            ..Default::default()
        },
    );
    let m = app.messages().remove(0);
    let (d1, d2) = (app.lock(&m), app.lock(&m));
    let (a, b) = tokio::join!(app.invoke_queue(&d1), app.invoke_queue(&d2));
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    let puts: Vec<_> = app
        .history("bat-1")
        .into_iter()
        .filter(|p| p.outcome == "applied" || p.outcome == "replayed")
        .collect();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert_eq!(app.get_soc("bat-1").await.1["status"], "applied");
}

#[tokio::test]
async fn a_delivery_while_offline_schedules_one_later_recheck_and_duplicates_fork_nothing() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(50)).await;
    let first = app.messages().remove(0);
    assert_eq!(app.invoke_queue(&app.lock(&first)).await.0, 200);
    // The host completes it; the next re-check is the only other message.
    app.broker_delete(&first);
    let after = app.messages();
    assert_eq!(after.len(), 1);
    assert!(after[0].scheduled_enqueue_time.unwrap() > first.scheduled_enqueue_time.unwrap());
    // A duplicate of the first message (at-least-once) is a logged no-op.
    let (status, out) = app.invoke_queue(&app.lock(&first)).await;
    assert_eq!(status, 200);
    assert!(out["Logs"][0].as_str().unwrap().contains("no-op"), "{out}");
    assert_eq!(app.messages().len(), 1);
    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(record["attempts"], 2, "the POST's try and one re-check");
    assert_eq!(record["lastError"], "device offline");
}

#[tokio::test]
async fn a_throttled_device_backs_off_and_fails_the_delivery_for_redelivery_then_it_applies() {
    // A 429 says the PUT was not applied: the lease is let go at once (a 5xx would keep
    // it until a late landing is impossible, docs/device-api.md).
    let app = TestApp::start().await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(61)).await;
    app.set_online("bat-1", true);
    app.sim
        .state()
        .script_faults("bat-1", Fault::Status { status: 429 }, 2);
    let m = app.messages().remove(0);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let (status, _) = app.invoke_queue(&app.lock(&m)).await;
        if status >= 500 {
            assert!(
                started.elapsed() >= Duration::from_millis(450),
                "a transient failure backs off before redelivery"
            );
        }
        statuses.push(status);
        if status == 200 {
            break;
        }
    }
    assert!(
        statuses[0] >= 500 && statuses[1] >= 500,
        "transient errors fail the invocation: {statuses:?}"
    );
    assert_eq!(statuses[2], 200);
    assert_eq!(app.applied_values("bat-1"), vec![61]);
}

#[tokio::test]
async fn a_device_timeout_on_the_http_path_stores_the_request() {
    let app = TestApp::start_with(Options {
        device_timeout_ms: 300,
        ..Default::default()
    })
    .await;
    app.device("bat-1", true);
    app.configure(
        "bat-1",
        DeviceConfig {
            timeout_rate: 1.0,
            hang_ms: 2_000,
            ..Default::default()
        },
    );
    let started = std::time::Instant::now();
    let (status, _, body) = app.post_soc("bat-1", &minsoc(70)).await;
    assert_eq!(status, 202, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the device call is bounded by its timeout"
    );
    assert_eq!(app.messages().len(), 1);
    // The device recovers. The timed-out PUT could still land, so its lease keeps every
    // invocation off the device until it lapses (issue 8); then the queue applies it.
    app.configure("bat-1", DeviceConfig::default());
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while app.device_value("bat-1") != Some(70) {
        assert!(
            std::time::Instant::now() < deadline,
            "not applied after the lease lapsed: {:?}",
            app.history("bat-1")
        );
        app.deliver_all().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_service_bus_outage_after_the_commit_is_202_and_the_request_stays_for_the_sweep() {
    // One commit point: once the request is stored, a failed send is not a 503.
    let app = TestApp::start().await;
    app.device("bat-1", false);
    app.set_broker_down(true);
    let (status, headers, body) = app.post_soc("bat-1", &minsoc(15)).await;
    assert_eq!(status, 202, "{body}");
    assert!(headers.contains_key("location"));
    app.set_broker_down(false);
    assert!(app.messages().is_empty(), "no wake-up message was sent");
    let (status, record) = app.get_soc("bat-1").await;
    assert_eq!(status, 200);
    assert_eq!(record["requestId"], body["requestId"]);
    assert_eq!(record["status"], "pending");
}

#[tokio::test]
async fn a_service_bus_outage_after_a_failed_apply_keeps_the_newer_request() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    let (_, _, a) = app.post_soc("bat-1", &minsoc(10)).await;
    // Online by status, but the PUT finds it offline again (flapping), and Service Bus is down.
    app.set_online("bat-1", true);
    app.sim
        .state()
        .script_faults("bat-1", Fault::Status { status: 409 }, 1);
    app.set_broker_down(true);
    let (status, _, b) = app.post_soc("bat-1", &minsoc(90)).await;
    assert_eq!(status, 202, "{b}");
    app.set_broker_down(false);
    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(
        record["requestId"], b["requestId"],
        "B is the desired value"
    );
    assert_eq!(record["minSoc"], 90);
    let a_at = format!(
        "/api/devices/bat-1/soc/requests/{}",
        a["requestId"].as_str().unwrap()
    );
    assert_eq!(app.get_path(&a_at).await.1["status"], "superseded");
}

#[tokio::test]
async fn the_same_idempotency_key_gives_one_request_and_another_body_is_409() {
    let app = TestApp::start().await;
    app.device("bat-1", false);
    let (s1, _, first) = app
        .post_soc_with_key("bat-1", &minsoc(25), Some("key-1"))
        .await;
    let (s2, headers, again) = app
        .post_soc_with_key("bat-1", r#"{"dod":75}"#, Some("key-1"))
        .await;
    assert_eq!((s1, s2), (202, 202));
    assert_eq!(again["requestId"], first["requestId"]);
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(app.messages().len(), 1, "no second request");
    let (s3, _, problem) = app
        .post_soc_with_key("bat-1", &minsoc(26), Some("key-1"))
        .await;
    assert_eq!(s3, 409, "{problem}");
}

#[tokio::test]
async fn invalid_input_is_a_400_problem_and_nothing_is_stored_or_sent() {
    let app = TestApp::start().await;
    app.device("bat-1", true);
    for (device, body, field) in [
        ("bat-1", "{not json", "body"),
        ("bat-1", r#"{"dod":10,"minSoc":90}"#, "body"),
        ("bat-1", r#"{}"#, "body"),
        ("bat-1", r#"{"minSoc":101}"#, "minSoc"),
        ("bat-1", r#"{"dod":12.5}"#, "dod"),
        ("bat%20one", r#"{"dod":10}"#, "deviceId"),
    ] {
        let (status, headers, problem) = app.post_soc(device, body).await;
        assert_eq!(status, 400, "{body}: {problem}");
        assert_eq!(headers["content-type"], "application/problem+json");
        assert_eq!(problem["field"], field, "{body}");
    }
    let (status, _, problem) = app
        .post_soc_with_key("bat-1", &minsoc(5), Some(&"k".repeat(129)))
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (400, Some("Idempotency-Key"))
    );
    assert!(app.history("bat-1").is_empty());
    assert!(app.messages().is_empty());
    assert_eq!(app.get_soc("bat-1").await.0, 404);
}

#[tokio::test]
async fn an_unknown_device_is_404_and_a_rejected_value_fails_with_the_reason() {
    let app = TestApp::start().await;
    let (status, _, _) = app.post_soc("ghost", &minsoc(5)).await;
    assert_eq!(status, 404);
    assert!(app.messages().is_empty());

    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(2)).await;
    app.set_online("bat-1", true);
    app.configure(
        "bat-1",
        DeviceConfig {
            reject: Some("minSoc below the vendor floor".into()),
            ..Default::default()
        },
    );
    assert_eq!(
        app.deliver_all().await,
        vec![200],
        "a permanent error is not retried"
    );
    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(record["status"], "failed");
    assert!(
        record["lastError"]
            .as_str()
            .unwrap()
            .contains("vendor floor"),
        "{record}"
    );
    assert!(app.messages().is_empty(), "no further re-check");
}

#[tokio::test]
async fn a_ttl_shorter_than_a_lease_plus_the_longest_recheck_is_refused_and_nothing_is_stored() {
    // Such a request could expire before its first re-check, and a PUT started near its
    // end could land after expiry: the handler refuses the setting instead.
    let app = TestApp::start_with(Options {
        ttl_seconds: 2,
        recheck_initial_seconds: 1,
        ..Default::default()
    })
    .await;
    app.device("bat-1", true);
    let (status, _, body) = app.post_soc("bat-1", &minsoc(40)).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["title"], "Service misconfigured");
    assert!(app.history("bat-1").is_empty(), "never PUT");
    assert!(app.messages().is_empty());
}

#[tokio::test]
async fn a_lost_wake_up_message_is_resent_by_the_sweep() {
    let app = TestApp::start_with(Options {
        recheck_initial_seconds: 1,
        ..Default::default()
    })
    .await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(40)).await;
    let lost = app.messages().remove(0);
    app.broker_delete(&lost);
    // Due after 1 s, grace 1 s: overdue after 2 s.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (_, out) = app.fire_timer().await;
    assert!(
        out["Logs"][0].as_str().unwrap().contains("resent=1"),
        "{out}"
    );
    let resent = app.messages();
    assert_eq!(resent.len(), 1);
    assert_ne!(resent[0].message_id, lost.message_id);
    app.set_online("bat-1", true);
    assert_eq!(app.deliver_all().await, vec![200]);
    assert_eq!(app.device_value("bat-1"), Some(40));
}

#[tokio::test]
async fn a_corrupt_ledger_row_is_skipped_and_reported_by_the_sweep_not_an_outage() {
    let app = TestApp::start_with(Options {
        recheck_initial_seconds: 1,
        ..Options::default()
    })
    .await;
    app.device("bat-1", false);
    app.device("bat-2", false);
    app.post_soc("bat-1", &minsoc(40)).await;
    app.post_soc("bat-2", &minsoc(60)).await;
    // A field the ledger cannot read, as a row written by another schema would have.
    app.corrupt_ledger_row(
        "bat-2",
        serde_json::json!({ "Status": "pending", "Attempts": "many" }),
    )
    .await;
    app.set_online("bat-1", true);
    app.set_online("bat-2", true);
    // Both wake-up messages (due after 1 s, never delivered) overdue.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;

    let (status, out) = app.fire_timer().await;

    assert_eq!(status, 200, "{out}");
    let logs = out["Logs"][0].as_str().unwrap();
    assert!(
        logs.contains("due=2") && logs.contains("applied=1") && logs.contains("corrupt=1"),
        "{out}"
    );
    assert_eq!(app.device_value("bat-1"), Some(40));
    // The corrupt device's wake-up message is completed with the reason, not retried.
    let bat2: Vec<_> = app
        .messages()
        .into_iter()
        .filter(|m| TestApp::message_body(m)["deviceId"] == "bat-2")
        .collect();
    assert_eq!(bat2.len(), 1);
    let (status, out) = app.invoke_queue(&app.lock(&bat2[0])).await;
    assert_eq!(status, 200, "{out}");
    assert!(
        out.to_string()
            .contains("bat-2/desired is unreadable: Attempts"),
        "{out}"
    );
    assert_eq!(app.device_value("bat-2"), None);
}

#[tokio::test]
async fn a_handler_killed_mid_apply_is_redelivered_and_applied_once_in_effect() {
    let mut app = TestApp::start_with(Options {
        device_timeout_ms: 1000,
        ..Default::default()
    })
    .await;
    app.device("bat-1", false);
    app.post_soc("bat-1", &minsoc(77)).await;
    app.set_online("bat-1", true);
    // The device applies but the answer never comes back; the handler dies meanwhile.
    app.sim
        .state()
        .script_faults("bat-1", Fault::TimeoutAfterApply, 1);
    let m = app.messages().remove(0);
    let delivery = app.lock(&m);
    let invoke = app.invoke_queue(&delivery);
    let (_, ()) = tokio::join!(
        async {
            tokio::time::timeout(Duration::from_millis(300), invoke)
                .await
                .ok()
        },
        async {}
    );
    app.restart_handler().await;
    // The lease of the dead invocation lapses (`Policy::lease`, about 35 s here) and the
    // redelivery finds it busy until then; keep redelivering like the broker would.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let pending: Vec<_> = app
            .messages()
            .into_iter()
            .filter(|m| !m.dead_lettered)
            .collect();
        let (_, record) = app.get_soc("bat-1").await;
        if record["status"] == "applied" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not applied after redelivery: {record}"
        );
        for m in pending {
            let (status, _) = app.invoke_queue(&app.lock(&m)).await;
            if status == 200 {
                app.broker_delete(&m);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let history = app.history("bat-1");
    assert!(history.iter().all(|p| p.min_soc == Some(77)), "{history:?}");
    let after_post: Vec<_> = history
        .iter()
        .skip_while(|p| p.outcome == "offline")
        .collect();
    assert_eq!(after_post[0].outcome, "timeout-after-apply", "{history:?}");
    assert!(
        after_post.len() >= 2,
        "the request was re-sent after the crash: {history:?}"
    );
    assert_eq!(app.device_value("bat-1"), Some(77));
    let applied_times = app.sim.state().device("bat-1").unwrap().apply_count;
    assert_eq!(
        applied_times, 1,
        "the device's idempotency makes the re-PUT a replay: {history:?}"
    );
}

#[tokio::test]
async fn the_handler_answers_readiness_at_once_and_fails_invocations_when_misconfigured() {
    let mut app = TestApp::start().await;
    app.kill_handler();
    let port = testkit::free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let url = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    while started.elapsed() < Duration::from_secs(5) {
        if let Ok(r) = app.http.get(format!("{url}/")).send().await {
            ready = r.status().is_success();
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ready, "GET / must answer even without configuration");
    let res = app
        .http
        .post(format!("{url}/DrainSocTimer"))
        .json(&serde_json::json!({"Data":{"timer":{}},"Metadata":{}}))
        .send()
        .await
        .unwrap();
    assert!(res.status().is_server_error());
    let res = app
        .http
        .post(format!("{url}/api/devices/x/soc"))
        .header("content-type", "application/json")
        .body(minsoc(5))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 500);
    let text = res.text().await.unwrap();
    assert!(
        !text.contains("AzureWebJobsStorage"),
        "configuration details stay in the logs: {text}"
    );
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.contains("AzureWebJobsStorage"),
        "the operator sees what is missing, on stdout: {logs}"
    );
    let _: Value = Value::Null;
}

/// The `Location` of a `202`: the request's own status.
fn location(headers: &reqwest::header::HeaderMap, body: &Value) -> String {
    let location = headers["location"].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!(
            "/api/devices/{}/soc/requests/{}",
            body["deviceId"].as_str().unwrap(),
            body["requestId"].as_str().unwrap()
        )
    );
    location
}

#[tokio::test]
async fn each_request_can_be_followed_until_it_is_applied_superseded_failed_or_expired() {
    // A TTL longer than one lease (35.5 s with the suite's 1.5 s device timeout): a request
    // that close to its expiry is expired at once rather than put on the device.
    let app = TestApp::start_with(Options {
        ttl_seconds: 45,
        recheck_initial_seconds: 1,
        ..Default::default()
    })
    .await;
    app.device("bat-1", false);

    // A waits for the battery; B replaces it while it waits.
    let (status, headers, a) = app.post_soc("bat-1", &minsoc(10)).await;
    assert_eq!(status, 202, "{a}");
    let a_at = location(&headers, &a);
    let (status, shown) = app.get_path(&a_at).await;
    assert_eq!(
        (status, shown["status"].as_str()),
        (200, Some("pending")),
        "{shown}"
    );
    assert_eq!(shown["requestId"], a["requestId"]);
    let (_, headers, b) = app.post_soc("bat-1", &minsoc(20)).await;
    let b_at = location(&headers, &b);
    let (_, shown) = app.get_path(&a_at).await;
    assert_eq!(shown["status"], "superseded", "{shown}");
    assert_eq!(shown["supersededBy"], b["requestId"]);

    // B is applied when the battery returns; A stays superseded.
    app.set_online("bat-1", true);
    app.deliver_all().await;
    let (_, shown) = app.get_path(&b_at).await;
    assert_eq!(shown["status"], "applied", "{shown}");
    assert!(shown["appliedAt"].is_string());
    assert_eq!(app.get_path(&a_at).await.1["status"], "superseded");

    // C is refused by the device cloud when it is tried.
    app.set_online("bat-1", false);
    let (_, headers, c) = app.post_soc("bat-1", &minsoc(30)).await;
    let c_at = location(&headers, &c);
    app.set_online("bat-1", true);
    app.configure(
        "bat-1",
        DeviceConfig {
            reject: Some("minSoc below the vendor floor".into()),
            ..Default::default()
        },
    );
    app.deliver_all().await;
    let (_, shown) = app.get_path(&c_at).await;
    assert_eq!(shown["status"], "failed", "{shown}");
    assert!(shown["lastError"]
        .as_str()
        .unwrap()
        .contains("vendor floor"));

    // D outlives its TTL while the battery is away.
    app.configure("bat-1", DeviceConfig::default());
    app.set_online("bat-1", false);
    let (_, headers, d) = app.post_soc("bat-1", &minsoc(40)).await;
    let d_at = location(&headers, &d);
    // The sweep leaves an offline device's request pending until its expiry, then expires it.
    tokio::time::sleep(Duration::from_millis(45_200)).await;
    assert_eq!(app.fire_timer().await.0, 200);
    let (_, shown) = app.get_path(&d_at).await;
    assert_eq!(shown["status"], "expired", "{shown}");

    // Every earlier request still says what became of it; the device's latest is D.
    assert_eq!(app.get_path(&b_at).await.1["status"], "applied");
    assert_eq!(app.get_path(&c_at).await.1["status"], "failed");
    assert_eq!(app.get_soc("bat-1").await.1["requestId"], d["requestId"]);
    let unknown = format!("/api/devices/bat-1/soc/requests/{}", "0".repeat(32));
    assert_eq!(app.get_path(&unknown).await.0, 404);
    assert_eq!(app.applied_values("bat-1"), vec![20]);
}
