//! `App`: the whole app as a developer runs it, for one test:
//! devhost (the Functions host stand-in with its Service Bus stand-in, in-process) running the
//! real `handler` binary, devicesim (in-process) as the device cloud, and a real Azurite (shared
//! by the tests of this binary; one table per test). Free loopback ports and a fresh data
//! directory per test, so tests run in parallel. Everything runs on its own, with real timing:
//! the test only acts as the mobile app (HTTP), as the battery (devicesim control) and as an
//! operator (fire the timer, restart devhost, kill the handler).
//!
//! Cleanup: the handler and devhost's tasks belong to the test's runtime and die with it (the
//! handler is spawned with kill-on-drop), also when a test panics; the data directory is removed
//! on success and kept (path printed, with the handler log) on failure.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devtools::devhost::{DevHost, DevHostOptions};
use devtools::devicesim::{DeviceSim, PutRecord};
use devtools::servicebus::StoredMessage;
use serde_json::Value;

use testkit::azurite::Azurite;

pub const QUEUE: &str = "soc-settings";

/// The repository root: the function app (host.json, */function.json, local.settings.json).
pub fn app_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// How one test wants the app: short timings by default.
pub struct Setup {
    settings: Vec<(String, String)>,
    timers: bool,
    lock_duration: Duration,
    function_key: Option<String>,
    master_key: Option<String>,
    events: bool,
    saved: bool,
}

impl Setup {
    /// Re-check after 1 s (doubling up to 4 s), device calls time out after 1 s, requests live
    /// an hour, the timer sweep runs every 3 s, locks last 10 s.
    pub fn new() -> Setup {
        Setup {
            settings: [
                ("SOC_RECHECK_INITIAL_SECONDS", "1"),
                ("SOC_RECHECK_MAX_SECONDS", "4"),
                ("SOC_REQUEST_TTL_SECONDS", "3600"),
                ("DEVICE_API_TIMEOUT_MS", "1000"),
                ("DRAIN_SOC_SCHEDULE", "*/3 * * * * *"),
                ("DRAIN_SOC_CONCURRENCY", "16"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            timers: true,
            lock_duration: Duration::from_secs(10),
            function_key: None,
            master_key: None,
            events: false,
            saved: false,
        }
    }

    /// Everything on disk as `scripts/dev` keeps it: devhost starts its own Azurite with its
    /// tables in the data directory, devicesim saves its batteries there; both survive
    /// [`App::restart_platform`].
    pub fn saved(mut self) -> Setup {
        self.saved = true;
        self
    }

    /// devicesim sends its connection events to devhost's `DeviceEventsHttp` (with the
    /// function key), as `scripts/dev` runs it.
    pub fn events(mut self) -> Setup {
        self.events = true;
        self
    }

    /// An app setting (wins over local.settings.json and the defaults above).
    pub fn set(mut self, name: &str, value: &str) -> Setup {
        self.settings.retain(|(k, _)| k != name);
        self.settings.push((name.to_string(), value.to_string()));
        self
    }

    /// Re-checks 10 minutes away (at most 30): messages stay scheduled while the test looks.
    pub fn rechecks_far_away(self) -> Setup {
        self.set("SOC_RECHECK_INITIAL_SECONDS", "600")
            .set("SOC_RECHECK_MAX_SECONDS", "1800")
    }

    /// Without the timer schedule (the test fires DrainSocTimer itself, if at all).
    pub fn no_timers(mut self) -> Setup {
        self.timers = false;
        self
    }

    pub fn lock_duration(mut self, d: Duration) -> Setup {
        self.lock_duration = d;
        self
    }

    pub fn keys(mut self, function_key: &str, master_key: &str) -> Setup {
        self.function_key = Some(function_key.to_string());
        self.master_key = Some(master_key.to_string());
        self
    }

    pub async fn start(self) -> App {
        let azurite = Azurite::shared();
        let dir = std::env::temp_dir().join(format!("soc-e2e-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("data dir");
        let sim_state = self.saved.then(|| dir.join("devicesim.json"));
        let sim = start_sim(None, sim_state.as_deref()).await;
        let table = format!("e2e{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut opts = DevHostOptions::for_tests(app_root(), dir.join("devhost"));
        opts.handler = Some(PathBuf::from(env!("CARGO_BIN_EXE_handler")));
        opts.timers = self.timers;
        opts.lock_duration = Some(self.lock_duration);
        opts.function_key = self.function_key;
        opts.master_key = self.master_key;
        let storage = if self.saved {
            // devhost starts Azurite for a loopback TableEndpoint nobody listens on.
            opts.start_azurite = true;
            let port = testkit::free_port();
            format!(
                "DefaultEndpointsProtocol=http;AccountName={a};AccountKey={k};TableEndpoint=http://127.0.0.1:{port}/{a};",
                a = devtools::azurite::ACCOUNT,
                k = devtools::azurite::ACCOUNT_KEY
            )
        } else {
            azurite.connection_string()
        };
        opts.overrides = vec![
            ("AzureWebJobsStorage".into(), storage),
            ("SOC_STATE_TABLE".into(), table),
            ("DEVICE_API_BASE_URL".into(), sim.base_url()),
        ];
        opts.overrides.extend(self.settings);
        let mut app = App {
            host: None,
            sim,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            opts,
            dir,
            events: self.events,
            sim_state,
            _azurite: azurite,
        };
        app.start_devhost().await;
        app
    }
}

pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Resp {
    /// The answer as the tests look at it (a body that is not JSON reads as `null`).
    async fn read(res: reqwest::Response) -> Resp {
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.json().await.unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            body,
        }
    }
}

pub struct App {
    host: Option<DevHost>,
    pub sim: DeviceSim,
    pub http: reqwest::Client,
    opts: DevHostOptions,
    dir: PathBuf,
    /// devicesim sends connection events to devhost (see [`Setup::events`]).
    events: bool,
    /// devicesim's state file ([`Setup::saved`]).
    sim_state: Option<PathBuf>,
    _azurite: Arc<Azurite>,
}

async fn start_sim(
    addr: Option<std::net::SocketAddr>,
    state: Option<&std::path::Path>,
) -> DeviceSim {
    let addr = addr.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
    match state {
        Some(file) => DeviceSim::start_saved(
            addr,
            Some(devtools::devicesim::DEFAULT_API_KEY.to_string()),
            1,
            file,
        )
        .await
        .expect("devicesim"),
        None => DeviceSim::start(addr).await.expect("devicesim"),
    }
}

impl App {
    pub fn host(&self) -> &DevHost {
        self.host.as_ref().expect("devhost is running")
    }

    async fn start_devhost(&mut self) {
        let host = DevHost::start(self.opts.clone())
            .await
            .expect("devhost starts");
        host.wait_handler_ready(Duration::from_secs(30))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", self.handler_log_tail()));
        if self.events {
            self.sim.emit_events_to(
                &host.api_url("device-events"),
                Some(host.function_key().to_string()),
            );
        }
        self.host = Some(host);
    }

    /// Stops devhost (the handler, the Service Bus stand-in, the timers) like Ctrl-C would.
    pub async fn stop_devhost(&mut self) {
        if let Some(h) = self.host.take() {
            h.shutdown().await;
        }
    }

    /// Stops the whole platform at once, as Ctrl-C in `scripts/dev` does (devhost: the handler,
    /// the Service Bus stand-in, Azurite; devicesim), and starts it again on the same data,
    /// ports and keys.
    pub async fn restart_platform(&mut self) {
        self.stop_devhost().await;
        // devicesim comes back on its address (DEVICE_API_BASE_URL); a throwaway one holds
        // the field meanwhile.
        let addr = self.sim.addr();
        let old = std::mem::replace(&mut self.sim, start_sim(None, None).await);
        old.shutdown().await;
        let again = start_sim(Some(addr), self.sim_state.as_deref()).await;
        std::mem::replace(&mut self.sim, again).shutdown().await;
        self.start_devhost().await;
    }

    /// devhost's queues page (`/_devhost/queues`) as `accept` asks for it (JSON or HTML).
    pub async fn queues_page(&self, accept: &str) -> String {
        self.http
            .get(format!("{}/_devhost/queues", self.host().base_url()))
            .header("accept", accept)
            .send()
            .await
            .expect("the queues page")
            .text()
            .await
            .expect("the queues page's body")
    }

    /// A new devhost on the same data directory and table.
    pub async fn restart_devhost(&mut self) {
        self.stop_devhost().await;
        self.start_devhost().await;
    }

    pub fn data_dir(&self) -> PathBuf {
        self.opts.data_dir.clone().expect("data dir")
    }

    pub fn handler_log(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("handler.log")).unwrap_or_default()
    }

    pub fn handler_log_tail(&self) -> String {
        let log = self.handler_log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- last handler/invocation log lines ({}):\n{}",
            self.data_dir().join("handler.log").display(),
            lines[from..].join("\n")
        )
    }

    // ------------------------------------------------------------------ the mobile app

    fn soc_url(&self, device: &str) -> String {
        self.host().api_url(&format!("devices/{device}/soc"))
    }

    pub async fn post(&self, device: &str, body: &str) -> Resp {
        self.post_with_key(device, body, None).await
    }

    pub async fn post_with_key(&self, device: &str, body: &str, key: Option<&str>) -> Resp {
        let mut req = self
            .http
            .post(self.soc_url(device))
            .header("x-functions-key", self.host().function_key())
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        Resp::read(req.send().await.expect("POST through devhost")).await
    }

    pub async fn get(&self, device: &str) -> (u16, Value) {
        let res = self
            .http
            .get(self.soc_url(device))
            .header("x-functions-key", self.host().function_key())
            .send()
            .await
            .expect("GET through devhost");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// GET of a path the API answered with (a `Location`), with the function key.
    pub async fn get_path(&self, path: &str) -> (u16, Value) {
        let r = self.call_path(reqwest::Method::GET, path).await;
        (r.status, r.body)
    }

    /// DELETE of a request's path (a `Location`): cancels it, with the function key.
    pub async fn delete_path(&self, path: &str) -> Resp {
        self.call_path(reqwest::Method::DELETE, path).await
    }

    async fn call_path(&self, method: reqwest::Method, path: &str) -> Resp {
        let res = self
            .http
            .request(method.clone(), format!("{}{path}", self.host().base_url()))
            .header("x-functions-key", self.host().function_key())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} through devhost: {e}"));
        Resp::read(res).await
    }

    /// Waits until the request at `path` (a `Location`) shows `status`.
    pub async fn wait_request_status(&self, path: &str, status: &str, timeout: Duration) -> Value {
        self.eventually(&format!("{path} to be {status}"), timeout, || async {
            let (code, body) = self.get_path(path).await;
            (code == 200 && body["status"] == status).then_some(body)
        })
        .await
    }

    /// Waits until the device's record has `status` (and, if given, `request_id`).
    pub async fn wait_status(
        &self,
        device: &str,
        status: &str,
        request_id: Option<&str>,
        timeout: Duration,
    ) -> Value {
        let what = format!("{device} to be {status} (request {request_id:?})");
        let last = std::sync::Mutex::new(Value::Null);
        let found = eventually_opt(timeout, || async {
            let (code, body) = self.get(device).await;
            let ok = code == 200
                && body["status"] == status
                && request_id.map_or(true, |r| body["requestId"] == r);
            *last.lock().unwrap() = body.clone();
            ok.then_some(body)
        })
        .await;
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {timeout:?} waiting for {what}; last GET: {}\nhistory: {:?}\n{}",
                last.lock().unwrap(),
                self.history(device),
                self.handler_log_tail()
            )
        })
    }

    /// `GET /_devhost/events` with `query` (`subject`, `subjectBeginsWith`): what the
    /// Event Grid topic stand-in received, oldest first.
    pub async fn topic_events(&self, query: &[(&str, &str)]) -> Vec<Value> {
        let res = self
            .http
            .get(format!("{}/_devhost/events", self.host().base_url()))
            .query(query)
            .send()
            .await
            .expect("GET /_devhost/events");
        assert_eq!(res.status(), 200);
        let list: Value = res.json().await.expect("the events as JSON");
        list.as_array().expect("a JSON array").clone()
    }

    /// Waits until `check` returns `Some`, failing with `what` and the logs.
    pub async fn eventually<T, F, Fut>(&self, what: &str, timeout: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match eventually_opt(timeout, check).await {
            Some(v) => v,
            None => panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.handler_log_tail()
            ),
        }
    }

    // ------------------------------------------------------------------ the batteries

    pub fn history(&self, device: &str) -> Vec<PutRecord> {
        self.sim.history_for(device)
    }

    /// The values the device actually took (applied PUTs, including an apply whose answer got
    /// lost), in order.
    pub fn applied_values(&self, device: &str) -> Vec<i64> {
        self.history(device)
            .into_iter()
            .filter(|p| p.outcome == "applied" || p.outcome == "timeout-after-apply")
            .filter_map(|p| p.min_soc)
            .collect()
    }

    pub fn device_value(&self, device: &str) -> Option<i64> {
        self.sim.device(device).and_then(|d| d.min_soc)
    }

    pub fn apply_count(&self, device: &str) -> u64 {
        self.sim.device(device).map(|d| d.apply_count).unwrap_or(0)
    }

    // ------------------------------------------------------------------ Service Bus / timer

    pub fn messages(&self) -> Vec<StoredMessage> {
        self.host().broker().messages(QUEUE)
    }

    pub fn dead_letters(&self) -> Vec<StoredMessage> {
        self.host().broker().dead_letters(QUEUE)
    }

    pub fn body_of(m: &StoredMessage) -> Value {
        serde_json::from_slice(&m.body()).expect("message body is JSON")
    }

    pub async fn wait_drained(&self, timeout: Duration) {
        if let Err(e) = self.host().wait_queue_drained(QUEUE, timeout).await {
            panic!(
                "{e}: {:#?}\n{}",
                self.messages()
                    .iter()
                    .map(|m| (
                        m.sequence_number,
                        m.enqueued_time,
                        m.delivery_count,
                        Self::body_of(m)
                    ))
                    .collect::<Vec<_>>(),
                self.handler_log_tail()
            );
        }
    }

    /// Runs DrainSocTimer now and waits for its result (what the admin endpoint does).
    pub async fn fire_timer(&self) -> Value {
        self.host()
            .fire("DrainSocTimer")
            .await
            .unwrap_or_else(|e| panic!("DrainSocTimer failed: {e:#}\n{}", self.handler_log_tail()))
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "e2e: kept {} for inspection\n{}",
                self.dir.display(),
                self.handler_log_tail()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn eventually_opt<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
