//! A deployment whose Key Vault reference did not resolve: App Service hands the handler the
//! reference text instead of the secret. The real `handler` process must say so once, clearly,
//! at start, and fail every invocation naming the setting, instead of sending the text to the
//! vendor as its API key. Nothing else is needed: the handler refuses before any I/O.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const REFERENCE: &str =
    "@Microsoft.KeyVault(SecretUri=https://kv-socset-qa.vault.azure.net/secrets/device-api-key)";

fn error_lines(logs: &str) -> Vec<&str> {
    logs.lines().filter(|l| l.contains(" ERROR ")).collect()
}

#[tokio::test]
async fn an_unresolved_key_vault_reference_is_one_error_at_start_and_fails_every_invocation() {
    let port = testkit::free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_handler"))
        .env_clear()
        .env("FUNCTIONS_CUSTOMHANDLER_PORT", port.to_string())
        // Everything else as in Azure would be valid; nothing here is ever contacted.
        .env("AzureWebJobsStorage", "UseDevelopmentStorage=true")
        .env(
            "ServiceBusConnection",
            "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true",
        )
        .env("SOC_QUEUE_NAME", "soc-settings")
        .env("DEVICE_API_BASE_URL", "http://127.0.0.1:1/api")
        .env("DEVICE_API_KEY", REFERENCE)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn handler");
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{url}/")).send().await {
            assert!(r.status().is_success(), "readiness is still answered");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let timer = json!({"Data": {"timer": {"IsPastDue": false}}, "Metadata": {}});
    let message = json!({"requestId": "0".repeat(32), "deviceId": "bat-1", "minSoc": 30,
        "requestedAt": "2026-01-01T00:00:00Z", "expiresAt": "2099-01-01T00:00:00Z"});
    let queue = json!({
        "Data": {"msg": message.to_string()},
        "Metadata": {"DeliveryCount": "1", "MessageId": "\"m-1\""}
    });
    let envelope = json!({
        "Data": {"req": {"Method": "POST", "Headers": {"Content-Type": ["application/json"]}, "Params": {"deviceId": "bat-1"},
                         "Body": "{\"minSoc\":30}"}},
        "Metadata": {}
    });
    let event = json!({"specversion": "1.0", "id": "e-1", "source": "/vendor",
        "type": "com.vendor.device.connected", "subject": "bat-1"});
    let calls = [
        (
            "POST /api/devices/bat-1/soc",
            http.post(format!("{url}/api/devices/bat-1/soc"))
                .header("content-type", "application/json")
                .body("{\"minSoc\":30}"),
        ),
        (
            "GET /api/devices/bat-1/soc",
            http.get(format!("{url}/api/devices/bat-1/soc")),
        ),
        (
            "POST /api/device-events",
            http.post(format!("{url}/api/device-events"))
                .header("content-type", "application/cloudevents+json")
                .body(event.to_string()),
        ),
        (
            "POST /SetSocHttp",
            http.post(format!("{url}/SetSocHttp")).json(&envelope),
        ),
        (
            "POST /SocQueueTrigger",
            http.post(format!("{url}/SocQueueTrigger")).json(&queue),
        ),
        (
            "POST /DrainSocTimer",
            http.post(format!("{url}/DrainSocTimer")).json(&timer),
        ),
    ];
    let invocations = calls.len();
    for (what, request) in calls {
        let res = request.send().await.unwrap();
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await.unwrap_or_default();
        // An HTTP function in envelope mode answers inside a 2xx; its HTTP output is the 500.
        let answered = body["Outputs"]["res"]["statusCode"]
            .as_u64()
            .map(|s| s as u16);
        assert_eq!(answered.unwrap_or(status), 500, "{what}: {body}");
        assert!(
            !body.to_string().contains("kv-socset-qa"),
            "{what}: the reference is not echoed: {body}"
        );
    }

    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.stderr.is_empty(),
        "nothing on stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = error_lines(&logs);
    // One at start, one per invocation; each names the setting and what is wrong.
    assert_eq!(errors.len(), 1 + invocations, "{logs}");
    assert!(
        errors[0].contains("handler started without a usable configuration"),
        "{logs}"
    );
    for line in &errors {
        assert!(
            line.contains("DEVICE_API_KEY: holds an unresolved Key Vault reference"),
            "{line}"
        );
    }
    assert!(
        !logs.contains("kv-socset-qa"),
        "the reference text stays out of the logs: {logs}"
    );
    assert!(
        !logs.contains("device API"),
        "the vendor was never called: {logs}"
    );
}
