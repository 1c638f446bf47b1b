//! Typed, validated commands: what the API layer hands the index after parsing.

use super::ids::{Channel, IdempotencyKey, NodeId, Sku};
use super::reservation::ReserveLine;

#[derive(Debug, Clone)]
pub struct ReserveCommand {
    pub idempotency_key: IdempotencyKey,
    /// Non-empty, no duplicate (sku, node_id), every qty > 0.
    pub lines: Vec<ReserveLine>,
    /// 0 = no expiry.
    pub ttl_ms: u64,
    pub reference: String,
    pub channel: Option<Channel>,
}

impl ReserveCommand {
    /// A stable digest of the request, to tell a replay from a reused key. Stable across
    /// builds and restarts (FNV-1a), insensitive to line order.
    pub fn fingerprint(&self) -> u64 {
        let mut digest = Fnv::new();
        let mut line_digest = |line: &ReserveLine| {
            digest.text(line.sku.as_str());
            digest.text(line.node_id.as_str());
            digest.bytes(&line.qty.to_le_bytes());
        };
        if let [line] = self.lines.as_slice() {
            line_digest(line); // nothing to sort (and nothing to allocate)
        } else {
            let mut lines: Vec<&ReserveLine> = self.lines.iter().collect();
            lines.sort_by(|a, b| (&a.sku, &a.node_id).cmp(&(&b.sku, &b.node_id)));
            lines.into_iter().for_each(line_digest);
        }
        digest.bytes(&self.ttl_ms.to_le_bytes());
        digest.text(&self.reference);
        digest.text(self.channel.as_ref().map_or("", Channel::as_str));
        digest.finish()
    }
}

#[derive(Debug, Clone)]
pub struct StockEntry {
    pub sku: Sku,
    pub node_id: NodeId,
    pub on_hand: i64,
    pub safety_stock: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct StockAdjustment {
    pub sku: Sku,
    pub node_id: NodeId,
    pub delta: i64,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct AdjustStockCommand {
    pub adjustment_id: IdempotencyKey,
    pub entries: Vec<StockAdjustment>,
}

impl AdjustStockCommand {
    pub fn fingerprint(&self) -> u64 {
        let mut digest = Fnv::new();
        for entry in &self.entries {
            digest.text(entry.sku.as_str());
            digest.text(entry.node_id.as_str());
            digest.bytes(&entry.delta.to_le_bytes());
            digest.text(&entry.reason);
        }
        digest.finish()
    }
}

/// A stable digest of an encoded request (FNV-1a), to tell a replay from a reused key.
pub fn fingerprint_bytes(bytes: &[u8]) -> u64 {
    let mut digest = Fnv::new();
    digest.bytes(bytes);
    digest.finish()
}

/// 64-bit FNV-1a with length-prefixed fields (so "ab"+"c" differs from "a"+"bc").
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn text(&mut self, text: &str) {
        self.bytes(&(text.len() as u64).to_le_bytes());
        self.bytes(text.as_bytes());
    }

    fn finish(&self) -> u64 {
        self.0
    }
}
