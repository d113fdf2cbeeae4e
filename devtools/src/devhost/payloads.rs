//! The exact invocation payloads the Functions host sends (`docs/custom-handler-protocol.md` §2-§5; fixtures in
//! `tests/fixtures/host-payloads/`).

use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use super::json::J;
use crate::servicebus::{never, Delivery};

/// A string value as `JsonConvert.SerializeObject` writes it: a JSON string containing JSON text.
pub fn enc(s: &str) -> Value {
    Value::String(serde_json::to_string(s).expect("string serializes"))
}

/// `DateTime` (Kind unspecified): whole seconds, no offset.
pub fn dt_plain(t: DateTime<Utc>) -> Value {
    json!(t.format("%Y-%m-%dT%H:%M:%S").to_string())
}

/// `DateTimeOffset` in UTC: whole seconds, `+00:00`.
pub fn dt_offset(t: DateTime<Utc>) -> Value {
    json!(t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string())
}

/// Seconds plus up to 7 fractional digits (100 ns ticks), trailing zeros dropped.
fn seven_digits(t: DateTime<Utc>) -> String {
    use chrono::Timelike;
    let ticks = t.nanosecond() % 1_000_000_000 / 100;
    let frac = format!("{ticks:07}");
    let frac = frac.trim_end_matches('0');
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    if frac.is_empty() {
        base
    } else {
        format!("{base}.{frac}")
    }
}

/// .NET round-trip format with 7 fractional digits, trailing zeros dropped, `Z`.
pub fn utc_now_string(t: DateTime<Utc>) -> String {
    format!("{}Z", seven_digits(t))
}

/// Local-time (UTC here) DateTimeOffset with 7 fractional digits, `+00:00` (timer status).
pub fn offset_full(t: DateTime<Utc>) -> String {
    format!("{}+00:00", seven_digits(t))
}

pub fn sys(function: &str, now: DateTime<Utc>) -> J {
    let mut s = J::obj();
    s.push("MethodName", json!(function));
    s.push("UtcNow", json!(utc_now_string(now)));
    s.push("RandGuid", json!(Uuid::new_v4().to_string()));
    s
}

/// `JToken.ToString()` of a top-level body property, then JSON-encoded (§2.2). `None` = dropped.
fn body_prop(v: &Value) -> Option<J> {
    match v {
        Value::Null | Value::Array(_) => None,
        Value::Object(_) => Some(J::V(v.clone())),
        Value::Bool(b) => Some(J::V(enc(if *b { "True" } else { "False" }))),
        Value::Number(n) => Some(J::V(enc(&n.to_string()))),
        Value::String(s) => Some(J::V(enc(s))),
    }
}

/// Append the top-level properties of a JSON-object body (overwriting same-named keys).
pub fn apply_body_props(meta: &mut J, body: &[u8]) {
    if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) {
        for (k, v) in m {
            if let Some(j) = body_prop(&v) {
                meta.set(&k, j);
            }
        }
    }
}

/// The Service Bus trigger envelope (§5.1, §5.2).
pub fn servicebus_envelope(
    function: &str,
    binding: &str,
    data_type: Option<&str>,
    d: &Delivery,
    namespace: &str,
    client_id: &str,
    now: DateTime<Utc>,
) -> J {
    let m = &d.message;
    let body = m.body();
    let binary = data_type == Some("binary");
    let data_value = if binary {
        json!(base64::engine::general_purpose::STANDARD.encode(&body))
    } else {
        enc(&String::from_utf8_lossy(&body))
    };
    let mut data = J::obj();
    data.push(binding, data_value);

    let mut md = J::obj();
    for k in [
        "MessageReceiver",
        "MessageSession",
        "MessageActions",
        "SessionActions",
    ] {
        md.push(k, json!({}));
    }
    md.push("ReceiveActions", json!({}));
    let mut client = J::obj();
    client.push("FullyQualifiedNamespace", json!(namespace));
    client.push("IsClosed", json!(false));
    client.push("TransportType", json!(0));
    client.push("Identifier", json!(format!("{namespace}-{client_id}")));
    md.push("Client", client);
    md.push("DeliveryCount", json!(m.delivery_count.to_string()));
    md.push("LockToken", enc(&d.lock_token.to_string()));
    let expires = m.expires_at.unwrap_or_else(never);
    md.push("ExpiresAtUtc", dt_plain(expires));
    md.push("ExpiresAt", dt_offset(expires));
    md.push("EnqueuedTimeUtc", dt_plain(m.enqueued_time));
    md.push("EnqueuedTime", dt_offset(m.enqueued_time));
    md.push("MessageId", enc(&m.message_id));
    if let Some(v) = &m.content_type {
        md.push("ContentType", enc(v));
    }
    if let Some(v) = &m.reply_to {
        md.push("ReplyTo", enc(v));
    }
    md.push("SequenceNumber", json!(m.sequence_number.to_string()));
    if let Some(v) = &m.to {
        md.push("To", enc(v));
    }
    if let Some(v) = &m.label {
        md.push("Subject", enc(v));
        md.push("Label", enc(v));
    }
    if let Some(v) = &m.correlation_id {
        md.push("CorrelationId", enc(v));
    }
    md.push(
        "ApplicationProperties",
        Value::Object(m.application_properties.clone()),
    );
    md.push(
        "UserProperties",
        Value::Object(m.application_properties.clone()),
    );
    if let Some(v) = &m.session_id {
        md.push("SessionId", enc(v));
    }
    if let Some(v) = &m.reply_to_session_id {
        md.push("ReplyToSessionId", enc(v));
    }
    if let Some(v) = &m.partition_key {
        md.push("PartitionKey", enc(v));
    }
    md.push("sys", sys(function, now));
    if !binary {
        apply_body_props(&mut md, &body);
    }
    let mut env = J::obj();
    env.push("Data", data);
    env.push("Metadata", md);
    env
}

/// Timer schedule status as the listener reports it.
#[derive(Clone, Debug, Default)]
pub struct TimerStatus {
    pub last: Option<DateTime<Utc>>,
    pub next: DateTime<Utc>,
    pub last_updated: Option<DateTime<Utc>>,
}

/// The timer trigger envelope (§4). `status: None` = no schedule monitor.
pub fn timer_envelope(
    function: &str,
    binding: &str,
    status: Option<&TimerStatus>,
    is_past_due: bool,
    now: DateTime<Utc>,
) -> J {
    let mut schedule = J::obj();
    schedule.push("AdjustForDST", json!(true));
    let status_j = match status {
        None => J::V(Value::Null),
        Some(s) => {
            let zero = "0001-01-01T00:00:00+00:00".to_string();
            let mut j = J::obj();
            j.push(
                "Last",
                json!(s.last.map(offset_full).unwrap_or_else(|| zero.clone())),
            );
            j.push("Next", json!(offset_full(s.next)));
            j.push(
                "LastUpdated",
                json!(s.last_updated.map(offset_full).unwrap_or(zero)),
            );
            j
        }
    };
    let mut timer = J::obj();
    timer.push("Schedule", schedule);
    timer.push("ScheduleStatus", status_j);
    timer.push("IsPastDue", json!(is_past_due));
    let mut data = J::obj();
    data.push(binding, timer);
    let mut md = J::obj();
    md.push("sys", sys(function, now));
    let mut env = J::obj();
    env.push("Data", data);
    env.push("Metadata", md);
    env
}

/// An HTTP request as devhost received it, for the envelope (§3.2).
#[derive(Clone, Debug)]
pub struct HttpIn {
    pub method: String,
    /// Path as received (with the route prefix).
    pub path: String,
    /// Raw query string without `?`.
    pub query: Option<String>,
    /// (name as canonicalised, value), in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the request had `Content-Length > 0` (chunked bodies are dropped, §3.2).
    pub has_length: bool,
    pub params: Vec<(String, String)>,
    /// `Some(level)` when authenticated with a key (`Function` / `Admin`).
    pub key_level: Option<String>,
}

/// `content-type` -> `Content-Type`, `x-arr-log-id` -> `X-Arr-Log-Id`.
pub fn canonical_header(name: &str) -> String {
    name.split('-')
        .map(|p| {
            let mut c = p.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    })
    .unwrap_or_default()
}

/// Query with repeated keys comma-joined (first-seen order).
pub fn query_joined(q: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in query_pairs(q) {
        if let Some(e) = out.iter_mut().find(|(ek, _)| *ek == k) {
            e.1 = format!("{},{}", e.1, v);
        } else {
            out.push((k, v));
        }
    }
    out
}

fn query_last(q: Option<&str>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in query_pairs(q) {
        if let Some(e) = out.iter_mut().find(|(ek, _)| *ek == k) {
            e.1 = v;
        } else {
            out.push((k, v));
        }
    }
    out
}

fn headers_grouped(h: &[(String, String)]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for (k, v) in h {
        if let Some(e) = out.iter_mut().find(|(ek, _)| ek.eq_ignore_ascii_case(k)) {
            e.1.push(v.clone());
        } else {
            out.push((k.clone(), vec![v.clone()]));
        }
    }
    out
}

fn identity(key_level: Option<&str>) -> Value {
    let claims = match key_level {
        None => json!([]),
        Some(level) => json!([{
            "Issuer": "LOCAL AUTHORITY",
            "OriginalIssuer": "LOCAL AUTHORITY",
            "Properties": {},
            "Type": "http://schemas.microsoft.com/2017/07/functions/claims/authlevel",
            "Value": level,
            "ValueType": "http://www.w3.org/2001/XMLSchema#string"
        }]),
    };
    json!({
        "AuthenticationType": key_level.map(|_| "WebJobsAuthLevel"),
        "IsAuthenticated": key_level.is_some(),
        "Actor": null,
        "BootstrapContext": null,
        "Claims": claims,
        "Label": null,
        "Name": null,
        "NameClaimType": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
        "RoleClaimType": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
    })
}

/// The HTTP trigger envelope for a non-forwarded function (§3.2).
pub fn http_envelope(function: &str, binding: &str, r: &HttpIn, now: DateTime<Utc>) -> J {
    let host = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "localhost".into());
    let url = format!(
        "http://{host}{}{}",
        r.path,
        r.query
            .as_deref()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let mut req = J::obj();
    req.push("Url", json!(url));
    req.push("Method", json!(r.method));
    let mut q = J::obj();
    for (k, v) in query_joined(r.query.as_deref()) {
        q.push(&k, json!(v));
    }
    req.push("Query", q);
    let mut h = J::obj();
    let grouped = headers_grouped(&r.headers);
    for (k, vs) in &grouped {
        h.push(k, json!(vs));
    }
    req.push("Headers", h);
    let mut p = J::obj();
    for (k, v) in &r.params {
        // Only a catch-all can match nothing; the host sends it as null (§3.2).
        p.push(k, if v.is_empty() { Value::Null } else { json!(v) });
    }
    req.push("Params", p);
    req.push("Identities", json!([identity(r.key_level.as_deref())]));
    let body_present = r.has_length && !r.body.is_empty();
    if body_present {
        let ct = r
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_default();
        let body = if ct.starts_with("application/octet-stream") || ct.starts_with("multipart/") {
            base64::engine::general_purpose::STANDARD.encode(&r.body)
        } else {
            String::from_utf8_lossy(&r.body).into_owned()
        };
        req.push("Body", json!(body));
    }
    let mut data = J::obj();
    data.push(binding, req);

    let mut md = J::obj();
    if body_present {
        apply_body_props(&mut md, &r.body);
    }
    let last = query_last(r.query.as_deref());
    for (k, v) in &last {
        if k != "code" {
            md.set(k, enc(v));
        }
    }
    // A catch-all that matched nothing is null in Data.req.Params; nulls are dropped here (§2.2).
    for (k, v) in r.params.iter().filter(|(_, v)| !v.is_empty()) {
        md.set(k, enc(v));
    }
    let mut mq = J::obj();
    for (k, v) in &last {
        mq.push(k, json!(v));
    }
    md.set("Query", mq);
    let mut mh = J::obj();
    for (k, vs) in &grouped {
        mh.push(k, json!(vs.join(",")));
    }
    md.set("Headers", mh);
    md.set("sys", sys(function, now));
    let mut env = J::obj();
    env.push("Data", data);
    env.push("Metadata", md);
    env
}

/// How the host turns `Outputs.<res>` into the HTTP response (§3.5).
#[derive(Clone, Debug, PartialEq)]
pub struct HttpOut {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

pub fn interpret_http_output(result: &Value, out_binding: &str) -> Result<HttpOut, String> {
    let get = |v: &Value, k: &str| -> Option<Value> {
        v.as_object()?
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    let mut outputs = get(result, "Outputs").unwrap_or(json!({}));
    let rv = get(result, "ReturnValue").unwrap_or(Value::Null);
    let res = if out_binding == "$return" {
        rv
    } else {
        if let (Value::Object(o), Value::Object(r)) = (&mut outputs, &rv) {
            for (k, v) in r {
                o.insert(k.clone(), v.clone());
            }
        }
        match get(&outputs, out_binding) {
            None => {
                return Ok(HttpOut {
                    status: 200,
                    headers: vec![],
                    body: b"{}".to_vec(),
                })
            }
            Some(v) => v,
        }
    };
    let Value::Object(_) = &res else {
        if out_binding == "$return" {
            let body = match &res {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            return Ok(HttpOut {
                status: 200,
                headers: vec![],
                body: body.into_bytes(),
            });
        }
        return Err(format!(
            "Outputs.{out_binding} must be a JSON object, got {res}"
        ));
    };
    let status = match get(&res, "statusCode") {
        None | Some(Value::Null) => 200,
        Some(Value::Number(n)) => n.as_u64().ok_or("statusCode is not an integer")? as u16,
        Some(Value::String(s)) => s.trim().parse().map_err(|_| "statusCode is not numeric")?,
        Some(other) => return Err(format!("statusCode {other} is not a number")),
    };
    let body = match get(&res, "body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => s.into_bytes(),
        Some(v @ (Value::Object(_) | Value::Array(_))) => serde_json::to_string_pretty(&v)
            .unwrap_or_default()
            .into_bytes(),
        Some(v) => v.to_string().into_bytes(),
    };
    let mut headers = Vec::new();
    if let Some(Value::Object(h)) = get(&res, "headers") {
        for (k, v) in h {
            let s = match v {
                Value::String(s) => s,
                Value::Array(a) => a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string).unwrap_or(x.to_string()))
                    .collect::<Vec<_>>()
                    .join("\n"),
                other => other.to_string(),
            };
            headers.push((k, s));
        }
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        && !body.is_empty()
    {
        headers.push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
    }
    Ok(HttpOut {
        status,
        headers,
        body,
    })
}
