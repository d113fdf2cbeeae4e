//! The vendor's device cloud over HTTP (contract: `docs/device-api.md`).
//!
//! Every call has a timeout. Status codes map to [`DeviceError`] so callers can
//! tell permanent outcomes (unknown device, value rejected) from transient ones
//! (throttling, 5xx, timeouts, connection errors). The API key is sent as a
//! header and never appears in a log line or an error message.
//!
//! URLs are built by path segments ([`url::Url::path_segments_mut`]), never by formatting a
//! string: a device id is always exactly one segment under `/devices/`, so no id can make a
//! call (which carries the service's API key) reach another path of the device cloud.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{header::HeaderMap, StatusCode};
use serde::Deserialize;
use std::time::Duration;

use crate::domain::{DeviceId, MinSoc, RequestId};
use crate::ports::{DeviceApi, DeviceError, DeviceStatus};

use super::connection_string::SecretString;

/// Longest vendor reason kept in a [`DeviceError::Rejected`] (it ends up in the ledger).
pub const MAX_REASON_CHARS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum DeviceApiConfigError {
    #[error("DEVICE_API_BASE_URL: must be an absolute http(s) URL")]
    BaseUrl,
    #[error("DEVICE_API_KEY: must be a non-empty visible ASCII string")]
    Key,
    #[error("device API client could not be built: {0}")]
    Client(String),
}

/// `reqwest` client for the device cloud.
#[derive(Debug, Clone)]
pub struct HttpDeviceApi {
    http: reqwest::Client,
    /// Base URL without a trailing empty segment; may carry a path prefix (`https://host/v1`).
    base: url::Url,
    key: SecretString,
    timeout: Duration,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusBody {
    online: bool,
    #[serde(default)]
    min_soc: Option<u8>,
}

impl HttpDeviceApi {
    /// Builds the client. Does no I/O.
    pub fn new(
        base_url: &str,
        api_key: &str,
        timeout: Duration,
    ) -> Result<Self, DeviceApiConfigError> {
        let mut base = url::Url::parse(base_url).map_err(|_| DeviceApiConfigError::BaseUrl)?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(DeviceApiConfigError::BaseUrl);
        }
        base.path_segments_mut()
            .map_err(|()| DeviceApiConfigError::BaseUrl)?
            .pop_if_empty();
        base.set_query(None);
        base.set_fragment(None);
        if api_key.is_empty() || !api_key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(DeviceApiConfigError::Key);
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("soc-settings/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DeviceApiConfigError::Client(e.to_string()))?;
        Ok(Self {
            http,
            base,
            key: SecretString::new(api_key),
            timeout,
        })
    }

    /// The base URL followed by `segments`, each exactly one path segment: `url` percent-encodes
    /// `/`, `\`, `?`, `#`, `%` and blanks inside a segment. A segment that is empty or only
    /// dots (`url` drops `.` and `..`, a server would resolve them) is refused, and the result
    /// is checked to hold one more segment per segment given.
    pub fn url(&self, segments: &[&str]) -> Result<url::Url, DeviceError> {
        let refused =
            || DeviceError::Rejected("device id cannot be used as one URL path segment".into());
        if segments
            .iter()
            .any(|s| s.is_empty() || s.bytes().all(|b| b == b'.'))
        {
            return Err(refused());
        }
        let count = |url: &url::Url| {
            url.path_segments()
                .map_or(0, |s| s.filter(|s| !s.is_empty()).count())
        };
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| refused())?
            .extend(segments);
        if count(&url) != count(&self.base) + segments.len() {
            return Err(refused());
        }
        Ok(url)
    }

    fn request(&self, method: reqwest::Method, url: url::Url) -> reqwest::RequestBuilder {
        let mut key = reqwest::header::HeaderValue::from_str(self.key.expose())
            .expect("key validated as visible ASCII in new()");
        key.set_sensitive(true);
        self.http.request(method, url).header("x-api-key", key)
    }

    /// A transient error for a failed send. Built from the error's *kind* only:
    /// the reqwest error text carries the URL, which is not ours to log verbatim.
    fn send_error(&self, what: &str, err: &reqwest::Error) -> DeviceError {
        let reason = if err.is_timeout() {
            format!("{what}: timed out after {} ms", self.timeout.as_millis())
        } else if err.is_connect() {
            format!("{what}: could not connect")
        } else if err.is_body() || err.is_decode() {
            format!("{what}: response body could not be read")
        } else {
            format!("{what}: request failed")
        };
        DeviceError::Transient {
            reason,
            retry_after: None,
            unanswered: !err.is_connect(),
        }
    }

    /// Vendor text, trimmed, truncated and scrubbed of our key should the vendor echo it,
    /// of URLs (they may carry keys or signatures) and of `key=`/`token=`-like values; line
    /// breaks and runs of blanks become one space.
    fn reason_text(&self, raw: &str, status: StatusCode) -> String {
        let scrubbed = redact(&raw.replace(self.key.expose(), "<redacted>"));
        let text = scrubbed.trim();
        let text: String = text.chars().take(MAX_REASON_CHARS).collect();
        if text.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else if text.len() < scrubbed.trim().len() {
            format!("HTTP {}: {text}…", status.as_u16())
        } else {
            format!("HTTP {}: {text}", status.as_u16())
        }
    }

    fn unexpected(&self, what: &str, status: StatusCode, headers: &HeaderMap) -> DeviceError {
        let reason = match status.as_u16() {
            401 | 403 => format!(
                "{what}: device API refused our credentials (HTTP {})",
                status.as_u16()
            ),
            429 => format!("{what}: throttled (HTTP 429)"),
            s if status.is_server_error() => format!("{what}: device API error (HTTP {s})"),
            s => format!("{what}: unexpected HTTP {s}"),
        };
        DeviceError::Transient {
            reason,
            retry_after: retry_after(headers, Utc::now()),
            // A gateway's 408/500/502/503/504 does not say the backend never got the
            // PUT: it may still land within `Lt` (docs/device-api.md).
            unanswered: outcome_unknown(status),
        }
    }
}

/// Whether an answer with `status` leaves a PUT's outcome unknown (it may land within
/// the late-landing bound), as a timeout does: `408`, `500`, `502`, `503`, `504`.
pub fn outcome_unknown(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 500 | 502 | 503 | 504)
}

#[async_trait]
impl DeviceApi for HttpDeviceApi {
    async fn status(&self, device: &DeviceId) -> Result<DeviceStatus, DeviceError> {
        let what = "GET device status";
        let url = self.url(&["devices", device.as_str()])?;
        let response = self
            .request(reqwest::Method::GET, url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| self.send_error(what, &e))?;
        let status = response.status();
        tracing::debug!(device = %device, status = status.as_u16(), "device API: {what}");
        match status {
            StatusCode::OK => {
                let bytes = response
                    .bytes()
                    .await
                    .map_err(|e| self.send_error(what, &e))?;
                let body: StatusBody =
                    serde_json::from_slice(&bytes).map_err(|_| DeviceError::Transient {
                        reason: format!("{what}: malformed 200 response body"),
                        retry_after: None,
                        unanswered: false,
                    })?;
                if body.min_soc.is_some_and(|v| v > 100) {
                    return Err(DeviceError::Transient {
                        reason: format!("{what}: minSoc out of range in response"),
                        retry_after: None,
                        unanswered: false,
                    });
                }
                Ok(DeviceStatus {
                    online: body.online,
                    min_soc: body.min_soc,
                })
            }
            StatusCode::NOT_FOUND => Err(DeviceError::UnknownDevice),
            _ => Err(self.unexpected(what, status, response.headers())),
        }
    }

    async fn apply_min_soc(
        &self,
        device: &DeviceId,
        min_soc: MinSoc,
        request_id: &RequestId,
    ) -> Result<(), DeviceError> {
        let what = "PUT min-soc";
        let url = self.url(&["devices", device.as_str(), "settings", "min-soc"])?;
        let response = self
            .request(reqwest::Method::PUT, url)
            .header("Idempotency-Key", request_id.as_str())
            .json(&serde_json::json!({ "minSoc": min_soc.percent() }))
            .send()
            .await
            .map_err(|e| self.send_error(what, &e))?;
        let status = response.status();
        tracing::info!(
            device = %device,
            request_id = %request_id,
            min_soc = min_soc.percent(),
            status = status.as_u16(),
            "device API: {what}"
        );
        match status.as_u16() {
            200 | 204 => Ok(()),
            409 => Err(DeviceError::Offline),
            404 => Err(DeviceError::UnknownDevice),
            400 | 422 => {
                // A body that cannot be read still means "rejected": the status decides.
                let text = response.text().await.unwrap_or_default();
                Err(DeviceError::Rejected(self.reason_text(&text, status)))
            }
            _ => Err(self.unexpected(what, status, response.headers())),
        }
    }
}

/// `Retry-After` as delta-seconds or an HTTP-date (relative to `now`; past dates mean zero).
pub fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let raw = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = raw.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(raw).ok()?.with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Words of vendor text that could hold a secret, replaced: URLs by `<url>`, the value of a
/// `name=value` whose name mentions a key, code, signature, token, secret or password by
/// `<redacted>`. Whitespace (line breaks included) collapses to single spaces.
fn redact(text: &str) -> String {
    const SECRET_NAMES: [&str; 7] = ["key", "code", "sig", "token", "secret", "password", "auth"];
    text.split_whitespace()
        .map(|word| {
            if word.contains("://") {
                return "<url>".to_string();
            }
            match word.split_once('=') {
                Some((name, _))
                    if SECRET_NAMES
                        .iter()
                        .any(|s| name.to_ascii_lowercase().contains(s)) =>
                {
                    format!("{name}=<redacted>")
                }
                _ => word.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::{
        extract::{Path, State},
        http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus},
        response::{IntoResponse, Response},
        routing::{get, put},
        Router,
    };
    use std::sync::{Arc, Mutex};

    const KEY: &str = "test-key-5f2b9c7e";

    /// What the stand-in saw on its last request.
    #[derive(Default, Debug)]
    struct Seen {
        api_key: Option<String>,
        idempotency_key: Option<String>,
        content_type: Option<String>,
        body: Option<serde_json::Value>,
        path: Option<String>,
    }

    #[derive(Clone, Default)]
    struct Stand {
        seen: Arc<Mutex<Seen>>,
    }

    fn header(h: &AxumHeaders, name: &str) -> Option<String> {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The device id chooses the answer, so one server covers every status.
    async fn get_device(
        State(s): State<Stand>,
        Path(id): Path<String>,
        h: AxumHeaders,
    ) -> Response {
        {
            let mut seen = s.seen.lock().unwrap();
            seen.api_key = header(&h, "x-api-key");
            seen.path = Some(format!("/devices/{id}"));
        }
        if header(&h, "x-api-key").as_deref() != Some(KEY) {
            return AxumStatus::UNAUTHORIZED.into_response();
        }
        match id.as_str() {
            "online-1" => (
                AxumStatus::OK,
                [("content-type", "application/json")],
                r#"{"deviceId":"online-1","online":true,"minSoc":35}"#,
            )
                .into_response(),
            "offline-1" => (
                AxumStatus::OK,
                [("content-type", "application/json")],
                r#"{"deviceId":"offline-1","online":false,"minSoc":null}"#,
            )
                .into_response(),
            "garbled" => (AxumStatus::OK, "not json").into_response(),
            "busy" => (AxumStatus::SERVICE_UNAVAILABLE, [("retry-after", "7")], "").into_response(),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                AxumStatus::OK.into_response()
            }
            _ => AxumStatus::NOT_FOUND.into_response(),
        }
    }

    async fn put_min_soc(
        State(s): State<Stand>,
        Path(id): Path<String>,
        h: AxumHeaders,
        body: String,
    ) -> Response {
        {
            let mut seen = s.seen.lock().unwrap();
            seen.api_key = header(&h, "x-api-key");
            seen.idempotency_key = header(&h, "idempotency-key");
            seen.content_type = header(&h, "content-type");
            seen.body = serde_json::from_str(&body).ok();
            seen.path = Some(format!("/devices/{id}/settings/min-soc"));
        }
        if header(&h, "x-api-key").as_deref() != Some(KEY) {
            return AxumStatus::UNAUTHORIZED.into_response();
        }
        match id.as_str() {
            "ok-200" => AxumStatus::OK.into_response(),
            "ok-204" => AxumStatus::NO_CONTENT.into_response(),
            "offline" => AxumStatus::CONFLICT.into_response(),
            "unknown" => AxumStatus::NOT_FOUND.into_response(),
            "bad-400" => {
                (AxumStatus::BAD_REQUEST, "minSoc below vendor floor of 10").into_response()
            }
            "bad-422" => (
                AxumStatus::UNPROCESSABLE_ENTITY,
                format!("{} echoed key {KEY}", "x".repeat(500)),
            )
                .into_response(),
            "throttled" => {
                (AxumStatus::TOO_MANY_REQUESTS, [("retry-after", "30")], "").into_response()
            }
            "throttled-date" => (
                AxumStatus::TOO_MANY_REQUESTS,
                [("retry-after", "Wed, 21 Oct 2099 07:28:00 GMT")],
                "",
            )
                .into_response(),
            "broken" => AxumStatus::BAD_GATEWAY.into_response(),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                AxumStatus::OK.into_response()
            }
            _ => AxumStatus::IM_A_TEAPOT.into_response(),
        }
    }

    async fn stand_in() -> (String, Stand) {
        let stand = Stand::default();
        let app = Router::new()
            .route("/v1/devices/{id}", get(get_device))
            .route("/v1/devices/{id}/settings/min-soc", put(put_min_soc))
            .with_state(stand.clone());
        let addr = crate::adapters::serve_on_loopback(app).await;
        (format!("http://{addr}/v1/"), stand)
    }

    fn api(base: &str) -> HttpDeviceApi {
        HttpDeviceApi::new(base, KEY, Duration::from_millis(500)).unwrap()
    }

    fn dev(id: &str) -> DeviceId {
        DeviceId::parse(id).unwrap()
    }

    fn soc(v: u8) -> MinSoc {
        MinSoc::new(v).unwrap()
    }

    fn rid() -> RequestId {
        RequestId::from_stored("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
    }

    #[tokio::test]
    async fn status_of_an_online_device_reads_online_and_min_soc_with_the_api_key() {
        let (base, stand) = stand_in().await;
        let status = api(&base).status(&dev("online-1")).await.unwrap();
        assert_eq!(
            status,
            DeviceStatus {
                online: true,
                min_soc: Some(35)
            }
        );
        let seen = stand.seen.lock().unwrap();
        assert_eq!(seen.api_key.as_deref(), Some(KEY));
        assert_eq!(seen.path.as_deref(), Some("/devices/online-1"));
    }

    #[tokio::test]
    async fn status_of_an_offline_device_allows_a_null_min_soc() {
        let (base, _) = stand_in().await;
        let status = api(&base).status(&dev("offline-1")).await.unwrap();
        assert_eq!(
            status,
            DeviceStatus {
                online: false,
                min_soc: None
            }
        );
    }

    #[tokio::test]
    async fn status_404_maps_to_unknown_device() {
        let (base, _) = stand_in().await;
        let err = api(&base).status(&dev("nobody")).await.unwrap_err();
        assert_eq!(err, DeviceError::UnknownDevice);
        assert!(err.is_permanent());
    }

    #[tokio::test]
    async fn status_503_is_transient_and_carries_retry_after() {
        let (base, _) = stand_in().await;
        let err = api(&base).status(&dev("busy")).await.unwrap_err();
        match err {
            DeviceError::Transient { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_malformed_status_body_is_transient_not_a_crash() {
        let (base, _) = stand_in().await;
        let err = api(&base).status(&dev("garbled")).await.unwrap_err();
        assert!(matches!(err, DeviceError::Transient { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn apply_sends_min_soc_json_with_the_request_id_as_idempotency_key() {
        let (base, stand) = stand_in().await;
        api(&base)
            .apply_min_soc(&dev("ok-200"), soc(42), &rid())
            .await
            .unwrap();
        let seen = stand.seen.lock().unwrap();
        assert_eq!(seen.api_key.as_deref(), Some(KEY));
        assert_eq!(seen.idempotency_key.as_deref(), Some(rid().as_str()));
        assert_eq!(seen.content_type.as_deref(), Some("application/json"));
        assert_eq!(seen.body, Some(serde_json::json!({"minSoc": 42})));
        assert_eq!(
            seen.path.as_deref(),
            Some("/devices/ok-200/settings/min-soc")
        );
    }

    #[tokio::test]
    async fn apply_204_counts_as_applied() {
        let (base, _) = stand_in().await;
        assert_eq!(
            api(&base)
                .apply_min_soc(&dev("ok-204"), soc(0), &rid())
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn offline_device_maps_409_to_offline() {
        let (base, _) = stand_in().await;
        let err = api(&base)
            .apply_min_soc(&dev("offline"), soc(50), &rid())
            .await
            .unwrap_err();
        assert_eq!(err, DeviceError::Offline);
        assert!(!err.is_permanent());
    }

    #[tokio::test]
    async fn apply_404_maps_to_unknown_device() {
        let (base, _) = stand_in().await;
        let err = api(&base)
            .apply_min_soc(&dev("unknown"), soc(50), &rid())
            .await
            .unwrap_err();
        assert_eq!(err, DeviceError::UnknownDevice);
    }

    #[tokio::test]
    async fn apply_400_is_a_permanent_rejection_with_the_vendor_reason() {
        let (base, _) = stand_in().await;
        let err = api(&base)
            .apply_min_soc(&dev("bad-400"), soc(5), &rid())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            DeviceError::Rejected("HTTP 400: minSoc below vendor floor of 10".into())
        );
        assert!(err.is_permanent());
    }

    #[tokio::test]
    async fn apply_422_reason_is_truncated_and_never_echoes_the_key() {
        let (base, _) = stand_in().await;
        let err = api(&base)
            .apply_min_soc(&dev("bad-422"), soc(5), &rid())
            .await
            .unwrap_err();
        let DeviceError::Rejected(reason) = &err else {
            panic!("{err:?}")
        };
        assert!(reason.starts_with("HTTP 422: xxx"), "{reason}");
        assert!(reason.chars().count() <= MAX_REASON_CHARS + 12, "{reason}");
        assert!(reason.ends_with('…'));
        assert!(!err.to_string().contains(KEY));
    }

    #[test]
    fn vendor_text_loses_urls_and_secret_values_and_keeps_its_words() {
        assert_eq!(
            redact("minSoc  below\nfloor; see https://vendor.example/x?sig=abc apiKey=s3cr3t n=5"),
            "minSoc below floor; see <url> apiKey=<redacted> n=5"
        );
    }

    #[tokio::test]
    async fn throttling_is_transient_with_retry_after_in_seconds_or_http_date() {
        let (base, _) = stand_in().await;
        let err = api(&base)
            .apply_min_soc(&dev("throttled"), soc(5), &rid())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(30)
        ));
        let err = api(&base)
            .apply_min_soc(&dev("throttled-date"), soc(5), &rid())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Transient { retry_after: Some(d), .. } if d > Duration::from_secs(3600)
        ));
    }

    #[tokio::test]
    async fn a_gateway_error_is_transient_with_an_unknown_outcome_and_a_throttle_is_not() {
        // Issue 17, case 4: a 502 may still land within Lt, so the lease must be kept.
        let (base, _) = stand_in().await;
        let err = api(&base)
            .apply_min_soc(&dev("broken"), soc(5), &rid())
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            DeviceError::Transient {
                retry_after: None,
                unanswered: true,
                ..
            }
        ));
        assert!(err.to_string().contains("502"), "{err}");
        let err = api(&base)
            .apply_min_soc(&dev("throttled"), soc(5), &rid())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DeviceError::Transient {
                    unanswered: false,
                    ..
                }
            ),
            "{err:?}"
        );
        for (status, unknown) in [
            (408, true),
            (500, true),
            (502, true),
            (503, true),
            (504, true),
            (501, false),
            (429, false),
            (401, false),
        ] {
            assert_eq!(
                outcome_unknown(StatusCode::from_u16(status).unwrap()),
                unknown,
                "{status}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_device_api_times_out_as_transient() {
        let (base, _) = stand_in().await;
        let started = std::time::Instant::now();
        let err = api(&base)
            .apply_min_soc(&dev("slow"), soc(5), &rid())
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(
            matches!(&err, DeviceError::Transient { reason, .. } if reason.contains("timed out")),
            "{err:?}"
        );
        let err = api(&base).status(&dev("slow")).await.unwrap_err();
        assert!(
            matches!(&err, DeviceError::Transient { reason, .. } if reason.contains("timed out"))
        );
    }

    #[tokio::test]
    async fn connection_refused_is_transient_and_does_not_leak_the_key() {
        // Bind then drop: the port is (almost certainly) closed afterwards.
        let port = devtools::free_port().unwrap();
        let err = api(&format!("http://127.0.0.1:{port}"))
            .status(&dev("x"))
            .await
            .unwrap_err();
        assert!(matches!(err, DeviceError::Transient { .. }), "{err:?}");
        assert!(!format!("{err:?}").contains(KEY));
    }

    #[tokio::test]
    async fn a_wrong_key_is_transient_because_it_is_our_configuration_not_the_request() {
        let (base, _) = stand_in().await;
        let api = HttpDeviceApi::new(&base, "wrong", Duration::from_secs(1)).unwrap();
        let err = api.status(&dev("online-1")).await.unwrap_err();
        assert!(
            matches!(&err, DeviceError::Transient { reason, .. } if reason.contains("401")),
            "{err:?}"
        );
    }

    /// `%XX` sequences of a path segment decoded (what a server's router does).
    fn percent_decode(segment: &str) -> String {
        let bytes = segment.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// Ids no [`DeviceId`] can hold, and odd ones it can: each is refused or ends up as
    /// exactly one segment under `/devices/`, decoding back to itself.
    const HOSTILE: [&str; 16] = [
        ".",
        "..",
        "...",
        "",
        "../x",
        "..%2F",
        "%2e%2e",
        "a/b",
        "a\\b",
        "?x=1",
        "#top",
        "a b",
        "..;",
        "x/../../admin",
        ".a",
        "a..b",
    ];

    #[test]
    fn no_string_can_make_a_device_url_leave_its_one_segment() {
        let api = api("https://vendor.example/v1/");
        for id in HOSTILE {
            for suffix in [&[][..], &["settings", "min-soc"][..]] {
                let mut segments = vec!["devices", id];
                segments.extend_from_slice(suffix);
                let Ok(url) = api.url(&segments) else {
                    assert!(
                        id.is_empty() || id.bytes().all(|b| b == b'.'),
                        "{id:?} refused"
                    );
                    continue;
                };
                let got: Vec<&str> = url.path_segments().unwrap().collect();
                let mut want = vec!["v1", "devices", "<id>"];
                want.extend_from_slice(suffix);
                assert_eq!(got.len(), want.len(), "{id:?} -> {url}");
                assert_eq!(got[..2], ["v1", "devices"], "{id:?} -> {url}");
                assert_eq!(percent_decode(got[2]), id, "{id:?} -> {url}");
                assert_eq!(got[3..], *suffix, "{id:?} -> {url}");
                assert_eq!(url.query(), None, "{id:?} -> {url}");
                assert_eq!(url.fragment(), None, "{id:?} -> {url}");
            }
        }
        // Every DeviceId that parses is accepted as its own segment.
        for id in [".a", "a.", "..a", "a..b", "-", "_", "bat-7.x"] {
            let url = api.url(&["devices", dev(id).as_str()]).unwrap();
            assert_eq!(url.path(), format!("/v1/devices/{id}"));
        }
    }

    /// A device cloud that records the raw path of every request it gets, whatever the path.
    async fn path_recorder() -> (String, Arc<Mutex<Vec<String>>>) {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = seen.clone();
        let app = Router::new().fallback(move |req: axum::extract::Request| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().unwrap().push(req.uri().path().to_string());
                AxumStatus::NOT_FOUND
            }
        });
        let addr = crate::adapters::serve_on_loopback(app).await;
        (format!("http://{addr}/v1"), seen)
    }

    #[tokio::test]
    async fn no_device_id_reaches_another_path_of_the_device_cloud() {
        let (base, seen) = path_recorder().await;
        let api = api(&base);
        // Through the port: every id a DeviceId can hold, dots included.
        for id in [".a", "a.", "..a", "a..b", "-", "_", "bat-7.x"] {
            let _ = api.status(&dev(id)).await;
            let _ = api.apply_min_soc(&dev(id), soc(30), &rid()).await;
        }
        // Below the port: any string at all, sent as the client would send it.
        let mut hostile_sent = Vec::new();
        for id in HOSTILE {
            if let Ok(url) = api.url(&["devices", id, "settings", "min-soc"]) {
                api.request(reqwest::Method::PUT, url).send().await.unwrap();
                hostile_sent.push(id);
            }
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 7 * 2 + hostile_sent.len(), "{seen:?}");
        for path in &seen {
            let rest = path
                .strip_prefix("/v1/devices/")
                .unwrap_or_else(|| panic!("a call left /v1/devices/: {path}"));
            let segments: Vec<&str> = rest.split('/').collect();
            assert!(
                segments == [segments[0]] || segments[1..] == ["settings", "min-soc"],
                "{path}"
            );
            assert!(
                !segments[0].is_empty() && !segments[0].bytes().all(|b| b == b'.'),
                "{path}"
            );
        }
        for id in hostile_sent {
            assert!(
                seen.iter().any(|p| {
                    let seg = p["/v1/devices/".len()..].split('/').next().unwrap();
                    percent_decode(seg) == id
                }),
                "{id:?} did not arrive as its own segment: {seen:?}"
            );
        }
    }

    #[test]
    fn debug_of_the_client_hides_the_key() {
        let api = HttpDeviceApi::new("http://127.0.0.1:9", KEY, Duration::from_secs(1)).unwrap();
        assert!(!format!("{api:?}").contains(KEY));
    }

    #[test]
    fn bad_base_urls_and_keys_are_refused_without_echoing_them() {
        for base in ["", "not a url", "ftp://x/", "/relative"] {
            assert!(
                HttpDeviceApi::new(base, KEY, Duration::from_secs(1)).is_err(),
                "{base}"
            );
        }
        let err = HttpDeviceApi::new("http://x", "has space", Duration::from_secs(1)).unwrap_err();
        assert!(!err.to_string().contains("has space"));
    }

    #[test]
    fn retry_after_past_http_dates_mean_retry_now() {
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h, Utc::now()), Some(Duration::ZERO));
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h, Utc::now()), None);
    }
}
