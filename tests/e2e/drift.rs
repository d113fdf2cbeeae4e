//! Applied means the battery reports it (issue 21 item 3), through devhost: the status read
//! after an accepted PUT confirms the request (`confirmed`, `confirmedAt`); a battery changed
//! behind the service's back (devicesim's control API `PATCH /_control/devices/{id}`) is
//! found out when it reconnects (devicesim's connection event to `DeviceEventsHttp`): the
//! drift is shown by `GET …/soc` (`reportedMinSoc`, `driftDetectedAt`) and published to the
//! Event Grid topic stand-in as `com.socsettings.device.drifted`, read at `/_devhost/events`;
//! with `SOC_DRIFT_POLICY=reassert` the applied value is requested (and PUT) again.

use serde_json::{json, Value};

use crate::support::{secs, App, Setup};

const DRIFTED: &str = "com.socsettings.device.drifted";

/// A call to devicesim's control API; its answer must be a success.
async fn control(app: &App, method: reqwest::Method, path: &str, body: Option<Value>) {
    let mut req = app
        .http
        .request(method.clone(), format!("{}{path}", app.sim.base_url()));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let res = req.send().await.expect("devicesim's control API");
    assert!(res.status().is_success(), "{method} {path}: {res:?}");
}

/// What the battery reports through the device API (`GET /devices/{id}`), as the service
/// reads it.
async fn reported(app: &App, device: &str) -> Value {
    let res = app
        .http
        .get(format!("{}/devices/{device}", app.sim.base_url()))
        .header("x-api-key", devtools::devicesim::DEFAULT_API_KEY)
        .send()
        .await
        .expect("devicesim's device API");
    assert_eq!(res.status(), 200);
    res.json().await.expect("the device as JSON")
}

/// The battery goes offline and comes back through the control API; waits until its
/// connection event was answered by `DeviceEventsHttp` and returns the answer.
async fn reconnect(app: &App, device: &str) -> Value {
    let before = app.sim.events().len();
    for state in ["offline", "online"] {
        control(
            app,
            reqwest::Method::POST,
            &format!("/_control/devices/{device}/{state}"),
            None,
        )
        .await;
    }
    let answered = app
        .eventually("the connection event answered", secs(10), || async {
            app.sim.events()[before..]
                .iter()
                .find(|e| {
                    e.event_type == devtools::devicesim::CONNECTED_EVENT && e.status.is_some()
                })
                .cloned()
        })
        .await;
    assert_eq!(answered.status, Some(200), "{answered:?}");
    answered.answer.unwrap_or_default()
}

/// The device events the topic received (`subject` `devices/{device}/soc`).
async fn device_events(app: &App, device: &str) -> Vec<Value> {
    app.topic_events(&[("subject", &format!("devices/{device}/soc"))])
        .await
}

/// An applied request to an online battery; returns its id.
async fn applied(app: &App, device: &str, min_soc: u8) -> String {
    let r = app
        .post(device, &json!({ "minSoc": min_soc }).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "applied", "{}", r.body);
    r.body["requestId"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applied_request_is_confirmed_when_the_battery_reports_it() {
    let app = Setup::new().start().await;
    app.sim.add_device("bat-1", true);

    let r = app.post("bat-1", r#"{"minSoc":35}"#).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "applied", "{}", r.body);
    assert_eq!(r.body["confirmed"], true, "{}", r.body);
    let confirmed_at = r.body["confirmedAt"]
        .as_str()
        .unwrap_or_else(|| panic!("a confirmedAt: {}", r.body));
    chrono::DateTime::parse_from_rfc3339(confirmed_at).expect("confirmedAt is RFC 3339");
    let id = r.body["requestId"].as_str().unwrap();

    let (status, shown) = app
        .get_path(&format!("/api/devices/bat-1/soc/requests/{id}"))
        .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(
        (&shown["status"], &shown["confirmed"], &shown["confirmedAt"]),
        (&json!("applied"), &json!(true), &json!(confirmed_at)),
        "{shown}"
    );
    let (_, latest) = app.get("bat-1").await;
    assert_eq!(
        (&latest["confirmed"], &latest["confirmedAt"]),
        (&json!(true), &json!(confirmed_at)),
        "{latest}"
    );
    assert!(latest.get("reportedMinSoc").is_none(), "{latest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_reported_and_published_when_devicesim_changes_a_battery_behind_the_services_back()
{
    let app = Setup::new().events().start().await;
    app.sim.add_device("bat-1", true);
    let id = applied(&app, "bat-1", 35).await;

    // An installer tool sets 60 on the battery; the service is not told.
    control(
        &app,
        reqwest::Method::PATCH,
        "/_control/devices/bat-1",
        Some(json!({"minSoc": 60})),
    )
    .await;
    let answer = reconnect(&app, "bat-1").await;
    assert_eq!(answer["events"][0]["result"], "nothing-pending", "{answer}");

    let shown = app
        .eventually("the drift shown by GET …/soc", secs(10), || async {
            let (code, body) = app.get("bat-1").await;
            (code == 200 && body.get("reportedMinSoc").is_some()).then_some(body)
        })
        .await;
    assert_eq!(shown["reportedMinSoc"], 60, "{shown}");
    assert!(shown["driftDetectedAt"].is_string(), "{shown}");
    assert_eq!(
        (&shown["status"], &shown["requestId"], &shown["minSoc"]),
        (&json!("applied"), &json!(id), &json!(35)),
        "the request itself stays applied: {shown}"
    );

    // Published once (a sweep included, which would re-publish what the outbox kept).
    app.eventually("the drifted event at the topic", secs(10), || async {
        device_events(&app, "bat-1")
            .await
            .into_iter()
            .find(|e| e["type"] == DRIFTED)
    })
    .await;
    app.fire_timer().await;
    let drifted: Vec<Value> = device_events(&app, "bat-1")
        .await
        .into_iter()
        .filter(|e| e["type"] == DRIFTED)
        .collect();
    assert_eq!(drifted.len(), 1, "one drift, one event: {drifted:#?}");
    let e = &drifted[0];
    assert_eq!(e["subject"], "devices/bat-1/soc", "{e}");
    let event_id = e["id"].as_str().unwrap_or_default();
    assert!(
        event_id
            .strip_prefix("bat-1.drifted.")
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "{e}"
    );
    let data = &e["event"]["data"];
    assert_eq!(
        (&data["reportedMinSoc"], &data["requestId"], &data["minSoc"]),
        (&json!(60), &json!(id), &json!(35)),
        "{e}"
    );
    assert_eq!(data["driftDetectedAt"], shown["driftDetectedAt"], "{e}");

    // Report policy: nothing PUT again; the battery keeps 60.
    let history = app.history("bat-1");
    assert_eq!(history.len(), 1, "only the POST's PUT: {history:?}");
    assert_eq!(reported(&app, "bat-1").await["minSoc"], 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_reassert_the_applied_value_is_put_back() {
    let app = Setup::new()
        .set("SOC_DRIFT_POLICY", "reassert")
        .events()
        .start()
        .await;
    app.sim.add_device("bat-1", true);
    let first = applied(&app, "bat-1", 35).await;

    control(
        &app,
        reqwest::Method::PATCH,
        "/_control/devices/bat-1",
        Some(json!({"minSoc": 60})),
    )
    .await;
    assert_eq!(reported(&app, "bat-1").await["minSoc"], 60);
    let answer = reconnect(&app, "bat-1").await;

    app.eventually("the battery reporting 35 again", secs(10), || async {
        (reported(&app, "bat-1").await["minSoc"] == 35).then_some(())
    })
    .await;
    let shown = app
        .eventually("a new request applied", secs(10), || async {
            let (code, body) = app.get("bat-1").await;
            (code == 200 && body["status"] == "applied" && body["requestId"] != first.as_str())
                .then_some(body)
        })
        .await;
    assert_eq!(shown["minSoc"], 35, "{shown}");
    assert!(shown.get("reportedMinSoc").is_none(), "{shown}");
    assert!(shown.get("driftDetectedAt").is_none(), "{shown}");
    assert_eq!(answer["events"][0]["result"], "applied", "{answer}");
    assert_eq!(
        answer["events"][0]["requestId"], shown["requestId"],
        "{answer}"
    );

    let puts: Vec<(Option<i64>, String)> = app
        .history("bat-1")
        .into_iter()
        .map(|p| (p.min_soc, p.outcome))
        .collect();
    assert_eq!(
        puts,
        [(Some(35), "applied".into()), (Some(35), "applied".into())],
        "the POST's PUT and the reassertion's"
    );
}
