//! The queues page (`GET /_devhost/queues`): every queued message with its *fate*, what the
//! app will do with it when it is delivered, read from the app's ledger.
//!
//! This is the one place where devhost knows something of the app it hosts beyond the
//! Functions configuration: the wake-up message body (`{"requestId","deviceId",...}`), the
//! ledger's desired-state rows (`PartitionKey` = device, `RowKey` = `desired`, `RequestId`,
//! `Status`, `WakeMessageId`) and its history rows (`RowKey` = `req-{requestId}`, `Status`,
//! `SupersededBy`; the format is documented in `src/adapters/table_ledger.rs`). It
//! reads them over the Table Storage REST API with the storage connection string the handler
//! gets (`SOC_STATE_STORAGE`, else `AzureWebJobsStorage`; table `SOC_STATE_TABLE`), so devtools
//! keeps no dependency on the product crate.
//!
//! Invariant: the fate is the same decision `SocQueueTrigger` makes on delivery, in the same
//! order: no record, not the latest request (another request id), settled (status not
//! pending), stale chain (the ledger expects another message id), else apply. For a message
//! whose request is no longer the latest, the reason is what became of that request, from its
//! history entry: superseded by the request that replaced it while it was pending, or already
//! applied / expired / failed (it was settled before a newer one came), never "superseded" for
//! a request that was applied. The page only reads; a ledger that cannot be read makes the fate
//! "unknown" with the reason, never an error page.
//!
//! The HTML page shows the time it was made, one section per state (active, scheduled,
//! dead-lettered; an empty one says so) with the device, the request and the due time as
//! columns, in due-time order, and refreshes itself every [`super::page::REFRESH_SECONDS`].

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use super::page::{escape, head};
use crate::servicebus::{MessageView, QueueSnapshot};

/// The well-known development storage account (Azurite), as `UseDevelopmentStorage=true` means.
const DEV_ACCOUNT: &str = "devstoreaccount1";
/// Its publicly documented key (not a secret).
const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const DEFAULT_TABLE: &str = "socsettings";
/// One queue as the page shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueuePage {
    pub name: String,
    pub active: Vec<MessageWithFate>,
    pub scheduled: Vec<MessageWithFate>,
    pub dead_lettered: Vec<MessageWithFate>,
}

/// A message and what will happen to it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageWithFate {
    /// `will apply ...`, `will no-op: superseded by <requestId>`, `will no-op: request already
    /// <status>`, `will no-op: ...`, `dead-lettered: ...`, or `unknown: ...`. First, so that it
    /// is the first thing a reader sees of each message.
    pub fate: String,
    /// From the wake-up body (absent for another body).
    pub device_id: Option<String>,
    pub request_id: Option<String>,
    /// When it is (or was) due for delivery: its enqueued time (a scheduled message's is its
    /// scheduled time).
    pub due_at: DateTime<Utc>,
    #[serde(flatten)]
    pub view: MessageView,
}

/// The ledger's view of one device: what a delivery would compare the message with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerRow {
    pub request_id: String,
    pub status: String,
    pub wake_message_id: Option<String>,
}

/// What became of one request, from its history entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRow {
    pub status: String,
    pub superseded_by: Option<String>,
}

/// What the page compares the messages with: each device's record, and its requests' history
/// entries by (device, request).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerView {
    pub records: HashMap<String, LedgerRow>,
    pub history: HashMap<(String, String), HistoryRow>,
}

/// The wake-up message body fields the fate depends on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WakeBody {
    request_id: String,
    device_id: String,
}

/// What `SocQueueTrigger` will do with `message` given the ledger (`Err`: it could not be read).
pub fn fate(message: &MessageView, ledger: &Result<LedgerView, String>) -> String {
    if message.message.dead_lettered {
        let reason = message
            .message
            .dead_letter_reason
            .as_deref()
            .unwrap_or("no reason");
        return format!(
            "dead-lettered ({reason}): never delivered again; the timer sweep re-sends a request still pending"
        );
    }
    let Some(body) = message
        .body_text
        .as_deref()
        .and_then(|t| serde_json::from_str::<WakeBody>(t).ok())
    else {
        return "will no-op: not a wake-up message (dropped on delivery)".into();
    };
    let ledger = match ledger {
        Ok(ledger) => ledger,
        Err(e) => return format!("unknown: the ledger could not be read ({e})"),
    };
    let Some(row) = ledger.records.get(&body.device_id) else {
        return "will no-op: no ledger record for the device".into();
    };
    if row.request_id != body.request_id {
        let entry = ledger.history.get(&(body.device_id, body.request_id));
        return match entry {
            Some(HistoryRow {
                superseded_by: Some(by),
                ..
            }) => format!("will no-op: superseded by {by}"),
            Some(h) if h.status != "pending" => {
                format!("will no-op: request already {}", h.status)
            }
            Some(_) => "will no-op: request never accepted (its POST was undone)".into(),
            None => format!(
                "will no-op: not the device's latest request (that is {}; this one's history is gone)",
                row.request_id
            ),
        };
    }
    if row.status != "pending" {
        return format!("will no-op: request already {}", row.status);
    }
    match &row.wake_message_id {
        Some(expected) if *expected != message.message.message_id => {
            format!("will no-op: stale wake-up (the ledger expects message {expected})")
        }
        _ => "will apply (or re-check later if the device is still offline)".into(),
    }
}

/// The page: each queue's messages with their fates.
pub fn page(snapshot: Vec<QueueSnapshot>, ledger: &Result<LedgerView, String>) -> Vec<QueuePage> {
    let with_fates = |list: Vec<MessageView>| {
        let mut list: Vec<MessageWithFate> = list
            .into_iter()
            .map(|view| {
                let body = view
                    .body_text
                    .as_deref()
                    .and_then(|t| serde_json::from_str::<WakeBody>(t).ok());
                MessageWithFate {
                    fate: fate(&view, ledger),
                    device_id: body.as_ref().map(|b| b.device_id.clone()),
                    request_id: body.map(|b| b.request_id),
                    due_at: view.message.enqueued_time,
                    view,
                }
            })
            .collect();
        list.sort_by_key(|m| (m.due_at, m.view.message.sequence_number));
        list
    };
    snapshot
        .into_iter()
        .map(|q| QueuePage {
            name: q.name,
            active: with_fates(q.active),
            scheduled: with_fates(q.scheduled),
            dead_lettered: with_fates(q.dead_lettered),
        })
        .collect()
}

/// The page as HTML (for a browser), made at `now`: per queue, one table per state with one
/// row per message in due-time order, or a line saying the state has none.
pub fn html(pages: &[QueuePage], now: DateTime<Utc>) -> String {
    let mut out = head("devhost queues", now);
    if pages.is_empty() {
        out.push_str("<p>no queues</p>");
    }
    for q in pages {
        let _ = write!(out, "<h2>queue {}</h2>", escape(&q.name));
        for (state, list) in [
            ("active", &q.active),
            ("scheduled", &q.scheduled),
            ("dead-lettered", &q.dead_lettered),
        ] {
            let _ = write!(out, "<h3>{state} ({})</h3>", list.len());
            if list.is_empty() {
                let _ = write!(out, "<p class=empty>no {state} messages</p>");
                continue;
            }
            let _ = write!(
                out,
                "<table id=\"{state}\"><tr><th>due (UTC)</th><th>device</th><th>request</th>\
                 <th>fate</th><th>deliveries</th><th>seq</th><th>messageId</th><th>body</th></tr>"
            );
            for m in list {
                let msg = &m.view.message;
                let _ = write!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>\
                     <td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
                    m.due_at.format("%Y-%m-%d %H:%M:%S"),
                    escape(m.device_id.as_deref().unwrap_or("-")),
                    escape(m.request_id.as_deref().unwrap_or("-")),
                    escape(&m.fate),
                    msg.delivery_count,
                    msg.sequence_number,
                    escape(&msg.message_id),
                    escape(m.view.body_text.as_deref().unwrap_or("(binary)")),
                );
            }
            out.push_str("</table>");
        }
    }
    out
}

// ---------------------------------------------------------------- reading the ledger

/// Where the ledger lives, from the app settings the handler got. Not `Debug`: it holds the
/// account key.
#[derive(Clone)]
pub struct LedgerSource {
    account: String,
    key: Vec<u8>,
    /// Table service base URL, e.g. `http://127.0.0.1:10002/devstoreaccount1`.
    endpoint: String,
    table: String,
}

impl LedgerSource {
    /// `None` when the settings name no storage account devhost can read.
    pub fn from_settings(settings: &std::collections::BTreeMap<String, String>) -> Option<Self> {
        let storage = settings
            .get("SOC_STATE_STORAGE")
            .filter(|s| !s.trim().is_empty())
            .or_else(|| settings.get("AzureWebJobsStorage"))?;
        let (account, key, endpoint) = parse_storage(storage)?;
        let table = settings
            .get("SOC_STATE_TABLE")
            .filter(|s| !s.trim().is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_TABLE.into());
        Some(LedgerSource {
            account,
            key,
            endpoint,
            table,
        })
    }

    /// Every device's desired-state row and history entries (one query, following
    /// continuation tokens). A missing table is an empty ledger.
    pub async fn read(&self, client: &reqwest::Client) -> anyhow::Result<LedgerView> {
        let mut rows = LedgerView::default();
        let mut next: Option<(String, String)> = None;
        loop {
            let mut url = url::Url::parse(&format!("{}/{}()", self.endpoint, self.table))
                .context("table URL")?;
            url.query_pairs_mut()
                .append_pair(
                    "$filter",
                    "RowKey eq 'desired' or (RowKey ge 'req-' and RowKey lt 'req.')",
                )
                .append_pair(
                    "$select",
                    "PartitionKey,RowKey,RequestId,Status,WakeMessageId,SupersededBy",
                );
            if let Some((pk, rk)) = &next {
                url.query_pairs_mut()
                    .append_pair("NextPartitionKey", pk)
                    .append_pair("NextRowKey", rk);
            }
            let date = Utc::now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
            let resp = client
                .get(url.clone())
                .header("x-ms-date", &date)
                .header("x-ms-version", "2019-02-02")
                .header("Accept", "application/json;odata=nometadata")
                .header("Authorization", self.authorization(&date, url.path()))
                .send()
                .await
                .map_err(|e| anyhow!("storage not reachable: {}", e.without_url()))?;
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(rows);
            }
            if !status.is_success() {
                bail!("table query answered {status}");
            }
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            next = header("x-ms-continuation-NextPartitionKey")
                .zip(header("x-ms-continuation-NextRowKey"));
            let page: Value = resp.json().await.context("table query answer")?;
            for entity in page["value"].as_array().into_iter().flatten() {
                let text = |f: &str| entity.get(f).and_then(Value::as_str).map(str::to_string);
                let (Some(device), Some(row_key), Some(request_id), Some(status)) = (
                    text("PartitionKey"),
                    text("RowKey"),
                    text("RequestId"),
                    text("Status"),
                ) else {
                    continue;
                };
                if row_key == "desired" {
                    let row = LedgerRow {
                        request_id,
                        status,
                        wake_message_id: text("WakeMessageId"),
                    };
                    rows.records.insert(device, row);
                } else {
                    let entry = HistoryRow {
                        status,
                        superseded_by: text("SupersededBy"),
                    };
                    rows.history.insert((device, request_id), entry);
                }
            }
            if next.is_none() {
                return Ok(rows);
            }
        }
    }

    /// `SharedKeyLite` for the Table service: HMAC-SHA256 (base64-decoded account key) of
    /// `{x-ms-date}\n/{account}{url path}`.
    fn authorization(&self, date: &str, path: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(format!("{date}\n/{}{path}", self.account).as_bytes());
        let signature = B64.encode(mac.finalize().into_bytes());
        format!("SharedKeyLite {}:{signature}", self.account)
    }
}

/// (account, decoded key, table endpoint) from a storage connection string.
fn parse_storage(raw: &str) -> Option<(String, Vec<u8>, String)> {
    let map: HashMap<String, String> = raw
        .split(';')
        .filter_map(|p| p.trim().split_once('='))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if map
        .get("usedevelopmentstorage")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        let key = B64.decode(DEV_ACCOUNT_KEY).ok()?;
        let endpoint = format!("http://127.0.0.1:10002/{DEV_ACCOUNT}");
        return Some((DEV_ACCOUNT.into(), key, endpoint));
    }
    let account = map.get("accountname")?.clone();
    let key = B64.decode(map.get("accountkey")?).ok()?;
    let endpoint = match map.get("tableendpoint") {
        Some(e) => e.trim_end_matches('/').to_string(),
        None => format!(
            "{}://{account}.table.{}",
            map.get("defaultendpointsprotocol")
                .map_or("https", String::as_str),
            map.get("endpointsuffix")
                .map_or("core.windows.net", String::as_str)
        ),
    };
    Some((account, key, endpoint))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::servicebus::StoredMessage;

    fn message(id: &str, body: &str) -> MessageView {
        let now = Utc::now();
        MessageView {
            message: StoredMessage {
                sequence_number: 1,
                message_id: id.into(),
                body_base64: B64.encode(body),
                content_type: None,
                correlation_id: None,
                label: None,
                reply_to: None,
                to: None,
                session_id: None,
                partition_key: None,
                reply_to_session_id: None,
                application_properties: Default::default(),
                sent_at: now,
                enqueued_time: now,
                scheduled_enqueue_time: None,
                time_to_live_seconds: None,
                expires_at: None,
                delivery_count: 0,
                dead_lettered: false,
                dead_letter_reason: None,
                dead_letter_error_description: None,
                dead_lettered_at: None,
            },
            body_text: Some(body.into()),
            locked: false,
            locked_until: None,
        }
    }

    fn ledger(request: &str, status: &str, wake: Option<&str>) -> Result<LedgerView, String> {
        let row = LedgerRow {
            request_id: request.into(),
            status: status.into(),
            wake_message_id: wake.map(str::to_string),
        };
        Ok(LedgerView {
            records: HashMap::from([("bat-1".to_string(), row)]),
            history: HashMap::new(),
        })
    }

    /// The ledger holding `r2` (pending), with `r1`'s history entry as given.
    fn after_r1(status: &str, superseded_by: Option<&str>) -> Result<LedgerView, String> {
        let mut view = ledger("r2", "pending", None).unwrap();
        let entry = HistoryRow {
            status: status.into(),
            superseded_by: superseded_by.map(str::to_string),
        };
        view.history.insert(("bat-1".into(), "r1".into()), entry);
        Ok(view)
    }

    const BODY: &str = r#"{"requestId":"r1","deviceId":"bat-1","minSoc":30}"#;

    #[test]
    fn a_message_for_the_pending_request_the_ledger_expects_will_apply() {
        let f = fate(&message("m1", BODY), &ledger("r1", "pending", Some("m1")));
        assert!(f.starts_with("will apply"), "{f}");
    }

    #[test]
    fn a_message_for_a_request_replaced_while_pending_will_no_op_naming_the_newer_one() {
        let f = fate(&message("m1", BODY), &after_r1("pending", Some("r2")));
        assert_eq!(f, "will no-op: superseded by r2");
    }

    #[test]
    fn a_message_for_an_older_request_settled_before_the_newer_came_says_how_it_ended() {
        for status in ["applied", "expired", "failed", "cancelled"] {
            let f = fate(&message("m1", BODY), &after_r1(status, None));
            assert_eq!(f, format!("will no-op: request already {status}"));
        }
    }

    #[test]
    fn a_message_for_an_undone_request_or_one_without_history_says_so() {
        let f = fate(&message("m1", BODY), &after_r1("pending", None));
        assert_eq!(
            f,
            "will no-op: request never accepted (its POST was undone)"
        );
        let f = fate(&message("m1", BODY), &ledger("r2", "pending", None));
        assert!(
            f.starts_with("will no-op: not the device's latest request (that is r2"),
            "{f}"
        );
    }

    #[test]
    fn a_message_for_the_latest_request_says_its_status_for_every_settled_one() {
        for status in ["applied", "expired", "failed", "cancelled"] {
            let f = fate(&message("m1", BODY), &ledger("r1", status, Some("m1")));
            assert_eq!(f, format!("will no-op: request already {status}"));
        }
    }

    #[test]
    fn a_message_for_a_settled_request_will_no_op_with_its_status() {
        let f = fate(&message("m1", BODY), &ledger("r1", "applied", Some("m1")));
        assert_eq!(f, "will no-op: request already applied");
    }

    #[test]
    fn a_message_the_chain_no_longer_expects_will_no_op() {
        let f = fate(&message("m1", BODY), &ledger("r1", "pending", Some("m9")));
        assert!(f.contains("stale wake-up") && f.contains("m9"), "{f}");
    }

    #[test]
    fn without_a_ledger_record_or_a_readable_ledger_the_page_says_so() {
        let f = fate(&message("m1", BODY), &Ok(LedgerView::default()));
        assert_eq!(f, "will no-op: no ledger record for the device");
        let f = fate(&message("m1", BODY), &Err("storage not reachable".into()));
        assert!(
            f.starts_with("unknown:") && f.contains("storage not reachable"),
            "{f}"
        );
        let f = fate(&message("m1", "not json"), &Ok(LedgerView::default()));
        assert!(f.contains("not a wake-up message"), "{f}");
    }

    #[test]
    fn development_storage_and_explicit_endpoints_are_understood() {
        let (account, key, endpoint) = parse_storage("UseDevelopmentStorage=true").unwrap();
        assert_eq!(
            (account.as_str(), endpoint.as_str()),
            (DEV_ACCOUNT, "http://127.0.0.1:10002/devstoreaccount1")
        );
        assert_eq!(key, B64.decode(DEV_ACCOUNT_KEY).unwrap());
        let (_, _, endpoint) = parse_storage(
            "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=a2V5;TableEndpoint=http://127.0.0.1:9/a/;",
        )
        .unwrap();
        assert_eq!(endpoint, "http://127.0.0.1:9/a");
        assert!(parse_storage("AccountName=a").is_none());
    }

    #[test]
    fn the_html_page_escapes_what_it_shows() {
        let pages = page(
            vec![QueueSnapshot {
                name: "q".into(),
                active: vec![message("<m>", BODY)],
                scheduled: vec![],
                dead_lettered: vec![],
            }],
            &after_r1("pending", Some("r2")),
        );
        let h = html(&pages, Utc::now());
        assert!(h.contains("&lt;m&gt;") && !h.contains("<m>"), "{h}");
        assert!(h.contains("will no-op: superseded by r2"), "{h}");
    }

    #[test]
    fn the_page_lists_messages_by_due_time_with_their_device_and_request_and_labels_empty_states() {
        let mut later = message("m-later", BODY);
        later.message.sequence_number = 1;
        later.message.enqueued_time = Utc::now() + chrono::Duration::minutes(10);
        let mut sooner = message("m-sooner", r#"{"requestId":"r9","deviceId":"bat-9"}"#);
        sooner.message.sequence_number = 2;
        sooner.message.enqueued_time = Utc::now() + chrono::Duration::minutes(1);
        let snapshot = vec![QueueSnapshot {
            name: "q".into(),
            active: vec![],
            scheduled: vec![later, sooner],
            dead_lettered: vec![],
        }];
        let now = Utc::now();

        let pages = page(snapshot, &ledger("r1", "pending", Some("m-later")));
        let h = html(&pages, now);

        let ids: Vec<&str> = pages[0]
            .scheduled
            .iter()
            .map(|m| m.view.message.message_id.as_str())
            .collect();
        assert_eq!(
            ids,
            ["m-sooner", "m-later"],
            "due-time order, not sequence order"
        );
        assert_eq!(pages[0].scheduled[1].device_id.as_deref(), Some("bat-1"));
        assert_eq!(pages[0].scheduled[1].request_id.as_deref(), Some("r1"));
        assert!(h.find("m-sooner") < h.find("m-later"), "{h}");
        assert!(
            h.contains("<th>due (UTC)</th><th>device</th><th>request</th>"),
            "{h}"
        );
        assert!(h.contains("<td>bat-9</td><td><code>r9</code></td>"), "{h}");
        assert!(
            h.contains("no active messages") && h.contains("no dead-lettered messages"),
            "{h}"
        );
        assert!(
            h.contains(&now.format("%Y-%m-%d %H:%M:%S").to_string()),
            "{h}"
        );
        assert!(h.contains("http-equiv=refresh"), "{h}");
    }
}
