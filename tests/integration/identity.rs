//! The managed-identity path end to end on loopback: no key anywhere. The handler gets
//! tokens from the identity stand-in, writes the ledger in Azurite over HTTPS with
//! `--oauth basic`, and sends wake-ups to the Service Bus stand-in, which verifies the
//! bearer tokens. As in Azure (infra/modules/identity.bicep), the app has one user-assigned
//! identity and no system-assigned one: the stand-in answers only a request naming its
//! client id, which the handler reads from the `__clientId` settings.

use std::time::Duration;

use crate::support::{minsoc, Access, Options, TestApp, IDENTITY_HEADER};

const STORAGE: &str = "https://storage.azure.com";
const SERVICE_BUS: &str = "https://servicebus.azure.net";

/// The user-assigned identity's client id.
const CLIENT_ID: &str = "3f2b6c1d-8e4a-4b7c-9d0e-1a2b3c4d5e6f";

fn identity(token_lifetime: Duration, identity_header: &'static str) -> Options {
    Options {
        access: Access::ManagedIdentity {
            token_lifetime,
            identity_header,
            client_id: Some(CLIENT_ID),
            expires_on_as_number: false,
        },
        ..Default::default()
    }
}

fn tokens(app: &TestApp, resource: &str) -> usize {
    app.identity
        .as_ref()
        .expect("identity stand-in")
        .issued_for(resource)
}

#[tokio::test]
async fn with_the_user_assigned_identity_an_offline_request_is_stored_sent_and_applied() {
    let app = TestApp::start_with(identity(Duration::from_secs(3600), IDENTITY_HEADER)).await;
    app.device("bat-1", false);

    let (status, _, body) = app.post_soc("bat-1", &minsoc(30)).await;
    assert_eq!(status, 202, "{body}");
    let messages = app.messages();
    assert_eq!(
        messages.len(),
        1,
        "the stand-in accepted the bearer-authenticated send"
    );
    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(record["status"], "pending");

    app.set_online("bat-1", true);
    let (status, out) = app.invoke_queue(&app.lock(&messages[0])).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(app.applied_values("bat-1"), vec![30]);
    let (_, record) = app.get_soc("bat-1").await;
    assert_eq!(record["status"], "applied");

    // One token per resource for the whole run: the credential caches them.
    assert_eq!(tokens(&app, STORAGE), 1);
    assert_eq!(tokens(&app, SERVICE_BUS), 1);
}

#[tokio::test]
async fn a_token_near_its_expiry_is_replaced_before_it_is_used() {
    // The credential refreshes a cached token with less than 20 s left; a 26 s token is
    // fresh for 6 s (room for a slow machine) and due for refresh after that. The stand-in
    // sends `expires_on` as a number here (App Service sends a string): both are read.
    let mut options = identity(Duration::from_secs(26), IDENTITY_HEADER);
    if let Access::ManagedIdentity {
        expires_on_as_number,
        ..
    } = &mut options.access
    {
        *expires_on_as_number = true;
    }
    let app = TestApp::start_with(options).await;
    app.device("bat-1", true);
    let (status, _, body) = app.post_soc("bat-1", &minsoc(40)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = app.get_soc("bat-1").await;
    assert_eq!(status, 200);
    assert_eq!(tokens(&app, STORAGE), 1, "reused while fresh");

    tokio::time::sleep(Duration::from_millis(7500)).await;
    let (status, record) = app.get_soc("bat-1").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["status"], "applied");
    assert_eq!(tokens(&app, STORAGE), 2, "refreshed before it expired");
}

#[tokio::test]
async fn an_identity_endpoint_that_refuses_is_a_503_and_nothing_is_stored_or_sent() {
    let app = TestApp::start_with(identity(
        Duration::from_secs(3600),
        "not-the-platform-secret",
    ))
    .await;
    app.device("bat-1", false);

    let (status, _, body) = app.post_soc("bat-1", &minsoc(30)).await;
    assert_eq!(status, 503, "{body}");
    assert!(app.messages().is_empty());
    assert!(app.identity.as_ref().unwrap().refused() > 0);
    assert_eq!(tokens(&app, STORAGE), 0);
    assert!(app.history("bat-1").is_empty(), "the device was not called");
}

#[tokio::test]
async fn without_a_client_id_the_system_assigned_identity_is_asked_for() {
    let app = TestApp::start_with(Options {
        access: Access::ManagedIdentity {
            token_lifetime: Duration::from_secs(3600),
            identity_header: IDENTITY_HEADER,
            client_id: None,
            expires_on_as_number: false,
        },
        ..Default::default()
    })
    .await;
    app.device("bat-1", true);
    let (status, _, body) = app.post_soc("bat-1", &minsoc(55)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(tokens(&app, STORAGE), 1);
    assert_eq!(app.identity.as_ref().unwrap().refused(), 0);
}
