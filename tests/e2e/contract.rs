//! The API held to its contract by a tool nobody here wrote: Schemathesis (PyPI, pinned in
//! `requirements-dev.txt`, installed into `tools/venv` by `scripts/setup`) generates requests
//! from `docs/openapi.yaml` (its examples, boundary values, random and schema-violating
//! input, and stateful sequences that follow the document's links: POST, then the request's
//! own status) and sends them to the real handler through devhost, with devicesim's two demo
//! batteries (`bat-online`, `bat-offline`, the document's examples) and Azurite behind it.
//!
//! Every check Schemathesis has runs (`--checks all`), in every phase, but one:
//! `use_after_free` (ST301) expects a resource to be gone (`404`) after a `DELETE` that
//! answered `2xx`. `DELETE …/soc/requests/{requestId}` cancels a request, which stays
//! readable by design (it shows `cancelled`, and a repeated `DELETE` answers `200`:
//! issue 21, `docs/openapi.yaml`). Bounded (examples per
//! operation, a fixed seed, no example database) so the run is reproducible and takes about
//! 30 s. Findings and the recorded run: BENCHMARKS.md, "API contract".
//! Its report (JUnit XML and the NDJSON event stream) stays in the test's data directory
//! when it fails.

use std::path::Path;
use std::time::Duration;

use crate::support::{app_root, Setup};

/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "100";
/// Fixed, so a failure can be reproduced with the same command.
const SEED: &str = "20261202";
const FUNCTION_KEY: &str = "e2e-contract-function-key";
const MASTER_KEY: &str = "e2e-contract-master-key";

/// `tools/venv/bin/schemathesis`, or why it is not there.
fn schemathesis() -> std::path::PathBuf {
    let bin = app_root().join("tools/venv/bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} is missing: run scripts/setup (it installs requirements-dev.txt)",
        bin.display()
    );
    bin
}

/// The command line, printed with the results so a failure can be replayed by hand.
pub fn command(base_url: &str, report_dir: &Path) -> Vec<String> {
    [
        "run",
        &app_root().join("docs/openapi.yaml").to_string_lossy(),
        "--url",
        &format!("{base_url}/api"),
        "--header",
        &format!("x-functions-key: {FUNCTION_KEY}"),
        "--checks",
        "all",
        // A cancelled request stays readable (see above).
        "--exclude-checks",
        "use_after_free",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        MAX_EXAMPLES,
        "--seed",
        SEED,
        "--generation-database",
        "none",
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--no-color",
        "--report",
        "junit,ndjson",
        "--report-dir",
        &report_dir.to_string_lossy(),
    ]
    .into_iter()
    .map(str::to_string)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_difference_between_the_handler_and_the_openapi_document() {
    let bin = schemathesis();
    let app = Setup::new().keys(FUNCTION_KEY, MASTER_KEY).start().await;
    app.sim.add_device("bat-online", true);
    app.sim.add_device("bat-offline", false);
    let report_dir = app.data_dir().join("schemathesis");
    let args = command(&app.host().base_url(), &report_dir);

    let run = tokio::process::Command::new(&bin)
        .args(&args)
        .current_dir(app.data_dir())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the bounded Schemathesis run ends within 4 minutes")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("schemathesis {}\n{stdout}", args.join(" "));
    assert!(
        out.status.success(),
        "Schemathesis found differences ({}); report in {}\n{stdout}\n{}\n{}",
        out.status,
        report_dir.display(),
        String::from_utf8_lossy(&out.stderr),
        app.handler_log_tail()
    );
    assert!(
        stdout.contains("Stateful"),
        "the stateful phase ran (the document's links):\n{stdout}"
    );
}
