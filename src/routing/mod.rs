//! Distributed order management: which nodes fulfil an order. `route` turns a request, the
//! node table, ATP and capacity into a `RoutePlan`. It filters nodes with a named reason for
//! each exclusion, plans with `planner`, then applies the partial and backorder rules. Pure
//! and deterministic: the same inputs always give the same plan.
//! May import `domain`; must not import `index`, `store` or `api` (the index calls in).

pub mod geo;
pub mod planner;
pub mod rules;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::domain::{Channel, Node, NodeId, Sku};
pub use planner::{Candidate, Plan, PlanOptions};
pub use rules::RoutingRules;

/// Where the goods go.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    Ship {
        lat: f64,
        lon: f64,
    },
    /// Buy online, pick up in store: only this node may serve.
    Pickup {
        node_id: NodeId,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteOptions {
    /// 0 = the configured maximum.
    pub max_shipments: usize,
    pub allow_partial: bool,
    pub allow_backorder: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteRequest {
    /// Distinct SKUs, qty > 0.
    pub lines: Vec<(Sku, i64)>,
    pub destination: Destination,
    pub channel: Option<Channel>,
    pub options: RouteOptions,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Shipment {
    pub node_id: NodeId,
    /// Ordered by SKU.
    pub lines: Vec<(Sku, i64)>,
    pub cost: i64,
    pub distance_km: f64,
    pub estimated_days: i64,
}

pub use crate::domain::UnroutableReason;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unroutable {
    pub sku: Sku,
    pub qty: i64,
    pub reason: UnroutableReason,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExplanationReason {
    Selected,
    NotSelected,
    Disabled,
    CannotShip,
    CannotPickup,
    ChannelNotAllowed,
    CapacityExhausted,
    NoAtp,
    NotPickupNode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub node_id: NodeId,
    pub considered: bool,
    pub reason: ExplanationReason,
    /// Set for per-SKU reasons.
    pub sku: Option<Sku>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan {
    /// Ordered by node_id.
    pub shipments: Vec<Shipment>,
    /// Ordered by SKU.
    pub backordered: Vec<(Sku, i64)>,
    /// Ordered by SKU.
    pub unroutable: Vec<Unroutable>,
    pub total_cost: i64,
    /// Ordered by node_id, then SKU.
    pub explanation: Vec<Explanation>,
    /// Whether the search proved the plan optimal (see `planner`).
    pub optimal: bool,
    /// What the planner minimised: total_cost plus the split penalties.
    pub objective: i64,
    /// A lower bound on `objective` for any plan routing as many units; equal to `objective`
    /// when `optimal`. The gap is the heuristic's quality bound.
    pub objective_lower_bound: i64,
}

impl RoutePlan {
    /// Units per (sku, node) of the shipments: what Allocate reserves.
    pub fn reserved_lines(&self) -> Vec<(Sku, NodeId, i64)> {
        self.shipments
            .iter()
            .flat_map(|shipment| {
                shipment.lines.iter().map(|(sku, qty)| (sku.clone(), shipment.node_id.clone(), *qty))
            })
            .collect()
    }
}

impl RoutePlan {
    /// The plan and its explanation as one line of text, for the audit log: what was chosen,
    /// at what cost, and why every other node was not.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut text = String::with_capacity(128 + 32 * self.explanation.len());
        text.push_str("shipments:");
        for shipment in &self.shipments {
            let _ = write!(
                text,
                " {} [{}] cost {} distance_km {:.1} days {};",
                shipment.node_id,
                shipment.lines.iter().map(|(sku, qty)| format!("{sku}x{qty}")).collect::<Vec<_>>().join(" "),
                shipment.cost,
                shipment.distance_km,
                shipment.estimated_days
            );
        }
        let _ = write!(text, " total_cost {} objective {}", self.total_cost, self.objective);
        let _ = write!(text, " optimal {} lower_bound {}", self.optimal, self.objective_lower_bound);
        if !self.backordered.is_empty() {
            text.push_str(" | backordered:");
            for (sku, qty) in &self.backordered {
                let _ = write!(text, " {sku}x{qty}");
            }
        }
        if !self.unroutable.is_empty() {
            text.push_str(" | unroutable:");
            for entry in &self.unroutable {
                let _ = write!(text, " {}x{} {:?}", entry.sku, entry.qty, entry.reason);
            }
        }
        // Every node but the merely more expensive ones (counted): the log stays small with
        // a thousand nodes and still says why each node that could not serve was out.
        let not_selected =
            self.explanation.iter().filter(|entry| entry.reason == ExplanationReason::NotSelected).count();
        let _ = write!(text, " | not_selected {not_selected} | explanation:");
        for entry in self.explanation.iter().filter(|entry| entry.reason != ExplanationReason::NotSelected) {
            let _ = write!(text, " {} {:?}", entry.node_id, entry.reason);
            if let Some(sku) = &entry.sku {
                let _ = write!(text, "({sku})");
            }
            text.push(';');
        }
        text
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("pickup_node_id: node {0:?} does not exist")]
    UnknownPickupNode(String),
}

/// What `route` needs to know about current stock and capacity.
pub trait StockSource {
    /// ATP of line `line` (index into the request's lines) at each node holding the SKU,
    /// sorted by node id; nodes not listed have none. Borrowed when the source already holds
    /// the list (a snapshot), owned when it builds it (the locked shards).
    fn line_atp(&self, line: usize) -> Cow<'_, [(NodeId, i64)]>;
    /// Whether the node can take one more shipment today.
    fn has_capacity(&self, node: &Node) -> bool;
}

/// Why a node is out before stock is looked at.
fn node_exclusion(node: &Node, request: &RouteRequest, rules: &RoutingRules) -> Option<ExplanationReason> {
    if !node.enabled {
        return Some(ExplanationReason::Disabled);
    }
    match &request.destination {
        Destination::Ship { .. } if !node.can_ship => return Some(ExplanationReason::CannotShip),
        Destination::Pickup { node_id } if *node_id != node.node_id => {
            return Some(ExplanationReason::NotPickupNode);
        }
        Destination::Pickup { .. } if !node.can_pickup => return Some(ExplanationReason::CannotPickup),
        _ => {}
    }
    if !node.serves(request.channel.as_ref())
        || !rules.channel_allows(request.channel.as_ref(), &node.node_id)
    {
        return Some(ExplanationReason::ChannelNotAllowed);
    }
    None
}

/// Plans `request` over `nodes` (sorted by node_id).
pub fn route(
    request: &RouteRequest,
    nodes: &[Arc<Node>],
    stock: &dyn StockSource,
    rules: &RoutingRules,
) -> Result<RoutePlan, RouteError> {
    if let Destination::Pickup { node_id } = &request.destination
        && !nodes.iter().any(|node| node.node_id == *node_id)
    {
        return Err(RouteError::UnknownPickupNode(node_id.to_string()));
    }
    let line_count = request.lines.len();
    let demand: Vec<i64> = request.lines.iter().map(|(_, qty)| *qty).collect();
    // Each line's positions, sorted by node: merged with the node list in one pass.
    let line_atp: Vec<Cow<'_, [(NodeId, i64)]>> = (0..line_count).map(|line| stock.line_atp(line)).collect();
    let mut cursors = vec![0usize; line_count];
    let mut atp_row = vec![0i64; line_count];
    // Per node, in node order: why it is out, or which candidate it is.
    let mut statuses: Vec<Result<usize, ExplanationReason>> = Vec::with_capacity(nodes.len());
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut candidate_nodes: Vec<(usize, f64)> = Vec::new();
    // Per line: why stock outside the candidates did not count.
    let mut excluded_with_stock: Vec<Option<ExplanationReason>> = vec![None; line_count];
    let mut any_node_passes_filters = false;
    for (order, node) in nodes.iter().enumerate() {
        for line in 0..line_count {
            let positions = &line_atp[line];
            let cursor = &mut cursors[line];
            while *cursor < positions.len() && positions[*cursor].0 < node.node_id {
                *cursor += 1;
            }
            atp_row[line] = match positions.get(*cursor) {
                Some((node_id, atp)) if *node_id == node.node_id => *atp,
                _ => 0,
            };
        }
        let mut exclusion = node_exclusion(node, request, rules);
        if exclusion.is_none() {
            any_node_passes_filters = true;
            if !stock.has_capacity(node) {
                exclusion = Some(ExplanationReason::CapacityExhausted);
            }
        }
        if let Some(reason) = exclusion {
            if reason != ExplanationReason::NotPickupNode {
                for (line, slot) in excluded_with_stock.iter_mut().enumerate() {
                    if atp_row[line] > 0 {
                        // Capacity is the most actionable reason, then channel.
                        let rank = |reason: ExplanationReason| match reason {
                            ExplanationReason::CapacityExhausted => 0,
                            ExplanationReason::ChannelNotAllowed => 1,
                            _ => 2,
                        };
                        if slot.is_none_or(|current| rank(reason) < rank(current)) {
                            *slot = Some(reason);
                        }
                    }
                }
            }
            statuses.push(Err(reason));
            continue;
        }
        if atp_row.iter().all(|atp| *atp <= 0) {
            statuses.push(Err(ExplanationReason::NoAtp));
            continue;
        }
        let available: Vec<i64> = (0..line_count).map(|line| atp_row[line].clamp(0, demand[line])).collect();
        statuses.push(Ok(candidates.len()));
        let distance_km = match &request.destination {
            Destination::Ship { lat, lon } => geo::distance_km(node.lat, node.lon, *lat, *lon),
            Destination::Pickup { .. } => 0.0,
        };
        candidates.push(Candidate {
            fixed_cost: geo::fixed_cost(node.rates.base_cost, node.rates.cost_per_km, distance_km),
            cost_per_unit: node.rates.cost_per_unit,
            priority: node.priority,
            order,
            available,
        });
        candidate_nodes.push((order, distance_km));
    }
    let max_shipments = match request.destination {
        Destination::Pickup { .. } => 1,
        Destination::Ship { .. } => match request.options.max_shipments {
            0 => rules.max_shipments_max,
            requested => requested.min(rules.max_shipments_max),
        },
    };
    let plan = planner::plan(
        &demand,
        &candidates,
        PlanOptions {
            max_shipments,
            split_penalty: rules.split_penalty,
            expansion_budget: rules.expansion_budget,
        },
    );
    let all_routed = plan.unrouted.iter().all(|units| *units == 0);
    let ship = all_routed || request.options.allow_partial;
    let mut shipments = Vec::new();
    let mut selected = vec![false; candidates.len()];
    if ship {
        for assignment in &plan.assignments {
            selected[assignment.candidate] = true;
            let candidate = &candidates[assignment.candidate];
            let (order, distance_km) = candidate_nodes[assignment.candidate];
            let node = &nodes[order];
            let mut lines: Vec<(Sku, i64)> = assignment
                .units
                .iter()
                .enumerate()
                .filter(|(_, units)| **units > 0)
                .map(|(line, units)| (request.lines[line].0.clone(), *units))
                .collect();
            lines.sort_by(|a, b| a.0.cmp(&b.0));
            let units: i64 = lines.iter().map(|(_, units)| units).sum();
            shipments.push(Shipment {
                node_id: node.node_id.clone(),
                lines,
                cost: candidate.fixed_cost.saturating_add(candidate.cost_per_unit.saturating_mul(units)),
                distance_km,
                estimated_days: match request.destination {
                    Destination::Ship { .. } => {
                        geo::estimated_days(node.processing_days, distance_km, rules.km_per_day)
                    }
                    Destination::Pickup { .. } => node.processing_days,
                },
            });
        }
    }
    shipments.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    // Built in node order, and per node in SKU order: no sort of the whole list.
    let mut lines_by_sku: Vec<usize> = (0..line_count).collect();
    lines_by_sku.sort_by(|a, b| request.lines[*a].0.cmp(&request.lines[*b].0));
    let mut explanation = Vec::with_capacity(nodes.len());
    for (node, status) in nodes.iter().zip(&statuses) {
        let index = match status {
            Err(reason) => {
                let entry = Explanation {
                    node_id: node.node_id.clone(),
                    considered: false,
                    reason: *reason,
                    sku: None,
                };
                explanation.push(entry);
                continue;
            }
            Ok(index) => *index,
        };
        let reason =
            if selected[index] { ExplanationReason::Selected } else { ExplanationReason::NotSelected };
        explanation.push(Explanation { node_id: node.node_id.clone(), considered: true, reason, sku: None });
        if !selected[index] {
            // Cost decided against it; listing the SKUs it lacks would add noise (and, with
            // a thousand nodes, most of the response).
            continue;
        }
        for &line in &lines_by_sku {
            if candidates[index].available[line] == 0 {
                explanation.push(Explanation {
                    node_id: node.node_id.clone(),
                    considered: true,
                    reason: ExplanationReason::NoAtp,
                    sku: Some(request.lines[line].0.clone()),
                });
            }
        }
    }

    let mut backordered = BTreeMap::new();
    let mut unroutable = Vec::new();
    for (line, (sku, qty)) in request.lines.iter().enumerate() {
        let short = plan.unrouted[line];
        let routable = qty - short;
        let short_reason = || -> UnroutableReason {
            if let Destination::Pickup { node_id } = &request.destination {
                let pickup_excluded = nodes
                    .iter()
                    .zip(&statuses)
                    .find(|(node, _)| node.node_id == *node_id)
                    .and_then(|(_, status)| status.err());
                return match pickup_excluded {
                    Some(ExplanationReason::CapacityExhausted) => UnroutableReason::CapacityExhausted,
                    Some(
                        ExplanationReason::Disabled
                        | ExplanationReason::CannotPickup
                        | ExplanationReason::ChannelNotAllowed,
                    ) => UnroutableReason::PickupNodeUnavailable,
                    _ => UnroutableReason::PickupNodeLacksStock,
                };
            }
            if !any_node_passes_filters {
                return UnroutableReason::NoEligibleNode;
            }
            let candidate_units: i64 = candidates.iter().map(|candidate| candidate.available[line]).sum();
            if candidate_units >= *qty {
                return UnroutableReason::MaxShipmentsExceeded;
            }
            match excluded_with_stock[line] {
                Some(ExplanationReason::CapacityExhausted) => UnroutableReason::CapacityExhausted,
                Some(ExplanationReason::ChannelNotAllowed) => UnroutableReason::ChannelNotAllowed,
                _ => UnroutableReason::NoStock,
            }
        };
        let mut place = |units: i64, reason: UnroutableReason| {
            if units == 0 {
                return;
            }
            // Waiting helps units short of stock or capacity, and (all or nothing) the routable
            // units waiting for them; other reasons do not go away by waiting.
            let waits = reason.backorderable() || reason == UnroutableReason::PartialNotAllowed;
            if request.options.allow_backorder && waits {
                *backordered.entry(sku.clone()).or_insert(0) += units;
            } else {
                unroutable.push(Unroutable { sku: sku.clone(), qty: units, reason, detail: detail(reason) });
            }
        };
        if ship {
            if short > 0 {
                place(short, short_reason());
            }
        } else {
            // All or nothing and not everything fits: nothing ships.
            if short > 0 {
                place(short, short_reason());
            }
            place(routable, UnroutableReason::PartialNotAllowed);
        }
    }
    unroutable.sort_by(|a, b| a.sku.cmp(&b.sku));
    let total_cost = shipments.iter().map(|shipment| shipment.cost).fold(0i64, i64::saturating_add);
    let to_cents = |cost: i128| i64::try_from(cost.max(0)).unwrap_or(i64::MAX);
    let (objective, objective_lower_bound) = if ship {
        // The bound's cost part bounds plans routing as many units only when the bound's
        // unrouted count is the plan's; otherwise all it says is 0.
        let bound =
            if plan.lower_bound.unrouted == plan.objective.unrouted { plan.lower_bound.cost } else { 0 };
        (to_cents(plan.objective.cost), to_cents(bound.min(plan.objective.cost)))
    } else {
        (0, 0)
    };
    Ok(RoutePlan {
        shipments,
        backordered: backordered.into_iter().collect(),
        unroutable,
        total_cost,
        explanation,
        optimal: plan.optimal,
        objective,
        objective_lower_bound,
    })
}

fn detail(reason: UnroutableReason) -> String {
    match reason {
        UnroutableReason::NoStock => "no eligible node has ATP for these units",
        UnroutableReason::NoEligibleNode => "no node is enabled, serves the channel and can ship",
        UnroutableReason::PickupNodeLacksStock => "the pickup node does not have these units",
        UnroutableReason::CapacityExhausted => "nodes holding these units have no capacity left today",
        UnroutableReason::ChannelNotAllowed => "nodes holding these units do not serve the channel",
        UnroutableReason::PickupNodeUnavailable => "the pickup node cannot take pickups for this channel",
        UnroutableReason::MaxShipmentsExceeded => "serving these units needs more shipments than allowed",
        UnroutableReason::PartialNotAllowed => "routable, but partial fulfilment is not allowed",
    }
    .to_string()
}
