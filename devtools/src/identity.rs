//! The managed-identity endpoint stand-in: what the Functions platform serves at
//! `IDENTITY_ENDPOINT` for the app's identity, on loopback, plus the tokens it issues.
//!
//! Protocol (App Service / Functions managed identity, REST, api-version `2019-08-01`):
//! `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource={resource}[&client_id={id}]` with
//! header `X-IDENTITY-HEADER: {IDENTITY_HEADER}` answers `200` and
//! `{"access_token","expires_on","resource","token_type":"Bearer","client_id"}`, where
//! `expires_on` is a **string** of Unix seconds (or, with
//! [`IdentityConfig::expires_on_as_number`], a number, as other token endpoints send it). A
//! wrong or missing header is `401`, a missing `resource` or an unknown api-version `400`.
//!
//! Which identities the app has: [`IdentityConfig::client_id`] `None` models the
//! system-assigned identity only (a request naming a `client_id` is `400`, "identity not
//! assigned"); `Some(id)` models one user-assigned identity and no system-assigned one, as the
//! Bicep deploys it: a request must name exactly that `client_id`, else `400`.
//!
//! Tokens are JWTs shaped like Entra ID access tokens (`aud` = the resource, `iss` =
//! `https://sts.windows.net/{tenant}/`, `iat`/`nbf`/`exp`, `oid`, `tid`), signed HS256 with the
//! stand-in's key. Azurite's `--oauth basic` checks the claims only; the Service Bus stand-in
//! checks the signature too ([`verify_token`]). Nothing here is a real credential.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::server::{serve, ServerHandle};

/// The API version the Functions platform (and the handler's managed-identity credential) uses.
pub const API_VERSION: &str = "2019-08-01";
/// Path the stand-in serves; `IDENTITY_ENDPOINT` points at it.
pub const TOKEN_PATH: &str = "/msi/token";
/// Tenant id written into every token.
pub const TENANT: &str = "72f988bf-0000-4000-8000-00000000d0c5";
/// Object id of the identity the tokens are for.
pub const OBJECT_ID: &str = "5a1f0e7c-0000-4000-8000-0000000050c1";

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The value the platform puts in `IDENTITY_HEADER`; requests must echo it.
    pub header_secret: String,
    /// HS256 key the tokens are signed with (shared with the Service Bus stand-in).
    pub signing_key: Vec<u8>,
    /// Lifetime of an issued token.
    pub token_lifetime: Duration,
    /// The client id of the app's one user-assigned identity; `None`: system-assigned only.
    pub client_id: Option<String>,
    /// Send `expires_on` as a JSON number instead of App Service's string.
    pub expires_on_as_number: bool,
}

impl IdentityConfig {
    pub fn new(header_secret: impl Into<String>, signing_key: impl Into<Vec<u8>>) -> Self {
        Self {
            header_secret: header_secret.into(),
            signing_key: signing_key.into(),
            token_lifetime: Duration::from_secs(3600),
            client_id: None,
            expires_on_as_number: false,
        }
    }
}

#[derive(Debug, Default)]
struct Issued {
    /// Tokens issued, per resource.
    per_resource: HashMap<String, usize>,
    /// Requests refused (wrong header, bad query).
    refused: usize,
}

#[derive(Clone)]
struct Shared {
    config: IdentityConfig,
    issued: Arc<Mutex<Issued>>,
}

/// A running stand-in. [`ManagedIdentity::endpoint`] is what `IDENTITY_ENDPOINT` gets.
pub struct ManagedIdentity {
    shared: Shared,
    server: ServerHandle,
}

impl ManagedIdentity {
    pub async fn start(addr: SocketAddr, config: IdentityConfig) -> anyhow::Result<Self> {
        let shared = Shared {
            config,
            issued: Arc::default(),
        };
        let app = Router::new()
            .route(TOKEN_PATH, get(token))
            .with_state(shared.clone());
        let server = serve(addr, app, "managed identity stand-in").await?;
        Ok(Self { shared, server })
    }

    /// `http://127.0.0.1:{port}/msi/token`
    pub fn endpoint(&self) -> String {
        format!("http://{}{TOKEN_PATH}", self.server.addr)
    }

    /// Tokens issued so far for `resource` (a scope's resource, e.g. `https://storage.azure.com/`).
    pub fn issued_for(&self, resource: &str) -> usize {
        let issued = self.shared.issued.lock().unwrap_or_else(|p| p.into_inner());
        issued.per_resource.get(resource).copied().unwrap_or(0)
    }

    /// Requests answered with an error.
    pub fn refused(&self) -> usize {
        self.shared
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

async fn token(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let refuse = |status: StatusCode, why: &str| {
        shared
            .issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused += 1;
        tracing::warn!(status = status.as_u16(), "managed identity: {why}");
        (status, Json(json!({"error": why}))).into_response()
    };
    let secret = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if secret != Some(shared.config.header_secret.as_str()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "missing or wrong X-IDENTITY-HEADER",
        );
    }
    if query.get("api-version").map(String::as_str) != Some(API_VERSION) {
        return refuse(StatusCode::BAD_REQUEST, "unsupported api-version");
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return refuse(StatusCode::BAD_REQUEST, "resource is required");
    };
    if query.get("client_id") != shared.config.client_id.as_ref() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the requested identity has not been assigned to this resource",
        );
    }
    let client_id = shared.config.client_id.as_deref().unwrap_or(OBJECT_ID);
    let now = chrono::Utc::now().timestamp();
    let expires_on = now + shared.config.token_lifetime.as_secs() as i64;
    let access_token = mint(&shared.config.signing_key, resource, now, expires_on);
    let expires_on_value = if shared.config.expires_on_as_number {
        json!(expires_on)
    } else {
        json!(expires_on.to_string())
    };
    *shared
        .issued
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .per_resource
        .entry(resource.clone())
        .or_default() += 1;
    tracing::info!(%resource, expires_on, "managed identity: token issued");
    Json(json!({
        "access_token": access_token,
        "expires_on": expires_on_value,
        "resource": resource,
        "token_type": "Bearer",
        "client_id": client_id,
    }))
    .into_response()
}

/// An HS256 JWT for `resource`, valid from `issued_at` to `expires_on` (Unix seconds).
pub fn mint(signing_key: &[u8], resource: &str, issued_at: i64, expires_on: i64) -> String {
    let header = B64URL.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = B64URL.encode(
        json!({
            "aud": resource,
            "iss": format!("https://sts.windows.net/{TENANT}/"),
            "iat": issued_at,
            "nbf": issued_at,
            "exp": expires_on,
            "oid": OBJECT_ID,
            "sub": OBJECT_ID,
            "tid": TENANT,
            "idtyp": "app",
        })
        .to_string(),
    );
    let signing_input = format!("{header}.{claims}");
    format!("{signing_input}.{}", sign(signing_key, &signing_input))
}

fn sign(key: &[u8], input: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("hmac takes any key");
    mac.update(input.as_bytes());
    B64URL.encode(mac.finalize().into_bytes())
}

/// Checks a bearer token the way a resource does: signature (HS256, `signing_key`), issuer,
/// audience (one of `audiences`, with or without a trailing `/`), and `nbf <= now < exp`.
/// Returns the claims.
pub fn verify_token(
    token: &str,
    signing_key: &[u8],
    audiences: &[&str],
    now_unix: i64,
) -> Result<Value, String> {
    let mut parts = token.split('.');
    let (Some(raw_header), Some(raw_claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (three dot-separated parts)".into());
    };
    let header: Value = B64URL
        .decode(raw_header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or("JWT header is not base64url JSON")?;
    if header["alg"] != "HS256" {
        return Err(format!("unexpected alg {}", header["alg"]));
    }
    if sign(signing_key, &format!("{raw_header}.{raw_claims}")) != signature {
        return Err("invalid signature".into());
    }
    let claims: Value = B64URL
        .decode(raw_claims)
        .ok()
        .and_then(|c| serde_json::from_slice(&c).ok())
        .ok_or("JWT claims are not base64url JSON")?;
    let iss = claims["iss"].as_str().unwrap_or_default();
    if !iss.starts_with("https://sts.windows.net/") {
        return Err(format!("unexpected issuer {iss:?}"));
    }
    let aud = claims["aud"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches('/');
    if !audiences.iter().any(|a| a.trim_end_matches('/') == aud) {
        return Err(format!("token is for {aud:?}, not {audiences:?}"));
    }
    let (Some(nbf), Some(exp)) = (claims["nbf"].as_i64(), claims["exp"].as_i64()) else {
        return Err("token lacks nbf/exp".into());
    };
    if now_unix < nbf {
        return Err("token not yet valid".into());
    }
    if now_unix >= exp {
        return Err("token expired".into());
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"identity-stand-in-test-key";
    const SB: &str = "https://servicebus.azure.net";

    #[test]
    fn a_minted_token_verifies_for_its_audience_until_it_expires() {
        let token = mint(KEY, SB, 1_000, 2_000);
        let claims = verify_token(&token, KEY, &[SB], 1_500).unwrap();
        assert_eq!(claims["tid"], TENANT);
        assert!(verify_token(&token, KEY, &["https://servicebus.azure.net/"], 1_500).is_ok());
        assert_eq!(
            verify_token(&token, KEY, &[SB], 2_000).unwrap_err(),
            "token expired"
        );
        assert_eq!(
            verify_token(&token, KEY, &[SB], 999).unwrap_err(),
            "token not yet valid"
        );
    }

    #[test]
    fn a_token_for_another_audience_or_key_or_a_tampered_one_is_refused() {
        let token = mint(KEY, "https://storage.azure.com/", 1_000, 2_000);
        assert!(verify_token(&token, KEY, &[SB], 1_500)
            .unwrap_err()
            .contains("not [\"https://servicebus.azure.net\"]"));
        let token = mint(KEY, SB, 1_000, 2_000);
        assert_eq!(
            verify_token(&token, b"other-key", &[SB], 1_500).unwrap_err(),
            "invalid signature"
        );
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64URL.encode(
            json!({"aud": SB, "iss": "https://sts.windows.net/x/", "nbf": 0, "exp": 9_999_999_999i64})
                .to_string(),
        );
        parts[1] = &forged;
        assert_eq!(
            verify_token(&parts.join("."), KEY, &[SB], 1_500).unwrap_err(),
            "invalid signature"
        );
        assert!(verify_token("not-a-jwt", KEY, &[SB], 1_500).is_err());
    }
}
