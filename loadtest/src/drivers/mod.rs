//! The two ways of applying load: closed loop (callers waiting for their answers) and open
//! loop (a fixed arrival schedule). Both run `scenarios::execute` and record into a
//! `Recorder`; they own the timing of a run, not what a request sends.

pub mod closed_loop;
pub mod open_loop;

use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::recorder::Recorded;

/// When a run sends and records.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Load starts here (warmup).
    pub start: Instant,
    /// Requests starting (closed loop) or due (open loop) from here on are recorded.
    pub measure_start: Instant,
    /// No request starts (or is due) at or after this.
    pub end: Instant,
    /// Recorded requests at most; 0 = only `end` bounds the run.
    pub requests_max: u64,
}

impl Window {
    pub fn new(start: Instant, warmup: Duration, duration: Duration, requests_max: u64) -> Self {
        let measure_start = start + warmup;
        Window { start, measure_start, end: measure_start + duration, requests_max }
    }
}

/// What a driver hands back.
pub struct Measured {
    pub recorded: Recorded,
    /// From the start of recording to the last recorded answer.
    pub elapsed: Duration,
    /// Open loop only.
    pub open_loop: Option<open_loop::Counts>,
}

/// The RNG of one caller (closed loop) or one request (open loop): a pure function of the
/// run's seed and the stream's index, so the requests of a run are reproducible.
pub fn stream_rng(seed: u64, stream: u64) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(stream))
}
