//! Local development platform for the SoC settings service. **Not part of the product**: the
//! product (root crate `soc-settings`, `src/`) never depends on this crate, and this crate talks to
//! the product's `handler` binary only over HTTP, like the real Azure Functions host does.
//!
//! - [`devicesim`]: the vendor device cloud stand-in (device API + control API).
//! - [`servicebus`]: the Service Bus stand-in (REST send, durable store, peek-lock delivery).
//! - [`devhost`]: the Azure Functions host stand-in (spawns `handler`, HTTP/timer/Service Bus
//!   triggers) built on the two above.
//! - [`identity`]: the managed-identity endpoint stand-in (`IDENTITY_ENDPOINT`) and its tokens.
//! - [`server`]: serving a router with bounded graceful shutdown, and logging setup.

pub mod devhost;
pub mod devicesim;
pub mod identity;
pub mod server;
pub mod servicebus;
