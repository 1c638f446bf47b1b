//! Ordered change feeds and their bounded fan-out to Watch streams. The sequencer is the
//! commit thread (`store::wal`): it numbers changes in log order; this module only delivers
//! them. Writers never wait for readers: a reader that falls behind the broadcast buffer is
//! ended and resumes from its last sequence.
//! May import `domain`, `index` and `store`; must not import `api` or tonic.

pub mod feed;
pub mod log;

pub use feed::{Feed, WatchError, WatchRequest, watch_availability};
pub use log::{EventFeed, watch_events};
