//! What nodes report back: shipments (and pickup hand-overs), shortages, deliveries, and
//! returns. Each is one index transaction with the order book's state, like capture.
//! May import `domain`, `index`, `orders` and `store`; must not import `api`.

use crate::domain::{
    AuditEvent, Bucket, FulfilmentOrderId, FulfilmentStatus, NodeId, Order, OrderId, Parcel, Return,
    ReturnId, ReturnLine, Sku,
};
use crate::index::IndexError;
use crate::orders::book::{
    close_if_done, finish_order, not_found_order, remember, replay, route_order, write_counter,
    write_fulfilment, write_return,
};
use crate::orders::{Committed, OrderBook, Outcome};
use crate::store::keys::{self, IdemNamespace};

pub use crate::domain::FulfilmentOrder;

/// A validated ConfirmShipment.
#[derive(Debug, Clone)]
pub struct ShipCommand {
    pub fulfilment_order_id: FulfilmentOrderId,
    pub idempotency_key: String,
    /// Distinct SKUs, qty > 0; empty = every unit remaining.
    pub lines: Vec<(Sku, i64)>,
    pub carrier: String,
    pub tracking_number: String,
    pub fingerprint: u64,
}

/// A validated ReportShortage.
#[derive(Debug, Clone)]
pub struct ShortageCommand {
    pub fulfilment_order_id: FulfilmentOrderId,
    pub sku: Sku,
    pub missing_qty: i64,
    /// Empty: not idempotent.
    pub idempotency_key: String,
    pub fingerprint: u64,
}

/// A validated CreateReturn.
#[derive(Debug, Clone)]
pub struct ReturnCommand {
    pub order_id: OrderId,
    /// Distinct SKUs: (sku, qty > 0, reason).
    pub lines: Vec<(Sku, i64, String)>,
    pub idempotency_key: String,
    pub fingerprint: u64,
}

/// A validated ReceiveReturn.
#[derive(Debug, Clone)]
pub struct ReceiveCommand {
    pub return_id: ReturnId,
    pub node_id: NodeId,
    /// (sku, qty > 0, resellable); a SKU may appear twice.
    pub lines: Vec<(Sku, i64, bool)>,
    pub idempotency_key: String,
    pub fingerprint: u64,
}

impl OrderBook {
    /// A replay of an idempotent fulfilment request (`key` empty: not idempotent): its
    /// remembered response, answered once everything before it is durable.
    fn replayed<T>(
        &self,
        state: &crate::orders::book::State,
        namespace: IdemNamespace,
        key: &str,
        fingerprint: u64,
    ) -> Result<Option<Committed<Outcome<T>>>, IndexError> {
        if key.is_empty() {
            return Ok(None);
        }
        match replay(state, namespace, key, fingerprint)? {
            Some(response) => Ok(Some(self.after_barrier(Outcome::Replayed(response))?)),
            None => Ok(None),
        }
    }
}

fn not_found_fo(id: FulfilmentOrderId) -> IndexError {
    IndexError::NotFound(format!("fulfilment order {id} does not exist"))
}

/// What a fulfilment RPC returns: the fulfilment order and its order (for the copied fields).
pub type Shipped = (FulfilmentOrder, Order);

impl OrderBook {
    /// Records a shipment. `encode` makes the response remembered for replays.
    pub fn confirm_shipment(
        &self,
        command: &ShipCommand,
        encode: impl FnOnce(&FulfilmentOrder, &Order) -> Vec<u8>,
    ) -> Result<Committed<Outcome<Shipped>>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let key = command.idempotency_key.as_str();
        if let Some(replayed) = self.replayed(state, IdemNamespace::Shipment, key, command.fingerprint)? {
            return Ok(replayed);
        }
        let id = command.fulfilment_order_id;
        let mut fo = state.fulfilment.get(&id.0).cloned().ok_or_else(|| not_found_fo(id))?;
        if fo.status() == FulfilmentStatus::Cancelled {
            return Err(IndexError::FailedPrecondition(format!("fulfilment order {id} is CANCELLED")));
        }
        let lines: Vec<(Sku, i64)> = if command.lines.is_empty() {
            fo.lines
                .iter()
                .filter(|line| line.remaining() > 0)
                .map(|line| (line.sku.clone(), line.remaining()))
                .collect()
        } else {
            for (index, (sku, qty)) in command.lines.iter().enumerate() {
                let Some(line) = fo.line(sku) else {
                    return Err(IndexError::InvalidArgument(format!(
                        "lines[{index}].sku: {sku} is not on fulfilment order {id}"
                    )));
                };
                if *qty > line.remaining() {
                    return Err(IndexError::FailedPrecondition(format!(
                        "lines[{index}]: {qty} units of {sku} asked, {} remain to ship on {id}",
                        line.remaining()
                    )));
                }
            }
            command.lines.clone()
        };
        if lines.is_empty() {
            return Err(IndexError::FailedPrecondition(format!(
                "fulfilment order {id}: nothing remains to ship"
            )));
        }
        let mut order = state.orders[&fo.order_id.0].clone();
        let skus: Vec<Sku> = lines.iter().map(|(sku, _)| sku.clone()).collect();
        let mut txn = self.index.begin(&skus)?;
        let now_ms = txn.now_ms();
        let actor = fo.node_id.to_string();
        let before = order.status;
        for (sku, qty) in &lines {
            let (stock_before, stock_after) = txn.take_from_reservation(fo.reservation_id, sku, *qty, true);
            fo.line_mut(sku).expect("checked above").shipped += qty;
            order.move_units(sku, Bucket::Allocated, Bucket::Shipped, *qty);
            txn.event(AuditEvent {
                order_id: order.id.to_string(),
                sku: sku.to_string(),
                node_id: fo.node_id.to_string(),
                fulfilment_order_id: id.to_string(),
                reservation_id: Some(fo.reservation_id.0),
                qty: *qty,
                detail: format!(
                    "on_hand {} -> {}, reserved {} -> {}",
                    stock_before.on_hand, stock_after.on_hand, stock_before.reserved, stock_after.reserved
                ),
                ..AuditEvent::new("stock.shipped", now_ms, &actor)
            });
        }
        fo.parcels.push(Parcel {
            carrier: command.carrier.clone(),
            tracking_number: command.tracking_number.clone(),
            lines: lines.clone(),
            shipped_at_ms: now_ms,
        });
        fo.updated_at_ms = now_ms;
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            node_id: fo.node_id.to_string(),
            fulfilment_order_id: id.to_string(),
            qty: lines.iter().map(|(_, qty)| qty).sum(),
            detail: format!("carrier {:?}, tracking {:?}", command.carrier, command.tracking_number),
            ..AuditEvent::new("fulfilment.shipped", now_ms, &actor)
        });
        close_if_done(&mut txn, &fo, &order, &actor);
        finish_order(state, &mut txn, &mut order, before, &actor, false);
        write_fulfilment(&mut txn, &fo);
        let response = encode(&fo, &order);
        remember(state, &mut txn, IdemNamespace::Shipment, key, command.fingerprint, response);
        state.fulfilment.insert(id.0, fo.clone());
        state.put_order(order.clone());
        let ack = txn.commit();
        metrics::counter!("allot_shipments_total").increment(1);
        Ok(Committed { value: Outcome::Done((fo, order)), ack: Some(ack) })
    }

    /// A node cannot find units: on_hand (and reserved) drop there, the units are re-routed.
    pub fn report_shortage(
        &self,
        command: &ShortageCommand,
        encode: impl FnOnce(&FulfilmentOrder, &Order) -> Vec<u8>,
    ) -> Result<Committed<Outcome<Shipped>>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let key = command.idempotency_key.as_str();
        if let Some(replayed) = self.replayed(state, IdemNamespace::Shortage, key, command.fingerprint)? {
            return Ok(replayed);
        }
        let id = command.fulfilment_order_id;
        let mut fo = state.fulfilment.get(&id.0).cloned().ok_or_else(|| not_found_fo(id))?;
        let Some(line) = fo.line(&command.sku) else {
            return Err(IndexError::InvalidArgument(format!(
                "sku: {} is not on fulfilment order {id}",
                command.sku
            )));
        };
        let status = fo.status();
        if matches!(
            status,
            FulfilmentStatus::Cancelled | FulfilmentStatus::Shipped | FulfilmentStatus::Delivered
        ) {
            return Err(IndexError::FailedPrecondition(format!("fulfilment order {id} is {status:?}")));
        }
        if command.missing_qty > line.remaining() {
            return Err(IndexError::FailedPrecondition(format!(
                "missing_qty: {} units of {} reported missing, {} remain to ship on {id}",
                command.missing_qty,
                command.sku,
                line.remaining()
            )));
        }
        let mut order = state.orders[&fo.order_id.0].clone();
        let mut txn = self.index.begin(&order.skus())?;
        let now_ms = txn.now_ms();
        let actor = fo.node_id.to_string();
        let before = order.status;
        let sku = &command.sku;
        let missing = command.missing_qty;
        // The missing units leave the shelf and the hold together, like a shipment that
        // never happened: on_hand and reserved both drop.
        let (stock_before, stock_after) = txn.take_from_reservation(fo.reservation_id, sku, missing, true);
        fo.line_mut(sku).expect("checked above").short += missing;
        fo.updated_at_ms = now_ms;
        order.move_units(sku, Bucket::Allocated, Bucket::Unrouted, missing);
        order.ever_short = true;
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            sku: sku.to_string(),
            node_id: fo.node_id.to_string(),
            fulfilment_order_id: id.to_string(),
            qty: missing,
            detail: format!(
                "on_hand {} -> {}, reserved {} -> {}",
                stock_before.on_hand, stock_after.on_hand, stock_before.reserved, stock_after.reserved
            ),
            ..AuditEvent::new("stock.shortage", now_ms, &actor)
        });
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            sku: sku.to_string(),
            node_id: fo.node_id.to_string(),
            fulfilment_order_id: id.to_string(),
            qty: missing,
            ..AuditEvent::new("fulfilment.shortage", now_ms, &actor)
        });
        close_if_done(&mut txn, &fo, &order, &actor);
        write_fulfilment(&mut txn, &fo);
        state.fulfilment.insert(id.0, fo.clone());
        route_order(state, &mut txn, &mut order, crate::orders::book::SYSTEM, self.rules.max_shipments);
        finish_order(state, &mut txn, &mut order, before, crate::orders::book::SYSTEM, false);
        if !key.is_empty() {
            let response = encode(&fo, &order);
            remember(state, &mut txn, IdemNamespace::Shortage, key, command.fingerprint, response);
        }
        state.put_order(order.clone());
        let ack = txn.commit();
        Ok(Committed { value: Outcome::Done((fo, order)), ack: Some(ack) })
    }

    /// Every shipped unit of the fulfilment order was delivered (or picked up).
    pub fn confirm_delivery(&self, id: FulfilmentOrderId) -> Result<Committed<Shipped>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut fo = state.fulfilment.get(&id.0).cloned().ok_or_else(|| not_found_fo(id))?;
        match fo.status() {
            FulfilmentStatus::Delivered => {
                let order = state.orders[&fo.order_id.0].clone();
                drop(guard);
                return self.after_barrier((fo, order));
            }
            FulfilmentStatus::Shipped => {}
            other => {
                return Err(IndexError::FailedPrecondition(format!(
                    "fulfilment order {id} is {other:?}: only a SHIPPED one can be delivered"
                )));
            }
        }
        let mut order = state.orders[&fo.order_id.0].clone();
        let mut txn = self.index.begin(&[])?;
        let now_ms = txn.now_ms();
        let before = order.status;
        let actor = fo.node_id.to_string();
        fo.delivered = true;
        fo.updated_at_ms = now_ms;
        let mut units = 0;
        for line in &fo.lines {
            units += order.mark_delivered(&line.sku, line.shipped);
        }
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            node_id: fo.node_id.to_string(),
            fulfilment_order_id: id.to_string(),
            qty: units,
            ..AuditEvent::new("fulfilment.delivered", now_ms, &actor)
        });
        write_fulfilment(&mut txn, &fo);
        finish_order(state, &mut txn, &mut order, before, &actor, false);
        state.fulfilment.insert(id.0, fo.clone());
        state.put_order(order.clone());
        let ack = txn.commit();
        Ok(Committed { value: (fo, order), ack: Some(ack) })
    }

    /// Opens a return for shipped units.
    pub fn create_return(
        &self,
        command: &ReturnCommand,
        encode: impl FnOnce(&Return) -> Vec<u8>,
    ) -> Result<Committed<Outcome<Return>>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let key = command.idempotency_key.as_str();
        if let Some(replayed) = self.replayed(state, IdemNamespace::ReturnCreate, key, command.fingerprint)? {
            return Ok(replayed);
        }
        let order_id = command.order_id;
        let mut order = state.orders.get(&order_id.0).cloned().ok_or_else(|| not_found_order(order_id))?;
        for (index, (sku, qty, _)) in command.lines.iter().enumerate() {
            if !order.lines.iter().any(|line| line.sku == *sku) {
                return Err(IndexError::FailedPrecondition(format!(
                    "lines[{index}].sku: {sku} is not on order {order_id}"
                )));
            }
            let open: i64 = order
                .return_ids
                .iter()
                .filter_map(|id| state.returns.get(&id.0))
                .map(|value| value.expected(sku))
                .sum();
            let returnable = order.returnable(sku) - open;
            if *qty > returnable {
                return Err(IndexError::FailedPrecondition(format!(
                    "lines[{index}]: {qty} units of {sku} to return, but only {returnable} were shipped and are \
                     neither returned nor on an open return"
                )));
            }
        }
        let mut txn = self.index.begin(&[])?;
        let now_ms = txn.now_ms();
        let before = order.status;
        let id = ReturnId(state.next_return_id);
        state.next_return_id += 1;
        write_counter(&mut txn, keys::META_NEXT_RETURN_ID, state.next_return_id);
        let mut lines: Vec<ReturnLine> = command
            .lines
            .iter()
            .map(|(sku, qty, reason)| ReturnLine {
                sku: sku.clone(),
                qty: *qty,
                reason: reason.clone(),
                received: 0,
                resellable: 0,
            })
            .collect();
        lines.sort_by(|a, b| a.sku.cmp(&b.sku));
        let value =
            Return { id, order_id, lines, refund_amount: 0, created_at_ms: now_ms, updated_at_ms: now_ms };
        order.return_ids.push(id);
        txn.event(AuditEvent {
            order_id: order_id.to_string(),
            return_id: id.to_string(),
            qty: value.lines.iter().map(|line| line.qty).sum(),
            ..AuditEvent::new("return.created", now_ms, order.channel.as_str())
        });
        write_return(&mut txn, &value);
        let actor = order.channel.to_string();
        finish_order(state, &mut txn, &mut order, before, &actor, false);
        if !key.is_empty() {
            remember(state, &mut txn, IdemNamespace::ReturnCreate, key, command.fingerprint, encode(&value));
        }
        state.returns.insert(id.0, value.clone());
        state.put_order(order);
        let ack = txn.commit();
        Ok(Committed { value: Outcome::Done(value), ack: Some(ack) })
    }

    /// Returned units arrive at a node: resellable ones are restocked there; the refund grows.
    pub fn receive_return(
        &self,
        command: &ReceiveCommand,
        encode: impl FnOnce(&Return) -> Vec<u8>,
    ) -> Result<Committed<Outcome<Return>>, IndexError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let key = command.idempotency_key.as_str();
        if let Some(replayed) =
            self.replayed(state, IdemNamespace::ReturnReceive, key, command.fingerprint)?
        {
            return Ok(replayed);
        }
        let id = command.return_id;
        let mut value = state
            .returns
            .get(&id.0)
            .cloned()
            .ok_or_else(|| IndexError::NotFound(format!("return {id} does not exist")))?;
        if self.index.nodes().get(&command.node_id).is_none() {
            return Err(IndexError::NotFound(format!("node_id: node {} does not exist", command.node_id)));
        }
        let mut skus: Vec<Sku> = command.lines.iter().map(|(sku, _, _)| sku.clone()).collect();
        skus.sort();
        skus.dedup();
        for sku in &skus {
            let asked: i64 =
                command.lines.iter().filter(|(line_sku, _, _)| line_sku == sku).map(|(_, qty, _)| qty).sum();
            if !value.lines.iter().any(|line| line.sku == *sku) {
                return Err(IndexError::FailedPrecondition(format!("lines: {sku} is not on return {id}")));
            }
            if asked > value.expected(sku) {
                return Err(IndexError::FailedPrecondition(format!(
                    "lines: {asked} units of {sku} received, {} remain expected on return {id}",
                    value.expected(sku)
                )));
            }
        }
        let mut order = state.orders[&value.order_id.0].clone();
        let mut txn = self.index.begin(&skus)?;
        let now_ms = txn.now_ms();
        let before = order.status;
        let actor = command.node_id.to_string();
        let mut refund = 0i64;
        let mut units = 0;
        for (sku, qty, resellable) in &command.lines {
            let line = value.lines.iter_mut().find(|line| line.sku == *sku).expect("checked above");
            line.received += qty;
            units += qty;
            if *resellable {
                line.resellable += qty;
                let position = txn.adjust_on_hand(sku, &command.node_id, *qty);
                txn.event(AuditEvent {
                    order_id: order.id.to_string(),
                    sku: sku.to_string(),
                    node_id: command.node_id.to_string(),
                    return_id: id.to_string(),
                    qty: *qty,
                    detail: format!("resellable return; on_hand now {}", position.on_hand),
                    ..AuditEvent::new("stock.restocked", now_ms, &actor)
                });
            }
            refund = refund.saturating_add(order.mark_returned(sku, *qty));
        }
        value.refund_amount = value.refund_amount.saturating_add(refund);
        value.updated_at_ms = now_ms;
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            node_id: command.node_id.to_string(),
            return_id: id.to_string(),
            qty: units,
            detail: format!("REFUND_DUE {refund} cents (return total {} cents)", value.refund_amount),
            ..AuditEvent::new("return.received", now_ms, &actor)
        });
        txn.event(AuditEvent {
            order_id: order.id.to_string(),
            return_id: id.to_string(),
            qty: refund,
            detail: format!("refund due: {refund} cents for {units} units"),
            ..AuditEvent::new("return.refund_due", now_ms, &actor)
        });
        write_return(&mut txn, &value);
        finish_order(state, &mut txn, &mut order, before, &actor, false);
        if !key.is_empty() {
            remember(state, &mut txn, IdemNamespace::ReturnReceive, key, command.fingerprint, encode(&value));
        }
        state.returns.insert(id.0, value.clone());
        state.put_order(order);
        let ack = txn.commit();
        Ok(Committed { value: Outcome::Done(value), ack: Some(ack) })
    }
}
