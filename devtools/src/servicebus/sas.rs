//! Connection strings and SAS tokens, as the Service Bus REST docs define them.
//!
//! Invariants:
//! - The signature is Base64(HMAC-SHA256(key = the UTF-8 bytes of the SharedAccessKey *string*,
//!   data = `{url-encoded resource URI}\n{expiry}`)); the key is never base64-decoded, so a token
//!   the real service would reject is rejected here too.
//! - [`verify_sas`] computes the signature over `sr` exactly as sent (no re-encoding), and accepts a
//!   token only if its key name matches, it has not expired, and its decoded resource path covers
//!   the requested entity path (the host part is not compared: emulator endpoints vary).
//! - [`ConnectionString::render`] is the inverse of [`ConnectionString::parse`] for the fields kept.

use anyhow::{anyhow, Context};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::message::B64;

/// A parsed `Endpoint=sb://host[:port];SharedAccessKeyName=..;SharedAccessKey=..[;UseDevelopmentEmulator=true]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionString {
    pub host: String,
    pub port: Option<u16>,
    pub key_name: String,
    pub key: String,
    pub use_development_emulator: bool,
}

impl ConnectionString {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut emu = false;
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow!("bad connection string part {part:?}"))?;
            match k.to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(v.to_string()),
                "sharedaccesskeyname" => key_name = Some(v.to_string()),
                "sharedaccesskey" => key = Some(v.to_string()),
                "usedevelopmentemulator" => emu = v.eq_ignore_ascii_case("true"),
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or_else(|| anyhow!("connection string has no Endpoint"))?;
        let url = url::Url::parse(&endpoint).context("Endpoint is not a URL")?;
        Ok(ConnectionString {
            host: url
                .host_str()
                .ok_or_else(|| anyhow!("Endpoint has no host"))?
                .to_string(),
            port: url.port(),
            key_name: key_name.ok_or_else(|| anyhow!("no SharedAccessKeyName"))?,
            key: key.ok_or_else(|| anyhow!("no SharedAccessKey"))?,
            use_development_emulator: emu,
        })
    }

    /// Render back, e.g. after changing the port.
    pub fn render(&self) -> String {
        let hp = match self.port {
            Some(p) => format!("{}:{}", self.host, p),
            None => self.host.clone(),
        };
        let mut s = format!(
            "Endpoint=sb://{hp};SharedAccessKeyName={};SharedAccessKey={}",
            self.key_name, self.key
        );
        if self.use_development_emulator {
            s.push_str(";UseDevelopmentEmulator=true");
        }
        s
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Signature over `{url-encoded resource}\n{expiry}` with HMAC-SHA256 keyed by the UTF-8 bytes of
/// the key string (the key is *not* base64-decoded), base64-encoded.
pub fn sas_signature(encoded_resource: &str, expiry: i64, key: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac takes any key");
    mac.update(format!("{encoded_resource}\n{expiry}").as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// A `SharedAccessSignature sr=..&sig=..&se=..&skn=..` header value, as Service Bus documents it.
pub fn sas_token(resource_uri: &str, key_name: &str, key: &str, expiry_unix: i64) -> String {
    let sr = urlencode(resource_uri);
    let sig = sas_signature(&sr, expiry_unix, key);
    format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry_unix}&skn={key_name}",
        urlencode(&sig)
    )
}

/// Check an `Authorization` header value for a request to `/{entity_path...}`.
/// Checks: scheme, all four fields present, `skn` equals the key name, signature matches
/// (computed over `sr` exactly as sent), not expired, and the decoded `sr` path is a prefix of the
/// requested entity path (host part is not compared: emulator endpoints vary).
pub fn verify_sas(
    header: &str,
    key_name: &str,
    key: &str,
    now_unix: i64,
    entity_path: &str,
) -> Result<(), String> {
    let rest = header
        .strip_prefix("SharedAccessSignature ")
        .ok_or("Authorization is not a SharedAccessSignature")?;
    let mut sr = None;
    let mut sig = None;
    let mut se = None;
    let mut skn = None;
    for kv in rest.split('&') {
        let (k, v) = kv.split_once('=').ok_or("malformed SAS token")?;
        match k.trim() {
            "sr" => sr = Some(v.to_string()),
            "sig" => sig = Some(v.to_string()),
            "se" => se = Some(v.to_string()),
            "skn" => skn = Some(v.to_string()),
            _ => {}
        }
    }
    let (sr, sig, se, skn) = match (sr, sig, se, skn) {
        (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
        _ => return Err("SAS token needs sr, sig, se and skn".into()),
    };
    if skn != key_name {
        return Err(format!("unknown key name {skn:?}"));
    }
    let expiry: i64 = se.parse().map_err(|_| "se is not a unix time")?;
    let sig_decoded = percent_encoding::percent_decode_str(&sig)
        .decode_utf8()
        .map_err(|_| "sig is not valid percent-encoding")?
        .to_string();
    let expected = sas_signature(&sr, expiry, key);
    if expected != sig_decoded {
        return Err("invalid signature".into());
    }
    if expiry <= now_unix {
        return Err("token expired".into());
    }
    let resource: String = url::form_urlencoded::parse(format!("r={sr}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    let without_scheme = resource
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(&resource);
    let res_path = without_scheme
        .split_once('/')
        .map(|(_, p)| p.trim_end_matches('/'))
        .unwrap_or("");
    let entity = entity_path.trim_start_matches('/').to_ascii_lowercase();
    let scope = res_path.to_ascii_lowercase();
    let covered = scope.is_empty() || entity == scope || entity.starts_with(&format!("{scope}/"));
    if !covered {
        return Err(format!(
            "token scope {resource:?} does not cover {entity:?}"
        ));
    }
    Ok(())
}
