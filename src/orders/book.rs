//! The order book: every order, fulfilment order and return in memory, changed only through
//! index transactions so that each change and the stock it moves reach the log as one
//! mutation.
//!
//! Lock order: the book's state mutex, then an index transaction (commit slot, shard locks).
//! The index never calls back into the book. The state lock is held while one operation
//! decides and applies (and submits its mutation), never across an `.await`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;

use super::rules::OrderRules;
use crate::domain::{
    Address, AuditEvent, Bucket, Channel, Customer, FulfilmentLine, FulfilmentOrder, FulfilmentOrderId,
    HoldReason, Method, NodeId, Order, OrderId, OrderLine, OrderStatus, Payment, PaymentStatus,
    ReservationStatus, Return, ReturnId, Sku, UnroutableReason,
};
use crate::index::{Index, IndexError, Txn};
use crate::routing::{Destination, RouteOptions, RouteRequest};
use crate::store::keys::{self, IdemNamespace};
use crate::store::order_records::{FulfilmentRecord, OrderRecord, ReturnRecord};
use crate::store::records::{self, CounterRecord, IdempotencyRecord, Kind};
use crate::store::{Cf, RecoveredOrders};

/// The actor of the daemon's own work.
pub const SYSTEM: &str = crate::index::SYSTEM_ACTOR;

/// A change applied in memory and on its way to disk; reply after `durable()`.
#[must_use]
pub struct Committed<T> {
    pub(crate) value: T,
    pub(crate) ack: Option<oneshot::Receiver<()>>,
}

impl<T> Committed<T> {
    pub async fn durable(self) -> Result<T, IndexError> {
        if let Some(ack) = self.ack {
            ack.await.map_err(|_| IndexError::Unavailable)?;
        }
        Ok(self.value)
    }

    pub fn durable_blocking(self) -> Result<T, IndexError> {
        if let Some(ack) = self.ack {
            ack.blocking_recv().map_err(|_| IndexError::Unavailable)?;
        }
        Ok(self.value)
    }
}

/// A validated CaptureOrder.
#[derive(Debug, Clone)]
pub struct CaptureCommand {
    pub channel: Channel,
    pub external_order_id: String,
    pub customer: Customer,
    pub ship_to: Address,
    /// line_id, sku, qty, unit_price; line ids distinct, qty > 0, unit_price >= 0.
    pub lines: Vec<(String, Sku, i64, i64)>,
    pub payment: Payment,
    pub method: Method,
    pub pickup_node_id: String,
    /// Digest of the whole request.
    pub fingerprint: u64,
}

/// An idempotent fulfilment request's remembered outcome.
#[derive(Debug, Clone)]
pub(crate) struct IdemEntry {
    pub fingerprint: u64,
    /// The encoded response (a replay answers with it).
    pub response: Arc<[u8]>,
}

/// What an idempotent fulfilment request did.
#[derive(Debug, Clone)]
pub enum Outcome<T> {
    Done(T),
    /// A replay: the original response, encoded.
    Replayed(Arc<[u8]>),
}

#[derive(Default)]
pub(crate) struct State {
    /// By id: capture order.
    pub orders: BTreeMap<u64, Order>,
    pub by_external: HashMap<(Channel, String), u64>,
    pub fulfilment: HashMap<u64, FulfilmentOrder>,
    /// Per node, its fulfilment orders oldest first.
    pub by_node: HashMap<NodeId, Vec<u64>>,
    pub returns: HashMap<u64, Return>,
    /// Orders with backordered units, oldest first (the retry order), with the SKUs each
    /// waits for.
    pub backordered: BTreeMap<u64, Vec<Sku>>,
    /// The same orders by the SKUs they wait for: the retry finds an SKU's waiters without
    /// scanning every backorder.
    pub backordered_by_sku: HashMap<Sku, BTreeSet<u64>>,
    /// Per customer, capture times within the fraud window (oldest first).
    pub customer_captures: HashMap<String, VecDeque<u64>>,
    pub idempotency: HashMap<(IdemNamespace, String), IdemEntry>,
    pub next_order_id: u64,
    pub next_fulfilment_id: u64,
    pub next_return_id: u64,
    /// The KPIs, kept up to date by `put_order`.
    pub kpis: super::stats::Kpis,
    /// Closed orders (SHIPPED, DELIVERED, CANCELLED) by last change: the retention purge
    /// takes from the front instead of scanning every order.
    pub closed: BTreeSet<(u64, u64)>,
    /// Idempotency keys by creation time, oldest first (the key purge's queue).
    pub idempotency_by_age: VecDeque<(u64, IdemNamespace, String)>,
}

impl State {
    /// Keeps the backorder indexes in step with `order`'s backordered lines.
    pub(crate) fn index_backorders(&mut self, order: &Order) {
        let id = order.id.0;
        let mut waiting: Vec<Sku> =
            order.lines.iter().filter(|line| line.backordered > 0).map(|line| line.sku.clone()).collect();
        waiting.sort();
        waiting.dedup();
        if self.backordered.get(&id).is_some_and(|skus| *skus == waiting) {
            return;
        }
        if let Some(before) = self.backordered.remove(&id) {
            for sku in before {
                if let Some(ids) = self.backordered_by_sku.get_mut(&sku) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.backordered_by_sku.remove(&sku);
                    }
                }
            }
        }
        if waiting.is_empty() {
            return;
        }
        for sku in &waiting {
            self.backordered_by_sku.entry(sku.clone()).or_default().insert(id);
        }
        self.backordered.insert(id, waiting);
    }

    /// Stores `order` and updates its KPI contribution. Every order write goes through here,
    /// after the fulfilment orders it changed are stored.
    pub(crate) fn put_order(&mut self, order: Order) {
        let parcels = super::stats::parcel_count(self, &order);
        self.kpis.update(&order, parcels);
        if let Some(before) = self.orders.get(&order.id.0)
            && is_closed(before.status)
        {
            self.closed.remove(&(before.updated_at_ms, before.id.0));
        }
        if is_closed(order.status) {
            self.closed.insert((order.updated_at_ms, order.id.0));
        }
        self.orders.insert(order.id.0, order);
    }
}

pub struct OrderBook {
    pub(crate) index: Arc<Index>,
    pub(crate) rules: OrderRules,
    pub(crate) state: Mutex<State>,
}

impl OrderBook {
    /// Builds the book from what the store recovered.
    pub fn new(index: Arc<Index>, rules: OrderRules, recovered: RecoveredOrders) -> Self {
        let mut state = State {
            next_order_id: recovered.next_order_id.max(1),
            next_fulfilment_id: recovered.next_fulfilment_id.max(1),
            next_return_id: recovered.next_return_id.max(1),
            ..State::default()
        };
        for order in recovered.orders {
            state.next_order_id = state.next_order_id.max(order.id.0 + 1);
            state.by_external.insert((order.channel.clone(), order.external_order_id.clone()), order.id.0);
            state.index_backorders(&order);
            if !order.customer.customer_id.is_empty() {
                state
                    .customer_captures
                    .entry(order.customer.customer_id.clone())
                    .or_default()
                    .push_back(order.created_at_ms);
            }
            state.orders.insert(order.id.0, order);
        }
        let mut fulfilment: Vec<FulfilmentOrder> = recovered.fulfilment_orders;
        fulfilment.sort_by_key(|fo| fo.id);
        for fo in fulfilment {
            state.next_fulfilment_id = state.next_fulfilment_id.max(fo.id.0 + 1);
            state.by_node.entry(fo.node_id.clone()).or_default().push(fo.id.0);
            state.fulfilment.insert(fo.id.0, fo);
        }
        for value in recovered.returns {
            state.next_return_id = state.next_return_id.max(value.id.0 + 1);
            state.returns.insert(value.id.0, value);
        }
        let orders: Vec<Order> = state.orders.values().cloned().collect();
        for order in orders {
            state.put_order(order);
        }
        let mut by_age: Vec<(u64, IdemNamespace, String)> = recovered
            .idempotency
            .iter()
            .map(|(namespace, key, record)| (record.created_at_ms, *namespace, key.clone()))
            .collect();
        by_age.sort_by_key(|(created_at_ms, _, _)| *created_at_ms);
        state.idempotency_by_age = by_age.into();
        for (namespace, key, record) in recovered.idempotency {
            state.idempotency.insert(
                (namespace, key),
                IdemEntry { fingerprint: record.fingerprint, response: Arc::from(record.response) },
            );
        }
        Self { index, rules, state: Mutex::new(state) }
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    pub fn rules(&self) -> &OrderRules {
        &self.rules
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// A value read from state that may not be durable yet (another request's change):
    /// answered once everything before it is on disk.
    pub(crate) fn after_barrier<T>(&self, value: T) -> Result<Committed<T>, IndexError> {
        Ok(Committed { value, ack: Some(self.index.durable_barrier()?) })
    }

    // ----- reads -------------------------------------------------------------------------

    pub fn order(&self, id: OrderId) -> Option<Order> {
        self.lock().orders.get(&id.0).cloned()
    }

    pub fn fulfilment_order(&self, id: FulfilmentOrderId) -> Option<FulfilmentOrder> {
        self.lock().fulfilment.get(&id.0).cloned()
    }

    pub fn return_(&self, id: ReturnId) -> Option<Return> {
        self.lock().returns.get(&id.0).cloned()
    }

    /// Orders after `after` (exclusive) in capture order, filtered, at most `limit`; and
    /// whether more follow.
    pub fn list(
        &self,
        status: Option<OrderStatus>,
        channel: Option<&Channel>,
        after: u64,
        limit: usize,
    ) -> (Vec<Order>, Option<u64>) {
        let state = self.lock();
        let mut page = Vec::with_capacity(limit.min(1_024));
        let mut next = None;
        for (id, order) in state.orders.range(after.saturating_add(1)..) {
            if status.is_some_and(|status| order.status != status)
                || channel.is_some_and(|channel| order.channel != *channel)
            {
                continue;
            }
            if page.len() == limit {
                next = Some(page.last().map_or(*id, |last: &Order| last.id.0));
                break;
            }
            page.push(order.clone());
        }
        (page, next)
    }

    /// The fulfilment orders of a node, oldest first.
    pub fn node_fulfilment_orders(
        &self,
        node_id: &NodeId,
        status: Option<crate::domain::FulfilmentStatus>,
    ) -> Vec<FulfilmentOrder> {
        let state = self.lock();
        state
            .by_node
            .get(node_id)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| state.fulfilment.get(id))
                    .filter(|fo| status.is_none_or(|status| fo.status() == status))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn backordered_count(&self) -> usize {
        self.lock().backordered.len()
    }

    // ----- capture -----------------------------------------------------------------------

    /// Captures an order: holds, or routes and allocates it, in one durable mutation.
    /// A replay of (channel, external_order_id) with the same request returns the order as it
    /// is now.
    pub fn capture(&self, command: CaptureCommand) -> Result<Committed<Order>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let external = (command.channel.clone(), command.external_order_id.clone());
        if let Some(id) = state.by_external.get(&external) {
            let order = &state.orders[id];
            if order.capture_fingerprint != command.fingerprint {
                return Err(IndexError::AlreadyExists(format!(
                    "order {:?} of channel {} was captured with a different request ({})",
                    command.external_order_id, command.channel, order.id
                )));
            }
            let order = order.clone();
            drop(guard);
            return self.after_barrier(order);
        }
        let mut order = Order {
            id: OrderId(state.next_order_id),
            channel: command.channel,
            external_order_id: command.external_order_id,
            customer: command.customer,
            ship_to: command.ship_to,
            lines: command
                .lines
                .into_iter()
                .map(|(line_id, sku, qty, unit_price)| OrderLine::new(line_id, sku, qty, unit_price))
                .collect(),
            payment: command.payment,
            method: command.method,
            pickup_node_id: command.pickup_node_id,
            status: OrderStatus::Held,
            hold_reasons: Vec::new(),
            exception: None,
            fulfilment_order_ids: Vec::new(),
            return_ids: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            cancel_reason: String::new(),
            capture_fingerprint: command.fingerprint,
            shipped_at_ms: None,
            ever_backordered: false,
            ever_short: false,
            ever_exception: false,
        };
        let skus = order.skus();
        let mut txn = self.index.begin(&skus)?;
        let now_ms = txn.now_ms();
        order.created_at_ms = now_ms;
        order.updated_at_ms = now_ms;
        order.hold_reasons = self.hold_reasons(state, &txn, &order, now_ms);
        state.next_order_id += 1;
        write_counter(&mut txn, keys::META_NEXT_ORDER_ID, state.next_order_id);
        let actor = order.channel.to_string();
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            qty: order.lines.iter().map(|line| line.qty).sum(),
            detail: format!("external order {} with {} lines", order.external_order_id, order.lines.len()),
            ..AuditEvent::new("order.captured", now_ms, &actor)
        });
        if !order.customer.customer_id.is_empty() {
            state.customer_captures.entry(order.customer.customer_id.clone()).or_default().push_back(now_ms);
        }
        state.by_external.insert(external, order.id.0);
        let before = OrderStatus::Held;
        if order.hold_reasons.is_empty() {
            route_order(state, &mut txn, &mut order, SYSTEM, self.rules.max_shipments);
        } else {
            txn.event(AuditEvent {
                order_id: order.id.to_string(),
                detail: format!("hold reasons: {:?}", order.hold_reasons),
                ..AuditEvent::new("order.held", now_ms, SYSTEM)
            });
        }
        finish_order(state, &mut txn, &mut order, before, SYSTEM, false);
        let value = order.clone();
        state.put_order(order);
        let ack = txn.commit();
        drop(guard);
        metrics::counter!("allot_orders_captured_total").increment(1);
        Ok(Committed { value, ack: Some(ack) })
    }

    /// The validation holds of a new order.
    fn hold_reasons(&self, state: &mut State, txn: &Txn<'_>, order: &Order, now_ms: u64) -> Vec<HoldReason> {
        let mut reasons = Vec::new();
        if order.payment.status != PaymentStatus::Authorized {
            reasons.push(HoldReason::PaymentNotAuthorized);
        }
        if order.method == Method::Ship && !order.ship_to.is_complete() {
            reasons.push(HoldReason::AddressIncomplete);
        }
        if order.lines.iter().any(|line| !txn.has_position(&line.sku)) {
            reasons.push(HoldReason::UnknownSku);
        }
        let rules = &self.rules;
        let mut fraud = rules.fraud_order_amount_max > 0 && order.amount() > rules.fraud_order_amount_max;
        if !rules.fraud_allowed_countries.is_empty()
            && order.method == Method::Ship
            && !rules
                .fraud_allowed_countries
                .iter()
                .any(|country| country.eq_ignore_ascii_case(&order.ship_to.country))
        {
            fraud = true;
        }
        if rules.fraud_orders_per_customer_max > 0 && !order.customer.customer_id.is_empty() {
            let window_start = now_ms.saturating_sub(rules.fraud_customer_window_ms);
            if let Some(times) = state.customer_captures.get_mut(&order.customer.customer_id) {
                while times.front().is_some_and(|at| *at < window_start) {
                    times.pop_front();
                }
                if times.len() >= rules.fraud_orders_per_customer_max as usize {
                    fraud = true;
                }
            }
        }
        if fraud {
            reasons.push(HoldReason::FraudReview);
        }
        reasons
    }

    // ----- operator actions --------------------------------------------------------------

    /// Clears the holds of a HELD order and routes it; retries an EXCEPTION order's unrouted
    /// units. Any other status: the order unchanged.
    pub fn release_hold(&self, id: OrderId) -> Result<Committed<Order>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut order = state.orders.get(&id.0).cloned().ok_or_else(|| not_found_order(id))?;
        match order.status {
            OrderStatus::Cancelled => {
                return Err(IndexError::FailedPrecondition(format!("order {id} is CANCELLED")));
            }
            OrderStatus::Held | OrderStatus::Exception => {}
            _ => {
                drop(guard);
                return self.after_barrier(order);
            }
        }
        let mut txn = self.index.begin(&order.skus())?;
        let before = order.status;
        if !order.hold_reasons.is_empty() {
            txn.event(AuditEvent {
                order_id: id.to_string(),
                detail: format!("released holds: {:?}", order.hold_reasons),
                ..AuditEvent::new("order.hold_released", txn.now_ms(), crate::index::OPERATOR_ACTOR)
            });
            order.hold_reasons.clear();
        }
        route_order(state, &mut txn, &mut order, crate::index::OPERATOR_ACTOR, self.rules.max_shipments);
        finish_order(state, &mut txn, &mut order, before, crate::index::OPERATOR_ACTOR, false);
        let value = order.clone();
        state.put_order(order);
        let ack = txn.commit();
        Ok(Committed { value, ack: Some(ack) })
    }

    /// Cancels every unit not yet shipped.
    pub fn cancel(&self, id: OrderId, reason: &str) -> Result<Committed<Order>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut order = state.orders.get(&id.0).cloned().ok_or_else(|| not_found_order(id))?;
        if order.status == OrderStatus::Cancelled {
            drop(guard);
            return self.after_barrier(order);
        }
        if order.open_units() == 0 {
            return Err(IndexError::FailedPrecondition(format!(
                "order {id}: nothing left to cancel, every unit has shipped"
            )));
        }
        let mut txn = self.index.begin(&order.skus())?;
        let now_ms = txn.now_ms();
        let before = order.status;
        let actor = crate::index::OPERATOR_ACTOR;
        let mut cancelled_units = 0;
        for fo_id in order.fulfilment_order_ids.clone() {
            let mut fo = state.fulfilment[&fo_id.0].clone();
            if fo.remaining() == 0 {
                continue;
            }
            for index in 0..fo.lines.len() {
                let remaining = fo.lines[index].remaining();
                if remaining == 0 {
                    continue;
                }
                let sku = fo.lines[index].sku.clone();
                let _ = txn.take_from_reservation(fo.reservation_id, &sku, remaining, false);
                fo.lines[index].cancelled += remaining;
                order.move_units(&sku, Bucket::Allocated, Bucket::Cancelled, remaining);
                cancelled_units += remaining;
            }
            close_if_done(&mut txn, &fo, &order, actor);
            fo.updated_at_ms = now_ms;
            txn.event(AuditEvent {
                order_id: id.to_string(),
                node_id: fo.node_id.to_string(),
                fulfilment_order_id: fo.id.to_string(),
                detail: reason.to_string(),
                ..AuditEvent::new("fulfilment.cancelled", now_ms, actor)
            });
            write_fulfilment(&mut txn, &fo);
            state.fulfilment.insert(fo.id.0, fo);
        }
        for sku in order.skus() {
            for bucket in [Bucket::Backordered, Bucket::Unrouted] {
                let units = order.units(&sku, bucket);
                if units > 0 {
                    order.move_units(&sku, bucket, Bucket::Cancelled, units);
                    cancelled_units += units;
                }
            }
        }
        order.hold_reasons.clear();
        order.exception = None;
        order.cancel_reason = reason.to_string();
        txn.event(AuditEvent {
            order_id: id.to_string(),
            qty: cancelled_units,
            detail: reason.to_string(),
            ..AuditEvent::new("order.cancelled", now_ms, actor)
        });
        finish_order(state, &mut txn, &mut order, before, actor, true);
        let value = order.clone();
        state.put_order(order);
        let ack = txn.commit();
        Ok(Committed { value, ack: Some(ack) })
    }

    /// Forgets fulfilment idempotency keys created before `cutoff_ms`, at most
    /// `batch_len_max`. Returns how many it forgot.
    pub fn purge_idempotency(&self, cutoff_ms: u64, batch_len_max: usize) -> Result<usize, IndexError> {
        let mut state = self.lock();
        let due = state
            .idempotency_by_age
            .iter()
            .take(batch_len_max)
            .take_while(|(created_at_ms, _, _)| *created_at_ms < cutoff_ms)
            .count();
        if due == 0 {
            return Ok(0);
        }
        let mut txn = self.index.begin(&[])?;
        for _ in 0..due {
            let (_, namespace, key) = state.idempotency_by_age.pop_front().expect("counted above");
            txn.delete(Cf::Idempotency, keys::idempotency(namespace, &key));
            state.idempotency.remove(&(namespace, key));
        }
        drop(txn.commit());
        Ok(due)
    }

    /// Forgets closed orders (SHIPPED, DELIVERED, CANCELLED) last changed before `cutoff_ms`,
    /// at most `batch_len_max`, with their fulfilment orders and returns. Returns how many.
    pub fn purge_closed_orders(&self, cutoff_ms: u64, batch_len_max: usize) -> Result<usize, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let old: Vec<(u64, u64)> = state
            .closed
            .iter()
            .take(batch_len_max)
            .take_while(|(updated_at_ms, _)| *updated_at_ms < cutoff_ms)
            .copied()
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let mut txn = self.index.begin(&[])?;
        let mut gone_fulfilment = HashSet::new();
        for key in &old {
            state.closed.remove(key);
            let id = &key.1;
            let order = state.orders.remove(id).expect("a closed order is in the book");
            state.kpis.remove(&order);
            state.by_external.remove(&(order.channel.clone(), order.external_order_id.clone()));
            txn.delete(Cf::Orders, keys::numbered(*id));
            for fo_id in &order.fulfilment_order_ids {
                if let Some(fo) = state.fulfilment.remove(&fo_id.0) {
                    assert_eq!(
                        fo.remaining(),
                        0,
                        "a closed order's fulfilment order {fo_id} has units to ship"
                    );
                    gone_fulfilment.insert((fo.node_id.clone(), fo_id.0));
                }
                txn.delete(Cf::Fulfilment, keys::numbered(fo_id.0));
            }
            for return_id in &order.return_ids {
                state.returns.remove(&return_id.0);
                txn.delete(Cf::Returns, keys::numbered(return_id.0));
            }
        }
        let nodes: HashSet<NodeId> = gone_fulfilment.iter().map(|(node, _)| node.clone()).collect();
        for node in nodes {
            if let Some(list) = state.by_node.get_mut(&node) {
                list.retain(|id| !gone_fulfilment.contains(&(node.clone(), *id)));
            }
        }
        drop(txn.commit());
        Ok(old.len())
    }

    // ----- backorder retry ---------------------------------------------------------------

    /// Re-routes backordered orders with an id above `after`, oldest first, at most
    /// `batch_len_max`: those waiting for a SKU in `risen`, or every one when `risen` is
    /// `None`. Returns how many changed, and where the next batch of the same pass starts
    /// (`None`: the pass is complete). An order the retry cannot improve is not rewritten.
    /// Waits for nothing: the commits are acknowledged in the background.
    pub fn retry_backorders(
        &self,
        risen: Option<&HashSet<Sku>>,
        after: u64,
        batch_len_max: usize,
    ) -> (usize, Option<u64>) {
        let candidates: Vec<u64> = {
            let state = self.lock();
            let from = after.saturating_add(1);
            match risen {
                None => state.backordered.range(from..).take(batch_len_max).map(|(id, _)| *id).collect(),
                Some(risen) => {
                    let mut ids = BTreeSet::new();
                    for sku in risen {
                        if let Some(waiting) = state.backordered_by_sku.get(sku) {
                            ids.extend(waiting.range(from..).take(batch_len_max));
                        }
                    }
                    ids.into_iter().take(batch_len_max).collect()
                }
            }
        };
        let resume = if candidates.len() == batch_len_max { candidates.last().copied() } else { None };
        let mut changed = 0;
        for id in candidates {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(mut order) = state.orders.get(&id).cloned() else { continue };
            if !state.backordered.contains_key(&id) || order.status == OrderStatus::Held {
                continue;
            }
            let Ok(mut txn) = self.index.begin(&order.skus()) else {
                // Shedding: a later pass tries again.
                return (changed, None);
            };
            let original = order.clone();
            let before = order.status;
            route_order(state, &mut txn, &mut order, SYSTEM, self.rules.max_shipments);
            if order == original && !txn.is_dirty() {
                // Still nothing to route: no write, no event.
                continue;
            }
            finish_order(state, &mut txn, &mut order, before, SYSTEM, false);
            state.put_order(order);
            drop(txn.commit());
            changed += 1;
        }
        (changed, resume)
    }
}

/// Whether nothing can happen to an order any more but delivery, returns and retention.
fn is_closed(status: OrderStatus) -> bool {
    matches!(status, OrderStatus::Shipped | OrderStatus::Delivered | OrderStatus::Cancelled)
}

pub(crate) fn not_found_order(id: OrderId) -> IndexError {
    IndexError::NotFound(format!("order {id} does not exist"))
}

/// Routes every unit of `order` that waits (unrouted or backordered): one fulfilment order
/// (and reservation) per shipment, backorders for what lacks stock or capacity, EXCEPTION for
/// what cannot be routed at all.
/// `max_shipments`: 0 = the routing maximum.
pub(crate) fn route_order(
    state: &mut State,
    txn: &mut Txn<'_>,
    order: &mut Order,
    actor: &str,
    max_shipments: usize,
) {
    let now_ms = txn.now_ms();
    let mut pending: Vec<(Sku, i64)> = Vec::new();
    for sku in order.skus() {
        let backordered = order.units(&sku, Bucket::Backordered);
        if backordered > 0 {
            order.move_units(&sku, Bucket::Backordered, Bucket::Unrouted, backordered);
        }
        let units = order.units(&sku, Bucket::Unrouted);
        if units > 0 {
            pending.push((sku, units));
        }
    }
    if pending.is_empty() {
        return;
    }
    let destination = match order.method {
        Method::Ship => Destination::Ship { lat: order.ship_to.lat, lon: order.ship_to.lon },
        Method::Pickup => match txn.nodes().get_str(&order.pickup_node_id) {
            Some(node) => Destination::Pickup { node_id: node.node_id.clone() },
            None => {
                set_exception(
                    txn,
                    order,
                    UnroutableReason::PickupNodeUnavailable,
                    format!("pickup node {:?} does not exist", order.pickup_node_id),
                    actor,
                );
                return;
            }
        },
    };
    let request = RouteRequest {
        lines: pending,
        destination,
        channel: Some(order.channel.clone()),
        options: RouteOptions { max_shipments, allow_partial: true, allow_backorder: true },
    };
    let (plan, day) = match txn.plan(&request) {
        Ok(planned) => planned,
        Err(_) => {
            // Capacity raced away at every replan: the units wait as a backorder and the
            // retry routes them on its next pass.
            for (sku, units) in &request.lines {
                order.move_units(sku, Bucket::Unrouted, Bucket::Backordered, *units);
            }
            order.ever_backordered = true;
            return;
        }
    };
    for shipment in &plan.shipments {
        let fo_id = FulfilmentOrderId(state.next_fulfilment_id);
        state.next_fulfilment_id += 1;
        write_counter(txn, keys::META_NEXT_FULFILMENT_ID, state.next_fulfilment_id);
        let reservation = txn.hold(
            &shipment.node_id,
            &shipment.lines,
            fo_id.0,
            format!("{} {}", order.id, fo_id),
            Some(order.channel.clone()),
            Some(day),
        );
        let units: i64 = shipment.lines.iter().map(|(_, qty)| qty).sum();
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            node_id: shipment.node_id.to_string(),
            reservation_id: Some(reservation.id.0),
            fulfilment_order_id: fo_id.to_string(),
            qty: units,
            ..AuditEvent::new("reservation.created", now_ms, actor)
        });
        for (sku, qty) in &shipment.lines {
            order.move_units(sku, Bucket::Unrouted, Bucket::Allocated, *qty);
        }
        let fo = FulfilmentOrder {
            id: fo_id,
            order_id: order.id,
            node_id: shipment.node_id.clone(),
            method: order.method,
            lines: shipment
                .lines
                .iter()
                .map(|(sku, qty)| FulfilmentLine {
                    sku: sku.clone(),
                    qty: *qty,
                    shipped: 0,
                    short: 0,
                    cancelled: 0,
                })
                .collect(),
            parcels: Vec::new(),
            reservation_id: reservation.id,
            delivered: false,
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        };
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            node_id: fo.node_id.to_string(),
            fulfilment_order_id: fo_id.to_string(),
            reservation_id: Some(reservation.id.0),
            qty: units,
            detail: format!(
                "cost {} cents, {:.0} km, {} days",
                shipment.cost, shipment.distance_km, shipment.estimated_days
            ),
            ..AuditEvent::new("fulfilment.released", now_ms, actor)
        });
        write_fulfilment(txn, &fo);
        order.fulfilment_order_ids.push(fo_id);
        state.by_node.entry(fo.node_id.clone()).or_default().push(fo_id.0);
        state.fulfilment.insert(fo_id.0, fo);
    }
    for (sku, qty) in &plan.backordered {
        order.move_units(sku, Bucket::Unrouted, Bucket::Backordered, *qty);
        order.ever_backordered = true;
    }
    order.exception = None;
    if let Some(first) = plan.unroutable.first() {
        let detail = plan
            .unroutable
            .iter()
            .map(|unroutable| format!("{} x{}: {}", unroutable.sku, unroutable.qty, unroutable.detail))
            .collect::<Vec<_>>()
            .join("; ");
        set_exception(txn, order, first.reason, detail, actor);
    }
}

fn set_exception(
    txn: &mut Txn<'_>,
    order: &mut Order,
    reason: UnroutableReason,
    detail: String,
    actor: &str,
) {
    order.ever_exception = true;
    txn.event(AuditEvent {
        order_id: order.id.to_string(),
        qty: order.lines.iter().map(OrderLine::unrouted).sum(),
        detail: format!("{reason:?}: {detail}"),
        ..AuditEvent::new("order.exception", txn.now_ms(), actor)
    });
    order.exception = Some((reason, detail));
}

/// Closes a fulfilment order's reservation once nothing remains to ship on it.
pub(crate) fn close_if_done(txn: &mut Txn<'_>, fo: &FulfilmentOrder, order: &Order, actor: &str) {
    if fo.remaining() > 0 {
        return;
    }
    let status = if fo.shipped() > 0 { ReservationStatus::Fulfilled } else { ReservationStatus::Released };
    let reservation = txn.close_reservation(fo.reservation_id, status);
    let event_type =
        if status == ReservationStatus::Fulfilled { "reservation.fulfilled" } else { "reservation.released" };
    txn.event(AuditEvent {
        order_id: order.id.to_string(),
        node_id: fo.node_id.to_string(),
        fulfilment_order_id: fo.id.to_string(),
        reservation_id: Some(reservation.id.0),
        ..AuditEvent::new(event_type, txn.now_ms(), actor)
    });
}

/// Derives the order's status, emits its status event when it changed (except CANCELLED,
/// which the cancel emits itself), keeps the backorder set and the cycle time, and writes the
/// order record.
pub(crate) fn finish_order(
    state: &mut State,
    txn: &mut Txn<'_>,
    order: &mut Order,
    before: OrderStatus,
    actor: &str,
    cancelling: bool,
) {
    let now_ms = txn.now_ms();
    if order.exception.is_some() && order.lines.iter().all(|line| line.unrouted() == 0) {
        order.exception = None;
    }
    order.status = order.derive_status();
    order.updated_at_ms = now_ms;
    if order.shipped_at_ms.is_none() && matches!(order.status, OrderStatus::Shipped | OrderStatus::Delivered)
    {
        order.shipped_at_ms = Some(now_ms);
    }
    state.index_backorders(order);
    let skip = order.status == before
        || order.status == OrderStatus::Held
        || (cancelling && order.status == OrderStatus::Cancelled);
    if !skip {
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            detail: format!("{} -> {}; {}", before.name(), order.status.name(), counters(order)),
            ..AuditEvent::new(&format!("order.{}", order.status.name()), now_ms, actor)
        });
    }
    txn.put(
        Cf::Orders,
        keys::numbered(order.id.0),
        records::encode(Kind::Order, &OrderRecord::from_order(order)),
    );
}

/// The order's unit counters, for event details (the audit trail's after-quantities).
pub(crate) fn counters(order: &Order) -> String {
    let total = |bucket: Bucket| order.lines.iter().map(|line| line.count(bucket)).sum::<i64>();
    format!(
        "ordered {} allocated {} backordered {} shipped {} delivered {} cancelled {} returned {}",
        order.lines.iter().map(|line| line.qty).sum::<i64>(),
        total(Bucket::Allocated),
        total(Bucket::Backordered),
        total(Bucket::Shipped),
        order.lines.iter().map(|line| line.delivered).sum::<i64>(),
        total(Bucket::Cancelled),
        order.lines.iter().map(|line| line.returned).sum::<i64>(),
    )
}

/// Persists an id high-water mark in the same mutation as the id's first use.
pub(crate) fn write_counter(txn: &mut Txn<'_>, key: &[u8], next: u64) {
    txn.put(Cf::Meta, key, records::encode(Kind::Counter, &CounterRecord { value: next }));
}

pub(crate) fn write_fulfilment(txn: &mut Txn<'_>, fo: &FulfilmentOrder) {
    txn.put(
        Cf::Fulfilment,
        keys::numbered(fo.id.0),
        records::encode(Kind::Fulfilment, &FulfilmentRecord::from_fulfilment(fo)),
    );
}

pub(crate) fn write_return(txn: &mut Txn<'_>, value: &Return) {
    txn.put(
        Cf::Returns,
        keys::numbered(value.id.0),
        records::encode(Kind::Return, &ReturnRecord::from_return(value)),
    );
}

/// Remembers an idempotent fulfilment outcome in memory and in the mutation.
pub(crate) fn remember(
    state: &mut State,
    txn: &mut Txn<'_>,
    namespace: IdemNamespace,
    key: &str,
    fingerprint: u64,
    response: Vec<u8>,
) {
    let record = IdempotencyRecord {
        fingerprint,
        created_at_ms: txn.now_ms(),
        reservation_id: None,
        expires_at_ms: None,
        positions: Vec::new(),
        response: response.clone(),
    };
    txn.put(Cf::Idempotency, keys::idempotency(namespace, key), records::encode(Kind::Idempotency, &record));
    state
        .idempotency
        .insert((namespace, key.to_string()), IdemEntry { fingerprint, response: Arc::from(response) });
    state.idempotency_by_age.push_back((txn.now_ms(), namespace, key.to_string()));
}

/// Looks up an idempotency key: `Some(response)` for a replay, ALREADY_EXISTS for a reuse
/// with another request, `None` for a new key.
pub(crate) fn replay(
    state: &State,
    namespace: IdemNamespace,
    key: &str,
    fingerprint: u64,
) -> Result<Option<Arc<[u8]>>, IndexError> {
    match state.idempotency.get(&(namespace, key.to_string())) {
        None => Ok(None),
        Some(entry) if entry.fingerprint == fingerprint => Ok(Some(entry.response.clone())),
        Some(_) => Err(IndexError::AlreadyExists(format!(
            "idempotency_key {key:?} was used for a different request"
        ))),
    }
}
