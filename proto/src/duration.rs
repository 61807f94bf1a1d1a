//! Human durations as the CLI and worker take them: `250ms`, `30s`, `5m`, `1h`,
//! `1h30m`, or a bare number of seconds.

use std::time::Duration;

/// Parses `250ms`, `30s`, `5m`, `2h`, `1d`, combinations like `1m30s`, or plain seconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration (use e.g. 30s, 5m, 1h)".into());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("invalid duration '{text}' (use e.g. 30s, 5m, 1h)"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("duration '{text}' is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let millis_per_unit: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "invalid duration unit '{unit}' in '{text}' (use ms, s, m, h or d)"
                ));
            }
        };
        let millis = number
            .checked_mul(millis_per_unit)
            .ok_or_else(|| format!("duration '{text}' is too large"))?;
        total = total
            .checked_add(Duration::from_millis(millis))
            .ok_or_else(|| format!("duration '{text}' is too large"))?;
    }
    Ok(total)
}

/// As [`parse`], refusing zero: for a setting where the API reads 0 as "the
/// default", so `0s` would silently mean something else.
pub fn parse_positive(text: &str) -> Result<Duration, String> {
    match parse(text)? {
        Duration::ZERO => Err(format!(
            "'{}' is no time: give at least 1ms, or leave the flag out for the default",
            text.trim()
        )),
        duration => Ok(duration),
    }
}

/// Formats a duration compactly: `850ms`, `12s`, `4m05s`, `2h03m`.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let secs = ms as f64 / 1_000.0;
        if secs < 10.0 {
            format!("{secs:.1}s")
        } else {
            format!("{}s", ms / 1_000)
        }
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1_000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_combinations() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("7").unwrap(), Duration::from_secs(7));
    }

    #[test]
    fn rejects_garbage_with_a_hint() {
        for bad in ["", "abc", "5x", "-1s", "s", "99999999999999999999h"] {
            let err = parse(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(parse("5 minutes").unwrap_err().contains("unit"));
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format(Duration::from_millis(850)), "850ms");
        assert_eq!(format(Duration::from_secs(12)), "12s");
        assert_eq!(format(Duration::from_secs(245)), "4m05s");
        assert_eq!(format(Duration::from_secs(7380)), "2h03m");
    }
}
