//! The events page (`GET /_devhost/events[?subject=S][&subjectBeginsWith=P]`): what the app published to the Event
//! Grid topic stand-in ([`crate::eventgrid`]), oldest first, newest last. JSON: the
//! [`ReceivedEvent`]s (`seq`, `receivedAt`, `id`, `type`, `source`, `subject`, and the
//! `event` as published); HTML: one table (received, type, subject, id) or "no events".

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::page::{escape, head};
use crate::eventgrid::{ReceivedEvent, SubjectFilter};

/// The page as HTML, made at `now`; `filter` is the one the list was made with.
pub fn html(events: &[ReceivedEvent], filter: &SubjectFilter, now: DateTime<Utc>) -> String {
    let mut out = head("devhost events", now);
    let _ = write!(
        out,
        "<h2>events published to the topic{} ({})</h2>",
        escape(&filter.describe()),
        events.len()
    );
    if events.is_empty() {
        out.push_str("<p class=empty>no events</p>");
        return out;
    }
    out.push_str(
        "<table id=events><tr><th>received (UTC)</th><th>type</th><th>subject</th>\
         <th>id</th></tr>",
    );
    for e in events {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>",
            e.received_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            escape(&e.event_type),
            escape(e.subject.as_deref().unwrap_or("-")),
            escape(&e.id),
        );
    }
    out.push_str("</table>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(seq: u64, id: &str, subject: Option<&str>) -> ReceivedEvent {
        ReceivedEvent {
            seq,
            received_at: Utc::now(),
            id: id.into(),
            event_type: "com.socsettings.request.applied".into(),
            source: "/soc-settings".into(),
            subject: subject.map(str::to_string),
            event: json!({}),
        }
    }

    #[test]
    fn the_page_lists_events_in_order_escaped_or_says_there_are_none() {
        let now = Utc::now();
        let h = html(
            &[event(1, "first", Some("bat-1")), event(2, "<2>", None)],
            &SubjectFilter::default(),
            now,
        );
        assert!(
            h.contains("<th>received (UTC)</th><th>type</th><th>subject</th><th>id</th>"),
            "{h}"
        );
        assert!(
            h.find("first") < h.find("&lt;2&gt;") && !h.contains("<2>"),
            "{h}"
        );
        assert!(
            h.contains("<td>bat-1</td>") && h.contains("<td>-</td>"),
            "{h}"
        );
        assert!(h.contains("http-equiv=refresh"), "{h}");
        let filter = SubjectFilter {
            subject: Some("bat-<x>".into()),
            ..SubjectFilter::default()
        };
        let empty = html(&[], &filter, now);
        assert!(
            empty.contains("no events") && empty.contains("bat-&lt;x&gt;"),
            "{empty}"
        );
    }
}
