//! Helpers of the Orders and Fulfilment tests (`tests/orders.rs`): one gRPC connection with a
//! client per service, request builders, reads that check what they read (every `Order` that
//! comes back goes through `check_counters`), the event feed, and polling with a deadline for
//! what the daemon does in the background. Every helper panics with context on an RPC error;
//! tests that expect an error call the raw clients and `expect_code`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use allot::proto::v1;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use super::InventoryClient;

pub type OrdersClient = v1::orders_client::OrdersClient<Channel>;
pub type FulfilmentClient = v1::fulfilment_client::FulfilmentClient<Channel>;
pub type RoutingClient = v1::routing_client::RoutingClient<Channel>;

pub use v1::fulfilment_order::Status as FoStatus;
pub use v1::order::{HoldReason, Status as OrderStatus};

/// Keeps one RPC to a dead or stuck daemon from hanging a test (a debug build on 2 busy cores
/// can be slow, hence generous). Not a speed assertion.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for background work: the backorder retry acts within about a second.
pub const BACKGROUND_DEADLINE: Duration = Duration::from_secs(10);
/// The longest wait for the next item of a stream.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(20);
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// The channel of `order_request`.
pub const CHANNEL: &str = "web";
/// Where orders ship to. Nodes of these tests sit on the same parallel, east of it, so with
/// equal rates the node with the smallest longitude is the cheapest (see `node_at`). Not
/// (0, 0): zero coordinates make an address incomplete.
pub const SHIP_TO_LAT: f64 = 10.0;
pub const SHIP_TO_LON: f64 = 0.0;
/// The unit price of `order_request` lines, in cents.
pub const UNIT_PRICE: i64 = 1_000;

// ----- clients ------------------------------------------------------------------------------

/// A client per service over one HTTP/2 connection; clones share it.
#[derive(Clone)]
pub struct Clients {
    pub inventory: InventoryClient,
    pub orders: OrdersClient,
    pub fulfilment: FulfilmentClient,
    pub routing: RoutingClient,
}

impl Clients {
    /// Connects to `address`, retrying while the daemon comes up.
    pub async fn connect(address: SocketAddr) -> Clients {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .expect("a valid endpoint")
            .timeout(RPC_TIMEOUT)
            .tcp_nodelay(true);
        for _ in 0..200 {
            if let Ok(channel) = endpoint.connect().await {
                return Clients {
                    inventory: v1::inventory_client::InventoryClient::new(channel.clone()),
                    orders: v1::orders_client::OrdersClient::new(channel.clone()),
                    fulfilment: v1::fulfilment_client::FulfilmentClient::new(channel.clone()),
                    routing: v1::routing_client::RoutingClient::new(channel),
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("could not connect to {address}");
    }

    // ----- inventory ------------------------------------------------------------------------

    pub async fn upsert_nodes(&mut self, nodes: Vec<v1::Node>) {
        let count = nodes.len() as i64;
        let response =
            self.inventory.upsert_nodes(v1::UpsertNodesRequest { nodes }).await.expect("UpsertNodes");
        assert_eq!(response.into_inner().count, count);
    }

    pub async fn node_ids(&mut self) -> Vec<String> {
        let nodes = self.inventory.list_nodes(v1::ListNodesRequest {}).await.expect("ListNodes");
        nodes.into_inner().nodes.into_iter().map(|node| node.node_id).collect()
    }

    /// SetStock of (sku, node, on_hand) entries.
    pub async fn set_stock(&mut self, entries: &[(&str, &str, i64)]) {
        let entries: Vec<v1::StockEntry> =
            entries.iter().map(|(sku, node, on_hand)| super::stock(sku, node, *on_hand)).collect();
        let count = entries.len() as i64;
        let response = self.inventory.set_stock(v1::SetStockRequest { entries }).await.expect("SetStock");
        assert_eq!(response.into_inner().count, count);
    }

    /// AdjustStock of (sku, node, delta) entries under `adjustment_id`.
    pub async fn adjust_stock(&mut self, adjustment_id: &str, entries: &[(&str, &str, i64)]) {
        let entries = entries
            .iter()
            .map(|(sku, node, delta)| v1::StockAdjustment {
                sku: sku.to_string(),
                node_id: node.to_string(),
                delta: *delta,
                reason: format!("test {adjustment_id}"),
            })
            .collect();
        self.inventory
            .adjust_stock(v1::AdjustStockRequest { adjustment_id: adjustment_id.into(), entries })
            .await
            .unwrap_or_else(|status| panic!("AdjustStock {adjustment_id}: {status}"));
    }

    /// Every position of `skus`, by (sku, node).
    pub async fn positions(&mut self, skus: &[String]) -> BTreeMap<(String, String), v1::Position> {
        let request =
            v1::GetAvailabilityRequest { skus: skus.to_vec(), channel: String::new(), node_ids: Vec::new() };
        let items = self.inventory.get_availability(request).await.expect("GetAvailability").into_inner();
        let mut found = BTreeMap::new();
        for item in items.items {
            for position in item.nodes {
                found.insert((item.sku.clone(), position.node_id.clone()), position);
            }
        }
        found
    }

    /// The position of `sku` at `node`; all zero when there is none.
    pub async fn position(&mut self, sku: &str, node: &str) -> v1::Position {
        self.positions(&[sku.to_string()])
            .await
            .remove(&(sku.to_string(), node.to_string()))
            .unwrap_or_else(|| v1::Position { node_id: node.into(), ..v1::Position::default() })
    }

    /// (on_hand, reserved) of `sku` at `node`.
    pub async fn stock_of(&mut self, sku: &str, node: &str) -> (i64, i64) {
        let position = self.position(sku, node).await;
        (position.on_hand, position.reserved)
    }

    pub async fn reservation(&mut self, reservation_id: &str) -> v1::Reservation {
        self.inventory
            .get_reservation(v1::GetReservationRequest { reservation_id: reservation_id.into() })
            .await
            .unwrap_or_else(|status| panic!("GetReservation {reservation_id}: {status}"))
            .into_inner()
    }

    // ----- orders ---------------------------------------------------------------------------

    pub async fn capture(&mut self, request: v1::CaptureOrderRequest) -> v1::Order {
        let what = format!("CaptureOrder {}/{}", request.channel, request.external_order_id);
        let order =
            self.orders.capture_order(request).await.unwrap_or_else(|status| panic!("{what}: {status}"));
        checked(order.into_inner())
    }

    pub async fn order(&mut self, order_id: &str) -> v1::Order {
        let request = v1::GetOrderRequest { order_id: order_id.into() };
        let order = self
            .orders
            .get_order(request)
            .await
            .unwrap_or_else(|status| panic!("GetOrder {order_id}: {status}"));
        checked(order.into_inner())
    }

    pub async fn release_hold(&mut self, order_id: &str) -> v1::Order {
        let request = v1::ReleaseHoldRequest { order_id: order_id.into() };
        let order = self
            .orders
            .release_hold(request)
            .await
            .unwrap_or_else(|status| panic!("ReleaseHold {order_id}: {status}"));
        checked(order.into_inner())
    }

    pub async fn cancel(&mut self, order_id: &str, reason: &str) -> v1::Order {
        let request = v1::CancelOrderRequest { order_id: order_id.into(), reason: reason.into() };
        let order = self
            .orders
            .cancel_order(request)
            .await
            .unwrap_or_else(|status| panic!("CancelOrder {order_id}: {status}"));
        checked(order.into_inner())
    }

    /// GetOrderHistory, checked: every event names the order, sequences increase.
    pub async fn history(&mut self, order_id: &str) -> Vec<v1::Event> {
        let request = v1::GetOrderHistoryRequest { order_id: order_id.into() };
        let events = self
            .orders
            .get_order_history(request)
            .await
            .unwrap_or_else(|status| panic!("GetOrderHistory {order_id}: {status}"))
            .into_inner()
            .events;
        for event in &events {
            assert_eq!(event.order_id, order_id, "GetOrderHistory {order_id} lists another order's event");
        }
        assert!(
            events.windows(2).all(|pair| pair[0].sequence < pair[1].sequence),
            "GetOrderHistory {order_id} is not oldest first: {events:#?}"
        );
        events
    }

    /// The event types of the order's history, oldest first.
    pub async fn history_types(&mut self, order_id: &str) -> Vec<String> {
        self.history(order_id).await.into_iter().map(|event| event.r#type).collect()
    }

    /// Every order (all pages) with `status` (UNSPECIFIED: all) on `channel` (empty: all).
    pub async fn list_orders(&mut self, status: OrderStatus, channel: &str) -> Vec<v1::Order> {
        let mut orders = Vec::new();
        let mut page_token = String::new();
        loop {
            let request = v1::ListOrdersRequest {
                status: status as i32,
                channel: channel.into(),
                page_size: 0,
                page_token: page_token.clone(),
            };
            let page = self.orders.list_orders(request).await.expect("ListOrders").into_inner();
            orders.extend(page.orders.into_iter().map(checked));
            if page.next_page_token.is_empty() {
                return orders;
            }
            page_token = page.next_page_token;
        }
    }

    pub async fn stats(&mut self, channel: &str) -> v1::GetStatsResponse {
        let request = v1::GetStatsRequest { channel: channel.into() };
        self.orders
            .get_stats(request)
            .await
            .unwrap_or_else(|status| panic!("GetStats {channel:?}: {status}"))
            .into_inner()
    }

    /// Polls GetOrder until `done` holds, for at most `BACKGROUND_DEADLINE`.
    pub async fn wait_for_order(
        &mut self,
        order_id: &str,
        what: &str,
        done: impl Fn(&v1::Order) -> bool,
    ) -> v1::Order {
        let deadline = Instant::now() + BACKGROUND_DEADLINE;
        loop {
            let order = self.order(order_id).await;
            if done(&order) {
                return order;
            }
            if Instant::now() >= deadline {
                panic!("{order_id}: not {what} within {BACKGROUND_DEADLINE:?}; last seen: {order:#?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    // ----- fulfilment -----------------------------------------------------------------------

    /// ListFulfilmentOrders of `node` in every status.
    pub async fn fulfilment_orders_at(&mut self, node: &str) -> Vec<v1::FulfilmentOrder> {
        let request =
            v1::ListFulfilmentOrdersRequest { node_id: node.into(), status: FoStatus::Unspecified as i32 };
        self.fulfilment
            .list_fulfilment_orders(request)
            .await
            .unwrap_or_else(|status| panic!("ListFulfilmentOrders {node}: {status}"))
            .into_inner()
            .fulfilment_orders
    }

    /// Every fulfilment order of every node, by id.
    pub async fn all_fulfilment_orders(&mut self) -> BTreeMap<String, v1::FulfilmentOrder> {
        let mut found = BTreeMap::new();
        for node in self.node_ids().await {
            for fulfilment_order in self.fulfilment_orders_at(&node).await {
                assert_eq!(
                    fulfilment_order.node_id, node,
                    "ListFulfilmentOrders {node}: {fulfilment_order:?}"
                );
                let id = fulfilment_order.fulfilment_order_id.clone();
                assert!(found.insert(id.clone(), fulfilment_order).is_none(), "{id} listed twice");
            }
        }
        found
    }

    /// One fulfilment order (there is no GetFulfilmentOrder: found through the node lists).
    pub async fn fulfilment_order(&mut self, fulfilment_order_id: &str) -> v1::FulfilmentOrder {
        self.all_fulfilment_orders()
            .await
            .remove(fulfilment_order_id)
            .unwrap_or_else(|| panic!("{fulfilment_order_id} is on no node's list"))
    }

    /// The fulfilment orders of `order`, in the order of `order.fulfilment_order_ids`.
    pub async fn fulfilment_orders_of(&mut self, order: &v1::Order) -> Vec<v1::FulfilmentOrder> {
        let mut all = self.all_fulfilment_orders().await;
        order
            .fulfilment_order_ids
            .iter()
            .map(|id| {
                let fulfilment_order =
                    all.remove(id).unwrap_or_else(|| panic!("{}: {id} is on no node's list", order.order_id));
                assert_eq!(fulfilment_order.order_id, order.order_id, "{id} names another order");
                fulfilment_order
            })
            .collect()
    }

    pub async fn ship(&mut self, request: v1::ConfirmShipmentRequest) -> v1::FulfilmentOrder {
        let what = format!("ConfirmShipment {} key {}", request.fulfilment_order_id, request.idempotency_key);
        let fulfilment_order = self
            .fulfilment
            .confirm_shipment(request)
            .await
            .unwrap_or_else(|status| panic!("{what}: {status}"));
        checked_fulfilment_order(fulfilment_order.into_inner())
    }

    /// Ships every remaining unit of `fulfilment_order_id` under `key` (carrier DHL).
    pub async fn ship_all(&mut self, fulfilment_order_id: &str, key: &str) -> v1::FulfilmentOrder {
        self.ship(ship_request(fulfilment_order_id, key, &[])).await
    }

    pub async fn deliver(&mut self, fulfilment_order_id: &str) -> v1::FulfilmentOrder {
        let request = v1::ConfirmDeliveryRequest { fulfilment_order_id: fulfilment_order_id.into() };
        let fulfilment_order = self
            .fulfilment
            .confirm_delivery(request)
            .await
            .unwrap_or_else(|status| panic!("ConfirmDelivery {fulfilment_order_id}: {status}"));
        checked_fulfilment_order(fulfilment_order.into_inner())
    }

    pub async fn report_shortage(
        &mut self,
        fulfilment_order_id: &str,
        sku: &str,
        missing_qty: i64,
        key: &str,
    ) -> v1::FulfilmentOrder {
        let request = v1::ReportShortageRequest {
            fulfilment_order_id: fulfilment_order_id.into(),
            sku: sku.into(),
            missing_qty,
            idempotency_key: key.into(),
        };
        let fulfilment_order = self
            .fulfilment
            .report_shortage(request)
            .await
            .unwrap_or_else(|status| panic!("ReportShortage {fulfilment_order_id} {sku}: {status}"));
        checked_fulfilment_order(fulfilment_order.into_inner())
    }

    pub async fn create_return(&mut self, request: v1::CreateReturnRequest) -> v1::Return {
        let what = format!("CreateReturn {} key {:?}", request.order_id, request.idempotency_key);
        self.fulfilment
            .create_return(request)
            .await
            .unwrap_or_else(|status| panic!("{what}: {status}"))
            .into_inner()
    }

    pub async fn receive_return(&mut self, request: v1::ReceiveReturnRequest) -> v1::Return {
        let what = format!("ReceiveReturn {} at {}", request.return_id, request.node_id);
        self.fulfilment
            .receive_return(request)
            .await
            .unwrap_or_else(|status| panic!("{what}: {status}"))
            .into_inner()
    }

    // ----- events ---------------------------------------------------------------------------

    pub async fn watch(&mut self, from_sequence: u64, types: &[&str]) -> Streaming<v1::Event> {
        let request = v1::WatchEventsRequest {
            from_sequence,
            types: types.iter().map(|raw| raw.to_string()).collect(),
        };
        self.orders
            .watch_events(request)
            .await
            .unwrap_or_else(|status| panic!("WatchEvents from {from_sequence}: {status}"))
            .into_inner()
    }

    /// The whole event log from sequence 1 through `last`, checked gap-free.
    pub async fn log_through(&mut self, last: u64) -> Vec<v1::Event> {
        let mut stream = self.watch(1, &[]).await;
        let events = read_until(&mut stream, |event| event.sequence >= last).await;
        assert_gap_free(&events, 1, "the event log from 1");
        assert_eq!(events.last().map(|event| event.sequence), Some(last), "the log overshot {last}");
        events
    }

    /// The whole event log through the last event of `order_id`'s history.
    pub async fn log_through_history_of(&mut self, order_id: &str) -> Vec<v1::Event> {
        let last = self.history(order_id).await.last().expect("an order has a history").sequence;
        self.log_through(last).await
    }

    /// A marker in the event log: SetStock of `marker` (a SKU no order uses) at `node`, which
    /// writes a `stock.set` event naming the SKU; `is_marker` finds it.
    pub async fn mark(&mut self, marker: &str, node: &str) {
        self.set_stock(&[(marker, node, 1)]).await;
    }
}

/// True for the `stock.set` event of `mark(marker, ..)`.
pub fn is_marker(event: &v1::Event, marker: &str) -> bool {
    event.r#type == "stock.set" && event.sku == marker
}

/// The next event of a watch, or a panic after `STREAM_DEADLINE`.
pub async fn next_event(stream: &mut Streaming<v1::Event>) -> v1::Event {
    match tokio::time::timeout(STREAM_DEADLINE, stream.message()).await {
        Ok(Ok(Some(event))) => event,
        Ok(Ok(None)) => panic!("the event watch ended"),
        Ok(Err(status)) => panic!("the event watch failed: {status}"),
        Err(_) => panic!("no event on the watch within {STREAM_DEADLINE:?}"),
    }
}

/// Events of a watch up to and including the first one for which `last` holds.
pub async fn read_until(
    stream: &mut Streaming<v1::Event>,
    last: impl Fn(&v1::Event) -> bool,
) -> Vec<v1::Event> {
    let mut events = Vec::new();
    loop {
        let event = next_event(stream).await;
        let done = last(&event);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Sequences are exactly `first`, `first + 1`, ...
#[track_caller]
pub fn assert_gap_free(events: &[v1::Event], first: u64, what: &str) {
    let sequences: Vec<u64> = events.iter().map(|event| event.sequence).collect();
    let expected: Vec<u64> = (first..first + events.len() as u64).collect();
    assert_eq!(sequences, expected, "{what}: sequences are not gap-free from {first}");
}

/// `needles` occur in `haystack` in this order (other items may come between).
#[track_caller]
pub fn assert_in_order(haystack: &[String], needles: &[&str], what: &str) {
    let mut rest = haystack.iter();
    for needle in needles {
        assert!(
            rest.any(|item| item == needle),
            "{what}: {needle:?} missing or out of order in {haystack:?} (expected in order: {needles:?})"
        );
    }
}

/// How often `needle` occurs in `haystack`.
pub fn count_of(haystack: &[String], needle: &str) -> usize {
    haystack.iter().filter(|item| *item == needle).count()
}

/// The status code of a failed call; panics if it succeeded or failed otherwise.
#[track_caller]
pub fn expect_code<T: Debug>(result: Result<tonic::Response<T>, Status>, code: Code, what: &str) -> Status {
    match result {
        Ok(response) => panic!("{what}: expected {code:?}, got {:?}", response.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status}");
            status
        }
    }
}

// ----- nodes and requests -------------------------------------------------------------------

/// A warehouse on the ship-to parallel at longitude `lon` (rates 500 + 1/km + 10/unit).
pub fn node_at(node_id: &str, lon: f64) -> v1::Node {
    super::node(node_id, SHIP_TO_LAT, lon)
}

/// A store at longitude `lon` that cannot ship (so routing never picks it for SHIP) but takes
/// pickups and returns.
pub fn store_at(node_id: &str, lon: f64) -> v1::Node {
    v1::Node {
        r#type: v1::node::Type::Store as i32,
        can_ship: false,
        can_pickup: true,
        ..node_at(node_id, lon)
    }
}

/// A complete SHIP address at (SHIP_TO_LAT, SHIP_TO_LON) in `country`.
pub fn full_address(country: &str) -> v1::Address {
    v1::Address {
        line1: "1 Main Street".into(),
        city: "Springfield".into(),
        region: "North".into(),
        postal_code: "12345".into(),
        country: country.into(),
        lat: SHIP_TO_LAT,
        lon: SHIP_TO_LON,
        line2: String::new(),
    }
}

/// A paid SHIP order on `CHANNEL` from customer "cust-<external_order_id>" to a complete
/// address in NL: lines "L1", "L2", ... of (sku, qty, unit_price); payment AUTHORIZED for the
/// total.
pub fn priced_order_request(external_order_id: &str, lines: &[(&str, i64, i64)]) -> v1::CaptureOrderRequest {
    let lines: Vec<v1::capture_order_request::Line> = lines
        .iter()
        .enumerate()
        .map(|(index, (sku, qty, unit_price))| v1::capture_order_request::Line {
            line_id: format!("L{}", index + 1),
            sku: sku.to_string(),
            qty: *qty,
            unit_price: *unit_price,
        })
        .collect();
    let amount = lines.iter().map(|line| line.qty * line.unit_price).sum();
    v1::CaptureOrderRequest {
        channel: CHANNEL.into(),
        external_order_id: external_order_id.into(),
        customer: Some(v1::Customer {
            customer_id: format!("cust-{external_order_id}"),
            name: "Test Customer".into(),
            email: "customer@example.com".into(),
        }),
        ship_to: Some(full_address("NL")),
        lines,
        payment: Some(v1::Payment {
            authorization_id: format!("auth-{external_order_id}"),
            status: v1::payment::Status::Authorized as i32,
            amount,
        }),
        method: v1::Method::Ship as i32,
        pickup_node_id: String::new(),
    }
}

/// `priced_order_request` at `UNIT_PRICE` per unit.
pub fn order_request(external_order_id: &str, lines: &[(&str, i64)]) -> v1::CaptureOrderRequest {
    let priced: Vec<(&str, i64, i64)> = lines.iter().map(|(sku, qty)| (*sku, *qty, UNIT_PRICE)).collect();
    priced_order_request(external_order_id, &priced)
}

/// A ConfirmShipment of (sku, qty) lines (empty: every remaining unit) by DHL, tracking
/// number "trk-<key>".
pub fn ship_request(
    fulfilment_order_id: &str,
    key: &str,
    lines: &[(&str, i64)],
) -> v1::ConfirmShipmentRequest {
    v1::ConfirmShipmentRequest {
        fulfilment_order_id: fulfilment_order_id.into(),
        idempotency_key: key.into(),
        lines: sku_qty(lines),
        carrier: "DHL".into(),
        tracking_number: format!("trk-{key}"),
    }
}

pub fn sku_qty(lines: &[(&str, i64)]) -> Vec<v1::SkuQty> {
    lines.iter().map(|(sku, qty)| v1::SkuQty { sku: sku.to_string(), qty: *qty }).collect()
}

// ----- reading orders -----------------------------------------------------------------------

pub fn status(order: &v1::Order) -> OrderStatus {
    OrderStatus::try_from(order.status).unwrap_or_else(|_| panic!("unknown order status in {order:?}"))
}

pub fn fo_status(fulfilment_order: &v1::FulfilmentOrder) -> FoStatus {
    FoStatus::try_from(fulfilment_order.status)
        .unwrap_or_else(|_| panic!("unknown fulfilment order status in {fulfilment_order:?}"))
}

/// The hold reasons, sorted (the contract gives no order).
pub fn holds(order: &v1::Order) -> Vec<HoldReason> {
    let mut reasons: Vec<HoldReason> = order
        .hold_reasons
        .iter()
        .map(|raw| HoldReason::try_from(*raw).unwrap_or_else(|_| panic!("unknown hold reason in {order:?}")))
        .collect();
    reasons.sort();
    reasons
}

/// The order's line of `sku` (the tests never put a SKU on two lines).
#[track_caller]
pub fn line<'a>(order: &'a v1::Order, sku: &str) -> &'a v1::order::Line {
    let mut lines = order.lines.iter().filter(|line| line.sku == sku);
    let found = lines.next().unwrap_or_else(|| panic!("{}: no line of {sku}: {order:#?}", order.order_id));
    assert!(lines.next().is_none(), "{}: two lines of {sku}", order.order_id);
    found
}

/// (allocated, backordered, shipped, cancelled) of the line of `sku`.
#[track_caller]
pub fn counters(order: &v1::Order, sku: &str) -> (i64, i64, i64, i64) {
    let line = line(order, sku);
    (line.allocated, line.backordered, line.shipped, line.cancelled)
}

/// The fulfilment order's line of `sku`.
#[track_caller]
pub fn fo_line<'a>(fulfilment_order: &'a v1::FulfilmentOrder, sku: &str) -> &'a v1::fulfilment_order::Line {
    fulfilment_order
        .lines
        .iter()
        .find(|line| line.sku == sku)
        .unwrap_or_else(|| panic!("{}: no line of {sku}", fulfilment_order.fulfilment_order_id))
}

/// Units still to ship on a fulfilment order line.
pub fn remaining(line: &v1::fulfilment_order::Line) -> i64 {
    line.qty - line.shipped - line.short - line.cancelled
}

/// The line counter identities of orders.proto, for every line:
///   ordered = qty = allocated + backordered + shipped + cancelled + units not yet routed,
/// where units are left unrouted only on a HELD or EXCEPTION order; delivered <= shipped and
/// returned <= shipped; no counter is negative.
#[track_caller]
pub fn check_counters(order: &v1::Order) {
    let unrouted_allowed = matches!(status(order), OrderStatus::Held | OrderStatus::Exception);
    for line in &order.lines {
        let what = format!("{} line {} ({})", order.order_id, line.line_id, line.sku);
        let counters = [
            line.ordered,
            line.allocated,
            line.backordered,
            line.shipped,
            line.delivered,
            line.cancelled,
            line.returned,
        ];
        assert!(counters.iter().all(|count| *count >= 0), "{what}: a negative counter: {line:?}");
        assert_eq!(line.ordered, line.qty, "{what}: ordered is not qty: {line:?}");
        let routed = line.allocated + line.backordered + line.shipped + line.cancelled;
        if unrouted_allowed {
            assert!(routed <= line.ordered, "{what}: more units counted than ordered: {line:?}");
        } else {
            assert_eq!(
                routed,
                line.ordered,
                "{what}: allocated + backordered + shipped + cancelled is not ordered on a {:?} order: {line:?}",
                status(order)
            );
        }
        assert!(line.delivered <= line.shipped, "{what}: delivered > shipped: {line:?}");
        assert!(line.returned <= line.shipped, "{what}: returned > shipped: {line:?}");
    }
    if status(order) != OrderStatus::Held {
        assert!(order.hold_reasons.is_empty(), "{}: hold reasons on a non-HELD order", order.order_id);
    }
}

fn checked(order: v1::Order) -> v1::Order {
    check_counters(&order);
    order
}

/// Fulfilment order line identities: remaining >= 0, and shipped = the sum of the shipments.
#[track_caller]
pub fn check_fulfilment_order(fulfilment_order: &v1::FulfilmentOrder) {
    let id = &fulfilment_order.fulfilment_order_id;
    for line in &fulfilment_order.lines {
        assert!(
            line.shipped >= 0 && line.short >= 0 && line.cancelled >= 0 && remaining(line) >= 0,
            "{id}: inconsistent line {line:?}"
        );
        let in_shipments: i64 = fulfilment_order
            .shipments
            .iter()
            .flat_map(|shipment| shipment.lines.iter())
            .filter(|shipped| shipped.sku == line.sku)
            .map(|shipped| shipped.qty)
            .sum();
        assert_eq!(
            in_shipments, line.shipped,
            "{id}: the shipments of {} do not add up to shipped",
            line.sku
        );
    }
    assert!(
        fulfilment_order.lines.windows(2).all(|pair| pair[0].sku < pair[1].sku),
        "{id}: lines are not ordered by sku"
    );
}

fn checked_fulfilment_order(fulfilment_order: v1::FulfilmentOrder) -> v1::FulfilmentOrder {
    check_fulfilment_order(&fulfilment_order);
    fulfilment_order
}
