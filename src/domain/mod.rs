//! Pure domain: types and decisions, no I/O and no clock reads (time is passed in).
//!
//! - [`input`]: parsing what the API receives (device ids, settings, idempotency keys).
//! - [`device_event`]: parsing the vendor's device connection events (CloudEvents).
//! - [`ledger`]: the per-device desired-state record and what may happen to it.
//! - [`history`]: what became of each of a device's recent requests.
//! - [`notification`]: the events a request's final transition publishes (the outbox).
//! - [`schedule`]: re-check back-off and expiry arithmetic.
//! - [`due_index`]: where the timer sweep finds the records that are due.
//! - [`sweep_state`]: the sweep's own lease and the reconciling pass's progress.

pub mod device_event;
pub mod due_index;
pub mod history;
pub mod input;
pub mod ledger;
pub mod notification;
pub mod schedule;
pub mod sweep_state;

pub use input::{
    DeviceId, IdempotencyKey, InputError, MinSoc, SettingRequest, IDEMPOTENCY_KEY_RETENTION,
};
pub use ledger::{DesiredState, HolderKind, LeaseHolder, RequestId, RequestStatus};
