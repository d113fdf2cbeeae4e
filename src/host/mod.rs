//! The Functions host <-> custom handler wire protocol.
