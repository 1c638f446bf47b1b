mod common;

// Tests of the routing (distributed order management) part of Allot:
// A. golden cases with hand-computed answers, calling `allot::routing::route` directly;
// B. seeded property tests: feasibility, optimality against brute force, planner vs greedy;
// C. end to end over gRPC against an in-process daemon (Route, Allocate, capacity, restart);
// D. concurrent Allocates never promise a unit twice nor exceed a node's daily capacity.
//
// Distances in the golden cases: every node sits on the equator and ships to (0, 0), so a node
// at longitude d is R × d × π / 180 km away (R = 6,371.0088 km, the code's Earth radius):
// 1° = 111.195 km, 2° = 222.390 km, 3° = 333.585 km, 5° = 555.975 km, 10° = 1,111.951 km,
// 20° = 2,223.902 km. Shipment cost = base_cost + round(cost_per_km × km) + cost_per_unit × units.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allot::clock::{Clock, ManualClock};
use allot::domain::{Channel, Node, NodeId, NodeType, ShippingRates, Sku};
use allot::proto::v1;
use allot::routing::planner::{self, Candidate, PlanOptions};
use allot::routing::{
    Destination, ExplanationReason, RouteError, RouteOptions, RoutePlan, RouteRequest, RoutingRules,
    StockSource, UnroutableReason, geo, route,
};
use allot::server::Running;
use common::InventoryClient;
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError, TestRunner};
use rand::{Rng, SeedableRng};
use tonic::Code;

use v1::route_plan::explanation::Reason as WireExplanation;
use v1::route_plan::unroutable::Reason as WireUnroutable;

/// Kilometres per degree of longitude on the equator (R × π / 180 with R = 6,371.0088 km).
const KM_PER_DEGREE: f64 = 111.195_080_233_532_9;
/// A fixed instant at 12:00 UTC (2025-06-15): capacity days never roll over mid-test.
const NOON_MS: u64 = 1_749_988_800_000;
const DAY_MS: u64 = 86_400_000;
/// Upper bound on any single wait; a hang fails with a message. Not a speed assertion.
const WAIT_MAX: Duration = Duration::from_secs(20);

// ----- helpers for direct `route` calls -------------------------------------------------------

/// ATP per (line index, node id) and the nodes without capacity left today.
#[derive(Debug, Clone, Default)]
struct TableStock {
    atp: BTreeMap<(usize, String), i64>,
    no_capacity: BTreeSet<String>,
}

impl TableStock {
    fn with(mut self, line: usize, node_id: &str, atp: i64) -> TableStock {
        self.atp.insert((line, node_id.to_string()), atp);
        self
    }

    fn full(mut self, node_id: &str) -> TableStock {
        self.no_capacity.insert(node_id.to_string());
        self
    }
}

impl TableStock {
    /// ATP of `line` at `node_id` (0 when not listed).
    fn atp_at(&self, line: usize, node_id: &NodeId) -> i64 {
        self.atp.get(&(line, node_id.as_str().to_string())).copied().unwrap_or(0)
    }
}

impl StockSource for TableStock {
    fn line_atp(&self, line: usize) -> std::borrow::Cow<'_, [(NodeId, i64)]> {
        // The map's order is (line, node id): each line's positions come out sorted by node.
        self.atp
            .range((line, String::new())..(line + 1, String::new()))
            .map(|((_, node), atp)| (node_id(node), *atp))
            .collect()
    }

    fn has_capacity(&self, node: &Node) -> bool {
        !self.no_capacity.contains(node.node_id.as_str())
    }
}

fn sku(raw: &str) -> Sku {
    Sku::parse(raw).unwrap()
}

fn node_id(raw: &str) -> NodeId {
    NodeId::parse(raw).unwrap()
}

fn channel(raw: &str) -> Channel {
    Channel::parse(raw).unwrap()
}

/// An enabled warehouse on the equator at longitude `lon` that ships on every channel, with
/// one processing day, priority 0 and no capacity limit.
fn equator_node(id: &str, lon: f64, base_cost: i64, cost_per_km: i64, cost_per_unit: i64) -> Node {
    Node {
        node_id: node_id(id),
        node_type: NodeType::Warehouse,
        lat: 0.0,
        lon,
        enabled: true,
        can_ship: true,
        can_pickup: false,
        daily_capacity: 0,
        processing_days: 1,
        priority: 0,
        rates: ShippingRates { base_cost, cost_per_km, cost_per_unit },
        default_safety_stock: 0,
        channels: Vec::new(),
    }
}

/// The node table `route` expects: sorted by node_id, no duplicates.
fn table(mut nodes: Vec<Node>) -> Vec<Arc<Node>> {
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    assert!(nodes.windows(2).all(|pair| pair[0].node_id < pair[1].node_id), "duplicate node ids");
    nodes.into_iter().map(Arc::new).collect()
}

fn options(max_shipments: usize, allow_partial: bool, allow_backorder: bool) -> RouteOptions {
    RouteOptions { max_shipments, allow_partial, allow_backorder }
}

/// A SHIP request to (0, 0) without channel.
fn ship_request(lines: &[(&str, i64)], options: RouteOptions) -> RouteRequest {
    RouteRequest {
        lines: lines.iter().map(|(raw, qty)| (sku(raw), *qty)).collect(),
        destination: Destination::Ship { lat: 0.0, lon: 0.0 },
        channel: None,
        options,
    }
}

fn pickup_request(store: &str, lines: &[(&str, i64)], options: RouteOptions) -> RouteRequest {
    RouteRequest {
        destination: Destination::Pickup { node_id: node_id(store) },
        ..ship_request(lines, options)
    }
}

fn rules_with_penalty(split_penalty: i64) -> RoutingRules {
    RoutingRules { split_penalty, ..RoutingRules::default() }
}

/// Routes and checks the plan's structural invariants (see `check_plan`).
#[track_caller]
fn route_checked(
    request: &RouteRequest,
    nodes: &[Arc<Node>],
    stock: &TableStock,
    rules: &RoutingRules,
) -> RoutePlan {
    let plan = route(request, nodes, stock, rules).expect("route");
    if let Err(problem) = check_plan(request, nodes, stock, rules, &plan) {
        panic!("{problem}\nplan: {plan:#?}");
    }
    plan
}

/// (node, [(sku, qty)], cost) of one shipment.
type ShipmentSummary = (String, Vec<(String, i64)>, i64);
/// (node, [(sku, qty)], cost) of an expected shipment.
type ExpectedShipment<'a> = (&'a str, &'a [(&'a str, i64)], i64);

/// (node, [(sku, qty)], cost) per shipment.
fn shipments(plan: &RoutePlan) -> Vec<ShipmentSummary> {
    plan.shipments
        .iter()
        .map(|shipment| {
            let lines = shipment.lines.iter().map(|(sku, qty)| (sku.to_string(), *qty)).collect();
            (shipment.node_id.to_string(), lines, shipment.cost)
        })
        .collect()
}

/// Builds the expected value of `shipments`.
fn expect_shipments(expected: &[ExpectedShipment<'_>]) -> Vec<ShipmentSummary> {
    expected
        .iter()
        .map(|(node, lines, cost)| {
            (node.to_string(), lines.iter().map(|(sku, qty)| (sku.to_string(), *qty)).collect(), *cost)
        })
        .collect()
}

fn backordered(plan: &RoutePlan) -> Vec<(String, i64)> {
    plan.backordered.iter().map(|(sku, qty)| (sku.to_string(), *qty)).collect()
}

fn unroutable(plan: &RoutePlan) -> Vec<(String, i64, UnroutableReason)> {
    plan.unroutable.iter().map(|entry| (entry.sku.to_string(), entry.qty, entry.reason)).collect()
}

fn owned(expected: &[(&str, i64)]) -> Vec<(String, i64)> {
    expected.iter().map(|(sku, qty)| (sku.to_string(), *qty)).collect()
}

fn owned_unroutable(expected: &[(&str, i64, UnroutableReason)]) -> Vec<(String, i64, UnroutableReason)> {
    expected.iter().map(|(sku, qty, reason)| (sku.to_string(), *qty, *reason)).collect()
}

/// (node, sku, considered, reason) per explanation entry.
fn explained(plan: &RoutePlan) -> Vec<(String, Option<String>, bool, ExplanationReason)> {
    plan.explanation
        .iter()
        .map(|entry| {
            (
                entry.node_id.to_string(),
                entry.sku.as_ref().map(ToString::to_string),
                entry.considered,
                entry.reason,
            )
        })
        .collect()
}

fn owned_explanation(
    expected: &[(&str, Option<&str>, bool, ExplanationReason)],
) -> Vec<(String, Option<String>, bool, ExplanationReason)> {
    expected
        .iter()
        .map(|(node, sku, considered, reason)| {
            (node.to_string(), sku.map(ToString::to_string), *considered, *reason)
        })
        .collect()
}

/// The reason recorded for `node` as a whole.
fn node_reason(plan: &RoutePlan, node: &str) -> ExplanationReason {
    plan.explanation
        .iter()
        .find(|entry| entry.node_id.as_str() == node && entry.sku.is_none())
        .unwrap_or_else(|| panic!("no explanation for {node}: {plan:#?}"))
        .reason
}

/// Whether `node` may serve `request` at all (the eligibility rule of API.md, stock aside).
fn node_eligible(node: &Node, request: &RouteRequest, rules: &RoutingRules, stock: &dyn StockSource) -> bool {
    let method_ok = match &request.destination {
        Destination::Ship { .. } => node.can_ship,
        Destination::Pickup { node_id } => *node_id == node.node_id && node.can_pickup,
    };
    let channel_ok = match &request.channel {
        None => true,
        Some(channel) => {
            (node.channels.is_empty() || node.channels.contains(channel))
                && rules
                    .channel_nodes
                    .get(channel.as_str())
                    .is_none_or(|listed| listed.contains(&node.node_id.to_string()))
        }
    };
    node.enabled && method_ok && channel_ok && stock.has_capacity(node)
}

/// The effective shipment limit of a request.
fn effective_max_shipments(request: &RouteRequest, rules: &RoutingRules) -> usize {
    match request.destination {
        Destination::Pickup { .. } => 1,
        Destination::Ship { .. } => match request.options.max_shipments {
            0 => rules.max_shipments_max,
            requested => requested.min(rules.max_shipments_max),
        },
    }
}

macro_rules! ensure {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(format!($($message)+));
        }
    };
}

/// Every structural promise of routing.proto that holds for any plan: feasibility (never more
/// than ATP, only eligible nodes, every unit accounted for once, within max_shipments, no node
/// twice), the orderings, the cost and transit formulas, all-or-nothing without allow_partial,
/// backorders only with allow_backorder, and an explanation for every node.
fn check_plan(
    request: &RouteRequest,
    nodes: &[Arc<Node>],
    stock: &TableStock,
    rules: &RoutingRules,
    plan: &RoutePlan,
) -> Result<(), String> {
    let by_id: BTreeMap<&NodeId, &Arc<Node>> = nodes.iter().map(|node| (&node.node_id, node)).collect();
    let line_of: BTreeMap<&Sku, usize> =
        request.lines.iter().enumerate().map(|(line, (sku, _))| (sku, line)).collect();
    ensure!(
        plan.shipments.windows(2).all(|pair| pair[0].node_id < pair[1].node_id),
        "shipments not strictly ordered by node_id (a node twice?)"
    );
    ensure!(
        plan.shipments.len() <= effective_max_shipments(request, rules),
        "{} shipments, more than the limit {}",
        plan.shipments.len(),
        effective_max_shipments(request, rules)
    );
    let mut shipped = vec![0i64; request.lines.len()];
    for shipment in &plan.shipments {
        let node = by_id.get(&shipment.node_id).ok_or(format!("unknown node {}", shipment.node_id))?;
        ensure!(
            node_eligible(node, request, rules, stock),
            "node {} is not eligible but ships",
            node.node_id
        );
        ensure!(!shipment.lines.is_empty(), "an empty shipment from {}", node.node_id);
        ensure!(
            shipment.lines.windows(2).all(|pair| pair[0].0 < pair[1].0),
            "shipment lines of {} not strictly ordered by sku",
            node.node_id
        );
        let mut units = 0;
        for (sku, qty) in &shipment.lines {
            let line = *line_of.get(sku).ok_or(format!("{sku} ships but was not requested"))?;
            ensure!(*qty > 0, "{sku} ships {qty} from {}", node.node_id);
            let atp = stock.atp_at(line, &node.node_id);
            ensure!(*qty <= atp, "{sku}: {qty} from {} with only {atp} ATP", node.node_id);
            shipped[line] += qty;
            units += qty;
        }
        let distance_km = match request.destination {
            Destination::Ship { lat, lon } => geo::distance_km(node.lat, node.lon, lat, lon),
            Destination::Pickup { .. } => 0.0,
        };
        let distance_matches = (shipment.distance_km - distance_km).abs() <= 1e-6;
        ensure!(distance_matches, "distance of {}: {} != {distance_km}", node.node_id, shipment.distance_km);
        let cost = node.rates.base_cost
            + (node.rates.cost_per_km as f64 * distance_km).round() as i64
            + node.rates.cost_per_unit * units;
        ensure!(shipment.cost == cost, "cost of {}: {} != {cost}", node.node_id, shipment.cost);
        let days = node.processing_days + (distance_km / rules.km_per_day).ceil() as i64;
        ensure!(
            shipment.estimated_days == days,
            "days of {}: {} != {days}",
            node.node_id,
            shipment.estimated_days
        );
    }
    ensure!(plan.backordered.windows(2).all(|pair| pair[0].0 < pair[1].0), "backordered not ordered by sku");
    ensure!(
        plan.unroutable.windows(2).all(|pair| pair[0].sku <= pair[1].sku),
        "unroutable not ordered by sku"
    );
    ensure!(
        request.options.allow_backorder || plan.backordered.is_empty(),
        "backorders without allow_backorder"
    );
    let mut waiting = vec![0i64; request.lines.len()];
    for (sku, qty) in &plan.backordered {
        ensure!(*qty > 0, "backordered {sku} x{qty}");
        waiting[*line_of.get(sku).ok_or(format!("{sku} backordered but not requested"))?] += qty;
    }
    for entry in &plan.unroutable {
        ensure!(entry.qty > 0, "unroutable {} x{}", entry.sku, entry.qty);
        ensure!(
            request.options.allow_partial
                || plan.shipments.is_empty()
                || entry.reason != UnroutableReason::PartialNotAllowed,
            "PARTIAL_NOT_ALLOWED while shipping"
        );
        ensure!(
            !(request.options.allow_partial && entry.reason == UnroutableReason::PartialNotAllowed),
            "PARTIAL_NOT_ALLOWED with allow_partial"
        );
        waiting[*line_of.get(&entry.sku).ok_or(format!("{} unroutable but not requested", entry.sku))?] +=
            entry.qty;
    }
    for (line, (sku, qty)) in request.lines.iter().enumerate() {
        ensure!(
            shipped[line] + waiting[line] == *qty,
            "{sku}: shipped {} + backordered/unroutable {} != requested {qty}",
            shipped[line],
            waiting[line]
        );
    }
    let everything_shipped = request.lines.iter().enumerate().all(|(line, (_, qty))| shipped[line] == *qty);
    ensure!(
        request.options.allow_partial || everything_shipped || plan.shipments.is_empty(),
        "a partial plan without allow_partial"
    );
    let total_cost: i64 = plan.shipments.iter().map(|shipment| shipment.cost).sum();
    ensure!(plan.total_cost == total_cost, "total_cost {} != sum of costs {total_cost}", plan.total_cost);
    let objective = if plan.shipments.is_empty() {
        0
    } else {
        total_cost + rules.split_penalty * (plan.shipments.len() as i64 - 1)
    };
    ensure!(plan.objective == objective, "objective {} != {objective}", plan.objective);
    ensure!(plan.objective_lower_bound <= plan.objective, "lower bound above the objective");
    ensure!(!plan.optimal || plan.objective_lower_bound == plan.objective, "optimal but bound != objective");
    ensure!(
        plan.explanation
            .windows(2)
            .all(|pair| (&pair[0].node_id, &pair[0].sku) < (&pair[1].node_id, &pair[1].sku)),
        "explanation not strictly ordered by (node_id, sku)"
    );
    for node in nodes {
        let whole: Vec<_> = plan
            .explanation
            .iter()
            .filter(|entry| entry.node_id == node.node_id && entry.sku.is_none())
            .collect();
        ensure!(whole.len() == 1, "{} has {} whole-node explanations", node.node_id, whole.len());
        let selected = whole[0].reason == ExplanationReason::Selected;
        let ships = plan.shipments.iter().any(|shipment| shipment.node_id == node.node_id);
        ensure!(selected == ships, "{}: SELECTED = {selected} but ships = {ships}", node.node_id);
        let considered =
            matches!(whole[0].reason, ExplanationReason::Selected | ExplanationReason::NotSelected);
        ensure!(whole[0].considered == considered, "{}: considered flag", node.node_id);
        // A SELECTED node has one NO_ATP entry per requested SKU it holds none of; others none.
        let mut expected_lacking: Vec<&Sku> = if selected {
            request
                .lines
                .iter()
                .enumerate()
                .filter(|(line, _)| stock.atp_at(*line, &node.node_id) <= 0)
                .map(|(_, (sku, _))| sku)
                .collect()
        } else {
            Vec::new()
        };
        expected_lacking.sort();
        let per_sku: Vec<&Sku> = plan
            .explanation
            .iter()
            .filter(|entry| entry.node_id == node.node_id)
            .filter_map(|entry| entry.sku.as_ref().map(|sku| (sku, entry)))
            .map(|(sku, entry)| {
                if entry.reason == ExplanationReason::NoAtp && entry.considered {
                    Ok(sku)
                } else {
                    Err(format!("{}: a per-SKU entry {:?}", node.node_id, entry.reason))
                }
            })
            .collect::<Result<_, _>>()?;
        ensure!(
            per_sku == expected_lacking,
            "{}: per-SKU NO_ATP entries {per_sku:?}, expected {expected_lacking:?}",
            node.node_id
        );
    }
    Ok(())
}

// ----- A. golden cases -------------------------------------------------------------------------

#[test]
fn golden_distance_of_one_degree() {
    // Goal: the distances the golden cases rely on. Method: haversine on the equator equals
    // R × Δλ; compare with the hand-computed kilometres per degree.
    for degrees in [1.0, 2.0, 5.0, 10.0, 20.0] {
        let distance = geo::distance_km(0.0, degrees, 0.0, 0.0);
        assert!((distance - degrees * KM_PER_DEGREE).abs() < 1e-6, "{degrees}°: {distance}");
    }
}

#[test]
fn golden_nearest_node_wins() {
    // Goal: with equal rates the nearest node ships. Method: three nodes at 1°, 2°, 5°, each
    // holding enough; expected cost 500 + round(111.195) + 10 × 3 = 641, days 1 + ceil(0.14).
    let nodes = table(vec![
        equator_node("far", 5.0, 500, 1, 10),
        equator_node("mid", 2.0, 500, 1, 10),
        equator_node("near", 1.0, 500, 1, 10),
    ]);
    let stock = TableStock::default().with(0, "far", 10).with(0, "mid", 10).with(0, "near", 10);
    let request = ship_request(&[("sku-1", 3)], options(0, false, false));
    let plan = route_checked(&request, &nodes, &stock, &RoutingRules::default());
    assert_eq!(shipments(&plan), expect_shipments(&[("near", &[("sku-1", 3)], 641)]));
    assert!((plan.shipments[0].distance_km - KM_PER_DEGREE).abs() < 1e-6);
    assert_eq!(plan.shipments[0].estimated_days, 2);
    assert_eq!(
        (plan.total_cost, plan.objective, plan.objective_lower_bound, plan.optimal),
        (641, 641, 641, true)
    );
    assert!(plan.backordered.is_empty() && plan.unroutable.is_empty());
    use ExplanationReason::{NotSelected, Selected};
    assert_eq!(
        explained(&plan),
        owned_explanation(&[
            ("far", None, true, NotSelected),
            ("mid", None, true, NotSelected),
            ("near", None, true, Selected)
        ])
    );
}

#[test]
fn golden_farther_but_cheaper_node_wins() {
    // Goal: cost, not distance, decides. Method: three hand-computed pairs where the far node's
    // rates (base, per unit, per km) make it cheaper, and one where the units tip it back.
    let request = |qty| ship_request(&[("sku-1", qty)], options(0, false, false));
    let rules = RoutingRules::default();

    // Base cost: near 2,000 + 111 + 30 = 2,141; far 500 + 556 + 30 = 1,086.
    let nodes = table(vec![equator_node("near", 1.0, 2_000, 1, 10), equator_node("far", 5.0, 500, 1, 10)]);
    let stock = TableStock::default().with(0, "near", 20).with(0, "far", 20);
    let plan = route_checked(&request(3), &nodes, &stock, &rules);
    assert_eq!(shipments(&plan), expect_shipments(&[("far", &[("sku-1", 3)], 1_086)]));
    assert_eq!(plan.shipments[0].estimated_days, 1 + 1, "1 + ceil(555.98 / 800)");

    // Per unit, 10 units: near 500 + 111 + 1,000 = 1,611; far 500 + 556 + 100 = 1,156.
    let nodes = table(vec![equator_node("near", 1.0, 500, 1, 100), equator_node("far", 5.0, 500, 1, 10)]);
    let plan = route_checked(&request(10), &nodes, &stock, &rules);
    assert_eq!(shipments(&plan), expect_shipments(&[("far", &[("sku-1", 10)], 1_156)]));
    // 2 units: near 500 + 111 + 200 = 811; far 500 + 556 + 20 = 1,076.
    let plan = route_checked(&request(2), &nodes, &stock, &rules);
    assert_eq!(shipments(&plan), expect_shipments(&[("near", &[("sku-1", 2)], 811)]));

    // Per km: near 500 + round(10 × 111.195) + 30 = 1,642; far 1,086.
    let nodes = table(vec![equator_node("near", 1.0, 500, 10, 10), equator_node("far", 5.0, 500, 1, 10)]);
    let plan = route_checked(&request(3), &nodes, &stock, &rules);
    assert_eq!(shipments(&plan), expect_shipments(&[("far", &[("sku-1", 3)], 1_086)]));
}

#[test]
fn golden_one_node_over_two_when_the_penalty_outweighs_the_saving() {
    // Goal: a split happens only when it saves more than the split penalty. Method: "both" holds
    // both SKUs for 1,000 + 222 + 100 = 1,322; "only-x" and "only-y" hold one each for
    // 300 + 111 + 50 = 461 apiece (922 together, plus the penalty).
    let nodes = table(vec![
        equator_node("both", 2.0, 1_000, 1, 10),
        equator_node("only-x", 1.0, 300, 1, 10),
        equator_node("only-y", -1.0, 300, 1, 10),
    ]);
    let stock =
        TableStock::default().with(0, "both", 5).with(1, "both", 5).with(0, "only-x", 5).with(1, "only-y", 5);
    let request = ship_request(&[("sku-x", 5), ("sku-y", 5)], options(0, false, false));

    // Penalty 500: the split costs 922 + 500 = 1,422 > 1,322.
    let plan = route_checked(&request, &nodes, &stock, &rules_with_penalty(500));
    assert_eq!(shipments(&plan), expect_shipments(&[("both", &[("sku-x", 5), ("sku-y", 5)], 1_322)]));
    assert_eq!((plan.total_cost, plan.objective), (1_322, 1_322));
    use ExplanationReason::{NoAtp, NotSelected, Selected};
    assert_eq!(
        explained(&plan),
        owned_explanation(&[
            ("both", None, true, Selected),
            ("only-x", None, true, NotSelected),
            ("only-y", None, true, NotSelected),
        ])
    );

    // Penalty 300: 922 + 300 = 1,222 < 1,322.
    let plan = route_checked(&request, &nodes, &stock, &rules_with_penalty(300));
    assert_eq!(
        shipments(&plan),
        expect_shipments(&[("only-x", &[("sku-x", 5)], 461), ("only-y", &[("sku-y", 5)], 461)])
    );
    assert_eq!((plan.total_cost, plan.objective), (922, 1_222));
    // A selected node lists the requested SKUs it does not hold (why they ship from elsewhere).
    assert_eq!(
        explained(&plan),
        owned_explanation(&[
            ("both", None, true, NotSelected),
            ("only-x", None, true, Selected),
            ("only-x", Some("sku-y"), true, NoAtp),
            ("only-y", None, true, Selected),
            ("only-y", Some("sku-x"), true, NoAtp),
        ])
    );

    // Penalty 400: both plans cost 1,322; the tie breaks on node_id ("both" < "only-x").
    let plan = route_checked(&request, &nodes, &stock, &rules_with_penalty(400));
    assert_eq!(shipments(&plan), expect_shipments(&[("both", &[("sku-x", 5), ("sku-y", 5)], 1_322)]));
}

#[test]
fn golden_split_when_no_single_node_holds_enough() {
    // Goal: a split when no near node holds everything, filled cheapest per unit first; a far
    // single node only when it is cheaper or max_shipments forces it. Method: 10 units; "west"
    // (2°, 10/unit) and "east" (1°, 20/unit) hold 6 each; "remote" (20°) holds 10 for
    // 500 + 2,224 + 100 = 2,824. Split: west 6 = 500 + 222 + 60 = 782, east 4 = 500 + 111 + 80
    // = 691; 1,473 + penalty 500 = 1,973 (east 6 + west 4 would be 1,493).
    let nodes = table(vec![
        equator_node("east", 1.0, 500, 1, 20),
        equator_node("remote", 20.0, 500, 1, 10),
        equator_node("west", -2.0, 500, 1, 10),
    ]);
    let stock = TableStock::default().with(0, "east", 6).with(0, "west", 6).with(0, "remote", 10);
    let request = ship_request(&[("sku-1", 10)], options(0, false, false));
    let plan = route_checked(&request, &nodes, &stock, &RoutingRules::default());
    assert_eq!(
        shipments(&plan),
        expect_shipments(&[("east", &[("sku-1", 4)], 691), ("west", &[("sku-1", 6)], 782)])
    );
    assert_eq!((plan.total_cost, plan.objective, plan.optimal), (1_473, 1_973, true));
    assert_eq!(node_reason(&plan, "remote"), ExplanationReason::NotSelected);

    // One shipment only: the remote node is the only single node holding 10.
    let request = ship_request(&[("sku-1", 10)], options(1, false, false));
    let plan = route_checked(&request, &nodes, &stock, &RoutingRules::default());
    assert_eq!(shipments(&plan), expect_shipments(&[("remote", &[("sku-1", 10)], 2_824)]));
    assert_eq!(plan.shipments[0].estimated_days, 1 + 3, "1 + ceil(2,223.9 / 800)");
}

#[test]
fn golden_max_shipments() {
    // Goal: max_shipments bounds the shipments; units it leaves out are MAX_SHIPMENTS_EXCEEDED
    // (not backorderable), and all-or-nothing turns the rest into PARTIAL_NOT_ALLOWED. Method:
    // three nodes at 1°, 2°, 3° with 4 units each, 10 requested; costs 500 + 111/222/334 + 10/unit.
    let nodes = table(vec![
        equator_node("n-1", 1.0, 500, 1, 10),
        equator_node("n-2", 2.0, 500, 1, 10),
        equator_node("n-3", 3.0, 500, 1, 10),
    ]);
    let stock = TableStock::default().with(0, "n-1", 4).with(0, "n-2", 4).with(0, "n-3", 4);
    let rules = RoutingRules::default();
    let plan_with = |max_shipments, allow_partial, allow_backorder, rules: &RoutingRules| {
        let request = ship_request(&[("sku-1", 10)], options(max_shipments, allow_partial, allow_backorder));
        route_checked(&request, &nodes, &stock, rules)
    };
    use UnroutableReason::{MaxShipmentsExceeded, PartialNotAllowed};

    // No limit: all three (the units' split among equal unit costs follows node order).
    let plan = plan_with(0, false, false, &rules);
    assert_eq!(
        shipments(&plan),
        expect_shipments(&[
            ("n-1", &[("sku-1", 4)], 651),
            ("n-2", &[("sku-1", 4)], 762),
            ("n-3", &[("sku-1", 2)], 854)
        ])
    );
    assert_eq!((plan.total_cost, plan.objective), (2_267, 2_267 + 2 * 500));

    // Two: the two cheapest, 2 units left out.
    let plan = plan_with(2, true, false, &rules);
    assert_eq!(
        shipments(&plan),
        expect_shipments(&[("n-1", &[("sku-1", 4)], 651), ("n-2", &[("sku-1", 4)], 762)])
    );
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 2, MaxShipmentsExceeded)]));
    assert_eq!(plan.objective, 1_413 + 500);
    // With allow_backorder the left-out units are still unroutable: this is not lack of stock.
    let plan = plan_with(2, true, true, &rules);
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 2, MaxShipmentsExceeded)]));
    assert!(plan.backordered.is_empty());
    // All or nothing: nothing ships.
    let plan = plan_with(2, false, false, &rules);
    assert!(plan.shipments.is_empty());
    assert_eq!(
        unroutable(&plan),
        owned_unroutable(&[("sku-1", 2, MaxShipmentsExceeded), ("sku-1", 8, PartialNotAllowed)])
    );
    assert_eq!((plan.total_cost, plan.objective), (0, 0));
    // All or nothing with backorders: the routable units wait; the ones max_shipments keeps
    // out do not become routable by waiting and stay unroutable (routing.proto, allow_partial).
    let plan = plan_with(2, false, true, &rules);
    assert!(plan.shipments.is_empty());
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 2, MaxShipmentsExceeded)]));
    assert_eq!(backordered(&plan), owned(&[("sku-1", 8)]));

    // One: the cheapest single node.
    let plan = plan_with(1, true, false, &rules);
    assert_eq!(shipments(&plan), expect_shipments(&[("n-1", &[("sku-1", 4)], 651)]));
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 6, MaxShipmentsExceeded)]));

    // The configured maximum caps both "no limit" and a larger request.
    let capped = RoutingRules { max_shipments_max: 2, ..RoutingRules::default() };
    for requested in [0, 5] {
        let plan = plan_with(requested, true, false, &capped);
        assert_eq!(plan.shipments.len(), 2, "requested {requested}");
        assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 2, MaxShipmentsExceeded)]));
    }
}

#[test]
fn golden_exclusion_reasons_are_explained() {
    // Goal: every exclusion has its reason in the explanation, and short units name the most
    // actionable one (capacity, then channel, else no stock). Method: one node per reason, each
    // holding stock that would otherwise serve; only "g-ok" is eligible and holds 1 sku-a.
    let mut disabled = equator_node("a-disabled", 1.0, 500, 1, 10);
    disabled.enabled = false;
    let mut cannot_ship = equator_node("b-noship", 1.0, 500, 1, 10);
    cannot_ship.can_ship = false;
    let mut store_only = equator_node("c-channel", 1.0, 500, 1, 10);
    store_only.channels = vec![channel("store")];
    let nodes = table(vec![
        disabled,
        cannot_ship,
        store_only,
        equator_node("d-rule", 1.0, 500, 1, 10),
        equator_node("e-capacity", 1.0, 500, 1, 10),
        equator_node("f-empty", 1.0, 500, 1, 10),
        equator_node("g-ok", 1.0, 500, 1, 10),
    ]);
    let stock = TableStock::default()
        .with(0, "a-disabled", 10)
        .with(0, "b-noship", 10)
        .with(0, "c-channel", 10)
        .with(1, "c-channel", 10)
        .with(1, "d-rule", 10)
        .with(1, "e-capacity", 10)
        .with(0, "g-ok", 1)
        .full("e-capacity");
    let listed = ["a-disabled", "b-noship", "c-channel", "e-capacity", "f-empty", "g-ok"];
    let rules = RoutingRules {
        channel_nodes: BTreeMap::from([(
            "web".to_string(),
            listed.iter().map(ToString::to_string).collect(),
        )]),
        ..RoutingRules::default()
    };
    let mut request = ship_request(&[("sku-a", 3), ("sku-b", 2)], options(0, true, false));
    request.channel = Some(channel("web"));
    let plan = route_checked(&request, &nodes, &stock, &rules);
    use ExplanationReason::*;
    assert_eq!(
        explained(&plan),
        owned_explanation(&[
            ("a-disabled", None, false, Disabled),
            ("b-noship", None, false, CannotShip),
            ("c-channel", None, false, ChannelNotAllowed),
            ("d-rule", None, false, ChannelNotAllowed),
            ("e-capacity", None, false, CapacityExhausted),
            ("f-empty", None, false, NoAtp),
            ("g-ok", None, true, Selected),
            ("g-ok", Some("sku-b"), true, NoAtp),
        ])
    );
    assert_eq!(shipments(&plan), expect_shipments(&[("g-ok", &[("sku-a", 1)], 500 + 111 + 10)]));
    // sku-a's other stock is disabled, cannot ship or off-channel: the channel is actionable.
    // sku-b's is off-channel or out of capacity: capacity ranks first.
    assert_eq!(
        unroutable(&plan),
        owned_unroutable(&[
            ("sku-a", 2, UnroutableReason::ChannelNotAllowed),
            ("sku-b", 2, UnroutableReason::CapacityExhausted)
        ])
    );

    // With allow_backorder only the lack of capacity waits as a backorder.
    request.options.allow_backorder = true;
    let plan = route_checked(&request, &nodes, &stock, &rules);
    assert_eq!(backordered(&plan), owned(&[("sku-b", 2)]));
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-a", 2, UnroutableReason::ChannelNotAllowed)]));

    // Without a channel the channel filters do not apply.
    request.channel = None;
    let plan = route_checked(&request, &nodes, &stock, &rules);
    assert_ne!(node_reason(&plan, "c-channel"), ChannelNotAllowed);
    assert_ne!(node_reason(&plan, "d-rule"), ChannelNotAllowed);

    // Stock only at a disabled node is plain NO_STOCK.
    let request = ship_request(&[("sku-a", 3)], options(0, true, false));
    let nodes_two = table(vec![
        {
            let mut node = equator_node("a-disabled", 1.0, 500, 1, 10);
            node.enabled = false;
            node
        },
        equator_node("g-ok", 1.0, 500, 1, 10),
    ]);
    let plan = route_checked(&request, &nodes_two, &stock, &RoutingRules::default());
    assert_eq!(
        unroutable(&plan),
        owned_unroutable(&[("sku-a", 2, UnroutableReason::NoStock)]),
        "g-ok ships 1; the rest is only at a disabled node"
    );

    // No node can ship at all: NO_ELIGIBLE_NODE, not backorderable.
    let only_excluded = table(vec![nodes[0].as_ref().clone(), nodes[1].as_ref().clone()]);
    let request = ship_request(&[("sku-a", 3)], options(0, true, true));
    let plan = route_checked(&request, &only_excluded, &stock, &RoutingRules::default());
    assert!(plan.shipments.is_empty() && plan.backordered.is_empty());
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-a", 3, UnroutableReason::NoEligibleNode)]));
}

#[test]
fn golden_backorder_versus_unroutable() {
    // Goal: exactly which units ship, wait or are unroutable for each (allow_partial,
    // allow_backorder). Method: one node "wh" (1°) holding 6 of the 10 sku-x and both sku-y;
    // a full shipment costs 500 + 111 + 10 × 8 = 691.
    let nodes = table(vec![equator_node("wh", 1.0, 500, 1, 10)]);
    let stock = TableStock::default().with(0, "wh", 6).with(1, "wh", 2);
    let plan_with = |allow_partial, allow_backorder| {
        let request =
            ship_request(&[("sku-x", 10), ("sku-y", 2)], options(0, allow_partial, allow_backorder));
        route_checked(&request, &nodes, &stock, &RoutingRules::default())
    };
    use UnroutableReason::{NoStock, PartialNotAllowed};

    let plan = plan_with(true, false);
    assert_eq!(shipments(&plan), expect_shipments(&[("wh", &[("sku-x", 6), ("sku-y", 2)], 691)]));
    assert!(plan.backordered.is_empty());
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-x", 4, NoStock)]));

    let plan = plan_with(true, true);
    assert_eq!(shipments(&plan), expect_shipments(&[("wh", &[("sku-x", 6), ("sku-y", 2)], 691)]));
    assert_eq!(backordered(&plan), owned(&[("sku-x", 4)]));
    assert!(plan.unroutable.is_empty());

    let plan = plan_with(false, false);
    assert!(plan.shipments.is_empty() && plan.backordered.is_empty());
    assert_eq!(
        unroutable(&plan),
        owned_unroutable(&[
            ("sku-x", 4, NoStock),
            ("sku-x", 6, PartialNotAllowed),
            ("sku-y", 2, PartialNotAllowed)
        ])
    );
    assert_eq!((plan.total_cost, plan.objective), (0, 0));
    assert_eq!(node_reason(&plan, "wh"), ExplanationReason::NotSelected);

    let plan = plan_with(false, true);
    assert!(plan.shipments.is_empty() && plan.unroutable.is_empty());
    assert_eq!(backordered(&plan), owned(&[("sku-x", 10), ("sku-y", 2)]));

    // Everything routable: all or nothing ships it all.
    let request = ship_request(&[("sku-x", 6), ("sku-y", 2)], options(0, false, false));
    let plan = route_checked(&request, &nodes, &stock, &RoutingRules::default());
    assert_eq!(shipments(&plan), expect_shipments(&[("wh", &[("sku-x", 6), ("sku-y", 2)], 691)]));
}

/// Stores for the pickup cases: "store-1" (the one the customer picks), "store-2" with plenty
/// and a nearer warehouse "wh" with plenty. Stores: base 200, 5 per unit, no processing day.
fn pickup_nodes(adjust_store_1: impl FnOnce(&mut Node)) -> Vec<Arc<Node>> {
    let store = |id: &str, lon: f64| Node {
        node_type: NodeType::Store,
        can_ship: false,
        can_pickup: true,
        processing_days: 0,
        ..equator_node(id, lon, 200, 1, 5)
    };
    let mut store_1 = store("store-1", 3.0);
    adjust_store_1(&mut store_1);
    table(vec![store_1, store("store-2", 0.5), equator_node("wh", 0.1, 100, 1, 1)])
}

#[test]
fn golden_pickup_uses_only_the_named_store() {
    // Goal: PICKUP ships only from the named store, at distance 0 and base cost, whatever the
    // other nodes hold; a lack there is PICKUP_NODE_LACKS_STOCK or a backorder, never another
    // node. Method: hand-computed costs 200 + 5 × units.
    let nodes = pickup_nodes(|_| {});
    let stock_with = |store_1: i64| {
        TableStock::default().with(0, "store-1", store_1).with(0, "store-2", 50).with(0, "wh", 50)
    };
    let plan_with = |store_1, allow_partial, allow_backorder| {
        let request = pickup_request("store-1", &[("sku-1", 3)], options(5, allow_partial, allow_backorder));
        route_checked(&request, &nodes, &stock_with(store_1), &RoutingRules::default())
    };
    use ExplanationReason::{NoAtp, NotPickupNode, Selected};
    use UnroutableReason::{PartialNotAllowed, PickupNodeLacksStock};

    let plan = plan_with(5, false, false);
    assert_eq!(shipments(&plan), expect_shipments(&[("store-1", &[("sku-1", 3)], 215)]));
    assert_eq!((plan.shipments[0].distance_km, plan.shipments[0].estimated_days), (0.0, 0));
    assert_eq!(
        explained(&plan),
        owned_explanation(&[
            ("store-1", None, true, Selected),
            ("store-2", None, false, NotPickupNode),
            ("wh", None, false, NotPickupNode)
        ])
    );

    // One unit at the store.
    let plan = plan_with(1, true, false);
    assert_eq!(shipments(&plan), expect_shipments(&[("store-1", &[("sku-1", 1)], 205)]));
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 2, PickupNodeLacksStock)]));
    let plan = plan_with(1, true, true);
    assert_eq!(shipments(&plan), expect_shipments(&[("store-1", &[("sku-1", 1)], 205)]));
    assert_eq!(backordered(&plan), owned(&[("sku-1", 2)]));
    assert!(plan.unroutable.is_empty());
    let plan = plan_with(1, false, false);
    assert!(plan.shipments.is_empty());
    assert_eq!(
        unroutable(&plan),
        owned_unroutable(&[("sku-1", 2, PickupNodeLacksStock), ("sku-1", 1, PartialNotAllowed)])
    );
    let plan = plan_with(1, false, true);
    assert!(plan.shipments.is_empty() && plan.unroutable.is_empty());
    assert_eq!(backordered(&plan), owned(&[("sku-1", 3)]));

    // Nothing at the store.
    let plan = plan_with(0, true, false);
    assert!(plan.shipments.is_empty());
    assert_eq!(node_reason(&plan, "store-1"), NoAtp);
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 3, PickupNodeLacksStock)]));
    let plan = plan_with(0, true, true);
    assert_eq!(backordered(&plan), owned(&[("sku-1", 3)]));

    // An unknown store is an error, not a plan.
    let request = pickup_request("store-9", &[("sku-1", 3)], options(0, true, true));
    assert_eq!(
        route(&request, &nodes, &stock_with(5), &RoutingRules::default()),
        Err(RouteError::UnknownPickupNode("store-9".to_string()))
    );
}

#[test]
fn golden_pickup_store_unavailable() {
    // Goal: a pickup store that is disabled, cannot pick up, or is off-channel makes every unit
    // PICKUP_NODE_UNAVAILABLE (not backorderable); a store out of capacity is CAPACITY_EXHAUSTED
    // (backorderable). Method: one adjustment of "store-1" per case; it holds enough stock.
    let stock = TableStock::default().with(0, "store-1", 10).with(0, "store-2", 10).with(0, "wh", 10);
    type Adjust = fn(&mut Node);
    let cases: [(&str, Adjust, ExplanationReason); 3] = [
        ("disabled", |node| node.enabled = false, ExplanationReason::Disabled),
        ("cannot pick up", |node| node.can_pickup = false, ExplanationReason::CannotPickup),
        ("off-channel", |node| node.channels = vec![channel("store")], ExplanationReason::ChannelNotAllowed),
    ];
    for (what, adjust, reason) in cases {
        let nodes = pickup_nodes(adjust);
        let mut request = pickup_request("store-1", &[("sku-1", 3)], options(0, true, true));
        request.channel = Some(channel("web"));
        let plan = route_checked(&request, &nodes, &stock, &RoutingRules::default());
        assert!(plan.shipments.is_empty() && plan.backordered.is_empty(), "{what}: {plan:#?}");
        assert_eq!(node_reason(&plan, "store-1"), reason, "{what}");
        assert_eq!(
            unroutable(&plan),
            owned_unroutable(&[("sku-1", 3, UnroutableReason::PickupNodeUnavailable)]),
            "{what}"
        );
    }

    let nodes = pickup_nodes(|_| {});
    let full = stock.clone().full("store-1");
    let request = pickup_request("store-1", &[("sku-1", 3)], options(0, true, false));
    let plan = route_checked(&request, &nodes, &full, &RoutingRules::default());
    assert!(plan.shipments.is_empty());
    assert_eq!(node_reason(&plan, "store-1"), ExplanationReason::CapacityExhausted);
    assert_eq!(unroutable(&plan), owned_unroutable(&[("sku-1", 3, UnroutableReason::CapacityExhausted)]));
    let request = pickup_request("store-1", &[("sku-1", 3)], options(0, true, true));
    let plan = route_checked(&request, &nodes, &full, &RoutingRules::default());
    assert_eq!(backordered(&plan), owned(&[("sku-1", 3)]));
}

#[test]
fn golden_more_units_win_even_at_extreme_rates() {
    // Goal: "a plan that routes more units always wins, then the cheaper one" (planner.rs),
    // whatever the rates: API.md bounds them only below (≥ 0). Method: "dear" holds both SKUs
    // at a base cost of 2 × 10^18 cents (a legal int64); "cheap" holds only sku-y. Routing both
    // units needs "dear"; the plan must not leave sku-x out to save cost.
    const DEAR_BASE_COST: i64 = 2_000_000_000_000_000_000;
    let nodes =
        table(vec![equator_node("cheap", 1.0, 100, 0, 1), equator_node("dear", 1.0, DEAR_BASE_COST, 0, 1)]);
    let stock = TableStock::default().with(0, "dear", 1).with(1, "dear", 1).with(1, "cheap", 1);
    let request = ship_request(&[("sku-x", 1), ("sku-y", 1)], options(0, true, false));
    let plan = route_checked(&request, &nodes, &stock, &rules_with_penalty(0));
    assert!(
        plan.unroutable.is_empty(),
        "sku-x is routable from \"dear\" but was left out: {:?}",
        unroutable(&plan)
    );
    assert_eq!(
        shipments(&plan),
        expect_shipments(&[("dear", &[("sku-x", 1), ("sku-y", 1)], DEAR_BASE_COST + 2)])
    );
}

#[test]
fn golden_ties_break_by_priority_then_node_id() {
    // Goal: equal costs pick the higher priority, then the lower node_id. Method: two nodes at
    // the same place with the same rates and stock.
    let pair = |priority_a: i64, priority_b: i64| {
        table(vec![
            Node { priority: priority_a, ..equator_node("n-a", 1.0, 500, 1, 10) },
            Node { priority: priority_b, ..equator_node("n-b", 1.0, 500, 1, 10) },
        ])
    };
    let stock = TableStock::default().with(0, "n-a", 5).with(0, "n-b", 5);
    let request = ship_request(&[("sku-1", 5)], options(0, false, false));
    let rules = RoutingRules::default();
    let chosen =
        |nodes: &[Arc<Node>]| route_checked(&request, nodes, &stock, &rules).shipments[0].node_id.to_string();
    assert_eq!(chosen(&pair(0, 0)), "n-a", "equal priority: lower node_id");
    assert_eq!(chosen(&pair(0, 3)), "n-b", "higher priority wins");
    assert_eq!(chosen(&pair(3, 3)), "n-a");
    assert_eq!(chosen(&pair(-1, 0)), "n-b");
}

#[test]
fn golden_estimated_days() {
    // Goal: estimated_days = processing_days + ceil(distance_km / km_per_day). Method: a node
    // 10° away (1,111.95 km) with 2 processing days under three speeds, and one at distance 0.
    let nodes = table(vec![
        Node { processing_days: 2, ..equator_node("far", 10.0, 500, 1, 10) },
        Node { processing_days: 2, ..equator_node("here", 0.0, 5_000, 1, 10) },
    ]);
    let stock = TableStock::default().with(0, "far", 5).with(0, "here", 5);
    let request = ship_request(&[("sku-1", 1)], options(0, false, false));
    for (km_per_day, days) in [(800.0, 2 + 2), (500.0, 2 + 3), (2_000.0, 2 + 1)] {
        let rules = RoutingRules { km_per_day, ..RoutingRules::default() };
        let plan = route_checked(&request, &nodes, &stock, &rules);
        assert_eq!(shipments(&plan), expect_shipments(&[("far", &[("sku-1", 1)], 500 + 1_112 + 10)]));
        assert_eq!(plan.shipments[0].estimated_days, days, "km_per_day {km_per_day}");
    }
    let stock = TableStock::default().with(0, "here", 5);
    let plan = route_checked(&request, &nodes, &stock, &RoutingRules::default());
    assert_eq!((plan.shipments[0].distance_km, plan.shipments[0].estimated_days), (0.0, 2));
}

#[test]
fn golden_determinism() {
    // Goal: the same inputs always give the same plan. Method: a seeded random instance of 12
    // nodes and 4 lines, routed twice and once more on cloned inputs.
    let seed = seed("golden_determinism");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut nodes = Vec::new();
    let mut stock = TableStock::default();
    for index in 0..12 {
        let id = format!("n-{index:02}");
        let mut node = equator_node(&id, rng.random_range(-20.0..20.0), rng.random_range(0..1_000), 1, 10);
        node.lat = rng.random_range(-20.0..20.0);
        node.rates.cost_per_unit = rng.random_range(0..50);
        node.priority = rng.random_range(0..3);
        nodes.push(node);
        for line in 0..4 {
            stock = stock.with(line, &id, rng.random_range(0..6));
        }
    }
    let nodes = table(nodes);
    let mut request =
        ship_request(&[("sku-a", 7), ("sku-b", 3), ("sku-c", 9), ("sku-d", 2)], options(3, true, true));
    request.destination = Destination::Ship { lat: 1.5, lon: -2.5 };
    let rules = RoutingRules::default();
    let first = route_checked(&request, &nodes, &stock, &rules);
    let second = route_checked(&request, &nodes, &stock, &rules);
    assert_eq!(first, second, "seed {seed}");
    let cloned: Vec<Arc<Node>> = nodes.iter().map(|node| Arc::new(node.as_ref().clone())).collect();
    let third = route_checked(&request.clone(), &cloned, &stock.clone(), &rules.clone());
    assert_eq!(first, third, "seed {seed}");
}

// ----- B. property tests ------------------------------------------------------------------------

/// The seed of a randomised test: ALLOT_SEED replays one; printed either way.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("ALLOT_SEED").ok().and_then(|raw| raw.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64 ^ 0x005e_ed0f_a110
    });
    println!("{test}: seed = {seed} (replay with ALLOT_SEED={seed})");
    seed
}

/// Runs a seeded proptest (no regression file: the seed and the shrunk case are printed).
fn run_property<S>(
    test: &str,
    cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let seed = seed(test);
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    if let Err(error) = runner.run(&strategy, property) {
        panic!("{test} failed: {error}\n(seed {seed}; replay with ALLOT_SEED={seed})");
    }
}

/// One random node of a random instance.
#[derive(Debug, Clone)]
struct NodeSpec {
    lat: f64,
    lon: f64,
    base_cost: i64,
    cost_per_km: i64,
    cost_per_unit: i64,
    priority: i64,
    processing_days: i64,
    /// ATP per line.
    atp: Vec<i64>,
    enabled: bool,
    can_ship: bool,
    can_pickup: bool,
    has_capacity: bool,
    channels: Vec<&'static str>,
    /// Listed for "web" in the rules' channel_nodes.
    listed: bool,
}

/// A random routing problem.
#[derive(Debug, Clone)]
struct Instance {
    nodes: Vec<NodeSpec>,
    demand: Vec<i64>,
    split_penalty: i64,
    max_shipments: usize,
    max_shipments_max: usize,
    allow_partial: bool,
    allow_backorder: bool,
    web_channel: bool,
    /// PICKUP at this node index (modulo the node count) instead of SHIP.
    pickup: Option<usize>,
    ship_to: (f64, f64),
}

fn node_spec(lines: usize, exclusions: bool) -> impl Strategy<Value = NodeSpec> {
    let flag = move |probability: f64| {
        if exclusions { prop::bool::weighted(probability).boxed() } else { Just(true).boxed() }
    };
    let channels = if exclusions {
        prop_oneof![3 => Just(vec![]), 1 => Just(vec!["store"]), 1 => Just(vec!["store", "web"])].boxed()
    } else {
        Just(vec![]).boxed()
    };
    (
        (-300i32..=300, -300i32..=300),
        (0i64..=2_000, 0i64..=5, 0i64..=100, 0i64..=3, 0i64..=3),
        prop::collection::vec(prop_oneof![2 => Just(0i64), 3 => 1i64..=8], lines),
        (flag(0.85), flag(0.85), prop::bool::weighted(0.5), flag(0.85), channels, flag(0.85)),
    )
        .prop_map(
            |(
                (lat, lon),
                (base_cost, cost_per_km, cost_per_unit, priority, processing_days),
                atp,
                (enabled, can_ship, can_pickup, has_capacity, channels, listed),
            )| NodeSpec {
                lat: f64::from(lat) / 10.0,
                lon: f64::from(lon) / 10.0,
                base_cost,
                cost_per_km,
                cost_per_unit,
                priority,
                processing_days,
                atp,
                enabled,
                can_ship,
                can_pickup,
                has_capacity,
                channels,
                listed,
            },
        )
}

/// Instances of up to 6 nodes and 3 lines; `exclusions` adds disabled, non-shipping,
/// off-channel and full nodes, channels and pickups.
fn instance(exclusions: bool) -> impl Strategy<Value = Instance> {
    (1usize..=3).prop_flat_map(move |lines| {
        (
            prop::collection::vec(node_spec(lines, exclusions), 1..=6),
            prop::collection::vec(1i64..=10, lines),
            (0i64..=2_000, 0usize..=4, 1usize..=5),
            (any::<bool>(), any::<bool>(), any::<bool>()),
            if exclusions { prop::option::weighted(0.2, 0usize..6).boxed() } else { Just(None).boxed() },
            (-300i32..=300, -300i32..=300),
        )
            .prop_map(
                move |(
                    nodes,
                    demand,
                    (split_penalty, max_shipments, max_shipments_max),
                    (allow_partial, allow_backorder, web_channel),
                    pickup,
                    (lat, lon),
                )| Instance {
                    nodes,
                    demand,
                    split_penalty,
                    max_shipments,
                    max_shipments_max,
                    allow_partial,
                    allow_backorder,
                    web_channel: web_channel && exclusions,
                    pickup,
                    ship_to: (f64::from(lat) / 10.0, f64::from(lon) / 10.0),
                },
            )
    })
}

impl Instance {
    fn node_name(index: usize) -> String {
        format!("n-{index:02}")
    }

    fn build(&self) -> (RouteRequest, Vec<Arc<Node>>, TableStock, RoutingRules) {
        let mut nodes = Vec::new();
        let mut stock = TableStock::default();
        let mut listed = Vec::new();
        for (index, spec) in self.nodes.iter().enumerate() {
            let name = Instance::node_name(index);
            let mut node =
                equator_node(&name, spec.lon, spec.base_cost, spec.cost_per_km, spec.cost_per_unit);
            node.lat = spec.lat;
            node.priority = spec.priority;
            node.processing_days = spec.processing_days;
            node.enabled = spec.enabled;
            node.can_ship = spec.can_ship;
            node.can_pickup = spec.can_pickup;
            node.channels = spec.channels.iter().map(|raw| channel(raw)).collect();
            nodes.push(node);
            for (line, atp) in spec.atp.iter().enumerate() {
                stock = stock.with(line, &name, *atp);
            }
            if !spec.has_capacity {
                stock = stock.full(&name);
            }
            if spec.listed {
                listed.push(name);
            }
        }
        let lines: Vec<(Sku, i64)> =
            self.demand.iter().enumerate().map(|(line, qty)| (sku(&format!("sku-{line}")), *qty)).collect();
        let destination = match self.pickup {
            Some(index) => {
                Destination::Pickup { node_id: node_id(&Instance::node_name(index % self.nodes.len())) }
            }
            None => Destination::Ship { lat: self.ship_to.0, lon: self.ship_to.1 },
        };
        let request = RouteRequest {
            lines,
            destination,
            channel: self.web_channel.then(|| channel("web")),
            options: options(self.max_shipments, self.allow_partial, self.allow_backorder),
        };
        let rules = RoutingRules {
            split_penalty: self.split_penalty,
            max_shipments_max: self.max_shipments_max,
            channel_nodes: BTreeMap::from([("web".to_string(), listed)]),
            ..RoutingRules::default()
        };
        (request, table(nodes), stock, rules)
    }
}

/// The best (most units routed, then least objective) over every set of at most max_shipments
/// eligible nodes, each line filled from the set in ascending cost_per_unit: (units, objective).
fn brute_force(
    request: &RouteRequest,
    nodes: &[Arc<Node>],
    stock: &TableStock,
    rules: &RoutingRules,
) -> (i64, i64) {
    let Destination::Ship { lat, lon } = request.destination else { panic!("brute force is for SHIP") };
    let eligible: Vec<usize> =
        (0..nodes.len()).filter(|index| node_eligible(&nodes[*index], request, rules, stock)).collect();
    let max_shipments = effective_max_shipments(request, rules);
    let demand: Vec<i64> = request.lines.iter().map(|(_, qty)| *qty).collect();
    let mut best = (0i64, 0i64);
    for mask in 0u32..(1 << eligible.len()) {
        if mask.count_ones() as usize > max_shipments {
            continue;
        }
        let mut members: Vec<usize> = eligible
            .iter()
            .enumerate()
            .filter(|(bit, _)| mask & (1 << bit) != 0)
            .map(|(_, index)| *index)
            .collect();
        members.sort_by_key(|index| nodes[*index].rates.cost_per_unit);
        let mut remaining = demand.clone();
        let (mut cost, mut used) = (0i64, 0i64);
        for index in members {
            let node = &nodes[index];
            let mut units = 0;
            for (line, left) in remaining.iter_mut().enumerate() {
                let take = (*left).min(stock.atp_at(line, &node.node_id).max(0));
                *left -= take;
                units += take;
            }
            if units > 0 {
                let distance_km = geo::distance_km(node.lat, node.lon, lat, lon);
                cost += geo::fixed_cost(node.rates.base_cost, node.rates.cost_per_km, distance_km)
                    + node.rates.cost_per_unit * units;
                used += 1;
            }
        }
        let routed = demand.iter().sum::<i64>() - remaining.iter().sum::<i64>();
        let objective = cost + rules.split_penalty * (used - 1).max(0);
        if (-routed, objective) < (-best.0, best.1) || mask == 0 {
            best = (routed, objective);
        }
    }
    best
}

#[test]
fn property_every_plan_is_feasible() {
    // Goal: every plan is feasible and well formed: per (sku, node) shipped ≤ ATP, per sku
    // shipped + backordered + unroutable = requested, shipments ≤ max_shipments, no node twice,
    // only eligible nodes, the cost formulas, all-or-nothing. Method: seeded proptest over random
    // instances with exclusions, channels, pickups and every option combination (`check_plan`).
    run_property("property_every_plan_is_feasible", 400, instance(true), |instance| {
        let (request, nodes, stock, rules) = instance.build();
        let plan = route(&request, &nodes, &stock, &rules)
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
        check_plan(&request, &nodes, &stock, &rules, &plan)
            .map_err(|problem| TestCaseError::fail(format!("{problem}\nplan: {plan:#?}")))?;
        prop_assert!(plan.optimal, "a small instance is always solved to optimality");
        if let Destination::Pickup { node_id } = &request.destination {
            prop_assert!(plan.shipments.iter().all(|shipment| shipment.node_id == *node_id));
        }
        Ok(())
    });
}

#[test]
fn property_plan_matches_brute_force() {
    // Goal: the plan is optimal: it routes as many units as any set of ≤ max_shipments nodes,
    // and its objective (total_cost + split_penalty × (shipments − 1)) equals the brute-force
    // optimum. Method: seeded proptest on ≤ 6 nodes, ≤ 3 lines, random rates, ATP, priorities,
    // penalty, max_shipments and full nodes; allow_partial so the optimum is well defined.
    run_property("property_plan_matches_brute_force", 400, instance(false), |mut instance| {
        instance.allow_partial = true;
        let (request, nodes, mut stock, rules) = instance.build();
        // A few nodes out of capacity (excluded in both), chosen by the instance itself.
        for (index, spec) in instance.nodes.iter().enumerate() {
            if spec.base_cost % 7 == 0 {
                stock = stock.full(&Instance::node_name(index));
            }
        }
        let plan = route(&request, &nodes, &stock, &rules)
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
        check_plan(&request, &nodes, &stock, &rules, &plan)
            .map_err(|problem| TestCaseError::fail(format!("{problem}\nplan: {plan:#?}")))?;
        let (best_units, best_objective) = brute_force(&request, &nodes, &stock, &rules);
        let routed: i64 =
            plan.shipments.iter().flat_map(|shipment| shipment.lines.iter().map(|(_, qty)| qty)).sum();
        prop_assert_eq!(routed, best_units, "units routed vs brute force; plan: {:#?}", plan);
        prop_assert_eq!(plan.objective, best_objective, "objective vs brute force; plan: {:#?}", plan);
        prop_assert!(plan.optimal);
        prop_assert_eq!(plan.objective_lower_bound, plan.objective);

        // A search cut short by its budget: still feasible, never better than the optimum, and
        // its lower bound really bounds the optimum (when it routes as many units).
        let budget = 1 + (instance.split_penalty as u64 % 3);
        let cut_short = RoutingRules { expansion_budget: budget, ..rules.clone() };
        let plan = route(&request, &nodes, &stock, &cut_short)
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
        check_plan(&request, &nodes, &stock, &cut_short, &plan)
            .map_err(|problem| TestCaseError::fail(format!("budget {budget}: {problem}\nplan: {plan:#?}")))?;
        let routed: i64 =
            plan.shipments.iter().flat_map(|shipment| shipment.lines.iter().map(|(_, qty)| qty)).sum();
        prop_assert!(routed <= best_units);
        if routed == best_units {
            prop_assert!(
                plan.objective >= best_objective,
                "budget {}: beats the optimum: {:#?}",
                budget,
                plan
            );
            prop_assert!(
                plan.objective_lower_bound <= best_objective,
                "budget {}: lower bound {} above the optimum {}",
                budget,
                plan.objective_lower_bound,
                best_objective
            );
        }
        Ok(())
    });
}

/// A random planner instance: up to 30 candidates, 5 lines.
#[derive(Debug, Clone)]
struct PlannerInstance {
    demand: Vec<i64>,
    candidates: Vec<Candidate>,
    options: PlanOptions,
}

fn planner_instance() -> impl Strategy<Value = PlannerInstance> {
    (1usize..=5).prop_flat_map(|lines| {
        let candidate = (
            0i64..=5_000,
            0i64..=100,
            0i64..=3,
            prop::collection::vec(prop_oneof![1 => Just(0i64), 2 => 0i64..=15], lines),
        );
        (
            prop::collection::vec(1i64..=20, lines),
            prop::collection::vec(candidate, 0..=30),
            (1usize..=6, 0i64..=2_000, prop_oneof![Just(1u64), Just(100u64), Just(5_000u64)]),
        )
            .prop_map(|(demand, candidates, (max_shipments, split_penalty, expansion_budget))| {
                PlannerInstance {
                    candidates: candidates
                        .into_iter()
                        .enumerate()
                        .map(|(order, (fixed_cost, cost_per_unit, priority, available))| Candidate {
                            fixed_cost,
                            cost_per_unit,
                            priority,
                            order,
                            available: available
                                .iter()
                                .zip(&demand)
                                .map(|(units, qty)| (*units).min(*qty))
                                .collect(),
                        })
                        .collect(),
                    demand,
                    options: PlanOptions { max_shipments, split_penalty, expansion_budget },
                }
            })
    })
}

/// Planner-level feasibility: units within availability, every unit once, ≤ max_shipments.
fn check_planner_plan(instance: &PlannerInstance, plan: &planner::Plan) -> Result<(), TestCaseError> {
    prop_assert!(plan.assignments.len() <= instance.options.max_shipments);
    prop_assert!(plan.assignments.windows(2).all(|pair| pair[0].candidate < pair[1].candidate));
    let mut routed = vec![0i64; instance.demand.len()];
    for assignment in &plan.assignments {
        let candidate = &instance.candidates[assignment.candidate];
        prop_assert!(assignment.units.iter().any(|units| *units > 0), "an empty assignment");
        for (line, units) in assignment.units.iter().enumerate() {
            prop_assert!(*units >= 0 && *units <= candidate.available[line]);
            routed[line] += units;
        }
    }
    for (line, demand) in instance.demand.iter().enumerate() {
        prop_assert_eq!(routed[line] + plan.unrouted[line], *demand);
    }
    prop_assert!(plan.lower_bound <= plan.objective);
    prop_assert!(!plan.optimal || plan.lower_bound == plan.objective);
    Ok(())
}

#[test]
fn property_planner_never_worse_than_greedy() {
    // Goal: the branch-and-bound plan is never worse than the greedy baseline, whatever its
    // budget. Method: seeded proptest on up to 30 candidates and 5 lines, budgets 1, 100, 5,000.
    run_property("property_planner_never_worse_than_greedy", 64, planner_instance(), |instance| {
        let plan = planner::plan(&instance.demand, &instance.candidates, instance.options);
        let greedy = planner::plan_greedy(&instance.demand, &instance.candidates, instance.options);
        check_planner_plan(&instance, &plan)?;
        check_planner_plan(&instance, &greedy)?;
        prop_assert!(
            plan.objective <= greedy.objective,
            "plan {:?} worse than greedy {:?}",
            plan.objective,
            greedy.objective
        );
        Ok(())
    });
}

// ----- C. end to end over gRPC ---------------------------------------------------------------

type RoutingClient = v1::routing_client::RoutingClient<tonic::transport::Channel>;

/// A running in-process daemon with both clients; the data directory outlives it.
struct Server {
    running: Running,
    routing: RoutingClient,
    inventory: InventoryClient,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts on the store in `dir` (a restart when it holds one) with `clock`.
    async fn start_in(dir: tempfile::TempDir, clock: Arc<dyn Clock>) -> Server {
        let running = allot::server::start(common::test_config(dir.path()), clock).await.unwrap();
        let inventory = common::inventory_client(running.grpc_address).await;
        let routing = routing_client(running.grpc_address).await;
        Server { running, routing, inventory, dir }
    }

    /// A fresh daemon whose clock stands still at noon UTC.
    async fn start() -> (Server, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(NOON_MS));
        (Server::start_in(tempfile::tempdir().unwrap(), clock.clone()).await, clock)
    }

    /// Graceful shutdown; returns the data directory for a restart.
    async fn stop(self) -> tempfile::TempDir {
        let Server { running, routing, inventory, dir } = self;
        drop((routing, inventory));
        running.shutdown().await;
        dir
    }
}

async fn routing_client(address: SocketAddr) -> RoutingClient {
    let endpoint = format!("http://{address}");
    for _ in 0..100 {
        if let Ok(client) = v1::routing_client::RoutingClient::connect(endpoint.clone()).await {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not connect to {endpoint}");
}

/// A warehouse on the equator at `lon` (rates 500 + 1/km + 10/unit, one processing day).
fn wire_node(id: &str, lon: f64, daily_capacity: i64) -> v1::Node {
    v1::Node { daily_capacity, ..common::node(id, 0.0, lon) }
}

async fn upsert(client: &mut InventoryClient, nodes: Vec<v1::Node>) {
    let count = nodes.len() as i64;
    assert_eq!(
        client.upsert_nodes(v1::UpsertNodesRequest { nodes }).await.unwrap().into_inner().count,
        count
    );
}

async fn set_stock(client: &mut InventoryClient, entries: &[(&str, &str, i64)]) {
    let entries: Vec<v1::StockEntry> =
        entries.iter().map(|(sku, node, on_hand)| common::stock(sku, node, *on_hand)).collect();
    let count = entries.len() as i64;
    assert_eq!(client.set_stock(v1::SetStockRequest { entries }).await.unwrap().into_inner().count, count);
}

/// Positions of `sku` by node.
async fn positions(client: &mut InventoryClient, sku: &str) -> BTreeMap<String, v1::Position> {
    let request =
        v1::GetAvailabilityRequest { skus: vec![sku.into()], channel: String::new(), node_ids: Vec::new() };
    let items = client.get_availability(request).await.unwrap().into_inner().items;
    assert_eq!(items.len(), 1);
    items[0].nodes.iter().map(|position| (position.node_id.clone(), position.clone())).collect()
}

/// (node, atp, reserved) of every position of `sku`.
async fn atp_table(client: &mut InventoryClient, sku: &str) -> Vec<(String, i64, i64)> {
    positions(client, sku)
        .await
        .into_values()
        .map(|position| (position.node_id, position.atp, position.reserved))
        .collect()
}

fn wire_options(max_shipments: u32, allow_partial: bool, allow_backorder: bool) -> Option<v1::RouteOptions> {
    Some(v1::RouteOptions { max_shipments, allow_partial, allow_backorder })
}

/// SHIP to (0, 0).
fn route_request(lines: &[(&str, i64)], options: Option<v1::RouteOptions>) -> v1::RouteRequest {
    v1::RouteRequest {
        lines: lines.iter().map(|(sku, qty)| v1::SkuQty { sku: sku.to_string(), qty: *qty }).collect(),
        ship_to: Some(v1::Location { lat: 0.0, lon: 0.0 }),
        channel: String::new(),
        method: v1::Method::Ship as i32,
        pickup_node_id: String::new(),
        options,
    }
}

fn allocate_request(key: &str, route: v1::RouteRequest) -> v1::AllocateRequest {
    v1::AllocateRequest {
        lines: route.lines,
        ship_to: route.ship_to,
        channel: route.channel,
        method: route.method,
        pickup_node_id: route.pickup_node_id,
        options: route.options,
        idempotency_key: key.into(),
        ttl_ms: 0,
        reference: format!("cart-{key}"),
    }
}

async fn allocate(client: &mut RoutingClient, request: v1::AllocateRequest) -> v1::AllocateResponse {
    client.allocate(request).await.unwrap().into_inner()
}

/// (sku, node, qty) of a wire plan's shipments, sorted.
fn wire_shipped(plan: &v1::RoutePlan) -> Vec<(String, String, i64)> {
    let mut lines: Vec<(String, String, i64)> = plan
        .shipments
        .iter()
        .flat_map(|shipment| {
            shipment.lines.iter().map(|line| (line.sku.clone(), shipment.node_id.clone(), line.qty))
        })
        .collect();
    lines.sort();
    lines
}

/// (sku, node, qty) of a reservation's lines, sorted.
async fn reserved_lines(client: &mut InventoryClient, reservation_id: &str) -> Vec<(String, String, i64)> {
    let reservation = client
        .get_reservation(v1::GetReservationRequest { reservation_id: reservation_id.into() })
        .await
        .unwrap()
        .into_inner();
    let mut lines: Vec<(String, String, i64)> =
        reservation.lines.iter().map(|line| (line.sku.clone(), line.node_id.clone(), line.qty)).collect();
    lines.sort();
    lines
}

async fn release(client: &mut InventoryClient, reservation_id: &str) {
    let reservation = client
        .release_reservation(v1::ReleaseReservationRequest { reservation_id: reservation_id.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reservation.status, v1::reservation::Status::Released as i32);
}

fn wire_node_reason(plan: &v1::RoutePlan, node: &str) -> WireExplanation {
    let entry = plan
        .explanation
        .iter()
        .find(|entry| entry.node_id == node && entry.sku.is_empty())
        .unwrap_or_else(|| panic!("no explanation for {node}: {plan:#?}"));
    WireExplanation::try_from(entry.reason).unwrap()
}

fn wire_unroutable(plan: &v1::RoutePlan) -> Vec<(String, i64, WireUnroutable)> {
    plan.unroutable
        .iter()
        .map(|entry| (entry.sku.clone(), entry.qty, WireUnroutable::try_from(entry.reason).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_route_plans_and_reserves_nothing() {
    // Goal: Route answers the plan of API.md and reserves nothing. Method: two warehouses at 1°
    // and 5°; 3 units go from the near one at 500 + 111 + 30 = 641; ATP is unchanged after.
    let (mut server, _clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("wh-near", 1.0, 0), wire_node("wh-far", 5.0, 0)]).await;
    set_stock(&mut server.inventory, &[("sku-1", "wh-near", 10), ("sku-1", "wh-far", 10)]).await;
    let before = atp_table(&mut server.inventory, "sku-1").await;

    let plan = server.routing.route(route_request(&[("sku-1", 3)], None)).await.unwrap().into_inner();
    assert_eq!(plan.shipments.len(), 1, "{plan:#?}");
    let shipment = &plan.shipments[0];
    assert_eq!(shipment.node_id, "wh-near");
    assert_eq!(shipment.lines, vec![v1::SkuQty { sku: "sku-1".into(), qty: 3 }]);
    assert_eq!((shipment.cost, shipment.estimated_days), (641, 2));
    assert!((shipment.distance_km - KM_PER_DEGREE).abs() < 1e-6);
    assert_eq!(
        (plan.total_cost, plan.objective, plan.objective_lower_bound, plan.optimal),
        (641, 641, 641, true)
    );
    assert!(plan.backordered.is_empty() && plan.unroutable.is_empty());
    assert_eq!(wire_node_reason(&plan, "wh-near"), WireExplanation::Selected);
    assert_eq!(wire_node_reason(&plan, "wh-far"), WireExplanation::NotSelected);

    // More than one node holds: a split, still nothing reserved. Equal unit costs make every
    // division cost the same (1,817 + 500); units fill in node order, "wh-far" first.
    let plan = server.routing.route(route_request(&[("sku-1", 15)], None)).await.unwrap().into_inner();
    assert_eq!(
        wire_shipped(&plan),
        vec![("sku-1".into(), "wh-far".into(), 10), ("sku-1".into(), "wh-near".into(), 5)]
    );
    assert_eq!((plan.total_cost, plan.objective), (1_817, 2_317));
    // Too much, all or nothing (the default options): everything unroutable, nothing reserved.
    let plan = server.routing.route(route_request(&[("sku-1", 25)], None)).await.unwrap().into_inner();
    assert!(plan.shipments.is_empty());
    assert_eq!(
        wire_unroutable(&plan),
        vec![
            ("sku-1".into(), 5, WireUnroutable::NoStock),
            ("sku-1".into(), 20, WireUnroutable::PartialNotAllowed)
        ]
    );
    assert_eq!(atp_table(&mut server.inventory, "sku-1").await, before, "Route reserves nothing");
    assert_eq!(before, vec![("wh-far".into(), 10, 0), ("wh-near".into(), 10, 0)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_allocate_reserves_the_plan_and_replays() {
    // Goal: Allocate reserves exactly the plan's shipments (GetReservation lines = shipments,
    // ATP drops by them), a replay returns the identical response, a different request under
    // the same key is ALREADY_EXISTS. Method: a split allocation over two warehouses.
    let (mut server, _clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("wh-near", 1.0, 0), wire_node("wh-far", 5.0, 0)]).await;
    set_stock(
        &mut server.inventory,
        &[("sku-1", "wh-near", 10), ("sku-1", "wh-far", 10), ("sku-2", "wh-far", 4)],
    )
    .await;
    let route = route_request(&[("sku-1", 12), ("sku-2", 1)], wire_options(0, false, false));
    let quote = server.routing.route(route.clone()).await.unwrap().into_inner();

    let response = allocate(&mut server.routing, allocate_request("alloc-1", route.clone())).await;
    let plan = response.plan.clone().expect("a plan");
    assert_eq!(plan, quote, "nothing changed in between: Allocate plans like Route");
    assert!(!response.reservation_id.is_empty());
    assert!(response.expires_at.is_none(), "ttl_ms 0: no expiry");
    // sku-2 is only at "wh-far", so both nodes ship; with equal unit costs "wh-far" fills first.
    let shipped = wire_shipped(&plan);
    assert_eq!(
        shipped,
        vec![
            ("sku-1".into(), "wh-far".into(), 10),
            ("sku-1".into(), "wh-near".into(), 2),
            ("sku-2".into(), "wh-far".into(), 1)
        ]
    );
    assert_eq!(reserved_lines(&mut server.inventory, &response.reservation_id).await, shipped);
    let reservation = server
        .inventory
        .get_reservation(v1::GetReservationRequest { reservation_id: response.reservation_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reservation.status, v1::reservation::Status::Held as i32);
    assert_eq!(
        (reservation.reference.as_str(), reservation.idempotency_key.as_str()),
        ("cart-alloc-1", "alloc-1")
    );
    assert_eq!(
        atp_table(&mut server.inventory, "sku-1").await,
        vec![("wh-far".into(), 0, 10), ("wh-near".into(), 8, 2)]
    );
    assert_eq!(atp_table(&mut server.inventory, "sku-2").await, vec![("wh-far".into(), 3, 1)]);

    // Replay: the identical response, nothing more reserved.
    let replay = allocate(&mut server.routing, allocate_request("alloc-1", route.clone())).await;
    assert_eq!(replay, response);
    assert_eq!(
        atp_table(&mut server.inventory, "sku-1").await,
        vec![("wh-far".into(), 0, 10), ("wh-near".into(), 8, 2)]
    );

    // The same key for another request.
    let other = route_request(&[("sku-1", 1)], wire_options(0, false, false));
    let status = server.routing.allocate(allocate_request("alloc-1", other)).await.unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    let mut changed = allocate_request("alloc-1", route.clone());
    changed.reference = "another-cart".into();
    assert_eq!(server.routing.allocate(changed).await.unwrap_err().code(), Code::AlreadyExists);
    assert_eq!(
        atp_table(&mut server.inventory, "sku-1").await,
        vec![("wh-far".into(), 0, 10), ("wh-near".into(), 8, 2)]
    );

    // A second allocation sees what the first took.
    let second =
        allocate(&mut server.routing, allocate_request("alloc-2", route_request(&[("sku-1", 8)], None)))
            .await;
    assert_eq!(wire_shipped(second.plan.as_ref().unwrap()), vec![("sku-1".into(), "wh-near".into(), 8)]);
    let third =
        allocate(&mut server.routing, allocate_request("alloc-3", route_request(&[("sku-1", 1)], None)))
            .await;
    assert!(third.reservation_id.is_empty() && third.plan.as_ref().unwrap().shipments.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_allocate_without_shipments_is_not_remembered() {
    // Goal: a plan that reserves nothing holds nothing and is not remembered: a retry with the
    // same key plans again. Method: allocate with no stock, add stock, retry the same key.
    let (mut server, _clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("wh", 1.0, 0)]).await;
    let route = route_request(&[("sku-1", 2)], wire_options(0, true, true));
    let first = allocate(&mut server.routing, allocate_request("retry-me", route.clone())).await;
    assert!(first.reservation_id.is_empty() && first.expires_at.is_none());
    let plan = first.plan.unwrap();
    assert!(plan.shipments.is_empty());
    assert_eq!(plan.backordered, vec![v1::SkuQty { sku: "sku-1".into(), qty: 2 }]);

    set_stock(&mut server.inventory, &[("sku-1", "wh", 5)]).await;
    let second = allocate(&mut server.routing, allocate_request("retry-me", route)).await;
    assert!(!second.reservation_id.is_empty());
    assert_eq!(wire_shipped(second.plan.as_ref().unwrap()), vec![("sku-1".into(), "wh".into(), 2)]);
    assert_eq!(atp_table(&mut server.inventory, "sku-1").await, vec![("wh".into(), 3, 2)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_invalid_arguments_and_unknown_pickup_node() {
    // Goal: malformed requests are INVALID_ARGUMENT naming the field (Route and Allocate) and
    // reserve nothing; an unknown pickup node is NOT_FOUND. Method: one request per mistake.
    let (mut server, _clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("wh", 1.0, 0)]).await;
    set_stock(&mut server.inventory, &[("sku-1", "wh", 10)]).await;
    let good = route_request(&[("sku-1", 1)], None);
    let with = |adjust: fn(&mut v1::RouteRequest)| {
        let mut request = good.clone();
        adjust(&mut request);
        request
    };
    let cases: Vec<(&str, v1::RouteRequest, &str)> = vec![
        ("no lines", with(|request| request.lines.clear()), "lines"),
        (
            "duplicate sku",
            with(|request| request.lines.push(v1::SkuQty { sku: "sku-1".into(), qty: 2 })),
            "lines[1].sku",
        ),
        ("qty 0", with(|request| request.lines[0].qty = 0), "lines[0].qty"),
        ("negative qty", with(|request| request.lines[0].qty = -1), "lines[0].qty"),
        ("bad sku", with(|request| request.lines[0].sku = "has space".into()), "lines[0].sku"),
        ("SHIP without ship_to", with(|request| request.ship_to = None), "ship_to"),
        (
            "UNSPECIFIED without ship_to",
            with(|request| {
                request.method = v1::Method::Unspecified as i32;
                request.ship_to = None;
            }),
            "ship_to",
        ),
        (
            "lat 91",
            with(|request| request.ship_to = Some(v1::Location { lat: 91.0, lon: 0.0 })),
            "ship_to.lat",
        ),
        (
            "lon -181",
            with(|request| request.ship_to = Some(v1::Location { lat: 0.0, lon: -181.0 })),
            "ship_to.lon",
        ),
        (
            "PICKUP without pickup_node_id",
            with(|request| request.method = v1::Method::Pickup as i32),
            "pickup_node_id",
        ),
        ("unknown method", with(|request| request.method = 9), "method"),
        ("bad channel", with(|request| request.channel = "we b".into()), "channel"),
    ];
    for (what, request, field) in cases {
        for (rpc, result) in [
            ("Route", server.routing.route(request.clone()).await.map(|_| ())),
            ("Allocate", server.routing.allocate(allocate_request("key", request.clone())).await.map(|_| ())),
        ] {
            let status = result.expect_err(what);
            assert_eq!(status.code(), Code::InvalidArgument, "{rpc} {what}: {status:?}");
            assert!(
                status.message().contains(field),
                "{rpc} {what}: {:?} does not name {field}",
                status.message()
            );
        }
    }
    let status = server.routing.allocate(allocate_request("", good.clone())).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("idempotency_key"), "{status:?}");
    assert_eq!(
        atp_table(&mut server.inventory, "sku-1").await,
        vec![("wh".into(), 10, 0)],
        "nothing reserved"
    );

    // PICKUP ignores ship_to; an unknown store is NOT_FOUND.
    let pickup = with(|request| {
        request.method = v1::Method::Pickup as i32;
        request.pickup_node_id = "store-9".into();
        request.ship_to = Some(v1::Location { lat: 91.0, lon: 0.0 });
    });
    let status = server.routing.route(pickup.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("store-9"), "{status:?}");
    let status = server.routing.allocate(allocate_request("pickup", pickup)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    server.stop().await;
}

/// "cap" (1°, daily capacity 2) holds sku-1 and sku-2; "far" (5°, unlimited) holds only sku-1.
async fn capacity_setup(server: &mut Server) {
    upsert(&mut server.inventory, vec![wire_node("cap", 1.0, 2), wire_node("far", 5.0, 0)]).await;
    set_stock(&mut server.inventory, &[("sku-1", "cap", 10), ("sku-1", "far", 10), ("sku-2", "cap", 10)])
        .await;
}

/// Allocates one unit of `sku` (partial allowed, no backorder) and returns the response.
async fn allocate_one(server: &mut Server, key: &str, sku: &str) -> v1::AllocateResponse {
    allocate(
        &mut server.routing,
        allocate_request(key, route_request(&[(sku, 1)], wire_options(0, true, false))),
    )
    .await
}

fn shipping_nodes(response: &v1::AllocateResponse) -> Vec<String> {
    response.plan.as_ref().unwrap().shipments.iter().map(|shipment| shipment.node_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_capacity_limits_allocations_and_release_returns_it() {
    // Goal: a node with daily_capacity 2 takes exactly two Allocates; the third routes elsewhere
    // or is CAPACITY_EXHAUSTED; releasing one gives the slot back; a new day resets it. Method:
    // the near node "cap" is everyone's first choice; a manual clock at noon.
    let (mut server, clock) = Server::start().await;
    capacity_setup(&mut server).await;
    let first = allocate_one(&mut server, "k-1", "sku-1").await;
    let second = allocate_one(&mut server, "k-2", "sku-2").await;
    assert_eq!((shipping_nodes(&first), shipping_nodes(&second)), (vec!["cap".into()], vec!["cap".into()]));

    // Full: sku-1 goes to "far"; Route explains why.
    let quote = server.routing.route(route_request(&[("sku-1", 1)], None)).await.unwrap().into_inner();
    assert_eq!(wire_node_reason(&quote, "cap"), WireExplanation::CapacityExhausted);
    let third = allocate_one(&mut server, "k-3", "sku-1").await;
    assert_eq!(shipping_nodes(&third), vec!["far".to_string()]);
    // sku-2 is only at "cap": CAPACITY_EXHAUSTED, or a backorder when allowed.
    let blocked = allocate_one(&mut server, "k-4", "sku-2").await;
    assert!(blocked.reservation_id.is_empty());
    assert_eq!(
        wire_unroutable(blocked.plan.as_ref().unwrap()),
        vec![("sku-2".into(), 1, WireUnroutable::CapacityExhausted)]
    );
    let waiting = allocate(
        &mut server.routing,
        allocate_request("k-5", route_request(&[("sku-2", 1)], wire_options(0, true, true))),
    )
    .await;
    assert_eq!(waiting.plan.unwrap().backordered, vec![v1::SkuQty { sku: "sku-2".into(), qty: 1 }]);
    assert_eq!(positions(&mut server.inventory, "sku-2").await["cap"].reserved, 1);

    // Releasing one allocation gives its slot back; then full again.
    release(&mut server.inventory, &first.reservation_id).await;
    let again = allocate_one(&mut server, "k-6", "sku-2").await;
    assert_eq!(shipping_nodes(&again), vec!["cap".to_string()]);
    let full = allocate_one(&mut server, "k-7", "sku-2").await;
    assert!(full.reservation_id.is_empty(), "{full:#?}");

    // Releasing twice does not give back two slots.
    release(&mut server.inventory, &second.reservation_id).await;
    release(&mut server.inventory, &second.reservation_id).await;
    assert_eq!(shipping_nodes(&allocate_one(&mut server, "k-8", "sku-2").await), vec!["cap".to_string()]);
    assert!(
        allocate_one(&mut server, "k-9", "sku-2").await.reservation_id.is_empty(),
        "one slot came back, not two"
    );

    // The next capacity day starts empty.
    clock.advance_ms(DAY_MS);
    for key in ["k-10", "k-11"] {
        assert_eq!(
            shipping_nodes(&allocate_one(&mut server, key, "sku-2").await),
            vec!["cap".to_string()],
            "{key}"
        );
    }
    assert!(allocate_one(&mut server, "k-12", "sku-2").await.reservation_id.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_capacity_survives_a_restart() {
    // Goal: the capacity used today survives a restart, and so do Allocate replays. Method: fill
    // "cap" (capacity 2), shut down gracefully, start again on the same data directory and
    // clock; then release one allocation and see the slot come back.
    let (mut server, clock) = Server::start().await;
    capacity_setup(&mut server).await;
    let first = allocate_one(&mut server, "k-1", "sku-1").await;
    let second = allocate_one(&mut server, "k-2", "sku-2").await;
    assert_eq!((shipping_nodes(&first), shipping_nodes(&second)), (vec!["cap".into()], vec!["cap".into()]));

    let dir = server.stop().await;
    let mut server = Server::start_in(dir, clock.clone()).await;
    let quote = server.routing.route(route_request(&[("sku-1", 1)], None)).await.unwrap().into_inner();
    assert_eq!(wire_node_reason(&quote, "cap"), WireExplanation::CapacityExhausted, "{quote:#?}");
    assert_eq!(shipping_nodes(&allocate_one(&mut server, "k-3", "sku-1").await), vec!["far".to_string()]);
    let blocked = allocate_one(&mut server, "k-4", "sku-2").await;
    assert_eq!(
        wire_unroutable(blocked.plan.as_ref().unwrap()),
        vec![("sku-2".into(), 1, WireUnroutable::CapacityExhausted)]
    );
    // The original response is replayed after the restart.
    assert_eq!(allocate_one(&mut server, "k-1", "sku-1").await, first);

    release(&mut server.inventory, &first.reservation_id).await;
    assert_eq!(shipping_nodes(&allocate_one(&mut server, "k-5", "sku-2").await), vec!["cap".to_string()]);
    assert!(allocate_one(&mut server, "k-6", "sku-2").await.reservation_id.is_empty());

    // Restarted on the next day: the old allocations no longer count.
    let dir = server.stop().await;
    clock.advance_ms(DAY_MS);
    let mut server = Server::start_in(dir, clock).await;
    assert_eq!(shipping_nodes(&allocate_one(&mut server, "k-7", "sku-2").await), vec!["cap".to_string()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_capacity_counts_allocations_not_lines_and_expiry_returns_it() {
    // Goal: capacity counts shipments (one per allocation and node, whatever its lines), and an
    // allocation that expires gives its slot back like a release. Method: "cap" (capacity 2)
    // ships sku-1 + sku-2 in one allocation (one slot), then a 1 s TTL allocation takes the
    // last slot; the manual clock passes its expiry and the sweep returns units and slot.
    let (mut server, clock) = Server::start().await;
    capacity_setup(&mut server).await;
    let both = allocate(
        &mut server.routing,
        allocate_request(
            "two-lines",
            route_request(&[("sku-1", 1), ("sku-2", 1)], wire_options(0, true, false)),
        ),
    )
    .await;
    assert_eq!(shipping_nodes(&both), vec!["cap".to_string()]);
    assert_eq!(both.plan.as_ref().unwrap().shipments[0].lines.len(), 2);

    let mut expiring =
        allocate_request("expiring", route_request(&[("sku-2", 1)], wire_options(0, true, false)));
    expiring.ttl_ms = 1_000;
    let expiring = allocate(&mut server.routing, expiring).await;
    assert_eq!(shipping_nodes(&expiring), vec!["cap".to_string()], "one allocation used one slot of two");
    assert_eq!(expiring.expires_at.as_ref().map(|at| at.seconds as u64 * 1_000), Some(NOON_MS + 1_000));
    assert!(allocate_one(&mut server, "full", "sku-2").await.reservation_id.is_empty());

    clock.advance_ms(1_001);
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while positions(&mut server.inventory, "sku-2").await["cap"].reserved != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the allocation did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reservation = server
        .inventory
        .get_reservation(v1::GetReservationRequest { reservation_id: expiring.reservation_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reservation.status, v1::reservation::Status::Expired as i32);
    assert_eq!(
        shipping_nodes(&allocate_one(&mut server, "after-expiry", "sku-2").await),
        vec!["cap".to_string()]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_route_respects_safety_stock_disabled_nodes_and_pickup() {
    // Goal: routing plans on ATP (on_hand − reserved − safety stock, 0 at a disabled node), and
    // PICKUP over gRPC serves only the named store at distance 0. Method: a near node whose
    // safety stock leaves 2 units, a disabled nearer node, a far node and a store.
    let (mut server, _clock) = Server::start().await;
    let mut store = common::node("store", 0.0, 3.0);
    store.r#type = v1::node::Type::Store as i32;
    store.can_ship = false;
    store.can_pickup = true;
    store.processing_days = 0;
    let nodes = vec![
        v1::Node { default_safety_stock: 8, ..wire_node("near", 1.0, 0) },
        v1::Node { enabled: false, ..wire_node("nearest", 0.5, 0) },
        wire_node("far", 5.0, 0),
        store,
    ];
    upsert(&mut server.inventory, nodes).await;
    set_stock(
        &mut server.inventory,
        &[("sku-1", "near", 10), ("sku-1", "nearest", 10), ("sku-1", "far", 10), ("sku-1", "store", 2)],
    )
    .await;

    let plan = server.routing.route(route_request(&[("sku-1", 2)], None)).await.unwrap().into_inner();
    assert_eq!(wire_shipped(&plan), vec![("sku-1".into(), "near".into(), 2)]);
    assert_eq!(wire_node_reason(&plan, "nearest"), WireExplanation::Disabled);
    assert_eq!(wire_node_reason(&plan, "store"), WireExplanation::CannotShip);
    // 3 units: "near" has only 2 above its safety stock; "far" holds all 3 for less than a split.
    let plan = server.routing.route(route_request(&[("sku-1", 3)], None)).await.unwrap().into_inner();
    assert_eq!(wire_shipped(&plan), vec![("sku-1".into(), "far".into(), 3)]);
    assert_eq!(plan.total_cost, 500 + 556 + 30);

    let mut pickup = route_request(&[("sku-1", 3)], wire_options(0, true, true));
    pickup.method = v1::Method::Pickup as i32;
    pickup.pickup_node_id = "store".into();
    pickup.ship_to = None;
    let plan = server.routing.route(pickup.clone()).await.unwrap().into_inner();
    assert_eq!(wire_shipped(&plan), vec![("sku-1".into(), "store".into(), 2)]);
    let shipment = &plan.shipments[0];
    assert_eq!((shipment.distance_km, shipment.estimated_days, shipment.cost), (0.0, 0, 500 + 20));
    assert_eq!(plan.backordered, vec![v1::SkuQty { sku: "sku-1".into(), qty: 1 }]);
    assert_eq!(wire_node_reason(&plan, "far"), WireExplanation::NotPickupNode);
    let allocated = allocate(&mut server.routing, allocate_request("pickup", pickup)).await;
    assert_eq!(wire_shipped(allocated.plan.as_ref().unwrap()), vec![("sku-1".into(), "store".into(), 2)]);
    assert_eq!(positions(&mut server.inventory, "sku-1").await["store"].atp, 0);
    server.stop().await;
}

/// How many of the reservations `ids` are open (HELD or CONFIRMED) and ship from `node`.
async fn open_allocations_at(server: &mut Server, ids: &[String], node: &str) -> usize {
    let mut count = 0;
    for id in ids.iter().filter(|id| !id.is_empty()) {
        let reservation = server
            .inventory
            .get_reservation(v1::GetReservationRequest { reservation_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        let open = [v1::reservation::Status::Held as i32, v1::reservation::Status::Confirmed as i32]
            .contains(&reservation.status);
        if open && reservation.lines.iter().any(|line| line.node_id == node) {
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_capacity_set_mid_day_counts_the_day_s_allocations() {
    // Goal: "capacity left today" is daily_capacity minus today's allocations at the node, the
    // same before and after a restart (allocate.rs: capacity "is the count of today's open or
    // fulfilled allocations per node, rebuilt from the reservations at start-up"). Method:
    // "cap" is unlimited while one allocation ships from it; then its daily_capacity becomes 1.
    let (mut server, clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("cap", 1.0, 0), wire_node("far", 5.0, 0)]).await;
    set_stock(&mut server.inventory, &[("sku-1", "cap", 10), ("sku-1", "far", 10)]).await;
    assert_eq!(shipping_nodes(&allocate_one(&mut server, "k-1", "sku-1").await), vec!["cap".to_string()]);
    upsert(&mut server.inventory, vec![wire_node("cap", 1.0, 1)]).await;

    let quote = server.routing.route(route_request(&[("sku-1", 1)], None)).await.unwrap().into_inner();
    let before_restart = wire_node_reason(&quote, "cap");
    let dir = server.stop().await;
    let mut server = Server::start_in(dir, clock).await;
    let quote = server.routing.route(route_request(&[("sku-1", 1)], None)).await.unwrap().into_inner();
    let after_restart = wire_node_reason(&quote, "cap");
    assert_eq!(
        (before_restart, after_restart),
        (WireExplanation::CapacityExhausted, WireExplanation::CapacityExhausted),
        "one allocation shipped from \"cap\" today and its capacity is now 1 (before, after restart)"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_release_never_frees_more_capacity_than_was_taken() {
    // Goal: a node never holds more of today's open allocations than its daily_capacity when
    // it ships another one; releasing an allocation frees only the slot it took. Method: one
    // allocation ships from "cap" while it is unlimited; its capacity becomes 2; allocate (2
    // open: full), release the first allocation (1 open), allocate twice more, counting the
    // open allocations shipping from "cap" after each one that does (never above 2).
    let (mut server, _clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("cap", 1.0, 0), wire_node("far", 5.0, 0)]).await;
    set_stock(&mut server.inventory, &[("sku-1", "cap", 10), ("sku-1", "far", 10)]).await;
    let first = allocate_one(&mut server, "k-1", "sku-1").await;
    assert_eq!(shipping_nodes(&first), vec!["cap".to_string()]);
    upsert(&mut server.inventory, vec![wire_node("cap", 1.0, 2)]).await;

    let mut ids = vec![first.reservation_id.clone()];
    for (step, key) in ["k-2", "release k-1", "k-3", "k-4"].into_iter().enumerate() {
        if key == "release k-1" {
            release(&mut server.inventory, &first.reservation_id).await;
            continue;
        }
        let response = allocate_one(&mut server, key, "sku-1").await;
        ids.push(response.reservation_id.clone());
        if shipping_nodes(&response) == ["cap"] {
            let open = open_allocations_at(&mut server, &ids, "cap").await;
            assert!(
                open <= 2,
                "step {step} ({key}): {open} open allocations ship from \"cap\" (daily_capacity 2)"
            );
        }
    }
    server.stop().await;
}

// ----- D. concurrency ------------------------------------------------------------------------

/// One successful allocation: its qty, plan lines and reserved lines.
#[derive(Debug)]
struct Allocated {
    qty: i64,
    reservation_id: String,
    planned: Vec<(String, String, i64)>,
}

/// 16 tasks allocate random SKUs of `skus` and quantities 1..=5, all or nothing, until each
/// got a plan without shipments 3 times (bounded). Returns every successful allocation.
async fn allocate_concurrently(server: &Server, skus: &'static [&'static str], seed: u64) -> Vec<Allocated> {
    const TASKS: u64 = 16;
    const MISSES: usize = 3;
    const ATTEMPTS_MAX: usize = 300;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let mut client = server.routing.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(task));
            let mut done = Vec::new();
            let mut misses = 0;
            for attempt in 0..ATTEMPTS_MAX {
                if misses == MISSES {
                    break;
                }
                let sku = skus[rng.random_range(0..skus.len())];
                let qty = rng.random_range(1..=5);
                let request = allocate_request(
                    &format!("task-{task}-{attempt}"),
                    route_request(&[(sku, qty)], wire_options(0, false, false)),
                );
                let response = match client.allocate(request).await {
                    Ok(response) => response.into_inner(),
                    // Load shedding is a legitimate answer under contention: try again.
                    Err(status) if status.code() == Code::ResourceExhausted => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    Err(status) => panic!("task {task}: {status:?}"),
                };
                let plan = response.plan.unwrap();
                if plan.shipments.is_empty() {
                    assert!(response.reservation_id.is_empty());
                    misses += 1;
                    continue;
                }
                done.push(Allocated {
                    qty,
                    reservation_id: response.reservation_id,
                    planned: wire_shipped(&plan),
                });
            }
            assert_eq!(misses, MISSES, "task {task} never ran out of stock");
            done
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(
            tokio::time::timeout(WAIT_MAX * 3, task).await.expect("a task hung").expect("a task failed"),
        );
    }
    all
}

/// Checks each allocation against its reservation and the sum against GetAvailability;
/// returns the units reserved per (sku, node).
async fn check_allocations(
    server: &mut Server,
    allocations: &[Allocated],
    on_hand: &BTreeMap<(String, String), i64>,
    seed: u64,
) -> BTreeMap<(String, String), i64> {
    let mut reserved: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for allocation in allocations {
        assert!(ids.insert(allocation.reservation_id.clone()), "a reservation id twice (seed {seed})");
        let lines = reserved_lines(&mut server.inventory, &allocation.reservation_id).await;
        assert_eq!(lines, allocation.planned, "reservation = plan shipments (seed {seed})");
        let units: i64 = lines.iter().map(|(_, _, qty)| qty).sum();
        assert_eq!(units, allocation.qty, "all or nothing ships every unit (seed {seed})");
        for (sku, node, qty) in lines {
            let held = on_hand.get(&(sku.clone(), node.clone())).copied().unwrap_or(0);
            assert!(qty > 0 && qty <= held, "{qty} {sku} from {node} holding {held} (seed {seed})");
            *reserved.entry((sku, node)).or_default() += qty;
        }
    }
    for ((sku, node), held) in on_hand {
        let position = positions(&mut server.inventory, sku).await.remove(node).unwrap();
        let sum = reserved.get(&(sku.clone(), node.clone())).copied().unwrap_or(0);
        assert_eq!(position.on_hand, *held, "{sku}@{node}: on_hand unchanged (seed {seed})");
        assert_eq!(position.reserved, sum, "{sku}@{node}: reserved = sum of reservations (seed {seed})");
        assert!(sum <= *held, "{sku}@{node}: {sum} reserved of {held} (seed {seed})");
        assert_eq!(position.atp, held - sum, "{sku}@{node} (seed {seed})");
    }
    reserved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocations_never_promise_a_unit_twice() {
    // Goal: concurrent Allocates never oversell: every reservation holds exactly its plan, the
    // reservations add up to GetAvailability's reserved, never above a node's stock. Method:
    // 30 + 20 + 10 units of one SKU, 16 tasks allocating random 1..=5 (seeded) until each saw
    // three plans without shipments; then at most 4 units can be left.
    let seed = seed("concurrent_allocations_never_promise_a_unit_twice");
    let (mut server, _clock) = Server::start().await;
    upsert(
        &mut server.inventory,
        vec![wire_node("n-1", 1.0, 0), wire_node("n-2", 2.0, 0), wire_node("n-3", 3.0, 0)],
    )
    .await;
    set_stock(&mut server.inventory, &[("hot", "n-1", 30), ("hot", "n-2", 20), ("hot", "n-3", 10)]).await;
    let on_hand: BTreeMap<(String, String), i64> = [("n-1", 30), ("n-2", 20), ("n-3", 10)]
        .iter()
        .map(|(node, units)| (("hot".into(), node.to_string()), *units))
        .collect();

    let allocations = allocate_concurrently(&server, &["hot"], seed).await;
    let reserved = check_allocations(&mut server, &allocations, &on_hand, seed).await;
    let total: i64 = reserved.values().sum();
    assert!(total <= 60, "{total} of 60 reserved (seed {seed})");
    // Every task stopped after a plan of qty ≤ 5 found too little: fewer than 5 units are left.
    assert!(60 - total <= 4, "{} units left unallocated (seed {seed})", 60 - total);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocations_respect_daily_capacity() {
    // Goal: under concurrency a node with daily_capacity 5 ships at most 5 allocations (exactly
    // 5 here: it is everyone's cheapest choice while it has capacity). Method: four SKUs (so
    // allocations lock different shards and race for the capacity itself) held at "n-1"
    // (capacity 5), "n-2" and "n-3"; 16 seeded tasks as above.
    const SKUS: &[&str] = &["hot-0", "hot-1", "hot-2", "hot-3"];
    let seed = seed("concurrent_allocations_respect_daily_capacity");
    let (mut server, _clock) = Server::start().await;
    upsert(
        &mut server.inventory,
        vec![wire_node("n-1", 1.0, 5), wire_node("n-2", 2.0, 0), wire_node("n-3", 3.0, 0)],
    )
    .await;
    let mut on_hand = BTreeMap::new();
    let mut entries = Vec::new();
    for sku in SKUS {
        for (node, units) in [("n-1", 30), ("n-2", 20), ("n-3", 10)] {
            on_hand.insert((sku.to_string(), node.to_string()), units);
            entries.push((*sku, node, units));
        }
    }
    set_stock(&mut server.inventory, &entries).await;

    let allocations = allocate_concurrently(&server, SKUS, seed).await;
    check_allocations(&mut server, &allocations, &on_hand, seed).await;
    let from_capped =
        allocations.iter().filter(|allocation| allocation.planned.iter().any(|line| line.1 == "n-1")).count();
    assert!(from_capped <= 5, "{from_capped} allocations ship from a node with capacity 5 (seed {seed})");
    assert_eq!(from_capped, 5, "the cheapest node is used until full (seed {seed})");
    let quote = server.routing.route(route_request(&[("hot-0", 1)], None)).await.unwrap().into_inner();
    assert_eq!(wire_node_reason(&quote, "n-1"), WireExplanation::CapacityExhausted);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_allocate_records_its_plan_in_the_audit_log() {
    // Goal: every Allocate leaves its plan and explanation in the durable audit log, under the
    // reservation it made, also across a restart. Method: two allocations, read the log back
    // from the store before and after a graceful restart.
    let (mut server, clock) = Server::start().await;
    upsert(&mut server.inventory, vec![wire_node("near", 1.0, 0), wire_node("far", 5.0, 0)]).await;
    set_stock(&mut server.inventory, &[("sku-1", "near", 5), ("sku-1", "far", 5)]).await;
    let mut ids = Vec::new();
    for key in ["audit-1", "audit-2"] {
        let request = allocate_request(key, route_request(&[("sku-1", 2)], wire_options(0, true, false)));
        let response = server.routing.allocate(request).await.unwrap().into_inner();
        ids.push(response.reservation_id);
    }
    let check = |events: &[allot::domain::AuditEvent]| {
        // The log holds every state change (the two stock.set events first); sequences are
        // gap-free over all of them.
        let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
        assert_eq!(sequences, (1..=events.len() as u64).collect::<Vec<_>>(), "gap-free sequence");
        let planned: Vec<_> =
            events.iter().filter(|event| event.event_type == "allocation.planned").collect();
        assert_eq!(planned.len(), 2, "{events:?}");
        for (event, id) in planned.iter().zip(&ids) {
            assert_eq!(format!("rsv-{}", event.reservation_id.unwrap()), *id);
            assert!(event.detail.contains("near [sku-1x2]"), "{}", event.detail);
            assert!(event.detail.contains("not_selected 1"), "{}", event.detail);
        }
        assert!(planned[0].sequence < planned[1].sequence);
    };
    check(&server.running.core.store.read_audit(1, 100).unwrap());
    let dir = server.stop().await;
    let server = Server::start_in(dir, clock).await;
    check(&server.running.core.store.read_audit(1, 100).unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_rules_reload_changes_the_next_plan() {
    // Goal: new routing rules apply to the next request without a restart (what SIGHUP does).
    // Method: a split that pays under penalty 0 is refused once the penalty outweighs it.
    let (mut server, _clock) = Server::start().await;
    upsert(
        &mut server.inventory,
        vec![wire_node("a", 1.0, 0), wire_node("b", -1.0, 0), wire_node("c", 9.0, 0)],
    )
    .await;
    set_stock(
        &mut server.inventory,
        &[("sku-1", "a", 5), ("sku-2", "b", 5), ("sku-1", "c", 5), ("sku-2", "c", 5)],
    )
    .await;
    let request = || route_request(&[("sku-1", 1), ("sku-2", 1)], wire_options(0, true, false));
    let mut rules = allot::routing::RoutingRules { split_penalty: 0, ..Default::default() };
    server.running.core.index.set_routing_rules(rules.clone());
    let plan = server.routing.route(request()).await.unwrap().into_inner();
    let nodes: Vec<&str> = plan.shipments.iter().map(|shipment| shipment.node_id.as_str()).collect();
    assert_eq!(nodes, ["a", "b"], "two near nodes beat one far node without a penalty");
    rules.split_penalty = 100_000;
    server.running.core.index.set_routing_rules(rules);
    let plan = server.routing.route(request()).await.unwrap().into_inner();
    let nodes: Vec<&str> = plan.shipments.iter().map(|shipment| shipment.node_id.as_str()).collect();
    assert_eq!(nodes, ["c"], "one far node beats a split that costs 100,000 more");
    server.stop().await;
}
