//! Invocation envelopes as the Functions host sends them (built with devhost's payload code),
//! so the handler is measured on the exact bytes it gets in production.

use chrono::Utc;
use devtools::devhost::payloads::{self, HttpIn};
use devtools::servicebus::{Delivery, StoredMessage};

use crate::QUEUE;

fn delivery_of(m: &StoredMessage) -> Delivery {
    let mut message = m.clone();
    message.delivery_count = message.delivery_count.max(1);
    Delivery {
        queue: QUEUE.into(),
        message,
        lock_token: uuid::Uuid::new_v4(),
        locked_until: Utc::now() + chrono::Duration::minutes(5),
    }
}

pub fn sb_envelope(m: &StoredMessage) -> Vec<u8> {
    payloads::servicebus_envelope(
        "SocQueueTrigger",
        "msg",
        Some("binary"),
        &delivery_of(m),
        "127.0.0.1",
        "bench",
        Utc::now(),
    )
    .to_value()
    .to_string()
    .into_bytes()
}

pub fn set_soc_envelope(device: &str, body: &[u8]) -> Vec<u8> {
    let r = HttpIn {
        method: "POST".into(),
        path: format!("/api/devices/{device}/soc"),
        query: None,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_vec(),
        has_length: true,
        params: vec![("deviceId".into(), device.into())],
        key_level: Some("Function".into()),
    };
    payloads::http_envelope("SetSocHttp", "req", &r, Utc::now())
        .to_value()
        .to_string()
        .into_bytes()
}
