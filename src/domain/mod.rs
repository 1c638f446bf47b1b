//! Pure types and rules of the inventory domain: identifiers, nodes, positions and ATP,
//! reservations and their state machine, request commands, limits.
//! No I/O, no locks, no clocks: everything here is a value or a pure function.
//! Must not import `index`, `store`, `api` or anything that knows protobuf.

pub mod change;
pub mod commands;
pub mod ids;
pub mod limits;
pub mod node;
pub mod order;
pub mod position;
pub mod reservation;

pub use change::*;
pub use commands::*;
pub use ids::*;
pub use limits::Limits;
pub use node::*;
pub use order::*;
pub use position::*;
pub use reservation::*;
