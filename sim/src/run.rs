//! Runs one scenario: the real function code (`set_soc_http`, `soc_queue_trigger`,
//! `drain_soc_timer`, `device_events_http`, and through them `apply` and `wake`) on a
//! single-threaded
//! tokio runtime with paused (virtual) time, over the simulated ports. The host's
//! parts (HTTP clients and their retries, the Service Bus dispatcher with peek-lock,
//! the timer, instance restarts, device flapping, the vendor's connection events) are
//! tasks of the same runtime.
//!
//! Determinism: one thread, virtual time (tokio auto-advances when every task waits),
//! every random draw from the seed. The product's random ids (uuid v4) are only
//! ever compared for equality, so they do not steer the run; the trace names them
//! by first appearance.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use soc_settings::config::Config;
use soc_settings::domain::device_event::CONNECTED;
use soc_settings::functions::device_events_http::{self, EventsRequest};
use soc_settings::functions::set_soc_http::{self, ApiRequest};
use soc_settings::functions::soc_queue_trigger::{self, Delivery, Settle};
use soc_settings::functions::{drain_soc_timer, Policy, Services};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::check::{self, Finale, Violation};
use crate::ports::services;
use crate::scenario::Scenario;
use crate::world::{crash, Answer, Inv, Kind, Observations, Shared, World};

/// The result of one run.
pub struct Report {
    pub scenario: Arc<Scenario>,
    pub violations: Vec<Violation>,
    pub trace: Option<Vec<String>>,
    pub observations: Observations,
}

/// The service's policy for a scenario, derived from app settings the way the
/// handler derives it (`Policy::from_config`).
pub fn policy_for(sc: &Scenario) -> Policy {
    let vars: HashMap<String, String> = [
        ("AzureWebJobsStorage", "UseDevelopmentStorage=true".to_string()),
        ("ServiceBusConnection", "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey=a2V5;UseDevelopmentEmulator=true".to_string()),
        ("SOC_QUEUE_NAME", "soc".to_string()),
        ("DEVICE_API_BASE_URL", "http://127.0.0.1:1".to_string()),
        ("DEVICE_API_KEY", "sim".to_string()),
        ("DEVICE_API_TIMEOUT_MS", sc.bounds.device_timeout_ms.to_string()),
        ("SOC_REQUEST_TTL_SECONDS", sc.ttl_s.to_string()),
        ("SOC_RECHECK_INITIAL_SECONDS", sc.recheck_initial_s.to_string()),
        ("SOC_RECHECK_MAX_SECONDS", sc.recheck_max_s.max(sc.recheck_initial_s).to_string()),
        ("DRAIN_SOC_CONCURRENCY", sc.drain_concurrency.to_string()),
        ("DRAIN_SOC_MAX_DUE", sc.sweep_max_due.to_string()),
        ("DRAIN_SOC_FANOUT_ABOVE", sc.fanout_above.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let config = Config::from_vars(&vars).expect("simulated app settings are valid");
    let mut policy = Policy::from_config(&config);
    policy.sweep_budget = chrono::Duration::seconds(sc.sweep_budget_s as i64);
    policy.reconcile_rows_per_run = sc.reconcile_rows;
    policy
}

/// Runs the world of `seed`.
pub fn run_seed(seed: u64, trace: bool) -> Report {
    run(Scenario::generate(seed), trace)
}

/// Runs `scenario` to its end and judges it.
pub fn run(scenario: Scenario, trace: bool) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(simulate(Arc::new(scenario), trace))
}

#[derive(Clone)]
struct Host {
    world: Shared,
    notify: Arc<Notify>,
    policy: Policy,
}

impl Host {
    /// Starts one invocation of a function on a random live instance.
    fn invoke<T, F, Fut>(&self, kind: Kind, f: F) -> (Arc<Inv>, JoinHandle<T>)
    where
        F: FnOnce(Services) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let inv = Inv::new(&mut self.world.lock().unwrap(), kind);
        let svc = services(&self.world, &inv, self.policy, &self.notify);
        let fut = f(svc);
        let world = self.world.clone();
        let me = inv.clone();
        let handle = tokio::spawn(async move {
            let out = fut.await;
            let mut w = world.lock().unwrap();
            let t = w.ms();
            if let Some(r) = w.inv_record(&me) {
                r.ended = Some(t);
            }
            w.instances[me.instance].running.retain(|i| i.id != me.id);
            out
        });
        let _ = inv.abort.set(handle.abort_handle());
        (inv, handle)
    }
}

async fn sleep_until_ms(world: &Shared, at: u64) {
    let start = world.lock().unwrap().start;
    tokio::time::sleep_until(start + Duration::from_millis(at)).await;
}

async fn simulate(sc: Arc<Scenario>, trace: bool) -> Report {
    let world: Shared = Arc::new(Mutex::new(World::new(sc.clone(), trace)));
    let host = Host {
        world: world.clone(),
        notify: Arc::new(Notify::new()),
        policy: policy_for(&sc),
    };

    for d in &sc.devices {
        for &(at, online) in &d.flaps {
            let world = world.clone();
            let name = d.name.clone();
            let host = host.clone();
            tokio::spawn(async move {
                sleep_until_ms(&world, at).await;
                let copies = {
                    let mut w = world.lock().unwrap();
                    if !w.faults_on {
                        return;
                    }
                    w.devices.get_mut(&name).unwrap().online = online;
                    w.fault(
                        &name,
                        "world",
                        if online {
                            "device online"
                        } else {
                            "device offline"
                        },
                    );
                    if online {
                        announce(&mut w, &name)
                    } else {
                        Vec::new()
                    }
                };
                for (id, delay) in copies {
                    tokio::spawn(vendor_event(host.clone(), name.clone(), id, delay));
                }
            });
        }
    }
    for &(at, instance) in &sc.restarts {
        let world = world.clone();
        tokio::spawn(async move {
            sleep_until_ms(&world, at).await;
            restart(&world, instance);
        });
    }
    {
        let world = world.clone();
        let at = sc.faults_until_ms;
        tokio::spawn(async move {
            sleep_until_ms(&world, at).await;
            let mut w = world.lock().unwrap();
            w.faults_on = false;
            for d in w.devices.values_mut() {
                d.online = true;
            }
            w.log("world", |_| "faults stop; every device online".into());
        });
    }
    tokio::spawn(sweeps(host.clone()));
    tokio::spawn(dispatcher(host.clone()));
    for (i, post) in sc.posts.iter().enumerate() {
        tokio::spawn(client(host.clone(), i));
        let _ = post;
    }

    sleep_until_ms(&world, sc.end_ms).await;

    let mut w = world.lock().unwrap();
    let finale = Finale::of(&mut w);
    let violations = check::judge(&sc, &host.policy, &w.obs, &finale);
    Report {
        scenario: sc,
        violations,
        trace: w.trace.take(),
        observations: std::mem::take(&mut w.obs),
    }
}

/// Restarts an instance: every invocation running on it is dropped, its clock drifts anew.
fn restart(world: &Shared, instance: usize) {
    let running = {
        let mut w = world.lock().unwrap();
        if !w.faults_on {
            return;
        }
        w.fault("*", "world", &format!("instance i{instance} restarts"));
        let skew = w.sc.bounds.max_skew_ms as f64;
        let draw = w.draw();
        let i = &mut w.instances[instance];
        i.generation += 1;
        i.skew_ms = ((draw * 2.0 - 1.0) * skew) as i64;
        std::mem::take(&mut i.running)
    };
    for inv in running {
        crash(world, &inv);
    }
}

async fn sweeps(host: Host) {
    let (first, every) = {
        let w = host.world.lock().unwrap();
        (w.sc.sweep_first_ms, w.sc.sweep_every_ms)
    };
    let mut at = first;
    loop {
        sleep_until_ms(&host.world, at).await;
        {
            let mut w = host.world.lock().unwrap();
            let t = w.ms();
            w.obs.sweeps.push(t);
        }
        let (inv, _) = host.invoke(Kind::Sweep, |svc| async move {
            drain_soc_timer::run(&svc).await
        });
        host.world
            .lock()
            .unwrap()
            .log(&inv.who(), |_| "timer fires: sweep starts".into());
        at += every;
    }
}

/// One customer: POSTs, and retries (same key) after a 503, a 409 or no answer.
async fn client(host: Host, index: usize) {
    let (post, device) = {
        let w = host.world.lock().unwrap();
        let p = w.sc.posts[index].clone();
        let d = w.sc.devices[p.device].name.clone();
        (p, d)
    };
    sleep_until_ms(&host.world, post.at_ms).await;
    for attempt in 0..=post.retries {
        let request = ApiRequest {
            method: "POST".into(),
            device_id: device.clone(),
            idempotency_key: post.idempotency_key.as_ref().map(|k| k.as_bytes().to_vec()),
            body: format!(r#"{{"minSoc":{}}}"#, post.min_soc).into_bytes(),
            rest: None,
        };
        let (inv, handle) = host.invoke(Kind::Post, |svc| async move {
            set_soc_http::handle(&svc, request).await
        });
        host.world.lock().unwrap().log(&inv.who(), |_| {
            format!(
                "POST {device} minSoc={} key={:?}",
                post.min_soc, post.idempotency_key
            )
        });
        let answered = handle.await.ok();
        let again = {
            let mut w = host.world.lock().unwrap();
            let t = w.ms();
            let retry = match &answered {
                Some(r) => {
                    let request = r
                        .body
                        .get("requestId")
                        .and_then(|v| v.as_str())
                        .map(|raw| w.names.request(raw))
                        .or_else(|| w.obs.invocations[inv.index].created.last().cloned());
                    let replayed = r.headers.iter().any(|(k, _)| *k == "Idempotent-Replayed");
                    w.obs.answers.push(Answer {
                        inv: inv.label.clone(),
                        t,
                        status: r.status,
                        device: device.clone(),
                        request: request.clone(),
                        replayed,
                        applied: r.body.get("status").and_then(|s| s.as_str()) == Some("applied"),
                    });
                    let status = r.status;
                    let shown = r.body.get("status").cloned();
                    w.log(&inv.who(), |_| {
                        format!(
                            "ANSWER {status} {} {}",
                            request.unwrap_or_default(),
                            shown.unwrap_or_default()
                        )
                    });
                    matches!(r.status, 503 | 409)
                }
                None => {
                    w.log(&inv.who(), |_| "no answer (invocation dropped)".into());
                    true
                }
            };
            retry && attempt < post.retries && w.faults_on
        };
        if !again {
            return;
        }
        let wait = {
            let mut w = host.world.lock().unwrap();
            1_000 + (w.draw() * 30_000.0) as u64
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// Whether the vendor announces that `device` came online, and how: the copies of its
/// `connected` event (id, delay); none when it is not announced or the event is lost.
fn announce(w: &mut World, device: &str) -> Vec<(String, u64)> {
    let ev = w.sc.events;
    if ev.emit <= 0.0 || w.event_draw() >= ev.emit {
        return Vec::new();
    }
    w.next_event += 1;
    let id = format!("ev-{}", w.next_event);
    if w.event_draw() < ev.lost {
        w.log("vendor", |_| format!("{id} ({device} connected) is lost"));
        return Vec::new();
    }
    let copies = if w.event_draw() < ev.duplicate { 2 } else { 1 };
    (0..copies)
        .map(|_| {
            let delay = (w.event_draw() * ev.max_delay_ms as f64) as u64;
            (id.clone(), delay)
        })
        .collect()
}

/// The vendor's device cloud sends one copy of a `connected` event to
/// `DeviceEventsHttp` after `delay_ms`, and again after a `503` or no answer.
async fn vendor_event(host: Host, device: String, id: String, delay_ms: u64) {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    let retries = host.world.lock().unwrap().sc.events.retries;
    let body = serde_json::json!({
        "specversion": "1.0", "id": id, "source": "/vendor", "type": CONNECTED, "subject": device,
    })
    .to_string()
    .into_bytes();
    for attempt in 0..=retries {
        let request = EventsRequest {
            method: "POST".into(),
            content_type: Some("application/cloudevents+json".into()),
            webhook_request_origin: None,
            body: body.clone(),
        };
        let (inv, handle) = host.invoke(Kind::Event, |svc| async move {
            device_events_http::handle(&svc, request).await
        });
        host.world
            .lock()
            .unwrap()
            .log(&inv.who(), |_| format!("{id}: {device} connected"));
        let answered = handle.await.ok();
        let again = {
            let mut w = host.world.lock().unwrap();
            let retry = match &answered {
                Some(r) => {
                    let result = r.body["events"][0]["result"].clone();
                    let status = r.status;
                    w.log(&inv.who(), |_| format!("ANSWER {status} {result}"));
                    r.status == 503
                }
                None => {
                    w.log(&inv.who(), |_| "no answer (invocation dropped)".into());
                    true
                }
            };
            retry && attempt < retries && w.faults_on
        };
        if !again {
            return;
        }
        let wait = {
            let mut w = host.world.lock().unwrap();
            1_000 + (w.event_draw() * 30_000.0) as u64
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

/// Service Bus: delivers due messages with peek-lock; abandon, crash and lock loss
/// redeliver; past the max delivery count a message is dead-lettered; expired ones die.
async fn dispatcher(host: Host) {
    loop {
        let mut due = Vec::new();
        let next = {
            let mut w = host.world.lock().unwrap();
            let now = w.ms();
            let bounds = w.sc.bounds;
            let faults = w.sc.faults;
            let mut next = u64::MAX;
            let mut order: Vec<usize> = (0..w.queue.len()).filter(|&i| !w.queue[i].done).collect();
            order.sort_by_key(|&i| (w.queue[i].active_at, w.queue[i].seq));
            for i in order {
                let (active_at, expires_at, locked_until, name) = {
                    let m = &w.queue[i];
                    (m.active_at, m.expires_at, m.locked_until, m.name.clone())
                };
                if now >= expires_at {
                    w.queue[i].done = true;
                    w.log("broker", |_| format!("{name} expired (TTL)"));
                    continue;
                }
                let free_at = active_at.max(locked_until.unwrap_or(0));
                if free_at > now {
                    next = next.min(free_at).min(expires_at);
                    continue;
                }
                w.queue[i].delivery_count += 1;
                if w.queue[i].delivery_count > bounds.max_deliveries {
                    w.queue[i].done = true;
                    w.log("broker", |_| format!("{name} dead-lettered"));
                    continue;
                }
                let lost = w.faults_on && w.draw() < faults.lock_loss;
                if lost {
                    let device = w.queue[i].device.clone();
                    w.fault(
                        &device,
                        "broker",
                        &format!("{name}: lock lost, will be redelivered"),
                    );
                }
                let hold = if lost {
                    bounds.lock_ms
                } else {
                    bounds.max_lock_renewal_ms
                };
                let m = &mut w.queue[i];
                m.locked_until = Some(now + hold);
                m.lock_token += 1;
                next = next.min(now + hold);
                due.push((
                    m.seq,
                    m.lock_token,
                    Delivery {
                        body: m.body.clone(),
                        message_id: Some(m.message_id.clone()),
                        delivery_count: m.delivery_count,
                    },
                ));
            }
            next
        };
        for (seq, token, delivery) in due {
            let count = delivery.delivery_count;
            let (inv, handle) = host.invoke(Kind::Delivery, |svc| async move {
                soc_queue_trigger::handle(&svc, delivery).await
            });
            {
                let mut w = host.world.lock().unwrap();
                let name = w
                    .queue
                    .iter()
                    .find(|m| m.seq == seq)
                    .map(|m| m.name.clone());
                w.log(&inv.who(), |_| {
                    format!("delivered {} (delivery {count})", name.unwrap_or_default())
                });
            }
            tokio::spawn(settle(host.clone(), seq, token, inv, handle));
        }
        let start = host.world.lock().unwrap().start;
        let wake = if next == u64::MAX {
            start + Duration::from_secs(365 * 24 * 3600)
        } else {
            start + Duration::from_millis(next)
        };
        tokio::select! {
            biased;
            _ = host.notify.notified() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
        let _ = Instant::now();
    }
}

/// What the host does with a delivery's result.
async fn settle(host: Host, seq: u64, token: u64, inv: Arc<Inv>, handle: JoinHandle<Settle>) {
    let result = handle.await;
    {
        let mut w = host.world.lock().unwrap();
        let now = w.ms();
        let lock_ms = w.sc.bounds.lock_ms;
        let complete_lost = w.faults_on && w.draw() < w.sc.faults.complete_lost;
        let Some(i) = w.queue.iter().position(|m| m.seq == seq) else {
            return;
        };
        let (held, name, device) = {
            let m = &w.queue[i];
            (
                !m.done && m.lock_token == token && m.locked_until.is_some_and(|l| l > now),
                m.name.clone(),
                m.device.clone(),
            )
        };
        match result {
            _ if !held => {
                w.log(&inv.who(), |_| {
                    format!("{name}: settle ignored, lock no longer held")
                });
            }
            Ok(Settle::Complete(why)) if complete_lost => {
                w.fault(
                    &device,
                    &inv.who(),
                    &format!("{name}: completion lost ({why})"),
                );
                w.queue[i].locked_until = Some(now + lock_ms);
            }
            Ok(Settle::Complete(why)) => {
                w.queue[i].done = true;
                w.log(&inv.who(), |_| format!("{name} completed: {why}"));
            }
            Ok(Settle::Retry(why)) => {
                w.queue[i].locked_until = None;
                w.log(&inv.who(), |_| format!("{name} abandoned: {why}"));
            }
            Err(_) => {
                let until = w.queue[i]
                    .locked_until
                    .map_or(now, |l| l.min(now + lock_ms));
                w.queue[i].locked_until = Some(until);
            }
        }
    }
    host.notify.notify_one();
}
