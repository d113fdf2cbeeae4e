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
use crate::scenario::{Dependency, Scenario};
use crate::world::{crash, Answer, Inv, Kind, Observations, Read, ReadKind, Shared, World};

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
        let (svc, caller) = services(&self.world, &inv, self.policy, &self.notify);
        let fut = caller.scope(f(svc));
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
        // The host's functionTimeout: an invocation still running then is killed.
        let (world, me) = (self.world.clone(), inv.clone());
        let limit = world.lock().unwrap().sc.bounds.function_timeout_ms;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(limit)).await;
            let running = world
                .lock()
                .unwrap()
                .inv_record(&me)
                .is_some_and(|r| r.ended.is_none());
            if running {
                crash(&world, &me, "functionTimeout");
            }
        });
        (inv, handle)
    }

    /// Starts one `SetSocHttp` invocation of `api`.
    fn api(
        &self,
        kind: Kind,
        api: ApiRequest,
    ) -> (Arc<Inv>, JoinHandle<set_soc_http::ApiResponse>) {
        self.invoke(
            kind,
            |svc| async move { set_soc_http::handle(&svc, api).await },
        )
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
            restart(&world, instance, false);
        });
    }
    for &(at, instance) in &sc.scale_ins {
        let world = world.clone();
        tokio::spawn(async move {
            sleep_until_ms(&world, at).await;
            restart(&world, instance, true);
        });
    }
    for (i, reader) in sc.readers.iter().enumerate() {
        tokio::spawn(read_latest(host.clone(), i, *reader));
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

/// Restarts an instance (a worker restart, a deployment): every invocation running on
/// it is dropped at once, its clock drifts anew, its device-call budget starts afresh.
/// `scale_in`: the instance is removed instead and takes no new invocations.
fn restart(world: &Shared, instance: usize, scale_in: bool) {
    let running = {
        let mut w = world.lock().unwrap();
        if !w.faults_on || w.instances[instance].removed {
            return;
        }
        let what = if scale_in { "is scaled in" } else { "restarts" };
        w.fault("*", "world", &format!("instance i{instance} {what}"));
        let skew = w.sc.bounds.max_skew_ms as f64;
        let draw = w.draw();
        let i = &mut w.instances[instance];
        i.generation += 1;
        i.skew_ms = ((draw * 2.0 - 1.0) * skew) as i64;
        i.budget = None;
        i.removed = scale_in;
        let running = std::mem::take(&mut i.running);
        if !running.is_empty() {
            w.shape(if scale_in {
                "scale-in kills invocations"
            } else {
                "restart kills invocations"
            });
        }
        running
    };
    let why = if scale_in { "scale-in" } else { "restart" };
    for inv in running {
        crash(world, &inv, why);
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
        // Past-due runs: the host fires late (the run is past due when it starts, and
        // the next one may follow at once), or twice back to back.
        let (late, twice) = {
            let mut w = host.world.lock().unwrap();
            let on = w.faults_on;
            let (p_late, p_twice) = (w.sc.late_sweeps, w.sc.double_sweeps);
            let late = (on && w.draw() < p_late).then(|| (w.draw() * 2.0 * every as f64) as u64);
            let twice = on && w.draw() < p_twice;
            if late.is_some() {
                w.shape("past-due timer run");
            }
            if twice {
                w.shape("timer fires twice back to back");
            }
            (late, twice)
        };
        if let Some(late) = late {
            tokio::time::sleep(Duration::from_millis(late)).await;
        }
        for n in 0..1 + usize::from(twice) {
            {
                let mut w = host.world.lock().unwrap();
                let t = w.ms();
                w.obs.sweeps.push(t);
            }
            let (inv, handle) = host.invoke(Kind::Sweep, |svc| async move {
                drain_soc_timer::run(&svc).await
            });
            let world = host.world.clone();
            tokio::spawn(async move {
                if let Ok(Ok(report)) = handle.await {
                    let mut w = world.lock().unwrap();
                    if report.deferred > 0 {
                        w.shape("sweep run stops starting work (its time ran out)");
                    }
                    if report.lease_lost {
                        w.shape("sweep run loses its lease and stops starting work");
                    }
                }
            });
            host.world.lock().unwrap().log(&inv.who(), |_| {
                format!(
                    "timer fires: sweep starts{}",
                    if n > 0 { " (again)" } else { "" }
                )
            });
        }
        at += every;
        // A run that started past the next one's time: the host runs the missed one now.
        let now = host.world.lock().unwrap().ms();
        if at < now {
            at = now;
        }
    }
}

/// A reader: `GET /api/devices/{id}/soc` every so often while things happen.
async fn read_latest(host: Host, index: usize, spec: crate::scenario::ReaderSpec) {
    let device = host.world.lock().unwrap().sc.devices[spec.device]
        .name
        .clone();
    let _ = index;
    let mut at = spec.from_ms;
    while at < spec.until_ms {
        sleep_until_ms(&host.world, at).await;
        tokio::spawn(read(host.clone(), device.clone(), None));
        at += spec.every_ms;
    }
}

/// One `GET`: of the device's latest request (`request` `None`) or of one request's
/// status; its answer is recorded with its time span.
async fn read(host: Host, device: String, request: Option<(String, String)>) {
    let start = host.world.lock().unwrap().ms();
    let api = ApiRequest {
        method: "GET".into(),
        device_id: device.clone(),
        idempotency_key: None,
        body: Vec::new(),
        rest: request.as_ref().map(|(raw, _)| format!("requests/{raw}")),
    };
    let (inv, handle) = host.api(Kind::Get, api);
    let Ok(r) = handle.await else {
        return;
    };
    let mut w = host.world.lock().unwrap();
    let end = w.ms();
    let shown_request = r
        .body_json()
        .get("requestId")
        .and_then(|v| v.as_str())
        .map(|raw| w.names.request(raw));
    let shown = r
        .body_json()
        .get("status")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let kind = match &request {
        None => ReadKind::Latest,
        Some((_, name)) => ReadKind::Request(name.clone()),
    };
    w.log(&inv.who(), |_| {
        format!(
            "READ {kind:?} {device} -> {} {} {}",
            r.status,
            shown_request.clone().unwrap_or_default(),
            shown.clone().unwrap_or_default()
        )
    });
    w.obs.reads.push(Read {
        kind,
        device,
        start,
        end,
        status: r.status,
        request: shown_request,
        shown,
    });
}

/// One customer: POSTs, and retries (same key) after a 503, a 409 or no answer; later
/// (minutes to hours) retries again with the same key whatever the answer was; polls
/// its request's status after a `2xx`.
async fn client(host: Host, index: usize) {
    let (post, device) = {
        let w = host.world.lock().unwrap();
        let p = w.sc.posts[index].clone();
        let d = w.sc.devices[p.device].name.clone();
        (p, d)
    };
    sleep_until_ms(&host.world, post.at_ms).await;
    let mut first_answer = None;
    for attempt in 0..=post.retries {
        let answered = post_once(&host, &device, &post, &post.cancels).await;
        let retry = {
            let w = host.world.lock().unwrap();
            first_answer.get_or_insert(w.ms());
            answered.is_none_or(|s| matches!(s, 503 | 409)) && attempt < post.retries && w.faults_on
        };
        if !retry {
            break;
        }
        let wait = {
            let mut w = host.world.lock().unwrap();
            1_000 + (w.draw() * 30_000.0) as u64
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    let from = first_answer.unwrap_or(post.at_ms);
    for delay in &post.late_retries {
        sleep_until_ms(&host.world, from + delay).await;
        host.world
            .lock()
            .unwrap()
            .shape("late retry with the same key");
        post_once(&host, &device, &post, &[]).await;
    }
}

/// One POST of `post`; records the answer (and after a `2xx` polls the request's status
/// and cancels it `cancels` ms later). Returns the status, `None` when the invocation
/// was dropped.
async fn post_once(
    host: &Host,
    device: &str,
    post: &crate::scenario::PostSpec,
    cancels: &[u64],
) -> Option<u16> {
    let request = ApiRequest {
        method: "POST".into(),
        device_id: device.to_string(),
        idempotency_key: post.idempotency_key.as_ref().map(|k| k.as_bytes().to_vec()),
        body: format!(r#"{{"minSoc":{}}}"#, post.min_soc).into_bytes(),
        rest: None,
    };
    let (inv, handle) = host.api(Kind::Post, request);
    {
        let mut w = host.world.lock().unwrap();
        w.obs.invocations[inv.index].key = post.idempotency_key.clone();
        w.log(&inv.who(), |_| {
            format!(
                "POST {device} minSoc={} key={:?}",
                post.min_soc, post.idempotency_key
            )
        });
    }
    let answered = handle.await.ok();
    let mut w = host.world.lock().unwrap();
    let t = w.ms();
    let Some(r) = answered else {
        w.log(&inv.who(), |_| "no answer (invocation dropped)".into());
        return None;
    };
    let raw = r
        .body_json()
        .get("requestId")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let record = &w.obs.invocations[inv.index];
    let fallback = record.created.last().or(record.tried.as_ref()).cloned();
    let request = raw.as_deref().map(|raw| w.names.request(raw)).or(fallback);
    let replayed = r.headers.iter().any(|(k, _)| *k == "Idempotent-Replayed");
    w.obs.answers.push(Answer {
        inv: inv.label.clone(),
        t,
        status: r.status,
        device: device.to_string(),
        request: request.clone(),
        replayed,
        applied: r.body_json().get("status").and_then(|s| s.as_str()) == Some("applied"),
        carries_id: raw.is_some(),
    });
    let status = r.status;
    if status == 500 {
        w.shape("POST answered 500 (outcome unknown)");
    }
    let shown = r.body_json().get("status").cloned();
    w.log(&inv.who(), |_| {
        format!(
            "ANSWER {status} {} {}",
            request.clone().unwrap_or_default(),
            shown.unwrap_or_default()
        )
    });
    drop(w);
    if let (Some(raw), Some(name), true) = (raw, request, matches!(status, 200 | 202)) {
        for delay in cancels {
            let cancelled = (raw.clone(), name.clone());
            let at = t + delay;
            tokio::spawn(cancel(host.clone(), device.to_string(), cancelled, at));
        }
        let (host, device, polls, every) = (
            host.clone(),
            device.to_string(),
            post.polls,
            post.poll_every_ms,
        );
        tokio::spawn(async move {
            for _ in 0..polls {
                tokio::time::sleep(Duration::from_millis(every)).await;
                read(
                    host.clone(),
                    device.clone(),
                    Some((raw.clone(), name.clone())),
                )
                .await;
            }
        });
    }
    Some(status)
}

/// A client cancels its request (`DELETE .../soc/requests/{raw}`) at `at_ms`, while
/// the faults are on, and again after a `503`, a `409` with `Retry-After` (a device call
/// of it may still land) or no answer, up to twice; every answer is recorded.
async fn cancel(host: Host, device: String, (raw, name): (String, String), at_ms: u64) {
    sleep_until_ms(&host.world, at_ms).await;
    for _ in 0..3 {
        let start = {
            let w = host.world.lock().unwrap();
            if !w.faults_on {
                return;
            }
            w.ms()
        };
        let api = ApiRequest {
            method: "DELETE".into(),
            device_id: device.clone(),
            idempotency_key: None,
            body: Vec::new(),
            rest: Some(format!("requests/{raw}")),
        };
        let (inv, handle) = host.api(Kind::Cancel, api);
        let deleting = format!("DELETE {device} {name}");
        host.world.lock().unwrap().log(&inv.who(), |_| deleting);
        let Ok(r) = handle.await else {
            host.world
                .lock()
                .unwrap()
                .log(&inv.who(), |_| "no answer (invocation dropped)".into());
            tokio::time::sleep(Duration::from_millis(5_000)).await;
            continue;
        };
        let again = {
            let mut w = host.world.lock().unwrap();
            let body = r.body_json();
            let shown = ["status", "requestStatus"]
                .into_iter()
                .filter(|_| matches!(r.status, 200 | 409))
                .find_map(|field| body.get(field).and_then(|v| v.as_str()))
                .map(str::to_string);
            let t = w.ms();
            w.log(&inv.who(), |_| {
                format!(
                    "ANSWER {} {name} {}",
                    r.status,
                    shown.clone().unwrap_or_default()
                )
            });
            let retry_after = r
                .headers
                .iter()
                .find(|(k, _)| *k == "Retry-After")
                .and_then(|(_, v)| v.parse::<u64>().ok());
            w.shape(match (r.status, retry_after) {
                (200, _) => "cancel answered 200",
                (409, None) => "cancel refused: no longer pending",
                (409, Some(_)) => "cancel refused: a PUT of it may land (409 + Retry-After)",
                _ => "cancel answered otherwise",
            });
            w.obs.cancels.push(crate::world::CancelAnswer {
                inv: inv.label.clone(),
                start,
                t,
                status: r.status,
                device: device.clone(),
                request: name.clone(),
                shown,
            });
            match (r.status, retry_after) {
                (503 | 409, Some(secs)) => secs * 1_000 + 100,
                _ => return,
            }
        };
        tokio::time::sleep(Duration::from_millis(again)).await;
    }
}

/// Whether the vendor announces that `device` came online, and how: the copies of its
/// `connected` event (id, delay); none when it is not announced or the event is lost.
fn announce(w: &mut World, device: &str) -> Vec<(String, u64)> {
    let ev = w.sc.events;
    if w.outage(Dependency::DeviceCloud).is_some() {
        return Vec::new();
    }
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
                    let result = r.body_json()["events"][0]["result"].clone();
                    if result == "deferred" {
                        w.shape("connection event deferred to the chain (answer due)");
                    }
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
            // Nothing is delivered while Service Bus is down.
            let outage = w.outage(Dependency::Bus).map(|o| o.until_ms);
            let down = outage.is_some();
            let mut next = outage.unwrap_or(u64::MAX);
            let mut order: Vec<usize> = (0..w.queue.len())
                .filter(|&i| !w.queue[i].done && !down)
                .collect();
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
        let complete_lost = w.faults_on && w.draw() < w.sc.faults.complete_lost
            || w.outage(Dependency::Bus).is_some();
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
