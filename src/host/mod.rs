//! The Functions host <-> custom handler wire protocol.
//!
//! Everything that knows what the host sends or expects lives here; the
//! function modules see typed values only. References (§) are to the
//! sections of `docs/custom-handler-protocol.md`, whose example payloads are
//! copied to `tests/fixtures/host-payloads/` and parsed by `tests/host_payloads.rs`.
//!
//! # Using it
//! ```text
//! POST /SetSocHttp (envelope mode)     InvocationRequest::from_slice(body)
//!                                      -> HttpTriggerRequest::from_invocation(&inv, SET_SOC_HTTP_TRIGGER_BINDING)
//!                                      -> .into_call() : HttpCall
//! /api/devices/{id}/soc (forwarded)    HttpCall::from_forwarded(&parts, params, body)
//!   answer (envelope)                  InvocationResponse::ok().with_http(SET_SOC_HTTP_OUTPUT_BINDING, HttpResponseOut)
//!   answer (forwarded)                 a plain HTTP response (any status is a successful invocation)
//! POST /SocQueueTrigger                ServiceBusDelivery::from_invocation(&inv, SOC_QUEUE_TRIGGER_BINDING)
//! POST /DrainSocTimer                  TimerInfo::from_invocation(&inv, DRAIN_SOC_TIMER_BINDING)
//! success / failure                    InvocationResponse (200 JSON) / InvocationFailure (non-2xx)
//! ```
//!
//! # Host quirks and the one place each is handled
//! | Quirk | Where |
//! |---|---|
//! | `Data`/`Metadata` and all keys matched case-insensitively (Newtonsoft, host dictionaries): exact spelling first, then the last of any casing | `envelope::Members::get`, [`InvocationRequest::from_slice`] |
//! | A 1-2 KB envelope per invocation, most of it unused (`Identities`, `Client`, ...) | [`InvocationRequest::from_slice`]: one pass, members borrowed as raw JSON text; each binding reads only what it uses |
//! | Primitive Metadata values double-encoded (`"\"abc\""`, `"5"`) (§2.2, §8.1) | [`unwrap_double_encoded`], `InvocationRequest::metadata_text` |
//! | Dates: offset or none (`*Utc` keys, local timer times), 0-7 fractional digits (§2.2, §4, §8.3) | [`parse_host_datetime`] |
//! | Service Bus body: double-encoded string (no `dataType`), base64 (`dataType: binary`, ours), single-encoded JSON text, JSON object (§5.1) | `service_bus::decode_body` |
//! | Body JSON properties copied into Metadata, overwriting keys such as `ExpiresAt` (§2.2, §8.2) | [`ServiceBusDelivery::from_invocation`] (shadowed keys ignored; `ExpiresAt` falls back to `ExpiresAtUtc`) |
//! | HTTP envelope: header values are arrays; `Data.req` strings single-encoded (unlike Metadata: a quoted header value keeps its quotes); body is UTF-8 text, base64 for octet-stream/multipart, absent without Content-Length (§3.2, §8.5) | [`HttpTriggerRequest::from_invocation`] |
//! | Function key in `code=` query and in `Url` | dropped in [`HttpCall`] (both modes); `Url` is never read |
//! | Repeated query keys comma-joined (§8.15) | envelope: by the host; forwarded: [`HttpCall::from_forwarded`] |
//! | Timer `ScheduleStatus` null without monitor; `Last` = `0001-01-01` before the first run (§4) | [`TimerInfo::from_invocation`] |
//! | `RetryContext` with an opaque `Exception` (§2.2) | [`InvocationRequest::retry_context`] |
//! | Response must be 2xx + `application/json` + non-empty body, else hang/failure (§6, §8.7) | [`InvocationResponse`] |
//! | Non-2xx fails the invocation (Service Bus abandon + redeliver) (§5.3, §6.1) | [`InvocationFailure`] |
//! | HTTP output: object with `statusCode`, string header values, string body written verbatim (§3.5) | `HttpResponseOut`'s `Serialize` |
//! | Queue outputs: base64 trap and re-indenting (§5.5, §8.8) | [`InvocationResponse::with_queue_messages`] (array of strings) |
//! | Forwarded body over the limit: read and discarded before answering, or the caller may see a reset | [`body::read_forwarded_body`] |
//!
//! Not handled here because they are not payload decoding: binding
//! `127.0.0.1`, answering `GET /`, logging to stdout (the router/main), and
//! keeping `autoCompleteMessages` true (checked by `tests/config_files.rs`).

pub mod body;
pub mod envelope;
pub mod http_trigger;
pub mod response;
pub mod service_bus;
pub mod timer;

pub use envelope::{parse_host_datetime, unwrap_double_encoded, InvocationRequest, RetryContext};
pub use http_trigger::{
    Headers, HttpCall, HttpResponseOut, HttpTriggerRequest, DEVICE_EVENTS_HTTP_OUTPUT_BINDING,
    DEVICE_EVENTS_HTTP_TRIGGER_BINDING, IDEMPOTENCY_KEY, SET_SOC_HTTP_OUTPUT_BINDING,
    SET_SOC_HTTP_TRIGGER_BINDING,
};
pub use response::{InvocationFailure, InvocationResponse, MAX_LOG_LINE};
pub use service_bus::{ServiceBusDelivery, SOC_QUEUE_TRIGGER_BINDING};
pub use timer::{ScheduleStatus, TimerInfo, DRAIN_SOC_TIMER_BINDING};

/// `value` as compact JSON bytes. Straight into a buffer: `Value`'s `Display`
/// (`to_string`) goes through the formatter machinery, a measurable share of a
/// no-I/O invocation (BENCHMARKS P2).
pub fn json_bytes(value: &impl serde::Serialize) -> Vec<u8> {
    // Infallible for what we write (a `Value`, a typed answer: string keys only);
    // the fallback keeps it panic-free.
    write_json(value).unwrap_or_else(|| b"null".to_vec())
}

/// `value` as compact JSON bytes, in a buffer sized for our answers from the start
/// (grown from empty, a few hundred bytes took seven reallocations).
pub(crate) fn write_json(value: &impl serde::Serialize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, value).ok()?;
    Some(out)
}

/// [`json_bytes`] as a `String` (serde_json writes UTF-8 only).
pub fn json_string(value: &impl serde::Serialize) -> String {
    String::from_utf8(json_bytes(value)).unwrap_or_else(|_| "null".into())
}

/// Why an invocation payload could not be read. Messages name the binding or
/// Metadata key, never a value (values may be customer data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The body is not `{"Data":{...},"Metadata":{...}}`.
    #[error("invalid invocation envelope: {0}")]
    InvalidEnvelope(String),
    /// `Data` has no entry for the binding the function.json declares.
    #[error("input binding {0:?} is missing from Data")]
    MissingBinding(String),
    #[error("input binding {binding:?} is invalid: {reason}")]
    InvalidBinding { binding: String, reason: String },
    #[error("metadata key {0:?} is missing")]
    MissingMetadata(String),
    #[error("metadata key {key:?} is invalid: {reason}")]
    InvalidMetadata { key: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// Every parser returns a value or a typed error for odd inputs; a panic fails this test.
    #[test]
    fn no_parser_panics_on_odd_payloads() {
        let odd = [
            Value::Null,
            json!(true),
            json!(-1),
            json!(1e300),
            json!(""),
            json!("\""),
            json!("{"),
            json!("[1,"),
            json!("é\u{0}"),
            json!([]),
            json!({}),
            json!({"Method": "G E T", "Headers": {"a": [null, 1, {}]}, "Query": [], "Body": ""}),
            json!({"ScheduleStatus": {"Last": 5, "Next": null}, "IsPastDue": []}),
        ];
        let mut parsed = 0;
        for data in &odd {
            for meta in &odd {
                let envelope = json!({"Data": {"b": data}, "Metadata": {
                    "DeliveryCount": meta, "ExpiresAt": meta, "sys": meta, "RetryContext": meta,
                    "SequenceNumber": meta, "ApplicationProperties": meta
                }})
                .to_string();
                let inv = InvocationRequest::from_slice(envelope.as_bytes()).unwrap();
                parsed += 1;
                let _ = HttpTriggerRequest::from_invocation(&inv, "b").map(|r| r.into_call());
                let _ = ServiceBusDelivery::from_invocation(&inv, "b");
                let _ = TimerInfo::from_invocation(&inv, "b");
                let _ = (inv.function_name(), inv.host_utc_now(), inv.retry_context());
            }
            let _ = HttpResponseOut::from_output(data);
        }
        assert_eq!(parsed, odd.len() * odd.len());
    }
}
