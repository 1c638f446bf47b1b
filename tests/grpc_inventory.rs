mod common;

// End-to-end tests of `allot.v1.Inventory` over real gRPC against an in-process daemon on a
// real RocksDB store in a temporary directory: the contract of API.md and the proto comments,
// error codes and messages, idempotency, channels, expiry, the availability feed, contention,
// health, reflection, metrics and the not-yet-built services. No mocks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allot::clock::{Clock, ManualClock, SystemClock};
use allot::config::Config;
use allot::proto::v1;
use allot::server::Running;
use allot::store::keys::IdemNamespace;
use common::{InventoryClient, line, node, stock};
use rand::{Rng, SeedableRng};
use tonic::Code;

/// Upper bound on any single wait (a stream item, a poll loop): a hang fails the test with a
/// message instead of blocking the run. Not a speed assertion.
const WAIT_MAX: Duration = Duration::from_secs(10);
/// API.md: expired units are back in ATP within one second of `expires_at`; the poll allows
/// half a second more for the request round trips themselves.
const EXPIRY_GRACE_MS: u64 = 1_500;
/// The default maximum TTL (30 days).
const TTL_MS_MAX: u64 = 30 * 24 * 3_600 * 1_000;

use v1::reservation::Status as ReservationStatus;
use v1::reserve_response::Status as ReserveStatus;

// ----- helpers -----------------------------------------------------------------------------

/// A running in-process daemon, its data directory and one client.
struct Daemon {
    running: Running,
    client: InventoryClient,
    /// Kept until after shutdown: the store lives here.
    dir: tempfile::TempDir,
}

impl Daemon {
    async fn start() -> Daemon {
        Daemon::start_with(|_| {}, Arc::new(SystemClock)).await
    }

    async fn start_with(adjust: impl FnOnce(&mut Config), clock: Arc<dyn Clock>) -> Daemon {
        Daemon::start_in(tempfile::tempdir().unwrap(), adjust, clock).await
    }

    /// Starts on the store in `dir` (a restart when it holds one).
    async fn start_in(
        dir: tempfile::TempDir,
        adjust: impl FnOnce(&mut Config),
        clock: Arc<dyn Clock>,
    ) -> Daemon {
        let mut config = common::test_config(dir.path());
        adjust(&mut config);
        let running = allot::server::start(config, clock).await.unwrap();
        let client = common::inventory_client(running.grpc_address).await;
        Daemon { running, client, dir }
    }

    fn address(&self) -> SocketAddr {
        self.running.grpc_address
    }

    async fn stop(self) {
        drop(self.stop_keeping_data().await);
    }

    /// Graceful shutdown; returns the data directory for a restart.
    async fn stop_keeping_data(self) -> tempfile::TempDir {
        let Daemon { running, client, dir } = self;
        drop(client);
        running.shutdown().await;
        dir
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn ms(timestamp: &prost_types::Timestamp) -> u64 {
    timestamp.seconds as u64 * 1_000 + timestamp.nanos as u64 / 1_000_000
}

fn restricted_node(node_id: &str, channels: &[&str]) -> v1::Node {
    v1::Node {
        channels: channels.iter().map(|channel| channel.to_string()).collect(),
        ..node(node_id, 10.0, 10.0)
    }
}

async fn upsert(client: &mut InventoryClient, nodes: Vec<v1::Node>) {
    let count = client
        .upsert_nodes(v1::UpsertNodesRequest { nodes: nodes.clone() })
        .await
        .unwrap()
        .into_inner()
        .count;
    assert_eq!(count, nodes.len() as i64);
}

async fn set_stock(client: &mut InventoryClient, entries: Vec<v1::StockEntry>) {
    let count =
        client.set_stock(v1::SetStockRequest { entries: entries.clone() }).await.unwrap().into_inner().count;
    assert_eq!(count, entries.len() as i64);
}

async fn availability(
    client: &mut InventoryClient,
    skus: &[&str],
    channel: &str,
) -> Vec<v1::AvailabilityItem> {
    let request = v1::GetAvailabilityRequest {
        skus: skus.iter().map(|sku| sku.to_string()).collect(),
        channel: channel.into(),
        node_ids: Vec::new(),
    };
    let items = client.get_availability(request).await.unwrap().into_inner().items;
    assert_eq!(items.len(), skus.len(), "one item per requested SKU");
    for (item, sku) in items.iter().zip(skus) {
        assert_eq!(item.sku, *sku, "items in request order");
    }
    items
}

/// The position of `sku` at `node_id` as GetAvailability lists it (no channel filter).
async fn position(client: &mut InventoryClient, sku: &str, node_id: &str) -> v1::Position {
    let items = availability(client, &[sku], "").await;
    items[0]
        .nodes
        .iter()
        .find(|position| position.node_id == node_id)
        .cloned()
        .unwrap_or_else(|| panic!("no position for {sku} at {node_id}: {items:?}"))
}

async fn total_atp(client: &mut InventoryClient, sku: &str, channel: &str) -> i64 {
    availability(client, &[sku], channel).await[0].total_atp
}

fn reserve_request(key: &str, lines: Vec<v1::ReserveLine>, ttl_ms: u64) -> v1::ReserveRequest {
    v1::ReserveRequest {
        idempotency_key: key.into(),
        lines,
        ttl_ms,
        reference: String::new(),
        channel: String::new(),
    }
}

async fn reserve(client: &mut InventoryClient, request: v1::ReserveRequest) -> v1::ReserveResponse {
    client.reserve(request).await.unwrap().into_inner()
}

async fn get_reservation(client: &mut InventoryClient, id: &str) -> v1::Reservation {
    client
        .get_reservation(v1::GetReservationRequest { reservation_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

fn adjustment(sku: &str, node_id: &str, delta: i64, reason: &str) -> v1::StockAdjustment {
    v1::StockAdjustment { sku: sku.into(), node_id: node_id.into(), delta, reason: reason.into() }
}

/// Unwraps the error of `result`, checking its code and that its message contains `names`.
#[track_caller]
fn expect_error<T: std::fmt::Debug>(
    what: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    names: &str,
) -> tonic::Status {
    match result {
        Ok(response) => panic!("{what}: expected {code:?}, got OK {:?}", response.get_ref()),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: wrong code ({})", status.message());
            assert!(
                status.message().contains(names),
                "{what}: the message {:?} does not name {names:?}",
                status.message()
            );
            status
        }
    }
}

/// The next item of a watch; fails on an error, the end of the stream or a hang.
async fn next_change(stream: &mut tonic::Streaming<v1::AvailabilityChange>) -> v1::AvailabilityChange {
    tokio::time::timeout(WAIT_MAX, stream.message())
        .await
        .expect("no availability change arrived")
        .expect("the watch failed")
        .expect("the watch ended")
}

async fn watch(
    client: &mut InventoryClient,
    skus: &[&str],
    channel: &str,
    from_sequence: Option<u64>,
) -> tonic::Streaming<v1::AvailabilityChange> {
    let request = v1::WatchAvailabilityRequest {
        skus: skus.iter().map(|sku| sku.to_string()).collect(),
        channel: channel.into(),
        from_sequence,
    };
    client.watch_availability(request).await.unwrap().into_inner()
}

/// Reads `count` snapshot items, keyed by (sku, node_id); all must carry one sequence.
async fn snapshot(
    stream: &mut tonic::Streaming<v1::AvailabilityChange>,
    count: usize,
) -> BTreeMap<(String, String), v1::AvailabilityChange> {
    let mut items = BTreeMap::new();
    for _ in 0..count {
        let item = next_change(stream).await;
        assert!(item.snapshot, "expected a snapshot item, got {item:?}");
        items.insert((item.sku.clone(), item.node_id.clone()), item);
    }
    assert_eq!(items.len(), count, "one snapshot item per position");
    let sequences: Vec<u64> = items.values().map(|item| item.sequence).collect();
    assert!(sequences.windows(2).all(|pair| pair[0] == pair[1]), "one snapshot sequence: {sequences:?}");
    items
}

fn item_key(sku: &str, node_id: &str) -> (String, String) {
    (sku.to_string(), node_id.to_string())
}

// ----- 1. the reservation lifecycle ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_confirm_release_lifecycle() {
    // Goal: the happy path and the state machine of a reservation over gRPC. Method: two nodes,
    // stock with own and default safety stock, a multi-line hold, then confirm, extend, release
    // and their conflicts, checking ATP and the reservation after every step.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    let node_b = v1::Node { default_safety_stock: 2, ..node("NODE-B", 48.1, 11.6) };
    upsert(&mut client, vec![node("NODE-A", 52.5, 13.4), node_b]).await;
    let listed = client.list_nodes(v1::ListNodesRequest {}).await.unwrap().into_inner().nodes;
    let ids: Vec<&str> = listed.iter().map(|node| node.node_id.as_str()).collect();
    assert_eq!(ids, ["NODE-A", "NODE-B"]);
    assert_eq!(listed[1].default_safety_stock, 2);

    let own_safety = v1::StockEntry { safety_stock: Some(1), ..stock("SKU-1", "NODE-A", 10) };
    set_stock(&mut client, vec![own_safety, stock("SKU-1", "NODE-B", 5), stock("SKU-2", "NODE-A", 7)]).await;
    let initial = availability(&mut client, &["SKU-1", "SKU-2"], "").await;
    let expect = |node_id: &str, on_hand, reserved, safety_stock, atp| v1::Position {
        node_id: node_id.into(),
        on_hand,
        reserved,
        safety_stock,
        atp,
        sku: String::new(),
    };
    assert_eq!(initial[0].nodes, [expect("NODE-A", 10, 0, 1, 9), expect("NODE-B", 5, 0, 2, 3)]);
    assert_eq!(initial[0].total_atp, 12);
    assert_eq!(initial[1].nodes, [expect("NODE-A", 7, 0, 0, 7)]);
    assert_eq!(initial[1].total_atp, 7);

    let lines = vec![line("SKU-1", "NODE-A", 4), line("SKU-1", "NODE-B", 2), line("SKU-2", "NODE-A", 3)];
    let request = v1::ReserveRequest {
        reference: "cart-7".into(),
        channel: "web".into(),
        ..reserve_request("checkout-1", lines.clone(), 60_000)
    };
    let before_ms = now_ms();
    let reserved = reserve(&mut client, request).await;
    let after_ms = now_ms();
    assert_eq!(reserved.status, ReserveStatus::Reserved as i32);
    assert!(reserved.shortfalls.is_empty());
    assert!(reserved.reservation_id.starts_with("rsv-"), "{}", reserved.reservation_id);
    let expires_at_ms = ms(reserved.expires_at.as_ref().expect("a TTL hold has expires_at"));
    assert!(
        (before_ms + 60_000..=after_ms + 60_000).contains(&expires_at_ms),
        "expires_at {expires_at_ms} is not now + ttl ({before_ms}..={after_ms} + 60000)"
    );
    let id = reserved.reservation_id.clone();

    let held = availability(&mut client, &["SKU-1", "SKU-2"], "").await;
    assert_eq!(held[0].nodes, [expect("NODE-A", 10, 4, 1, 5), expect("NODE-B", 5, 2, 2, 1)]);
    assert_eq!(held[0].total_atp, 6);
    assert_eq!(held[1].nodes, [expect("NODE-A", 7, 3, 0, 4)]);
    assert_eq!(held[1].total_atp, 4);

    let reservation = get_reservation(&mut client, &id).await;
    assert_eq!(reservation.status, ReservationStatus::Held as i32);
    assert_eq!(reservation.reservation_id, id);
    assert_eq!(reservation.lines, lines);
    assert_eq!(reservation.reference, "cart-7");
    assert_eq!(reservation.channel, "web");
    assert_eq!(reservation.idempotency_key, "checkout-1");
    assert_eq!(reservation.expires_at.as_ref().map(ms), Some(expires_at_ms));
    assert!(reservation.created_at.is_some() && reservation.updated_at.is_some());

    let confirm = v1::ConfirmReservationRequest { reservation_id: id.clone(), reference: "order-42".into() };
    let confirmed = client.confirm_reservation(confirm.clone()).await.unwrap().into_inner();
    assert_eq!(confirmed.status, ReservationStatus::Confirmed as i32);
    assert_eq!(confirmed.expires_at, None, "confirming drops the TTL");
    assert_eq!(confirmed.reference, "order-42");
    assert_eq!(get_reservation(&mut client, &id).await, confirmed);
    assert_eq!(
        availability(&mut client, &["SKU-1", "SKU-2"], "").await,
        held,
        "a confirmed hold keeps its units"
    );
    // Confirming twice is fine.
    let again = client.confirm_reservation(confirm.clone()).await.unwrap().into_inner();
    assert_eq!(again.status, ReservationStatus::Confirmed as i32);

    let extend = v1::ExtendReservationRequest { reservation_id: id.clone(), ttl_ms: 60_000 };
    expect_error(
        "extend a confirmed reservation",
        client.extend_reservation(extend.clone()).await,
        Code::FailedPrecondition,
        "",
    );

    let release = v1::ReleaseReservationRequest { reservation_id: id.clone() };
    let released = client.release_reservation(release.clone()).await.unwrap().into_inner();
    assert_eq!(released.status, ReservationStatus::Released as i32);
    assert_eq!(availability(&mut client, &["SKU-1", "SKU-2"], "").await, initial, "units are back");

    let twice = client.release_reservation(release).await.unwrap().into_inner();
    assert_eq!(twice.status, ReservationStatus::Released as i32, "releasing twice is fine");
    assert_eq!(availability(&mut client, &["SKU-1", "SKU-2"], "").await, initial, "returned only once");
    assert_eq!(get_reservation(&mut client, &id).await.status, ReservationStatus::Released as i32);

    expect_error(
        "confirm a released reservation",
        client.confirm_reservation(confirm).await,
        Code::FailedPrecondition,
        "",
    );
    expect_error(
        "extend a released reservation",
        client.extend_reservation(extend).await,
        Code::FailedPrecondition,
        "",
    );
    assert_eq!(availability(&mut client, &["SKU-1", "SKU-2"], "").await, initial);

    // A hold without TTL has no expires_at.
    let forever =
        reserve(&mut client, reserve_request("checkout-2", vec![line("SKU-2", "NODE-A", 1)], 0)).await;
    assert_eq!(forever.status, ReserveStatus::Reserved as i32);
    assert_eq!(forever.expires_at, None);
    assert_eq!(get_reservation(&mut client, &forever.reservation_id).await.expires_at, None);
    daemon.stop().await;
}

// ----- 2. all or nothing --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_is_all_or_nothing() {
    // Goal: a request with one short line holds nothing and reports exactly that line.
    // Method: two lines, the second short; compare availability before and after, then retry
    // the same key once stock arrived (an INSUFFICIENT outcome is not remembered).
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0), node("NODE-B", 1.0, 1.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10), stock("SKU-2", "NODE-B", 3)]).await;
    let before = availability(&mut client, &["SKU-1", "SKU-2"], "").await;

    let request =
        reserve_request("all-or-nothing", vec![line("SKU-1", "NODE-A", 5), line("SKU-2", "NODE-B", 4)], 0);
    let response = reserve(&mut client, request.clone()).await;
    assert_eq!(response.status, ReserveStatus::Insufficient as i32);
    assert_eq!(
        response.shortfalls,
        [v1::Shortfall { sku: "SKU-2".into(), node_id: "NODE-B".into(), requested: 4, available: 3 }]
    );
    assert!(response.reservation_id.is_empty());
    assert_eq!(response.expires_at, None);
    assert_eq!(availability(&mut client, &["SKU-1", "SKU-2"], "").await, before, "nothing held");

    // A SKU without a position is short with available 0; every short line is listed.
    let both_short =
        reserve_request("both-short", vec![line("SKU-9", "NODE-A", 1), line("SKU-2", "NODE-B", 9)], 0);
    let response = reserve(&mut client, both_short).await;
    assert_eq!(response.status, ReserveStatus::Insufficient as i32);
    assert_eq!(response.shortfalls.len(), 2);
    assert!(response.shortfalls.contains(&v1::Shortfall {
        sku: "SKU-9".into(),
        node_id: "NODE-A".into(),
        requested: 1,
        available: 0
    }));
    assert_eq!(availability(&mut client, &["SKU-1", "SKU-2"], "").await, before, "nothing held");

    set_stock(&mut client, vec![stock("SKU-2", "NODE-B", 4)]).await;
    let retried = reserve(&mut client, request).await;
    assert_eq!(retried.status, ReserveStatus::Reserved as i32, "a retry re-evaluates");
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 5);
    assert_eq!(position(&mut client, "SKU-2", "NODE-B").await.atp, 0);
    daemon.stop().await;
}

// ----- 3. idempotency -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_and_adjust_are_idempotent() {
    // Goal: replays return the original outcome and apply once; a reused key with a different
    // request is ALREADY_EXISTS and changes nothing. Method: replay Reserve and AdjustStock,
    // then reuse their keys with altered requests, checking positions each time.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10)]).await;

    let request = reserve_request("key-1", vec![line("SKU-1", "NODE-A", 3)], 60_000);
    let first = reserve(&mut client, request.clone()).await;
    assert_eq!(first.status, ReserveStatus::Reserved as i32);
    let replay = reserve(&mut client, request.clone()).await;
    assert_eq!(replay, first, "a replay returns the original response");
    let held = position(&mut client, "SKU-1", "NODE-A").await;
    assert_eq!((held.reserved, held.atp), (3, 7), "held once");

    let different_qty = reserve_request("key-1", vec![line("SKU-1", "NODE-A", 4)], 60_000);
    expect_error("reused key, other qty", client.reserve(different_qty).await, Code::AlreadyExists, "key-1");
    let different_reference = v1::ReserveRequest { reference: "other".into(), ..request.clone() };
    expect_error(
        "reused key, other reference",
        client.reserve(different_reference).await,
        Code::AlreadyExists,
        "",
    );
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await, held, "nothing changed");
    let reservation = get_reservation(&mut client, &first.reservation_id).await;
    assert_eq!(reservation.status, ReservationStatus::Held as i32);
    assert_eq!(reservation.lines, [line("SKU-1", "NODE-A", 3)]);

    // AdjustStock by adjustment_id.
    let adjust = v1::AdjustStockRequest {
        adjustment_id: "adj-1".into(),
        entries: vec![
            adjustment("SKU-1", "NODE-A", 5, "receipt PO-1"),
            adjustment("SKU-2", "NODE-A", 2, "receipt PO-1"),
        ],
    };
    let adjusted = client.adjust_stock(adjust.clone()).await.unwrap().into_inner();
    let expected = [
        v1::Position {
            sku: "SKU-1".into(),
            node_id: "NODE-A".into(),
            on_hand: 15,
            reserved: 3,
            safety_stock: 0,
            atp: 12,
        },
        v1::Position {
            sku: "SKU-2".into(),
            node_id: "NODE-A".into(),
            on_hand: 2,
            reserved: 0,
            safety_stock: 0,
            atp: 2,
        },
    ];
    assert_eq!(adjusted.positions, expected);
    let replayed = client.adjust_stock(adjust.clone()).await.unwrap().into_inner();
    assert_eq!(replayed, adjusted, "a replay returns the original positions");
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.on_hand, 15, "applied once");
    assert_eq!(position(&mut client, "SKU-2", "NODE-A").await.on_hand, 2, "applied once");

    let other_delta = v1::AdjustStockRequest {
        adjustment_id: "adj-1".into(),
        entries: vec![
            adjustment("SKU-1", "NODE-A", 6, "receipt PO-1"),
            adjustment("SKU-2", "NODE-A", 2, "receipt PO-1"),
        ],
    };
    expect_error(
        "reused adjustment_id",
        client.adjust_stock(other_delta).await,
        Code::AlreadyExists,
        "adj-1",
    );
    let other_reason = v1::AdjustStockRequest {
        adjustment_id: "adj-1".into(),
        entries: vec![
            adjustment("SKU-1", "NODE-A", 5, "damaged"),
            adjustment("SKU-2", "NODE-A", 2, "receipt PO-1"),
        ],
    };
    expect_error(
        "reused adjustment_id, other reason",
        client.adjust_stock(other_reason).await,
        Code::AlreadyExists,
        "",
    );
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.on_hand, 15, "nothing changed");
    assert_eq!(position(&mut client, "SKU-2", "NODE-A").await.on_hand, 2, "nothing changed");

    // The replay answers as originally, also after the positions moved on.
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 40)]).await;
    let late_replay = client.adjust_stock(adjust).await.unwrap().into_inner();
    assert_eq!(late_replay, adjusted);
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.on_hand, 40, "the replay applied nothing");
    daemon.stop().await;
}

// ----- 4. invalid arguments -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_name_the_field_and_store_nothing() {
    // Goal: every INVALID_ARGUMENT case of API.md answers that code, names the field (and
    // line), and stores nothing; unknown reservations are NOT_FOUND; an adjustment below zero
    // on hand is FAILED_PRECONDITION. Method: a table of bad requests, with the whole
    // availability compared before and after each, then proofs that no key or id was taken.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0), node("NODE-B", 1.0, 1.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10), stock("SKU-2", "NODE-B", 10)]).await;
    const WATCHED: [&str; 5] = ["SKU-1", "SKU-2", "L0", "E0", "SKU-3"];
    let before = availability(&mut client, &WATCHED, "").await;
    let nodes_before = client.list_nodes(v1::ListNodesRequest {}).await.unwrap().into_inner();

    let good = line("SKU-1", "NODE-A", 1);
    let with_line = |key: &str, bad: v1::ReserveLine| reserve_request(key, vec![good.clone(), bad], 60_000);
    let many_lines: Vec<v1::ReserveLine> =
        (0..1_001).map(|index| line(&format!("L{index}"), "NODE-A", 1)).collect();
    let reserve_cases: Vec<(&str, v1::ReserveRequest, &str)> = vec![
        ("empty sku", with_line("bad-1", line("", "NODE-A", 1)), "lines[1].sku"),
        ("129-byte sku", with_line("bad-2", line(&"S".repeat(129), "NODE-A", 1)), "lines[1].sku"),
        ("sku with a space", with_line("bad-3", line("SKU 1", "NODE-A", 1)), "lines[1].sku"),
        ("non-ASCII sku", with_line("bad-4", line("SKÜ-1", "NODE-A", 1)), "lines[1].sku"),
        ("control char in sku", with_line("bad-5", line("SKU\t1", "NODE-A", 1)), "lines[1].sku"),
        ("DEL in sku", with_line("bad-6", line("SKU\u{7f}", "NODE-A", 1)), "lines[1].sku"),
        ("empty node_id", with_line("bad-7", line("SKU-2", "", 1)), "lines[1].node_id"),
        ("zero qty", with_line("bad-8", line("SKU-2", "NODE-B", 0)), "lines[1].qty"),
        ("negative qty", with_line("bad-9", line("SKU-2", "NODE-B", -3)), "lines[1].qty"),
        ("duplicate line", with_line("bad-10", line("SKU-1", "NODE-A", 2)), "lines[1]"),
        ("unknown node", with_line("bad-11", line("SKU-2", "NODE-Z", 1)), "lines[1].node_id"),
        ("no lines", reserve_request("bad-12", Vec::new(), 60_000), "lines"),
        ("1,001 lines", reserve_request("bad-13", many_lines, 60_000), "lines"),
        ("missing idempotency_key", reserve_request("", vec![good.clone()], 60_000), "idempotency_key"),
        (
            "idempotency_key with a space",
            reserve_request("a key", vec![good.clone()], 60_000),
            "idempotency_key",
        ),
        ("ttl_ms above the maximum", reserve_request("bad-14", vec![good.clone()], TTL_MS_MAX + 1), "ttl_ms"),
        (
            "qty above the quantity limit",
            with_line("bad-16", line("SKU-2", "NODE-B", 1_000_000_000_001)),
            "lines[1].qty",
        ),
        (
            "reference over 1,024 bytes",
            v1::ReserveRequest {
                reference: "r".repeat(1_025),
                ..reserve_request("bad-17", vec![good.clone()], 0)
            },
            "reference",
        ),
        (
            "bad channel",
            v1::ReserveRequest { channel: "w eb".into(), ..reserve_request("bad-15", vec![good.clone()], 0) },
            "channel",
        ),
    ];
    for (what, request, field) in reserve_cases {
        expect_error(what, client.reserve(request).await, Code::InvalidArgument, field);
        assert_eq!(availability(&mut client, &WATCHED, "").await, before, "{what}: nothing stored");
    }
    // The maximum TTL itself is accepted (checked below, after the NOT_FOUND checks).

    let set_cases: Vec<(&str, Vec<v1::StockEntry>, &str)> = vec![
        (
            "negative on_hand",
            vec![stock("SKU-1", "NODE-A", 99), stock("SKU-2", "NODE-B", -1)],
            "entries[1].on_hand",
        ),
        (
            "negative safety_stock",
            vec![
                stock("SKU-1", "NODE-A", 99),
                v1::StockEntry { safety_stock: Some(-1), ..stock("SKU-2", "NODE-B", 1) },
            ],
            "entries[1].safety_stock",
        ),
        (
            "unknown node",
            vec![stock("SKU-1", "NODE-A", 99), stock("SKU-2", "NODE-Z", 1)],
            "entries[1].node_id",
        ),
        ("bad sku", vec![stock("SKU-1", "NODE-A", 99), stock("SKU 2", "NODE-B", 1)], "entries[1].sku"),
        ("duplicate entry", vec![stock("SKU-1", "NODE-A", 99), stock("SKU-1", "NODE-A", 98)], "entries[1]"),
        ("no entries", Vec::new(), "entries"),
        (
            "10,001 entries",
            (0..10_001).map(|index| stock(&format!("E{index}"), "NODE-A", 1)).collect(),
            "entries",
        ),
    ];
    for (what, entries, field) in set_cases {
        let result = client.set_stock(v1::SetStockRequest { entries }).await;
        expect_error(&format!("SetStock {what}"), result, Code::InvalidArgument, field);
        assert_eq!(availability(&mut client, &WATCHED, "").await, before, "SetStock {what}: nothing stored");
    }

    let adjust_cases: Vec<(&str, &str, Vec<v1::StockAdjustment>, &str)> = vec![
        ("zero delta", "adj-bad-1", vec![adjustment("SKU-1", "NODE-A", 0, "x")], "entries[0].delta"),
        (
            "zero delta on line 1",
            "adj-bad-2",
            vec![adjustment("SKU-1", "NODE-A", 1, "x"), adjustment("SKU-2", "NODE-B", 0, "x")],
            "entries[1].delta",
        ),
        ("missing adjustment_id", "", vec![adjustment("SKU-1", "NODE-A", 1, "x")], "adjustment_id"),
        ("unknown node", "adj-bad-3", vec![adjustment("SKU-1", "NODE-Z", 1, "x")], "entries[0].node_id"),
        ("no entries", "adj-bad-4", Vec::new(), "entries"),
        (
            "duplicate entry",
            "adj-bad-5",
            vec![adjustment("SKU-1", "NODE-A", 1, "x"), adjustment("SKU-1", "NODE-A", 2, "x")],
            "entries[1]",
        ),
        (
            "control char in reason",
            "adj-bad-6",
            vec![adjustment("SKU-1", "NODE-A", 1, "a\nb")],
            "entries[0].reason",
        ),
        (
            "reason over 1,024 bytes",
            "adj-bad-7",
            vec![adjustment("SKU-1", "NODE-A", 1, &"r".repeat(1_025))],
            "entries[0].reason",
        ),
    ];
    for (what, adjustment_id, entries, field) in adjust_cases {
        let result = client
            .adjust_stock(v1::AdjustStockRequest { adjustment_id: adjustment_id.into(), entries })
            .await;
        expect_error(&format!("AdjustStock {what}"), result, Code::InvalidArgument, field);
        assert_eq!(
            availability(&mut client, &WATCHED, "").await,
            before,
            "AdjustStock {what}: nothing stored"
        );
    }

    // An adjustment that would take on_hand below zero is rejected whole.
    let below_zero = v1::AdjustStockRequest {
        adjustment_id: "adj-below-zero".into(),
        entries: vec![
            adjustment("SKU-1", "NODE-A", 5, "receipt"),
            adjustment("SKU-2", "NODE-B", -11, "damaged"),
        ],
    };
    expect_error(
        "AdjustStock below zero",
        client.adjust_stock(below_zero).await,
        Code::FailedPrecondition,
        "entries[1]",
    );
    assert_eq!(
        availability(&mut client, &WATCHED, "").await,
        before,
        "AdjustStock below zero: nothing changed"
    );

    let bad_node = |lat: f64, lon: f64| v1::Node {
        location: Some(v1::Location { lat, lon }),
        ..node("NODE-C", 0.0, 0.0)
    };
    let node_cases: Vec<(&str, Vec<v1::Node>, &str)> = vec![
        ("latitude above 90", vec![node("NODE-C", 1.0, 1.0), bad_node(90.5, 0.0)], "nodes[1].location.lat"),
        ("latitude below -90", vec![bad_node(-91.0, 0.0)], "nodes[0].location.lat"),
        ("longitude above 180", vec![bad_node(0.0, 181.0)], "nodes[0].location.lon"),
        ("duplicate node_id", vec![node("NODE-C", 1.0, 1.0), node("NODE-C", 2.0, 2.0)], "nodes[1].node_id"),
        ("bad node_id", vec![node("NODE C", 1.0, 1.0)], "nodes[0].node_id"),
        (
            "negative capacity",
            vec![v1::Node { daily_capacity: -1, ..node("NODE-C", 1.0, 1.0) }],
            "nodes[0].daily_capacity",
        ),
        ("no nodes", Vec::new(), "nodes"),
    ];
    for (what, nodes, field) in node_cases {
        let result = client.upsert_nodes(v1::UpsertNodesRequest { nodes }).await;
        expect_error(&format!("UpsertNodes {what}"), result, Code::InvalidArgument, field);
        let nodes_after = client.list_nodes(v1::ListNodesRequest {}).await.unwrap().into_inner();
        assert_eq!(nodes_after, nodes_before, "UpsertNodes {what}: nothing stored");
    }

    // GetAvailability checks its ids too.
    let bad_query =
        v1::GetAvailabilityRequest { skus: vec!["SKU-1".into(), "SKU 2".into()], ..Default::default() };
    expect_error(
        "GetAvailability bad sku",
        client.get_availability(bad_query).await,
        Code::InvalidArgument,
        "skus[1]",
    );

    // Reservation ids: malformed is INVALID_ARGUMENT, well-formed but unknown is NOT_FOUND.
    for raw in ["", "abc", "rsv-", "rsv-x1", "999999"] {
        let id = raw.to_string();
        let get = client.get_reservation(v1::GetReservationRequest { reservation_id: id.clone() }).await;
        expect_error(&format!("Get {raw:?}"), get, Code::InvalidArgument, "reservation_id");
        let confirm = v1::ConfirmReservationRequest { reservation_id: id.clone(), reference: String::new() };
        let confirm = client.confirm_reservation(confirm).await;
        expect_error(&format!("Confirm {raw:?}"), confirm, Code::InvalidArgument, "reservation_id");
        let release =
            client.release_reservation(v1::ReleaseReservationRequest { reservation_id: id.clone() }).await;
        expect_error(&format!("Release {raw:?}"), release, Code::InvalidArgument, "reservation_id");
        let extend = v1::ExtendReservationRequest { reservation_id: id, ttl_ms: 1_000 };
        let extend = client.extend_reservation(extend).await;
        expect_error(&format!("Extend {raw:?}"), extend, Code::InvalidArgument, "reservation_id");
    }
    // No reservation was created by any request above: the first ids are unknown.
    for raw in ["rsv-999999", "rsv-1", "rsv-2", "rsv-3"] {
        let id = raw.to_string();
        let get = client.get_reservation(v1::GetReservationRequest { reservation_id: id.clone() }).await;
        expect_error(&format!("Get {raw}"), get, Code::NotFound, raw);
        let confirm = v1::ConfirmReservationRequest { reservation_id: id.clone(), reference: String::new() };
        expect_error(
            &format!("Confirm {raw}"),
            client.confirm_reservation(confirm).await,
            Code::NotFound,
            raw,
        );
        let release =
            client.release_reservation(v1::ReleaseReservationRequest { reservation_id: id.clone() }).await;
        expect_error(&format!("Release {raw}"), release, Code::NotFound, raw);
        let extend = v1::ExtendReservationRequest { reservation_id: id, ttl_ms: 1_000 };
        expect_error(&format!("Extend {raw}"), client.extend_reservation(extend).await, Code::NotFound, raw);
    }

    // Nothing remembered either: the keys of rejected requests are still free.
    let reused =
        reserve(&mut client, reserve_request("bad-11", vec![line("SKU-2", "NODE-B", 2)], TTL_MS_MAX)).await;
    assert_eq!(reused.status, ReserveStatus::Reserved as i32, "a rejected request's key is not taken");
    let after = position(&mut client, "SKU-2", "NODE-B").await;
    assert_eq!((after.reserved, after.atp), (2, 8));
    let adjusted = v1::AdjustStockRequest {
        adjustment_id: "adj-below-zero".into(),
        entries: vec![adjustment("SKU-1", "NODE-A", 1, "receipt")],
    };
    let adjusted = client.adjust_stock(adjusted).await.unwrap().into_inner();
    assert_eq!(adjusted.positions[0].on_hand, 11, "a rejected adjustment_id is not taken");
    // Extend with ttl_ms 0 or above the maximum is INVALID_ARGUMENT, and changes nothing.
    for ttl_ms in [0, TTL_MS_MAX + 1] {
        let extend = v1::ExtendReservationRequest { reservation_id: reused.reservation_id.clone(), ttl_ms };
        expect_error(
            &format!("Extend ttl_ms {ttl_ms}"),
            client.extend_reservation(extend).await,
            Code::InvalidArgument,
            "ttl_ms",
        );
    }
    let kept = get_reservation(&mut client, &reused.reservation_id).await;
    assert_eq!(kept.expires_at, reused.expires_at);
    // The boundary: a 128-byte SKU of printable ASCII is accepted.
    let longest = "~".repeat(128);
    set_stock(&mut client, vec![stock(&longest, "NODE-A", 1)]).await;
    let held =
        reserve(&mut client, reserve_request(&"k".repeat(128), vec![line(&longest, "NODE-A", 1)], 0)).await;
    assert_eq!(held.status, ReserveStatus::Reserved as i32);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_stock_keeps_reservations_and_safety_stock() {
    // Goal: SetStock is an absolute on-hand snapshot that keeps open holds and the position's
    // safety stock when absent; node defaults apply to positions without their own; node_ids
    // filters GetAvailability. Method: hold, shrink on_hand below the hold, release, change
    // the node's default safety stock.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0), node("NODE-B", 1.0, 1.0)]).await;
    let own_safety = v1::StockEntry { safety_stock: Some(2), ..stock("SKU-1", "NODE-A", 10) };
    set_stock(&mut client, vec![own_safety, stock("SKU-1", "NODE-B", 10)]).await;
    let held = reserve(&mut client, reserve_request("s-1", vec![line("SKU-1", "NODE-A", 5)], 0)).await;
    assert_eq!(held.status, ReserveStatus::Reserved as i32);

    // Absent safety_stock keeps the position's own; on_hand below the hold gives ATP 0.
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 4)]).await;
    let shrunk = position(&mut client, "SKU-1", "NODE-A").await;
    assert_eq!((shrunk.on_hand, shrunk.reserved, shrunk.safety_stock, shrunk.atp), (4, 5, 2, 0));
    assert_eq!(total_atp(&mut client, "SKU-1", "").await, 10);
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 12)]).await;
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 5, "12 - 5 held - 2 safety");
    let release = v1::ReleaseReservationRequest { reservation_id: held.reservation_id };
    client.release_reservation(release).await.unwrap();
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 10);

    // A node's default safety stock applies where the position has none of its own.
    upsert(&mut client, vec![v1::Node { default_safety_stock: 3, ..node("NODE-B", 1.0, 1.0) }]).await;
    let b = position(&mut client, "SKU-1", "NODE-B").await;
    assert_eq!((b.safety_stock, b.atp), (3, 7));
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.safety_stock, 2, "its own wins");

    // node_ids: only those nodes are listed and counted.
    let request = v1::GetAvailabilityRequest {
        skus: vec!["SKU-1".into(), "SKU-NONE".into()],
        channel: String::new(),
        node_ids: vec!["NODE-B".into()],
    };
    let items = client.get_availability(request).await.unwrap().into_inner().items;
    assert_eq!(items[0].total_atp, 7);
    assert_eq!(
        items[0].nodes.iter().map(|position| position.node_id.as_str()).collect::<Vec<_>>(),
        ["NODE-B"]
    );
    assert_eq!(
        (items[1].sku.as_str(), items[1].total_atp, items[1].nodes.len()),
        ("SKU-NONE", 0, 0),
        "unknown SKU"
    );
    daemon.stop().await;
}

// ----- 5. message size ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_resource_exhausted() {
    // Goal: a message above limits.message_bytes_max is RESOURCE_EXHAUSTED (API.md) and stores
    // nothing. Method: a 64 KiB limit and a SetStock of about 140 KB (1,000 entries with
    // 128-byte SKUs), well within the entry count limit.
    let daemon =
        Daemon::start_with(|config| config.limits.message_bytes_max = 64 * 1024, Arc::new(SystemClock)).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    let sku = |index: usize| format!("{index:0>128}");
    let entries: Vec<v1::StockEntry> = (0..1_000).map(|index| stock(&sku(index), "NODE-A", 5)).collect();
    let result = client.set_stock(v1::SetStockRequest { entries }).await;
    expect_error("SetStock of ~140 KB with a 64 KiB limit", result, Code::ResourceExhausted, "");
    let first = sku(0);
    let items = availability(&mut client, &[first.as_str()], "").await;
    assert_eq!((items[0].total_atp, items[0].nodes.len()), (0, 0), "nothing stored");
    // Under the limit is fine.
    let small: Vec<v1::StockEntry> = (0..10).map(|index| stock(&sku(index), "NODE-A", 5)).collect();
    set_stock(&mut client, small).await;
    assert_eq!(total_atp(&mut client, &first, "").await, 5);
    daemon.stop().await;
}

// ----- 6. channels and disabled nodes -------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_eligibility_and_disabled_nodes() {
    // Goal: only nodes serving a channel count for it, and a disabled node promises nothing.
    // Method: node A serves only "web", node B every channel; query and reserve per channel,
    // then disable B and enable it again.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![restricted_node("NODE-A", &["web"]), node("NODE-B", 1.0, 1.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10), stock("SKU-1", "NODE-B", 5)]).await;

    assert_eq!(total_atp(&mut client, "SKU-1", "").await, 15);
    let web = availability(&mut client, &["SKU-1"], "web").await;
    assert_eq!(web[0].total_atp, 15, "web counts both nodes");
    assert_eq!(web[0].nodes.len(), 2);
    let pos = availability(&mut client, &["SKU-1"], "pos").await;
    assert_eq!(pos[0].total_atp, 5, "pos counts only NODE-B");
    assert!(pos[0].nodes.iter().any(|position| position.node_id == "NODE-B" && position.atp == 5));
    assert!(
        pos[0].nodes.iter().all(|position| position.node_id != "NODE-A" || position.atp == 0),
        "NODE-A promises nothing to pos: {pos:?}"
    );

    let at_a = |key: &str, channel: &str| v1::ReserveRequest {
        channel: channel.into(),
        ..reserve_request(key, vec![line("SKU-1", "NODE-A", 1)], 0)
    };
    let refused = reserve(&mut client, at_a("pos-at-a", "pos")).await;
    assert_eq!(refused.status, ReserveStatus::Insufficient as i32);
    assert_eq!(
        refused.shortfalls,
        [v1::Shortfall { sku: "SKU-1".into(), node_id: "NODE-A".into(), requested: 1, available: 0 }]
    );
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.reserved, 0, "nothing held");
    assert_eq!(reserve(&mut client, at_a("web-at-a", "web")).await.status, ReserveStatus::Reserved as i32);
    assert_eq!(reserve(&mut client, at_a("any-at-a", "")).await.status, ReserveStatus::Reserved as i32);
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 8);

    // Disable NODE-B: listed with ATP 0, excluded from total_atp, refuses holds.
    upsert(&mut client, vec![v1::Node { enabled: false, ..node("NODE-B", 1.0, 1.0) }]).await;
    let disabled = position(&mut client, "SKU-1", "NODE-B").await;
    assert_eq!((disabled.on_hand, disabled.atp), (5, 0));
    assert_eq!(total_atp(&mut client, "SKU-1", "").await, 8);
    assert_eq!(total_atp(&mut client, "SKU-1", "pos").await, 0);
    let at_b = reserve_request("at-disabled-b", vec![line("SKU-1", "NODE-B", 1)], 0);
    let refused = reserve(&mut client, at_b.clone()).await;
    assert_eq!(refused.status, ReserveStatus::Insufficient as i32);
    assert_eq!(refused.shortfalls[0].available, 0);

    upsert(&mut client, vec![node("NODE-B", 1.0, 1.0)]).await;
    assert_eq!(total_atp(&mut client, "SKU-1", "").await, 13);
    assert_eq!(reserve(&mut client, at_b).await.status, ReserveStatus::Reserved as i32);
    daemon.stop().await;
}

// ----- 7. expiry ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_end_to_end_with_real_time() {
    // Goal: a held reservation expires and its units come back within a second of expires_at;
    // an extended one stays held past its original expiry. Method: real TTLs of 300 ms and
    // 2 s (the latter extended at once to 60 s); poll GetReservation up to a deadline.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10)]).await;

    let short = reserve(&mut client, reserve_request("short", vec![line("SKU-1", "NODE-A", 3)], 300)).await;
    let long = reserve(&mut client, reserve_request("long", vec![line("SKU-1", "NODE-A", 2)], 2_000)).await;
    assert_eq!(short.status, ReserveStatus::Reserved as i32);
    assert_eq!(long.status, ReserveStatus::Reserved as i32);
    let long_original_ms = ms(long.expires_at.as_ref().unwrap());
    let extend = v1::ExtendReservationRequest { reservation_id: long.reservation_id.clone(), ttl_ms: 60_000 };
    let extended = client.extend_reservation(extend).await.unwrap().into_inner();
    assert_eq!(extended.status, ReservationStatus::Held as i32);
    let long_extended_ms = ms(extended.expires_at.as_ref().unwrap());
    assert!(long_extended_ms > long_original_ms, "extend pushes expires_at forward");
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 5);

    let short_expires_ms = ms(short.expires_at.as_ref().unwrap());
    let deadline_ms = short_expires_ms + EXPIRY_GRACE_MS;
    loop {
        let reservation = get_reservation(&mut client, &short.reservation_id).await;
        if reservation.status == ReservationStatus::Expired as i32 {
            break;
        }
        assert_eq!(reservation.status, ReservationStatus::Held as i32);
        assert!(now_ms() <= deadline_ms, "still HELD {EXPIRY_GRACE_MS} ms after expires_at");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = position(&mut client, "SKU-1", "NODE-A").await;
    assert_eq!((after.reserved, after.atp), (2, 8), "the expired units are back; the extended hold stays");

    let expired_extend =
        v1::ExtendReservationRequest { reservation_id: short.reservation_id.clone(), ttl_ms: 1_000 };
    expect_error(
        "extend an expired reservation",
        client.extend_reservation(expired_extend).await,
        Code::FailedPrecondition,
        "",
    );
    let confirm = v1::ConfirmReservationRequest {
        reservation_id: short.reservation_id.clone(),
        reference: String::new(),
    };
    expect_error(
        "confirm an expired reservation",
        client.confirm_reservation(confirm).await,
        Code::FailedPrecondition,
        "",
    );
    let release = v1::ReleaseReservationRequest { reservation_id: short.reservation_id.clone() };
    let released = client.release_reservation(release).await.unwrap().into_inner();
    assert_eq!(
        released.status,
        ReservationStatus::Expired as i32,
        "releasing an expired one returns it as it is"
    );
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 8, "no units returned twice");

    // Past the long one's original expiry (plus the grace), it is still held.
    let wait_until_ms = long_original_ms + EXPIRY_GRACE_MS;
    tokio::time::sleep(Duration::from_millis(wait_until_ms.saturating_sub(now_ms()))).await;
    let still = get_reservation(&mut client, &long.reservation_id).await;
    assert_eq!(
        still.status,
        ReservationStatus::Held as i32,
        "the extended hold did not expire at the old time"
    );
    assert_eq!(still.expires_at.as_ref().map(ms), Some(long_extended_ms));
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.reserved, 2);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_with_manual_clock() {
    // Goal: expiry happens exactly at expires_at and not before, extend moves it, and the
    // sweep returns the units. Method: a daemon on a ManualClock; advance it to the
    // millisecond around each deadline and run the index's expiry sweep directly.
    let start_ms = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(start_ms));
    let daemon = Daemon::start_with(|_| {}, clock.clone()).await;
    let mut client = daemon.client.clone();
    let index = daemon.running.core.index.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10)]).await;

    let held =
        reserve(&mut client, reserve_request("manual", vec![line("SKU-1", "NODE-A", 4)], 10_000)).await;
    assert_eq!(held.expires_at.as_ref().map(ms), Some(start_ms + 10_000));
    let id = held.reservation_id;
    let status = |reservation: v1::Reservation| ReservationStatus::try_from(reservation.status).unwrap();

    clock.advance_ms(9_999);
    index.expire_due(1_000);
    assert_eq!(
        status(get_reservation(&mut client, &id).await),
        ReservationStatus::Held,
        "1 ms before expiry"
    );

    let extend = v1::ExtendReservationRequest { reservation_id: id.clone(), ttl_ms: 5_000 };
    let extended = client.extend_reservation(extend).await.unwrap().into_inner();
    let new_expiry_ms = start_ms + 9_999 + 5_000;
    assert_eq!(extended.expires_at.as_ref().map(ms), Some(new_expiry_ms), "now + ttl_ms");

    clock.advance_ms(1);
    index.expire_due(1_000);
    assert_eq!(
        status(get_reservation(&mut client, &id).await),
        ReservationStatus::Held,
        "the old expiry passed"
    );
    assert_eq!(position(&mut client, "SKU-1", "NODE-A").await.atp, 6);

    clock.set_ms(new_expiry_ms - 1);
    index.expire_due(1_000);
    assert_eq!(status(get_reservation(&mut client, &id).await), ReservationStatus::Held);
    clock.set_ms(new_expiry_ms);
    index.expire_due(1_000);
    assert_eq!(
        status(get_reservation(&mut client, &id).await),
        ReservationStatus::Expired,
        "due at expires_at"
    );
    let after = position(&mut client, "SKU-1", "NODE-A").await;
    assert_eq!((after.reserved, after.atp), (0, 10));
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_expiry_cannot_be_confirmed_or_extended_before_the_sweep() {
    // Goal: once expires_at has passed, a reservation is expired for Confirm and Extend
    // (FAILED_PRECONDITION, API.md), also in the moments before the expiry sweep has run.
    // Method: a ManualClock and the slowest allowed sweep (500 ms); a sentinel reservation
    // shows when a sweep has just run, then the clock moves past the targets' expiry and
    // Confirm and Extend are called at once, long before the next sweep.
    let start_ms = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(start_ms));
    let daemon =
        Daemon::start_with(|config| config.server.expiry_sweep_interval_ms = 500, clock.clone()).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10)]).await;
    let sentinel =
        reserve(&mut client, reserve_request("sentinel", vec![line("SKU-1", "NODE-A", 1)], 1_000)).await;
    let to_confirm =
        reserve(&mut client, reserve_request("late-confirm", vec![line("SKU-1", "NODE-A", 2)], 2_000)).await;
    let to_extend =
        reserve(&mut client, reserve_request("late-extend", vec![line("SKU-1", "NODE-A", 3)], 2_000)).await;

    clock.set_ms(start_ms + 1_000);
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while get_reservation(&mut client, &sentinel.reservation_id).await.status
        != ReservationStatus::Expired as i32
    {
        assert!(tokio::time::Instant::now() < deadline, "the sweep never expired the sentinel");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A sweep has just run; the next is about 500 ms away.
    clock.set_ms(start_ms + 2_500);
    let confirm = v1::ConfirmReservationRequest {
        reservation_id: to_confirm.reservation_id.clone(),
        reference: String::new(),
    };
    let confirmed = client.confirm_reservation(confirm).await;
    let extend =
        v1::ExtendReservationRequest { reservation_id: to_extend.reservation_id.clone(), ttl_ms: 60_000 };
    let extended = client.extend_reservation(extend).await;
    let codes = (
        confirmed.as_ref().map_err(tonic::Status::code).err(),
        extended.as_ref().map_err(tonic::Status::code).err(),
    );
    assert_eq!(
        codes,
        (Some(Code::FailedPrecondition), Some(Code::FailedPrecondition)),
        "Confirm and Extend 500 ms past expires_at (before the sweep): {confirmed:?} / {extended:?}"
    );
    daemon.stop().await;
}

// ----- 8. the availability feed -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_snapshot_live_and_resume() {
    // Goal: a watch starts with the current values, then live changes in increasing sequence;
    // a resume from S+1 replays exactly the changes after S, gap-free, then goes live.
    // Method: three positions, a watch, a Reserve; cancel, three more changes, watch again
    // from S+1, then one more live change.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0), node("NODE-B", 1.0, 1.0)]).await;
    set_stock(
        &mut client,
        vec![stock("SKU-1", "NODE-A", 10), stock("SKU-1", "NODE-B", 5), stock("SKU-2", "NODE-A", 3)],
    )
    .await;

    let mut stream = watch(&mut client, &[], "", None).await;
    let items = snapshot(&mut stream, 3).await;
    let values: Vec<(i64, i64)> = items.values().map(|item| (item.atp, item.total_atp)).collect();
    assert_eq!(values, [(10, 15), (5, 15), (3, 3)], "SKU-1@A, SKU-1@B, SKU-2@A");
    let snapshot_sequence = items.values().next().unwrap().sequence;

    let first = reserve(&mut client, reserve_request("w-1", vec![line("SKU-1", "NODE-A", 4)], 0)).await;
    let live = next_change(&mut stream).await;
    assert!(!live.snapshot);
    assert_eq!(
        (live.sku.as_str(), live.node_id.as_str(), live.atp, live.total_atp),
        ("SKU-1", "NODE-A", 6, 11)
    );
    assert!(live.sequence > snapshot_sequence, "{} after {snapshot_sequence}", live.sequence);
    let s = live.sequence;
    drop(stream);

    reserve(&mut client, reserve_request("w-2", vec![line("SKU-2", "NODE-A", 1)], 0)).await;
    let adjust = v1::AdjustStockRequest {
        adjustment_id: "w-adj".into(),
        entries: vec![adjustment("SKU-1", "NODE-B", 2, "receipt")],
    };
    client.adjust_stock(adjust).await.unwrap();
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 20)]).await;

    let mut resumed = watch(&mut client, &[], "", Some(s + 1)).await;
    let expected = [("SKU-2", "NODE-A", 2, 2), ("SKU-1", "NODE-B", 7, 13), ("SKU-1", "NODE-A", 16, 23)];
    for (offset, (sku, node_id, atp, total)) in expected.into_iter().enumerate() {
        let item = next_change(&mut resumed).await;
        assert!(!item.snapshot, "a resume has no snapshot: {item:?}");
        assert_eq!(item.sequence, s + 1 + offset as u64, "gap-free, in order: {item:?}");
        assert_eq!(
            (item.sku.as_str(), item.node_id.as_str(), item.atp, item.total_atp),
            (sku, node_id, atp, total)
        );
    }
    let release = v1::ReleaseReservationRequest { reservation_id: first.reservation_id };
    client.release_reservation(release).await.unwrap();
    let item = next_change(&mut resumed).await;
    assert_eq!(item.sequence, s + 4, "the next live change follows the replay without a gap or repeat");
    assert_eq!(
        (item.sku.as_str(), item.node_id.as_str(), item.atp, item.total_atp),
        ("SKU-1", "NODE-A", 20, 27)
    );
    drop(resumed);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sku_filter() {
    // Goal: a watch for some SKUs yields only those, live and on resume. Method: three SKUs,
    // a watch for SKU-2, changes to all three; then a resume from sequence 1.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(
        &mut client,
        vec![stock("SKU-1", "NODE-A", 10), stock("SKU-2", "NODE-A", 10), stock("SKU-3", "NODE-A", 10)],
    )
    .await;

    let mut stream = watch(&mut client, &["SKU-2"], "", None).await;
    let items = snapshot(&mut stream, 1).await;
    assert_eq!(items.keys().collect::<Vec<_>>(), [&item_key("SKU-2", "NODE-A")]);
    reserve(&mut client, reserve_request("f-1", vec![line("SKU-1", "NODE-A", 1)], 0)).await;
    let adjust = v1::AdjustStockRequest {
        adjustment_id: "f-adj".into(),
        entries: vec![adjustment("SKU-3", "NODE-A", 1, "x")],
    };
    client.adjust_stock(adjust).await.unwrap();
    reserve(&mut client, reserve_request("f-2", vec![line("SKU-2", "NODE-A", 2)], 0)).await;
    let item = next_change(&mut stream).await;
    assert_eq!((item.sku.as_str(), item.atp, item.total_atp, item.snapshot), ("SKU-2", 8, 8, false));
    drop(stream);

    let mut resumed = watch(&mut client, &["SKU-2"], "", Some(1)).await;
    let first = next_change(&mut resumed).await;
    let second = next_change(&mut resumed).await;
    assert_eq!((first.sku.as_str(), first.atp), ("SKU-2", 10), "the SetStock change");
    assert_eq!((second.sku.as_str(), second.atp), ("SKU-2", 8), "the Reserve change");
    assert!(first.sequence < second.sequence);
    assert_eq!(second.sequence, item.sequence);
    drop(resumed);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_channel_filter() {
    // Goal: with a channel, a watch skips nodes that do not serve it and total_atp counts only
    // those that do. Method: NODE-A serves "web" only, NODE-B every channel; watch "pos" and
    // "web", change stock at A then at B, then disable B.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![restricted_node("NODE-A", &["web"]), node("NODE-B", 1.0, 1.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10), stock("SKU-1", "NODE-B", 5)]).await;

    let mut pos = watch(&mut client, &[], "pos", None).await;
    let mut web = watch(&mut client, &[], "web", None).await;
    let pos_items = snapshot(&mut pos, 1).await;
    let pos_b = &pos_items[&item_key("SKU-1", "NODE-B")];
    assert_eq!((pos_b.atp, pos_b.total_atp), (5, 5), "pos: only NODE-B");
    let web_items = snapshot(&mut web, 2).await;
    assert_eq!(web_items[&item_key("SKU-1", "NODE-A")].total_atp, 15);
    assert_eq!(web_items[&item_key("SKU-1", "NODE-B")].total_atp, 15);

    reserve(&mut client, reserve_request("c-1", vec![line("SKU-1", "NODE-A", 2)], 0)).await;
    reserve(&mut client, reserve_request("c-2", vec![line("SKU-1", "NODE-B", 1)], 0)).await;
    let web_a = next_change(&mut web).await;
    assert_eq!((web_a.node_id.as_str(), web_a.atp, web_a.total_atp), ("NODE-A", 8, 13));
    let web_b = next_change(&mut web).await;
    assert_eq!((web_b.node_id.as_str(), web_b.atp, web_b.total_atp), ("NODE-B", 4, 12));
    let pos_b = next_change(&mut pos).await;
    assert_eq!(
        (pos_b.node_id.as_str(), pos_b.atp, pos_b.total_atp),
        ("NODE-B", 4, 4),
        "the change at NODE-A was skipped; total_atp counts NODE-B only"
    );
    assert!(pos_b.sequence > web_a.sequence);

    // Disabling NODE-B is a change too: its ATP drops to 0.
    upsert(&mut client, vec![v1::Node { enabled: false, ..node("NODE-B", 1.0, 1.0) }]).await;
    let pos_disabled = next_change(&mut pos).await;
    assert_eq!((pos_disabled.node_id.as_str(), pos_disabled.atp, pos_disabled.total_atp), ("NODE-B", 0, 0));
    let web_disabled = next_change(&mut web).await;
    assert_eq!((web_disabled.node_id.as_str(), web_disabled.atp, web_disabled.total_atp), ("NODE-B", 0, 8));
    drop(pos);
    drop(web);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_watch_frees_its_slot() {
    // Goal: a watch the client cancelled stops counting against server.watchers_max, also
    // when its SKU never changes again. Method: watchers_max = 1; watch a quiet SKU, cancel,
    // change another SKU, then retry a new watch until a generous deadline.
    let daemon = Daemon::start_with(|config| config.server.watchers_max = 1, Arc::new(SystemClock)).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("QUIET", "NODE-A", 1), stock("BUSY", "NODE-A", 100)]).await;

    let mut first = watch(&mut client, &["QUIET"], "", None).await;
    snapshot(&mut first, 1).await;
    let request = v1::WatchAvailabilityRequest {
        skus: vec!["QUIET".into()],
        channel: String::new(),
        from_sequence: None,
    };
    expect_error(
        "a second watcher over the limit",
        client.watch_availability(request.clone()).await,
        Code::ResourceExhausted,
        "",
    );
    drop(first);
    reserve(&mut client, reserve_request("busy-1", vec![line("BUSY", "NODE-A", 1)], 0)).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut second = loop {
        match client.watch_availability(request.clone()).await {
            Ok(response) => break response.into_inner(),
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cancelled watch still holds its slot 5 s later (watchers = {})",
                    daemon.running.core.feed.watchers()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    };
    snapshot(&mut second, 1).await;
    drop(second);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_trimmed_history_is_out_of_range() {
    // Goal: a resume from a sequence older than the retained history is OUT_OF_RANGE, while a
    // resume inside it works. Method: store.change_retention = 8 and 40 changes.
    let daemon = Daemon::start_with(|config| config.store.change_retention = 8, Arc::new(SystemClock)).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    for on_hand in 1..=40 {
        set_stock(&mut client, vec![stock("SKU-1", "NODE-A", on_hand)]).await;
    }
    let request =
        v1::WatchAvailabilityRequest { skus: Vec::new(), channel: String::new(), from_sequence: Some(1) };
    expect_error("resume from sequence 1", client.watch_availability(request).await, Code::OutOfRange, "");
    let mut recent = watch(&mut client, &[], "", Some(38)).await;
    for sequence in 38..=40 {
        let item = next_change(&mut recent).await;
        assert_eq!((item.sequence, item.atp), (sequence, sequence as i64));
    }
    drop(recent);
    daemon.stop().await;
}

// ----- restart ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_restart() {
    // Goal: positions, reservations, idempotency keys and feed sequences survive a graceful
    // restart; a reservation that expired while the daemon was down is expired after it;
    // reservation ids are not reused. Method: a ManualClock moved past an expiry while the
    // daemon is stopped, then replays, a poll for the expiry, and a resume of the feed.
    let start_ms = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(start_ms));
    let daemon = Daemon::start_with(|_| {}, clock.clone()).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 10)]).await;
    let keep_request = reserve_request("r-keep", vec![line("SKU-1", "NODE-A", 3)], 0);
    let keep = reserve(&mut client, keep_request.clone()).await;
    let lapse =
        reserve(&mut client, reserve_request("r-lapse", vec![line("SKU-1", "NODE-A", 2)], 10_000)).await;
    let adjust = v1::AdjustStockRequest {
        adjustment_id: "adj-r".into(),
        entries: vec![adjustment("SKU-1", "NODE-A", 5, "receipt")],
    };
    let adjusted = client.adjust_stock(adjust.clone()).await.unwrap().into_inner();
    assert_eq!((adjusted.positions[0].on_hand, adjusted.positions[0].atp), (15, 10));
    let mut stream = watch(&mut client, &[], "", None).await;
    let last_sequence = snapshot(&mut stream, 1).await.values().next().unwrap().sequence;
    drop(stream);

    let dir = daemon.stop_keeping_data().await;
    clock.advance_ms(10_000);
    let daemon = Daemon::start_in(dir, |_| {}, clock.clone()).await;
    let mut client = daemon.client.clone();

    assert_eq!(reserve(&mut client, keep_request).await, keep, "a replay after the restart");
    assert_eq!(client.adjust_stock(adjust).await.unwrap().into_inner(), adjusted, "an adjustment replay");
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while get_reservation(&mut client, &lapse.reservation_id).await.status
        != ReservationStatus::Expired as i32
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reservation that lapsed while down never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = position(&mut client, "SKU-1", "NODE-A").await;
    assert_eq!((after.on_hand, after.reserved, after.atp), (15, 3, 12));
    assert_eq!(
        get_reservation(&mut client, &keep.reservation_id).await.status,
        ReservationStatus::Held as i32
    );

    let fresh = reserve(&mut client, reserve_request("r-new", vec![line("SKU-1", "NODE-A", 1)], 0)).await;
    assert!(
        ![&keep.reservation_id, &lapse.reservation_id].contains(&&fresh.reservation_id),
        "ids are not reused"
    );
    let mut resumed = watch(&mut client, &[], "", Some(last_sequence + 1)).await;
    let expired = next_change(&mut resumed).await;
    assert_eq!((expired.sequence, expired.atp), (last_sequence + 1, 12), "the expiry continues the sequence");
    let reserved = next_change(&mut resumed).await;
    assert_eq!((reserved.sequence, reserved.atp), (last_sequence + 2, 11));
    drop(resumed);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_reservations_and_keys_are_forgotten_after_their_retention() {
    // Goal: the retention purge forgets terminal reservations and idempotency keys once their
    // retention has passed, never before and never an open reservation; it keeps up with a
    // backlog larger than one purge batch; a restart neither brings forgotten ones back nor
    // loses what is still to be forgotten. Method: a ManualClock, 12,500 reservations expired
    // at once plus one released and one held, and the purge called directly in batches of
    // 10,000 (the background's size) around the retention's end.
    const DAY_MS: u64 = 86_400_000;
    const BATCH: usize = 10_000;
    let start_ms = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(start_ms));
    let adjust = |config: &mut Config| {
        config.index.terminal_reservation_retention_ms = DAY_MS;
        config.index.idempotency_retention_ms = DAY_MS;
        config.server.purge_interval_ms = 3_600_000;
    };
    let daemon = Daemon::start_with(adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 100_000)]).await;
    let held = reserve(&mut client, reserve_request("held", vec![line("SKU-1", "NODE-A", 1)], 0)).await;
    let released =
        reserve(&mut client, reserve_request("released", vec![line("SKU-1", "NODE-A", 1)], 0)).await;
    let release = v1::ReleaseReservationRequest { reservation_id: released.reservation_id.clone() };
    client.release_reservation(release).await.unwrap();
    let bulk = reserve_one_second_each(&mut client, "bulk", 25).await;
    clock.advance_ms(1_000);
    let index = daemon.running.core.index.clone();
    expire_all_but(&index, &mut client, 1).await;
    let status = |reservation: v1::Reservation| ReservationStatus::try_from(reservation.status).unwrap();
    assert_eq!(status(get_reservation(&mut client, &bulk[0]).await), ReservationStatus::Expired);

    // Half a day after: nothing is due.
    clock.advance_ms(DAY_MS / 2);
    assert_eq!(index.purge_expired_history(BATCH).unwrap(), 0, "nothing before its retention");
    assert_eq!(
        status(get_reservation(&mut client, &released.reservation_id).await),
        ReservationStatus::Released
    );
    // A day to the millisecond after the bulk expired: still kept (forgotten when older).
    clock.advance_ms(DAY_MS / 2);
    assert_eq!(status(get_reservation(&mut client, &bulk[0]).await), ReservationStatus::Expired);
    // The day has passed for every key and every ended reservation: 12,501 reservations and
    // 12,502 keys, forgotten in three batches.
    clock.advance_ms(1);
    let mut handled = Vec::new();
    loop {
        let count = index.purge_expired_history(BATCH).unwrap();
        handled.push(count);
        if count < BATCH {
            break;
        }
    }
    assert_eq!(handled, [BATCH, BATCH, 5_003], "the backlog goes in full batches");
    for gone in [&released.reservation_id, &bulk[0], &bulk[12_499]] {
        let request = v1::GetReservationRequest { reservation_id: gone.clone() };
        expect_error("a forgotten reservation", client.get_reservation(request).await, Code::NotFound, gone);
    }
    assert_eq!(status(get_reservation(&mut client, &held.reservation_id).await), ReservationStatus::Held);
    // A forgotten key is free again: another request under it is a new reservation, where it
    // was ALREADY_EXISTS while remembered.
    let again = reserve(&mut client, reserve_request("held", vec![line("SKU-1", "NODE-A", 2)], 0)).await;
    assert!(again.reservation_id != held.reservation_id, "a new reservation under a forgotten key");
    let release = v1::ReleaseReservationRequest { reservation_id: again.reservation_id.clone() };
    client.release_reservation(release).await.unwrap();
    let positions = position(&mut client, "SKU-1", "NODE-A").await;
    assert_eq!(positions.reserved, 1, "only the held reservation holds units");

    // Durable and rebuilt at a restart: the forgotten stay gone, and the queue of what is
    // still to be forgotten (the reservation and key just made) comes back from disk.
    let dir = daemon.stop_keeping_data().await;
    let daemon = Daemon::start_in(dir, adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    let index = daemon.running.core.index.clone();
    let request = v1::GetReservationRequest { reservation_id: bulk[1].clone() };
    expect_error(
        "forgotten, after a restart",
        client.get_reservation(request).await,
        Code::NotFound,
        &bulk[1],
    );
    assert_eq!(
        status(get_reservation(&mut client, &again.reservation_id).await),
        ReservationStatus::Released
    );
    assert_eq!(index.purge_expired_history(BATCH).unwrap(), 0);
    clock.advance_ms(DAY_MS + 1);
    assert_eq!(index.purge_expired_history(BATCH).unwrap(), 2, "the released reservation and its key");
    let request = v1::GetReservationRequest { reservation_id: again.reservation_id.clone() };
    expect_error("forgotten after the restart", client.get_reservation(request).await, Code::NotFound, "");
    assert_eq!(status(get_reservation(&mut client, &held.reservation_id).await), ReservationStatus::Held);

    // The daemon's own purge (its first tick comes at start-up, the next an hour later)
    // clears a backlog above one batch in that one tick.
    let backlog = reserve_one_second_each(&mut client, "backlog", 24).await;
    clock.advance_ms(1_000);
    expire_all_but(&index, &mut client, 1).await;
    clock.advance_ms(DAY_MS + 1);
    let dir = daemon.stop_keeping_data().await;
    let daemon = Daemon::start_in(dir, adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    // Held: the one held from the start. Kept: none (the reservation made under the
    // forgotten key was released and forgotten above).
    let index = daemon.running.core.index.clone();
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while index.reservation_count() != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the start-up purge left {} reservations",
            index.reservation_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for gone in [&backlog[0], &backlog[11_999]] {
        let request = v1::GetReservationRequest { reservation_id: gone.clone() };
        expect_error(
            "forgotten by the start-up purge",
            client.get_reservation(request).await,
            Code::NotFound,
            gone,
        );
    }
    assert_eq!(status(get_reservation(&mut client, &held.reservation_id).await), ReservationStatus::Held);
    daemon.stop().await;
}

#[tokio::test]
async fn reserve_keys_are_kept_by_their_reservations_and_outlive_them() {
    // Goal: a Reserve key has no record of its own while its reservation's record remembers
    // it (store format 3), yet it answers replays across restarts exactly as before: with the
    // first answer's expiry after an extension, after its reservation is purged (the key then
    // gets a record of its own), and it is forgotten after its own retention, then free again.
    // Method: a ManualClock, terminal reservations kept 1 hour and keys 1 day, restarts.
    const HOUR_MS: u64 = 3_600_000;
    const DAY_MS: u64 = 24 * HOUR_MS;
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let adjust = |config: &mut Config| {
        config.index.terminal_reservation_retention_ms = HOUR_MS;
        config.index.idempotency_retention_ms = DAY_MS;
        config.server.purge_interval_ms = DAY_MS;
    };
    let daemon = Daemon::start_with(adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 100)]).await;
    let kept_request = reserve_request("kept", vec![line("SKU-1", "NODE-A", 2)], 60_000);
    let kept = reserve(&mut client, kept_request.clone()).await;
    let ended_request = reserve_request("ended", vec![line("SKU-1", "NODE-A", 3)], 0);
    let ended = reserve(&mut client, ended_request.clone()).await;
    let extend =
        v1::ExtendReservationRequest { reservation_id: kept.reservation_id.clone(), ttl_ms: 600_000 };
    let extended = client.extend_reservation(extend).await.unwrap().into_inner();
    assert_ne!(extended.expires_at, kept.expires_at);
    // Confirmed: open, so kept past its key's retention.
    let confirm = v1::ConfirmReservationRequest {
        reservation_id: kept.reservation_id.clone(),
        reference: String::new(),
    };
    client.confirm_reservation(confirm).await.unwrap();
    let release = v1::ReleaseReservationRequest { reservation_id: ended.reservation_id.clone() };
    client.release_reservation(release).await.unwrap();

    // No key has a record of its own; after a restart both answer from their reservations.
    let dir = daemon.stop_keeping_data().await;
    let daemon = Daemon::start_in(dir, adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    for key in ["kept", "ended"] {
        assert_eq!(read_key(&daemon, key), None, "{key}");
    }
    assert_eq!(reserve(&mut client, kept_request.clone()).await, kept, "the first answer, not the extension");
    assert_eq!(reserve(&mut client, ended_request.clone()).await, ended);
    let mut other = ended_request.clone();
    other.lines[0].qty = 4;
    expect_error(
        "another request, same key",
        client.reserve(other.clone()).await,
        Code::AlreadyExists,
        "ended",
    );

    // An hour on, the released reservation is purged; its key stays, in a record of its own.
    clock.advance_ms(HOUR_MS + 1);
    let index = daemon.running.core.index.clone();
    assert_eq!(index.purge_expired_history(10_000).unwrap(), 1, "the released reservation");
    let request = v1::GetReservationRequest { reservation_id: ended.reservation_id.clone() };
    expect_error("purged", client.get_reservation(request).await, Code::NotFound, &ended.reservation_id);
    let dir = daemon.stop_keeping_data().await;
    let daemon = Daemon::start_in(dir, adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    let record = read_key(&daemon, "ended").expect("a record of its own");
    assert_eq!(record.reservation_id.map(|id| format!("rsv-{id}")), Some(ended.reservation_id.clone()));
    assert_eq!(read_key(&daemon, "kept"), None);
    assert_eq!(reserve(&mut client, ended_request.clone()).await, ended, "a replay after the purge");
    expect_error("still taken", client.reserve(other.clone()).await, Code::AlreadyExists, "ended");
    assert_eq!(reserve(&mut client, kept_request.clone()).await, kept);

    // A day after they were made, both keys are forgotten, the record deleted, and neither
    // comes back at a restart (the confirmed reservation still names its key).
    clock.advance_ms(DAY_MS);
    let index = daemon.running.core.index.clone();
    assert_eq!(index.purge_expired_history(10_000).unwrap(), 2, "both keys");
    let dir = daemon.stop_keeping_data().await;
    let daemon = Daemon::start_in(dir, adjust, clock.clone()).await;
    let mut client = daemon.client.clone();
    assert_eq!(read_key(&daemon, "ended"), None);
    let again = reserve(&mut client, other.clone()).await;
    assert!(!again.reservation_id.is_empty() && again.reservation_id != ended.reservation_id);
    let mut kept_other = kept_request.clone();
    kept_other.lines[0].qty = 1;
    let kept_again = reserve(&mut client, kept_other.clone()).await;
    assert!(kept_again.reservation_id != kept.reservation_id, "a new reservation under a forgotten key");
    assert_eq!(
        ReservationStatus::try_from(get_reservation(&mut client, &kept.reservation_id).await.status).unwrap(),
        ReservationStatus::Confirmed,
        "the first reservation under the key stays itself",
    );
    // The key now answers for its new reservation, also after a restart with a retention
    // long enough that both reservations' records name the key: the younger wins.
    let dir = daemon.stop_keeping_data().await;
    let longer = |config: &mut Config| {
        adjust(config);
        config.index.idempotency_retention_ms = 3 * DAY_MS;
    };
    let daemon = Daemon::start_in(dir, longer, clock.clone()).await;
    let mut client = daemon.client.clone();
    assert_eq!(reserve(&mut client, kept_other).await, kept_again);
    assert_eq!(reserve(&mut client, other).await, again);
    daemon.stop().await;
}

/// The stored record of a Reserve key, if it has one of its own.
fn read_key(daemon: &Daemon, key: &str) -> Option<allot::store::records::IdempotencyRecord> {
    daemon.running.core.store.read_idempotency(IdemNamespace::Reserve, key).unwrap()
}

/// Reserves one unit of SKU-1 at NODE-A `calls` × 500 times through ReserveBatch, each for one
/// second under the key `{prefix}-{call}-{item}`; returns the reservation ids.
async fn reserve_one_second_each(client: &mut InventoryClient, prefix: &str, calls: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for call in 0..calls {
        let items = (0..500)
            .map(|item| {
                reserve_request(&format!("{prefix}-{call}-{item}"), vec![line("SKU-1", "NODE-A", 1)], 1_000)
            })
            .collect();
        let answers = client.reserve_batch(v1::ReserveBatchRequest { items }).await.unwrap().into_inner();
        for answer in answers.items {
            match answer.result {
                Some(v1::reserve_batch_response::item::Result::Response(response)) => {
                    ids.push(response.reservation_id)
                }
                other => panic!("a bulk reservation failed: {other:?}"),
            }
        }
    }
    assert_eq!(ids.len(), calls * 500);
    ids
}

/// Sweeps expiries (this sweep and the background's both run on the manual clock) until SKU-1
/// at NODE-A holds only `reserved` units.
async fn expire_all_but(index: &allot::index::Index, client: &mut InventoryClient, reserved: i64) {
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while position(client, "SKU-1", "NODE-A").await.reserved != reserved {
        assert!(tokio::time::Instant::now() < deadline, "the reservations never expired");
        index.expire_due(1_000);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ----- 9. contention ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_never_oversell() {
    // Goal: concurrent holds on one hot SKU never promise more than the stock, and the
    // position's reserved equals the sum of the successful holds. Method: 16 tasks reserving
    // random quantities (seeded; the seed is printed, ALLOT_SEED replays it) until each was
    // refused three times; then check the sums and a final single-unit hold.
    const STOCK: i64 = 1_000;
    const TASKS: u64 = 16;
    let seed = std::env::var("ALLOT_SEED")
        .ok()
        .and_then(|raw| raw.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("concurrent_reserves_never_oversell: seed = {seed} (replay with ALLOT_SEED={seed})");
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("HOT", "NODE-A", STOCK)]).await;

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let mut client = common::inventory_client(daemon.address()).await;
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(task));
            let mut held = Vec::new();
            let mut refusals = 0;
            for attempt in 0..2_000 {
                if refusals == 3 {
                    break;
                }
                let qty: i64 = rng.random_range(1..=20);
                let request =
                    reserve_request(&format!("t{task}-{attempt}"), vec![line("HOT", "NODE-A", qty)], 0);
                let response = client.reserve(request).await.unwrap().into_inner();
                match ReserveStatus::try_from(response.status).unwrap() {
                    ReserveStatus::Reserved => held.push((response.reservation_id, qty)),
                    ReserveStatus::Insufficient => {
                        assert_eq!(response.shortfalls.len(), 1);
                        assert!(response.shortfalls[0].available < qty, "refused although it fit");
                        refusals += 1;
                    }
                    ReserveStatus::Unspecified => panic!("no status"),
                }
            }
            assert_eq!(refusals, 3, "task {task} never ran out");
            held
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        held.extend(task.await.unwrap());
    }
    let sum: i64 = held.iter().map(|(_, qty)| qty).sum();
    let ids: std::collections::HashSet<&String> = held.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), held.len(), "every hold has its own reservation id");
    assert!(sum <= STOCK, "oversold: {sum} units held of {STOCK} (seed {seed})");
    let hot = position(&mut client, "HOT", "NODE-A").await;
    assert_eq!(hot.reserved, sum, "reserved equals the sum of successful holds (seed {seed})");
    assert_eq!(hot.atp, STOCK - sum, "seed {seed}");
    let last = reserve(&mut client, reserve_request("last-unit", vec![line("HOT", "NODE-A", 1)], 0)).await;
    let reserved = last.status == ReserveStatus::Reserved as i32;
    assert_eq!(reserved, sum < STOCK, "a single unit is promised iff one is left (sum {sum}, seed {seed})");
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sku_holds_sum_to_exactly_min_of_demand_and_stock() {
    // Goal: 16 tasks reserving one hot SKU with stock 1,000 hold exactly min(demand, 1,000)
    // units in total, never more. Method: each task has a random demand that it reserves in
    // random chunks, shrinking a chunk to the `available` of a shortfall, until its demand is
    // met or ATP is 0; run once with total demand below the stock and once above (seeded,
    // seed printed; ALLOT_SEED replays).
    const STOCK: i64 = 1_000;
    const TASKS: u64 = 16;
    let seed = std::env::var("ALLOT_SEED")
        .ok()
        .and_then(|raw| raw.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("hot_sku_holds_sum_to_exactly_min_of_demand_and_stock: seed = {seed}");
    for (round, demand_per_task) in [(0u64, 20..=60i64), (1, 60..=140)] {
        let daemon = Daemon::start().await;
        let mut client = daemon.client.clone();
        upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
        set_stock(&mut client, vec![stock("HOT", "NODE-A", STOCK)]).await;
        let mut tasks = Vec::new();
        for task in 0..TASKS {
            let mut client = common::inventory_client(daemon.address()).await;
            let demand_range = demand_per_task.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (round << 32) ^ task);
                let demand: i64 = rng.random_range(demand_range);
                let mut held = 0i64;
                let mut attempt = 0u32;
                while held < demand {
                    attempt += 1;
                    assert!(attempt < 10_000, "task {task} made no progress");
                    let qty = rng.random_range(1..=20).min(demand - held);
                    let key = format!("r{round}-t{task}-{attempt}");
                    let request = reserve_request(&key, vec![line("HOT", "NODE-A", qty)], 0);
                    let response = client.reserve(request).await.unwrap().into_inner();
                    if response.status == ReserveStatus::Reserved as i32 {
                        held += qty;
                        continue;
                    }
                    let available = response.shortfalls[0].available;
                    assert!(available < qty, "refused although it fit");
                    if available == 0 {
                        break;
                    }
                    // Ask for what was available; another task may still take it first.
                    let key = format!("r{round}-t{task}-{attempt}-rest");
                    let request = reserve_request(&key, vec![line("HOT", "NODE-A", available)], 0);
                    let response = client.reserve(request).await.unwrap().into_inner();
                    if response.status == ReserveStatus::Reserved as i32 {
                        held += available;
                    }
                }
                (demand, held)
            }));
        }
        let mut demand_total = 0;
        let mut held_total = 0;
        for task in tasks {
            let (demand, held) = task.await.unwrap();
            demand_total += demand;
            held_total += held;
        }
        assert_eq!(held_total, demand_total.min(STOCK), "round {round}: demand {demand_total}, seed {seed}");
        let hot = position(&mut client, "HOT", "NODE-A").await;
        assert_eq!(hot.reserved, held_total, "round {round}: seed {seed}");
        assert_eq!(hot.atp, STOCK - held_total, "round {round}: seed {seed}");
        daemon.stop().await;
    }
}

// ----- 10. health and reflection ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    // Goal: the daemon serves grpc.health.v1 (SERVING overall and for allot.v1.Inventory) and
    // server reflection listing allot.v1.Inventory. Method: the tonic-health and
    // tonic-reflection clients.
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let daemon = Daemon::start().await;
    let endpoint = format!("http://{}", daemon.address());
    let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "allot.v1.Inventory"] {
        let response =
            health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(response.status, ServingStatus::Serving as i32, "health of {service:?}");
    }
    let unknown = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await;
    expect_error("health of an unknown service", unknown, Code::NotFound, "");

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.unwrap().into_inner();
    let response = tokio::time::timeout(WAIT_MAX, responses.message()).await.unwrap().unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|service| service.name).collect();
    for expected in ["allot.v1.Inventory", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|name| name == expected), "{expected} is not listed: {names:?}");
    }
    drop(health);
    drop(reflection);
    drop(responses);
    daemon.stop().await;
}

// ----- 11. metrics --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint() {
    // Goal: /metrics serves Prometheus text with per-RPC counters by code, the commit fsync
    // histogram and the reserve outcomes. Method: a few requests, then a raw HTTP/1.0 GET.
    let daemon = Daemon::start().await;
    let mut client = daemon.client.clone();
    upsert(&mut client, vec![node("NODE-A", 0.0, 0.0)]).await;
    set_stock(&mut client, vec![stock("SKU-1", "NODE-A", 2)]).await;
    reserve(&mut client, reserve_request("m-1", vec![line("SKU-1", "NODE-A", 1)], 0)).await;
    reserve(&mut client, reserve_request("m-2", vec![line("SKU-1", "NODE-A", 5)], 0)).await;

    let response = common::http_get(daemon.running.metrics_address, "/metrics").await;
    assert!(response.starts_with("HTTP/1."), "{response}");
    assert!(response.lines().next().unwrap().contains(" 200"), "{response}");
    let prefix = "allot_grpc_requests_total{rpc=\"Reserve\",code=\"OK\"} ";
    let value: f64 = response
        .lines()
        .find_map(|text| text.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{response}"))
        .trim()
        .parse()
        .unwrap();
    assert!(value >= 2.0, "Reserve OK counted {value} times");
    for name in [
        "allot_commit_fsync_seconds_bucket",
        "allot_commit_apply_seconds_bucket",
        "allot_reserve_outcomes_total",
    ] {
        assert!(response.contains(name), "{name} is missing from:\n{response}");
    }
    assert!(response.contains("outcome=\"insufficient\""), "the INSUFFICIENT outcome is counted");
    daemon.stop().await;
}

// ----- 12. every service is served ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_is_served() {
    // Goal: Routing, Orders and Fulfilment are served on the same port and validate their
    // input (an empty request is INVALID_ARGUMENT naming the field). Method: one call on each.
    let daemon = Daemon::start().await;
    let endpoint = format!("http://{}", daemon.address());
    let mut routing = v1::routing_client::RoutingClient::connect(endpoint.clone()).await.unwrap();
    expect_error("Route", routing.route(v1::RouteRequest::default()).await, Code::InvalidArgument, "lines");
    let mut orders = v1::orders_client::OrdersClient::connect(endpoint.clone()).await.unwrap();
    expect_error(
        "GetOrder",
        orders.get_order(v1::GetOrderRequest::default()).await,
        Code::InvalidArgument,
        "order_id",
    );
    let mut fulfilment = v1::fulfilment_client::FulfilmentClient::connect(endpoint).await.unwrap();
    let listed = fulfilment.list_fulfilment_orders(v1::ListFulfilmentOrdersRequest::default()).await;
    expect_error("ListFulfilmentOrders", listed, Code::InvalidArgument, "node_id");
    drop(routing);
    drop(orders);
    drop(fulfilment);
    daemon.stop().await;
}

/// One item of every kind, for ReserveBatch and ReserveStream (with SKU-A 10 and SKU-B 1 at
/// DC-1): a hold, a shortfall, an invalid qty, a replay of the hold, its key reused for another
/// request, a hold with a TTL, an unknown node.
fn mixed_reserve_items(prefix: &str) -> Vec<v1::ReserveRequest> {
    let key = |name: &str| format!("{prefix}-{name}");
    vec![
        reserve_request(&key("ok"), vec![line("SKU-A", "DC-1", 4)], 0),
        reserve_request(&key("short"), vec![line("SKU-A", "DC-1", 1), line("SKU-B", "DC-1", 2)], 0),
        reserve_request(&key("bad"), vec![line("SKU-A", "DC-1", 0)], 0),
        reserve_request(&key("ok"), vec![line("SKU-A", "DC-1", 4)], 0),
        reserve_request(&key("ok"), vec![line("SKU-A", "DC-1", 5)], 0),
        reserve_request(&key("ttl"), vec![line("SKU-A", "DC-1", 3)], 60_000),
        reserve_request(&key("ghost"), vec![line("SKU-A", "DC-404", 1)], 0),
    ]
}

/// Checks the answers to `mixed_reserve_items`: each exactly what Reserve would answer for that
/// item alone. Returns the two holds (items 0 and 5).
fn check_mixed_answers(
    answers: &[Result<v1::ReserveResponse, v1::ItemError>],
) -> (v1::ReserveResponse, v1::ReserveResponse) {
    assert_eq!(answers.len(), 7);
    let reserved = |index: usize| match &answers[index] {
        Ok(response) if response.status == ReserveStatus::Reserved as i32 => response.clone(),
        other => panic!("item {index}: {other:?}"),
    };
    let error = |index: usize, code: Code, names: &str| match &answers[index] {
        Err(error) => {
            assert_eq!(error.code, code as i32, "item {index}: {}", error.message);
            assert!(error.message.contains(names), "item {index}: {}", error.message);
        }
        other => panic!("item {index}: expected {code:?}, got {other:?}"),
    };
    let first = reserved(0);
    match &answers[1] {
        Ok(response) => {
            assert_eq!(response.status, ReserveStatus::Insufficient as i32);
            assert_eq!(response.shortfalls.len(), 1, "{response:?}");
            assert_eq!(response.shortfalls[0].sku, "SKU-B");
        }
        other => panic!("item 1: {other:?}"),
    }
    error(2, Code::InvalidArgument, "qty");
    assert_eq!(reserved(3).reservation_id, first.reservation_id, "a replay among the items");
    error(4, Code::AlreadyExists, "idempotency_key");
    let with_ttl = reserved(5);
    assert!(with_ttl.expires_at.is_some());
    error(6, Code::InvalidArgument, "DC-404");
    (first, with_ttl)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_batch_gives_each_item_its_own_outcome() {
    // Goal: ReserveBatch answers every item exactly as Reserve would have, in request order,
    // with one item's shortfall or error leaving the others alone; replays and key conflicts
    // work per item, also across a restart; the call itself refuses no items or too many.
    // Method: one batch mixing every kind of item, then the position, the reservations and a
    // replay of the whole batch after a restart.
    let mut daemon = Daemon::start().await;
    upsert(&mut daemon.client, vec![node("DC-1", 10.0, 10.0)]).await;
    set_stock(&mut daemon.client, vec![stock("SKU-A", "DC-1", 10), stock("SKU-B", "DC-1", 1)]).await;
    let items = mixed_reserve_items("b");
    let request = v1::ReserveBatchRequest { items: items.clone() };
    let answers = daemon.client.reserve_batch(request.clone()).await.unwrap().into_inner().items;
    use v1::reserve_batch_response::item::Result as Item;
    let answers: Vec<_> = answers
        .into_iter()
        .enumerate()
        .map(|(index, item)| match item.result {
            Some(Item::Response(response)) => Ok(response),
            Some(Item::Error(error)) => Err(error),
            None => panic!("item {index}: no result"),
        })
        .collect();
    let (first, with_ttl) = check_mixed_answers(&answers);
    // Only items 0 and 5 hold stock: 4 + 3.
    let held = position(&mut daemon.client, "SKU-A", "DC-1").await;
    assert_eq!((held.on_hand, held.reserved), (10, 7));
    assert_eq!(position(&mut daemon.client, "SKU-B", "DC-1").await.reserved, 0);

    // The call's own errors.
    let empty = daemon.client.reserve_batch(v1::ReserveBatchRequest { items: Vec::new() }).await;
    expect_error("empty batch", empty, Code::InvalidArgument, "items");
    let many = vec![reserve_request("x", vec![line("SKU-A", "DC-1", 1)], 0); 1_001];
    let too_many = daemon.client.reserve_batch(v1::ReserveBatchRequest { items: many }).await;
    expect_error("1,001 items", too_many, Code::InvalidArgument, "items");
    assert_eq!(position(&mut daemon.client, "SKU-A", "DC-1").await.reserved, 7);

    // After a restart the same batch replays item by item: nothing is held twice.
    let dir = daemon.stop_keeping_data().await;
    let mut daemon = Daemon::start_in(dir, |_| {}, Arc::new(SystemClock)).await;
    let replay = daemon.client.reserve_batch(request).await.unwrap().into_inner().items;
    match (&replay[0].result, &replay[5].result) {
        (Some(Item::Response(zero)), Some(Item::Response(five))) => {
            assert_eq!(zero.reservation_id, first.reservation_id);
            assert_eq!(five.reservation_id, with_ttl.reservation_id);
        }
        other => panic!("replay: {other:?}"),
    }
    assert_eq!(position(&mut daemon.client, "SKU-A", "DC-1").await.reserved, 7);
    let stored = get_reservation(&mut daemon.client, &first.reservation_id).await;
    assert_eq!(stored.status, ReservationStatus::Held as i32);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_stream_answers_each_item_in_order_once_durable() {
    // Goal: ReserveStream answers every item as Reserve would, in request order, each with its
    // key; one item's error leaves the stream going; far more items than the in-flight window
    // (limits.lines_per_request_max = 1,000) pass without deadlock; every RESERVED answer is
    // durable (survives a restart); and the daemon's shutdown ends an open stream with
    // UNAVAILABLE. Method: a stream mixing every kind of item; 3,000 items on one stream;
    // a restart; an idle open stream during shutdown.
    use tokio_stream::StreamExt;
    let mut daemon = Daemon::start().await;
    upsert(&mut daemon.client, vec![node("DC-1", 10.0, 10.0)]).await;
    set_stock(
        &mut daemon.client,
        vec![stock("SKU-A", "DC-1", 10), stock("SKU-B", "DC-1", 1), stock("SKU-C", "DC-1", 5_000)],
    )
    .await;
    let items = mixed_reserve_items("s");
    let answers: Vec<v1::ReserveStreamResponse> = daemon
        .client
        .reserve_stream(tokio_stream::iter(items.clone()))
        .await
        .expect("ReserveStream")
        .into_inner()
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("every answer");
    assert_eq!(answers.len(), items.len());
    for (answer, item) in answers.iter().zip(&items) {
        assert_eq!(answer.idempotency_key, item.idempotency_key, "answers come in request order");
    }
    use v1::reserve_stream_response::Result as Answer;
    let answers: Vec<_> = answers
        .into_iter()
        .enumerate()
        .map(|(index, answer)| match answer.result {
            Some(Answer::Response(response)) => Ok(response),
            Some(Answer::Error(error)) => Err(error),
            None => panic!("item {index}: no result"),
        })
        .collect();
    let (first, _) = check_mixed_answers(&answers);
    let held = position(&mut daemon.client, "SKU-A", "DC-1").await;
    assert_eq!((held.on_hand, held.reserved), (10, 7));

    // Three times the window on one stream, every answer read.
    let many: Vec<v1::ReserveRequest> =
        (0..3_000).map(|n| reserve_request(&format!("m-{n}"), vec![line("SKU-C", "DC-1", 1)], 0)).collect();
    let mut answers = daemon.client.reserve_stream(tokio_stream::iter(many)).await.unwrap().into_inner();
    let mut count = 0;
    while let Some(answer) = answers.message().await.expect("an answer") {
        assert_eq!(answer.idempotency_key, format!("m-{count}"));
        match answer.result {
            Some(Answer::Response(response)) if response.status == ReserveStatus::Reserved as i32 => {}
            other => panic!("item {count}: {other:?}"),
        }
        count += 1;
    }
    assert_eq!(count, 3_000);
    assert_eq!(position(&mut daemon.client, "SKU-C", "DC-1").await.reserved, 3_000);

    // Durable: after a restart every answered hold is there.
    let dir = daemon.stop_keeping_data().await;
    let mut daemon = Daemon::start_in(dir, |_| {}, Arc::new(SystemClock)).await;
    assert_eq!(position(&mut daemon.client, "SKU-A", "DC-1").await.reserved, 7);
    assert_eq!(position(&mut daemon.client, "SKU-C", "DC-1").await.reserved, 3_000);
    assert_eq!(
        get_reservation(&mut daemon.client, &first.reservation_id).await.status,
        ReservationStatus::Held as i32
    );

    // Shutdown ends an open, idle stream with UNAVAILABLE after answering what it decided.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    sender.send(reserve_request("idle-1", vec![line("SKU-C", "DC-1", 1)], 0)).await.unwrap();
    let mut open = daemon
        .client
        .reserve_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let answer = open.message().await.expect("the first answer").expect("not the end");
    assert_eq!(answer.idempotency_key, "idle-1");
    let stopping = tokio::spawn(daemon.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), open.message())
        .await
        .expect("the stream ends at shutdown");
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    drop(sender);
    stopping.await.unwrap();
}
