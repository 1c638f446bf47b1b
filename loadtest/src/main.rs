//! allot-load: drives a running allotd over gRPC and reports throughput and latency.
//!
//! Closed loop: `--concurrency` callers spread over `--connections` HTTP/2 connections, each
//! sending its next request as soon as the previous one answers. Bounded by `--duration-secs`
//! and `--requests-max`; it stops by itself. Loopback addresses only.
//! (Open-loop arrival rates and the other scenarios come with the load-generator issue.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allot::proto::v1;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Scenario {
    /// grpc.health.v1 Check: the transport's own ceiling.
    Health,
    /// GetAvailability of one random SKU.
    Atp,
    /// One-line durable Reserve (qty 1, TTL) of a random SKU at a random node.
    Reserve,
    /// Route (a quote, nothing reserved) of `--lines` random SKUs to a random US address.
    Route,
    /// Allocate (plan and reserve, durable) of `--lines` random SKUs, qty 1 each.
    Allocate,
    /// CaptureOrder (validate, route, one fulfilment order per node, durable) of `--lines`
    /// random SKUs, qty 1 each, with a unique external order id.
    Capture,
    /// A whole checkout: CaptureOrder, then ConfirmShipment of every fulfilment order it made;
    /// the latency is that of the sequence.
    Checkout,
}

#[derive(Debug, Parser)]
#[command(about = "Load generator for allotd")]
struct Flags {
    /// allotd gRPC address (loopback only).
    #[arg(long, default_value = "127.0.0.1:50051")]
    addr: SocketAddr,
    #[arg(long, value_enum, default_value = "reserve")]
    scenario: Scenario,
    /// Callers in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Stop after this many requests in total (0 = only the duration bounds the run).
    #[arg(long, default_value_t = 0)]
    requests_max: u64,
    /// SKUs in the data set.
    #[arg(long, default_value_t = 10_000)]
    skus: usize,
    /// Nodes in the data set.
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Create the nodes and stock first (through the API).
    #[arg(long)]
    setup: bool,
    /// Lines per order (route, allocate).
    #[arg(long, default_value_t = 3)]
    lines: usize,
    /// Reservation TTL.
    #[arg(long, default_value_t = 60_000)]
    ttl_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Positions written per SetStock call during setup.
const SETUP_BATCH_LEN: usize = 10_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flags = Flags::parse();
    if !flags.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address; allot-load only targets this machine",
            flags.addr
        )
        .into());
    }
    if flags.concurrency == 0 || flags.connections == 0 || flags.skus == 0 || flags.nodes == 0 {
        return Err("--concurrency, --connections, --skus and --nodes must be at least 1".into());
    }
    let endpoint = format!("http://{}", flags.addr);
    let mut channels = Vec::with_capacity(flags.connections);
    for _ in 0..flags.connections {
        channels.push(Channel::from_shared(endpoint.clone())?.tcp_nodelay(true).connect().await?);
    }
    if flags.setup {
        setup(&channels[0], &flags).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(flags.duration_secs);
    let sent = Arc::new(AtomicU64::new(0));
    let flags = Arc::new(flags);
    let started = Instant::now();
    let mut callers = Vec::with_capacity(flags.concurrency);
    for caller in 0..flags.concurrency {
        let channel = channels[caller % channels.len()].clone();
        let flags = flags.clone();
        let sent = sent.clone();
        callers.push(tokio::spawn(async move { run_caller(caller, channel, &flags, deadline, &sent).await }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for caller in callers {
        let (histogram, caller_errors) = caller.await?;
        latency.add(&histogram)?;
        for (code, count) in caller_errors {
            *errors.entry(code).or_default() += count;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    report(&flags, &latency, &errors, elapsed);
    Ok(())
}

async fn setup(channel: &Channel, flags: &Flags) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = v1::inventory_client::InventoryClient::new(channel.clone())
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024);
    let nodes = (0..flags.nodes)
        .map(|index| v1::Node {
            node_id: node_id(index),
            r#type: v1::node::Type::Warehouse as i32,
            // Spread over the continental US, deterministically.
            location: Some(v1::Location {
                lat: 25.0 + (index as f64 * 7.3) % 24.0,
                lon: -124.0 + (index as f64 * 13.7) % 57.0,
            }),
            enabled: true,
            can_ship: true,
            can_pickup: false,
            daily_capacity: 0,
            processing_days: 1,
            priority: 0,
            rates: Some(v1::ShippingRates { base_cost: 500, cost_per_km: 1, cost_per_unit: 10 }),
            default_safety_stock: 0,
            channels: Vec::new(),
        })
        .collect();
    client.upsert_nodes(v1::UpsertNodesRequest { nodes }).await?;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(SETUP_BATCH_LEN);
    let mut written = 0usize;
    for sku in 0..flags.skus {
        for node in 0..flags.nodes {
            batch.push(v1::StockEntry {
                sku: sku_id(sku),
                node_id: node_id(node),
                on_hand: 1_000_000_000,
                safety_stock: None,
            });
            if batch.len() == SETUP_BATCH_LEN {
                written += batch.len();
                client.set_stock(v1::SetStockRequest { entries: std::mem::take(&mut batch) }).await?;
            }
        }
    }
    if !batch.is_empty() {
        written += batch.len();
        client.set_stock(v1::SetStockRequest { entries: batch }).await?;
    }
    eprintln!(
        "setup: {} nodes, {written} positions in {:.1} s",
        flags.nodes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sku_id(index: usize) -> String {
    format!("SKU-{index:07}")
}

fn node_id(index: usize) -> String {
    format!("DC-{index:03}")
}

async fn run_caller(
    caller: usize,
    channel: Channel,
    flags: &Flags,
    deadline: Instant,
    sent: &AtomicU64,
) -> (Histogram<u64>, BTreeMap<String, u64>) {
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let mut errors = BTreeMap::new();
    let mut rng = StdRng::seed_from_u64(flags.seed.wrapping_mul(1_000_003).wrapping_add(caller as u64));
    let mut inventory = v1::inventory_client::InventoryClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut routing = v1::routing_client::RoutingClient::new(channel.clone());
    let mut orders = v1::orders_client::OrdersClient::new(channel.clone());
    let mut fulfilment = v1::fulfilment_client::FulfilmentClient::new(channel);
    let mut sequence = 0u64;
    while Instant::now() < deadline {
        let total = sent.fetch_add(1, Ordering::Relaxed);
        if flags.requests_max > 0 && total >= flags.requests_max {
            break;
        }
        sequence += 1;
        let started = Instant::now();
        let result: Result<(), tonic::Status> = match flags.scenario {
            Scenario::Health => health
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map(|_| ()),
            Scenario::Atp => inventory
                .get_availability(v1::GetAvailabilityRequest {
                    skus: vec![sku_id(rng.random_range(0..flags.skus))],
                    channel: String::new(),
                    node_ids: Vec::new(),
                })
                .await
                .map(|_| ()),
            Scenario::Reserve => inventory
                .reserve(v1::ReserveRequest {
                    idempotency_key: format!("load-{}-{caller}-{sequence}", flags.seed),
                    lines: vec![v1::ReserveLine {
                        sku: sku_id(rng.random_range(0..flags.skus)),
                        node_id: node_id(rng.random_range(0..flags.nodes)),
                        qty: 1,
                    }],
                    ttl_ms: flags.ttl_ms,
                    reference: String::new(),
                    channel: String::new(),
                })
                .await
                .and_then(|response| {
                    if response.get_ref().status == v1::reserve_response::Status::Reserved as i32 {
                        Ok(())
                    } else {
                        Err(tonic::Status::failed_precondition("INSUFFICIENT"))
                    }
                }),
            Scenario::Route => routing.route(order(&mut rng, flags)).await.map(|_| ()),
            Scenario::Allocate => {
                let request = order(&mut rng, flags);
                routing
                    .allocate(v1::AllocateRequest {
                        lines: request.lines,
                        ship_to: request.ship_to,
                        method: request.method,
                        options: request.options,
                        idempotency_key: format!("load-{}-{caller}-{sequence}", flags.seed),
                        ttl_ms: flags.ttl_ms,
                        ..v1::AllocateRequest::default()
                    })
                    .await
                    .and_then(|response| {
                        if response.get_ref().reservation_id.is_empty() {
                            Err(tonic::Status::failed_precondition("NOTHING_RESERVED"))
                        } else {
                            Ok(())
                        }
                    })
            }
            Scenario::Capture => {
                orders.capture_order(capture(&mut rng, flags, caller, sequence)).await.map(|_| ())
            }
            Scenario::Checkout => {
                match orders.capture_order(capture(&mut rng, flags, caller, sequence)).await {
                    Err(status) => Err(status),
                    Ok(order) => {
                        let mut result = Ok(());
                        for fulfilment_order_id in &order.get_ref().fulfilment_order_ids {
                            let shipped = fulfilment
                                .confirm_shipment(v1::ConfirmShipmentRequest {
                                    fulfilment_order_id: fulfilment_order_id.clone(),
                                    idempotency_key: format!("ship-{}-{fulfilment_order_id}", flags.seed),
                                    lines: Vec::new(),
                                    carrier: "load".into(),
                                    tracking_number: format!("T{caller}-{sequence}"),
                                })
                                .await;
                            if let Err(status) = shipped {
                                result = Err(status);
                                break;
                            }
                        }
                        result
                    }
                }
            }
        };
        let micros = started.elapsed().as_micros().max(1) as u64;
        latency.saturating_record(micros);
        if let Err(status) = result {
            *errors.entry(format!("{:?}", status.code())).or_insert(0u64) += 1;
        }
    }
    (latency, errors)
}

/// A random order: `--lines` distinct SKUs, qty 1, to a random point in the US.
fn order(rng: &mut StdRng, flags: &Flags) -> v1::RouteRequest {
    let mut skus: Vec<usize> = Vec::with_capacity(flags.lines);
    while skus.len() < flags.lines.min(flags.skus) {
        let sku = rng.random_range(0..flags.skus);
        if !skus.contains(&sku) {
            skus.push(sku);
        }
    }
    v1::RouteRequest {
        lines: skus.into_iter().map(|sku| v1::SkuQty { sku: sku_id(sku), qty: 1 }).collect(),
        ship_to: Some(v1::Location {
            lat: rng.random_range(25.0..49.0),
            lon: rng.random_range(-124.0..-67.0),
        }),
        method: v1::Method::Ship as i32,
        options: Some(v1::RouteOptions { max_shipments: 0, allow_partial: true, allow_backorder: true }),
        ..v1::RouteRequest::default()
    }
}

/// A random order for CaptureOrder: `--lines` distinct SKUs, qty 1, a complete US address,
/// payment authorised, a unique external id.
fn capture(rng: &mut StdRng, flags: &Flags, caller: usize, sequence: u64) -> v1::CaptureOrderRequest {
    let route = order(rng, flags);
    let location = route.ship_to.unwrap_or_default();
    v1::CaptureOrderRequest {
        channel: "load".into(),
        external_order_id: format!("load-{}-{caller}-{sequence}", flags.seed),
        customer: Some(v1::Customer { customer_id: format!("c-{caller}"), ..v1::Customer::default() }),
        ship_to: Some(v1::Address {
            line1: "1 Main St".into(),
            city: "Springfield".into(),
            postal_code: "00000".into(),
            country: "US".into(),
            lat: location.lat,
            lon: location.lon,
            ..v1::Address::default()
        }),
        lines: route
            .lines
            .iter()
            .enumerate()
            .map(|(index, line)| v1::capture_order_request::Line {
                line_id: index.to_string(),
                sku: line.sku.clone(),
                qty: line.qty,
                unit_price: 1_000,
            })
            .collect(),
        payment: Some(v1::Payment {
            authorization_id: format!("auth-{caller}-{sequence}"),
            status: v1::payment::Status::Authorized as i32,
            amount: 1_000 * route.lines.len() as i64,
        }),
        method: v1::Method::Ship as i32,
        pickup_node_id: String::new(),
    }
}

fn report(flags: &Flags, latency: &Histogram<u64>, errors: &BTreeMap<String, u64>, elapsed_secs: f64) {
    let count = latency.len();
    let throughput = count as f64 / elapsed_secs;
    let error_count: u64 = errors.values().sum();
    let ms = |quantile: f64| latency.value_at_quantile(quantile) as f64 / 1_000.0;
    if flags.json {
        let errors_json: Vec<String> =
            errors.iter().map(|(code, count)| format!("\"{code}\":{count}")).collect();
        println!(
            "{{\"scenario\":\"{:?}\",\"concurrency\":{},\"connections\":{},\"requests\":{count},\"errors\":{error_count},\"seconds\":{elapsed_secs:.3},\"ops_per_second\":{throughput:.1},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\"errors_by_code\":{{{}}}}}",
            flags.scenario,
            flags.concurrency,
            flags.connections,
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            latency.max() as f64 / 1_000.0,
            errors_json.join(",")
        );
    } else {
        println!(
            "scenario {:?}: {count} requests in {elapsed_secs:.2} s = {throughput:.0} ops/s (concurrency {}, connections {})",
            flags.scenario, flags.concurrency, flags.connections
        );
        println!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            ms(0.999),
            latency.max() as f64 / 1_000.0
        );
        println!("errors: {error_count} {errors:?}");
    }
}
