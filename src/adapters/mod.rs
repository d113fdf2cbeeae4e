//! Implementations of [`crate::ports`] for Azure and the vendor's device cloud.
//!
//! - [`device_api`]: `reqwest` client for the device cloud (`docs/device-api.md`).
//! - [`device_budget`]: the device-call budget, a per-instance token bucket wrapped
//!   around the device client (every status call and PUT of the process).
//! - [`service_bus`]: the settings queue, sent with `azure_messaging_servicebus`.
//! - [`table_ledger`]: the desired-state ledger in Azure Table Storage, through
//!   [`table_rest`], our own lean client of the Table REST API (shared key or bearer token).
//! - [`connection_string`]: Service Bus and Storage connection strings, parsed without
//!   ever echoing a secret.
//! - [`identity`]: the app's managed identity (tokens from the Functions identity endpoint)
//!   and the HTTP transport of the Azure clients.
//! - [`event_grid`]: the event topic request notifications are published to (CloudEvents
//!   1.0 on Azure Event Grid), when configured.
//!
//! [`build`] makes them all from [`Config`] without any network I/O, so the handler
//! can answer the host's readiness probe before anything outside is reachable. Storage,
//! Service Bus and the event topic each use a key (connection string) or the managed
//! identity, as the configuration says ([`crate::config::StorageAccess`],
//! [`crate::config::ServiceBusAccess`], [`crate::config::NotifyAccess`]); identity-based
//! clients of the same identity (`__clientId`) share one credential, so one token cache.

pub mod connection_string;
pub mod device_api;
pub mod device_budget;
pub mod event_grid;
pub mod identity;
pub mod service_bus;
pub mod table_ledger;
pub mod table_rest;

use std::sync::Arc;

use azure_core::auth::TokenCredential;

use crate::config::{Config, NotifyAccess, ServiceBusAccess, StorageAccess};
use crate::ports::{DeviceApi, Ledger, Notifier, SettingsQueue};

pub use connection_string::{ConnectionStringError, ServiceBusConnection, StorageConnection};
pub use device_api::HttpDeviceApi;
pub use device_budget::BudgetedDeviceApi;
pub use event_grid::EventGridNotifier;
pub use service_bus::ServiceBusQueue;
pub use table_ledger::TableLedger;

/// The production adapters, behind their ports.
#[derive(Clone)]
pub struct Adapters {
    pub device: Arc<dyn DeviceApi>,
    pub queue: Arc<dyn SettingsQueue>,
    pub ledger: Arc<dyn Ledger>,
    /// The event topic; `None` when notifications are off (`SOC_NOTIFY_TOPIC_ENDPOINT` unset).
    pub notifier: Option<Arc<dyn Notifier>>,
}

/// Every adapter configuration problem at once, one per line. Never contains a secret.
#[derive(Debug, thiserror::Error)]
#[error("adapter configuration is invalid:\n  {}", .0.join("\n  "))]
pub struct BuildError(pub Vec<String>);

/// Builds the device client (inside its call budget), the Service Bus sender, the
/// Table ledger and, when configured, the event topic's publisher. No I/O: the ledger
/// table is created on first use, tokens are fetched on first use.
pub fn build(config: &Config) -> Result<Adapters, BuildError> {
    let mut errors = Vec::new();

    let device = HttpDeviceApi::new(
        &config.device_api_base_url,
        config.device_api_key.expose(),
        config.device_api_timeout,
    )
    .map_err(|e| errors.push(e.to_string()))
    .ok();

    let extra_ca = config.extra_ca_certs.as_deref();
    // One credential (one token cache) per identity: both connections normally name the same.
    let mut credentials: Vec<(Option<String>, Arc<dyn TokenCredential>)> = Vec::new();
    let mut credential = |client_id: &Option<String>, errors: &mut Vec<String>| {
        if let Some((_, c)) = credentials.iter().find(|(id, _)| id == client_id) {
            return Some(c.clone());
        }
        let c = identity::managed_identity(client_id.as_deref())
            .map_err(|e| errors.push(e))
            .ok()?;
        credentials.push((client_id.clone(), c.clone()));
        Some(c)
    };

    let queue = match &config.service_bus {
        ServiceBusAccess::ConnectionString(raw) => ServiceBusConnection::parse(raw.expose())
            .map_err(|e| errors.push(e.to_string()))
            .ok()
            .and_then(|conn| {
                ServiceBusQueue::new(&conn, &config.queue_name, extra_ca)
                    .map_err(|e| errors.push(format!("ServiceBusConnection: {e}")))
                    .ok()
            }),
        ServiceBusAccess::Identity {
            namespace,
            client_id,
        } => credential(client_id, &mut errors).and_then(|credential| {
            ServiceBusQueue::with_identity(namespace, &config.queue_name, credential, extra_ca)
                .map_err(|e| {
                    errors.push(format!(
                        "ServiceBusConnection__fullyQualifiedNamespace: {e}"
                    ))
                })
                .ok()
        }),
    };

    let ledger = match &config.storage {
        StorageAccess::ConnectionString(raw) => StorageConnection::parse(raw.expose())
            .map_err(|e| errors.push(e.to_string()))
            .ok()
            .and_then(|conn| {
                TableLedger::with_connection(&conn, &config.table_name, extra_ca)
                    .map_err(|e| errors.push(format!("SOC_STATE_TABLE: {e}")))
                    .ok()
            }),
        StorageAccess::Identity {
            table_endpoint,
            client_id,
        } => credential(client_id, &mut errors).and_then(|credential| {
            TableLedger::with_identity(table_endpoint, &config.table_name, credential, extra_ca)
                .map_err(|e| errors.push(format!("AzureWebJobsStorage: {e}")))
                .ok()
        }),
    };

    // Failures are in `errors`, which decides below.
    let notifier = config.notify.as_ref().and_then(|notify| {
        let built = match &notify.access {
            NotifyAccess::Key(key) => {
                EventGridNotifier::with_key(&notify.endpoint, key, &notify.source, extra_ca)
                    .map_err(|e| errors.push(e.to_string()))
                    .ok()
            }
            NotifyAccess::Identity { client_id } => {
                credential(client_id, &mut errors).and_then(|credential| {
                    EventGridNotifier::with_identity(
                        &notify.endpoint,
                        credential,
                        &notify.source,
                        extra_ca,
                    )
                    .map_err(|e| errors.push(e.to_string()))
                    .ok()
                })
            }
        };
        built.map(|n| Arc::new(n) as Arc<dyn Notifier>)
    });

    match (device, queue, ledger) {
        (Some(device), Some(queue), Some(ledger)) if errors.is_empty() => Ok(Adapters {
            device: Arc::new(BudgetedDeviceApi::new(
                device,
                config.device_budget.per_instance(),
            )),
            queue: Arc::new(queue),
            ledger: Arc::new(ledger),
            notifier,
        }),
        _ => Err(BuildError(errors)),
    }
}

/// Serves `app` on a free loopback port for as long as the test runs (the adapters'
/// stand-ins for the services they talk to); returns its address.
#[cfg(test)]
pub(crate) async fn serve_on_loopback(app: axum::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const SB_KEY: &str = "c2ItdGVzdC1rZXktMTIz";
    const API_KEY: &str = "api-key-7781";

    fn config(storage: &str, service_bus: &str) -> Config {
        let vars: HashMap<String, String> = [
            ("AzureWebJobsStorage", storage),
            ("ServiceBusConnection", service_bus),
            ("SOC_QUEUE_NAME", "soc-settings"),
            ("DEVICE_API_BASE_URL", "http://127.0.0.1:1/api"),
            ("DEVICE_API_KEY", API_KEY),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Config::from_vars(&vars).unwrap()
    }

    #[test]
    fn emulator_connection_strings_build_all_three_adapters_without_network() {
        let sb = format!(
            "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey={SB_KEY};UseDevelopmentEmulator=true"
        );
        // Port 1 on loopback: nothing listens, and nothing must be contacted.
        build(&config("UseDevelopmentStorage=true", &sb)).unwrap();
    }

    #[test]
    fn the_notifier_is_built_only_when_a_topic_is_configured() {
        let sb = format!(
            "Endpoint=sb://127.0.0.1:1;SharedAccessKeyName=k;SharedAccessKey={SB_KEY};UseDevelopmentEmulator=true"
        );
        let mut c = config("UseDevelopmentStorage=true", &sb);
        assert!(build(&c).unwrap().notifier.is_none());
        c.notify = Some(crate::config::NotifyConfig {
            endpoint: url::Url::parse("http://127.0.0.1:1/api/events").unwrap(),
            access: NotifyAccess::Key(crate::secret::SecretString::new("topic-key")),
            source: crate::config::LOCAL_EVENT_SOURCE.into(),
        });
        assert!(build(&c).unwrap().notifier.is_some());
        c.notify.as_mut().unwrap().access =
            NotifyAccess::Key(crate::secret::SecretString::new("bad key 77"));
        let err = build(&c).err().expect("a bad key fails the build");
        assert!(err.to_string().contains("SOC_NOTIFY_TOPIC_KEY"), "{err}");
        assert!(!err.to_string().contains("bad key 77"), "{err}");
    }

    #[test]
    fn malformed_connection_strings_are_all_reported_without_secrets() {
        let err = build(&config(
            "AccountName=x;AccountKey=!!notbase64!!",
            &format!("Endpoint=sb://elsewhere.example.com/;SharedAccessKeyName=k;SharedAccessKey={SB_KEY}"),
        ))
        .err()
        .expect("must fail");
        assert_eq!(err.0.len(), 2, "{err}");
        let text = err.to_string();
        assert!(text.contains("ServiceBusConnection"), "{text}");
        assert!(text.contains("AccountKey"), "{text}");
        assert!(
            !text.contains(SB_KEY) && !text.contains("!!notbase64!!") && !text.contains(API_KEY)
        );
    }

    #[test]
    fn debug_output_of_the_built_clients_hides_every_key() {
        let sb = ServiceBusConnection::parse(&format!(
            "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey={SB_KEY}"
        ))
        .unwrap();
        let queue = ServiceBusQueue::new(&sb, "q", None).unwrap();
        assert!(!format!("{queue:?}").contains(SB_KEY));
        // The SDK stores the key base64-encoded once more; that must not show either.
        assert!(!format!("{queue:?}").contains(&azure_core::base64::encode(SB_KEY)));

        let storage = StorageConnection::parse("UseDevelopmentStorage=true").unwrap();
        let ledger = TableLedger::new(&storage, "socsettings").unwrap();
        assert!(!format!("{ledger:?}").contains(connection_string::DEV_ACCOUNT_KEY));
    }
}
