//! A group commit's batch, built directly in RocksDB's `WriteBatch` byte format.
//!
//! Writers record a mutation's puts and deletes into one growing buffer (`Ops`) instead of
//! two allocations per key and value. The commit thread copies each mutation's records into
//! one buffer for the whole group commit (`BatchBuilder`): that buffer is the journal record
//! as it is, and RocksDB applies it through `WriteBatch::from_data`. Before, every key and
//! value was allocated by its writer, copied by a `put_cf` call into RocksDB's batch, and freed
//! by the commit thread.
//!
//! The only part of the format this module does not write itself is the head of each record
//! (its type tag and column family id). `Layout::probe` takes it from batches RocksDB builds
//! at start-up, so the bytes stay RocksDB's own. A unit test checks the whole result against
//! RocksDB's `put_cf`, `delete_cf` and `delete_range_cf`, byte for byte.

use prost::Message;
use rocksdb::{ColumnFamily, WriteBatch};

use super::Cf;
use super::records::{self, Kind};

/// A `WriteBatch`'s header: an 8-byte sequence number, then the record count (fixed32, LE).
const HEADER_BYTES: usize = 12;

const OP_PUT: u8 = 0;
const OP_DELETE: u8 = 1;

/// The head of a record (type tag and column family id) for each operation and column family.
pub struct Layout {
    put: Vec<Vec<u8>>,
    delete: Vec<Vec<u8>>,
}

impl Layout {
    /// Learns each record head from a batch RocksDB builds with its own calls.
    pub fn probe(handles: &[&ColumnFamily; Cf::ALL.len()]) -> Layout {
        // What follows the head: the key "k" and, for a put, the value "v", each as a varint32
        // length and the bytes.
        let head = |batch: WriteBatch, tail: &[u8]| {
            let data = batch.data();
            assert!(
                data.len() >= HEADER_BYTES + tail.len()
                    && data[8..HEADER_BYTES] == 1u32.to_le_bytes()
                    && data.ends_with(tail),
                "RocksDB's WriteBatch format is not the one this build knows"
            );
            data[HEADER_BYTES..data.len() - tail.len()].to_vec()
        };
        let (mut put, mut delete) = (Vec::new(), Vec::new());
        for handle in handles {
            let mut batch = WriteBatch::default();
            batch.put_cf(handle, b"k", b"v");
            put.push(head(batch, b"\x01k\x01v"));
            let mut batch = WriteBatch::default();
            batch.delete_cf(handle, b"k");
            delete.push(head(batch, b"\x01k"));
        }
        Layout { put, delete }
    }
}

/// The puts and deletes of one mutation, in order. Each is `[cf][op][length of the rest,
/// u32 LE][rest]`, where the rest is already in the `WriteBatch` format: the key as a varint32
/// length and its bytes, then for a put the value the same way.
#[derive(Default)]
pub struct Ops {
    bytes: Vec<u8>,
}

impl Ops {
    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        let rest = varint_len(key.len()) + key.len() + varint_len(value.len()) + value.len();
        self.head(cf, OP_PUT, rest);
        put_slice(&mut self.bytes, key);
        put_slice(&mut self.bytes, value);
    }

    /// A put whose value is a record, encoded in place (no intermediate buffer).
    pub fn put_record<M: Message>(&mut self, cf: Cf, key: &[u8], kind: Kind, message: &M) {
        let value_len = records::encoded_len(message);
        let rest = varint_len(key.len()) + key.len() + varint_len(value_len) + value_len;
        self.head(cf, OP_PUT, rest);
        put_slice(&mut self.bytes, key);
        put_varint(&mut self.bytes, value_len);
        records::encode_into(&mut self.bytes, kind, message);
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.head(cf, OP_DELETE, varint_len(key.len()) + key.len());
        put_slice(&mut self.bytes, key);
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn head(&mut self, cf: Cf, op: u8, rest: usize) {
        let rest = u32::try_from(rest).expect("a key and value are far below 4 GiB");
        self.bytes.reserve(6 + rest as usize);
        self.bytes.push(cf as u8);
        self.bytes.push(op);
        self.bytes.extend_from_slice(&rest.to_le_bytes());
    }
}

/// One group commit's `WriteBatch` bytes.
pub struct BatchBuilder<'a> {
    layout: &'a Layout,
    rep: Vec<u8>,
    count: u32,
}

impl<'a> BatchBuilder<'a> {
    pub fn new(layout: &'a Layout) -> Self {
        let mut rep = Vec::with_capacity(64 * 1024);
        rep.resize(HEADER_BYTES, 0);
        BatchBuilder { layout, rep, count: 0 }
    }

    /// Appends a mutation's records, in their order.
    pub fn append(&mut self, ops: &Ops) {
        let bytes = ops.bytes.as_slice();
        let mut at = 0;
        while at < bytes.len() {
            let cf = bytes[at] as usize;
            let rest = u32::from_le_bytes(bytes[at + 2..at + 6].try_into().expect("4 bytes")) as usize;
            let head = match bytes[at + 1] {
                OP_PUT => &self.layout.put[cf],
                _ => &self.layout.delete[cf],
            };
            self.rep.extend_from_slice(head);
            self.rep.extend_from_slice(&bytes[at + 6..at + 6 + rest]);
            self.count += 1;
            at += 6 + rest;
        }
    }

    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.rep.extend_from_slice(&self.layout.put[cf as usize]);
        put_slice(&mut self.rep, key);
        put_slice(&mut self.rep, value);
        self.count += 1;
    }

    pub fn put_record<M: Message>(&mut self, cf: Cf, key: &[u8], kind: Kind, message: &M) {
        self.rep.extend_from_slice(&self.layout.put[cf as usize]);
        put_slice(&mut self.rep, key);
        put_varint(&mut self.rep, records::encoded_len(message));
        records::encode_into(&mut self.rep, kind, message);
        self.count += 1;
    }

    /// The batch's bytes, its record count in the header.
    pub fn finish(mut self) -> Vec<u8> {
        self.rep[8..HEADER_BYTES].copy_from_slice(&self.count.to_le_bytes());
        self.rep
    }
}

fn put_slice(bytes: &mut Vec<u8>, slice: &[u8]) {
    put_varint(bytes, slice.len());
    bytes.extend_from_slice(slice);
}

fn put_varint(bytes: &mut Vec<u8>, value: usize) {
    let mut value = u32::try_from(value).expect("RocksDB slices are below 4 GiB");
    while value >= 0x80 {
        bytes.push((value as u8) | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
}

fn varint_len(value: usize) -> usize {
    match value {
        0..0x80 => 1,
        0x80..0x4000 => 2,
        0x4000..0x20_0000 => 3,
        0x20_0000..0x1000_0000 => 4,
        _ => 5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::CounterRecord;
    use crate::store::{Store, StoreOptions};

    #[test]
    fn batches_are_byte_for_byte_what_rocksdb_builds() {
        // Goal: a batch built here is exactly RocksDB's own, for every column family and
        // operation, with keys and values around each varint length boundary.
        // Method: the same operations through `Ops`/`BatchBuilder` and through WriteBatch's
        // put_cf and delete_cf; compare the bytes.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let handles = Cf::ALL.map(|cf| store.cf(cf));
        let layout = Layout::probe(&handles);
        let mut expected = WriteBatch::default();
        let mut builder = BatchBuilder::new(&layout);
        for (round, length) in [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000].into_iter().enumerate() {
            let mut ops = Ops::default();
            for cf in Cf::ALL {
                let key = vec![b'k' ^ round as u8; length.min(1_000) + 1];
                let value = vec![cf as u8; length];
                ops.put(cf, &key, &value);
                expected.put_cf(store.cf(cf), &key, &value);
                ops.delete(cf, &key);
                expected.delete_cf(store.cf(cf), &key);
                let record = CounterRecord { value: length as u64 };
                ops.put_record(cf, &key, Kind::Counter, &record);
                expected.put_cf(store.cf(cf), &key, records::encode(Kind::Counter, &record));
            }
            builder.append(&ops);
            builder.put(Cf::Meta, b"meta", &vec![7; length]);
            expected.put_cf(store.cf(Cf::Meta), b"meta", vec![7; length]);
            let record = CounterRecord { value: round as u64 };
            builder.put_record(Cf::Events, b"e", Kind::Counter, &record);
            expected.put_cf(store.cf(Cf::Events), b"e", records::encode(Kind::Counter, &record));
        }
        assert_eq!(builder.finish(), expected.data());
        assert_eq!(BatchBuilder::new(&layout).finish(), WriteBatch::default().data());
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for value in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455, 268_435_456] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            assert_eq!(bytes.len(), varint_len(value), "{value}");
        }
    }
}
