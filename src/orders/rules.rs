//! The order rules an operator configures: fraud holds, how orders are routed, and the
//! backorder retry's pace. Pure values; `problems()` lists every invalid setting.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OrderRules {
    /// Hold for FRAUD_REVIEW an order whose lines total more than this, in cents; 0 = no limit.
    pub fraud_order_amount_max: i64,
    /// Hold for FRAUD_REVIEW a customer's order beyond this many captured within
    /// `fraud_customer_window_ms`; 0 = no limit. Orders without a customer_id are not counted.
    pub fraud_orders_per_customer_max: u32,
    /// The window of `fraud_orders_per_customer_max`.
    pub fraud_customer_window_ms: u64,
    /// Ship-to countries (ISO 3166-1 alpha-2) accepted without FRAUD_REVIEW; empty = every one.
    pub fraud_allowed_countries: Vec<String>,
    /// Shipments an order may be split into; 0 = routing.max_shipments_max.
    pub max_shipments: usize,
    /// Backordered orders re-routed per pass at most (oldest first); the rest wait for the next.
    pub backorder_retry_batch_len_max: usize,
    /// How often the backorder retry looks for stock that rose (and, every
    /// `backorder_full_pass_interval_ms`, retries every backorder whatever moved).
    pub backorder_retry_interval_ms: u64,
    /// A full pass over every backordered order, for what no stock change signals (capacity
    /// resetting at the start of a capacity day).
    pub backorder_full_pass_interval_ms: u64,
    /// WatchEvents streams open at once at most.
    pub event_watchers_max: usize,
    /// SHIPPED, DELIVERED and CANCELLED orders untouched for this long are forgotten (memory
    /// and disk, with their fulfilment orders and returns); their events stay in the event
    /// log until it is trimmed. 0 = keep every order.
    pub closed_order_retention_ms: u64,
}

impl Default for OrderRules {
    fn default() -> Self {
        Self {
            fraud_order_amount_max: 0,
            fraud_orders_per_customer_max: 0,
            fraud_customer_window_ms: 24 * 3_600 * 1_000,
            fraud_allowed_countries: Vec::new(),
            max_shipments: 0,
            backorder_retry_batch_len_max: 256,
            backorder_retry_interval_ms: 200,
            backorder_full_pass_interval_ms: 60_000,
            event_watchers_max: 1_024,
            closed_order_retention_ms: 90 * 24 * 3_600 * 1_000,
        }
    }
}

impl OrderRules {
    /// Every invalid setting, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.fraud_order_amount_max < 0 {
            problems.push("orders.fraud_order_amount_max must not be negative".into());
        }
        if self.fraud_orders_per_customer_max > 0 && self.fraud_customer_window_ms == 0 {
            problems.push(
                "orders.fraud_customer_window_ms must be at least 1 when a customer limit is set".into(),
            );
        }
        for country in &self.fraud_allowed_countries {
            if country.len() != 2 || !country.bytes().all(|byte| byte.is_ascii_uppercase()) {
                problems.push(format!(
                    "orders.fraud_allowed_countries: {country:?} is not an upper-case ISO 3166-1 alpha-2 code"
                ));
            }
        }
        let positive = [
            ("orders.backorder_retry_batch_len_max", self.backorder_retry_batch_len_max as u64),
            ("orders.backorder_retry_interval_ms", self.backorder_retry_interval_ms),
            ("orders.backorder_full_pass_interval_ms", self.backorder_full_pass_interval_ms),
            ("orders.event_watchers_max", self.event_watchers_max as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        problems
    }
}
