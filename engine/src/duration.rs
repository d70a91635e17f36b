//! Durations as users write them in SQL (`'5s'`, `'500ms'`, `'2m'`) and as
//! the catalog keeps them: milliseconds, written back in the largest unit
//! that divides them.

/// Parses `250ms`, `5s`, `2m`, `1h` or `1d` (also `5 s`, `5 seconds`) into ms.
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let t = text.trim().trim_matches('\'').trim();
    let digits = t.chars().take_while(|c| c.is_ascii_digit()).count();
    let (number, unit) = t.split_at(digits);
    let number: i64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; write it like '5s', '500ms' or '2m'"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale = match unit.as_str() {
        "ms" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "second" | "seconds" => 1_000,
        "m" | "min" | "minute" | "minutes" => 60_000,
        "h" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => {
            return Err(format!(
                "'{text}' has no known unit; write it like '5s', '500ms' or '2m'"
            ));
        }
    };
    number
        .checked_mul(scale)
        .filter(|ms| *ms <= 366 * 86_400_000)
        .ok_or_else(|| format!("'{text}' is too long; at most a year"))
}

/// A duration in the largest unit that divides it.
pub fn format_duration(ms: i64) -> String {
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms != 0 && ms % scale == 0 {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5s"), Ok(5_000));
        assert_eq!(parse_duration("'250ms'"), Ok(250));
        assert_eq!(parse_duration("2 minutes"), Ok(120_000));
        assert!(parse_duration("5").unwrap_err().contains("unit"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("9999d").unwrap_err().contains("too long"));
        assert_eq!(format_duration(120_000), "2m");
        assert_eq!(format_duration(1_500), "1500ms");
    }
}
