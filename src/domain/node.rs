//! Fulfilment nodes and the rules that depend only on a node.

use super::ids::{Channel, NodeId};

/// The largest magnitude of a node's counts, costs and priority (the default quantity limit):
/// far from i64 overflow in ATP, capacity and cost arithmetic.
pub const NODE_NUMBER_MAX: i64 = 1_000_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeType {
    Warehouse,
    Store,
    Dropship,
    ThirdParty,
}

/// Shipping cost model, in cents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShippingRates {
    pub base_cost: i64,
    pub cost_per_km: i64,
    pub cost_per_unit: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub node_id: NodeId,
    pub node_type: NodeType,
    pub lat: f64,
    pub lon: f64,
    pub enabled: bool,
    pub can_ship: bool,
    pub can_pickup: bool,
    /// Shipments per day; 0 = unlimited.
    pub daily_capacity: i64,
    pub processing_days: i64,
    pub priority: i64,
    pub rates: ShippingRates,
    pub default_safety_stock: i64,
    /// Empty = every channel. Sorted, no duplicates.
    pub channels: Vec<Channel>,
}

impl Node {
    /// Whether this node's stock counts for `channel` (`None`: no channel filter).
    pub fn serves(&self, channel: Option<&Channel>) -> bool {
        match channel {
            None => true,
            Some(channel) => self.channels.is_empty() || self.channels.binary_search(channel).is_ok(),
        }
    }

    /// Every problem with the node's fields, one line each, naming the field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(-90.0..=90.0).contains(&self.lat) {
            problems.push(format!("location.lat {} is outside [-90, 90]", self.lat));
        }
        if !(-180.0..=180.0).contains(&self.lon) {
            problems.push(format!("location.lon {} is outside [-180, 180]", self.lon));
        }
        let non_negative = [
            ("daily_capacity", self.daily_capacity),
            ("processing_days", self.processing_days),
            ("rates.base_cost", self.rates.base_cost),
            ("rates.cost_per_km", self.rates.cost_per_km),
            ("rates.cost_per_unit", self.rates.cost_per_unit),
            ("default_safety_stock", self.default_safety_stock),
        ];
        for (field, value) in non_negative {
            if value < 0 {
                problems.push(format!("{field} must not be negative (got {value})"));
            } else if value > NODE_NUMBER_MAX {
                problems.push(format!("{field} must be at most {NODE_NUMBER_MAX} (got {value})"));
            }
        }
        if !(-NODE_NUMBER_MAX..=NODE_NUMBER_MAX).contains(&self.priority) {
            problems.push(format!("priority must be within ±{NODE_NUMBER_MAX} (got {})", self.priority));
        }
        problems
    }
}
