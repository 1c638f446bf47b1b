//! The RocksDB write-ahead store: versioned, checksummed records in column families, the
//! group-commit thread, and recovery of the full state at start-up.
//! Owns every RocksDB call of the crate. May import `domain` and `clock`; must not import
//! `index`, `api` or protobuf service types.

pub mod batch;
pub mod disk;
pub mod errors;
pub mod journal;
pub mod keys;
pub mod order_records;
pub mod records;
pub mod rocks;
pub mod wal;

pub use disk::{DiskGuard, DiskLow};
pub use errors::StoreError;
pub use rocks::{Recovered, RecoveredOrders, Store, StoreOptions};
pub use wal::{Durability, Mutation, Refused, Slot, WalHandle, WalOptions};

/// The column families, each holding one kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    Nodes,
    Positions,
    Reservations,
    Idempotency,
    Events,
    Meta,
    Orders,
    Fulfilment,
    Returns,
    /// Availability changes (`a` + sequence). Until store format 5 they shared `Events` with
    /// the audit events; see `Store::move_out_of_events`.
    Changes,
    /// Each order's history index (`h` + order id + 0 + event sequence, empty values). Until
    /// store format 6 it shared `Events` with the audit events.
    OrderHistory,
}

impl Cf {
    /// In declaration order: `ALL[cf as usize] == cf`.
    pub const ALL: [Cf; 11] = [
        Cf::Nodes,
        Cf::Positions,
        Cf::Reservations,
        Cf::Idempotency,
        Cf::Events,
        Cf::Meta,
        Cf::Orders,
        Cf::Fulfilment,
        Cf::Returns,
        Cf::Changes,
        Cf::OrderHistory,
    ];

    /// Column families read only by recovery, never while serving (the index has them in
    /// memory); the others are read by idempotent replays, order histories and feeds.
    pub fn read_only_at_start_up(self) -> bool {
        matches!(
            self,
            Cf::Nodes | Cf::Positions | Cf::Reservations | Cf::Orders | Cf::Fulfilment | Cf::Returns
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Cf::Nodes => "nodes",
            Cf::Positions => "positions",
            Cf::Reservations => "reservations",
            Cf::Idempotency => "idempotency",
            Cf::Events => "events",
            Cf::Meta => "meta",
            Cf::Orders => "orders",
            Cf::Fulfilment => "fulfilment_orders",
            Cf::Returns => "returns",
            Cf::Changes => "changes",
            Cf::OrderHistory => "order_history",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cf;

    #[test]
    fn all_is_in_declaration_order() {
        for (index, cf) in Cf::ALL.iter().enumerate() {
            assert_eq!(*cf as usize, index, "{cf:?}");
        }
    }
}
