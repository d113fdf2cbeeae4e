//! The reconnect event path through devhost: devicesim sends its connection events
//! (CloudEvents) to `DeviceEventsHttp` as `scripts/dev` runs it, and a battery coming back
//! gets its pending request at once, without a re-check or a sweep.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{secs, Setup};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_battery_coming_online_gets_its_pending_request_from_the_event_without_a_sweep() {
    // No timer, and the first re-check a minute away: only the event can apply it.
    let app = Setup::new()
        .no_timers()
        .set("SOC_RECHECK_INITIAL_SECONDS", "60")
        .set("SOC_RECHECK_MAX_SECONDS", "600")
        .events()
        .start()
        .await;
    app.sim.add_device("bat-1", false);
    let r = app.post("bat-1", r#"{"minSoc":35}"#).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let request_id = r.body["requestId"].as_str().unwrap().to_string();

    let online_at = Instant::now();
    assert!(app.sim.set_online("bat-1", true));
    let shown = app
        .wait_status(
            "bat-1",
            "applied",
            Some(&request_id),
            Duration::from_secs(5),
        )
        .await;
    let took = online_at.elapsed();
    assert_eq!(shown["requestId"], request_id.as_str());
    assert!(
        took < Duration::from_millis(1500),
        "applied {took:?} after the battery came online"
    );
    assert_eq!(app.device_value("bat-1"), Some(35));

    // What devicesim sent, and what DeviceEventsHttp answered.
    let events = app.sim.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event_type, "com.vendor.device.connected");
    assert_eq!(events[0].status, Some(200));
    let answer = events[0].answer.clone().unwrap();
    assert_eq!(answer["events"][0]["result"], "applied", "{answer}");
    assert_eq!(answer["events"][0]["requestId"], request_id.as_str());

    // The battery goes away and comes back: the event finds nothing pending; nothing is PUT.
    let puts = app.history("bat-1").len();
    app.sim.set_online("bat-1", false);
    app.sim.set_online("bat-1", true);
    let answered = app
        .eventually("both events answered", secs(5), || async {
            let e = app.sim.events();
            (e.len() == 3 && e.iter().all(|e| e.status.is_some())).then_some(e)
        })
        .await;
    assert_eq!(answered[1].answer.as_ref().unwrap()["ignored"], 1);
    assert_eq!(
        answered[2].answer.as_ref().unwrap()["events"][0]["result"],
        "nothing-pending"
    );
    assert_eq!(app.history("bat-1").len(), puts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_handshake_and_a_bad_batch_through_the_host() {
    let app = Setup::new().no_timers().start().await;
    app.sim.add_device("bat-1", false);
    let r = app.post("bat-1", r#"{"minSoc":20}"#).await;
    assert_eq!(r.status, 202);
    app.sim.set_online("bat-1", true);
    let url = app.host().api_url("device-events");
    let key = app.host().function_key().to_string();

    // Azure Event Grid's handshake (CloudEvents schema): the key is needed as everywhere.
    let handshake = |with_key: bool| {
        let mut req = app
            .http
            .request(reqwest::Method::OPTIONS, &url)
            .header("WebHook-Request-Origin", "eventgrid.azure.net");
        if with_key {
            req = req.header("x-functions-key", &key);
        }
        req.send()
    };
    assert_eq!(handshake(false).await.unwrap().status(), 401);
    let ok = handshake(true).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.headers()["webhook-allowed-origin"],
        "eventgrid.azure.net"
    );
    assert_eq!(ok.headers()["webhook-allowed-rate"], "*");

    // An Event Grid batch with one bad event: 400 naming it, and nothing applied.
    let event = |id: &str, subject: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/vendor",
               "type": "com.vendor.device.connected", "subject": subject})
    };
    let batch = json!([event("e1", "bat-1"), event("e2", "not a device")]);
    let bad = app
        .http
        .post(&url)
        .header("x-functions-key", &key)
        .header("content-type", "application/json")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
    let problem: Value = bad.json().await.unwrap();
    assert_eq!(
        (problem["field"].clone(), problem["index"].clone()),
        (json!("subject"), json!(1))
    );
    assert_eq!(app.get("bat-1").await.1["status"], "pending");
    assert_eq!(app.device_value("bat-1"), None);

    // The same batch without the bad event applies it.
    let good = app
        .http
        .post(&url)
        .header("x-functions-key", &key)
        .header("content-type", "application/cloudevents-batch+json")
        .body(json!([event("e1", "bat-1")]).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(good.status(), 200);
    let summary: Value = good.json().await.unwrap();
    assert_eq!(summary["applied"], 1, "{summary}");
    assert_eq!(app.device_value("bat-1"), Some(20));
}
