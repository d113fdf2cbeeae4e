//! Entra ID tokens for the app's managed identity, and the HTTP transport every Azure
//! adapter uses.
//!
//! Tokens come from the Functions managed-identity endpoint through [`ManagedIdentityCredential`],
//! our own small credential: `azure_identity` 0.21's App Service credential always asks for the
//! system-assigned identity and cannot name a user-assigned one, and it reads `expires_on` only
//! as a string. This one reads `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` (set by the platform,
//! not app settings), sends `client_id` when the connection's `__clientId` setting names the
//! user-assigned identity (as the Functions host does for the same connection), and accepts
//! `expires_on` as a string or a number of Unix seconds.
//!
//! It keeps one token per resource and fetches a new one when the cached one has less than
//! [`REFRESH_MARGIN`] left; a refresh holds a lock, so concurrent callers wait for one fetch
//! instead of each fetching. Managed-identity tokens live for hours, so this refreshes well
//! before any request could carry an expired one.
//!
//! Invariants: a token is only ever written into an `Authorization` header; it is never logged
//! and never part of an error message (errors name the endpoint's status, not its body).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::auth::{AccessToken, Secret, TokenCredential};
use azure_core::error::ErrorKind;
use azure_core::headers::AUTHORIZATION;
use azure_core::HttpClient;
use serde::Deserialize;

use crate::secret::SecretString;

/// Scope of Service Bus data-plane tokens.
pub const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net/.default";

/// Timeout of one token request to the managed-identity endpoint.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A cached token is replaced when it has less than this left (as `azure_identity` does).
pub const REFRESH_MARGIN: Duration = Duration::from_secs(20);

/// The App Service / Functions managed-identity protocol version.
pub const API_VERSION: &str = "2019-08-01";

/// The app's managed identity as a token credential: the user-assigned identity `client_id`
/// names, or the system-assigned one without it. Does no I/O; fails only when the platform's
/// `IDENTITY_ENDPOINT` is missing or not a URL.
pub fn managed_identity(client_id: Option<&str>) -> Result<Arc<dyn TokenCredential>, String> {
    let endpoint = std::env::var("IDENTITY_ENDPOINT").unwrap_or_default();
    let header = std::env::var("IDENTITY_HEADER").unwrap_or_default();
    let http = transport(TOKEN_TIMEOUT, None)?;
    ManagedIdentityCredential::new(http, &endpoint, &header, client_id)
        .map(|c| Arc::new(c) as Arc<dyn TokenCredential>)
}

/// Tokens from the Functions identity endpoint (module doc).
pub struct ManagedIdentityCredential {
    http: reqwest::Client,
    endpoint: url::Url,
    header: SecretString,
    client_id: Option<String>,
    cache: tokio::sync::Mutex<HashMap<String, AccessToken>>,
}

impl std::fmt::Debug for ManagedIdentityCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagedIdentityCredential")
            .field("endpoint", &self.endpoint.as_str())
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// The endpoint's answer; `expires_on` is Unix seconds, as a string (App Service) or a number.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_on: UnixSeconds,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UnixSeconds {
    Number(i64),
    Text(String),
}

impl UnixSeconds {
    fn seconds(&self) -> Option<i64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(t) => t.trim().parse().ok(),
        }
    }
}

impl ManagedIdentityCredential {
    pub fn new(
        http: reqwest::Client,
        endpoint: &str,
        header: &str,
        client_id: Option<&str>,
    ) -> Result<Self, String> {
        let endpoint = url::Url::parse(endpoint).map_err(|_| {
            "managed identity: IDENTITY_ENDPOINT (set by the Functions platform) is missing or not a URL"
                .to_string()
        })?;
        Ok(Self {
            http,
            endpoint,
            header: SecretString::new(header),
            client_id: client_id.map(str::to_string),
            cache: tokio::sync::Mutex::default(),
        })
    }

    /// The identity endpoint's token for `resource`, fetched now.
    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken> {
        let failed = |why: String| azure_core::Error::message(ErrorKind::Credential, why);
        let mut url = self.endpoint.clone();
        url.query_pairs_mut()
            .append_pair("api-version", API_VERSION)
            .append_pair("resource", resource);
        if let Some(client_id) = &self.client_id {
            url.query_pairs_mut().append_pair("client_id", client_id);
        }
        let response = self
            .http
            .get(url)
            .header("X-IDENTITY-HEADER", self.header.expose())
            .header("Metadata", "true")
            .send()
            .await
            .map_err(|e| {
                failed(if e.is_timeout() {
                    "managed identity endpoint timed out".into()
                } else {
                    "managed identity endpoint unreachable".into()
                })
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!(
                "managed identity endpoint answered HTTP {}{}",
                status.as_u16(),
                if status.as_u16() == 400 && self.client_id.is_some() {
                    " (is the identity with this __clientId assigned to the app?)"
                } else {
                    ""
                }
            )));
        }
        let body = response
            .bytes()
            .await
            .map_err(|_| failed("managed identity endpoint: answer could not be read".into()))?;
        let token: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            failed("managed identity endpoint: answer is not a token response".into())
        })?;
        let expires_on = token
            .expires_on
            .seconds()
            .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
            .ok_or_else(|| {
                failed("managed identity endpoint: expires_on is not Unix seconds".into())
            })?;
        Ok(AccessToken::new(
            Secret::new(token.access_token),
            expires_on,
        ))
    }
}

/// The resource of a `{resource}/.default` scope (the identity endpoint takes resources).
fn resource_of(scopes: &[&str]) -> azure_core::Result<String> {
    match scopes {
        [scope] => Ok(scope.strip_suffix("/.default").unwrap_or(scope).to_string()),
        _ => Err(azure_core::Error::message(
            ErrorKind::Credential,
            "the managed identity takes exactly one scope",
        )),
    }
}

#[async_trait]
impl TokenCredential for ManagedIdentityCredential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let resource = resource_of(scopes)?;
        // One lock for look-up and refresh: concurrent callers wait for one fetch.
        let mut cache = self.cache.lock().await;
        if let Some(token) = cache.get(&resource) {
            if token.expires_on > time::OffsetDateTime::now_utc() + REFRESH_MARGIN {
                return Ok(token.clone());
            }
        }
        let token = self.fetch(&resource).await?;
        cache.insert(resource, token.clone());
        Ok(token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.lock().await.clear();
        Ok(())
    }
}

/// The `reqwest` client of an Azure adapter: `timeout` per request and connect, rustls with
/// the public roots, plus the certificates in `extra_ca_pem` (a PEM bundle; the
/// `SOC_EXTRA_CA_CERTS` setting, for local TLS stand-ins such as Azurite over HTTPS).
pub fn transport(
    timeout: Duration,
    extra_ca_pem: Option<&Path>,
) -> Result<reqwest::Client, String> {
    transport_builder(timeout, extra_ca_pem)?
        .build()
        .map_err(|_| "HTTP client could not be built".to_string())
}

/// The builder of [`transport`], for an adapter that sets more (the event topic's client
/// follows no redirect).
pub fn transport_builder(
    timeout: Duration,
    extra_ca_pem: Option<&Path>,
) -> Result<reqwest::ClientBuilder, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout);
    if let Some(path) = extra_ca_pem {
        let pem = std::fs::read(path)
            .map_err(|e| format!("SOC_EXTRA_CA_CERTS: cannot read {}: {e}", path.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
            format!(
                "SOC_EXTRA_CA_CERTS: {} is not a PEM certificate bundle",
                path.display()
            )
        })?;
        if certificates.is_empty() {
            return Err(format!(
                "SOC_EXTRA_CA_CERTS: {} holds no certificate",
                path.display()
            ));
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    Ok(builder)
}

/// Sends every request with `Authorization: Bearer {token}` for `scope`, replacing whatever
/// authorization the client above it wrote. Wraps the transport of SDK clients that only
/// know shared keys (the Service Bus `QueueClient`).
pub struct BearerHttpClient {
    inner: Arc<dyn HttpClient>,
    credential: Arc<dyn TokenCredential>,
    scope: &'static str,
}

impl BearerHttpClient {
    pub fn new(
        inner: Arc<dyn HttpClient>,
        credential: Arc<dyn TokenCredential>,
        scope: &'static str,
    ) -> Self {
        Self {
            inner,
            credential,
            scope,
        }
    }
}

impl std::fmt::Debug for BearerHttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerHttpClient")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl HttpClient for BearerHttpClient {
    async fn execute_request(
        &self,
        request: &azure_core::Request,
    ) -> azure_core::Result<azure_core::Response> {
        let token = self
            .credential
            .get_token(&[self.scope])
            .await
            .map_err(|e| {
                // The credential's own message may quote the endpoint's answer; keep only its kind.
                azure_core::Error::message(
                    ErrorKind::Credential,
                    format!("no token from the managed identity endpoint ({})", e.kind()),
                )
            })?;
        let mut request = request.clone();
        request.insert_header(AUTHORIZATION, format!("Bearer {}", token.token.secret()));
        self.inner.execute_request(&request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::HeaderMap;
    use axum::routing::get;
    use axum::{Json, Router};
    use serde_json::{json, Value};
    use std::sync::Mutex;

    const CLIENT: &str = "7d1c2f3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";

    /// The queries the endpoint got, and what it answers.
    #[derive(Clone)]
    struct Endpoint {
        seen: Arc<Mutex<Vec<HashMap<String, String>>>>,
        answer: Arc<Mutex<(u16, Value)>>,
    }

    async fn token(
        State(e): State<Endpoint>,
        headers: HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> (axum::http::StatusCode, Json<Value>) {
        let mut q = q;
        if let Some(h) = headers.get("x-identity-header") {
            q.insert("header".into(), h.to_str().unwrap().into());
        }
        e.seen.lock().unwrap().push(q);
        let (status, body) = e.answer.lock().unwrap().clone();
        (
            axum::http::StatusCode::from_u16(status).unwrap(),
            Json(body),
        )
    }

    async fn endpoint(answer: Value) -> (String, Endpoint) {
        let e = Endpoint {
            seen: Arc::default(),
            answer: Arc::new(Mutex::new((200, answer))),
        };
        let app = Router::new()
            .route("/msi/token", get(token))
            .with_state(e.clone());
        let addr = crate::adapters::serve_on_loopback(app).await;
        (format!("http://{addr}/msi/token"), e)
    }

    fn credential(url: &str, client_id: Option<&str>) -> ManagedIdentityCredential {
        let http = transport(Duration::from_secs(2), None).unwrap();
        ManagedIdentityCredential::new(http, url, "platform-secret", client_id).unwrap()
    }

    fn in_an_hour() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp() + 3600
    }

    #[tokio::test]
    async fn a_user_assigned_identity_is_asked_for_by_its_client_id() {
        let (url, e) = endpoint(json!({"access_token": "tok-1", "expires_on": in_an_hour().to_string(),
                                       "token_type": "Bearer", "resource": "https://storage.azure.com"}))
        .await;
        let token = credential(&url, Some(CLIENT))
            .get_token(&["https://storage.azure.com/.default"])
            .await
            .unwrap();
        assert_eq!(token.token.secret(), "tok-1");
        let seen = e.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0]["client_id"], CLIENT);
        assert_eq!(seen[0]["resource"], "https://storage.azure.com");
        assert_eq!(seen[0]["api-version"], API_VERSION);
        assert_eq!(seen[0]["header"], "platform-secret");

        // Without a client id: the system-assigned identity, no client_id parameter.
        credential(&url, None)
            .get_token(&[SERVICE_BUS_SCOPE])
            .await
            .unwrap();
        assert!(!e.seen.lock().unwrap()[1].contains_key("client_id"));
    }

    #[tokio::test]
    async fn expires_on_is_read_as_a_string_or_a_number_and_anything_else_is_refused() {
        let at = in_an_hour();
        for expires_on in [json!(at.to_string()), json!(at), json!(format!(" {at} "))] {
            let (url, _) = endpoint(json!({"access_token": "t", "expires_on": expires_on})).await;
            let token = credential(&url, None)
                .get_token(&[SERVICE_BUS_SCOPE])
                .await
                .unwrap();
            assert_eq!(token.expires_on.unix_timestamp(), at, "{expires_on}");
        }
        for expires_on in [json!("tomorrow"), json!(null), json!(1.5)] {
            let (url, _) = endpoint(json!({"access_token": "t", "expires_on": expires_on})).await;
            let err = credential(&url, None)
                .get_token(&[SERVICE_BUS_SCOPE])
                .await
                .unwrap_err();
            assert_eq!(err.kind(), &ErrorKind::Credential, "{expires_on}");
        }
    }

    #[tokio::test]
    async fn a_token_is_reused_until_it_is_within_the_margin_of_expiry() {
        let (url, e) = endpoint(json!({"access_token": "t", "expires_on": in_an_hour()})).await;
        let c = credential(&url, Some(CLIENT));
        for _ in 0..3 {
            c.get_token(&[SERVICE_BUS_SCOPE]).await.unwrap();
        }
        assert_eq!(e.seen.lock().unwrap().len(), 1, "cached per resource");
        c.get_token(&["https://storage.azure.com/.default"])
            .await
            .unwrap();
        assert_eq!(
            e.seen.lock().unwrap().len(),
            2,
            "another resource, another token"
        );

        let soon = time::OffsetDateTime::now_utc().unix_timestamp() + 10;
        let (url, e) = endpoint(json!({"access_token": "t", "expires_on": soon})).await;
        let c = credential(&url, None);
        c.get_token(&[SERVICE_BUS_SCOPE]).await.unwrap();
        c.get_token(&[SERVICE_BUS_SCOPE]).await.unwrap();
        assert_eq!(
            e.seen.lock().unwrap().len(),
            2,
            "10 s left is inside the 20 s margin"
        );
    }

    #[tokio::test]
    async fn a_refusal_names_the_status_and_never_the_answer() {
        let (url, e) = endpoint(json!({"error": "secret-detail-xyz"})).await;
        *e.answer.lock().unwrap() = (400, json!({"error": "secret-detail-xyz"}));
        let err = credential(&url, Some(CLIENT))
            .get_token(&[SERVICE_BUS_SCOPE])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("HTTP 400") && err.contains("__clientId"),
            "{err}"
        );
        assert!(!err.contains("secret-detail-xyz"), "{err}");
        let c = credential(&url, None);
        assert!(c.get_token(&["a", "b"]).await.is_err(), "one scope only");
        assert!(!format!("{c:?}").contains("platform-secret"));
    }
}
