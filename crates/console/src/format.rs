//! Compact text forms of ages, durations and trends, k9s style.

use chrono::{DateTime, TimeDelta, Utc};

/// `then`'s age at `now` in its largest whole unit: `0s`, `42s`, `5m`, `3h`, `12d`.
pub fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    span(now.signed_duration_since(then))
}

/// A non-negative span in its largest whole unit; negative spans (clock skew) read as `0s`.
pub fn span(delta: TimeDelta) -> String {
    let seconds = delta.num_seconds().max(0);
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3_600 => format!("{}m", seconds / 60),
        3_600..86_400 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

/// A sweep's duration with millisecond precision below ten seconds: `250ms`, `1.5s`, `42s`.
pub fn elapsed(delta: TimeDelta) -> String {
    let millis = delta.num_milliseconds().max(0);
    match millis {
        0..1_000 => format!("{millis}ms"),
        1_000..10_000 => format!("{:.1}s", millis as f64 / 1_000.0),
        _ => span(delta),
    }
}

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Samples as block characters scaled between their minimum and maximum, so a small change in
/// a large bucket still shows.
pub fn trend(samples: &[i64]) -> String {
    let (Some(&low), Some(&high)) = (samples.iter().min(), samples.iter().max()) else {
        return String::new();
    };
    let range = (high - low).max(1) as f64;
    samples
        .iter()
        .map(|&sample| {
            let level = ((sample - low) as f64 / range * (BARS.len() - 1) as f64).round();
            BARS[level as usize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_use_the_largest_whole_unit() {
        let now = DateTime::UNIX_EPOCH + TimeDelta::days(30);
        assert_eq!(age(now, now), "0s");
        assert_eq!(age(now, now - TimeDelta::seconds(59)), "59s");
        assert_eq!(age(now, now - TimeDelta::seconds(61)), "1m");
        assert_eq!(age(now, now - TimeDelta::hours(5)), "5h");
        assert_eq!(age(now, now - TimeDelta::days(12)), "12d");
        assert_eq!(age(now, now + TimeDelta::seconds(3)), "0s");
    }

    #[test]
    fn elapsed_keeps_precision_for_short_runs() {
        assert_eq!(elapsed(TimeDelta::milliseconds(250)), "250ms");
        assert_eq!(elapsed(TimeDelta::milliseconds(1_540)), "1.5s");
        assert_eq!(elapsed(TimeDelta::seconds(75)), "1m");
    }

    #[test]
    fn trend_scales_between_min_and_max() {
        assert_eq!(trend(&[10, 11, 12, 13]), "▁▃▆█");
        assert_eq!(trend(&[5, 5]), "▁▁");
        assert_eq!(trend(&[]), "");
    }
}
