//! `devicesim` — run the device cloud simulator.
//!
//! ```text
//! devicesim [--addr 127.0.0.1:7073] [--api-key KEY | --no-api-key] [--seed N]
//!           [--device ID[:online|:offline]]... [--fleet N] [--fleet-interval-ms MS]
//!           [--state FILE [--fresh]] [--events-url URL [--events-key KEY]]
//! ```
//!
//! `--events-url URL` sends a CloudEvent to URL whenever a device goes online or offline
//! through the control API (`docs/device-api.md`, "Connection events"), with
//! `x-functions-key: KEY` when `--events-key` is given (scripts/dev: DeviceEventsHttp).
//!
//! `--state FILE` keeps the devices (and the PUT history) in FILE across restarts; a `--device`
//! already in FILE keeps its saved state. `--fresh` forgets what FILE held.

use std::net::SocketAddr;
use std::path::PathBuf;

use devtools::devicesim::{DeviceSim, FleetConfig, DEFAULT_API_KEY};

fn usage() -> ! {
    println!(
        "usage: devicesim [--addr 127.0.0.1:7073] [--api-key KEY | --no-api-key] [--seed N]\n\
         \x20                [--device ID[:online|:offline]]... [--fleet N] [--fleet-interval-ms MS]\n\
         \x20                [--state FILE [--fresh]] [--events-url URL [--events-key KEY]]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    devtools::server::init_logging();
    let mut addr: SocketAddr = "127.0.0.1:7073".parse()?;
    let mut api_key = Some(DEFAULT_API_KEY.to_string());
    let mut seed = 1u64;
    let mut devices: Vec<(String, bool)> = Vec::new();
    let mut fleet: Option<usize> = None;
    let mut fleet_interval = 2000u64;
    let mut state_file: Option<PathBuf> = None;
    let mut fresh = false;
    let mut events_url: Option<String> = None;
    let mut events_key: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--addr" => addr = val().parse()?,
            "--api-key" => api_key = Some(val()),
            "--no-api-key" => api_key = None,
            "--seed" => seed = val().parse()?,
            "--device" => {
                let v = val();
                let (id, online) = match v.split_once(':') {
                    Some((id, s)) => (id.to_string(), s != "offline"),
                    None => (v, true),
                };
                devices.push((id, online));
            }
            "--fleet" => fleet = Some(val().parse()?),
            "--fleet-interval-ms" => fleet_interval = val().parse()?,
            "--state" => state_file = Some(PathBuf::from(val())),
            "--fresh" => fresh = true,
            "--events-url" => events_url = Some(val()),
            "--events-key" => events_key = Some(val()),
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    let sim = match &state_file {
        Some(file) => {
            if fresh && file.exists() {
                std::fs::remove_file(file)?;
            }
            DeviceSim::start_saved(addr, api_key.clone(), seed, file).await?
        }
        None => DeviceSim::start_with(addr, api_key.clone(), seed).await?,
    };
    let restored = sim.devices().len();
    if let Some(url) = &events_url {
        sim.emit_events_to(url, events_key.clone());
    }
    for (id, online) in &devices {
        // A device the state file already holds keeps its saved state.
        if sim.device(id).is_none() {
            sim.add_device(id, *online);
        }
    }
    if let Some(n) = fleet {
        sim.start_fleet(FleetConfig {
            count: n,
            interval_ms: fleet_interval,
            seed,
            ..FleetConfig::default()
        });
    }
    println!("devicesim: device API   {}/devices/{{id}}", sim.base_url());
    println!(
        "devicesim: control API  {}/_control/devices",
        sim.base_url()
    );
    if let Some(file) = &state_file {
        println!(
            "devicesim: state        {} ({restored} devices restored; --fresh forgets them)",
            file.display()
        );
    }
    if let Some(url) = &events_url {
        println!("devicesim: events to    {url} (connection events; GET /_control/events)");
    }
    match &api_key {
        Some(k) => println!("devicesim: x-api-key    {k}"),
        None => println!("devicesim: x-api-key    (not checked)"),
    }
    // Ctrl-C, or SIGTERM from a supervising script (scripts/dev).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    sim.shutdown().await;
    Ok(())
}
