//! Authorization of a REST send, as Service Bus does it: a SAS token for the entity
//! (`SharedAccessSignature …`, [`super::sas::verify_sas`]) or an Entra ID access token
//! (`Bearer …`) for the audience `https://servicebus.azure.net`.
//!
//! Invariants: a bearer token is accepted only when the broker has a `bearer_key` (the
//! managed-identity stand-in's signing key) and the token verifies against it (signature,
//! issuer, audience, lifetime: [`crate::identity::verify_token`]); anything else is refused.
//! Role checks (Data Sender/Owner) are not modelled: a valid token may send.

use super::broker::BrokerConfig;
use super::sas::verify_sas;
use crate::identity::verify_token;

/// The audience of Service Bus data-plane tokens.
pub const SERVICE_BUS_AUDIENCE: &str = "https://servicebus.azure.net";

/// Checks the `Authorization` header of a send to `entity_path` (`{queue}/messages`).
pub fn authorize(
    header: &str,
    config: &BrokerConfig,
    now_unix: i64,
    entity_path: &str,
) -> Result<(), String> {
    match header.strip_prefix("Bearer ") {
        Some(token) => {
            let key = config
                .bearer_key
                .as_deref()
                .ok_or("bearer tokens are not accepted here (no identity configured)")?;
            verify_token(token, key, &[SERVICE_BUS_AUDIENCE], now_unix).map(|_| ())
        }
        None => verify_sas(header, &config.key_name, &config.key, now_unix, entity_path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::mint;

    const KEY: &[u8] = b"identity-key";

    fn config(bearer: bool) -> BrokerConfig {
        let mut c = BrokerConfig::new("/nonexistent", "RootManageSharedAccessKey", "sas-key");
        c.bearer_key = bearer.then(|| KEY.to_vec());
        c
    }

    #[test]
    fn a_service_bus_token_from_the_identity_is_accepted_when_configured() {
        let token = format!(
            "Bearer {}",
            mint(KEY, "https://servicebus.azure.net/", 100, 4000)
        );
        assert_eq!(authorize(&token, &config(true), 200, "q/messages"), Ok(()));
        assert!(authorize(&token, &config(false), 200, "q/messages")
            .unwrap_err()
            .contains("not accepted"));
    }

    #[test]
    fn a_storage_token_an_expired_one_or_a_foreign_one_is_refused() {
        let cfg = config(true);
        let storage = format!(
            "Bearer {}",
            mint(KEY, "https://storage.azure.com/", 100, 4000)
        );
        assert!(authorize(&storage, &cfg, 200, "q/messages").is_err());
        let expired = format!("Bearer {}", mint(KEY, SERVICE_BUS_AUDIENCE, 100, 150));
        assert_eq!(
            authorize(&expired, &cfg, 200, "q/messages"),
            Err("token expired".into())
        );
        let foreign = format!("Bearer {}", mint(b"other", SERVICE_BUS_AUDIENCE, 100, 4000));
        assert_eq!(
            authorize(&foreign, &cfg, 200, "q/messages"),
            Err("invalid signature".into())
        );
    }

    #[test]
    fn sas_tokens_are_still_verified_as_before() {
        let cfg = config(true);
        let sas = super::super::sas::sas_token(
            "http://127.0.0.1/q",
            "RootManageSharedAccessKey",
            "sas-key",
            500,
        );
        assert_eq!(authorize(&sas, &cfg, 200, "q/messages"), Ok(()));
        let wrong = super::super::sas::sas_token(
            "http://127.0.0.1/q",
            "RootManageSharedAccessKey",
            "other",
            500,
        );
        assert!(authorize(&wrong, &cfg, 200, "q/messages").is_err());
    }
}
