mod common;

// End-to-end tests of the Orders and Fulfilment services over gRPC (orders.proto and
// fulfilment.proto are the contract):
// A. against an in-process daemon (`allot::server::start`): capture idempotency and
//    validation, holds and their release, split shipments and delivery, backorders filled when
//    stock rises, shortages re-routed, cancellation, returns, and the KPIs of GetStats on a
//    hand-computed scenario (with a ManualClock for cycle times);
// B. against the real `allotd` binary (tests/common/daemon.rs): the event feed resumed across
//    SIGTERM and kill -9, and kill -9 in the middle of concurrent shipments.
//
// Geometry: every node sits on the parallel of the ship-to address (10° N), east of it, with
// the same rates (500 + 1/km + 10/unit), so a single-node plan picks the node with the
// smallest longitude ("wh-near" at 1°, then "wh-far" at 2°). A store ("store-1") cannot ship,
// so routing never picks it for SHIP orders; it takes pickups and returns.
//
// Every Order a helper reads is checked against the line identities of orders.proto
// (`common::orders::check_counters`), every FulfilmentOrder against its shipments
// (`check_fulfilment_order`). Waiting on background work (the backorder retry) polls with a
// deadline; no sleep is an assertion.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allot::clock::{Clock, ManualClock, SystemClock};
use allot::config::Config;
use allot::orders::OrderRules;
use allot::proto::v1;
use allot::server::Running;
use common::daemon::Daemon;
use common::orders::{
    Clients, FoStatus, HoldReason, OrderStatus, assert_gap_free, assert_in_order, check_fulfilment_order,
    count_of, counters, expect_code, fo_line, fo_status, holds, is_marker, line, next_event, node_at,
    order_request, priced_order_request, read_until, remaining, ship_request, sku_qty, status, store_at,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tonic::Code;

const NEAR: &str = "wh-near";
const FAR: &str = "wh-far";
const STORE: &str = "store-1";
/// A fixed instant at 12:00 UTC (2025-06-15) for the tests on a ManualClock.
const NOON_MS: u64 = 1_749_988_800_000;
const DAY_MS: u64 = 86_400_000;

// ----- helpers ------------------------------------------------------------------------------

/// A running in-process daemon with its clients; the data directory outlives it.
struct Server {
    running: Running,
    clients: Clients,
    dir: tempfile::TempDir,
    clock: Arc<dyn Clock>,
    rules: OrderRules,
}

impl Server {
    /// Starts on the store in `dir` (a restart when it holds one) with `clock` and `rules`.
    async fn start_in(dir: tempfile::TempDir, clock: Arc<dyn Clock>, rules: OrderRules) -> Server {
        let config = Config { orders: rules.clone(), ..common::test_config(dir.path()) };
        let running = allot::server::start(config, clock.clone()).await.expect("starting the daemon");
        let clients = Clients::connect(running.grpc_address).await;
        Server { running, clients, dir, clock, rules }
    }

    /// A fresh daemon on the wall clock with the default order rules.
    async fn start() -> Server {
        Server::start_in(tempfile::tempdir().unwrap(), Arc::new(SystemClock), OrderRules::default()).await
    }

    /// Graceful shutdown, then a start on the same data directory, clock and rules.
    async fn restart(self) -> Server {
        let Server { running, clients, dir, clock, rules } = self;
        drop(clients);
        running.shutdown().await;
        Server::start_in(dir, clock, rules).await
    }

    async fn stop(self) {
        let Server { running, clients, dir, .. } = self;
        drop(clients);
        running.shutdown().await;
        drop(dir);
    }
}

/// One way to spoil an address.
type AddressChange = fn(&mut v1::Address);

/// A copy of `base` changed by `change`.
fn with<T: Clone>(base: &T, change: impl FnOnce(&mut T)) -> T {
    let mut changed = base.clone();
    change(&mut changed);
    changed
}

fn set_payment(request: &mut v1::CaptureOrderRequest, payment_status: v1::payment::Status) {
    request.payment.as_mut().expect("a payment").status = payment_status as i32;
}

fn address(request: &mut v1::CaptureOrderRequest) -> &mut v1::Address {
    request.ship_to.as_mut().expect("an address")
}

/// The seed of a randomised test: `ALLOT_TEST_SEED` or the clock; printed for reruns.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("ALLOT_TEST_SEED").ok().and_then(|raw| raw.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
    });
    println!("{test}: seed = {seed} (rerun with ALLOT_TEST_SEED={seed})");
    seed
}

fn create_return_request(order_id: &str, lines: &[(&str, i64, &str)], key: &str) -> v1::CreateReturnRequest {
    v1::CreateReturnRequest {
        order_id: order_id.into(),
        lines: lines
            .iter()
            .map(|(sku, qty, reason)| v1::create_return_request::Line {
                sku: sku.to_string(),
                qty: *qty,
                reason: reason.to_string(),
            })
            .collect(),
        idempotency_key: key.into(),
    }
}

fn receive_request(
    return_id: &str,
    node: &str,
    lines: &[(&str, i64, bool)],
    key: &str,
) -> v1::ReceiveReturnRequest {
    v1::ReceiveReturnRequest {
        return_id: return_id.into(),
        node_id: node.into(),
        lines: lines
            .iter()
            .map(|(sku, qty, resellable)| v1::receive_return_request::Line {
                sku: sku.to_string(),
                qty: *qty,
                resellable: *resellable,
            })
            .collect(),
        idempotency_key: key.into(),
    }
}

/// (sku, qty, received, resellable) of every return line.
fn return_lines(rma: &v1::Return) -> Vec<(String, i64, i64, i64)> {
    rma.lines.iter().map(|line| (line.sku.clone(), line.qty, line.received, line.resellable)).collect()
}

fn return_status(rma: &v1::Return) -> v1::r#return::Status {
    v1::r#return::Status::try_from(rma.status).unwrap_or_else(|_| panic!("unknown return status in {rma:?}"))
}

fn reservation_status(reservation: &v1::Reservation) -> v1::reservation::Status {
    v1::reservation::Status::try_from(reservation.status)
        .unwrap_or_else(|_| panic!("unknown reservation status in {reservation:?}"))
}

/// Sum of `qty` of the events of type `kind`, by (sku, node).
fn event_units_by_position(events: &[v1::Event], kind: &str) -> BTreeMap<(String, String), i64> {
    let mut units = BTreeMap::new();
    for event in events.iter().filter(|event| event.r#type == kind) {
        *units.entry((event.sku.clone(), event.node_id.clone())).or_insert(0) += event.qty;
    }
    units
}

/// `qty` of the events of type `kind` naming `fulfilment_order_id`, oldest first.
fn event_units_of_fulfilment_order(events: &[v1::Event], kind: &str, fulfilment_order_id: &str) -> Vec<i64> {
    events
        .iter()
        .filter(|event| event.r#type == kind && event.fulfilment_order_id == fulfilment_order_id)
        .map(|event| event.qty)
        .collect()
}

fn owned_positions(entries: &[(&str, &str, i64)]) -> BTreeMap<(String, String), i64> {
    entries.iter().map(|(sku, node, qty)| ((sku.to_string(), node.to_string()), *qty)).collect()
}

/// Captures `request` and expects it HELD for exactly `reasons` with nothing reserved: no unit
/// counted anywhere on the lines, no fulfilment order, and `sku` at `node` unchanged.
async fn capture_held(
    api: &mut Clients,
    request: v1::CaptureOrderRequest,
    reasons: &[HoldReason],
    sku: &str,
    node: &str,
) -> v1::Order {
    let what = request.external_order_id.clone();
    let before = api.stock_of(sku, node).await;
    let order = api.capture(request).await;
    assert_eq!(status(&order), OrderStatus::Held, "{what}: {order:#?}");
    let mut expected = reasons.to_vec();
    expected.sort();
    assert_eq!(holds(&order), expected, "{what}: hold reasons");
    for order_line in &order.lines {
        assert_eq!(
            (order_line.allocated, order_line.backordered, order_line.shipped, order_line.cancelled),
            (0, 0, 0, 0),
            "{what}: a held order routes nothing: {order_line:?}"
        );
    }
    assert!(order.fulfilment_order_ids.is_empty(), "{what}: a held order has no fulfilment order");
    assert_eq!(api.stock_of(sku, node).await, before, "{what}: a held order reserves nothing");
    order
}

/// ReleaseHold of a held single-line order whose units all fit at `node`: ALLOCATED, no hold
/// reason left, one fulfilment order, and `reserved` at `node` up by the units.
async fn release_to_allocated(api: &mut Clients, order: &v1::Order, node: &str) -> v1::Order {
    let id = &order.order_id;
    let sku = order.lines[0].sku.clone();
    let units = order.lines[0].qty;
    let (on_hand, reserved) = api.stock_of(&sku, node).await;
    let released = api.release_hold(id).await;
    assert_eq!(status(&released), OrderStatus::Allocated, "{id} after ReleaseHold: {released:#?}");
    assert!(released.hold_reasons.is_empty(), "{id}: ReleaseHold clears every hold reason");
    assert_eq!(counters(&released, &sku), (units, 0, 0, 0), "{id}: every unit allocated");
    assert_eq!(released.fulfilment_order_ids.len(), 1, "{id}: one fulfilment order");
    assert_eq!(api.stock_of(&sku, node).await, (on_hand, reserved + units), "{id}: the release reserves");
    assert_eq!(api.order(id).await, released, "{id}: GetOrder shows what ReleaseHold answered");
    let history = api.history_types(id).await;
    assert_in_order(
        &history,
        &["order.captured", "order.held", "order.hold_released", "order.allocated"],
        &format!("{id} history"),
    );
    released
}

/// Expects a failed WatchEvents: refused at the call, or a stream whose first item is the error.
async fn expect_watch_refused(api: &mut Clients, request: v1::WatchEventsRequest, code: Code, what: &str) {
    match api.orders.watch_events(request).await {
        Err(status) => assert_eq!(status.code(), code, "{what}: {status}"),
        Ok(response) => {
            let mut stream = response.into_inner();
            match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
                Ok(Err(status)) => assert_eq!(status.code(), code, "{what}: {status}"),
                other => panic!("{what}: expected {code:?}, the watch gave {other:?}"),
            }
        }
    }
}

// ----- 1. capture: idempotency and validation -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_is_idempotent_and_malformed_orders_store_nothing() {
    // Goal: CaptureOrder is idempotent on (channel, external_order_id): the same request again
    // answers the same order in its current state and reserves nothing more, also after a
    // restart; the pair with a different request is ALREADY_EXISTS; the same external id on
    // another channel is another order; a malformed capture is INVALID_ARGUMENT naming the field
    // and stores nothing. Method: the malformed variants of one valid request first (each under
    // the external id captured afterwards, which must then still be free), then the valid
    // capture, replays before and after shipping, conflicting requests, a restart; ListOrders
    // paging and GetOrder errors on the way.
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), node_at(FAR, 2.0)]).await;
    api.set_stock(&[("sku-1", NEAR, 10), ("sku-2", NEAR, 5)]).await;
    let valid = order_request("ext-1", &[("sku-1", 3), ("sku-2", 1)]);

    let malformed: Vec<(&str, v1::CaptureOrderRequest)> = vec![
        ("channel", with(&valid, |request| request.channel.clear())),
        ("channel", with(&valid, |request| request.channel = "we b".into())),
        ("external_order_id", with(&valid, |request| request.external_order_id.clear())),
        ("lines", with(&valid, |request| request.lines.clear())),
        ("lines[1].qty", with(&valid, |request| request.lines[1].qty = 0)),
        ("lines[1].qty", with(&valid, |request| request.lines[1].qty = -2)),
        ("line_id", with(&valid, |request| request.lines[1].line_id = "L1".into())),
        ("lines[1].line_id", with(&valid, |request| request.lines[1].line_id.clear())),
        ("lines[1].sku", with(&valid, |request| request.lines[1].sku.clear())),
        ("lines[0].unit_price", with(&valid, |request| request.lines[0].unit_price = -1)),
        ("amount", with(&valid, |request| request.payment.as_mut().unwrap().amount = -5)),
        (
            "pickup_node_id",
            with(&valid, |request| {
                request.method = v1::Method::Pickup as i32;
                request.pickup_node_id.clear();
            }),
        ),
    ];
    for (field, request) in malformed {
        let status = expect_code(api.orders.capture_order(request).await, Code::InvalidArgument, field);
        assert!(
            status.message().contains(field),
            "the message does not name {field}: {:?}",
            status.message()
        );
    }
    assert!(
        api.list_orders(OrderStatus::Unspecified, "").await.is_empty(),
        "a malformed capture stored an order"
    );
    assert_eq!(api.stats("").await.orders_total, 0, "a malformed capture is counted");
    assert_eq!(api.stock_of("sku-1", NEAR).await, (10, 0), "a malformed capture reserved");
    assert_eq!(api.stock_of("sku-2", NEAR).await, (5, 0), "a malformed capture reserved");

    // The valid capture: routed and allocated at once, the request echoed.
    let order = api.capture(valid.clone()).await;
    let id = order.order_id.clone();
    assert!(id.starts_with("ord-"), "order id {id:?}");
    assert_eq!((order.channel.as_str(), order.external_order_id.as_str()), ("web", "ext-1"));
    assert_eq!(status(&order), OrderStatus::Allocated, "{order:#?}");
    assert_eq!(counters(&order, "sku-1"), (3, 0, 0, 0));
    assert_eq!(counters(&order, "sku-2"), (1, 0, 0, 0));
    assert_eq!((line(&order, "sku-1").line_id.as_str(), line(&order, "sku-1").unit_price), ("L1", 1_000));
    assert_eq!(
        (order.customer.as_ref(), order.ship_to.as_ref()),
        (valid.customer.as_ref(), valid.ship_to.as_ref())
    );
    assert_eq!(order.payment, valid.payment);
    assert_eq!(order.method, v1::Method::Ship as i32);
    assert!(order.created_at.is_some() && order.updated_at.is_some());
    assert_eq!(order.fulfilment_order_ids.len(), 1, "both lines fit at one node");
    assert!(order.fulfilment_order_ids[0].starts_with("fo-"), "{:?}", order.fulfilment_order_ids);
    assert_eq!(api.stock_of("sku-1", NEAR).await, (10, 3));
    assert_eq!(api.stock_of("sku-2", NEAR).await, (5, 1));
    assert_in_order(&api.history_types(&id).await, &["order.captured", "order.allocated"], "history");

    // A replay: the same order, in its current state, nothing reserved again.
    let replay = api.capture(valid.clone()).await;
    assert_eq!(replay.order_id, id, "a replay answers the original order");
    assert_eq!(replay, api.order(&id).await, "a replay answers the order as it is now");
    assert_eq!(api.stock_of("sku-1", NEAR).await, (10, 3), "a replay reserved again");
    assert_eq!(api.list_orders(OrderStatus::Unspecified, "").await.len(), 1, "a replay stored an order");

    // After a shipment the replay shows the shipped order.
    api.ship_all(&order.fulfilment_order_ids[0], "ship-ext-1").await;
    let replay = api.capture(valid.clone()).await;
    assert_eq!((replay.order_id.as_str(), status(&replay)), (id.as_str(), OrderStatus::Shipped));
    assert_eq!(counters(&replay, "sku-1"), (0, 0, 3, 0));
    assert_eq!(api.stock_of("sku-1", NEAR).await, (7, 0));

    // The same pair with another request.
    let conflicting = [
        ("another qty", with(&valid, |request| request.lines[0].qty = 4)),
        ("another unit price", with(&valid, |request| request.lines[1].unit_price = 999)),
        ("another address", with(&valid, |request| address(request).city = "Shelbyville".into())),
    ];
    for (what, request) in conflicting {
        expect_code(api.orders.capture_order(request).await, Code::AlreadyExists, what);
    }
    // The same external id on another channel is another order.
    let other = api.capture(with(&valid, |request| request.channel = "market".into())).await;
    assert_ne!(other.order_id, id);
    assert_eq!(status(&other), OrderStatus::Allocated);
    assert_eq!(api.stock_of("sku-1", NEAR).await, (7, 3));

    // ListOrders: oldest first, filters, pages.
    let ids = |orders: Vec<v1::Order>| orders.into_iter().map(|order| order.order_id).collect::<Vec<_>>();
    assert_eq!(
        ids(api.list_orders(OrderStatus::Unspecified, "").await),
        vec![id.clone(), other.order_id.clone()]
    );
    assert_eq!(ids(api.list_orders(OrderStatus::Unspecified, "web").await), vec![id.clone()]);
    assert_eq!(ids(api.list_orders(OrderStatus::Unspecified, "market").await), vec![other.order_id.clone()]);
    assert_eq!(ids(api.list_orders(OrderStatus::Shipped, "").await), vec![id.clone()]);
    assert_eq!(ids(api.list_orders(OrderStatus::Allocated, "").await), vec![other.order_id.clone()]);
    let page_request = |page_token: String| v1::ListOrdersRequest {
        status: OrderStatus::Unspecified as i32,
        channel: String::new(),
        page_size: 1,
        page_token,
    };
    let first_page =
        api.orders.list_orders(page_request(String::new())).await.expect("ListOrders").into_inner();
    assert_eq!(ids(first_page.orders), vec![id.clone()]);
    assert!(!first_page.next_page_token.is_empty(), "a second page exists");
    let second_page = api
        .orders
        .list_orders(page_request(first_page.next_page_token))
        .await
        .expect("ListOrders")
        .into_inner();
    assert_eq!(ids(second_page.orders), vec![other.order_id.clone()]);
    assert!(second_page.next_page_token.is_empty(), "the last page has no next_page_token");
    expect_code(
        api.orders.list_orders(page_request("not-a-token".into())).await,
        Code::InvalidArgument,
        "ListOrders with a made-up page_token",
    );
    expect_code(
        api.orders.get_order(v1::GetOrderRequest { order_id: "ord-999999".into() }).await,
        Code::NotFound,
        "GetOrder of an unknown order",
    );
    expect_code(
        api.orders.get_order(v1::GetOrderRequest { order_id: String::new() }).await,
        Code::InvalidArgument,
        "GetOrder without an id",
    );

    // Idempotency outlives a restart.
    let server = server.restart().await;
    let mut api = server.clients.clone();
    let replay = api.capture(valid.clone()).await;
    assert_eq!((replay.order_id.as_str(), status(&replay)), (id.as_str(), OrderStatus::Shipped));
    expect_code(
        api.orders.capture_order(with(&valid, |request| request.lines[0].qty = 4)).await,
        Code::AlreadyExists,
        "another request after the restart",
    );
    assert_eq!(api.list_orders(OrderStatus::Unspecified, "").await.len(), 2);
    assert_eq!(api.stock_of("sku-1", NEAR).await, (7, 3));
    server.stop().await;
}

// ----- 2. holds -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hold_reserves_nothing_until_released() {
    // Goal: every hold rule holds the order with its reason and reserves nothing; ReleaseHold
    // clears every reason and routes the order (ALLOCATED, ATP drops); releasing twice changes
    // nothing; a CANCELLED order cannot be released. Rules: payment not AUTHORIZED, each missing
    // address part (and 0/0 coordinates; one zero coordinate is fine), a SKU never stocked (a
    // position at 0 is known: backordered, not held), fraud by amount (above the limit, not at
    // it), by orders per customer within the window (a ManualClock moves past it; no
    // customer_id is never counted), by country. Method: one daemon with every fraud rule set;
    // each order trips one rule, one trips two.
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let rules = OrderRules {
        fraud_order_amount_max: 100_000,
        fraud_orders_per_customer_max: 2,
        fraud_customer_window_ms: DAY_MS,
        fraud_allowed_countries: vec!["DE".into(), "NL".into()],
        ..OrderRules::default()
    };
    let server = Server::start_in(tempfile::tempdir().unwrap(), clock.clone(), rules).await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), node_at(FAR, 2.0)]).await;
    api.set_stock(&[("sku-h", NEAR, 100), ("sku-zero", NEAR, 0)]).await;
    let sku_h = |external: &str, qty: i64| order_request(external, &[("sku-h", qty)]);

    // Payment.
    let payment = [
        ("pay-pending", v1::payment::Status::Pending),
        ("pay-declined", v1::payment::Status::Declined),
        ("pay-unspecified", v1::payment::Status::Unspecified),
    ];
    for (external, payment_status) in payment {
        let request = with(&sku_h(external, 2), |request| set_payment(request, payment_status));
        let held = capture_held(&mut api, request, &[HoldReason::PaymentNotAuthorized], "sku-h", NEAR).await;
        release_to_allocated(&mut api, &held, NEAR).await;
    }

    // Address parts and coordinates.
    let incomplete: [(&str, AddressChange); 4] = [
        ("addr-no-line1", |address| address.line1.clear()),
        ("addr-no-city", |address| address.city.clear()),
        ("addr-no-postal-code", |address| address.postal_code.clear()),
        ("addr-no-coordinates", |address| (address.lat, address.lon) = (0.0, 0.0)),
    ];
    for (external, change) in incomplete {
        let request = with(&sku_h(external, 1), |request| change(address(request)));
        let held = capture_held(&mut api, request, &[HoldReason::AddressIncomplete], "sku-h", NEAR).await;
        release_to_allocated(&mut api, &held, NEAR).await;
    }
    // One coordinate at zero is a real place: not incomplete (every order here has lon 0; this
    // one is on the equator instead).
    let equator_request = with(&sku_h("addr-equator", 1), |request| {
        let address = address(request);
        (address.lat, address.lon) = (0.0, 5.0);
    });
    let equator = api.capture(equator_request).await;
    assert_eq!(status(&equator), OrderStatus::Allocated, "{equator:#?}");
    // No address at all: held (ADDRESS_INCOMPLETE; the country rule may add FRAUD_REVIEW).
    let (_, reserved) = api.stock_of("sku-h", NEAR).await;
    let no_address = api.capture(with(&sku_h("addr-none", 2), |request| request.ship_to = None)).await;
    assert_eq!(status(&no_address), OrderStatus::Held);
    assert!(holds(&no_address).contains(&HoldReason::AddressIncomplete), "{no_address:#?}");
    assert_eq!(api.stock_of("sku-h", NEAR).await.1, reserved, "a held order reserves nothing");
    // Cancelled while held: every unit cancelled, and it can no longer be released.
    let cancelled = api.cancel(&no_address.order_id, "no address").await;
    assert_eq!(status(&cancelled), OrderStatus::Cancelled);
    assert_eq!(counters(&cancelled, "sku-h"), (0, 0, 0, 2));
    assert_eq!(cancelled.cancel_reason, "no address");
    expect_code(
        api.orders.release_hold(v1::ReleaseHoldRequest { order_id: no_address.order_id.clone() }).await,
        Code::FailedPrecondition,
        "ReleaseHold of a CANCELLED order",
    );

    // A SKU with no position anywhere; stocked while the order waits, then released.
    let ghost_request = order_request("unknown-sku", &[("sku-h", 1), ("sku-ghost", 2)]);
    let ghost = capture_held(&mut api, ghost_request, &[HoldReason::UnknownSku], "sku-h", NEAR).await;
    api.set_stock(&[("sku-ghost", FAR, 5)]).await;
    assert_eq!(status(&api.order(&ghost.order_id).await), OrderStatus::Held, "only ReleaseHold releases");
    let (_, reserved) = api.stock_of("sku-h", NEAR).await;
    let released = api.release_hold(&ghost.order_id).await;
    assert_eq!(status(&released), OrderStatus::Allocated, "{released:#?}");
    assert_eq!(
        (counters(&released, "sku-h"), counters(&released, "sku-ghost")),
        ((1, 0, 0, 0), (2, 0, 0, 0))
    );
    assert_eq!(released.fulfilment_order_ids.len(), 2, "sku-h ships from {NEAR}, sku-ghost from {FAR}");
    assert_eq!(api.stock_of("sku-h", NEAR).await.1, reserved + 1);
    assert_eq!(api.stock_of("sku-ghost", FAR).await, (5, 2));
    // A SKU with a position at 0 is known: the order waits for stock instead.
    let zero = api.capture(order_request("zero-stock", &[("sku-zero", 2)])).await;
    assert_eq!(status(&zero), OrderStatus::Backordered, "{zero:#?}");
    assert_eq!(counters(&zero, "sku-zero"), (0, 2, 0, 0));

    // Fraud: the amount (above the limit; at the limit is fine).
    let over = priced_order_request("fraud-amount", &[("sku-h", 2, 60_000)]);
    let held = capture_held(&mut api, over, &[HoldReason::FraudReview], "sku-h", NEAR).await;
    release_to_allocated(&mut api, &held, NEAR).await;
    let at_limit = api.capture(priced_order_request("fraud-at-limit", &[("sku-h", 1, 100_000)])).await;
    assert_eq!(status(&at_limit), OrderStatus::Allocated, "an amount equal to the limit is not held");

    // Fraud: the country.
    let abroad = with(&sku_h("fraud-country", 1), |request| address(request).country = "US".into());
    let held = capture_held(&mut api, abroad, &[HoldReason::FraudReview], "sku-h", NEAR).await;
    release_to_allocated(&mut api, &held, NEAR).await;
    let germany =
        api.capture(with(&sku_h("country-de", 1), |request| address(request).country = "DE".into())).await;
    assert_eq!(status(&germany), OrderStatus::Allocated);

    // Fraud: orders per customer within the window; the third is held.
    let repeat = |external: &str| {
        with(&sku_h(external, 1), |request| {
            request.customer.as_mut().unwrap().customer_id = "cust-repeat".into()
        })
    };
    for external in ["repeat-1", "repeat-2"] {
        let order = api.capture(repeat(external)).await;
        assert_eq!(status(&order), OrderStatus::Allocated, "{external}: within the limit");
    }
    let held = capture_held(&mut api, repeat("repeat-3"), &[HoldReason::FraudReview], "sku-h", NEAR).await;
    let released = release_to_allocated(&mut api, &held, NEAR).await;
    // Releasing again returns the order unchanged and reserves nothing more.
    let stock = api.stock_of("sku-h", NEAR).await;
    assert_eq!(api.release_hold(&held.order_id).await, released, "a second ReleaseHold changes nothing");
    assert_eq!(api.stock_of("sku-h", NEAR).await, stock);
    // Orders without a customer id are never counted.
    for external in ["anonymous-1", "anonymous-2", "anonymous-3"] {
        let request =
            with(&sku_h(external, 1), |request| request.customer.as_mut().unwrap().customer_id.clear());
        assert_eq!(status(&api.capture(request).await), OrderStatus::Allocated, "{external}");
    }
    // Past the window the customer's earlier orders no longer count.
    clock.advance_ms(DAY_MS + 1);
    let later = api.capture(repeat("repeat-4")).await;
    assert_eq!(status(&later), OrderStatus::Allocated, "the window has passed: {later:#?}");

    // Two rules at once: one ReleaseHold clears both.
    let many = with(&priced_order_request("many-holds", &[("sku-h", 2, 60_000)]), |request| {
        set_payment(request, v1::payment::Status::Pending);
        address(request).country = "US".into();
    });
    let held = capture_held(
        &mut api,
        many,
        &[HoldReason::PaymentNotAuthorized, HoldReason::FraudReview],
        "sku-h",
        NEAR,
    )
    .await;
    release_to_allocated(&mut api, &held, NEAR).await;

    // Errors.
    expect_code(
        api.orders.release_hold(v1::ReleaseHoldRequest { order_id: "ord-999999".into() }).await,
        Code::NotFound,
        "ReleaseHold of an unknown order",
    );
    expect_code(
        api.orders.release_hold(v1::ReleaseHoldRequest { order_id: String::new() }).await,
        Code::InvalidArgument,
        "ReleaseHold without an id",
    );
    assert_eq!(api.list_orders(OrderStatus::Held, "").await.len(), 0, "every held order was released");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pickup_needs_no_address_and_an_unknown_store_is_an_exception() {
    // Goal: a PICKUP order needs no ship-to address (ADDRESS_INCOMPLETE is for SHIP only) and
    // is fulfilled by its store (fulfilment order method PICKUP at that store, no ship_to); an
    // unknown pickup store is not an error but EXCEPTION with PICKUP_NODE_UNAVAILABLE, which a
    // ReleaseHold retries (still EXCEPTION). Method: default rules, a store with stock.
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), store_at(STORE, 3.0)]).await;
    api.set_stock(&[("sku-p", NEAR, 10), ("sku-p", STORE, 3)]).await;
    let pickup = |external: &str, store: &str| {
        with(&order_request(external, &[("sku-p", 2)]), |request| {
            request.method = v1::Method::Pickup as i32;
            request.pickup_node_id = store.into();
            request.ship_to = None;
        })
    };

    let order = api.capture(pickup("pickup-1", STORE)).await;
    assert_eq!(status(&order), OrderStatus::Allocated, "{order:#?}");
    assert_eq!(counters(&order, "sku-p"), (2, 0, 0, 0));
    let fulfilment_orders = api.fulfilment_orders_of(&order).await;
    assert_eq!(fulfilment_orders.len(), 1);
    let fulfilment_order = &fulfilment_orders[0];
    assert_eq!(fulfilment_order.node_id, STORE, "a pickup is fulfilled by its store");
    assert_eq!(fulfilment_order.method, v1::Method::Pickup as i32);
    assert_eq!(fulfilment_order.ship_to, None, "ship_to is unset for PICKUP");
    assert_eq!(api.stock_of("sku-p", STORE).await, (3, 2));
    assert_eq!(api.stock_of("sku-p", NEAR).await, (10, 0));
    // The hand-over to the customer is a shipment without carrier, then a delivery.
    let staged = api
        .ship(v1::ConfirmShipmentRequest {
            carrier: String::new(),
            tracking_number: String::new(),
            ..ship_request(&fulfilment_order.fulfilment_order_id, "pickup-stage", &[])
        })
        .await;
    assert_eq!(fo_status(&staged), FoStatus::Shipped);
    api.deliver(&fulfilment_order.fulfilment_order_id).await;
    assert_eq!(status(&api.order(&order.order_id).await), OrderStatus::Delivered);
    assert_eq!(api.stock_of("sku-p", STORE).await, (1, 0));

    let lost = api.capture(pickup("pickup-unknown-store", "store-404")).await;
    assert_eq!(status(&lost), OrderStatus::Exception, "{lost:#?}");
    assert_eq!(lost.exception_reason, v1::route_plan::unroutable::Reason::PickupNodeUnavailable as i32);
    assert_eq!(counters(&lost, "sku-p"), (0, 0, 0, 0), "the units are not routed");
    assert!(lost.fulfilment_order_ids.is_empty());
    let retried = api.release_hold(&lost.order_id).await;
    assert_eq!(status(&retried), OrderStatus::Exception, "the store is still unknown");
    assert_eq!(api.stock_of("sku-p", NEAR).await, (10, 0), "nothing reserved elsewhere");
    server.stop().await;
}

// ----- 3. a split order -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_order_ships_in_parts_and_is_delivered() {
    // Goal: an order no single node can serve is split into one fulfilment order per node, each
    // backed by its own CONFIRMED reservation; shipping the first makes the order
    // PARTIALLY_SHIPPED and lowers on_hand and reserved together at that node only; the second
    // ships in two parcels (carrier and tracking kept on FulfilmentOrder.shipments) and the
    // order is SHIPPED; a ConfirmShipment replay returns the same fulfilment order without
    // shipping twice (and a different request under the key is ALREADY_EXISTS); ConfirmDelivery
    // of both makes it DELIVERED. Method: 6 units at each of two nodes, an order of 10.
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), node_at(FAR, 2.0)]).await;
    api.set_stock(&[("sku-s", NEAR, 6), ("sku-s", FAR, 6)]).await;
    let request = priced_order_request("split-1", &[("sku-s", 10, 1_500)]);
    let order = api.capture(request.clone()).await;
    let id = order.order_id.clone();
    assert_eq!(status(&order), OrderStatus::Allocated, "{order:#?}");
    assert_eq!(counters(&order, "sku-s"), (10, 0, 0, 0));
    let fulfilment_orders = api.fulfilment_orders_of(&order).await;
    assert_eq!(fulfilment_orders.len(), 2, "one fulfilment order per node: {fulfilment_orders:#?}");
    let nodes: BTreeSet<&str> = fulfilment_orders.iter().map(|fo| fo.node_id.as_str()).collect();
    assert_eq!(nodes, BTreeSet::from([NEAR, FAR]));
    let mut reservation_ids = BTreeSet::new();
    for fulfilment_order in &fulfilment_orders {
        let fo_id = &fulfilment_order.fulfilment_order_id;
        assert_eq!(fo_status(fulfilment_order), FoStatus::Released, "{fo_id}");
        assert_eq!(fulfilment_order.method, v1::Method::Ship as i32);
        assert_eq!(fulfilment_order.ship_to, request.ship_to, "{fo_id}: ship_to copied from the order");
        assert_eq!(fulfilment_order.customer, request.customer, "{fo_id}: customer copied from the order");
        assert!(fulfilment_order.shipments.is_empty());
        assert_eq!(fulfilment_order.lines.len(), 1);
        let qty = fulfilment_order.lines[0].qty;
        assert!((4..=6).contains(&qty), "{fo_id}: {qty} units from a node holding 6 of 10 needed");
        let reservation = api.reservation(&fulfilment_order.reservation_id).await;
        assert_eq!(reservation_status(&reservation), v1::reservation::Status::Confirmed, "{reservation:?}");
        assert_eq!(reservation.lines, vec![common::line("sku-s", &fulfilment_order.node_id, qty)]);
        assert!(reservation_ids.insert(fulfilment_order.reservation_id.clone()), "a reservation per FO");
        assert_eq!(api.stock_of("sku-s", &fulfilment_order.node_id).await, (6, qty));
    }
    assert_eq!(fulfilment_orders.iter().map(|fo| fo.lines[0].qty).sum::<i64>(), 10);
    let (first, second) = (&fulfilment_orders[0], &fulfilment_orders[1]);
    let (first_id, second_id) = (first.fulfilment_order_id.clone(), second.fulfilment_order_id.clone());
    let (first_qty, second_qty) = (first.lines[0].qty, second.lines[0].qty);
    expect_code(
        api.fulfilment
            .confirm_delivery(v1::ConfirmDeliveryRequest { fulfilment_order_id: first_id.clone() })
            .await,
        Code::FailedPrecondition,
        "ConfirmDelivery before shipping",
    );

    // The first ships whole.
    let ship_first = v1::ConfirmShipmentRequest {
        carrier: "DHL".into(),
        tracking_number: "TRK-A".into(),
        ..ship_request(&first_id, "ship-a", &[])
    };
    let shipped = api.ship(ship_first.clone()).await;
    assert_eq!(fo_status(&shipped), FoStatus::Shipped, "{shipped:#?}");
    assert_eq!(fo_line(&shipped, "sku-s").shipped, first_qty);
    assert_eq!(shipped.shipments.len(), 1);
    let parcel = &shipped.shipments[0];
    assert_eq!((parcel.carrier.as_str(), parcel.tracking_number.as_str()), ("DHL", "TRK-A"));
    assert_eq!(parcel.lines, sku_qty(&[("sku-s", first_qty)]));
    assert!(parcel.shipped_at.is_some());
    assert_eq!(api.stock_of("sku-s", &first.node_id).await, (6 - first_qty, 0), "on_hand and reserved drop");
    assert_eq!(api.stock_of("sku-s", &second.node_id).await, (6, second_qty), "the other node is untouched");
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::PartiallyShipped);
    assert_eq!(counters(&now, "sku-s"), (second_qty, 0, first_qty, 0));
    let reservation = api.reservation(&first.reservation_id).await;
    assert_eq!(reservation_status(&reservation), v1::reservation::Status::Fulfilled, "{reservation:?}");

    // Replays.
    assert_eq!(api.ship(ship_first.clone()).await, shipped, "a replay returns the original response");
    assert_eq!(api.stock_of("sku-s", &first.node_id).await, (6 - first_qty, 0), "a replay shipped again");
    assert_eq!(counters(&api.order(&id).await, "sku-s"), (second_qty, 0, first_qty, 0));
    expect_code(
        api.fulfilment
            .confirm_shipment(v1::ConfirmShipmentRequest { carrier: "UPS".into(), ..ship_first.clone() })
            .await,
        Code::AlreadyExists,
        "the key with another carrier",
    );

    // Refused shipments move nothing.
    let refused = [
        (
            "more than remain",
            ship_request(&second_id, "bad-1", &[("sku-s", second_qty + 1)]),
            Code::FailedPrecondition,
        ),
        ("a sku not on it", ship_request(&second_id, "bad-2", &[("sku-other", 1)]), Code::InvalidArgument),
        ("qty 0", ship_request(&second_id, "bad-3", &[("sku-s", 0)]), Code::InvalidArgument),
        (
            "the same sku twice",
            ship_request(&second_id, "bad-4", &[("sku-s", 1), ("sku-s", 1)]),
            Code::InvalidArgument,
        ),
        ("no idempotency key", ship_request(&second_id, "", &[("sku-s", 1)]), Code::InvalidArgument),
        ("an unknown FO", ship_request("fo-999999", "bad-5", &[("sku-s", 1)]), Code::NotFound),
        ("a shipped FO", ship_request(&first_id, "bad-6", &[("sku-s", 1)]), Code::FailedPrecondition),
    ];
    for (what, request, code) in refused {
        expect_code(api.fulfilment.confirm_shipment(request).await, code, what);
    }
    assert_eq!(api.stock_of("sku-s", &second.node_id).await, (6, second_qty));

    // The second ships in two parcels.
    let part = api
        .ship(v1::ConfirmShipmentRequest {
            carrier: "UPS".into(),
            tracking_number: "TRK-B1".into(),
            ..ship_request(&second_id, "ship-b1", &[("sku-s", 1)])
        })
        .await;
    assert_eq!(fo_status(&part), FoStatus::PartiallyShipped);
    assert_eq!(fo_line(&part, "sku-s").shipped, 1);
    assert_eq!(status(&api.order(&id).await), OrderStatus::PartiallyShipped);
    assert_eq!(api.stock_of("sku-s", &second.node_id).await, (5, second_qty - 1));
    let rest = api
        .ship(v1::ConfirmShipmentRequest {
            carrier: "DPD".into(),
            tracking_number: "TRK-B2".into(),
            ..ship_request(&second_id, "ship-b2", &[])
        })
        .await;
    assert_eq!(fo_status(&rest), FoStatus::Shipped);
    let parcels: Vec<(&str, &str, Vec<v1::SkuQty>)> = rest
        .shipments
        .iter()
        .map(|parcel| (parcel.carrier.as_str(), parcel.tracking_number.as_str(), parcel.lines.clone()))
        .collect();
    assert_eq!(
        parcels,
        vec![
            ("UPS", "TRK-B1", sku_qty(&[("sku-s", 1)])),
            ("DPD", "TRK-B2", sku_qty(&[("sku-s", second_qty - 1)]))
        ],
        "every parcel is kept, oldest first"
    );
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::Shipped);
    assert_eq!(counters(&now, "sku-s"), (0, 0, 10, 0));
    assert_eq!(api.stock_of("sku-s", &first.node_id).await, (6 - first_qty, 0));
    assert_eq!(api.stock_of("sku-s", &second.node_id).await, (6 - second_qty, 0));
    let listed = api.fulfilment_orders_of(&now).await;
    assert_eq!((&listed[0].shipments, &listed[1].shipments), (&shipped.shipments, &rest.shipments));

    // Deliveries.
    let delivered = api.deliver(&first_id).await;
    assert_eq!(fo_status(&delivered), FoStatus::Delivered);
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::Shipped, "half the units are delivered");
    assert_eq!(line(&now, "sku-s").delivered, first_qty);
    assert_eq!(api.deliver(&first_id).await, delivered, "confirming twice changes nothing");
    api.deliver(&second_id).await;
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::Delivered);
    assert_eq!((line(&now, "sku-s").shipped, line(&now, "sku-s").delivered), (10, 10));
    assert_in_order(
        &api.history_types(&id).await,
        &["order.captured", "order.allocated", "order.partially_shipped", "order.shipped", "order.delivered"],
        "history",
    );

    // The audit log: one shipment event per ConfirmShipment (none for the replay), and the
    // stock shipped per node.
    let log = api.log_through_history_of(&id).await;
    assert_eq!(event_units_of_fulfilment_order(&log, "fulfilment.shipped", &first_id), vec![first_qty]);
    assert_eq!(
        event_units_of_fulfilment_order(&log, "fulfilment.shipped", &second_id),
        vec![1, second_qty - 1]
    );
    assert_eq!(
        event_units_by_position(&log, "stock.shipped"),
        owned_positions(&[("sku-s", &first.node_id, first_qty), ("sku-s", &second.node_id, second_qty)])
    );
    server.stop().await;
}

// ----- 4. backorders ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backorders_fill_when_stock_rises() {
    // Goal: units short of stock are backordered (the rest allocated), and the order is
    // allocated in the background once stock rises, whatever raised it: a receipt
    // (AdjustStock), a cancelled order's released reservation, a SetStock, an expired
    // reservation; a cancelled backorder is dropped and never filled. Method: poll GetOrder
    // with a deadline (the retry acts within about a second).
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), node_at(FAR, 2.0)]).await;

    // A receipt.
    api.set_stock(&[("sku-b", NEAR, 2), ("sku-b", FAR, 0)]).await;
    let order = api.capture(order_request("bo-receipt", &[("sku-b", 5)])).await;
    let id = order.order_id.clone();
    assert_eq!(status(&order), OrderStatus::Backordered, "{order:#?}");
    assert_eq!(counters(&order, "sku-b"), (2, 3, 0, 0));
    assert_eq!(order.fulfilment_order_ids.len(), 1);
    let first = api.fulfilment_orders_of(&order).await.remove(0);
    assert_eq!((first.node_id.as_str(), first.lines[0].qty), (NEAR, 2));
    assert_eq!(api.stock_of("sku-b", NEAR).await, (2, 2));
    assert_in_order(&api.history_types(&id).await, &["order.captured", "order.backordered"], "history");
    api.adjust_stock("receipt-b", &[("sku-b", FAR, 3)]).await;
    let filled = api
        .wait_for_order(&id, "fully allocated after the receipt", |order| {
            order.lines[0].allocated == 5 && order.lines[0].backordered == 0
        })
        .await;
    assert_eq!(status(&filled), OrderStatus::Allocated);
    assert_eq!(filled.fulfilment_order_ids.len(), 2, "a new fulfilment order for the 3 units");
    assert_eq!(filled.fulfilment_order_ids[0], first.fulfilment_order_id);
    let added = api.fulfilment_orders_of(&filled).await.remove(1);
    assert_eq!((added.node_id.as_str(), added.lines[0].qty), (FAR, 3));
    let reservation = api.reservation(&added.reservation_id).await;
    assert_eq!(reservation_status(&reservation), v1::reservation::Status::Confirmed);
    assert_eq!(api.stock_of("sku-b", FAR).await, (3, 3));
    assert_eq!(api.stock_of("sku-b", NEAR).await, (2, 2));
    assert_in_order(
        &api.history_types(&id).await,
        &["order.captured", "order.backordered", "order.allocated"],
        "history",
    );

    // A release: cancelling the order that holds the stock.
    api.set_stock(&[("sku-c", NEAR, 2)]).await;
    let holder = api.capture(order_request("bo-holder", &[("sku-c", 2)])).await;
    assert_eq!(status(&holder), OrderStatus::Allocated);
    let waiting = api.capture(order_request("bo-waiting", &[("sku-c", 2)])).await;
    assert_eq!(status(&waiting), OrderStatus::Backordered);
    assert_eq!(counters(&waiting, "sku-c"), (0, 2, 0, 0));
    assert!(waiting.fulfilment_order_ids.is_empty());
    api.cancel(&holder.order_id, "make room").await;
    let filled = api
        .wait_for_order(&waiting.order_id, "allocated after the release", |order| {
            order.lines[0].allocated == 2
        })
        .await;
    assert_eq!(status(&filled), OrderStatus::Allocated);
    assert_eq!(api.stock_of("sku-c", NEAR).await, (2, 2));

    // A SetStock; a cancelled backorder is not filled. The sentinel, backordered after it,
    // shows that the retry ran.
    api.set_stock(&[("sku-d", NEAR, 0)]).await;
    let dropped = api.capture(order_request("bo-dropped", &[("sku-d", 2)])).await;
    assert_eq!(counters(&dropped, "sku-d"), (0, 2, 0, 0));
    let cancelled = api.cancel(&dropped.order_id, "not needed").await;
    assert_eq!(status(&cancelled), OrderStatus::Cancelled);
    assert_eq!(counters(&cancelled, "sku-d"), (0, 0, 0, 2), "the backorder is dropped");
    let sentinel = api.capture(order_request("bo-sentinel", &[("sku-d", 3)])).await;
    assert_eq!(counters(&sentinel, "sku-d"), (0, 3, 0, 0));
    api.set_stock(&[("sku-d", NEAR, 10)]).await;
    api.wait_for_order(&sentinel.order_id, "allocated after SetStock", |order| order.lines[0].allocated == 3)
        .await;
    let dropped_now = api.order(&dropped.order_id).await;
    assert_eq!(
        (status(&dropped_now), counters(&dropped_now, "sku-d")),
        (OrderStatus::Cancelled, (0, 0, 0, 2))
    );
    assert!(dropped_now.fulfilment_order_ids.is_empty());
    assert_eq!(api.stock_of("sku-d", NEAR).await, (10, 3));

    // An expiry: a 1 s reservation holds the stock; the order is allocated once it expires.
    api.set_stock(&[("sku-e", NEAR, 2)]).await;
    let hold = api
        .inventory
        .reserve(v1::ReserveRequest {
            idempotency_key: "hold-e".into(),
            lines: vec![common::line("sku-e", NEAR, 2)],
            ttl_ms: 1_000,
            reference: "cart-e".into(),
            channel: String::new(),
        })
        .await
        .expect("Reserve")
        .into_inner();
    assert_eq!(hold.status, v1::reserve_response::Status::Reserved as i32);
    let expiring = api.capture(order_request("bo-expiry", &[("sku-e", 2)])).await;
    assert_eq!(counters(&expiring, "sku-e"), (0, 2, 0, 0));
    let filled = api
        .wait_for_order(&expiring.order_id, "allocated after the expiry", |order| {
            order.lines[0].allocated == 2
        })
        .await;
    assert_eq!(status(&filled), OrderStatus::Allocated);
    assert_eq!(api.stock_of("sku-e", NEAR).await, (2, 2));
    server.stop().await;
}

// ----- 5. shortages -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shortage_is_rerouted_then_backordered() {
    // Goal: ReportShortage lowers on_hand (and reserved) at the node by the missing units, counts
    // them as `short` on the line and re-routes them at once: to another node with stock (a new
    // fulfilment order), or, with none left, to a backorder that stock arriving later fills. A
    // replay under the same key changes nothing; over-reporting is refused. Method: the near
    // node holds exactly the 3 units ordered (so after the shortage it has no ATP left), the far
    // node 2.
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), node_at(FAR, 2.0)]).await;
    api.set_stock(&[("sku-x", NEAR, 3), ("sku-x", FAR, 2)]).await;
    let order = api.capture(order_request("short-1", &[("sku-x", 3)])).await;
    let id = order.order_id.clone();
    assert_eq!(status(&order), OrderStatus::Allocated);
    let near_fo = api.fulfilment_orders_of(&order).await.remove(0);
    let near_id = near_fo.fulfilment_order_id.clone();
    assert_eq!((near_fo.node_id.as_str(), near_fo.lines[0].qty), (NEAR, 3), "the near node holds everything");

    let after = api.report_shortage(&near_id, "sku-x", 2, "short-key-1").await;
    let short_line = fo_line(&after, "sku-x");
    assert_eq!((short_line.qty, short_line.shipped, short_line.short), (3, 0, 2));
    assert_eq!(fo_status(&after), FoStatus::Released, "one unit remains to ship");
    assert_eq!(api.stock_of("sku-x", NEAR).await, (1, 1), "on_hand and reserved drop by the missing units");
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::Allocated, "{now:#?}");
    assert_eq!(counters(&now, "sku-x"), (3, 0, 0, 0));
    assert_eq!(now.fulfilment_order_ids.len(), 2, "a new fulfilment order for the missing units");
    let far_fo = api.fulfilment_orders_of(&now).await.remove(1);
    let far_id = far_fo.fulfilment_order_id.clone();
    assert_eq!((far_fo.node_id.as_str(), far_fo.lines[0].qty), (FAR, 2));
    let reservation = api.reservation(&far_fo.reservation_id).await;
    assert_eq!(reservation_status(&reservation), v1::reservation::Status::Confirmed);
    assert_eq!(reservation.lines, vec![common::line("sku-x", FAR, 2)]);
    assert_eq!(api.stock_of("sku-x", FAR).await, (2, 2));

    // A replay, and refusals.
    assert_eq!(api.report_shortage(&near_id, "sku-x", 2, "short-key-1").await, after, "a replay");
    assert_eq!(api.stock_of("sku-x", NEAR).await, (1, 1), "a replay lowered on_hand again");
    assert_eq!(api.order(&id).await.fulfilment_order_ids.len(), 2, "a replay re-routed again");
    let shortage = |fo: &str, sku: &str, missing_qty: i64, key: &str| v1::ReportShortageRequest {
        fulfilment_order_id: fo.into(),
        sku: sku.into(),
        missing_qty,
        idempotency_key: key.into(),
    };
    let refused = [
        ("more than remain", shortage(&near_id, "sku-x", 2, ""), Code::FailedPrecondition),
        ("a sku not on it", shortage(&near_id, "sku-other", 1, ""), Code::InvalidArgument),
        ("missing_qty 0", shortage(&near_id, "sku-x", 0, ""), Code::InvalidArgument),
        ("an unknown FO", shortage("fo-999999", "sku-x", 1, ""), Code::NotFound),
        ("the key with another request", shortage(&near_id, "sku-x", 1, "short-key-1"), Code::AlreadyExists),
    ];
    for (what, request, code) in refused {
        expect_code(api.fulfilment.report_shortage(request).await, code, what);
    }
    assert_eq!(api.stock_of("sku-x", NEAR).await, (1, 1));

    // The far node misses both: no stock anywhere, so they are backordered.
    let far_after = api.report_shortage(&far_id, "sku-x", 2, "short-key-2").await;
    assert_eq!(fo_status(&far_after), FoStatus::Cancelled, "every unit short, none shipped");
    assert_eq!(fo_line(&far_after, "sku-x").short, 2);
    assert_eq!(api.stock_of("sku-x", FAR).await, (0, 0));
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::Backordered, "{now:#?}");
    assert_eq!(counters(&now, "sku-x"), (1, 2, 0, 0));

    // The near node ships its last unit: still BACKORDERED (it precedes PARTIALLY_SHIPPED).
    let shipped = api.ship_all(&near_id, "ship-near").await;
    assert_eq!(fo_status(&shipped), FoStatus::Shipped);
    let shipped_line = fo_line(&shipped, "sku-x");
    assert_eq!((shipped_line.shipped, shipped_line.short), (1, 2));
    assert_eq!(api.stock_of("sku-x", NEAR).await, (0, 0));
    expect_code(
        api.fulfilment.report_shortage(shortage(&near_id, "sku-x", 1, "")).await,
        Code::FailedPrecondition,
        "a shortage on a SHIPPED fulfilment order",
    );
    let now = api.order(&id).await;
    assert_eq!(status(&now), OrderStatus::Backordered);
    assert_eq!(counters(&now, "sku-x"), (0, 2, 1, 0));

    // Stock arrives at the far node: the backorder is filled there.
    api.adjust_stock("receipt-x", &[("sku-x", FAR, 2)]).await;
    let filled =
        api.wait_for_order(&id, "allocated after the receipt", |order| order.lines[0].allocated == 2).await;
    assert_eq!(status(&filled), OrderStatus::PartiallyShipped);
    assert_eq!(counters(&filled, "sku-x"), (2, 0, 1, 0));
    assert_eq!(filled.fulfilment_order_ids.len(), 3);
    assert_eq!(api.stock_of("sku-x", FAR).await, (2, 2));

    // The audit log: one stock.shortage per reported shortage (none for the replay).
    let log = api.log_through_history_of(&id).await;
    assert_eq!(
        event_units_by_position(&log, "stock.shortage"),
        owned_positions(&[("sku-x", NEAR, 2), ("sku-x", FAR, 2)])
    );
    let types: Vec<String> = log.iter().map(|event| event.r#type.clone()).collect();
    assert_eq!(count_of(&types, "fulfilment.shortage"), 2);
    server.stop().await;
}

// ----- 6. cancellation ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_releases_only_unshipped_units() {
    // Goal: CancelOrder cancels every unit not shipped: their reservation units return to ATP,
    // open fulfilment orders are cancelled, backorders dropped; shipped units stay shipped (the
    // order ends SHIPPED, then DELIVERED once delivered). A fully shipped order cannot be
    // cancelled (FAILED_PRECONDITION); a never-shipped one ends CANCELLED and cancelling it again
    // returns it unchanged. Method: one order per case on one SKU at one node, positions checked
    // after each step.
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0)]).await;
    api.set_stock(&[("sku-p", NEAR, 10), ("sku-q", NEAR, 0)]).await;

    // Partly shipped.
    let partial = api.capture(order_request("cancel-partial", &[("sku-p", 6)])).await;
    let partial_fo = partial.fulfilment_order_ids[0].clone();
    let part = api.ship(ship_request(&partial_fo, "ship-partial", &[("sku-p", 2)])).await;
    assert_eq!(fo_status(&part), FoStatus::PartiallyShipped);
    assert_eq!(status(&api.order(&partial.order_id).await), OrderStatus::PartiallyShipped);
    assert_eq!(api.stock_of("sku-p", NEAR).await, (8, 4));
    let cancelled = api.cancel(&partial.order_id, "customer changed their mind").await;
    assert_eq!(status(&cancelled), OrderStatus::Shipped, "shipped units stay shipped: {cancelled:#?}");
    assert_eq!(counters(&cancelled, "sku-p"), (0, 0, 2, 4));
    assert_eq!(cancelled.cancel_reason, "customer changed their mind");
    let position = api.position("sku-p", NEAR).await;
    assert_eq!((position.on_hand, position.reserved, position.atp), (8, 0, 8), "the 4 units are back in ATP");
    let fulfilment_order = api.fulfilment_order(&partial_fo).await;
    assert_eq!(fo_status(&fulfilment_order), FoStatus::Shipped);
    let fo_counts = fo_line(&fulfilment_order, "sku-p");
    assert_eq!((fo_counts.shipped, fo_counts.cancelled), (2, 4));
    expect_code(
        api.fulfilment
            .confirm_shipment(ship_request(&partial_fo, "ship-after-cancel", &[("sku-p", 1)]))
            .await,
        Code::FailedPrecondition,
        "shipping a cancelled unit",
    );
    assert_in_order(
        &api.history_types(&partial.order_id).await,
        &["order.partially_shipped", "order.cancelled"],
        "history",
    );
    api.deliver(&partial_fo).await;
    assert_eq!(status(&api.order(&partial.order_id).await), OrderStatus::Delivered);

    // Fully shipped: nothing to cancel.
    let shipped = api.capture(order_request("cancel-shipped", &[("sku-p", 2)])).await;
    api.ship_all(&shipped.fulfilment_order_ids[0], "ship-shipped").await;
    let before = api.order(&shipped.order_id).await;
    expect_code(
        api.orders
            .cancel_order(v1::CancelOrderRequest {
                order_id: shipped.order_id.clone(),
                reason: "late".into(),
            })
            .await,
        Code::FailedPrecondition,
        "cancelling a fully shipped order",
    );
    assert_eq!(api.order(&shipped.order_id).await, before, "a refused cancel changed the order");
    assert_eq!(api.stock_of("sku-p", NEAR).await, (6, 0));

    // Never shipped.
    let open = api.capture(order_request("cancel-open", &[("sku-p", 3)])).await;
    let open_fo = open.fulfilment_order_ids[0].clone();
    let reservation_id = api.fulfilment_order(&open_fo).await.reservation_id;
    assert_eq!(api.stock_of("sku-p", NEAR).await, (6, 3));
    let cancelled = api.cancel(&open.order_id, "fraud").await;
    assert_eq!(status(&cancelled), OrderStatus::Cancelled);
    assert_eq!(counters(&cancelled, "sku-p"), (0, 0, 0, 3));
    assert_eq!(cancelled.cancel_reason, "fraud");
    assert_eq!(api.stock_of("sku-p", NEAR).await, (6, 0));
    let fulfilment_order = api.fulfilment_order(&open_fo).await;
    assert_eq!(fo_status(&fulfilment_order), FoStatus::Cancelled);
    assert_eq!(fo_line(&fulfilment_order, "sku-p").cancelled, 3);
    let reservation = api.reservation(&reservation_id).await;
    assert_eq!(reservation_status(&reservation), v1::reservation::Status::Released);
    assert_eq!(api.cancel(&open.order_id, "again").await, cancelled, "cancelling twice returns it unchanged");
    expect_code(
        api.fulfilment.confirm_shipment(ship_request(&open_fo, "ship-cancelled", &[])).await,
        Code::FailedPrecondition,
        "shipping a CANCELLED fulfilment order",
    );
    assert_in_order(
        &api.history_types(&open.order_id).await,
        &["order.captured", "order.allocated", "order.cancelled"],
        "history",
    );

    // Backordered.
    let waiting = api.capture(order_request("cancel-backorder", &[("sku-q", 2)])).await;
    assert_eq!(status(&waiting), OrderStatus::Backordered);
    let cancelled = api.cancel(&waiting.order_id, "too slow").await;
    assert_eq!((status(&cancelled), counters(&cancelled, "sku-q")), (OrderStatus::Cancelled, (0, 0, 0, 2)));

    // Errors.
    expect_code(
        api.orders
            .cancel_order(v1::CancelOrderRequest { order_id: "ord-999999".into(), reason: String::new() })
            .await,
        Code::NotFound,
        "cancelling an unknown order",
    );
    expect_code(
        api.orders
            .cancel_order(v1::CancelOrderRequest { order_id: String::new(), reason: String::new() })
            .await,
        Code::InvalidArgument,
        "cancelling without an id",
    );
    assert_eq!(api.stock_of("sku-p", NEAR).await, (6, 0), "2 + 2 units shipped of 10, nothing held");
    server.stop().await;
}

// ----- 7. returns ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_restock_resellable_units_and_compute_the_refund() {
    // Goal: a return (RMA) covers at most the units shipped less those returned or on open
    // returns; receiving it restocks resellable units at the receiving node (a store included)
    // and writes damaged ones off (no stock change); refund_amount is the units received times
    // the order line's unit_price; the order's `returned` counters rise on receipt and its
    // status does not change; replays change nothing. Method: an order of 4 × sku-r at 25.00
    // and 1 × sku-t at 10.00 shipped from the warehouse and delivered; returns received at a
    // store and at the warehouse.
    let server = Server::start().await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), store_at(STORE, 3.0)]).await;
    api.set_stock(&[("sku-r", NEAR, 10), ("sku-t", NEAR, 10), ("sku-r", STORE, 1)]).await;
    let order = api.capture(priced_order_request("ret-1", &[("sku-r", 4, 2_500), ("sku-t", 1, 1_000)])).await;
    let id = order.order_id.clone();
    assert_eq!(order.fulfilment_order_ids.len(), 1);
    let fo_id = order.fulfilment_order_ids[0].clone();
    assert_eq!(api.fulfilment_order(&fo_id).await.node_id, NEAR, "the store cannot ship");
    expect_code(
        api.fulfilment.create_return(create_return_request(&id, &[("sku-r", 1, "early")], "")).await,
        Code::FailedPrecondition,
        "a return before anything shipped",
    );
    api.ship_all(&fo_id, "ship-ret-1").await;
    api.deliver(&fo_id).await;
    assert_eq!(status(&api.order(&id).await), OrderStatus::Delivered);
    assert_eq!(api.stock_of("sku-r", NEAR).await, (6, 0));
    assert_eq!(api.stock_of("sku-t", NEAR).await, (9, 0));

    let refused = [
        ("more than shipped", create_return_request(&id, &[("sku-r", 5, "")], ""), Code::FailedPrecondition),
        (
            "a sku not on the order",
            create_return_request(&id, &[("sku-x", 1, "")], ""),
            Code::FailedPrecondition,
        ),
        ("no lines", create_return_request(&id, &[], ""), Code::InvalidArgument),
        ("qty 0", create_return_request(&id, &[("sku-r", 0, "")], ""), Code::InvalidArgument),
        (
            "the same sku twice",
            create_return_request(&id, &[("sku-r", 1, ""), ("sku-r", 1, "")], ""),
            Code::InvalidArgument,
        ),
        ("no order id", create_return_request("", &[("sku-r", 1, "")], ""), Code::InvalidArgument),
        ("an unknown order", create_return_request("ord-999999", &[("sku-r", 1, "")], ""), Code::NotFound),
    ];
    for (what, request, code) in refused {
        expect_code(api.fulfilment.create_return(request).await, code, what);
    }
    assert!(api.order(&id).await.return_ids.is_empty(), "a refused return was stored");

    // The first RMA: 3 × sku-r.
    let rma_request = create_return_request(&id, &[("sku-r", 3, "wrong size")], "rma-1");
    let rma = api.create_return(rma_request.clone()).await;
    assert!(rma.return_id.starts_with("ret-"), "return id {:?}", rma.return_id);
    assert_eq!((rma.order_id.as_str(), return_status(&rma)), (id.as_str(), v1::r#return::Status::Requested));
    assert_eq!(return_lines(&rma), vec![("sku-r".into(), 3, 0, 0)]);
    assert_eq!(rma.lines[0].reason, "wrong size");
    assert_eq!(rma.refund_amount, 0);
    assert_eq!(api.create_return(rma_request.clone()).await, rma, "a replay returns the original");
    expect_code(
        api.fulfilment
            .create_return(create_return_request(&id, &[("sku-r", 2, "wrong size")], "rma-1"))
            .await,
        Code::AlreadyExists,
        "the key with another request",
    );
    let now = api.order(&id).await;
    assert_eq!(now.return_ids, vec![rma.return_id.clone()]);
    assert_eq!(line(&now, "sku-r").returned, 0, "nothing received yet");
    assert_eq!(api.stock_of("sku-r", NEAR).await, (6, 0), "nothing moves before the receipt");
    expect_code(
        api.fulfilment.create_return(create_return_request(&id, &[("sku-r", 2, "")], "")).await,
        Code::FailedPrecondition,
        "more than shipped less the open return",
    );

    // Received at the store: one damaged unit, then one resellable and one damaged.
    let damaged_request = receive_request(&rma.return_id, STORE, &[("sku-r", 1, false)], "rcv-1");
    let received = api.receive_return(damaged_request.clone()).await;
    assert_eq!(return_status(&received), v1::r#return::Status::PartiallyReceived);
    assert_eq!(return_lines(&received), vec![("sku-r".into(), 3, 1, 0)]);
    assert_eq!(received.refund_amount, 2_500);
    assert_eq!(api.stock_of("sku-r", STORE).await, (1, 0), "a damaged unit is not restocked");
    assert_eq!(api.stock_of("sku-r", NEAR).await, (6, 0));
    assert_eq!(line(&api.order(&id).await, "sku-r").returned, 1);
    assert_eq!(api.receive_return(damaged_request).await, received, "a replay returns the original");
    assert_eq!(line(&api.order(&id).await, "sku-r").returned, 1, "a replay counted again");
    let mixed = api
        .receive_return(receive_request(
            &rma.return_id,
            STORE,
            &[("sku-r", 1, true), ("sku-r", 1, false)],
            "rcv-2",
        ))
        .await;
    assert_eq!(return_status(&mixed), v1::r#return::Status::Received);
    assert_eq!(return_lines(&mixed), vec![("sku-r".into(), 3, 3, 1)]);
    assert_eq!(mixed.refund_amount, 3 * 2_500);
    assert_eq!(api.stock_of("sku-r", STORE).await, (2, 0), "the resellable unit is restocked at the store");
    assert_eq!(api.stock_of("sku-r", NEAR).await, (6, 0));
    let now = api.order(&id).await;
    assert_eq!((line(&now, "sku-r").returned, status(&now)), (3, OrderStatus::Delivered));
    let refused = [
        (
            "nothing left to receive",
            receive_request(&rma.return_id, STORE, &[("sku-r", 1, true)], ""),
            Code::FailedPrecondition,
        ),
        (
            "a sku not on the return",
            receive_request(&rma.return_id, STORE, &[("sku-t", 1, true)], ""),
            Code::FailedPrecondition,
        ),
        (
            "an unknown node",
            receive_request(&rma.return_id, "node-404", &[("sku-r", 1, true)], ""),
            Code::NotFound,
        ),
        (
            "an unknown return",
            receive_request("ret-999999", STORE, &[("sku-r", 1, true)], ""),
            Code::NotFound,
        ),
        ("qty 0", receive_request(&rma.return_id, STORE, &[("sku-r", 0, true)], ""), Code::InvalidArgument),
    ];
    for (what, request, code) in refused {
        expect_code(api.fulfilment.receive_return(request).await, code, what);
    }

    // The second RMA: what is left, received resellable at the warehouse.
    let second = api
        .create_return(create_return_request(
            &id,
            &[("sku-t", 1, "changed mind"), ("sku-r", 1, "changed mind")],
            "",
        ))
        .await;
    assert_eq!(
        return_lines(&second),
        vec![("sku-r".into(), 1, 0, 0), ("sku-t".into(), 1, 0, 0)],
        "ordered by sku"
    );
    let received = api
        .receive_return(receive_request(
            &second.return_id,
            NEAR,
            &[("sku-r", 1, true), ("sku-t", 1, true)],
            "",
        ))
        .await;
    assert_eq!(return_status(&received), v1::r#return::Status::Received);
    assert_eq!(received.refund_amount, 2_500 + 1_000);
    assert_eq!(api.stock_of("sku-r", NEAR).await, (7, 0));
    assert_eq!(api.stock_of("sku-t", NEAR).await, (10, 0));
    let now = api.order(&id).await;
    assert_eq!((line(&now, "sku-r").returned, line(&now, "sku-t").returned), (4, 1));
    assert_eq!(now.return_ids, vec![rma.return_id.clone(), second.return_id.clone()]);
    assert_eq!(status(&now), OrderStatus::Delivered, "returns do not change the status");
    expect_code(
        api.fulfilment.create_return(create_return_request(&id, &[("sku-r", 1, "")], "")).await,
        Code::FailedPrecondition,
        "everything is returned",
    );

    // The audit trail.
    let history = api.history_types(&id).await;
    assert_eq!(
        (count_of(&history, "return.created"), count_of(&history, "return.received")),
        (2, 3),
        "{history:?}"
    );
    let log = api.log_through_history_of(&id).await;
    assert_eq!(
        event_units_by_position(&log, "stock.restocked"),
        owned_positions(&[("sku-r", STORE, 1), ("sku-r", NEAR, 1), ("sku-t", NEAR, 1)])
    );
    server.stop().await;
}

// ----- 8. the event feed across restarts (real binary) --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_feed_resumes_across_restarts_without_gap_or_duplicate() {
    // Goal: WatchEvents resumed with from_sequence = last seen + 1 after SIGTERM and after
    // kill -9 continues with no gap and no duplicate, and the log read from 1 afterwards is
    // exactly what was seen before plus what was resumed; the resumed watch then follows live
    // events; GetOrderHistory is the log filtered by order; a type filter keeps exactly those
    // types. Also: the binary applies the [orders] rules of its --config file. Method: real
    // allotd, markers (SetStock of a marker SKU, one `stock.set` event) to know where each read
    // ends.
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    const CONFIG: &str = "[orders]\nfraud_allowed_countries = [\"DE\", \"NL\"]\n";
    let daemon = Daemon::start_with_config(&data_dir, CONFIG);
    let mut api = Clients::connect(daemon.grpc_address).await;
    api.upsert_nodes(vec![node_at("N1", 1.0), node_at("N2", 2.0)]).await;
    api.set_stock(&[("sku-w", "N1", 20)]).await;
    let first_request = order_request("watch-1", &[("sku-w", 4)]);
    let first = api.capture(first_request.clone()).await;
    assert_eq!(status(&first), OrderStatus::Allocated);
    let first_fo = first.fulfilment_order_ids[0].clone();
    let abroad = api
        .capture(with(&order_request("watch-us", &[("sku-w", 1)]), |request| {
            address(request).country = "US".into()
        }))
        .await;
    assert_eq!(
        (status(&abroad), holds(&abroad)),
        (OrderStatus::Held, vec![HoldReason::FraudReview]),
        "config applied"
    );
    api.ship(ship_request(&first_fo, "watch-ship-1", &[("sku-w", 1)])).await;
    api.mark("MARK-1", "N1").await;
    let mut stream = api.watch(0, &[]).await;
    let seen = read_until(&mut stream, |event| is_marker(event, "MARK-1")).await;
    drop(stream);
    assert_gap_free(&seen, 1, "the log before the first restart");
    let types: Vec<String> = seen.iter().map(|event| event.r#type.clone()).collect();
    for expected in ["order.captured", "order.allocated", "order.held", "fulfilment.shipped", "stock.shipped"]
    {
        assert!(types.contains(&expected.to_string()), "no {expected} in {types:?}");
    }
    let k1 = seen.last().unwrap().sequence;

    // SIGTERM, restart, more work, resume from k1 + 1.
    let exit = daemon.terminate();
    assert!(exit.success(), "allotd did not exit 0 after SIGTERM: {exit}");
    let daemon = Daemon::start_with_config(&data_dir, CONFIG);
    let mut api = Clients::connect(daemon.grpc_address).await;
    assert_eq!(status(&api.release_hold(&abroad.order_id).await), OrderStatus::Allocated);
    api.ship_all(&first_fo, "watch-ship-2").await;
    let replay = api.capture(first_request.clone()).await;
    assert_eq!((replay.order_id.as_str(), status(&replay)), (first.order_id.as_str(), OrderStatus::Shipped));
    api.mark("MARK-2", "N1").await;
    let mut resumed = api.watch(k1 + 1, &[]).await;
    let after_sigterm = read_until(&mut resumed, |event| is_marker(event, "MARK-2")).await;
    assert_gap_free(&after_sigterm, k1 + 1, "resumed after SIGTERM");
    let mut full = api.watch(1, &[]).await;
    let log = read_until(&mut full, |event| is_marker(event, "MARK-2")).await;
    drop(full);
    assert_eq!(
        log,
        [seen.clone(), after_sigterm.clone()].concat(),
        "the log is what was seen, then what was resumed"
    );
    // The resumed watch follows live events.
    let k2 = log.last().unwrap().sequence;
    api.mark("MARK-3", "N1").await;
    let live = read_until(&mut resumed, |event| is_marker(event, "MARK-3")).await;
    assert_gap_free(&live, k2 + 1, "live after the resume");
    drop(resumed);
    let seen = [log, live].concat();
    let k3 = seen.last().unwrap().sequence;

    // kill -9, restart, more work, resume from k3 + 1.
    daemon.kill9();
    let daemon = Daemon::start_with_config(&data_dir, CONFIG);
    let mut api = Clients::connect(daemon.grpc_address).await;
    let second = api.capture(order_request("watch-2", &[("sku-w", 2)])).await;
    assert_eq!(status(&second), OrderStatus::Allocated);
    api.cancel(&second.order_id, "test").await;
    api.mark("MARK-4", "N1").await;
    let mut resumed = api.watch(k3 + 1, &[]).await;
    let after_kill = read_until(&mut resumed, |event| is_marker(event, "MARK-4")).await;
    drop(resumed);
    assert_gap_free(&after_kill, k3 + 1, "resumed after kill -9");
    let mut full = api.watch(1, &[]).await;
    let log = read_until(&mut full, |event| is_marker(event, "MARK-4")).await;
    drop(full);
    assert_eq!(log, [seen, after_kill].concat(), "the log is what was seen, then what was resumed");

    // GetOrderHistory is the log filtered by order.
    for order_id in [&first.order_id, &abroad.order_id, &second.order_id] {
        let from_log: Vec<v1::Event> =
            log.iter().filter(|event| event.order_id == *order_id).cloned().collect();
        assert_eq!(api.history(order_id).await, from_log, "{order_id}: history differs from the log");
    }
    // A type filter.
    let wanted = ["order.captured", "order.held"];
    let expected: Vec<v1::Event> =
        log.iter().filter(|event| wanted.contains(&event.r#type.as_str())).cloned().collect();
    assert_eq!(expected.len(), 4, "three captures and one hold: {expected:#?}");
    let mut typed = api.watch(1, &wanted).await;
    let mut filtered = Vec::new();
    while filtered.len() < expected.len() {
        filtered.push(next_event(&mut typed).await);
    }
    drop(typed);
    assert_eq!(filtered, expected, "a filtered watch skips other types, nothing else");
    expect_watch_refused(
        &mut api,
        v1::WatchEventsRequest { from_sequence: 1, types: vec!["Not A Type!".into()] },
        Code::InvalidArgument,
        "WatchEvents with a malformed type",
    )
    .await;
    daemon.kill9();
}

// ----- 9. KPIs ------------------------------------------------------------------------------

/// The expected GetStatsResponse.
#[allow(clippy::too_many_arguments)]
fn expected_stats(
    by_status: &[(OrderStatus, i64)],
    fill_rate: f64,
    split_rate: f64,
    backorder_rate: f64,
    cycle_time_p50_seconds: f64,
    cycle_time_p95_seconds: f64,
    return_rate: f64,
    perfect_order_rate: f64,
) -> v1::GetStatsResponse {
    v1::GetStatsResponse {
        orders_by_status: by_status
            .iter()
            .map(|(status, count)| v1::get_stats_response::StatusCount {
                status: *status as i32,
                count: *count,
            })
            .collect(),
        fill_rate,
        split_rate,
        backorder_rate,
        cycle_time_p50_seconds,
        cycle_time_p95_seconds,
        return_rate,
        perfect_order_rate,
        orders_total: by_status.iter().map(|(_, count)| count).sum(),
    }
}

#[track_caller]
fn assert_stats(actual: &v1::GetStatsResponse, expected: &v1::GetStatsResponse, what: &str) {
    assert_eq!(actual.orders_by_status, expected.orders_by_status, "{what}: orders_by_status");
    assert_eq!(actual.orders_total, expected.orders_total, "{what}: orders_total");
    let rates = [
        ("fill_rate", actual.fill_rate, expected.fill_rate),
        ("split_rate", actual.split_rate, expected.split_rate),
        ("backorder_rate", actual.backorder_rate, expected.backorder_rate),
        ("cycle_time_p50_seconds", actual.cycle_time_p50_seconds, expected.cycle_time_p50_seconds),
        ("cycle_time_p95_seconds", actual.cycle_time_p95_seconds, expected.cycle_time_p95_seconds),
        ("return_rate", actual.return_rate, expected.return_rate),
        ("perfect_order_rate", actual.perfect_order_rate, expected.perfect_order_rate),
    ];
    for (name, actual_value, expected_value) in rates {
        assert!(
            (actual_value - expected_value).abs() < 1e-9,
            "{what}: {name} is {actual_value}, expected {expected_value}\nall: {actual:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_match_a_hand_computed_scenario() {
    // Goal: GetStats computes exactly the definitions of orders.proto, per channel and over all.
    // Method: a ManualClock; on "web" seven orders captured at T0:
    //   o1 2 units, one shipment at T0+60 s, delivered            (DELIVERED, perfect)
    //   o2 4 units, parcels at T0+30 s (1) and T0+120 s (3), not delivered (SHIPPED)
    //   o3 1 unit, shipped at T0+300 s, delivered, returned        (DELIVERED, returned)
    //   o4 5 units split over two nodes, both shipped at T0+900 s, delivered (DELIVERED, split)
    //   o5 2 units, shipped at T0+900 s                            (SHIPPED)
    //   o6 3 units, 1 in stock: 1 allocated + 2 backordered        (BACKORDERED)
    //   o7 2 units                                                 (ALLOCATED)
    // and on "market" o8 (payment pending, cancelled while held: never routed) and o9 (payment
    // pending, HELD: never routed, 2 units).
    // web: fill = shipped or allocated / ordered not cancelled = (2+4+1+5+2+1+2) / (2+4+1+5+2+3+2)
    //      = 17/19; routed orders 7, split 1/7 (o4), backorder 1/7 (o6); cycle times
    //      60, 120, 300, 900, 900 s: p50 = 300, p95 = 900 (the same under nearest-rank and
    //      interpolation); return = 1 returned / 14 shipped; perfect = 1 (o1) / 3 delivered.
    // (o2 stays undelivered on purpose: whether "shipped complete in one shipment" means one
    // fulfilment order or one parcel is open in the contract, and o2 would tell them apart.)
    // market: nothing routed or shipped: every rate 0. All channels: fill = 17 / (19 + 2 held
    //      units) = 17/21, the other rates as on web (held orders are not routed).
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let server = Server::start_in(tempfile::tempdir().unwrap(), clock.clone(), OrderRules::default()).await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 1.0), node_at(FAR, 2.0)]).await;
    api.set_stock(&[
        ("kpi-1", NEAR, 100),
        ("kpi-split", NEAR, 3),
        ("kpi-split", FAR, 3),
        ("kpi-bo", NEAR, 1),
    ])
    .await;
    assert_stats(
        &api.stats("").await,
        &expected_stats(&[], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "no order yet",
    );

    let o1 = api.capture(order_request("kpi-o1", &[("kpi-1", 2)])).await;
    let o2 = api.capture(order_request("kpi-o2", &[("kpi-1", 4)])).await;
    let o3 = api.capture(order_request("kpi-o3", &[("kpi-1", 1)])).await;
    let o4 = api.capture(order_request("kpi-o4", &[("kpi-split", 5)])).await;
    let o5 = api.capture(order_request("kpi-o5", &[("kpi-1", 2)])).await;
    let o6 = api.capture(order_request("kpi-o6", &[("kpi-bo", 3)])).await;
    let o7 = api.capture(order_request("kpi-o7", &[("kpi-1", 2)])).await;
    let market_pending = |external: &str, qty: i64| {
        with(&order_request(external, &[("kpi-1", qty)]), |request| {
            request.channel = "market".into();
            set_payment(request, v1::payment::Status::Pending);
        })
    };
    let o8 = api.capture(market_pending("kpi-o8", 3)).await;
    let o9 = api.capture(market_pending("kpi-o9", 2)).await;
    assert_eq!(o4.fulfilment_order_ids.len(), 2, "o4 is split: {o4:#?}");
    assert_eq!((status(&o6), counters(&o6, "kpi-bo")), (OrderStatus::Backordered, (1, 2, 0, 0)));
    assert_eq!((status(&o8), status(&o9)), (OrderStatus::Held, OrderStatus::Held));
    api.cancel(&o8.order_id, "payment failed").await;
    let created = o1.created_at.expect("created_at");
    assert_eq!(
        (created.seconds, created.nanos),
        ((NOON_MS / 1_000) as i64, 0),
        "created_at is the capture time"
    );

    let at = |seconds: u64| clock.set_ms(NOON_MS + seconds * 1_000);
    at(30);
    api.ship(ship_request(&o2.fulfilment_order_ids[0], "o2-a", &[("kpi-1", 1)])).await;
    at(60);
    api.ship_all(&o1.fulfilment_order_ids[0], "o1").await;
    at(120);
    api.ship_all(&o2.fulfilment_order_ids[0], "o2-b").await;
    at(300);
    api.ship_all(&o3.fulfilment_order_ids[0], "o3").await;
    at(900);
    api.ship_all(&o4.fulfilment_order_ids[0], "o4-a").await;
    api.ship_all(&o4.fulfilment_order_ids[1], "o4-b").await;
    api.ship_all(&o5.fulfilment_order_ids[0], "o5").await;
    at(1_000);
    for order in [&o1, &o3, &o4] {
        for fo_id in &order.fulfilment_order_ids {
            api.deliver(fo_id).await;
        }
    }
    let rma = api.create_return(create_return_request(&o3.order_id, &[("kpi-1", 1, "broken")], "")).await;
    api.receive_return(receive_request(&rma.return_id, NEAR, &[("kpi-1", 1, true)], "")).await;

    let expected_statuses = [
        (&o1, OrderStatus::Delivered),
        (&o2, OrderStatus::Shipped),
        (&o3, OrderStatus::Delivered),
        (&o4, OrderStatus::Delivered),
        (&o5, OrderStatus::Shipped),
        (&o6, OrderStatus::Backordered),
        (&o7, OrderStatus::Allocated),
        (&o8, OrderStatus::Cancelled),
        (&o9, OrderStatus::Held),
    ];
    for (order, expected) in expected_statuses {
        assert_eq!(status(&api.order(&order.order_id).await), expected, "{}", order.external_order_id);
    }

    use OrderStatus::{Allocated, Backordered, Cancelled, Delivered, Held, Shipped};
    let web = expected_stats(
        &[(Allocated, 1), (Backordered, 1), (Shipped, 2), (Delivered, 3)],
        17.0 / 19.0,
        1.0 / 7.0,
        1.0 / 7.0,
        300.0,
        900.0,
        1.0 / 14.0,
        1.0 / 3.0,
    );
    assert_stats(&api.stats("web").await, &web, "channel web");
    let market = expected_stats(&[(Held, 1), (Cancelled, 1)], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    assert_stats(&api.stats("market").await, &market, "channel market");
    let all = expected_stats(
        &[(Held, 1), (Allocated, 1), (Backordered, 1), (Shipped, 2), (Delivered, 3), (Cancelled, 1)],
        17.0 / 21.0,
        1.0 / 7.0,
        1.0 / 7.0,
        300.0,
        900.0,
        1.0 / 14.0,
        1.0 / 3.0,
    );
    assert_stats(&api.stats("").await, &all, "every channel");
    assert_stats(
        &api.stats("nobody").await,
        &expected_stats(&[], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "no order",
    );
    expect_code(
        api.orders.get_stats(v1::GetStatsRequest { channel: "we b".into() }).await,
        Code::InvalidArgument,
        "GetStats of a malformed channel",
    );
    server.stop().await;
}

// ----- 10. kill -9 during shipments (real binary) -------------------------------------------

const CRASH_NODES: [&str; 2] = ["N1", "N2"];
/// SKUs 0..10 are stocked at both nodes, 10..15 at N1 only, 15..20 at N2 only, so orders
/// mixing them are split.
const CRASH_SKUS: usize = 20;
const CRASH_ON_HAND: i64 = 200;
const CRASH_ORDERS: usize = 150;
/// Each fulfilment order's shipments start at a random moment in this window; the kill comes
/// at a random moment in `CRASH_KILL_AFTER_MS`, so that some are answered, some in flight and
/// some never sent.
const CRASH_SPREAD_MS: u64 = 300;
const CRASH_KILL_AFTER_MS: RangeInclusive<u64> = 50..=250;

fn crash_sku(index: usize) -> String {
    format!("CS-{index:02}")
}

fn crash_nodes_of(index: usize) -> &'static [&'static str] {
    match index {
        0..10 => &CRASH_NODES,
        10..15 => &CRASH_NODES[..1],
        _ => &CRASH_NODES[1..],
    }
}

/// What the client knows of the shipments it sent.
#[derive(Default)]
struct ShipmentLedger {
    /// The requests of each fulfilment order, in the order they are sent (one at a time).
    plans: BTreeMap<String, Vec<v1::ConfirmShipmentRequest>>,
    /// Acknowledged responses by idempotency key.
    acknowledged: BTreeMap<String, v1::FulfilmentOrder>,
    /// Keys sent without an answer (outcome unknown).
    unresolved: BTreeSet<String>,
}

/// Stock against the fulfilment orders: at every (sku, node) of `initial`, on_hand is the
/// initial on_hand less the units shipped, and reserved the units left to ship.
async fn check_stock_against(
    api: &mut Clients,
    fulfilment_orders: &BTreeMap<String, v1::FulfilmentOrder>,
    initial: &BTreeMap<(String, String), i64>,
    what: &str,
) {
    let mut shipped: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut open: BTreeMap<(String, String), i64> = BTreeMap::new();
    for fulfilment_order in fulfilment_orders.values() {
        for fo_line in &fulfilment_order.lines {
            let key = (fo_line.sku.clone(), fulfilment_order.node_id.clone());
            assert!(initial.contains_key(&key), "{what}: {key:?} was never stocked");
            *shipped.entry(key.clone()).or_insert(0) += fo_line.shipped;
            *open.entry(key).or_insert(0) += remaining(fo_line);
        }
    }
    let skus: Vec<String> =
        initial.keys().map(|(sku, _)| sku.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    let positions = api.positions(&skus).await;
    for (key, on_hand) in initial {
        let position = positions.get(key).unwrap_or_else(|| panic!("{what}: no position {key:?}"));
        let shipped = shipped.get(key).copied().unwrap_or(0);
        let open = open.get(key).copied().unwrap_or(0);
        assert_eq!(
            position.on_hand,
            on_hand - shipped,
            "{what}: {key:?}: on_hand is not {on_hand} less the {shipped} units the fulfilment orders shipped"
        );
        assert_eq!(position.reserved, open, "{what}: {key:?}: reserved is not the {open} units left to ship");
    }
}

/// Orders against their fulfilment orders: per line, shipped and allocated are the sums over
/// the order's fulfilment orders, and the status follows.
async fn check_orders_against(
    api: &mut Clients,
    fulfilment_orders: &BTreeMap<String, v1::FulfilmentOrder>,
    order_ids: &[String],
    what: &str,
) {
    for order_id in order_ids {
        let order = api.order(order_id).await;
        let mine: Vec<&v1::FulfilmentOrder> =
            fulfilment_orders.values().filter(|fo| fo.order_id == *order_id).collect();
        let listed: BTreeSet<&String> = order.fulfilment_order_ids.iter().collect();
        let found: BTreeSet<&String> = mine.iter().map(|fo| &fo.fulfilment_order_id).collect();
        assert_eq!(listed, found, "{what}: {order_id}: fulfilment_order_ids are not its fulfilment orders");
        let (mut shipped_total, mut open_total) = (0, 0);
        for order_line in &order.lines {
            let fo_lines =
                || mine.iter().flat_map(|fo| fo.lines.iter()).filter(|fo_line| fo_line.sku == order_line.sku);
            let shipped: i64 = fo_lines().map(|fo_line| fo_line.shipped).sum();
            let open: i64 = fo_lines().map(remaining).sum();
            assert_eq!(
                (order_line.shipped, order_line.allocated),
                (shipped, open),
                "{what}: {order_id} {}: (shipped, allocated) differ from its fulfilment orders",
                order_line.sku
            );
            shipped_total += shipped;
            open_total += open;
        }
        let expected = match (shipped_total, open_total) {
            (_, 0) => OrderStatus::Shipped,
            (0, _) => OrderStatus::Allocated,
            _ => OrderStatus::PartiallyShipped,
        };
        assert_eq!(status(&order), expected, "{what}: {order_id}: {order:#?}");
    }
}

/// Every shipment on a fulfilment order comes from a key of its plan, at most once each.
fn check_parcels_against_plan(ledger: &ShipmentLedger, fulfilment_order: &v1::FulfilmentOrder, what: &str) {
    let id = &fulfilment_order.fulfilment_order_id;
    check_fulfilment_order(fulfilment_order);
    let planned: HashSet<String> =
        ledger.plans[id].iter().map(|request| request.tracking_number.clone()).collect();
    let mut seen = HashSet::new();
    for parcel in &fulfilment_order.shipments {
        assert!(planned.contains(&parcel.tracking_number), "{what}: {id}: a parcel nobody sent: {parcel:?}");
        assert!(
            seen.insert(parcel.tracking_number.clone()),
            "{what}: {id}: {} twice",
            parcel.tracking_number
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_shipments_counts_every_unit_once() {
    // Goal: ConfirmShipment is atomic and durable across kill -9: after a restart every
    // acknowledged shipment is on its fulfilment order, and for every node and SKU on_hand is
    // the initial on_hand less the units the fulfilment orders shipped and reserved the units
    // they still have to ship; the orders agree with their fulfilment orders; replaying every
    // acknowledged key answers the original and moves nothing; retrying every unanswered (or
    // unsent) request ships every unit exactly once, and the audit log counts each once too.
    // Method: real allotd, 150 seeded orders over 20 SKUs and 2 nodes (splits included), then
    // per fulfilment order one "ship all" or a one-unit parcel followed by "ship the rest",
    // started at random moments within 300 ms, cut by SIGKILL at a random moment.
    let seed = seed("kill9_during_shipments_counts_every_unit_once");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::start(dir.path());
    let mut api = Clients::connect(daemon.grpc_address).await;
    api.upsert_nodes(
        CRASH_NODES.iter().enumerate().map(|(index, id)| node_at(id, 1.0 + index as f64)).collect(),
    )
    .await;
    let mut initial = BTreeMap::new();
    for index in 0..CRASH_SKUS {
        for node in crash_nodes_of(index) {
            initial.insert((crash_sku(index), node.to_string()), CRASH_ON_HAND);
        }
    }
    let entries: Vec<(&str, &str, i64)> =
        initial.iter().map(|((sku, node), on_hand)| (sku.as_str(), node.as_str(), *on_hand)).collect();
    api.set_stock(&entries).await;

    let mut order_ids = Vec::new();
    for index in 0..CRASH_ORDERS {
        let line_count = rng.random_range(1..=3);
        let mut skus = BTreeSet::new();
        while skus.len() < line_count {
            skus.insert(crash_sku(rng.random_range(0..CRASH_SKUS)));
        }
        let lines: Vec<(&str, i64)> =
            skus.iter().map(|sku| (sku.as_str(), rng.random_range(1..=4))).collect();
        let order = api.capture(order_request(&format!("crash-{index}"), &lines)).await;
        assert_eq!(status(&order), OrderStatus::Allocated, "seed {seed}: {order:#?}");
        order_ids.push(order.order_id);
    }
    let before = api.all_fulfilment_orders().await;
    check_stock_against(&mut api, &before, &initial, "before the shipments").await;

    let mut ledger = ShipmentLedger::default();
    for (id, fulfilment_order) in &before {
        let split_line = fulfilment_order.lines.iter().find(|fo_line| fo_line.qty >= 2);
        let requests = match split_line {
            Some(fo_line) if rng.random_bool(0.5) => vec![
                ship_request(id, &format!("{id}-part"), &[(fo_line.sku.as_str(), 1)]),
                ship_request(id, &format!("{id}-rest"), &[]),
            ],
            _ => vec![ship_request(id, &format!("{id}-all"), &[])],
        };
        ledger.plans.insert(id.clone(), requests);
    }
    let kill_after = Duration::from_millis(rng.random_range(CRASH_KILL_AFTER_MS));
    let launched = Instant::now();
    let mut tasks = JoinSet::new();
    for requests in ledger.plans.values() {
        let delay = Duration::from_millis(rng.random_range(0..CRASH_SPREAD_MS));
        let requests = requests.clone();
        let mut client = api.fulfilment.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until((launched + delay).into()).await;
            let mut outcomes = Vec::new();
            for request in requests {
                let key = request.idempotency_key.clone();
                let sent_at = Instant::now();
                match client.confirm_shipment(request).await {
                    Ok(response) => outcomes.push((key, sent_at, Ok(response.into_inner()))),
                    Err(status) => {
                        // The next request of this fulfilment order is not sent.
                        outcomes.push((key, sent_at, Err(status)));
                        break;
                    }
                }
            }
            outcomes
        });
    }
    tokio::time::sleep_until((launched + kill_after).into()).await;
    let killed_at = Instant::now();
    daemon.kill9();
    let mut in_flight_at_kill = 0;
    let collected = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(joined) = tasks.join_next().await {
            for (key, sent_at, outcome) in joined.expect("a shipment task panicked") {
                match outcome {
                    Ok(fulfilment_order) => {
                        ledger.acknowledged.insert(key, fulfilment_order);
                    }
                    Err(status) => {
                        assert!(
                            !matches!(
                                status.code(),
                                Code::InvalidArgument
                                    | Code::AlreadyExists
                                    | Code::NotFound
                                    | Code::FailedPrecondition
                                    | Code::Unimplemented
                            ),
                            "seed {seed}: {key}: the request itself was refused: {status}"
                        );
                        in_flight_at_kill += usize::from(sent_at < killed_at);
                        ledger.unresolved.insert(key);
                    }
                }
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "seed {seed}: shipment tasks still running a minute after the kill");
    let requests_total: usize = ledger.plans.values().map(Vec::len).sum();
    println!(
        "kill -9 after {kill_after:?}: {} fulfilment orders, {requests_total} shipments planned, {} acknowledged, \
         {} unanswered ({in_flight_at_kill} in flight at the kill), {} not sent",
        ledger.plans.len(),
        ledger.acknowledged.len(),
        ledger.unresolved.len(),
        requests_total - ledger.acknowledged.len() - ledger.unresolved.len()
    );

    // After the restart: what was acknowledged is there, and everything is consistent.
    let daemon = Daemon::start(dir.path());
    let mut api = Clients::connect(daemon.grpc_address).await;
    let after = api.all_fulfilment_orders().await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "seed {seed}: fulfilment orders appeared or vanished"
    );
    for (key, response) in &ledger.acknowledged {
        let tracking = format!("trk-{key}");
        let acknowledged = response
            .shipments
            .iter()
            .find(|parcel| parcel.tracking_number == tracking)
            .unwrap_or_else(|| panic!("seed {seed}: {key}: the response does not list its own parcel"));
        let now = &after[&response.fulfilment_order_id];
        let found: Vec<&v1::fulfilment_order::Shipment> =
            now.shipments.iter().filter(|parcel| parcel.tracking_number == tracking).collect();
        assert_eq!(
            found,
            vec![acknowledged],
            "seed {seed}: {key}: the acknowledged parcel is not there once"
        );
    }
    for fulfilment_order in after.values() {
        check_parcels_against_plan(&ledger, fulfilment_order, &format!("seed {seed}, after the restart"));
    }
    check_stock_against(&mut api, &after, &initial, &format!("seed {seed}, after the restart")).await;
    check_orders_against(&mut api, &after, &order_ids, &format!("seed {seed}, after the restart")).await;
    let committed_unanswered = ledger
        .unresolved
        .iter()
        .filter(|key| {
            let tracking = format!("trk-{key}");
            after.values().any(|fo| fo.shipments.iter().any(|parcel| parcel.tracking_number == tracking))
        })
        .count();
    println!(
        "after the restart: {committed_unanswered} of the {} unanswered shipments had been committed",
        ledger.unresolved.len()
    );

    // Replays of the acknowledged keys answer the original and move nothing.
    for (key, response) in &ledger.acknowledged {
        let request = ledger.plans[&response.fulfilment_order_id]
            .iter()
            .find(|request| request.idempotency_key == *key)
            .expect("a planned key")
            .clone();
        assert_eq!(&api.ship(request).await, response, "seed {seed}: {key}: the replay differs");
    }
    assert_eq!(api.all_fulfilment_orders().await, after, "seed {seed}: replays changed fulfilment orders");
    check_stock_against(&mut api, &after, &initial, &format!("seed {seed}, after the replays")).await;

    // Retry what was not acknowledged, in plan order: every unit ships exactly once.
    for (id, requests) in &ledger.plans {
        for request in
            requests.iter().filter(|request| !ledger.acknowledged.contains_key(&request.idempotency_key))
        {
            let fulfilment_order = api.ship(request.clone()).await;
            let parcels = fulfilment_order
                .shipments
                .iter()
                .filter(|parcel| parcel.tracking_number == request.tracking_number);
            assert_eq!(
                parcels.count(),
                1,
                "seed {seed}: {id}: {} not there exactly once",
                request.idempotency_key
            );
        }
    }
    let done = api.all_fulfilment_orders().await;
    for (id, fulfilment_order) in &done {
        check_parcels_against_plan(&ledger, fulfilment_order, &format!("seed {seed}, after the retries"));
        assert_eq!(
            fo_status(fulfilment_order),
            FoStatus::Shipped,
            "seed {seed}: {id}: {fulfilment_order:#?}"
        );
        let trackings: Vec<&String> =
            fulfilment_order.shipments.iter().map(|parcel| &parcel.tracking_number).collect();
        let planned: Vec<&String> = ledger.plans[id].iter().map(|request| &request.tracking_number).collect();
        assert_eq!(trackings, planned, "seed {seed}: {id}: the parcels are not the plan's, in order");
        for fo_line in &fulfilment_order.lines {
            assert_eq!(
                (fo_line.shipped, fo_line.short, fo_line.cancelled),
                (fo_line.qty, 0, 0),
                "seed {seed}: {id}"
            );
        }
    }
    check_stock_against(&mut api, &done, &initial, &format!("seed {seed}, after the retries")).await;
    check_orders_against(&mut api, &done, &order_ids, &format!("seed {seed}, after the retries")).await;

    // The audit log counts every shipped unit once.
    api.mark("CRASH-MARK", "N1").await;
    let mut stream = api.watch(1, &[]).await;
    let log = read_until(&mut stream, |event| is_marker(event, "CRASH-MARK")).await;
    drop(stream);
    assert_gap_free(&log, 1, &format!("seed {seed}: the log after kill -9"));
    let mut shipped_units: BTreeMap<(String, String), i64> = BTreeMap::new();
    for fulfilment_order in done.values() {
        for fo_line in &fulfilment_order.lines {
            *shipped_units.entry((fo_line.sku.clone(), fulfilment_order.node_id.clone())).or_insert(0) +=
                fo_line.shipped;
        }
        let shipment_events = event_units_of_fulfilment_order(
            &log,
            "fulfilment.shipped",
            &fulfilment_order.fulfilment_order_id,
        );
        assert_eq!(
            shipment_events.len(),
            fulfilment_order.shipments.len(),
            "seed {seed}: {}: one fulfilment.shipped event per parcel",
            fulfilment_order.fulfilment_order_id
        );
    }
    assert_eq!(
        event_units_by_position(&log, "stock.shipped"),
        shipped_units,
        "seed {seed}: stock.shipped units"
    );
    daemon.kill9();
}

// ----- 12. event retention ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_log_is_trimmed_to_its_retention_and_resumes_from_what_is_kept() {
    // Goal: the event log is bounded by store.event_retention; a watch from 0/1 starts at the
    // oldest kept event, one from a trimmed sequence is OUT_OF_RANGE, and both hold across a
    // restart. Method: retention 1,000, three SetStock batches of 1,000 entries (one stock.set
    // event each), then watches from several sequences before and after a restart.
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::test_config(dir.path());
    config.store.event_retention = 1_000;
    let running = allot::server::start(config.clone(), Arc::new(SystemClock)).await.unwrap();
    let mut api = Clients::connect(running.grpc_address).await;
    api.upsert_nodes(vec![node_at(NEAR, 0.0)]).await;
    for batch in 0..3 {
        let skus: Vec<String> = (0..1_000).map(|index| format!("ret-{batch}-{index:04}")).collect();
        let entries: Vec<(&str, &str, i64)> = skus.iter().map(|sku| (sku.as_str(), NEAR, 1)).collect();
        api.set_stock(&entries).await;
    }
    // 3,000 events; trimming in steps of an eighth of the retention keeps 1,000 to 1,125.
    check_retained(&mut api, "before the restart").await;
    drop(api);
    running.shutdown().await;
    let running = allot::server::start(config, Arc::new(SystemClock)).await.unwrap();
    let mut api = Clients::connect(running.grpc_address).await;
    check_retained(&mut api, "after the restart").await;
    drop(api);
    running.shutdown().await;
}

/// The log of `event_log_is_trimmed_...`: events 2,001..=3,000 kept, older ones gone.
async fn check_retained(api: &mut Clients, when: &str) {
    let mut stream = api.watch(0, &[]).await;
    let events = read_until(&mut stream, |event| event.sequence >= 3_000).await;
    assert_gap_free(&events, 2_001, &format!("{when}: the kept log from 0"));
    let mut from_one = api.watch(1, &[]).await;
    assert_eq!(next_event(&mut from_one).await.sequence, 2_001, "{when}: from 1 = from the oldest kept");
    let mut later = api.watch(2_500, &[]).await;
    assert_eq!(next_event(&mut later).await.sequence, 2_500, "{when}: a kept sequence resumes exactly");
    let trimmed = v1::WatchEventsRequest { from_sequence: 1_500, types: Vec::new() };
    expect_watch_refused(api, trimmed, Code::OutOfRange, &format!("{when}: a trimmed sequence")).await;
}

// ----- 13. closed-order retention -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_orders_are_forgotten_after_their_retention() {
    // Goal: DELIVERED, SHIPPED and CANCELLED orders untouched for closed_order_retention_ms
    // leave memory and disk with their fulfilment orders (bounded memory), open orders stay,
    // the KPIs follow, and a restart does not bring them back. Method: a ManualClock, one
    // order in each state, the clock moved past the retention, the 50 ms purge awaited.
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let mut config = common::test_config(dir.path());
    config.orders.closed_order_retention_ms = DAY_MS;
    config.server.purge_interval_ms = 50;
    let running = allot::server::start(config.clone(), clock.clone()).await.unwrap();
    let mut api = Clients::connect(running.grpc_address).await;
    api.upsert_nodes(vec![node_at(NEAR, 0.0)]).await;
    api.set_stock(&[("keep-a", NEAR, 10)]).await;
    // The open order first, so the highest id belongs to a forgotten one.
    let open = api.capture(order_request("ret-open", &[("keep-a", 2)])).await;
    let delivered = api.capture(order_request("ret-delivered", &[("keep-a", 1)])).await;
    let fo = delivered.fulfilment_order_ids[0].clone();
    api.ship_all(&fo, "ret-ship-1").await;
    api.deliver(&fo).await;
    let shipped = api.capture(order_request("ret-shipped", &[("keep-a", 1)])).await;
    api.ship_all(&shipped.fulfilment_order_ids[0], "ret-ship-2").await;
    let cancelled = api.capture(order_request("ret-cancelled", &[("keep-a", 1)])).await;
    api.cancel(&cancelled.order_id, "customer changed their mind").await;
    assert_eq!(api.stats("").await.orders_total, 4);
    // Half the retention: nothing goes.
    clock.advance_ms(DAY_MS / 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.stats("").await.orders_total, 4, "nothing is forgotten before its retention");
    clock.advance_ms(DAY_MS / 2 + 1_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while api.stats("").await.orders_total != 1 {
        assert!(std::time::Instant::now() < deadline, "closed orders were not purged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for gone in [&delivered, &shipped, &cancelled] {
        let request = v1::GetOrderRequest { order_id: gone.order_id.clone() };
        expect_code(api.orders.get_order(request).await, Code::NotFound, "a forgotten order");
    }
    assert_eq!(api.order(&open.order_id).await.status, v1::order::Status::Allocated as i32);
    let at_node = api.fulfilment_orders_at(NEAR).await;
    assert_eq!(at_node.len(), 1, "only the open order's fulfilment order is listed: {at_node:?}");
    assert_eq!(at_node[0].order_id, open.order_id);
    let stats = api.stats("").await;
    assert_eq!(stats.fill_rate, 1.0, "the open order is allocated in full");
    // A restart reads what is on disk: the forgotten orders stay gone.
    drop(api);
    running.shutdown().await;
    let running = allot::server::start(config, clock.clone()).await.unwrap();
    let mut api = Clients::connect(running.grpc_address).await;
    assert_eq!(api.stats("").await.orders_total, 1, "after the restart");
    let request = v1::GetOrderRequest { order_id: delivered.order_id.clone() };
    expect_code(api.orders.get_order(request).await, Code::NotFound, "a forgotten order after the restart");
    assert_eq!(api.order(&open.order_id).await.order_id, open.order_id);
    // A new order gets a new id, never a forgotten one's (ids are high-water marks on disk).
    let next = api.capture(order_request("ret-next", &[("keep-a", 1)])).await;
    assert_eq!(next.order_id, "ord-5", "after ord-4 was forgotten");
    let next_fo = &next.fulfilment_order_ids[0];
    for gone in [&delivered, &shipped, &cancelled] {
        assert!(!gone.fulfilment_order_ids.contains(next_fo), "{next_fo} reused");
    }
    drop(api);
    running.shutdown().await;
}

// ----- 14. backorder retry fairness ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backorders_that_cannot_use_new_stock_do_not_starve_later_ones() {
    // Goal: the retry walks every order waiting for a risen SKU in bounded batches, so orders
    // at the front that cannot use the new stock never starve the ones behind them. Method:
    // batches of 2; three PICKUP orders at a store without stock wait first, then a SHIP
    // order; stock arrives at the warehouse only (useless to the pickups). The SHIP order
    // must be allocated, the pickups stay backordered and are not rewritten (no new events).
    let rules = OrderRules { backorder_retry_batch_len_max: 2, ..OrderRules::default() };
    let server = Server::start_in(tempfile::tempdir().unwrap(), Arc::new(SystemClock), rules).await;
    let mut api = server.clients.clone();
    api.upsert_nodes(vec![node_at(NEAR, 0.0), store_at(STORE, 0.1)]).await;
    api.set_stock(&[("fair-a", NEAR, 0), ("fair-a", STORE, 0)]).await;
    let mut pickups = Vec::new();
    for index in 0..3 {
        let request = with(&order_request(&format!("fair-pickup-{index}"), &[("fair-a", 1)]), |request| {
            request.method = v1::Method::Pickup as i32;
            request.pickup_node_id = STORE.into();
        });
        let order = api.capture(request).await;
        assert_eq!(status(&order), OrderStatus::Backordered, "{order:?}");
        pickups.push(order);
    }
    let ship = api.capture(order_request("fair-ship", &[("fair-a", 1)])).await;
    assert_eq!(status(&ship), OrderStatus::Backordered);
    let histories_before: Vec<usize> =
        history_lengths(&mut api, &pickups.iter().map(|order| order.order_id.clone()).collect::<Vec<_>>())
            .await;
    api.adjust_stock("fair-receipt", &[("fair-a", NEAR, 5)]).await;
    let filled = api
        .wait_for_order(&ship.order_id, "the SHIP order behind three stuck pickups", |order| {
            status(order) == OrderStatus::Allocated
        })
        .await;
    assert_eq!(filled.lines[0].allocated, 1);
    // Give the retry a few more passes: the pickups stay as they were, unrewritten.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for order in &pickups {
        assert_eq!(status(&api.order(&order.order_id).await), OrderStatus::Backordered);
    }
    let histories_after =
        history_lengths(&mut api, &pickups.iter().map(|order| order.order_id.clone()).collect::<Vec<_>>())
            .await;
    assert_eq!(histories_after, histories_before, "an unchanged backorder writes no events");
    server.stop().await;
}

/// The history length of each order.
async fn history_lengths(api: &mut Clients, order_ids: &[String]) -> Vec<usize> {
    let mut lengths = Vec::new();
    for order_id in order_ids {
        lengths.push(api.history(order_id).await.len());
    }
    lengths
}
