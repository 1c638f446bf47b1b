//! Opening the RocksDB store and recovering the full state from it.

use std::ffi::CStr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Direction, IteratorMode, Options,
};

use super::journal::{self, Journal};
use super::keys::{self, IdemNamespace};
use super::order_records::{FulfilmentRecord, OrderRecord, ReturnRecord};
use super::records::{
    self, AuditRecord, ChangeRecord, CounterRecord, DecodeError, IdempotencyRecord, Kind, NodeRecord,
    PositionRecord, ReservationRecord,
};
use super::{Cf, StoreError};
use crate::domain::{
    AuditEvent, AvailabilityChange, FulfilmentOrder, Node, NodeId, Order, Position, Reservation, Return, Sku,
};

/// The format this build writes; a newer one on disk is refused rather than misread.
/// 2: the commit thread's writes go to allotd's own journal (`journal/`), not RocksDB's WAL;
/// a build that reads only format 1 would ignore the journal, so it must refuse format 2.
/// 3: a reservation made by Reserve remembers its idempotency key in its own record (fields
/// `reserve_fingerprint`, `reserve_expires_at_ms`); the key has no record of its own until the
/// reservation is purged. A format-2 build would forget those keys, so it must refuse format 3.
/// Formats 1 and 2 open as they are: their keys all have records of their own.
/// 4: a position's record no longer keeps its reserved count; start-up adds up the open
/// reservations instead, and a hold, release or expiry writes no position record. A format-3
/// build would read every count as the last on-hand change left it, so it must refuse format 4.
/// Formats 1 to 3 open as they are (their counts are ignored, and equal the sum anyway).
/// 5: the availability changes have a column family of their own (`changes`). They shared
/// `events` with the audit events, two key ranges that each grow at their top, so every flushed
/// file spanned every older event and each compaction rewrote them all. Older formats are
/// upgraded at open, after the journal's replay, by moving their changes across. A format-4
/// build would look for the changes in `events` and find none; RocksDB refuses to open the
/// store for it anyway, since it does not know the `changes` column family.
/// 6: each order's history index has a column family of its own (`order_history`), so that
/// `events` holds only the audit events, in sequence order, and its trims can delete whole
/// files instead of writing a range tombstone whose file spanned every retained event (see
/// `drop_files_before`). Older formats are upgraded at open by moving the index across; a
/// format-5 build cannot open the store (it does not know `order_history`).
const STORE_FORMAT_VERSION: u64 = 6;

/// Keys moved per write batch when an older store is upgraded (formats 5 and 6).
const MOVED_PER_BATCH: usize = 65_536;

/// The key ranges that older formats kept in `events`: the changes (`a` + 8 bytes, format 5)
/// and the order history index (`h` + ..., format 6).
const CHANGES_RANGE: (&[u8], &[u8]) = (b"a", b"b");
const ORDER_HISTORY_RANGE: (&[u8], &[u8]) = (b"h", b"i");

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// RocksDB block cache and memtable budget hint, in bytes.
    pub write_buffer_bytes: usize,
    /// Size of a journal segment; a full one makes RocksDB flush (see `journal`).
    pub journal_segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { write_buffer_bytes: 64 * 1024 * 1024, journal_segment_bytes: 64 * 1024 * 1024 }
    }
}

/// The journal's directory inside the data directory.
const JOURNAL_DIR: &str = "journal";

/// A raw key and value read back from RocksDB.
type KeyValue = (Box<[u8]>, Box<[u8]>);

pub struct Store {
    db: DB,
    /// Taken by the commit thread when it starts.
    journal: parking_lot::Mutex<Option<Journal>>,
    /// Oldest availability change still on disk.
    first_sequence: AtomicU64,
    /// Oldest event still on disk.
    first_event_sequence: AtomicU64,
    /// The oldest event kept, as far as the meta on disk says (`first_event_sequence` moves
    /// ahead of it while a trim's commit is being written): the order history's compaction
    /// filter drops the keys of older events (`HistoryTrim`).
    history_kept_from: Arc<AtomicU64>,
    recovered_last_sequence: u64,
    recovered_last_audit_sequence: u64,
}

/// Everything read back at start-up.
#[derive(Default)]
pub struct Recovered {
    pub nodes: Vec<Node>,
    /// Every position, grouped by SKU, each group sorted by node id (the key order): the
    /// groups move into the index as they are, without copying.
    pub positions: Vec<(Sku, Vec<(NodeId, Position)>)>,
    /// How many positions `positions` holds.
    pub position_count: usize,
    pub reservations: Vec<Reservation>,
    pub idempotency: Vec<(IdemNamespace, String, IdempotencyRecord)>,
    /// One past the highest reservation id ever allocated.
    pub next_reservation_id: u64,
    pub last_sequence: u64,
    pub orders: RecoveredOrders,
}

/// The order side of the state read back at start-up.
#[derive(Default)]
pub struct RecoveredOrders {
    pub orders: Vec<Order>,
    pub fulfilment_orders: Vec<FulfilmentOrder>,
    pub returns: Vec<Return>,
    /// Idempotency records of the fulfilment RPCs (shipments, shortages, returns).
    pub idempotency: Vec<(IdemNamespace, String, IdempotencyRecord)>,
    /// The next ids to assign, as stored (0 when never written).
    pub next_order_id: u64,
    pub next_fulfilment_id: u64,
    pub next_return_id: u64,
}

/// RocksDB hands the disk its flush and compaction output every this many bytes
/// (`sync_file_range`) instead of all of an SST file at its closing fsync. A burst of tens of
/// MB queued at once made the journal's write-through of the next group commit wait behind it:
/// under ReserveBatch 100 x 4, commits over 10 ms fell from 8-10 to 0-2 per 9 s run and the
/// call p99 from 14.0-16.0 to 12.1-13.0 ms (three interleaved pairs).
const BYTES_PER_SYNC: u64 = 1024 * 1024;

/// The name of the order history's compaction filter and of its factory.
const HISTORY_TRIM_NAME: &CStr = c"allot-order-history-trim";

/// Files of the order history older than this are compacted again (see `HistoryTrim`).
const HISTORY_RECOMPACTED_AFTER_SECONDS: u64 = 24 * 60 * 60;

/// The order history's compaction filter: an order's history key (`h` + order id + 0x00 +
/// sequence) whose event was trimmed from the log goes when its file is compacted. Reads skip
/// such keys anyway (`read_order_history`); without this they would stay on disk forever,
/// one per order event ever written. Each compaction takes the bound as it was when it
/// started.
struct HistoryTrim {
    kept_from: Arc<AtomicU64>,
}

struct HistoryTrimFilter {
    kept_from: u64,
}

impl rocksdb::compaction_filter_factory::CompactionFilterFactory for HistoryTrim {
    type Filter = HistoryTrimFilter;

    fn create(
        &mut self,
        _: rocksdb::compaction_filter_factory::CompactionFilterContext,
    ) -> HistoryTrimFilter {
        HistoryTrimFilter { kept_from: self.kept_from.load(Ordering::Acquire) }
    }

    fn name(&self) -> &CStr {
        HISTORY_TRIM_NAME
    }
}

impl rocksdb::compaction_filter::CompactionFilter for HistoryTrimFilter {
    fn filter(&mut self, _level: u32, key: &[u8], _value: &[u8]) -> rocksdb::compaction_filter::Decision {
        match keys::order_history_sequence(key) {
            Some(sequence) if sequence < self.kept_from => rocksdb::compaction_filter::Decision::Remove,
            _ => rocksdb::compaction_filter::Decision::Keep,
        }
    }

    fn name(&self) -> &CStr {
        HISTORY_TRIM_NAME
    }
}

impl Store {
    /// Opens (or creates) the store and reads back the whole state.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<(Store, Recovered), StoreError> {
        std::fs::create_dir_all(path)
            .map_err(|source| StoreError::Io { path: path.display().to_string(), source })?;
        let mut db_options = Options::default();
        db_options.create_if_missing(true);
        db_options.create_missing_column_families(true);
        db_options.set_compression_type(DBCompressionType::Lz4);
        db_options.set_write_buffer_size(options.write_buffer_bytes);
        db_options.set_max_background_jobs(2);
        db_options.set_bytes_per_sync(BYTES_PER_SYNC);
        db_options.set_keep_log_file_num(4);
        // Bounds what a restart after kill -9 replays: past this much write-ahead log, RocksDB
        // flushes the memtables holding its oldest part (the default, four times every
        // memtable together, let a restart with 10M positions replay gigabytes for 13 s).
        db_options.set_max_total_wal_size(256 * 1024 * 1024);
        // One writer (the commit thread): the memtables need no concurrent inserts, which the
        // vector memtables below could not do anyway.
        db_options.set_allow_concurrent_memtable_write(false);
        // The commit thread writes with RocksDB's WAL off (its journal is allotd's own): every
        // flush must take all column families at once, so that what is on disk is always the
        // result of a prefix of the journal, named by its `journal_seq`.
        db_options.set_atomic_flush(true);
        // 0 until start-up reads the first event kept: no compaction drops anything before.
        let history_kept_from = Arc::new(AtomicU64::new(0));
        let descriptors = Cf::ALL.iter().map(|cf| {
            let mut cf_options = Options::default();
            cf_options.set_compression_type(DBCompressionType::Lz4);
            cf_options.set_write_buffer_size(options.write_buffer_bytes);
            // Never read while serving (only iterated once at start-up): an append-only vector
            // memtable, sorted when flushed, instead of a skip list whose random inserts were
            // the commit thread's largest cost. Not for reservations: their keys are ids, made
            // in ascending order, which a skip list appends cheaply (only a reservation's later
            // changes go in further back), while sorting the vector at each flush cost more
            // (ReserveBatch 50 x 4: 128,700 against 117,700/s, six interleaved pairs).
            if cf.read_only_at_start_up() && *cf != Cf::Reservations {
                cf_options.set_memtable_factory(rocksdb::MemtableFactory::Vector);
            }
            if *cf == Cf::OrderHistory {
                cf_options
                    .set_compaction_filter_factory(HistoryTrim { kept_from: history_kept_from.clone() });
                // An order's keys are spread over the whole key range, and a file of finished
                // orders may never be compacted again on its own: each file is rewritten (and
                // its trimmed keys dropped) at least once a day.
                cf_options.set_periodic_compaction_seconds(HISTORY_RECOMPACTED_AFTER_SECONDS);
            }
            ColumnFamilyDescriptor::new(cf.name(), cf_options)
        });
        let db = DB::open_cf_descriptors(&db_options, path, descriptors)?;
        let mut store = Store {
            db,
            journal: parking_lot::Mutex::new(None),
            first_sequence: AtomicU64::new(1),
            first_event_sequence: AtomicU64::new(1),
            history_kept_from,
            recovered_last_sequence: 0,
            recovered_last_audit_sequence: 0,
        };
        let found_format = store.check_format_version()?;
        let journal = store.replay_journal(&path.join(JOURNAL_DIR), options.journal_segment_bytes)?;
        // After the replay: the journal's older records wrote their changes into `events`.
        store.upgrade_format(found_format)?;
        *store.journal.lock() = Some(journal);
        let recovered = store.recover()?;
        Ok((store, recovered))
    }

    /// Applies the journal's records that the flushed state does not hold yet, flushes them,
    /// and starts the journal after them.
    fn replay_journal(&self, dir: &Path, segment_bytes: u64) -> Result<Journal, StoreError> {
        let applied = self.counter(keys::META_JOURNAL_SEQ)?.unwrap_or(0);
        let recovery = journal::open(dir, applied)?;
        let replayed = recovery.replay_len();
        if replayed > 0 {
            let started = Instant::now();
            let mut write_options = rocksdb::WriteOptions::default();
            write_options.disable_wal(true);
            recovery.replay(|_, payload| {
                self.db.write_opt(rocksdb::WriteBatch::from_data(payload), &write_options)?;
                Ok(())
            })?;
            self.flush()?;
            tracing::info!(
                records = replayed,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "replayed the journal"
            );
        }
        let applied = self.counter(keys::META_JOURNAL_SEQ)?.unwrap_or(0);
        recovery.start(applied, segment_bytes)
    }

    /// The journal, for the commit thread (once).
    pub fn take_journal(&self) -> Option<Journal> {
        self.journal.lock().take()
    }

    pub fn db(&self) -> &DB {
        &self.db
    }

    pub fn cf(&self, cf: Cf) -> &ColumnFamily {
        self.db.cf_handle(cf.name()).expect("every column family is created at open")
    }

    pub fn recovered_last_sequence(&self) -> u64 {
        self.recovered_last_sequence
    }

    pub fn recovered_last_audit_sequence(&self) -> u64 {
        self.recovered_last_audit_sequence
    }

    /// The remembered outcome of an idempotent request (a replay reads its response here).
    pub fn read_idempotency(
        &self,
        namespace: IdemNamespace,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        let key = keys::idempotency(namespace, key);
        match self.db.get_cf(self.cf(Cf::Idempotency), &key)? {
            None => Ok(None),
            Some(value) => decode(Cf::Idempotency, &key, Kind::Idempotency, &value).map(Some),
        }
    }

    /// Audit events with sequence >= `from`, at most `limit`.
    pub fn read_audit(&self, from: u64, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let start = keys::audit(from);
        let mut events = Vec::new();
        let iterator =
            self.db.iterator_cf(self.cf(Cf::Events), IteratorMode::From(&start, Direction::Forward));
        for item in iterator.take(limit) {
            let (key, value) = item?;
            let Some(sequence) = keys::audit_sequence(&key) else { break };
            let record: AuditRecord = decode(Cf::Events, &key, Kind::Audit, &value)?;
            events.push(record.into_event(sequence));
        }
        Ok(events)
    }

    /// The events naming `order_id`, oldest first, at most `limit`.
    pub fn read_order_history(&self, order_id: &str, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        let prefix = keys::order_history_prefix(order_id);
        let mut keys_found = Vec::new();
        let iterator =
            self.db.iterator_cf(self.cf(Cf::OrderHistory), IteratorMode::From(&prefix, Direction::Forward));
        let first_kept = self.first_event_sequence();
        for item in iterator {
            let (key, _) = item?;
            if !key.starts_with(&prefix) || key.len() != prefix.len() + 8 || keys_found.len() == limit {
                break;
            }
            let sequence = u64::from_be_bytes(key[prefix.len()..].try_into().expect("8 bytes"));
            // An event trimmed from the log leaves its history key behind until a compaction
            // drops it (`HistoryTrim`), and may stay on disk a while itself (see
            // `drop_files_before`): skip it.
            if sequence >= first_kept {
                keys_found.push((sequence, keys::audit(sequence)));
            }
        }
        let cf = self.cf(Cf::Events);
        let values = self.db.multi_get_cf(keys_found.iter().map(|(_, key)| (cf, key.as_slice())));
        let mut events = Vec::with_capacity(keys_found.len());
        for ((sequence, key), value) in keys_found.iter().zip(values) {
            if let Some(value) = value? {
                let record: AuditRecord = decode(Cf::Events, key, Kind::Audit, &value)?;
                events.push(record.into_event(*sequence));
            }
        }
        Ok(events)
    }

    pub fn recovered_first_sequence(&self) -> u64 {
        self.first_sequence.load(Ordering::Acquire)
    }

    /// The oldest sequence a resume can start from.
    pub fn first_sequence(&self) -> u64 {
        self.first_sequence.load(Ordering::Acquire)
    }

    pub(super) fn set_first_sequence(&self, sequence: u64) {
        self.first_sequence.store(sequence, Ordering::Release);
    }

    /// The oldest event a WatchEvents replay can start from.
    pub fn first_event_sequence(&self) -> u64 {
        self.first_event_sequence.load(Ordering::Acquire)
    }

    pub(super) fn set_first_event_sequence(&self, sequence: u64) {
        self.first_event_sequence.store(sequence, Ordering::Release);
    }

    /// The meta saying that the events from `sequence` on are kept is durable: compactions of
    /// the order history may now drop the keys of older events.
    pub(super) fn set_history_kept_from(&self, sequence: u64) {
        self.history_kept_from.fetch_max(sequence, Ordering::AcqRel);
    }

    /// Deletes the files of `cf` (the changes or the audit events, keyed `key(sequence)`) that
    /// hold only entries older than `keep_from` (no longer kept:
    /// the first sequence kept, in memory and in meta, is at least `keep_from`). Files that
    /// also hold kept entries stay, and so do files still in level 0, until a later trim;
    /// what they hold is older than the first sequence kept and never served. No tombstone is
    /// written, so the newer files never overlap the older ones and move down the levels
    /// without being rewritten. A failure leaves the files for the next trim: it costs disk
    /// space, not correctness.
    pub(super) fn drop_files_before(&self, cf: Cf, keep_from: u64, key: fn(u64) -> [u8; 9]) {
        let Some(last_dropped) = keep_from.checked_sub(1).filter(|last| *last > 0) else { return };
        // Both ends are included: a file whose newest entry is `last_dropped` goes.
        if let Err(error) = self.db.delete_file_in_range_cf(self.cf(cf), key(0), key(last_dropped)) {
            tracing::warn!(%error, cf = cf.name(), keep_from, "could not delete the files of trimmed entries");
        }
    }

    /// Availability changes with sequence >= `from`, at most `limit` (a resume reads in pages).
    pub fn read_changes(&self, from: u64, limit: usize) -> Result<Vec<AvailabilityChange>, StoreError> {
        let start = keys::change(from);
        let mut changes = Vec::new();
        let iterator =
            self.db.iterator_cf(self.cf(Cf::Changes), IteratorMode::From(&start, Direction::Forward));
        for item in iterator.take(limit) {
            let (key, value) = item?;
            let Some(sequence) = keys::change_sequence(&key) else { break };
            let record: ChangeRecord = decode(Cf::Changes, &key, Kind::Change, &value)?;
            changes.push(record.into_change(sequence).map_err(|error| corrupt(Cf::Changes, &key, error))?);
        }
        Ok(changes)
    }

    /// Writes a consistent checkpoint of the whole store into `dir` (which must not exist):
    /// RocksDB flushes every memtable first, then hard-links the immutable files where
    /// possible and copies otherwise. Everything applied before the call is in it (the journal
    /// is not copied: an acknowledged batch is applied before its acknowledgement). Returns
    /// (files, bytes).
    pub fn checkpoint(&self, dir: &Path) -> Result<(u64, u64), StoreError> {
        let checkpoint = rocksdb::checkpoint::Checkpoint::new(&self.db)?;
        checkpoint.create_checkpoint(dir)?;
        let (mut files, mut bytes) = (0u64, 0u64);
        let entries = std::fs::read_dir(dir)
            .map_err(|source| StoreError::Io { path: dir.display().to_string(), source })?;
        for entry in entries.flatten() {
            if let Ok(metadata) = entry.metadata()
                && metadata.is_file()
            {
                files += 1;
                bytes += metadata.len();
            }
        }
        Ok((files, bytes))
    }

    /// Flushes every column family's memtable together and waits until it is on disk: the
    /// journal's records up to then are applied there (and a clean shutdown makes the next
    /// start-up faster).
    pub fn flush(&self) -> Result<(), StoreError> {
        let handles: Vec<&ColumnFamily> = Cf::ALL.iter().map(|cf| self.cf(*cf)).collect();
        let mut options = rocksdb::FlushOptions::default();
        options.set_wait(true);
        self.db.flush_cfs_opt(&handles, &options)?;
        Ok(())
    }

    fn recover(&mut self) -> Result<Recovered, StoreError> {
        let started = Instant::now();
        let mut recovered = Recovered::default();
        for (key, value) in self.scan(Cf::Nodes)? {
            let record: NodeRecord = decode(Cf::Nodes, &key, Kind::Node, &value)?;
            recovered.nodes.push(record.into_node().map_err(|error| corrupt(Cf::Nodes, &key, error))?);
        }
        // 10M positions are read here: no per-record boxing (a raw iterator), the Vec sized
        // from RocksDB's estimate, a SKU's id shared by its consecutive positions (keys are
        // sorted by SKU) and node ids interned, so recovery allocates little besides the state.
        let estimate = self
            .db
            .property_int_value_cf(self.cf(Cf::Positions), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0);
        let node_count = recovered.nodes.len().max(1);
        recovered.positions.reserve(usize::try_from(estimate).unwrap_or(0) / node_count);
        let mut node_ids: std::collections::HashMap<String, NodeId> = std::collections::HashMap::new();
        let positions = &mut recovered.positions;
        let mut count = 0usize;
        self.for_each(Cf::Positions, |key, value| {
            let record: PositionRecord = decode(Cf::Positions, key, Kind::Position, value)?;
            let (sku, node) = keys::split_position(key)
                .ok_or_else(|| corrupt(Cf::Positions, key, DecodeError::Field("key".into())))?;
            let node = match node_ids.get(node) {
                Some(node) => node.clone(),
                None => {
                    let parsed = NodeId::parse(node).map_err(|error| {
                        corrupt(Cf::Positions, key, DecodeError::Field(error.to_string()))
                    })?;
                    node_ids.insert(node.to_string(), parsed.clone());
                    parsed
                }
            };
            match positions.last_mut() {
                Some((last, group)) if last.as_str() == sku => group.push((node, record.into_position())),
                _ => {
                    if let Some((_, group)) = positions.last_mut() {
                        group.shrink_to_fit();
                    }
                    let sku = Sku::parse(sku).map_err(|error| {
                        corrupt(Cf::Positions, key, DecodeError::Field(error.to_string()))
                    })?;
                    let mut group = Vec::with_capacity(node_count.min(8));
                    group.push((node, record.into_position()));
                    positions.push((sku, group));
                }
            }
            count += 1;
            Ok(())
        })?;
        if let Some((_, group)) = recovered.positions.last_mut() {
            group.shrink_to_fit();
        }
        recovered.position_count = count;
        let mut highest_id = 0;
        self.for_each(Cf::Reservations, |key, value| {
            let record: ReservationRecord = decode(Cf::Reservations, key, Kind::Reservation, value)?;
            let reservation =
                record.into_reservation().map_err(|error| corrupt(Cf::Reservations, key, error))?;
            highest_id = highest_id.max(reservation.id.0);
            recovered.reservations.push(reservation);
            Ok(())
        })?;
        self.for_each(Cf::Idempotency, |key, value| {
            let record: IdempotencyRecord = decode(Cf::Idempotency, key, Kind::Idempotency, value)?;
            let namespace = key.first().copied().and_then(IdemNamespace::from_tag);
            let text = std::str::from_utf8(key.get(1..).unwrap_or_default()).ok();
            let (Some(namespace), Some(text)) = (namespace, text) else {
                return Err(corrupt(Cf::Idempotency, key, DecodeError::Field("key".into())));
            };
            match namespace {
                IdemNamespace::Reserve | IdemNamespace::Adjust | IdemNamespace::Allocate => {
                    recovered.idempotency.push((namespace, text.to_string(), record));
                }
                IdemNamespace::Shipment
                | IdemNamespace::Shortage
                | IdemNamespace::ReturnCreate
                | IdemNamespace::ReturnReceive => {
                    recovered.orders.idempotency.push((namespace, text.to_string(), record));
                }
            }
            Ok(())
        })?;
        for (key, value) in self.scan(Cf::Orders)? {
            let record: OrderRecord = decode(Cf::Orders, &key, Kind::Order, &value)?;
            recovered
                .orders
                .orders
                .push(record.into_order().map_err(|error| corrupt(Cf::Orders, &key, error))?);
        }
        for (key, value) in self.scan(Cf::Fulfilment)? {
            let record: FulfilmentRecord = decode(Cf::Fulfilment, &key, Kind::Fulfilment, &value)?;
            recovered
                .orders
                .fulfilment_orders
                .push(record.into_fulfilment().map_err(|error| corrupt(Cf::Fulfilment, &key, error))?);
        }
        for (key, value) in self.scan(Cf::Returns)? {
            let record: ReturnRecord = decode(Cf::Returns, &key, Kind::Return, &value)?;
            recovered
                .orders
                .returns
                .push(record.into_return().map_err(|error| corrupt(Cf::Returns, &key, error))?);
        }
        recovered.orders.next_order_id = self.counter(keys::META_NEXT_ORDER_ID)?.unwrap_or(0);
        recovered.orders.next_fulfilment_id = self.counter(keys::META_NEXT_FULFILMENT_ID)?.unwrap_or(0);
        recovered.orders.next_return_id = self.counter(keys::META_NEXT_RETURN_ID)?.unwrap_or(0);
        let next_id = self.counter(keys::META_NEXT_RESERVATION_ID)?.unwrap_or(0);
        recovered.next_reservation_id = next_id.max(highest_id) + 1;
        let mut first = self.db.iterator_cf(self.cf(Cf::Changes), IteratorMode::Start);
        let first_sequence = match first.next() {
            Some(item) => keys::change_sequence(&item?.0).unwrap_or(1),
            None => 1,
        };
        // Trimmed changes may still be on disk (their files go whole, see
        // `drop_files_before`): the oldest one kept is recorded.
        let first_sequence = first_sequence.max(self.counter(keys::META_FIRST_SEQUENCE)?.unwrap_or(1));
        let last_sequence = self.counter(keys::META_LAST_SEQUENCE)?.unwrap_or(0);
        self.recovered_last_audit_sequence = self.counter(keys::META_LAST_AUDIT_SEQUENCE)?.unwrap_or(0);
        let mut events =
            self.db.iterator_cf(self.cf(Cf::Events), IteratorMode::From(&keys::audit(0), Direction::Forward));
        let first_event = match events.next() {
            Some(item) => keys::audit_sequence(&item?.0),
            None => None,
        };
        // Trimmed events may still be on disk (their files go whole): the oldest one kept is
        // recorded.
        let first_event = first_event
            .unwrap_or(self.recovered_last_audit_sequence + 1)
            .max(self.counter(keys::META_FIRST_AUDIT_SEQUENCE)?.unwrap_or(1));
        let first_event = first_event.min(self.recovered_last_audit_sequence + 1);
        self.first_event_sequence.store(first_event, Ordering::Release);
        self.set_history_kept_from(first_event);
        self.first_sequence.store(first_sequence.min(last_sequence + 1), Ordering::Release);
        self.recovered_last_sequence = last_sequence;
        recovered.last_sequence = last_sequence;
        tracing::info!(
            nodes = recovered.nodes.len(),
            positions = recovered.position_count,
            reservations = recovered.reservations.len(),
            orders = recovered.orders.orders.len(),
            idempotency_keys = recovered.idempotency.len(),
            last_sequence,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered state from the store"
        );
        Ok(recovered)
    }

    /// The store's format (None for a new store); refuses a newer one than this build's.
    fn check_format_version(&self) -> Result<Option<u64>, StoreError> {
        match self.counter(keys::META_FORMAT_VERSION)? {
            Some(found) if found > STORE_FORMAT_VERSION => {
                Err(StoreError::FormatVersion { found: found as u32, supported: STORE_FORMAT_VERSION as u32 })
            }
            found => Ok(found),
        }
    }

    /// Brings a store of an older format (or a new one) to this build's, once the journal is
    /// replayed: moves the changes and the order history index out of `events`, then records
    /// the format, durably.
    fn upgrade_format(&self, found: Option<u64>) -> Result<(), StoreError> {
        if found == Some(STORE_FORMAT_VERSION) {
            return Ok(());
        }
        let changes_moved = self.move_out_of_events(Cf::Changes, CHANGES_RANGE)?;
        let history_moved = self.move_out_of_events(Cf::OrderHistory, ORDER_HISTORY_RANGE)?;
        let value = records::encode(Kind::Counter, &CounterRecord { value: STORE_FORMAT_VERSION });
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(self.cf(Cf::Meta), keys::META_FORMAT_VERSION, value);
        self.db.write_opt(batch, &options)?;
        if found.is_some() {
            // Into the table files with everything else, so that what is on disk never depends
            // on RocksDB's own log for the moved keys.
            self.flush()?;
            tracing::info!(
                from = found,
                to = STORE_FORMAT_VERSION,
                changes_moved,
                history_moved,
                "upgraded the store"
            );
        }
        Ok(())
    }

    /// Moves every key of `events` in `[start, end)` to `to`, in batches that each put a run of
    /// keys into `to` and delete the same run from `events`, so a crash between two leaves
    /// each key in exactly one of them and the next open goes on. Returns how many it moved.
    fn move_out_of_events(&self, to: Cf, (start, end): (&[u8], &[u8])) -> Result<u64, StoreError> {
        let (events, to) = (self.cf(Cf::Events), self.cf(to));
        let mut moved = 0u64;
        loop {
            let mut batch = rocksdb::WriteBatch::default();
            let mut iterator = self.db.raw_iterator_cf(events);
            iterator.seek(start);
            while let (Some(key), Some(value)) = (iterator.key(), iterator.value()) {
                if key >= end || batch.len() == MOVED_PER_BATCH {
                    break;
                }
                batch.put_cf(to, key, value);
                iterator.next();
            }
            iterator.status()?;
            if batch.is_empty() {
                return Ok(moved);
            }
            moved += batch.len() as u64;
            // Every key from `start` to where the run stopped (the first key left, or `end`)
            // was just put into `to`.
            let stop = iterator.key().filter(|key| *key < end).map_or_else(|| end.to_vec(), <[u8]>::to_vec);
            batch.delete_range_cf(events, start, &stop[..]);
            self.db.write(batch)?;
        }
    }

    fn counter(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.db.get_cf(self.cf(Cf::Meta), key)? {
            None => Ok(None),
            Some(value) => {
                let record: CounterRecord = decode(Cf::Meta, key, Kind::Counter, &value)?;
                Ok(Some(record.value))
            }
        }
    }

    /// Calls `visit` with every key and value of `cf` in key order, without copying them.
    fn for_each(
        &self,
        cf: Cf,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut iterator = self.db.raw_iterator_cf(self.cf(cf));
        iterator.seek_to_first();
        while let (Some(key), Some(value)) = (iterator.key(), iterator.value()) {
            visit(key, value)?;
            iterator.next();
        }
        iterator.status().map_err(StoreError::from)
    }

    fn scan(&self, cf: Cf) -> Result<Vec<KeyValue>, StoreError> {
        self.db
            .iterator_cf(self.cf(cf), IteratorMode::Start)
            .map(|item| item.map_err(StoreError::from))
            .collect()
    }
}

fn decode<M: prost::Message + Default>(
    cf: Cf,
    key: &[u8],
    kind: Kind,
    value: &[u8],
) -> Result<M, StoreError> {
    records::decode(kind, value).map_err(|error| corrupt(cf, key, error))
}

fn corrupt(cf: Cf, key: &[u8], error: DecodeError) -> StoreError {
    StoreError::Corrupt {
        cf: cf.name(),
        key: String::from_utf8_lossy(key).escape_debug().to_string(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::change::Totals;

    fn change(sequence: u64) -> AvailabilityChange {
        AvailabilityChange {
            sku: Sku::parse("SKU-1").unwrap(),
            node_id: NodeId::parse("N1").unwrap(),
            atp: sequence as i64,
            totals: Totals { unrestricted: sequence as i64, restricted: Vec::new() },
            sequence,
        }
    }

    fn counter(store: &Store, key: &[u8]) -> Option<u64> {
        store.counter(key).unwrap()
    }

    /// Writes `batch` (an older build's layout, made by hand) with the meta `counters`, and
    /// flushes it.
    fn write_with_counters(store: &Store, mut batch: rocksdb::WriteBatch, counters: &[(&[u8], u64)]) {
        for (key, value) in counters {
            let record = records::encode(Kind::Counter, &CounterRecord { value: *value });
            batch.put_cf(store.cf(Cf::Meta), key, record);
        }
        store.db.write(batch).unwrap();
        store.flush().unwrap();
    }

    fn keys_of(store: &Store, cf: Cf) -> Vec<Vec<u8>> {
        store.db.iterator_cf(store.cf(cf), IteratorMode::Start).map(|item| item.unwrap().0.to_vec()).collect()
    }

    #[test]
    fn a_format_4_store_moves_its_changes_to_their_own_column_family_once() {
        // Goal: a store written by a format-4 build (its changes in `events`, beside the audit
        // events) opens with every change readable from `changes`, none left in `events`, the
        // audit events untouched and the current format recorded; opening it again changes
        // nothing.
        // Method: write that layout through the store's RocksDB handle (more changes than one
        // move batch holds), with the first three already in `changes` as a conversion cut
        // short by a crash would leave them; mark it format 4, reopen twice.
        let dir = tempfile::tempdir().unwrap();
        let count = MOVED_PER_BATCH as u64 + 5;
        {
            let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = rocksdb::WriteBatch::default();
            for sequence in 1..=count {
                let record = records::encode(Kind::Change, &ChangeRecord::from_change(&change(sequence)));
                let cf = if sequence <= 3 { Cf::Changes } else { Cf::Events };
                batch.put_cf(store.cf(cf), keys::change(sequence), record);
            }
            let event = AuditEvent { sequence: 1, ..AuditEvent::default() };
            let record = records::encode(Kind::Audit, &AuditRecord::from_event(&event));
            batch.put_cf(store.cf(Cf::Events), keys::audit(1), record);
            write_with_counters(
                &store,
                batch,
                &[
                    (keys::META_LAST_SEQUENCE, count),
                    (keys::META_LAST_AUDIT_SEQUENCE, 1),
                    (keys::META_FORMAT_VERSION, 4),
                ],
            );
        }
        for _ in 0..2 {
            let (store, recovered) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            assert_eq!(counter(&store, keys::META_FORMAT_VERSION), Some(STORE_FORMAT_VERSION));
            assert_eq!(recovered.last_sequence, count);
            assert_eq!(store.first_sequence(), 1);
            let changes = store.read_changes(1, count as usize + 10).unwrap();
            assert_eq!(changes.len() as u64, count);
            for (index, found) in changes.iter().enumerate() {
                assert_eq!(*found, change(index as u64 + 1));
            }
            assert_eq!(keys_of(&store, Cf::Events), vec![keys::audit(1).to_vec()]);
            assert_eq!(keys_of(&store, Cf::Changes).len() as u64, count);
            assert_eq!(store.first_event_sequence(), 1);
        }
    }

    #[test]
    fn changes_at_the_end_of_events_are_moved_too() {
        // Goal: when nothing follows the changes in `events` (no audit event yet), the move
        // still deletes every one of them there. Method: a format-4 store of five changes and
        // nothing else in `events`; after the open, `events` is empty and `changes` has five.
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = rocksdb::WriteBatch::default();
            for sequence in 1..=5 {
                let record = records::encode(Kind::Change, &ChangeRecord::from_change(&change(sequence)));
                batch.put_cf(store.cf(Cf::Events), keys::change(sequence), record);
            }
            write_with_counters(&store, batch, &[(keys::META_FORMAT_VERSION, 4)]);
        }
        let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(keys_of(&store, Cf::Events), Vec::<Vec<u8>>::new());
        assert_eq!(keys_of(&store, Cf::Changes).len(), 5);
    }

    #[test]
    fn a_format_5_store_moves_its_order_history_to_its_own_column_family_once() {
        // Goal: a store written by a format-5 build (each order's history index in `events`,
        // beside the audit events) opens with the index in `order_history`, only audit events
        // left in `events`, every order's history readable and format 6 recorded; opening it
        // again changes nothing. Method: write that layout through the store's RocksDB handle,
        // with nothing after the index in `events`; mark it format 5; reopen twice.
        let dir = tempfile::tempdir().unwrap();
        let orders = ["o-1", "o-2", "o-1"];
        {
            let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let mut batch = rocksdb::WriteBatch::default();
            for (index, order_id) in orders.iter().enumerate() {
                let sequence = index as u64 + 1;
                let event = AuditEvent { sequence, order_id: (*order_id).into(), ..AuditEvent::default() };
                let record = records::encode(Kind::Audit, &AuditRecord::from_event(&event));
                batch.put_cf(store.cf(Cf::Events), keys::audit(sequence), record);
                batch.put_cf(store.cf(Cf::Events), keys::order_history(order_id, sequence), []);
            }
            write_with_counters(
                &store,
                batch,
                &[(keys::META_LAST_AUDIT_SEQUENCE, 3), (keys::META_FORMAT_VERSION, 5)],
            );
        }
        for _ in 0..2 {
            let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            assert_eq!(counter(&store, keys::META_FORMAT_VERSION), Some(STORE_FORMAT_VERSION));
            assert_eq!(
                keys_of(&store, Cf::Events),
                (1..=3).map(|sequence| keys::audit(sequence).to_vec()).collect::<Vec<_>>()
            );
            assert_eq!(keys_of(&store, Cf::OrderHistory).len(), 3);
            let sequences = |order_id| -> Vec<u64> {
                store.read_order_history(order_id, 10).unwrap().iter().map(|event| event.sequence).collect()
            };
            assert_eq!(sequences("o-1"), vec![1, 3]);
            assert_eq!(sequences("o-2"), vec![2]);
        }
    }

    #[test]
    fn a_new_store_is_written_as_the_current_format() {
        // Goal: a new store records this build's format at its first open (so a build that
        // cannot read it refuses it). Method: open a new directory, read the counter.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        assert_eq!(counter(&store, keys::META_FORMAT_VERSION), Some(STORE_FORMAT_VERSION));
    }
}
