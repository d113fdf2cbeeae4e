//! devhost: a local stand-in for the Azure Functions host running a custom handler.
//! See `devtools/README.md` and the §9 checklist of `docs/custom-handler-protocol.md`
//! (all `§` numbers refer to that document).

pub mod config;
pub mod cron;
pub mod events;
mod front;
pub mod json;
pub mod page;
pub mod payloads;
pub mod queues;
pub mod supervisor;

pub use front::match_route;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::Utc;
use serde_json::Value;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::azurite::{self, AzuriteTable, Data};
use crate::eventgrid::Topic;
use crate::servicebus::{Broker, BrokerConfig, ConnectionString, QueueSnapshot, ServerHandle};
use config::{AppConfig, Trigger};
use json::J;
use payloads::TimerStatus;
use supervisor::{HandlerSpec, HandlerState, OutputSink, Supervisor};

/// The host version devhost claims in headers.
pub const HOST_VERSION: &str = "4.1037.0.0";
/// The app setting naming the Event Grid topic the app publishes its notifications to; a
/// loopback `http` URL makes devhost serve its topic stand-in there.
pub const NOTIFY_ENDPOINT_SETTING: &str = "SOC_NOTIFY_TOPIC_ENDPOINT";
/// The topic's access key (`aeg-sas-key`); local runs only.
pub const NOTIFY_KEY_SETTING: &str = "SOC_NOTIFY_TOPIC_KEY";

/// How to start devhost.
#[derive(Clone, Debug)]
pub struct DevHostOptions {
    /// Function app root (host.json, */function.json, local.settings.json, handler).
    pub app_root: PathBuf,
    /// Front-end port for HTTP triggers (7071; 0 = free port).
    pub port: u16,
    /// Service Bus stand-in port: `None` = the port in `ServiceBusConnection`; `Some(0)` = free.
    pub servicebus_port: Option<u16>,
    /// Event Grid topic stand-in port: `None` = the port in `SOC_NOTIFY_TOPIC_ENDPOINT`;
    /// `Some(0)` = free.
    pub eventgrid_port: Option<u16>,
    /// App setting overrides (win over local.settings.json).
    pub overrides: Vec<(String, String)>,
    /// Durable state (default `{app_root}/.devhost`).
    pub data_dir: Option<PathBuf>,
    /// Start Azurite for `UseDevelopmentStorage=true` / loopback TableEndpoint when nothing listens.
    pub start_azurite: bool,
    pub max_delivery_count: u32,
    /// Default: host.json `maxAutoLockRenewalDuration` (the listener renews the lock that long).
    pub lock_duration: Option<Duration>,
    pub init_timeout: Duration,
    /// Override `defaultExecutablePath` (e.g. a test binary).
    pub handler: Option<PathBuf>,
    pub function_key: Option<String>,
    pub master_key: Option<String>,
    /// Start timers (false: only manual firing).
    pub timers: bool,
    /// Write the handler's output and invocation logs to this file instead of stdout.
    pub handler_log: Option<PathBuf>,
}

impl DevHostOptions {
    pub fn new(app_root: impl Into<PathBuf>) -> Self {
        DevHostOptions {
            app_root: app_root.into(),
            port: 7071,
            servicebus_port: None,
            eventgrid_port: None,
            overrides: vec![],
            data_dir: None,
            start_azurite: true,
            max_delivery_count: 10,
            lock_duration: None,
            init_timeout: Duration::from_secs(30),
            handler: None,
            function_key: None,
            master_key: None,
            timers: true,
            handler_log: None,
        }
    }

    /// Free ports everywhere, no Azurite, a fresh data dir, handler output in
    /// `{data_dir}/handler.log` (not on stdout): for parallel tests.
    pub fn for_tests(app_root: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        DevHostOptions {
            port: 0,
            servicebus_port: Some(0),
            eventgrid_port: Some(0),
            handler_log: Some(data_dir.join("handler.log")),
            data_dir: Some(data_dir),
            start_azurite: false,
            ..Self::new(app_root)
        }
    }
}

struct TimerState {
    status: Option<TimerStatus>,
}

struct Inner {
    config: AppConfig,
    settings: BTreeMap<String, String>,
    supervisor: Supervisor,
    output: OutputSink,
    broker: Broker,
    /// The Event Grid topic stand-in, when the app publishes to a loopback endpoint.
    topic: Option<Topic>,
    function_key: String,
    master_key: String,
    /// Invocations (timeout = `functionTimeout`).
    client: reqwest::Client,
    /// Reads of the app's ledger for the queues page (short timeout).
    storage_client: reqwest::Client,
    /// Where the queues page reads the ledger (`None`: no storage setting it understands).
    ledger: Option<queues::LedgerSource>,
    timers: Mutex<HashMap<String, TimerState>>,
}

/// A running devhost.
pub struct DevHost {
    inner: Arc<Inner>,
    front_addr: SocketAddr,
    sb_server: Option<ServerHandle>,
    eg_server: Option<ServerHandle>,
    front: Option<ServerHandle>,
    tasks: Vec<JoinHandle<()>>,
    azurite: Option<AzuriteTable>,
}

fn random_key() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

async fn port_open(port: u16) -> bool {
    tokio::time::timeout(
        Duration::from_millis(300),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false)
}

/// The Azurite table port devhost should provide, if the storage setting asks for a local one.
fn azurite_table_port(storage: &str) -> Option<u16> {
    if storage
        .trim()
        .eq_ignore_ascii_case("UseDevelopmentStorage=true")
    {
        return Some(10002);
    }
    let te = storage
        .split(';')
        .find_map(|p| p.trim().strip_prefix("TableEndpoint="))?;
    let u = url::Url::parse(te).ok()?;
    if matches!(u.host_str(), Some("127.0.0.1") | Some("localhost")) {
        u.port()
    } else {
        None
    }
}

impl DevHost {
    /// Starts devhost, in order: read the app's configuration; Azurite if the storage setting
    /// is local and nothing listens there; the Service Bus stand-in (which may rewrite the
    /// connection setting's port); the Event Grid topic stand-in (which may rewrite the
    /// endpoint setting's port and add its key); the handler under its supervisor; the HTTP
    /// front end; the Service Bus consumers and timers.
    pub async fn start(opts: DevHostOptions) -> anyhow::Result<DevHost> {
        let mut config = AppConfig::load(&opts.app_root, &opts.overrides)?;
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| config.root.join(".devhost"));
        std::fs::create_dir_all(&data_dir)?;
        let azurite = provide_azurite(&opts, &config, &data_dir).await?;
        let servicebus = start_servicebus(&opts, &mut config, &data_dir).await?;
        let eventgrid = start_eventgrid(&opts, &mut config, &data_dir).await?;
        let (supervisor, output) = start_handler(&opts, &config)?;
        let inner = Arc::new(Inner {
            function_key: opts.function_key.clone().unwrap_or_else(random_key),
            master_key: opts.master_key.clone().unwrap_or_else(random_key),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(config.function_timeout.unwrap_or(Duration::from_secs(1800)))
                .build()?,
            storage_client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            ledger: queues::LedgerSource::from_settings(&config.settings),
            settings: config.settings.clone(),
            config,
            supervisor,
            output,
            broker: servicebus.broker,
            topic: eventgrid.as_ref().map(|(t, _)| t.clone()),
            timers: Mutex::new(HashMap::new()),
        });
        let front = crate::server::serve(
            SocketAddr::from(([127, 0, 0, 1], opts.port)),
            front::router(inner.clone()),
            "devhost",
        )
        .await?;
        let tasks = start_triggers(&inner, opts.timers)?;
        let host = DevHost {
            inner,
            front_addr: front.addr,
            sb_server: servicebus.server,
            eg_server: eventgrid.map(|(_, s)| s),
            front: Some(front),
            tasks,
            azurite,
        };
        host.print_banner();
        Ok(host)
    }

    fn print_banner(&self) {
        println!(
            "devhost: app root        {}",
            self.inner.config.root.display()
        );
        println!("devhost: functions:");
        for f in &self.inner.config.functions {
            match &f.trigger {
                Trigger::Http {
                    route,
                    methods,
                    auth_level,
                    forwarded,
                    ..
                } => println!(
                    "  {:<18} [{}] {}/{}/{}  (authLevel {auth_level}{})",
                    f.name,
                    methods.join(",").to_uppercase(),
                    self.base_url(),
                    self.inner.config.route_prefix,
                    route,
                    if *forwarded {
                        ", forwarded"
                    } else {
                        ", envelope"
                    }
                ),
                Trigger::Timer { schedule, .. } => {
                    println!("  {:<18} timerTrigger '{schedule}'", f.name)
                }
                Trigger::ServiceBus { queue, .. } => {
                    println!("  {:<18} serviceBusTrigger queue '{queue}'", f.name)
                }
                Trigger::Unsupported(t) => println!("  {:<18} {t} (not supported)", f.name),
            }
        }
        println!("devhost: function key    {}", self.inner.function_key);
        println!("devhost: master key      {}", self.inner.master_key);
        if let Some(s) = &self.sb_server {
            println!("devhost: Service Bus     http://{}", s.addr);
        }
        if let Some(s) = &self.eg_server {
            println!(
                "devhost: Event Grid      http://{}{}",
                s.addr,
                crate::eventgrid::PUBLISH_PATH
            );
        }
        println!(
            "devhost: queues          {}/_devhost/queues",
            self.base_url()
        );
        println!(
            "devhost: events          {}/_devhost/events",
            self.base_url()
        );
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.front_addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.front_addr
    }

    /// `{base}/{routePrefix}/{route}`
    pub fn api_url(&self, route: &str) -> String {
        format!(
            "{}/{}/{}",
            self.base_url(),
            self.inner.config.route_prefix,
            route.trim_start_matches('/')
        )
    }

    pub fn function_key(&self) -> &str {
        &self.inner.function_key
    }

    pub fn master_key(&self) -> &str {
        &self.inner.master_key
    }

    pub fn servicebus_addr(&self) -> Option<SocketAddr> {
        self.sb_server.as_ref().map(|s| s.addr)
    }

    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// Where the Event Grid topic stand-in listens, when it runs.
    pub fn eventgrid_addr(&self) -> Option<SocketAddr> {
        self.eg_server.as_ref().map(|s| s.addr)
    }

    /// The Event Grid topic stand-in (its events, its injected failures), when it runs.
    pub fn topic(&self) -> Option<&Topic> {
        self.inner.topic.as_ref()
    }

    pub fn queues(&self) -> Vec<QueueSnapshot> {
        self.inner.broker.sweep();
        self.inner.broker.snapshot()
    }

    /// The settings the handler was started with (after overrides and port rewrites).
    /// The port the handler listens on, when it is ready (what the host calls; tests that
    /// talk to the handler as the Azure host would).
    pub async fn handler_port(&self) -> Option<u16> {
        self.inner.supervisor.wait_ready(Duration::ZERO).await
    }

    pub fn settings(&self) -> &BTreeMap<String, String> {
        &self.inner.settings
    }

    pub fn config(&self) -> &AppConfig {
        &self.inner.config
    }

    pub fn handler_pid(&self) -> Option<u32> {
        self.inner.supervisor.pid()
    }

    pub fn handler_restarts(&self) -> u32 {
        self.inner.supervisor.restarts()
    }

    pub fn handler_state(&self) -> HandlerState {
        self.inner.supervisor.state()
    }

    /// True once the restart budget is exhausted (the real host would stop).
    pub fn handler_failed(&self) -> bool {
        self.inner.supervisor.fatal()
    }

    pub async fn wait_handler_ready(&self, timeout: Duration) -> anyhow::Result<u16> {
        self.inner
            .supervisor
            .wait_ready(timeout)
            .await
            .ok_or_else(|| anyhow!("handler not ready within {timeout:?}"))
    }

    /// Invoke a timer (or any non-HTTP) function now, like `POST /admin/functions/{name}`, and
    /// wait for the invocation result.
    pub async fn fire(&self, function: &str) -> anyhow::Result<Value> {
        fire_timer(&self.inner, function, false).await
    }

    /// Wait until `queue` has no active/scheduled/locked messages left.
    pub async fn wait_queue_drained(&self, queue: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.inner.broker.sweep();
            if self.inner.broker.pending_count(queue) == 0 {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("queue {queue} not drained within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn shutdown(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(front) = self.front.take() {
            front.shutdown().await;
        }
        self.inner.supervisor.shutdown().await;
        if let Some(s) = self.sb_server.take() {
            s.shutdown().await;
        }
        if let Some(s) = self.eg_server.take() {
            s.shutdown().await;
        }
        if let Some(azurite) = self.azurite.take() {
            // SIGINT and wait until it has saved and exited (blocking): after the handler,
            // whose last writes it must keep.
            match tokio::task::spawn_blocking(move || azurite.stop()).await {
                Ok(Ok(())) => tracing::info!("devhost: Azurite saved its tables and stopped"),
                Ok(Err(e)) => tracing::warn!("devhost: {e}"),
                Err(e) => tracing::warn!("devhost: stopping Azurite: {e}"),
            }
        }
    }
}

/// Starts Azurite when the storage setting asks for a local table endpoint, nothing listens
/// there and the options allow it.
async fn provide_azurite(
    opts: &DevHostOptions,
    config: &AppConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<AzuriteTable>> {
    if !opts.start_azurite {
        return Ok(None);
    }
    let Some(port) = config
        .settings
        .get("AzureWebJobsStorage")
        .and_then(|s| azurite_table_port(s))
    else {
        return Ok(None);
    };
    if port_open(port).await {
        tracing::info!(port, "devhost: Azurite (or something) already listens");
        return Ok(None);
    }
    Ok(Some(start_azurite(&config.root, data_dir, port).await?))
}

/// The Service Bus stand-in: the broker (always, for the consumers) and its REST server when
/// the connection setting says `UseDevelopmentEmulator=true`.
struct ServiceBus {
    broker: Broker,
    server: Option<ServerHandle>,
}

/// Opens the broker for the queues the triggers listen on and serves it where the connection
/// setting points (or on `--servicebus-port`; the setting handed to the handler is rewritten
/// to the port actually bound).
async fn start_servicebus(
    opts: &DevHostOptions,
    config: &mut AppConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<ServiceBus> {
    let sb_setting = config
        .functions
        .iter()
        .find_map(|f| match &f.trigger {
            Trigger::ServiceBus { connection, .. } => Some(connection.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "ServiceBusConnection".into());
    let cs = config
        .settings
        .get(&sb_setting)
        .map(|s| ConnectionString::parse(s))
        .transpose()
        .with_context(|| format!("app setting {sb_setting}"))?;
    let (key_name, key) = cs
        .as_ref()
        .map(|c| (c.key_name.clone(), c.key.clone()))
        .unwrap_or_else(|| ("RootManageSharedAccessKey".into(), random_key()));
    let mut bc = BrokerConfig::new(data_dir.join("servicebus"), &key_name, &key);
    bc.queues = config
        .functions
        .iter()
        .filter_map(|f| match &f.trigger {
            Trigger::ServiceBus { queue, .. } => Some(queue.clone()),
            _ => None,
        })
        .collect();
    bc.max_delivery_count = opts.max_delivery_count;
    bc.lock_duration = opts.lock_duration.unwrap_or(config.max_auto_lock_renewal);
    let broker = Broker::open(bc)?;
    let Some(mut cs) = cs else {
        return Ok(ServiceBus {
            broker,
            server: None,
        });
    };
    if !cs.use_development_emulator {
        tracing::warn!("devhost: {sb_setting} does not say UseDevelopmentEmulator=true; the handler will talk to that Service Bus, devhost's stand-in is not served");
        return Ok(ServiceBus {
            broker,
            server: None,
        });
    }
    let port = opts.servicebus_port.or(cs.port).unwrap_or(5672);
    let server = broker
        .serve(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    if cs.port != Some(server.addr.port()) {
        cs.port = Some(server.addr.port());
        config.settings.insert(sb_setting, cs.render());
    }
    Ok(ServiceBus {
        broker,
        server: Some(server),
    })
}

/// Serves the Event Grid topic stand-in where `SOC_NOTIFY_TOPIC_ENDPOINT` points, when that is
/// a loopback `http` URL (or on `--eventgrid-port`; the setting handed to the handler is
/// rewritten to the port actually bound), keeping its events in `{data_dir}/eventgrid`. Its key
/// is `SOC_NOTIFY_TOPIC_KEY`, or a random one handed to the handler when that is unset. No
/// endpoint: the app publishes nothing, and no topic runs.
async fn start_eventgrid(
    opts: &DevHostOptions,
    config: &mut AppConfig,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<(Topic, ServerHandle)>> {
    let Some(endpoint) = config
        .settings
        .get(NOTIFY_ENDPOINT_SETTING)
        .filter(|e| !e.trim().is_empty())
    else {
        return Ok(None);
    };
    let mut url = url::Url::parse(endpoint.trim())
        .with_context(|| format!("app setting {NOTIFY_ENDPOINT_SETTING}"))?;
    if url.scheme() != "http" || !matches!(url.host_str(), Some("127.0.0.1" | "localhost")) {
        tracing::warn!("devhost: {NOTIFY_ENDPOINT_SETTING} is not a loopback http URL; the handler will publish there, devhost's topic stand-in is not served");
        return Ok(None);
    }
    let key = match config.settings.get(NOTIFY_KEY_SETTING) {
        Some(k) if !k.is_empty() => k.clone(),
        _ => {
            let k = random_key();
            config
                .settings
                .insert(NOTIFY_KEY_SETTING.to_string(), k.clone());
            k
        }
    };
    let topic = Topic::open(&key, &data_dir.join("eventgrid"))?;
    let port = opts
        .eventgrid_port
        .or(url.port_or_known_default())
        .unwrap_or(80);
    let server = topic
        .serve(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    if url.port_or_known_default() != Some(server.addr.port()) {
        let _ = url.set_port(Some(server.addr.port()));
        config
            .settings
            .insert(NOTIFY_ENDPOINT_SETTING.to_string(), url.to_string());
    }
    Ok(Some((topic, server)))
}

/// Spawns the handler (`defaultExecutablePath`, or the options' override) under its
/// supervisor, with the final settings as its environment.
fn start_handler(
    opts: &DevHostOptions,
    config: &AppConfig,
) -> anyhow::Result<(Supervisor, OutputSink)> {
    let output = match &opts.handler_log {
        Some(p) => OutputSink::file(p).with_context(|| format!("opening {}", p.display()))?,
        None => OutputSink::stdout(),
    };
    let supervisor = Supervisor::start(HandlerSpec {
        executable: opts.handler.clone().unwrap_or(config.executable.clone()),
        arguments: config.arguments.clone(),
        working_dir: config.working_dir.clone(),
        app_root: config.root.clone(),
        env: config.settings.clone(),
        init_timeout: opts.init_timeout,
        output: output.clone(),
    });
    Ok((supervisor, output))
}

/// One consumer per Service Bus trigger; one loop per timer trigger (when `timers`). Every
/// timer schedule is parsed either way, so a bad schedule fails the start.
fn start_triggers(inner: &Arc<Inner>, timers: bool) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for f in &inner.config.functions {
        match &f.trigger {
            Trigger::ServiceBus { queue, .. } => {
                let inner2 = inner.clone();
                let name = f.name.clone();
                tasks.push(inner.broker.start_consumer(
                    queue,
                    inner.config.max_concurrent_calls,
                    move |d| {
                        let inner2 = inner2.clone();
                        let name = name.clone();
                        async move { deliver_sb(&inner2, &name, d).await }
                    },
                ));
            }
            Trigger::Timer {
                schedule,
                run_on_startup,
                ..
            } => {
                let cron = cron::Cron::parse(schedule)
                    .map_err(|e| anyhow!("{}: schedule {schedule:?}: {e}", f.name))?;
                if timers {
                    tasks.push(tokio::spawn(timer_loop(
                        inner.clone(),
                        f.name.clone(),
                        cron,
                        *run_on_startup,
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(tasks)
}

/// Azurite on `127.0.0.1:{port}` with its tables in `{data_dir}/azurite` (kept between runs).
async fn start_azurite(
    root: &std::path::Path,
    data_dir: &std::path::Path,
    port: u16,
) -> anyhow::Result<AzuriteTable> {
    let bin = azurite::binary(root)
        .map_err(|e| anyhow!("Azurite is needed (AzureWebJobsStorage is local) but {e}"))?;
    let data = Data::Folder(data_dir.join("azurite"));
    let table = tokio::task::spawn_blocking(move || AzuriteTable::start(&bin, port, data, None))
        .await?
        .map_err(|e| anyhow!("Azurite did not start on 127.0.0.1:{port}: {e}"))?;
    println!(
        "devhost: started Azurite table service on 127.0.0.1:{port} (data in {})",
        table.dir().display()
    );
    Ok(table)
}

/// POST the envelope to `/{FunctionName}` and apply §6. Returns the parsed response body.
async fn invoke(inner: &Inner, function: &str, envelope: &J) -> anyhow::Result<Value> {
    let port = inner
        .supervisor
        .wait_ready(4 * Duration::from_secs(30))
        .await
        .ok_or_else(|| anyhow!("handler is not running"))?;
    let invocation_id = Uuid::new_v4().to_string();
    let body = serde_json::to_vec(envelope)?;
    // Stream the body so it goes out chunked, like the real host.
    let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let resp = inner
        .client
        .post(format!("http://127.0.0.1:{port}/{function}"))
        .header("Content-Type", "application/json; charset=utf-8")
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("X-Azure-Functions-InvocationId", &invocation_id)
        .header("User-Agent", format!("Azure-Functions-Host/{HOST_VERSION}"))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            tracing::error!(
                function,
                "devhost: function timeout: restarting the handler (§1.5)"
            );
            inner.supervisor.restart();
            anyhow::bail!("function timeout");
        }
        Err(e) => anyhow::bail!("invocation failed: {e}"),
    };
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let bytes = resp.bytes().await?;
    if !status.is_success() {
        anyhow::bail!("handler answered {status} (invocation failed)");
    }
    if !(ct.starts_with("application/json") || ct.starts_with("text/json")) {
        anyhow::bail!("handler answered content type {ct:?}: the host requires application/json (UnsupportedMediaType)");
    }
    let v: Value = if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).map_err(|e| anyhow!("invalid JSON body: {e}"))?
    };
    if v.is_null() {
        anyhow::bail!("handler answered an empty 2xx body: the real host would hang until functionTimeout and then restart the handler (§6.3)");
    }
    if let Some(logs) = v
        .as_object()
        .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("Logs")))
        .and_then(|(_, l)| l.as_array())
    {
        for l in logs {
            inner.output.line(&format!(
                "[{function} log] {}",
                l.as_str().unwrap_or(&l.to_string())
            ));
        }
    }
    Ok(v)
}

async fn deliver_sb(inner: &Arc<Inner>, function: &str, d: crate::servicebus::Delivery) -> bool {
    let Some(f) = inner.config.function(function) else {
        return false;
    };
    let Trigger::ServiceBus {
        binding, data_type, ..
    } = &f.trigger
    else {
        return false;
    };
    let env = payloads::servicebus_envelope(
        function,
        binding,
        data_type.as_deref(),
        &d,
        &inner.broker.config().namespace,
        &Uuid::new_v4().to_string(),
        Utc::now(),
    );
    // Like the real host's "Trigger Details" line: which message, which delivery.
    inner.output.line(&format!(
        "[devhost] Executing 'Functions.{function}' Trigger Details: MessageId: {}, SequenceNumber: {}, DeliveryCount: {}, EnqueuedTimeUtc: {}, LockedUntilUtc: {}",
        d.message.message_id,
        d.message.sequence_number,
        d.message.delivery_count,
        d.message.enqueued_time.to_rfc3339(),
        d.locked_until.to_rfc3339(),
    ));
    match invoke(inner, function, &env).await {
        Ok(_) => {
            tracing::info!(
                function,
                seq = d.message.sequence_number,
                "devhost: invocation succeeded"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                function,
                seq = d.message.sequence_number,
                delivery_count = d.message.delivery_count,
                "devhost: invocation failed: {e:#}"
            );
            false
        }
    }
}

fn timer_status_for(
    inner: &Inner,
    function: &str,
    cron: &cron::Cron,
    use_monitor: bool,
    now: chrono::DateTime<Utc>,
) -> Option<TimerStatus> {
    let next = cron.next_after(now)?;
    let after = cron.next_after(next)?;
    // The monitor is auto-disabled for schedules firing more often than once a minute.
    if !use_monitor || (after - next) < chrono::Duration::minutes(1) {
        return None;
    }
    let timers = inner.timers.lock().unwrap_or_else(|p| p.into_inner());
    let prev = timers.get(function).and_then(|t| t.status.clone());
    Some(TimerStatus {
        last: prev.as_ref().and_then(|p| p.last),
        next,
        last_updated: prev.as_ref().and_then(|p| p.last_updated),
    })
}

async fn fire_timer(inner: &Arc<Inner>, function: &str, scheduled: bool) -> anyhow::Result<Value> {
    let f = inner
        .config
        .function(function)
        .ok_or_else(|| anyhow!("no function {function}"))?;
    let name = f.name.clone();
    let now = Utc::now();
    let env = match &f.trigger {
        Trigger::Timer {
            binding,
            schedule,
            use_monitor,
            ..
        } => {
            let cron = cron::Cron::parse(schedule).map_err(|e| anyhow!(e))?;
            let status = timer_status_for(inner, &name, &cron, *use_monitor, now);
            let env = payloads::timer_envelope(&name, binding, status.as_ref(), false, now);
            if let Some(mut s) = status {
                s.last = Some(now);
                s.last_updated = Some(now);
                inner
                    .timers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone(), TimerState { status: Some(s) });
            }
            env
        }
        _ => anyhow::bail!("{name} is not a timer function"),
    };
    tracing::info!(function = %name, scheduled, "devhost: firing timer");
    let r = invoke(inner, &name, &env).await;
    match &r {
        Ok(_) => tracing::info!(function = %name, "devhost: timer invocation succeeded"),
        Err(e) => tracing::warn!(function = %name, "devhost: timer invocation failed: {e:#}"),
    }
    r
}

async fn timer_loop(inner: Arc<Inner>, name: String, cron: cron::Cron, run_on_startup: bool) {
    if run_on_startup {
        let _ = fire_timer(&inner, &name, true).await;
    }
    loop {
        let now = Utc::now();
        let Some(next) = cron.next_after(now) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        let _ = fire_timer(&inner, &name, true).await;
    }
}
