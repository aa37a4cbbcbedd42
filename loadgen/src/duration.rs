//! Human durations: parsed from the command line (`30s`, `500ms`, `2m`, `30`), shown in the
//! summary.

use std::time::Duration;

/// Parses `<number>[unit]` with unit `us`, `ms`, `s`, `m` or `h` (fractions allowed, `1.5s`).
/// A bare number is seconds, as the gateway reads its durations, so one value such as
/// `--duration 30` means the same to both.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: `{number}` is not a number"))?;
    let seconds_per_unit = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}` (use us, ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(value * seconds_per_unit)
        .map_err(|_| format!("`{text}` is out of range"))
}

/// Microseconds as the summary shows them: `850µs`, `12.3ms`, `1.50s`.
pub(crate) fn format_us(us: u64) -> String {
    #[expect(
        clippy::cast_precision_loss,
        reason = "display only; < 2^52 µs in practice"
    )]
    let value = us as f64;
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.2}ms", value / 1e3)
    } else {
        format!("{:.2}s", value / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn a_bare_number_is_seconds_as_in_the_gateway() {
        assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse(" 10 "), Ok(Duration::from_secs(10)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
        assert_eq!(parse("2.5"), Ok(Duration::from_millis(2500)));
    }

    #[test]
    fn rejects_missing_or_unknown_units_and_garbage() {
        assert!(parse("3d").unwrap_err().contains("unknown unit"));
        assert!(parse("s").unwrap_err().contains("not a number"));
        assert!(parse("1.2.3s").unwrap_err().contains("not a number"));
        assert!(parse("-1s").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn formats_microseconds_at_a_readable_scale() {
        assert_eq!(format_us(850), "850µs");
        assert_eq!(format_us(12_345), "12.35ms");
        assert_eq!(format_us(1_500_000), "1.50s");
    }
}
