//! What the handler answers an envelope-mode invocation (protocol §6).
//!
//! - [`InvocationResponse`]: success. Always `200`, `Content-Type:
//!   application/json` and a non-empty JSON object body: an empty 2xx body
//!   makes the host wait until `functionTimeout` and then restart the handler.
//! - [`InvocationFailure`]: the invocation failed. Always a non-2xx status, so
//!   the host fails it (Service Bus abandons and redelivers the message, the
//!   timer run is recorded as failed). The host ignores the body, so the
//!   reason is also written to stdout via `tracing`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

use super::http_trigger::HttpResponseOut;

/// Longest log line sent to the host; longer lines are cut.
pub const MAX_LOG_LINE: usize = 512;

/// A successful invocation: `{"Outputs":{..},"Logs":[..],"ReturnValue":null}`,
/// serialised straight into the answer's bytes (no tree).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvocationResponse {
    /// By binding name; setting a binding again replaces it.
    outputs: Vec<(&'static str, Output)>,
    logs: Vec<String>,
}

/// One output binding's value.
#[derive(Debug, Clone, PartialEq)]
enum Output {
    Http(HttpResponseOut),
    /// An array of strings (§5.5).
    Messages(Vec<String>),
}

impl InvocationResponse {
    /// Success with no outputs and no logs.
    pub fn ok() -> Self {
        Self::default()
    }

    /// Adds a line to `Logs` (Information level in the invocation log and
    /// Application Insights). Keep it short; never put secrets or customer
    /// data beyond ids in it. Cut at [`MAX_LOG_LINE`] bytes.
    pub fn with_log(mut self, line: impl Into<String>) -> Self {
        let mut line = line.into();
        if line.len() > MAX_LOG_LINE {
            let mut end = MAX_LOG_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        self.logs.push(line);
        self
    }

    /// Sets the HTTP output binding (ours: [`super::SET_SOC_HTTP_OUTPUT_BINDING`]).
    pub fn with_http(self, binding: &'static str, out: HttpResponseOut) -> Self {
        self.with_output(binding, Output::Http(out))
    }

    /// Sets a Service Bus/queue output binding. Sent as an array of strings,
    /// the one form the host neither base64-decodes nor re-indents (§5.5):
    /// one message per element, exact text, `ContentType: text/plain`.
    pub fn with_queue_messages(self, binding: &'static str, messages: Vec<String>) -> Self {
        self.with_output(binding, Output::Messages(messages))
    }

    fn with_output(mut self, binding: &'static str, output: Output) -> Self {
        match self.outputs.iter_mut().find(|(name, _)| *name == binding) {
            Some(existing) => existing.1 = output,
            None => self.outputs.push((binding, output)),
        }
        self
    }

    pub fn logs(&self) -> &[String] {
        &self.logs
    }

    /// The response body as a JSON value (tests, fixtures).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for InvocationResponse {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Outputs<'a>(&'a [(&'static str, Output)]);
        impl Serialize for Outputs<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(self.0.len()))?;
                for (binding, output) in self.0 {
                    match output {
                        Output::Http(out) => map.serialize_entry(binding, out)?,
                        Output::Messages(messages) => map.serialize_entry(binding, messages)?,
                    }
                }
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("Outputs", &Outputs(&self.outputs))?;
        map.serialize_entry("Logs", &self.logs)?;
        map.serialize_entry("ReturnValue", &())?;
        map.end()
    }
}

impl IntoResponse for InvocationResponse {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, &self)
    }
}

/// A failed invocation: non-2xx with a small JSON body the host ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvocationFailure {
    status: StatusCode,
    reason: String,
}

impl InvocationFailure {
    /// `500`: unexpected error.
    pub fn internal(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            reason: reason.into(),
        }
    }

    /// `503`: a dependency is unavailable; the trigger's own retry applies.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: reason.into(),
        }
    }

    /// `400`: the host sent a payload this layer cannot read (a [`super::HostError`]).
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

impl From<super::HostError> for InvocationFailure {
    fn from(e: super::HostError) -> Self {
        Self::bad_request(e.to_string())
    }
}

impl IntoResponse for InvocationFailure {
    fn into_response(self) -> Response {
        tracing::warn!(status = self.status.as_u16(), reason = %self.reason, "invocation failed");
        #[derive(serde::Serialize)]
        struct Failure<'a> {
            error: &'a str,
        }
        json_response(
            self.status,
            &Failure {
                error: &self.reason,
            },
        )
    }
}

/// `body` as the JSON answer, serialised straight into its buffer.
fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    // Infallible for these types (string keys only); the fallback keeps it panic-free.
    let bytes = super::write_json(body).unwrap_or_else(|| b"{}".to_vec());
    // Built whole: `(status, Vec<u8>)` would set a `Content-Type` only to be replaced.
    let mut response = Response::new(axum::body::Body::from(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use serde_json::json;

    async fn parts(response: Response) -> (StatusCode, Option<String>, Value) {
        let status = response.status();
        let ct = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, ct, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn an_empty_success_is_still_a_json_object_with_all_three_keys() {
        let (status, ct, body) = parts(InvocationResponse::ok().into_response()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ct.as_deref(), Some("application/json"));
        assert_eq!(
            body,
            json!({"Outputs": {}, "Logs": [], "ReturnValue": null})
        );
    }

    #[tokio::test]
    async fn an_http_result_lands_in_outputs_under_the_binding_name() {
        let out = HttpResponseOut::json(200, &json!({"ok": true}));
        let response = InvocationResponse::ok()
            .with_http("res", out)
            .with_log("applied");
        let (_, _, body) = parts(response.into_response()).await;
        assert_eq!(body["Outputs"]["res"]["statusCode"], json!(200));
        assert_eq!(body["Outputs"]["res"]["body"], json!("{\"ok\":true}"));
        assert_eq!(body["Logs"], json!(["applied"]));
    }

    #[tokio::test]
    async fn failures_are_non_2xx_json() {
        for f in [
            InvocationFailure::internal("boom"),
            InvocationFailure::unavailable("device api down"),
            InvocationFailure::from(crate::host::HostError::MissingBinding("msg".into())),
        ] {
            let (status, ct, body) = parts(f.clone().into_response()).await;
            assert!(!status.is_success(), "{status}");
            assert_eq!(ct.as_deref(), Some("application/json"));
            assert_eq!(body["error"], json!(f.reason()));
        }
    }

    #[test]
    fn queue_messages_are_an_array_of_exact_strings() {
        let body = InvocationResponse::ok()
            .with_queue_messages("out", vec!["{\"a\":1}".into(), "test".into()])
            .to_json();
        assert_eq!(body["Outputs"]["out"], json!(["{\"a\":1}", "test"]));
    }

    #[test]
    fn a_binding_set_twice_keeps_the_last_value_and_a_repeated_header_its_last() {
        let mut out = HttpResponseOut::json(200, &json!({}));
        out.headers.push(("X-A".into(), "1".into()));
        out.headers.push(("X-A".into(), "2".into()));
        let response = InvocationResponse::ok()
            .with_queue_messages("res", vec!["x".into()])
            .with_http("res", out);
        let text = serde_json::to_string(&response).unwrap();
        assert_eq!(text.matches("\"res\"").count(), 1, "{text}");
        assert_eq!(text.matches("\"X-A\"").count(), 1, "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["Outputs"]["res"]["headers"]["X-A"], json!("2"));
        assert_eq!(body["Outputs"]["res"]["statusCode"], json!(200));
    }

    #[test]
    fn long_log_lines_are_cut_on_a_character_boundary() {
        let r = InvocationResponse::ok().with_log("é".repeat(MAX_LOG_LINE));
        let line = &r.logs()[0];
        assert!(line.len() <= MAX_LOG_LINE);
        assert!(line.chars().all(|c| c == 'é'));
    }
}
