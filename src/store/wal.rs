//! The group-commit thread. Writers hand it `Mutation`s through a bounded crossbeam channel
//! while they still hold their shard locks (so log order = apply order for every key); the
//! thread builds everything queued into one `WriteBatch`, gives availability changes their
//! sequence numbers, appends the batch to the journal and fsyncs it (`journal`), applies it to
//! RocksDB (whose own WAL is off), and only then acknowledges the waiters and publishes the
//! changes. A failed write or fsync stops the process: memory must never run ahead of disk for
//! an acknowledged change.
//!
//! With `store.commit_interval_us` set, a group commit starts no sooner than that after the
//! start of the one before, so that under load the writers that arrive meanwhile share it.
//!
//! Load shedding happens before any state changes: a writer first takes a `Slot` (a place in
//! the queue); without one it answers RESOURCE_EXHAUSTED, with one its later send cannot block.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::Cf;
use super::batch::{BatchBuilder, Layout, Ops};
use super::disk::{DiskGuard, DiskLow};
use super::journal::{self, Journal};
use super::keys;
use super::records::{AuditRecord, ChangeRecord, CounterRecord, Kind};
use super::rocks::Store;
use crate::domain::{AuditEvent, AvailabilityChange};

/// `fsync` each group commit (the default and the contract), or leave flushing to the OS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    Fsync,
    /// Acknowledged changes can be lost on power failure (not on a process crash).
    Buffered,
}

#[derive(Debug, Clone)]
pub struct WalOptions {
    pub durability: Durability,
    /// Mutations the queue holds; beyond this writers are shed.
    pub queue_len_max: usize,
    /// Mutations written per WriteBatch at most.
    pub batch_len_max: usize,
    /// The least time between the starts of two group commits (`store.commit_interval_us`).
    pub commit_interval: Duration,
    /// Availability changes kept on disk for `from_sequence` resumes.
    pub change_retention: u64,
    /// Events kept on disk for WatchEvents and order histories.
    pub event_retention: u64,
    /// Refuses writers while the data directory's disk is nearly full; None = no guard.
    pub disk_guard: Option<Arc<DiskGuard>>,
}

/// One atomic change of durable state.
#[derive(Default)]
pub struct Mutation {
    /// The puts and deletes, already in RocksDB's batch format.
    pub ops: Ops,
    /// Sequenced, written to the events column family and published after the fsync.
    pub changes: Vec<AvailabilityChange>,
    /// Sequenced (their own gap-free sequence) and written to the events column family.
    pub audit: Vec<AuditEvent>,
    /// The highest reservation id this mutation allocated (persisted as a high-water mark).
    pub reservation_id_high: Option<u64>,
    /// Completed after the batch holding this mutation is durable.
    pub ack: Option<oneshot::Sender<()>>,
    /// The last mutation: the commit thread writes its batch and exits.
    stop: bool,
}

impl Mutation {
    pub fn put(&mut self, cf: Cf, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.ops.put(cf, key.as_ref(), value.as_ref());
    }

    /// A put whose value is `message` as a record of `kind` (see `records::encode`).
    pub fn put_record<M: prost::Message>(&mut self, cf: Cf, key: impl AsRef<[u8]>, kind: Kind, message: &M) {
        self.ops.put_record(cf, key.as_ref(), kind, message);
    }

    pub fn delete(&mut self, cf: Cf, key: impl AsRef<[u8]>) {
        self.ops.delete(cf, key.as_ref());
    }

    /// Attaches an acknowledgement and returns the receiver to await.
    pub fn acknowledged(&mut self) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        self.ack = Some(sender);
        receiver
    }
}

/// Called by the commit thread with each durable batch of availability changes and events,
/// each in sequence order.
pub type Publisher = Box<dyn FnMut(Vec<AvailabilityChange>, Vec<AuditEvent>) + Send>;

/// The writers' side of the commit thread.
#[derive(Clone)]
pub struct WalHandle {
    sender: Sender<Mutation>,
    queued: Arc<AtomicUsize>,
    queue_len_max: usize,
    /// The last sequence number made durable (and published).
    last_sequence: Arc<AtomicU64>,
    /// The last event sequence made durable (and published).
    last_event_sequence: Arc<AtomicU64>,
    disk_guard: Option<Arc<DiskGuard>>,
}

/// A reserved place in the commit queue; dropping it unused gives the place back.
pub struct Slot<'a> {
    queued: &'a AtomicUsize,
    used: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Why a writer got no slot; nothing has changed yet in either case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The commit queue is full: shed the request.
    QueueFull,
    /// The disk is nearly full: refuse until space returns.
    DiskLow(DiskLow),
}

impl WalHandle {
    pub fn try_slot(&self) -> Result<Slot<'_>, Refused> {
        if let Some(low) = self.disk_guard.as_ref().and_then(|guard| guard.refusal()) {
            metrics::counter!("allot_shed_requests_total", "reason" => "disk_space").increment(1);
            return Err(Refused::DiskLow(low));
        }
        let before = self.queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.queue_len_max {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("allot_shed_requests_total", "reason" => "commit_queue").increment(1);
            return Err(Refused::QueueFull);
        }
        Ok(Slot { queued: &self.queued, used: false })
    }

    /// Hands a mutation to the commit thread. Never blocks: the slot guarantees room.
    pub fn submit(&self, mut slot: Slot<'_>, mutation: Mutation) {
        slot.used = true;
        if self.sender.try_send(mutation).is_err() {
            // Only possible when the commit thread has stopped, i.e. the process is exiting
            // after a fatal storage error: the waiter's ack is dropped and it answers
            // UNAVAILABLE; nothing was acknowledged.
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Asks the commit thread to finish what is queued and exit (graceful shutdown).
    pub fn stop(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _ = self.sender.send(Mutation { stop: true, ..Mutation::default() });
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub fn last_sequence(&self) -> u64 {
        self.last_sequence.load(Ordering::Acquire)
    }

    pub fn last_event_sequence(&self) -> u64 {
        self.last_event_sequence.load(Ordering::Acquire)
    }
}

/// Starts the commit thread. It ends when every `WalHandle` is dropped and the queue is drained.
pub fn start(
    store: Arc<Store>,
    options: WalOptions,
    mut publisher: Publisher,
) -> (WalHandle, std::thread::JoinHandle<()>) {
    assert!(options.queue_len_max > 0 && options.batch_len_max > 0);
    let (sender, receiver) = crossbeam_channel::bounded(options.queue_len_max);
    let queued = Arc::new(AtomicUsize::new(0));
    let last_sequence = Arc::new(AtomicU64::new(store.recovered_last_sequence()));
    let last_event_sequence = Arc::new(AtomicU64::new(store.recovered_last_audit_sequence()));
    let handle = WalHandle {
        sender,
        queued: queued.clone(),
        queue_len_max: options.queue_len_max,
        last_sequence: last_sequence.clone(),
        last_event_sequence: last_event_sequence.clone(),
        disk_guard: options.disk_guard.clone(),
    };
    let mut journal = store.take_journal().expect("the commit thread starts once per store");
    // Each commit's write is then durable when it returns: no fdatasync, no page cache.
    let write_through = options.durability == Durability::Fsync && journal.write_through();
    tracing::debug!(write_through, "journal appends");
    let requests = journal.attach();
    let spares = journal.spares();
    let flushing_store = store.clone();
    let journal_thread = std::thread::Builder::new()
        .name("allot-journal".into())
        .spawn(move || journal::run_journal_thread(&spares, &requests, || flushing_store.flush()))
        .expect("spawning the journal thread");
    let thread = std::thread::Builder::new()
        .name("allot-commit".into())
        .spawn(move || {
            let sequences = Sequences { changes: &last_sequence, events: &last_event_sequence };
            commit_loop(&store, &options, &mut journal, &receiver, &queued, &sequences, &mut publisher);
            // Closing the journal ends the journal thread once its flushes are done.
            drop(journal);
            let _ = journal_thread.join();
        })
        .expect("spawning the commit thread");
    (handle, thread)
}

/// The last durable sequence numbers, shared with the writers' handles.
struct Sequences<'a> {
    changes: &'a AtomicU64,
    events: &'a AtomicU64,
}

fn commit_loop(
    store: &Store,
    options: &WalOptions,
    journal: &mut Journal,
    receiver: &Receiver<Mutation>,
    queued: &AtomicUsize,
    sequences: &Sequences<'_>,
    publisher: &mut Publisher,
) {
    let last_sequence = sequences.changes;
    let last_event_sequence = sequences.events;
    // The journal has the batch (fsync'd) before RocksDB gets it: RocksDB's WAL is off.
    let mut write_options = WriteOptions::default();
    write_options.disable_wal(true);
    let mut sequence = last_sequence.load(Ordering::Acquire);
    let mut audit_sequence = store.recovered_last_audit_sequence();
    let mut change_history =
        Retention::new(options.change_retention, store.recovered_first_sequence(), keys::META_FIRST_SEQUENCE);
    let mut event_history = Retention::new(
        options.event_retention,
        store.first_event_sequence(),
        keys::META_FIRST_AUDIT_SEQUENCE,
    );
    let mut reservation_id_high = 0u64;
    let mut reservation_id_written = 0u64;
    let mut batch: Vec<Mutation> = Vec::with_capacity(options.batch_len_max);
    let layout = Layout::probe(&Cf::ALL.map(|cf| store.cf(cf)));
    let mut last_commit: Option<Instant> = None;
    while let Ok(first) = receiver.recv() {
        // Pacing: under load, the writers that arrive meanwhile join this commit instead of
        // each starting one of their own (fewer, larger device flushes). A commit whose
        // predecessor started long enough ago goes at once.
        if !options.commit_interval.is_zero() {
            if let Some(since) = last_commit.map(|started| started.elapsed())
                && since < options.commit_interval
            {
                std::thread::sleep(options.commit_interval - since);
            }
            last_commit = Some(Instant::now());
        }
        batch.push(first);
        while batch.len() < options.batch_len_max {
            match receiver.try_recv() {
                Ok(mutation) => batch.push(mutation),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        queued.fetch_sub(batch.len(), Ordering::AcqRel);
        let stopping = batch.iter().any(|mutation| mutation.stop);
        let mut write_batch = BatchBuilder::new(&layout);
        let mut published = Vec::new();
        let mut events = Vec::new();
        // Each column family's keys go in runs: the changes in sequence order, then the audit
        // events, then the order history keys. A skip list inserts a key after the one it just
        // inserted cheaply; alternating between two key ranges made every insert search anew
        // (the events column family's inserts were 8% of the daemon under ReserveBatch).
        for mutation in &mut batch {
            write_batch.append(&mutation.ops);
            for mut change in mutation.changes.drain(..) {
                sequence += 1;
                change.sequence = sequence;
                let record = ChangeRecord::from_change(&change);
                write_batch.put_record(Cf::Changes, &keys::change(sequence), Kind::Change, &record);
                published.push(change);
            }
            if let Some(high) = mutation.reservation_id_high {
                reservation_id_high = reservation_id_high.max(high);
            }
        }
        let audit_before = audit_sequence;
        // Audit events older than this are no longer kept: their files go after this commit.
        let mut events_trimmed = None;
        for mutation in &mut batch {
            for mut event in mutation.audit.drain(..) {
                audit_sequence += 1;
                event.sequence = audit_sequence;
                let record = AuditRecord::from_event(&event);
                write_batch.put_record(Cf::Events, &keys::audit(audit_sequence), Kind::Audit, &record);
                events.push(event);
            }
        }
        for event in events.iter().filter(|event| !event.order_id.is_empty()) {
            write_batch.put(Cf::OrderHistory, &keys::order_history(&event.order_id, event.sequence), &[]);
        }
        if audit_sequence != audit_before {
            let record = CounterRecord { value: audit_sequence };
            write_batch.put_record(Cf::Meta, keys::META_LAST_AUDIT_SEQUENCE, Kind::Counter, &record);
            // Bounded history, trimmed like the changes (below). An order's history keys of
            // trimmed events are skipped when read and dropped by compactions (`HistoryTrim`).
            events_trimmed = event_history.trim(audit_sequence, &mut write_batch);
            if let Some(keep_from) = events_trimmed {
                store.set_first_event_sequence(keep_from);
            }
        }
        // Changes older than this are no longer kept: their files go after this commit.
        let mut changes_trimmed = None;
        if !published.is_empty() {
            let record = CounterRecord { value: sequence };
            write_batch.put_record(Cf::Meta, keys::META_LAST_SEQUENCE, Kind::Counter, &record);
            // Bounded history (see `Retention`).
            changes_trimmed = change_history.trim(sequence, &mut write_batch);
            if let Some(keep_from) = changes_trimmed {
                store.set_first_sequence(keep_from);
            }
        }
        if reservation_id_high > reservation_id_written {
            let record = CounterRecord { value: reservation_id_high };
            write_batch.put_record(Cf::Meta, keys::META_NEXT_RESERVATION_ID, Kind::Counter, &record);
            reservation_id_written = reservation_id_high;
        }
        let record = CounterRecord { value: journal.next_seq() };
        write_batch.put_record(Cf::Meta, keys::META_JOURNAL_SEQ, Kind::Counter, &record);
        let data = write_batch.finish();
        let started = Instant::now();
        // Fault injection (compiled in only with the `failpoints` feature): a failed append,
        // and a batch appended but whose fsync failed. Both stop the daemon unacknowledged,
        // exactly like a real failure.
        fail::fail_point!("commit-before-write", |_| fatal("injected: appending a batch failed"));
        if let Err(error) = journal.append(&data) {
            fatal(&format!("the journal failed to append a batch: {error}"));
        }
        if options.durability == Durability::Fsync
            && let Err(error) = journal.sync()
        {
            fatal(&format!("the journal failed to fsync a batch: {error}"));
        }
        fail::fail_point!("commit-after-write", |_| fatal("injected: the fsync of an appended batch failed"));
        let journaled = Instant::now();
        if let Err(error) = store.db().write_opt(WriteBatch::from_data(&data), &write_options) {
            fatal(&format!("the store failed to apply a journaled batch: {error}"));
        }
        metrics::histogram!("allot_commit_fsync_seconds").record((journaled - started).as_secs_f64());
        metrics::histogram!("allot_commit_apply_seconds").record(journaled.elapsed().as_secs_f64());
        metrics::histogram!("allot_commit_batch_mutations").record(batch.len() as f64);
        last_sequence.store(sequence, Ordering::Release);
        last_event_sequence.store(audit_sequence, Ordering::Release);
        if let Some(keep_from) = events_trimmed {
            // The trim is durable now (journaled): the order history's compactions may drop
            // the older events' keys. Before the acknowledgements, so that whoever saw this
            // commit acknowledged also sees the bound moved.
            store.set_history_kept_from(keep_from);
        }
        for mutation in batch.drain(..) {
            if let Some(ack) = mutation.ack {
                // The waiter may have gone (client cancelled): the change is durable anyway.
                let _ = ack.send(());
            }
        }
        if !published.is_empty() || !events.is_empty() {
            publisher(published, events);
        }
        if let Some(keep_from) = changes_trimmed {
            store.drop_files_before(Cf::Changes, keep_from, keys::change);
        }
        if let Some(keep_from) = events_trimmed {
            store.drop_files_before(Cf::Events, keep_from, keys::audit);
        }
        if stopping {
            tracing::info!(last_sequence = sequence, "commit thread stopped");
            return;
        }
    }
}

/// The retained history of one sequence (the changes, or the audit events): its entries older
/// than the newest `retention` are dropped in steps of an eighth of it. The oldest one kept is
/// recorded in meta (`meta_key`), and the commit thread then deletes the files that hold only
/// older ones whole (`Store::drop_files_before`). A range delete would do it in the commit's
/// batch, but the flushed file holding its tombstone would span from the oldest entry to the
/// newest, and RocksDB would rewrite every retained entry at the next compaction, once per trim.
struct Retention {
    retention: u64,
    trimmed_below: u64,
    meta_key: &'static [u8],
}

impl Retention {
    fn new(retention: u64, first_kept: u64, meta_key: &'static [u8]) -> Self {
        Self { retention, trimmed_below: first_kept, meta_key }
    }

    /// After the sequence reached `newest`: the new oldest sequence kept, recorded in
    /// `write_batch`, when a trim is due.
    fn trim(&mut self, newest: u64, write_batch: &mut BatchBuilder<'_>) -> Option<u64> {
        let keep_from = newest.saturating_sub(self.retention) + 1;
        if keep_from <= self.trimmed_below + self.retention / 8 + 1 {
            return None;
        }
        write_batch.put_record(Cf::Meta, self.meta_key, Kind::Counter, &CounterRecord { value: keep_from });
        self.trimmed_below = keep_from;
        Some(keep_from)
    }
}

/// An unrecoverable storage failure: say so once, clearly, and stop without acknowledging.
pub fn fatal(message: &str) -> ! {
    tracing::error!("FATAL: {message}; stopping without acknowledging pending requests");
    eprintln!("allotd: FATAL: {message}");
    std::process::exit(70)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreOptions;

    /// A commit thread on `store` (buffered, 1,000 changes and 1,000 events retained), pacing
    /// its commits `interval` apart.
    fn start_paced(store: Arc<Store>, interval: Duration) -> (WalHandle, std::thread::JoinHandle<()>) {
        let options = WalOptions {
            durability: Durability::Buffered,
            queue_len_max: 16,
            batch_len_max: 16,
            commit_interval: interval,
            change_retention: 1_000,
            event_retention: 1_000,
            disk_guard: None,
        };
        start(store, options, Box::new(|_, _| {}))
    }

    /// Submits an empty mutation and waits until its group commit is durable.
    fn commit_one(wal: &WalHandle) {
        let slot = wal.try_slot().unwrap();
        let mut mutation = Mutation::default();
        let ack = mutation.acknowledged();
        wal.submit(slot, mutation);
        ack.blocking_recv().unwrap();
    }

    #[test]
    fn trimmed_changes_and_events_go_in_whole_files_and_the_kept_ones_are_never_rewritten() {
        // Goal: with change_retention and event_retention = 1,000, the changes and the audit
        // events are each kept from their first sequence on (also across a restart); the files
        // that hold only older ones are deleted whole; and no trim makes RocksDB rewrite the
        // kept ones (a range delete did: its tombstone made the next flushed file span every
        // older entry, so each compaction merged them all); an order's history lists only
        // kept events. Method: 21 commits of 500 changes and 500 audit events (the first about
        // an order), RocksDB flushed after each (one file each) and left to finish its
        // compactions before the last one; then every file of both families must still be one
        // commit's flush, exactly as flushed, and only the newest few may remain.
        const ROUND: u64 = 500;
        const ROUNDS: u64 = 21;
        let dir = tempfile::tempdir().unwrap();
        let (store, _recovered) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let store = Arc::new(store);
        let (wal, thread) = start_paced(store.clone(), Duration::ZERO);
        for round in 0..ROUNDS {
            if round == ROUNDS - 1 {
                // Files move out of level 0 (whole: nothing overlaps them) only in compactions.
                let mut wait = rocksdb::WaitForCompactOptions::default();
                wait.set_timeout(30_000_000);
                store.db().wait_for_compact(&wait).unwrap();
            }
            let slot = wal.try_slot().unwrap();
            let mut mutation = Mutation {
                // As many audit events, the first of each commit about an order.
                audit: (0..ROUND)
                    .map(|n| AuditEvent {
                        order_id: if n == 0 { format!("o-{round}") } else { String::new() },
                        ..AuditEvent::default()
                    })
                    .collect(),
                changes: (0..ROUND)
                    .map(|n| AvailabilityChange {
                        sku: crate::domain::Sku::parse(&format!("SKU-{n}")).unwrap(),
                        node_id: crate::domain::NodeId::parse("N1").unwrap(),
                        atp: n as i64,
                        totals: crate::domain::Totals::default(),
                        sequence: 0,
                    })
                    .collect(),
                ..Mutation::default()
            };
            let ack = mutation.acknowledged();
            wal.submit(slot, mutation);
            ack.blocking_recv().unwrap();
            // Not after the last commit: its flush could move files of level 0 down after the
            // trim that commit made (a file trimmed then, still in level 0, may stay).
            if round < ROUNDS - 1 {
                store.flush().unwrap();
            }
        }
        // The commit thread deletes the trimmed files after it acknowledges the commit: one
        // more (empty) commit comes after that.
        commit_one(&wal);
        let last = ROUND * ROUNDS;
        let keep_from = store.first_sequence();
        let events_keep_from = store.first_event_sequence();
        for (family, kept_from, sequence_of) in [
            (Cf::Changes, keep_from, keys::change_sequence as fn(&[u8]) -> Option<u64>),
            (Cf::Events, events_keep_from, keys::audit_sequence),
        ] {
            assert!(
                (last - 1_000 + 1..=last - 1_000 + 1 + 1_000 / 8 + 1).contains(&kept_from),
                "{kept_from}"
            );
            let files: Vec<_> = store
                .db()
                .live_files()
                .unwrap()
                .into_iter()
                .filter(|file| file.column_family_name == family.name())
                .collect();
            for file in &files {
                let first = sequence_of(file.start_key.as_deref().unwrap()).unwrap();
                let newest = sequence_of(file.end_key.as_deref().unwrap()).unwrap();
                assert!(
                    first % ROUND == 1 && newest == first + ROUND - 1 && file.num_entries == ROUND,
                    "a file of {family:?} is not one commit's flush: {file:?}"
                );
                assert!(newest >= kept_from || file.level == 0, "a file of trimmed entries stayed: {file:?}");
            }
            // The kept ones, plus at most the files still in level 0 (compacted after the trim).
            let held: u64 = files.iter().map(|file| file.num_entries).sum();
            assert!(held <= 1_000 + 4 * ROUND, "{family:?}: {held} entries on disk, {} files", files.len());
        }
        let kept = store.read_changes(keep_from, 10_000).unwrap();
        assert_eq!(kept.len() as u64, last - keep_from + 1);
        assert!(kept.iter().zip(keep_from..).all(|(change, sequence)| change.sequence == sequence));
        let events = store.read_audit(events_keep_from, 10_000).unwrap();
        assert_eq!(events.len() as u64, last - events_keep_from + 1);
        assert!(events.iter().zip(events_keep_from..).all(|(event, sequence)| event.sequence == sequence));
        // An order's history lists its kept events only.
        let newest_order = format!("o-{}", ROUNDS - 1);
        let history = store.read_order_history(&newest_order, 10).unwrap();
        assert_eq!(history.iter().map(|event| event.sequence).collect::<Vec<_>>(), vec![last - ROUND + 1]);
        assert!(store.read_order_history("o-0", 10).unwrap().is_empty(), "a trimmed event in a history");
        wal.stop();
        thread.join().unwrap();
        drop(store);
        let (store, recovered) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!((store.first_sequence(), recovered.last_sequence), (keep_from, last));
        assert_eq!(store.first_event_sequence(), events_keep_from);
    }

    #[test]
    fn an_orders_history_keys_of_trimmed_events_go_when_their_files_are_compacted() {
        // Goal: the order history index does not keep a key for every order event ever
        // written. A compaction drops the keys of the events trimmed from the log (at
        // event_retention), both while the commit thread trims and after a restart, and keeps
        // every other; each order's history then lists exactly its kept events. Method: commits
        // of 500 events, each about one of 40 orders in turn (every order has old and new
        // events), at a retention of 1,000, RocksDB flushed after each; then a full compaction
        // of order_history. Twice: after 12 commits while the commit thread runs, and after 6
        // more and a restart.
        const ROUND: u64 = 500;
        const ORDERS: u64 = 40;
        let order_of = |sequence: u64| format!("o-{}", sequence % ORDERS);
        let dir = tempfile::tempdir().unwrap();
        let history_keys = |store: &Store| -> Vec<u64> {
            let iterator = store.db().iterator_cf(store.cf(Cf::OrderHistory), rocksdb::IteratorMode::Start);
            iterator.map(|item| keys::order_history_sequence(&item.unwrap().0).unwrap()).collect()
        };
        let compact_and_check = |store: &Store, last: u64| {
            store.db().compact_range_cf(store.cf(Cf::OrderHistory), None::<&[u8]>, None::<&[u8]>);
            let kept_from = store.first_event_sequence();
            assert!(
                (last - 1_000 + 1..=last - 1_000 + 1 + 1_000 / 8 + 1).contains(&kept_from),
                "{kept_from}"
            );
            let mut left = history_keys(store);
            left.sort_unstable();
            assert!(
                left.iter().copied().eq(kept_from..=last),
                "events kept from {kept_from} to {last}: {} history keys left, from {:?} to {:?}",
                left.len(),
                left.first(),
                left.last()
            );
            for order in 0..ORDERS {
                let history = store.read_order_history(&format!("o-{order}"), 1_000).unwrap();
                let expected: Vec<u64> =
                    (kept_from..=last).filter(|sequence| sequence % ORDERS == order).collect();
                assert_eq!(history.iter().map(|event| event.sequence).collect::<Vec<_>>(), expected);
            }
        };
        let run = |store: &Arc<Store>, rounds: u64| {
            let (wal, thread) = start_paced(store.clone(), Duration::ZERO);
            for _ in 0..rounds {
                let first = wal.last_event_sequence() + 1;
                let slot = wal.try_slot().unwrap();
                let mut mutation = Mutation {
                    audit: (first..first + ROUND)
                        .map(|sequence| AuditEvent { order_id: order_of(sequence), ..AuditEvent::default() })
                        .collect(),
                    ..Mutation::default()
                };
                let ack = mutation.acknowledged();
                wal.submit(slot, mutation);
                ack.blocking_recv().unwrap();
                store.flush().unwrap();
            }
            (wal, thread)
        };
        let open = || Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap().0);
        let store = open();
        let (wal, thread) = run(&store, 12);
        compact_and_check(&store, 12 * ROUND);
        wal.stop();
        thread.join().unwrap();
        drop(store);
        // The commit thread starts once per opened store.
        let store = open();
        let (wal, thread) = run(&store, 6);
        wal.stop();
        thread.join().unwrap();
        drop(store);
        let store = open();
        compact_and_check(&store, 18 * ROUND);
    }

    #[test]
    fn commits_in_a_row_are_paced_and_a_quiet_one_goes_at_once() {
        // Goal: with store.commit_interval_us set, a group commit starts no sooner than that
        // after the start of the one before it, and a commit whose predecessor started longer
        // ago than that does not wait. Method: four commits back to back take at least three
        // intervals (a lower bound: a sleep never returns early); after a pause longer than
        // the interval, one more takes less than half of one.
        let dir = tempfile::tempdir().unwrap();
        let interval = Duration::from_millis(300);
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).unwrap().0);
        let (wal, thread) = start_paced(store, interval);
        let started = Instant::now();
        for _ in 0..4 {
            commit_one(&wal);
        }
        let four = started.elapsed();
        assert!(four >= interval * 3, "four commits in a row took {four:?}");
        std::thread::sleep(interval + interval / 2);
        let started = Instant::now();
        commit_one(&wal);
        let alone = started.elapsed();
        assert!(alone < interval / 2, "a commit after a pause waited {alone:?}");
        wal.stop();
        thread.join().unwrap();
    }
}
