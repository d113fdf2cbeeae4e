//! Following one request (`Location` of a `202`, `GET .../soc/requests/{requestId}`) through
//! devhost while everything runs on its own: re-checks, the timer sweep, expiry.

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
        // The re-check chain stops one lease before expiry; the sweep writes `expired` once
        // the request is past it.
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
