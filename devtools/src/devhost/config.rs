//! Reads the app exactly where the real host does: `host.json`, `*/function.json`,
//! `local.settings.json` (`Values`) at the app root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;

/// What kind of trigger a function has, with its settings resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    Http {
        binding: String,
        auth_level: String,
        /// Lower-case methods; empty = all.
        methods: Vec<String>,
        /// Route template without prefix (default: the function name).
        route: String,
        /// Exactly one httpTrigger in and one http out, and forwarding enabled in host.json.
        forwarded: bool,
        /// Name of the `http` output binding (`res`, `$return`, ...).
        out_binding: Option<String>,
    },
    Timer {
        binding: String,
        schedule: String,
        run_on_startup: bool,
        use_monitor: bool,
    },
    ServiceBus {
        binding: String,
        queue: String,
        connection: String,
        data_type: Option<String>,
    },
    Unsupported(String),
}

#[derive(Clone, Debug)]
pub struct FunctionDef {
    pub name: String,
    pub trigger: Trigger,
    pub bindings: Vec<Value>,
}

#[derive(Clone, Debug)]
pub struct AppConfig {
    pub root: PathBuf,
    pub host_json: Value,
    pub functions: Vec<FunctionDef>,
    /// `local.settings.json` Values with overrides applied.
    pub settings: BTreeMap<String, String>,
    pub executable: PathBuf,
    pub arguments: Vec<String>,
    pub working_dir: PathBuf,
    pub route_prefix: String,
    pub forwarding: bool,
    pub function_timeout: Option<Duration>,
    pub max_concurrent_calls: usize,
    pub max_auto_lock_renewal: Duration,
}

/// Parse a .NET TimeSpan `[d.]hh:mm:ss[.fff]`.
pub fn parse_timespan(s: &str) -> Option<Duration> {
    let (days, rest) = match s.split_once('.') {
        Some((d, r)) if r.contains(':') && !d.contains(':') => (d.parse::<u64>().ok()?, r),
        _ => (0, s),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    if parts.len() != 3 {
        return None;
    }
    let h: u64 = parts[0].parse().ok()?;
    let m: u64 = parts[1].parse().ok()?;
    let sec: f64 = parts[2].parse().ok()?;
    Some(Duration::from_secs_f64(
        (days * 86400 + h * 3600 + m * 60) as f64 + sec,
    ))
}

/// Expand `%Name%` from the settings (unknown names are an error, like the host's binding errors).
pub fn expand(s: &str, settings: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find('%') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after
            .find('%')
            .ok_or_else(|| anyhow!("unterminated %...% in {s:?}"))?;
        let name = &after[..end];
        let v = settings
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
            .ok_or_else(|| anyhow!("app setting {name:?} (used in {s:?}) is not defined"))?;
        out.push_str(&v);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn read_json(p: &Path) -> anyhow::Result<Value> {
    let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(t.trim_start_matches('\u{feff}'))
        .with_context(|| format!("parsing {}", p.display()))
}

fn get_ci<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

impl AppConfig {
    pub fn load(root: &Path, overrides: &[(String, String)]) -> anyhow::Result<AppConfig> {
        let root = root
            .canonicalize()
            .with_context(|| format!("app root {}", root.display()))?;
        let host_json = read_json(&root.join("host.json"))?;
        let mut settings = BTreeMap::new();
        let ls = root.join("local.settings.json");
        if ls.exists() {
            let v = read_json(&ls)?;
            if let Some(Value::Object(m)) = v.get("Values") {
                for (k, v) in m {
                    let s = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    settings.insert(k.clone(), s);
                }
            }
        }
        for (k, v) in overrides {
            settings.insert(k.clone(), v.clone());
        }
        let ch = get_ci(&host_json, "customHandler")
            .ok_or_else(|| anyhow!("host.json has no customHandler section"))?;
        let desc = get_ci(ch, "description")
            .ok_or_else(|| anyhow!("host.json customHandler has no description"))?;
        let exe = get_ci(desc, "defaultExecutablePath")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                anyhow!("customHandler.description.defaultExecutablePath is required")
            })?;
        let exe = expand_env(exe);
        let exe_path = if Path::new(&exe).is_absolute() {
            PathBuf::from(&exe)
        } else if root.join(&exe).exists() {
            root.join(&exe)
        } else {
            PathBuf::from(&exe)
        };
        let arguments = get_ci(desc, "arguments")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(expand_env))
                    .collect()
            })
            .unwrap_or_default();
        let working_dir = match get_ci(desc, "workingDirectory").and_then(|v| v.as_str()) {
            Some(w) if !w.is_empty() => root.join(w),
            _ => root.clone(),
        };
        let forwarding = get_ci(ch, "enableForwardingHttpRequest")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let ext = get_ci(&host_json, "extensions");
        let route_prefix = ext
            .and_then(|e| get_ci(e, "http"))
            .and_then(|h| get_ci(h, "routePrefix"))
            .and_then(|v| v.as_str())
            .unwrap_or("api")
            .trim_matches('/')
            .to_string();
        let sb = ext.and_then(|e| get_ci(e, "serviceBus"));
        let max_concurrent_calls = sb
            .and_then(|s| get_ci(s, "maxConcurrentCalls"))
            .and_then(|v| v.as_u64())
            .map(|n| n as usize)
            .unwrap_or(16);
        let max_auto_lock_renewal = sb
            .and_then(|s| get_ci(s, "maxAutoLockRenewalDuration"))
            .and_then(|v| v.as_str())
            .and_then(parse_timespan)
            .unwrap_or(Duration::from_secs(300));
        if sb
            .and_then(|s| get_ci(s, "autoCompleteMessages"))
            .and_then(|v| v.as_bool())
            == Some(false)
        {
            tracing::warn!("host.json serviceBus.autoCompleteMessages=false: custom handlers cannot settle messages; devhost completes on success anyway");
        }
        let function_timeout = get_ci(&host_json, "functionTimeout")
            .and_then(|v| v.as_str())
            .and_then(parse_timespan);

        let mut functions = Vec::new();
        for name in crate::function_folders(&root)? {
            let fj = read_json(&root.join(&name).join("function.json"))?;
            if fj.get("disabled").and_then(|v| v.as_bool()) == Some(true) {
                continue;
            }
            let bindings = fj
                .get("bindings")
                .and_then(|b| b.as_array())
                .cloned()
                .unwrap_or_default();
            let trigger = Self::trigger_of(&name, &bindings, forwarding, &settings)?;
            functions.push(FunctionDef {
                name,
                trigger,
                bindings,
            });
        }
        Ok(AppConfig {
            root,
            host_json,
            functions,
            settings,
            executable: exe_path,
            arguments,
            working_dir,
            route_prefix,
            forwarding,
            function_timeout,
            max_concurrent_calls,
            max_auto_lock_renewal,
        })
    }

    fn trigger_of(
        name: &str,
        bindings: &[Value],
        forwarding: bool,
        settings: &BTreeMap<String, String>,
    ) -> anyhow::Result<Trigger> {
        let s = |b: &Value, k: &str| b.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let ty = |b: &Value| s(b, "type").unwrap_or_default().to_ascii_lowercase();
        let dir = |b: &Value| s(b, "direction").unwrap_or_default().to_ascii_lowercase();
        let triggers: Vec<&Value> = bindings
            .iter()
            .filter(|b| ty(b).ends_with("trigger"))
            .collect();
        if triggers.len() != 1 {
            bail!("function {name}: expected exactly one trigger binding");
        }
        let t = triggers[0];
        let binding = s(t, "name").unwrap_or_default();
        Ok(match ty(t).as_str() {
            "httptrigger" => {
                let outs: Vec<&Value> = bindings.iter().filter(|b| dir(b) == "out").collect();
                let http_outs: Vec<&&Value> = outs.iter().filter(|b| ty(b) == "http").collect();
                let ins = bindings.iter().filter(|b| dir(b) != "out").count();
                let in_and_out = ins == 1 && outs.len() == 1 && http_outs.len() == 1;
                Trigger::Http {
                    binding,
                    auth_level: s(t, "authLevel")
                        .unwrap_or_else(|| "function".into())
                        .to_ascii_lowercase(),
                    methods: t
                        .get("methods")
                        .and_then(|m| m.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(|x| x.to_ascii_lowercase()))
                                .collect()
                        })
                        .unwrap_or_default(),
                    route: s(t, "route")
                        .map(|r| expand(&r, settings))
                        .transpose()?
                        .unwrap_or_else(|| name.to_string())
                        .trim_matches('/')
                        .to_string(),
                    forwarded: forwarding && in_and_out,
                    out_binding: http_outs.first().and_then(|b| s(b, "name")),
                }
            }
            "timertrigger" => Trigger::Timer {
                binding,
                schedule: expand(&s(t, "schedule").unwrap_or_default(), settings)?,
                run_on_startup: t.get("runOnStartup").and_then(|v| v.as_bool()) == Some(true),
                use_monitor: t.get("useMonitor").and_then(|v| v.as_bool()) != Some(false),
            },
            "servicebustrigger" => Trigger::ServiceBus {
                binding,
                queue: expand(
                    &s(t, "queueName")
                        .ok_or_else(|| anyhow!("{name}: only queue triggers are supported"))?,
                    settings,
                )?,
                connection: s(t, "connection").unwrap_or_else(|| "AzureWebJobsServiceBus".into()),
                data_type: s(t, "dataType").map(|d| d.to_ascii_lowercase()),
            },
            other => Trigger::Unsupported(other.to_string()),
        })
    }

    pub fn function(&self, name: &str) -> Option<&FunctionDef> {
        self.functions
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
    }
}

fn expand_env(s: &str) -> String {
    let mut out = s.to_string();
    for (k, v) in std::env::vars() {
        out = out.replace(&format!("%{k}%"), &v);
    }
    out
}
