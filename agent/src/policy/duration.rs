//! Durations in policy files: `"90s"`, `"15m"`, `"8h"`, `"7d"` and combinations such as
//! `"1h30m"`, read into seconds and written back the same way.

pub(super) const MINUTE: u64 = 60;
pub(super) const HOUR: u64 = 60 * MINUTE;
pub(super) const DAY: u64 = 24 * HOUR;

/// Seconds in `text`, within `min..=max`; the error says what is allowed.
pub(super) fn bounded_duration(text: &str, min: u64, max: u64) -> Result<u64, String> {
    let secs = parse_duration(text).ok_or_else(|| {
        format!(
            "{text:?} is not a duration: write numbers with units s, m, h or d, e.g. \"90s\", \
             \"15m\", \"8h\", \"7d\" or \"1h30m\""
        )
    })?;
    if !(min..=max).contains(&secs) {
        return Err(format!(
            "{text:?} is out of range: use {} to {}",
            format_duration(min),
            format_duration(max)
        ));
    }
    Ok(secs)
}

/// Seconds in `"90s"`, `"15m"`, `"8h"`, `"7d"` or combinations from the largest unit down
/// (`"1d12h"`, `"1h30m"`); each unit at most once.
pub fn parse_duration(text: &str) -> Option<u64> {
    const UNITS: [(u8, u64); 4] = [(b'd', DAY), (b'h', HOUR), (b'm', MINUTE), (b's', 1)];
    let mut rest = text.trim().as_bytes();
    if rest.is_empty() {
        return None;
    }
    let mut next_unit = 0;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        let number: u64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
        let unit = *rest.get(digits)?;
        let at = UNITS[next_unit..].iter().position(|&(u, _)| u == unit)? + next_unit;
        total = total.checked_add(number.checked_mul(UNITS[at].1)?)?;
        next_unit = at + 1;
        rest = &rest[digits + 1..];
    }
    Some(total)
}

/// The shortest spelling `parse_duration` reads back, e.g. `5400` → `"1h30m"`.
pub fn format_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = secs;
    for (unit, size) in [("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", 1)] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, secs) in [
            ("90s", 90),
            ("15m", 900),
            ("8h", 28_800),
            ("7d", 604_800),
            ("1h30m", 5400),
            ("1d12h", 129_600),
            ("1d2h3m4s", 93_784),
            (" 10s ", 10),
            ("0s", 0),
        ] {
            assert_eq!(parse_duration(text), Some(secs), "{text:?}");
        }
        for bad in [
            "",
            "8",
            "h",
            "8x",
            "30m1h",
            "1h1h",
            "-5m",
            "1.5h",
            "8 h",
            "1h 30m",
            "9999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        for secs in [1, 59, 60, 5400, 86_400, 93_784, 30 * 86_400] {
            assert_eq!(parse_duration(&format_duration(secs)), Some(secs));
        }
        assert_eq!(format_duration(5400), "1h30m");
        assert_eq!(format_duration(30 * 86_400), "30d");
        assert_eq!(
            bounded_duration("31d", MINUTE, 30 * DAY),
            Err("\"31d\" is out of range: use 1m to 30d".into())
        );
        assert_eq!(bounded_duration("30d", MINUTE, 30 * DAY), Ok(30 * DAY));
    }
}
