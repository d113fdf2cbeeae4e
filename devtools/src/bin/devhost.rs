//! `devhost` — run the function app locally like the Azure Functions host would.
//!
//! ```text
//! devhost [run] [--app-root DIR] [--port 7071] [--servicebus-port N] [--eventgrid-port N]
//!               [--set NAME=VALUE]... [--data-dir DIR] [--no-azurite] [--no-timers] [--max-delivery-count N]
//!               [--lock-duration-secs N] [--handler PATH] [--function-key K] [--master-key K]
//! devhost queues [--url http://127.0.0.1:7071]
//! devhost events [--subject S] [--subject-begins-with P] [--url http://127.0.0.1:7071]
//! devhost fire FUNCTION --key MASTER_KEY [--url http://127.0.0.1:7071]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use devtools::devhost::{DevHost, DevHostOptions};

fn usage() -> ! {
    println!(
        "usage:\n  devhost [run] [--app-root DIR] [--port 7071] [--servicebus-port N] [--eventgrid-port N]\n\
         \x20             [--set NAME=VALUE]... [--data-dir DIR] [--no-azurite] [--no-timers] [--max-delivery-count N]\n\
         \x20             [--lock-duration-secs N] [--handler PATH] [--function-key K] [--master-key K]\n\
         \x20 devhost queues [--url http://127.0.0.1:7071]\n\
         \x20 devhost events [--subject S] [--subject-begins-with P] [--url http://127.0.0.1:7071]\n\
         \x20 devhost fire FUNCTION --key MASTER_KEY [--url http://127.0.0.1:7071]"
    );
    std::process::exit(2)
}

fn default_root() -> PathBuf {
    // The repo root: the nearest ancestor of the current directory holding host.json.
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    cwd.ancestors()
        .find(|d| d.join("host.json").is_file())
        .map(PathBuf::from)
        .unwrap_or(cwd)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    devtools::server::init_logging();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let sub = match args.first().map(String::as_str) {
        Some("queues") | Some("events") | Some("fire") | Some("run") => args.remove(0),
        _ => "run".to_string(),
    };
    let mut url = "http://127.0.0.1:7071".to_string();
    let mut key = None;
    let mut filters = Vec::new();
    let mut positional = Vec::new();
    let mut opts = DevHostOptions::new(default_root());
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--app-root" => opts.app_root = PathBuf::from(val()),
            "--port" => opts.port = val().parse()?,
            "--servicebus-port" => opts.servicebus_port = Some(val().parse()?),
            "--eventgrid-port" => opts.eventgrid_port = Some(val().parse()?),
            "--subject" => filters.push(("subject", val())),
            "--subject-begins-with" => filters.push(("subjectBeginsWith", val())),
            "--set" => {
                let v = val();
                let (k, v) = v.split_once('=').unwrap_or_else(|| usage());
                opts.overrides.push((k.to_string(), v.to_string()));
            }
            "--data-dir" => opts.data_dir = Some(PathBuf::from(val())),
            "--no-azurite" => opts.start_azurite = false,
            "--no-timers" => opts.timers = false,
            "--max-delivery-count" => opts.max_delivery_count = val().parse()?,
            "--lock-duration-secs" => {
                opts.lock_duration = Some(Duration::from_secs(val().parse()?))
            }
            "--handler" => opts.handler = Some(PathBuf::from(val())),
            "--function-key" => opts.function_key = Some(val()),
            "--master-key" => opts.master_key = Some(val()),
            "--url" => url = val(),
            "--key" => key = Some(val()),
            "-h" | "--help" => usage(),
            s if s.starts_with("--") => usage(),
            s => positional.push(s.to_string()),
        }
    }
    match sub.as_str() {
        "queues" | "events" => {
            let mut page = url::Url::parse(&format!("{url}/_devhost/{sub}"))?;
            for (name, value) in &filters {
                page.query_pairs_mut().append_pair(name, value);
            }
            let v: serde_json::Value = reqwest::get(page).await?.json().await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        "fire" => {
            let name = positional.first().cloned().unwrap_or_else(|| usage());
            let r = reqwest::Client::new()
                .post(format!("{url}/admin/functions/{name}"))
                .header("x-functions-key", key.unwrap_or_default())
                .json(&serde_json::json!({"input": ""}))
                .send()
                .await?;
            println!("{}", r.status());
            if r.status().is_success() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        _ => {
            let host = DevHost::start(opts).await?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let failed = loop {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => break false,
                    _ = term.recv() => break false,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if host.handler_failed() { break true; }
                    }
                }
            };
            host.shutdown().await;
            if failed {
                eprintln!("devhost: the handler kept crashing; stopped");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
