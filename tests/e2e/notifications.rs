//! The request notifications through devhost: every final transition of a request is
//! published as a CloudEvent to devhost's Event Grid topic stand-in (on a free port, where
//! `SOC_NOTIFY_TOPIC_ENDPOINT` is rewritten to point), and the test reads what the topic
//! received at `/_devhost/events` as a subscriber would see it (docs/events.md). Each test
//! checks that its request's event arrived exactly once (no repeat in a quiet run, a sweep
//! included), that nothing else was published, and that every event's `type`, `subject` and
//! `data.status` agree with its `id` (`{requestId}.{status}`).

use serde_json::Value;

use crate::support::{secs, App, Resp, Setup};

/// Waits until the topic received the event `id`; returns it as listed.
async fn wait_event(app: &App, id: &str, timeout: std::time::Duration) -> Value {
    app.eventually(&format!("event {id} at the topic"), timeout, || async {
        app.topic_events(&[])
            .await
            .into_iter()
            .find(|e| e["id"] == id)
    })
    .await
}

/// Every event as docs/events.md describes it: `id` `{requestId}.{status}`, `type`
/// `com.socsettings.request.{status}`, `subject` `devices/{deviceId}/soc/requests/{requestId}`,
/// `data` the request with that status, and the listing's attributes those of the event.
fn assert_well_formed(events: &[Value]) {
    for e in events {
        let id = e["id"].as_str().unwrap_or_else(|| panic!("an id: {e}"));
        let (request_id, status) = id
            .rsplit_once('.')
            .unwrap_or_else(|| panic!("id {id} is requestId.status"));
        assert_eq!(
            e["type"].as_str(),
            Some(format!("com.socsettings.request.{status}").as_str()),
            "{e}"
        );
        let inner = &e["event"];
        assert_eq!(
            (&inner["id"], &inner["type"], &inner["subject"]),
            (&e["id"], &e["type"], &e["subject"]),
            "{e}"
        );
        assert_eq!(inner["specversion"], "1.0", "{e}");
        let data = &inner["data"];
        assert_eq!(data["status"], status, "{e}");
        assert_eq!(data["requestId"], request_id, "{e}");
        let device = data["deviceId"].as_str().expect("data.deviceId");
        assert_eq!(
            e["subject"].as_str(),
            Some(format!("devices/{device}/soc/requests/{request_id}").as_str()),
            "{e}"
        );
    }
}

/// After a quiet while (a sweep run included: it would re-publish what the outbox kept), the
/// topic holds `id` exactly once and nothing else; returns that event.
async fn only_event(app: &App, id: &str) -> Value {
    app.fire_timer().await;
    let all = app.topic_events(&[]).await;
    assert_well_formed(&all);
    let ids: Vec<&str> = all.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, [id], "exactly one event, {id}: {all:#?}");
    all[0].clone()
}

fn request_id(r: &Resp) -> String {
    r.body["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("a requestId: {}", r.body))
        .to_string()
}

fn location(r: &Resp) -> String {
    r.headers["location"].to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_request_is_published_once_and_found_by_its_subject() {
    let app = Setup::new().start().await;
    app.sim.add_device("bat-1", true);

    let r = app.post("bat-1", r#"{"minSoc":35}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let id = request_id(&r);
    let event_id = format!("{id}.applied");
    wait_event(&app, &event_id, secs(10)).await;

    let e = only_event(&app, &event_id).await;
    assert_eq!(e["type"], "com.socsettings.request.applied");
    let data = &e["event"]["data"];
    assert_eq!(data["status"], "applied", "{e}");
    assert_eq!(data["minSoc"], 35, "{e}");
    assert!(data["appliedAt"].is_string(), "{e}");

    // A subscriber's filters: the request's subject, the battery's prefix; another's: none.
    let subject = format!("devices/bat-1/soc/requests/{id}");
    assert_eq!(e["subject"], subject.as_str());
    for query in [
        ("subject", subject.as_str()),
        ("subjectBeginsWith", "devices/bat-1/"),
    ] {
        let found = app.topic_events(&[query]).await;
        assert_eq!(found, std::slice::from_ref(&e), "{query:?}");
    }
    assert!(app
        .topic_events(&[("subjectBeginsWith", "devices/bat-10/")])
        .await
        .is_empty());
    assert!(app
        .topic_events(&[("subject", "devices/bat-1/soc/requests/x")])
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_replaced_while_pending_is_published_superseded_once() {
    let app = Setup::new().start().await;
    app.sim.add_device("bat-1", false);

    let a = app.post("bat-1", r#"{"minSoc":20}"#).await;
    let b = app.post("bat-1", r#"{"minSoc":80}"#).await;
    assert_eq!((a.status, b.status), (202, 202), "{} {}", a.body, b.body);
    let (a_id, b_id) = (request_id(&a), request_id(&b));
    let event_id = format!("{a_id}.superseded");
    wait_event(&app, &event_id, secs(10)).await;

    // B still waits for the battery: its request has not ended, so no event of it.
    let e = only_event(&app, &event_id).await;
    let data = &e["event"]["data"];
    assert_eq!(data["status"], "superseded", "{e}");
    assert_eq!(data["supersededBy"], b_id.as_str(), "{e}");
    assert_eq!(data["minSoc"], 20, "{e}");
    assert_eq!(app.get("bat-1").await.1["status"], "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_battery_stays_offline_is_published_expired_once() {
    // The shortest TTL the service accepts (Policy::design_problems): one device lease
    // (storage timeout 10 s + device timeout 1 s + late landing 10 s + twice the clock skew
    // 2 s + margin 5 s, + margin 5 s = 35 s) plus the longest re-check delay (1 s).
    let app = Setup::new()
        .set("SOC_REQUEST_TTL_SECONDS", "36")
        .set("SOC_RECHECK_INITIAL_SECONDS", "1")
        .set("SOC_RECHECK_MAX_SECONDS", "1")
        .set("DRAIN_SOC_SCHEDULE", "*/5 * * * * *")
        .start()
        .await;
    app.sim.add_device("bat-1", false);

    let r = app.post("bat-1", r#"{"minSoc":55}"#).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = request_id(&r);
    // No PUT may start within one lease of expiresAt, so the service settles the request
    // as expired from then on (`wake::schedule_recheck`: the chain's last message, due
    // then; `drain_soc_timer` if it is lost): here a second after the POST, half a minute
    // before expiresAt.
    let event_id = format!("{id}.expired");
    wait_event(&app, &event_id, secs(60)).await;

    let e = only_event(&app, &event_id).await;
    let data = &e["event"]["data"];
    assert_eq!(data["status"], "expired", "{e}");
    assert_eq!(data["minSoc"], 55, "{e}");
    let at =
        |name: &str| chrono::DateTime::parse_from_rfc3339(data[name].as_str().unwrap()).unwrap();
    assert_eq!(
        (at("expiresAt") - at("requestedAt")).num_seconds(),
        36,
        "{e}"
    );
    assert!(
        data["lastError"].as_str().is_some_and(|s| !s.is_empty()),
        "an expired request says why: {e}"
    );
    assert!(data.get("appliedAt").map_or(true, Value::is_null), "{e}");
    assert_eq!(app.device_value("bat-1"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_is_published_cancelled_once_and_never_sent_afterwards() {
    // Connection events on: the battery's return reaches DeviceEventsHttp too.
    let app = Setup::new().events().start().await;
    app.sim.add_device("bat-1", false);

    let r = app.post("bat-1", r#"{"minSoc":30}"#).await;
    assert_eq!(r.status, 202, "{}", r.body);
    let id = request_id(&r);
    let at = location(&r);
    let cancelled = app.delete_path(&at).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    // A repeated DELETE answers the same and is no second transition.
    let again = app.delete_path(&at).await;
    assert_eq!(
        (again.status, &again.body["status"]),
        (200, &"cancelled".into())
    );
    let tried = app.history("bat-1").len();
    let event_id = format!("{id}.cancelled");
    wait_event(&app, &event_id, secs(10)).await;

    // The battery returns through devicesim's control API; its connection event is
    // answered, the request's wake-up messages are delivered, and a sweep runs.
    let online = app
        .http
        .post(format!(
            "{}/_control/devices/bat-1/online",
            app.sim.base_url()
        ))
        .send()
        .await
        .expect("devicesim's control API");
    assert!(online.status().is_success(), "{online:?}");
    let answered = app
        .eventually("the connection event answered", secs(10), || async {
            let events = app.sim.events();
            events
                .iter()
                .find(|e| e.event_type == "com.vendor.device.connected" && e.status.is_some())
                .cloned()
        })
        .await;
    assert_eq!(answered.status, Some(200), "{answered:?}");
    let answer = answered.answer.clone().unwrap_or_default();
    assert_eq!(answer["events"][0]["result"], "nothing-pending", "{answer}");
    app.eventually("the re-check after the cancel", secs(15), || async {
        app.handler_log()
            .contains(&format!(
                "no-op for request {id}: request already cancelled"
            ))
            .then_some(())
    })
    .await;
    app.wait_drained(secs(30)).await;
    let e = only_event(&app, &event_id).await;

    let history = app.history("bat-1");
    assert_eq!(
        history.len(),
        tried,
        "nothing is PUT after the cancel: {history:?}"
    );
    assert!(
        history
            .iter()
            .all(|p| p.outcome == "offline" && p.idempotency_key.as_deref() == Some(id.as_str())),
        "only the POST's own try, refused offline: {history:?}"
    );
    assert!(app.applied_values("bat-1").is_empty(), "{history:?}");
    assert_eq!(app.device_value("bat-1"), None);
    let data = &e["event"]["data"];
    assert_eq!(data["status"], "cancelled", "{e}");
    assert_eq!(data["minSoc"], 30, "{e}");
    assert_eq!(app.get_path(&at).await.1["status"], "cancelled");
}
