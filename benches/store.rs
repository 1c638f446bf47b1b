//! Store benchmarks: record encode/decode, building a group commit's batch (writers' puts plus
//! the commit thread's assembly), and one fsync'd group commit of 1, 64 and 1,024
//! reservation-sized mutations (what the commit thread pays per batch).

use std::sync::Arc;

use allot::domain::{
    HoldOrigin, IdempotencyKey, NodeId, Reservation, ReservationId, ReservationStatus, ReserveLine,
    ReserveRequest, Sku,
};
use allot::events::Feed;
use allot::store::batch::{BatchBuilder, Layout, Ops};
use allot::store::records::{self, CounterRecord, Kind, PositionRecord, ReservationRecord};
use allot::store::{self, Cf, Durability, Mutation, Store, StoreOptions, WalOptions};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

fn reservation(id: u64) -> Reservation {
    Reservation {
        id: ReservationId(id),
        status: ReservationStatus::Held,
        lines: vec![ReserveLine {
            sku: Sku::parse("SKU-0001234").unwrap(),
            node_id: NodeId::parse("DC-001").unwrap(),
            qty: 1,
        }],
        reference: "cart-12345".into(),
        channel: None,
        idempotency_key: Some(IdempotencyKey::parse(&format!("key-{id}")).unwrap()),
        created_at_ms: 1_700_000_000_000,
        expires_at_ms: Some(1_700_000_060_000),
        updated_at_ms: 1_700_000_000_000,
        origin: HoldOrigin::Reserve(ReserveRequest {
            fingerprint: 0x5eed_f00d,
            expires_at_ms: Some(1_700_000_060_000),
        }),
    }
}

fn bench_records(criterion: &mut Criterion) {
    let record = ReservationRecord::from_reservation(&reservation(42));
    criterion.bench_function("record/encode reservation", |bencher| {
        bencher.iter(|| records::encode(Kind::Reservation, &record))
    });
    let bytes = records::encode(Kind::Reservation, &record);
    criterion.bench_function("record/decode reservation", |bencher| {
        bencher.iter(|| records::decode::<ReservationRecord>(Kind::Reservation, &bytes).unwrap())
    });
}

/// A put as mutations held them before `Ops`.
type OwnedPut = (Cf, Vec<u8>, Vec<u8>);

/// Mutations of three puts: a position, a reservation and an idempotency-key record (what a
/// Reserve wrote before store format 3, which keeps the key in the reservation's record).
const BUILD_MUTATIONS: u64 = 1_024;

fn bench_batch_build(criterion: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _recovered) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let handles = Cf::ALL.map(|cf| store.cf(cf));
    let layout = Layout::probe(&handles);
    let position = PositionRecord { on_hand: 1_000, safety_stock: None };
    let reservation = ReservationRecord::from_reservation(&reservation(42));
    let key_record = CounterRecord { value: 42 };
    let position_key = |id: u64| format!("SKU-{:07}\0DC-001", id % 10_000).into_bytes();
    let idempotency_key = |id: u64| format!("rkey-{id}").into_bytes();
    let mut group = criterion.benchmark_group("batch build (1,024 mutations of 3 puts)");
    // What the commit thread did before: every key and value its own allocation, copied into
    // RocksDB's batch by one put_cf call each.
    group.bench_function("owned keys and values, put_cf", |bencher| {
        bencher.iter(|| {
            let mutations: Vec<Vec<OwnedPut>> = (0..BUILD_MUTATIONS)
                .map(|id| {
                    vec![
                        (Cf::Positions, position_key(id), records::encode(Kind::Position, &position)),
                        (
                            Cf::Reservations,
                            id.to_be_bytes().to_vec(),
                            records::encode(Kind::Reservation, &reservation),
                        ),
                        (Cf::Idempotency, idempotency_key(id), records::encode(Kind::Counter, &key_record)),
                    ]
                })
                .collect();
            let mut batch = rocksdb::WriteBatch::default();
            for mutation in mutations {
                for (cf, key, value) in mutation {
                    batch.put_cf(handles[cf as usize], key, value);
                }
            }
            batch
        })
    });
    // Now: each mutation's puts in one buffer in WriteBatch format, assembled by copying.
    group.bench_function("Ops buffers, BatchBuilder, from_data", |bencher| {
        bencher.iter(|| {
            let mutations: Vec<Ops> = (0..BUILD_MUTATIONS)
                .map(|id| {
                    let mut ops = Ops::default();
                    ops.put_record(Cf::Positions, &position_key(id), Kind::Position, &position);
                    ops.put_record(Cf::Reservations, &id.to_be_bytes(), Kind::Reservation, &reservation);
                    ops.put_record(Cf::Idempotency, &idempotency_key(id), Kind::Counter, &key_record);
                    ops
                })
                .collect();
            let mut builder = BatchBuilder::new(&layout);
            for ops in &mutations {
                builder.append(ops);
            }
            rocksdb::WriteBatch::from_data(&builder.finish())
        })
    });
    group.finish();
}

fn bench_group_commit(criterion: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (store, _recovered) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let feed = Arc::new(Feed::new(16, 1));
    let (wal, commit_thread) = store::wal::start(
        Arc::new(store),
        WalOptions {
            durability: Durability::Fsync,
            queue_len_max: 65_536,
            batch_len_max: 65_536,
            commit_interval: std::time::Duration::ZERO,
            change_retention: 1_000,
            event_retention: 1_000_000,
            disk_guard: None,
        },
        Box::new(move |changes, _events| feed.publish(changes)),
    );
    let mut group = criterion.benchmark_group("group commit (fsync)");
    group.sample_size(20);
    let mut next_id = 0u64;
    for batch_len in [1usize, 64, 1_024] {
        group.bench_with_input(BenchmarkId::from_parameter(batch_len), &batch_len, |bencher, &batch_len| {
            bencher.iter(|| {
                // Queue the whole batch before the commit thread can start on it: the first
                // submission may be taken alone, so the average batch is slightly below.
                let mut acks = Vec::with_capacity(batch_len);
                for _ in 0..batch_len {
                    next_id += 1;
                    let mut mutation = Mutation::default();
                    let value = records::encode(
                        Kind::Reservation,
                        &ReservationRecord::from_reservation(&reservation(next_id)),
                    );
                    mutation.put(Cf::Reservations, next_id.to_be_bytes(), value);
                    acks.push(mutation.acknowledged());
                    wal.submit(wal.try_slot().unwrap(), mutation);
                }
                for ack in acks {
                    ack.blocking_recv().unwrap();
                }
            })
        });
    }
    group.finish();
    // Close the store before its directory goes: a write into a deleted directory is fatal.
    wal.stop();
    commit_thread.join().unwrap();
}

criterion_group!(benches, bench_records, bench_batch_build, bench_group_commit);
criterion_main!(benches);
