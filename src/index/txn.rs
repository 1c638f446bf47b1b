//! A transaction over the index for the order lifecycle: one order operation (capture, ship,
//! shortage, cancel, return) plans, holds, ships and restocks under the shard locks of the
//! order's SKUs, adds its own records and events, and commits everything as ONE write-ahead
//! mutation. So an order and the stock it moved are on disk together or not at all, and the
//! log order equals the apply order.
//!
//! Rule for callers: decide first (every check that can fail), then change. Once a change was
//! made the transaction must commit: memory already moved, and dropping it unsubmitted would
//! let memory run ahead of disk. `Drop` therefore submits a dirty transaction (and asserts in
//! debug builds that it was committed explicitly).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::allocate::LockedStock;
use super::{Index, IndexError, NodeTable, ShardLocks};
use crate::domain::{
    AuditEvent, Channel, HoldOrigin, NodeId, Position, Reservation, ReservationId, ReservationStatus,
    ReserveLine, Sku,
};
use crate::routing::{self, RoutePlan, RouteRequest, RoutingRules};
use crate::store::keys;
use crate::store::records::{Kind, ReservationRecord};
use crate::store::{Cf, Mutation, Slot};

/// Plans redone at most when capacity was taken between planning and claiming.
const REPLANS_MAX: usize = 4;

pub struct Txn<'a> {
    index: &'a Index,
    nodes: Arc<NodeTable>,
    rules: Arc<RoutingRules>,
    locks: ShardLocks<'a>,
    slot: Option<Slot<'a>>,
    mutation: Mutation,
    now_ms: u64,
    /// Something changed in memory: the mutation must reach the log.
    dirty: bool,
}

impl Index {
    /// Starts a transaction over `skus` (the SKUs of one order): takes a commit-queue slot
    /// (or sheds) and locks their shards.
    pub fn begin(&self, skus: &[Sku]) -> Result<Txn<'_>, IndexError> {
        let slot = self.slot()?;
        let nodes = self.nodes.load_full();
        let rules = self.rules.load_full();
        let locks = self.lock_shards(skus.iter());
        let now_ms = self.clock.now_ms();
        Ok(Txn {
            index: self,
            nodes,
            rules,
            locks,
            slot: Some(slot),
            mutation: Mutation::default(),
            now_ms,
            dirty: false,
        })
    }
}

impl Txn<'_> {
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn nodes(&self) -> &NodeTable {
        &self.nodes
    }

    /// Whether `sku` has a stock position at any node (else an order for it is UNKNOWN_SKU).
    pub fn has_position(&self, sku: &Sku) -> bool {
        let shard = self.locks.shard_ref(self.index.shard_of(sku));
        shard.stock(sku).is_some_and(|stock| stock.positions().next().is_some())
    }

    pub fn position(&self, sku: &Sku, node_id: &NodeId) -> Option<Position> {
        let shard = self.locks.shard_ref(self.index.shard_of(sku));
        shard.stock(sku).and_then(|stock| stock.get(node_id).copied())
    }

    /// Plans `request` against the locked stock and claims one shipment of capacity at each
    /// node of the plan. The caller must then hold every shipment (`hold`) and commit.
    pub fn plan(&mut self, request: &RouteRequest) -> Result<(RoutePlan, u64), IndexError> {
        let day = self.rules.capacity_day(self.now_ms);
        let skus: Vec<Sku> = request.lines.iter().map(|(sku, _)| sku.clone()).collect();
        for attempt in 1..=REPLANS_MAX {
            let stock =
                LockedStock { index: self.index, locks: &self.locks, nodes: &self.nodes, skus: &skus, day };
            let plan = routing::route(request, &self.nodes.sorted_nodes, &stock, &self.rules)?;
            let shipping: Vec<_> = plan
                .shipments
                .iter()
                .filter_map(|shipment| self.nodes.get(&shipment.node_id).cloned())
                .collect();
            if self.index.claim_capacity(&shipping, day) {
                if !shipping.is_empty() {
                    self.dirty = true;
                }
                return Ok((plan, day));
            }
            if attempt == REPLANS_MAX {
                break;
            }
        }
        Err(IndexError::Overloaded)
    }

    /// Holds `lines` at `node_id` for fulfilment order `fulfilment_order_id`: a CONFIRMED
    /// reservation without TTL. The lines fit (the plan said so under these locks).
    pub fn hold(
        &mut self,
        node_id: &NodeId,
        lines: &[(Sku, i64)],
        fulfilment_order_id: u64,
        reference: String,
        channel: Option<Channel>,
        capacity_day: Option<u64>,
    ) -> Reservation {
        self.dirty = true;
        let id = ReservationId(self.index.next_reservation_id.fetch_add(1, Ordering::Relaxed));
        self.mutation.reservation_id_high = Some(id.0);
        let mut reserve_lines = Vec::with_capacity(lines.len());
        for (sku, qty) in lines {
            let node = self.nodes.get(node_id).expect("a planned node exists").clone();
            let shard = self.locks.shard(self.index.shard_of(sku));
            let stock = shard.stock_mut(sku);
            let before = *stock.get(node_id).expect("a planned line has a position");
            assert!(*qty > 0 && *qty <= before.atp(&node), "a planned line fits");
            let position = Position { reserved: before.reserved + qty, ..before };
            self.index.write_position(
                &mut self.mutation,
                &self.nodes,
                sku,
                node_id,
                stock,
                Some(before),
                position,
            );
            reserve_lines.push(ReserveLine { sku: sku.clone(), node_id: node_id.clone(), qty: *qty });
        }
        let reservation = Reservation {
            id,
            status: ReservationStatus::Confirmed,
            lines: reserve_lines,
            reference,
            channel,
            idempotency_key: None,
            created_at_ms: self.now_ms,
            expires_at_ms: None,
            updated_at_ms: self.now_ms,
            origin: HoldOrigin::Fulfilment { order_id: fulfilment_order_id, capacity_day },
        };
        self.write_reservation(&reservation);
        self.index.open_reservation_count.fetch_add(1, Ordering::Relaxed);
        self.index.reservations.insert(id.0, Box::new(reservation.clone()));
        reservation
    }

    /// Takes `qty` units of `sku` out of reservation `id`: shipped (`on_hand` and `reserved`
    /// drop together) or released (`reserved` drops, the units are back in ATP). Returns the
    /// position before and after.
    pub fn take_from_reservation(
        &mut self,
        id: ReservationId,
        sku: &Sku,
        qty: i64,
        shipped: bool,
    ) -> (Position, Position) {
        assert!(qty > 0);
        self.dirty = true;
        let mut reservation =
            self.index.reservations.get_mut(&id.0).expect("an open fulfilment order's reservation exists");
        assert!(reservation.status.is_open(), "taking units from a closed reservation {id}");
        let line = reservation
            .lines
            .iter_mut()
            .find(|line| line.sku == *sku)
            .expect("the reservation holds the sku");
        assert!(line.qty >= qty, "reservation {id} holds {} of {sku}, not {qty}", line.qty);
        line.qty -= qty;
        let node_id = line.node_id.clone();
        reservation.updated_at_ms = self.now_ms;
        let record = ReservationRecord::from_reservation(&reservation);
        drop(reservation);
        self.mutation.put_record(Cf::Reservations, keys::reservation(id), Kind::Reservation, &record);
        let shard = self.locks.shard(self.index.shard_of(sku));
        let stock = shard.stock_mut(sku);
        let before = *stock.get(&node_id).expect("a held line has a position");
        assert!(before.reserved >= qty, "reserved {} below a held line of {qty}", before.reserved);
        let on_hand = if shipped { (before.on_hand - qty).max(0) } else { before.on_hand };
        let position = Position { on_hand, reserved: before.reserved - qty, ..before };
        self.index.write_position(
            &mut self.mutation,
            &self.nodes,
            sku,
            &node_id,
            stock,
            Some(before),
            position,
        );
        (before, position)
    }

    /// Closes a reservation whose units are all taken: FULFILLED when some shipped, RELEASED
    /// when none did (a released one gives its capacity back). Returns the closed reservation.
    pub fn close_reservation(&mut self, id: ReservationId, status: ReservationStatus) -> Reservation {
        assert!(matches!(status, ReservationStatus::Fulfilled | ReservationStatus::Released));
        self.dirty = true;
        let mut reservation = self.index.reservations.get_mut(&id.0).expect("the reservation exists");
        assert!(reservation.status.is_open(), "closing a closed reservation {id}");
        assert!(
            reservation.lines.iter().all(|line| line.qty == 0),
            "closing reservation {id} with units held"
        );
        reservation.status = status;
        reservation.updated_at_ms = self.now_ms;
        self.index.ended.push(self.now_ms, id.0);
        let closed = Reservation::clone(&reservation);
        drop(reservation);
        self.index.open_reservation_count.fetch_sub(1, Ordering::Relaxed);
        if status == ReservationStatus::Released
            && let Some(day) = closed.capacity_day()
        {
            self.index.return_capacity(&closed.lines, day);
        }
        self.write_reservation(&closed);
        closed
    }

    /// Changes `on_hand` of `sku` at `node_id` by `delta` (shortage: negative; restock:
    /// positive), never below zero. Returns the position after. The node exists.
    pub fn adjust_on_hand(&mut self, sku: &Sku, node_id: &NodeId, delta: i64) -> Position {
        self.dirty = true;
        let shard = self.locks.shard(self.index.shard_of(sku));
        let stock = shard.stock_mut(sku);
        let before = stock.get(node_id).copied();
        let mut position = before.unwrap_or_default();
        position.on_hand = position.on_hand.saturating_add(delta).max(0);
        if before.is_none() {
            self.index.position_count.fetch_add(1, Ordering::Relaxed);
        }
        self.index.write_position(&mut self.mutation, &self.nodes, sku, node_id, stock, before, position);
        position
    }

    /// Whether the transaction changed anything (then it must commit).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    pub fn put(&mut self, cf: Cf, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.dirty = true;
        self.mutation.put(cf, key, value);
    }

    pub fn delete(&mut self, cf: Cf, key: impl AsRef<[u8]>) {
        self.dirty = true;
        self.mutation.delete(cf, key);
    }

    pub fn event(&mut self, event: AuditEvent) {
        self.dirty = true;
        self.mutation.audit.push(event);
    }

    /// Submits the mutation while the locks are still held; resolves when it is durable.
    pub fn commit(mut self) -> oneshot::Receiver<()> {
        let ack = self.mutation.acknowledged();
        self.submit();
        ack
    }

    fn submit(&mut self) {
        let slot = self.slot.take().expect("a transaction is submitted once");
        let mutation = std::mem::take(&mut self.mutation);
        self.index.wal.submit(slot, mutation);
        self.dirty = false;
    }

    fn write_reservation(&mut self, reservation: &Reservation) {
        self.mutation.put_record(
            Cf::Reservations,
            keys::reservation(reservation.id),
            Kind::Reservation,
            &ReservationRecord::from_reservation(reservation),
        );
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if self.dirty && self.slot.is_some() {
            debug_assert!(std::thread::panicking(), "a dirty transaction was dropped without commit");
            // Memory moved: the log must follow, acknowledged or not.
            self.submit();
        }
    }
}
