//! [`SecretString`]: a secret (key, connection string) that cannot reach a log line
//! by accident.
//!
//! Invariant: `Debug` never shows the value; the only way to read it is
//! [`SecretString::expose`], called where the secret is handed to a client.

use std::fmt;

/// A secret value whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
