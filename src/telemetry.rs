//! Logging: `tracing` to **stdout**. The host logs each stdout line at
//! Information and each stderr line as an Error (§1.4), so nothing goes to stderr.
//! No ANSI colours: the lines end up in Application Insights.
//!
//! Verbosity: the app setting `RUST_LOG` (tracing `EnvFilter` syntax, e.g. `debug` or
//! `info,soc_settings=debug`) replaces the default filter [`DEFAULT_FILTER`]; changing it
//! restarts the app, no rebuild. An invalid value falls back to the default and says so.
//!
//! Invariant: the Azure SDK crates never log below `warn`, whatever `RUST_LOG` says.
//! azure_core 0.21 logs every request at `debug` with `{request:#?}`, and its `Headers`
//! `Debug` prints the `Authorization` value in clear (it redacts every *other* header), so a
//! `debug` filter on them would write SAS signatures and bearer tokens into the logs. The
//! SDK crates left are the Service Bus sender's; the Table ledger's own client
//! (`adapters::table_rest`) logs no request, and marks its `Authorization` header
//! sensitive (`reqwest`/`hyper` then never print it).

use tracing_subscriber::filter::{Directive, EnvFilter};

/// The filter when `RUST_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "info,hyper=warn,reqwest=warn";

/// Crates capped at `warn` in every filter (see the module doc).
pub const SDK_CRATES: [&str; 3] = ["azure_core", "azure_identity", "azure_messaging_servicebus"];

/// The filter for a `RUST_LOG` value, and a warning when the value was refused.
pub fn filter(rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let requested = rust_log.map(str::trim).filter(|v| !v.is_empty());
    let (base, warning) = match requested {
        None => (EnvFilter::new(DEFAULT_FILTER), None),
        Some(value) => match EnvFilter::try_new(value) {
            Ok(filter) => (filter, None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                Some(format!(
                    "RUST_LOG is not a valid log filter ({e}); using {DEFAULT_FILTER:?}"
                )),
            ),
        },
    };
    let capped = SDK_CRATES.iter().fold(base, |filter, krate| {
        let directive: Directive = format!("{krate}=warn").parse().expect("constant directive");
        filter.add_directive(directive)
    });
    (capped, warning)
}

pub fn init() {
    let (filter, warning) = filter(std::env::var("RUST_LOG").ok().as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .with_target(false)
        .try_init();
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
}

/// Test support: what `f` logs, formatted as the handler formats it, under `rust_log`.
#[cfg(test)]
pub(crate) fn capture_logs(rust_log: Option<&str>, f: impl FnOnce()) -> String {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    let out = Captured::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter(rust_log).0)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_target(false)
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = out.0.lock().unwrap().clone();
    String::from_utf8(bytes).expect("log lines are UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reaches the log under `rust_log` when the handler and the SDK each log at
    /// debug and info.
    fn logged(rust_log: Option<&str>) -> String {
        capture_logs(rust_log, || {
            tracing::debug!(target: "soc_settings::functions", "handler-debug");
            tracing::info!(target: "soc_settings::functions", "handler-info");
            tracing::debug!(target: "azure_core::policies::transport", "Authorization: Bearer sdk-debug");
            tracing::warn!(target: "azure_core::policies::transport", "sdk-warn");
        })
    }

    #[test]
    fn the_default_filter_logs_info_and_not_debug() {
        let text = logged(None);
        assert!(
            text.contains("handler-info") && !text.contains("handler-debug"),
            "{text}"
        );
        let blank = logged(Some("  "));
        assert!(
            blank.contains("handler-info") && !blank.contains("handler-debug"),
            "{blank}"
        );
    }

    #[test]
    fn rust_log_raises_verbosity_without_a_rebuild() {
        let text = logged(Some("debug"));
        assert!(text.contains("handler-debug"), "{text}");
        let text = logged(Some("warn,soc_settings=debug"));
        assert!(
            text.contains("handler-debug") && text.contains("sdk-warn"),
            "{text}"
        );
    }

    #[test]
    fn the_sdk_never_logs_below_warn_so_authorization_headers_stay_out_of_the_logs() {
        for rust_log in [
            "debug",
            "trace",
            "azure_core=trace",
            "debug,azure_core=debug",
        ] {
            let text = logged(Some(rust_log));
            assert!(!text.contains("sdk-debug"), "{rust_log}: {text}");
            assert!(text.contains("sdk-warn"), "{rust_log}: {text}");
        }
    }

    #[test]
    fn an_invalid_rust_log_falls_back_to_the_default_with_a_warning() {
        let (_, warning) = filter(Some("soc_settings=loud"));
        assert!(warning
            .unwrap()
            .contains("RUST_LOG is not a valid log filter"));
        let text = logged(Some("soc_settings=loud"));
        assert!(
            text.contains("handler-info") && !text.contains("handler-debug"),
            "{text}"
        );
    }
}
