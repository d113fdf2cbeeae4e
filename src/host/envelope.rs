//! The invocation envelope `{"Data":{...},"Metadata":{...}}` and the decoding
//! rules every binding shares: case-insensitive names, double-encoded values,
//! and the host's date formats.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Map, Value};

use super::HostError;

/// One invocation as the host POSTs it to `/{FunctionName}`.
///
/// `Data` holds one entry per input binding (key = binding `name` from
/// function.json); `Metadata` the trigger's binding data plus `sys`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvocationRequest {
    data: Map<String, Value>,
    metadata: Map<String, Value>,
}

/// `Metadata.RetryContext`, present (from the first attempt on) when a retry
/// policy applies. `Exception` has no established shape, so it stays opaque.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryContext {
    pub retry_count: Option<u32>,
    pub max_retry_count: Option<u32>,
    /// The whole object as received.
    pub raw: Value,
}

impl InvocationRequest {
    /// Parses the request body. `Data`/`Metadata` are matched case-insensitively
    /// (the host writes PascalCase, Newtonsoft reads any casing); either may be
    /// absent or `null` and then counts as empty.
    pub fn from_slice(body: &[u8]) -> Result<Self, HostError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| HostError::InvalidEnvelope(format!("not JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Same as [`InvocationRequest::from_slice`] for an already parsed body.
    pub fn from_value(value: Value) -> Result<Self, HostError> {
        let Value::Object(mut top) = value else {
            return Err(HostError::InvalidEnvelope("not a JSON object".into()));
        };
        let data = take_object(&mut top, "Data")?;
        let metadata = take_object(&mut top, "Metadata")?;
        Ok(Self { data, metadata })
    }

    /// Builds an envelope directly (tests, and the lead's stand-ins).
    pub fn new(data: Map<String, Value>, metadata: Map<String, Value>) -> Self {
        Self { data, metadata }
    }

    /// The raw `Data` entry of an input binding (exact name first, then any casing).
    pub fn data(&self, binding: &str) -> Option<&Value> {
        get_ci(&self.data, binding)
    }

    /// The raw `Metadata` entry (case-insensitive, as the host's binding data is).
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        get_ci(&self.metadata, key)
    }

    /// A primitive Metadata value with its second JSON encoding removed:
    /// `"\"abc\""` -> `abc`, `"5"` -> `5`, `"2025-03-18T09:14:05"` -> itself.
    /// `None` for absent keys, objects, arrays and `null`.
    pub fn metadata_text(&self, key: &str) -> Option<String> {
        self.metadata(key).and_then(primitive_text)
    }

    /// A Metadata value that must be an unsigned integer (`"5"` -> 5).
    pub fn metadata_u64(&self, key: &str) -> Result<Option<u64>, HostError> {
        self.metadata_text(key)
            .map(|t| {
                t.trim()
                    .parse::<u64>()
                    .map_err(|_| HostError::InvalidMetadata {
                        key: key.to_string(),
                        reason: "not an unsigned integer".into(),
                    })
            })
            .transpose()
    }

    /// A Metadata value that must be a date (see [`parse_host_datetime`]).
    pub fn metadata_datetime(&self, key: &str) -> Result<Option<DateTime<Utc>>, HostError> {
        self.metadata_text(key)
            .map(|t| {
                parse_host_datetime(&t).ok_or_else(|| HostError::InvalidMetadata {
                    key: key.to_string(),
                    reason: "not a date".into(),
                })
            })
            .transpose()
    }

    /// `Metadata.sys.MethodName`: the function the host invoked.
    pub fn function_name(&self) -> Option<String> {
        self.sys_field("MethodName")
    }

    /// `Metadata.sys.UtcNow`: the host's clock when it built the invocation.
    pub fn host_utc_now(&self) -> Option<DateTime<Utc>> {
        self.sys_field("UtcNow")
            .and_then(|t| parse_host_datetime(&t))
    }

    /// `Metadata.RetryContext`, if a retry policy applies.
    pub fn retry_context(&self) -> Option<RetryContext> {
        let raw = self.metadata("RetryContext")?;
        let Value::Object(map) = raw else {
            return None;
        };
        let count = |k: &str| {
            get_ci(map, k)
                .and_then(primitive_text)
                .and_then(|t| t.parse().ok())
        };
        Some(RetryContext {
            retry_count: count("RetryCount"),
            max_retry_count: count("MaxRetryCount"),
            raw: raw.clone(),
        })
    }

    fn sys_field(&self, key: &str) -> Option<String> {
        match self.metadata("sys")? {
            Value::Object(sys) => get_ci(sys, key).and_then(primitive_text),
            _ => None,
        }
    }
}

fn take_object(top: &mut Map<String, Value>, name: &str) -> Result<Map<String, Value>, HostError> {
    let key = top.keys().find(|k| k.eq_ignore_ascii_case(name)).cloned();
    match key.and_then(|k| top.remove(&k)) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(HostError::InvalidEnvelope(format!(
            "{name} is not an object"
        ))),
    }
}

/// Case-insensitive lookup, exact match preferred. The one place the layer
/// decides how names are matched (the host's dictionaries and Newtonsoft both
/// ignore case).
pub(crate) fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// Removes one level of JSON string encoding when the text *is* a JSON string
/// literal: `"\"abc\""` -> `abc`. Anything else is returned unchanged.
///
/// This is the rule of protocol §2.2/§8.1: string-typed inputs and primitive
/// Metadata values reach the handler as a string whose content is JSON text.
pub fn unwrap_double_encoded(text: &str) -> Cow<'_, str> {
    if text.trim_start().starts_with('"') {
        if let Ok(inner) = serde_json::from_str::<String>(text) {
            return Cow::Owned(inner);
        }
    }
    Cow::Borrowed(text)
}

/// The text of a primitive wire value after one unwrap: strings per
/// [`unwrap_double_encoded`], numbers and booleans as their JSON text.
pub(crate) fn primitive_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(unwrap_double_encoded(s).into_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parses the dates the host writes, in one place:
/// RFC 3339 with `Z` or an offset (`2025-03-18T09:14:05+00:00`), any number
/// of fractional digits (.NET writes up to 7), and offset-less .NET
/// `DateTime` text (`*Utc` Metadata keys, local timer times), read as UTC
/// because that is what the host produces on Azure.
pub fn parse_host_datetime(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        return Some(dt.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Some(naive.and_utc());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope(value: Value) -> InvocationRequest {
        InvocationRequest::from_value(value).unwrap()
    }

    #[test]
    fn data_and_metadata_are_found_in_any_casing() {
        let inv = envelope(json!({"data": {"x": 1}, "METADATA": {"k": "\"v\""}}));
        assert_eq!(inv.data("x"), Some(&json!(1)));
        assert_eq!(inv.metadata_text("k").as_deref(), Some("v"));
    }

    #[test]
    fn missing_or_null_sections_count_as_empty() {
        let inv = envelope(json!({"Data": null}));
        assert_eq!(inv.data("msg"), None);
        assert_eq!(inv.metadata("sys"), None);
    }

    #[test]
    fn non_object_envelopes_are_typed_errors() {
        assert!(matches!(
            InvocationRequest::from_slice(b"[]"),
            Err(HostError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            InvocationRequest::from_slice(b""),
            Err(HostError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            InvocationRequest::from_value(json!({"Data": "x"})),
            Err(HostError::InvalidEnvelope(_))
        ));
    }

    #[test]
    fn metadata_primitives_lose_their_second_encoding() {
        let inv = envelope(json!({"Metadata": {
            "MessageId": "\"abc\"", "DeliveryCount": "5", "Raw": 7, "Obj": {}
        }}));
        assert_eq!(inv.metadata_text("messageid").as_deref(), Some("abc"));
        assert_eq!(inv.metadata_u64("DeliveryCount").unwrap(), Some(5));
        assert_eq!(inv.metadata_u64("Raw").unwrap(), Some(7));
        assert_eq!(inv.metadata_text("Obj"), None);
        assert_eq!(inv.metadata_u64("Absent").unwrap(), None);
    }

    #[test]
    fn a_non_numeric_count_is_an_invalid_metadata_error() {
        let inv = envelope(json!({"Metadata": {"DeliveryCount": "\"x\""}}));
        assert!(matches!(
            inv.metadata_u64("DeliveryCount"),
            Err(HostError::InvalidMetadata { .. })
        ));
    }

    #[test]
    fn unwrapping_removes_exactly_one_level() {
        assert_eq!(unwrap_double_encoded("\"abc\""), "abc");
        assert_eq!(unwrap_double_encoded("\"\\\"abc\\\"\""), "\"abc\"");
        assert_eq!(unwrap_double_encoded("{\"a\":1}"), "{\"a\":1}");
        assert_eq!(unwrap_double_encoded("\"unterminated"), "\"unterminated");
        assert_eq!(unwrap_double_encoded("plain"), "plain");
    }

    #[test]
    fn host_dates_parse_with_and_without_offset() {
        let utc = |s: &str| parse_host_datetime(s).map(|d| d.to_rfc3339());
        assert_eq!(
            utc("2025-03-18T09:14:05").as_deref(),
            Some("2025-03-18T09:14:05+00:00")
        );
        assert_eq!(
            utc("2025-03-18T10:14:05+01:00").as_deref(),
            Some("2025-03-18T09:14:05+00:00")
        );
        assert_eq!(
            utc("2025-03-04T08:00:00.0049212+00:00").as_deref(),
            Some("2025-03-04T08:00:00.004921200+00:00")
        );
        assert_eq!(
            utc("2025-03-04T09:14:06.2719355Z").as_deref(),
            Some("2025-03-04T09:14:06.271935500+00:00")
        );
        assert!(parse_host_datetime("0001-01-01T00:00:00+00:00").is_some());
        assert!(parse_host_datetime("9999-12-31T23:59:59+00:00").is_some());
        assert_eq!(parse_host_datetime("yesterday"), None);
    }

    #[test]
    fn sys_and_retry_context_are_read() {
        let inv = envelope(json!({"Metadata": {
            "sys": {"MethodName": "DrainSocTimer", "UtcNow": "2025-03-04T09:00:00.0207731Z"},
            "RetryContext": {"RetryCount": 1, "MaxRetryCount": 3, "Exception": {"Message": "x"}}
        }}));
        assert_eq!(inv.function_name().as_deref(), Some("DrainSocTimer"));
        assert!(inv.host_utc_now().is_some());
        let retry = inv.retry_context().unwrap();
        assert_eq!(
            (retry.retry_count, retry.max_retry_count),
            (Some(1), Some(3))
        );
    }
}
