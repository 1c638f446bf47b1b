//! Index benchmarks: the in-memory decision and hand-off to the commit thread, without the
//! network. The store runs in `buffered` mode here so the figures show the index, not the
//! disk (the fsync'd path is measured end to end by allot-load).

use std::sync::Arc;

use allot::clock::SystemClock;
use allot::domain::{
    IdempotencyKey, Limits, Node, NodeId, NodeType, ReservationId, ReserveCommand, ReserveLine,
    ShippingRates, Sku, StockEntry, Transition,
};
use allot::events::Feed;
use allot::index::{Index, IndexOptions, ReserveOutcome};
use allot::store::{self, Durability, Store, StoreOptions, WalOptions};
use criterion::{Criterion, criterion_group, criterion_main};

const SKU_COUNT: usize = 10_000;
const NODE_COUNT: usize = 4;
/// Operations whose acknowledgements are awaited together.
const PIPELINE_LEN: usize = 1_024;
/// Items per call of the ReserveBatch bench (the comparison scripts' batch size).
const BATCH_LEN: usize = 50;

fn setup(dir: &std::path::Path) -> (Arc<Index>, std::thread::JoinHandle<()>) {
    let (store, recovered) = Store::open(dir, &StoreOptions::default()).unwrap();
    let feed = Arc::new(Feed::new(1024, 16));
    let (wal, thread) = store::wal::start(
        Arc::new(store),
        WalOptions {
            durability: Durability::Buffered,
            queue_len_max: 65_536,
            batch_len_max: 4096,
            // The index's own cost: no pacing between commits.
            commit_interval: std::time::Duration::ZERO,
            change_retention: 1_000_000,
            event_retention: 1_000_000,
            disk_guard: None,
        },
        Box::new(move |changes, _events| feed.publish(changes)),
    );
    let options = IndexOptions {
        shard_count: 256,
        terminal_retention_ms: 3_600_000,
        idempotency_retention_ms: 3_600_000,
        limits: Limits::default(),
        rules: allot::routing::RoutingRules::default(),
    };
    let index = Arc::new(Index::new(options, recovered, wal, Arc::new(SystemClock)));
    let nodes = (0..NODE_COUNT)
        .map(|n| Node {
            node_id: NodeId::parse(&format!("DC-{n}")).unwrap(),
            node_type: NodeType::Warehouse,
            lat: 0.0,
            lon: 0.0,
            enabled: true,
            can_ship: true,
            can_pickup: false,
            daily_capacity: 0,
            processing_days: 0,
            priority: 0,
            rates: ShippingRates::default(),
            default_safety_stock: 0,
            channels: Vec::new(),
        })
        .collect();
    index.upsert_nodes(nodes).unwrap().durable_blocking().unwrap();
    let entries: Vec<StockEntry> = (0..SKU_COUNT)
        .flat_map(|s| {
            (0..NODE_COUNT).map(move |n| StockEntry {
                sku: Sku::parse(&format!("SKU-{s}")).unwrap(),
                node_id: NodeId::parse(&format!("DC-{n}")).unwrap(),
                on_hand: 1_000_000_000,
                safety_stock: None,
            })
        })
        .collect();
    for chunk in entries.chunks(10_000) {
        index.set_stock(chunk).unwrap().durable_blocking().unwrap();
    }
    (index, thread)
}

fn bench_index(criterion: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (index, commit_thread) = setup(dir.path());
    let mut counter = 0u64;
    // Acknowledgements are awaited in groups, as a server's concurrent requests would be:
    // awaiting each one alone would time two thread wake-ups, not the index.
    let mut pending = Vec::with_capacity(PIPELINE_LEN);
    let mut reserve_release = |sku_of: &dyn Fn(u64) -> usize| {
        counter += 1;
        let command = ReserveCommand {
            idempotency_key: IdempotencyKey::parse(&format!("bench-{counter}")).unwrap(),
            lines: vec![ReserveLine {
                sku: Sku::parse(&format!("SKU-{}", sku_of(counter))).unwrap(),
                node_id: NodeId::parse("DC-1").unwrap(),
                qty: 1,
            }],
            ttl_ms: 60_000,
            reference: String::new(),
            channel: None,
        };
        let reserved = index.reserve(command).unwrap();
        // The hold is applied in memory at once; its durability is awaited below.
        let (outcome, durable) = reserved.split();
        let ReserveOutcome::Reserved { id, .. } = outcome else { panic!("stock is ample") };
        pending.push(durable);
        pending.push(index.transition(id, Transition::Release, "").unwrap().split().1);
        if pending.len() >= PIPELINE_LEN {
            for durable in pending.drain(..) {
                durable.wait_blocking().unwrap();
            }
        }
        id
    };
    criterion.bench_function(
        "index/reserve+release one line, uniform SKU (buffered store, pipelined acks)",
        |bencher| {
            bencher
                .iter(|| reserve_release(&|counter| (counter.wrapping_mul(7919) % SKU_COUNT as u64) as usize))
        },
    );
    criterion.bench_function(
        "index/reserve+release one line, one hot SKU (buffered store, pipelined acks)",
        |bencher| bencher.iter(|| reserve_release(&|_| 0)),
    );
    // ReserveBatch's path: 50 items decided in turn, then one barrier for all of them.
    let mut batch_counter = 0u64;
    criterion.bench_function(
        "index/reserve batch of 50 one-line items, uniform SKU (buffered store, one barrier)",
        |bencher| {
            bencher.iter(|| {
                let batch = index.reserve_batch().unwrap();
                for _ in 0..BATCH_LEN {
                    batch_counter += 1;
                    let sku = batch_counter.wrapping_mul(7919) % SKU_COUNT as u64;
                    let command = ReserveCommand {
                        idempotency_key: IdempotencyKey::parse(&format!("batch-{batch_counter}")).unwrap(),
                        lines: vec![ReserveLine {
                            sku: Sku::parse(&format!("SKU-{sku}")).unwrap(),
                            node_id: NodeId::parse("DC-1").unwrap(),
                            qty: 1,
                        }],
                        ttl_ms: 600_000,
                        reference: String::new(),
                        channel: None,
                    };
                    let outcome = batch.reserve(command).unwrap();
                    assert!(matches!(outcome, ReserveOutcome::Reserved { .. }), "stock is ample");
                }
                batch.finish().wait_blocking().unwrap();
            })
        },
    );
    let skus: Vec<Sku> = (0..SKU_COUNT).map(|s| Sku::parse(&format!("SKU-{s}")).unwrap()).collect();
    let mut next = 0usize;
    criterion.bench_function("index/availability one SKU x 4 nodes", |bencher| {
        bencher.iter(|| {
            next = (next + 7919) % SKU_COUNT;
            index.availability(std::slice::from_ref(&skus[next]), None, &[])
        })
    });
    let _ = index.reservation(ReservationId(1));
    // Close the store before its directory goes: a write into a deleted directory is fatal.
    index.wal().stop();
    commit_thread.join().unwrap();
}

/// The reservation map alone: the steady state of holds that expire in the order they were
/// made (insert the next id, remove the oldest of a million), and a lookup of a random open
/// id, with the map's hash (`ReservationIdHash`) against the seeded foldhash it replaced.
fn bench_reservation_map(criterion: &mut Criterion) {
    fn cases<S: std::hash::BuildHasher + Clone>(criterion: &mut Criterion, name: &str, hasher: S) {
        const OPEN: u64 = 1_000_000;
        /// About the size of a boxed reservation.
        type Value = Box<[u64; 24]>;
        let map: dashmap::DashMap<u64, Value, S> =
            dashmap::DashMap::with_hasher_and_shard_amount(hasher, allot::index::RESERVATION_MAP_SHARDS);
        for id in 1..=OPEN {
            map.insert(id, Box::new([id; 24]));
        }
        let mut next = OPEN;
        criterion.bench_function(
            &format!("reservation map/insert the next id, remove the oldest ({name})"),
            |b| {
                b.iter(|| {
                    next += 1;
                    map.insert(next, Box::new([next; 24]));
                    map.remove(&(next - OPEN))
                })
            },
        );
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        criterion.bench_function(&format!("reservation map/get a random open id ({name})"), |b| {
            b.iter(|| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                map.get(&(next - state % OPEN)).is_some()
            })
        });
    }
    cases(criterion, "foldhash", foldhash::fast::RandomState::default());
    cases(criterion, "ReservationIdHash", allot::index::ReservationIdHash);
}

criterion_group!(benches, bench_index, bench_reservation_map);
criterion_main!(benches);
