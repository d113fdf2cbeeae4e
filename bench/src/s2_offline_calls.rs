//! S2: device-cloud calls per day for one device that stays offline for the whole
//! 7-day life of its request, with the default back-off and sweep schedule.
//!
//! The real functions (`SetSocHttp`, `SocQueueTrigger`, `DrainSocTimer`) over the
//! in-memory ports of `functions::fakes`, in virtual time: every wake-up message is
//! delivered when it is due, and the sweep runs every 5 minutes, for 7 days and an hour.

use std::collections::HashMap;

use std::sync::Arc;

use anyhow::{ensure, Result};
use chrono::Duration;
use soc_settings::config::Config;
use soc_settings::functions::fakes::{post_min_soc, Harness};
use soc_settings::functions::set_soc_http::{self, ApiRequest};
use soc_settings::functions::soc_queue_trigger::{self, Delivery};
use soc_settings::functions::{drain_soc_timer, Policy};
use soc_settings::ports::Clock as _;

use crate::report::{row, Row};
use crate::s1_sweep_scale::{Counting, Ops};

/// The policy the handler derives from the app settings' defaults.
pub fn default_policy() -> Result<Policy> {
    policy_with(&[])
}

/// The policy the handler derives from the app settings' defaults and `settings`.
pub fn policy_with(settings: &[(&str, &str)]) -> Result<Policy> {
    let vars: HashMap<String, String> = [
        ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
        ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true"),
        ("SOC_QUEUE_NAME", "soc"),
        ("DEVICE_API_BASE_URL", "http://127.0.0.1:1"),
        ("DEVICE_API_KEY", "bench"),
    ]
    .iter()
    .chain(settings)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = Config::from_vars(&vars).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Policy::from_config(&config))
}

/// The sweep schedule's default (`DRAIN_SOC_SCHEDULE` = every 5 minutes).
const SWEEP_EVERY: Duration = Duration::minutes(5);

/// The in-memory ports with `policy`, every ledger operation counted at the port.
pub fn counted_harness(policy: Policy) -> (Harness, Arc<Ops>) {
    let mut h = Harness::new();
    h.svc.policy = policy;
    let ops = Arc::new(Ops::default());
    h.svc.ledger = Arc::new(Counting {
        inner: h.ledger.clone(),
        ops: ops.clone(),
    });
    (h, ops)
}

/// What one POST asks of the ledger and the queue, by case (README "What a request
/// costs the ledger"), counted at the ports with the default policy.
async fn post_costs(notes: &mut Vec<String>) -> Result<()> {
    let (h, ops) = counted_harness(default_policy()?);
    let post = |device: &str, key: Option<&str>| {
        let request = ApiRequest {
            method: "POST".into(),
            device_id: device.into(),
            idempotency_key: key.map(|k| k.as_bytes().to_vec()),
            body: br#"{"minSoc":40}"#.to_vec(),
            ..Default::default()
        };
        set_soc_http::handle(&h.svc, request)
    };
    let mut cost =
        |case: &str, before: &std::collections::BTreeMap<&'static str, u64>, sent: usize| {
            let sent = h.queue.sent().len() - sent;
            notes.push(format!(
                "POST cost, {case}: {}; {sent} wake-up message(s)",
                ops.since(before)
            ));
        };
    h.device.set_online("on", true);
    h.device.set_online("off", false);
    for (case, device, key, status) in [
        ("a device's first request, online", "on", None, 200),
        ("online", "on", None, 200),
        ("online, with an Idempotency-Key", "on", Some("k-1"), 200),
        ("a device's first request, offline", "off", None, 202),
        ("offline", "off", None, 202),
    ] {
        let (before, sent) = (ops.methods(), h.queue.sent().len());
        let answer = post(device, key).await;
        ensure!(
            answer.status == status,
            "POST cost, {case}: {:?}",
            answer.body
        );
        cost(case, &before, sent);
    }
    h.hold_lease("on", "http-other", Duration::seconds(30))
        .await;
    let (before, sent) = (ops.methods(), h.queue.sent().len());
    let answer = post("on", None).await;
    ensure!(answer.status == 202, "POST cost, busy: {:?}", answer.body);
    cost("busy (another holder's lease)", &before, sent);
    Ok(())
}

pub async fn run(rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    eprintln!("bench: S2 calls per offline device per day (7 virtual days)");
    post_costs(notes).await?;
    // Every ledger operation counted at the port, for the capacity note.
    let (h, ops) = counted_harness(default_policy()?);
    h.device.set_online("bat-on", true);
    let before = ops.snapshot();
    let applied = post_min_soc(&h, "bat-on", 40).await;
    ensure!(applied["status"] == "applied", "S2: {applied}");
    let (reads, writes, queries, _) = ops.snapshot();
    notes.push(format!(
        "S2: a POST to an online device costs {} ledger reads and {} writes ({} queries) and one PUT",
        reads - before.0,
        writes - before.1,
        queries - before.2
    ));
    let before = ops.snapshot();
    h.device.set_online("bat-away", false);
    let posted = post_min_soc(&h, "bat-away", 30).await;
    ensure!(posted["status"] == "pending", "S2: {posted}");
    let start = h.clock.now();
    let end = start + h.svc.policy.request_ttl + Duration::hours(1);
    let mut next_sweep = start + SWEEP_EVERY;
    let mut delivered = 0usize;
    let mut sweeps = 0u64;
    // (reads, writes[, queries]) of the queue path and of the sweeps.
    let mut queue_ops = (0u64, 0u64);
    let mut sweep_ops = (0u64, 0u64, 0u64);
    while h.clock.now() < end {
        let sent = h.queue.sent();
        let next_message = sent
            .get(delivered)
            .map(|m| m.scheduled_at.unwrap_or(h.clock.now()));
        let now = h.clock.now();
        match next_message {
            Some(at) if at <= next_sweep => {
                if at > now {
                    h.clock.advance(at - now);
                }
                let m = &sent[delivered];
                delivered += 1;
                let delivery = Delivery {
                    body: serde_json::to_vec(&m.body)?,
                    message_id: Some(m.message_id.clone()),
                    delivery_count: 1,
                };
                let b = ops.snapshot();
                soc_queue_trigger::handle(&h.svc, delivery).await;
                let a = ops.snapshot();
                queue_ops.0 += a.0 - b.0;
                queue_ops.1 += a.1 - b.1;
            }
            _ => {
                h.clock.advance(next_sweep - now);
                let b = ops.snapshot();
                drain_soc_timer::run(&h.svc).await?;
                let a = ops.snapshot();
                sweep_ops.0 += a.0 - b.0;
                sweep_ops.1 += a.1 - b.1;
                sweep_ops.2 += a.2 - b.2;
                sweeps += 1;
                next_sweep += SWEEP_EVERY;
            }
        }
    }
    let record = h.ledger_record("bat-away").await;
    ensure!(
        record.status.as_str() == "expired",
        "S2: the request should have expired, it is {}",
        record.status.as_str()
    );
    let (status_calls, puts) = h.device.calls();
    let puts = puts - 1; // the online POST's
    let after = ops.snapshot();
    let days = h.svc.policy.request_ttl.num_seconds() as f64 / 86_400.0;
    let per_day = (status_calls + puts) as f64 / days;
    rows.push(
        row(
            "S2",
            "device calls per offline device per day (7 days offline, default back-off)",
            format!("{per_day:.1} ({puts} PUTs + {status_calls} status calls in {days:.0} days)"),
        )
        .target("≤ 100", per_day <= 100.0),
    );
    notes.push(format!(
        "S2: the offline device's re-checks cost {:.2} ledger reads and {:.2} writes each ({} deliveries), {:.1} wake-up messages per day; the {sweeps} sweeps cost {:.2} reads, {:.2} writes and {:.1} queries each (the sweep lease and the 16 index shards: the same whatever P; the record was due for them only at expiry); the POST {} reads and {} writes",
        queue_ops.0 as f64 / delivered.max(1) as f64,
        queue_ops.1 as f64 / delivered.max(1) as f64,
        delivered,
        h.queue.sent().len() as f64 / days,
        sweep_ops.0 as f64 / sweeps.max(1) as f64,
        sweep_ops.1 as f64 / sweeps.max(1) as f64,
        sweep_ops.2 as f64 / sweeps.max(1) as f64,
        after.0 - before.0 - queue_ops.0 - sweep_ops.0,
        after.1 - before.1 - queue_ops.1 - sweep_ops.1,
    ));
    notes.push(format!(
        "S2: {delivered} wake-up messages delivered, {sweeps} sweeps ran; the request expired after {days:.0} days with {} attempts. Before the due index every sweep made one status call per pending device: {} per day on the 5-minute schedule on top of the re-check PUTs",
        record.attempts,
        86_400 / SWEEP_EVERY.num_seconds()
    ));
    Ok(())
}
