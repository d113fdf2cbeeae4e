//! `handler`: the custom handler process the Functions host starts.
//! Binds `127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT` first (the host polls it
//! every 25 ms), then serves until SIGTERM/Ctrl-C.

use std::process::ExitCode;

use soc_settings::{app, config, telemetry};
use tracing::{error, info};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    telemetry::init();
    let port = match config::port_from_env() {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // IPv4 loopback: the host connects to 127.0.0.1 literally.
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            error!(port, error = %e, "cannot bind the custom handler port");
            return ExitCode::FAILURE;
        }
    };
    let services = app::services_from_env();
    match &services {
        Ok(_) => info!(port, "handler ready"),
        Err(e) => error!(
            port,
            "handler started without a usable configuration; every invocation will fail: {}",
            e.one_line()
        ),
    }
    let served = axum::serve(listener, app::router(app::AppState::new(services)))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    match served {
        Ok(()) => {
            info!("handler stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
