//! allotd's own write-ahead journal. The commit thread writes each group commit's RocksDB
//! `WriteBatch` here and fsyncs it, then applies the batch to RocksDB with RocksDB's own WAL
//! off, then acknowledges. Why: RocksDB's WAL is a file that grows with every commit, and on
//! ext4 an fdatasync of a grown file also writes the file's inode, a second synchronous write
//! per commit (and RocksDB only reuses WAL files under a recovery mode that skips corrupt
//! records). The journal writes into segments whose blocks already exist, so an fsync writes
//! the data and flushes the disk cache, nothing more.
//!
//! - **Records.** `magic u32 | len u32 | seq u64 | crc u32 | payload`, little-endian; the crc
//!   covers the seq and the payload. Sequence numbers grow by one per record, forever (the
//!   next one continues from the highest ever applied). A record never spans two segments.
//! - **Segments.** Files of `segment_bytes` in `<data>/journal/`, named by a number that only
//!   says which file is which. A segment is written from its start; what lies after its last
//!   record is zeros or stale records of an earlier use.
//! - **What is applied.** Every batch puts its own seq into the meta column family
//!   (`journal_seq`), and RocksDB flushes all column families together (`atomic_flush`), so
//!   the flushed state always names the last record it contains.
//! - **Recovery.** Each segment is read from its start while the records are whole, checksum
//!   right and consecutive; the records after the applied seq are replayed in order, and must
//!   follow one another without a gap (a torn last record ends the journal; a valid record
//!   after a gap is corruption, and the store refuses to open rather than drop it).
//! - **Write-through.** Under `durability = "fsync"` the commit thread writes the current
//!   segment through a second descriptor opened with `O_DIRECT | O_DSYNC`: a write returns once
//!   its blocks are on the disk, so there is no separate fdatasync, no page-cache copy and no
//!   writeback (the README's Performance section has what that saved). Such a write covers
//!   whole 4 KiB blocks: it starts at the block holding the end of the previous record
//!   (rewriting that record's bytes unchanged) and pads the last block with zeros. A file
//!   system that refuses `O_DIRECT` gets the plain write and fdatasync instead.
//! - **Through the page cache.** Under `durability = "buffered"` (or where `O_DIRECT` is
//!   refused) appends go to the page cache; every MiB the commit thread starts their writeback
//!   without waiting for it, so the fdatasync when a segment is left finds little still dirty.
//! - **Reuse.** When the current segment is full, the commit thread moves to a spare and the
//!   journal thread flushes RocksDB; once the flush is done, the full segment's records are
//!   all applied on disk and the segment becomes a spare. Stale records in a reused segment
//!   all carry a seq at or below the applied one, so recovery never replays them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use super::StoreError;

const MAGIC: u32 = 0x4C4E_524A; // "JRNL"
const HEADER_BYTES: usize = 20;
/// Spare segments kept for reuse; beyond, an applied segment is deleted.
const SPARES_MAX: usize = 2;
/// The smallest segment (a record larger than a segment gets a segment of its own size).
pub const SEGMENT_BYTES_MIN: u64 = 1024 * 1024;
/// A journal that has no full-size segment yet starts (and, if no spare is ready, goes on) in
/// segments this small: a new store zero-fills only this much before serving, and the
/// full-size spares are prepared in the background once the journal is half through one.
const SMALL_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// A new segment is zero-filled (see `create`) in steps of this many bytes, each synced
/// before the next. A commit's write queued behind one step waits for it: with 4 MiB steps,
/// the first spare's 64 MiB made a dozen commits in a row take 5-10 ms each on the test VM.
const ZERO_FILL_CHUNK: usize = 256 * 1024;
const SEGMENT_SUFFIX: &str = ".jnl";
/// The alignment and size unit of a write-through append: a multiple of the logical block
/// sizes in use (512 and 4096 bytes). Segment lengths are multiples of it (of 1 MiB).
const BLOCK: usize = 4096;
/// Appends through the page cache (`durability = "buffered"`) start the writeback of every
/// this many bytes as they go (`sync_file_range`, without waiting), as RocksDB's
/// `bytes_per_sync` does. Otherwise a whole segment is still dirty when the journal leaves it,
/// and the fdatasync there, on the commit thread, held every writer for 25-50 ms once a
/// second under ReserveBatch 100 x 4.
const WRITEBACK_BYTES: u64 = 1024 * 1024;

/// One block of a write-through append, aligned as `O_DIRECT` requires.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

const ZERO_BLOCK: Block = Block([0; BLOCK]);

fn block_bytes(blocks: &mut [Block]) -> &mut [u8] {
    // SAFETY: a Block is exactly BLOCK initialised bytes with no padding (repr(C), one
    // [u8; BLOCK] field, size = align = BLOCK), so the slice is `len * BLOCK` bytes of
    // initialised memory borrowed mutably for as long as `blocks` is.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
}

/// The current segment opened again with `O_DIRECT | O_DSYNC`, and the aligned buffer its
/// appends are built in.
struct WriteThrough {
    file: File,
    blocks: Vec<Block>,
    /// Whether `blocks[tail]` holds the segment's block at the journal's offset (rounded
    /// down), when that offset is not on a block boundary.
    tail: Option<usize>,
}

impl WriteThrough {
    fn open(path: &Path) -> std::io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        // Fault injection (the `failpoints` feature only): a file system that refuses O_DIRECT.
        fail::fail_point!("journal-direct-open", |_| Err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        // O_DSYNC, not O_SYNC: the data and what is needed to read it back, not the timestamps.
        File::options().write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path)
    }

    /// One direct write of whole blocks at `offset` to `file` (the write-through descriptor).
    fn write(file: &File, blocks: &[u8], offset: u64) -> std::io::Result<()> {
        // Fault injection (the `failpoints` feature only): a direct write refused after the
        // open succeeded, as a file system may do for one of them.
        fail::fail_point!("journal-direct-write", |_| Err(std::io::Error::from_raw_os_error(libc::EINVAL)));
        file.write_all_at(blocks, offset)
    }
}

fn io_error(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io { path: path.display().to_string(), source }
}

fn corrupt(path: &Path, reason: String) -> StoreError {
    StoreError::Corrupt { cf: "journal", key: path.display().to_string(), reason }
}

/// One segment file.
struct Segment {
    file: File,
    path: PathBuf,
    len: u64,
}

/// Where a valid record lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    seq: u64,
    segment: usize,
    offset: u64,
    len: u32,
}

/// What `open` found on disk: the records to replay, in order, and the segments.
pub struct Recovery {
    segments: Vec<Segment>,
    replay: Vec<Location>,
    /// The highest seq of any valid record found, replayed or not.
    highest_seq: u64,
    dir: PathBuf,
    next_number: u64,
}

impl Recovery {
    /// How many records `replay` will hand over.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Calls `apply` with each record to replay, in sequence order.
    pub fn replay(
        &self,
        mut apply: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut payload = Vec::new();
        for location in &self.replay {
            let segment = &self.segments[location.segment];
            payload.resize(location.len as usize, 0);
            segment
                .file
                .read_exact_at(&mut payload, location.offset + HEADER_BYTES as u64)
                .map_err(|error| io_error(&segment.path, error))?;
            apply(location.seq, &payload)?;
        }
        Ok(())
    }

    /// Starts the journal after the replayed records are applied on disk (flushed): every
    /// segment found becomes a spare (the extras are deleted), and the first record written
    /// gets a seq above every seq found and `applied`.
    pub fn start(self, applied: u64, segment_bytes: u64) -> Result<Journal, StoreError> {
        let segment_bytes = segment_bytes.max(SEGMENT_BYTES_MIN);
        let mut segments = self.segments;
        // The largest first: it becomes the current segment if big enough, the next ones
        // spares, and the rest are deleted.
        segments.sort_by_key(|segment| std::cmp::Reverse(segment.len));
        for extra in segments.drain((SPARES_MAX + 1).min(segments.len())..) {
            std::fs::remove_file(&extra.path).map_err(|error| io_error(&extra.path, error))?;
        }
        let shared = Arc::new(Shared {
            dir: self.dir,
            segment_bytes,
            spares: Mutex::new(Vec::new()),
            next_number: Mutex::new(self.next_number),
        });
        let current = if segments.first().is_some_and(|segment| segment.len >= segment_bytes) {
            segments.remove(0)
        } else {
            shared.create(segment_bytes.min(SMALL_SEGMENT_BYTES), true)?
        };
        for segment in segments {
            shared.retire(segment);
        }
        Ok(Journal {
            shared,
            segment_bytes,
            current,
            offset: 0,
            next_seq: self.highest_seq.max(applied) + 1,
            buffer: Vec::new(),
            recycler: None,
            prepare_requested: false,
            write_through: None,
            writeback_from: 0,
        })
    }
}

/// Reads every segment in `dir` (creating `dir` if missing) and finds the records after
/// `applied`.
pub fn open(dir: &Path, applied: u64) -> Result<Recovery, StoreError> {
    std::fs::create_dir_all(dir).map_err(|error| io_error(dir, error))?;
    let mut segments = Vec::new();
    let mut next_number = 1;
    let entries = std::fs::read_dir(dir).map_err(|error| io_error(dir, error))?;
    for entry in entries {
        let entry = entry.map_err(|error| io_error(dir, error))?;
        let path = entry.path();
        let Some(number) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|number| number.parse::<u64>().ok())
        else {
            continue;
        };
        next_number = next_number.max(number + 1);
        let file =
            File::options().read(true).write(true).open(&path).map_err(|error| io_error(&path, error))?;
        let len = file.metadata().map_err(|error| io_error(&path, error))?.len();
        segments.push(Segment { file, path, len });
    }
    // Each segment's valid prefix: whole records, checksums right, seqs consecutive.
    let mut runs: Vec<Vec<Location>> = Vec::new();
    let mut highest_seq = 0;
    for (index, segment) in segments.iter_mut().enumerate() {
        let run = read_run(index, segment)?;
        if let Some(last) = run.last() {
            highest_seq = highest_seq.max(last.seq);
        }
        runs.push(run);
    }
    // The chain after `applied`: each next seq from whichever run holds it.
    let mut by_seq: std::collections::HashMap<u64, Location> = std::collections::HashMap::new();
    for location in runs.iter().flatten().filter(|location| location.seq > applied) {
        if let Some(other) = by_seq.insert(location.seq, *location) {
            return Err(corrupt(
                dir,
                format!(
                    "record {} appears in two segments ({} and {})",
                    location.seq, other.segment, location.segment
                ),
            ));
        }
    }
    let mut replay = Vec::with_capacity(by_seq.len());
    let mut next = applied + 1;
    while let Some(location) = by_seq.remove(&next) {
        replay.push(location);
        next += 1;
    }
    if let Some(orphan) = by_seq.keys().min() {
        return Err(corrupt(
            dir,
            format!(
                "record {orphan} is whole but record {next} before it is missing or damaged; \
                 refusing to start without it (the last record applied is {applied})"
            ),
        ));
    }
    Ok(Recovery { segments, replay, highest_seq, dir: dir.to_path_buf(), next_number })
}

/// The valid records at the start of `segment`.
fn read_run(index: usize, segment: &mut Segment) -> Result<Vec<Location>, StoreError> {
    let mut run = Vec::new();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, &segment.file);
    reader.seek(SeekFrom::Start(0)).map_err(|error| io_error(&segment.path, error))?;
    let mut offset = 0u64;
    let mut header = [0u8; HEADER_BYTES];
    let mut payload = Vec::new();
    while offset + HEADER_BYTES as u64 <= segment.len {
        if reader.read_exact(&mut header).is_err() {
            break;
        }
        let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(header[16..20].try_into().expect("4 bytes"));
        let end = offset + HEADER_BYTES as u64 + u64::from(len);
        if magic != MAGIC || end > segment.len {
            break;
        }
        if let Some(previous) = run.last().map(|location: &Location| location.seq)
            && seq != previous + 1
        {
            break;
        }
        payload.resize(len as usize, 0);
        if reader.read_exact(&mut payload).is_err() || checksum(seq, &payload) != crc {
            break;
        }
        run.push(Location { seq, segment: index, offset, len });
        offset = end;
    }
    Ok(run)
}

/// A record's header: magic, payload length, seq, checksum.
fn header(len: u32, seq: u64, payload: &[u8]) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&len.to_le_bytes());
    header[8..16].copy_from_slice(&seq.to_le_bytes());
    header[16..20].copy_from_slice(&checksum(seq, payload).to_le_bytes());
    header
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// State shared by the commit thread's journal and the journal thread.
struct Shared {
    dir: PathBuf,
    segment_bytes: u64,
    /// Segments whose records are all applied on disk, ready to be written again.
    spares: Mutex<Vec<Segment>>,
    next_number: Mutex<u64>,
}

impl Shared {
    /// A new segment of `len` bytes. `zeroed`: its blocks are written (zeros), so writing into
    /// it later changes no file metadata; otherwise they are only allocated (fast to create,
    /// but the first pass over it pays a metadata write per fsync, as a growing file would).
    fn create(&self, len: u64, zeroed: bool) -> Result<Segment, StoreError> {
        let number = {
            let mut next = self.next_number.lock();
            *next += 1;
            *next - 1
        };
        let path = self.dir.join(format!("{number:016}{SEGMENT_SUFFIX}"));
        let mut file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|error| io_error(&path, error))?;
        if zeroed {
            // Written and synced ZERO_FILL_CHUNK at a time, so the disk queue never holds
            // more than that ahead of the commit thread's durable writes.
            let zeros = vec![0u8; ZERO_FILL_CHUNK];
            let mut written = 0u64;
            while written < len {
                let chunk = (len - written).min(zeros.len() as u64) as usize;
                file.write_all(&zeros[..chunk]).map_err(|error| io_error(&path, error))?;
                written += chunk as u64;
                file.sync_data().map_err(|error| io_error(&path, error))?;
            }
        } else if let Err(error) = rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, len) {
            // A file system without fallocate: a sparse file of that length (its first pass
            // allocates as it goes).
            tracing::debug!(%error, "fallocate is not available for the journal");
            file.set_len(len).map_err(|error| io_error(&path, error))?;
        }
        file.sync_all().map_err(|error| io_error(&path, error))?;
        File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(|error| io_error(&self.dir, error))?;
        Ok(Segment { file, path, len })
    }

    /// A spare of at least `len` bytes, if one is ready.
    fn take_spare(&self, len: u64) -> Option<Segment> {
        let mut spares = self.spares.lock();
        let index = spares.iter().position(|segment| segment.len >= len)?;
        Some(spares.swap_remove(index))
    }

    /// A segment whose records are all applied: kept as a spare, or deleted (when enough
    /// are kept, or when it is smaller than a full segment).
    fn retire(&self, segment: Segment) {
        let mut spares = self.spares.lock();
        if spares.len() < SPARES_MAX && segment.len >= self.segment_bytes {
            spares.push(segment);
        } else {
            drop(spares);
            if let Err(error) = std::fs::remove_file(&segment.path) {
                tracing::warn!(path = %segment.path.display(), %error, "removing an applied journal segment");
            }
        }
    }
}

/// Work for the journal thread.
pub enum Request {
    /// A full segment whose last record is `last_seq`: flush, then reuse it.
    Retire { segment: SealedSegment, last_seq: u64 },
    /// Prepare a zeroed spare of this size unless one is ready.
    Prepare(u64),
}

/// A full segment on its way to the journal thread.
pub struct SealedSegment(Segment);

/// The commit thread's side: appends records and fsyncs them.
pub struct Journal {
    shared: Arc<Shared>,
    segment_bytes: u64,
    current: Segment,
    offset: u64,
    next_seq: u64,
    /// Header and payload of the record being written (reused).
    buffer: Vec<u8>,
    recycler: Option<Sender<Request>>,
    prepare_requested: bool,
    /// Appends are durable when written (`write_through`); None: written to the page cache
    /// and made durable by `sync`.
    write_through: Option<WriteThrough>,
    /// Where the page cache's writeback of the current segment was last started (see
    /// `WRITEBACK_BYTES`).
    writeback_from: u64,
}

impl Journal {
    /// The seq the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends record `next_seq()` holding `payload` (durable after `sync`).
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| corrupt(&self.current.path, format!("a batch of {} bytes", payload.len())))?;
        let need = HEADER_BYTES as u64 + u64::from(len);
        if self.offset + need > self.current.len {
            self.switch(need)?;
        }
        let seq = self.next_seq;
        let written_through = self.write_through.is_some() && self.append_through(seq, payload)?;
        if !written_through {
            self.buffer.clear();
            self.buffer.extend_from_slice(&header(len, seq, payload));
            self.buffer.extend_from_slice(payload);
            self.current
                .file
                .write_all_at(&self.buffer, self.offset)
                .map_err(|error| io_error(&self.current.path, error))?;
        }
        self.offset += need;
        self.next_seq += 1;
        if !written_through && self.offset - self.writeback_from >= WRITEBACK_BYTES {
            self.start_writeback();
        }
        if !self.prepare_requested && self.offset > self.current.len / 2 {
            // Half full: have a zeroed spare ready before it is needed.
            self.prepare_requested = true;
            if let Some(recycler) = &self.recycler {
                let _ = recycler.send(Request::Prepare(self.segment_bytes));
            }
        }
        Ok(seq)
    }

    /// Starts writing the bytes appended since `writeback_from` back to the disk and returns
    /// without waiting for it (no flush of the disk's cache either: `sync` still makes them
    /// durable). A file system that cannot is left to its own writeback.
    fn start_writeback(&mut self) {
        let (Ok(from), Ok(len)) =
            (i64::try_from(self.writeback_from), i64::try_from(self.offset - self.writeback_from))
        else {
            return;
        };
        // SAFETY: sync_file_range only reads its arguments; the descriptor is open for as long
        // as `self.current` is.
        let _ = unsafe {
            libc::sync_file_range(self.current.file.as_raw_fd(), from, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        self.writeback_from = self.offset;
    }

    /// Writes record `seq` at `self.offset` through `O_DIRECT | O_DSYNC`: the blocks from the
    /// one holding `self.offset` to the record's end, the record's predecessor bytes in the
    /// first block unchanged and zeros after its end; true: durable now. False: the file
    /// system refused the direct write, nothing was written, and write-through is off for
    /// good (the caller writes the record through the page cache, and `sync` fsyncs it).
    fn append_through(&mut self, seq: u64, payload: &[u8]) -> Result<bool, StoreError> {
        let Some(through) = self.write_through.as_mut() else {
            unreachable!("append_through is only called with write-through on")
        };
        let head = (self.offset % BLOCK as u64) as usize;
        let start = self.offset - head as u64;
        let end = head + HEADER_BYTES + payload.len();
        let blocks_len = end.div_ceil(BLOCK);
        if head > 0 {
            match through.tail {
                Some(tail) => through.blocks[0] = through.blocks[tail],
                None => {
                    through.blocks.resize(blocks_len.max(1), ZERO_BLOCK);
                    let first = &mut block_bytes(&mut through.blocks[..1])[..head];
                    self.current
                        .file
                        .read_exact_at(first, start)
                        .map_err(|error| io_error(&self.current.path, error))?;
                }
            }
        }
        if through.blocks.len() < blocks_len {
            through.blocks.resize(blocks_len, ZERO_BLOCK);
        }
        let bytes = block_bytes(&mut through.blocks[..blocks_len]);
        let len = u32::try_from(payload.len()).expect("checked by append");
        bytes[head..head + HEADER_BYTES].copy_from_slice(&header(len, seq, payload));
        bytes[head + HEADER_BYTES..end].copy_from_slice(payload);
        bytes[end..].fill(0);
        match WriteThrough::write(&through.file, bytes, start) {
            Ok(()) => {
                through.tail = (!end.is_multiple_of(BLOCK)).then_some(blocks_len - 1);
                Ok(true)
            }
            // EINVAL: the file system (or this buffer's alignment) does not suit O_DIRECT.
            // Nothing was written; from now on the plain write and fdatasync.
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(%error, "the journal's direct writes were refused; writing through the page cache");
                self.write_through = None;
                Ok(false)
            }
            Err(error) => Err(io_error(&self.current.path, error)),
        }
    }

    /// From now on every append is durable when `append` returns (`O_DIRECT | O_DSYNC` on
    /// the segment being written; see the module's notes), and `sync` has nothing left to do.
    /// Without `O_DIRECT` on this file system, appends stay as they were. Returns whether
    /// write-through is on.
    pub fn write_through(&mut self) -> bool {
        if self.write_through.is_none() {
            match WriteThrough::open(&self.current.path) {
                Ok(file) => self.write_through = Some(WriteThrough { file, blocks: Vec::new(), tail: None }),
                Err(error) => {
                    tracing::info!(%error, "the journal cannot write with O_DIRECT here; using fdatasync");
                }
            }
        }
        self.write_through.is_some()
    }

    /// Makes every appended record durable (fdatasync of the current segment: the records
    /// in earlier segments were synced before the journal left them). With write-through
    /// they already are.
    pub fn sync(&self) -> Result<(), StoreError> {
        if self.write_through.is_some() {
            return Ok(());
        }
        self.current.file.sync_data().map_err(|error| io_error(&self.current.path, error))
    }

    /// Moves to a segment with room for `need` bytes; the full one goes to the journal thread.
    fn switch(&mut self, need: u64) -> Result<(), StoreError> {
        // Records still unsynced (buffered durability) are synced before the segment is left,
        // so `sync` never has to look back.
        self.sync()?;
        let need = need.next_multiple_of(SEGMENT_BYTES_MIN);
        let next = match self.shared.take_spare(self.segment_bytes.max(need)) {
            Some(spare) => spare,
            // No full-size spare is ready: a small one, only allocated (its first pass costs a
            // metadata write per fsync, so it is kept short), until the prepared one is.
            None => self.shared.create(need.max(self.segment_bytes.min(SMALL_SEGMENT_BYTES)), false)?,
        };
        let full = std::mem::replace(&mut self.current, next);
        self.offset = 0;
        self.writeback_from = 0;
        self.prepare_requested = false;
        if self.write_through.take().is_some() {
            // The new segment gets a direct descriptor of its own (and no tail block yet).
            self.write_through();
        }
        let last_seq = self.next_seq - 1;
        // Without a journal thread (tests; or it is gone at shutdown) the full segment is only
        // closed: it stays on disk, and the next start-up reads it.
        if let Some(recycler) = &self.recycler {
            let _ = recycler.send(Request::Retire { segment: SealedSegment(full), last_seq });
        }
        Ok(())
    }

    /// Connects the journal thread (see `run_journal_thread`).
    pub fn attach(&mut self) -> Receiver<Request> {
        let (sender, receiver) = crossbeam_channel::unbounded();
        self.recycler = Some(sender);
        receiver
    }

    /// What the journal thread needs to reuse segments.
    pub fn spares(&self) -> JournalSpares {
        JournalSpares(self.shared.clone())
    }
}

/// The journal thread's handle on the spare segments.
pub struct JournalSpares(Arc<Shared>);

/// The journal thread: flushes RocksDB for each full segment (`flush_all` must flush every
/// column family together and return once it is on disk), then keeps the segment as a spare;
/// prepares zeroed spares on request. Ends when the journal is dropped.
pub fn run_journal_thread(
    spares: &JournalSpares,
    requests: &Receiver<Request>,
    mut flush_all: impl FnMut() -> Result<(), StoreError>,
) {
    let shared = &spares.0;
    while let Ok(request) = requests.recv() {
        match request {
            Request::Retire { segment: SealedSegment(segment), last_seq } => match flush_all() {
                Ok(()) => shared.retire(segment),
                // The segment stays on disk (not reused): its records are replayed at the
                // next start-up if the flush never happens.
                Err(error) => {
                    tracing::error!(%error, last_seq, "flushing the store for a full journal segment failed");
                }
            },
            Request::Prepare(len) => {
                if shared.spares.lock().iter().any(|segment| segment.len >= len) {
                    continue;
                }
                match shared.create(len, true) {
                    Ok(segment) => shared.retire(segment),
                    Err(error) => tracing::warn!(%error, "preparing a journal segment failed"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, applied: u64, segment_bytes: u64, payloads: &[Vec<u8>]) -> Journal {
        let mut journal = open(dir, applied).unwrap().start(applied, segment_bytes).unwrap();
        for payload in payloads {
            journal.append(payload).unwrap();
        }
        journal.sync().unwrap();
        journal
    }

    fn replayed(dir: &Path, applied: u64) -> Vec<(u64, Vec<u8>)> {
        let mut found = Vec::new();
        open(dir, applied)
            .unwrap()
            .replay(|seq, payload| {
                found.push((seq, payload.to_vec()));
                Ok(())
            })
            .unwrap();
        found
    }

    fn payload(n: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (n as usize + i) as u8).collect()
    }

    #[test]
    fn replays_the_records_after_the_applied_one_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // 1 MiB segments and 300 KB records: three records per segment, four segments.
        let payloads: Vec<Vec<u8>> = (1..=10).map(|n| payload(n, 300_000)).collect();
        let journal = write(dir.path(), 0, SEGMENT_BYTES_MIN, &payloads);
        assert_eq!(journal.next_seq(), 11);
        drop(journal);
        let found = replayed(dir.path(), 4);
        assert_eq!(found.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (5..=10).collect::<Vec<_>>());
        for (seq, bytes) in found {
            assert_eq!(bytes, payloads[seq as usize - 1]);
        }
        assert!(replayed(dir.path(), 10).is_empty());
    }

    #[test]
    fn appends_through_the_page_cache_start_writeback_as_they_go_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        // 4 MiB segments (the first one, before a spare is ready, 4 MiB too) and 100 KB records:
        // about 40 per segment, 3 segments, each with several writebacks started.
        let payloads: Vec<Vec<u8>> = (1..=100).map(|n| payload(n, 100_000)).collect();
        let mut journal = open(dir.path(), 0).unwrap().start(0, 4 * SEGMENT_BYTES_MIN).unwrap();
        let mut started = 0;
        for payload in &payloads {
            let before = journal.writeback_from;
            journal.append(payload).unwrap();
            assert!(journal.offset - journal.writeback_from < WRITEBACK_BYTES, "started each MiB");
            started += usize::from(journal.writeback_from != before && journal.writeback_from != 0);
        }
        // At 1, 2 and 3 MiB of each full segment, and in the last one so far.
        assert!(started >= 6, "writeback started {started} times over about 10 MB");
        journal.sync().unwrap();
        drop(journal);
        let found = replayed(dir.path(), 0);
        assert_eq!(found.len(), payloads.len());
        for (seq, bytes) in found {
            assert_eq!(bytes, payloads[seq as usize - 1]);
        }
    }

    #[test]
    fn a_torn_last_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> = (1..=3).map(|n| payload(n, 1000)).collect();
        drop(write(dir.path(), 0, SEGMENT_BYTES_MIN, &payloads));
        let segment = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let file = File::options().write(true).open(&segment).unwrap();
        // Damage the last record's payload: the first two remain.
        let third = 2 * (HEADER_BYTES as u64 + 1000);
        file.write_all_at(b"torn", third + HEADER_BYTES as u64 + 500).unwrap();
        assert_eq!(replayed(dir.path(), 0).len(), 2);
        // The damaged record was never whole: the next one written takes its seq.
        let recovery = open(dir.path(), 0).unwrap();
        let journal = recovery.start(2, SEGMENT_BYTES_MIN).unwrap();
        assert_eq!(journal.next_seq(), 3);
    }

    #[test]
    fn a_whole_record_after_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> = (1..=6).map(|n| payload(n, 300_000)).collect();
        drop(write(dir.path(), 0, SEGMENT_BYTES_MIN, &payloads));
        // Records 1-3 are in one segment, 4-6 in another: damage record 2.
        let mut damaged = false;
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let file = File::options().read(true).write(true).open(&path).unwrap();
            let mut header = [0u8; HEADER_BYTES];
            file.read_exact_at(&mut header, 0).unwrap();
            if u64::from_le_bytes(header[8..16].try_into().unwrap()) == 1 {
                file.write_all_at(b"damage", (HEADER_BYTES as u64 + 300_000) + HEADER_BYTES as u64 + 10)
                    .unwrap();
                damaged = true;
            }
        }
        assert!(damaged);
        let error = open(dir.path(), 0).err().expect("a gap is refused");
        assert!(error.to_string().contains("record 2 before it is missing"), "{error}");
        // Once record 3 and below are applied (flushed), the damage no longer matters.
        assert_eq!(replayed(dir.path(), 3).len(), 3);
    }

    #[test]
    fn a_reused_segment_replays_only_its_new_records() {
        for written_through in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let old: Vec<Vec<u8>> = (1..=3).map(|n| payload(n, 100_000)).collect();
            drop(write(dir.path(), 0, SEGMENT_BYTES_MIN, &old));
            // All three applied; the segment is reused from its start for shorter records
            // (written through: the zero padding after them ends the segment's run too).
            let new: Vec<Vec<u8>> = (4..=5).map(|n| payload(n, 10)).collect();
            if written_through {
                append_through(open(dir.path(), 3).unwrap().start(3, SEGMENT_BYTES_MIN).unwrap(), &new);
            } else {
                let journal = write(dir.path(), 3, SEGMENT_BYTES_MIN, &new);
                assert_eq!(journal.next_seq(), 6);
            }
            let found = replayed(dir.path(), 3);
            assert_eq!(
                found.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
                vec![4, 5],
                "{written_through}"
            );
            assert_eq!(found[1].1, new[1]);
        }
    }

    #[test]
    fn a_record_larger_than_a_segment_gets_a_segment_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = vec![payload(1, 10), payload(2, 3 * SEGMENT_BYTES_MIN as usize), payload(3, 10)];
        drop(write(dir.path(), 0, SEGMENT_BYTES_MIN, &payloads));
        let found = replayed(dir.path(), 0);
        assert_eq!(found.len(), 3);
        assert_eq!(found[1].1, payloads[1]);
    }

    #[test]
    fn the_journal_thread_reuses_a_full_segment_after_the_flush() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = open(dir.path(), 0).unwrap().start(0, SEGMENT_BYTES_MIN).unwrap();
        let requests = journal.attach();
        let spares = journal.spares();
        let flushed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = flushed.clone();
        let thread = std::thread::spawn(move || {
            run_journal_thread(&spares, &requests, || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            })
        });
        for n in 1..=40 {
            journal.append(&payload(n, 200_000)).unwrap();
            journal.sync().unwrap();
        }
        drop(journal);
        thread.join().unwrap();
        // 40 records of 200 KB fill eight 1 MiB segments (five each): seven flushes.
        assert_eq!(flushed.load(std::sync::atomic::Ordering::SeqCst), 7);
        // Spares are bounded: the current segment plus at most SPARES_MAX others remain.
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files <= 1 + SPARES_MAX, "{files} segment files");
        // Everything is still readable from the applied point the flushes reached.
        assert_eq!(replayed(dir.path(), 35).len(), 5);
    }

    #[test]
    fn a_zeroed_segment_is_written_zeros_to_its_end() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let shared = Shared {
            dir: dir.path().to_path_buf(),
            segment_bytes: SEGMENT_BYTES_MIN,
            spares: Mutex::new(Vec::new()),
            next_number: Mutex::new(1),
        };
        // Not a whole number of zero-fill steps: the last, shorter step is written too.
        let len = 3 * SEGMENT_BYTES_MIN + ZERO_FILL_CHUNK as u64 / 2;
        let segment = shared.create(len, true).unwrap();
        let metadata = segment.file.metadata().unwrap();
        assert_eq!(metadata.len(), len);
        // Written blocks to the end, not a hole nor allocated-but-unwritten extents (which
        // SEEK_DATA reports as holes until something reads them into the page cache, so this
        // comes before the read below): the last byte is data.
        assert!(metadata.blocks() * 512 >= len, "{} blocks", metadata.blocks());
        let last = rustix::fs::seek(&segment.file, rustix::fs::SeekFrom::Data(len - 1)).unwrap();
        assert_eq!(last, len - 1);
        let mut bytes = Vec::new();
        File::open(&segment.path).unwrap().read_to_end(&mut bytes).unwrap();
        assert!(bytes.iter().all(|byte| *byte == 0));
    }

    /// A record ending exactly on a block boundary, records starting and ending inside one
    /// block, and records across many blocks and 1 MiB segments.
    fn mixed_payloads() -> Vec<Vec<u8>> {
        [BLOCK - HEADER_BYTES, 1, 100, 5_000, 300_000, 7, 250_000, 3, 600_000, 64, 4_000]
            .iter()
            .zip(1..)
            .map(|(len, n)| payload(n, *len))
            .collect()
    }

    /// Switches write-through on and appends `payloads`, with no sync after: each append is
    /// on the disk when it returns.
    fn append_through(mut journal: Journal, payloads: &[Vec<u8>]) {
        assert!(journal.write_through(), "the test's file system takes O_DIRECT");
        for payload in payloads {
            journal.append(payload).unwrap();
        }
    }

    fn assert_replays(dir: &Path, payloads: &[Vec<u8>]) {
        let found = replayed(dir, 0);
        assert_eq!(
            found.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
            (1..=payloads.len() as u64).collect::<Vec<_>>()
        );
        for (seq, bytes) in found {
            assert_eq!(bytes, payloads[seq as usize - 1], "record {seq}");
        }
    }

    #[test]
    fn written_through_records_replay_across_blocks_and_segments_without_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let payloads = mixed_payloads();
        let journal = open(dir.path(), 0).unwrap().start(0, SEGMENT_BYTES_MIN).unwrap();
        append_through(journal, &payloads);
        assert_replays(dir.path(), &payloads);
    }

    #[test]
    fn write_through_switched_on_mid_block_keeps_the_records_before_it() {
        let dir = tempfile::tempdir().unwrap();
        // Three plain records end inside a block: the first direct write rewrites that block
        // from its start, so it must carry their bytes unchanged (read back from the file).
        let payloads: Vec<Vec<u8>> = (1..=6).map(|n| payload(n, 1_000 * n as usize)).collect();
        let journal = write(dir.path(), 0, SEGMENT_BYTES_MIN, &payloads[..3]);
        append_through(journal, &payloads[3..]);
        assert_replays(dir.path(), &payloads);
    }
}
