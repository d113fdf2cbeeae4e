//! The invocation envelope `{"Data":{...},"Metadata":{...}}` and the decoding
//! rules every binding shares: case-insensitive names, double-encoded values,
//! and the host's date formats.
//!
//! # How it is read: borrowed, typed, once
//! The body is read in one pass into the two sections, each a [`Members`]: every
//! member's name with its value's raw JSON text, borrowed from the body (no tree
//! of values, no copies). A binding then reads only the members it uses, each into a
//! typed value (`http_trigger`, `service_bus`, `timer`); the rest (the HTTP
//! trigger's `Identities`, the Service Bus `Client`, ...) is only scanned over.
//!
//! # Names
//! `Data`/`Metadata` and every name inside are matched ignoring ASCII case (the
//! host writes PascalCase, but Newtonsoft reads any casing and the host's binding
//! data dictionaries are case-insensitive). The exact spelling is preferred; among
//! members that match equally well (the same name twice, or two other casings) the
//! **last** one wins, as with a repeated key in a JSON object and as with the host's
//! case-insensitive dictionaries, which keep the last write. Only the chosen member's
//! value matters: an unusable value of one that loses is never looked at.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use super::HostError;

/// One invocation as the host POSTs it to `/{FunctionName}`, borrowed from the
/// request body.
///
/// `Data` holds one entry per input binding (key = binding `name` from
/// function.json); `Metadata` the trigger's binding data plus `sys`.
#[derive(Debug, Clone, Default)]
pub struct InvocationRequest<'a> {
    data: Members<'a, Shallow<'a>>,
    metadata: Members<'a>,
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

impl<'a> InvocationRequest<'a> {
    /// Reads the request body (module doc: "How it is read"). `Data`/`Metadata`
    /// are matched as every name is (module doc: "Names"); either may be absent or
    /// `null` and then counts as empty.
    pub fn from_slice(body: &'a [u8]) -> Result<Self, HostError> {
        let not_json = |e: &dyn fmt::Display| HostError::InvalidEnvelope(format!("not JSON: {e}"));
        let text = std::str::from_utf8(body).map_err(|e| not_json(&e))?;
        match serde_json::from_str::<Shallow<'a, Sections<'a>>>(text).map_err(|e| not_json(&e))? {
            Shallow::Object(Sections { data, metadata }) => Ok(Self {
                data: data.into_members("Data")?,
                metadata: metadata.into_members("Metadata")?,
            }),
            _ => Err(HostError::InvalidEnvelope("not a JSON object".into())),
        }
    }

    /// The `Data` entry of an input binding (see "Names" in the module doc).
    pub(crate) fn data(&self, binding: &str) -> Option<&Shallow<'a>> {
        self.data.get(binding)
    }

    /// The raw `Metadata` entry (see "Names" in the module doc).
    pub fn metadata(&self, key: &str) -> Option<&'a RawValue> {
        self.metadata.get(key)
    }

    /// A primitive Metadata value with its second JSON encoding removed:
    /// `"\"abc\""` -> `abc`, `"5"` -> `5`, `"2025-03-18T09:14:05"` -> itself.
    /// `None` for absent keys, objects, arrays and `null`.
    pub fn metadata_text(&self, key: &str) -> Option<Cow<'a, str>> {
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
        self.sys_field("MethodName").map(Cow::into_owned)
    }

    /// `Metadata.sys.UtcNow`: the host's clock when it built the invocation.
    pub fn host_utc_now(&self) -> Option<DateTime<Utc>> {
        self.sys_field("UtcNow")
            .and_then(|t| parse_host_datetime(&t))
    }

    /// `Metadata.RetryContext`, if a retry policy applies.
    pub fn retry_context(&self) -> Option<RetryContext> {
        let raw = self.metadata("RetryContext")?;
        let map = Members::of(raw).ok()??;
        let count = |k: &str| {
            map.get(k)
                .and_then(primitive_text)
                .and_then(|t| t.parse().ok())
        };
        Some(RetryContext {
            retry_count: count("RetryCount"),
            max_retry_count: count("MaxRetryCount"),
            raw: serde_json::from_str(raw.get()).ok()?,
        })
    }

    fn sys_field(&self, key: &str) -> Option<Cow<'a, str>> {
        let sys = Members::of(self.metadata("sys")?).ok()??;
        sys.get(key).and_then(primitive_text)
    }
}

/// A JSON object's members in document order, borrowed from the text they were
/// read from: each name (unescaped; a copy only if it had an escape) with its
/// value, by default the value's raw JSON text. Looked up as the module doc's
/// "Names" says.
#[derive(Debug, Clone)]
pub(crate) struct Members<'a, V = &'a RawValue>(Vec<(Cow<'a, str>, V)>);

impl<V> Default for Members<'_, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

/// A value that had to be a JSON object (or `null`) and is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotAnObject;

impl<'a, V> Members<'a, V> {
    /// The value of `name`: exact spelling first, then any ASCII casing; the last of
    /// equally good matches.
    fn find(&self, name: &str) -> Option<&V> {
        let mut other_casing = None;
        for (key, value) in self.0.iter().rev() {
            if key == name {
                return Some(value);
            }
            if other_casing.is_none() && key.eq_ignore_ascii_case(name) {
                other_casing = Some(value);
            }
        }
        other_casing
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Cow<'a, str>, &V)> + '_ {
        self.0.iter().map(|(k, v)| (k, v))
    }

    fn collect<'de: 'a, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error>
    where
        V: Deserialize<'de>,
    {
        // Room for a request's members from the first one on; an empty object (the
        // usual `Query`) allocates nothing.
        let mut members = Vec::new();
        while let Some(Name(name)) = map.next_key()? {
            if members.is_empty() {
                members.reserve(map.size_hint().unwrap_or(8));
            }
            members.push((name, map.next_value()?));
        }
        Ok(Self(members))
    }
}

impl<'a> Members<'a> {
    /// The members of `raw`; `None` for `null`.
    pub(crate) fn of(raw: &'a RawValue) -> Result<Option<Self>, NotAnObject> {
        Self::parse(raw.get())
    }

    /// The members of the JSON text `text`; `None` for `null`. Text that is not JSON
    /// is not an object either.
    pub(crate) fn parse(text: &'a str) -> Result<Option<Self>, NotAnObject> {
        match serde_json::from_str(text) {
            Ok(Shallow::Object(members)) => Ok(Some(members)),
            Ok(Shallow::Null) => Ok(None),
            _ => Err(NotAnObject),
        }
    }

    /// The raw value of `name` (see [`Members`]).
    pub(crate) fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.find(name).copied()
    }
}

impl<'a> Members<'a, Shallow<'a>> {
    /// The value of `name` (see [`Members`]).
    pub(crate) fn get(&self, name: &str) -> Option<&Shallow<'a>> {
        self.find(name)
    }
}

/// A JSON value read one level deep in the envelope's one pass: an object read as
/// `O` (by default its members: the HTTP trigger's request, the timer's `TimerInfo`),
/// an array's items, a string's content (a Service Bus body), or what else it is.
#[derive(Debug, Clone)]
pub(crate) enum Shallow<'a, O = Members<'a>> {
    Object(O),
    Array(Vec<&'a RawValue>),
    String(Cow<'a, str>),
    /// A number or a boolean.
    Scalar,
    Null,
}

/// How an object is read into `Self` from its members, one after the other.
trait FromObject<'de>: Sized {
    fn from_object<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error>;
}

impl<'de: 'a, 'a, V: Deserialize<'de>> FromObject<'de> for Members<'a, V> {
    fn from_object<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        Members::collect(map)
    }
}

impl<'de: 'a, 'a, O: FromObject<'de>> Deserialize<'de> for Shallow<'a, O> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any<'a, O>(PhantomData<Shallow<'a, O>>);
        impl<'de: 'a, 'a, O: FromObject<'de>> Visitor<'de> for Any<'a, O> {
            type Value = Shallow<'a, O>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                O::from_object(map).map(Shallow::Object)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Shallow::Array(items))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Shallow::String(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Shallow::String(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Shallow::String(Cow::Owned(v)))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Shallow::Scalar)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Shallow::Scalar)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Shallow::Scalar)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Shallow::Scalar)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Shallow::Null)
            }
        }
        d.deserialize_any(Any(PhantomData))
    }
}

/// A member name, borrowed from the text unless it had an escape (also the request
/// body's keys in `set_soc_checks`).
pub(crate) struct Name<'a>(pub(crate) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Name<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(CowStr(PhantomData)).map(Name)
    }
}

/// A JSON string's content: borrowed from the text unless it had an escape.
struct CowStr<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for CowStr<'a> {
    type Value = Cow<'a, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The whole body's two sections, as chosen (module doc: "Names").
struct Sections<'a> {
    data: Section<'a, Members<'a, Shallow<'a>>>,
    metadata: Section<'a, Members<'a>>,
}

/// The chosen `Data` or `Metadata` member so far: whether its name was spelled
/// exactly, and its value (an object read as `M`).
enum Section<'a, M> {
    Absent,
    Found { exact: bool, value: Shallow<'a, M> },
}

impl<'a, M: Default> Section<'a, M> {
    /// Keeps `value` unless the section so far was spelled exactly and this one is not.
    fn offer(&mut self, exact: bool, value: Shallow<'a, M>) {
        if exact || !matches!(self, Section::Found { exact: true, .. }) {
            *self = Section::Found { exact, value };
        }
    }

    fn into_members(self, name: &str) -> Result<M, HostError> {
        match self {
            Section::Absent => Ok(M::default()),
            Section::Found { value, .. } => match value {
                Shallow::Null => Ok(M::default()),
                Shallow::Object(members) => Ok(members),
                _ => Err(HostError::InvalidEnvelope(format!(
                    "{name} is not an object"
                ))),
            },
        }
    }
}

impl<'de: 'a, 'a> FromObject<'de> for Sections<'a> {
    fn from_object<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let (mut data, mut metadata) = (Section::Absent, Section::Absent);
        while let Some(Name(name)) = map.next_key()? {
            if name.eq_ignore_ascii_case("Data") {
                data.offer(name == "Data", map.next_value()?);
            } else if name.eq_ignore_ascii_case("Metadata") {
                metadata.offer(name == "Metadata", map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Self { data, metadata })
    }
}

/// Whether a raw value is JSON `null`.
pub(crate) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

/// A JSON string value's content (one level of encoding removed, as any JSON
/// reader does); `None` for every other kind of value.
pub(crate) fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    if !text.starts_with('"') {
        return None;
    }
    // Without an escape the content is the text between the quotes.
    if !text.contains('\\') {
        return text.get(1..text.len() - 1).map(Cow::Borrowed);
    }
    serde_json::Deserializer::from_str(text)
        .deserialize_str(CowStr(PhantomData))
        .ok()
}

/// Removes one level of JSON string encoding when the text *is* a JSON string
/// literal: `"\"abc\""` -> `abc`. Anything else is returned unchanged.
///
/// This is the rule of protocol §2.2/§8.1: string-typed inputs and primitive
/// Metadata values reach the handler as a string whose content is JSON text.
pub fn unwrap_double_encoded(text: &str) -> Cow<'_, str> {
    if text.trim_start().starts_with('"') {
        let mut de = serde_json::Deserializer::from_str(text);
        if let Ok(inner) = de.deserialize_str(CowStr(PhantomData)) {
            if de.end().is_ok() {
                return inner;
            }
        }
    }
    Cow::Borrowed(text)
}

/// [`unwrap_double_encoded`] of text that may already be owned.
pub(crate) fn unwrap_double_encoded_cow(text: Cow<'_, str>) -> Cow<'_, str> {
    match text {
        Cow::Borrowed(text) => unwrap_double_encoded(text),
        Cow::Owned(text) => match unwrap_double_encoded(&text) {
            // Unchanged (an unwrapped text is shorter: its quotes are gone).
            Cow::Borrowed(same) if same.len() == text.len() => Cow::Owned(text),
            inner => Cow::Owned(inner.into_owned()),
        },
    }
}

/// The host's usual double encoding of a plain string, `"\"abc\""`, read without
/// decoding: `abc`, when nothing in it is escaped twice. `None` for any other text.
fn double_encoded_plain(raw: &str) -> Option<&str> {
    let inner = raw.strip_prefix("\"\\\"")?.strip_suffix("\\\"\"")?;
    (!inner.contains(['\\', '"'])).then_some(inner)
}

/// The text of a primitive wire value after one unwrap: strings per
/// [`unwrap_double_encoded`], numbers and booleans as their JSON text (a number as
/// serde_json writes it: `1E2` is `100.0`). `None` for `null`, objects and arrays.
pub(crate) fn primitive_text(raw: &RawValue) -> Option<Cow<'_, str>> {
    let text = raw.get();
    match text.as_bytes().first()? {
        b'"' => match double_encoded_plain(text) {
            Some(inner) => Some(Cow::Borrowed(inner)),
            None => string(raw).map(unwrap_double_encoded_cow),
        },
        b't' => Some(Cow::Borrowed("true")),
        b'f' => Some(Cow::Borrowed("false")),
        b'n' | b'{' | b'[' => None,
        // A whole number of up to 19 digits is its own text (and fits a u64).
        _ if text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit()) => {
            Some(Cow::Borrowed(text))
        }
        _ => serde_json::from_str::<serde_json::Number>(text)
            .ok()
            .map(|n| Cow::Owned(n.to_string())),
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

    /// Runs `check` on the envelope read from `body` (which it borrows from).
    fn with<R>(body: &str, check: impl FnOnce(InvocationRequest<'_>) -> R) -> R {
        check(InvocationRequest::from_slice(body.as_bytes()).unwrap())
    }

    fn raw(value: Option<&RawValue>) -> Option<&str> {
        value.map(RawValue::get)
    }

    /// A `Data` entry's string content (`None` for anything else).
    fn text<'x>(value: Option<&'x Shallow<'_>>) -> Option<&'x str> {
        match value {
            Some(Shallow::String(s)) => Some(s),
            _ => None,
        }
    }

    #[test]
    fn data_and_metadata_are_found_in_any_casing() {
        with(
            r#"{"data": {"x": "1"}, "METADATA": {"k": "\"v\""}}"#,
            |inv| {
                assert_eq!(text(inv.data("x")), Some("1"));
                assert_eq!(text(inv.data("X")), Some("1"));
                assert_eq!(inv.metadata_text("k").as_deref(), Some("v"));
            },
        );
    }

    #[test]
    fn missing_or_null_sections_count_as_empty() {
        with(r#"{"Data": null}"#, |inv| {
            assert!(inv.data("msg").is_none());
            assert_eq!(raw(inv.metadata("sys")), None);
        });
        with("{}", |inv| assert!(inv.data("msg").is_none()));
    }

    #[test]
    fn non_object_envelopes_are_typed_errors() {
        for body in [
            &b"[]"[..],
            b"",
            b"[1,",
            b"\"x\"",
            b"null",
            b"{\"Data\": \"x\"}",
            b"{\"Metadata\": [1]}",
            b"{\"Data\": {}} trailing",
            b"{\"Data\": {\"x\": \"\xff\"}}",
        ] {
            assert!(
                matches!(
                    InvocationRequest::from_slice(body),
                    Err(HostError::InvalidEnvelope(_))
                ),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn names_match_exactly_first_then_in_any_casing_the_last_one_winning() {
        let body = r#"{"Metadata": {
            "messageid": "\"lower\"", "MessageId": "\"exact\"", "MESSAGEID": "\"upper\"",
            "DeliveryCount": "1", "DeliveryCount": "2"
        }}"#;
        with(body, |inv| {
            assert_eq!(inv.metadata_text("MessageId").as_deref(), Some("exact"));
            assert_eq!(inv.metadata_text("messageId").as_deref(), Some("upper"));
            assert_eq!(inv.metadata_u64("DeliveryCount").unwrap(), Some(2));
        });
    }

    #[test]
    fn a_repeated_section_keeps_the_exact_spelling_then_the_last() {
        let x = |body: &str| with(body, |inv| text(inv.data("x")).map(str::to_string));
        assert_eq!(
            x(r#"{"data": {"x": "1"}, "Data": {"x": "2"}, "DATA": {"x": "3"}}"#).as_deref(),
            Some("2")
        );
        assert_eq!(
            x(r#"{"data": {"x": "1"}, "DATA": {"x": "3"}}"#).as_deref(),
            Some("3")
        );
        // Only the chosen one's value matters.
        assert_eq!(
            x(r#"{"Data": {"x": "1"}, "data": "not an object"}"#).as_deref(),
            Some("1")
        );
        assert!(InvocationRequest::from_slice(br#"{"Data": "x", "data": {}}"#).is_err());
    }

    #[test]
    fn names_with_escapes_are_matched_unescaped() {
        with(
            r#"{"Met\u0061data": {"Message\u0049d": "\"m-1\""}}"#,
            |inv| assert_eq!(inv.metadata_text("MessageId").as_deref(), Some("m-1")),
        );
    }

    #[test]
    fn other_members_are_scanned_over_whatever_they_hold() {
        let body = r#"{"Other": [1, {"a": null}, "\u00e9"], "Data": {"msg": "e30="},
            "Metadata": {"Client": {"IsClosed": false, "Nested": [[{}]]}, "DeliveryCount": "1"}}"#;
        with(body, |inv| {
            assert_eq!(text(inv.data("msg")), Some("e30="));
            assert_eq!(
                raw(inv.metadata("client")),
                Some(r#"{"IsClosed": false, "Nested": [[{}]]}"#)
            );
        });
    }

    #[test]
    fn metadata_primitives_lose_their_second_encoding() {
        let body = json!({"Metadata": {
            "MessageId": "\"abc\"", "Escaped": "\"a\\\"b\"", "DeliveryCount": "5", "Raw": 7,
            "Float": 1E2, "Flag": true, "Obj": {}, "List": [], "Nothing": null
        }})
        .to_string();
        with(&body, |inv| {
            assert_eq!(inv.metadata_text("messageid").as_deref(), Some("abc"));
            assert_eq!(inv.metadata_text("Escaped").as_deref(), Some("a\"b"));
            assert_eq!(inv.metadata_u64("DeliveryCount").unwrap(), Some(5));
            assert_eq!(inv.metadata_u64("Raw").unwrap(), Some(7));
            assert_eq!(inv.metadata_text("Float").as_deref(), Some("100.0"));
            assert_eq!(inv.metadata_text("Flag").as_deref(), Some("true"));
            for key in ["Obj", "List", "Nothing", "Absent"] {
                assert_eq!(inv.metadata_text(key), None, "{key}");
            }
            assert_eq!(inv.metadata_u64("Absent").unwrap(), None);
        });
    }

    #[test]
    fn the_plain_double_encoding_shortcut_reads_what_decoding_twice_reads() {
        let values = [
            "abc",
            "",
            "\"",
            "a\"b",
            "a\\b",
            "\\",
            "é ü",
            "\"abc\"",
            " \"x\"",
            "{\"a\":1}",
            "5",
        ];
        for value in values {
            for wire in [
                serde_json::to_string(&serde_json::to_string(value).unwrap()).unwrap(),
                serde_json::to_string(value).unwrap(),
            ] {
                let raw = RawValue::from_string(wire.clone()).unwrap();
                let decoded: String = serde_json::from_str(&wire).unwrap();
                let expected = unwrap_double_encoded(&decoded).into_owned();
                assert_eq!(primitive_text(&raw).as_deref(), Some(&*expected), "{wire}");
                assert_eq!(string(&raw).as_deref(), Some(&*decoded), "{wire}");
            }
        }
        assert_eq!(double_encoded_plain(r#""\"m-1\"""#), Some("m-1"));
        assert_eq!(double_encoded_plain(r#""\"""#), None);
        assert_eq!(double_encoded_plain(r#""\"a\\\"b\"""#), None);
    }

    #[test]
    fn a_non_numeric_count_is_an_invalid_metadata_error() {
        with(r#"{"Metadata": {"DeliveryCount": "\"x\""}}"#, |inv| {
            assert!(matches!(
                inv.metadata_u64("DeliveryCount"),
                Err(HostError::InvalidMetadata { .. })
            ));
        });
    }

    #[test]
    fn unwrapping_removes_exactly_one_level() {
        assert_eq!(unwrap_double_encoded("\"abc\""), "abc");
        assert_eq!(unwrap_double_encoded(" \"abc\" "), "abc");
        assert_eq!(unwrap_double_encoded("\"\\\"abc\\\"\""), "\"abc\"");
        assert_eq!(unwrap_double_encoded("{\"a\":1}"), "{\"a\":1}");
        assert_eq!(unwrap_double_encoded("\"unterminated"), "\"unterminated");
        assert_eq!(unwrap_double_encoded("\"a\" \"b\""), "\"a\" \"b\"");
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
        let body = json!({"Metadata": {
            "sys": {"MethodName": "DrainSocTimer", "UtcNow": "2025-03-04T09:00:00.0207731Z"},
            "RetryContext": {"RetryCount": 1, "MaxRetryCount": "3", "Exception": {"Message": "x"}}
        }})
        .to_string();
        with(&body, |inv| {
            assert_eq!(inv.function_name().as_deref(), Some("DrainSocTimer"));
            assert!(inv.host_utc_now().is_some());
            let retry = inv.retry_context().unwrap();
            assert_eq!(
                (retry.retry_count, retry.max_retry_count),
                (Some(1), Some(3))
            );
            assert_eq!(retry.raw["Exception"]["Message"], json!("x"));
        });
        with(r#"{"Metadata": {"sys": "x", "RetryContext": []}}"#, |inv| {
            assert_eq!(inv.function_name(), None);
            assert_eq!(inv.retry_context(), None);
        });
    }
}
