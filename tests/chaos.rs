//! The chaos run (issue 6, "Faults"): the real `allotd` binary under mixed concurrent load is
//! killed with SIGKILL at a random moment, restarted on the same data directory, and checked,
//! at least 20 times (`ALLOT_CHAOS_CYCLES` for longer runs; `ALLOT_CHAOS_SEED` reproduces a
//! run's choices and kill moments, the timing of the machine aside).
//!
//! The load: stock syncs (SetStock), receipts and shrinkage (AdjustStock), reservations
//! (Reserve, then some confirmed, some released), orders (CaptureOrder, some cancelled),
//! shipments (ConfirmShipment of what ListFulfilmentOrders shows each warehouse) and returns
//! (CreateReturn, then ReceiveReturn with resellable units restocked).
//!
//! The client keeps a ledger of every request: acknowledged (an OK answer), refused (a
//! definite error: nothing applied) or uncertain (cut off by the kill, or a transport error: it
//! may or may not have been applied). After each restart it checks what the acknowledged work
//! implies, allowing either outcome for the uncertain requests; then it sends every uncertain
//! request again (each is idempotent: a key, an absolute value, or a state transition that may
//! be repeated), which settles it, and checks again, exactly: every acknowledged reservation,
//! order, shipment and return is there as acknowledged; order and fulfilment counters add up;
//! no position holds more than it has; on_hand is what the syncs, adjustments, shipments and
//! resellable returns imply; Admin.Check finds no drift; the event log is gap-free, keeps what
//! it showed before, and its stock events add up to on_hand.
//!
//! Two client-side rules keep the ledger exact under concurrency:
//! - Per SKU, a stock sync or a shrinkage (which lower on_hand) runs alone (a write lock);
//!   everything else that moves on_hand or raises reserved (reserve, capture, ship, receipt,
//!   restock) shares the SKU (a read lock). Changes that share commute, so their order does not
//!   matter, and a sync is never concurrent with any of them.
//! - A sync or shrinkage never sets on_hand below what could be reserved there: the units of
//!   the reservations not known to be released plus the open units of every order of the SKU
//!   (the backorder retry may allocate those anywhere, at any time). So `reserved <= on_hand`
//!   is an invariant of the daemon here, not a matter of luck.
//!
//! A SKU whose request became uncertain before the kill takes no more requests in that cycle.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allot::proto::v1;
use common::daemon::Daemon;
use common::orders::{
    Clients, FoStatus, OrderStatus, check_counters, check_fulfilment_order, is_marker, node_at,
    order_request, read_until, remaining, store_at,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::RwLock;
use tokio::task::JoinSet;
use tonic::{Code, Status};

/// Kill -9 cycles unless `ALLOT_CHAOS_CYCLES` says otherwise.
const DEFAULT_CYCLES: usize = 20;
/// Two warehouses that ship (routing prefers `wh-a`, the nearer) and a store that cannot ship
/// but takes reservations, stock and returns.
const WAREHOUSES: [&str; 2] = ["wh-a", "wh-b"];
const STORE: &str = "store-c";
const NODES: [&str; 3] = ["wh-a", "wh-b", "store-c"];
const SKU_COUNT: usize = 20;
/// on_hand of every SKU at the start, per node of `NODES`.
const INITIAL_ON_HAND: [i64; 3] = [40, 40, 10];
/// A stock sync sets on_hand to a value drawn from here (never below what may be reserved).
const SYNC_ON_HAND: RangeInclusive<i64> = 0..=60;
/// Receipts add this many units; shrinkage removes at most `SHRINK_MAX`.
const RECEIPT_UNITS: RangeInclusive<i64> = 1..=15;
const SHRINK_MAX: i64 = 5;
/// How long the load runs before the kill, drawn per cycle.
const LOAD_MS: RangeInclusive<u64> = 300..=1_500;
/// A worker's pause between requests, so that a cycle is a few hundred requests, not thousands.
const PAUSE_MS: RangeInclusive<u64> = 0..=10;
/// Requests per worker per cycle at most (a bound on every loop; the kill comes long before).
const WORKER_STEPS_MAX: usize = 2_000;
/// A reservation TTL far beyond the run: no acknowledged hold may expire while checked.
const HOLD_TTL_MS: u64 = 3_600_000;
/// Concurrent reads while checking.
const CHECK_BATCH_LEN: usize = 16;
/// Acknowledged keyed requests of the last cycle replayed after each restart, per kind.
const REPLAY_SAMPLE: usize = 3;
/// The whole event log is read from sequence 1 every this many restarts (and at the last);
/// in between, from the last event seen (which must be unchanged).
const FULL_LOG_EVERY: usize = 5;
/// How long workers may take to notice the kill.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);
const PAGES_MAX: usize = 1_000;
/// Reads of the order book until it holds still (the backorder retry works in the background),
/// this far apart.
const STABLE_READS_MAX: usize = 50;
const STABLE_READ_RETRY: Duration = Duration::from_millis(50);
/// How often a warehouse with nothing to ship looks again.
const IDLE_POLL: Duration = Duration::from_millis(20);
/// The daemon's configuration: the test runs Admin.Check itself after every restart.
const CONFIG: &str = "[server]\nconsistency_check_interval_ms = 0\n";

fn sku_name(index: usize) -> String {
    format!("sku-{index:02}")
}

fn all_skus() -> Vec<String> {
    (0..SKU_COUNT).map(sku_name).collect()
}

fn sku_index(sku: &str) -> usize {
    sku.strip_prefix("sku-")
        .and_then(|digits| digits.parse().ok())
        .unwrap_or_else(|| panic!("not ours: {sku}"))
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|raw| raw.trim().parse().unwrap_or_else(|_| panic!("{name}={raw:?} is not a number")))
}

// ----- requests -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    SetStock,
    AdjustStock,
    Reserve,
    ConfirmReservation,
    ReleaseReservation,
    CaptureOrder,
    CancelOrder,
    ConfirmShipment,
    CreateReturn,
    ReceiveReturn,
}

/// One request as sent, with what the ledger needs to interpret it.
#[derive(Debug, Clone)]
enum Request {
    SetStock(v1::SetStockRequest),
    /// `expected_on_hand`: for a shrinkage (sent alone on its SKUs), on_hand after it, per entry.
    Adjust {
        request: v1::AdjustStockRequest,
        expected_on_hand: Option<Vec<i64>>,
    },
    Reserve(v1::ReserveRequest),
    Confirm {
        hold: String,
        reservation_id: String,
    },
    Release {
        hold: String,
        reservation_id: String,
    },
    Capture(Box<v1::CaptureOrderRequest>),
    Cancel {
        external_order_id: String,
        order_id: String,
    },
    Ship {
        request: v1::ConfirmShipmentRequest,
        node_id: String,
        order_id: String,
    },
    CreateReturn(v1::CreateReturnRequest),
    Receive {
        request: v1::ReceiveReturnRequest,
        rma: String,
        order_id: String,
    },
}

impl Request {
    fn kind(&self) -> Kind {
        match self {
            Request::SetStock(_) => Kind::SetStock,
            Request::Adjust { .. } => Kind::AdjustStock,
            Request::Reserve(_) => Kind::Reserve,
            Request::Confirm { .. } => Kind::ConfirmReservation,
            Request::Release { .. } => Kind::ReleaseReservation,
            Request::Capture(_) => Kind::CaptureOrder,
            Request::Cancel { .. } => Kind::CancelOrder,
            Request::Ship { .. } => Kind::ConfirmShipment,
            Request::CreateReturn(_) => Kind::CreateReturn,
            Request::Receive { .. } => Kind::ReceiveReturn,
        }
    }

    /// What the request does to on_hand if applied, per (sku, node).
    fn effects(&self) -> Vec<((String, String), Effect)> {
        match self {
            Request::SetStock(request) => request
                .entries
                .iter()
                .map(|entry| ((entry.sku.clone(), entry.node_id.clone()), Effect::Set(entry.on_hand)))
                .collect(),
            Request::Adjust { request, .. } => request
                .entries
                .iter()
                .map(|entry| ((entry.sku.clone(), entry.node_id.clone()), Effect::Delta(entry.delta)))
                .collect(),
            Request::Ship { request, node_id, .. } => request
                .lines
                .iter()
                .map(|line| ((line.sku.clone(), node_id.clone()), Effect::Delta(-line.qty)))
                .collect(),
            Request::Receive { request, .. } => request
                .lines
                .iter()
                .filter(|line| line.resellable)
                .map(|line| ((line.sku.clone(), request.node_id.clone()), Effect::Delta(line.qty)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The SKUs whose stock the request moves or whose reserved it raises.
    fn skus(&self) -> BTreeSet<String> {
        let skus: Vec<String> = match self {
            Request::SetStock(_)
            | Request::Adjust { .. }
            | Request::Ship { .. }
            | Request::Receive { .. } => self.effects().into_iter().map(|((sku, _), _)| sku).collect(),
            Request::Reserve(request) => request.lines.iter().map(|line| line.sku.clone()).collect(),
            Request::Capture(request) => request.lines.iter().map(|line| line.sku.clone()).collect(),
            _ => Vec::new(),
        };
        skus.into_iter().collect()
    }
}

/// An OK answer.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    Count(i64),
    Adjusted(v1::AdjustStockResponse),
    Reserved(v1::ReserveResponse),
    Reservation(Box<v1::Reservation>),
    Order(Box<v1::Order>),
    Fulfilment(Box<v1::FulfilmentOrder>),
    Return(Box<v1::Return>),
}

async fn send(clients: &mut Clients, request: &Request) -> Result<Reply, Status> {
    Ok(match request {
        Request::SetStock(request) => {
            Reply::Count(clients.inventory.set_stock(request.clone()).await?.into_inner().count)
        }
        Request::Adjust { request, .. } => {
            Reply::Adjusted(clients.inventory.adjust_stock(request.clone()).await?.into_inner())
        }
        Request::Reserve(request) => {
            Reply::Reserved(clients.inventory.reserve(request.clone()).await?.into_inner())
        }
        Request::Confirm { reservation_id, .. } => {
            let request = v1::ConfirmReservationRequest {
                reservation_id: reservation_id.clone(),
                reference: String::new(),
            };
            Reply::Reservation(Box::new(clients.inventory.confirm_reservation(request).await?.into_inner()))
        }
        Request::Release { reservation_id, .. } => {
            let request = v1::ReleaseReservationRequest { reservation_id: reservation_id.clone() };
            Reply::Reservation(Box::new(clients.inventory.release_reservation(request).await?.into_inner()))
        }
        Request::Capture(request) => {
            Reply::Order(Box::new(clients.orders.capture_order(request.as_ref().clone()).await?.into_inner()))
        }
        Request::Cancel { order_id, .. } => {
            let request = v1::CancelOrderRequest { order_id: order_id.clone(), reason: "chaos".into() };
            Reply::Order(Box::new(clients.orders.cancel_order(request).await?.into_inner()))
        }
        Request::Ship { request, .. } => Reply::Fulfilment(Box::new(
            clients.fulfilment.confirm_shipment(request.clone()).await?.into_inner(),
        )),
        Request::CreateReturn(request) => {
            Reply::Return(Box::new(clients.fulfilment.create_return(request.clone()).await?.into_inner()))
        }
        Request::Receive { request, .. } => {
            Reply::Return(Box::new(clients.fulfilment.receive_return(request.clone()).await?.into_inner()))
        }
    })
}

/// An error that says the request was refused as a whole (nothing applied); any other error
/// leaves the outcome unknown.
fn is_definite(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::PermissionDenied
            | Code::Unauthenticated
    )
}

// ----- the ledger -----------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum OpState {
    InFlight,
    Acked(Reply),
    Refused(Code, String),
    Uncertain(String),
}

#[derive(Debug, Clone)]
struct Op {
    /// The cycle that sent it first.
    cycle: usize,
    request: Request,
    state: OpState,
}

#[derive(Debug, Clone, Copy)]
enum Effect {
    Set(i64),
    Delta(i64),
}

/// What the ledger knows of one position's on_hand.
#[derive(Debug, Default)]
struct Stock {
    /// on_hand given every settled request.
    on_hand: i64,
    /// Effects of uncertain requests, by op. Either one sync or shrinkage, or deltas that
    /// commute (the SKU lock rule).
    uncertain: Vec<(usize, Effect)>,
}

impl Stock {
    /// Every on_hand the uncertain requests allow (each applied or not).
    fn possible(&self) -> BTreeSet<i64> {
        let mut values = BTreeSet::from([self.on_hand]);
        for (_, effect) in &self.uncertain {
            let more: Vec<i64> = match effect {
                Effect::Set(value) => vec![*value],
                Effect::Delta(delta) => values.iter().map(|value| value + delta).collect(),
            };
            values.extend(more);
        }
        values
    }
}

/// Whether an entity exists in the daemon, as far as the client knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    InFlight,
    Yes,
    No,
    Uncertain,
}

/// Whether a transition (confirm, release, cancel, receipt) was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    No,
    Uncertain,
    Yes,
}

#[derive(Debug)]
struct Hold {
    request: v1::ReserveRequest,
    known: Known,
    reservation_id: String,
    confirmed: Mark,
    released: Mark,
    /// A confirm or release is in flight or uncertain: no other request touches it this cycle.
    busy: bool,
}

#[derive(Debug)]
struct OrderEntry {
    request: Box<v1::CaptureOrderRequest>,
    known: Known,
    order_id: String,
    cycle: usize,
    /// An upper bound of the units per SKU that may still be allocated (ordered - shipped -
    /// cancelled, as last seen; only ever falls).
    open_units: BTreeMap<String, i64>,
    cancelled: Mark,
    busy: bool,
}

#[derive(Debug)]
struct ReturnEntry {
    request: v1::CreateReturnRequest,
    known: Known,
    return_id: String,
    received: Mark,
    busy: bool,
}

/// Counts per request kind.
#[derive(Debug, Default, Clone, Copy)]
struct KindFigures {
    sent: u64,
    acked: u64,
    refused: u64,
    uncertain: u64,
    /// Uncertain requests sent again after a restart: answered OK, or refused.
    resolved_ok: u64,
    resolved_refused: u64,
    /// Acknowledged requests replayed after a restart that answered as the first time.
    replays_matched: u64,
}

/// What the checks looked at.
#[derive(Debug, Default)]
struct Verified {
    restarts_checked: u64,
    reservations: u64,
    orders: u64,
    get_orders: u64,
    fulfilment_orders: u64,
    shipments: u64,
    returns: u64,
    positions: u64,
    admin_checks: u64,
    events_read: u64,
    mid_cycle_positions: u64,
    in_flight_at_kills: u64,
    /// Uncertain captures and shipments found applied right after the restart: the kill came
    /// between the commit and the answer.
    uncertain_found_applied: u64,
    insufficient: u64,
}

#[derive(Default)]
struct Ledger {
    seed: u64,
    cycle: usize,
    ops: Vec<Op>,
    stock: BTreeMap<(String, String), Stock>,
    /// Reservations by idempotency key.
    holds: BTreeMap<String, Hold>,
    /// Orders by external_order_id (one channel).
    orders: BTreeMap<String, OrderEntry>,
    /// external_order_id by order_id.
    order_ext: BTreeMap<String, String>,
    /// Returns by idempotency key of their CreateReturn.
    returns: BTreeMap<String, ReturnEntry>,
    /// Acknowledged shipped units by (order_id, sku).
    shipped: BTreeMap<(String, String), i64>,
    /// Units on returns created, in flight or uncertain, by (order_id, sku).
    on_returns: BTreeMap<(String, String), i64>,
    /// Acknowledged received return units by (order_id, sku).
    received: BTreeMap<(String, String), i64>,
    /// SKUs with an uncertain request this cycle.
    tainted: BTreeSet<String>,
    figures: BTreeMap<Kind, KindFigures>,
    verified: Verified,
    violations: Vec<String>,
}

impl Ledger {
    fn violation(&mut self, text: String) {
        let text = format!("cycle {}: {text}", self.cycle);
        eprintln!("VIOLATION (seed {}): {text}", self.seed);
        self.violations.push(text);
    }

    fn figures(&mut self, kind: Kind) -> &mut KindFigures {
        self.figures.entry(kind).or_default()
    }

    /// Units that may be reserved at (sku, node): reservations not known released, plus the
    /// open units of every order of the SKU (wherever they end up allocated).
    fn reservable_bound(&self, sku: &str, node: &str) -> i64 {
        let holds: i64 = self
            .holds
            .values()
            .filter(|hold| hold.known != Known::No && hold.released != Mark::Yes)
            .flat_map(|hold| hold.request.lines.iter())
            .filter(|line| line.sku == sku && line.node_id == node)
            .map(|line| line.qty)
            .sum();
        let orders: i64 = self
            .orders
            .values()
            .filter(|order| order.known != Known::No)
            .map(|order| order.open_units.get(sku).copied().unwrap_or(0))
            .sum();
        holds + orders
    }

    /// Records a request about to be sent; returns its op number.
    fn begin(&mut self, request: Request) -> usize {
        let op = self.ops.len();
        self.figures(request.kind()).sent += 1;
        match &request {
            Request::Reserve(reserve) => {
                let hold = Hold {
                    request: reserve.clone(),
                    known: Known::InFlight,
                    reservation_id: String::new(),
                    confirmed: Mark::No,
                    released: Mark::No,
                    busy: false,
                };
                assert!(self.holds.insert(reserve.idempotency_key.clone(), hold).is_none(), "key reused");
            }
            Request::Confirm { hold, .. } | Request::Release { hold, .. } => {
                self.holds.get_mut(hold).expect("a known hold").busy = true;
            }
            Request::Capture(capture) => {
                let mut open_units = BTreeMap::new();
                for line in &capture.lines {
                    *open_units.entry(line.sku.clone()).or_insert(0) += line.qty;
                }
                let entry = OrderEntry {
                    request: capture.clone(),
                    known: Known::InFlight,
                    order_id: String::new(),
                    cycle: self.cycle,
                    open_units,
                    cancelled: Mark::No,
                    busy: false,
                };
                assert!(self.orders.insert(capture.external_order_id.clone(), entry).is_none(), "id reused");
            }
            Request::Cancel { external_order_id, .. } => {
                self.orders.get_mut(external_order_id).expect("a known order").busy = true;
            }
            Request::CreateReturn(create) => {
                for line in &create.lines {
                    *self.on_returns.entry((create.order_id.clone(), line.sku.clone())).or_insert(0) +=
                        line.qty;
                }
                let entry = ReturnEntry {
                    request: create.clone(),
                    known: Known::InFlight,
                    return_id: String::new(),
                    received: Mark::No,
                    busy: false,
                };
                assert!(self.returns.insert(create.idempotency_key.clone(), entry).is_none(), "key reused");
            }
            Request::Receive { rma, .. } => {
                self.returns.get_mut(rma).expect("a known return").busy = true;
            }
            Request::SetStock(_) | Request::Adjust { .. } | Request::Ship { .. } => {}
        }
        self.ops.push(Op { cycle: self.cycle, request, state: OpState::InFlight });
        op
    }

    /// Records the answer to op `op` (first sent, or sent again to resolve it).
    fn settle(&mut self, op: usize, result: Result<Reply, Status>, resolving: bool) {
        let request = self.ops[op].request.clone();
        let kind = request.kind();
        let state = match result {
            Ok(reply) => OpState::Acked(reply),
            Err(status) if is_definite(status.code()) => {
                OpState::Refused(status.code(), status.message().to_string())
            }
            Err(status) => OpState::Uncertain(format!("{:?}: {}", status.code(), status.message())),
        };
        if resolving {
            for stock in self.stock.values_mut() {
                stock.uncertain.retain(|(id, _)| *id != op);
            }
        }
        {
            let figures = self.figures(kind);
            match (&state, resolving) {
                (OpState::Acked(_), false) => figures.acked += 1,
                (OpState::Refused(..), false) => figures.refused += 1,
                (OpState::Uncertain(_), false) => figures.uncertain += 1,
                (OpState::Acked(_), true) => figures.resolved_ok += 1,
                (OpState::Refused(..), true) => figures.resolved_refused += 1,
                (OpState::Uncertain(_), true) | (OpState::InFlight, _) => {}
            }
        }
        match &state {
            OpState::Acked(_) => {
                for (key, effect) in request.effects() {
                    let stock = self.stock.entry(key).or_default();
                    match effect {
                        Effect::Set(value) => stock.on_hand = value,
                        Effect::Delta(delta) => stock.on_hand += delta,
                    }
                }
            }
            OpState::Uncertain(error) => {
                if resolving {
                    self.violation(format!(
                        "op {op} ({kind:?}) sent again after the restart failed: {error}"
                    ));
                }
                for (key, effect) in request.effects() {
                    self.stock.entry(key).or_default().uncertain.push((op, effect));
                }
                self.tainted.extend(request.skus());
            }
            OpState::Refused(..) | OpState::InFlight => {}
        }
        self.settle_entities(op, &request, &state, resolving);
        self.ops[op].state = state;
    }

    fn settle_entities(&mut self, op: usize, request: &Request, state: &OpState, resolving: bool) {
        let refused = |state: &OpState| match state {
            OpState::Refused(code, message) => Some(format!("{code:?}: {message}")),
            _ => None,
        };
        match request {
            Request::SetStock(set) => match state {
                OpState::Acked(Reply::Count(count)) if *count == set.entries.len() as i64 => {}
                OpState::Acked(reply) => self.violation(format!("op {op}: SetStock answered {reply:?}")),
                OpState::Refused(..) => self.violation(format!("op {op}: SetStock refused: {state:?}")),
                _ => {}
            },
            Request::Adjust { request: adjust, expected_on_hand } => match state {
                OpState::Acked(Reply::Adjusted(response)) => {
                    let on_hand: Vec<i64> =
                        response.positions.iter().map(|position| position.on_hand).collect();
                    if response.positions.len() != adjust.entries.len() {
                        self.violation(format!("op {op}: AdjustStock answered {response:?}"));
                    } else if let Some(expected) = expected_on_hand {
                        self.verified.mid_cycle_positions += expected.len() as u64;
                        if on_hand != *expected {
                            self.violation(format!(
                                "op {op}: shrinkage {} left on_hand {on_hand:?}; the ledger expects {expected:?}",
                                adjust.adjustment_id
                            ));
                        }
                    }
                }
                OpState::Refused(..) => self.violation(format!(
                    "op {op}: AdjustStock {} refused although the ledger allows it: {state:?}",
                    adjust.adjustment_id
                )),
                _ => {}
            },
            Request::Reserve(reserve) => {
                let key = reserve.idempotency_key.clone();
                match state {
                    OpState::Acked(Reply::Reserved(response)) => {
                        if response.status == v1::reserve_response::Status::Reserved as i32
                            && !response.reservation_id.is_empty()
                        {
                            let hold = self.holds.get_mut(&key).expect("registered");
                            hold.known = Known::Yes;
                            hold.reservation_id = response.reservation_id.clone();
                        } else if response.status == v1::reserve_response::Status::Insufficient as i32
                            && response.reservation_id.is_empty()
                        {
                            self.holds.get_mut(&key).expect("registered").known = Known::No;
                            self.verified.insufficient += 1;
                        } else {
                            self.violation(format!("op {op}: Reserve {key} answered {response:?}"));
                        }
                    }
                    OpState::Refused(..) => {
                        self.holds.get_mut(&key).expect("registered").known = Known::No;
                        self.violation(format!("op {op}: Reserve {key} refused: {state:?}"));
                    }
                    OpState::Uncertain(_) => {
                        self.holds.get_mut(&key).expect("registered").known = Known::Uncertain
                    }
                    _ => {}
                }
            }
            Request::Confirm { hold: key, .. } | Request::Release { hold: key, .. } => {
                let confirm = matches!(request, Request::Confirm { .. });
                let wanted = if confirm {
                    v1::reservation::Status::Confirmed
                } else {
                    v1::reservation::Status::Released
                };
                let mark = match state {
                    OpState::Acked(Reply::Reservation(reservation)) => {
                        if reservation.status != wanted as i32 {
                            self.violation(format!("op {op}: {key}: {wanted:?} answered {reservation:?}"));
                        }
                        Mark::Yes
                    }
                    OpState::Uncertain(_) => Mark::Uncertain,
                    _ => {
                        if let Some(error) = refused(state) {
                            self.violation(format!(
                                "op {op}: {key}: {wanted:?} of a held reservation refused: {error}"
                            ));
                        }
                        Mark::No
                    }
                };
                let hold = self.holds.get_mut(key).expect("a known hold");
                if confirm {
                    hold.confirmed = mark;
                } else {
                    hold.released = mark;
                }
                hold.busy = mark == Mark::Uncertain;
            }
            Request::Capture(capture) => {
                let external = capture.external_order_id.clone();
                match state {
                    OpState::Acked(Reply::Order(order)) => {
                        if let Some(problem) = caught(|| check_counters(order)) {
                            self.violation(format!("op {op}: CaptureOrder {external}: {problem}"));
                        }
                        if order.external_order_id != external || order.order_id.is_empty() {
                            self.violation(format!("op {op}: CaptureOrder {external} answered {order:?}"));
                        }
                        self.order_ext.insert(order.order_id.clone(), external.clone());
                        let entry = self.orders.get_mut(&external).expect("registered");
                        entry.known = Known::Yes;
                        entry.order_id = order.order_id.clone();
                        entry.open_units = open_units(order);
                    }
                    OpState::Refused(..) => {
                        self.orders.get_mut(&external).expect("registered").known = Known::No;
                        self.violation(format!("op {op}: CaptureOrder {external} refused: {state:?}"));
                    }
                    OpState::Uncertain(_) => {
                        self.orders.get_mut(&external).expect("registered").known = Known::Uncertain
                    }
                    _ => {}
                }
            }
            Request::Cancel { external_order_id, .. } => {
                let mark = match state {
                    OpState::Acked(Reply::Order(order)) => {
                        let open =
                            order.lines.iter().any(|line| line.allocated != 0 || line.backordered != 0);
                        let status = OrderStatus::try_from(order.status);
                        if open || !matches!(status, Ok(OrderStatus::Cancelled | OrderStatus::Shipped)) {
                            self.violation(format!("op {op}: CancelOrder left units open: {order:?}"));
                        }
                        self.orders.get_mut(external_order_id).expect("known").open_units = open_units(order);
                        Mark::Yes
                    }
                    // Nothing left to cancel: every unit shipped. Sent again after a restart,
                    // the first may have applied (a cancelled order with shipped units ends
                    // SHIPPED, and cancelling it again finds nothing): the order is closed
                    // either way, which is what a settled cancel is checked for.
                    OpState::Refused(Code::FailedPrecondition, _) if resolving => Mark::Yes,
                    OpState::Refused(Code::FailedPrecondition, _) => Mark::No,
                    OpState::Uncertain(_) => Mark::Uncertain,
                    _ => {
                        self.violation(format!("op {op}: CancelOrder {external_order_id}: {state:?}"));
                        Mark::No
                    }
                };
                let entry = self.orders.get_mut(external_order_id).expect("known");
                entry.cancelled = mark;
                entry.busy = mark == Mark::Uncertain;
            }
            Request::Ship { request: ship, order_id, .. } => match state {
                OpState::Acked(Reply::Fulfilment(fulfilment_order)) => {
                    if let Some(problem) = parcel_problem(fulfilment_order, ship) {
                        self.violation(format!("op {op}: {problem}"));
                    }
                    if let Some(problem) = caught(|| check_fulfilment_order(fulfilment_order)) {
                        self.violation(format!(
                            "op {op}: ConfirmShipment {}: {problem}",
                            ship.idempotency_key
                        ));
                    }
                    for line in &ship.lines {
                        *self.shipped.entry((order_id.clone(), line.sku.clone())).or_insert(0) += line.qty;
                        if let Some(external) = self.order_ext.get(order_id)
                            && let Some(open) = self
                                .orders
                                .get_mut(external)
                                .and_then(|entry| entry.open_units.get_mut(&line.sku))
                        {
                            *open = (*open - line.qty).max(0);
                        }
                    }
                }
                // The order was cancelled under it: nothing shipped.
                OpState::Refused(Code::FailedPrecondition, _) => {}
                OpState::Refused(..) => {
                    self.violation(format!("op {op}: ConfirmShipment refused: {state:?}"))
                }
                _ => {}
            },
            Request::CreateReturn(create) => {
                let key = create.idempotency_key.clone();
                match state {
                    OpState::Acked(Reply::Return(rma)) => {
                        let lines: Vec<(String, i64)> =
                            rma.lines.iter().map(|line| (line.sku.clone(), line.qty)).collect();
                        let asked: Vec<(String, i64)> =
                            create.lines.iter().map(|line| (line.sku.clone(), line.qty)).collect();
                        if rma.order_id != create.order_id || lines != asked || rma.return_id.is_empty() {
                            self.violation(format!("op {op}: CreateReturn {key} answered {rma:?}"));
                        }
                        let entry = self.returns.get_mut(&key).expect("registered");
                        entry.known = Known::Yes;
                        entry.return_id = rma.return_id.clone();
                    }
                    OpState::Refused(..) => {
                        for line in &create.lines {
                            *self
                                .on_returns
                                .entry((create.order_id.clone(), line.sku.clone()))
                                .or_insert(0) -= line.qty;
                        }
                        self.returns.get_mut(&key).expect("registered").known = Known::No;
                        self.violation(format!(
                            "op {op}: CreateReturn {key} of shipped units refused: {state:?}"
                        ));
                    }
                    OpState::Uncertain(_) => {
                        self.returns.get_mut(&key).expect("registered").known = Known::Uncertain
                    }
                    _ => {}
                }
            }
            Request::Receive { request: receive, rma, order_id } => {
                let mark = match state {
                    OpState::Acked(Reply::Return(value)) => {
                        let sku = &receive.lines[0].sku;
                        let units: i64 = receive.lines.iter().map(|line| line.qty).sum();
                        let resellable: i64 =
                            receive.lines.iter().filter(|line| line.resellable).map(|line| line.qty).sum();
                        let line = value.lines.iter().find(|line| line.sku == *sku);
                        if line.map(|line| (line.received, line.resellable)) != Some((units, resellable)) {
                            self.violation(format!("op {op}: ReceiveReturn {rma} answered {value:?}"));
                        }
                        *self.received.entry((order_id.clone(), sku.clone())).or_insert(0) += units;
                        Mark::Yes
                    }
                    OpState::Uncertain(_) => Mark::Uncertain,
                    _ => {
                        if let Some(error) = refused(state) {
                            self.violation(format!("op {op}: ReceiveReturn {rma} refused: {error}"));
                        }
                        Mark::No
                    }
                };
                let entry = self.returns.get_mut(rma).expect("a known return");
                entry.received = mark;
                entry.busy = mark == Mark::Uncertain;
            }
        }
    }

    /// Units of uncertain requests of `kind` by (order_id, sku): shipments or receipts.
    fn uncertain_units(&self, kind: Kind) -> BTreeMap<(String, String), i64> {
        let mut units = BTreeMap::new();
        for op in self.ops.iter().filter(|op| matches!(op.state, OpState::Uncertain(_))) {
            match &op.request {
                Request::Ship { request, order_id, .. } if kind == Kind::ConfirmShipment => {
                    for line in &request.lines {
                        *units.entry((order_id.clone(), line.sku.clone())).or_insert(0) += line.qty;
                    }
                }
                Request::Receive { request, order_id, .. } if kind == Kind::ReceiveReturn => {
                    for line in &request.lines {
                        *units.entry((order_id.clone(), line.sku.clone())).or_insert(0) += line.qty;
                    }
                }
                _ => {}
            }
        }
        units
    }
}

/// ordered - shipped - cancelled per SKU.
fn open_units(order: &v1::Order) -> BTreeMap<String, i64> {
    let mut open = BTreeMap::new();
    for line in &order.lines {
        *open.entry(line.sku.clone()).or_insert(0) += line.qty - line.shipped - line.cancelled;
    }
    open
}

/// The parcel of `ship` on the fulfilment order it answered: there once, with its lines.
fn parcel_problem(
    fulfilment_order: &v1::FulfilmentOrder,
    ship: &v1::ConfirmShipmentRequest,
) -> Option<String> {
    let parcels: Vec<&v1::fulfilment_order::Shipment> = fulfilment_order
        .shipments
        .iter()
        .filter(|parcel| parcel.tracking_number == ship.tracking_number)
        .collect();
    let lines = |lines: &[v1::SkuQty]| -> BTreeMap<String, i64> {
        lines.iter().map(|line| (line.sku.clone(), line.qty)).collect()
    };
    match parcels.as_slice() {
        [parcel] if lines(&parcel.lines) == lines(&ship.lines) => None,
        _ => Some(format!(
            "{}: shipment {} ({:?}) is not there exactly once as sent: {parcels:?}",
            fulfilment_order.fulfilment_order_id, ship.idempotency_key, ship.lines
        )),
    }
}

/// Runs a check of tests/common that panics, and returns its message instead.
fn caught(check: impl FnOnce()) -> Option<String> {
    std::panic::catch_unwind(AssertUnwindSafe(check)).err().map(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|text| text.to_string()))
            .unwrap_or_else(|| "a check panicked".into())
    })
}

/// The status orders.proto gives an order with these counters (no holds in this run).
fn expected_status(order: &v1::Order) -> OrderStatus {
    let total = |count: fn(&v1::order::Line) -> i64| -> i64 { order.lines.iter().map(count).sum() };
    let ordered = total(|line| line.qty);
    let cancelled = total(|line| line.cancelled);
    let shipped = total(|line| line.shipped);
    let delivered = total(|line| line.delivered);
    let unrouted = total(|line| line.qty - line.allocated - line.backordered - line.shipped - line.cancelled);
    if cancelled == ordered {
        OrderStatus::Cancelled
    } else if !order.hold_reasons.is_empty() {
        OrderStatus::Held
    } else if shipped + cancelled == ordered {
        if delivered == shipped { OrderStatus::Delivered } else { OrderStatus::Shipped }
    } else if unrouted > 0 {
        OrderStatus::Exception
    } else if total(|line| line.backordered) > 0 {
        OrderStatus::Backordered
    } else if shipped > 0 {
        OrderStatus::PartiallyShipped
    } else {
        OrderStatus::Allocated
    }
}

// ----- the load -------------------------------------------------------------------------------

/// What the workers share.
struct Shared {
    ledger: Mutex<Ledger>,
    /// One per SKU: see the module comment.
    sku_locks: Vec<RwLock<()>>,
    /// Set just before the kill: workers send nothing new.
    stop: AtomicBool,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Locks the SKUs in sorted order (so that writers never deadlock); the guards unlock on drop.
async fn lock_skus<'a>(shared: &'a Shared, skus: &BTreeSet<String>, write: bool) -> Vec<Box<dyn Send + 'a>> {
    let mut guards: Vec<Box<dyn Send + 'a>> = Vec::with_capacity(skus.len());
    for sku in skus {
        let lock = &shared.sku_locks[sku_index(sku)];
        if write {
            guards.push(Box::new(lock.write().await));
        } else {
            guards.push(Box::new(lock.read().await));
        }
    }
    guards
}

/// Locks `skus`, builds the request under the ledger lock (`None`: nothing to do), sends it
/// and settles the answer before the SKU locks are released. `None` when stopped or skipped.
async fn run_op(
    shared: &Shared,
    clients: &mut Clients,
    skus: &BTreeSet<String>,
    write: bool,
    build: impl FnOnce(&mut Ledger) -> Option<Request>,
) -> Option<Result<Reply, Status>> {
    let guards = lock_skus(shared, skus, write).await;
    let (op, request) = {
        let mut ledger = shared.ledger();
        if shared.stopped() || skus.iter().any(|sku| ledger.tainted.contains(sku)) {
            return None;
        }
        let request = build(&mut ledger)?;
        assert!(request.skus().is_subset(skus), "a request outside its SKU locks: {request:?}");
        (ledger.begin(request.clone()), request)
    };
    let result = send(clients, &request).await;
    shared.ledger().settle(op, result.clone(), false);
    drop(guards);
    Some(result)
}

/// Distinct random SKUs not tainted this cycle (fewer if there are not enough).
fn pick_skus(shared: &Shared, rng: &mut StdRng, counts: RangeInclusive<usize>) -> BTreeSet<String> {
    let count = rng.random_range(counts);
    let tainted = shared.ledger().tainted.clone();
    let mut picked = BTreeSet::new();
    // A few draws per SKU wanted: duplicates and tainted SKUs are skipped, not retried forever.
    for _ in 0..count * 4 {
        if picked.len() == count {
            break;
        }
        let sku = sku_name(rng.random_range(0..SKU_COUNT));
        if !tainted.contains(&sku) {
            picked.insert(sku);
        }
    }
    picked
}

async fn pause(rng: &mut StdRng) {
    tokio::time::sleep(Duration::from_millis(rng.random_range(PAUSE_MS))).await;
}

/// Stock syncs, receipts and shrinkage.
async fn stock_worker(
    shared: Arc<Shared>,
    mut clients: Clients,
    mut rng: StdRng,
    cycle: usize,
    worker: usize,
) {
    for step in 0..WORKER_STEPS_MAX {
        if shared.stopped() {
            return;
        }
        let roll = rng.random_range(0..100);
        let skus = pick_skus(&shared, &mut rng, 1..=2);
        let adjustment_id = format!("adj-c{cycle}-w{worker}-{step}");
        let nodes_per_sku: Vec<Vec<&str>> = skus
            .iter()
            .map(|_| {
                let count = rng.random_range(1..=NODES.len());
                let mut nodes: Vec<&str> = NODES.choose_multiple(&mut rng, count).copied().collect();
                nodes.sort();
                nodes
            })
            .collect();
        let draws: Vec<i64> = (0..skus.len() * NODES.len()).map(|_| rng.random_range(SYNC_ON_HAND)).collect();
        let shrink: Vec<i64> =
            (0..skus.len() * NODES.len()).map(|_| rng.random_range(1..=SHRINK_MAX)).collect();
        let receipts: Vec<i64> =
            (0..skus.len() * NODES.len()).map(|_| rng.random_range(RECEIPT_UNITS)).collect();
        let targets = || {
            skus.iter()
                .zip(&nodes_per_sku)
                .flat_map(|(sku, nodes)| nodes.iter().map(move |node| (sku, *node)))
        };
        if roll < 35 {
            // A sync: absolute, alone on its SKUs, never below what may be reserved.
            run_op(&shared, &mut clients, &skus, true, |ledger| {
                let entries = targets()
                    .enumerate()
                    .map(|(index, (sku, node))| {
                        let draw = if node == STORE { draws[index] / 3 } else { draws[index] };
                        v1::StockEntry {
                            sku: sku.clone(),
                            node_id: node.into(),
                            on_hand: draw.max(ledger.reservable_bound(sku, node)),
                            safety_stock: None,
                        }
                    })
                    .collect::<Vec<_>>();
                (!entries.is_empty()).then_some(Request::SetStock(v1::SetStockRequest { entries }))
            })
            .await;
        } else if roll < 75 {
            // Receipts: they commute with everything that shares the SKU.
            run_op(&shared, &mut clients, &skus, false, |_| {
                let entries = targets()
                    .enumerate()
                    .map(|(index, (sku, node))| v1::StockAdjustment {
                        sku: sku.clone(),
                        node_id: node.into(),
                        delta: receipts[index],
                        reason: format!("receipt {adjustment_id}"),
                    })
                    .collect::<Vec<_>>();
                (!entries.is_empty()).then(|| Request::Adjust {
                    request: v1::AdjustStockRequest { adjustment_id: adjustment_id.clone(), entries },
                    expected_on_hand: None,
                })
            })
            .await;
        } else {
            // Shrinkage: alone on its SKUs, so the ledger knows on_hand exactly and the answer
            // is checked on the spot.
            run_op(&shared, &mut clients, &skus, true, |ledger| {
                let mut entries = Vec::new();
                let mut expected = Vec::new();
                for (index, (sku, node)) in targets().enumerate() {
                    let stock = &ledger.stock[&(sku.clone(), node.to_string())];
                    assert!(stock.uncertain.is_empty(), "an untainted SKU with uncertain stock: {sku}");
                    let room = stock.on_hand - ledger.reservable_bound(sku, node);
                    if room >= 1 {
                        let delta = -shrink[index].min(room);
                        entries.push(v1::StockAdjustment {
                            sku: sku.clone(),
                            node_id: node.into(),
                            delta,
                            reason: format!("damaged {adjustment_id}"),
                        });
                        expected.push(stock.on_hand + delta);
                    }
                }
                (!entries.is_empty()).then(|| Request::Adjust {
                    request: v1::AdjustStockRequest { adjustment_id: adjustment_id.clone(), entries },
                    expected_on_hand: Some(expected),
                })
            })
            .await;
        }
        pause(&mut rng).await;
    }
}

/// Reservations: new ones (held or confirmed later), confirmations and releases.
async fn reserve_worker(
    shared: Arc<Shared>,
    mut clients: Clients,
    mut rng: StdRng,
    cycle: usize,
    worker: usize,
) {
    for step in 0..WORKER_STEPS_MAX {
        if shared.stopped() {
            return;
        }
        let roll = rng.random_range(0..100);
        if roll < 55 {
            let skus = pick_skus(&shared, &mut rng, 1..=2);
            let lines: Vec<v1::ReserveLine> = skus
                .iter()
                .map(|sku| v1::ReserveLine {
                    sku: sku.clone(),
                    node_id: NODES.choose(&mut rng).expect("nodes").to_string(),
                    qty: rng.random_range(1..=3),
                })
                .collect();
            let ttl_ms = if rng.random_bool(0.5) { 0 } else { HOLD_TTL_MS };
            let key = format!("hold-c{cycle}-w{worker}-{step}");
            run_op(&shared, &mut clients, &skus, false, |_| {
                (!lines.is_empty()).then(|| {
                    Request::Reserve(v1::ReserveRequest {
                        idempotency_key: key.clone(),
                        lines,
                        ttl_ms,
                        reference: format!("cart-{key}"),
                        channel: String::new(),
                    })
                })
            })
            .await;
        } else {
            let confirm = roll < 75;
            let choice: u64 = rng.random();
            run_op(&shared, &mut clients, &BTreeSet::new(), false, |ledger| {
                let candidates: Vec<(&String, &Hold)> = ledger
                    .holds
                    .iter()
                    .filter(|(_, hold)| {
                        hold.known == Known::Yes
                            && !hold.busy
                            && hold.released == Mark::No
                            && (!confirm || hold.confirmed == Mark::No)
                    })
                    .collect();
                if candidates.is_empty() {
                    return None;
                }
                let (key, hold) = candidates[(choice % candidates.len() as u64) as usize];
                let (hold, reservation_id) = (key.clone(), hold.reservation_id.clone());
                Some(if confirm {
                    Request::Confirm { hold, reservation_id }
                } else {
                    Request::Release { hold, reservation_id }
                })
            })
            .await;
        }
        pause(&mut rng).await;
    }
}

/// Orders: captures (1–3 lines of 1–3 units) and some cancellations.
async fn order_worker(
    shared: Arc<Shared>,
    mut clients: Clients,
    mut rng: StdRng,
    cycle: usize,
    worker: usize,
) {
    for step in 0..WORKER_STEPS_MAX {
        if shared.stopped() {
            return;
        }
        if rng.random_range(0..100) < 85 {
            let skus = pick_skus(&shared, &mut rng, 1..=3);
            let lines: Vec<(&str, i64)> =
                skus.iter().map(|sku| (sku.as_str(), rng.random_range(1..=3))).collect();
            let request = order_request(&format!("ext-c{cycle}-w{worker}-{step}"), &lines);
            run_op(&shared, &mut clients, &skus, false, |_| {
                (!request.lines.is_empty()).then(|| Request::Capture(Box::new(request.clone())))
            })
            .await;
        } else {
            let choice: u64 = rng.random();
            run_op(&shared, &mut clients, &BTreeSet::new(), false, |ledger| {
                let candidates: Vec<&OrderEntry> = ledger
                    .orders
                    .values()
                    .filter(|order| {
                        order.known == Known::Yes
                            && !order.busy
                            && order.cancelled == Mark::No
                            && order.open_units.values().any(|units| *units > 0)
                    })
                    .collect();
                if candidates.is_empty() {
                    return None;
                }
                let order = candidates[(choice % candidates.len() as u64) as usize];
                Some(Request::Cancel {
                    external_order_id: order.request.external_order_id.clone(),
                    order_id: order.order_id.clone(),
                })
            })
            .await;
        }
        pause(&mut rng).await;
    }
}

/// A warehouse's WMS: ships what its open fulfilment orders have left, all at once or a unit.
async fn ship_worker(
    shared: Arc<Shared>,
    mut clients: Clients,
    mut rng: StdRng,
    cycle: usize,
    node: &'static str,
) {
    let mut sent = 0;
    for _ in 0..WORKER_STEPS_MAX {
        if shared.stopped() {
            return;
        }
        let mut open = Vec::new();
        for status in [FoStatus::Released, FoStatus::PartiallyShipped] {
            let request = v1::ListFulfilmentOrdersRequest { node_id: node.into(), status: status as i32 };
            match clients.fulfilment.list_fulfilment_orders(request).await {
                Ok(response) => open.extend(response.into_inner().fulfilment_orders),
                Err(status) => {
                    if !shared.stopped() {
                        shared.ledger().violation(format!(
                            "ListFulfilmentOrders {node} failed before the kill: {status}"
                        ));
                    }
                    return;
                }
            }
        }
        if open.is_empty() {
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        }
        let picked: Vec<v1::FulfilmentOrder> = open.choose_multiple(&mut rng, 4).cloned().collect();
        for fulfilment_order in picked {
            if shared.stopped() {
                return;
            }
            let left: Vec<(String, i64)> = fulfilment_order
                .lines
                .iter()
                .filter(|line| remaining(line) > 0)
                .map(|line| (line.sku.clone(), remaining(line)))
                .collect();
            if left.is_empty() {
                continue;
            }
            let lines: Vec<v1::SkuQty> = if rng.random_bool(0.7) {
                left.iter().map(|(sku, qty)| v1::SkuQty { sku: sku.clone(), qty: *qty }).collect()
            } else {
                let (sku, _) = left.choose(&mut rng).expect("not empty");
                vec![v1::SkuQty { sku: sku.clone(), qty: 1 }]
            };
            let key = format!("ship-c{cycle}-{node}-{sent}");
            sent += 1;
            let skus: BTreeSet<String> = lines.iter().map(|line| line.sku.clone()).collect();
            let request = Request::Ship {
                request: v1::ConfirmShipmentRequest {
                    fulfilment_order_id: fulfilment_order.fulfilment_order_id.clone(),
                    idempotency_key: key.clone(),
                    lines,
                    carrier: "DHL".into(),
                    tracking_number: format!("trk-{key}"),
                },
                node_id: node.into(),
                order_id: fulfilment_order.order_id.clone(),
            };
            run_op(&shared, &mut clients, &skus, false, |_| Some(request)).await;
            pause(&mut rng).await;
        }
    }
}

/// Returns: an RMA for shipped units, later received at any node, resellable or not.
async fn return_worker(
    shared: Arc<Shared>,
    mut clients: Clients,
    mut rng: StdRng,
    cycle: usize,
    worker: usize,
) {
    for step in 0..WORKER_STEPS_MAX {
        if shared.stopped() {
            return;
        }
        let choice: u64 = rng.random();
        // A return to receive: peeked first (its SKU is locked), taken under the ledger lock.
        let receivable = {
            let ledger = shared.ledger();
            let candidates: Vec<(&String, &ReturnEntry)> = ledger
                .returns
                .iter()
                .filter(|(_, rma)| rma.known == Known::Yes && rma.received == Mark::No && !rma.busy)
                .collect();
            (!candidates.is_empty()).then(|| {
                let (key, rma) = candidates[(choice % candidates.len() as u64) as usize];
                (key.clone(), rma.request.clone(), rma.return_id.clone())
            })
        };
        match receivable {
            Some((key, create, return_id)) if rng.random_bool(0.5) => {
                let line = &create.lines[0];
                let node = NODES.choose(&mut rng).expect("nodes");
                let resellable = rng.random_range(0..=line.qty);
                let mut lines = Vec::new();
                for (qty, fit) in [(resellable, true), (line.qty - resellable, false)] {
                    if qty > 0 {
                        lines.push(v1::receive_return_request::Line {
                            sku: line.sku.clone(),
                            qty,
                            resellable: fit,
                        });
                    }
                }
                let request = Request::Receive {
                    request: v1::ReceiveReturnRequest {
                        return_id,
                        node_id: node.to_string(),
                        lines,
                        idempotency_key: format!("receive-{key}"),
                    },
                    rma: key.clone(),
                    order_id: create.order_id.clone(),
                };
                let skus = BTreeSet::from([line.sku.clone()]);
                run_op(&shared, &mut clients, &skus, false, |ledger| {
                    let rma = &ledger.returns[&key];
                    (rma.received == Mark::No && !rma.busy).then_some(request)
                })
                .await;
            }
            _ => {
                let qty_draw = rng.random_range(1..=2);
                let key = format!("rma-c{cycle}-w{worker}-{step}");
                run_op(&shared, &mut clients, &BTreeSet::new(), false, |ledger| {
                    let returnable: Vec<(&(String, String), i64)> = ledger
                        .shipped
                        .iter()
                        .map(|(key, shipped)| {
                            (key, shipped - ledger.on_returns.get(key).copied().unwrap_or(0))
                        })
                        .filter(|(_, left)| *left > 0)
                        .collect();
                    if returnable.is_empty() {
                        return None;
                    }
                    let ((order_id, sku), left) = returnable[(choice % returnable.len() as u64) as usize];
                    Some(Request::CreateReturn(v1::CreateReturnRequest {
                        order_id: order_id.clone(),
                        lines: vec![v1::create_return_request::Line {
                            sku: sku.clone(),
                            qty: qty_draw.min(left),
                            reason: "chaos".into(),
                        }],
                        idempotency_key: key.clone(),
                    }))
                })
                .await;
            }
        }
        pause(&mut rng).await;
    }
}

/// Runs the workers against `daemon` for a random time, kills it with SIGKILL and waits for
/// every worker to see the outcome of what it sent.
async fn load_until_killed(shared: &Arc<Shared>, daemon: Daemon, rng: &mut StdRng, cycle: usize) -> Duration {
    shared.stop.store(false, Ordering::SeqCst);
    let mut connections = Vec::new();
    for _ in 0..3 {
        connections.push(Clients::connect(daemon.grpc_address).await);
    }
    let mut workers = JoinSet::new();
    let mut seed = || StdRng::seed_from_u64(rng.random());
    for worker in 0..2 {
        workers.spawn(reserve_worker(shared.clone(), connections[0].clone(), seed(), cycle, worker));
        workers.spawn(order_worker(shared.clone(), connections[1].clone(), seed(), cycle, worker));
    }
    for node in WAREHOUSES {
        workers.spawn(ship_worker(shared.clone(), connections[2].clone(), seed(), cycle, node));
    }
    workers.spawn(stock_worker(shared.clone(), connections[0].clone(), seed(), cycle, 0));
    workers.spawn(return_worker(shared.clone(), connections[1].clone(), seed(), cycle, 0));
    let load = Duration::from_millis(rng.random_range(LOAD_MS));
    tokio::time::sleep(load).await;
    shared.stop.store(true, Ordering::SeqCst);
    {
        let mut ledger = shared.ledger();
        let in_flight = ledger.ops.iter().filter(|op| matches!(op.state, OpState::InFlight)).count();
        ledger.verified.in_flight_at_kills += in_flight as u64;
    }
    daemon.kill9();
    let joined = tokio::time::timeout(JOIN_DEADLINE, async {
        while let Some(result) = workers.join_next().await {
            result.expect("a worker panicked");
        }
    })
    .await;
    assert!(joined.is_ok(), "workers still running {JOIN_DEADLINE:?} after the kill");
    load
}

// ----- checks after a restart -----------------------------------------------------------------

/// The event log as read so far, and what it implies.
#[derive(Default)]
struct EventLog {
    events: Vec<v1::Event>,
    markers: usize,
}

/// Every check of one restart, `exact` once the uncertain requests are settled.
async fn check_state(
    ledger: &mut Ledger,
    clients: &mut Clients,
    admin: &mut AdminClient,
    exact: bool,
) -> Snapshot {
    let when = if exact { "after settling" } else { "right after the restart" };
    check_reservations(ledger, clients, when).await;
    let (orders, fulfilment_orders) = check_orders(ledger, clients, exact, when).await;
    let positions = check_stock(ledger, clients, exact, when).await;
    let report = admin.check(v1::CheckRequest { listed_max: 0 }).await.expect("Admin.Check").into_inner();
    ledger.verified.admin_checks += 1;
    if !report.clean || report.drift_count != 0 || !report.problems.is_empty() {
        ledger.violation(format!("{when}: Admin.Check is not clean: {report:?}"));
    }
    Snapshot { orders, fulfilment_orders, positions }
}

/// What the last check read, for the event log check.
struct Snapshot {
    orders: BTreeMap<String, v1::Order>,
    fulfilment_orders: BTreeMap<String, v1::FulfilmentOrder>,
    positions: BTreeMap<(String, String), v1::Position>,
}

type AdminClient = v1::admin_client::AdminClient<tonic::transport::Channel>;

/// Every known reservation is there with its lines, in a status its requests allow.
async fn check_reservations(ledger: &mut Ledger, clients: &Clients, when: &str) {
    use v1::reservation::Status as S;
    let known: Vec<(String, String)> = ledger
        .holds
        .iter()
        .filter(|(_, hold)| hold.known == Known::Yes)
        .map(|(key, hold)| (key.clone(), hold.reservation_id.clone()))
        .collect();
    let mut found = BTreeMap::new();
    for batch in known.chunks(CHECK_BATCH_LEN) {
        let mut tasks = JoinSet::new();
        for (key, id) in batch {
            let mut client = clients.inventory.clone();
            let (key, id) = (key.clone(), id.clone());
            tasks.spawn(async move {
                let result = client.get_reservation(v1::GetReservationRequest { reservation_id: id }).await;
                (key, result.map(tonic::Response::into_inner))
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (key, result) = joined.expect("a GetReservation task panicked");
            found.insert(key, result);
        }
    }
    for (key, result) in found {
        let hold = &ledger.holds[&key];
        let mut allowed = match hold.confirmed {
            Mark::No => vec![S::Held],
            Mark::Uncertain => vec![S::Held, S::Confirmed],
            Mark::Yes => vec![S::Confirmed],
        };
        match hold.released {
            Mark::No => {}
            Mark::Uncertain => allowed.push(S::Released),
            Mark::Yes => allowed = vec![S::Released],
        }
        let problem = match result {
            Err(status) => Some(format!("GetReservation failed: {status}")),
            Ok(reservation) => {
                let status = S::try_from(reservation.status).unwrap_or(S::Unspecified);
                if !allowed.contains(&status) {
                    Some(format!("status {status:?}, expected one of {allowed:?}: {reservation:?}"))
                } else if reservation.lines != hold.request.lines || reservation.idempotency_key != key {
                    Some(format!("lines or key differ from {:?}: {reservation:?}", hold.request))
                } else {
                    None
                }
            }
        };
        ledger.verified.reservations += 1;
        if let Some(problem) = problem {
            let id = hold.reservation_id.clone();
            ledger.violation(format!("{when}: acknowledged reservation {id} (key {key}): {problem}"));
        }
    }
}

/// The order book as one consistent read.
struct OrderBook {
    orders: Vec<v1::Order>,
    /// (the node listing it, the fulfilment order).
    fulfilment_orders: Vec<(&'static str, v1::FulfilmentOrder)>,
    got: Vec<(String, Result<v1::Order, Status>)>,
}

async fn list_orders(clients: &mut Clients) -> Vec<v1::Order> {
    let mut orders = Vec::new();
    let mut page_token = String::new();
    for _ in 0..PAGES_MAX {
        let request =
            v1::ListOrdersRequest { status: 0, channel: String::new(), page_size: 1_000, page_token };
        let response = clients.orders.list_orders(request).await.expect("ListOrders").into_inner();
        orders.extend(response.orders);
        if response.next_page_token.is_empty() {
            return orders;
        }
        page_token = response.next_page_token;
    }
    panic!("ListOrders never ends");
}

/// ListOrders, GetOrder of `order_ids`, every node's fulfilment orders, and ListOrders again,
/// until both ListOrders agree: the backorder retry may allocate at any moment, and every
/// change to a fulfilment order changes its order (`updated_at` at least), so a read between
/// two equal order lists is one consistent state.
async fn read_order_book(clients: &mut Clients, order_ids: &[String]) -> OrderBook {
    for _ in 0..STABLE_READS_MAX {
        let orders = list_orders(clients).await;
        let mut got = Vec::with_capacity(order_ids.len());
        for batch in order_ids.chunks(CHECK_BATCH_LEN) {
            let mut tasks = JoinSet::new();
            for order_id in batch {
                let mut client = clients.orders.clone();
                let order_id = order_id.clone();
                tasks.spawn(async move {
                    let result = client.get_order(v1::GetOrderRequest { order_id: order_id.clone() }).await;
                    (order_id, result.map(tonic::Response::into_inner))
                });
            }
            while let Some(joined) = tasks.join_next().await {
                got.push(joined.expect("a GetOrder task panicked"));
            }
        }
        let mut fulfilment_orders = Vec::new();
        for node in NODES {
            let request = v1::ListFulfilmentOrdersRequest {
                node_id: node.into(),
                status: FoStatus::Unspecified as i32,
            };
            let listed =
                clients.fulfilment.list_fulfilment_orders(request).await.expect("ListFulfilmentOrders");
            fulfilment_orders.extend(listed.into_inner().fulfilment_orders.into_iter().map(|fo| (node, fo)));
        }
        if list_orders(clients).await == orders {
            return OrderBook { orders, fulfilment_orders, got };
        }
        tokio::time::sleep(STABLE_READ_RETRY).await;
    }
    panic!("the order book kept changing over {STABLE_READS_MAX} reads with no load running");
}

/// Orders against the ledger and against their fulfilment orders; every acknowledged shipment
/// on its fulfilment order. Returns the orders and the fulfilment orders, by id.
async fn check_orders(
    ledger: &mut Ledger,
    clients: &mut Clients,
    exact: bool,
    when: &str,
) -> (BTreeMap<String, v1::Order>, BTreeMap<String, v1::FulfilmentOrder>) {
    // GetOrder is compared with ListOrders for the orders of the last cycle.
    let last_cycle = ledger.cycle.saturating_sub(1);
    let recent: Vec<String> = ledger
        .orders
        .values()
        .filter(|entry| entry.known == Known::Yes && entry.cycle >= last_cycle)
        .map(|entry| entry.order_id.clone())
        .collect();
    let book = read_order_book(clients, &recent).await;
    let mut orders = BTreeMap::new();
    for order in book.orders {
        if let Some(twice) = orders.insert(order.order_id.clone(), order) {
            ledger.violation(format!("{when}: ListOrders lists {} twice", twice.order_id));
        }
    }
    let mut fulfilment_orders = BTreeMap::new();
    for (node, fulfilment_order) in book.fulfilment_orders {
        if fulfilment_order.node_id != node {
            ledger.violation(format!("{when}: {node} lists {fulfilment_order:?}"));
        }
        if let Some(twice) =
            fulfilment_orders.insert(fulfilment_order.fulfilment_order_id.clone(), fulfilment_order)
        {
            ledger.violation(format!("{when}: {} is listed twice", twice.fulfilment_order_id));
        }
    }
    let uncertain_shipped = ledger.uncertain_units(Kind::ConfirmShipment);
    let uncertain_received = ledger.uncertain_units(Kind::ReceiveReturn);

    // No order the client did not send; every known one there.
    for order in orders.values() {
        match ledger.orders.get(&order.external_order_id) {
            Some(entry) if entry.known == Known::Yes && entry.order_id == order.order_id => {}
            Some(entry) if entry.known == Known::Uncertain && !exact => {
                ledger.verified.uncertain_found_applied += 1;
            }
            entry => ledger.violation(format!(
                "{when}: order {} ({}) is not one the client knows: {:?}",
                order.order_id,
                order.external_order_id,
                entry.map(|entry| (entry.known, &entry.order_id))
            )),
        }
    }
    let known: Vec<(String, String, Mark)> = ledger
        .orders
        .iter()
        .filter(|(_, entry)| entry.known == Known::Yes)
        .map(|(external, entry)| (external.clone(), entry.order_id.clone(), entry.cancelled))
        .collect();
    let acked_returns: BTreeMap<&String, Vec<String>> = {
        let mut by_order: BTreeMap<&String, Vec<String>> = BTreeMap::new();
        for rma in ledger.returns.values().filter(|rma| rma.known == Known::Yes) {
            by_order.entry(&rma.request.order_id).or_default().push(rma.return_id.clone());
        }
        by_order
    };
    let mut by_order: BTreeMap<&str, Vec<&v1::FulfilmentOrder>> = BTreeMap::new();
    for fulfilment_order in fulfilment_orders.values() {
        by_order.entry(fulfilment_order.order_id.as_str()).or_default().push(fulfilment_order);
    }
    let mut problems = Vec::new();
    for (external, order_id, cancelled) in &known {
        ledger.verified.orders += 1;
        let Some(order) = orders.get(order_id) else {
            problems.push(format!("acknowledged order {order_id} ({external}) is missing"));
            continue;
        };
        let what = format!("order {order_id} ({external})");
        if let Some(problem) = caught(|| check_counters(order)) {
            problems.push(format!("{what}: {problem}"));
        }
        let status = OrderStatus::try_from(order.status).unwrap_or(OrderStatus::Unspecified);
        if status != expected_status(order) {
            problems.push(format!(
                "{what}: status {status:?}, its counters say {:?}: {order:?}",
                expected_status(order)
            ));
        }
        match cancelled {
            Mark::Yes if !matches!(status, OrderStatus::Cancelled | OrderStatus::Shipped) => {
                problems.push(format!("{what}: cancelled (acknowledged) but {status:?}"));
            }
            Mark::No if status == OrderStatus::Cancelled => {
                problems.push(format!("{what}: CANCELLED, but no cancel was sent"));
            }
            _ => {}
        }
        for line in &order.lines {
            let key = (order_id.clone(), line.sku.clone());
            for (name, value, acked, uncertain) in [
                ("shipped", line.shipped, &ledger.shipped, &uncertain_shipped),
                ("returned", line.returned, &ledger.received, &uncertain_received),
            ] {
                let low = acked.get(&key).copied().unwrap_or(0);
                let high = low + if exact { 0 } else { uncertain.get(&key).copied().unwrap_or(0) };
                if !(low..=high).contains(&value) {
                    problems.push(format!(
                        "{what}: {} {name} {value}; the acknowledged requests imply {low}..={high}",
                        line.sku
                    ));
                }
            }
        }
        for return_id in acked_returns.get(order_id).into_iter().flatten() {
            if !order.return_ids.contains(return_id) {
                problems.push(format!(
                    "{what}: acknowledged return {return_id} is not in {:?}",
                    order.return_ids
                ));
            }
        }
        // The order against its fulfilment orders.
        let mine: &[&v1::FulfilmentOrder] = by_order.get(order_id.as_str()).map_or(&[], Vec::as_slice);
        let listed: BTreeSet<&String> = order.fulfilment_order_ids.iter().collect();
        let found: BTreeSet<&String> =
            mine.iter().map(|fulfilment_order| &fulfilment_order.fulfilment_order_id).collect();
        if listed != found {
            problems.push(format!("{what}: fulfilment_order_ids {listed:?}, the nodes list {found:?}"));
        }
        for line in &order.lines {
            let fo_lines =
                || mine.iter().flat_map(|fo| fo.lines.iter()).filter(|fo_line| fo_line.sku == line.sku);
            let shipped: i64 = fo_lines().map(|fo_line| fo_line.shipped).sum();
            let open: i64 = fo_lines().map(remaining).sum();
            if (line.shipped, line.allocated) != (shipped, open) {
                problems.push(format!(
                    "{what}: {} (shipped, allocated) = {:?}, its fulfilment orders say {:?}",
                    line.sku,
                    (line.shipped, line.allocated),
                    (shipped, open)
                ));
            }
        }
    }
    // GetOrder answers what ListOrders lists.
    for (order_id, result) in book.got {
        ledger.verified.get_orders += 1;
        match result {
            Ok(order) if Some(&order) == orders.get(&order_id) => {}
            other => problems.push(format!("GetOrder {order_id} differs from ListOrders: {other:?}")),
        }
    }
    // Every acknowledged shipment on its fulfilment order, once; no parcel nobody sent.
    let mut ship_ops: BTreeMap<String, (&v1::ConfirmShipmentRequest, bool)> = BTreeMap::new();
    for op in &ledger.ops {
        if let Request::Ship { request, .. } = &op.request {
            let acked = match op.state {
                OpState::Acked(_) => true,
                OpState::Uncertain(_) if !exact => false,
                _ => continue,
            };
            ship_ops.insert(request.tracking_number.clone(), (request, acked));
        }
    }
    for (tracking, (request, acked)) in &ship_ops {
        if !acked {
            continue;
        }
        ledger.verified.shipments += 1;
        match fulfilment_orders.get(&request.fulfilment_order_id) {
            None => {
                problems.push(format!("{tracking}: fulfilment order {} is gone", request.fulfilment_order_id))
            }
            Some(fulfilment_order) => {
                if let Some(problem) = parcel_problem(fulfilment_order, request) {
                    problems.push(problem);
                }
            }
        }
    }
    for fulfilment_order in fulfilment_orders.values() {
        ledger.verified.fulfilment_orders += 1;
        let id = &fulfilment_order.fulfilment_order_id;
        if let Some(problem) = caught(|| check_fulfilment_order(fulfilment_order)) {
            problems.push(format!("{id}: {problem}"));
        }
        for parcel in &fulfilment_order.shipments {
            match ship_ops.get(&parcel.tracking_number) {
                Some((request, acked)) if request.fulfilment_order_id == *id => {
                    if !acked {
                        ledger.verified.uncertain_found_applied += 1;
                    }
                }
                _ => problems.push(format!("{id}: a parcel no settled request sent: {parcel:?}")),
            }
        }
    }
    ledger.verified.returns += acked_returns.values().map(|ids| ids.len() as u64).sum::<u64>();
    for problem in problems {
        ledger.violation(format!("{when}: {problem}"));
    }
    (orders, fulfilment_orders)
}

/// on_hand is what the ledger allows (exactly, once settled); nothing is oversold; ATP follows.
async fn check_stock(
    ledger: &mut Ledger,
    clients: &mut Clients,
    exact: bool,
    when: &str,
) -> BTreeMap<(String, String), v1::Position> {
    let positions = clients.positions(&all_skus()).await;
    let mut problems = Vec::new();
    for (key, stock) in &ledger.stock {
        let Some(position) = positions.get(key) else {
            problems.push(format!("{key:?}: no position"));
            continue;
        };
        let possible = stock.possible();
        if exact && !stock.uncertain.is_empty() {
            problems.push(format!("{key:?}: still uncertain after settling: {:?}", stock.uncertain));
        }
        if !possible.contains(&position.on_hand) {
            problems.push(format!(
                "{key:?}: on_hand {} but the ledger implies {} (possible with the uncertain requests: {possible:?}): {position:?}",
                position.on_hand, stock.on_hand
            ));
        }
        if position.reserved < 0 || position.reserved > position.on_hand {
            problems.push(format!("{key:?}: oversold: {position:?}"));
        }
        let atp = (position.on_hand - position.reserved - position.safety_stock).max(0);
        if position.atp != atp {
            problems.push(format!("{key:?}: atp is not max(0, on_hand - reserved - safety): {position:?}"));
        }
    }
    ledger.verified.positions += ledger.stock.len() as u64;
    for problem in problems {
        ledger.violation(format!("{when}: {problem}"));
    }
    positions
}

/// Acknowledged keyed requests of the last cycle, sent again: each answers as the first time
/// (the exact checks after it show that none applied twice).
async fn replay_acknowledged(ledger: &mut Ledger, clients: &mut Clients, rng: &mut StdRng) {
    let last_cycle = ledger.cycle - 1;
    let mut by_kind: BTreeMap<Kind, Vec<usize>> = BTreeMap::new();
    for (index, op) in ledger.ops.iter().enumerate() {
        let keyed = match (&op.request, &op.state) {
            (Request::Reserve(_), OpState::Acked(Reply::Reserved(response))) => {
                response.status == v1::reserve_response::Status::Reserved as i32
            }
            (
                Request::Adjust { .. }
                | Request::Capture(_)
                | Request::Ship { .. }
                | Request::CreateReturn(_)
                | Request::Receive { .. },
                OpState::Acked(_),
            ) => true,
            _ => false,
        };
        if keyed && op.cycle == last_cycle {
            by_kind.entry(op.request.kind()).or_default().push(index);
        }
    }
    for (kind, ops) in by_kind {
        for &index in ops.choose_multiple(rng, REPLAY_SAMPLE) {
            let op = &ledger.ops[index];
            let OpState::Acked(first) = &op.state else { unreachable!("acknowledged") };
            let again = send(clients, &op.request).await;
            let matches = match (first, &again) {
                // A capture replay answers the order in its current state.
                (Reply::Order(first), Ok(Reply::Order(again))) => first.order_id == again.order_id,
                (first, Ok(again)) => first == again,
                (_, Err(_)) => false,
            };
            if matches {
                ledger.figures(kind).replays_matched += 1;
            } else {
                let text = format!(
                    "replaying acknowledged op {index} ({kind:?}) answered {again:?}, first {first:?}"
                );
                ledger.violation(text);
            }
        }
    }
}

/// Sends every uncertain request again, oldest first; its answer settles it.
async fn settle_uncertain(ledger: &mut Ledger, clients: &mut Clients) -> usize {
    let uncertain: Vec<usize> = (0..ledger.ops.len())
        .filter(|index| matches!(ledger.ops[*index].state, OpState::Uncertain(_)))
        .collect();
    for &index in &uncertain {
        let request = ledger.ops[index].request.clone();
        let result = send(clients, &request).await;
        ledger.settle(index, result, true);
    }
    uncertain.len()
}

/// The event log: gap-free from 1, unchanged where read before, growing; its stock events add
/// up to every on_hand; every known reservation, order and parcel has its event.
async fn check_events(
    ledger: &mut Ledger,
    clients: &mut Clients,
    log: &mut EventLog,
    snapshot: &Snapshot,
    full: bool,
) {
    let marker = format!("chaos-mark-{:04}", log.markers);
    log.markers += 1;
    clients.set_stock(&[(marker.as_str(), NODES[0], 1)]).await;
    let from = if full { 1 } else { log.events.last().map_or(1, |event| event.sequence) };
    let mut stream = clients.watch(from, &[]).await;
    let read = read_until(&mut stream, |event| is_marker(event, &marker)).await;
    drop(stream);
    ledger.verified.events_read += read.len() as u64;
    let sequences: Vec<u64> = read.iter().map(|event| event.sequence).collect();
    if sequences.iter().zip(from..).any(|(sequence, expected)| *sequence != expected) {
        let gaps: Vec<(u64, u64)> = sequences
            .windows(2)
            .filter(|pair| pair[1] != pair[0] + 1)
            .map(|pair| (pair[0], pair[1]))
            .collect();
        ledger.violation(format!(
            "the event log read from {from} is not gap-free: first {:?}, breaks {gaps:?}",
            sequences.first()
        ));
        return;
    }
    // Events from `from` to the last one seen before must be there again, unchanged.
    let seen_before = &log.events[from as usize - 1..];
    let overlap = seen_before.len().min(read.len());
    if read[..overlap] != seen_before[..overlap] {
        let changed = (0..overlap).find(|index| read[*index] != seen_before[*index]);
        ledger.violation(format!(
            "the event log changed where read before: {:?}",
            changed.map(|index| (&seen_before[index], &read[index]))
        ));
        return;
    }
    if overlap < seen_before.len() {
        ledger.violation(format!(
            "the event log shrank: it ended at {} before, now at {}",
            from + seen_before.len() as u64 - 1,
            from + read.len() as u64 - 1
        ));
        return;
    }
    log.events.extend_from_slice(&read[overlap..]);

    // The stock events add up to on_hand.
    let mut on_hand: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut created = BTreeSet::new();
    let mut captured = BTreeSet::new();
    let mut shipments: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &log.events {
        let key = || (event.sku.clone(), event.node_id.clone());
        match event.r#type.as_str() {
            "stock.set" => {
                on_hand.insert(key(), event.qty);
            }
            "stock.adjusted" | "stock.restocked" => *on_hand.entry(key()).or_insert(0) += event.qty,
            "stock.shipped" | "stock.shortage" => *on_hand.entry(key()).or_insert(0) -= event.qty,
            "reservation.created" => {
                created.insert(event.reservation_id.as_str());
            }
            "order.captured" => {
                captured.insert(event.order_id.as_str());
            }
            "fulfilment.shipped" => *shipments.entry(event.fulfilment_order_id.as_str()).or_insert(0) += 1,
            _ => {}
        }
    }
    let mut problems = Vec::new();
    for (key, position) in &snapshot.positions {
        let from_events = on_hand.get(key).copied().unwrap_or(0);
        if from_events != position.on_hand {
            problems.push(format!(
                "{key:?}: the stock events add up to {from_events}, on_hand is {}",
                position.on_hand
            ));
        }
    }
    for hold in ledger.holds.values().filter(|hold| hold.known == Known::Yes) {
        if !created.contains(hold.reservation_id.as_str()) {
            problems.push(format!("no reservation.created event for {}", hold.reservation_id));
        }
    }
    for order in ledger.orders.values().filter(|order| order.known == Known::Yes) {
        if !captured.contains(order.order_id.as_str()) {
            problems.push(format!("no order.captured event for {}", order.order_id));
        }
    }
    for (id, fulfilment_order) in &snapshot.fulfilment_orders {
        let events = shipments.get(id.as_str()).copied().unwrap_or(0);
        if events != fulfilment_order.shipments.len() {
            problems.push(format!(
                "{id}: {events} fulfilment.shipped events, {} parcels",
                fulfilment_order.shipments.len()
            ));
        }
    }
    for problem in problems {
        ledger.violation(format!("events: {problem}"));
    }
}

/// Checks one restart: what the acknowledged requests imply, then settles the uncertain ones
/// and checks exactly.
async fn check_restart(
    ledger: &mut Ledger,
    daemon: &Daemon,
    log: &mut EventLog,
    rng: &mut StdRng,
    full_log: bool,
) -> usize {
    let mut clients = Clients::connect(daemon.grpc_address).await;
    let mut admin =
        AdminClient::connect(format!("http://{}", daemon.grpc_address)).await.expect("admin client");
    check_state(ledger, &mut clients, &mut admin, false).await;
    replay_acknowledged(ledger, &mut clients, rng).await;
    let settled = settle_uncertain(ledger, &mut clients).await;
    let snapshot = check_state(ledger, &mut clients, &mut admin, true).await;
    check_events(ledger, &mut clients, log, &snapshot, full_log).await;
    // What the next cycle's syncs must stay above: the orders as they are now.
    for order in snapshot.orders.values() {
        if let Some(entry) = ledger.orders.get_mut(&order.external_order_id) {
            entry.open_units = open_units(order);
        }
    }
    ledger.tainted.clear();
    for hold in ledger.holds.values_mut() {
        hold.busy = false;
    }
    for order in ledger.orders.values_mut() {
        order.busy = false;
    }
    for rma in ledger.returns.values_mut() {
        rma.busy = false;
    }
    ledger.verified.restarts_checked += 1;
    settled
}

// ----- the run --------------------------------------------------------------------------------

fn print_figures(ledger: &Ledger, cycles: usize, elapsed: Duration) {
    println!("chaos: seed {}, {cycles} kill -9 cycles in {elapsed:.1?}", ledger.seed);
    println!(
        "  {:<20} {:>6} {:>6} {:>7} {:>9} {:>11} {:>15} {:>8}",
        "request", "sent", "acked", "refused", "uncertain", "settled ok", "settled refused", "replayed"
    );
    let mut total = KindFigures::default();
    for (kind, figures) in &ledger.figures {
        println!(
            "  {:<20} {:>6} {:>6} {:>7} {:>9} {:>11} {:>15} {:>8}",
            format!("{kind:?}"),
            figures.sent,
            figures.acked,
            figures.refused,
            figures.uncertain,
            figures.resolved_ok,
            figures.resolved_refused,
            figures.replays_matched
        );
        total.sent += figures.sent;
        total.acked += figures.acked;
        total.refused += figures.refused;
        total.uncertain += figures.uncertain;
        total.resolved_ok += figures.resolved_ok;
        total.resolved_refused += figures.resolved_refused;
        total.replays_matched += figures.replays_matched;
    }
    println!(
        "  {:<20} {:>6} {:>6} {:>7} {:>9} {:>11} {:>15} {:>8}",
        "all",
        total.sent,
        total.acked,
        total.refused,
        total.uncertain,
        total.resolved_ok,
        total.resolved_refused,
        total.replays_matched
    );
    println!("  acknowledged operations: {}", total.acked);
    println!("  uncertain operations resolved: {}", total.resolved_ok + total.resolved_refused);
    println!("  verified: {:?}", ledger.verified);
    println!("  violations: {}", ledger.violations.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_mixed_load_keeps_every_invariant() {
    // Goal: nothing acknowledged is lost, nothing is oversold, stock and counters and the event
    // log stay exact, across repeated kill -9. Method: seeded mixed load on the real binary,
    // SIGKILL at a random moment, restart, check against a client-side ledger, settle the
    // uncertain requests by sending them again, check exactly; repeat.
    let cycles = env_number("ALLOT_CHAOS_CYCLES").map_or(DEFAULT_CYCLES, |cycles| cycles as usize);
    let seed = env_number("ALLOT_CHAOS_SEED").unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_nanos() as u64
    });
    println!("chaos: seed = {seed} (rerun with ALLOT_CHAOS_SEED={seed}), {cycles} cycles");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let shared = Arc::new(Shared {
        ledger: Mutex::new(Ledger { seed, ..Ledger::default() }),
        sku_locks: (0..SKU_COUNT).map(|_| RwLock::new(())).collect(),
        stop: AtomicBool::new(false),
    });
    let mut log = EventLog::default();
    for cycle in 0..=cycles {
        let cycle_started = Instant::now();
        let daemon = Daemon::start_with_config(&data_dir, CONFIG);
        let up = cycle_started.elapsed();
        let mut ledger = std::mem::take(&mut *shared.ledger());
        ledger.cycle = cycle;
        let settled = if cycle == 0 {
            let mut clients = Clients::connect(daemon.grpc_address).await;
            clients
                .upsert_nodes(vec![
                    node_at(WAREHOUSES[0], 1.0),
                    node_at(WAREHOUSES[1], 2.0),
                    store_at(STORE, 3.0),
                ])
                .await;
            let entries = all_skus()
                .iter()
                .flat_map(|sku| {
                    NODES.iter().zip(INITIAL_ON_HAND).map(|(node, on_hand)| v1::StockEntry {
                        sku: sku.clone(),
                        node_id: node.to_string(),
                        on_hand,
                        safety_stock: None,
                    })
                })
                .collect();
            let request = Request::SetStock(v1::SetStockRequest { entries });
            let op = ledger.begin(request.clone());
            let result = send(&mut clients, &request).await;
            assert!(result.is_ok(), "the initial SetStock: {result:?}");
            ledger.settle(op, result, false);
            0
        } else {
            let full_log = cycle == cycles || cycle % FULL_LOG_EVERY == 1;
            check_restart(&mut ledger, &daemon, &mut log, &mut rng, full_log).await
        };
        let checked = cycle_started.elapsed();
        let acked_before: u64 = ledger.figures.values().map(|figures| figures.acked).sum();
        let violations_before = ledger.violations.len();
        *shared.ledger() = ledger;
        if cycle == cycles {
            println!(
                "restart {cycle}: up in {up:.1?}, checked in {:.1?}, {settled} uncertain settled",
                checked - up
            );
            daemon.kill9();
            break;
        }
        let load = load_until_killed(&shared, daemon, &mut rng, cycle).await;
        let ledger = shared.ledger();
        let acked: u64 = ledger.figures.values().map(|figures| figures.acked).sum::<u64>() - acked_before;
        let uncertain = ledger.ops.iter().filter(|op| matches!(op.state, OpState::Uncertain(_))).count();
        println!(
            "cycle {cycle}: up in {up:.1?}, checked in {:.1?} ({settled} uncertain settled); load {load:.1?}: \
             {acked} acknowledged, {uncertain} uncertain at the kill; violations so far {} (+{})",
            checked - up,
            ledger.violations.len(),
            ledger.violations.len() - violations_before
        );
    }
    let ledger = shared.ledger();
    print_figures(&ledger, cycles, started.elapsed());
    if !ledger.violations.is_empty() {
        for violation in &ledger.violations {
            println!("VIOLATION: {violation}");
        }
        panic!(
            "{} violations (seed {seed}; rerun with ALLOT_CHAOS_SEED={seed} ALLOT_CHAOS_CYCLES={cycles})",
            ledger.violations.len()
        );
    }
}
