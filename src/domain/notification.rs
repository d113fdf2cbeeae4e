//! Notifications: every final transition of a request (applied, superseded, expired,
//! failed, cancelled) is told to the app as a CloudEvent 1.0 on an Event Grid topic
//! (`docs/events.md`).
//!
//! A [`Notification`] is made by the writer of the transition and stored in the
//! device's **outbox**, in the same atomic write as the transition itself
//! ([`crate::ports::Ledger::put`], [`crate::ports::Ledger::accept`]): it exists exactly
//! when the transition happened. A dispatcher publishes a device's outbox in
//! [`Notification::seq`] order and removes what the topic accepted
//! (`functions::notify`), so delivery is at least once, in transition order per
//! device, and a re-publish carries the same [`Notification::id`].

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::history::ShownStatus;
use super::input::DeviceId;
use super::ledger::RequestId;

/// Prefix of every event type this service publishes.
pub const TYPE_PREFIX: &str = "com.socsettings.";

/// One event waiting in (or read from) a device's outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub device_id: DeviceId,
    /// The device's transition counter when it was written: events of a device are
    /// published in this order. Unique per device.
    pub seq: u64,
    /// CloudEvents `id`: derived from what happened (the request and its final status),
    /// so a repeat of the same transition carries the same id.
    pub id: String,
    /// CloudEvents `type`, e.g. `com.socsettings.request.applied`.
    pub event_type: String,
    /// CloudEvents `subject`, e.g. `devices/{deviceId}/soc/requests/{requestId}`.
    pub subject: String,
    /// When the transition happened (the writer's clock).
    pub time: DateTime<Utc>,
    /// CloudEvents `data`: JSON text (for a request, as `GET …/requests/{id}` shows it).
    pub data: String,
}

impl Notification {
    /// The event of `request` on `device` reaching `status` (final) at `time`, with
    /// `data` its representation.
    pub fn request_settled(
        device: &DeviceId,
        request: &RequestId,
        status: ShownStatus,
        seq: u64,
        time: DateTime<Utc>,
        data: &Value,
    ) -> Self {
        Self {
            device_id: device.clone(),
            seq,
            id: format!("{}.{}", request.as_str(), status.as_str()),
            event_type: format!("{TYPE_PREFIX}request.{}", status.as_str()),
            subject: format!(
                "devices/{}/soc/requests/{}",
                device.as_str(),
                request.as_str()
            ),
            time,
            data: data.to_string(),
        }
    }

    /// The event of `device`'s battery reporting another value than its applied
    /// request's (drift), seen at `time`, with `data` the device's latest request as
    /// `GET …/soc` shows it (with `reportedMinSoc`, `driftDetectedAt`).
    pub fn device_drifted(device: &DeviceId, seq: u64, time: DateTime<Utc>, data: &Value) -> Self {
        Self {
            device_id: device.clone(),
            seq,
            id: format!("{}.drifted.{seq}", device.as_str()),
            event_type: format!("{TYPE_PREFIX}device.drifted"),
            subject: format!("devices/{}/soc", device.as_str()),
            time,
            data: data.to_string(),
        }
    }

    /// The structured CloudEvent 1.0 published for it, with `source` the app.
    pub fn cloud_event(&self, source: &str) -> Value {
        let data = serde_json::from_str::<Value>(&self.data).unwrap_or(Value::Null);
        json!({
            "specversion": "1.0",
            "id": self.id,
            "source": source,
            "type": self.event_type,
            "subject": self.subject,
            "time": self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            "datacontenttype": "application/json",
            // The CloudEvents `sequence` extension: the device's transition number, zero
            // padded so it also orders as a string. Event Grid may deliver out of order;
            // a subscriber orders a device's events (per `subject` prefix) by it.
            "sequence": format!("{:020}", self.seq),
            "data": data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_settled_request_is_named_by_its_request_and_status_and_renders_as_a_cloud_event() {
        let device = DeviceId::parse("bat-1").unwrap();
        let request = RequestId::from_stored("0123456789abcdef0123456789abcdef");
        let at = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap();
        let n = Notification::request_settled(
            &device,
            &request,
            ShownStatus::Applied,
            3,
            at,
            &json!({"requestId": request.as_str(), "status": "applied"}),
        );
        assert_eq!(n.id, "0123456789abcdef0123456789abcdef.applied");
        let event = n.cloud_event("/soc-settings");
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["type"], "com.socsettings.request.applied");
        assert_eq!(
            event["subject"],
            "devices/bat-1/soc/requests/0123456789abcdef0123456789abcdef"
        );
        assert_eq!(event["time"], "2026-12-06T10:00:00.000Z");
        assert_eq!(event["data"]["status"], "applied");
        assert_eq!(event["source"], "/soc-settings");
        assert_eq!(event["sequence"], "00000000000000000003");
    }
}
