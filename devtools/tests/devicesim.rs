//! devicesim behaviour over real HTTP on loopback.

use std::time::Duration;

use devtools::devicesim::{DevicePatch, DeviceSim, Fault, FleetConfig, DEFAULT_API_KEY};
use serde_json::{json, Value};

async fn sim() -> DeviceSim {
    DeviceSim::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap()
}

async fn put(
    sim: &DeviceSim,
    id: &str,
    min_soc: i64,
    key: &str,
) -> reqwest::Result<reqwest::Response> {
    client()
        .put(format!("{}/devices/{id}/settings/min-soc", sim.base_url()))
        .header("x-api-key", DEFAULT_API_KEY)
        .header("Idempotency-Key", key)
        .json(&json!({ "minSoc": min_soc }))
        .send()
        .await
}

#[tokio::test]
async fn get_device_returns_the_contract_shape_or_404() {
    let sim = sim().await;
    sim.add_device_with("bat-1", true, Some(20));
    let r = client()
        .get(format!("{}/devices/bat-1", sim.base_url()))
        .header("x-api-key", DEFAULT_API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"deviceId": "bat-1", "online": true, "minSoc": 20})
    );
    let r = client()
        .get(format!("{}/devices/nope", sim.base_url()))
        .header("x-api-key", DEFAULT_API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    sim.shutdown().await;
}

#[tokio::test]
async fn requests_without_the_api_key_get_401_and_apply_nothing() {
    let sim = sim().await;
    sim.add_device("bat-1", true);
    let r = client()
        .put(format!("{}/devices/bat-1/settings/min-soc", sim.base_url()))
        .json(&json!({"minSoc": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(format!("{}/devices/bat-1", sim.base_url()))
        .header("x-api-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(sim.device("bat-1").unwrap().min_soc, None);
    assert_eq!(sim.history()[0].outcome, "unauthorized");
    sim.shutdown().await;
}

#[tokio::test]
async fn put_applies_only_when_online_and_answers_409_404_422_otherwise() {
    let sim = sim().await;
    sim.add_device("on", true);
    sim.add_device("off", false);
    sim.add_device("picky", true);
    sim.patch(
        "picky",
        &DevicePatch {
            reject: Some(Some("minSoc below vendor floor".into())),
            ..Default::default()
        },
    );
    assert_eq!(put(&sim, "on", 30, "k1").await.unwrap().status(), 200);
    assert_eq!(put(&sim, "off", 30, "k2").await.unwrap().status(), 409);
    assert_eq!(put(&sim, "ghost", 30, "k3").await.unwrap().status(), 404);
    let r = put(&sim, "picky", 30, "k4").await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("vendor floor"));
    assert_eq!(sim.device("on").unwrap().min_soc, Some(30));
    assert_eq!(sim.device("off").unwrap().min_soc, None);
    let outcomes: Vec<String> = sim.history().into_iter().map(|h| h.outcome).collect();
    assert_eq!(
        outcomes,
        ["applied", "offline", "unknown-device", "rejected"]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_with_the_same_body_does_not_apply_twice() {
    let sim = sim().await;
    sim.add_device("bat", true);
    assert_eq!(put(&sim, "bat", 40, "req-1").await.unwrap().status(), 200);
    assert_eq!(put(&sim, "bat", 50, "req-2").await.unwrap().status(), 200);
    // replay of req-1 after req-2: same answer, no effect
    assert_eq!(put(&sim, "bat", 40, "req-1").await.unwrap().status(), 200);
    let d = sim.device("bat").unwrap();
    assert_eq!(d.min_soc, Some(50));
    assert_eq!(d.apply_count, 2);
    assert_eq!(sim.history()[2].outcome, "replayed");
    // same key, different body: rejected
    assert_eq!(put(&sim, "bat", 41, "req-1").await.unwrap().status(), 422);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_offline_device_accepts_the_same_key_once_it_is_back_online() {
    let sim = sim().await;
    sim.add_device("bat", false);
    assert_eq!(put(&sim, "bat", 40, "req-1").await.unwrap().status(), 409);
    sim.set_online("bat", true);
    assert_eq!(put(&sim, "bat", 40, "req-1").await.unwrap().status(), 200);
    assert_eq!(sim.device("bat").unwrap().min_soc, Some(40));
    sim.shutdown().await;
}

#[tokio::test]
async fn scripted_faults_give_5xx_then_429_with_retry_after_then_success() {
    let sim = sim().await;
    sim.add_device("bat", true);
    sim.script_faults("bat", Fault::Status { status: 502 }, 2);
    sim.script_faults(
        "bat",
        Fault::TooMany {
            retry_after_seconds: 7,
        },
        1,
    );
    assert_eq!(put(&sim, "bat", 10, "k").await.unwrap().status(), 502);
    assert_eq!(put(&sim, "bat", 10, "k").await.unwrap().status(), 502);
    let r = put(&sim, "bat", 10, "k").await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(put(&sim, "bat", 10, "k").await.unwrap().status(), 200);
    let outcomes: Vec<String> = sim.history().into_iter().map(|h| h.outcome).collect();
    assert_eq!(outcomes, ["fault-5xx", "fault-5xx", "fault-429", "applied"]);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_timeout_fault_hangs_past_the_client_timeout_and_applies_nothing() {
    let sim = sim().await;
    sim.add_device("bat", true);
    sim.patch(
        "bat",
        &DevicePatch {
            hang_ms: Some(2_000),
            ..Default::default()
        },
    );
    sim.script_faults("bat", Fault::Timeout, 1);
    let err = put(&sim, "bat", 10, "k").await.unwrap_err();
    assert!(err.is_timeout());
    assert_eq!(sim.device("bat").unwrap().min_soc, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn timeout_after_apply_applies_but_the_client_never_hears_and_the_retry_is_a_replay() {
    let sim = sim().await;
    sim.add_device("bat", true);
    sim.patch(
        "bat",
        &DevicePatch {
            hang_ms: Some(2_000),
            ..Default::default()
        },
    );
    sim.script_faults("bat", Fault::TimeoutAfterApply, 1);
    assert!(put(&sim, "bat", 10, "k").await.unwrap_err().is_timeout());
    assert_eq!(put(&sim, "bat", 10, "k").await.unwrap().status(), 200);
    let d = sim.device("bat").unwrap();
    assert_eq!((d.min_soc, d.apply_count), (Some(10), 1));
    sim.shutdown().await;
}

#[tokio::test]
async fn latency_is_added_before_answering() {
    let sim = sim().await;
    sim.add_device("bat", true);
    sim.patch(
        "bat",
        &DevicePatch {
            latency_ms: Some(300),
            ..Default::default()
        },
    );
    let t = std::time::Instant::now();
    assert_eq!(put(&sim, "bat", 10, "k").await.unwrap().status(), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    sim.shutdown().await;
}

#[tokio::test]
async fn random_error_rates_are_seeded_and_roughly_honoured() {
    let sim = sim().await;
    sim.add_device("bat", true);
    sim.patch(
        "bat",
        &DevicePatch {
            error_5xx_rate: Some(0.5),
            ..Default::default()
        },
    );
    let mut fails = 0;
    for i in 0..60 {
        if put(&sim, "bat", 10, &format!("k{i}"))
            .await
            .unwrap()
            .status()
            == 503
        {
            fails += 1;
        }
    }
    assert!((15..=45).contains(&fails), "{fails} of 60 failed");
    sim.shutdown().await;
}

#[tokio::test]
async fn the_control_api_creates_flips_and_lists_devices_and_history_over_http() {
    let sim = sim().await;
    let c = client();
    let base = sim.base_url();
    let r = c
        .post(format!("{base}/_control/devices"))
        .json(&json!([{"deviceId": "a", "online": false}, {"deviceId": "b", "online": true}]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    c.post(format!("{base}/_control/devices/a/online"))
        .send()
        .await
        .unwrap();
    c.patch(format!("{base}/_control/devices/b"))
        .json(&json!({"reject": "nope"}))
        .send()
        .await
        .unwrap();
    c.post(format!("{base}/_control/devices/a/faults"))
        .json(&json!({"kind": "status", "status": 500, "count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(put(&sim, "a", 5, "x").await.unwrap().status(), 500);
    assert_eq!(put(&sim, "a", 5, "x").await.unwrap().status(), 200);
    assert_eq!(put(&sim, "b", 5, "y").await.unwrap().status(), 422);
    let h: Vec<Value> = c
        .get(format!("{base}/_control/history?deviceId=a"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[1]["outcome"], "applied");
    assert_eq!(h[1]["idempotencyKey"], "x");
    assert_eq!(h[1]["minSoc"], 5);
    assert!(h[1]["at"].as_str().unwrap().contains('T'));
    let list: Vec<Value> = c
        .get(format!("{base}/_control/devices"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 2);
    c.post(format!("{base}/_control/reset"))
        .send()
        .await
        .unwrap();
    assert!(sim.devices().is_empty() && sim.history().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn fleet_mode_creates_n_devices_that_flap_and_all_online_stops_the_flapping() {
    let sim = sim().await;
    let ids = sim.start_fleet(FleetConfig {
        count: 20,
        interval_ms: 20,
        flip_probability: 0.5,
        seed: 7,
        ..Default::default()
    });
    assert_eq!(ids.len(), 20);
    let before: Vec<bool> = sim.devices().iter().map(|d| d.online).collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let after: Vec<bool> = sim.devices().iter().map(|d| d.online).collect();
    assert_ne!(before, after, "fleet did not flap");
    sim.set_all_online(true);
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(sim.devices().iter().all(|d| d.online));
    sim.shutdown().await;
}

fn tmp_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("devtools-sim-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test]
async fn a_simulator_with_a_state_file_remembers_its_devices_and_history_after_a_restart() {
    let dir = tmp_dir();
    let file = dir.join("devicesim.json");
    let addr = "127.0.0.1:0".parse().unwrap();
    let sim = DeviceSim::start_saved(addr, Some(DEFAULT_API_KEY.into()), 1, &file)
        .await
        .unwrap();
    sim.add_device("bat-1", true);
    sim.add_device("bat-2", false);
    assert_eq!(put(&sim, "bat-1", 45, "k1").await.unwrap().status(), 200);
    sim.shutdown().await;

    let sim = DeviceSim::start_saved(addr, Some(DEFAULT_API_KEY.into()), 1, &file)
        .await
        .unwrap();
    let bat1 = sim.device("bat-1").expect("bat-1 kept");
    assert_eq!(
        (bat1.online, bat1.min_soc, bat1.apply_count),
        (true, Some(45), 1)
    );
    assert!(!sim.device("bat-2").expect("bat-2 kept").online);
    assert_eq!(sim.history_for("bat-1").len(), 1);
    // The applied key is remembered too: the same PUT again is a replay, not a second apply.
    assert_eq!(put(&sim, "bat-1", 45, "k1").await.unwrap().status(), 200);
    assert_eq!(sim.device("bat-1").unwrap().apply_count, 1);
    assert_eq!(sim.history_for("bat-1")[1].outcome, "replayed");
    sim.shutdown().await;

    // Without a state file nothing is read.
    let plain = DeviceSim::start(addr).await.unwrap();
    assert!(plain.devices().is_empty());
    plain.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_corrupt_state_file_is_refused_with_a_hint_instead_of_silently_emptied() {
    let dir = tmp_dir();
    let file = dir.join("devicesim.json");
    std::fs::write(&file, "{not json").unwrap();
    let err = DeviceSim::start_saved("127.0.0.1:0".parse().unwrap(), None, 1, &file)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("remove it to start afresh"),
        "{err:#}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{not json");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The `devicesim` binary with stdout redirected to `log` (as scripts/dev runs it), and its
/// base URL read from what it prints.
struct SimProcess {
    child: std::process::Child,
    base: String,
}

impl SimProcess {
    async fn start(args: &[&str], log: &std::path::Path) -> SimProcess {
        let out = std::fs::File::create(log).unwrap();
        let mut sim = SimProcess {
            child: std::process::Command::new(env!("CARGO_BIN_EXE_devicesim"))
                .args(["--addr", "127.0.0.1:0"])
                .args(args)
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
            base: String::new(),
        };
        for _ in 0..400 {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(base) = text
                .lines()
                .find_map(|l| l.strip_prefix("devicesim: device API   "))
                .and_then(|l| l.strip_suffix("/devices/{id}"))
            {
                sim.base = base.to_string();
                return sim;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "devicesim did not start: {}",
            std::fs::read_to_string(log).unwrap()
        );
    }

    async fn device(&self, id: &str) -> Value {
        client()
            .get(format!("{}/_control/devices/{id}", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// SIGTERM, as scripts/dev stops it.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        assert!(
            self.child.wait().unwrap().success(),
            "devicesim exits 0 on SIGTERM"
        );
    }
}

impl Drop for SimProcess {
    /// A failing test does not leave the process behind.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn the_devicesim_binary_keeps_its_devices_across_a_restart_unless_fresh_and_logs_plain_text()
{
    let dir = tmp_dir();
    let state = dir.join("devicesim.json");
    let state = state.to_str().unwrap();
    let log = dir.join("devicesim.log");
    let mut sim = SimProcess::start(&["--state", state, "--device", "bat-1:offline"], &log).await;
    let r = client()
        .post(format!("{}/_control/devices/bat-1/online", sim.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .put(format!("{}/devices/bat-1/settings/min-soc", sim.base))
        .header("x-api-key", DEFAULT_API_KEY)
        .header("Idempotency-Key", "req-1")
        .json(&json!({"minSoc": 45}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    sim.stop();

    // A log file (stdout is not a terminal): the PUT is logged, without colour escapes.
    let text = std::fs::read(&log).unwrap();
    assert!(String::from_utf8_lossy(&text).contains("devicesim PUT"));
    assert!(
        !text.contains(&0x1b),
        "no ANSI escape codes in the log file"
    );

    // Restarted with the same --device list: the saved battery wins over "offline".
    let mut sim = SimProcess::start(&["--state", state, "--device", "bat-1:offline"], &log).await;
    let d = sim.device("bat-1").await;
    assert_eq!(
        (d["online"].clone(), d["minSoc"].clone()),
        (json!(true), json!(45))
    );
    sim.stop();

    // --fresh forgets it: the battery is as --device says, with no value yet.
    let mut sim = SimProcess::start(
        &["--state", state, "--fresh", "--device", "bat-1:offline"],
        &log,
    )
    .await;
    let d = sim.device("bat-1").await;
    assert_eq!(
        (d["online"].clone(), d["minSoc"].clone()),
        (json!(false), Value::Null)
    );
    sim.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A loopback receiver of connection events: answers each POST with the next status of
/// `statuses` (then 200) and keeps what it got (headers of interest, body).
async fn receiver(
    statuses: Vec<u16>,
) -> (
    devtools::server::ServerHandle,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, Value)>>>,
) {
    use axum::http::{HeaderMap, StatusCode};
    use std::sync::{Arc, Mutex};
    let got: Arc<Mutex<Vec<(String, String, Value)>>> = Arc::default();
    let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(statuses)));
    let (seen, answers2) = (got.clone(), answers.clone());
    let app = axum::Router::new().route(
        "/api/device-events",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let (seen, answers) = (seen.clone(), answers2.clone());
            async move {
                let header = |n: &str| {
                    headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string()
                };
                seen.lock().unwrap().push((
                    header("content-type"),
                    header("x-functions-key"),
                    serde_json::from_str(&body).unwrap_or(Value::Null),
                ));
                let status = answers.lock().unwrap().pop_front().unwrap_or(200);
                (
                    StatusCode::from_u16(status).unwrap(),
                    axum::Json(json!({"received": 1})),
                )
            }
        }),
    );
    let server = devtools::server::serve("127.0.0.1:0".parse().unwrap(), app, "receiver")
        .await
        .unwrap();
    (server, got)
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_device_going_online_or_offline_sends_one_cloudevent_in_order() {
    let (server, got) = receiver(vec![]).await;
    let sim = sim().await;
    sim.add_device("bat-1", false);
    sim.emit_events_to(
        &format!("http://{}/api/device-events", server.addr),
        Some("fk".into()),
    );
    let base = sim.base_url();
    let c = client();
    c.post(format!("{base}/_control/devices/bat-1/online"))
        .send()
        .await
        .unwrap();
    // Already online: no change, no event.
    c.post(format!("{base}/_control/devices/bat-1/online"))
        .send()
        .await
        .unwrap();
    c.post(format!("{base}/_control/devices/bat-1/offline"))
        .send()
        .await
        .unwrap();
    // A lost event: the state changes, nothing is sent.
    c.post(format!("{base}/_control/devices/bat-1/online?events=false"))
        .send()
        .await
        .unwrap();
    let events = until("two events answered", || {
        let e = sim.events();
        (e.len() == 2 && e.iter().all(|e| e.status == Some(200))).then_some(e)
    })
    .await;
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    let types: Vec<&str> = got.iter().map(|g| g.2["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "com.vendor.device.connected",
            "com.vendor.device.disconnected"
        ]
    );
    for (i, (content_type, key, body)) in got.iter().enumerate() {
        assert_eq!(content_type, "application/cloudevents+json");
        assert_eq!(key, "fk");
        assert_eq!(body["specversion"], "1.0");
        assert_eq!(body["subject"], "bat-1");
        assert_eq!(body["id"], events[i].id.as_str());
        assert!(body["source"].as_str().is_some_and(|s| !s.is_empty()));
    }
    assert_eq!(events[0].answer, Some(json!({"received": 1})));
    assert!(sim.device("bat-1").unwrap().online);
    let listed: Value = c
        .get(format!("{base}/_control/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    sim.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_event_answered_5xx_is_sent_again_and_a_400_is_not() {
    let (server, got) = receiver(vec![503, 503, 400]).await;
    let sim = sim().await;
    sim.add_device("bat-1", false);
    sim.emit_events_to(&format!("http://{}/api/device-events", server.addr), None);
    sim.set_online("bat-1", true);
    let first = until("the retried event answered 400", || {
        sim.events()
            .first()
            .filter(|e| e.status == Some(400))
            .cloned()
    })
    .await;
    assert_eq!(first.tries, 3);
    let got = got.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "two retries after 503, none after 400");
    assert!(
        got.iter().all(|g| g.2["id"] == first.id.as_str()),
        "the same event"
    );
    assert_eq!(got[0].1, "", "no key configured");
    sim.shutdown().await;
    server.shutdown().await;
}
