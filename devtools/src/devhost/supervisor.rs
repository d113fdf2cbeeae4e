//! Spawns and supervises the custom handler process (§1.2-§1.5 of `docs/custom-handler-protocol.md`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{watch, Notify};

#[derive(Clone, Debug)]
pub struct HandlerSpec {
    pub executable: PathBuf,
    pub arguments: Vec<String>,
    pub working_dir: PathBuf,
    pub app_root: PathBuf,
    /// App settings passed as environment variables.
    pub env: BTreeMap<String, String>,
    pub init_timeout: Duration,
    /// Where the handler's output lines go: devhost's stdout, or a file (tests).
    pub output: OutputSink,
}

/// Destination of the handler's stdout/stderr lines and the invocation `Logs`.
/// Stdout by default (what a developer watches); a file in tests, where stdout
/// printed from runtime threads is not captured by the test harness and would
/// flood the test output.
#[derive(Clone, Debug, Default)]
pub struct OutputSink {
    file: Option<Arc<Mutex<std::fs::File>>>,
}

impl OutputSink {
    /// Print to stdout.
    pub fn stdout() -> Self {
        OutputSink { file: None }
    }

    /// Append to `path` (created if missing).
    pub fn file(path: &std::path::Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(OutputSink {
            file: Some(Arc::new(Mutex::new(f))),
        })
    }

    pub fn line(&self, line: &str) {
        match &self.file {
            None => println!("{line}"),
            Some(f) => {
                use std::io::Write;
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(f, "{line}");
            }
        }
    }
}

/// Handler state visible to invokers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerState {
    Starting,
    Ready(u16),
    /// Exited with 0 (no restart) or exceeded the restart budget: no more invocations.
    Stopped,
}

pub struct Supervisor {
    state_rx: watch::Receiver<HandlerState>,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What the supervisor and its task (`run`) both hold.
#[derive(Default)]
struct Shared {
    /// The running handler's process id.
    pid: Mutex<Option<u32>>,
    restarts: AtomicU32,
    /// Kill the handler for a restart that is not counted as an error (with `intentional`).
    kill: Notify,
    intentional: AtomicBool,
    shutdown: Notify,
    /// The restart budget is exhausted.
    fatal: AtomicBool,
}

impl Supervisor {
    pub fn start(spec: HandlerSpec) -> Supervisor {
        let (tx, rx) = watch::channel(HandlerState::Starting);
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(run(spec, tx, shared.clone()));
        Supervisor {
            state_rx: rx,
            shared,
            task: Mutex::new(Some(task)),
        }
    }

    pub fn state(&self) -> HandlerState {
        *self.state_rx.borrow()
    }

    /// Wait until the handler is ready; `None` on timeout or when it is stopped for good.
    pub async fn wait_ready(&self, timeout: Duration) -> Option<u16> {
        let mut rx = self.state_rx.clone();
        let fut = async {
            loop {
                match *rx.borrow_and_update() {
                    HandlerState::Ready(p) => return Some(p),
                    HandlerState::Stopped => return None,
                    HandlerState::Starting => {}
                }
                if rx.changed().await.is_err() {
                    return None;
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.ok().flatten()
    }

    pub fn pid(&self) -> Option<u32> {
        *self.shared.pid.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of restarts after crashes / forced restarts.
    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::SeqCst)
    }

    /// True when the restart budget was exhausted (the real host stops the application).
    pub fn fatal(&self) -> bool {
        self.shared.fatal.load(Ordering::SeqCst)
    }

    /// Kill and restart the handler without counting an error (function timeout path, §1.5).
    pub fn restart(&self) {
        self.shared.intentional.store(true, Ordering::SeqCst);
        self.shared.kill.notify_one();
    }

    pub async fn shutdown(&self) {
        self.shared.shutdown.notify_one();
        let t = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = t {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

async fn run(spec: HandlerSpec, tx: watch::Sender<HandlerState>, shared: Arc<Shared>) {
    let mut errors: Vec<Instant> = Vec::new();
    let worker_id = uuid::Uuid::new_v4().to_string();
    loop {
        let port = match crate::free_port() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("devhost: no free port: {e}");
                let _ = tx.send(HandlerState::Stopped);
                return;
            }
        };
        let mut cmd = Command::new(&spec.executable);
        cmd.args(&spec.arguments)
            .current_dir(&spec.working_dir)
            .envs(&spec.env)
            .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
            .env("FUNCTIONS_HTTPWORKER_PORT", port.to_string())
            .env("FUNCTIONS_CUSTOMHANDLER_WORKER_ID", &worker_id)
            .env("FUNCTIONS_HTTPWORKER_ID", &worker_id)
            .env("FUNCTIONS_APP_ROOT_PATH", &spec.app_root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let _ = tx.send(HandlerState::Starting);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "devhost: cannot start handler {}: {e} (build it: cargo build --bin handler && cp target/debug/handler .)",
                    spec.executable.display()
                );
                let _ = tx.send(HandlerState::Stopped);
                shared.fatal.store(true, Ordering::SeqCst);
                return;
            }
        };
        *shared.pid.lock().unwrap_or_else(|p| p.into_inner()) = child.id();
        tracing::info!(pid = ?child.id(), port, "devhost: handler started");
        if let Some(out) = child.stdout.take() {
            forward_lines(out, spec.output.clone(), |_| "[handler]");
        }
        if let Some(err) = child.stderr.take() {
            // The host logs stderr lines as errors (§1.4), unless they say they are warnings.
            forward_lines(err, spec.output.clone(), |l| {
                if l.to_ascii_lowercase().contains("warn") {
                    "[handler stderr WARN]"
                } else {
                    "[handler stderr ERROR]"
                }
            });
        }
        // readiness: GET / every 25 ms; any HTTP response = ready
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let deadline = Instant::now() + spec.init_timeout;
        let mut ready = false;
        let mut exited = None;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
                break;
            }
            match client.get(format!("http://127.0.0.1:{port}/")).send().await {
                Ok(_) => {
                    ready = true;
                    break;
                }
                Err(e) if e.is_connect() => {}
                Err(_) => {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let status = if let Some(st) = exited {
            Some(st)
        } else if !ready {
            tracing::error!("devhost: Initializing HttpWorker timed out.");
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        } else {
            tracing::info!(port, "devhost: handler ready");
            let _ = tx.send(HandlerState::Ready(port));
            tokio::select! {
                st = child.wait() => st.ok(),
                _ = shared.kill.notified() => {
                    let _ = child.start_kill();
                    child.wait().await.ok()
                }
                _ = shared.shutdown.notified() => {
                    let _ = tx.send(HandlerState::Stopped);
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    tracing::info!("devhost: handler stopped (shutdown)");
                    return;
                }
            }
        };
        let _ = tx.send(HandlerState::Starting);
        *shared.pid.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let code = status.and_then(|s| s.code());
        if shared.intentional.swap(false, Ordering::SeqCst) {
            tracing::warn!("devhost: handler killed for restart (function timeout or request)");
            shared.restarts.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        match code {
            Some(0) => {
                tracing::warn!("devhost: handler exited with code 0: no restart (like the real host); invocations will fail");
                let _ = tx.send(HandlerState::Stopped);
                return;
            }
            Some(200) => {
                tracing::info!("devhost: handler exited with 200: intentional restart");
                shared.restarts.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            other => {
                let now = Instant::now();
                if errors
                    .last()
                    .is_some_and(|l| now.duration_since(*l) > Duration::from_secs(1800))
                {
                    errors.clear();
                }
                errors.push(now);
                tracing::error!(exit_code = ?other, errors = errors.len(), "devhost: handler exited abnormally");
                if errors.len() >= 3 {
                    tracing::error!("devhost: Exceeded http worker restart retry count. Stopping.");
                    shared.fatal.store(true, Ordering::SeqCst);
                    let _ = tx.send(HandlerState::Stopped);
                    return;
                }
                shared.restarts.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Copies each line of one of the handler's pipes to the sink, after the label `label` gives it.
fn forward_lines(
    pipe: impl AsyncRead + Unpin + Send + 'static,
    sink: OutputSink,
    label: fn(&str) -> &'static str,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.line(&format!("{} {line}", label(&line)));
        }
    });
}
