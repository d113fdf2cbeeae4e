//! Timer trigger (protocol §4): `Data.<timer>` is the host's `TimerInfo`.

use chrono::{DateTime, Datelike, Utc};

use super::envelope::{
    is_null, parse_host_datetime, primitive_text, unwrap_double_encoded, InvocationRequest,
    Members, Shallow,
};
use super::HostError;

/// Trigger binding name of `DrainSocTimer/function.json`.
pub const DRAIN_SOC_TIMER_BINDING: &str = "timer";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerInfo {
    /// The run is late (the host was down or busy when it was due).
    pub is_past_due: bool,
    /// `None` when no schedule monitor is used (`useMonitor: false`, schedules
    /// firing more than once a minute, or no monitor registered).
    pub schedule_status: Option<ScheduleStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleStatus {
    /// Previous run; `None` before the first recorded run (the host writes
    /// .NET's `DateTime.MinValue`, `0001-01-01T00:00:00+00:00`).
    pub last: Option<DateTime<Utc>>,
    pub next: DateTime<Utc>,
    pub last_updated: DateTime<Utc>,
}

impl TimerInfo {
    /// Reads `Data.<binding>` (ours: [`DRAIN_SOC_TIMER_BINDING`]). Any
    /// `Metadata.RetryContext` is left to [`InvocationRequest::retry_context`].
    pub fn from_invocation(inv: &InvocationRequest<'_>, binding: &str) -> Result<Self, HostError> {
        let invalid = |reason: &str| HostError::InvalidBinding {
            binding: binding.to_string(),
            reason: reason.to_string(),
        };
        // Tolerate a TimerInfo that arrives as JSON text (string-typed input).
        let (text, parsed);
        let map = match inv.data(binding) {
            None => return Err(HostError::MissingBinding(binding.to_string())),
            Some(Shallow::Object(map)) => map,
            Some(Shallow::String(s)) => {
                text = unwrap_double_encoded(s);
                parsed = Members::parse(&text).ok().flatten();
                parsed
                    .as_ref()
                    .ok_or_else(|| invalid("not a TimerInfo object"))?
            }
            Some(_) => return Err(invalid("not a TimerInfo object")),
        };
        let is_past_due = match map.get("IsPastDue") {
            None => false,
            Some(v) if is_null(v) => false,
            Some(v) => match primitive_text(v)
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("true") => true,
                Some("false") => false,
                _ => return Err(invalid("IsPastDue is not a boolean")),
            },
        };
        let schedule_status = match map.get("ScheduleStatus").map(Members::of) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(status))) => {
                let date = |key: &str| -> Result<DateTime<Utc>, HostError> {
                    status
                        .get(key)
                        .and_then(primitive_text)
                        .and_then(|t| parse_host_datetime(&t))
                        .ok_or_else(|| invalid(&format!("ScheduleStatus.{key} is not a date")))
                };
                let last = date("Last")?;
                Some(ScheduleStatus {
                    last: (last.year() > 1).then_some(last),
                    next: date("Next")?,
                    last_updated: date("LastUpdated")?,
                })
            }
            Some(Err(_)) => return Err(invalid("ScheduleStatus is not an object")),
        };
        Ok(Self {
            is_past_due,
            schedule_status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn timer(value: Value) -> Result<TimerInfo, HostError> {
        let body = json!({"Data": {"timer": value}}).to_string();
        let inv = InvocationRequest::from_slice(body.as_bytes()).unwrap();
        TimerInfo::from_invocation(&inv, "timer")
    }

    #[test]
    fn a_first_run_has_no_last_time() {
        let t = timer(json!({
            "Schedule": {"AdjustForDST": true},
            "ScheduleStatus": {
                "Last": "0001-01-01T00:00:00+00:00",
                "Next": "2026-08-07T03:55:00+00:00",
                "LastUpdated": "2026-08-07T03:51:56.5094963+00:00"
            },
            "IsPastDue": true
        }))
        .unwrap();
        assert!(t.is_past_due);
        let s = t.schedule_status.unwrap();
        assert_eq!(s.last, None);
        assert_eq!(s.next.to_rfc3339(), "2026-08-07T03:55:00+00:00");
    }

    #[test]
    fn offset_less_status_times_are_read_as_utc() {
        let t = timer(json!({"ScheduleStatus": {
            "Last": "2025-03-03T02:00:00.0061817",
            "Next": "2025-03-04T02:00:00",
            "LastUpdated": "2025-03-03T02:00:00"
        }, "IsPastDue": false}))
        .unwrap();
        let s = t.schedule_status.unwrap();
        assert_eq!(s.next.to_rfc3339(), "2025-03-04T02:00:00+00:00");
        assert!(s.last.is_some());
    }

    #[test]
    fn a_timer_info_sent_as_json_text_is_accepted() {
        let t = timer(json!("{\"ScheduleStatus\":null,\"IsPastDue\":\"True\"}")).unwrap();
        assert!(t.is_past_due);
        assert_eq!(t.schedule_status, None);
    }

    #[test]
    fn broken_timer_infos_are_typed_errors() {
        assert!(timer(json!(5)).is_err());
        assert!(timer(json!({"IsPastDue": "maybe"})).is_err());
        assert!(timer(json!({"ScheduleStatus": {"Last": "x", "Next": "y"}})).is_err());
        assert!(timer(json!({"ScheduleStatus": []})).is_err());
        let inv = InvocationRequest::default();
        assert!(matches!(
            TimerInfo::from_invocation(&inv, "timer"),
            Err(HostError::MissingBinding(_))
        ));
    }
}
