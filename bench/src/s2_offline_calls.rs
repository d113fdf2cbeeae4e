//! S2: device-cloud calls per day for one device that stays offline for the whole
//! 7-day life of its request, with the default back-off and sweep schedule.
//!
//! The real functions (`SetSocHttp`, `SocQueueTrigger`, `DrainSocTimer`) over the
//! in-memory ports of `functions::fakes`, in virtual time: every wake-up message is
//! delivered when it is due, and the sweep runs every 5 minutes, for 7 days and an hour.

use std::collections::HashMap;

use anyhow::{ensure, Result};
use chrono::Duration;
use soc_settings::config::Config;
use soc_settings::functions::fakes::{post_min_soc, Harness};
use soc_settings::functions::soc_queue_trigger::{self, Delivery};
use soc_settings::functions::{drain_soc_timer, Policy};
use soc_settings::ports::Clock as _;

use crate::report::{row, Row};

/// The policy the handler derives from the app settings' defaults.
pub fn default_policy() -> Result<Policy> {
    let vars: HashMap<String, String> = [
        ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
        ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true"),
        ("SOC_QUEUE_NAME", "soc"),
        ("DEVICE_API_BASE_URL", "http://127.0.0.1:1"),
        ("DEVICE_API_KEY", "bench"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let config = Config::from_vars(&vars).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Policy::from_config(&config))
}

/// The sweep schedule's default (`DRAIN_SOC_SCHEDULE` = every 5 minutes).
const SWEEP_EVERY: Duration = Duration::minutes(5);

pub async fn run(rows: &mut Vec<Row>, notes: &mut Vec<String>) -> Result<()> {
    eprintln!("bench: S2 calls per offline device per day (7 virtual days)");
    let mut h = Harness::new();
    h.svc.policy = default_policy()?;
    h.device.set_online("bat-away", false);
    let posted = post_min_soc(&h, "bat-away", 30).await;
    ensure!(posted["status"] == "pending", "S2: {posted}");
    let start = h.clock.now();
    let end = start + h.svc.policy.request_ttl + Duration::hours(1);
    let mut next_sweep = start + SWEEP_EVERY;
    let mut delivered = 0usize;
    let mut sweeps = 0u64;
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
                soc_queue_trigger::handle(&h.svc, delivery).await;
            }
            _ => {
                h.clock.advance(next_sweep - now);
                drain_soc_timer::run(&h.svc).await?;
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
        "S2: {delivered} wake-up messages delivered, {sweeps} sweeps ran; the request expired after {days:.0} days with {} attempts. Before the due index every sweep made one status call per pending device: {} per day on the 5-minute schedule on top of the re-check PUTs",
        record.attempts,
        86_400 / SWEEP_EVERY.num_seconds()
    ));
    Ok(())
}
