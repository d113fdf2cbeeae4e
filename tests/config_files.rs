//! The repository's `host.json`, `local.settings.json` and `*/function.json`
//! against the SchemaStore schemas copied to `tests/fixtures/schemas/`
//! (offline), plus the checks the schemas miss. Each checker is also run on
//! mutated copies, so a broken file is shown to fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use soc_settings::app::FUNCTIONS;
use soc_settings::config::SETTINGS;
use soc_settings::host::{
    DEVICE_EVENTS_HTTP_OUTPUT_BINDING, DEVICE_EVENTS_HTTP_TRIGGER_BINDING, DRAIN_SOC_TIMER_BINDING,
    SET_SOC_HTTP_OUTPUT_BINDING, SET_SOC_HTTP_TRIGGER_BINDING, SOC_QUEUE_TRIGGER_BINDING,
};

#[derive(Clone, Debug)]
struct Repo {
    host: Value,
    local: Value,
    /// Folder name -> function.json.
    functions: BTreeMap<String, Value>,
}

fn root() -> PathBuf {
    testkit::repo_root()
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every top-level folder holding a function.json is a function (as the host sees it).
fn load_repo() -> Repo {
    let functions = testkit::function_folders(&root())
        .into_iter()
        .map(|name| {
            let config = read_json(&root().join(&name).join("function.json"));
            (name, config)
        })
        .collect();
    Repo {
        host: read_json(&root().join("host.json")),
        local: read_json(&root().join("local.settings.json")),
        functions,
    }
}

// ------------------------------------------------------------------ schemas

fn validator(file: &str, draft: Option<jsonschema::Draft>) -> jsonschema::Validator {
    let schema = read_json(&root().join("tests/fixtures/schemas").join(file));
    let mut options = jsonschema::options();
    if let Some(draft) = draft {
        options.with_draft(draft);
    }
    options
        .build(&schema)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn schema_problems(repo: &Repo) -> Vec<String> {
    let mut problems = Vec::new();
    let mut check = |label: &str, validator: &jsonschema::Validator, instance: &Value| {
        for error in validator.iter_errors(instance) {
            problems.push(format!("{label}: {error} at {}", error.instance_path));
        }
    };
    // function.json declares draft-04 but needs draft-07 rules (`const`), see SOURCE.md.
    let function = validator("function.json", Some(jsonschema::Draft::Draft7));
    let host = validator("host.json", None);
    let local = validator("local.settings.json", None);
    check("host.json", &host, &repo.host);
    check("local.settings.json", &local, &repo.local);
    for (name, config) in &repo.functions {
        check(&format!("{name}/function.json"), &function, config);
    }
    problems
}

// ------------------------------------------------------------------ what schemas miss

fn bindings(config: &Value) -> Vec<&Value> {
    config["bindings"]
        .as_array()
        .map(|b| b.iter().collect())
        .unwrap_or_default()
}

fn binding<'a>(config: &'a Value, kind: &str) -> Option<&'a Value> {
    bindings(config).into_iter().find(|b| b["type"] == kind)
}

/// `%NAME%` expressions in any string of a function.json.
fn setting_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => {
            let parts: Vec<&str> = s.split('%').collect();
            // "a%X%b" splits into [a, X, b]: odd positions are names.
            if parts.len() >= 3 {
                for name in parts.iter().skip(1).step_by(2).take((parts.len() - 1) / 2) {
                    out.push(name.to_string());
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| setting_references(v, out)),
        Value::Object(map) => map.values().for_each(|v| setting_references(v, out)),
        _ => {}
    }
}

/// One NCRONTAB field item: `*`, `n`, `a-b`, each optionally `/step`.
fn cron_item_ok(item: &str, min: u32, max: u32, names: &[&str]) -> bool {
    let value = |s: &str| -> Option<u32> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Some(min + i as u32);
        }
        s.parse::<u32>().ok().filter(|v| (min..=max).contains(v))
    };
    let (range, step) = match item.split_once('/') {
        Some((r, s)) => (r, Some(s)),
        None => (item, None),
    };
    if let Some(step) = step {
        if !matches!(step.parse::<u32>(), Ok(s) if s >= 1 && s <= max.max(1)) {
            return false;
        }
    }
    if range == "*" {
        return true;
    }
    match range.split_once('-') {
        Some((a, b)) => matches!((value(a), value(b)), (Some(a), Some(b)) if a <= b),
        None => value(range).is_some(),
    }
}

/// A 6-field NCRONTAB expression (`{second} {minute} {hour} {day} {month} {day-of-week}`).
fn ncrontab_ok(expr: &str) -> bool {
    const MONTHS: [&str; 12] = [
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ];
    const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
    let limits: [(u32, u32, &[&str]); 6] = [
        (0, 59, &[]),
        (0, 59, &[]),
        (0, 23, &[]),
        (1, 31, &[]),
        (1, 12, &MONTHS),
        (0, 6, &DAYS),
    ];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    fields.len() == 6
        && fields.iter().zip(limits).all(|(field, (min, max, names))| {
            field
                .split(',')
                .all(|item| cron_item_ok(item, min, max, names))
        })
}

fn semantic_problems(repo: &Repo) -> Vec<String> {
    let mut p = Vec::new();
    let values = &repo.local["Values"];
    let known_setting = |name: &str| SETTINGS.iter().any(|s| s.name == name);

    // Function folders: exactly the functions the handler routes (`app::FUNCTIONS`).
    let names: Vec<&str> = repo.functions.keys().map(String::as_str).collect();
    let mut routed = FUNCTIONS.to_vec();
    routed.sort_unstable();
    if names != routed {
        p.push(format!(
            "function folders are {names:?}, the handler routes {routed:?}"
        ));
    }

    // Binding types, per function.
    let expected_types: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("SetSocHttp", vec!["httpTrigger", "http"]),
        ("SocQueueTrigger", vec!["serviceBusTrigger"]),
        ("DrainSocTimer", vec!["timerTrigger"]),
        ("DeviceEventsHttp", vec!["httpTrigger", "http"]),
    ]);
    for (name, config) in &repo.functions {
        let types: Vec<&str> = bindings(config)
            .iter()
            .map(|b| b["type"].as_str().unwrap_or("<none>"))
            .collect();
        if expected_types.get(name.as_str()) != Some(&types) {
            p.push(format!("{name}: binding types {types:?}"));
        }
        let mut refs = Vec::new();
        setting_references(config, &mut refs);
        for b in bindings(config) {
            if let Some(connection) = b["connection"].as_str() {
                refs.push(connection.to_string());
            }
            if b["autoCompleteMessages"] == json!(false) {
                p.push(format!(
                    "{name}: autoCompleteMessages false never completes messages"
                ));
            }
        }
        for setting in refs {
            if !known_setting(&setting) {
                p.push(format!("{name}: {setting} is not in config::SETTINGS"));
            }
            if values.get(&setting).is_none() {
                p.push(format!(
                    "{name}: {setting} is not in local.settings.json Values"
                ));
            }
        }
    }

    // The HTTP functions: SetSocHttp serves the device's resource and its requests
    // (docs/openapi.yaml), DeviceEventsHttp the vendor's connection events.
    let empty = json!({});
    for (name, route, trigger_name, output_name) in [
        (
            "SetSocHttp",
            "devices/{deviceId}/soc/{*rest}",
            SET_SOC_HTTP_TRIGGER_BINDING,
            SET_SOC_HTTP_OUTPUT_BINDING,
        ),
        (
            "DeviceEventsHttp",
            "device-events",
            DEVICE_EVENTS_HTTP_TRIGGER_BINDING,
            DEVICE_EVENTS_HTTP_OUTPUT_BINDING,
        ),
    ] {
        let http = repo.functions.get(name).unwrap_or(&empty);
        let trigger = binding(http, "httpTrigger").unwrap_or(&Value::Null);
        if trigger["route"] != route {
            p.push(format!("{name}: route {}", trigger["route"]));
        }
        // Every method reaches the handler, which answers 405 with Allow itself (the
        // Azure host would answer an empty 404 for a method the function does not list).
        if trigger.get("methods").is_some() {
            p.push(format!(
                "{name}: methods {} (leave it out: the handler answers 405)",
                trigger["methods"]
            ));
        }
        if trigger["authLevel"] != "function" {
            p.push(format!("{name}: authLevel {}", trigger["authLevel"]));
        }
        if trigger["name"] != trigger_name {
            p.push(format!("{name}: trigger name {}", trigger["name"]));
        }
        let out = binding(http, "http").unwrap_or(&Value::Null);
        if out["name"] != output_name || out["direction"] != "out" {
            p.push(format!("{name}: http output {out}"));
        }
    }

    // SocQueueTrigger.
    let queue = repo.functions.get("SocQueueTrigger").unwrap_or(&empty);
    let trigger = binding(queue, "serviceBusTrigger").unwrap_or(&Value::Null);
    if trigger["queueName"] != "%SOC_QUEUE_NAME%" {
        p.push(format!(
            "SocQueueTrigger: queueName {}",
            trigger["queueName"]
        ));
    }
    if trigger["connection"] != "ServiceBusConnection" {
        p.push(format!(
            "SocQueueTrigger: connection {}",
            trigger["connection"]
        ));
    }
    if trigger["name"] != SOC_QUEUE_TRIGGER_BINDING {
        p.push(format!("SocQueueTrigger: trigger name {}", trigger["name"]));
    }
    if trigger["dataType"] != "binary" {
        p.push("SocQueueTrigger: dataType must be binary (exact bytes, no Metadata leak)".into());
    }
    for setting in ["SOC_QUEUE_NAME", "ServiceBusConnection"] {
        if values
            .get(setting)
            .and_then(Value::as_str)
            .unwrap_or("")
            .is_empty()
        {
            p.push(format!("local.settings.json: {setting} missing or empty"));
        }
    }

    // DrainSocTimer.
    let timer = repo.functions.get("DrainSocTimer").unwrap_or(&empty);
    let trigger = binding(timer, "timerTrigger").unwrap_or(&Value::Null);
    if trigger["name"] != DRAIN_SOC_TIMER_BINDING {
        p.push(format!("DrainSocTimer: trigger name {}", trigger["name"]));
    }
    match trigger["schedule"].as_str() {
        Some("%DRAIN_SOC_SCHEDULE%") => {
            let local = values["DRAIN_SOC_SCHEDULE"].as_str().unwrap_or("");
            if !ncrontab_ok(local) {
                p.push(format!(
                    "local.settings.json: DRAIN_SOC_SCHEDULE {local:?} is not 6-field NCRONTAB"
                ));
            }
            let default = SETTINGS
                .iter()
                .find(|s| s.name == "DRAIN_SOC_SCHEDULE")
                .and_then(|s| s.default)
                .unwrap_or("");
            if !ncrontab_ok(default) {
                p.push(format!("config::SETTINGS: DRAIN_SOC_SCHEDULE default {default:?} is not 6-field NCRONTAB"));
            }
        }
        other => p.push(format!("DrainSocTimer: schedule {other:?}")),
    }

    // local.settings.json and host.json.
    if values["FUNCTIONS_WORKER_RUNTIME"] != "custom" {
        p.push("local.settings.json: FUNCTIONS_WORKER_RUNTIME must be custom".into());
    }
    let host = &repo.host;
    if host["customHandler"]["description"]["defaultExecutablePath"] != "handler" {
        p.push("host.json: customHandler.description.defaultExecutablePath must be handler".into());
    }
    if host["extensions"]["http"]["routePrefix"] != "api" {
        p.push("host.json: extensions.http.routePrefix must be api".into());
    }
    if host["extensions"]["serviceBus"]["autoCompleteMessages"] == json!(false) {
        p.push("host.json: autoCompleteMessages false never completes messages".into());
    }
    p
}

// ------------------------------------------------------------------ tests on this repo

#[test]
fn this_repos_config_files_match_the_schemas() {
    let problems = schema_problems(&load_repo());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn this_repos_config_files_pass_the_checks_schemas_miss() {
    let problems = semantic_problems(&load_repo());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_function_folder_has_a_handler_route_and_every_route_a_folder() {
    let folders = testkit::function_folders(&root());
    let mut routed: Vec<String> = FUNCTIONS.iter().map(|f| f.to_string()).collect();
    routed.sort();
    assert!(
        !folders.is_empty(),
        "no */function.json at {}",
        root().display()
    );
    assert_eq!(folders, routed);
}

// ------------------------------------------------------------------ the checkers fail on broken files

fn mutated(change: impl FnOnce(&mut Repo)) -> Repo {
    let mut repo = load_repo();
    change(&mut repo);
    repo
}

fn func<'a>(repo: &'a mut Repo, name: &str) -> &'a mut Value {
    repo.functions.get_mut(name).unwrap()
}

#[test]
fn the_schemas_reject_broken_config_files() {
    let cases: Vec<(&str, Repo)> = vec![
        (
            "misspelled customHandler",
            mutated(|r| {
                let v = r.host["customHandler"].take();
                r.host.as_object_mut().unwrap().remove("customHandler");
                r.host["customHandlers"] = v;
            }),
        ),
        (
            "serviceBus with only keys common to v4 and v5",
            mutated(|r| r.host["extensions"]["serviceBus"] = json!({"prefetchCount": 0})),
        ),
        (
            "unknown worker runtime",
            mutated(|r| r.local["Values"]["FUNCTIONS_WORKER_RUNTIME"] = json!("rust")),
        ),
        (
            "binding without direction",
            mutated(|r| {
                func(r, "SetSocHttp")["bindings"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("direction");
            }),
        ),
        (
            "unknown http method",
            mutated(|r| func(r, "SetSocHttp")["bindings"][0]["methods"] = json!(["fetch"])),
        ),
    ];
    for (label, repo) in cases {
        assert!(
            !schema_problems(&repo).is_empty(),
            "schema accepted: {label}"
        );
    }
}

#[test]
fn a_misspelled_binding_type_passes_the_schema_but_fails_the_checks() {
    let repo =
        mutated(|r| func(r, "SocQueueTrigger")["bindings"][0]["type"] = json!("serviceBusTriger"));
    assert!(
        schema_problems(&repo).is_empty(),
        "schema quirk changed: {:?}",
        schema_problems(&repo)
    );
    let problems = semantic_problems(&repo);
    assert!(
        problems.iter().any(|p| p.contains("binding types")),
        "{problems:?}"
    );
}

#[test]
fn the_checks_reject_each_kind_of_broken_config() {
    type Change = Box<dyn FnOnce(&mut Repo)>;
    let cases: Vec<(&str, Change)> = vec![
        (
            "route",
            Box::new(|r| func(r, "SetSocHttp")["bindings"][0]["route"] = json!("devices/{id}/soc")),
        ),
        (
            "methods",
            Box::new(|r| func(r, "SetSocHttp")["bindings"][0]["methods"] = json!(["post"])),
        ),
        (
            "authLevel",
            Box::new(|r| func(r, "SetSocHttp")["bindings"][0]["authLevel"] = json!("anonymous")),
        ),
        (
            "http output",
            Box::new(|r| func(r, "SetSocHttp")["bindings"][1]["name"] = json!("$return")),
        ),
        (
            "trigger name",
            Box::new(|r| func(r, "SetSocHttp")["bindings"][0]["name"] = json!("request")),
        ),
        (
            "DeviceEventsHttp: route",
            Box::new(|r| func(r, "DeviceEventsHttp")["bindings"][0]["route"] = json!("events")),
        ),
        (
            "DeviceEventsHttp: methods",
            Box::new(|r| {
                func(r, "DeviceEventsHttp")["bindings"][0]["methods"] = json!(["post", "options"])
            }),
        ),
        (
            "DeviceEventsHttp: authLevel",
            Box::new(|r| {
                func(r, "DeviceEventsHttp")["bindings"][0]["authLevel"] = json!("anonymous")
            }),
        ),
        (
            "queueName",
            Box::new(|r| {
                func(r, "SocQueueTrigger")["bindings"][0]["queueName"] = json!("soc-settings")
            }),
        ),
        (
            "connection",
            Box::new(|r| func(r, "SocQueueTrigger")["bindings"][0]["connection"] = json!("SbConn")),
        ),
        (
            "dataType",
            Box::new(|r| {
                func(r, "SocQueueTrigger")["bindings"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("dataType");
            }),
        ),
        (
            "autoCompleteMessages",
            Box::new(|r| {
                func(r, "SocQueueTrigger")["bindings"][0]["autoCompleteMessages"] = json!(false)
            }),
        ),
        (
            "SOC_QUEUE_NAME",
            Box::new(|r| {
                r.local["Values"]
                    .as_object_mut()
                    .unwrap()
                    .remove("SOC_QUEUE_NAME");
            }),
        ),
        (
            "ServiceBusConnection",
            Box::new(|r| r.local["Values"]["ServiceBusConnection"] = json!("")),
        ),
        (
            "not in config::SETTINGS",
            Box::new(|r| {
                func(r, "DrainSocTimer")["bindings"][0]["schedule"] = json!("%UNLISTED_SCHEDULE%");
                r.local["Values"]["UNLISTED_SCHEDULE"] = json!("0 */5 * * * *");
            }),
        ),
        (
            "schedule",
            Box::new(|r| {
                func(r, "DrainSocTimer")["bindings"][0]["schedule"] = json!("0 */5 * * * *")
            }),
        ),
        (
            "DRAIN_SOC_SCHEDULE",
            Box::new(|r| r.local["Values"]["DRAIN_SOC_SCHEDULE"] = json!("*/5 * * * *")),
        ),
        (
            "DRAIN_SOC_SCHEDULE",
            Box::new(|r| r.local["Values"]["DRAIN_SOC_SCHEDULE"] = json!("0 61 * * * *")),
        ),
        (
            "binding types",
            Box::new(|r| {
                func(r, "DrainSocTimer")["bindings"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "queue", "direction": "out", "name": "out"}));
            }),
        ),
        (
            "function folders",
            Box::new(|r| {
                r.functions.insert("Extra".into(), json!({"bindings": []}));
            }),
        ),
        (
            "FUNCTIONS_WORKER_RUNTIME",
            Box::new(|r| r.local["Values"]["FUNCTIONS_WORKER_RUNTIME"] = json!("node")),
        ),
        (
            "defaultExecutablePath",
            Box::new(|r| {
                r.host["customHandler"]["description"]["defaultExecutablePath"] =
                    json!("handler.exe")
            }),
        ),
        (
            "routePrefix",
            Box::new(|r| r.host["extensions"]["http"]["routePrefix"] = json!("")),
        ),
        (
            "autoCompleteMessages",
            Box::new(|r| r.host["extensions"]["serviceBus"]["autoCompleteMessages"] = json!(false)),
        ),
    ];
    for (expected, change) in cases {
        let problems = semantic_problems(&mutated(change));
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "no problem mentioning {expected:?}: {problems:?}"
        );
    }
}

#[test]
fn ncrontab_accepts_six_field_expressions_only() {
    for ok in [
        "0 */5 * * * *",
        "0 0 2 * * *",
        "*/30 * * * * *",
        "0 30 9 * JAN-MAR MON-FRI",
        "0 0,30 8-18/2 1 * 0",
    ] {
        assert!(ncrontab_ok(ok), "{ok}");
    }
    for bad in [
        "*/5 * * * *",
        "0 */5 * * * * *",
        "60 * * * * *",
        "0 0 24 * * *",
        "0 0 0 0 * *",
        "0 */0 * * * *",
        "0 5-1 * * * *",
        "0 x * * * *",
        "",
    ] {
        assert!(!ncrontab_ok(bad), "{bad}");
    }
}

#[test]
fn setting_references_are_found_anywhere_in_a_function_json() {
    let mut refs = Vec::new();
    setting_references(
        &json!({"a": "%ONE%", "b": ["x%TWO%y%THREE%"], "c": "100%"}),
        &mut refs,
    );
    assert_eq!(refs, ["ONE", "TWO", "THREE"]);
}
