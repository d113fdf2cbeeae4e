//! `TestApp`: the real `handler` binary on a free port, wired to
//! - a real Azurite (shared by the tests of this binary; one table per test),
//! - devicesim (the device-cloud stand-in) on a free loopback port,
//! - the Service Bus REST stand-in on a free loopback port, behind a switch that
//!   turns it into an outage (503) on demand.
//!
//! With [`Access::ManagedIdentity`] the handler gets no key at all: it reaches storage
//! and Service Bus with tokens from the managed-identity stand-in
//! (`devtools::identity`, at `IDENTITY_ENDPOINT`), Azurite runs over HTTPS with
//! `--oauth basic` (a certificate made here, trusted through `SOC_EXTRA_CA_CERTS`), and
//! the Service Bus stand-in verifies the bearer tokens.
//!
//! The test plays the Functions host step by step: it POSTs HTTP requests the way
//! the host forwards them, takes messages from the broker with peek-lock and POSTs
//! the exact Service Bus trigger envelope, and fires the timer with the real
//! TimerInfo payload. Nothing runs on its own, so every sequence is deterministic.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use devtools::devhost::payloads::{servicebus_envelope, timer_envelope};
use devtools::devicesim::{DeviceConfig, DeviceSim, PutRecord};
use devtools::identity::{IdentityConfig, ManagedIdentity};
use devtools::servicebus::{Broker, BrokerConfig, Delivery, StoredMessage};
use serde_json::Value;

use testkit::azurite::Azurite;
use testkit::free_port;

pub const QUEUE: &str = "soc-settings";
const SB_KEY_NAME: &str = "RootManageSharedAccessKey";
const SB_KEY: &str = "aW50ZWdyYXRpb24tdGVzdC1rZXk=";
const DEVICE_KEY: &str = devtools::devicesim::DEFAULT_API_KEY;

pub struct Options {
    pub ttl_seconds: u64,
    pub recheck_initial_seconds: u64,
    pub device_timeout_ms: u64,
    pub access: Access,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ttl_seconds: 3600,
            recheck_initial_seconds: 60,
            device_timeout_ms: 1500,
            access: Access::ConnectionStrings,
        }
    }
}

/// How the handler reaches storage and Service Bus.
pub enum Access {
    /// Azurite's and the stand-in's connection strings (shared key, SAS), as locally.
    ConnectionStrings,
    /// The app's managed identity, as in Azure: tokens of `token_lifetime` from the
    /// identity stand-in, which the handler must call with `identity_header`. With
    /// `client_id` the app has only that user-assigned identity (as the Bicep deploys it) and
    /// the handler is given it as `AzureWebJobsStorage__clientId`/`ServiceBusConnection__clientId`;
    /// without, only the system-assigned one. `expires_on_as_number`: the stand-in sends
    /// `expires_on` as a number.
    ManagedIdentity {
        token_lifetime: Duration,
        identity_header: &'static str,
        client_id: Option<&'static str>,
        expires_on_as_number: bool,
    },
}

/// A `{"minSoc": v}` request body.
pub fn minsoc(v: i64) -> String {
    format!(r#"{{"minSoc":{v}}}"#)
}

/// The `IDENTITY_HEADER` value the identity stand-in expects.
pub const IDENTITY_HEADER: &str = "integration-identity-header";
const IDENTITY_SIGNING_KEY: &[u8] = b"integration-identity-signing-key";

pub struct TestApp {
    pub url: String,
    pub http: reqwest::Client,
    pub sim: DeviceSim,
    pub broker: Broker,
    broker_down: Arc<AtomicBool>,
    child: Child,
    azurite: Arc<Azurite>,
    /// The managed-identity stand-in, with [`Access::ManagedIdentity`].
    pub identity: Option<ManagedIdentity>,
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl TestApp {
    pub async fn start() -> TestApp {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> TestApp {
        let sim = DeviceSim::start("127.0.0.1:0".parse().unwrap())
            .await
            .expect("devicesim");
        let dir = std::env::temp_dir().join(format!("soc-it-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("test directory");
        let mut config = BrokerConfig::new(dir.join("servicebus"), SB_KEY_NAME, SB_KEY);
        config.queues = vec![QUEUE.to_string()];
        config.lock_duration = Duration::from_secs(30);
        if matches!(opts.access, Access::ManagedIdentity { .. }) {
            config.bearer_key = Some(IDENTITY_SIGNING_KEY.to_vec());
        }
        let broker = Broker::open(config).expect("broker");
        let broker_down = Arc::new(AtomicBool::new(false));
        let sb_addr = serve_switchable(&broker, broker_down.clone()).await;

        let table = format!("it{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let port = free_port();
        let (azurite, identity, access_env) = match opts.access {
            Access::ConnectionStrings => {
                let azurite = Azurite::shared();
                let env = vec![
                    ("AzureWebJobsStorage", azurite.connection_string()),
                    (
                        "ServiceBusConnection",
                        format!("Endpoint=sb://{sb_addr};SharedAccessKeyName={SB_KEY_NAME};SharedAccessKey={SB_KEY};UseDevelopmentEmulator=true"),
                    ),
                ];
                (azurite, None, env)
            }
            Access::ManagedIdentity {
                token_lifetime,
                identity_header,
                client_id,
                expires_on_as_number,
            } => {
                let (cert, key) = self_signed_loopback_certificate(&dir);
                let azurite = Arc::new(Azurite::start_oauth(&cert, &key));
                let mut config = IdentityConfig::new(IDENTITY_HEADER, IDENTITY_SIGNING_KEY);
                config.token_lifetime = token_lifetime;
                config.client_id = client_id.map(str::to_string);
                config.expires_on_as_number = expires_on_as_number;
                let identity = ManagedIdentity::start("127.0.0.1:0".parse().unwrap(), config)
                    .await
                    .expect("managed identity stand-in");
                let mut env = vec![
                    (
                        "AzureWebJobsStorage__credential",
                        "managedidentity".to_string(),
                    ),
                    (
                        "AzureWebJobsStorage__tableServiceUri",
                        azurite.table_endpoint(),
                    ),
                    (
                        "ServiceBusConnection__credential",
                        "managedidentity".to_string(),
                    ),
                    (
                        "ServiceBusConnection__fullyQualifiedNamespace",
                        sb_addr.to_string(),
                    ),
                    ("IDENTITY_ENDPOINT", identity.endpoint()),
                    ("IDENTITY_HEADER", identity_header.to_string()),
                    ("SOC_EXTRA_CA_CERTS", cert.display().to_string()),
                ];
                if let Some(id) = client_id {
                    env.push(("AzureWebJobsStorage__clientId", id.to_string()));
                    env.push(("ServiceBusConnection__clientId", id.to_string()));
                }
                (azurite, Some(identity), env)
            }
        };
        let env: Vec<(String, String)> = [
            ("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string()),
            ("SOC_QUEUE_NAME", QUEUE.to_string()),
            ("SOC_STATE_TABLE", table),
            ("DEVICE_API_BASE_URL", sim.base_url()),
            ("DEVICE_API_KEY", DEVICE_KEY.to_string()),
            ("DEVICE_API_TIMEOUT_MS", opts.device_timeout_ms.to_string()),
            ("SOC_REQUEST_TTL_SECONDS", opts.ttl_seconds.to_string()),
            (
                "SOC_RECHECK_INITIAL_SECONDS",
                opts.recheck_initial_seconds.to_string(),
            ),
            (
                "SOC_RECHECK_MAX_SECONDS",
                (opts.recheck_initial_seconds * 8).to_string(),
            ),
            ("DRAIN_SOC_CONCURRENCY", "8".to_string()),
        ]
        .into_iter()
        .chain(access_env)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let child = spawn_handler(&env);
        let app = TestApp {
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            sim,
            broker,
            broker_down,
            child,
            azurite,
            identity,
            dir,
            env,
        };
        app.wait_ready().await;
        app
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.http.get(format!("{}/", self.url)).send().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("handler did not answer GET / within 10 s");
    }

    /// Overwrites fields of the device's ledger row behind the handler's back, as a
    /// writer with another schema would (e.g. `{"MinSoc": 250}`).
    pub async fn corrupt_ledger_row(&self, device: &str, properties: Value) {
        let table = self
            .env
            .iter()
            .find(|(k, _)| k == "SOC_STATE_TABLE")
            .map(|(_, v)| v.as_str())
            .expect("SOC_STATE_TABLE is set");
        self.azurite
            .merge_entity(table, device, "desired", properties)
            .await;
    }

    /// Kills the handler process (as a crash would) and starts a new one with the same settings.
    pub async fn restart_handler(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_handler(&self.env);
        self.wait_ready().await;
    }

    pub fn kill_handler(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    // -------------------------------------------------------------- devices

    pub fn device(&self, id: &str, online: bool) {
        self.sim.state().add_device(id, online);
    }

    pub fn set_online(&self, id: &str, online: bool) {
        assert!(
            self.sim.state().set_online(id, online),
            "unknown sim device {id}"
        );
    }

    pub fn configure(&self, id: &str, config: DeviceConfig) {
        assert!(self.sim.state().configure(id, config));
    }

    pub fn history(&self, id: &str) -> Vec<PutRecord> {
        self.sim.state().history_for(id)
    }

    /// The values the device actually took, in order.
    pub fn applied_values(&self, id: &str) -> Vec<i64> {
        self.history(id)
            .into_iter()
            .filter(|p| p.outcome == "applied")
            .filter_map(|p| p.min_soc)
            .collect()
    }

    pub fn device_value(&self, id: &str) -> Option<i64> {
        self.sim.state().device(id).and_then(|d| d.min_soc)
    }

    // -------------------------------------------------------------- HTTP (forwarded, as host.json says)

    pub async fn post_soc(
        &self,
        device: &str,
        body: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.post_soc_with_key(device, body, None).await
    }

    pub async fn post_soc_with_key(
        &self,
        device: &str,
        body: &str,
        key: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .post(format!(
                "{}/api/devices/{device}/soc?code=local-key",
                self.url
            ))
            .header("content-type", "application/json")
            .header(
                "x-azure-functions-invocationid",
                uuid::Uuid::new_v4().to_string(),
            )
            .body(body.to_string());
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let res = req.send().await.expect("POST");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let body = res.json().await.unwrap_or(Value::Null);
        (status, headers, body)
    }

    pub async fn get_soc(&self, device: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}/api/devices/{device}/soc", self.url))
            .send()
            .await
            .expect("GET");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// GET of a path the API answered with (a `Location`), as the host forwards it.
    pub async fn get_path(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("GET");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    // -------------------------------------------------------------- Service Bus

    pub fn set_broker_down(&self, down: bool) {
        self.broker_down.store(down, Ordering::SeqCst);
    }

    /// Every message the broker holds (active, scheduled or dead-lettered).
    pub fn messages(&self) -> Vec<StoredMessage> {
        self.broker.messages(QUEUE)
    }

    pub fn message_body(m: &StoredMessage) -> Value {
        serde_json::from_slice(&m.body()).expect("message body is JSON")
    }

    /// Locks `m` as the broker would for a delivery, even if it is scheduled for later
    /// (the test stands in for time passing).
    pub fn lock(&self, m: &StoredMessage) -> Delivery {
        let mut message = m.clone();
        message.delivery_count += 1;
        Delivery {
            queue: QUEUE.to_string(),
            message,
            lock_token: uuid::Uuid::new_v4(),
            locked_until: Utc::now(),
        }
    }

    /// POSTs the Service Bus trigger envelope for `d` and returns the status and body.
    pub async fn invoke_queue(&self, d: &Delivery) -> (u16, Value) {
        let envelope = servicebus_envelope(
            "SocQueueTrigger",
            "msg",
            Some("binary"),
            d,
            "127.0.0.1",
            "it",
            Utc::now(),
        )
        .to_value();
        let res = self
            .http
            .post(format!("{}/SocQueueTrigger", self.url))
            .json(&envelope)
            .send()
            .await
            .expect("invoke");
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            assert!(
                !text.is_empty() && body.is_object(),
                "a 2xx invocation answer must be a non-empty JSON object: {text:?}"
            );
        }
        (status, body)
    }

    /// Delivers every message the broker holds, in sequence order, as the host would once
    /// their time has come; completes on 2xx and abandons otherwise. Returns the statuses.
    pub async fn deliver_all(&self) -> Vec<u16> {
        let mut statuses = Vec::new();
        for m in self.messages().into_iter().filter(|m| !m.dead_lettered) {
            let (status, _) = self.invoke_queue(&self.lock(&m)).await;
            statuses.push(status);
            if (200..300).contains(&status) {
                self.broker_delete(&m);
            }
        }
        statuses
    }

    /// Removes a message from the broker (completed by the host, or lost).
    pub fn broker_delete(&self, m: &StoredMessage) {
        self.broker.remove(QUEUE, m.sequence_number);
    }

    // -------------------------------------------------------------- timer

    pub async fn fire_timer(&self) -> (u16, Value) {
        let envelope = timer_envelope("DrainSocTimer", "timer", None, false, Utc::now()).to_value();
        let res = self
            .http
            .post(format!("{}/DrainSocTimer", self.url))
            .json(&envelope)
            .send()
            .await
            .expect("timer");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed certificate for `127.0.0.1` (IP SAN) and its key, as PEM files in `dir`.
fn self_signed_loopback_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("a self-signed certificate");
    let cert = dir.join("azurite-cert.pem");
    let key = dir.join("azurite-key.pem");
    std::fs::write(&cert, certified.cert.pem()).expect("write certificate");
    std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
    (cert, key)
}

fn spawn_handler(env: &[(String, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_handler"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let quiet = std::env::var_os("IT_HANDLER_LOGS").is_none();
    if quiet {
        cmd.stdout(Stdio::null());
    }
    cmd.stderr(Stdio::inherit()).spawn().expect("spawn handler")
}

/// Serves the broker's REST endpoint; while `down` is set every request gets 503, as
/// an unavailable namespace would answer.
async fn serve_switchable(broker: &Broker, down: Arc<AtomicBool>) -> SocketAddr {
    let app = broker
        .router()
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            let down = down.clone();
            async move {
                if down.load(Ordering::SeqCst) {
                    return (
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "namespace unavailable",
                    )
                        .into_response();
                }
                let res: Response = next.run(req).await;
                res
            }
        }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}
