//! Implementations of [`crate::ports`] for Azure and the vendor's device cloud.
