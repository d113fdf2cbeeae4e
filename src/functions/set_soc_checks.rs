//! The HTTP-level rules of `POST /api/devices/{deviceId}/soc` that come before the setting
//! is read (`docs/openapi.yaml`), checked on the host's request before `SetSocHttp` runs:
//!
//! - `Content-Type` must be `application/json` (parameters such as `charset` allowed):
//!   otherwise `415`, `field: Content-Type`, as `/device-events` answers;
//! - `Idempotency-Key` at most once: a repeated header is `400`, `field: Idempotency-Key`
//!   (which one was meant cannot be known);
//! - a JSON body with a key twice in one object is `400`, `field: body` (JSON leaves its
//!   meaning open; a parser that keeps the last and one that keeps the first disagree).
//!
//! A body that is not JSON at all is left to the setting's own parser, which names the field.
//! Other methods and paths pass unchecked (their `405`/`404` come from the function).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::json;

use super::set_soc_http::ApiResponse;
use crate::domain::{InputError, SettingRequest};
use crate::host::envelope::Name;
use crate::host::{HttpCall, IDEMPOTENCY_KEY};

/// `Some(answer)` when the call breaks one of the rules above.
pub fn check(call: &HttpCall) -> Option<ApiResponse> {
    let rest = call.params.get("rest").map(|r| r.trim_matches('/'));
    if call.method != axum::http::Method::POST || rest.is_some_and(|r| !r.is_empty()) {
        return None;
    }
    if !is_json(call.content_type()) {
        let p = ApiResponse::problem(
            415,
            "Unsupported media type",
            "Content-Type must be application/json",
        );
        return Some(p.with_member("field", json!("Content-Type")));
    }
    if call.headers.get_all(IDEMPOTENCY_KEY).iter().count() > 1 {
        return Some(invalid("Idempotency-Key", "must be given at most once"));
    }
    // A body over the setting's limit is refused as too large by its parser; the
    // look for repeated keys (linear per key) stays within that limit.
    if call.body.len() > SettingRequest::MAX_BODY_BYTES {
        return None;
    }
    if let Some(key) = duplicate_key(&call.body) {
        return Some(invalid(
            "body",
            format!("the key {key:?} appears twice in one object"),
        ));
    }
    None
}

fn invalid(field: &'static str, detail: impl Into<String>) -> ApiResponse {
    ApiResponse::invalid(InputError::new(field, detail))
}

/// `application/json`, any case, with or without parameters.
fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|ct| ct.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// The first key found twice in one object of `body`, if `body` is JSON.
fn duplicate_key(body: &[u8]) -> Option<String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    match de.deserialize_any(NoDuplicates) {
        Err(e) if e.is_data() => {
            let text = e.to_string();
            text.strip_prefix(DUPLICATE)
                .and_then(|rest| rest.split('\u{0}').next())
                .map(str::to_string)
        }
        _ => None,
    }
}

const DUPLICATE: &str = "duplicate key\u{0}";

/// Walks a JSON value, failing at the first object with a repeated key.
struct NoDuplicates;

impl<'de> de::Deserialize<'de> for NoDuplicates {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NoDuplicates)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = NoDuplicates;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(NoDuplicates)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(NoDuplicates)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<NoDuplicates>()?.is_some() {}
        Ok(NoDuplicates)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        // A few keys per object: a list, and keys borrowed from the body where unescaped.
        let mut seen: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Name(key)) = map.next_key::<Name<'de>>()? {
            if seen.contains(&key) {
                return Err(de::Error::custom(format!("{DUPLICATE}{key}\u{0}")));
            }
            seen.push(key);
            map.next_value::<NoDuplicates>()?;
        }
        Ok(NoDuplicates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue, Method};
    use std::collections::BTreeMap;

    fn call(content_type: Option<&str>, keys: &[&str], body: &str) -> HttpCall {
        let mut headers = HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert("content-type", HeaderValue::from_str(ct).unwrap());
        }
        for k in keys {
            headers.append("idempotency-key", HeaderValue::from_str(k).unwrap());
        }
        HttpCall {
            method: Method::POST,
            params: BTreeMap::from([("deviceId".to_string(), "bat-1".to_string())]),
            query: BTreeMap::new(),
            headers,
            body: body.as_bytes().to_vec().into(),
        }
    }

    fn field(r: Option<ApiResponse>) -> (u16, String) {
        let r = r.expect("an answer");
        (
            r.status,
            r.body_json()["field"].as_str().unwrap().to_string(),
        )
    }

    #[test]
    fn a_json_post_passes() {
        for ct in ["application/json", "Application/JSON; charset=utf-8"] {
            assert!(check(&call(Some(ct), &["k"], r#"{"minSoc":30}"#)).is_none());
        }
    }

    #[test]
    fn another_or_no_content_type_is_415() {
        for ct in [Some("text/plain"), Some("application/jsonx"), None] {
            let r = check(&call(ct, &[], r#"{"minSoc":30}"#));
            assert_eq!(field(r), (415, "Content-Type".into()), "{ct:?}");
        }
    }

    #[test]
    fn a_repeated_idempotency_key_header_is_400() {
        let r = check(&call(
            Some("application/json"),
            &["a", "a"],
            r#"{"minSoc":30}"#,
        ));
        assert_eq!(field(r), (400, "Idempotency-Key".into()));
    }

    #[test]
    fn a_key_twice_in_one_object_is_400_naming_it() {
        let r = check(&call(
            Some("application/json"),
            &[],
            r#"{"minSoc":30,"minSoc":40}"#,
        ))
        .unwrap();
        assert_eq!(
            (r.status, r.body_json()["field"].as_str()),
            (400, Some("body"))
        );
        assert!(r.body_json()["detail"]
            .as_str()
            .unwrap()
            .contains("\"minSoc\""));
        let nested = call(Some("application/json"), &[], r#"{"a":[{"b":1,"b":2}]}"#);
        assert!(check(&nested).is_some());
        let fine = call(
            Some("application/json"),
            &[],
            r#"{"a":{"b":1},"b":{"a":2}}"#,
        );
        assert!(check(&fine).is_none());
        let not_json = call(Some("application/json"), &[], "{minSoc:30");
        assert!(check(&not_json).is_none(), "left to the setting's parser");
    }

    #[test]
    fn a_key_written_once_plain_and_once_escaped_is_the_same_key() {
        let r = check(&call(
            Some("application/json"),
            &[],
            r#"{"minSoc":30,"min\u0053oc":40}"#,
        ));
        assert_eq!(field(r), (400, "body".into()));
        let escaped_twice = call(Some("application/json"), &[], r#"{"\u0061":1,"\u0061":2}"#);
        assert!(check(&escaped_twice).is_some());
        let different = call(Some("application/json"), &[], r#"{"\u0061":1,"b":2}"#);
        assert!(check(&different).is_none());
    }

    #[test]
    fn a_body_over_the_settings_limit_is_left_to_the_parser_which_refuses_it_as_too_large() {
        let pad = " ".repeat(SettingRequest::MAX_BODY_BYTES);
        let body = format!(r#"{{"minSoc":30,"minSoc":40}}{pad}"#);
        assert!(check(&call(Some("application/json"), &[], &body)).is_none());
        assert_eq!(
            SettingRequest::parse(body.as_bytes()).unwrap_err(),
            SettingRequest::too_large()
        );
    }

    #[test]
    fn other_methods_and_paths_pass_unchecked() {
        let mut get = call(None, &[], "");
        get.method = Method::GET;
        assert!(check(&get).is_none());
        let mut request = call(None, &[], "");
        request.params.insert("rest".into(), "requests/abc".into());
        assert!(check(&request).is_none());
    }

    #[test]
    fn each_kind_of_problem_has_its_own_stable_type_uri() {
        use crate::functions::set_soc_http::problem_type;
        assert_eq!(
            problem_type("Invalid request"),
            "tag:soc-settings.api,2026:problem/invalid-request"
        );
        assert_eq!(
            problem_type("Idempotency-Key reused"),
            "tag:soc-settings.api,2026:problem/idempotency-key-reused"
        );
        let p = ApiResponse::problem(404, "Unknown device", "x");
        assert_eq!(
            p.body_json()["type"],
            "tag:soc-settings.api,2026:problem/unknown-device"
        );
    }
}
