//! NCRONTAB schedules as the Functions timer trigger reads them: 6 fields
//! `{second} {minute} {hour} {day} {month} {day-of-week}` (or 5 without seconds), `*`, `n`, `a-b`,
//! `*/s`, `a-b/s`, `n/s`, lists, month/day names. Day-of-month and day-of-week must both match
//! (NCrontab semantics). Times are UTC.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    seconds: Vec<bool>,
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn parse_value(s: &str, names: &[&str], name_base: u32) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let l = s.to_ascii_lowercase();
    names
        .iter()
        .position(|n| *n == l)
        .map(|i| i as u32 + name_base)
        .ok_or_else(|| format!("bad value {s:?}"))
}

fn parse_field(
    f: &str,
    min: u32,
    max: u32,
    names: &[&str],
    name_base: u32,
) -> Result<Vec<bool>, String> {
    let mut set = vec![false; (max + 1) as usize];
    for part in f.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (
                r,
                s.parse::<u32>()
                    .map_err(|_| format!("bad step in {part:?}"))?,
            ),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("zero step in {part:?}"));
        }
        let (lo, hi) = if range == "*" {
            (min, max)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                parse_value(a, names, name_base)?,
                parse_value(b, names, name_base)?,
            )
        } else {
            let v = parse_value(range, names, name_base)?;
            if part.contains('/') {
                (v, max)
            } else {
                (v, v)
            }
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{part:?} out of range {min}-{max}"));
        }
        let mut v = lo;
        while v <= hi {
            set[v as usize] = true;
            v += step;
        }
    }
    Ok(set)
}

impl Cron {
    pub fn parse(expr: &str) -> Result<Cron, String> {
        let f: Vec<&str> = expr.split_whitespace().collect();
        let f: Vec<&str> = match f.len() {
            6 => f,
            5 => std::iter::once("0").chain(f).collect(),
            n => return Err(format!("expected 6 (or 5) fields, got {n} in {expr:?}")),
        };
        let mut weekdays = parse_field(f[5], 0, 7, &DAYS, 0)?;
        if weekdays[7] {
            weekdays[0] = true;
        }
        weekdays.truncate(7);
        Ok(Cron {
            seconds: parse_field(f[0], 0, 59, &[], 0)?,
            minutes: parse_field(f[1], 0, 59, &[], 0)?,
            hours: parse_field(f[2], 0, 23, &[], 0)?,
            days: parse_field(f[3], 1, 31, &[], 0)?,
            months: parse_field(f[4], 1, 12, &MONTHS, 1)?,
            weekdays,
        })
    }

    /// The first occurrence strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut c = t.with_nanosecond(0)? + Duration::seconds(1);
        let limit = t + Duration::days(366 * 5);
        while c <= limit {
            if !self.months[c.month() as usize] {
                let (y, m) = if c.month() == 12 {
                    (c.year() + 1, 1)
                } else {
                    (c.year(), c.month() + 1)
                };
                c = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single()?;
                continue;
            }
            if !(self.days[c.day() as usize]
                && self.weekdays[c.weekday().num_days_from_sunday() as usize])
            {
                c = (c + Duration::days(1))
                    .with_hour(0)?
                    .with_minute(0)?
                    .with_second(0)?;
                continue;
            }
            if !self.hours[c.hour() as usize] {
                c = (c + Duration::hours(1)).with_minute(0)?.with_second(0)?;
                continue;
            }
            if !self.minutes[c.minute() as usize] {
                c = (c + Duration::minutes(1)).with_second(0)?;
                continue;
            }
            if !self.seconds[c.second() as usize] {
                c += Duration::seconds(1);
                continue;
            }
            return Some(c);
        }
        None
    }
}
