//! Following one request (`Location` of a `202`, `GET .../soc/requests/{requestId}`) through
//! devhost while everything runs on its own: re-checks, the timer sweep, expiry; and
//! cancelling one (`DELETE` of the same path).

use devtools::devicesim::DevicePatch;
use serde_json::Value;

use crate::support::{secs, Resp, Setup};

fn location_of(r: &Resp) -> String {
    assert_eq!(r.status, 202, "{}", r.body);
    let location = r.headers["location"].to_str().unwrap().to_string();
    assert_eq!(
        location,
        format!(
            "/api/devices/{}/soc/requests/{}",
            r.body["deviceId"].as_str().unwrap(),
            r.body["requestId"].as_str().unwrap()
        )
    );
    location
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_follows_its_own_request_to_superseded_applied_failed_and_expired() {
    let app = Setup::new()
        // Longer than one lease (35 s with the suite's 1 s device timeout): a request that
        // close to its expiry is expired rather than put on the device (README, the bounds).
        .set("SOC_REQUEST_TTL_SECONDS", "50")
        // The re-check chain's last message is due one lease before expiry and writes
        // `expired` (the sweep does, a grace later, if that message is lost).
        .set("DRAIN_SOC_SCHEDULE", "*/2 * * * * *")
        .start()
        .await;
    app.sim.add_device("bat-1", false);

    // A waits; B replaces it while it waits.
    let a = app.post("bat-1", r#"{"minSoc":10}"#).await;
    let a_at = location_of(&a);
    let shown = app.wait_request_status(&a_at, "pending", secs(5)).await;
    assert_eq!(shown["requestId"], a.body["requestId"]);
    let b = app.post("bat-1", r#"{"minSoc":20}"#).await;
    let b_at = location_of(&b);
    let shown = app.wait_request_status(&a_at, "superseded", secs(5)).await;
    assert_eq!(shown["supersededBy"], b.body["requestId"]);

    // The battery returns: the re-check applies B; A stays superseded.
    app.sim.set_online("bat-1", true);
    let shown = app.wait_request_status(&b_at, "applied", secs(15)).await;
    assert!(shown["appliedAt"].is_string(), "{shown}");
    assert_eq!(app.get_path(&a_at).await.1["status"], "superseded");
    assert_eq!(app.applied_values("bat-1"), vec![20]);

    // C: the device cloud refuses the value when the battery is back.
    app.sim.set_online("bat-1", false);
    let c = app.post("bat-1", r#"{"minSoc":3}"#).await;
    let c_at = location_of(&c);
    app.sim.patch(
        "bat-1",
        &DevicePatch {
            online: Some(true),
            reject: Some(Some("minSoc below the vendor floor of 10".into())),
            ..Default::default()
        },
    );
    let shown = app.wait_request_status(&c_at, "failed", secs(15)).await;
    assert!(
        shown["lastError"]
            .as_str()
            .unwrap()
            .contains("vendor floor"),
        "{shown}"
    );

    // D: the battery stays away past the request's lifetime.
    app.sim.patch(
        "bat-1",
        &DevicePatch {
            online: Some(false),
            reject: Some(None),
            ..Default::default()
        },
    );
    let d = app.post("bat-1", r#"{"minSoc":40}"#).await;
    let d_at = location_of(&d);
    let shown: Value = app.wait_request_status(&d_at, "expired", secs(75)).await;
    assert_eq!(shown["requestId"], d.body["requestId"]);

    // Each still says what became of it; the device's latest request is D.
    assert_eq!(app.get_path(&b_at).await.1["status"], "applied");
    assert_eq!(app.get_path(&c_at).await.1["status"], "failed");
    assert_eq!(app.get("bat-1").await.1["requestId"], d.body["requestId"]);
    assert_eq!(app.applied_values("bat-1"), vec![20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_is_never_applied_even_after_the_battery_returns() {
    // Re-checks every second or so, the sweep every 3 s, connection events on.
    let app = Setup::new().events().start().await;
    app.sim.add_device("bat-1", false);

    let a = app.post("bat-1", r#"{"minSoc":30}"#).await;
    let a_at = location_of(&a);
    let cancelled = app.delete_path(&a_at).await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(cancelled.body["requestId"], a.body["requestId"]);
    let again = app.delete_path(&a_at).await;
    assert_eq!(
        (again.status, &again.body["status"]),
        (200, &"cancelled".into())
    );
    assert_eq!(app.get_path(&a_at).await.1["status"], "cancelled");
    assert_eq!(app.get("bat-1").await.1["status"], "cancelled");
    let tried_before = app.history("bat-1");
    assert_eq!(
        tried_before.len(),
        1,
        "the POST's own try: {tried_before:?}"
    );

    // The battery returns (its connection event, the re-checks already scheduled and
    // the sweep all run): nothing is applied.
    app.sim.set_online("bat-1", true);
    tokio::time::sleep(secs(10)).await;
    let history = app.history("bat-1");
    assert_eq!(
        history.len(),
        1,
        "a cancelled request is never PUT again: {history:?}"
    );
    assert!(app.applied_values("bat-1").is_empty());
    assert_eq!(app.get_path(&a_at).await.1["status"], "cancelled");

    // Applied requests cannot be cancelled; unknown ones are not found.
    let b = app.post("bat-1", r#"{"minSoc":40}"#).await;
    assert_eq!(b.status, 200, "{}", b.body);
    let b_at = format!(
        "/api/devices/bat-1/soc/requests/{}",
        b.body["requestId"].as_str().unwrap()
    );
    let refused = app.delete_path(&b_at).await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(refused.body["requestStatus"], "applied");
    let unknown = app
        .delete_path(&format!(
            "/api/devices/bat-1/soc/requests/{}",
            "0".repeat(32)
        ))
        .await;
    assert_eq!(unknown.status, 404);
    assert_eq!(app.applied_values("bat-1"), vec![40]);
}
