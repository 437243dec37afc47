//! Durations as written in bucket files and criteria: an integer followed by one unit letter,
//! `s` (seconds), `m` (minutes), `h` (hours), `d` (days) or `w` (weeks): `90s`, `15m`, `14d`, `2w`.
//! No spaces, no fractions, no combinations such as `1h30m`.

/// The longest duration accepted (100 years). Windows are turned into milliseconds and
/// subtracted from "now", so this keeps all of that arithmetic far from overflow.
pub const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

const EXPECTED: &str = "expected an integer followed by one of s, m, h, d, w, e.g. `14d`";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration; {EXPECTED}")]
    Empty,
    #[error("`{0}` does not start with a whole number; {EXPECTED}")]
    NoNumber(String),
    #[error("`{0}` has no unit; {EXPECTED}")]
    NoUnit(String),
    #[error("`{text}` has an unknown unit `{unit}`; {EXPECTED}")]
    UnknownUnit { text: String, unit: String },
    #[error("a duration of zero (`{0}`) is not allowed: durations are at least `1s`")]
    Zero(String),
    #[error("`{0}` is too long: durations are limited to 100 years (`36500d`)")]
    TooLong(String),
}

/// Parses a duration such as `14d` into seconds. Zero is rejected: a zero window or period never
/// makes sense and is almost always a typo.
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(DurationError::NoNumber(text.to_string()));
    }
    let unit_secs: u64 = match unit {
        "" => return Err(DurationError::NoUnit(text.to_string())),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(DurationError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    // Only digits remain, so the sole way to fail is overflow.
    let secs = digits
        .parse::<u64>()
        .ok()
        .and_then(|count| count.checked_mul(unit_secs))
        .filter(|secs| *secs <= MAX_DURATION_SECS)
        .ok_or_else(|| DurationError::TooLong(text.to_string()))?;
    if secs == 0 {
        return Err(DurationError::Zero(text.to_string()));
    }
    Ok(secs)
}
