//! Service Bus trigger (protocol §5): the message body and the Metadata the
//! host derives from the message.

use std::borrow::Cow;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::envelope::{InvocationRequest, Members, Shallow};
use super::HostError;

/// Trigger binding name of `SocQueueTrigger/function.json`.
pub const SOC_QUEUE_TRIGGER_BINDING: &str = "msg";

/// One delivered message.
///
/// Metadata fields are `None` when absent **or** when the message body is a
/// JSON object with a top-level property of the same name (any casing): the
/// host copies body properties into Metadata and they overwrite the real
/// values (§2.2, §8.2). Our wake message has `expiresAt`, which shadows
/// `ExpiresAt`; [`ServiceBusDelivery::expires_at`] then falls back to
/// `ExpiresAtUtc` (same instant, no offset), which no body of ours shadows.
/// Keys never shadowed by our [`crate::ports::WakeMessage`] body:
/// `MessageId`, `DeliveryCount`, `SequenceNumber`, `EnqueuedTime(Utc)`,
/// `ExpiresAtUtc`, `ContentType`, `CorrelationId`, `SessionId`, `Subject`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceBusDelivery {
    /// The exact message body bytes.
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    /// 1 on the first delivery; grows with each abandon/redelivery.
    pub delivery_count: u32,
    pub enqueued_time: Option<DateTime<Utc>>,
    /// When the broker drops the message (year 9999 = no TTL).
    pub expires_at: Option<DateTime<Utc>>,
    pub sequence_number: Option<i64>,
    pub content_type: Option<String>,
    pub correlation_id: Option<String>,
    pub session_id: Option<String>,
    pub subject: Option<String>,
    /// Application properties with their JSON types (`{}` when none).
    pub application_properties: Map<String, Value>,
}

impl ServiceBusDelivery {
    /// Reads the message of trigger binding `binding` (ours: [`SOC_QUEUE_TRIGGER_BINDING`]).
    ///
    /// Errors when the body is missing or undecodable, or when `DeliveryCount`
    /// is missing/invalid (the host always sends it).
    pub fn from_invocation(inv: &InvocationRequest<'_>, binding: &str) -> Result<Self, HostError> {
        let raw = inv
            .data(binding)
            .ok_or_else(|| HostError::MissingBinding(binding.to_string()))?;
        let body = decode_body(raw).map_err(|reason| HostError::InvalidBinding {
            binding: binding.to_string(),
            reason,
        })?;
        let shadowed = body_property_names(&body);
        let trusted = |key: &str| !shadowed.iter().any(|p| p.eq_ignore_ascii_case(key));
        let text = |key: &str| inv.metadata_text(key).filter(|_| trusted(key));
        let date = |key: &str| -> Result<Option<DateTime<Utc>>, HostError> {
            if trusted(key) {
                inv.metadata_datetime(key)
            } else {
                Ok(None)
            }
        };

        let delivery_count = if trusted("DeliveryCount") {
            inv.metadata_u64("DeliveryCount")?
        } else {
            None
        }
        .ok_or_else(|| HostError::MissingMetadata("DeliveryCount".into()))?;
        let delivery_count =
            u32::try_from(delivery_count).map_err(|_| HostError::InvalidMetadata {
                key: "DeliveryCount".into(),
                reason: "too large".into(),
            })?;
        let sequence_number = text("SequenceNumber")
            .map(|t| {
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| HostError::InvalidMetadata {
                        key: "SequenceNumber".into(),
                        reason: "not an integer".into(),
                    })
            })
            .transpose()?;
        let enqueued_time = match date("EnqueuedTime")? {
            Some(t) => Some(t),
            None => date("EnqueuedTimeUtc")?,
        };
        let expires_at = match date("ExpiresAt")? {
            Some(t) => Some(t),
            None => date("ExpiresAtUtc")?,
        };
        let application_properties = match inv.metadata("ApplicationProperties") {
            Some(raw) if trusted("ApplicationProperties") => {
                serde_json::from_str(raw.get()).unwrap_or_default()
            }
            _ => Map::new(),
        };
        // `body` last: the names it shadows are borrowed from it until then.
        Ok(Self {
            message_id: text("MessageId").map(Cow::into_owned),
            delivery_count,
            enqueued_time,
            expires_at,
            sequence_number,
            content_type: text("ContentType").map(Cow::into_owned),
            correlation_id: text("CorrelationId").map(Cow::into_owned),
            session_id: text("SessionId").map(Cow::into_owned),
            subject: text("Subject")
                .or_else(|| text("Label"))
                .map(Cow::into_owned),
            application_properties,
            body,
        })
    }

    /// The body as UTF-8 text, if it is.
    pub fn body_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }
}

/// Decodes `Data.<binding>` into the message bytes. The forms, in the order
/// they are recognised (a base64 string never starts with `"`, `{` or `[`):
/// 1. a JSON object/array value (hand-made payloads): its compact JSON text;
/// 2. a string starting with `"`: double-encoded text (no `dataType`), unwrapped once;
/// 3. a string starting with `{` or `[` that is valid JSON: single-encoded JSON text;
/// 4. any other string: base64 (`"dataType": "binary"`, what we deploy);
///    a string that is not valid base64 is taken as plain text.
fn decode_body(raw: &Shallow<'_>) -> Result<Vec<u8>, String> {
    let compact = |value: &Value| {
        serde_json::to_vec(value).map_err(|e| format!("cannot re-serialise body: {e}"))
    };
    match raw {
        Shallow::Object(members) => {
            let mut map = Map::new();
            for (name, value) in members.iter() {
                let value = serde_json::from_str(value.get())
                    .map_err(|e| format!("cannot re-serialise body: {e}"))?;
                map.insert(name.to_string(), value);
            }
            compact(&Value::Object(map))
        }
        Shallow::Array(items) => {
            let items = items
                .iter()
                .map(|item| serde_json::from_str(item.get()))
                .collect::<Result<Vec<Value>, _>>()
                .map_err(|e| format!("cannot re-serialise body: {e}"))?;
            compact(&Value::Array(items))
        }
        Shallow::String(s) => {
            let trimmed = s.trim_start();
            if trimmed.starts_with('"') {
                return serde_json::from_str::<String>(s)
                    .map(String::into_bytes)
                    .map_err(|_| "quoted body is not a JSON string".to_string());
            }
            if (trimmed.starts_with('{') || trimmed.starts_with('['))
                && serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok()
            {
                return Ok(s.as_bytes().to_vec());
            }
            match base64::engine::general_purpose::STANDARD.decode(s.as_bytes()) {
                Ok(bytes) => Ok(bytes),
                Err(_) => Ok(s.as_bytes().to_vec()),
            }
        }
        Shallow::Null => Err("body is null".into()),
        Shallow::Scalar => Err("body is not a string".into()),
    }
}

/// Top-level property names of a JSON-object body: the Metadata keys it may
/// have overwritten. Empty for any other body.
fn body_property_names(body: &[u8]) -> Vec<Cow<'_, str>> {
    match std::str::from_utf8(body).map(Members::parse) {
        Ok(Ok(Some(members))) => members.iter().map(|(k, _)| k.clone()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn delivery(data: Value, metadata: Value) -> Result<ServiceBusDelivery, HostError> {
        let body = json!({"Data": {"msg": data}, "Metadata": metadata}).to_string();
        let inv = InvocationRequest::from_slice(body.as_bytes()).unwrap();
        ServiceBusDelivery::from_invocation(&inv, "msg")
    }

    const BODY: &str = r#"{"requestId":"r-1","minSoc":20}"#;

    #[test]
    fn all_four_body_encodings_yield_the_same_bytes() {
        let meta = json!({"DeliveryCount": "1"});
        let double = Value::String(serde_json::to_string(BODY).unwrap());
        let base64 = Value::String(base64::engine::general_purpose::STANDARD.encode(BODY));
        let single = Value::String(BODY.into());
        let object: Value = serde_json::from_str(BODY).unwrap();
        for data in [double, base64, single, object] {
            let d = delivery(data.clone(), meta.clone()).unwrap();
            let parsed: Value = serde_json::from_slice(&d.body).unwrap();
            assert_eq!(parsed, json!({"requestId": "r-1", "minSoc": 20}), "{data}");
        }
    }

    #[test]
    fn a_double_encoded_json_string_body_is_unwrapped_only_once() {
        let d = delivery(json!("\"\\\"quoted\\\"\""), json!({"DeliveryCount": "1"})).unwrap();
        assert_eq!(d.body_text(), Some("\"quoted\""));
    }

    #[test]
    fn plain_text_that_is_not_base64_is_kept_as_text() {
        let d = delivery(json!("not base64!"), json!({"DeliveryCount": "1"})).unwrap();
        assert_eq!(d.body_text(), Some("not base64!"));
    }

    #[test]
    fn missing_null_or_numeric_bodies_are_errors() {
        let meta = json!({"DeliveryCount": "1"});
        let body = json!({"Data": {}, "Metadata": meta}).to_string();
        let inv = InvocationRequest::from_slice(body.as_bytes()).unwrap();
        assert!(matches!(
            ServiceBusDelivery::from_invocation(&inv, "msg"),
            Err(HostError::MissingBinding(_))
        ));
        assert!(matches!(
            delivery(Value::Null, meta.clone()),
            Err(HostError::InvalidBinding { .. })
        ));
        assert!(matches!(
            delivery(json!(5), meta),
            Err(HostError::InvalidBinding { .. })
        ));
    }

    #[test]
    fn a_body_expires_at_never_masquerades_as_the_message_expiry() {
        // Non-binary delivery of our wake message: the host copied the body's
        // `expiresAt` over Metadata `ExpiresAt` (same key, case-insensitive).
        let body = r#"{"requestId":"r-1","expiresAt":"2030-01-01T00:00:00Z"}"#;
        let d = delivery(
            Value::String(serde_json::to_string(body).unwrap()),
            json!({
                "DeliveryCount": "3",
                "ExpiresAtUtc": "2025-03-18T09:14:05",
                "ExpiresAt": "\"2030-01-01T00:00:00Z\"",
                "MessageId": "\"m-1\"",
                "requestId": "\"r-1\""
            }),
        )
        .unwrap();
        assert_eq!(
            d.expires_at.map(|t| t.to_rfc3339()).as_deref(),
            Some("2025-03-18T09:14:05+00:00")
        );
        assert_eq!(d.message_id.as_deref(), Some("m-1"));
        assert_eq!(d.delivery_count, 3);
    }

    #[test]
    fn a_body_property_named_like_message_id_hides_the_metadata_value() {
        let d = delivery(
            json!(r#"{"messageId":"forged"}"#),
            json!({"DeliveryCount": "1", "MessageId": "\"forged\""}),
        )
        .unwrap();
        assert_eq!(d.message_id, None);
    }

    #[test]
    fn delivery_count_is_required_and_numeric() {
        assert!(matches!(
            delivery(json!("e30="), json!({})),
            Err(HostError::MissingMetadata(_))
        ));
        assert!(matches!(
            delivery(json!("e30="), json!({"DeliveryCount": "many"})),
            Err(HostError::InvalidMetadata { .. })
        ));
        assert!(matches!(
            delivery(json!("e30="), json!({"DeliveryCount": "99999999999"})),
            Err(HostError::InvalidMetadata { .. })
        ));
    }
}
