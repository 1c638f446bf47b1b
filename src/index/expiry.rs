//! The expiry queue: min-heaps of (expires_at_ms, reservation id), sharded by id so that
//! reserving threads rarely meet on one lock. Entries are hints: a reservation extended or
//! released since is checked again when its entry comes due.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use parking_lot::Mutex;

use crate::domain::ReservationId;

/// A min-heap of (expires_at_ms, reservation id).
type Heap = BinaryHeap<Reverse<(u64, u64)>>;

pub struct ExpiryQueue {
    heaps: Box<[Mutex<Heap>]>,
}

impl ExpiryQueue {
    pub fn new(shard_count: usize) -> Self {
        assert!(shard_count > 0);
        Self { heaps: (0..shard_count).map(|_| Mutex::new(BinaryHeap::new())).collect() }
    }

    pub fn push(&self, id: ReservationId, expires_at_ms: u64) {
        let heap = &self.heaps[(id.0 as usize) % self.heaps.len()];
        heap.lock().push(Reverse((expires_at_ms, id.0)));
    }

    /// Up to `limit` entries due at `now_ms`, earliest first within each heap.
    pub fn pop_due(&self, now_ms: u64, limit: usize) -> Vec<ReservationId> {
        let mut due = Vec::new();
        for heap in self.heaps.iter() {
            let mut heap = heap.lock();
            while due.len() < limit {
                match heap.peek() {
                    Some(Reverse((expires_at_ms, id))) if *expires_at_ms <= now_ms => {
                        due.push(ReservationId(*id));
                        heap.pop();
                    }
                    _ => break,
                }
            }
            if due.len() >= limit {
                break;
            }
        }
        due
    }
}
