//! Parsing Azure connection strings (`Key=Value;Key=Value`).
//!
//! Error messages name the offending *key*, never a value: a connection string
//! carries a secret, and a parse error may end up in a log line.

use std::collections::HashMap;

pub use crate::secret::SecretString;

/// Why a connection string was refused. Never contains a value from the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct ConnectionStringError {
    /// The app setting the string came from (for the operator).
    pub setting: &'static str,
    pub reason: String,
}

impl ConnectionStringError {
    fn new(setting: &'static str, reason: impl Into<String>) -> Self {
        Self {
            setting,
            reason: reason.into(),
        }
    }
}

/// Splits `A=1;B=2` into a map with case-insensitive keys. Values keep any `=`
/// after the first one (base64 keys end with `=`).
fn pairs(
    setting: &'static str,
    raw: &str,
) -> Result<HashMap<String, String>, ConnectionStringError> {
    let mut out = HashMap::new();
    for (index, part) in raw.split(';').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            return Err(ConnectionStringError::new(
                setting,
                format!("segment {} is not Key=Value", index + 1),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(ConnectionStringError::new(
                setting,
                format!("segment {} has an empty key", index + 1),
            ));
        }
        out.insert(key.to_ascii_lowercase(), value.trim().to_string());
    }
    if out.is_empty() {
        return Err(ConnectionStringError::new(
            setting,
            "connection string is empty",
        ));
    }
    Ok(out)
}

fn required<'a>(
    setting: &'static str,
    map: &'a HashMap<String, String>,
    key: &str,
) -> Result<&'a str, ConnectionStringError> {
    match map.get(&key.to_ascii_lowercase()) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(ConnectionStringError::new(
            setting,
            format!("{key} is missing"),
        )),
    }
}

fn flag(
    setting: &'static str,
    map: &HashMap<String, String>,
    key: &str,
) -> Result<bool, ConnectionStringError> {
    match map.get(&key.to_ascii_lowercase()).map(String::as_str) {
        None => Ok(false),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(_) => Err(ConnectionStringError::new(
            setting,
            format!("{key} must be true or false"),
        )),
    }
}

// ---------------------------------------------------------------- Service Bus

/// A parsed `ServiceBusConnection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBusConnection {
    /// First label of the host (`ns` in `ns.servicebus.windows.net`); what the SDK builds its URL from.
    pub namespace: String,
    /// `Some(base)` (`http://host:port`) when `UseDevelopmentEmulator=true`: requests go there instead.
    pub emulator_base: Option<url::Url>,
    pub key_name: String,
    pub key: SecretString,
}

const SB_SETTING: &str = "ServiceBusConnection";
const SB_HOST_SUFFIX: &str = ".servicebus.windows.net";

impl ServiceBusConnection {
    pub fn parse(raw: &str) -> Result<Self, ConnectionStringError> {
        let map = pairs(SB_SETTING, raw)?;
        let endpoint = required(SB_SETTING, &map, "Endpoint")?;
        let endpoint = url::Url::parse(endpoint).map_err(|_| {
            ConnectionStringError::new(SB_SETTING, "Endpoint is not a URL (sb://<host>/)")
        })?;
        let host = endpoint
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConnectionStringError::new(SB_SETTING, "Endpoint has no host"))?
            .to_ascii_lowercase();
        let key_name = required(SB_SETTING, &map, "SharedAccessKeyName")?.to_string();
        let key = SecretString::new(required(SB_SETTING, &map, "SharedAccessKey")?);
        let emulator = flag(SB_SETTING, &map, "UseDevelopmentEmulator")?;

        let (namespace, emulator_base) = if emulator {
            // The official emulator's convention: plain HTTP to the Endpoint's host and port.
            let port = endpoint.port().unwrap_or(80);
            let base = url::Url::parse(&format!("http://{host}:{port}"))
                .map_err(|_| ConnectionStringError::new(SB_SETTING, "Endpoint host is invalid"))?;
            let namespace = host.split('.').next().unwrap_or("emulator").to_string();
            (namespace, Some(base))
        } else {
            let Some(namespace) = host.strip_suffix(SB_HOST_SUFFIX) else {
                return Err(ConnectionStringError::new(
                    SB_SETTING,
                    format!(
                        "Endpoint host must end with {SB_HOST_SUFFIX} (or set UseDevelopmentEmulator=true)"
                    ),
                ));
            };
            if namespace.is_empty() || namespace.contains('.') {
                return Err(ConnectionStringError::new(
                    SB_SETTING,
                    "Endpoint host must be <namespace>.servicebus.windows.net",
                ));
            }
            (namespace.to_string(), None)
        };
        Ok(Self {
            namespace,
            emulator_base,
            key_name,
            key,
        })
    }
}

// ---------------------------------------------------------------- Storage

/// The well-known development storage account (Azurite and the old emulator).
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
/// Its publicly documented key (not a secret).
pub const DEV_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A parsed storage connection string, reduced to what the Table client needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConnection {
    pub account: String,
    /// Base64 account key.
    pub key: SecretString,
    /// Table service base URL, e.g. `https://acct.table.core.windows.net` or
    /// `http://127.0.0.1:10002/devstoreaccount1`.
    pub table_endpoint: url::Url,
}

const ST_SETTING: &str = "AzureWebJobsStorage/SOC_STATE_STORAGE";

impl StorageConnection {
    pub fn parse(raw: &str) -> Result<Self, ConnectionStringError> {
        let map = pairs(ST_SETTING, raw)?;
        if flag(ST_SETTING, &map, "UseDevelopmentStorage")? {
            let endpoint = match map.get("developmentstorageproxyuri") {
                Some(proxy) => {
                    let proxy = url::Url::parse(proxy).map_err(|_| {
                        ConnectionStringError::new(
                            ST_SETTING,
                            "DevelopmentStorageProxyUri is not a URL",
                        )
                    })?;
                    let host = proxy.host_str().unwrap_or("127.0.0.1");
                    format!("{}://{host}:10002/{DEV_ACCOUNT}", proxy.scheme())
                }
                None => format!("http://127.0.0.1:10002/{DEV_ACCOUNT}"),
            };
            return Ok(Self {
                account: DEV_ACCOUNT.into(),
                key: SecretString::new(DEV_ACCOUNT_KEY),
                table_endpoint: url::Url::parse(&endpoint).expect("well-formed constant URL"),
            });
        }
        if map.contains_key("sharedaccesssignature") && !map.contains_key("accountkey") {
            return Err(ConnectionStringError::new(
                ST_SETTING,
                "SAS connection strings are not supported; use AccountName and AccountKey",
            ));
        }
        let account = required(ST_SETTING, &map, "AccountName")?.to_string();
        let key = required(ST_SETTING, &map, "AccountKey")?;
        if azure_core::base64::decode(key).is_err() {
            return Err(ConnectionStringError::new(
                ST_SETTING,
                "AccountKey is not base64",
            ));
        }
        let table_endpoint = match map.get("tableendpoint") {
            Some(endpoint) => {
                let url = url::Url::parse(endpoint).map_err(|_| {
                    ConnectionStringError::new(ST_SETTING, "TableEndpoint is not an absolute URL")
                })?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(ConnectionStringError::new(
                        ST_SETTING,
                        "TableEndpoint must be an http(s) URL",
                    ));
                }
                url
            }
            None => {
                let protocol = map
                    .get("defaultendpointsprotocol")
                    .map(String::as_str)
                    .unwrap_or("https");
                if !matches!(protocol, "http" | "https") {
                    return Err(ConnectionStringError::new(
                        ST_SETTING,
                        "DefaultEndpointsProtocol must be http or https",
                    ));
                }
                let suffix = map
                    .get("endpointsuffix")
                    .map(String::as_str)
                    .unwrap_or("core.windows.net");
                url::Url::parse(&format!("{protocol}://{account}.table.{suffix}")).map_err(
                    |_| {
                        ConnectionStringError::new(
                            ST_SETTING,
                            "AccountName/EndpointSuffix do not form a URL",
                        )
                    },
                )?
            }
        };
        Ok(Self {
            account,
            key: SecretString::new(key),
            table_endpoint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SB_KEY: &str = "c2VjcmV0LWtleS12YWx1ZQ==";

    #[test]
    fn service_bus_connection_string_yields_namespace_and_key() {
        let c = ServiceBusConnection::parse(&format!(
            "Endpoint=sb://contoso-ns.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={SB_KEY}"
        ))
        .unwrap();
        assert_eq!(c.namespace, "contoso-ns");
        assert_eq!(c.key_name, "send");
        assert_eq!(c.key.expose(), SB_KEY);
        assert!(c.emulator_base.is_none());
    }

    #[test]
    fn emulator_flag_redirects_to_the_endpoint_host_and_port_over_http() {
        let c = ServiceBusConnection::parse(
            "Endpoint=sb://127.0.0.1:5300;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        )
        .unwrap();
        assert_eq!(c.emulator_base.unwrap().as_str(), "http://127.0.0.1:5300/");
        let c = ServiceBusConnection::parse(
            "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=TRUE",
        )
        .unwrap();
        assert_eq!(c.emulator_base.unwrap().as_str(), "http://localhost/");
    }

    #[test]
    fn service_bus_errors_name_the_key_but_never_the_secret() {
        let cases = [
            format!("SharedAccessKeyName=a;SharedAccessKey={SB_KEY}"),
            format!("Endpoint=sb://x.example.com/;SharedAccessKeyName=a;SharedAccessKey={SB_KEY}"),
            "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a".to_string(),
            format!("Endpoint=sb://x.servicebus.windows.net/;{SB_KEY}"),
            format!("Endpoint=not a url;SharedAccessKeyName=a;SharedAccessKey={SB_KEY}"),
            format!("Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey={SB_KEY};UseDevelopmentEmulator=yes"),
            String::new(),
        ];
        for raw in cases {
            let err = ServiceBusConnection::parse(&raw).unwrap_err().to_string();
            assert!(err.starts_with("ServiceBusConnection: "), "{err}");
            assert!(!err.contains(SB_KEY), "{err}");
            assert!(!err.contains("c2VjcmV0"), "{err}");
        }
    }

    #[test]
    fn development_storage_means_azurite_on_the_default_port() {
        let c = StorageConnection::parse("UseDevelopmentStorage=true").unwrap();
        assert_eq!(c.account, DEV_ACCOUNT);
        assert_eq!(
            c.table_endpoint.as_str(),
            "http://127.0.0.1:10002/devstoreaccount1"
        );
    }

    #[test]
    fn explicit_table_endpoint_is_used_as_is() {
        let c = StorageConnection::parse(&format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={DEV_ACCOUNT_KEY};TableEndpoint=http://127.0.0.1:41234/devstoreaccount1;"
        ))
        .unwrap();
        assert_eq!(
            c.table_endpoint.as_str(),
            "http://127.0.0.1:41234/devstoreaccount1"
        );
        assert_eq!(c.key.expose(), DEV_ACCOUNT_KEY);
    }

    #[test]
    fn standard_storage_string_builds_the_public_table_host() {
        let c = StorageConnection::parse(
            "DefaultEndpointsProtocol=https;AccountName=socstate;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )
        .unwrap();
        assert_eq!(
            c.table_endpoint.as_str(),
            "https://socstate.table.core.windows.net/"
        );
        let c = StorageConnection::parse("AccountName=socstate;AccountKey=a2V5").unwrap();
        assert_eq!(
            c.table_endpoint.as_str(),
            "https://socstate.table.core.windows.net/"
        );
    }

    #[test]
    fn storage_errors_never_echo_the_account_key() {
        let key = "c3VwZXItc2VjcmV0LXN0b3JhZ2Uta2V5";
        let cases = [
            format!("AccountKey={key}"),
            "AccountName=a;AccountKey=%%%not-base64%%%".to_string(),
            format!("AccountName=a;AccountKey={key};DefaultEndpointsProtocol=ftp"),
            format!("AccountName=a;AccountKey={key};TableEndpoint=nope"),
            format!("AccountName=a;{key}"),
            "UseDevelopmentStorage=maybe".to_string(),
        ];
        for raw in cases {
            let err = StorageConnection::parse(&raw).unwrap_err().to_string();
            assert!(!err.contains(key), "{err}");
            assert!(!err.contains("%%%"), "{err}");
        }
    }

    #[test]
    fn debug_output_of_parsed_connections_hides_keys() {
        let c = StorageConnection::parse("UseDevelopmentStorage=true").unwrap();
        assert!(!format!("{c:?}").contains(DEV_ACCOUNT_KEY));
        let s = ServiceBusConnection::parse(&format!(
            "Endpoint=sb://n.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey={SB_KEY}"
        ))
        .unwrap();
        assert!(!format!("{s:?}").contains(SB_KEY));
    }
}
