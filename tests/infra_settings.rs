//! The infra sets every app setting the code reads, and no SOC_/DEVICE_/DRAIN_
//! setting the code does not know. `config::SETTINGS` is the one list; this
//! test reads the function app's settings object out of the Bicep source.
//!
//! A connection `X` (e.g. `ServiceBusConnection`) is set either as a connection
//! string (`X`) or identity-based, as the section `X__member` the Functions host
//! reads (`X__fullyQualifiedNamespace`, `X__credential`, ...). The Bicep uses the
//! identity form; the plain name then counts as set by its section.

use std::collections::BTreeSet;
use std::path::Path;

use soc_settings::config::SETTINGS;

const FUNCTION_APP_BICEP: &str = "infra/modules/functionapp.bicep";
/// Prefixes that mark the service's own settings.
const OWN_PREFIXES: [&str; 3] = ["SOC_", "DEVICE_", "DRAIN_"];

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Keys of the top level of the Bicep object literal assigned to `var <name> = {`.
fn object_keys(source: &str, name: &str) -> BTreeSet<String> {
    let start = source
        .find(&format!("var {name} = {{"))
        .unwrap_or_else(|| panic!("no `var {name} = {{` in the Bicep"));
    let mut keys = BTreeSet::new();
    let mut depth = 0usize;
    for line in source[start..].lines() {
        let trimmed = line.trim();
        if depth == 1 && !trimmed.starts_with("//") {
            if let Some((key, _)) = trimmed.split_once(':') {
                let key = key.trim().trim_matches('\'');
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    keys.insert(key.to_string());
                }
            }
        }
        // Braces inside string values (`${...}` interpolation) come in pairs on one line.
        depth += line.matches('{').count();
        depth -= line.matches('}').count();
        if depth == 0 {
            break;
        }
    }
    keys
}

/// Every `NAME:` key with one of the service's prefixes anywhere in the infra.
fn own_keys_anywhere(dir: &Path, found: &mut BTreeSet<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            own_keys_anywhere(&path, found);
        } else if path.extension().is_some_and(|e| e == "bicep") {
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                if let Some((key, _)) = line.trim().split_once(':') {
                    let key = key.trim().trim_matches('\'');
                    if OWN_PREFIXES.iter().any(|p| key.starts_with(p)) {
                        found.insert((key.to_string(), path.display().to_string()));
                    }
                }
            }
        }
    }
}

/// The identity-based section of connection `name` (`name__*` keys) is present.
fn has_section(keys: &BTreeSet<String>, name: &str) -> bool {
    let prefix = format!("{name}__");
    keys.iter().any(|k| k.starts_with(&prefix))
}

/// Settings in `config::SETTINGS` that the Bicep's `socSettings` does not set (a
/// connection set by its identity section counts as set).
fn missing_settings(bicep: &str) -> Vec<&'static str> {
    let keys = object_keys(bicep, "socSettings");
    SETTINGS
        .iter()
        .map(|s| s.name)
        .filter(|name| !keys.contains(*name) && !has_section(&keys, name))
        .collect()
}

/// Keys of `socSettings` that `config::SETTINGS` does not list.
fn unknown_settings(bicep: &str) -> Vec<String> {
    let known: BTreeSet<&str> = SETTINGS.iter().map(|s| s.name).collect();
    object_keys(bicep, "socSettings")
        .into_iter()
        .filter(|k| !known.contains(k.as_str()))
        .collect()
}

#[test]
fn every_setting_the_code_reads_is_set_by_the_function_app_bicep() {
    let missing = missing_settings(&read(FUNCTION_APP_BICEP));
    assert!(
        missing.is_empty(),
        "{FUNCTION_APP_BICEP} does not set {missing:?}"
    );
}

#[test]
fn the_bicep_sets_no_service_setting_the_code_does_not_know() {
    let unknown = unknown_settings(&read(FUNCTION_APP_BICEP));
    assert!(
        unknown.is_empty(),
        "socSettings sets {unknown:?}, which config::SETTINGS does not list"
    );

    let known: BTreeSet<&str> = SETTINGS.iter().map(|s| s.name).collect();
    let mut anywhere = BTreeSet::new();
    own_keys_anywhere(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("infra"),
        &mut anywhere,
    );
    let stray: Vec<_> = anywhere
        .iter()
        .filter(|(k, _)| !known.contains(k.as_str()))
        .collect();
    assert!(
        stray.is_empty(),
        "unknown service settings in the infra: {stray:?}"
    );
}

#[test]
fn a_setting_dropped_from_the_bicep_is_reported() {
    let bicep = read(FUNCTION_APP_BICEP);
    let broken: String = bicep
        .lines()
        .filter(|l| !l.trim_start().starts_with("DEVICE_API_KEY:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(broken, bicep, "the fixture line is gone from the Bicep");
    assert_eq!(missing_settings(&broken), ["DEVICE_API_KEY"]);
}

#[test]
fn a_setting_the_code_does_not_know_is_reported() {
    let bicep = read(FUNCTION_APP_BICEP).replacen(
        "var socSettings = {\n",
        "var socSettings = {\n  SOC_RETRY_FOREVER: 'true'\n",
        1,
    );
    assert_eq!(unknown_settings(&bicep), ["SOC_RETRY_FOREVER"]);
}

/// Why a secret setting's Bicep value is unacceptable, if it is.
fn secret_problem(source: &str, name: &str) -> Option<String> {
    let keys = object_keys(source, "socSettings");
    let line = source
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{name}:")));
    match line {
        None if keys.contains(&format!("{name}__credential")) => {
            let credential = source
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{name}__credential:")))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default();
            (credential != "'managedidentity'")
                .then(|| format!("{name}__credential is {credential}, not 'managedidentity'"))
        }
        None => Some(format!("{name} is neither set nor identity-based")),
        Some(line) => {
            let value = line.split_once(':').unwrap().1.trim();
            (!(value.starts_with("'@Microsoft.KeyVault(SecretUri=") || value == "''")).then(|| {
                format!("{name} must be a Key Vault reference or identity-based, got {value}")
            })
        }
    }
}

#[test]
fn secret_settings_are_key_vault_references_or_identity_based() {
    let source = read(FUNCTION_APP_BICEP);
    let problems: Vec<String> = SETTINGS
        .iter()
        .filter(|s| s.secret)
        .filter_map(|s| secret_problem(&source, s.name))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    assert!(
        !source.contains("listKeys("),
        "no key is read at deploy time"
    );
}

#[test]
fn a_plain_key_or_a_keyed_connection_is_reported() {
    let source = read(FUNCTION_APP_BICEP);
    let plain = source.replacen(
        "  DEVICE_API_KEY: '@Microsoft.KeyVault(",
        "  DEVICE_API_KEY: 'key-in-clear' // (",
        1,
    );
    assert_ne!(plain, source, "the fixture line is gone from the Bicep");
    assert!(secret_problem(&plain, "DEVICE_API_KEY").is_some());
    let keyed = source.replacen(
        "  ServiceBusConnection__credential: 'managedidentity'",
        "  ServiceBusConnection__credential: 'connectionstring'",
        1,
    );
    assert_ne!(keyed, source, "the fixture line is gone from the Bicep");
    assert!(secret_problem(&keyed, "ServiceBusConnection").is_some());
}

#[test]
fn an_identity_section_counts_as_the_connection_it_configures() {
    let bicep = "var socSettings = {\n  ServiceBusConnection__fullyQualifiedNamespace: ns\n  ServiceBusConnection__credential: 'managedidentity'\n}\n";
    let keys = object_keys(bicep, "socSettings");
    assert!(has_section(&keys, "ServiceBusConnection"));
    assert!(!has_section(&keys, "AzureWebJobsStorage"));
    assert!(!missing_settings(bicep).contains(&"ServiceBusConnection"));
    assert!(missing_settings(bicep).contains(&"AzureWebJobsStorage"));
    assert!(unknown_settings(bicep).is_empty());
    let stray = "var socSettings = {\n  Unknown__credential: 'managedidentity'\n}\n";
    assert_eq!(unknown_settings(stray), ["Unknown__credential"]);
}

#[test]
fn object_key_reader_sees_a_missing_and_an_extra_setting() {
    let bicep = "var socSettings = {\n  A_ONE: 'x${y}'\n  // COMMENTED: 1\n  'QUOTED': {\n    NESTED: 1\n  }\n}\nvar other = {\n  B: 1\n}\n";
    let keys = object_keys(bicep, "socSettings");
    assert_eq!(keys.into_iter().collect::<Vec<_>>(), ["A_ONE", "QUOTED"]);
}
