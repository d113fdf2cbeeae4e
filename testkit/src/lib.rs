//! Shared helpers for the tests and the benchmark driver. **Not part of the product**: the root
//! crate has it as a dev-dependency only, `bench` as a dependency; `handler` never links it.
//! The free port, the function list and the Azurite process are implemented once, in
//! `devtools` (devhost needs them too); this crate gives them the tests' shape (panic on
//! failure, retry on a taken port, in memory, one shared instance).
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

use std::path::{Path, PathBuf};

/// A loopback port that was free a moment ago ([`devtools::free_port`]); panics if the machine
/// has none.
pub fn free_port() -> u16 {
    devtools::free_port().expect("a free loopback port")
}

/// The repository root (the function app root: `host.json`, the function folders).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the repository root")
        .to_path_buf()
}

/// The functions of the app at `app_root` ([`devtools::function_folders`]: every top-level
/// folder holding a `function.json`, sorted); panics if the folder cannot be read.
pub fn function_folders(app_root: &Path) -> Vec<String> {
    devtools::function_folders(app_root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", app_root.display()))
}
