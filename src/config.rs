//! Typed configuration from app settings (environment variables).
//!
//! [`SETTINGS`] is the one list of app settings the handler reads. The infra
//! (`infra/`) and the tests check themselves against it, so a setting added
//! here and forgotten in the Bicep fails the test suite.
//!
//! [`Config::from_env`] reports every problem at once instead of stopping at
//! the first, so an operator fixes a broken deployment in one pass.
//!
//! Storage and Service Bus are each reached one of two ways, chosen by the app
//! setting the Functions host reads for the same connection:
//! `AzureWebJobsStorage__credential` / `ServiceBusConnection__credential` set to
//! `managedidentity` selects the app's managed identity (with the connection's
//! `__tableServiceUri`/`__accountName` or `__fullyQualifiedNamespace`); absent,
//! the plain setting is a connection string (local runs against the emulators).
//!
//! Request notifications go to an Event Grid topic when `SOC_NOTIFY_TOPIC_ENDPOINT` is set
//! ([`NotifyConfig`]): with `SOC_NOTIFY_TOPIC_KEY` locally, else as the storage connection's
//! managed identity.

use crate::secret::SecretString;
use std::collections::HashMap;
use std::path::PathBuf;
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
    setting("AzureWebJobsStorage", None, false, true, "Storage connection string (local runs; required unless AzureWebJobsStorage__credential is managedidentity); also holds the ledger table unless SOC_STATE_STORAGE is set"),
    setting("AzureWebJobsStorage__credential", None, false, false, "managedidentity: reach storage with the app's managed identity instead of a connection string"),
    setting("AzureWebJobsStorage__clientId", None, false, false, "Client id of the user-assigned identity storage is reached with (host and handler); absent: the system-assigned identity"),
    setting("AzureWebJobsStorage__accountName", None, false, false, "Storage account name (identity-based); the table endpoint is https://{name}.table.core.windows.net unless __tableServiceUri is set"),
    setting("AzureWebJobsStorage__tableServiceUri", None, false, false, "Table service URL of the storage account (identity-based), e.g. https://acct.table.core.windows.net/"),
    setting("SOC_STATE_STORAGE", None, false, true, "Optional separate storage connection string for the ledger table"),
    setting("SOC_STATE_TABLE", Some("socsettings"), false, false, "Table holding the per-device desired-state ledger"),
    setting("ServiceBusConnection", None, false, true, "Service Bus connection string (local runs; required unless ServiceBusConnection__credential is managedidentity)"),
    setting("ServiceBusConnection__credential", None, false, false, "managedidentity: send to Service Bus with the app's managed identity instead of a connection string"),
    setting("ServiceBusConnection__clientId", None, false, false, "Client id of the user-assigned identity Service Bus is reached with (trigger and handler); absent: the system-assigned identity"),
    setting("ServiceBusConnection__fullyQualifiedNamespace", None, false, false, "Service Bus namespace host (identity-based), e.g. ns.servicebus.windows.net; a loopback host is a local stand-in reached over HTTP"),
    setting("SOC_QUEUE_NAME", None, true, false, "Queue carrying pending settings; also bound by SocQueueTrigger"),
    setting("DEVICE_API_BASE_URL", None, true, false, "Base URL of the vendor's device cloud API"),
    setting("DEVICE_API_KEY", None, true, true, "x-api-key for the device cloud API"),
    setting("DEVICE_API_TIMEOUT_MS", Some("5000"), false, false, "Timeout for every device API call"),
    setting("DEVICE_API_MAX_CALLS_PER_SECOND", Some("50"), false, false, "Fleet-wide ceiling of device API calls per second (status and PUT); each instance gets this divided by DEVICE_API_INSTANCES"),
    setting("DEVICE_API_INSTANCES", Some("1"), false, false, "Most instances that run at once (Flex maximumInstanceCount; the Bicep sets it): divides the device-call ceiling between them"),
    setting("SOC_REQUEST_TTL_SECONDS", Some("604800"), false, false, "How long a request may wait for its device before it expires"),
    setting("SOC_RECHECK_INITIAL_SECONDS", Some("60"), false, false, "First re-check delay for an offline device"),
    setting("SOC_RECHECK_MAX_SECONDS", Some("1800"), false, false, "Largest re-check delay for an offline device"),
    setting("DRAIN_SOC_SCHEDULE", Some("0 */5 * * * *"), false, false, "NCRONTAB schedule of DrainSocTimer (read by the host)"),
    setting("DRAIN_SOC_CONCURRENCY", Some("16"), false, false, "Device API calls DrainSocTimer makes at once"),
    setting("DRAIN_SOC_MAX_DUE", Some("20000"), false, false, "Due devices one DrainSocTimer run takes from the due index at most; the rest wait for the next run"),
    setting("DRAIN_SOC_FANOUT_ABOVE", Some("100"), false, false, "Above this many due devices DrainSocTimer sends wake-up messages (SocQueueTrigger makes the device calls) instead of calling devices itself"),
    setting("SOC_NOTIFY_TOPIC_ENDPOINT", None, false, false, "Event Grid topic endpoint the request notifications (CloudEvents 1.0) are published to, e.g. https://topic.westeurope-1.eventgrid.azure.net/api/events; https unless on localhost; empty: notifications off"),
    setting("SOC_NOTIFY_TOPIC_KEY", None, false, true, "Local runs only: the topic's access key (aeg-sas-key); empty in Azure, where the app's managed identity (AzureWebJobsStorage__clientId) publishes"),
    setting("SOC_DRIFT_POLICY", Some("report"), false, false, "What the service does when a battery reports another minSoc than its applied request while nothing is pending: report (record it, publish com.socsettings.device.drifted) or reassert (also request the applied value again)"),
    setting("SOC_EXTRA_CA_CERTS", None, false, false, "Dev/test only: path to a PEM bundle the Azure clients trust besides the public roots (a local TLS stand-in such as Azurite over HTTPS); empty in Azure"),
    setting("RUST_LOG", None, false, false, "Log filter (tracing EnvFilter syntax, e.g. debug or info,soc_settings=debug); empty: info"),
];

/// The value of `X__credential` that selects the managed identity (case-insensitive, as
/// the Functions host reads it).
pub const MANAGED_IDENTITY: &str = "managedidentity";

/// How the ledger's storage account is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageAccess {
    /// A connection string (`SOC_STATE_STORAGE` or `AzureWebJobsStorage`).
    ConnectionString(SecretString),
    /// The app's managed identity, against this table service URL: the user-assigned one
    /// `client_id` names (`AzureWebJobsStorage__clientId`), else the system-assigned one.
    Identity {
        table_endpoint: url::Url,
        client_id: Option<String>,
    },
}

/// How the settings queue's namespace is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceBusAccess {
    /// A connection string (`ServiceBusConnection`).
    ConnectionString(SecretString),
    /// The app's managed identity, to this namespace host (`ns.servicebus.windows.net`, or
    /// `127.0.0.1:port` for a local stand-in), as the user-assigned identity `client_id` names
    /// (`ServiceBusConnection__clientId`), else the system-assigned one.
    Identity {
        namespace: String,
        client_id: Option<String>,
    },
}

/// Where request notifications are published (`SOC_NOTIFY_TOPIC_ENDPOINT`); absent from
/// [`Config`] when they are off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// The Event Grid topic endpoint, used as configured (`…/api/events`).
    pub endpoint: url::Url,
    pub access: NotifyAccess,
    /// The CloudEvents `source` of every event: `https://{WEBSITE_HOSTNAME}` in Azure (the
    /// platform sets it), else [`LOCAL_EVENT_SOURCE`].
    pub source: String,
}

/// The CloudEvents `source` when `WEBSITE_HOSTNAME` is not set (local runs).
pub const LOCAL_EVENT_SOURCE: &str = "urn:soc-settings:local";

/// How the event topic is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAccess {
    /// The topic's access key (`SOC_NOTIFY_TOPIC_KEY`, local runs).
    Key(SecretString),
    /// The app's managed identity: the user-assigned one `client_id` names (the storage
    /// connection's, `AzureWebJobsStorage__clientId`), else the system-assigned one.
    Identity { client_id: Option<String> },
}

/// Typed settings. Every secret is a [`SecretString`], so `Debug` shows none.
#[derive(Debug, Clone)]
pub struct Config {
    pub port: u16,
    pub storage: StorageAccess,
    pub table_name: String,
    pub service_bus: ServiceBusAccess,
    pub queue_name: String,
    pub device_api_base_url: String,
    pub device_api_key: SecretString,
    pub device_api_timeout: Duration,
    /// The device-call budget: fleet ceiling and the instances it is shared by.
    pub device_budget: DeviceBudget,
    pub request_ttl: Duration,
    pub recheck_initial: Duration,
    pub recheck_max: Duration,
    pub drain_concurrency: usize,
    pub drain_max_due: usize,
    pub drain_fanout_above: usize,
    /// Extra trusted CA certificates (PEM bundle) for the Azure clients; dev/test only.
    pub extra_ca_certs: Option<PathBuf>,
    /// The event topic of request notifications; `None`: notifications are off.
    pub notify: Option<NotifyConfig>,
    /// `SOC_DRIFT_POLICY`: `true` for `reassert`, `false` for `report`.
    pub drift_reassert: bool,
}

/// The device-call budget (README "Device-call budget"): `DEVICE_API_MAX_CALLS_PER_SECOND`
/// for the whole fleet, shared equally by at most `DEVICE_API_INSTANCES` instances. Each
/// instance enforces its share with a token bucket
/// ([`crate::adapters::device_budget::BudgetedDeviceApi`]), so all of them together stay
/// under the ceiling however many run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceBudget {
    /// Device calls per second, all instances together.
    pub fleet_calls_per_second: u32,
    /// Most instances that run at once.
    pub instances: u32,
}

impl DeviceBudget {
    /// Lowest per-instance rate accepted: one call per the budget's longest wait, so a
    /// call can always get a turn before it gives up.
    pub const MIN_PER_INSTANCE: f64 =
        1.0 / crate::adapters::device_budget::MAX_WAIT.as_secs() as f64;

    /// This instance's share: calls per second it may make.
    pub fn per_instance(&self) -> f64 {
        f64::from(self.fleet_calls_per_second) / f64::from(self.instances.max(1))
    }
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
        reader.errors.extend(unresolved_references(vars));
        let port = match port_from(vars) {
            Ok(p) => p,
            Err(e) => {
                reader.errors.extend(e.0);
                0
            }
        };
        let storage = match reader.optional("SOC_STATE_STORAGE") {
            Some(ledger) => StorageAccess::ConnectionString(SecretString::new(ledger)),
            None => reader.storage_access(),
        };
        let service_bus = reader.service_bus_access();
        let storage_client_id = match &storage {
            StorageAccess::Identity { client_id, .. } => Some(client_id.clone()),
            StorageAccess::ConnectionString(_) => None,
        };
        let notify = reader.notify(storage_client_id);
        let uses_identity = matches!(storage, StorageAccess::Identity { .. })
            || matches!(service_bus, ServiceBusAccess::Identity { .. });
        if uses_identity && !vars.contains_key("IDENTITY_ENDPOINT") {
            reader.errors.push(
                "managedidentity needs IDENTITY_ENDPOINT and IDENTITY_HEADER, which the Functions platform sets for an app with a managed identity; locally, use connection strings".into(),
            );
        }
        let config = Config {
            port,
            storage,
            table_name: reader.string("SOC_STATE_TABLE"),
            service_bus,
            queue_name: reader.string("SOC_QUEUE_NAME"),
            device_api_base_url: reader.string("DEVICE_API_BASE_URL"),
            device_api_key: SecretString::new(reader.string("DEVICE_API_KEY")),
            device_api_timeout: Duration::from_millis(reader.number(
                "DEVICE_API_TIMEOUT_MS",
                1,
                120_000,
            )),
            device_budget: DeviceBudget {
                fleet_calls_per_second: reader.number("DEVICE_API_MAX_CALLS_PER_SECOND", 1, 100_000)
                    as u32,
                instances: reader.number("DEVICE_API_INSTANCES", 1, 1000) as u32,
            },
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
            drain_max_due: reader.number("DRAIN_SOC_MAX_DUE", 1, 1_000_000) as usize,
            drain_fanout_above: reader.number("DRAIN_SOC_FANOUT_ABOVE", 0, 1_000_000) as usize,
            extra_ca_certs: reader.optional("SOC_EXTRA_CA_CERTS").map(PathBuf::from),
            notify,
            drift_reassert: match reader.string("SOC_DRIFT_POLICY").as_str() {
                "reassert" => true,
                "report" => false,
                _ => {
                    reader
                        .errors
                        .push("SOC_DRIFT_POLICY: must be report or reassert".into());
                    false
                }
            },
        };
        if config.recheck_max < config.recheck_initial {
            reader.errors.push(
                "SOC_RECHECK_MAX_SECONDS: must not be below SOC_RECHECK_INITIAL_SECONDS".into(),
            );
        }
        if config.device_budget.per_instance() < DeviceBudget::MIN_PER_INSTANCE {
            reader.errors.push(format!(
                "DEVICE_API_MAX_CALLS_PER_SECOND / DEVICE_API_INSTANCES: {} / {} leaves each instance less than one device call per {} s; raise the ceiling or lower the instance count",
                config.device_budget.fleet_calls_per_second,
                config.device_budget.instances,
                crate::adapters::device_budget::MAX_WAIT.as_secs()
            ));
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
            reader
                .errors
                .extend(crate::functions::Policy::from_config(&config).design_problems());
        }
        if reader.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError(reader.errors))
        }
    }
}

/// How App Service writes a Key Vault reference in an app setting. When the platform cannot
/// resolve one (the identity lacks its role, the role has not propagated, the secret is gone),
/// it hands the process the reference text itself instead of the secret.
pub const KEY_VAULT_REFERENCE_PREFIX: &str = "@Microsoft.KeyVault(";

/// One problem per listed setting that still holds an unresolved Key Vault reference. Such a
/// value would otherwise be used as if it were the secret (sent as the vendor's API key, read
/// as a 401 and retried for days); naming it once makes a broken deployment obvious. The
/// reference text itself is not repeated.
fn unresolved_references(vars: &HashMap<String, String>) -> Vec<String> {
    SETTINGS
        .iter()
        .filter(|s| {
            vars.get(s.name).is_some_and(|v| {
                v.trim_start()
                    .get(..KEY_VAULT_REFERENCE_PREFIX.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(KEY_VAULT_REFERENCE_PREFIX))
            })
        })
        .map(|s| {
            format!(
                "{}: holds an unresolved Key Vault reference ({KEY_VAULT_REFERENCE_PREFIX}...): the platform could not read the secret; check the identity's Key Vault Secrets User role and keyVaultReferenceIdentity, then run scripts/deploy-check keyvault-refs (docs/deploy.md)",
                s.name
            )
        })
        .collect()
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

    /// Whether `{connection}__credential` selects the managed identity; an unknown value is
    /// an error (the host would not accept it either).
    fn uses_identity(&mut self, connection: &str) -> bool {
        let name = format!("{connection}__credential");
        match self.optional(&name) {
            None => false,
            Some(v) if v.eq_ignore_ascii_case(MANAGED_IDENTITY) => true,
            Some(v) => {
                self.errors.push(format!(
                    "{name}: only {MANAGED_IDENTITY} is supported, got {v:?}"
                ));
                false
            }
        }
    }

    fn storage_access(&mut self) -> StorageAccess {
        if !self.uses_identity("AzureWebJobsStorage") {
            return StorageAccess::ConnectionString(SecretString::new(
                self.string("AzureWebJobsStorage"),
            ));
        }
        let client_id = self.client_id("AzureWebJobsStorage");
        let raw = match (
            self.optional("AzureWebJobsStorage__tableServiceUri"),
            self.optional("AzureWebJobsStorage__accountName"),
        ) {
            (Some(uri), _) => uri,
            (None, Some(account)) => format!("https://{account}.table.core.windows.net/"),
            (None, None) => {
                self.errors.push(
                    "AzureWebJobsStorage__credential is managedidentity: set AzureWebJobsStorage__tableServiceUri or AzureWebJobsStorage__accountName".into(),
                );
                return StorageAccess::Identity {
                    table_endpoint: url::Url::parse("https://invalid.invalid/")
                        .expect("constant URL"),
                    client_id,
                };
            }
        };
        match url::Url::parse(&raw) {
            Ok(url) if url.scheme() == "https" && url.host_str().is_some() => {
                StorageAccess::Identity {
                    table_endpoint: url,
                    client_id,
                }
            }
            _ => {
                self.errors.push(
                    "AzureWebJobsStorage__tableServiceUri/__accountName: not an https table service URL (bearer tokens are only sent over HTTPS)".into(),
                );
                StorageAccess::Identity {
                    table_endpoint: url::Url::parse("https://invalid.invalid/")
                        .expect("constant URL"),
                    client_id,
                }
            }
        }
    }

    fn service_bus_access(&mut self) -> ServiceBusAccess {
        if !self.uses_identity("ServiceBusConnection") {
            return ServiceBusAccess::ConnectionString(SecretString::new(
                self.string("ServiceBusConnection"),
            ));
        }
        let namespace = self
            .optional("ServiceBusConnection__fullyQualifiedNamespace")
            .unwrap_or_default();
        let valid = !namespace.is_empty()
            && !namespace.contains("://")
            && url::Url::parse(&format!("https://{namespace}/")).is_ok_and(|u| u.path() == "/");
        if !valid {
            self.errors.push(
                "ServiceBusConnection__fullyQualifiedNamespace: required with managedidentity, a host name such as ns.servicebus.windows.net".into(),
            );
        }
        ServiceBusAccess::Identity {
            namespace,
            client_id: self.client_id("ServiceBusConnection"),
        }
    }

    /// The event topic, if `SOC_NOTIFY_TOPIC_ENDPOINT` is set. Without `SOC_NOTIFY_TOPIC_KEY`
    /// the managed identity publishes, as the storage connection's identity
    /// (`storage_client_id` when storage is identity-based, else `AzureWebJobsStorage__clientId`
    /// read here).
    fn notify(&mut self, storage_client_id: Option<Option<String>>) -> Option<NotifyConfig> {
        const ENDPOINT: &str = "SOC_NOTIFY_TOPIC_ENDPOINT";
        const KEY: &str = "SOC_NOTIFY_TOPIC_KEY";
        let raw = self.optional(ENDPOINT)?;
        let endpoint = match url::Url::parse(&raw) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
                let local = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
                if url.scheme() == "http" && !local {
                    self.errors.push(format!(
                        "{ENDPOINT}: must be https (http only for localhost or 127.0.0.1)"
                    ));
                }
                url
            }
            _ => {
                self.errors.push(format!(
                    "{ENDPOINT}: not an absolute http(s) URL, e.g. https://topic.westeurope-1.eventgrid.azure.net/api/events"
                ));
                return None;
            }
        };
        let access = match self.optional(KEY) {
            Some(key) => NotifyAccess::Key(SecretString::new(key)),
            None => {
                let client_id = match storage_client_id {
                    Some(id) => id,
                    None => self.client_id("AzureWebJobsStorage"),
                };
                if !self.vars.contains_key("IDENTITY_ENDPOINT") {
                    self.errors.push(format!(
                        "{ENDPOINT} is set but neither {KEY} nor a managed identity (IDENTITY_ENDPOINT, set by the Functions platform) is there to publish with: set {KEY} for local runs, or leave {ENDPOINT} empty to turn notifications off"
                    ));
                }
                NotifyAccess::Identity { client_id }
            }
        };
        let source = match self.vars.get("WEBSITE_HOSTNAME").map(|h| h.trim()) {
            Some(host) if !host.is_empty() => format!("https://{host}"),
            _ => LOCAL_EVENT_SOURCE.to_string(),
        };
        Some(NotifyConfig {
            endpoint,
            access,
            source,
        })
    }

    /// `{connection}__clientId`: the user-assigned identity's client id, a GUID.
    fn client_id(&mut self, connection: &str) -> Option<String> {
        let name = format!("{connection}__clientId");
        let id = self.optional(&name)?;
        let guid = id.len() == 36
            && id.char_indices().all(|(i, c)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    c == '-'
                } else {
                    c.is_ascii_hexdigit()
                }
            });
        if !guid {
            self.errors.push(format!(
                "{name}: not a client id (a GUID such as 00000000-0000-0000-0000-000000000000)"
            ));
        }
        Some(id)
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

    /// A user-assigned identity's client id.
    const CLIENT: &str = "7d1c2f3e-4a5b-4c6d-8e9f-0a1b2c3d4e5f";

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
        assert_eq!(
            c.device_budget,
            DeviceBudget {
                fleet_calls_per_second: 50,
                instances: 1
            }
        );
        assert_eq!(c.device_budget.per_instance(), 50.0);
    }

    #[test]
    fn the_device_call_ceiling_is_shared_by_the_instances() {
        let mut vars = minimal();
        vars.insert("DEVICE_API_MAX_CALLS_PER_SECOND".into(), "100".into());
        vars.insert("DEVICE_API_INSTANCES".into(), "40".into());
        let c = Config::from_vars(&vars).unwrap();
        assert_eq!(c.device_budget.per_instance(), 2.5);
    }

    #[test]
    fn a_budget_that_starves_each_instance_is_reported_with_the_other_problems() {
        let mut vars = minimal();
        vars.insert("DEVICE_API_MAX_CALLS_PER_SECOND".into(), "10".into());
        vars.insert("DEVICE_API_INSTANCES".into(), "1000".into());
        vars.remove("SOC_QUEUE_NAME");
        let err = Config::from_vars(&vars).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err}");
        let text = err.to_string();
        assert!(text.contains("10 / 1000 leaves each instance"), "{text}");
        assert!(text.contains("SOC_QUEUE_NAME"), "{text}");

        let mut vars = minimal();
        vars.insert("DEVICE_API_MAX_CALLS_PER_SECOND".into(), "0".into());
        vars.insert("DEVICE_API_INSTANCES".into(), "lots".into());
        let err = Config::from_vars(&vars).unwrap_err().to_string();
        assert!(
            err.contains("DEVICE_API_MAX_CALLS_PER_SECOND: expected an integer in 1..=100000"),
            "{err}"
        );
        assert!(
            err.contains("DEVICE_API_INSTANCES: expected an integer in 1..=1000"),
            "{err}"
        );
    }

    #[test]
    fn separate_state_storage_wins_over_webjobs_storage() {
        let mut vars = minimal();
        vars.insert(
            "SOC_STATE_STORAGE".into(),
            "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=eQ==".into(),
        );
        let c = Config::from_vars(&vars).unwrap();
        let StorageAccess::ConnectionString(ledger) = c.storage else {
            panic!("expected a connection string");
        };
        assert!(ledger.expose().starts_with("DefaultEndpointsProtocol"));
    }

    fn identity() -> HashMap<String, String> {
        let mut vars = minimal();
        vars.remove("AzureWebJobsStorage");
        vars.remove("ServiceBusConnection");
        for (k, v) in [
            ("AzureWebJobsStorage__credential", "managedidentity"),
            ("AzureWebJobsStorage__accountName", "socstate"),
            ("ServiceBusConnection__credential", "ManagedIdentity"),
            (
                "ServiceBusConnection__fullyQualifiedNamespace",
                "soc-ns.servicebus.windows.net",
            ),
            ("IDENTITY_ENDPOINT", "http://127.0.0.1:41000/msi/token"),
        ] {
            vars.insert(k.into(), v.into());
        }
        vars
    }

    #[test]
    fn managedidentity_credentials_select_the_identity_for_storage_and_service_bus() {
        let c = Config::from_vars(&identity()).unwrap();
        assert_eq!(
            c.storage,
            StorageAccess::Identity {
                table_endpoint: url::Url::parse("https://socstate.table.core.windows.net/")
                    .unwrap(),
                client_id: None,
            }
        );
        assert_eq!(
            c.service_bus,
            ServiceBusAccess::Identity {
                namespace: "soc-ns.servicebus.windows.net".into(),
                client_id: None,
            }
        );
        let mut vars = identity();
        vars.insert(
            "AzureWebJobsStorage__tableServiceUri".into(),
            "https://127.0.0.1:10443/devstoreaccount1".into(),
        );
        let c = Config::from_vars(&vars).unwrap();
        assert_eq!(
            c.storage,
            StorageAccess::Identity {
                table_endpoint: url::Url::parse("https://127.0.0.1:10443/devstoreaccount1")
                    .unwrap(),
                client_id: None,
            }
        );
    }

    #[test]
    fn each_connection_takes_the_user_assigned_identity_its_client_id_names() {
        let mut vars = identity();
        vars.insert("AzureWebJobsStorage__clientId".into(), CLIENT.into());
        vars.insert("ServiceBusConnection__clientId".into(), CLIENT.into());
        let c = Config::from_vars(&vars).unwrap();
        assert!(
            matches!(&c.storage, StorageAccess::Identity { client_id: Some(id), .. } if id == CLIENT)
        );
        assert!(
            matches!(&c.service_bus, ServiceBusAccess::Identity { client_id: Some(id), .. } if id == CLIENT)
        );

        vars.insert("AzureWebJobsStorage__clientId".into(), "my-identity".into());
        vars.insert(
            "ServiceBusConnection__clientId".into(),
            format!("{CLIENT}x"),
        );
        let err = Config::from_vars(&vars).unwrap_err().to_string();
        assert!(
            err.contains("AzureWebJobsStorage__clientId: not a client id"),
            "{err}"
        );
        assert!(
            err.contains("ServiceBusConnection__clientId: not a client id"),
            "{err}"
        );
    }

    #[test]
    fn identity_settings_that_cannot_work_are_all_reported() {
        let mut vars = identity();
        vars.remove("IDENTITY_ENDPOINT");
        vars.remove("AzureWebJobsStorage__accountName");
        vars.remove("ServiceBusConnection__fullyQualifiedNamespace");
        let err = Config::from_vars(&vars).unwrap_err().to_string();
        assert!(err.contains("IDENTITY_ENDPOINT"), "{err}");
        assert!(
            err.contains(
                "AzureWebJobsStorage__tableServiceUri or AzureWebJobsStorage__accountName"
            ),
            "{err}"
        );
        assert!(
            err.contains("ServiceBusConnection__fullyQualifiedNamespace"),
            "{err}"
        );

        let mut vars = identity();
        vars.insert(
            "ServiceBusConnection__credential".into(),
            "clientsecret".into(),
        );
        vars.insert(
            "AzureWebJobsStorage__tableServiceUri".into(),
            "http://127.0.0.1:10002/devstoreaccount1".into(),
        );
        let err = Config::from_vars(&vars).unwrap_err().to_string();
        assert!(err.contains("only managedidentity is supported"), "{err}");
        assert!(err.contains("not an https table service URL"), "{err}");
        // Without __credential the plain connection string is required again.
        assert!(
            err.contains("ServiceBusConnection: required app setting is missing"),
            "{err}"
        );
    }

    #[test]
    fn a_separate_ledger_connection_string_wins_over_the_storage_identity() {
        let mut vars = identity();
        vars.insert(
            "SOC_STATE_STORAGE".into(),
            "UseDevelopmentStorage=true".into(),
        );
        let c = Config::from_vars(&vars).unwrap();
        assert!(matches!(c.storage, StorageAccess::ConnectionString(_)));
    }

    const TOPIC: &str = "https://soc-events.westeurope-1.eventgrid.azure.net/api/events";

    #[test]
    fn notifications_are_off_unless_a_topic_endpoint_is_set() {
        assert_eq!(Config::from_vars(&minimal()).unwrap().notify, None);
        let mut vars = minimal();
        vars.insert("SOC_NOTIFY_TOPIC_ENDPOINT".into(), " ".into());
        vars.insert("SOC_NOTIFY_TOPIC_KEY".into(), "unused-key".into());
        assert_eq!(Config::from_vars(&vars).unwrap().notify, None);
    }

    #[test]
    fn a_topic_key_selects_key_access_and_stays_hidden() {
        let mut vars = minimal();
        vars.insert(
            "SOC_NOTIFY_TOPIC_ENDPOINT".into(),
            "http://127.0.0.1:7074/api/events".into(),
        );
        vars.insert(
            "SOC_NOTIFY_TOPIC_KEY".into(),
            "devhost-local-topic-key".into(),
        );
        let c = Config::from_vars(&vars).unwrap();
        let notify = c.notify.clone().expect("notifications on");
        assert_eq!(notify.endpoint.as_str(), "http://127.0.0.1:7074/api/events");
        assert_eq!(
            notify.access,
            NotifyAccess::Key(SecretString::new("devhost-local-topic-key"))
        );
        assert_eq!(notify.source, LOCAL_EVENT_SOURCE);
        assert!(!format!("{c:?}").contains("devhost-local-topic-key"));
    }

    #[test]
    fn without_a_key_the_topic_is_reached_with_the_storage_identity_and_the_app_is_the_source() {
        let mut vars = identity();
        vars.insert("SOC_NOTIFY_TOPIC_ENDPOINT".into(), TOPIC.into());
        vars.insert("AzureWebJobsStorage__clientId".into(), CLIENT.into());
        vars.insert(
            "WEBSITE_HOSTNAME".into(),
            "soc-app.azurewebsites.net".into(),
        );
        let notify = Config::from_vars(&vars).unwrap().notify.unwrap();
        assert_eq!(notify.endpoint.as_str(), TOPIC);
        assert_eq!(
            notify.access,
            NotifyAccess::Identity {
                client_id: Some(CLIENT.into())
            }
        );
        assert_eq!(notify.source, "https://soc-app.azurewebsites.net");

        // The system-assigned identity without a client id; the ledger's own connection
        // string does not change whose identity publishes.
        let mut vars = identity();
        vars.insert("SOC_NOTIFY_TOPIC_ENDPOINT".into(), TOPIC.into());
        vars.insert(
            "SOC_STATE_STORAGE".into(),
            "UseDevelopmentStorage=true".into(),
        );
        vars.insert("AzureWebJobsStorage__clientId".into(), CLIENT.into());
        let notify = Config::from_vars(&vars).unwrap().notify.unwrap();
        assert_eq!(
            notify.access,
            NotifyAccess::Identity {
                client_id: Some(CLIENT.into())
            }
        );
        vars.remove("AzureWebJobsStorage__clientId");
        let notify = Config::from_vars(&vars).unwrap().notify.unwrap();
        assert_eq!(notify.access, NotifyAccess::Identity { client_id: None });
    }

    #[test]
    fn a_topic_endpoint_must_be_an_absolute_url_and_https_unless_local() {
        for (endpoint, says) in [
            (
                "topic.eventgrid.azure.net/api/events",
                "not an absolute http(s) URL",
            ),
            (
                "ftp://topic.example/api/events",
                "not an absolute http(s) URL",
            ),
            ("urn:topic", "not an absolute http(s) URL"),
            (
                "http://topic.westeurope-1.eventgrid.azure.net/api/events",
                "must be https",
            ),
        ] {
            let mut vars = minimal();
            vars.insert("SOC_NOTIFY_TOPIC_ENDPOINT".into(), endpoint.into());
            vars.insert("SOC_NOTIFY_TOPIC_KEY".into(), "k".into());
            let err = Config::from_vars(&vars).unwrap_err();
            assert_eq!(err.0.len(), 1, "{endpoint}: {err}");
            assert!(
                err.0[0].starts_with("SOC_NOTIFY_TOPIC_ENDPOINT: ") && err.0[0].contains(says),
                "{endpoint}: {err}"
            );
        }
        for endpoint in [
            "http://127.0.0.1:7074/api/events",
            "http://localhost:7074/api/events",
            TOPIC,
        ] {
            let mut vars = minimal();
            vars.insert("SOC_NOTIFY_TOPIC_ENDPOINT".into(), endpoint.into());
            vars.insert("SOC_NOTIFY_TOPIC_KEY".into(), "k".into());
            assert!(Config::from_vars(&vars).is_ok(), "{endpoint}");
        }
    }

    #[test]
    fn a_topic_with_neither_key_nor_identity_is_reported_naming_both_settings() {
        let mut vars = minimal();
        vars.insert("SOC_NOTIFY_TOPIC_ENDPOINT".into(), TOPIC.into());
        let err = Config::from_vars(&vars).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].contains("SOC_NOTIFY_TOPIC_ENDPOINT")
                && err.0[0].contains("SOC_NOTIFY_TOPIC_KEY")
                && err.0[0].contains("IDENTITY_ENDPOINT"),
            "{err}"
        );
        // A client id that is no GUID is reported even when storage uses a connection string.
        vars.insert("IDENTITY_ENDPOINT".into(), "http://127.0.0.1:1/msi".into());
        vars.insert("AzureWebJobsStorage__clientId".into(), "my-identity".into());
        let err = Config::from_vars(&vars).unwrap_err().to_string();
        assert!(
            err.contains("AzureWebJobsStorage__clientId: not a client id"),
            "{err}"
        );
    }

    #[test]
    fn settings_that_defeat_the_design_are_refused_naming_them() {
        for (name, value, says) in [
            ("DEVICE_API_TIMEOUT_MS", "31000", "over 30 s"),
            ("DEVICE_API_TIMEOUT_MS", "25000", "functionTimeout"),
            ("DEVICE_API_TIMEOUT_MS", "8000", "connection events"),
            (
                "SOC_REQUEST_TTL_SECONDS",
                "600",
                "shorter than one device lease",
            ),
        ] {
            let mut vars = minimal();
            vars.insert(name.into(), value.into());
            let err = Config::from_vars(&vars).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains(says),
                "{name}={value}: {err}"
            );
        }
        assert!(Config::from_vars(&minimal()).is_ok(), "the defaults hold");
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
    fn an_unresolved_key_vault_reference_is_refused_naming_the_setting_and_not_its_value() {
        let reference =
            "@Microsoft.KeyVault(SecretUri=https://kv-x.vault.azure.net/secrets/device-api-key)";
        for value in [
            reference,
            " @microsoft.keyvault(VaultName=kv-x;SecretName=k)",
        ] {
            let mut vars = minimal();
            vars.insert("DEVICE_API_KEY".into(), value.into());
            let err = Config::from_vars(&vars).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert!(
                err.0[0].starts_with("DEVICE_API_KEY: holds an unresolved Key Vault reference"),
                "{err}"
            );
            assert!(
                !err.to_string().contains("kv-x"),
                "the reference is not repeated"
            );
        }
        // Any listed setting, each named; a value that merely mentions it is not one.
        let mut vars = minimal();
        vars.insert("DEVICE_API_KEY".into(), reference.into());
        vars.insert("SOC_QUEUE_NAME".into(), reference.into());
        vars.insert(
            "DEVICE_API_BASE_URL".into(),
            "http://x/@Microsoft.KeyVault(".into(),
        );
        let err = Config::from_vars(&vars).unwrap_err().to_string();
        assert!(err.contains("DEVICE_API_KEY: holds an unresolved"), "{err}");
        assert!(err.contains("SOC_QUEUE_NAME: holds an unresolved"), "{err}");
        assert!(!err.contains("DEVICE_API_BASE_URL"), "{err}");
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
