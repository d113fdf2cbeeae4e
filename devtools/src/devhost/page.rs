//! What devhost's own pages (`/_devhost/queues`, `/_devhost/events`) share: pretty JSON by
//! default, HTML for a client that accepts `text/html` (a browser), whose page starts with
//! the time it was made and reloads itself every [`REFRESH_SECONDS`].

use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;

/// The HTML pages reload themselves this often.
pub const REFRESH_SECONDS: u32 = 5;

/// Whether the client asked for HTML (a browser's `Accept`).
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// `value` as pretty JSON, or the HTML `html` makes when the client asked for HTML.
pub fn respond<T: Serialize>(
    headers: &HeaderMap,
    value: &T,
    html: impl FnOnce() -> String,
) -> Response {
    if wants_html(headers) {
        return Html(html()).into_response();
    }
    let mut body = serde_json::to_string_pretty(value).unwrap_or_default();
    body.push('\n');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The start of a page titled `title`, made at `now`: styles, the time, the reload.
pub fn head(title: &str, now: DateTime<Utc>) -> String {
    format!(
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content={REFRESH_SECONDS}>\
         <title>{}</title>\
         <style>body{{font-family:sans-serif}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #999;padding:2px 6px;text-align:left;vertical-align:top}}\
         code{{font-size:90%}}</style>\
         <p>as of <time id=now datetime=\"{}\">{} UTC</time>; refreshes every {REFRESH_SECONDS} s \
         (<a href=\"\">refresh now</a>)</p>",
        escape(title),
        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        now.format("%Y-%m-%d %H:%M:%S"),
    )
}

/// Text made safe for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
