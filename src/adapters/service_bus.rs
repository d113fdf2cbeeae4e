//! The settings queue on Azure Service Bus, through `azure_messaging_servicebus`'s
//! REST [`QueueClient`].
//!
//! REST contract (Service Bus "Send Message"): `POST https://{ns}.servicebus.windows.net/{queue}/messages`,
//! `Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=..`, the message body as the
//! HTTP body, its content type as `Content-Type`, and system properties as a JSON
//! `BrokerProperties` header. The broker answers `201 Created`; any 2xx is accepted here.
//!
//! Authentication is either the connection string's SAS key or the app's managed identity
//! (`Authorization: Bearer {Entra token}` for `https://servicebus.azure.net`, which the REST API
//! accepts in place of a SAS token).
//!
//! Three things the SDK does not do the way we need, and how they are handled:
//! - It only signs SAS tokens. With the managed identity, the [`BearerHttpClient`] wrapped
//!   around the transport replaces the SDK's `Authorization` header with a bearer token (the
//!   SDK is given a placeholder key, so its signature is never sent anywhere).
//! - Its host is hard-coded to `*.servicebus.windows.net`. For `UseDevelopmentEmulator=true`,
//!   or an identity-based namespace on a loopback host (a local stand-in), the
//!   [`RedirectingHttpClient`] wrapped around the transport rewrites scheme, host and port
//!   (plain HTTP) before each request.
//! - Its `SettableBrokerProperties` writes `ScheduledEnqueueTimeUtc` as RFC 2822 with a
//!   numeric `+0000` zone (via the `time` crate), while the REST reference shows RFC 1123
//!   (`Sun, 06 Nov 1994 08:49:37 GMT`). We therefore serialise `BrokerProperties` ourselves
//!   and pass it through the SDK's `custom_properties` (which become request headers),
//!   leaving the SDK's own `broker_properties` empty so only one such header is sent.

use async_trait::async_trait;
use azure_core::{error::ErrorKind, HttpClient};
use azure_messaging_servicebus::service_bus::{QueueClient, SendMessageOptions};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::connection_string::ServiceBusConnection;
use super::identity::{transport, BearerHttpClient, SERVICE_BUS_SCOPE};
use crate::ports::{OutgoingMessage, QueueError, SettingsQueue};
use azure_core::auth::TokenCredential;
use std::path::Path;

/// Timeout of one send (connect + request + response).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// `BrokerProperties` as the REST API expects them.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
struct BrokerProperties<'a> {
    message_id: &'a str,
    /// Whole seconds (rounded down, so the message never outlives the request).
    time_to_live: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scheduled_enqueue_time_utc: Option<String>,
}

/// RFC 1123 date as used in HTTP and by the Service Bus REST API.
pub fn rfc1123(at: DateTime<Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// Sends wake-up messages to one queue.
#[derive(Debug, Clone)]
pub struct ServiceBusQueue {
    client: QueueClient,
    queue: String,
}

/// Key name and key the SDK signs with when the bearer transport replaces its signature.
const UNUSED_SAS_KEY_NAME: &str = "managed-identity";
const UNUSED_SAS_KEY: &str = "bm90LXVzZWQtdGhlLWJlYXJlci10b2tlbi1pcy1zZW50";

impl ServiceBusQueue {
    /// Builds the sender for a connection string (SAS). Does no I/O.
    pub fn new(
        connection: &ServiceBusConnection,
        queue: &str,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, QueueError> {
        let mut http = http(extra_ca_pem)?;
        if let Some(base) = &connection.emulator_base {
            http = Arc::new(RedirectingHttpClient::new(http, base.clone()));
        }
        Self::build(
            http,
            &connection.namespace,
            queue,
            &connection.key_name,
            connection.key.expose(),
        )
    }

    /// Builds the sender for the app's managed identity and a namespace host
    /// (`ns.servicebus.windows.net`; a loopback host is a local stand-in on plain HTTP).
    /// Does no I/O: the first send fetches the token.
    pub fn with_identity(
        namespace_host: &str,
        queue: &str,
        credential: Arc<dyn TokenCredential>,
        extra_ca_pem: Option<&Path>,
    ) -> Result<Self, QueueError> {
        let base = url::Url::parse(&format!("https://{namespace_host}/"))
            .ok()
            .filter(|u| u.path() == "/" && !namespace_host.contains("://"))
            .and_then(|u| u.host_str().map(|h| (h.to_string(), u.port())))
            .ok_or_else(|| QueueError::Local("namespace is not a host name".into()))?;
        let (host, port) = base;
        let mut http: Arc<dyn HttpClient> = Arc::new(BearerHttpClient::new(
            http(extra_ca_pem)?,
            credential,
            SERVICE_BUS_SCOPE,
        ));
        if matches!(host.as_str(), "127.0.0.1" | "localhost" | "[::1]") {
            let local = url::Url::parse(&format!("http://{host}:{}", port.unwrap_or(80)))
                .map_err(|_| QueueError::Local("namespace is not a host name".into()))?;
            http = Arc::new(RedirectingHttpClient::new(http, local));
        }
        let namespace = host.split('.').next().unwrap_or("local").to_string();
        Self::build(http, &namespace, queue, UNUSED_SAS_KEY_NAME, UNUSED_SAS_KEY)
    }

    fn build(
        http: Arc<dyn HttpClient>,
        namespace: &str,
        queue: &str,
        key_name: &str,
        key: &str,
    ) -> Result<Self, QueueError> {
        let client = QueueClient::new(http, namespace, queue, key_name, key.to_string())
            .map_err(|_| QueueError::Local("Service Bus client could not be built".into()))?;
        Ok(Self {
            client,
            queue: queue.to_string(),
        })
    }
}

fn http(extra_ca_pem: Option<&Path>) -> Result<Arc<dyn HttpClient>, QueueError> {
    let client = transport(SEND_TIMEOUT, extra_ca_pem).map_err(QueueError::Local)?;
    Ok(Arc::new(client))
}

/// The JSON body and `BrokerProperties` of one message.
fn parts(message: &OutgoingMessage) -> Result<(String, BrokerProperties<'_>), QueueError> {
    let body = serde_json::to_string(&message.body)
        .map_err(|e| QueueError::Local(format!("message body could not be serialised: {e}")))?;
    let properties = BrokerProperties {
        message_id: &message.message_id,
        time_to_live: message.ttl.as_secs(),
        scheduled_enqueue_time_utc: message.scheduled_at.map(rfc1123),
    };
    Ok((body, properties))
}

/// Content type of a "Send Message Batch" body.
pub const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.servicebus.json";

/// One item of a batch body: `{"Body", "BrokerProperties"}` (the body a string).
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct BatchItem<'a> {
    body: String,
    broker_properties: BrokerProperties<'a>,
}

impl ServiceBusQueue {
    async fn post(&self, body: &str, options: SendMessageOptions) -> Result<(), QueueError> {
        let result = self.client.send_message(body, Some(options)).await;
        result.map_err(|err| {
            let err = queue_error(&err);
            tracing::warn!(queue = %self.queue, error = %err, "settings queue: send failed");
            err
        })
    }
}

#[async_trait]
impl SettingsQueue for ServiceBusQueue {
    async fn send_batch(&self, messages: &[OutgoingMessage]) -> Result<(), QueueError> {
        let items = messages
            .iter()
            .map(|m| {
                parts(m).map(|(body, broker_properties)| BatchItem {
                    body,
                    broker_properties,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let body = serde_json::to_string(&items)
            .map_err(|e| QueueError::Local(format!("batch could not be serialised: {e}")))?;
        let options = SendMessageOptions {
            content_type: Some(BATCH_CONTENT_TYPE.into()),
            broker_properties: None,
            custom_properties: None,
        };
        self.post(&body, options).await?;
        tracing::info!(
            queue = %self.queue,
            messages = messages.len(),
            first_message_id = ?messages.first().map(|m| &m.message_id),
            "settings queue: batch sent"
        );
        Ok(())
    }

    async fn send(&self, message: &OutgoingMessage) -> Result<(), QueueError> {
        let (body, properties) = parts(message)?;
        let properties = serde_json::to_string(&properties).map_err(|e| {
            QueueError::Local(format!("broker properties could not be serialised: {e}"))
        })?;
        let options = SendMessageOptions {
            content_type: Some("application/json".into()),
            broker_properties: None,
            custom_properties: Some(HashMap::from([(
                "BrokerProperties".to_string(),
                properties,
            )])),
        };
        self.post(&body, options).await?;
        tracing::info!(
            queue = %self.queue,
            message_id = %message.message_id,
            request_id = %message.body.request_id,
            device = %message.body.device_id,
            scheduled_at = ?message.scheduled_at,
            ttl_secs = message.ttl.as_secs(),
            "settings queue: message sent"
        );
        Ok(())
    }
}

/// Describes a send failure from its status or kind only; the SDK's messages can
/// include URLs and bodies that we do not want to copy into logs verbatim.
fn queue_error(err: &azure_core::Error) -> QueueError {
    if let Some(http) = err.as_http_error() {
        return QueueError::Status {
            status: u16::from(http.status()),
            code: http.error_code().map(str::to_string),
        };
    }
    match err.kind() {
        // The SDK reports a non-2xx answer this way (not always as an HTTP error).
        ErrorKind::HttpResponse { status, error_code } => QueueError::Status {
            status: u16::from(*status),
            code: error_code.clone(),
        },
        ErrorKind::Io => QueueError::Unreachable,
        // No token from the identity endpoint: as transient as an unreachable broker.
        ErrorKind::Credential => {
            tracing::warn!("settings queue: no token from the managed identity endpoint");
            QueueError::Unreachable
        }
        kind => QueueError::Local(format!("send to Service Bus failed ({kind})")),
    }
}

/// Sends every request to `base`'s scheme, host and port instead of the URL's own,
/// keeping path and query. Used for `UseDevelopmentEmulator=true`.
#[derive(Debug)]
pub struct RedirectingHttpClient {
    inner: Arc<dyn HttpClient>,
    base: url::Url,
}

impl RedirectingHttpClient {
    pub fn new(inner: Arc<dyn HttpClient>, base: url::Url) -> Self {
        Self { inner, base }
    }

    /// The URL a request for `url` is really sent to.
    pub fn redirect(&self, url: &url::Url) -> Result<url::Url, azure_core::Error> {
        let fail = || azure_core::Error::message(ErrorKind::Other, "emulator URL rewrite failed");
        let mut out = url.clone();
        out.set_scheme(self.base.scheme()).map_err(|()| fail())?;
        out.set_host(self.base.host_str()).map_err(|_| fail())?;
        out.set_port(self.base.port_or_known_default())
            .map_err(|()| fail())?;
        Ok(out)
    }
}

#[async_trait]
impl HttpClient for RedirectingHttpClient {
    async fn execute_request(
        &self,
        request: &azure_core::Request,
    ) -> azure_core::Result<azure_core::Response> {
        let mut request = request.clone();
        *request.url_mut() = self.redirect(request.url())?;
        self.inner.execute_request(&request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestId;
    use crate::ports::WakeMessage;
    use axum::{
        body::Bytes,
        http::{HeaderMap, Method, StatusCode, Uri},
        Router,
    };
    use chrono::TimeZone;
    use std::sync::atomic::{AtomicU16, Ordering};
    use std::sync::Mutex;

    const KEY: &str = "c2VuZC1rZXktZm9yLXRlc3RzLW9ubHk=";

    #[derive(Debug, Clone)]
    struct Recorded {
        method: Method,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    }

    /// A loopback stand-in for the Service Bus REST endpoint: records every request
    /// and answers with the configured status.
    #[derive(Clone)]
    struct Broker {
        requests: Arc<Mutex<Vec<Recorded>>>,
        status: Arc<AtomicU16>,
        port: u16,
    }

    async fn broker() -> Broker {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = Broker {
            requests: Arc::default(),
            status: Arc::new(AtomicU16::new(201)),
            port: listener.local_addr().unwrap().port(),
        };
        let b = broker.clone();
        let app = Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let b = b.clone();
                async move {
                    b.requests.lock().unwrap().push(Recorded {
                        method,
                        path: uri.path().to_string(),
                        headers,
                        body,
                    });
                    StatusCode::from_u16(b.status.load(Ordering::SeqCst)).unwrap()
                }
            },
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        broker
    }

    fn queue_for(port: u16) -> ServiceBusQueue {
        let conn = ServiceBusConnection::parse(&format!(
            "Endpoint=sb://127.0.0.1:{port}/;SharedAccessKeyName=sender;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
        ))
        .unwrap();
        ServiceBusQueue::new(&conn, "soc-settings", None).unwrap()
    }

    /// A credential that hands out `token-{n}` (n counts the calls), or fails.
    #[derive(Debug, Default)]
    struct CountingCredential {
        calls: std::sync::atomic::AtomicUsize,
        fail: bool,
    }

    #[async_trait]
    impl TokenCredential for CountingCredential {
        async fn get_token(
            &self,
            scopes: &[&str],
        ) -> azure_core::Result<azure_core::auth::AccessToken> {
            assert_eq!(scopes, [SERVICE_BUS_SCOPE]);
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail {
                return Err(azure_core::Error::message(
                    ErrorKind::Credential,
                    "endpoint said no: secret-detail",
                ));
            }
            let expires = azure_core::date::parse_rfc3339(
                &(Utc::now() + chrono::Duration::hours(1)).to_rfc3339(),
            )?;
            Ok(azure_core::auth::AccessToken::new(
                format!("token-{n}"),
                expires,
            ))
        }

        async fn clear_cache(&self) -> azure_core::Result<()> {
            Ok(())
        }
    }

    fn identity_queue_for(port: u16, credential: Arc<CountingCredential>) -> ServiceBusQueue {
        ServiceBusQueue::with_identity(
            &format!("127.0.0.1:{port}"),
            "soc-settings",
            credential,
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn with_the_managed_identity_every_send_carries_a_bearer_token_and_no_sas() {
        let broker = broker().await;
        let credential = Arc::new(CountingCredential::default());
        let queue = identity_queue_for(broker.port, credential.clone());
        queue.send(&message(false)).await.unwrap();
        queue.send(&message(true)).await.unwrap();
        let requests = broker.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 2);
        for (r, n) in requests.iter().zip(1..) {
            assert_eq!(r.path, "/soc-settings/messages");
            assert_eq!(header(r, "authorization"), format!("Bearer token-{n}"));
            assert!(r.headers.get("brokerproperties").is_some());
        }
    }

    #[tokio::test]
    async fn no_token_is_a_transient_error_that_names_no_detail() {
        let broker = broker().await;
        let credential = Arc::new(CountingCredential {
            fail: true,
            ..Default::default()
        });
        let err = identity_queue_for(broker.port, credential)
            .send(&message(false))
            .await
            .unwrap_err();
        assert_eq!(err, QueueError::Unreachable);
        assert!(err.is_transient());
        assert!(
            broker.requests.lock().unwrap().is_empty(),
            "nothing reached the broker"
        );
        assert!(!err.to_string().contains("secret-detail"));
    }

    #[test]
    fn an_identity_namespace_that_is_not_a_host_is_refused() {
        let credential = Arc::new(CountingCredential::default());
        assert!(ServiceBusQueue::with_identity("https://ns/path", "q", credential, None).is_err());
    }

    fn message(scheduled: bool) -> OutgoingMessage {
        let at = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
        OutgoingMessage {
            message_id: "req-1:wake-3".into(),
            body: WakeMessage {
                request_id: RequestId::from_stored("req-1"),
                device_id: "bat-7".into(),
                min_soc: 35,
                requested_at: at,
                expires_at: at + chrono::Duration::days(7),
            },
            scheduled_at: scheduled.then(|| at + chrono::Duration::seconds(90)),
            ttl: Duration::from_millis(3_600_900),
        }
    }

    fn header<'a>(r: &'a Recorded, name: &str) -> &'a str {
        r.headers
            .get(name)
            .unwrap_or_else(|| panic!("missing header {name}"))
            .to_str()
            .unwrap()
    }

    /// Splits `SharedAccessSignature a=1&b=2` into its fields (values still URL-encoded).
    fn sas_fields(auth: &str) -> HashMap<String, String> {
        let rest = auth
            .strip_prefix("SharedAccessSignature ")
            .expect("SAS scheme");
        rest.split('&')
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_scheduled_send_follows_the_service_bus_rest_contract() {
        let broker = broker().await;
        queue_for(broker.port).send(&message(true)).await.unwrap();

        let requests = broker.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 1);
        let r = &requests[0];
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.path, "/soc-settings/messages");
        assert_eq!(header(r, "content-type"), "application/json");

        let props: serde_json::Value = serde_json::from_str(header(r, "brokerproperties")).unwrap();
        assert_eq!(
            props,
            serde_json::json!({
                "MessageId": "req-1:wake-3",
                "TimeToLive": 3600,
                "ScheduledEnqueueTimeUtc": "Wed, 02 Jan 2030 03:05:35 GMT"
            })
        );

        let body: WakeMessage = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body, message(true).body);
        let raw: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        for field in ["requestId", "deviceId", "expiresAt"] {
            assert!(raw.get(field).is_some(), "body lacks {field}: {raw}");
        }
    }

    #[tokio::test]
    async fn a_batch_is_one_send_message_batch_request_with_each_messages_properties() {
        let broker = broker().await;
        let mut second = message(false);
        second.message_id = "req-2:wake-1".into();
        queue_for(broker.port)
            .send_batch(&[message(true), second.clone()])
            .await
            .unwrap();

        let requests = broker.requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 1, "one request for the whole batch");
        let r = &requests[0];
        assert_eq!(r.path, "/soc-settings/messages");
        assert_eq!(header(r, "content-type"), BATCH_CONTENT_TYPE);
        assert!(r.headers.get("brokerproperties").is_none());
        let items: Vec<serde_json::Value> = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0]["BrokerProperties"],
            serde_json::json!({
                "MessageId": "req-1:wake-3",
                "TimeToLive": 3600,
                "ScheduledEnqueueTimeUtc": "Wed, 02 Jan 2030 03:05:35 GMT"
            })
        );
        assert_eq!(items[1]["BrokerProperties"]["MessageId"], "req-2:wake-1");
        assert!(items[1]["BrokerProperties"]
            .get("ScheduledEnqueueTimeUtc")
            .is_none());
        let body: WakeMessage =
            serde_json::from_str(items[1]["Body"].as_str().expect("the body is a string")).unwrap();
        assert_eq!(body, second.body);
    }

    #[tokio::test]
    async fn a_failed_batch_is_an_error_without_secrets() {
        let broker = broker().await;
        broker.status.store(503, Ordering::SeqCst);
        let err = queue_for(broker.port)
            .send_batch(&[message(true)])
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(!err.to_string().contains(KEY));
    }

    #[tokio::test]
    async fn the_authorization_header_is_a_valid_sas_token_for_the_queue_url() {
        let broker = broker().await;
        queue_for(broker.port).send(&message(false)).await.unwrap();
        let requests = broker.requests.lock().unwrap().clone();
        let auth = header(&requests[0], "authorization");
        let fields = sas_fields(auth);
        assert_eq!(fields["skn"], "sender");
        let sr = url::form_urlencoded::parse(format!("sr={}", fields["sr"]).as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned();
        // The SDK signs the namespace URL it would have used; the emulator redirect keeps it.
        assert_eq!(
            sr,
            "https://127.servicebus.windows.net/soc-settings/messages"
        );
        let se: i64 = fields["se"].parse().unwrap();
        let now = Utc::now().timestamp();
        assert!(se > now && se <= now + 3700, "se={se} now={now}");

        // Recompute the signature: HMAC-SHA256 over "{encoded sr}\n{se}" with the key's bytes.
        let to_sign = format!("{}\n{}", fields["sr"], fields["se"]);
        let expected = azure_core::hmac::hmac_sha256(
            &to_sign,
            &azure_core::auth::Secret::new(azure_core::base64::encode(KEY)),
        )
        .unwrap();
        let sig = url::form_urlencoded::parse(format!("sig={}", fields["sig"]).as_bytes())
            .next()
            .unwrap()
            .1
            .into_owned();
        assert_eq!(sig, expected);
        assert!(!auth.contains(KEY));
    }

    #[tokio::test]
    async fn an_immediate_send_has_no_scheduled_enqueue_time() {
        let broker = broker().await;
        queue_for(broker.port).send(&message(false)).await.unwrap();
        let requests = broker.requests.lock().unwrap().clone();
        let props: serde_json::Value =
            serde_json::from_str(header(&requests[0], "brokerproperties")).unwrap();
        assert!(props.get("ScheduledEnqueueTimeUtc").is_none(), "{props}");
        assert_eq!(props["MessageId"], "req-1:wake-3");
    }

    #[tokio::test]
    async fn a_503_from_the_broker_is_an_error_without_secrets() {
        let broker = broker().await;
        broker.status.store(503, Ordering::SeqCst);
        let err = queue_for(broker.port)
            .send(&message(false))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
        assert!(!err.to_string().contains(KEY));
        assert!(!err.to_string().contains("sig="));
    }

    #[tokio::test]
    async fn a_401_from_the_broker_is_an_error() {
        let broker = broker().await;
        broker.status.store(401, Ordering::SeqCst);
        let err = queue_for(broker.port)
            .send(&message(false))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");
    }

    #[tokio::test]
    async fn an_unreachable_broker_is_an_error() {
        let port = devtools::free_port().unwrap();
        let err = queue_for(port).send(&message(false)).await.unwrap_err();
        assert_eq!(err, QueueError::Unreachable);
        assert!(err.is_transient());
        assert!(err.to_string().contains("could not be reached"), "{err}");
    }

    #[test]
    fn the_redirect_swaps_scheme_host_and_port_but_keeps_path_and_query() {
        let client = RedirectingHttpClient::new(
            Arc::new(reqwest::Client::new()),
            url::Url::parse("http://127.0.0.1:5300").unwrap(),
        );
        let out = client
            .redirect(
                &url::Url::parse("https://ns.servicebus.windows.net/q/messages/head?timeout=5")
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(
            out.as_str(),
            "http://127.0.0.1:5300/q/messages/head?timeout=5"
        );

        let client = RedirectingHttpClient::new(
            Arc::new(reqwest::Client::new()),
            url::Url::parse("http://localhost").unwrap(),
        );
        let out = client
            .redirect(&url::Url::parse("https://ns.servicebus.windows.net/q/messages").unwrap())
            .unwrap();
        assert_eq!(out.as_str(), "http://localhost/q/messages");
    }

    #[test]
    fn rfc1123_dates_use_gmt_and_english_names() {
        let at = Utc.with_ymd_and_hms(1994, 11, 6, 8, 49, 37).unwrap();
        assert_eq!(rfc1123(at), "Sun, 06 Nov 1994 08:49:37 GMT");
    }
}
