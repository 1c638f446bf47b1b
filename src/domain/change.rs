//! A change of availability: one position's ATP moved. The commit thread gives each a sequence
//! number as it writes it, so the feed order is the durable log order.

use super::ids::{Channel, NodeId, Sku};
use super::node::Node;

/// The SKU-wide totals at the moment of the change, enough to answer `total_atp` for any
/// channel without looking at the index again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// Sum of ATP over enabled nodes that serve every channel.
    pub unrestricted: i64,
    /// ATP at enabled nodes that serve only some channels (usually none), by node.
    pub restricted: Vec<(NodeId, i64)>,
}

impl Totals {
    /// `total_atp` for `channel` (`None` = every enabled node); `node_serves` tells whether a
    /// restricted node serves the channel.
    pub fn for_channel(
        &self,
        channel: Option<&Channel>,
        node: impl Fn(&NodeId) -> Option<std::sync::Arc<Node>>,
    ) -> i64 {
        let restricted: i64 = self
            .restricted
            .iter()
            .filter(|(node_id, _)| match channel {
                None => true,
                Some(_) => node(node_id).is_some_and(|node| node.serves(channel)),
            })
            .map(|(_, atp)| *atp)
            .sum();
        self.unrestricted + restricted
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailabilityChange {
    pub sku: Sku,
    pub node_id: NodeId,
    pub atp: i64,
    pub totals: Totals,
    /// 0 until the commit thread assigns it.
    pub sequence: u64,
}

/// One state change of an order, reservation, stock position, fulfilment order or return (the
/// audit trail and the event feed). The commit thread gives each its gap-free sequence number.
/// Ids are kept in their wire form; empty when the event does not concern one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditEvent {
    /// 0 until the commit thread assigns it.
    pub sequence: u64,
    pub at_ms: u64,
    /// "<entity>.<change>", e.g. "order.captured".
    pub event_type: String,
    pub reservation_id: Option<u64>,
    pub detail: String,
    pub order_id: String,
    pub sku: String,
    pub node_id: String,
    pub fulfilment_order_id: String,
    pub return_id: String,
    /// Who caused it: "system", or the channel, node or operator of the request.
    pub actor: String,
    /// Units involved when one quantity applies; else 0.
    pub qty: i64,
}

impl AuditEvent {
    pub fn new(event_type: &str, at_ms: u64, actor: &str) -> Self {
        Self { event_type: event_type.to_string(), at_ms, actor: actor.to_string(), ..Self::default() }
    }
}
