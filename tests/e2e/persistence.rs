//! The local platform never loses a write: a request answered just before the platform is
//! stopped (as Ctrl-C in `scripts/dev` stops it) is there after a restart, in the ledger
//! (Azurite), in the Service Bus stand-in and in devicesim alike.

use std::time::Duration;

use crate::support::Setup;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_answered_just_before_a_stop_are_all_there_after_a_restart() {
    let mut app = Setup::new()
        .rechecks_far_away()
        .set("DRAIN_SOC_SCHEDULE", "0 0 0 1 1 *")
        .saved()
        .events()
        .start()
        .await;
    app.sim.add_device("bat-online", true);
    app.sim.add_device("bat-offline", false);

    // Act: one applied and one stored request, then the platform stops at once.
    let applied = app.post("bat-online", r#"{"minSoc":25}"#).await;
    assert_eq!(applied.status, 200, "{}", applied.body);
    let pending = app.post("bat-offline", r#"{"minSoc":30}"#).await;
    assert_eq!(pending.status, 202, "{}", pending.body);
    let location = pending.headers["location"].to_str().unwrap().to_string();
    app.restart_platform().await;

    // Assert: the ledger keeps both requests as they were answered...
    let (status, body) = app.get_path(&location).await;
    assert_eq!(
        (status, body["status"].as_str(), body["minSoc"].as_u64()),
        (200, Some("pending"), Some(30)),
        "the 202's own Location after the restart: {body}"
    );
    let (status, body) = app.get("bat-online").await;
    assert_eq!(
        (status, body["status"].as_str(), body["requestId"].clone()),
        (200, Some("applied"), applied.body["requestId"].clone()),
        "{body}"
    );
    // ...the Service Bus stand-in keeps the pending request's wake-up message...
    let queues = app.queues_page("application/json").await;
    let request_id = pending.body["requestId"].as_str().unwrap();
    assert!(
        queues.contains(request_id) && queues.contains("will apply"),
        "{queues}"
    );
    // ...and devicesim the value it applied.
    assert_eq!(app.device_value("bat-online"), Some(25));
    // The restarted platform goes on: the battery returns (its event), the request is applied.
    assert!(app.sim.set_online("bat-offline", true));
    app.wait_status(
        "bat-offline",
        "applied",
        Some(request_id),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(app.device_value("bat-offline"), Some(30));
}

/// `scripts/dev --print-keys` in `dir`: the keys it would start with.
fn dev_keys(dir: &std::path::Path, fresh: bool) -> String {
    let mut command = std::process::Command::new("bash");
    command
        .arg(crate::support::app_root().join("scripts/dev"))
        .args(["--print-keys", "--data-dir"])
        .arg(dir);
    if fresh {
        command.arg("--fresh");
    }
    let out = command.output().expect("scripts/dev");
    assert!(out.status.success(), "{out:?}");
    let keys = String::from_utf8(out.stdout).unwrap();
    assert!(
        keys.contains("FUNCTION_KEY=") && keys.contains("MASTER_KEY="),
        "{keys}"
    );
    keys
}

#[test]
fn local_keys_are_made_once_and_kept_until_fresh() {
    let dir = std::env::temp_dir().join(format!("soc-keys-{}", uuid::Uuid::new_v4().simple()));

    let first = dev_keys(&dir, false);
    let again = dev_keys(&dir, false);
    let fresh = dev_keys(&dir, true);

    assert_eq!(first, again, "a second start keeps the keys");
    assert_ne!(first, fresh, "--fresh makes new keys");
    assert_eq!(fresh, dev_keys(&dir, false), "and keeps those");
    std::fs::remove_dir_all(&dir).unwrap();
}
