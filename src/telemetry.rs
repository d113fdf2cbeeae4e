//! Logging: `tracing` to **stdout**. The host logs each stdout line at
//! Information and each stderr line as an Error (§1.4), so nothing goes to stderr.
//! No ANSI colours: the lines end up in Application Insights.

pub fn init() {
    let filter = tracing_subscriber::EnvFilter::new("info,hyper=warn,reqwest=warn,azure_core=warn,azure_data_tables=warn,azure_storage=warn,azure_messaging_servicebus=warn");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
