//! Shared helpers for the tests and the benchmark driver. **Not part of the product**: the root
//! crate has it as a dev-dependency only, `bench` as a dependency; `handler` never links it.
//!
//! - [`free_port`]: a free loopback port.
//! - [`repo_root`] and [`function_folders`]: the repository and its functions, derived from the
//!   `*/function.json` folders (the one list the Functions host itself reads).
//! - [`azurite`]: a real Azurite Table service on a free port, killed on drop.
//! - [`fuzz`]: the bounded mutational fuzzer of the host payload and request body parsers.
//!
//! Invariants: nothing here reaches beyond this machine (loopback only); every process or
//! directory a helper creates is removed when its owner is dropped.

pub mod azurite;
pub mod fuzz;

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};

/// A loopback port that was free a moment ago (bound to port 0, then released). Another process
/// may take it before the caller binds it; callers that spawn a child on it retry on failure.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The repository root (the function app root: `host.json`, the function folders).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the repository root")
        .to_path_buf()
}

/// The functions of the app at `app_root`: every top-level folder holding a `function.json`
/// (what the Functions host indexes), sorted by name.
pub fn function_folders(app_root: &Path) -> Vec<String> {
    let entries = std::fs::read_dir(app_root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", app_root.display()));
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("function.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
