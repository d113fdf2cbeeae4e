//! The app's event topic on Azure Event Grid ([`crate::ports::Notifier`]).
//!
//! REST contract (Event Grid "Publish CloudEvents", CloudEvents 1.0 input schema):
//! `POST https://{topic}.{region}-1.eventgrid.azure.net/api/events` with the events as a JSON
//! array and `Content-Type: application/cloudevents-batch+json; charset=utf-8`; the topic
//! answers `200` when it accepted all of them. The endpoint is used exactly as configured
//! (`SOC_NOTIFY_TOPIC_ENDPOINT`).
//!
//! Authentication is the topic's access key (`aeg-sas-key`, local runs) or the app's managed
//! identity (`Authorization: Bearer {Entra token}` for [`EVENT_GRID_SCOPE`]; the identity needs
//! the "EventGrid Data Sender" role on the topic).
//!
//! Answers map to [`NotifyError`]: `2xx` is accepted; a network failure, a timeout, `408`,
//! `429` and `5xx` are [`NotifyError::Unavailable`] (with the topic's `Retry-After`);
//! every other answer (`400`, `401`, `403`, `404`, `413`, other `4xx`, a redirect, which is
//! never followed so the key goes nowhere else) is [`NotifyError::Refused`].
//!
//! Invariants: the key and the token only ever go into their header (marked sensitive);
//! errors name the status and its kind, never the key, a token or the topic's answer, and
//! `Debug` shows neither.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use chrono::Utc;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::StatusCode;

use super::device_api::retry_after;
use super::identity::transport_builder;
use crate::domain::notification::Notification;
use crate::ports::{Notifier, NotifyError};
use crate::secret::SecretString;

/// Scope of Event Grid data-plane tokens.
pub const EVENT_GRID_SCOPE: &str = "https://eventgrid.azure.net/.default";

/// Timeout of one publish (connect + request + response), as the other Azure adapters.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Content type of a batch of structured CloudEvents.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json; charset=utf-8";

/// Header of the topic's access key.
pub const KEY_HEADER: &str = "aeg-sas-key";

#[derive(Debug, thiserror::Error)]
pub enum EventGridConfigError {
    #[error("SOC_NOTIFY_TOPIC_ENDPOINT: must be an absolute http(s) URL")]
    Endpoint,
    #[error("SOC_NOTIFY_TOPIC_KEY: must be a non-empty visible ASCII string")]
    Key,
    #[error("event topic client could not be built: {0}")]
    Client(String),
}

/// How requests to the topic are authorised.
enum Auth {
    Key(SecretString),
    Identity(Arc<dyn TokenCredential>),
}

/// Publishes to one Event Grid topic.
pub struct EventGridNotifier {
    http: reqwest::Client,
    endpoint: url::Url,
    auth: Auth,
    source: String,
    timeout: Duration,
}

impl std::fmt::Debug for EventGridNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match self.auth {
            Auth::Key(_) => "key <redacted>",
            Auth::Identity(_) => "managed identity",
        };
        f.debug_struct("EventGridNotifier")
            .field("endpoint", &self.endpoint.as_str())
            .field("auth", &auth)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl EventGridNotifier {
    /// Publishes with the topic's access key (local runs). `source` is the CloudEvents
    /// `source` of every event. Does no I/O.
    pub fn with_key(
        endpoint: &url::Url,
        key: &SecretString,
        source: &str,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, EventGridConfigError> {
        let k = key.expose();
        if k.is_empty() || !k.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(EventGridConfigError::Key);
        }
        Self::new(
            endpoint,
            Auth::Key(key.clone()),
            source,
            PUBLISH_TIMEOUT,
            extra_ca_pem,
        )
    }

    /// Publishes with the app's managed identity. Does no I/O: the first publish fetches
    /// the token.
    pub fn with_identity(
        endpoint: &url::Url,
        credential: Arc<dyn TokenCredential>,
        source: &str,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, EventGridConfigError> {
        Self::new(
            endpoint,
            Auth::Identity(credential),
            source,
            PUBLISH_TIMEOUT,
            extra_ca_pem,
        )
    }

    fn new(
        endpoint: &url::Url,
        auth: Auth,
        source: &str,
        timeout: Duration,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, EventGridConfigError> {
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(EventGridConfigError::Endpoint);
        }
        let http = transport_builder(timeout, extra_ca_pem)
            .map_err(EventGridConfigError::Client)?
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("soc-settings/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| EventGridConfigError::Client("HTTP client could not be built".into()))?;
        Ok(Self {
            http,
            endpoint: endpoint.clone(),
            auth,
            source: source.to_string(),
            timeout,
        })
    }

    /// The header that authorises one request: the key, or a bearer token fetched (or
    /// taken from the credential's cache) now.
    async fn authorization(&self) -> Result<(&'static str, HeaderValue), NotifyError> {
        let (name, value) = match &self.auth {
            Auth::Key(key) => (KEY_HEADER, key.expose().to_string()),
            Auth::Identity(credential) => {
                let token = credential
                    .get_token(&[EVENT_GRID_SCOPE])
                    .await
                    .map_err(|e| NotifyError::Unavailable {
                        // The credential's message may quote the endpoint's answer; its kind only.
                        reason: format!(
                            "no token from the managed identity endpoint ({})",
                            e.kind()
                        ),
                        retry_after: None,
                    })?;
                (
                    AUTHORIZATION.as_str(),
                    format!("Bearer {}", token.token.secret()),
                )
            }
        };
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| NotifyError::Refused(format!("{name}: not a valid header value")))?;
        value.set_sensitive(true);
        Ok((name, value))
    }

    /// An unavailable topic for a failed send, from the error's kind only.
    fn send_error(&self, err: &reqwest::Error) -> NotifyError {
        let reason = if err.is_timeout() {
            format!("publish timed out after {} ms", self.timeout.as_millis())
        } else if err.is_connect() {
            "publish: could not connect".to_string()
        } else {
            "publish: request failed".to_string()
        };
        NotifyError::Unavailable {
            reason,
            retry_after: None,
        }
    }
}

/// What an answer other than `2xx` means.
fn classify(status: StatusCode, headers: &reqwest::header::HeaderMap) -> NotifyError {
    let code = status.as_u16();
    let unavailable = |kind: &str| NotifyError::Unavailable {
        reason: format!("HTTP {code} ({kind})"),
        retry_after: retry_after(headers, Utc::now()),
    };
    match code {
        408 => unavailable("request timeout"),
        429 => unavailable("throttled"),
        _ if status.is_server_error() => unavailable("topic error"),
        400 => NotifyError::Refused("HTTP 400 (events malformed)".into()),
        401 => NotifyError::Refused("HTTP 401 (key or token not accepted)".into()),
        403 => NotifyError::Refused(
            "HTTP 403 (not allowed to publish: the identity needs EventGrid Data Sender on the topic)"
                .into(),
        ),
        404 => NotifyError::Refused("HTTP 404 (no such topic endpoint)".into()),
        413 => NotifyError::Refused("HTTP 413 (batch too large)".into()),
        _ if status.is_redirection() => {
            NotifyError::Refused(format!("HTTP {code} (redirect, not followed)"))
        }
        _ => NotifyError::Refused(format!("HTTP {code} (unexpected answer)")),
    }
}

#[async_trait]
impl Notifier for EventGridNotifier {
    async fn publish(&self, events: &[Notification]) -> Result<(), NotifyError> {
        if events.is_empty() {
            return Ok(());
        }
        let body: Vec<serde_json::Value> =
            events.iter().map(|n| n.cloud_event(&self.source)).collect();
        let body = serde_json::to_vec(&body)
            .map_err(|_| NotifyError::Refused("events could not be serialised".into()))?;
        let (name, value) = self.authorization().await?;
        let response = self
            .http
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, BATCH_CONTENT_TYPE)
            .header(name, value)
            .body(body)
            .send()
            .await
            .map_err(|e| self.send_error(&e))?;
        let status = response.status();
        tracing::debug!(
            events = events.len(),
            status = status.as_u16(),
            "event topic: publish"
        );
        if status.is_success() {
            Ok(())
        } else {
            Err(classify(status, response.headers()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::history::ShownStatus;
    use crate::domain::{DeviceId, RequestId};
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode as AxumStatus};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use axum::Router;
    use azure_core::auth::{AccessToken, Secret};
    use chrono::TimeZone;
    use serde_json::{json, Value};
    use std::sync::Mutex;

    const KEY: &str = "topic-key-3c9e1a7f";
    const TOKEN: &str = "eyJ0b2tlbi1mb3ItZXZlbnQtZ3JpZA";
    const SOURCE: &str = "https://soc-app.azurewebsites.net";

    /// One request the stand-in topic got.
    #[derive(Debug, Clone)]
    struct Seen {
        headers: HeaderMap,
        body: String,
    }

    /// The stand-in topic: records requests, answers `answer` (status, `Retry-After`).
    #[derive(Clone)]
    struct Topic {
        seen: Arc<Mutex<Vec<Seen>>>,
        answer: Arc<Mutex<(u16, Option<&'static str>)>>,
        delay: Duration,
    }

    async fn events(State(t): State<Topic>, headers: HeaderMap, body: String) -> Response {
        t.seen.lock().unwrap().push(Seen { headers, body });
        tokio::time::sleep(t.delay).await;
        let (status, retry) = *t.answer.lock().unwrap();
        let status = AxumStatus::from_u16(status).unwrap();
        match retry {
            Some(r) => (status, [("retry-after", r)], "topic says no").into_response(),
            None => (status, "topic says no").into_response(),
        }
    }

    async fn topic(delay: Duration) -> (url::Url, Topic) {
        let t = Topic {
            seen: Arc::default(),
            answer: Arc::new(Mutex::new((200, None))),
            delay,
        };
        let app = Router::new()
            .route("/api/events", post(events))
            .with_state(t.clone());
        let addr = crate::adapters::serve_on_loopback(app).await;
        let url = url::Url::parse(&format!("http://{addr}/api/events")).unwrap();
        (url, t)
    }

    fn keyed(endpoint: &url::Url) -> EventGridNotifier {
        EventGridNotifier::with_key(endpoint, &SecretString::new(KEY), SOURCE, None).unwrap()
    }

    /// A credential that hands out [`TOKEN`] and records the scopes it was asked for.
    #[derive(Debug, Default)]
    struct FixedToken {
        scopes: Mutex<Vec<String>>,
        fail: bool,
    }

    #[async_trait]
    impl TokenCredential for FixedToken {
        async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
            self.scopes
                .lock()
                .unwrap()
                .extend(scopes.iter().map(|s| s.to_string()));
            if self.fail {
                return Err(azure_core::Error::message(
                    azure_core::error::ErrorKind::Credential,
                    format!("endpoint said {TOKEN}"),
                ));
            }
            Ok(AccessToken::new(
                Secret::new(TOKEN),
                time::OffsetDateTime::now_utc() + Duration::from_secs(3600),
            ))
        }

        async fn clear_cache(&self) -> azure_core::Result<()> {
            Ok(())
        }
    }

    fn settled(device: &str, request: &str, status: ShownStatus, seq: u64) -> Notification {
        let device = DeviceId::parse(device).unwrap();
        let request = RequestId::from_stored(request);
        Notification::request_settled(
            &device,
            &request,
            status,
            seq,
            Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, seq as u32)
                .unwrap(),
            &json!({"requestId": request.as_str(), "status": status.as_str()}),
        )
    }

    fn batch() -> Vec<Notification> {
        vec![
            settled(
                "bat-1",
                "0123456789abcdef0123456789abcdef",
                ShownStatus::Superseded,
                4,
            ),
            settled(
                "bat-1",
                "fedcba9876543210fedcba9876543210",
                ShownStatus::Applied,
                5,
            ),
            settled(
                "bat-2",
                "00112233445566778899aabbccddeeff",
                ShownStatus::Expired,
                1,
            ),
        ]
    }

    fn header(seen: &Seen, name: &str) -> Option<String> {
        seen.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn a_batch_is_posted_as_cloud_events_in_order_with_the_batch_content_type_and_the_key() {
        let (url, t) = topic(Duration::ZERO).await;
        let events = batch();
        keyed(&url).publish(&events).await.unwrap();
        let seen = t.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "one request for the batch");
        assert_eq!(
            header(&seen[0], "content-type").as_deref(),
            Some(BATCH_CONTENT_TYPE)
        );
        assert_eq!(header(&seen[0], KEY_HEADER).as_deref(), Some(KEY));
        assert_eq!(header(&seen[0], "authorization"), None);
        let body: Value = serde_json::from_str(&seen[0].body).unwrap();
        let body = body.as_array().expect("a JSON array");
        assert_eq!(body.len(), events.len());
        for (event, n) in body.iter().zip(&events) {
            assert_eq!(*event, n.cloud_event(SOURCE));
            for attribute in ["specversion", "id", "source", "type"] {
                assert!(
                    event[attribute].as_str().is_some_and(|v| !v.is_empty()),
                    "{attribute} in {event}"
                );
            }
            assert_eq!(event["specversion"], "1.0");
            assert_eq!(event["source"], SOURCE);
            assert_eq!(event["id"], n.id.as_str());
        }
        let ids: Vec<&str> = body.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [
                "0123456789abcdef0123456789abcdef.superseded",
                "fedcba9876543210fedcba9876543210.applied",
                "00112233445566778899aabbccddeeff.expired",
            ]
        );
    }

    #[tokio::test]
    async fn the_managed_identity_sends_a_bearer_token_for_the_event_grid_scope() {
        let (url, t) = topic(Duration::ZERO).await;
        let credential = Arc::new(FixedToken::default());
        let notifier =
            EventGridNotifier::with_identity(&url, credential.clone(), SOURCE, None).unwrap();
        notifier.publish(&batch()).await.unwrap();
        let seen = t.seen.lock().unwrap().clone();
        assert_eq!(
            header(&seen[0], "authorization"),
            Some(format!("Bearer {TOKEN}"))
        );
        assert_eq!(header(&seen[0], KEY_HEADER), None);
        assert_eq!(*credential.scopes.lock().unwrap(), [EVENT_GRID_SCOPE]);
        assert!(!format!("{notifier:?}").contains(TOKEN));
    }

    #[tokio::test]
    async fn no_token_is_unavailable_and_the_error_names_no_token() {
        let (url, t) = topic(Duration::ZERO).await;
        let credential = Arc::new(FixedToken {
            fail: true,
            ..FixedToken::default()
        });
        let err = EventGridNotifier::with_identity(&url, credential, SOURCE, None)
            .unwrap()
            .publish(&batch())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, NotifyError::Unavailable { reason, retry_after: None } if reason.contains("managed identity")),
            "{err:?}"
        );
        assert!(!err.to_string().contains(TOKEN), "{err}");
        assert!(
            t.seen.lock().unwrap().is_empty(),
            "nothing sent unauthorised"
        );
    }

    #[tokio::test]
    async fn an_empty_batch_sends_nothing() {
        let (url, t) = topic(Duration::ZERO).await;
        keyed(&url).publish(&[]).await.unwrap();
        let credential = Arc::new(FixedToken::default());
        EventGridNotifier::with_identity(&url, credential.clone(), SOURCE, None)
            .unwrap()
            .publish(&[])
            .await
            .unwrap();
        assert!(t.seen.lock().unwrap().is_empty());
        assert!(
            credential.scopes.lock().unwrap().is_empty(),
            "no token fetched"
        );
    }

    #[tokio::test]
    async fn each_status_class_maps_to_accepted_unavailable_or_refused() {
        let (url, t) = topic(Duration::ZERO).await;
        let notifier = keyed(&url);
        for (status, says) in [
            (200, "ok"),
            (201, "ok"),
            (204, "ok"),
            (408, "unavailable"),
            (429, "unavailable"),
            (500, "unavailable"),
            (502, "unavailable"),
            (503, "unavailable"),
            (504, "unavailable"),
            (400, "refused"),
            (401, "refused"),
            (403, "refused"),
            (404, "refused"),
            (413, "refused"),
            (409, "refused"),
            (422, "refused"),
            (307, "refused"),
        ] {
            *t.answer.lock().unwrap() = (status, Some("x"));
            let got = notifier.publish(&batch()).await;
            let kind = match &got {
                Ok(()) => "ok",
                Err(NotifyError::Unavailable { .. }) => "unavailable",
                Err(NotifyError::Refused(_)) => "refused",
            };
            assert_eq!(kind, says, "HTTP {status}: {got:?}");
            if let Err(e) = got {
                let text = format!("{e} {e:?}");
                assert!(text.contains(&status.to_string()), "{text}");
                assert!(
                    !text.contains(KEY) && !text.contains("topic says no"),
                    "{text}"
                );
            }
        }
    }

    #[tokio::test]
    async fn retry_after_seconds_are_kept_and_absent_or_unreadable_ones_are_none() {
        let (url, t) = topic(Duration::ZERO).await;
        let notifier = keyed(&url);
        for (status, retry, want) in [
            (429, Some("7"), Some(Duration::from_secs(7))),
            (503, Some(" 120 "), Some(Duration::from_secs(120))),
            (500, Some("soon"), None),
            (502, None, None),
        ] {
            *t.answer.lock().unwrap() = (status, retry);
            let err = notifier.publish(&batch()).await.unwrap_err();
            assert!(
                matches!(&err, NotifyError::Unavailable { retry_after, .. } if *retry_after == want),
                "{status} {retry:?}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_so_the_key_goes_nowhere_else() {
        let (elsewhere, other) = topic(Duration::ZERO).await;
        let app = Router::new().route(
            "/api/events",
            post(move || {
                let to = elsewhere.to_string();
                async move { (AxumStatus::TEMPORARY_REDIRECT, [("location", to)]).into_response() }
            }),
        );
        let addr = crate::adapters::serve_on_loopback(app).await;
        let redirecting = url::Url::parse(&format!("http://{addr}/api/events")).unwrap();
        let err = keyed(&redirecting).publish(&batch()).await.unwrap_err();
        assert_eq!(
            err,
            NotifyError::Refused("HTTP 307 (redirect, not followed)".into())
        );
        assert!(
            other.seen.lock().unwrap().is_empty(),
            "the key went nowhere else"
        );
    }

    #[tokio::test]
    async fn a_slow_topic_times_out_and_a_closed_port_is_unavailable() {
        let (url, _) = topic(Duration::from_secs(5)).await;
        let notifier = EventGridNotifier::new(
            &url,
            Auth::Key(SecretString::new(KEY)),
            SOURCE,
            Duration::from_millis(300),
            None,
        )
        .unwrap();
        let started = std::time::Instant::now();
        let err = notifier.publish(&batch()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(&err, NotifyError::Unavailable { reason, .. } if reason.contains("timed out")),
            "{err:?}"
        );

        let port = devtools::free_port().unwrap();
        let closed = url::Url::parse(&format!("http://127.0.0.1:{port}/api/events")).unwrap();
        let err = keyed(&closed).publish(&batch()).await.unwrap_err();
        assert!(
            matches!(&err, NotifyError::Unavailable { reason, .. } if reason.contains("connect")),
            "{err:?}"
        );
        assert!(!format!("{err:?}").contains(KEY));
    }

    #[test]
    fn debug_hides_the_key() {
        let url =
            url::Url::parse("https://topic.westeurope-1.eventgrid.azure.net/api/events").unwrap();
        let shown = format!("{:?}", keyed(&url));
        assert!(!shown.contains(KEY), "{shown}");
        assert!(
            shown.contains("eventgrid.azure.net") && shown.contains(SOURCE),
            "{shown}"
        );
    }

    #[test]
    fn bad_endpoints_and_keys_are_refused_without_echoing_them() {
        let url =
            url::Url::parse("https://topic.westeurope-1.eventgrid.azure.net/api/events").unwrap();
        for key in ["", "has space", "line\nbreak"] {
            let err = EventGridNotifier::with_key(&url, &SecretString::new(key), SOURCE, None)
                .unwrap_err();
            assert!(matches!(err, EventGridConfigError::Key), "{key:?}");
            assert!(key.is_empty() || !err.to_string().contains(key));
        }
        for endpoint in ["ftp://topic/api/events", "urn:topic", "file:///api/events"] {
            let url = url::Url::parse(endpoint).unwrap();
            assert!(
                matches!(
                    EventGridNotifier::with_key(&url, &SecretString::new(KEY), SOURCE, None),
                    Err(EventGridConfigError::Endpoint)
                ),
                "{endpoint}"
            );
        }
    }
}
