//! When a schedule ticks: a cron expression read in an IANA time zone.
//!
//! The dialect is Kubernetes' CronJob schedule (k8s-jobs.md §11): five fields (minute
//! hour day-of-month month day-of-week), `?` for `*`, `sun`–`sat`, the macros
//! `@yearly`/`@annually`, `@monthly`, `@weekly`, `@daily`/`@midnight` and `@hourly`,
//! and a day-of-month and day-of-week that both restrict matching either (as cron
//! always has). One extension: a sixth field in front, seconds, for schedules finer
//! than a minute. `TZ=` inside the expression is refused, as Kubernetes does since
//! 1.29: the zone is a field of its own. What croner reads beyond that (`L`, `W`, `#`,
//! a day-of-week of 7) is refused too, so a schedule means here what it means there.
//!
//! Times are Unix milliseconds, as everywhere in the engine. Ticks fall on whole
//! seconds. A clock change moves a job at a fixed time (one second, minute and hour),
//! as cron does: a tick inside a skipped hour runs once, at the end of the gap, and a
//! tick in a repeated hour runs once, in its first pass. A job that repeats within
//! the day keeps its pace in real time, through both passes of a repeated hour.

use std::str::FromStr;

use chrono::{DateTime, TimeZone};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use crate::error::{Error, Result};

/// The zone of a schedule created without one.
pub const DEFAULT_ZONE: &str = "UTC";

#[derive(Clone, Debug)]
pub struct CronSpec {
    cron: Cron,
    zone: Tz,
}

impl CronSpec {
    /// Parses `expr` in `zone` (empty: UTC). Refuses what Kubernetes would refuse, with
    /// a message that says what to write instead.
    pub fn parse(expr: &str, zone: &str) -> Result<CronSpec> {
        let expr = expr.trim();
        if expr.starts_with("TZ=") || expr.starts_with("CRON_TZ=") {
            return Err(Error::invalid(format!(
                "cron '{expr}': give the time zone with --time-zone, not inside the expression"
            )));
        }
        let zone_name = if zone.is_empty() { DEFAULT_ZONE } else { zone };
        let zone = Tz::from_str(zone_name).map_err(|_| {
            Error::invalid(format!(
                "unknown time zone '{zone_name}' (use an IANA name such as Europe/Stockholm \
                 or America/New_York)"
            ))
        })?;
        refuse_extensions(expr)?;
        // Kubernetes' one macro croner lacks.
        let pattern = if expr.eq_ignore_ascii_case("@midnight") {
            "@daily"
        } else {
            expr
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(pattern)
            .map_err(|e| {
                Error::invalid(format!(
                    "cron '{expr}' is not valid: {e} (five fields: minute hour \
                     day-of-month month day-of-week, e.g. '*/5 * * * *'; or @hourly, \
                     @daily, …)"
                ))
            })?;
        let spec = CronSpec { cron, zone };
        // A pattern such as "0 0 30 2 *" (February 30th) parses but never ticks.
        if spec.next_after(0).is_none() {
            return Err(Error::invalid(format!(
                "cron '{expr}' never matches a date"
            )));
        }
        Ok(spec)
    }

    /// The zone's IANA name.
    pub fn zone_name(&self) -> &'static str {
        self.zone.name()
    }

    /// How many ticks fall strictly between `after` and `before`, counting at most
    /// `limit`.
    pub fn ticks_between(&self, after: u64, before: u64, limit: u64) -> u64 {
        let mut count = 0;
        let mut at = after;
        while count < limit {
            match self.next_after(at) {
                Some(next) if next < before => (count, at) = (count + 1, next),
                _ => break,
            }
        }
        count
    }

    /// `ms` in the zone, cut to its whole second. Ticks fall on whole seconds, so
    /// the cut changes no answer, and croner's searches count in whole seconds: a
    /// fraction left on would let its one-second slack return a tick just after `ms`.
    fn at(&self, ms: u64) -> Option<DateTime<Tz>> {
        let seconds = i64::try_from(ms / 1000).ok()?;
        self.zone.timestamp_opt(seconds, 0).single()
    }

    /// The first tick strictly after `ms`.
    pub fn next_after(&self, ms: u64) -> Option<u64> {
        let next = self.cron.find_next_occurrence(&self.at(ms)?, false).ok()?;
        u64::try_from(next.timestamp_millis()).ok()
    }

    /// The last tick at or before `ms`.
    pub fn latest_at_or_before(&self, ms: u64) -> Option<u64> {
        let previous = self
            .cron
            .find_previous_occurrence(&self.at(ms)?, true)
            .ok()?;
        u64::try_from(previous.timestamp_millis()).ok()
    }
}

/// Refuses what croner reads but Kubernetes does not: `L`, `W`, `#` and a day-of-week
/// of 7. Each field is a list of `*`, `?`, numbers or names, each maybe a range, each
/// maybe with a step. A count of fields other than five or six is left to croner's
/// message.
fn refuse_extensions(expr: &str) -> Result<()> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let names: &[&str] = match fields.len() {
        5 => &["minute", "hour", "day-of-month", "month", "day-of-week"],
        6 => &[
            "second",
            "minute",
            "hour",
            "day-of-month",
            "month",
            "day-of-week",
        ],
        _ => return Ok(()),
    };
    if expr.starts_with('@') {
        return Ok(());
    }
    for (field, name) in fields.iter().zip(names) {
        let words: &[&str] = match *name {
            "month" => &MONTHS,
            "day-of-week" => &DAYS,
            _ => &[],
        };
        let atom_ok = |atom: &str| {
            if atom.chars().all(|c| c.is_ascii_digit()) {
                !atom.is_empty()
                    && (*name != "day-of-week" || atom.parse::<u8>().is_ok_and(|d| d < 7))
            } else {
                words.iter().any(|w| w.eq_ignore_ascii_case(atom))
            }
        };
        for piece in field.split(',') {
            let (range, step) = match piece.split_once('/') {
                Some((range, step)) => (range, Some(step)),
                None => (piece, None),
            };
            let range_ok = range == "*"
                || range == "?"
                || match range.split_once('-') {
                    Some((from, to)) => atom_ok(from) && atom_ok(to),
                    None => atom_ok(range),
                };
            let step_ok =
                step.is_none_or(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
            if !(range_ok && step_ok) {
                let seven = if *name == "day-of-week" && piece.contains('7') {
                    "; day-of-week runs 0-6, so Sunday is 0"
                } else {
                    ""
                };
                return Err(Error::invalid(format!(
                    "cron '{expr}': '{piece}' in the {name} field is not in the Kubernetes \
                     schedule syntax (numbers, names such as mon or jan, * or ?, ranges a-b, \
                     lists a,b and steps /n{seven})"
                )));
            }
        }
    }
    Ok(())
}

/// `ms` as RFC 3339 in UTC, to the second (what `{tick}` in a payload becomes).
pub fn rfc3339(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-03-29 00:30:00 UTC: Europe/Stockholm moves from +01:00 to +02:00 at
    /// 01:00 UTC (02:00 local becomes 03:00).
    const BEFORE_DST: u64 = 1_774_744_200_000;
    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;

    fn utc(expr: &str) -> CronSpec {
        CronSpec::parse(expr, "").unwrap()
    }

    #[test]
    fn the_kubernetes_dialect_parses_and_ticks_in_utc_by_default() {
        let every_five = utc("*/5 * * * *");
        assert_eq!(every_five.zone_name(), "UTC");
        let start = BEFORE_DST + 1; // 00:30:00.001
        assert_eq!(every_five.next_after(start), Some(BEFORE_DST + 5 * MINUTE));
        assert_eq!(every_five.latest_at_or_before(start), Some(BEFORE_DST));
        // A tick at exactly `ms` is the latest at or before it, not the next after it.
        assert_eq!(every_five.latest_at_or_before(BEFORE_DST), Some(BEFORE_DST));
        assert_eq!(
            every_five.next_after(BEFORE_DST),
            Some(BEFORE_DST + 5 * MINUTE)
        );
        for (macro_, plain) in [
            ("@hourly", "0 * * * *"),
            ("@daily", "0 0 * * *"),
            ("@midnight", "0 0 * * *"),
            ("@weekly", "0 0 * * 0"),
            ("@monthly", "0 0 1 * *"),
            ("@yearly", "0 0 1 1 *"),
            ("@annually", "0 0 1 1 *"),
            ("0 0 ? * *", "0 0 * * *"),
            ("0 9 * * mon-fri", "0 9 * * 1-5"),
        ] {
            let (a, b) = (utc(macro_), utc(plain));
            let mut t = BEFORE_DST;
            for _ in 0..3 {
                let (next_a, next_b) = (a.next_after(t), b.next_after(t));
                assert_eq!(next_a, next_b, "{macro_} against {plain}");
                t = next_a.unwrap();
            }
        }
        // Lists, ranges, steps and names in any case, in one expression.
        let mixed = utc("0,30 9-17/2 1,15 JAN-jun/2 Sun,6");
        assert_eq!(
            rfc3339(mixed.next_after(BEFORE_DST).unwrap()),
            "2026-03-29T09:00:00Z",
            "Sunday the 29th of March"
        );
        // Seconds first, as the one extension.
        let every_second = utc("* * * * * *");
        assert_eq!(
            every_second.next_after(BEFORE_DST + 1),
            Some(BEFORE_DST + 1000)
        );
    }

    #[test]
    fn day_of_month_and_day_of_week_both_restricted_match_either() {
        // 2026-03-01 is a Sunday. "0 0 1 * 1": the 1st of the month, or any Monday.
        let spec = utc("0 0 1 * 1");
        let march_1 = 1_772_323_200_000;
        let next = spec.next_after(march_1).unwrap();
        assert_eq!(rfc3339(next), "2026-03-02T00:00:00Z", "Monday the 2nd");
        assert_eq!(
            rfc3339(spec.next_after(next).unwrap()),
            "2026-03-09T00:00:00Z"
        );
    }

    #[test]
    fn a_time_zone_moves_the_ticks_and_its_clock_changes_skip_nothing_twice() {
        let stockholm = CronSpec::parse("0 9 * * *", "Europe/Stockholm").unwrap();
        assert_eq!(stockholm.zone_name(), "Europe/Stockholm");
        // 09:00 in Stockholm: 08:00 UTC in winter, 07:00 UTC once summer time starts.
        let first = stockholm.next_after(BEFORE_DST - 24 * HOUR).unwrap();
        assert_eq!(rfc3339(first), "2026-03-28T08:00:00Z");
        assert_eq!(
            rfc3339(stockholm.next_after(first).unwrap()),
            "2026-03-29T07:00:00Z"
        );
        // 02:30 local does not exist on the 29th: that day's tick runs once, at 03:00.
        let in_gap = CronSpec::parse("30 2 * * *", "Europe/Stockholm").unwrap();
        let ticks: Vec<String> =
            std::iter::successors(in_gap.next_after(BEFORE_DST - 24 * HOUR), |t| {
                in_gap.next_after(*t)
            })
            .take(3)
            .map(rfc3339)
            .collect();
        assert_eq!(
            ticks,
            [
                "2026-03-28T01:30:00Z",
                "2026-03-29T01:00:00Z",
                "2026-03-30T00:30:00Z"
            ]
        );
    }

    /// 2026-10-25 in Europe/Stockholm: at 01:00 UTC the clock goes from 03:00 back to
    /// 02:00, so 02:00–02:59 local happens twice. A job at a fixed time runs once, in
    /// the first pass; a job that repeats keeps its pace through both, as cron's
    /// wildcard jobs do, so nothing stops for an hour.
    #[test]
    fn a_repeated_hour_runs_a_fixed_time_once_and_an_interval_through_both_passes() {
        const FALL_BACK: u64 = 1_792_890_000_000; // 2026-10-25T01:00:00Z
        let ticks = |expr: &str, from: u64, to: u64| -> Vec<u64> {
            let spec = CronSpec::parse(expr, "Europe/Stockholm").unwrap();
            std::iter::successors(spec.next_after(from), |t| spec.next_after(*t))
                .take_while(|t| *t < to)
                .collect()
        };
        let (night, morning) = (FALL_BACK - 3 * HOUR, FALL_BACK + 3 * HOUR);

        let fixed = ticks("30 2 * * *", night, morning);
        assert_eq!(
            fixed.iter().copied().map(rfc3339).collect::<Vec<_>>(),
            ["2026-10-25T00:30:00Z"]
        );

        let every_minute = ticks("* * * * *", night, morning);
        let spec = CronSpec::parse("* * * * *", "Europe/Stockholm").unwrap();
        assert_eq!(spec.ticks_between(night, morning, 10_000), 6 * 60 - 1);
        assert_eq!(
            spec.ticks_between(night, morning, 100),
            100,
            "counted up to the limit"
        );
        assert_eq!(
            spec.ticks_between(night, night + MINUTE, 100),
            0,
            "none strictly between"
        );
        assert_eq!(every_minute.len(), 6 * 60 - 1, "one tick a real minute");
        assert!(every_minute.windows(2).all(|w| w[1] - w[0] == MINUTE));

        let hourly = ticks("0 * * * *", night, morning);
        assert_eq!(
            hourly.len(),
            5,
            "one tick a real hour: {:?}",
            hourly.iter().map(|t| rfc3339(*t)).collect::<Vec<_>>()
        );
        assert!(hourly.windows(2).all(|w| w[1] - w[0] == HOUR));

        // From inside the second pass, the next tick and the latest one are both in it.
        let spec = CronSpec::parse("*/10 * * * *", "Europe/Stockholm").unwrap();
        let second_pass = FALL_BACK + 25 * MINUTE; // 02:25 local, the second time
        assert_eq!(spec.next_after(second_pass), Some(FALL_BACK + 30 * MINUTE));
        assert_eq!(
            spec.latest_at_or_before(second_pass),
            Some(FALL_BACK + 20 * MINUTE)
        );
    }

    /// Through the clock changes of 2026 in zones that move by an hour, by half an hour
    /// (Lord Howe) or not at all, the scheduler's two questions agree: the latest tick
    /// at or before `t` is not after it, the next one is after it (a schedule never
    /// waits for a time already past), and nothing ticks between them, so a schedule
    /// neither runs a tick twice nor skips one, whenever it looks.
    #[test]
    fn latest_and_next_agree_through_clock_changes() {
        // Days around the changes: Europe (Mar 29, Oct 25), US (Mar 8, Nov 1), Lord
        // Howe (Apr 5, Oct 4), starting at 00:00 UTC the day before.
        let days: [u64; 6] = [
            1_774_656_000_000,
            1_792_800_000_000,
            1_772_841_600_000,
            1_793_404_800_000,
            1_775_260_800_000,
            1_790_985_600_000,
        ];
        for zone in [
            "UTC",
            "Europe/Stockholm",
            "America/New_York",
            "Australia/Lord_Howe",
            "Asia/Kolkata",
        ] {
            for expr in [
                "30 2 * * *",
                "*/7 * * * *",
                "0 * * * *",
                "15 1-3 * * *",
                "45 */2 * * * *",
            ] {
                let spec = CronSpec::parse(expr, zone).unwrap();
                for day in days {
                    // Every 7.5 minutes over three days, off the whole minute.
                    for step in 0..(3 * 24 * 8) {
                        let t = day + step * 450_000 + 333;
                        let (latest, next) = (
                            spec.latest_at_or_before(t).unwrap(),
                            spec.next_after(t).unwrap(),
                        );
                        let at = format!("{expr} in {zone} at {}", rfc3339(t));
                        assert!(latest <= t && t < next, "{at}: {latest} {next}");
                        assert_eq!(spec.next_after(latest), Some(next), "{at}");
                        assert_eq!(spec.latest_at_or_before(next - 1), Some(latest), "{at}");
                        // From a tick itself, too (where croner's searches differ).
                        assert_eq!(spec.latest_at_or_before(next), Some(next), "{at}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_expressions_and_zones_are_refused_with_what_to_write_instead() {
        for (expr, zone, says) in [
            ("", "", "not valid"),
            ("61 * * * *", "", "not valid"),
            ("* * *", "", "five fields"),
            (
                "0 0 1 1 * 2030",
                "",
                "not in the Kubernetes schedule syntax",
            ),
            ("0 0 1 1 * * 2030", "", "not valid"),
            ("TZ=UTC 0 * * * *", "", "--time-zone"),
            ("CRON_TZ=UTC 0 * * * *", "", "--time-zone"),
            ("0 0 30 2 *", "", "never matches"),
            ("0 0 L * *", "", "'L' in the day-of-month field"),
            ("0 0 15W * *", "", "'15W' in the day-of-month field"),
            ("0 0 * * 5L", "", "'5L' in the day-of-week field"),
            ("0 0 * * mon#2", "", "'mon#2' in the day-of-week field"),
            ("0 0 * * 7", "", "Sunday is 0"),
            ("0 0 * * 5-7", "", "'5-7' in the day-of-week field"),
            ("0 0 * 13 *", "", "not valid"),
            ("0 0 * * * L", "", "'L' in the day-of-week field"),
            ("*/ * * * *", "", "'*/' in the minute field"),
            ("0 0 * * +mon", "", "'+mon' in the day-of-week field"),
            (
                "0 * * * *",
                "Mars/Olympus",
                "unknown time zone 'Mars/Olympus'",
            ),
            ("0 * * * *", "+02:00", "IANA name"),
        ] {
            let error = CronSpec::parse(expr, zone).unwrap_err();
            assert!(
                matches!(error, Error::InvalidArgument(_)),
                "{expr:?} {zone:?}: {error:?}"
            );
            assert!(
                error.to_string().contains(says),
                "{expr:?} {zone:?}: {error}"
            );
        }
    }
}
