//! Retention queues: what the retention purge will forget, in the order it becomes due.
//! Terminal reservations queue by the time they ended, idempotency keys by the time they were
//! made, so a purge pops what is due (work in proportion to what it forgets) instead of
//! scanning every reservation and key it holds.
//!
//! Entries are hints, checked against the map when they come due: a key made again after it
//! was forgotten has an entry of its own, and the older one finds it too young and leaves it.
//! A queue is sharded (round robin) so that writers rarely meet on one lock; each shard is in
//! time order up to the few microseconds between a writer reading the clock and pushing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// Entries of one shard: (time in ms, item), oldest first.
type Shard<T> = Mutex<VecDeque<(u64, T)>>;

pub struct RetentionQueue<T> {
    shards: Box<[Shard<T>]>,
    next: AtomicUsize,
}

impl<T> RetentionQueue<T> {
    pub fn new(shard_count: usize) -> Self {
        assert!(shard_count > 0);
        Self {
            shards: (0..shard_count).map(|_| Mutex::new(VecDeque::new())).collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A queue of `entries`, already in time order (start-up), each shard sized to fit: a
    /// queue grown by pushes would keep up to half its memory spare.
    pub fn from_sorted(shard_count: usize, entries: Vec<(u64, T)>) -> Self {
        assert!(shard_count > 0);
        let per_shard = entries.len().div_ceil(shard_count);
        let mut shards: Vec<VecDeque<(u64, T)>> =
            (0..shard_count).map(|_| VecDeque::with_capacity(per_shard)).collect();
        let count = entries.len();
        for (index, entry) in entries.into_iter().enumerate() {
            shards[index % shard_count].push_back(entry);
        }
        Self { shards: shards.into_iter().map(Mutex::new).collect(), next: AtomicUsize::new(count) }
    }

    /// Queues `item`, due once `at_ms` is older than the retention.
    pub fn push(&self, at_ms: u64, item: T) {
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.shards[shard].lock().push_back((at_ms, item));
    }

    /// Up to `limit` entries whose time is before `cutoff_ms`, oldest first within each shard.
    pub fn pop_due(&self, cutoff_ms: u64, limit: usize) -> Vec<(u64, T)> {
        let mut due = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            while due.len() < limit && shard.front().is_some_and(|(at_ms, _)| *at_ms < cutoff_ms) {
                due.extend(shard.pop_front());
            }
            if due.len() >= limit {
                break;
            }
        }
        due
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.lock().len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_only_what_is_due_oldest_first_and_at_most_the_limit() {
        // Goal: entries before the cutoff come out oldest first per shard, at most `limit` per
        // call, and younger ones stay. Method: 3 shards, 10 entries at 0..10 ms, cutoffs 4 and
        // 10 with small limits.
        let queue = RetentionQueue::new(3);
        for at_ms in 0..10u64 {
            queue.push(at_ms, at_ms * 100);
        }
        let mut first: Vec<u64> = queue.pop_due(4, 100).into_iter().map(|(at_ms, _)| at_ms).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2, 3]);
        assert_eq!(queue.len(), 6);
        let limited = queue.pop_due(10, 4);
        assert_eq!(limited.len(), 4);
        assert!(limited.iter().all(|(at_ms, item)| *item == at_ms * 100 && *at_ms >= 4));
        assert_eq!(queue.pop_due(10, 100).len(), 2);
        assert!(queue.is_empty());
        assert!(queue.pop_due(u64::MAX, 100).is_empty());
    }

    #[test]
    fn a_queue_built_from_sorted_entries_pops_like_a_pushed_one() {
        let entries: Vec<(u64, u64)> = (0..10u64).map(|at_ms| (at_ms, at_ms)).collect();
        let queue = RetentionQueue::from_sorted(3, entries);
        assert_eq!(queue.len(), 10);
        let mut first: Vec<u64> = queue.pop_due(4, 100).into_iter().map(|(_, item)| item).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2, 3]);
        queue.push(20, 20);
        assert_eq!(queue.pop_due(20, 100).len(), 6);
        assert_eq!(queue.pop_due(21, 100), [(20, 20)]);
        assert!(RetentionQueue::<u64>::from_sorted(4, Vec::new()).is_empty());
    }
}
