//! Managed-identity endpoint stand-in: the App Service token protocol over real HTTP.

use devtools::identity::{verify_token, IdentityConfig, ManagedIdentity, API_VERSION};
use serde_json::Value;

const SECRET: &str = "identity-header-for-tests";
const KEY: &[u8] = b"signing-key-for-tests";

async fn start() -> ManagedIdentity {
    ManagedIdentity::start(
        "127.0.0.1:0".parse().unwrap(),
        IdentityConfig::new(SECRET, KEY),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_token_request_with_the_identity_header_gets_an_app_service_shaped_token() {
    let mi = start().await;
    let resource = "https://storage.azure.com/";
    let response = reqwest::Client::new()
        .get(mi.endpoint())
        .query(&[("api-version", API_VERSION), ("resource", resource)])
        .header("X-IDENTITY-HEADER", SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["resource"], resource);
    let expires_on: i64 = body["expires_on"]
        .as_str()
        .expect("expires_on is a string of Unix seconds")
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp();
    assert!((now + 3500..=now + 3600).contains(&expires_on));
    let claims = verify_token(
        body["access_token"].as_str().unwrap(),
        KEY,
        &["https://storage.azure.com"],
        now,
    )
    .unwrap();
    assert_eq!(claims["exp"], expires_on);
    assert_eq!(mi.issued_for(resource), 1);
    mi.shutdown().await;
}

#[tokio::test]
async fn a_request_without_the_header_or_resource_or_with_another_api_version_is_refused() {
    let mi = start().await;
    let http = reqwest::Client::new();
    let cases = [
        (None, Some("https://storage.azure.com/"), API_VERSION, 401),
        (
            Some("wrong"),
            Some("https://storage.azure.com/"),
            API_VERSION,
            401,
        ),
        (Some(SECRET), None, API_VERSION, 400),
        (
            Some(SECRET),
            Some("https://storage.azure.com/"),
            "2017-09-01",
            400,
        ),
    ];
    for (header, resource, version, status) in cases {
        let mut query = vec![("api-version", version)];
        if let Some(r) = resource {
            query.push(("resource", r));
        }
        let mut request = http.get(mi.endpoint()).query(&query);
        if let Some(h) = header {
            request = request.header("X-IDENTITY-HEADER", h);
        }
        assert_eq!(request.send().await.unwrap().status(), status);
    }
    assert_eq!(mi.refused(), 4);
    assert_eq!(mi.issued_for("https://storage.azure.com/"), 0);
    mi.shutdown().await;
}

#[tokio::test]
async fn an_app_with_one_user_assigned_identity_answers_only_for_its_client_id() {
    const CLIENT: &str = "7d1c2f3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";
    let mut config = IdentityConfig::new(SECRET, KEY);
    config.client_id = Some(CLIENT.into());
    config.expires_on_as_number = true;
    let mi = ManagedIdentity::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let resource = "https://servicebus.azure.net";
    let ask = |client_id: Option<&'static str>| {
        let mut query = vec![("api-version", API_VERSION), ("resource", resource)];
        query.extend(client_id.map(|c| ("client_id", c)));
        http.get(mi.endpoint())
            .query(&query)
            .header("X-IDENTITY-HEADER", SECRET)
            .send()
    };
    let response = ask(Some(CLIENT)).await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["client_id"], CLIENT);
    assert!(body["expires_on"].is_i64(), "{body}");
    // The system-assigned identity does not exist; another client id is not assigned.
    assert_eq!(ask(None).await.unwrap().status(), 400);
    let other = "00000000-0000-4000-8000-000000000000";
    assert_eq!(ask(Some(other)).await.unwrap().status(), 400);
    assert_eq!((mi.issued_for(resource), mi.refused()), (1, 2));

    // An app with only the system-assigned identity refuses any client id.
    let plain = start().await;
    let response = http
        .get(plain.endpoint())
        .query(&[
            ("api-version", API_VERSION),
            ("resource", resource),
            ("client_id", CLIENT),
        ])
        .header("X-IDENTITY-HEADER", SECRET)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    mi.shutdown().await;
    plain.shutdown().await;
}
