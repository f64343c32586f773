//! Byte sizes as people write them: `65536`, `64KiB`, `10MB`, `1.5MiB`.
//!
//! Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024; SI units
//! (`kB`/`K`, `MB`/`M`, `GB`/`G`, `TB`/`T`) are powers of 1000. Units are
//! case-insensitive, may be separated from the number by spaces, and may end
//! in `/s` (for rates). Fractions are exact to the byte, rounded down.

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SizeError {
    /// Nothing was given.
    #[error("empty size")]
    Empty,
    /// The number part is not a decimal number.
    #[error("bad number in size {0:?}")]
    BadNumber(String),
    /// The unit is not one of B, kB/K, KiB, MB/M, MiB, GB/G, GiB, TB/T, TiB.
    #[error("unknown unit {0:?} (use B, kB, KiB, MB, MiB, GB, GiB, TB or TiB)")]
    BadUnit(String),
    /// The size does not fit 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let unit = unit.to_ascii_lowercase();
    let unit = unit.strip_suffix("/s").unwrap_or(&unit).trim_end();
    Some(match unit {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" | "ki" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" | "mi" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" | "gi" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" | "ti" => 1 << 40,
        _ => return None,
    })
}

/// Parses a byte size: `"65536"`, `"64KiB"`, `"64MiB"`, `"1GiB"`, `"10MB"` (SI), `"1.5MiB"`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let mult = unit_multiplier(unit.trim()).ok_or_else(|| SizeError::BadUnit(unit.into()))?;
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits_ok(int) || !digits_ok(frac) {
        return Err(SizeError::BadNumber(s.into()));
    }
    let overflow = || SizeError::Overflow(s.into());
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| overflow())?
    };
    let frac_digits = frac.trim_end_matches('0');
    if frac_digits.len() > 18 {
        return Err(SizeError::BadNumber(s.into()));
    }
    let frac_value: u128 = if frac_digits.is_empty() {
        0
    } else {
        frac_digits.parse().map_err(|_| overflow())?
    };
    let scale = 10u128.pow(frac_digits.len() as u32);
    let mult = mult as u128;
    let total = int
        .checked_mul(mult)
        .and_then(|v| v.checked_add(frac_value * mult / scale))
        .ok_or_else(overflow)?;
    u64::try_from(total).map_err(|_| overflow())
}

/// Formats a byte count for people: `"512 B"`, `"1.5 KiB"`, `"64.0 MiB"`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("1.5MiB"), Ok(1_572_864));
        assert_eq!(parse_size(" 2 kb "), Ok(2000));
        assert_eq!(parse_size("100M/s"), Ok(100_000_000));
        assert_eq!(parse_size("0.5k"), Ok(500));
        assert_eq!(parse_size(".25KiB"), Ok(256));
        assert_eq!(parse_size("7B"), Ok(7));
    }

    #[test]
    fn refuses_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("MiB"), Err(SizeError::BadNumber(_))));
        assert!(matches!(parse_size("1.2.3"), Err(SizeError::BadNumber(_))));
        assert!(matches!(
            parse_size("12 parsecs"),
            Err(SizeError::BadUnit(_))
        ));
        assert!(matches!(parse_size("-5"), Err(SizeError::BadUnit(_))));
        assert!(matches!(
            parse_size("99999999999TiB"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(64 << 20), "64.0 MiB");
        assert_eq!(format_size(3 << 30), "3.0 GiB");
    }
}
