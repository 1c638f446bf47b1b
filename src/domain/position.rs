//! A stock position (SKU × node) and the ATP formula.

use super::node::Node;

/// Stock of one SKU at one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub on_hand: i64,
    /// Units held by open reservations (HELD or CONFIRMED).
    pub reserved: i64,
    /// The position's own safety stock; `None` = the node's default.
    pub safety_stock: Option<i64>,
}

impl Position {
    pub fn effective_safety_stock(&self, node: &Node) -> i64 {
        self.safety_stock.unwrap_or(node.default_safety_stock)
    }

    /// `max(0, on_hand − reserved − safety_stock)` for an enabled node, 0 for a disabled one.
    pub fn atp(&self, node: &Node) -> i64 {
        if !node.enabled {
            return 0;
        }
        // Saturating: a corrupt or extreme value must not wrap into a huge ATP.
        self.on_hand.saturating_sub(self.reserved).saturating_sub(self.effective_safety_stock(node)).max(0)
    }
}

/// What a reader sees of a position: the stored values plus the derived ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionView {
    pub sku: super::Sku,
    pub node_id: super::NodeId,
    pub on_hand: i64,
    pub reserved: i64,
    pub safety_stock: i64,
    pub atp: i64,
}

impl PositionView {
    pub fn new(sku: &super::Sku, node: &Node, position: &Position) -> Self {
        Self {
            sku: sku.clone(),
            node_id: node.node_id.clone(),
            on_hand: position.on_hand,
            reserved: position.reserved,
            safety_stock: position.effective_safety_stock(node),
            atp: position.atp(node),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{NodeId, NodeType, ShippingRates};

    fn node(enabled: bool, default_safety_stock: i64) -> Node {
        Node {
            node_id: NodeId::parse("N1").unwrap(),
            node_type: NodeType::Warehouse,
            lat: 0.0,
            lon: 0.0,
            enabled,
            can_ship: true,
            can_pickup: false,
            daily_capacity: 0,
            processing_days: 0,
            priority: 0,
            rates: ShippingRates::default(),
            default_safety_stock,
            channels: Vec::new(),
        }
    }

    #[test]
    fn atp_formula() {
        // Goal: ATP = max(0, on_hand - reserved - safety), 0 when disabled. Method: examples.
        let position = Position { on_hand: 10, reserved: 3, safety_stock: None };
        assert_eq!(position.atp(&node(true, 2)), 5);
        assert_eq!(position.atp(&node(false, 2)), 0);
        let own_safety = Position { safety_stock: Some(9), ..position };
        assert_eq!(own_safety.atp(&node(true, 2)), 0);
        let oversubscribed = Position { on_hand: 1, reserved: 4, safety_stock: Some(0) };
        assert_eq!(oversubscribed.atp(&node(true, 0)), 0);
    }
}
