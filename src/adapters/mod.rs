//! Implementations of [`crate::ports`] for Azure and the vendor's device cloud.
//!
//! - [`device_api`]: `reqwest` client for the device cloud (`docs/device-api.md`).
//! - [`service_bus`]: the settings queue, sent with `azure_messaging_servicebus`.
//! - [`table_ledger`]: the desired-state ledger in Azure Table Storage.
//! - [`connection_string`]: Service Bus and Storage connection strings, parsed without
//!   ever echoing a secret.

pub mod connection_string;
pub mod device_api;
pub mod service_bus;

pub use device_api::HttpDeviceApi;
pub use service_bus::ServiceBusQueue;
