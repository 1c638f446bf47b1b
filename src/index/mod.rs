//! The lock-sharded availability index: positions (SKU × node) in a power-of-two number of
//! shards chosen by a hash of the SKU, reservations, idempotency keys, the expiry queue and
//! the retention queues.
//!
//! HOT PATH (reserve, availability): no logging, no I/O, no global lock, no `.await`.
//! A request locks the shards it touches in ascending index order (so two requests can never
//! wait on each other in a cycle), decides with a pure function from `domain`, applies, and
//! hands its write-ahead record to the commit thread *while the locks are held*, so that the
//! log order equals the apply order for every position. Lock order, outermost first:
//! `node_writer` → shards (ascending) → idempotency entry → reservation entry. The expiry and
//! retention queues' locks are leaves: taken under any of these, nothing taken under them.
//!
//! May import `domain`, `clock` and `store`; must not import `api` or anything of tonic.

mod allocate;
mod errors;
mod expiry;
mod retention;
mod shard;
mod txn;

pub use allocate::{AllocateCommand, AllocateOutcome};
pub use errors::IndexError;
pub use txn::Txn;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::domain::{
    self, AdjustStockCommand, AuditEvent, AvailabilityChange, Channel, HoldOrigin, IdempotencyKey, Limits,
    Node, NodeId, Position, PositionView, Reservation, ReservationId, ReservationStatus, ReserveCommand,
    ReserveLine, ReserveRequest, Shortfall, Sku, StockEntry, Transition, TransitionOutcome,
};
use crate::routing::RoutingRules;
use crate::store::keys::{self, IdemNamespace};
use crate::store::records::{
    self, IdempotencyRecord, Kind, NodeRecord, PositionRecord, PositionViewRecord, ReservationRecord,
};
use crate::store::{Cf, Mutation, Recovered, Refused, Slot, WalHandle};
use expiry::ExpiryQueue;
use retention::RetentionQueue;
use shard::{Shard, SkuStock};

/// Index sizing and retention.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Number of shards; a power of two.
    pub shard_count: usize,
    /// How long released/expired/fulfilled reservations stay readable.
    pub terminal_retention_ms: u64,
    /// How long an idempotency key is remembered.
    pub idempotency_retention_ms: u64,
    pub limits: Limits,
    /// Routing rules at start-up (reloadable later).
    pub rules: RoutingRules,
}

/// The node table, replaced whole on every UpsertNodes (readers never lock).
#[derive(Debug, Default)]
pub struct NodeTable {
    /// Looked up several times per reservation: foldhash, not SipHash.
    by_id: std::collections::HashMap<NodeId, Arc<Node>, FastHash>,
    /// The same nodes ordered by id (routing walks them in this order).
    sorted_nodes: Vec<Arc<Node>>,
}

impl NodeTable {
    fn new(nodes: impl IntoIterator<Item = Node>) -> Self {
        let by_id: std::collections::HashMap<NodeId, Arc<Node>, FastHash> =
            nodes.into_iter().map(|node| (node.node_id.clone(), Arc::new(node))).collect();
        let mut sorted_nodes: Vec<Arc<Node>> = by_id.values().cloned().collect();
        sorted_nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Self { by_id, sorted_nodes }
    }

    pub fn get(&self, node_id: &NodeId) -> Option<&Arc<Node>> {
        self.by_id.get(node_id)
    }

    pub fn get_str(&self, node_id: &str) -> Option<&Arc<Node>> {
        self.by_id.get(node_id)
    }

    /// The table's own copy of `node_id`, so that millions of positions share one string per
    /// node instead of holding one each.
    pub fn shared_id(&self, node_id: &NodeId) -> NodeId {
        self.by_id.get(node_id).map_or_else(|| node_id.clone(), |node| node.node_id.clone())
    }

    /// Every node, ordered by id.
    pub fn sorted(&self) -> &[Arc<Node>] {
        &self.sorted_nodes
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// The result of a mutation that is applied in memory and on its way to disk. Reply only after
/// `durable()`: that is what makes the response a promise.
#[must_use]
pub struct Pending<T> {
    value: T,
    ack: Option<oneshot::Receiver<()>>,
}

impl<T> Pending<T> {
    fn ready(value: T, ack: oneshot::Receiver<()>) -> Self {
        Self { value, ack: Some(ack) }
    }

    /// Waits for the group commit that holds this change (or, for a replay, everything
    /// before it).
    pub async fn durable(self) -> Result<T, IndexError> {
        if let Some(ack) = self.ack {
            ack.await.map_err(|_| IndexError::Unavailable)?;
        }
        Ok(self.value)
    }

    /// Separates the value (applied in memory already) from its durability, so a caller can
    /// pipeline several mutations and await them together.
    pub fn split(self) -> (T, Durable) {
        (self.value, Durable { ack: self.ack })
    }

    /// For callers outside an async context (tests, background thread): block.
    pub fn durable_blocking(self) -> Result<T, IndexError> {
        if let Some(ack) = self.ack {
            ack.blocking_recv().map_err(|_| IndexError::Unavailable)?;
        }
        Ok(self.value)
    }
}

/// Whose acknowledgement a reservation's mutation carries.
#[derive(Clone, Copy)]
enum Ack {
    /// Its own: the caller awaits this reservation alone.
    Own,
    /// None: a barrier submitted after it (by `ReserveBatch::finish`) stands for it.
    Shared,
}

/// Reservations decided one after another that become durable together (`ReserveBatch`).
/// Each item locks its own shards and hands its own mutation to the commit thread in turn,
/// as `Index::reserve` does, but without an acknowledgement of its own; `finish` then submits
/// one empty mutation whose acknowledgement, since the commit thread takes mutations in order
/// and acknowledges a group commit only once it is durable, stands for every item before it.
/// That saves a channel per item, and the call waits once.
pub struct ReserveBatch<'a> {
    index: &'a Index,
    /// The place in the commit queue for the closing barrier, taken up front.
    barrier: Slot<'a>,
}

impl ReserveBatch<'_> {
    /// One item: the outcome is applied in memory, durable once `finish`'s barrier is.
    pub fn reserve(&self, command: ReserveCommand) -> Result<ReserveOutcome, IndexError> {
        let pending = self.index.reserve_with(command, Ack::Shared)?;
        debug_assert!(pending.ack.is_none());
        Ok(pending.value)
    }

    /// Submits the barrier: resolves once every item reserved before it is durable.
    pub fn finish(self) -> Durable {
        Durable { ack: Some(self.index.submit_barrier(self.barrier)) }
    }
}

/// The durability of a mutation whose value was taken with `Pending::split`.
#[must_use]
pub struct Durable {
    ack: Option<oneshot::Receiver<()>>,
}

/// Resolves once the mutation is durable (awaiting `&mut durable` leaves it in place).
impl std::future::Future for Durable {
    type Output = Result<(), IndexError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.ack.as_mut() {
            None => std::task::Poll::Ready(Ok(())),
            Some(ack) => {
                std::pin::Pin::new(ack).poll(cx).map(|acked| acked.map_err(|_| IndexError::Unavailable))
            }
        }
    }
}

impl Durable {
    pub fn wait_blocking(self) -> Result<(), IndexError> {
        match self.ack {
            Some(ack) => ack.blocking_recv().map_err(|_| IndexError::Unavailable),
            None => Ok(()),
        }
    }
}

/// What a Reserve decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    Reserved { id: ReservationId, expires_at_ms: Option<u64> },
    Insufficient(Vec<Shortfall>),
}

/// The availability of one SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvailabilityItem {
    pub sku: String,
    pub total_atp: i64,
    /// Ordered by node id.
    pub nodes: Vec<PositionView>,
}

/// What a new hold carries (Reserve, Allocate).
struct Hold {
    lines: Vec<ReserveLine>,
    ttl_ms: u64,
    reference: String,
    channel: Option<Channel>,
    idempotency_key: IdempotencyKey,
    made_by: HoldMaker,
}

/// Which request makes a hold (it becomes the reservation's `HoldOrigin`).
enum HoldMaker {
    /// Reserve, with its request's fingerprint (see `Reservation::reserve_request`).
    Reserve { fingerprint: u64 },
    /// Allocate, which consumed node capacity on that capacity day.
    Allocate { capacity_day: u64 },
}

/// A remembered idempotent outcome.
#[derive(Debug, Clone)]
struct IdemEntry {
    fingerprint: u64,
    created_at_ms: u64,
    outcome: IdemOutcome,
}

#[derive(Debug, Clone)]
enum IdemOutcome {
    Reserved {
        id: ReservationId,
        expires_at_ms: Option<u64>,
        /// Whether the key has a record of its own in the store. A new key has not: the
        /// reservation's record remembers it, until the purge forgets the reservation first.
        own_record: bool,
    },
    Adjusted(Vec<PositionView>),
    /// Allocate: the response stays on disk only (it holds the whole plan; a replay reads it
    /// back), so memory holds just the key and fingerprint.
    Allocated,
}

type IdemMapKey = (IdemNamespace, Arc<str>);

/// The reservation map's hash of an id. Ids are made by this process in ascending order, never
/// chosen by a client, so the hash can serve memory locality instead of spreading: the low 8
/// bits pick one of DashMap's 256 shards (bits 49..57 of the hash, below hashbrown's 7-bit tag),
/// and the rest, in order, pick the bucket within it. Consecutive holds in a shard then take
/// neighbouring buckets and control bytes, which the previous inserts have just brought into
/// the cache, instead of a cache miss in a table of a million entries each. The tag (top 7
/// bits) still comes from a multiplicative mix, so a probe compares few keys.
/// Public for the benches, which compare it with foldhash.
#[derive(Clone, Copy, Default)]
pub struct ReservationIdHash;

impl std::hash::BuildHasher for ReservationIdHash {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

pub struct IdHasher(u64);

/// DashMap's shard of a hash is `(hash << 7) >> (64 - log2(shards))`: bits 49..57 for 256.
const ID_HASH_SHARD_SHIFT: u32 = 64 - 7 - MAP_SHARDS.trailing_zeros();
const _: () = assert!(MAP_SHARDS == 256, "IdHasher puts 8 bits of shard below the tag");

/// The reservation map's shards (the benches build the same map).
pub const RESERVATION_MAP_SHARDS: usize = MAP_SHARDS;

impl std::hash::Hasher for IdHasher {
    fn write_u64(&mut self, id: u64) {
        let tag = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (0x7F << 57);
        let shard = (id & (MAP_SHARDS as u64 - 1)) << ID_HASH_SHARD_SHIFT;
        let bucket = (id >> MAP_SHARDS.trailing_zeros()) & ((1 << ID_HASH_SHARD_SHIFT) - 1);
        self.0 = tag | shard | bucket;
    }

    /// Only `u64` ids are hashed; anything else is folded into one as a fallback.
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*byte)).wrapping_mul(0x51_7C_C1_B7_27_22_0A_95);
        }
        let folded = self.0;
        self.write_u64(folded);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// foldhash with a per-process random seed: several times cheaper than SipHash on these short
/// keys, and idempotency keys (chosen by clients) still cannot be aimed at one bucket offline.
type FastHash = foldhash::fast::RandomState;

/// Shards of the reservation and idempotency maps (see `Index::reservations`).
const MAP_SHARDS: usize = 256;

/// SKUs remembered as risen between two backorder passes; beyond, "everything rose".
const RISEN_SKUS_MAX: usize = 65_536;

/// SKUs whose ATP rose since the backorder retry last looked.
#[derive(Default)]
struct Risen {
    skus: std::collections::HashSet<Sku>,
    overflowed: bool,
}

/// What `Index::claim_key` found.
enum Claim<'a> {
    /// A new key, held until the outcome is inserted.
    New(dashmap::mapref::entry::VacantEntry<'a, IdemMapKey, IdemEntry>),
    /// The outcome remembered for this key and request.
    Replay(IdemOutcome),
}

pub struct Index {
    shards: Box<[Mutex<Shard>]>,
    shard_mask: usize,
    nodes: ArcSwap<NodeTable>,
    /// Serialises node table replacements (admin only).
    node_writer: Mutex<()>,
    /// Both maps have many shards so that growing one (a rehash under its write lock) moves
    /// few entries: with DashMap's default 8, a shard of 100,000 reservations stalled every
    /// request hashing to it for tens of milliseconds while it doubled.
    /// Boxed: a reservation is ~200 bytes, and a growing map moves every entry it holds.
    reservations: DashMap<u64, Box<Reservation>, ReservationIdHash>,
    idempotency: DashMap<IdemMapKey, IdemEntry, FastHash>,
    expiry: ExpiryQueue,
    /// Terminal reservations by the time they ended, and idempotency keys by the time they
    /// were made: what the retention purge forgets, in the order it becomes due.
    ended: RetentionQueue<u64>,
    keys: RetentionQueue<IdemMapKey>,
    /// Shipments taken per node on the current capacity day (see `allocate`).
    capacity: DashMap<NodeId, allocate::CapacityUse>,
    rules: ArcSwap<RoutingRules>,
    /// SKUs whose ATP rose (a leaf lock: taken under shard locks, nothing taken under it).
    risen: Mutex<Risen>,
    next_reservation_id: AtomicU64,
    /// Gauges, kept as counters so the hot path only does an atomic add.
    position_count: AtomicI64,
    open_reservation_count: AtomicI64,
    wal: WalHandle,
    clock: Arc<dyn Clock>,
    options: IndexOptions,
}

impl Index {
    /// Builds the index from what the store recovered.
    pub fn new(options: IndexOptions, recovered: Recovered, wal: WalHandle, clock: Arc<dyn Clock>) -> Self {
        assert!(options.shard_count.is_power_of_two(), "shard_count must be a power of two");
        let shards: Box<[Mutex<Shard>]> =
            (0..options.shard_count).map(|_| Mutex::new(Shard::default())).collect();
        let mut index = Self {
            shards,
            shard_mask: options.shard_count - 1,
            nodes: ArcSwap::from_pointee(NodeTable::new(recovered.nodes)),
            node_writer: Mutex::new(()),
            reservations: DashMap::with_hasher_and_shard_amount(ReservationIdHash, MAP_SHARDS),
            idempotency: DashMap::with_hasher_and_shard_amount(FastHash::default(), MAP_SHARDS),
            expiry: ExpiryQueue::new(options.shard_count),
            ended: RetentionQueue::new(options.shard_count),
            keys: RetentionQueue::new(options.shard_count),
            capacity: DashMap::new(),
            rules: ArcSwap::from_pointee(options.rules.clone()),
            risen: Mutex::new(Risen::default()),
            next_reservation_id: AtomicU64::new(recovered.next_reservation_id.max(1)),
            position_count: AtomicI64::new(0),
            open_reservation_count: AtomicI64::new(0),
            wal,
            clock,
            options,
        };
        let table = index.nodes.load_full();
        // Each SKU's positions arrive sorted by node id, as SkuStock keeps them: the group moves
        // in as it is (its node ids swapped for the node table's shared ones).
        let per_shard = recovered.positions.len() / index.shards.len() + 1;
        for shard in &index.shards {
            shard.lock().skus.reserve(per_shard);
        }
        for (sku, mut group) in recovered.positions {
            for (node_id, _) in &mut group {
                *node_id = table.shared_id(node_id);
            }
            let shard_index = index.shard_of(&sku);
            index.shards[shard_index].lock().skus.insert(sku, SkuStock::from_sorted(group));
        }
        index.position_count.store(recovered.position_count as i64, Ordering::Relaxed);
        let now_ms = index.clock.now_ms();
        let today = index.options.rules.capacity_day(now_ms);
        let key_cutoff = now_ms.saturating_sub(index.options.idempotency_retention_ms);
        let mut ended = Vec::new();
        let mut keys = Vec::with_capacity(recovered.reservations.len() + recovered.idempotency.len());
        let mut unplaced = Vec::new();
        for reservation in recovered.reservations {
            if !reservation.status.is_open() {
                ended.push((reservation.updated_at_ms, reservation.id.0));
            } else {
                // A position's `reserved` is the sum of the open holds on it (not stored).
                for line in &reservation.lines {
                    let shard = index.shards[index.shard_of(&line.sku)].get_mut();
                    match shard.skus.get_mut(&line.sku).and_then(|stock| stock.get_mut(&line.node_id)) {
                        Some(position) => position.reserved += line.qty,
                        None if line.qty != 0 => unplaced.push((reservation.id, line.clone())),
                        None => {}
                    }
                }
            }
            if reservation.capacity_day() == Some(today) && allocate::counts_capacity(reservation.status) {
                index.recount_capacity(&reservation.lines, today);
            }
            if reservation.status.is_open() {
                index.open_reservation_count.fetch_add(1, Ordering::Relaxed);
            }
            if let (ReservationStatus::Held, Some(expires_at_ms)) =
                (reservation.status, reservation.expires_at_ms)
            {
                index.expiry.push(reservation.id, expires_at_ms);
            }
            // A Reserve key its reservation remembers, unless past its retention (the purge
            // would forget it at its next tick; it may have done so already).
            if let (Some(request), Some(key)) = (reservation.reserve_request(), &reservation.idempotency_key)
                && reservation.created_at_ms >= key_cutoff
            {
                let entry = IdemEntry {
                    fingerprint: request.fingerprint,
                    created_at_ms: reservation.created_at_ms,
                    outcome: IdemOutcome::Reserved {
                        id: reservation.id,
                        expires_at_ms: request.expires_at_ms,
                        own_record: false,
                    },
                };
                index.recover_key((IdemNamespace::Reserve, key.shared()), entry, &mut keys);
            }
            index.reservations.insert(reservation.id.0, Box::new(reservation));
        }
        if let Some((id, line)) = unplaced.first() {
            // Only a damaged store has these (positions are never deleted): serve on, and let
            // the consistency check name them as drift.
            tracing::error!(
                lines = unplaced.len(),
                first = %format_args!("reservation {id} holds {} of {} at {}", line.qty, line.sku, line.node_id),
                "open reservations hold units at positions the store does not have"
            );
        }
        ended.sort_unstable();
        index.ended = RetentionQueue::from_sorted(index.options.shard_count, ended);
        for (namespace, key, record) in recovered.idempotency {
            let outcome = match namespace {
                IdemNamespace::Reserve => IdemOutcome::Reserved {
                    id: ReservationId(record.reservation_id.unwrap_or_default()),
                    expires_at_ms: record.expires_at_ms,
                    own_record: true,
                },
                IdemNamespace::Adjust => IdemOutcome::Adjusted(
                    record.positions.into_iter().filter_map(|view| view.into_view().ok()).collect(),
                ),
                IdemNamespace::Allocate => IdemOutcome::Allocated,
                // The order book keeps these (the store hands them over separately).
                IdemNamespace::Shipment
                | IdemNamespace::Shortage
                | IdemNamespace::ReturnCreate
                | IdemNamespace::ReturnReceive => continue,
            };
            let entry =
                IdemEntry { fingerprint: record.fingerprint, created_at_ms: record.created_at_ms, outcome };
            index.recover_key((namespace, Arc::from(key.as_str())), entry, &mut keys);
        }
        keys.sort_unstable_by_key(|(created_at_ms, _)| *created_at_ms);
        index.keys = RetentionQueue::from_sorted(index.options.shard_count, keys);
        index
    }

    pub fn limits(&self) -> &Limits {
        &self.options.limits
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn nodes(&self) -> Arc<NodeTable> {
        self.nodes.load_full()
    }

    pub fn wal(&self) -> &WalHandle {
        &self.wal
    }

    pub fn position_count(&self) -> i64 {
        self.position_count.load(Ordering::Relaxed)
    }

    pub fn open_reservation_count(&self) -> i64 {
        self.open_reservation_count.load(Ordering::Relaxed)
    }

    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    fn shard_of(&self, sku: &Sku) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hasher = BuildHasherDefault::<rustc_hash::FxHasher>::default();
        (hasher.hash_one(sku.as_str()) as usize) & self.shard_mask
    }

    /// Locks the shards of `skus` in ascending order; the guards are indexed by shard number.
    fn lock_shards<'a, 'b>(&'a self, skus: impl Iterator<Item = &'b Sku>) -> ShardLocks<'a> {
        let mut indexes: Vec<usize> = skus.map(|sku| self.shard_of(sku)).collect();
        indexes.sort_unstable();
        indexes.dedup();
        let guards = indexes.iter().map(|index| self.shards[*index].lock()).collect();
        ShardLocks { indexes, guards }
    }

    fn lock_all_shards(&self) -> ShardLocks<'_> {
        let indexes: Vec<usize> = (0..self.shards.len()).collect();
        let guards = self.shards.iter().map(|shard| shard.lock()).collect();
        ShardLocks { indexes, guards }
    }

    fn slot(&self) -> Result<Slot<'_>, IndexError> {
        self.wal.try_slot().map_err(|refused| match refused {
            Refused::QueueFull => IndexError::Overloaded,
            Refused::DiskLow(low) => IndexError::DiskFull(low.to_string()),
        })
    }

    /// Looks up an idempotency key while the caller holds the shard locks of its request: a
    /// new key is claimed (the entry stays locked until the caller inserts its outcome), a
    /// known key with the same fingerprint is a replay, and one with another fingerprint is
    /// ALREADY_EXISTS. `field` names the key in that error.
    fn claim_key(
        &self,
        namespace: IdemNamespace,
        key: &IdempotencyKey,
        fingerprint: u64,
        field: &str,
    ) -> Result<Claim<'_>, IndexError> {
        match self.idempotency.entry((namespace, key.shared())) {
            Entry::Vacant(vacant) => Ok(Claim::New(vacant)),
            Entry::Occupied(occupied) if occupied.get().fingerprint == fingerprint => {
                Ok(Claim::Replay(occupied.get().outcome.clone()))
            }
            Entry::Occupied(_) => {
                Err(IndexError::AlreadyExists(format!("{field} {key:?} was used for a different request")))
            }
        }
    }

    /// Start-up: remembers a recovered key, and lists it for the retention queue. Where two
    /// records name one key (a key forgotten and made again, while the reservation it first
    /// made is kept), the younger wins.
    fn recover_key(&self, key: IdemMapKey, entry: IdemEntry, queue: &mut Vec<(u64, IdemMapKey)>) {
        match self.idempotency.entry(key) {
            Entry::Occupied(occupied) if occupied.get().created_at_ms >= entry.created_at_ms => {}
            Entry::Occupied(mut occupied) => {
                queue.push((entry.created_at_ms, occupied.key().clone()));
                occupied.insert(entry);
            }
            Entry::Vacant(vacant) => {
                queue.push((entry.created_at_ms, vacant.key().clone()));
                vacant.insert(entry);
            }
        }
    }

    /// Inserts a claimed key's outcome, and queues the key for the retention purge.
    fn remember_key(
        &self,
        vacant: dashmap::mapref::entry::VacantEntry<'_, IdemMapKey, IdemEntry>,
        entry: IdemEntry,
    ) {
        self.keys.push(entry.created_at_ms, vacant.key().clone());
        vacant.insert(entry);
    }

    /// A barrier: resolves once everything submitted before it is durable. Used when a request
    /// answers from state another request wrote (a replay, a repeated release).
    fn barrier<T>(&self, value: T) -> Result<Pending<T>, IndexError> {
        Ok(Pending::ready(value, self.submit_barrier(self.slot()?)))
    }

    /// Submits an empty mutation in `slot`: its acknowledgement comes once everything
    /// submitted before it is durable (the commit thread takes mutations in order).
    fn submit_barrier(&self, slot: Slot<'_>) -> oneshot::Receiver<()> {
        let mut mutation = Mutation::default();
        let ack = mutation.acknowledged();
        self.wal.submit(slot, mutation);
        ack
    }

    /// Resolves once everything submitted before it is durable (a replay answered from state
    /// another request wrote waits on this).
    pub fn durable_barrier(&self) -> Result<oneshot::Receiver<()>, IndexError> {
        Ok(self.submit_barrier(self.slot()?))
    }

    /// The SKUs whose ATP rose at some node since the last call (the backorder retry's
    /// trigger); `None` when more rose than the set holds (then retry everything).
    pub fn take_risen(&self) -> Option<std::collections::HashSet<Sku>> {
        let mut risen = self.risen.lock();
        let overflowed = std::mem::take(&mut risen.overflowed);
        let skus = std::mem::take(&mut risen.skus);
        if overflowed { None } else { Some(skus) }
    }

    fn note_rise(&self, sku: &Sku) {
        let mut risen = self.risen.lock();
        if risen.overflowed {
            return;
        }
        if risen.skus.len() >= RISEN_SKUS_MAX {
            risen.overflowed = true;
            risen.skus = std::collections::HashSet::new();
            return;
        }
        if !risen.skus.contains(sku) {
            risen.skus.insert(sku.clone());
        }
    }

    // ----- nodes -------------------------------------------------------------------------

    /// Creates or replaces nodes. Locks every shard: a node's settings change the ATP of all
    /// its positions, and those changes must be logged in order with the shards' own.
    pub fn upsert_nodes(&self, nodes: Vec<Node>) -> Result<Pending<usize>, IndexError> {
        let count = nodes.len();
        let _writer = self.node_writer.lock();
        let slot = self.slot()?;
        let old_table = self.nodes.load_full();
        let mut all: std::collections::HashMap<NodeId, Node> =
            old_table.by_id.iter().map(|(id, node)| (id.clone(), Node::clone(node))).collect();
        let mut mutation = Mutation::default();
        for node in &nodes {
            mutation.put(
                Cf::Nodes,
                node.node_id.as_str().as_bytes(),
                records::encode(Kind::Node, &NodeRecord::from_node(node)),
            );
        }
        let touched: std::collections::HashSet<NodeId> =
            nodes.iter().map(|node| node.node_id.clone()).collect();
        for node in nodes {
            all.insert(node.node_id.clone(), node);
        }
        let new_table = Arc::new(NodeTable::new(all.into_values()));
        let mut locks = self.lock_all_shards();
        for guard in locks.guards.iter_mut() {
            for (sku, stock) in guard.skus.iter() {
                let before: Vec<(NodeId, i64)> = stock
                    .positions()
                    .filter(|(node_id, _)| touched.contains(*node_id))
                    .map(|(node_id, position)| (node_id.clone(), atp_in(&old_table, node_id, position)))
                    .collect();
                if before.is_empty() {
                    continue;
                }
                let totals = stock.totals(&new_table);
                for (node_id, atp_before) in before {
                    let position = stock.get(&node_id).expect("listed above");
                    let atp = atp_in(&new_table, &node_id, position);
                    if atp != atp_before {
                        mutation.changes.push(AvailabilityChange {
                            sku: sku.clone(),
                            node_id,
                            atp,
                            totals: totals.clone(),
                            sequence: 0,
                        });
                    }
                }
            }
        }
        self.nodes.store(new_table);
        let ack = mutation.acknowledged();
        self.wal.submit(slot, mutation);
        drop(locks);
        Ok(Pending::ready(count, ack))
    }

    // ----- stock -------------------------------------------------------------------------

    /// Absolute on-hand snapshot; reservations are kept. Entries name existing nodes
    /// (checked here) and no (sku, node) twice (checked by the caller).
    pub fn set_stock(&self, entries: &[StockEntry]) -> Result<Pending<usize>, IndexError> {
        let nodes = self.nodes.load_full();
        known_nodes(&nodes, "entries", entries.iter().map(|entry| &entry.node_id))?;
        let slot = self.slot()?;
        let mut mutation = Mutation::default();
        let now_ms = self.clock.now_ms();
        let mut locks = self.lock_shards(entries.iter().map(|entry| &entry.sku));
        for entry in entries {
            let shard = locks.shard(self.shard_of(&entry.sku));
            let stock = shard.stock_mut(&entry.sku);
            let before = stock.get(&entry.node_id).copied();
            let mut position = before.unwrap_or_default();
            position.on_hand = entry.on_hand;
            if entry.safety_stock.is_some() {
                position.safety_stock = entry.safety_stock;
            }
            if before.is_none() {
                self.position_count.fetch_add(1, Ordering::Relaxed);
            }
            self.write_position(&mut mutation, &nodes, &entry.sku, &entry.node_id, stock, before, position);
            mutation.audit.push(AuditEvent {
                sku: entry.sku.to_string(),
                node_id: entry.node_id.to_string(),
                qty: entry.on_hand,
                detail: format!("on_hand {} -> {}", before.map_or(0, |before| before.on_hand), entry.on_hand),
                ..AuditEvent::new("stock.set", now_ms, OPERATOR_ACTOR)
            });
        }
        let ack = mutation.acknowledged();
        self.wal.submit(slot, mutation);
        drop(locks);
        Ok(Pending::ready(entries.len(), ack))
    }

    /// Relative changes, idempotent by adjustment id; rejected whole if any on_hand would go
    /// below zero.
    pub fn adjust_stock(
        &self,
        command: &AdjustStockCommand,
    ) -> Result<Pending<Vec<PositionView>>, IndexError> {
        let nodes = self.nodes.load_full();
        known_nodes(&nodes, "entries", command.entries.iter().map(|entry| &entry.node_id))?;
        let fingerprint = command.fingerprint();
        let slot = self.slot()?;
        let mut locks = self.lock_shards(command.entries.iter().map(|entry| &entry.sku));
        let vacant = match self.claim_key(
            IdemNamespace::Adjust,
            &command.adjustment_id,
            fingerprint,
            "adjustment_id",
        )? {
            Claim::New(vacant) => vacant,
            Claim::Replay(IdemOutcome::Adjusted(views)) => {
                drop((locks, slot));
                return self.barrier(views);
            }
            Claim::Replay(_) => unreachable!("the adjust namespace holds only adjustments"),
        };
        for (index, entry) in command.entries.iter().enumerate() {
            let shard = locks.shard(self.shard_of(&entry.sku));
            let on_hand = shard
                .stock(&entry.sku)
                .and_then(|stock| stock.get(&entry.node_id))
                .map_or(0, |position| position.on_hand);
            if on_hand + entry.delta < 0 {
                return Err(IndexError::FailedPrecondition(format!(
                    "entries[{index}]: on_hand of {} at {} is {on_hand}; a delta of {} would make it negative",
                    entry.sku, entry.node_id, entry.delta
                )));
            }
        }
        let now_ms = self.clock.now_ms();
        let mut mutation = Mutation::default();
        let mut views = Vec::with_capacity(command.entries.len());
        for entry in &command.entries {
            let shard = locks.shard(self.shard_of(&entry.sku));
            let stock = shard.stock_mut(&entry.sku);
            let before = stock.get(&entry.node_id).copied();
            let mut position = before.unwrap_or_default();
            position.on_hand += entry.delta;
            if before.is_none() {
                self.position_count.fetch_add(1, Ordering::Relaxed);
            }
            self.write_position(&mut mutation, &nodes, &entry.sku, &entry.node_id, stock, before, position);
            mutation.audit.push(AuditEvent {
                sku: entry.sku.to_string(),
                node_id: entry.node_id.to_string(),
                qty: entry.delta,
                detail: format!(
                    "{}: on_hand {} -> {}",
                    entry.reason,
                    before.map_or(0, |before| before.on_hand),
                    position.on_hand
                ),
                ..AuditEvent::new("stock.adjusted", now_ms, OPERATOR_ACTOR)
            });
            let node = nodes.get(&entry.node_id).expect("checked above");
            views.push(PositionView::new(&entry.sku, node, &position));
        }
        let record = IdempotencyRecord {
            fingerprint,
            created_at_ms: now_ms,
            reservation_id: None,
            expires_at_ms: None,
            positions: views.iter().map(PositionViewRecord::from_view).collect(),
            response: Vec::new(),
        };
        mutation.put_record(
            Cf::Idempotency,
            keys::idempotency(IdemNamespace::Adjust, command.adjustment_id.as_str()),
            Kind::Idempotency,
            &record,
        );
        let ack = mutation.acknowledged();
        self.wal.submit(slot, mutation);
        self.remember_key(
            vacant,
            IdemEntry { fingerprint, created_at_ms: now_ms, outcome: IdemOutcome::Adjusted(views.clone()) },
        );
        drop(locks);
        Ok(Pending::ready(views, ack))
    }

    /// Stores `position` in `stock`, adds its record to `mutation` when its own facts changed
    /// (see `PositionRecord`), and a change when its ATP moved.
    #[allow(clippy::too_many_arguments)]
    fn write_position(
        &self,
        mutation: &mut Mutation,
        nodes: &NodeTable,
        sku: &Sku,
        node_id: &NodeId,
        stock: &mut SkuStock,
        before: Option<Position>,
        position: Position,
    ) {
        stock.set(node_id, position, || nodes.shared_id(node_id));
        // The record holds what the reservations do not: a change of `reserved` alone (a
        // hold, release or expiry) is in the reservation's record, written in this mutation.
        let record_changed = before.is_none_or(|before| {
            before.on_hand != position.on_hand || before.safety_stock != position.safety_stock
        });
        if record_changed {
            mutation.put_record(
                Cf::Positions,
                keys::position(sku, node_id),
                Kind::Position,
                &PositionRecord::from_position(&position),
            );
        }
        let atp_before = before.map_or(0, |before| atp_in(nodes, node_id, &before));
        let atp = atp_in(nodes, node_id, &position);
        if atp > atp_before {
            self.note_rise(sku);
        }
        if atp != atp_before {
            mutation.changes.push(AvailabilityChange {
                sku: sku.clone(),
                node_id: node_id.clone(),
                atp,
                totals: stock.totals(nodes),
                sequence: 0,
            });
        }
    }

    // ----- reads -------------------------------------------------------------------------

    /// ATP per SKU. `node_filter` empty = every node.
    pub fn availability(
        &self,
        skus: &[Sku],
        channel: Option<&Channel>,
        node_filter: &[NodeId],
    ) -> Vec<AvailabilityItem> {
        let nodes = self.nodes.load();
        skus.iter()
            .map(|sku| {
                let shard = self.shards[self.shard_of(sku)].lock();
                let mut item = AvailabilityItem { sku: sku.to_string(), total_atp: 0, nodes: Vec::new() };
                if let Some(stock) = shard.stock(sku) {
                    for (node_id, position) in stock.positions() {
                        if !node_filter.is_empty() && !node_filter.contains(node_id) {
                            continue;
                        }
                        let Some(node) = nodes.get(node_id) else { continue };
                        if !node.serves(channel) {
                            continue;
                        }
                        let view = PositionView::new(sku, node, position);
                        item.total_atp += view.atp;
                        item.nodes.push(view);
                    }
                }
                item
            })
            .collect()
    }

    /// How many parts a whole-catalogue snapshot is taken in (one per shard).
    pub fn snapshot_part_count(&self) -> usize {
        self.shards.len()
    }

    /// The current ATP of every position in snapshot part `part` (a shard) whose SKU is in
    /// `skus` (empty = all): calls `emit` with (sku, node, atp, totals). Taking the snapshot a
    /// shard at a time bounds what a watcher buffers and how long any lock is held.
    pub fn snapshot_part(
        &self,
        part: usize,
        skus: &[Sku],
        mut emit: impl FnMut(&Sku, &NodeId, i64, &domain::Totals),
    ) {
        let nodes = self.nodes.load();
        let mut visit = |sku: &Sku, stock: &SkuStock| {
            let totals = stock.totals(&nodes);
            for (node_id, position) in stock.positions() {
                emit(sku, node_id, atp_in(&nodes, node_id, position), &totals);
            }
        };
        let shard = self.shards[part].lock();
        if skus.is_empty() {
            for (sku, stock) in shard.skus.iter() {
                visit(sku, stock);
            }
        } else {
            for sku in skus.iter().filter(|sku| self.shard_of(sku) == part) {
                if let Some(stock) = shard.stock(sku) {
                    visit(sku, stock);
                }
            }
        }
    }

    /// The raw position, for tests and consistency checks.
    pub fn position(&self, sku: &Sku, node_id: &NodeId) -> Option<Position> {
        self.shards[self.shard_of(sku)].lock().stock(sku).and_then(|stock| stock.get(node_id).copied())
    }

    pub fn reservation(&self, id: ReservationId) -> Option<Reservation> {
        self.reservations.get(&id.0).map(|entry| Reservation::clone(entry.value()))
    }

    // ----- reservations ------------------------------------------------------------------

    /// An all-or-nothing hold. Lines name existing nodes (checked here), have qty > 0 and no
    /// (sku, node) twice (checked by the caller).
    /// Takes the command by value: its lines, reference and key move into the reservation.
    pub fn reserve(&self, command: ReserveCommand) -> Result<Pending<ReserveOutcome>, IndexError> {
        self.reserve_with(command, Ack::Own)
    }

    /// Starts a batch of reservations (ReserveBatch) that share one acknowledgement: its
    /// place in the commit queue is taken now, so the batch can always be finished.
    pub fn reserve_batch(&self) -> Result<ReserveBatch<'_>, IndexError> {
        Ok(ReserveBatch { index: self, barrier: self.slot()? })
    }

    /// `reserve`, with the acknowledgement its own (`Ack::Own`) or left to a barrier the
    /// caller submits after it (`Ack::Shared`, see `ReserveBatch`).
    fn reserve_with(
        &self,
        command: ReserveCommand,
        acks: Ack,
    ) -> Result<Pending<ReserveOutcome>, IndexError> {
        let nodes = self.nodes.load();
        known_nodes(&nodes, "lines", command.lines.iter().map(|line| &line.node_id))?;
        let fingerprint = command.fingerprint();
        let slot = self.slot()?;
        let mut locks = self.lock_shards(command.lines.iter().map(|line| &line.sku));
        let key = &command.idempotency_key;
        let vacant = match self.claim_key(IdemNamespace::Reserve, key, fingerprint, "idempotency_key")? {
            Claim::New(vacant) => vacant,
            Claim::Replay(IdemOutcome::Reserved { id, expires_at_ms, .. }) => {
                drop((locks, slot));
                let outcome = ReserveOutcome::Reserved { id, expires_at_ms };
                return match acks {
                    Ack::Own => self.barrier(outcome),
                    // The request that made it submitted it before remembering the key: the
                    // batch's barrier, submitted later, covers it.
                    Ack::Shared => Ok(Pending { value: outcome, ack: None }),
                };
            }
            Claim::Replay(_) => unreachable!("the reserve namespace holds only reservations"),
        };
        let available: Vec<i64> = command
            .lines
            .iter()
            .map(|line| {
                let node = nodes.get(&line.node_id).expect("checked above");
                if !node.serves(command.channel.as_ref()) {
                    return 0;
                }
                let shard = locks.shard(self.shard_of(&line.sku));
                shard
                    .stock(&line.sku)
                    .and_then(|stock| stock.get(&line.node_id))
                    .map_or(0, |position| position.atp(node))
            })
            .collect();
        let shortfalls = domain::shortfalls(&command.lines, &available);
        if !shortfalls.is_empty() {
            // Nothing held, nothing written, nothing remembered: a retry re-evaluates.
            return Ok(Pending { value: ReserveOutcome::Insufficient(shortfalls), ack: None });
        }
        let now_ms = self.clock.now_ms();
        let mut mutation = Mutation::default();
        let hold = Hold {
            lines: command.lines,
            ttl_ms: command.ttl_ms,
            reference: command.reference,
            channel: command.channel,
            idempotency_key: command.idempotency_key,
            made_by: HoldMaker::Reserve { fingerprint },
        };
        // The reservation's record remembers the key too: no idempotency record of its own.
        let reservation = self.create_hold(&mut locks, &nodes, &mut mutation, hold, now_ms);
        let (id, expires_at_ms) = (reservation.id, reservation.expires_at_ms);
        mutation.audit.push(reservation_event(
            "reservation.created",
            &reservation,
            actor(reservation.channel.as_ref()),
        ));
        let ack = match acks {
            Ack::Own => Some(mutation.acknowledged()),
            Ack::Shared => None,
        };
        self.wal.submit(slot, mutation);
        self.track_hold(reservation);
        self.remember_key(
            vacant,
            IdemEntry {
                fingerprint,
                created_at_ms: now_ms,
                outcome: IdemOutcome::Reserved { id, expires_at_ms, own_record: false },
            },
        );
        drop(locks);
        Ok(Pending { value: ReserveOutcome::Reserved { id, expires_at_ms }, ack })
    }

    /// Applies a hold whose lines fit (the caller decided so under `locks`): raises `reserved`
    /// at each position, and adds the positions and the new reservation to `mutation`.
    fn create_hold(
        &self,
        locks: &mut ShardLocks<'_>,
        nodes: &NodeTable,
        mutation: &mut Mutation,
        hold: Hold,
        now_ms: u64,
    ) -> Reservation {
        let id = ReservationId(self.next_reservation_id.fetch_add(1, Ordering::Relaxed));
        mutation.reservation_id_high = Some(id.0);
        for line in &hold.lines {
            let shard = locks.shard(self.shard_of(&line.sku));
            let stock = shard.stock_mut(&line.sku);
            let before = *stock.get(&line.node_id).expect("a line that fits has a position");
            assert!(line.qty > 0 && line.qty <= before.atp(nodes.get(&line.node_id).expect("known node")));
            let position = Position { reserved: before.reserved + line.qty, ..before };
            self.write_position(mutation, nodes, &line.sku, &line.node_id, stock, Some(before), position);
        }
        let expires_at_ms = (hold.ttl_ms > 0).then(|| now_ms.saturating_add(hold.ttl_ms));
        let reservation = Reservation {
            id,
            status: ReservationStatus::Held,
            lines: hold.lines,
            reference: hold.reference,
            channel: hold.channel,
            idempotency_key: Some(hold.idempotency_key),
            created_at_ms: now_ms,
            expires_at_ms,
            updated_at_ms: now_ms,
            origin: match hold.made_by {
                HoldMaker::Reserve { fingerprint } => {
                    HoldOrigin::Reserve(ReserveRequest { fingerprint, expires_at_ms })
                }
                HoldMaker::Allocate { capacity_day } => HoldOrigin::Allocate { capacity_day },
            },
        };
        mutation.put_record(
            Cf::Reservations,
            keys::reservation(id),
            Kind::Reservation,
            &ReservationRecord::from_reservation(&reservation),
        );
        reservation
    }

    /// Makes a new hold visible: the reservation table, the open count, the expiry queue.
    fn track_hold(&self, reservation: Reservation) {
        self.open_reservation_count.fetch_add(1, Ordering::Relaxed);
        if let Some(expires_at_ms) = reservation.expires_at_ms {
            self.expiry.push(reservation.id, expires_at_ms);
        }
        self.reservations.insert(reservation.id.0, Box::new(reservation));
    }

    /// Confirm, extend, release or expire a reservation. `reference` replaces the reservation's
    /// reference on confirm when not empty.
    pub fn transition(
        &self,
        id: ReservationId,
        transition: Transition,
        reference: &str,
    ) -> Result<Pending<Reservation>, IndexError> {
        let lines = match self.reservations.get(&id.0) {
            Some(reservation) => reservation.lines.clone(),
            None => return Err(IndexError::NotFound(format!("reservation {id} does not exist"))),
        };
        let slot = self.slot()?;
        let mut locks = self.lock_shards(lines.iter().map(|line| &line.sku));
        let mut reservation = self
            .reservations
            .get_mut(&id.0)
            .ok_or_else(|| IndexError::NotFound(format!("reservation {id} does not exist")))?;
        let now_ms = self.clock.now_ms();
        if let Some(fulfilment_order_id) = reservation.fulfilment_order_id() {
            return Err(IndexError::FailedPrecondition(format!(
                "reservation {id} backs fulfilment order fo-{fulfilment_order_id}; it moves with that \
                 fulfilment order (ship, report a shortage, or cancel the order)"
            )));
        }
        let due = reservation.status == ReservationStatus::Held
            && reservation.expires_at_ms.is_some_and(|expires_at_ms| expires_at_ms <= now_ms);
        if transition == Transition::Expire && !due {
            // Extended, confirmed or released since the sweep queued it: nothing to do.
            let current = Reservation::clone(&reservation);
            return Ok(Pending { value: current, ack: None });
        }
        // A hold past its expires_at is expired whether or not the sweep has reached it: expire
        // it now, then judge the requested transition against EXPIRED below.
        let applied = if due { Transition::Expire } else { transition };
        let (status, returns_units) = match domain::transition(reservation.status, applied) {
            TransitionOutcome::Conflict(reason) => {
                return Err(IndexError::FailedPrecondition(format!("reservation {id}: {reason}")));
            }
            TransitionOutcome::NoOp => {
                let current = Reservation::clone(&reservation);
                drop(reservation);
                drop(locks);
                drop(slot);
                return self.barrier(current);
            }
            TransitionOutcome::Apply { status, returns_units } => (status, returns_units),
        };
        let nodes = self.nodes.load();
        let mut mutation = Mutation::default();
        if returns_units {
            for line in &reservation.lines {
                let shard = locks.shard(self.shard_of(&line.sku));
                let Some((stock, before)) = shard
                    .skus
                    .get_mut(&line.sku)
                    .and_then(|stock| stock.get(&line.node_id).copied().map(|before| (stock, before)))
                else {
                    // A damaged store lost this position (start-up said so): its units were
                    // never counted, so there is nothing to give back.
                    tracing::error!(
                        reservation = %id,
                        sku = %line.sku,
                        node_id = %line.node_id,
                        "a reservation's position is missing; its line ends without returning units"
                    );
                    continue;
                };
                assert!(
                    before.reserved >= line.qty,
                    "reserved {} below a held line of {}",
                    before.reserved,
                    line.qty
                );
                let position = Position { reserved: before.reserved - line.qty, ..before };
                self.write_position(
                    &mut mutation,
                    &nodes,
                    &line.sku,
                    &line.node_id,
                    stock,
                    Some(before),
                    position,
                );
            }
            self.open_reservation_count.fetch_sub(1, Ordering::Relaxed);
            if let Some(day) = reservation.capacity_day() {
                self.return_capacity(&reservation.lines, day);
            }
        }
        reservation.status = status;
        reservation.updated_at_ms = now_ms;
        if !status.is_open() {
            self.ended.push(now_ms, id.0);
        }
        match applied {
            Transition::Confirm => {
                reservation.expires_at_ms = None;
                if !reference.is_empty() {
                    reservation.reference = reference.to_string();
                }
            }
            Transition::Extend { expires_at_ms } => {
                reservation.expires_at_ms = Some(expires_at_ms);
                self.expiry.push(id, expires_at_ms);
            }
            Transition::Expire => metrics::counter!("allot_reservations_expired_total").increment(1),
            Transition::Release => {}
        }
        mutation.put_record(
            Cf::Reservations,
            keys::reservation(id),
            Kind::Reservation,
            &ReservationRecord::from_reservation(&reservation),
        );
        let (event_type, event_actor) = match applied {
            Transition::Confirm => ("reservation.confirmed", actor(reservation.channel.as_ref())),
            Transition::Extend { .. } => ("reservation.extended", actor(reservation.channel.as_ref())),
            Transition::Release => ("reservation.released", actor(reservation.channel.as_ref())),
            Transition::Expire => ("reservation.expired", SYSTEM_ACTOR),
        };
        mutation.audit.push(reservation_event(event_type, &reservation, event_actor));
        let updated = Reservation::clone(&reservation);
        let ack = mutation.acknowledged();
        self.wal.submit(slot, mutation);
        drop(reservation);
        drop(locks);
        if applied != transition {
            // The hold expired on the spot; the request meets an EXPIRED reservation.
            return match domain::transition(ReservationStatus::Expired, transition) {
                TransitionOutcome::Conflict(reason) => {
                    Err(IndexError::FailedPrecondition(format!("reservation {id}: {reason}")))
                }
                TransitionOutcome::NoOp => Ok(Pending::ready(updated, ack)),
                TransitionOutcome::Apply { .. } => unreachable!("no transition leaves EXPIRED"),
            };
        }
        Ok(Pending::ready(updated, ack))
    }

    // ----- background --------------------------------------------------------------------

    /// Expires at most `batch_len_max` due reservations; returns how many it expired and the
    /// pending acknowledgements (the caller need not wait for them).
    pub fn expire_due(&self, batch_len_max: usize) -> usize {
        let now_ms = self.clock.now_ms();
        let due = self.expiry.pop_due(now_ms, batch_len_max);
        let mut expired = 0;
        for id in due {
            match self.transition(id, Transition::Expire, "") {
                Ok(pending) => {
                    if pending.value.status == ReservationStatus::Expired && pending.ack.is_some() {
                        expired += 1;
                    }
                }
                Err(IndexError::Overloaded | IndexError::DiskFull(_)) => {
                    // Try again on the next sweep (or once disk space returns).
                    if let Some(expires_at_ms) = self.reservation(id).and_then(|r| r.expires_at_ms) {
                        self.expiry.push(id, expires_at_ms);
                    }
                }
                Err(_) => {}
            }
        }
        expired
    }

    /// Forgets terminal reservations and idempotency keys older than their retention, at most
    /// `batch_len_max` queue entries (one mutation). Returns the entries handled: the caller
    /// calls again while that is `batch_len_max`, so a purge keeps up with any rate.
    pub fn purge_expired_history(&self, batch_len_max: usize) -> Result<usize, IndexError> {
        let now_ms = self.clock.now_ms();
        let reservation_cutoff = now_ms.saturating_sub(self.options.terminal_retention_ms);
        let key_cutoff = now_ms.saturating_sub(self.options.idempotency_retention_ms);
        // The slot first: without one nothing is popped, and the next purge finds it all.
        let slot = self.slot()?;
        let ended = self.ended.pop_due(reservation_cutoff, batch_len_max);
        let keys = self.keys.pop_due(key_cutoff, batch_len_max - ended.len());
        let handled = ended.len() + keys.len();
        let mut mutation = Mutation::default();
        for (_, key) in keys {
            // A key forgotten and made again since has a younger entry of its own.
            let removed = self.idempotency.remove_if(&key, |_, entry| entry.created_at_ms < key_cutoff);
            let own_record = match removed {
                None => false,
                Some((_, IdemEntry { outcome: IdemOutcome::Reserved { own_record, .. }, .. })) => own_record,
                Some(_) => true,
            };
            if own_record {
                mutation.delete(Cf::Idempotency, keys::idempotency(key.0, &key.1));
            }
        }
        for (_, id) in ended {
            let ended_before_cutoff = self.reservations.remove_if(&id, |_, reservation| {
                !reservation.status.is_open() && reservation.updated_at_ms < reservation_cutoff
            });
            if let Some((_, reservation)) = ended_before_cutoff {
                mutation.delete(Cf::Reservations, keys::reservation(reservation.id));
                self.keep_reserve_key(&reservation, key_cutoff, &mut mutation);
            }
        }
        if !mutation.ops.is_empty() {
            self.wal.submit(slot, mutation);
        }
        Ok(handled)
    }

    /// The purge forgets `reservation`: if its record was what remembered the Reserve key that
    /// made it, and the key is kept longer (made at or after `key_cutoff`), the key gets a
    /// record of its own. A key past its retention is queued to be forgotten anyway.
    fn keep_reserve_key(&self, reservation: &Reservation, key_cutoff: u64, mutation: &mut Mutation) {
        let (Some(_), Some(key)) = (reservation.reserve_request(), &reservation.idempotency_key) else {
            return;
        };
        let Some(mut entry) = self.idempotency.get_mut(&(IdemNamespace::Reserve, key.shared())) else {
            return;
        };
        let (fingerprint, created_at_ms) = (entry.fingerprint, entry.created_at_ms);
        let IdemOutcome::Reserved { id, expires_at_ms, own_record } = &mut entry.outcome else {
            return;
        };
        if *id != reservation.id || *own_record || created_at_ms < key_cutoff {
            return;
        }
        *own_record = true;
        let record = IdempotencyRecord {
            fingerprint,
            created_at_ms,
            reservation_id: Some(id.0),
            expires_at_ms: *expires_at_ms,
            positions: Vec::new(),
            response: Vec::new(),
        };
        mutation.put_record(
            Cf::Idempotency,
            keys::idempotency(IdemNamespace::Reserve, key.as_str()),
            Kind::Idempotency,
            &record,
        );
    }
}

/// The actor of the daemon's own work (expiry, backorder retry, routing).
pub const SYSTEM_ACTOR: &str = "system";
/// The actor of stock and node administration (the API carries no operator name yet).
pub const OPERATOR_ACTOR: &str = "operator";

/// The actor of a request made for `channel` (the channel, or "api" when none was named).
pub(crate) fn actor(channel: Option<&Channel>) -> &str {
    channel.map_or("api", |channel| channel.as_str())
}

/// An event about `reservation` after a change.
pub(crate) fn reservation_event(event_type: &str, reservation: &Reservation, actor: &str) -> AuditEvent {
    AuditEvent {
        reservation_id: Some(reservation.id.0),
        qty: reservation.lines.iter().map(|line| line.qty).sum(),
        detail: reservation.reference.clone(),
        ..AuditEvent::new(event_type, reservation.updated_at_ms, actor)
    }
}

/// INVALID_ARGUMENT naming the first entry of `list` whose node does not exist.
fn known_nodes<'a>(
    nodes: &NodeTable,
    list: &str,
    node_ids: impl Iterator<Item = &'a NodeId>,
) -> Result<(), IndexError> {
    for (index, node_id) in node_ids.enumerate() {
        if nodes.get(node_id).is_none() {
            return Err(IndexError::InvalidArgument(format!(
                "{list}[{index}].node_id: unknown node {:?}",
                node_id.as_str()
            )));
        }
    }
    Ok(())
}

fn atp_in(nodes: &NodeTable, node_id: &NodeId, position: &Position) -> i64 {
    nodes.get(node_id).map_or(0, |node| position.atp(node))
}

/// The guards of a sorted set of shards.
struct ShardLocks<'a> {
    indexes: Vec<usize>,
    guards: Vec<MutexGuard<'a, Shard>>,
}

impl ShardLocks<'_> {
    fn shard_ref(&self, shard_index: usize) -> &Shard {
        let position =
            self.indexes.binary_search(&shard_index).expect("the shard of every touched SKU is locked");
        &self.guards[position]
    }

    fn shard(&mut self, shard_index: usize) -> &mut Shard {
        let position =
            self.indexes.binary_search(&shard_index).expect("the shard of every touched SKU is locked");
        &mut self.guards[position]
    }
}

/// One position whose `reserved` differs from the open reservations that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    pub sku: Sku,
    pub node_id: NodeId,
    /// What the position says.
    pub reserved: i64,
    /// What the open reservations hold there.
    pub held: i64,
}

/// What the consistency check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsistencyReport {
    pub positions_checked: usize,
    pub reservations_checked: usize,
    /// Orders and fulfilment orders checked against their counters and reservations.
    pub orders_checked: usize,
    /// Positions whose reserved is not the sum of the open holds (at most the asked number).
    pub drift: Vec<Drift>,
    /// All drifted positions, listed or not.
    pub drift_count: usize,
    /// Other broken invariants, one line each (at most the asked number).
    pub problems: Vec<String>,
}

impl ConsistencyReport {
    pub fn is_clean(&self) -> bool {
        self.drift_count == 0 && self.problems.is_empty()
    }

    pub(crate) fn problem(&mut self, listed_max: usize, problem: String) {
        if self.problems.len() < listed_max {
            self.problems.push(problem);
        }
    }
}

impl Index {
    /// Recomputes every position's `reserved` from the open reservations and reports any
    /// drift, negative quantities and a wrong open-reservation count; lists at most
    /// `listed_max` of each. Takes every shard lock for the duration (reservations change only
    /// under their shards' locks, so this is an exact snapshot): a pause of all writers, about
    /// one scan of the reservations long. Meant to run rarely (see
    /// `server.consistency_check_interval_ms`).
    pub fn check_consistency(&self, listed_max: usize) -> ConsistencyReport {
        let mut report = ConsistencyReport::default();
        let locks = self.lock_all_shards();
        let mut held: std::collections::HashMap<(Sku, NodeId), i64> = std::collections::HashMap::new();
        let mut open = 0i64;
        for reservation in self.reservations.iter() {
            report.reservations_checked += 1;
            if !reservation.status.is_open() {
                continue;
            }
            open += 1;
            for line in &reservation.lines {
                if line.qty < 0 {
                    report.problem(
                        listed_max,
                        format!(
                            "reservation {} holds {} of {} at {}",
                            reservation.id, line.qty, line.sku, line.node_id
                        ),
                    );
                }
                *held.entry((line.sku.clone(), line.node_id.clone())).or_default() += line.qty;
            }
        }
        for guard in &locks.guards {
            for (sku, stock) in guard.skus.iter() {
                for (node_id, position) in stock.positions() {
                    report.positions_checked += 1;
                    let expected = held.remove(&(sku.clone(), node_id.clone())).unwrap_or(0);
                    if position.reserved != expected {
                        report.drift_count += 1;
                        if report.drift.len() < listed_max {
                            report.drift.push(Drift {
                                sku: sku.clone(),
                                node_id: node_id.clone(),
                                reserved: position.reserved,
                                held: expected,
                            });
                        }
                    }
                    if position.on_hand < 0 || position.reserved < 0 {
                        report.problem(
                            listed_max,
                            format!(
                                "position {sku} at {node_id}: on_hand {} reserved {}",
                                position.on_hand, position.reserved
                            ),
                        );
                    }
                }
            }
        }
        // Holds at positions that do not exist.
        for ((sku, node_id), units) in held {
            if units != 0 {
                report.drift_count += 1;
                if report.drift.len() < listed_max {
                    report.drift.push(Drift { sku, node_id, reserved: 0, held: units });
                }
            }
        }
        let counted = self.open_reservation_count.load(Ordering::Relaxed);
        if counted != open {
            report.problem(listed_max, format!("open reservation gauge says {counted}, {open} are open"));
        }
        drop(locks);
        report.drift.sort_by(|a, b| (&a.sku, &a.node_id).cmp(&(&b.sku, &b.node_id)));
        report
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::{MAP_SHARDS, ReservationIdHash};

    /// DashMap's shard of a hash (dashmap 6, `determine_shard`).
    fn shard(hash: u64) -> u64 {
        (hash << 7) >> (64 - MAP_SHARDS.trailing_zeros())
    }

    #[test]
    fn consecutive_reservation_ids_take_every_shard_in_turn_and_neighbouring_buckets() {
        // Goal: the reservation map's hash gives what its comment promises: consecutive ids
        // spread over all 256 shards in turn; within a shard, ids 256 apart take consecutive
        // buckets (locality for inserts and removals in id order); the 7-bit tag varies, so a
        // probe does not compare every key of a group. Method: hash 256 x 64 consecutive ids.
        let hash = |id: u64| ReservationIdHash.hash_one(id);
        let first = 1_000_000_007u64;
        let mut shards = std::collections::HashSet::new();
        let mut tags = std::collections::HashSet::new();
        for id in first..first + 256 * 64 {
            let h = hash(id);
            assert_eq!(shard(h), id % 256, "id {id}");
            // Below the tag and the shard bits: the bucket, in id order within the shard.
            assert_eq!(h & ((1 << 49) - 1), id / 256, "id {id}");
            shards.insert(shard(h));
            tags.insert(h >> 57);
        }
        assert_eq!(shards.len(), 256);
        assert!(tags.len() > 100, "only {} distinct tags", tags.len());
        // Hashing anything but a u64 still gives a spread hash (a fallback, unused).
        assert_ne!(ReservationIdHash.hash_one("a"), ReservationIdHash.hash_one("b"));
    }
}
