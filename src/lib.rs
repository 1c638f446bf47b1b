//! Allot: an inventory-promising and order-routing daemon.
//!
//! Layers, dependencies pointing downward only:
//! `api` (protobuf, tonic) → `events` → `index` → `store` → `domain`, with `clock`, `config`
//! and `metrics` beside them. `server` wires them together; `bin/allotd.rs` is a thin shell.

pub mod api;
pub mod background;
pub mod clock;
pub mod config;
pub mod domain;
pub mod events;
pub mod fulfilment;
pub mod index;
pub mod metrics;
pub mod orders;
pub mod proto;
pub mod routing;
pub mod server;
pub mod store;
