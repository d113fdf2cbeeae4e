//! A local Service Bus stand-in: the REST "Send Message" endpoint (SAS- or bearer-authenticated,
//! `BrokerProperties`), a durable on-disk queue store, and peek-lock delivery with the broker's
//! settlement rules (complete, abandon, dead-letter at max delivery count or on TTL expiry,
//! scheduled messages, lock expiry, duplicate detection).
//!
//! The REST facts it relies on are listed in `devtools/README.md`. The parts, each with its
//! invariants in its module doc:
//!
//! - [`sas`]: connection strings, SAS tokens and their verification.
//! - [`auth`]: which `Authorization` a send may carry: SAS, or an Entra-style bearer token from
//!   the managed-identity stand-in when the broker is configured for it.
//! - [`message`]: the message model (send request, stored message, delivery) and date formats.
//! - `store`: the durable per-queue store (atomic file writes, sequence numbers).
//! - [`broker`]: sends, peek-lock delivery, settlement, dead-lettering, duplicate detection.
//! - `rest`: the HTTP front end (`POST /{queue}/messages`, `GET /_devhost/queues`).
//!
//! Everything public is re-exported here, so callers use `devtools::servicebus::X`.

pub mod auth;
pub mod broker;
pub mod message;
mod rest;
pub mod sas;
mod store;

pub use crate::server::ServerHandle;
pub use auth::{authorize, SERVICE_BUS_AUDIENCE};
pub use broker::{Broker, BrokerConfig, MessageView, QueueSnapshot};
pub use message::{
    format_http_date, json_send, never, parse_http_date, Delivery, MessageState, SendOutcome,
    SendRequest, SettleError, StoredMessage,
};
pub use sas::{sas_signature, sas_token, verify_sas, ConnectionString};
