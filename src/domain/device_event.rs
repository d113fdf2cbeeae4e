//! Parsing the vendor's device connection events: CloudEvents 1.0 in the JSON event
//! format, delivered over HTTP (the contract is `docs/device-api.md`, "Connection events").
//!
//! Three request shapes are accepted, told apart by `Content-Type` ([`Encoding::of`]):
//! - `application/cloudevents+json`: structured mode, one event;
//! - `application/cloudevents-batch+json`: batched mode, a JSON array of events;
//! - `application/json`: one event or an array of them (what Azure Event Grid sends
//!   with the CloudEvents schema).
//!
//! The whole request is validated before anything acts on it ([`parse`]): one bad
//! event rejects the batch, naming the event's position and the attribute. Required:
//! `specversion` `"1.0"`, `id`, `source`, `type` (non-empty strings); optional
//! attributes, when present, are strings, and `time` is an RFC 3339 timestamp. The
//! device is the event's `subject`, required (a valid device id) only for the two
//! types the service acts on ([`CONNECTED`], [`DISCONNECTED`]); events of other types
//! are accepted and ignored, so an unrelated event in a shared subscription does not
//! make the sender dead-letter a batch that also carries ours.

use serde_json::{Map, Value};

use super::input::{DeviceId, InputError};

/// The device reconnected to the vendor's cloud: a pending request may be applied now.
pub const CONNECTED: &str = "com.vendor.device.connected";
/// The device lost its connection: nothing to do (the re-checks continue).
pub const DISCONNECTED: &str = "com.vendor.device.disconnected";
/// Largest request body read; larger ones are rejected as a whole.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most events in one request.
pub const MAX_EVENTS: usize = 100;

/// How the events are carried (from the request's `Content-Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `application/cloudevents+json`: one event.
    Structured,
    /// `application/cloudevents-batch+json`: an array of events.
    Batch,
    /// `application/json`: one event or an array (Azure Event Grid).
    Json,
}

impl Encoding {
    /// The encoding of a `Content-Type` (parameters such as `charset` are ignored).
    /// Anything else, binary-mode CloudEvents included, is refused with the field
    /// `Content-Type`.
    pub fn of(content_type: Option<&str>) -> Result<Self, InputError> {
        let media = content_type
            .and_then(|c| c.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match media.as_str() {
            "application/cloudevents+json" => Ok(Self::Structured),
            "application/cloudevents-batch+json" => Ok(Self::Batch),
            "application/json" => Ok(Self::Json),
            "" => Err(InputError::new(
                "Content-Type",
                "required: application/cloudevents+json, application/cloudevents-batch+json or application/json",
            )),
            other => Err(InputError::new(
                "Content-Type",
                format!(
                    "{other:?} is not supported; send application/cloudevents+json, \
                     application/cloudevents-batch+json or application/json"
                ),
            )),
        }
    }
}

/// What an event means to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// [`CONNECTED`]: the device is back online.
    Connected(DeviceId),
    /// [`DISCONNECTED`]: the device went offline.
    Disconnected(DeviceId),
    /// Any other type: ignored.
    Other,
}

/// One valid event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub id: String,
    pub source: String,
    pub event_type: String,
    pub kind: EventKind,
}

impl DeviceEvent {
    /// The device the event is about, for the types the service knows.
    pub fn device(&self) -> Option<&DeviceId> {
        match &self.kind {
            EventKind::Connected(d) | EventKind::Disconnected(d) => Some(d),
            EventKind::Other => None,
        }
    }
}

/// Why a request's events were rejected: the event's position (in a batch) and the
/// attribute, named like the CloudEvents attribute (`specversion`, `subject`, ...), or
/// `body` for the request or event as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}", .index.map(|i| format!("event [{i}]: ")).unwrap_or_default(), .error)]
pub struct EventError {
    /// Position in the array, for a batch.
    pub index: Option<usize>,
    pub error: InputError,
}

impl EventError {
    fn whole(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            index: None,
            error: InputError::new(field, reason),
        }
    }

    /// The one answer to a body over [`MAX_BODY_BYTES`], wherever it is noticed.
    pub fn too_large() -> Self {
        Self::whole("body", format!("must be at most {MAX_BODY_BYTES} bytes"))
    }
}

/// Parses and validates every event of a request body (see the module doc).
pub fn parse(encoding: Encoding, body: &[u8]) -> Result<Vec<DeviceEvent>, EventError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(EventError::too_large());
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(EventError::whole("body", "a CloudEvent (JSON) is required"));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| EventError::whole("body", format!("malformed JSON: {e}")))?;
    match (encoding, value) {
        (Encoding::Structured | Encoding::Json, Value::Object(event)) => {
            Ok(vec![
                parse_event(&event).map_err(|error| EventError { index: None, error })?
            ])
        }
        (Encoding::Batch | Encoding::Json, Value::Array(events)) => {
            if events.is_empty() || events.len() > MAX_EVENTS {
                return Err(EventError::whole(
                    "body",
                    format!("a batch holds 1 to {MAX_EVENTS} events"),
                ));
            }
            events
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let at = |error| EventError {
                        index: Some(i),
                        error,
                    };
                    match e {
                        Value::Object(event) => parse_event(event).map_err(at),
                        _ => Err(at(InputError::new("body", "an event is a JSON object"))),
                    }
                })
                .collect()
        }
        (Encoding::Structured, _) => Err(EventError::whole(
            "body",
            "application/cloudevents+json carries one event: a JSON object",
        )),
        (Encoding::Batch, _) => Err(EventError::whole(
            "body",
            "application/cloudevents-batch+json carries a JSON array of events",
        )),
        (Encoding::Json, _) => Err(EventError::whole(
            "body",
            "must be an event (JSON object) or an array of events",
        )),
    }
}

/// The optional context attributes whose value, when present, must be a string.
const OPTIONAL_STRINGS: [&str; 4] = ["subject", "time", "datacontenttype", "dataschema"];

fn parse_event(event: &Map<String, Value>) -> Result<DeviceEvent, InputError> {
    match event.get("specversion") {
        Some(Value::String(v)) if v == "1.0" => {}
        None => return Err(InputError::new("specversion", "required (\"1.0\")")),
        Some(_) => return Err(InputError::new("specversion", "must be \"1.0\"")),
    }
    let id = required(event, "id")?;
    let source = required(event, "source")?;
    let event_type = required(event, "type")?;
    for name in OPTIONAL_STRINGS {
        if event.get(name).is_some_and(|v| !v.is_string()) {
            return Err(InputError::new(
                field_name(name),
                "must be a string when present",
            ));
        }
    }
    if let Some(Value::String(time)) = event.get("time") {
        if chrono::DateTime::parse_from_rfc3339(time).is_err() {
            return Err(InputError::new("time", "must be an RFC 3339 timestamp"));
        }
    }
    let device = || match event.get("subject") {
        Some(Value::String(s)) => DeviceId::parse(s)
            .map_err(|e| InputError::new("subject", format!("the device id: {}", e.reason))),
        _ => Err(InputError::new(
            "subject",
            format!("required for {event_type}: the device id"),
        )),
    };
    let kind = match event_type.as_str() {
        CONNECTED => EventKind::Connected(device()?),
        DISCONNECTED => EventKind::Disconnected(device()?),
        _ => EventKind::Other,
    };
    Ok(DeviceEvent {
        id,
        source,
        event_type,
        kind,
    })
}

fn required(event: &Map<String, Value>, name: &'static str) -> Result<String, InputError> {
    match event.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None => Err(InputError::new(name, "required")),
        Some(_) => Err(InputError::new(name, "must be a non-empty string")),
    }
}

/// The `'static` field name of an optional attribute.
fn field_name(name: &str) -> &'static str {
    OPTIONAL_STRINGS
        .into_iter()
        .find(|n| *n == name)
        .unwrap_or("body")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(ty: &str, subject: &str) -> Value {
        json!({
            "specversion": "1.0",
            "id": "ev-1",
            "source": "/vendor/cloud",
            "type": ty,
            "subject": subject,
            "time": "2026-11-21T12:00:00Z",
            "datacontenttype": "application/json",
            "data": {"deviceId": subject, "online": true}
        })
    }

    fn bytes(v: &Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn rejected(encoding: Encoding, body: &[u8]) -> EventError {
        parse(encoding, body).expect_err("must be rejected")
    }

    #[test]
    fn a_body_of_exactly_the_limit_is_parsed_and_one_byte_more_is_not() {
        let at = |extra: usize| {
            let mut body = bytes(&event(CONNECTED, "bat-1"));
            body.resize(MAX_BODY_BYTES + extra, b' ');
            parse(Encoding::Structured, &body)
        };
        assert_eq!(at(0).unwrap().len(), 1);
        assert_eq!(at(1).unwrap_err(), EventError::too_large());
        assert_eq!(at(1000).unwrap_err(), EventError::too_large());
    }

    #[test]
    fn a_structured_connected_event_names_its_device() {
        let events = parse(
            Encoding::Structured,
            &bytes(&event(CONNECTED, "bat-offline")),
        )
        .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].id, "ev-1");
        assert_eq!(events[0].source, "/vendor/cloud");
        assert_eq!(
            events[0].kind,
            EventKind::Connected(DeviceId::parse("bat-offline").unwrap())
        );
        assert_eq!(events[0].device().unwrap().as_str(), "bat-offline");
    }

    #[test]
    fn a_batch_keeps_the_order_of_its_events() {
        let batch = json!([event(CONNECTED, "a"), event(DISCONNECTED, "b")]);
        let events = parse(Encoding::Batch, &bytes(&batch)).unwrap();
        assert!(matches!(events[0].kind, EventKind::Connected(ref d) if d.as_str() == "a"));
        assert!(matches!(events[1].kind, EventKind::Disconnected(ref d) if d.as_str() == "b"));
    }

    #[test]
    fn plain_json_carries_one_event_or_an_event_grid_array() {
        let one = parse(Encoding::Json, &bytes(&event(CONNECTED, "a"))).unwrap();
        assert_eq!(one.len(), 1);
        let grid = json!([
            event(CONNECTED, "a"),
            event(CONNECTED, "b"),
            event("x.y", "")
        ]);
        let many = parse(Encoding::Json, &bytes(&grid)).unwrap();
        assert_eq!(many.len(), 3);
        assert_eq!(many[2].kind, EventKind::Other);
    }

    #[test]
    fn an_event_of_another_type_needs_no_device_and_is_kept_as_other() {
        let mut e = event("com.vendor.firmware.updated", "");
        e.as_object_mut().unwrap().remove("subject");
        let events = parse(Encoding::Structured, &bytes(&e)).unwrap();
        assert_eq!(events[0].kind, EventKind::Other);
        assert_eq!(events[0].event_type, "com.vendor.firmware.updated");
        assert!(events[0].device().is_none());
    }

    #[test]
    fn extension_attributes_and_any_data_are_accepted() {
        let mut e = event(CONNECTED, "a");
        e["traceparent"] = json!("00-abc");
        e["data"] = json!([1, 2, 3]);
        e.as_object_mut().unwrap().remove("time");
        assert!(parse(Encoding::Structured, &bytes(&e)).is_ok());
    }

    #[test]
    fn content_types_select_the_encoding_and_others_are_refused() {
        assert_eq!(
            Encoding::of(Some("application/cloudevents+json; charset=utf-8")),
            Ok(Encoding::Structured)
        );
        assert_eq!(
            Encoding::of(Some("Application/CloudEvents-Batch+JSON")),
            Ok(Encoding::Batch)
        );
        assert_eq!(Encoding::of(Some("application/json")), Ok(Encoding::Json));
        for bad in [None, Some(""), Some("text/plain"), Some("application/xml")] {
            assert_eq!(
                Encoding::of(bad).unwrap_err().field,
                "Content-Type",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn every_bad_event_is_rejected_naming_the_attribute() {
        // (the field named, the attribute changed, its new value or None: removed)
        let cases: Vec<(&str, &str, Option<Value>)> = vec![
            ("specversion", "specversion", None),
            ("specversion", "specversion", Some(json!("0.3"))),
            ("specversion", "specversion", Some(json!(1.0))),
            ("id", "id", None),
            ("id", "id", Some(json!(""))),
            ("id", "id", Some(json!(7))),
            ("source", "source", None),
            ("source", "source", Some(Value::Null)),
            ("type", "type", None),
            ("type", "type", Some(json!(["x"]))),
            ("subject", "subject", None),
            ("subject", "subject", Some(json!("bad id"))),
            ("subject", "subject", Some(json!("."))),
            ("subject", "subject", Some(json!(".."))),
            ("subject", "subject", Some(json!("...."))),
            ("subject", "subject", Some(json!("x".repeat(65)))),
            ("subject", "subject", Some(json!(12))),
            ("time", "time", Some(json!("yesterday"))),
            ("time", "time", Some(json!(1_700_000_000))),
            ("datacontenttype", "datacontenttype", Some(json!({}))),
            ("dataschema", "dataschema", Some(json!(false))),
        ];
        for (field, attribute, value) in cases {
            let mut e = event(CONNECTED, "bat-1");
            let fields = e.as_object_mut().unwrap();
            match value {
                Some(v) => fields.insert(attribute.into(), v),
                None => fields.remove(attribute),
            };
            let err = rejected(Encoding::Structured, &bytes(&e));
            assert_eq!((err.index, err.error.field), (None, field), "{e}");
            // In a batch, the same event is named by its position.
            let batch = json!([event(CONNECTED, "ok"), e]);
            let err = rejected(Encoding::Batch, &bytes(&batch));
            assert_eq!((err.index, err.error.field), (Some(1), field), "{batch}");
            assert!(err.to_string().starts_with("event [1]: "), "{err}");
        }
    }

    #[test]
    fn a_malformed_empty_oversized_or_misshapen_body_is_rejected_as_a_whole() {
        let one = bytes(&event(CONNECTED, "a"));
        let array = bytes(&json!([event(CONNECTED, "a")]));
        let big = bytes(&json!(vec![event(CONNECTED, &"a".repeat(64)); 600]));
        assert!(big.len() > MAX_BODY_BYTES);
        let too_many = bytes(&json!(vec![event(CONNECTED, "a"); MAX_EVENTS + 1]));
        assert!(too_many.len() <= MAX_BODY_BYTES);
        for (encoding, body) in [
            (Encoding::Structured, b"{nope".to_vec()),
            (Encoding::Structured, b"  ".to_vec()),
            (Encoding::Structured, array.clone()),
            (Encoding::Batch, one.clone()),
            (Encoding::Batch, b"[]".to_vec()),
            (Encoding::Batch, too_many),
            (Encoding::Batch, big),
            (Encoding::Json, b"\"text\"".to_vec()),
            (Encoding::Json, b"[1]".to_vec()),
        ] {
            let err = rejected(encoding, &body);
            assert_eq!(err.error.field, "body", "{encoding:?}");
        }
    }
}
