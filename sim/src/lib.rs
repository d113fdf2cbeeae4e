//! A deterministic simulation of the whole service, to prove "latest wins, nothing
//! lost" under every interleaving the seeds reach (issue 8).
//!
//! - [`scenario`]: the world one seed generates (devices, clients, instances, timer)
//!   and the fault rates; scripted schedules are the same data written by hand.
//! - [`world`]: the simulated state and what the checker observes.
//! - [`ports`]: the product's ports, simulated (ledger with ETags, device cloud,
//!   Service Bus, skewed clocks), with latency, ambiguity and crash points.
//! - [`run`]: the driver: the real function code on a paused-time tokio runtime.
//! - [`check`]: THE properties S1-S11, in one place.
//!
//! A test tool only: the product never depends on this crate.

pub mod check;
pub mod ports;
pub mod run;
pub mod scenario;
pub mod world;

pub use check::Violation;
pub use run::{run, run_seed, Report};
pub use scenario::Scenario;
