//! devhost: a local stand-in for the Azure Functions host running a custom handler.
//! See `devtools/README.md` and the §9 checklist of `docs/custom-handler-protocol.md`
//! (all `§` numbers refer to that document).

pub mod config;
pub mod cron;
pub mod json;
pub mod payloads;
pub mod supervisor;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use chrono::Utc;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::servicebus::{Broker, BrokerConfig, ConnectionString, QueueSnapshot, ServerHandle};
use config::{AppConfig, Trigger};
use json::J;
use payloads::{HttpIn, TimerStatus};
use supervisor::{HandlerSpec, HandlerState, OutputSink, Supervisor};

/// The host version devhost claims in headers.
pub const HOST_VERSION: &str = "4.1037.0.0";

/// How to start devhost.
#[derive(Clone, Debug)]
pub struct DevHostOptions {
    /// Function app root (host.json, */function.json, local.settings.json, handler).
    pub app_root: PathBuf,
    /// Front-end port for HTTP triggers (7071; 0 = free port).
    pub port: u16,
    /// Service Bus stand-in port: `None` = the port in `ServiceBusConnection`; `Some(0)` = free.
    pub servicebus_port: Option<u16>,
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
    function_key: String,
    master_key: String,
    client: reqwest::Client,
    timers: Mutex<HashMap<String, TimerState>>,
    front_addr: Mutex<Option<SocketAddr>>,
}

/// A running devhost.
pub struct DevHost {
    inner: Arc<Inner>,
    front_addr: SocketAddr,
    sb_server: Option<ServerHandle>,
    front: Option<ServerHandle>,
    tasks: Vec<JoinHandle<()>>,
    azurite: Option<tokio::process::Child>,
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
    pub async fn start(opts: DevHostOptions) -> anyhow::Result<DevHost> {
        let mut config = AppConfig::load(&opts.app_root, &opts.overrides)?;
        let data_dir = opts
            .data_dir
            .clone()
            .unwrap_or_else(|| config.root.join(".devhost"));
        std::fs::create_dir_all(&data_dir)?;
        let mut settings = config.settings.clone();

        // Azurite
        let mut azurite = None;
        if opts.start_azurite {
            if let Some(port) = settings
                .get("AzureWebJobsStorage")
                .and_then(|s| azurite_table_port(s))
            {
                if !port_open(port).await {
                    azurite = Some(start_azurite(&config.root, &data_dir, port).await?);
                } else {
                    tracing::info!(port, "devhost: Azurite (or something) already listens");
                }
            }
        }

        // Service Bus stand-in: one per connection setting used by triggers (normally one)
        let sb_setting = config
            .functions
            .iter()
            .find_map(|f| match &f.trigger {
                Trigger::ServiceBus { connection, .. } => Some(connection.clone()),
                _ => None,
            })
            .unwrap_or_else(|| "ServiceBusConnection".into());
        let cs = settings
            .get(&sb_setting)
            .map(|s| ConnectionString::parse(s))
            .transpose()
            .with_context(|| format!("app setting {sb_setting}"))?;
        let mut sb_server = None;
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
        if let Some(mut c) = cs.clone() {
            if c.use_development_emulator {
                let port = opts.servicebus_port.or(c.port).unwrap_or(5672);
                let srv = broker
                    .serve(SocketAddr::from(([127, 0, 0, 1], port)))
                    .await?;
                if c.port != Some(srv.addr.port()) {
                    c.port = Some(srv.addr.port());
                    settings.insert(sb_setting.clone(), c.render());
                }
                sb_server = Some(srv);
            } else {
                tracing::warn!("devhost: {sb_setting} does not say UseDevelopmentEmulator=true; the handler will talk to that Service Bus, devhost's stand-in is not served");
            }
        }
        config.settings = settings.clone();

        let output = match &opts.handler_log {
            Some(p) => OutputSink::file(p).with_context(|| format!("opening {}", p.display()))?,
            None => OutputSink::stdout(),
        };
        let exe = opts.handler.clone().unwrap_or(config.executable.clone());
        let supervisor = Supervisor::start(HandlerSpec {
            executable: exe,
            arguments: config.arguments.clone(),
            working_dir: config.working_dir.clone(),
            app_root: config.root.clone(),
            env: settings.clone(),
            init_timeout: opts.init_timeout,
            output: output.clone(),
        });

        let inner = Arc::new(Inner {
            function_key: opts.function_key.clone().unwrap_or_else(random_key),
            master_key: opts.master_key.clone().unwrap_or_else(random_key),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(config.function_timeout.unwrap_or(Duration::from_secs(1800)))
                .build()?,
            config,
            settings,
            supervisor,
            output,
            broker: broker.clone(),
            timers: Mutex::new(HashMap::new()),
            front_addr: Mutex::new(None),
        });

        // front end
        let app = Router::new().fallback(front).with_state(inner.clone());
        let front = crate::server::serve(
            SocketAddr::from(([127, 0, 0, 1], opts.port)),
            app,
            "devhost",
        )
        .await?;
        let front_addr = front.addr;
        *inner.front_addr.lock().unwrap() = Some(front_addr);
        let mut tasks = Vec::new();

        // Service Bus triggers
        for f in &inner.config.functions {
            if let Trigger::ServiceBus { queue, .. } = &f.trigger {
                let inner2 = inner.clone();
                let name = f.name.clone();
                tasks.push(broker.start_consumer(
                    queue,
                    inner.config.max_concurrent_calls,
                    move |d| {
                        let inner2 = inner2.clone();
                        let name = name.clone();
                        async move { deliver_sb(&inner2, &name, d).await }
                    },
                ));
            }
        }
        // Timers
        for f in &inner.config.functions {
            if let Trigger::Timer {
                schedule,
                run_on_startup,
                ..
            } = &f.trigger
            {
                let cron = cron::Cron::parse(schedule)
                    .map_err(|e| anyhow!("{}: schedule {schedule:?}: {e}", f.name))?;
                if opts.timers {
                    tasks.push(tokio::spawn(timer_loop(
                        inner.clone(),
                        f.name.clone(),
                        cron,
                        *run_on_startup,
                    )));
                }
            }
        }
        let host = DevHost {
            inner,
            front_addr,
            sb_server,
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
        println!(
            "devhost: queues          {}/_devhost/queues",
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

    pub fn queues(&self) -> Vec<QueueSnapshot> {
        self.inner.broker.sweep();
        self.inner.broker.snapshot()
    }

    /// The settings the handler was started with (after overrides and port rewrites).
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
        if let Some(mut a) = self.azurite.take() {
            let _ = a.start_kill();
            let _ = a.wait().await;
        }
    }
}

async fn start_azurite(
    root: &std::path::Path,
    data_dir: &std::path::Path,
    port: u16,
) -> anyhow::Result<tokio::process::Child> {
    let bin = root.join("tools/node/node_modules/.bin/azurite-table");
    if !bin.exists() {
        anyhow::bail!(
            "Azurite is needed (AzureWebJobsStorage is local) but {} is missing: run scripts/setup",
            bin.display()
        );
    }
    let loc = data_dir.join("azurite");
    std::fs::create_dir_all(&loc)?;
    let child = tokio::process::Command::new(&bin)
        .args([
            "--tableHost",
            "127.0.0.1",
            "--tablePort",
            &port.to_string(),
            "--location",
            &loc.to_string_lossy(),
            "--skipApiVersionCheck",
            "--silent",
            // Loopback only: Azurite otherwise sends telemetry to Application Insights.
            "--disableTelemetry",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    for _ in 0..200 {
        if port_open(port).await {
            println!(
                "devhost: started Azurite table service on 127.0.0.1:{port} (data in {})",
                loc.display()
            );
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("Azurite did not listen on 127.0.0.1:{port} within 20 s")
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

// ---------------------------------------------------------------- HTTP front end

/// Match a route template (`devices/{deviceId}/soc`, `{*rest}`, `{id?}`, `{id:int}`) against a path.
pub fn match_route(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    let t: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
    let p: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut params = Vec::new();
    let mut i = 0;
    for (ti, seg) in t.iter().enumerate() {
        if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let catch_all = inner.starts_with('*');
            let inner = inner.trim_start_matches('*');
            let optional = inner.ends_with('?');
            let name = inner
                .trim_end_matches('?')
                .split(':')
                .next()
                .unwrap_or("")
                .to_string();
            if catch_all {
                let rest = p[i.min(p.len())..].join("/");
                params.push((name, rest));
                return if ti == t.len() - 1 {
                    Some(params)
                } else {
                    None
                };
            }
            match p.get(i) {
                Some(v) => {
                    let v = percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned();
                    params.push((name, v));
                    i += 1;
                }
                None if optional => {}
                None => return None,
            }
        } else {
            match p.get(i) {
                Some(v) if v.eq_ignore_ascii_case(seg) => i += 1,
                _ => return None,
            }
        }
    }
    if i == p.len() {
        Some(params)
    } else {
        None
    }
}

fn text(status: StatusCode, s: &str) -> Response {
    (status, s.to_string()).into_response()
}

fn key_from(req: &Request) -> Option<String> {
    if let Some(v) = req
        .headers()
        .get("x-functions-key")
        .and_then(|v| v.to_str().ok())
    {
        return Some(v.to_string());
    }
    req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
    })
}

/// Auth level the presented key grants: `Some("Admin")`, `Some("Function")` or `None`.
fn key_level(inner: &Inner, key: Option<&str>) -> Option<&'static str> {
    match key {
        Some(k) if k == inner.master_key => Some("Admin"),
        Some(k) if k == inner.function_key => Some("Function"),
        _ => None,
    }
}

async fn front(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let method = req.method().as_str().to_ascii_lowercase();
    let key = key_from(&req);
    let level = key_level(&inner, key.as_deref());

    if path == "/_devhost/queues" {
        inner.broker.sweep();
        return axum::Json(inner.broker.snapshot()).into_response();
    }
    if path == "/_devhost/status" || path == "/admin/host/status" {
        return axum::Json(json!({
            "state": format!("{:?}", inner.supervisor.state()),
            "handlerPid": inner.supervisor.pid(),
            "handlerRestarts": inner.supervisor.restarts(),
            "stopped": inner.supervisor.fatal(),
            "functions": inner.config.functions.iter().map(|f| f.name.clone()).collect::<Vec<_>>(),
        }))
        .into_response();
    }
    if let Some(name) = path.strip_prefix("/admin/functions/") {
        if method != "post" {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST only");
        }
        if level != Some("Admin") {
            return text(
                StatusCode::UNAUTHORIZED,
                "admin endpoints need the master key (x-functions-key or ?code=)",
            );
        }
        let name = name.to_string();
        if inner.config.function(&name).is_none() {
            return text(StatusCode::NOT_FOUND, "no such function");
        }
        let inner2 = inner.clone();
        tokio::spawn(async move {
            let _ = fire_timer(&inner2, &name, false).await;
        });
        return StatusCode::ACCEPTED.into_response();
    }
    let prefix = if inner.config.route_prefix.is_empty() {
        String::new()
    } else {
        format!("/{}", inner.config.route_prefix)
    };
    let Some(rel) = path.strip_prefix(&prefix) else {
        return text(StatusCode::NOT_FOUND, "not found");
    };
    let mut route_matched = false;
    for f in &inner.config.functions {
        let Trigger::Http {
            binding,
            auth_level,
            methods,
            route,
            forwarded,
            out_binding,
        } = &f.trigger
        else {
            continue;
        };
        let Some(params) = match_route(route, rel) else {
            continue;
        };
        route_matched = true;
        if !methods.is_empty() && !methods.contains(&method) {
            continue;
        }
        let allowed = match auth_level.as_str() {
            "anonymous" => true,
            "admin" => level == Some("Admin"),
            _ => level.is_some(),
        };
        if !allowed {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        return if *forwarded {
            forward(&inner, req).await
        } else {
            envelope_http(
                &inner,
                &f.name,
                binding,
                out_binding.as_deref().unwrap_or("res"),
                params,
                level,
                req,
            )
            .await
        };
    }
    if route_matched {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    text(StatusCode::NOT_FOUND, "no function matches this route")
}

fn has_length(req: &Request) -> bool {
    req.headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}

async fn forward(inner: &Arc<Inner>, req: Request) -> Response {
    let Some(port) = inner.supervisor.wait_ready(Duration::from_secs(120)).await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "handler is not running");
    };
    let with_len = has_length(&req);
    let (parts, body) = req.into_parts();
    let query = payloads::query_joined(parts.uri.query());
    let qs = if query.is_empty() {
        String::new()
    } else {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in &query {
            s.append_pair(k, v);
        }
        format!("?{}", s.finish())
    };
    let url = format!("http://127.0.0.1:{port}{}{qs}", parts.uri.path());
    let body = match axum::body::to_bytes(body, 100 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let mut rb = inner.client.request(parts.method.clone(), &url);
    let mut ua = None;
    for (k, v) in parts.headers.iter() {
        let n = k.as_str();
        if matches!(n, "content-length" | "transfer-encoding" | "connection") {
            continue;
        }
        if n == "user-agent" {
            ua = v.to_str().ok().map(str::to_string);
            continue;
        }
        rb = rb.header(k, v);
    }
    rb = rb
        .header(
            "User-Agent",
            match ua {
                Some(u) => format!("{u} Azure-Functions-Host/{HOST_VERSION}"),
                None => format!("Azure-Functions-Host/{HOST_VERSION}"),
            },
        )
        .header("X-Azure-Functions-HostVersion", HOST_VERSION)
        .header("X-Azure-Functions-InvocationId", Uuid::new_v4().to_string());
    if with_len {
        rb = rb.body(body);
    }
    match rb.send().await {
        Ok(r) => {
            let status = r.status();
            let headers = r.headers().clone();
            let bytes = r.bytes().await.unwrap_or_default();
            let mut resp = Response::new(Body::from(bytes));
            *resp.status_mut() = status;
            for (k, v) in headers.iter() {
                if matches!(
                    k.as_str(),
                    "transfer-encoding" | "connection" | "content-length"
                ) {
                    continue;
                }
                resp.headers_mut().append(k, v.clone());
            }
            resp
        }
        Err(e) => {
            if e.is_timeout() {
                inner.supervisor.restart();
            }
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("invocation failed: {e}"),
            )
        }
    }
}

async fn envelope_http(
    inner: &Arc<Inner>,
    function: &str,
    binding: &str,
    out_binding: &str,
    params: Vec<(String, String)>,
    level: Option<&str>,
    req: Request,
) -> Response {
    let with_len = has_length(&req);
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, 100 * 1024 * 1024).await {
        Ok(b) => b,
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large"),
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (payloads::canonical_header(k.as_str()), v.to_string()))
        })
        .collect();
    let input = HttpIn {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        headers,
        body: body.to_vec(),
        has_length: with_len,
        params,
        key_level: level.map(str::to_string),
    };
    let env = payloads::http_envelope(function, binding, &input, Utc::now());
    let result = match invoke(inner, function, &env).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(function, "devhost: HTTP invocation failed: {e:#}");
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
    };
    match payloads::interpret_http_output(&result, out_binding) {
        Ok(out) => {
            let mut resp = Response::new(Body::from(out.body));
            *resp.status_mut() =
                StatusCode::from_u16(out.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (k, v) in out.headers {
                if let (Ok(k), Ok(v)) = (
                    axum::http::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(&v),
                ) {
                    resp.headers_mut().append(k, v);
                }
            }
            resp
        }
        Err(e) => {
            tracing::warn!(function, "devhost: bad HTTP output: {e}");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}
