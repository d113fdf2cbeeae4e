//! HTTP trigger, both ways the host can deliver it (protocol §3):
//! - envelope mode (§3.2): `Data.req` inside the invocation JSON -> [`HttpTriggerRequest`];
//! - forwarded mode (§3.3, what our host.json enables): a plain HTTP request
//!   to `/api/devices/{id}/soc` or `/api/device-events` -> [`HttpCall::from_forwarded`].
//!
//! Both meet in [`HttpCall`], the one request type the function code sees.
//! The response side for envelope mode is [`HttpResponseOut`], rendered by
//! [`super::InvocationResponse::with_http`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use axum::http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method};
use base64::Engine as _;
use bytes::Bytes;
use serde::de::{Deserializer as _, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use super::envelope::{is_null, primitive_text, string, InvocationRequest, Members, Shallow};
use super::HostError;

/// Trigger binding name of `SetSocHttp/function.json`.
pub const SET_SOC_HTTP_TRIGGER_BINDING: &str = "req";
/// Output binding name of `SetSocHttp/function.json` (tests/config_files.rs checks it).
pub const SET_SOC_HTTP_OUTPUT_BINDING: &str = "res";
/// Trigger binding name of `DeviceEventsHttp/function.json`.
pub const DEVICE_EVENTS_HTTP_TRIGGER_BINDING: &str = "req";
/// Output binding name of `DeviceEventsHttp/function.json`.
pub const DEVICE_EVENTS_HTTP_OUTPUT_BINDING: &str = "res";
/// The `Idempotency-Key` request header, as a name that needs no parsing per lookup.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The query parameter carrying the function key. Kept out of [`HttpCall`]
/// so it can never reach a log line.
const FUNCTION_KEY_PARAM: &str = "code";

/// Request headers as the envelope carries them, already in HTTP's form: names
/// and values HTTP does not allow are dropped, a header with several values keeps
/// them as separate entries. Lookups ignore case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(HeaderMap);

impl Headers {
    /// First value of a header, if it is visible ASCII.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }

    fn content_type(&self) -> Option<&str> {
        self.0
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }

    /// All values of a header that are visible ASCII (empty if absent).
    pub fn get_all(&self, name: &str) -> Vec<&str> {
        self.0
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    }
}

/// `Data.req` of an HTTP trigger in envelope mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTriggerRequest {
    pub method: Method,
    /// Query values; repeated keys arrive comma-joined (`tag=a,b`). Includes `code`.
    pub query: BTreeMap<String, String>,
    pub headers: Headers,
    /// Route values (`deviceId`); a catch-all without a value is left out.
    pub params: BTreeMap<String, String>,
    /// `None` when the host sent no `Body` (no `Content-Length`, or 0).
    pub body: Option<Vec<u8>>,
}

impl HttpTriggerRequest {
    /// Reads `Data.<binding>` (ours: [`SET_SOC_HTTP_TRIGGER_BINDING`]): only the
    /// members used here; `Url` (which carries the function key when one was used),
    /// `Identities` and anything else are scanned over.
    pub fn from_invocation(inv: &InvocationRequest<'_>, binding: &str) -> Result<Self, HostError> {
        let invalid = |reason: &str| HostError::InvalidBinding {
            binding: binding.to_string(),
            reason: reason.to_string(),
        };
        let req = match inv.data(binding) {
            None => return Err(HostError::MissingBinding(binding.to_string())),
            Some(Shallow::Object(req)) => req,
            Some(_) => return Err(invalid("not an object")),
        };
        let method = req
            .get("Method")
            .and_then(string)
            .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
            .ok_or_else(|| invalid("Method missing or invalid"))?;
        let query = string_map(req.get("Query")).map_err(|r| invalid(&format!("Query {r}")))?;
        let params = string_map(req.get("Params")).map_err(|r| invalid(&format!("Params {r}")))?;
        let headers = headers(req.get("Headers")).map_err(|r| invalid(&r))?;
        let body = match req.get("Body") {
            None => None,
            Some(raw) if is_null(raw) => None,
            Some(raw) => {
                let text = string(raw).ok_or_else(|| invalid("Body is not a string"))?;
                Some(decode_body(text, headers.content_type()).map_err(|r| invalid(&r))?)
            }
        };
        Ok(Self {
            method,
            query,
            headers,
            params,
            body,
        })
    }

    /// Converts to the mode-neutral request.
    pub fn into_call(self) -> HttpCall {
        let mut query = self.query;
        query.remove(FUNCTION_KEY_PARAM);
        HttpCall {
            method: self.method,
            params: self.params,
            query,
            headers: self.headers.0,
            body: self.body.map(Bytes::from).unwrap_or_default(),
        }
    }
}

/// The one HTTP request type the function code sees, whichever way the host
/// delivered it. Never contains the function key.
#[derive(Debug, Clone)]
pub struct HttpCall {
    pub method: Method,
    /// Route values by name (`deviceId`).
    pub params: BTreeMap<String, String>,
    /// Query parameters except `code`; repeated keys comma-joined like the host does.
    pub query: BTreeMap<String, String>,
    pub headers: HeaderMap,
    /// Empty when there was no body.
    pub body: Bytes,
}

impl HttpCall {
    /// Forwarded mode: the host replays the caller's request (path with `/api`,
    /// original headers, body only if it had a `Content-Length`). The router
    /// extracts the route values (`params`) and the body; this adds the query.
    pub fn from_forwarded(parts: &Parts, params: BTreeMap<String, String>, body: Bytes) -> Self {
        let mut query: BTreeMap<String, String> = BTreeMap::new();
        if let Some(raw) = parts.uri.query() {
            for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
                if k == FUNCTION_KEY_PARAM {
                    continue;
                }
                query
                    .entry(k.into_owned())
                    .and_modify(|existing| {
                        existing.push(',');
                        existing.push_str(&v);
                    })
                    .or_insert_with(|| v.into_owned());
            }
        }
        Self {
            method: parts.method.clone(),
            params,
            query,
            headers: parts.headers.clone(),
            body,
        }
    }

    /// A header as text (first value), if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }
}

/// HTTP response in envelope mode, rendered as `Outputs.<res>` (§3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponseOut {
    pub status: u16,
    /// Header values are strings on the wire; a repeated name keeps the last.
    pub headers: Vec<(Cow<'static, str>, Cow<'static, str>)>,
    /// Written verbatim by the host (a string body is never re-indented).
    pub body: String,
}

impl HttpResponseOut {
    /// A JSON body with `Content-Type: application/json` (or a caller-chosen
    /// JSON type such as `application/problem+json` via [`Self::with_header`]).
    pub fn json(status: u16, body: &Value) -> Self {
        Self {
            status,
            headers: vec![(
                Cow::Borrowed("Content-Type"),
                Cow::Borrowed("application/json"),
            )],
            body: super::json_string(body),
        }
    }

    /// Adds a header, replacing an earlier one of the same name (any casing).
    pub fn with_header(
        mut self,
        name: impl Into<Cow<'static, str>>,
        value: impl Into<Cow<'static, str>>,
    ) -> Self {
        let name = name.into();
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        self.headers.push((name, value.into()));
        self
    }

    /// Reads an `Outputs.<res>` object back (tests, stand-ins). Accepts what the
    /// host accepts: any key casing, numeric or numeric-string `statusCode`
    /// (missing = 200), string body (object/array bodies become their JSON text).
    pub fn from_output(value: &Value) -> Result<Self, String> {
        let raw = serde_json::value::to_raw_value(value).map_err(|e| e.to_string())?;
        let Ok(Some(map)) = Members::of(&raw) else {
            return Err("http output is not an object".into());
        };
        let status = match map.get("statusCode") {
            None => 200,
            Some(v) if is_null(v) => 200,
            Some(v) => primitive_text(v)
                .and_then(|t| t.parse::<u16>().ok())
                .ok_or("statusCode is not a number")?,
        };
        let headers = match map.get("headers").map(Members::of) {
            None | Some(Ok(None)) => Vec::new(),
            Some(Ok(Some(h))) => h
                .iter()
                .map(|(k, v)| match string(v) {
                    Some(s) => Ok((Cow::Owned(k.to_string()), Cow::Owned(s.into_owned()))),
                    None => Err(format!("header {k} is not a string")),
                })
                .collect::<Result<_, _>>()?,
            Some(Err(_)) => return Err("headers is not an object".into()),
        };
        let body = match map.get("body") {
            None => String::new(),
            Some(v) if is_null(v) => String::new(),
            Some(v) => string(v).map_or_else(|| v.get().to_string(), Cow::into_owned),
        };
        Ok(Self {
            status,
            headers,
            body,
        })
    }
}

/// The `Outputs.<res>` object: `{"statusCode":..,"headers":{..},"body":"<string>"}`,
/// written straight into the answer (no tree).
impl Serialize for HttpResponseOut {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// The headers object; of a name given twice, the last.
        struct HeaderObject<'a>(&'a [(Cow<'static, str>, Cow<'static, str>)]);
        impl Serialize for HeaderObject<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(None)?;
                for (i, (name, value)) in self.0.iter().enumerate() {
                    if !self.0[i + 1..].iter().any(|(later, _)| later == name) {
                        map.serialize_entry(name, value)?;
                    }
                }
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("statusCode", &self.status)?;
        map.serialize_entry("headers", &HeaderObject(&self.headers))?;
        map.serialize_entry("body", &self.body)?;
        map.end()
    }
}

/// A `Data.req` member's value as text: a string's content, decoded once (§3.2: the
/// request is a JSON object of plain strings, not the double encoding of Metadata), a
/// number or boolean as its JSON text; `None` for `null`, objects and arrays. A header
/// value that is itself quoted (`If-Match: "v1"`) keeps its quotes, as when forwarded.
fn member_text(raw: &RawValue) -> Option<Cow<'_, str>> {
    if raw.get().starts_with('"') {
        string(raw)
    } else {
        primitive_text(raw)
    }
}

/// `Query`/`Params`: name -> text ([`member_text`]; other values left out).
fn string_map(value: Option<&RawValue>) -> Result<BTreeMap<String, String>, String> {
    let Some(raw) = value else {
        return Ok(BTreeMap::new());
    };
    // The docs show `"Query": "{}"` (a string); the source sends objects.
    let text = string(raw);
    let members = match &text {
        Some(inner) => Members::parse(inner),
        None => Members::of(raw),
    };
    match members {
        Ok(Some(members)) => {
            let mut map = BTreeMap::new();
            for (k, v) in members.iter() {
                if let Some(text) = member_text(v) {
                    map.insert(k.to_string(), text.into_owned());
                }
            }
            Ok(map)
        }
        Ok(None) if text.is_none() => Ok(BTreeMap::new()),
        _ => Err("is not an object".into()),
    }
}

/// `Headers`: name -> array of values (one plain value tolerated, `Metadata.Headers`
/// style), straight into HTTP's form (see [`Headers`]). A name given twice with the
/// same spelling keeps the last (a JSON object's rule); other casings of it add values.
fn headers(value: Option<&RawValue>) -> Result<Headers, String> {
    let members = match value.map(Members::of) {
        None | Some(Ok(None)) => return Ok(Headers::default()),
        Some(Ok(Some(members))) => members,
        Some(Err(_)) => return Err("Headers is not an object".into()),
    };
    // Room for a request's usual headers; `HeaderMap` panics when it is full, so names
    // past its limit are dropped (`try_append`), never a reason to fail.
    let mut out = HeaderMap::with_capacity(members.len().min(64));
    let superseded = superseded_names(&members);
    for (i, (name, raw)) in members.iter().enumerate() {
        if superseded(i, name) {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        let mut add = |value: &RawValue| {
            if let Some(value) = member_text(value).and_then(|t| HeaderValue::from_str(&t).ok()) {
                let _ = out.try_append(name.clone(), value);
            }
        };
        if raw.get().starts_with('[') {
            for_each_element(raw, add);
        } else {
            add(raw);
        }
    }
    Ok(Headers(out))
}

/// Whether member `i` (named `name`) is followed by one of the same spelling, which then
/// counts instead. A request's few headers are compared pairwise; past that, each name's
/// last position is looked up, so no envelope makes this quadratic.
fn superseded_names<'m>(members: &'m Members<'_>) -> impl Fn(usize, &str) -> bool + 'm {
    const PAIRWISE_UP_TO: usize = 32;
    let last: Option<HashMap<&str, usize>> = (members.len() > PAIRWISE_UP_TO).then(|| {
        let mut last = HashMap::with_capacity(members.len());
        for (i, (name, _)) in members.iter().enumerate() {
            last.insert(name.as_ref(), i);
        }
        last
    });
    move |i, name| match &last {
        Some(last) => last.get(name).is_some_and(|&at| at != i),
        None => members.iter().skip(i + 1).any(|(later, _)| later == name),
    }
}

/// Calls `f` with each element of the JSON array `raw`, in order, without collecting
/// them (stops at the first element that is not JSON; `raw` was read whole, so none).
fn for_each_element<'a>(raw: &'a RawValue, f: impl FnMut(&'a RawValue)) {
    struct Elements<F>(F);
    impl<'de, F: FnMut(&'de RawValue)> Visitor<'de> for Elements<F> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
            while let Some(element) = seq.next_element::<&'de RawValue>()? {
                (self.0)(element);
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let _ = de.deserialize_seq(Elements(f));
}

/// §3.2: `application/octet-stream` and `multipart/*` bodies are base64,
/// everything else is the body decoded as UTF-8 text.
fn decode_body(text: Cow<'_, str>, content_type: Option<&str>) -> Result<Vec<u8>, String> {
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if media.eq_ignore_ascii_case("application/octet-stream")
        || media
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("multipart/"))
    {
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|_| "Body is not valid base64".to_string())
    } else {
        Ok(text.into_owned().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(req: Value) -> Result<HttpTriggerRequest, HostError> {
        request_text(&json!({ "req": req }).to_string())
    }

    /// `data` as the envelope's `Data` text, as written (member order kept).
    fn request_text(data: &str) -> Result<HttpTriggerRequest, HostError> {
        let body = format!(r#"{{"Data": {data}}}"#);
        let inv = InvocationRequest::from_slice(body.as_bytes()).unwrap();
        HttpTriggerRequest::from_invocation(&inv, "req")
    }

    #[test]
    fn a_json_body_is_its_utf8_text_and_headers_ignore_case() {
        let r = request(json!({
            "Method": "POST",
            "Url": "https://x/api/devices/d1/soc?code=secret",
            "Query": {"code": "secret"},
            "Headers": {"Content-Type": ["application/json"], "Idempotency-Key": ["k1"]},
            "Params": {"deviceId": "d1"},
            "Body": "{\"dod\":20}"
        }))
        .unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.headers.get("idempotency-key"), Some("k1"));
        assert_eq!(r.body.as_deref(), Some(&b"{\"dod\":20}"[..]));
        let call = r.into_call();
        assert_eq!(call.params.get("deviceId").map(String::as_str), Some("d1"));
        assert!(call.query.is_empty(), "the function key must not survive");
        assert_eq!(call.header("Idempotency-Key"), Some("k1"));
        assert_eq!(&call.body[..], b"{\"dod\":20}");
    }

    #[test]
    fn octet_stream_and_multipart_bodies_are_base64_decoded() {
        for ct in [
            "application/octet-stream",
            "multipart/form-data; boundary=x",
        ] {
            let r = request(json!({
                "Method": "POST", "Headers": {"content-type": [ct]}, "Body": "AAEC/w=="
            }))
            .unwrap();
            assert_eq!(r.body.as_deref(), Some(&[0u8, 1, 2, 255][..]), "{ct}");
        }
        let bad = request(json!({
            "Method": "POST", "Headers": {"Content-Type": ["application/octet-stream"]}, "Body": "%%"
        }));
        assert!(matches!(bad, Err(HostError::InvalidBinding { .. })));
    }

    #[test]
    fn a_request_without_body_has_none_and_an_empty_call_body() {
        let r =
            request(json!({"Method": "GET", "Params": {"deviceId": "d1", "rest": null}})).unwrap();
        assert_eq!(r.body, None);
        assert!(!r.params.contains_key("rest"));
        assert!(r.into_call().body.is_empty());
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        assert!(matches!(
            request(json!("GET")),
            Err(HostError::InvalidBinding { .. })
        ));
        assert!(matches!(
            request(json!({})),
            Err(HostError::InvalidBinding { .. })
        ));
        assert!(matches!(
            request(json!({"Method": "GET", "Headers": []})),
            Err(HostError::InvalidBinding { .. })
        ));
        assert!(matches!(
            request(json!({"Method": "GET", "Body": 5})),
            Err(HostError::InvalidBinding { .. })
        ));
        let inv = InvocationRequest::default();
        assert!(matches!(
            HttpTriggerRequest::from_invocation(&inv, "req"),
            Err(HostError::MissingBinding(_))
        ));
    }

    #[test]
    fn request_members_match_exactly_first_then_in_any_casing_the_last_one_winning() {
        let r = request_text(
            r#"{"req": {"method": "DELETE", "Method": "POST", "METHOD": "GET",
                "headers": {"X-A": ["1"]}, "HEADERS": {"X-A": ["2"]},
                "params": [], "Params": {"deviceId": "d1"}, "Body": "b"}}"#,
        )
        .unwrap();
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.headers.get_all("x-a"), ["2"]);
        assert_eq!(r.params.get("deviceId").map(String::as_str), Some("d1"));
        assert_eq!(r.body.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn a_header_given_twice_keeps_the_last_and_other_casings_add_values() {
        let r = request_text(
            r#"{"req": {"Method": "GET", "Headers": {"X-A": ["1"], "X-A": ["2"], "x-a": ["3"]}}}"#,
        )
        .unwrap();
        // Read straight into HTTP's form: the casings are one header already.
        assert_eq!(r.headers.get_all("X-A"), ["2", "3"]);
        let call = r.into_call();
        let values: Vec<_> = call.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["2", "3"]);
    }

    #[test]
    fn query_and_params_may_be_json_text_null_or_absent() {
        let r = request(json!({"Method": "GET", "Query": "{\"a\":\"1\",\"n\":2}", "Params": null}))
            .unwrap();
        assert_eq!(r.query.get("a").map(String::as_str), Some("1"));
        assert_eq!(r.query.get("n").map(String::as_str), Some("2"));
        assert!(r.params.is_empty());
        for bad in [json!("null"), json!("[]"), json!("{"), json!(5), json!([])] {
            assert!(
                matches!(
                    request(json!({"Method": "GET", "Query": bad})),
                    Err(HostError::InvalidBinding { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn identities_and_unknown_members_are_skipped_whatever_they_hold() {
        let r = request_text(
            r#"{"req": {"Method": "POST",
                "Identities": [{"Claims": [{"Type": "x", "Properties": {}}], "Actor": null}],
                "Extra": {"deep": [[1, 2.5e300, "\u00e9"]]},
                "Headers": {"Content-Type": ["text/plain"]},
                "Body": "caf\u00e9 \"quoted\""}}"#,
        )
        .unwrap();
        assert_eq!(r.body.as_deref(), Some("café \"quoted\"".as_bytes()));
    }

    #[test]
    fn quoted_header_query_and_route_values_keep_their_quotes_as_when_forwarded() {
        let r = request(json!({"Method": "POST",
            "Headers": {"Idempotency-Key": ["\"k1\""], "If-Match": "\"v1\""},
            "Query": {"q": "\"x\""},
            "Params": {"deviceId": "\"d1\"", "n": 5}}))
        .unwrap();
        assert_eq!(r.headers.get("idempotency-key"), Some("\"k1\""));
        assert_eq!(r.headers.get("if-match"), Some("\"v1\""));
        assert_eq!(r.query.get("q").map(String::as_str), Some("\"x\""));
        assert_eq!(r.params.get("deviceId").map(String::as_str), Some("\"d1\""));
        assert_eq!(r.params.get("n").map(String::as_str), Some("5"));

        let forwarded = axum::http::Request::builder()
            .method("POST")
            .uri("/api/devices/d1/soc")
            .header("Idempotency-Key", "\"k1\"")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let forwarded = HttpCall::from_forwarded(&forwarded, BTreeMap::new(), Bytes::new());
        assert_eq!(
            r.into_call().header("idempotency-key"),
            forwarded.header("idempotency-key")
        );
    }

    #[test]
    fn more_header_names_than_http_can_hold_are_dropped_not_fatal() {
        let headers: serde_json::Map<String, Value> = (0..40_000)
            .map(|i| (format!("X-H{i}"), json!(["v"])))
            .collect();
        let r = request(json!({"Method": "GET", "Headers": headers})).unwrap();
        let call = r.into_call();
        assert!(call.headers.contains_key("x-h0"));
        assert!(call.headers.keys_len() < 40_000);
    }

    #[test]
    fn many_headers_keep_the_last_of_a_name_given_twice_like_a_few() {
        let mut text = String::from(r#"{"req": {"Method": "GET", "Headers": {"X-A": ["1"], "#);
        for i in 0..100 {
            text.push_str(&format!(r#""X-H{i}": ["v"], "#));
        }
        text.push_str(r#""X-A": ["2"], "x-a": ["3"]}}}"#);
        let call = request_text(&text).unwrap().into_call();
        let values: Vec<_> = call.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["2", "3"]);
        assert_eq!(call.headers.keys_len(), 101);
    }

    #[test]
    fn headers_that_http_forbids_are_dropped_not_fatal() {
        let r = request(json!({"Method": "GET", "Headers": {
            "bad name": ["x"], "X-Ok": ["a", "b"], "X-Bad": ["line\nbreak"]
        }}))
        .unwrap();
        let call = r.into_call();
        assert_eq!(call.headers.get_all("x-ok").iter().count(), 2);
        assert!(call.headers.get("x-bad").is_none());
        assert_eq!(call.headers.len(), 2);
    }

    #[test]
    fn forwarded_requests_meet_envelope_requests_in_one_type() {
        let req = axum::http::Request::builder()
            .method("POST")
            .uri("/api/devices/d1/soc?code=secret&tag=a&tag=b")
            .header("Idempotency-Key", "k1")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let params = BTreeMap::from([("deviceId".to_string(), "d1".to_string())]);
        let call = HttpCall::from_forwarded(&parts, params, Bytes::from_static(b"{}"));
        assert_eq!(call.method, Method::POST);
        assert_eq!(call.query.get("tag").map(String::as_str), Some("a,b"));
        assert!(!call.query.contains_key("code"));
        assert_eq!(call.header("idempotency-key"), Some("k1"));
    }

    #[test]
    fn the_http_output_has_string_headers_and_a_verbatim_string_body() {
        let out = HttpResponseOut::json(202, &json!({"status": "pending"}))
            .with_header("Location", "/api/devices/d1/soc")
            .with_header("content-type", "application/problem+json");
        let v = serde_json::to_value(&out).unwrap();
        assert_eq!(v["statusCode"], json!(202));
        assert_eq!(v["body"], json!("{\"status\":\"pending\"}"));
        assert_eq!(v["headers"]["Location"], json!("/api/devices/d1/soc"));
        assert_eq!(
            v["headers"]["content-type"],
            json!("application/problem+json")
        );
        assert_eq!(v["headers"].as_object().unwrap().len(), 2);
        assert_eq!(HttpResponseOut::from_output(&v).unwrap(), out);
    }

    #[test]
    fn reading_an_http_output_accepts_what_the_host_accepts() {
        let out = HttpResponseOut::from_output(&json!({"StatusCode": "404"})).unwrap();
        assert_eq!((out.status, out.body.as_str()), (404, ""));
        let out = HttpResponseOut::from_output(&json!({"body": {"a": 1}})).unwrap();
        assert_eq!((out.status, out.body.as_str()), (200, "{\"a\":1}"));
        assert!(HttpResponseOut::from_output(&json!("body")).is_err());
        assert!(HttpResponseOut::from_output(&json!({"headers": {"X": 1}})).is_err());
    }
}
