//! NCRONTAB parsing and next-occurrence computation.

use chrono::{TimeZone, Utc};
use devtools::devhost::config::{expand, parse_timespan};
use devtools::devhost::cron::Cron;

fn t(s: &str) -> chrono::DateTime<Utc> {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .with_timezone(&Utc)
}

#[test]
fn every_five_minutes_fires_on_the_next_multiple_of_five_at_second_zero() {
    let c = Cron::parse("0 */5 * * * *").unwrap();
    assert_eq!(
        c.next_after(t("2025-03-04T09:14:07Z")),
        Some(t("2025-03-04T09:15:00Z"))
    );
    assert_eq!(
        c.next_after(t("2025-03-04T09:15:00Z")),
        Some(t("2025-03-04T09:20:00Z"))
    );
}

#[test]
fn ranges_lists_steps_and_names_are_understood() {
    let c = Cron::parse("30 0 9-17/4 * JAN,mar Mon-Fri").unwrap();
    // 2025-03-04 is a Tuesday
    assert_eq!(
        c.next_after(t("2025-03-04T09:14:07Z")),
        Some(t("2025-03-04T13:00:30Z"))
    );
    assert_eq!(
        c.next_after(t("2025-03-07T17:00:30Z")),
        Some(t("2025-03-10T09:00:30Z"))
    );
    assert_eq!(
        c.next_after(t("2025-03-31T17:00:31Z")),
        Some(t("2026-01-01T09:00:30Z"))
    );
}

#[test]
fn five_field_expressions_mean_second_zero() {
    let c = Cron::parse("15 2 * * *").unwrap();
    assert_eq!(
        c.next_after(t("2025-03-04T09:00:00Z")),
        Some(t("2025-03-05T02:15:00Z"))
    );
}

#[test]
fn day_of_month_and_day_of_week_must_both_match() {
    // the 13th that is a Friday
    let c = Cron::parse("0 0 0 13 * 5").unwrap();
    assert_eq!(
        c.next_after(t("2025-01-01T00:00:00Z")),
        Some(t("2025-06-13T00:00:00Z"))
    );
    // Sunday as 7
    let c = Cron::parse("0 0 12 * * 7").unwrap();
    assert_eq!(
        c.next_after(t("2025-03-04T00:00:00Z")),
        Some(t("2025-03-09T12:00:00Z"))
    );
}

#[test]
fn every_second_schedules_fire_each_second() {
    let c = Cron::parse("* * * * * *").unwrap();
    let now =
        Utc.with_ymd_and_hms(2025, 3, 4, 9, 0, 0).unwrap() + chrono::Duration::milliseconds(400);
    assert_eq!(
        c.next_after(now),
        Some(Utc.with_ymd_and_hms(2025, 3, 4, 9, 0, 1).unwrap())
    );
}

#[test]
fn malformed_schedules_are_rejected() {
    for bad in [
        "",
        "* * * *",
        "61 * * * * *",
        "0 0 25 * * *",
        "0 */0 * * * *",
        "0 0 0 * foo *",
        "1 2 3 4 5 6 7",
    ] {
        assert!(Cron::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn setting_references_expand_from_the_app_settings() {
    let mut s = std::collections::BTreeMap::new();
    s.insert(
        "DRAIN_SOC_SCHEDULE".to_string(),
        "0 */5 * * * *".to_string(),
    );
    assert_eq!(expand("%DRAIN_SOC_SCHEDULE%", &s).unwrap(), "0 */5 * * * *");
    assert_eq!(
        expand("q-%DRAIN_SOC_SCHEDULE%-x", &s).unwrap(),
        "q-0 */5 * * * *-x"
    );
    assert!(expand("%NOPE_NOT_SET_ANYWHERE%", &s).is_err());
}

#[test]
fn dotnet_timespans_parse() {
    assert_eq!(
        parse_timespan("00:05:00"),
        Some(std::time::Duration::from_secs(300))
    );
    assert_eq!(
        parse_timespan("1.02:00:01"),
        Some(std::time::Duration::from_secs(93601))
    );
    assert_eq!(parse_timespan("nope"), None);
}
