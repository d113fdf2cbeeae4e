//! The managed-identity path end to end on loopback: no key anywhere. The handler gets
//! tokens from the identity stand-in, writes the ledger in Azurite over HTTPS with
//! `--oauth basic`, and sends wake-ups to the Service Bus stand-in, which verifies the
//! bearer tokens.

use std::time::Duration;

use crate::support::{minsoc, Access, Options, TestApp, IDENTITY_HEADER};

const STORAGE: &str = "https://storage.azure.com";
const SERVICE_BUS: &str = "https://servicebus.azure.net";

fn identity(token_lifetime: Duration, identity_header: &'static str) -> Options {
    Options {
        access: Access::ManagedIdentity {
            token_lifetime,
            identity_header,
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
async fn with_the_managed_identity_an_offline_request_is_stored_sent_and_applied() {
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
    // azure_identity refreshes a cached token with less than 20 s left; a 26 s token is
    // fresh for 6 s (room for a slow machine) and due for refresh after that.
    let app = TestApp::start_with(identity(Duration::from_secs(26), IDENTITY_HEADER)).await;
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
