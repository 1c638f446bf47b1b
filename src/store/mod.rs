//! The RocksDB write-ahead store: versioned, checksummed records in column families, the
//! group-commit thread, and recovery of the full state at start-up.
//! Owns every RocksDB call of the crate. May import `domain` and `clock`; must not import
//! `index`, `api` or protobuf service types.

pub mod errors;
pub mod keys;
pub mod records;
pub mod rocks;
pub mod wal;

pub use errors::StoreError;
pub use rocks::{Recovered, Store, StoreOptions};
pub use wal::{Durability, Mutation, Op, Slot, WalHandle, WalOptions};

/// The column families, each holding one kind of record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cf {
    Nodes,
    Positions,
    Reservations,
    Idempotency,
    Events,
    Meta,
}

impl Cf {
    pub const ALL: [Cf; 6] =
        [Cf::Nodes, Cf::Positions, Cf::Reservations, Cf::Idempotency, Cf::Events, Cf::Meta];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Nodes => "nodes",
            Cf::Positions => "positions",
            Cf::Reservations => "reservations",
            Cf::Idempotency => "idempotency",
            Cf::Events => "events",
            Cf::Meta => "meta",
        }
    }
}
