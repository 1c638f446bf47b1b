//! Routing benchmarks: `routing::route` (eligibility, planning, explanation) for 10 / 100 /
//! 1,000 nodes × 1 / 5 / 20 lines, plus the target case of 1,000 nodes × 10 lines. Nodes are
//! spread over the continental US with varied rates; each node holds each SKU with
//! probability 1/3 (seeded), so plans mix single-node and split answers.

use std::sync::Arc;

use allot::domain::{Node, NodeId, NodeType, ShippingRates, Sku};
use allot::routing::{self, Destination, RouteOptions, RouteRequest, RoutingRules, StockSource};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Stock {
    /// Per line, (node, ATP) sorted by node.
    atp: Vec<Vec<(NodeId, i64)>>,
}

impl StockSource for Stock {
    fn line_atp(&self, line: usize) -> std::borrow::Cow<'_, [(NodeId, i64)]> {
        std::borrow::Cow::Borrowed(&self.atp[line])
    }

    fn has_capacity(&self, _node: &Node) -> bool {
        true
    }
}

fn instance(node_count: usize, line_count: usize, seed: u64) -> (Vec<Arc<Node>>, Stock, RouteRequest) {
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes: Vec<Arc<Node>> = (0..node_count)
        .map(|index| {
            Arc::new(Node {
                node_id: NodeId::parse(&format!("N-{index:05}")).unwrap(),
                node_type: NodeType::Warehouse,
                lat: rng.random_range(25.0..49.0),
                lon: rng.random_range(-124.0..-67.0),
                enabled: true,
                can_ship: true,
                can_pickup: false,
                daily_capacity: 0,
                processing_days: rng.random_range(0..3),
                priority: rng.random_range(0..3),
                rates: ShippingRates {
                    base_cost: rng.random_range(300..1_500),
                    cost_per_km: rng.random_range(1..4),
                    cost_per_unit: rng.random_range(10..60),
                },
                default_safety_stock: 0,
                channels: Vec::new(),
            })
        })
        .collect();
    let mut atp = vec![Vec::new(); line_count];
    for line_atp in atp.iter_mut() {
        for node in &nodes {
            if rng.random_range(0..3) == 0 {
                line_atp.push((node.node_id.clone(), rng.random_range(1..20)));
            }
        }
    }
    let request = RouteRequest {
        lines: (0..line_count)
            .map(|line| (Sku::parse(&format!("SKU-{line}")).unwrap(), rng.random_range(1..4)))
            .collect(),
        destination: Destination::Ship { lat: 40.7, lon: -74.0 },
        channel: None,
        options: RouteOptions { max_shipments: 0, allow_partial: true, allow_backorder: true },
    };
    (nodes, Stock { atp }, request)
}

/// Single calls timed per case for the percentiles.
const PERCENTILE_CALLS: usize = 300;

fn bench_route(criterion: &mut Criterion) {
    let rules = RoutingRules::default();
    let mut group = criterion.benchmark_group("route");
    group.sample_size(30);
    for (node_count, line_count) in [
        (10, 1),
        (10, 5),
        (10, 20),
        (100, 1),
        (100, 5),
        (100, 20),
        (1_000, 1),
        (1_000, 5),
        (1_000, 10),
        (1_000, 20),
    ] {
        let (nodes, stock, request) = instance(node_count, line_count, 42);
        let plan = routing::route(&request, &nodes, &stock, &rules).unwrap();
        println!(
            "route {node_count} nodes x {line_count} lines: {} shipments, optimal {}, objective {} (bound {})",
            plan.shipments.len(),
            plan.optimal,
            plan.objective,
            plan.objective_lower_bound
        );
        // The target is a p99: time single calls too, and print their percentiles.
        let mut micros: Vec<f64> = (0..PERCENTILE_CALLS)
            .map(|_| {
                let started = std::time::Instant::now();
                std::hint::black_box(routing::route(&request, &nodes, &stock, &rules).unwrap());
                started.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        micros.sort_by(f64::total_cmp);
        let at = |quantile: f64| micros[((micros.len() - 1) as f64 * quantile) as usize];
        println!(
            "route {node_count} nodes x {line_count} lines: single calls p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            at(0.5),
            at(0.99),
            at(1.0)
        );
        let id = BenchmarkId::from_parameter(format!("{node_count} nodes x {line_count} lines"));
        group.bench_with_input(id, &(), |bencher, _| {
            bencher.iter(|| routing::route(&request, &nodes, &stock, &rules).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench_route, bench_planner_only);
criterion_main!(benches);

/// The planner alone on the 1,000 × 10 instance: separates search time from the eligibility
/// and explanation work around it.
fn bench_planner_only(criterion: &mut Criterion) {
    use allot::routing::planner::{self, Candidate, PlanOptions};
    let (nodes, stock, request) = instance(1_000, 10, 42);
    let demand: Vec<i64> = request.lines.iter().map(|(_, qty)| *qty).collect();
    let candidates: Vec<Candidate> = nodes
        .iter()
        .enumerate()
        .filter_map(|(order, node)| {
            let available: Vec<i64> = (0..demand.len())
                .map(|line| {
                    let atp =
                        stock.atp[line].iter().find(|(id, _)| *id == node.node_id).map_or(0, |(_, atp)| *atp);
                    atp.min(demand[line])
                })
                .collect();
            if available.iter().all(|units| *units == 0) {
                return None;
            }
            let distance = routing::geo::distance_km(node.lat, node.lon, 40.7, -74.0);
            Some(Candidate {
                fixed_cost: routing::geo::fixed_cost(node.rates.base_cost, node.rates.cost_per_km, distance),
                cost_per_unit: node.rates.cost_per_unit,
                priority: node.priority,
                order,
                available,
            })
        })
        .collect();
    let options = PlanOptions { max_shipments: 10, split_penalty: 500, expansion_budget: 100_000 };
    let plan = planner::plan(&demand, &candidates, options);
    println!(
        "planner 1000 x 10: {} candidates, {} expansions, optimal {}",
        candidates.len(),
        plan.expansions,
        plan.optimal
    );
    criterion.bench_function("planner only, 1000 nodes x 10 lines", |bencher| {
        bencher.iter(|| planner::plan(&demand, &candidates, options))
    });
    criterion.bench_function("planner greedy only, 1000 nodes x 10 lines", |bencher| {
        bencher.iter(|| planner::plan_greedy(&demand, &candidates, options))
    });
}
