//! The order lifecycle on top of the availability index: capture (idempotent per channel and
//! external order id), validation holds, routing through the DOM with reservation, backorder
//! retry, cancellation, and the KPIs.
//! May import `domain`, `index`, `routing`, `store` and `clock`; must not import `api`.

pub mod book;
pub mod check;
pub mod rules;
pub mod stats;

pub use book::{CaptureCommand, Committed, OrderBook, Outcome};
pub use rules::OrderRules;
pub use stats::Stats;
