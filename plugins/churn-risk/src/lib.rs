//! A weighted churn-risk score over several event windows.
//!
//! Only users who had a session in the last 90 days are scored (so a blank user is never a
//! member). Each signal is between 0 and 1:
//! - `no_recent_sessions`: no session in the last 7 days;
//! - `session_decline`: how far the last week's sessions fall below the 90-day weekly average
//!   (0 when at or above it, 1 when there were none);
//! - `no_purchase`: no completed order in 90 days;
//! - `abandoned_carts`: more add-to-carts than completed orders in the last 30 days.
//!
//! The score is the weighted sum; the user is a member when it reaches `threshold`.
//! `[config]`: `threshold` (required, > 0) and an optional `[config.weights]` table with the
//! signals' names as keys (each >= 0, default 1).

#![no_std]

extern crate alloc;

use alloc::string::String;

use membrane_plugin::{days, event_count, export_plugin, facts, FactSpec, Plugin, Row};

facts! {
    SESSIONS_7D = event_count("session_start").within(days(7));
    SESSIONS_90D = event_count("session_start").within(days(90));
    CARTS_30D = event_count("added_to_cart").within(days(30));
    ORDERS_30D = event_count("order_completed").within(days(30));
    ORDERS_90D = event_count("order_completed").within(days(90));
}

/// Weeks in the 90-day window, for the weekly session average.
const WEEKS_IN_90D: f64 = 90.0 / 7.0;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    threshold: f64,
    #[serde(default)]
    weights: Weights,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Weights {
    no_recent_sessions: f64,
    session_decline: f64,
    no_purchase: f64,
    abandoned_carts: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            no_recent_sessions: 1.0,
            session_decline: 1.0,
            no_purchase: 1.0,
            abandoned_carts: 1.0,
        }
    }
}

impl Weights {
    fn all(&self) -> [(&'static str, f64); 4] {
        [
            ("no_recent_sessions", self.no_recent_sessions),
            ("session_decline", self.session_decline),
            ("no_purchase", self.no_purchase),
            ("abandoned_carts", self.abandoned_carts),
        ]
    }
}

pub struct ChurnRisk {
    threshold: f64,
    weights: Weights,
}

impl ChurnRisk {
    /// The weighted score of a user with at least one session in 90 days.
    fn score(&self, row: &Row<'_>) -> f64 {
        let sessions_7d = row.count(SESSIONS_7D) as f64;
        let weekly_average = row.count(SESSIONS_90D) as f64 / WEEKS_IN_90D;
        let flag = |condition: bool| if condition { 1.0 } else { 0.0 };
        let signals = [
            flag(sessions_7d == 0.0),
            (1.0 - sessions_7d / weekly_average).clamp(0.0, 1.0),
            flag(row.count(ORDERS_90D) == 0),
            flag(row.count(CARTS_30D) > row.count(ORDERS_30D)),
        ];
        self.weights
            .all()
            .iter()
            .zip(signals)
            .map(|((_, weight), signal)| weight * signal)
            .sum()
    }
}

impl Plugin for ChurnRisk {
    const FACTS: &'static [FactSpec] = FACTS;
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        // JSON has no NaN, so plain comparisons cover every value.
        if config.threshold <= 0.0 {
            return Err(alloc::format!(
                "threshold must be greater than 0, got {}",
                config.threshold
            ));
        }
        if let Some((name, weight)) = config
            .weights
            .all()
            .into_iter()
            .find(|(_, weight)| *weight < 0.0)
        {
            return Err(alloc::format!(
                "weights.{name} must be 0 or more, got {weight}"
            ));
        }
        Ok(ChurnRisk {
            threshold: config.threshold,
            weights: config.weights,
        })
    }

    fn evaluate(&self, row: &Row<'_>, _now_ms: i64) -> bool {
        row.count(SESSIONS_90D) > 0 && self.score(row) >= self.threshold
    }
}

export_plugin!(ChurnRisk);

#[cfg(test)]
mod tests {
    extern crate std;

    use alloc::vec;
    use alloc::vec::Vec;
    use membrane_abi::FactValue::{self, Count};
    use membrane_plugin::{configure, testing::evaluate};

    use super::*;

    /// A row from (sessions 7d, sessions 90d, carts 30d, orders 30d, orders 90d).
    fn row(counts: [i64; 5]) -> Vec<FactValue> {
        counts.into_iter().map(Count).collect()
    }

    #[test]
    fn the_weighted_score_decides() {
        let plugin = configure::<ChurnRisk>(
            br#"{"threshold": 2, "weights": {"no_purchase": 1.5, "session_decline": 0.5}}"#,
        )
        .expect("configures");
        let rows = vec![
            // Never active: out whatever the score.
            row([0, 0, 5, 0, 0]),
            // Gone quiet, no purchase: 1 + 0.5 + 1.5.
            row([0, 13, 0, 0, 0]),
            // Gone quiet but buying: 1 + 0.5.
            row([0, 13, 0, 1, 1]),
            // Active, no purchase, an abandoned cart: 0 + 0 + 1.5 + 1.
            row([1, 1, 1, 0, 0]),
            // Active, no purchase, weekly rate half the average: 0.25 + 1.5.
            row([1, 26, 0, 0, 0]),
        ];
        assert_eq!(
            evaluate(&plugin, &rows, 0).expect("evaluates"),
            [false, true, false, true, false]
        );
    }

    #[test]
    fn bad_config_is_explained() {
        let negative =
            configure::<ChurnRisk>(br#"{"threshold": 1, "weights": {"no_purchase": -1}}"#);
        assert_eq!(
            negative.err().as_deref(),
            Some("weights.no_purchase must be 0 or more, got -1")
        );
        let typo = configure::<ChurnRisk>(br#"{"threshold": 1, "weights": {"no_purchases": 1}}"#);
        assert!(typo.err().is_some_and(|e| e.contains("no_purchases")));
        let missing = configure::<ChurnRisk>(b"{}");
        assert!(missing.err().is_some_and(|e| e.contains("threshold")));
    }
}
