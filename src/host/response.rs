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
use serde_json::{json, Map, Value};

use super::http_trigger::HttpResponseOut;

/// Longest log line sent to the host; longer lines are cut.
pub const MAX_LOG_LINE: usize = 512;

/// A successful invocation: `{"Outputs":{..},"Logs":[..],"ReturnValue":null}`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InvocationResponse {
    outputs: Map<String, Value>,
    logs: Vec<String>,
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
    pub fn with_http(mut self, binding: &str, out: &HttpResponseOut) -> Self {
        self.outputs.insert(binding.to_string(), out.to_output());
        self
    }

    /// Sets a Service Bus/queue output binding. Sent as an array of strings,
    /// the one form the host neither base64-decodes nor re-indents (§5.5):
    /// one message per element, exact text, `ContentType: text/plain`.
    pub fn with_queue_messages(mut self, binding: &str, messages: Vec<String>) -> Self {
        let items = messages.into_iter().map(Value::String).collect();
        self.outputs
            .insert(binding.to_string(), Value::Array(items));
        self
    }

    pub fn logs(&self) -> &[String] {
        &self.logs
    }

    /// The response body.
    pub fn to_json(&self) -> Value {
        json!({
            "Outputs": self.outputs,
            "Logs": self.logs,
            "ReturnValue": null,
        })
    }
}

impl IntoResponse for InvocationResponse {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, self.to_json())
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
        json_response(self.status, json!({"error": self.reason}))
    }
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut response = (status, super::json_bytes(&body)).into_response();
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
            .with_http("res", &out)
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
    fn long_log_lines_are_cut_on_a_character_boundary() {
        let r = InvocationResponse::ok().with_log("é".repeat(MAX_LOG_LINE));
        let line = &r.logs()[0];
        assert!(line.len() <= MAX_LOG_LINE);
        assert!(line.chars().all(|c| c == 'é'));
    }
}
