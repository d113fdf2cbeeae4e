//! The one way the local platform serves HTTP: bind, serve an axum router until told to
//! stop, and stop with a bound on how long in-flight requests may delay it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long graceful shutdown may wait for in-flight requests (a simulated hung device
/// call would otherwise hold it for its whole hang time).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running server. Dropping it does not stop the server; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Serves `app` on `addr` (`127.0.0.1:0` for a free port); `what` names it in logs and errors.
pub async fn serve(addr: SocketAddr, app: Router, what: &str) -> anyhow::Result<ServerHandle> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {what} on {addr}"))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = rx.await;
            })
            .await;
    });
    tracing::info!(%addr, "{what} listening");
    Ok(ServerHandle {
        addr,
        stop: Some(tx),
        task: Some(task),
    })
}

impl ServerHandle {
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(mut t) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut t).await.is_err() {
                t.abort();
            }
        }
    }
}

/// Logging for the platform's binaries: stdout, `RUST_LOG` or `info`. Colours only when
/// stdout is a terminal: redirected to a file (scripts/dev's `.devhost/logs/`) lines are plain.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stdout().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
