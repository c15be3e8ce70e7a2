//! Parsing of the human-friendly values people type on the command line and into the control socket:
//! sizes (`256MiB`), byte rates (`50MiB/s`), durations (`200ms`, `1m30s`) and probabilities (`0.05`, `5%`).
//!
//! Every parser returns a message that names what was wrong and shows an accepted form, because these
//! messages are what an administrator sees when a fault command or a flag is mistyped.

use std::time::Duration;

/// Binary and decimal size suffixes. Storage people read `M` as MiB (qemu-img, nbdkit, fio do too), so
/// single letters are binary; only an explicit `KB`/`MB`/... is decimal.
const SIZE_SUFFIXES: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("kb", 1_000),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("mb", 1_000_000),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("gb", 1_000_000_000),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("tb", 1_000_000_000_000),
    ("p", 1 << 50),
    ("pib", 1 << 50),
    ("pb", 1_000_000_000_000_000),
];

const SIZE_HELP: &str = "expected a size such as 4096, 64k, 256MiB, 1.5GiB or 10GB";

/// Parses a size in bytes: a number (decimals allowed with a unit) followed by an optional unit.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (number, unit) = split_number(trimmed);
    if number.is_empty() {
        return Err(format!("invalid size `{text}`: {SIZE_HELP}"));
    }
    let unit_lower = unit.trim().to_ascii_lowercase();
    let Some(&(_, multiplier)) = SIZE_SUFFIXES.iter().find(|(s, _)| *s == unit_lower) else {
        return Err(format!(
            "invalid size `{text}`: unknown unit `{unit}`; {SIZE_HELP}"
        ));
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| format!("invalid size `{text}`: too large"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid size `{text}`: {SIZE_HELP}"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
        return Err(format!("invalid size `{text}`: out of range"));
    }
    if bytes.fract() != 0.0 {
        return Err(format!(
            "invalid size `{text}`: {bytes} is not a whole number of bytes"
        ));
    }
    Ok(bytes as u64)
}

/// Parses a bandwidth in bytes per second: a size with an optional `/s` (`50MiB`, `50MiB/s`, `1G/s`).
pub fn parse_rate(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let body = trimmed
        .strip_suffix("/s")
        .or_else(|| trimmed.strip_suffix("/S"))
        .unwrap_or(trimmed);
    let bytes = parse_size(body).map_err(|_| {
        format!("invalid rate `{text}`: expected bytes per second such as 50MiB, 50MiB/s or 1G")
    })?;
    if bytes == 0 {
        return Err(format!(
            "invalid rate `{text}`: must be greater than 0 (use `rate=off` or `clear` to remove a cap)"
        ));
    }
    Ok(bytes)
}

const DURATION_HELP: &str = "expected a duration such as 200ms, 1s, 1.5s or 1m30s";

/// Parses a duration made of one or more `NUMBER UNIT` parts (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`).
/// A bare number is rejected: `delay=200` could mean milliseconds or seconds, and guessing wrong by a
/// factor of 1000 is worse than asking.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(format!("invalid duration `{text}`: {DURATION_HELP}"));
    }
    if trimmed == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = trimmed;
    let mut total = 0f64;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        if number.is_empty() {
            return Err(format!("invalid duration `{text}`: {DURATION_HELP}"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let seconds_per_unit = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "" => {
                return Err(format!(
                    "invalid duration `{text}`: missing unit; {DURATION_HELP}"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration `{text}`: unknown unit `{other}`; {DURATION_HELP}"
                ));
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("invalid duration `{text}`: {DURATION_HELP}"))?;
        total += value * seconds_per_unit;
        rest = &after[unit_len..];
    }
    // One day is far beyond any sensible injected latency or timeout; the cap also keeps
    // Duration::from_secs_f64 away from values it would panic on.
    if !total.is_finite() || total > 86_400.0 {
        return Err(format!(
            "invalid duration `{text}`: out of range (at most 24h)"
        ));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Parses a probability given as a fraction (`0.05`) or a percentage (`5%`), inclusive of 0 and 1.
pub fn parse_probability(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    let (number, scale) = match trimmed.strip_suffix('%') {
        Some(body) => (body.trim(), 100.0),
        None => (trimmed, 1.0),
    };
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid probability `{text}`: expected a fraction such as 0.05 or a percentage such as 5%")
    })?;
    let p = value / scale;
    if !p.is_finite() || !(0.0..=1.0).contains(&p) {
        return Err(format!(
            "invalid probability `{text}`: must be between 0 and 1 (or 0% and 100%)"
        ));
    }
    Ok(p)
}

/// Formats a byte count for people: `268435456` → `256 MiB`, exact where it can be.
pub fn format_size(bytes: u64) -> String {
    const UNITS: &[(&str, u64)] = &[
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for &(name, unit) in UNITS {
        if bytes >= unit {
            if bytes.is_multiple_of(unit) {
                return format!("{} {name}", bytes / unit);
            }
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} B")
}

/// Formats a duration compactly for people: `200ms`, `1.5s`, `350µs`.
pub fn format_duration(d: Duration) -> String {
    let micros = d.as_micros();
    if micros == 0 {
        "0".to_string()
    } else if micros < 1_000 {
        format!("{micros}µs")
    } else if micros < 1_000_000 {
        let ms = d.as_secs_f64() * 1e3;
        if ms.fract() == 0.0 {
            format!("{ms:.0}ms")
        } else {
            format!("{ms:.1}ms")
        }
    } else {
        let s = d.as_secs_f64();
        if s.fract() == 0.0 {
            format!("{s:.0}s")
        } else {
            format!("{s:.2}s")
        }
    }
}

/// Splits `"1.5GiB"` into `("1.5", "GiB")`.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..end], &text[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("10GB"), Ok(10_000_000_000));
        assert_eq!(parse_size(" 1 G "), Ok(1 << 30));
        for bad in [
            "",
            "abc",
            "12XB",
            "-5",
            "1.5",
            "1.2.3M",
            "99999999999PiB",
            "MiB",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("invalid size"), "{bad}: {err}");
        }
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("50MiB"), Ok(50 << 20));
        assert_eq!(parse_rate("50MiB/s"), Ok(50 << 20));
        assert!(parse_rate("0").unwrap_err().contains("greater than 0"));
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("200").unwrap_err().contains("missing unit"));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(
            parse_duration("100000h")
                .unwrap_err()
                .contains("out of range")
        );
    }

    #[test]
    fn probabilities() {
        assert_eq!(parse_probability("0.05"), Ok(0.05));
        assert_eq!(parse_probability("5%"), Ok(0.05));
        assert_eq!(parse_probability("100%"), Ok(1.0));
        assert_eq!(parse_probability("0"), Ok(0.0));
        for bad in ["1.5", "101%", "-0.1", "NaN", "inf", "x%", ""] {
            assert!(parse_probability(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(256 << 20), "256 MiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(12), "12 B");
        assert_eq!(format_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.50s");
    }
}
