//! Local development platform for the SoC settings service. **Not part of the product**: the
//! product (root crate `soc-settings`, `src/`) never depends on this crate, and this crate talks to
//! the product's `handler` binary only over HTTP, like the real Azure Functions host does.
//!
//! - [`devicesim`]: the vendor device cloud stand-in (device API + control API).
//! - [`servicebus`]: the Service Bus stand-in (REST send, durable store, peek-lock delivery).
//! - [`devhost`]: the Azure Functions host stand-in (spawns `handler`, HTTP/timer/Service Bus
//!   triggers) built on the two above.
//! - [`eventgrid`]: the Event Grid topic stand-in (CloudEvents publish, durable record of the
//!   events, injected failures) the app's notifications go to.
//! - [`identity`]: the managed-identity endpoint stand-in (`IDENTITY_ENDPOINT`) and its tokens.
//! - [`azurite`]: the Azurite Table service process (devhost's, and the tests' via `testkit`).
//! - [`server`]: serving a router with bounded graceful shutdown, and logging setup.
//! - [`free_port`] and [`function_folders`]: the loopback port and function list helpers that
//!   devhost, `testkit` (tests) and `bench` share.

pub mod azurite;
pub mod devhost;
pub mod devicesim;
pub mod eventgrid;
pub mod identity;
pub mod server;
pub mod servicebus;

use std::net::{Ipv4Addr, TcpListener};
use std::path::Path;

/// A loopback port that was free a moment ago (bound to port 0, then released). Another process
/// may take it before the caller binds it; callers that spawn a child on it retry on failure.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// The functions of the app at `app_root`: every top-level folder holding a `function.json`
/// (what the Functions host indexes), sorted by name. The one list of functions: everything
/// else that needs it derives it from here.
pub fn function_folders(app_root: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(app_root)? {
        let entry = entry?;
        if entry.path().join("function.json").is_file() {
            let name = entry.file_name().into_string().map_err(|name| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("function folder name is not UTF-8: {name:?}"),
                )
            })?;
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}
