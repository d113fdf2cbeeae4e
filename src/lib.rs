//! The SoC settings service: an Azure Functions custom handler.
//!
//! Customers set their battery's minimum state of charge (`minSoc = 100 - dod`).
//! The Functions host starts the `handler` binary and calls it over HTTP on
//! `127.0.0.1:$FUNCTIONS_CUSTOMHANDLER_PORT`; this crate is everything behind that port.
//!
//! Layout, outside in:
//! - [`host`]: the host <-> handler wire protocol (envelopes, double-encoded values,
//!   2xx-with-JSON responses). Nothing else knows about it.
//! - [`functions`]: one module per function folder (`SetSocHttp`, `SocQueueTrigger`,
//!   `DrainSocTimer`) plus [`functions::apply`], the "apply the current desired value"
//!   procedure all three share.
//! - [`domain`]: pure types and decisions: parsing, the ledger record, back-off.
//! - [`ports`]: traits for the device API, the settings queue, the ledger and the clock.
//! - [`adapters`]: reqwest device client, Service Bus REST sender, Table Storage ledger.
//! - [`config`]: typed app settings, and the one list of settings the infra must set.
//! - [`secret`]: [`secret::SecretString`], how every secret is held.
//! - [`app`]: wiring: builds the router from config, lazily connecting clients.
//!
//! `§` numbers in comments (`§1.3`, `§5.5`) are sections of
//! `docs/custom-handler-protocol.md`, the host <-> handler protocol notes.

pub mod adapters;
pub mod app;
pub mod config;
pub mod domain;
pub mod functions;
pub mod host;
pub mod ports;
pub mod secret;
pub mod telemetry;
