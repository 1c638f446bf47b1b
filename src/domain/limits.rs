//! Request limits (API.md defaults), configurable. Related limits are asserted together.

use serde::Deserialize;

/// Upper bounds on what one request may carry.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Lines in one Reserve (and later order/route) request.
    pub lines_per_request_max: usize,
    /// Entries in one SetStock/AdjustStock batch.
    pub stock_entries_per_batch_max: usize,
    /// SKUs in one GetAvailability or WatchAvailability request.
    pub skus_per_query_max: usize,
    /// Nodes in one UpsertNodes request.
    pub nodes_per_request_max: usize,
    /// Bytes of one gRPC message; larger is RESOURCE_EXHAUSTED.
    pub message_bytes_max: usize,
    /// The longest TTL a reservation may ask for (30 days by default).
    pub ttl_ms_max: u64,
    /// The largest quantity in one line or stock entry: keeps every sum far from i64 overflow.
    pub quantity_max: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            lines_per_request_max: 1_000,
            stock_entries_per_batch_max: 10_000,
            skus_per_query_max: 1_000,
            nodes_per_request_max: 10_000,
            message_bytes_max: 4 * 1024 * 1024,
            ttl_ms_max: 30 * 24 * 3_600 * 1_000,
            quantity_max: 1_000_000_000_000,
        }
    }
}

impl Limits {
    /// Every problem with the limits, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let positive = [
            ("lines_per_request_max", self.lines_per_request_max),
            ("stock_entries_per_batch_max", self.stock_entries_per_batch_max),
            ("skus_per_query_max", self.skus_per_query_max),
            ("nodes_per_request_max", self.nodes_per_request_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("limits.{name} must be at least 1"));
            }
        }
        if self.message_bytes_max < 1024 {
            problems.push("limits.message_bytes_max must be at least 1024".into());
        }
        if self.ttl_ms_max == 0 {
            problems.push("limits.ttl_ms_max must be at least 1".into());
        }
        // A request sums at most stock_entries_per_batch_max quantities of at most quantity_max
        // each; that sum must fit in i64 so no arithmetic on admitted input can overflow.
        let worst_sum = (self.quantity_max as i128)
            * (self.stock_entries_per_batch_max.max(self.lines_per_request_max) as i128);
        if self.quantity_max <= 0 || worst_sum > i64::MAX as i128 / 4 {
            problems.push("limits.quantity_max times the largest batch must stay below i64::MAX / 4".into());
        }
        problems
    }
}
