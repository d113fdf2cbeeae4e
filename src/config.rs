//! Typed configuration from app settings (environment variables).
//!
//! [`SETTINGS`] is the one list of app settings the handler reads. The infra
//! (`infra/`) and the tests check themselves against it, so a setting added
//! here and forgotten in the Bicep fails the test suite.
//!
//! [`Config::from_env`] reports every problem at once instead of stopping at
//! the first, so an operator fixes a broken deployment in one pass.

use crate::secret::SecretString;
use std::collections::HashMap;
use std::time::Duration;

/// One app setting the handler reads.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    /// Value used when the setting is absent; `None` means required (or optional without default).
    pub default: Option<&'static str>,
    pub required: bool,
    /// Secrets are never logged and, in Azure, come from Key Vault.
    pub secret: bool,
    pub description: &'static str,
}

const fn setting(
    name: &'static str,
    default: Option<&'static str>,
    required: bool,
    secret: bool,
    description: &'static str,
) -> Setting {
    Setting {
        name,
        default,
        required,
        secret,
        description,
    }
}

/// Every app setting the handler (or the host on its behalf, for `%SETTING%`
/// expressions in function.json) reads. Host-provided variables
/// (`FUNCTIONS_CUSTOMHANDLER_PORT`, ...) are not app settings and are not listed.
pub const SETTINGS: &[Setting] = &[
    setting("AzureWebJobsStorage", None, true, true, "Storage connection string; also holds the settings ledger table unless SOC_STATE_STORAGE is set"),
    setting("SOC_STATE_STORAGE", None, false, true, "Optional separate storage connection string for the ledger table"),
    setting("SOC_STATE_TABLE", Some("socsettings"), false, false, "Table holding the per-device desired-state ledger"),
    setting("ServiceBusConnection", None, true, true, "Service Bus connection string (Key Vault reference in Azure)"),
    setting("SOC_QUEUE_NAME", None, true, false, "Queue carrying pending settings; also bound by SocQueueTrigger"),
    setting("DEVICE_API_BASE_URL", None, true, false, "Base URL of the vendor's device cloud API"),
    setting("DEVICE_API_KEY", None, true, true, "x-api-key for the device cloud API"),
    setting("DEVICE_API_TIMEOUT_MS", Some("5000"), false, false, "Timeout for every device API call"),
    setting("SOC_REQUEST_TTL_SECONDS", Some("604800"), false, false, "How long a request may wait for its device before it expires"),
    setting("SOC_RECHECK_INITIAL_SECONDS", Some("60"), false, false, "First re-check delay for an offline device"),
    setting("SOC_RECHECK_MAX_SECONDS", Some("1800"), false, false, "Largest re-check delay for an offline device"),
    setting("DRAIN_SOC_SCHEDULE", Some("0 */5 * * * *"), false, false, "NCRONTAB schedule of DrainSocTimer (read by the host)"),
    setting("DRAIN_SOC_CONCURRENCY", Some("16"), false, false, "Device API calls DrainSocTimer makes at once"),
];

/// Typed settings. Every secret is a [`SecretString`], so `Debug` shows none.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub storage_connection: SecretString,
    pub table_name: String,
    pub service_bus_connection: SecretString,
    pub queue_name: String,
    pub device_api_base_url: String,
    pub device_api_key: SecretString,
    pub device_api_timeout: Duration,
    pub request_ttl: Duration,
    pub recheck_initial: Duration,
    pub recheck_max: Duration,
    pub drain_concurrency: usize,
}

/// All configuration problems found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

/// The port the host tells us to listen on (`FUNCTIONS_CUSTOMHANDLER_PORT`).
/// Read separately from [`Config`] because the listener binds before the
/// rest of the configuration matters: the host's readiness probe must be
/// answered even when an app setting is broken.
pub fn port_from_env() -> Result<u16, ConfigError> {
    let vars: HashMap<String, String> = std::env::vars().collect();
    port_from(&vars)
}

fn port_from(vars: &HashMap<String, String>) -> Result<u16, ConfigError> {
    let raw = vars
        .get("FUNCTIONS_CUSTOMHANDLER_PORT")
        .or_else(|| vars.get("FUNCTIONS_HTTPWORKER_PORT"))
        .map(String::as_str)
        .unwrap_or("8080");
    raw.trim().parse().map_err(|_| {
        ConfigError(vec![format!(
            "FUNCTIONS_CUSTOMHANDLER_PORT: not a port number: {raw:?}"
        )])
    })
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(&std::env::vars().collect())
    }

    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let mut reader = Reader {
            vars,
            errors: Vec::new(),
        };
        let port = match port_from(vars) {
            Ok(p) => p,
            Err(e) => {
                reader.errors.extend(e.0);
                0
            }
        };
        let storage_connection = reader
            .optional("SOC_STATE_STORAGE")
            .unwrap_or_else(|| reader.string("AzureWebJobsStorage"));
        let config = Config {
            port,
            storage_connection: SecretString::new(storage_connection),
            table_name: reader.string("SOC_STATE_TABLE"),
            service_bus_connection: SecretString::new(reader.string("ServiceBusConnection")),
            queue_name: reader.string("SOC_QUEUE_NAME"),
            device_api_base_url: reader.string("DEVICE_API_BASE_URL"),
            device_api_key: SecretString::new(reader.string("DEVICE_API_KEY")),
            device_api_timeout: Duration::from_millis(reader.number(
                "DEVICE_API_TIMEOUT_MS",
                1,
                120_000,
            )),
            request_ttl: Duration::from_secs(reader.number(
                "SOC_REQUEST_TTL_SECONDS",
                1,
                14 * 24 * 3600,
            )),
            recheck_initial: Duration::from_secs(reader.number(
                "SOC_RECHECK_INITIAL_SECONDS",
                1,
                7 * 24 * 3600,
            )),
            recheck_max: Duration::from_secs(reader.number(
                "SOC_RECHECK_MAX_SECONDS",
                1,
                7 * 24 * 3600,
            )),
            drain_concurrency: reader.number("DRAIN_SOC_CONCURRENCY", 1, 1024) as usize,
        };
        if config.recheck_max < config.recheck_initial {
            reader.errors.push(
                "SOC_RECHECK_MAX_SECONDS: must not be below SOC_RECHECK_INITIAL_SECONDS".into(),
            );
        }
        if !config.device_api_base_url.is_empty()
            && url::Url::parse(&config.device_api_base_url).is_err()
        {
            reader
                .errors
                .push("DEVICE_API_BASE_URL: not an absolute URL".into());
        }
        if config.table_name.is_empty() || !valid_table_name(&config.table_name) {
            reader
                .errors
                .push("SOC_STATE_TABLE: 3-63 letters or digits, starting with a letter".into());
        }
        if reader.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(reader.errors))
        }
    }
}

fn valid_table_name(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Looks a setting up in [`SETTINGS`]; reading a name that is not listed is a bug.
pub fn lookup(name: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("app setting {name} is read but not listed in config::SETTINGS"))
}

struct Reader<'a> {
    vars: &'a HashMap<String, String>,
    errors: Vec<String>,
}

impl Reader<'_> {
    fn optional(&self, name: &str) -> Option<String> {
        let setting = lookup(name);
        self.vars
            .get(setting.name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .or_else(|| setting.default.map(str::to_string))
    }

    fn string(&mut self, name: &str) -> String {
        match self.optional(name) {
            Some(v) => v,
            None => {
                self.errors
                    .push(format!("{name}: required app setting is missing"));
                String::new()
            }
        }
    }

    fn number(&mut self, name: &str, min: u64, max: u64) -> u64 {
        let raw = self.string(name);
        match raw.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ if raw.is_empty() => min,
            _ => {
                self.errors.push(format!(
                    "{name}: expected an integer in {min}..={max}, got {raw:?}"
                ));
                min
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> HashMap<String, String> {
        [
            ("FUNCTIONS_CUSTOMHANDLER_PORT", "4321"),
            ("AzureWebJobsStorage", "UseDevelopmentStorage=true"),
            (
                "ServiceBusConnection",
                "Endpoint=sb://x/;SharedAccessKeyName=a;SharedAccessKey=b",
            ),
            ("SOC_QUEUE_NAME", "soc"),
            ("DEVICE_API_BASE_URL", "http://127.0.0.1:1"),
            ("DEVICE_API_KEY", "device-api-key-55"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn defaults_apply_when_optional_settings_are_absent() {
        let c = Config::from_vars(&minimal()).unwrap();
        assert_eq!(c.port, 4321);
        assert_eq!(c.table_name, "socsettings");
        assert_eq!(c.request_ttl, Duration::from_secs(604_800));
        assert_eq!(c.recheck_initial, Duration::from_secs(60));
        assert_eq!(c.recheck_max, Duration::from_secs(1800));
        assert_eq!(c.drain_concurrency, 16);
    }

    #[test]
    fn separate_state_storage_wins_over_webjobs_storage() {
        let mut vars = minimal();
        vars.insert(
            "SOC_STATE_STORAGE".into(),
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=eQ==".into(),
        );
        let c = Config::from_vars(&vars).unwrap();
        assert!(c
            .storage_connection
            .expose()
            .starts_with("DefaultEndpointsProtocol"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut vars = minimal();
        vars.remove("DEVICE_API_KEY");
        vars.remove("SOC_QUEUE_NAME");
        vars.insert("SOC_RECHECK_INITIAL_SECONDS".into(), "soon".into());
        let err = Config::from_vars(&vars).unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(err.to_string().contains("DEVICE_API_KEY"));
        assert!(err.to_string().contains("SOC_QUEUE_NAME"));
        assert!(err.to_string().contains("SOC_RECHECK_INITIAL_SECONDS"));
    }

    #[test]
    fn debug_output_never_contains_secrets() {
        let c = Config::from_vars(&minimal()).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("SharedAccessKey"));
        assert!(!shown.contains("UseDevelopmentStorage"));
        assert!(!shown.contains("device-api-key-55"));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn every_listed_setting_is_documented_and_secrets_have_no_default() {
        for s in SETTINGS {
            assert!(!s.description.is_empty(), "{}", s.name);
            assert!(
                !(s.secret && s.default.is_some()),
                "{} is secret with a default",
                s.name
            );
        }
    }
}
