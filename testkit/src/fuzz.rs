//! A bounded mutational fuzzer for the host payload and request body parsers.
//!
//! Stands in for cargo-fuzz, which needs a nightly toolchain that a fresh machine of this
//! project does not have. Used twice: a short run inside `cargo test`
//! (`tests/robustness.rs`) and a long one in the benchmark command (`bench/`).
//!
//! Inputs start from the host payload fixtures (`tests/fixtures/host-payloads/*.json`)
//! plus request bodies, and are mutated byte-wise (flips, interesting bytes, splices,
//! inserts, deletes) and JSON-wise (replace a node, re-encode a string as double-encoded
//! JSON or base64, drop or re-case a key, odd timestamps). An input whose outcome
//! (which parsers accepted it, and with which error) was not seen before joins the pool,
//! a cheap stand-in for coverage feedback. Every parser call runs under `catch_unwind`;
//! a panic is a finding. Deterministic for a given seed and execution count.

use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use soc_settings::domain::{DeviceId, IdempotencyKey, SettingRequest};
use soc_settings::host::{
    parse_host_datetime, unwrap_double_encoded, HttpTriggerRequest, InvocationRequest,
    ServiceBusDelivery, TimerInfo, DRAIN_SOC_TIMER_BINDING, SET_SOC_HTTP_TRIGGER_BINDING,
    SOC_QUEUE_TRIGGER_BINDING,
};

/// xorshift64*: small, fast, deterministic; good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

thread_local! {
    static SILENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static PANICS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Installs (once per process) a panic hook that counts panics per thread and stays
/// quiet on a thread that is fuzzing; everywhere else it prints as the default hook does.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            PANICS.with(|p| p.set(p.get() + 1));
            if !SILENT.with(|s| s.get()) {
                default(info);
            }
        }));
    });
}

/// Panics seen on this thread since the hook was installed (caught ones included).
pub fn panics_on_this_thread() -> usize {
    PANICS.with(|p| p.get())
}

/// One crash: which parser, the input, and the panic message.
#[derive(Debug, Clone)]
pub struct Finding {
    pub target: &'static str,
    pub input: Vec<u8>,
    pub message: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub execs: u64,
    pub elapsed: Duration,
    /// Inputs kept because their outcome was new.
    pub pool: usize,
    /// Distinct outcomes seen.
    pub outcomes: usize,
    /// Inputs that were a readable envelope / a valid setting body.
    pub envelopes_ok: u64,
    pub settings_ok: u64,
    pub findings: Vec<Finding>,
}

/// The starting corpus: every JSON host payload fixture and a few request bodies.
pub fn seeds(repo_root: &Path) -> Vec<Vec<u8>> {
    let dir = repo_root.join("tests/fixtures/host-payloads");
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if p.extension().is_some_and(|x| x == "json") {
                if let Ok(bytes) = std::fs::read(&p) {
                    out.push(bytes);
                }
            }
        }
    }
    for body in [
        r#"{"minSoc":35}"#,
        r#"{"dod":80}"#,
        r#"{"dod":80,"minSoc":20}"#,
        r#"{"minSoc":100.0}"#,
        r#"{}"#,
    ] {
        out.push(body.as_bytes().to_vec());
    }
    out
}

const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"\\\"",
    b"{",
    b"}",
    b"[",
    b"null",
    b"-1",
    b"18446744073709551616",
    b"1e309",
    b"0001-01-01T00:00:00",
    b"9999-12-31T23:59:59.9999999Z",
    b"\\u0000",
    b"\xff\xfe",
    b"\xc3\xa9",
];

const ODD_TIMES: &[&str] = &[
    "0001-01-01T00:00:00",
    "0001-01-01T00:00:00+00:00",
    "9999-12-31T23:59:59.9999999Z",
    "9999-12-31T23:59:59.9999999+14:00",
    "0001-01-01T00:00:00-14:00",
    "2025-02-30T10:00:00Z",
    "2025-03-04T09:14:05.12345678901Z",
    "2025-03-04T24:00:00",
    "2025-03-04 09:14:05",
    "+275760-09-13T00:00:00Z",
    "-0001-01-01T00:00:00Z",
    "",
    "\"2025-03-04T09:14:05Z\"",
];

fn random_json(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 2 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.chance(2)),
        2 => json!((rng.next_u64() as i64) >> rng.below(64)),
        3 => json!(f64::from_bits(rng.next_u64()).clamp(-1e300, 1e300)),
        4 => json!(ODD_TIMES[rng.below(ODD_TIMES.len())]),
        5 => {
            let n = rng.below(12);
            let s: String = (0..n)
                .map(|_| char::from_u32(rng.below(0x3000) as u32).unwrap_or('x'))
                .collect();
            json!(s)
        }
        6 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                let keys = [
                    "Data",
                    "Metadata",
                    "msg",
                    "timer",
                    "req",
                    "Body",
                    "Headers",
                    "Method",
                    "Params",
                    "DeliveryCount",
                    "MessageId",
                    "ScheduleStatus",
                    "IsPastDue",
                ];
                m.insert(
                    keys[rng.below(keys.len())].to_string(),
                    random_json(rng, depth + 1),
                );
            }
            Value::Object(m)
        }
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Visits one random node of `v` (pre-order index `target`) and mutates it.
fn mutate_node(v: &mut Value, rng: &mut Rng, target: &mut usize) -> bool {
    if *target == 0 {
        match rng.below(8) {
            0 => *v = random_json(rng, 1),
            1 => {
                // double-encode: the value's JSON text as a JSON string
                *v = Value::String(v.to_string());
            }
            2 => {
                let text = match &*v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                *v = Value::String(b64(text.as_bytes()));
            }
            3 => *v = json!(ODD_TIMES[rng.below(ODD_TIMES.len())]),
            4 => {
                if let Value::Object(m) = v {
                    if !m.is_empty() {
                        let k = any_key(m, rng);
                        m.remove(&k);
                    }
                }
            }
            5 => {
                if let Value::Object(m) = v {
                    if !m.is_empty() {
                        let k = any_key(m, rng);
                        if let Some(x) = m.remove(&k) {
                            let recased = if rng.chance(2) {
                                k.to_ascii_lowercase()
                            } else {
                                k.to_ascii_uppercase()
                            };
                            m.insert(recased, x);
                        }
                    }
                }
            }
            6 => {
                if let Value::String(s) = v {
                    // unwrap one level of encoding if it is JSON text
                    if let Ok(inner) = serde_json::from_str::<Value>(s) {
                        *v = inner;
                    }
                }
            }
            _ => *v = Value::Null,
        }
        return true;
    }
    *target -= 1;
    match v {
        Value::Array(items) => items.iter_mut().any(|x| mutate_node(x, rng, target)),
        Value::Object(m) => m.values_mut().any(|x| mutate_node(x, rng, target)),
        _ => false,
    }
}

fn count_nodes(v: &Value) -> usize {
    1 + match v {
        Value::Array(items) => items.iter().map(count_nodes).sum(),
        Value::Object(m) => m.values().map(count_nodes).sum(),
        _ => 0,
    }
}

/// One mutation of `input`, possibly splicing in `other`.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    if rng.chance(2) {
        if let Ok(mut v) = serde_json::from_slice::<Value>(input) {
            for _ in 0..1 + rng.below(3) {
                let mut target = rng.below(count_nodes(&v));
                mutate_node(&mut v, rng, &mut target);
            }
            return v.to_string().into_bytes();
        }
    }
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(6) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = rng.next_u64() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let ins = INTERESTING[rng.below(INTERESTING.len())];
                out.splice(i..i, ins.iter().copied());
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(32));
                out.drain(i..i + n);
            }
            4 if !other.is_empty() => {
                let a = rng.below(other.len());
                let b = a + rng.below(other.len() - a + 1);
                let i = rng.below(len + 1);
                out.splice(i..i, other[a..b].iter().copied());
            }
            _ if len > 1 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let chunk = out[a..b].to_vec();
                let i = rng.below(len + 1);
                out.splice(i..i, chunk);
            }
            _ => out.push(rng.next_u64() as u8),
        }
    }
    out.truncate(64 * 1024);
    out
}

fn kind<T, E: std::fmt::Debug>(r: &Result<T, E>) -> String {
    match r {
        Ok(_) => "ok".into(),
        // The variant name only (values vary endlessly).
        Err(e) => format!("{e:?}")
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect(),
    }
}

/// Runs every parser on `input`; returns the outcome signature, or the panic.
pub fn exec(input: &[u8]) -> Result<String, (&'static str, String)> {
    let mut sig = String::new();
    let mut step = |target: &'static str, f: &mut dyn FnMut() -> String| match panic::catch_unwind(
        AssertUnwindSafe(&mut *f),
    ) {
        Ok(s) => {
            sig.push_str(&s);
            sig.push('|');
            Ok(())
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic".into());
            Err((target, msg))
        }
    };
    let text = String::from_utf8_lossy(input).into_owned();
    step("SettingRequest::parse", &mut || {
        kind(&SettingRequest::parse(input))
    })?;
    step("DeviceId/IdempotencyKey::parse", &mut || {
        format!(
            "{}{}",
            kind(&DeviceId::parse(&text)),
            kind(&IdempotencyKey::parse(input))
        )
    })?;
    step("parse_host_datetime", &mut || {
        let unwrapped = unwrap_double_encoded(&text).into_owned();
        parse_host_datetime(&unwrapped).is_some().to_string()
    })?;
    let mut inv = None;
    step("InvocationRequest::from_slice", &mut || {
        let r = InvocationRequest::from_slice(input);
        let k = kind(&r);
        inv = r.ok();
        k
    })?;
    let Some(inv) = inv else { return Ok(sig) };
    // Our binding names, plus every Data key the input has (mutations rename them).
    let mut bindings = vec![
        SOC_QUEUE_TRIGGER_BINDING.to_string(),
        DRAIN_SOC_TIMER_BINDING.to_string(),
        SET_SOC_HTTP_TRIGGER_BINDING.to_string(),
    ];
    if let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(input) {
        for (k, v) in &top {
            if k.eq_ignore_ascii_case("data") {
                if let Value::Object(d) = v {
                    bindings.extend(d.keys().take(4).cloned());
                }
            }
        }
    }
    for b in &bindings {
        step("ServiceBusDelivery::from_invocation", &mut || {
            kind(&ServiceBusDelivery::from_invocation(&inv, b))
        })?;
        step("TimerInfo::from_invocation", &mut || {
            kind(&TimerInfo::from_invocation(&inv, b))
        })?;
        step("HttpTriggerRequest::from_invocation", &mut || {
            let r = HttpTriggerRequest::from_invocation(&inv, b);
            let k = kind(&r);
            if let Ok(req) = r {
                let _ = req.into_call();
            }
            k
        })?;
    }
    step("InvocationRequest metadata", &mut || {
        let _ = (inv.function_name(), inv.host_utc_now(), inv.retry_context());
        String::new()
    })?;
    Ok(sig)
}

/// Fuzzes until `budget` elapses or `max_execs` inputs ran, whichever is first.
pub fn run(seeds: &[Vec<u8>], seed: u64, budget: Duration, max_execs: u64) -> Report {
    let start = Instant::now();
    let mut rng = Rng::new(seed);
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    let mut seen: HashSet<String> = HashSet::new();
    let mut crashes: HashSet<(&'static str, String)> = HashSet::new();
    let mut report = Report::default();
    // The hook would print every caught panic; findings are reported instead.
    install_panic_hook();
    SILENT.with(|s| s.set(true));
    let mut queue: Vec<Vec<u8>> = pool.clone();
    while report.execs < max_execs && start.elapsed() < budget {
        let input = match queue.pop() {
            Some(i) => i,
            None => {
                let a = &pool[rng.below(pool.len())];
                let b = &pool[rng.below(pool.len())];
                mutate(a, b, &mut rng)
            }
        };
        report.execs += 1;
        match exec(&input) {
            Ok(sig) => {
                let mut fields = sig.split('|');
                if fields.next() == Some("ok") {
                    report.settings_ok += 1;
                }
                if fields.nth(2) == Some("ok") {
                    report.envelopes_ok += 1;
                }
                if seen.insert(sig) && pool.len() < 4096 {
                    pool.push(input);
                }
            }
            Err((target, message)) => {
                if crashes.insert((target, message.clone())) {
                    report.findings.push(Finding {
                        target,
                        input,
                        message,
                    });
                }
            }
        }
    }
    SILENT.with(|s| s.set(false));
    report.elapsed = start.elapsed();
    report.pool = pool.len();
    report.outcomes = seen.len();
    report
}

/// One of `m`'s keys, chosen by `rng` (`m` must not be empty).
fn any_key(m: &Map<String, Value>, rng: &mut Rng) -> String {
    m.keys()
        .nth(rng.below(m.len()))
        .cloned()
        .unwrap_or_default()
}
