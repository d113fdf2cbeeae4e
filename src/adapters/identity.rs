//! Entra ID tokens for the app's managed identity, and the HTTP transport every Azure
//! adapter uses.
//!
//! Tokens come from the Functions managed-identity endpoint through `azure_identity`'s
//! [`AppServiceManagedIdentityCredential`]: it reads `IDENTITY_ENDPOINT` and
//! `IDENTITY_HEADER` (set by the platform, not app settings) from the process environment and
//! asks for the **system-assigned** identity. Its cache keeps one token per scope and fetches a
//! new one when the cached one is less than 20 s from expiry, under a write lock, so concurrent
//! callers wait for one refresh instead of each fetching (azure_identity 0.21,
//! `token_credentials/cache.rs`). Managed-identity tokens live for hours, so this refreshes
//! well before any request could carry an expired one.
//!
//! Invariants: a token is only ever written into an `Authorization` header; it is never logged
//! and never part of an error message (errors name the endpoint's status, not its body).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::headers::AUTHORIZATION;
use azure_core::HttpClient;
use azure_identity::AppServiceManagedIdentityCredential;

/// Scope of Service Bus data-plane tokens.
pub const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net/.default";

/// Timeout of one token request to the managed-identity endpoint.
pub const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// The app's managed identity as a token credential. Does no I/O; fails only when the
/// platform's `IDENTITY_ENDPOINT` is missing or not a URL.
pub fn managed_identity() -> Result<Arc<dyn TokenCredential>, String> {
    let http = transport(TOKEN_TIMEOUT, None)?;
    let http: Arc<dyn HttpClient> = Arc::new(http);
    AppServiceManagedIdentityCredential::create(http)
        .map(|c| Arc::new(c) as Arc<dyn TokenCredential>)
        .map_err(|_| {
            "managed identity: IDENTITY_ENDPOINT (set by the Functions platform) is missing or not a URL"
                .to_string()
        })
}

/// The `reqwest` client of an Azure adapter: `timeout` per request and connect, rustls with
/// the public roots, plus the certificates in `extra_ca_pem` (a PEM bundle; the
/// `SOC_EXTRA_CA_CERTS` setting, for local TLS stand-ins such as Azurite over HTTPS).
pub fn transport(
    timeout: Duration,
    extra_ca_pem: Option<&Path>,
) -> Result<reqwest::Client, String> {
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
    builder
        .build()
        .map_err(|_| "HTTP client could not be built".to_string())
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
