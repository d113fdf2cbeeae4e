//! The Functions host <-> custom handler wire protocol.
//!
//! Everything that knows what the host sends or expects lives here; the
//! function modules see typed values only.

pub mod envelope;
pub mod service_bus;

pub use envelope::{parse_host_datetime, unwrap_double_encoded, InvocationRequest, RetryContext};
pub use service_bus::{ServiceBusDelivery, SOC_QUEUE_TRIGGER_BINDING};

/// Why an invocation payload could not be read. Messages name the binding or
/// Metadata key, never a value (values may be customer data).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// The body is not `{"Data":{...},"Metadata":{...}}`.
    #[error("invalid invocation envelope: {0}")]
    InvalidEnvelope(String),
    /// `Data` has no entry for the binding the function.json declares.
    #[error("input binding {0:?} is missing from Data")]
    MissingBinding(String),
    #[error("input binding {binding:?} is invalid: {reason}")]
    InvalidBinding { binding: String, reason: String },
    #[error("metadata key {0:?} is missing")]
    MissingMetadata(String),
    #[error("metadata key {key:?} is invalid: {reason}")]
    InvalidMetadata { key: String, reason: String },
}
