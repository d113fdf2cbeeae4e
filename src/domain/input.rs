//! Parsing the API's input: "parse, don't validate". Each type can only hold a valid value.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

/// Why an input was rejected, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InputError {
    /// The field (JSON pointer-ish name: `deviceId`, `dod`, `minSoc`, `body`, `Idempotency-Key`).
    pub field: &'static str,
    pub reason: String,
}

impl InputError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// A device id: 1-64 characters of `[A-Za-z0-9._-]`, not only dots.
///
/// `.`, `..` and every other all-dots id are refused: in a URL path they are the dot
/// segments that mean "this folder" and "the parent" (RFC 3986, "Remove Dot Segments"), so such an id would
/// name another resource than the device. Every way an id enters (the HTTP route, a
/// connection event's `subject`, a wake-up message, a ledger row) goes through [`DeviceId::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, InputError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(InputError::new("deviceId", "must be 1-64 characters"));
        }
        if !raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(InputError::new(
                "deviceId",
                "may contain only A-Z, a-z, 0-9, '.', '_' and '-'",
            ));
        }
        if raw.bytes().all(|b| b == b'.') {
            return Err(InputError::new(
                "deviceId",
                "must not be only dots ('.' and '..' are path segments, not ids)",
            ));
        }
        Ok(Self(raw.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Minimum state of charge in percent, 0..=100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MinSoc(u8);

impl MinSoc {
    pub fn new(percent: u8) -> Option<Self> {
        (percent <= 100).then_some(Self(percent))
    }

    pub fn from_dod(dod: u8) -> Option<Self> {
        (dod <= 100).then(|| Self(100 - dod))
    }

    pub fn percent(self) -> u8 {
        self.0
    }

    /// Depth of discharge: `100 - minSoc`.
    pub fn dod(self) -> u8 {
        100 - self.0
    }
}

/// How long an `Idempotency-Key` names the request it created: a retry within this
/// time answers from that request; after it the key is free again and its row is
/// deleted (README "The API", `docs/openapi.yaml`).
pub const IDEMPOTENCY_KEY_RETENTION: chrono::Duration = chrono::Duration::hours(24);

/// An `Idempotency-Key` header value: 1-128 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &[u8]) -> Result<Self, InputError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(InputError::new(
                "Idempotency-Key",
                "must be 1-128 characters",
            ));
        }
        if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(InputError::new(
                "Idempotency-Key",
                "may contain only visible ASCII characters",
            ));
        }
        // Every byte is ASCII, so this cannot fail.
        Ok(Self(String::from_utf8_lossy(raw).into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated `POST /devices/{id}/soc` body: exactly one of `dod` or `minSoc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingRequest {
    pub min_soc: MinSoc,
}

impl SettingRequest {
    /// Largest body accepted; anything bigger is rejected before parsing.
    pub const MAX_BODY_BYTES: usize = 1024;

    /// The one answer to a body over [`Self::MAX_BODY_BYTES`], wherever it is noticed (here,
    /// or while the HTTP layer reads a much larger one).
    pub fn too_large() -> InputError {
        InputError::new(
            "body",
            format!("must be at most {} bytes", Self::MAX_BODY_BYTES),
        )
    }

    fn unknown_field(name: &str) -> InputError {
        InputError::new(
            "body",
            format!("unknown field {name:?}; send exactly one of \"dod\" or \"minSoc\""),
        )
    }

    fn both_given() -> InputError {
        InputError::new(
            "body",
            "send exactly one of \"dod\" or \"minSoc\", not both",
        )
    }

    fn neither_given() -> InputError {
        InputError::new("body", "one of \"dod\" or \"minSoc\" is required")
    }

    pub fn parse(body: &[u8]) -> Result<Self, InputError> {
        if body.len() > Self::MAX_BODY_BYTES {
            return Err(Self::too_large());
        }
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(InputError::new(
                "body",
                "a JSON object with \"dod\" or \"minSoc\" is required",
            ));
        }
        let body: Body = serde_json::from_slice(body)
            .map_err(|e| InputError::new("body", format!("malformed JSON: {e}")))?;
        let Body::Object(fields) = body else {
            return Err(InputError::new("body", "must be a JSON object"));
        };
        if let Some(other) = fields.first_unknown {
            return Err(Self::unknown_field(&other));
        }
        match (fields.dod, fields.min_soc) {
            (Some(_), Some(_)) => Err(Self::both_given()),
            (None, None) => Err(Self::neither_given()),
            (Some(dod), None) => Ok(Self {
                min_soc: MinSoc::from_dod(percent("dod", &dod)?).expect("checked range"),
            }),
            (None, Some(min)) => Ok(Self {
                min_soc: MinSoc::new(percent("minSoc", &min)?).expect("checked range"),
            }),
        }
    }
}

/// A setting body's top level as [`SettingRequest::parse`] reads it: what a JSON object
/// would hold, without building one (no map, no owned key for a known name). Every value
/// is still parsed whole, so what is malformed JSON stays exactly that.
enum Body {
    Object(Fields),
    NotObject,
}

/// An object's members: the last `dod` and `minSoc` (a repeated name keeps the last, as
/// a JSON object does), and the first unknown name in byte order (the one named back).
#[derive(Default)]
struct Fields {
    dod: Option<Value>,
    min_soc: Option<Value>,
    first_unknown: Option<String>,
}

/// A member name, owned only when it is not one of ours.
enum Name {
    Dod,
    MinSoc,
    Unknown(String),
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BodyVisitor)
    }
}

struct BodyVisitor;

impl<'de> Visitor<'de> for BodyVisitor {
    type Value = Body;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
    fn visit_str<E>(self, _: &str) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
    fn visit_unit<E>(self) -> Result<Body, E> {
        Ok(Body::NotObject)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Body, A::Error> {
        while seq.next_element::<Value>()?.is_some() {}
        Ok(Body::NotObject)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
        let mut fields = Fields::default();
        while let Some(name) = map.next_key::<Name>()? {
            let value: Value = map.next_value()?;
            match name {
                Name::Dod => fields.dod = Some(value),
                Name::MinSoc => fields.min_soc = Some(value),
                Name::Unknown(other) => match &fields.first_unknown {
                    Some(first) if *first <= other => {}
                    _ => fields.first_unknown = Some(other),
                },
            }
        }
        Ok(Body::Object(fields))
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_str<E>(self, name: &str) -> Result<Name, E> {
                Ok(match name {
                    "dod" => Name::Dod,
                    "minSoc" => Name::MinSoc,
                    other => Name::Unknown(other.to_string()),
                })
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

/// A whole number from 0 to 100, as JSON Schema (and so `docs/openapi.yaml`) defines
/// integers: a number without a fractional part, however written (`50`, `50.0`, `5e1`).
/// A fraction (`50.5`) is refused, not rounded, so that a client's rounding bug shows
/// up as a 400 instead of a silently changed value.
fn percent(field: &'static str, value: &Value) -> Result<u8, InputError> {
    let whole = match value {
        Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Some(v as f64),
            (None, Some(f)) if f.is_finite() && f.fract() == 0.0 => Some(f),
            _ => None,
        },
        _ => None,
    };
    match whole {
        Some(v) if (0.0..=100.0).contains(&v) => Ok(v as u8),
        _ => Err(InputError::new(
            field,
            "must be a whole number from 0 to 100",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_accept_the_documented_alphabet_only() {
        assert!(DeviceId::parse("bat-01.A_z").is_ok());
        assert!(DeviceId::parse(&"a".repeat(64)).is_ok());
        for bad in [
            "",
            &"a".repeat(65),
            "a b",
            "a/b",
            "ä",
            "a%2F",
            "a\n",
            ".",
            "..",
            "...",
        ] {
            assert_eq!(
                DeviceId::parse(bad).unwrap_err().field,
                "deviceId",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ids_of_only_dots_are_refused_and_ids_with_dots_and_more_are_not() {
        for bad in [".", "..", "...", &".".repeat(64)] {
            let err = DeviceId::parse(bad).unwrap_err();
            assert_eq!(err.field, "deviceId", "{bad:?}");
            assert!(err.reason.contains("only dots"), "{bad:?}: {err}");
        }
        for good in [".a", "a.", "..a", "a..b", "._", "-.", ".-."] {
            assert!(DeviceId::parse(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn a_whole_number_counts_however_it_is_written_and_a_fraction_never() {
        for (body, min_soc) in [
            (&br#"{"minSoc":50.0}"#[..], 50),
            (br#"{"minSoc":1e2}"#, 100),
            (br#"{"minSoc":-0.0}"#, 0),
            (br#"{"dod":97.0}"#, 3),
        ] {
            let parsed = SettingRequest::parse(body).unwrap();
            assert_eq!(
                parsed.min_soc.percent(),
                min_soc,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        assert!(SettingRequest::parse(br#"{"minSoc":50.5}"#).is_err());
    }

    #[test]
    fn dod_is_converted_to_min_soc() {
        assert_eq!(
            SettingRequest::parse(br#"{"dod":80}"#)
                .unwrap()
                .min_soc
                .percent(),
            20
        );
        assert_eq!(
            SettingRequest::parse(br#"{"minSoc":35}"#)
                .unwrap()
                .min_soc
                .percent(),
            35
        );
        assert_eq!(
            SettingRequest::parse(br#"{"dod":0}"#)
                .unwrap()
                .min_soc
                .percent(),
            100
        );
        assert_eq!(
            SettingRequest::parse(br#"{"minSoc":100}"#)
                .unwrap()
                .min_soc
                .dod(),
            0
        );
    }

    #[test]
    fn invalid_bodies_name_the_field() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "body"),
            (b"{", "body"),
            (b"[1]", "body"),
            (b"{}", "body"),
            (br#"{"dod":10,"minSoc":90}"#, "body"),
            (br#"{"dod":101}"#, "dod"),
            (br#"{"dod":-1}"#, "dod"),
            (br#"{"minSoc":50.5}"#, "minSoc"),
            (br#"{"minSoc":"50"}"#, "minSoc"),
            (br#"{"minSoc":null}"#, "minSoc"),
            (br#"{"minSoc":1e3}"#, "minSoc"),
            (br#"{"minSoc":100.000001}"#, "minSoc"),
            (br#"{"minSoc":18446744073709551616}"#, "minSoc"),
            (br#"{"minsoc":50}"#, "body"),
        ];
        for (body, field) in cases {
            let err = SettingRequest::parse(body).unwrap_err();
            assert_eq!(
                err.field,
                *field,
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn oversized_bodies_are_rejected_before_parsing() {
        let body = format!(r#"{{"minSoc":50,"pad":"{}"}}"#, " ".repeat(2000));
        let err = SettingRequest::parse(body.as_bytes()).unwrap_err();
        assert_eq!(err, SettingRequest::too_large());
        assert_eq!(err.to_string(), "body: must be at most 1024 bytes");
    }

    #[test]
    fn a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_not() {
        let at_limit = |extra: usize| {
            let mut body = br#"{"minSoc":50}"#.to_vec();
            body.resize(SettingRequest::MAX_BODY_BYTES + extra, b' ');
            SettingRequest::parse(&body)
        };
        assert_eq!(at_limit(0).unwrap().min_soc.percent(), 50);
        assert_eq!(at_limit(1).unwrap_err(), SettingRequest::too_large());
    }

    #[test]
    fn every_bad_value_gets_the_same_words_for_people() {
        for body in [
            &br#"{"dod":101}"#[..],
            br#"{"minSoc":-1}"#,
            br#"{"minSoc":50.5}"#,
            br#"{"minSoc":"50"}"#,
        ] {
            let err = SettingRequest::parse(body).unwrap_err();
            assert_eq!(
                err.reason,
                "must be a whole number from 0 to 100",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// The reading before the typed one: the body as a `serde_json::Value` object.
    fn parse_as_value(body: &[u8]) -> Result<u8, InputError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| InputError::new("body", format!("malformed JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(InputError::new("body", "must be a JSON object"));
        };
        if let Some(other) = fields.keys().find(|k| *k != "dod" && *k != "minSoc") {
            return Err(SettingRequest::unknown_field(other));
        }
        match (fields.get("dod"), fields.get("minSoc")) {
            (Some(_), Some(_)) => Err(SettingRequest::both_given()),
            (None, None) => Err(SettingRequest::neither_given()),
            (Some(dod), None) => Ok(100 - percent("dod", dod)?),
            (None, Some(min)) => percent("minSoc", min),
        }
    }

    #[test]
    fn the_typed_reading_answers_every_body_as_reading_it_as_a_json_object_did() {
        let bodies: &[&str] = &[
            r#"{"minSoc":50}"#,
            r#"{"dod":80}"#,
            r#"{"minSoc":50,"minSoc":60}"#,
            r#"{"dod":10,"dod":"x"}"#,
            r#"{"zeta":1,"alpha":2,"minSoc":5}"#,
            r#"{"b\u0061d":1}"#,
            r#"{"min\u0053oc":7}"#,
            r#"{"x":1e400}"#,
            r#"{"minSoc":1e400}"#,
            r#"{"x":{"y":[1,{"z":null}]},"dod":3}"#,
            r#"{"minSoc":5} x"#,
            r#"{"minSoc":5"#,
            r#"[1,2"#,
            r#"[1,{"a":1e400}]"#,
            r#"[]"#,
            r#""text""#,
            r#"12"#,
            r#"null"#,
            r#"true"#,
            r#"{}"#,
            r#"{"dod":null,"minSoc":null}"#,
            r#"{"minSoc":-0.0}"#,
            r#"{"minSoc":18446744073709551616}"#,
            r#"{"":1}"#,
            " {\"dod\" : 20 } \n",
        ];
        for body in bodies {
            let typed = SettingRequest::parse(body.as_bytes()).map(|s| s.min_soc.percent());
            assert_eq!(typed, parse_as_value(body.as_bytes()), "{body}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]
        #[test]
        fn any_body_of_json_like_text_reads_as_it_did_as_a_json_object(
            body in r#"[ {}\[\]",:0-9.eE+\-a-z]{0,40}|\{("(dod|minSoc|x|a)":(-?[0-9]{1,3}(\.[0-9])?|"s"|null|\[\]|\{\}),?){0,4}\}"#
        ) {
            let typed = SettingRequest::parse(body.as_bytes()).map(|s| s.min_soc.percent());
            if !body.bytes().all(|b| b.is_ascii_whitespace()) {
                proptest::prop_assert_eq!(typed, parse_as_value(body.as_bytes()), "{}", body);
            }
        }
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_128() {
        assert!(IdempotencyKey::parse(b"abc-123/#?").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; 128]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; 129],
            b"a b",
            b"tab\t",
            "é".as_bytes(),
            b"\x7f",
        ] {
            assert!(IdempotencyKey::parse(bad).is_err(), "{bad:?}");
        }
    }
}
