//! Key layouts. Ids are printable ASCII, so 0x00 is a safe separator; numbers are big-endian so
//! RocksDB's byte order is numeric order.

use crate::domain::{NodeId, ReservationId, Sku};

pub fn position(sku: &Sku, node_id: &NodeId) -> Vec<u8> {
    let mut key = Vec::with_capacity(sku.as_str().len() + 1 + node_id.as_str().len());
    key.extend_from_slice(sku.as_str().as_bytes());
    key.push(0);
    key.extend_from_slice(node_id.as_str().as_bytes());
    key
}

/// Splits a position key; `None` for a malformed key.
pub fn split_position(key: &[u8]) -> Option<(&str, &str)> {
    let separator = key.iter().position(|byte| *byte == 0)?;
    let sku = std::str::from_utf8(&key[..separator]).ok()?;
    let node = std::str::from_utf8(&key[separator + 1..]).ok()?;
    Some((sku, node))
}

pub fn reservation(id: ReservationId) -> [u8; 8] {
    id.0.to_be_bytes()
}

/// Idempotency keys live in namespaces, one per kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdemNamespace {
    Reserve,
    Adjust,
    Allocate,
    /// Fulfilment.ConfirmShipment.
    Shipment,
    /// Fulfilment.ReportShortage.
    Shortage,
    /// Fulfilment.CreateReturn.
    ReturnCreate,
    /// Fulfilment.ReceiveReturn.
    ReturnReceive,
}

impl IdemNamespace {
    fn tag(self) -> u8 {
        match self {
            IdemNamespace::Reserve => b'r',
            IdemNamespace::Adjust => b'a',
            IdemNamespace::Allocate => b'l',
            IdemNamespace::Shipment => b's',
            IdemNamespace::Shortage => b'h',
            IdemNamespace::ReturnCreate => b'c',
            IdemNamespace::ReturnReceive => b'v',
        }
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            b'r' => Some(IdemNamespace::Reserve),
            b'a' => Some(IdemNamespace::Adjust),
            b'l' => Some(IdemNamespace::Allocate),
            b's' => Some(IdemNamespace::Shipment),
            b'h' => Some(IdemNamespace::Shortage),
            b'c' => Some(IdemNamespace::ReturnCreate),
            b'v' => Some(IdemNamespace::ReturnReceive),
            _ => None,
        }
    }
}

pub fn idempotency(namespace: IdemNamespace, key: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + key.len());
    bytes.push(namespace.tag());
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

/// Availability changes, by sequence.
pub fn change(sequence: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'a';
    key[1..].copy_from_slice(&sequence.to_be_bytes());
    key
}

pub fn change_sequence(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != b'a' {
        return None;
    }
    Some(u64::from_be_bytes(key[1..].try_into().ok()?))
}

/// Audit events, by sequence.
pub fn audit(sequence: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = b'e';
    key[1..].copy_from_slice(&sequence.to_be_bytes());
    key
}

pub fn audit_sequence(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != b'e' {
        return None;
    }
    Some(u64::from_be_bytes(key[1..].try_into().ok()?))
}

/// The history index of one order: `h` + order id + 0x00 + event sequence (empty value).
pub fn order_history(order_id: &str, sequence: u64) -> Vec<u8> {
    let mut key = order_history_prefix(order_id);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The event sequence of an order history key (its last 8 bytes).
pub fn order_history_sequence(key: &[u8]) -> Option<u64> {
    // `h`, at least one byte of order id, 0x00, the sequence.
    if key.len() < 11 || key[0] != b'h' || key[key.len() - 9] != 0 {
        return None;
    }
    Some(u64::from_be_bytes(key[key.len() - 8..].try_into().ok()?))
}

pub fn order_history_prefix(order_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + order_id.len() + 8);
    key.push(b'h');
    key.extend_from_slice(order_id.as_bytes());
    key.push(0);
    key
}

/// Orders, fulfilment orders and returns, by their number.
pub fn numbered(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// High-water marks of the order book's ids (never reused, also after a retention purge).
pub const META_NEXT_ORDER_ID: &[u8] = b"next_order_id";
pub const META_NEXT_FULFILMENT_ID: &[u8] = b"next_fulfilment_order_id";
pub const META_NEXT_RETURN_ID: &[u8] = b"next_return_id";
pub const META_LAST_AUDIT_SEQUENCE: &[u8] = b"last_audit_sequence";
pub const META_FORMAT_VERSION: &[u8] = b"format_version";
pub const META_LAST_SEQUENCE: &[u8] = b"last_sequence";
/// The oldest availability change kept (older ones may still be on disk until their files go).
pub const META_FIRST_SEQUENCE: &[u8] = b"first_sequence";
/// The oldest audit event kept (the same for the events).
pub const META_FIRST_AUDIT_SEQUENCE: &[u8] = b"first_audit_sequence";
pub const META_NEXT_RESERVATION_ID: &[u8] = b"next_reservation_id";
/// The last journal record whose batch this state holds (see `journal`).
pub const META_JOURNAL_SEQ: &[u8] = b"journal_seq";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_history_key_gives_back_its_sequence_and_nothing_else_parses_as_one() {
        // Goal: the order history's compaction filter reads the right sequence from every
        // history key (whatever the order id holds) and none from a key of another shape.
        for (order_id, sequence) in [("o-1", 1), ("A", u64::MAX), ("with\0nul", 7), ("ünï", 1 << 40)] {
            assert_eq!(order_history_sequence(&order_history(order_id, sequence)), Some(sequence));
        }
        assert_eq!(order_history_sequence(&order_history_prefix("o-1")), None);
        assert_eq!(order_history_sequence(&audit(5)), None);
        assert_eq!(order_history_sequence(b"h\0\0\0\0\0\0\0\0\x05"), None, "no order id");
        assert_eq!(order_history_sequence(b"hx\x01\0\0\0\0\0\0\0\x05"), None, "no separator");
    }
}
