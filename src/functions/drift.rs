//! Applied means the battery reports it (issue 21 item 3).
//!
//! `applied` says the device cloud answered 2xx to the PUT. Whether the battery holds the
//! value is only known from a status read showing it: right after the PUT
//! (`apply::confirmation_read`, the one extra read per applied request) and whenever the
//! battery reconnects while its latest request is settled ([`check_settled`], called by
//! `DeviceEventsHttp`). A read showing the applied value confirms the request
//! (`confirmedAt`). A read showing another value while nothing is pending is **drift**
//! (an installer tool, the local app or the vendor's optimiser changed it): recorded on
//! the record (`reportedMinSoc`, `driftDetectedAt`, shown by `GET …/soc`), published as
//! `com.socsettings.device.drifted` in the same write ([`crate::functions::notify`]),
//! and with `SOC_DRIFT_POLICY=reassert` answered by a new request for the applied value,
//! made through the normal `POST` path (its `Idempotency-Key` derived from the drift
//! event, so a repeated connection event does not make a second one).

use tracing::{info, warn};

use crate::domain::notification::Notification;
use crate::domain::{DesiredState, DeviceId, RequestId, RequestStatus};
use crate::ports::{StoreError, Versioned};

use super::set_soc_http::render::view;
use super::set_soc_http::{self, ApiRequest};
use super::{index, DriftPolicy, Services};

/// What a read of a settled device found.
#[derive(Debug, Clone, PartialEq)]
pub enum Checked {
    /// Its latest request is not applied (expired, failed, cancelled), or the read
    /// failed or showed no value: nothing to compare.
    Nothing,
    /// The battery reports the applied value (confirmed now, or before).
    Confirmed,
    /// The battery reports another value: drift, recorded (and published) now or before.
    Drift {
        reported: u8,
        /// Under `SOC_DRIFT_POLICY=reassert`, when this read recorded the drift: the
        /// request made to put the applied value back, as its `POST` answered it.
        reasserted: Option<Reasserted>,
    },
}

/// The request `SOC_DRIFT_POLICY=reassert` made, as its `POST` answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Reasserted {
    pub status: u16,
    pub request_id: Option<RequestId>,
}

/// Reads the status of a device whose latest request (`current`) is settled and records
/// what it shows (module docs). Conflicting writes are re-read; a record that is pending
/// by then is left to its apply.
pub async fn check_settled(
    svc: &Services,
    device: &DeviceId,
    mut current: Versioned<DesiredState>,
) -> Result<Checked, StoreError> {
    if current.value.status != RequestStatus::Applied {
        return Ok(Checked::Nothing);
    }
    let reported = match svc.device.status(device).await {
        Ok(status) => match status.min_soc {
            Some(v) => v,
            None => return Ok(Checked::Nothing),
        },
        Err(e) => {
            info!(device = %device, error = %e, "reconnected battery's status not read; applied value not checked");
            return Ok(Checked::Nothing);
        }
    };
    for _ in 0..3 {
        let mut record = current.value.clone();
        let now = svc.clock.now();
        let (changed, drifted) = record.observe_reported(reported, now);
        let outcome = if reported == record.min_soc.percent() {
            Checked::Confirmed
        } else {
            Checked::Drift {
                reported,
                reasserted: None,
            }
        };
        if !changed {
            return Ok(outcome);
        }
        let events = if drifted && svc.notifier.is_some() {
            record.last_event_seq += 1;
            vec![Notification::device_drifted(
                device,
                record.last_event_seq,
                now,
                &view(&record),
            )]
        } else {
            Vec::new()
        };
        match index::put_record_with(
            svc,
            &mut record,
            Some(&current.value),
            Some(&current.etag),
            events,
        )
        .await
        {
            Ok(_) if drifted => {
                warn!(device = %device, request_id = %record.request_id, applied = record.min_soc.percent(), reported, "drift: the battery reports another value than the one applied");
                let reasserted = match svc.policy.drift {
                    DriftPolicy::Report => None,
                    DriftPolicy::Reassert => Some(reassert(svc, device, &record).await),
                };
                return Ok(Checked::Drift {
                    reported,
                    reasserted,
                });
            }
            Ok(_) => return Ok(outcome),
            Err(StoreError::Conflict) => {
                current = match svc.ledger.get(device).await? {
                    Some(c) if c.value.status == RequestStatus::Applied => c,
                    _ => return Ok(Checked::Nothing),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Checked::Nothing)
}

/// A new request for `record`'s (applied) value, through the normal `POST` path. Its
/// `Idempotency-Key` names the drift it answers (the applied request and when the drift
/// was recorded), so it is made once per drift.
async fn reassert(svc: &Services, device: &DeviceId, record: &DesiredState) -> Reasserted {
    let seen = record
        .drift_detected_at
        .map_or(0, |at| at.timestamp_millis());
    let key = format!("reassert-{}-{seen}", record.request_id);
    let request = ApiRequest {
        method: "POST".into(),
        device_id: device.as_str().into(),
        idempotency_key: Some(key.into_bytes()),
        body: format!(r#"{{"minSoc":{}}}"#, record.min_soc.percent()).into_bytes(),
        rest: None,
    };
    let answer = set_soc_http::handle(svc, request).await;
    info!(device = %device, status = answer.status, min_soc = record.min_soc.percent(), "drift: the applied value requested again (SOC_DRIFT_POLICY=reassert)");
    let request_id = answer.body_json()["requestId"]
        .as_str()
        .map(RequestId::from_stored);
    Reasserted {
        status: answer.status,
        request_id,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::functions::device_events_http::{self, EventsRequest};
    use crate::functions::fakes::{post_min_soc, Harness};
    use crate::functions::set_soc_http::{handle, ApiRequest};
    use crate::functions::DriftPolicy;

    fn connected(id: &str, device: &str) -> EventsRequest {
        let event = json!({"specversion": "1.0", "id": id, "source": "/vendor",
            "type": crate::domain::device_event::CONNECTED, "subject": device});
        EventsRequest {
            method: "POST".into(),
            content_type: Some("application/cloudevents+json".into()),
            webhook_request_origin: None,
            body: event.to_string().into_bytes(),
        }
    }

    async fn latest(h: &Harness, device: &str) -> Value {
        let req = ApiRequest {
            method: "GET".into(),
            device_id: device.into(),
            ..Default::default()
        };
        handle(&h.svc, req).await.body_json().into_owned()
    }

    async fn request(h: &Harness, device: &str, id: &str) -> Value {
        let req = ApiRequest {
            method: "GET".into(),
            device_id: device.into(),
            rest: Some(format!("requests/{id}")),
            ..Default::default()
        };
        handle(&h.svc, req).await.body_json().into_owned()
    }

    #[tokio::test]
    async fn an_applied_request_the_battery_reports_is_confirmed_by_the_read_after_its_put() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        let body = post_min_soc(&h, "d1", 30).await;
        assert_eq!(body["status"], "applied");
        assert_eq!(body["confirmed"], true, "{body}");
        assert!(body["confirmedAt"].is_string());
        let shown = latest(&h, "d1").await;
        assert_eq!(shown["confirmed"], true);
        assert_eq!(shown["confirmedAt"], body["confirmedAt"]);
    }

    #[tokio::test]
    async fn a_battery_slow_to_report_the_value_stays_unconfirmed_until_a_reconnect_shows_it() {
        let h = Harness::new();
        h.device.set_online("d1", true);
        h.device.set_reported("d1", 50);
        h.device.set_lagging("d1");
        let body = post_min_soc(&h, "d1", 30).await;
        assert_eq!(body["status"], "applied");
        assert_eq!(body["confirmed"], false, "{body}");
        assert!(body.get("confirmedAt").is_none());
        // The battery takes it at last: the read at its next reconnect confirms it.
        h.device.set_reported("d1", 30);
        device_events_http::handle(&h.svc, connected("e1", "d1")).await;
        let shown = request(&h, "d1", body["requestId"].as_str().unwrap()).await;
        assert_eq!(shown["confirmed"], true, "{shown}");
        assert!(latest(&h, "d1").await.get("reportedMinSoc").is_none());
    }

    #[tokio::test]
    async fn drift_is_recorded_shown_and_published_once_and_ends_when_the_value_is_back() {
        let h = Harness::new().notifying();
        h.device.set_online("d1", true);
        let body = post_min_soc(&h, "d1", 30).await;
        let id = body["requestId"].as_str().unwrap().to_string();
        h.device.set_reported("d1", 45);
        for event in ["e1", "e2"] {
            let r = device_events_http::handle(&h.svc, connected(event, "d1")).await;
            assert_eq!(
                r.body_json()["events"][0]["result"],
                "nothing-pending",
                "{:?}",
                r.body
            );
        }
        let shown = latest(&h, "d1").await;
        assert_eq!(shown["reportedMinSoc"], 45, "{shown}");
        assert!(shown["driftDetectedAt"].is_string());
        assert_eq!(
            shown["status"], "applied",
            "the request itself stays applied"
        );
        let drifted: Vec<_> = h
            .notifier
            .received()
            .into_iter()
            .filter(|e| e.event_type == "com.socsettings.device.drifted")
            .collect();
        assert_eq!(drifted.len(), 1, "one drift, one event: {drifted:?}");
        assert_eq!(drifted[0].subject, "devices/d1/soc");
        // Numbered on from the applied request's event, with the record's counter.
        assert_eq!(drifted[0].seq, 2);
        assert_eq!(h.ledger_record("d1").await.last_event_seq, 2);
        let data: Value = serde_json::from_str(&drifted[0].data).unwrap();
        assert_eq!(
            (data["reportedMinSoc"].clone(), data["requestId"].clone()),
            (json!(45), json!(id))
        );
        assert!(
            h.device.puts("d1").len() == 1,
            "report only: nothing PUT again"
        );
        // The battery reports the applied value again: the drift is over.
        h.device.set_reported("d1", 30);
        device_events_http::handle(&h.svc, connected("e3", "d1")).await;
        let shown = latest(&h, "d1").await;
        assert!(shown.get("reportedMinSoc").is_none(), "{shown}");
        assert!(shown.get("driftDetectedAt").is_none());
    }

    #[tokio::test]
    async fn under_reassert_a_battery_reporting_the_value_at_reconnect_is_confirmed_not_reasserted()
    {
        let mut h = Harness::new();
        h.svc.policy.drift = DriftPolicy::Reassert;
        h.device.set_online("d1", true);
        h.device.set_reported("d1", 50);
        h.device.set_lagging("d1");
        let first = post_min_soc(&h, "d1", 30).await;
        assert_eq!(first["confirmed"], false, "{first}");
        h.device.set_reported("d1", 30);
        device_events_http::handle(&h.svc, connected("e1", "d1")).await;
        let shown = latest(&h, "d1").await;
        assert_eq!(shown["requestId"], first["requestId"], "no new request");
        assert_eq!(shown["confirmed"], true, "{shown}");
        assert_eq!(h.device.puts("d1").len(), 1);
    }

    /// Drift on `d1` (applied 30, reporting 45), with `meanwhile` run while the
    /// reconnect's status call is on its way (its write then conflicts).
    async fn drift_racing(
        meanwhile: impl FnOnce(Harness) -> futures::future::BoxFuture<'static, ()> + Send + 'static,
    ) -> Harness {
        let h = Harness::new();
        h.device.set_online("d1", true);
        post_min_soc(&h, "d1", 30).await;
        h.device.set_reported("d1", 45);
        h.device
            .set_status_latency(std::time::Duration::from_secs(1));
        let racer = tokio::spawn({
            let h = h.clone();
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                meanwhile(h).await;
            }
        });
        device_events_http::handle(&h.svc, connected("e1", "d1")).await;
        racer.await.unwrap();
        h
    }

    #[tokio::test(start_paused = true)]
    async fn a_drift_write_that_loses_a_race_is_written_again_on_the_still_applied_record() {
        let h = drift_racing(|h| {
            Box::pin(async move {
                use crate::ports::Ledger as _;
                let v = h.ledger.get(&h.id("d1")).await.unwrap().unwrap();
                h.ledger.put(&v.value, Some(&v.etag), &[]).await.unwrap();
            })
        })
        .await;
        assert_eq!(latest(&h, "d1").await["reportedMinSoc"], 45);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drift_check_that_loses_the_race_to_a_new_request_records_nothing_on_it() {
        let h = drift_racing(|h| {
            Box::pin(async move {
                crate::functions::fakes::accept_pending(&h, "d1", 60).await;
            })
        })
        .await;
        let shown = latest(&h, "d1").await;
        assert_eq!(shown["minSoc"], 60, "{shown}");
        assert!(shown.get("reportedMinSoc").is_none(), "{shown}");
        assert!(shown.get("driftDetectedAt").is_none(), "{shown}");
    }

    #[tokio::test]
    async fn under_reassert_drift_requests_the_applied_value_again_once() {
        let mut h = Harness::new();
        h.svc.policy.drift = DriftPolicy::Reassert;
        h.device.set_online("d1", true);
        let first = post_min_soc(&h, "d1", 30).await;
        h.device.set_reported("d1", 45);
        let r = device_events_http::handle(&h.svc, connected("e1", "d1")).await;
        assert_eq!(
            r.body_json()["events"][0]["result"],
            "applied",
            "{:?}",
            r.body
        );
        let again = latest(&h, "d1").await;
        assert_ne!(again["requestId"], first["requestId"], "a new request");
        assert_eq!(
            (again["minSoc"].clone(), again["status"].clone()),
            (json!(30), json!("applied"))
        );
        assert_eq!(again["confirmed"], true);
        assert_eq!(
            h.device.puts("d1").iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![30, 30]
        );
        // The same event again (Event Grid retries): nothing more.
        device_events_http::handle(&h.svc, connected("e1", "d1")).await;
        assert_eq!(h.device.puts("d1").len(), 2);
    }
}
