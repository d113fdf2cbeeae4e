//! devhost end to end with a fake handler (`fakehandler` bin), driven by the repo's real
//! host.json / function.json / local.settings.json. Payload shapes are compared with the
//! fixtures in tests/fixtures/host-payloads (the repo copy of the reference payloads).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use devtools::devhost::{DevHost, DevHostOptions};
use devtools::servicebus::{sas_token, ConnectionString};
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The repo's copy of the host payload fixtures (see its SOURCE.md).
fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures/host-payloads")
}

fn fixture(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn tmp() -> PathBuf {
    let d = std::env::temp_dir().join(format!("devtools-dh-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

struct Env {
    host: DevHost,
    log: PathBuf,
}

async fn start_in(
    root: &Path,
    extra: &[(&str, &str)],
    tweak: impl FnOnce(&mut DevHostOptions),
) -> Env {
    let dir = tmp();
    let log = dir.join("handler.jsonl");
    let mut o = DevHostOptions::for_tests(root, dir.join("state"));
    o.handler = Some(PathBuf::from(env!("CARGO_BIN_EXE_fakehandler")));
    o.timers = false;
    o.init_timeout = Duration::from_secs(10);
    o.overrides
        .push(("FAKE_HANDLER_LOG".into(), log.to_string_lossy().into()));
    for (k, v) in extra {
        o.overrides.push((k.to_string(), v.to_string()));
    }
    tweak(&mut o);
    let host = DevHost::start(o).await.unwrap();
    Env { host, log }
}

async fn start(extra: &[(&str, &str)]) -> Env {
    start_in(&repo_root(), extra, |_| {}).await
}

fn log_lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

async fn wait_log(p: &Path, what: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..200 {
        let l = log_lines(p);
        if pred(&l) {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}; log: {:#?}", log_lines(p));
}

fn requests_to<'a>(l: &'a [Value], path: &str) -> Vec<&'a Value> {
    l.iter()
        .filter(|v| v["kind"] == "request" && v["path"] == path)
        .collect()
}

/// Send like the handler does: REST + SAS from the connection string devhost gave it.
async fn sb_send(host: &DevHost, body: &str, bp: Value) -> reqwest::StatusCode {
    let cs = ConnectionString::parse(&host.settings()["ServiceBusConnection"]).unwrap();
    let base = format!("http://{}:{}", cs.host, cs.port.unwrap());
    let auth = sas_token(
        &format!("{base}/soc-settings"),
        &cs.key_name,
        &cs.key,
        Utc::now().timestamp() + 300,
    );
    reqwest::Client::new()
        .post(format!("{base}/soc-settings/messages"))
        .header("Authorization", auth)
        .header("Content-Type", "application/json")
        .header("BrokerProperties", bp.to_string())
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
}

/// Same keys (recursively for objects), same JSON types for the leaves named in `typed`.
fn same_keys(actual: &Value, expected: &Value, ctx: &str) {
    let (Some(a), Some(e)) = (actual.as_object(), expected.as_object()) else {
        panic!("{ctx}: expected objects, got {actual} vs {expected}");
    };
    let mut ak: Vec<&String> = a.keys().collect();
    let mut ek: Vec<&String> = e.keys().collect();
    ak.sort();
    ek.sort();
    assert_eq!(ak, ek, "{ctx}: key sets differ");
    for (k, ev) in e {
        let av = &a[k];
        assert_eq!(
            std::mem::discriminant(av),
            std::mem::discriminant(ev),
            "{ctx}.{k}: JSON type differs: {av} vs {ev}"
        );
    }
}

#[tokio::test]
async fn the_handler_gets_the_app_settings_the_five_host_variables_and_a_rewritten_service_bus_port(
) {
    let e = start(&[("SOC_REQUEST_TTL_SECONDS", "20")]).await;
    let l = wait_log(&e.log, "startup", |l| {
        l.iter().any(|v| v["kind"] == "startup")
    })
    .await;
    let env = &l[0]["env"];
    assert_eq!(env["SOC_REQUEST_TTL_SECONDS"], "20");
    assert_eq!(env["SOC_QUEUE_NAME"], "soc-settings");
    assert_eq!(env["FUNCTIONS_WORKER_RUNTIME"], "custom");
    let port = env["FUNCTIONS_CUSTOMHANDLER_PORT"].as_str().unwrap();
    assert_eq!(env["FUNCTIONS_HTTPWORKER_PORT"], port);
    assert!(!env["FUNCTIONS_CUSTOMHANDLER_WORKER_ID"]
        .as_str()
        .unwrap()
        .is_empty());
    assert_eq!(
        env["FUNCTIONS_HTTPWORKER_ID"],
        env["FUNCTIONS_CUSTOMHANDLER_WORKER_ID"]
    );
    assert_eq!(
        Path::new(env["FUNCTIONS_APP_ROOT_PATH"].as_str().unwrap()),
        repo_root().canonicalize().unwrap()
    );
    let sb = env["ServiceBusConnection"].as_str().unwrap();
    let cs = ConnectionString::parse(sb).unwrap();
    assert_eq!(cs.port, Some(e.host.servicebus_addr().unwrap().port()));
    assert!(cs.use_development_emulator);
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_service_bus_message_is_delivered_in_the_binary_fixture_shape_and_completed() {
    let e = start(&[]).await;
    let body = r#"{"requestId":"r-1","deviceId":"bat-1","expiresAt":"2030-01-01T00:00:00Z"}"#;
    let st = sb_send(
        &e.host,
        body,
        json!({"MessageId": "m-1", "TimeToLive": 600, "CorrelationId": "c-1"}),
    )
    .await;
    assert_eq!(st, 201);
    let l = wait_log(&e.log, "SB delivery", |l| {
        !requests_to(l, "/SocQueueTrigger").is_empty()
    })
    .await;
    let req = requests_to(&l, "/SocQueueTrigger")[0];
    let env = &req["json"];
    let fx = fixture("servicebus-trigger-binary.json");
    same_keys(&env["Data"], &fx["Data"], "Data");
    same_keys(&env["Metadata"], &fx["Metadata"], "Metadata");
    same_keys(
        &env["Metadata"]["Client"],
        &fx["Metadata"]["Client"],
        "Metadata.Client",
    );
    same_keys(
        &env["Metadata"]["sys"],
        &fx["Metadata"]["sys"],
        "Metadata.sys",
    );
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(env["Data"]["msg"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, body.as_bytes());
    let md = &env["Metadata"];
    assert_eq!(md["DeliveryCount"], "1");
    assert_eq!(md["MessageId"], "\"m-1\"");
    assert_eq!(md["ContentType"], "\"application/json\"");
    assert_eq!(md["CorrelationId"], "\"c-1\"");
    assert_eq!(md["sys"]["MethodName"], "SocQueueTrigger");
    let exp = md["ExpiresAtUtc"].as_str().unwrap();
    assert!(exp.len() == 19 && !exp.ends_with('Z'), "{exp}");
    assert!(md["ExpiresAt"].as_str().unwrap().ends_with("+00:00"));
    assert!(
        md.get("requestId").is_none(),
        "binary bodies must not leak into Metadata"
    );
    let h = &req["headers"];
    assert_eq!(h["content-type"], "application/json; charset=utf-8");
    assert!(h["x-azure-functions-invocationid"].is_string());
    assert!(h["x-azure-functions-hostversion"].is_string());
    assert!(h["user-agent"]
        .as_str()
        .unwrap()
        .starts_with("Azure-Functions-Host/"));
    e.host
        .wait_queue_drained("soc-settings", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(e.host.broker().dead_letters("soc-settings").is_empty());
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_failing_invocation_is_redelivered_with_delivery_count_plus_one_until_dead_lettered() {
    let e = start_in(&repo_root(), &[("FAKE_SB_MODE", "fail")], |o| {
        o.max_delivery_count = 3
    })
    .await;
    assert_eq!(
        sb_send(&e.host, "{}", json!({"MessageId": "poison"})).await,
        201
    );
    let l = wait_log(&e.log, "3 deliveries", |l| {
        requests_to(l, "/SocQueueTrigger").len() >= 3
    })
    .await;
    let counts: Vec<Value> = requests_to(&l, "/SocQueueTrigger")
        .iter()
        .map(|r| r["json"]["Metadata"]["DeliveryCount"].clone())
        .collect();
    assert_eq!(counts, vec![json!("1"), json!("2"), json!("3")]);
    for _ in 0..100 {
        if !e.host.broker().dead_letters("soc-settings").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dl = e.host.broker().dead_letters("soc-settings");
    assert_eq!(
        dl[0].dead_letter_reason.as_deref(),
        Some("MaxDeliveryCountExceeded")
    );
    e.host.shutdown().await;
}

#[tokio::test]
async fn an_empty_2xx_body_or_a_non_json_content_type_counts_as_a_failed_invocation() {
    for mode in ["empty", "text"] {
        let e = start_in(&repo_root(), &[("FAKE_SB_MODE", mode)], |o| {
            o.max_delivery_count = 2
        })
        .await;
        assert_eq!(sb_send(&e.host, "{}", json!({"MessageId": "x"})).await, 201);
        wait_log(&e.log, "2 deliveries", |l| {
            requests_to(l, "/SocQueueTrigger").len() >= 2
        })
        .await;
        for _ in 0..100 {
            if !e.host.broker().dead_letters("soc-settings").is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            e.host.broker().dead_letters("soc-settings").len(),
            1,
            "mode {mode}"
        );
        e.host.shutdown().await;
    }
}

#[tokio::test]
async fn transient_failures_then_success_complete_the_message_after_redelivery() {
    let e = start(&[("FAKE_SB_FAIL_FIRST", "2")]).await;
    assert_eq!(
        sb_send(&e.host, "{}", json!({"MessageId": "flaky"})).await,
        201
    );
    e.host
        .wait_queue_drained("soc-settings", Duration::from_secs(5))
        .await
        .unwrap();
    let l = log_lines(&e.log);
    assert_eq!(requests_to(&l, "/SocQueueTrigger").len(), 3);
    assert!(e.host.broker().dead_letters("soc-settings").is_empty());
    e.host.shutdown().await;
}

#[tokio::test]
async fn pending_messages_survive_a_devhost_restart() {
    let dir = tmp();
    let state = dir.join("state");
    let log = dir.join("h.jsonl");
    let mk = |mode: &str| {
        let mut o = DevHostOptions::for_tests(repo_root(), &state);
        o.handler = Some(PathBuf::from(env!("CARGO_BIN_EXE_fakehandler")));
        o.timers = false;
        o.overrides
            .push(("FAKE_HANDLER_LOG".into(), log.to_string_lossy().into()));
        o.overrides.push(("FAKE_SB_MODE".into(), mode.into()));
        o
    };
    let h = DevHost::start(mk("fail")).await.unwrap();
    // scheduled 1 h ahead: stays pending across the restart
    let at = devtools::servicebus::format_http_date(Utc::now() + chrono::Duration::hours(1));
    assert_eq!(
        sb_send(
            &h,
            "{}",
            json!({"MessageId": "later", "ScheduledEnqueueTimeUtc": at})
        )
        .await,
        201
    );
    h.shutdown().await;
    let h = DevHost::start(mk("ok")).await.unwrap();
    let q = h.queues();
    assert_eq!(q[0].scheduled.len(), 1);
    assert_eq!(q[0].scheduled[0].message.message_id, "later");
    h.shutdown().await;
}

#[tokio::test]
async fn firing_a_timer_through_the_admin_endpoint_needs_the_master_key_and_sends_timer_info() {
    let e = start(&[]).await;
    e.host
        .wait_handler_ready(Duration::from_secs(10))
        .await
        .unwrap();
    let c = reqwest::Client::new();
    let url = format!("{}/admin/functions/DrainSocTimer", e.host.base_url());
    let r = c
        .post(&url)
        .header("x-functions-key", e.host.function_key())
        .json(&json!({"input": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = c
        .post(&url)
        .header("x-functions-key", e.host.master_key())
        .json(&json!({"input": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let l = wait_log(&e.log, "timer", |l| {
        !requests_to(l, "/DrainSocTimer").is_empty()
    })
    .await;
    let env = &requests_to(&l, "/DrainSocTimer")[0]["json"];
    let fx = fixture("timer-trigger.json");
    same_keys(env, &fx, "envelope");
    same_keys(&env["Data"]["timer"], &fx["Data"]["timer"], "Data.timer");
    same_keys(
        &env["Data"]["timer"]["ScheduleStatus"],
        &fx["Data"]["timer"]["ScheduleStatus"],
        "ScheduleStatus",
    );
    same_keys(&env["Metadata"], &fx["Metadata"], "Metadata");
    assert_eq!(
        env["Data"]["timer"]["ScheduleStatus"]["Last"],
        "0001-01-01T00:00:00+00:00"
    );
    assert_eq!(env["Data"]["timer"]["Schedule"]["AdjustForDST"], true);
    // a second firing reports the first as Last
    e.host.fire("DrainSocTimer").await.unwrap();
    let l = log_lines(&e.log);
    let second = &requests_to(&l, "/DrainSocTimer")[1]["json"];
    assert_ne!(
        second["Data"]["timer"]["ScheduleStatus"]["Last"],
        "0001-01-01T00:00:00+00:00"
    );
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_timer_with_a_sub_minute_schedule_fires_on_its_own_with_a_null_schedule_status() {
    let e = start_in(
        &repo_root(),
        &[("DRAIN_SOC_SCHEDULE", "*/1 * * * * *")],
        |o| o.timers = true,
    )
    .await;
    let l = wait_log(&e.log, "2 timer runs", |l| {
        requests_to(l, "/DrainSocTimer").len() >= 2
    })
    .await;
    let env = &requests_to(&l, "/DrainSocTimer")[0]["json"];
    same_keys(env, &fixture("timer-trigger-no-monitor.json"), "envelope");
    assert!(env["Data"]["timer"]["ScheduleStatus"].is_null());
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_forwarded_http_trigger_needs_a_key_and_reaches_the_handler_with_the_original_path() {
    let e = start(&[]).await;
    let c = reqwest::Client::new();
    let url = e.host.api_url("devices/bat-7/soc");
    assert_eq!(
        c.post(&url)
            .json(&json!({"dod": 20}))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.post(format!("{url}?code=wrong"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let r = c
        .post(format!("{url}?code={}&x=1&x=2", e.host.function_key()))
        .header("User-Agent", "curl/8")
        .json(&json!({"dod": 20}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["x-fake"], "forwarded");
    let r = c
        .get(&url)
        .header("x-functions-key", e.host.function_key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        c.delete(&url)
            .header("x-functions-key", e.host.function_key())
            .send()
            .await
            .unwrap()
            .status(),
        201,
        "SetSocHttp lists no methods: every method reaches the handler"
    );
    assert_eq!(
        c.get(e.host.api_url("nothing/here"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let l = log_lines(&e.log);
    let fwd = requests_to(&l, "/api/devices/bat-7/soc");
    assert_eq!(fwd.len(), 3);
    let h = &fwd[0]["headers"];
    assert!(h["x-azure-functions-invocationid"].is_string());
    assert_eq!(
        h["user-agent"],
        format!(
            "curl/8 Azure-Functions-Host/{}",
            devtools::devhost::HOST_VERSION
        )
    );
    assert_eq!(fwd[0]["json"], json!({"dod": 20}));
    let q = fwd[0]["query"].as_str().unwrap();
    assert!(q.contains("code=") && q.contains("x=1%2C2"), "{q}");
    e.host.shutdown().await;
}

fn envelope_app() -> PathBuf {
    // The repo's real function configs, with forwarding switched off in host.json.
    app_copy(|host, _| host["customHandler"]["enableForwardingHttpRequest"] = json!(false))
}

/// The repo's real app configs in a temporary app root, `tweak`ed (host.json, SetSocHttp's
/// function.json).
fn app_copy(tweak: impl FnOnce(&mut Value, &mut Value)) -> PathBuf {
    let d = tmp().join("app");
    std::fs::create_dir_all(&d).unwrap();
    let root = repo_root();
    let read = |p: PathBuf| -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let mut host = read(root.join("host.json"));
    let mut http = read(root.join("SetSocHttp").join("function.json"));
    tweak(&mut host, &mut http);
    std::fs::write(d.join("host.json"), host.to_string()).unwrap();
    std::fs::copy(
        root.join("local.settings.json"),
        d.join("local.settings.json"),
    )
    .unwrap();
    for f in devtools::function_folders(&root).unwrap() {
        std::fs::create_dir_all(d.join(&f)).unwrap();
        std::fs::copy(
            root.join(&f).join("function.json"),
            d.join(&f).join("function.json"),
        )
        .unwrap();
    }
    std::fs::write(d.join("SetSocHttp").join("function.json"), http.to_string()).unwrap();
    d
}

#[tokio::test]
async fn a_method_the_function_does_not_list_is_405_and_never_reaches_the_handler() {
    let app = app_copy(|_, http| http["bindings"][0]["methods"] = json!(["get", "post"]));
    let e = start_in(&app, &[], |_| {}).await;
    let url = e.host.api_url("devices/bat-7/soc");
    let r = reqwest::Client::new()
        .delete(&url)
        .header("x-functions-key", e.host.function_key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.bytes().await.unwrap().is_empty());
    let l = log_lines(&e.log);
    assert!(requests_to(&l, "/api/devices/bat-7/soc").is_empty());
    e.host.shutdown().await;
}

#[tokio::test]
async fn an_envelope_http_trigger_sends_data_req_and_metadata_like_the_fixture_and_maps_outputs_res(
) {
    let app = envelope_app();
    let e = start_in(&app, &[], |_| {}).await;
    let r = reqwest::Client::new()
        .post(format!(
            "{}?tag=a&tag=b",
            e.host.api_url("devices/bat-9/soc")
        ))
        .header("x-functions-key", e.host.function_key())
        .json(&json!({"dod": 20, "flag": true, "nested": {"a": 1}, "list": [1]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["x-fake"], "yes");
    assert_eq!(r.headers()["content-type"], "application/json");
    let body = r.text().await.unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"device": "\"bat-9\""})
    );
    assert!(body.contains('\n'), "object bodies are written indented");
    let l = log_lines(&e.log);
    let env = &requests_to(&l, "/SetSocHttp")[0]["json"];
    let fx = fixture("http-trigger-not-forwarded.json");
    same_keys(&env["Data"]["req"], &fx["Data"]["req"], "Data.req");
    // keyed request: AuthenticationType is a string here, null in the anonymous fixture
    let mut ids: Vec<&String> = env["Data"]["req"]["Identities"][0]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    let mut fids: Vec<&String> = fx["Data"]["req"]["Identities"][0]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    ids.sort();
    fids.sort();
    assert_eq!(ids, fids);
    let req = &env["Data"]["req"];
    assert_eq!(req["Method"], "POST");
    assert!(req["Url"]
        .as_str()
        .unwrap()
        .contains("/api/devices/bat-9/soc?tag=a&tag=b"));
    assert_eq!(req["Query"]["tag"], "a,b");
    assert!(req["Headers"]["Content-Type"].is_array());
    // The route's catch-all without a value is null, as the host sends it (§3.2).
    assert_eq!(req["Params"], json!({"deviceId": "bat-9", "rest": null}));
    assert_eq!(
        req["Identities"][0]["AuthenticationType"],
        "WebJobsAuthLevel"
    );
    let md = &env["Metadata"];
    assert_eq!(md["dod"], "\"20\"");
    assert_eq!(md["flag"], "\"True\"");
    assert_eq!(md["nested"], json!({"a": 1}));
    assert!(md.get("list").is_none());
    assert_eq!(md["tag"], "\"b\"");
    assert_eq!(md["deviceId"], "\"bat-9\"");
    assert_eq!(md["Query"]["tag"], "b");
    assert!(md["Headers"]["Content-Type"].is_string());
    assert_eq!(md["sys"]["MethodName"], "SetSocHttp");
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_crashing_handler_is_restarted_twice_and_then_devhost_gives_up() {
    let e = start(&[("FAKE_CRASH", "1")]).await;
    for _ in 0..200 {
        if e.host.handler_failed() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(e.host.handler_failed());
    assert_eq!(e.host.handler_restarts(), 2);
    let starts = log_lines(&e.log)
        .iter()
        .filter(|v| v["kind"] == "startup")
        .count();
    assert_eq!(starts, 3);
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_killed_handler_is_restarted_and_keeps_serving() {
    let e = start(&[]).await;
    e.host
        .wait_handler_ready(Duration::from_secs(10))
        .await
        .unwrap();
    let pid = e.host.handler_pid().unwrap();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    for _ in 0..200 {
        if e.host.handler_restarts() == 1 && e.host.handler_pid().is_some_and(|p| p != pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(e.host.handler_restarts(), 1);
    e.host.fire("DrainSocTimer").await.unwrap();
    e.host.shutdown().await;
}

#[tokio::test]
async fn the_queue_page_lists_active_scheduled_and_dead_lettered_messages() {
    let e = start_in(&repo_root(), &[("FAKE_SB_MODE", "fail")], |o| {
        o.max_delivery_count = 1
    })
    .await;
    let at = devtools::servicebus::format_http_date(Utc::now() + chrono::Duration::hours(1));
    sb_send(
        &e.host,
        r#"{"a":1}"#,
        json!({"MessageId": "s", "ScheduledEnqueueTimeUtc": at}),
    )
    .await;
    sb_send(&e.host, r#"{"a":2}"#, json!({"MessageId": "d"})).await;
    for _ in 0..100 {
        if !e.host.broker().dead_letters("soc-settings").is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page: Value = reqwest::get(format!("{}/_devhost/queues", e.host.base_url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let q = &page[0];
    assert_eq!(q["name"], "soc-settings");
    assert_eq!(q["scheduled"][0]["messageId"], "s");
    assert_eq!(q["deadLettered"][0]["messageId"], "d");
    assert_eq!(
        q["deadLettered"][0]["deadLetterReason"],
        "MaxDeliveryCountExceeded"
    );
    assert_eq!(q["deadLettered"][0]["bodyText"], r#"{"a":2}"#);
    e.host.shutdown().await;
}

#[tokio::test]
async fn a_handler_connection_that_fails_before_answering_is_a_logged_502_without_internal_urls() {
    let e = start(&[("FAKE_HTTP_EXIT", "1")]).await;
    e.host
        .wait_handler_ready(Duration::from_secs(10))
        .await
        .unwrap();

    let r = reqwest::Client::new()
        .post(e.host.api_url("devices/bat-7/soc"))
        .header("x-functions-key", e.host.function_key())
        .json(&json!({"dod": 20}))
        .send()
        .await
        .unwrap();

    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let body = r.text().await.unwrap();
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["status"], 502, "{body}");
    assert!(
        !body.contains("127.0.0.1") && !body.contains("http://"),
        "{body}"
    );
    let log = std::fs::read_to_string(e.log.parent().unwrap().join("state/handler.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("answered 502"))
        .unwrap_or_else(|| panic!("no log line for the 502:\n{log}"));
    assert!(line.contains("POST /api/devices/bat-7/soc"), "{line}");
    assert!(
        !line.contains("127.0.0.1") && !line.contains("http://"),
        "{line}"
    );
    e.host.shutdown().await;
}
