//! Route (read-only planning) and Allocate (plan and reserve in one step), plus the node
//! capacity they consume.
//!
//! Allocate plans while holding the shard locks of every requested SKU, so the plan's units
//! are exactly what is there: no unit is promised twice, and no plan is returned for units
//! another request took in between. Capacity is per node, not per shard, so it is claimed
//! with a check-and-increment after planning; when another request took a node's last slot
//! meanwhile, the plan is redone under the same locks (a bounded number of times).
//! Capacity is not stored on its own: it is the count of today's open or fulfilled
//! allocations per node, rebuilt from the reservations at start-up.

use std::borrow::Cow;
use std::sync::Arc;

use super::{
    Claim, Hold, HoldMaker, IdemEntry, IdemOutcome, Index, IndexError, NodeTable, Pending, ShardLocks, actor,
};
use crate::domain::{
    AuditEvent, IdempotencyKey, Node, NodeId, ReservationId, ReservationStatus, ReserveLine, Sku,
};
use crate::routing::{self, RouteError, RoutePlan, RouteRequest, RoutingRules, StockSource};
use crate::store::keys::{self, IdemNamespace};
use crate::store::records::{IdempotencyRecord, Kind};
use crate::store::{Cf, Mutation};

/// Plans redone at most when capacity was taken between planning and claiming.
const REPLANS_MAX: usize = 4;

#[derive(Debug, Clone)]
pub struct AllocateCommand {
    pub idempotency_key: IdempotencyKey,
    pub request: RouteRequest,
    pub ttl_ms: u64,
    pub reference: String,
    /// Digest of the whole request (the API layer computes it from the wire form).
    pub fingerprint: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AllocateOutcome {
    /// The plan's shipments are held by `reservation`.
    Reserved { plan: RoutePlan, reservation: ReservationId, expires_at_ms: Option<u64> },
    /// Nothing to hold (no shipments): not remembered, a retry plans again.
    Unreserved { plan: RoutePlan },
    /// A replay: the original response is in the idempotency record of this key (read it
    /// with `Store::read_idempotency` once this is durable).
    Replayed,
}

/// Capacity used on one capacity day.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CapacityUse {
    day: u64,
    used: i64,
}

impl From<RouteError> for IndexError {
    fn from(error: RouteError) -> Self {
        match error {
            RouteError::UnknownPickupNode(_) => IndexError::NotFound(error.to_string()),
        }
    }
}

/// ATP read straight from the locked shards.
pub(super) struct LockedStock<'a, 'b> {
    pub(super) index: &'a Index,
    pub(super) locks: &'b ShardLocks<'a>,
    pub(super) nodes: &'b NodeTable,
    pub(super) skus: &'b [Sku],
    pub(super) day: u64,
}

impl StockSource for LockedStock<'_, '_> {
    fn line_atp(&self, line: usize) -> Cow<'_, [(NodeId, i64)]> {
        let sku = &self.skus[line];
        let shard = self.locks.shard_ref(self.index.shard_of(sku));
        Cow::Owned(shard.stock(sku).map_or_else(Vec::new, |stock| stock_atp(stock, self.nodes)))
    }

    fn has_capacity(&self, node: &Node) -> bool {
        self.index.has_capacity(node, self.day)
    }
}

/// ATP copied out of the shards one SKU at a time (Route holds no lock while planning).
struct SnapshotStock<'a> {
    index: &'a Index,
    /// Per line: (node, ATP), sorted by node.
    atp: Vec<Vec<(NodeId, i64)>>,
    day: u64,
}

impl StockSource for SnapshotStock<'_> {
    fn line_atp(&self, line: usize) -> Cow<'_, [(NodeId, i64)]> {
        // Lent, not cloned: Route already copied these out of the shards.
        Cow::Borrowed(&self.atp[line])
    }

    fn has_capacity(&self, node: &Node) -> bool {
        self.index.has_capacity(node, self.day)
    }
}

impl Index {
    pub fn routing_rules(&self) -> Arc<RoutingRules> {
        self.rules.load_full()
    }

    /// Replaces the routing rules (configuration reload).
    pub fn set_routing_rules(&self, rules: RoutingRules) {
        self.rules.store(Arc::new(rules));
    }

    /// Whether `node` can take one more shipment on capacity day `day`.
    pub fn has_capacity(&self, node: &Node, day: u64) -> bool {
        node.daily_capacity == 0 || self.capacity_used(&node.node_id, day) < node.daily_capacity
    }

    /// Shipments `node_id` took on capacity day `day`.
    pub fn capacity_used(&self, node_id: &NodeId, day: u64) -> i64 {
        self.capacity.get(node_id).filter(|used| used.day == day).map_or(0, |used| used.used)
    }

    /// Counts a recovered allocation's capacity (start-up). Every allocation counts at every
    /// node it ships from, limited or not, so a limit set mid-day sees the day's shipments and
    /// a release gives back exactly what was counted.
    pub(super) fn recount_capacity(&self, lines: &[ReserveLine], day: u64) {
        for node_id in distinct_nodes(lines) {
            let mut entry = self.capacity.entry(node_id).or_default();
            if entry.day != day {
                *entry = CapacityUse { day, used: 0 };
            }
            entry.used += 1;
        }
    }

    /// Gives back the capacity of an allocation that released its units on `day`.
    pub(super) fn return_capacity(&self, lines: &[ReserveLine], day: u64) {
        for node_id in distinct_nodes(lines) {
            if let Some(mut entry) = self.capacity.get_mut(&node_id)
                && entry.day == day
                && entry.used > 0
            {
                entry.used -= 1;
            }
        }
    }

    /// Claims one shipment of capacity at each node (counted at unlimited nodes too); all or
    /// none.
    pub(super) fn claim_capacity(&self, nodes: &[Arc<Node>], day: u64) -> bool {
        let mut claimed: Vec<&NodeId> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let mut entry = self.capacity.entry(node.node_id.clone()).or_default();
            if entry.day != day {
                *entry = CapacityUse { day, used: 0 };
            }
            if node.daily_capacity > 0 && entry.used >= node.daily_capacity {
                drop(entry);
                for node_id in claimed {
                    if let Some(mut entry) = self.capacity.get_mut(node_id) {
                        entry.used -= 1;
                    }
                }
                return false;
            }
            entry.used += 1;
            claimed.push(&node.node_id);
        }
        true
    }

    /// Plans without reserving. ATP is read one SKU at a time, so the plan reflects stock
    /// at about the moment of the call (a quote; Allocate is the promise).
    pub fn route(&self, request: &RouteRequest) -> Result<RoutePlan, IndexError> {
        let nodes = self.nodes.load();
        let rules = self.rules.load();
        let atp = request
            .lines
            .iter()
            .map(|(sku, _)| {
                let shard = self.shards[self.shard_of(sku)].lock();
                shard.stock(sku).map_or_else(Vec::new, |stock| stock_atp(stock, &nodes))
            })
            .collect();
        let stock = SnapshotStock { index: self, atp, day: rules.capacity_day(self.clock.now_ms()) };
        Ok(routing::route(request, &nodes.sorted_nodes, &stock, &rules)?)
    }

    /// Plans and reserves atomically, idempotent by the command's key. `encode` turns the
    /// outcome into the response bytes remembered for replays.
    pub fn allocate(
        &self,
        command: &AllocateCommand,
        encode: impl FnOnce(&RoutePlan, ReservationId, Option<u64>) -> Vec<u8>,
    ) -> Result<Pending<AllocateOutcome>, IndexError> {
        let nodes = self.nodes.load();
        let rules = self.rules.load();
        let slot = self.slot()?;
        let skus: Vec<Sku> = command.request.lines.iter().map(|(sku, _)| sku.clone()).collect();
        let mut locks = self.lock_shards(skus.iter());
        let key = &command.idempotency_key;
        let vacant =
            match self.claim_key(IdemNamespace::Allocate, key, command.fingerprint, "idempotency_key")? {
                Claim::New(vacant) => vacant,
                Claim::Replay(IdemOutcome::Allocated) => {
                    drop((locks, slot));
                    return self.barrier(AllocateOutcome::Replayed);
                }
                Claim::Replay(_) => unreachable!("the allocate namespace holds only allocations"),
            };
        let now_ms = self.clock.now_ms();
        let day = rules.capacity_day(now_ms);
        let mut attempt = 0;
        let plan = loop {
            attempt += 1;
            let stock = LockedStock { index: self, locks: &locks, nodes: &nodes, skus: &skus, day };
            let plan = routing::route(&command.request, &nodes.sorted_nodes, &stock, &rules)?;
            let shipping: Vec<Arc<Node>> =
                plan.shipments.iter().filter_map(|shipment| nodes.get(&shipment.node_id).cloned()).collect();
            if self.claim_capacity(&shipping, day) {
                break plan;
            }
            if attempt >= REPLANS_MAX {
                return Err(IndexError::Overloaded);
            }
        };
        let lines: Vec<ReserveLine> = plan
            .reserved_lines()
            .into_iter()
            .map(|(sku, node_id, qty)| ReserveLine { sku, node_id, qty })
            .collect();
        if lines.is_empty() {
            return Ok(Pending { value: AllocateOutcome::Unreserved { plan }, ack: None });
        }
        let mut mutation = Mutation::default();
        let hold = Hold {
            lines,
            ttl_ms: command.ttl_ms,
            reference: command.reference.clone(),
            channel: command.request.channel.clone(),
            idempotency_key: command.idempotency_key.clone(),
            made_by: HoldMaker::Allocate { capacity_day: day },
        };
        let reservation = self.create_hold(&mut locks, &nodes, &mut mutation, hold, now_ms);
        let (id, expires_at_ms) = (reservation.id, reservation.expires_at_ms);
        let response = encode(&plan, id, expires_at_ms);
        let record = IdempotencyRecord {
            fingerprint: command.fingerprint,
            created_at_ms: now_ms,
            reservation_id: Some(id.0),
            expires_at_ms,
            positions: Vec::new(),
            response,
        };
        mutation.put_record(
            Cf::Idempotency,
            keys::idempotency(IdemNamespace::Allocate, command.idempotency_key.as_str()),
            Kind::Idempotency,
            &record,
        );
        // The decision, explained, in the audit log.
        mutation.audit.push(AuditEvent {
            reservation_id: Some(id.0),
            detail: plan.summary(),
            qty: reservation.lines.iter().map(|line| line.qty).sum(),
            ..AuditEvent::new("allocation.planned", now_ms, actor(command.request.channel.as_ref()))
        });
        let ack = mutation.acknowledged();
        self.wal.submit(slot, mutation);
        self.track_hold(reservation);
        self.remember_key(
            vacant,
            IdemEntry {
                fingerprint: command.fingerprint,
                created_at_ms: now_ms,
                outcome: IdemOutcome::Allocated,
            },
        );
        drop(locks);
        Ok(Pending::ready(AllocateOutcome::Reserved { plan, reservation: id, expires_at_ms }, ack))
    }
}

/// Whether a reservation in `status` still counts against capacity.
pub(super) fn counts_capacity(status: ReservationStatus) -> bool {
    matches!(status, ReservationStatus::Held | ReservationStatus::Confirmed | ReservationStatus::Fulfilled)
}

/// A SKU's ATP per node, sorted by node (positions are kept in that order).
fn stock_atp(stock: &super::shard::SkuStock, nodes: &NodeTable) -> Vec<(NodeId, i64)> {
    stock
        .positions()
        .map(|(node_id, position)| (node_id.clone(), nodes.get(node_id).map_or(0, |node| position.atp(node))))
        .collect()
}

fn distinct_nodes(lines: &[ReserveLine]) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = lines.iter().map(|line| line.node_id.clone()).collect();
    nodes.sort();
    nodes.dedup();
    nodes
}
