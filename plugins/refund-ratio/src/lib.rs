//! Users who got refunds for too large a share of their purchases over the last 90 days.
//!
//! `[config]`: `max_ratio` (required, 0..=1): member when refunds / orders exceeds it;
//! `min_orders` (default 1): ignore users with fewer orders in the window (a single refunded
//! order is 100% but says little).

#![no_std]

extern crate alloc;

use alloc::string::String;

use membrane_plugin::{days, event_count, export_plugin, facts, FactSpec, Plugin, Row};

facts! {
    ORDERS_90D = event_count("order_completed").within(days(90));
    REFUNDS_90D = event_count("refund_issued").within(days(90));
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    max_ratio: f64,
    #[serde(default = "one")]
    min_orders: i64,
}

fn one() -> i64 {
    1
}

pub struct RefundRatio {
    max_ratio: f64,
    min_orders: i64,
}

impl Plugin for RefundRatio {
    const FACTS: &'static [FactSpec] = FACTS;
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&config.max_ratio) {
            return Err(alloc::format!(
                "max_ratio must be between 0 and 1, got {}",
                config.max_ratio
            ));
        }
        if config.min_orders < 1 {
            return Err(alloc::format!(
                "min_orders must be at least 1, got {}",
                config.min_orders
            ));
        }
        Ok(RefundRatio {
            max_ratio: config.max_ratio,
            min_orders: config.min_orders,
        })
    }

    fn evaluate(&self, row: &Row<'_>, _now_ms: i64) -> bool {
        let orders = row.count(ORDERS_90D);
        // No orders means no ratio: also what keeps a blank user out.
        orders >= self.min_orders && row.count(REFUNDS_90D) as f64 / orders as f64 > self.max_ratio
    }
}

export_plugin!(RefundRatio);

#[cfg(test)]
mod tests {
    extern crate std;

    use alloc::vec;
    use membrane_abi::FactValue::Count;
    use membrane_plugin::{configure, testing::evaluate};

    use super::*;

    #[test]
    fn refunds_above_the_ratio_are_members() {
        let plugin = configure::<RefundRatio>(br#"{"max_ratio": 0.5, "min_orders": 2}"#)
            .expect("configures");
        let rows = vec![
            vec![Count(0), Count(0)],
            vec![Count(0), Count(3)],
            vec![Count(1), Count(1)],
            vec![Count(2), Count(1)],
            vec![Count(2), Count(2)],
            vec![Count(4), Count(3)],
        ];
        assert_eq!(
            evaluate(&plugin, &rows, 0).expect("evaluates"),
            [false, false, false, false, true, true]
        );
    }

    #[test]
    fn bad_config_is_explained() {
        let error = configure::<RefundRatio>(br#"{"max_ratio": 2}"#).err();
        assert_eq!(
            error.as_deref(),
            Some("max_ratio must be between 0 and 1, got 2")
        );
        let typo = configure::<RefundRatio>(br#"{"max_ratio": 0.5, "min_order": 2}"#).err();
        assert!(typo.is_some_and(|e| e.contains("min_order")));
    }
}
