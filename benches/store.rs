//! Store benchmarks: record encode/decode, and one fsync'd group commit of 1, 64 and 1,024
//! reservation-sized mutations (what the commit thread pays per batch).

use std::sync::Arc;

use allot::domain::{
    IdempotencyKey, NodeId, Reservation, ReservationId, ReservationStatus, ReserveLine, Sku,
};
use allot::events::Feed;
use allot::store::records::{self, Kind, ReservationRecord};
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
        capacity_day: None,
        fulfilment_order_id: None,
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

criterion_group!(benches, bench_records, bench_group_commit);
criterion_main!(benches);
