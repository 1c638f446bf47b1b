//! What a run measured: latency histograms per scenario request and per RPC kind, gRPC errors
//! by status code, business outcomes (INSUFFICIENT, ...), ReserveBatch item outcomes and the
//! open-loop counters. Callers record into one of a few mutex-guarded shards (held only to
//! add one request, never across an await); the shards are merged once at the end. Must not
//! import the drivers or the report.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency a histogram holds, µs; longer ones are recorded as this (the request
/// timeout is validated below it).
pub const LATENCY_MAX_US: u64 = 3_600_000_000;
/// Significant digits of every histogram: 0.1 % resolution.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Recorder shards: callers (lanes) share them by index, bounding the histograms' memory
/// whatever --concurrency is while keeping lock contention low.
pub const SHARD_COUNT: usize = 16;

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS).expect("valid bounds")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// One RPC kind, for the per-RPC breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    Health,
    Atp,
    Reserve,
    ReserveBatch,
    ReserveStream,
    Release,
    Confirm,
    Route,
    Allocate,
    Capture,
    Ship,
}

impl OpKind {
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Health => "health",
            OpKind::Atp => "atp",
            OpKind::Reserve => "reserve",
            OpKind::ReserveBatch => "reserve-batch",
            OpKind::ReserveStream => "reserve-stream",
            OpKind::Release => "release",
            OpKind::Confirm => "confirm",
            OpKind::Route => "route",
            OpKind::Allocate => "allocate",
            OpKind::Capture => "capture",
            OpKind::Ship => "ship",
        }
    }
}

/// How one RPC ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Answered, but not what the scenario hoped for: INSUFFICIENT, NOTHING_RESERVED.
    Business(&'static str),
    Error(tonic::Code),
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub kind: OpKind,
    pub latency: Duration,
    pub outcome: Outcome,
}

/// Item outcomes of ReserveBatch calls.
#[derive(Debug, Clone, Default)]
pub struct BatchTally {
    /// Items answered (in calls that succeeded).
    pub items: u64,
    pub reserved: u64,
    pub insufficient: u64,
    /// Item errors by gRPC code name.
    pub errors_by_code: BTreeMap<String, u64>,
}

impl BatchTally {
    fn add(&mut self, other: &BatchTally) {
        self.items += other.items;
        self.reserved += other.reserved;
        self.insufficient += other.insufficient;
        for (code, count) in &other.errors_by_code {
            *self.errors_by_code.entry(code.clone()).or_default() += count;
        }
    }
}

/// One scenario request (one or several RPCs) as it finished.
#[derive(Debug, Default)]
pub struct Iteration {
    /// From the intended start (open loop) or the actual start (closed loop) to the last answer.
    pub latency: Duration,
    pub samples: Vec<Sample>,
    pub batch: Option<BatchTally>,
}

impl Iteration {
    pub fn failed(&self) -> bool {
        self.samples.iter().any(|sample| matches!(sample.outcome, Outcome::Error(_)))
    }
}

#[derive(Debug)]
pub struct OperationStats {
    pub latency: Histogram<u64>,
    pub errors_by_code: BTreeMap<String, u64>,
    pub outcomes: BTreeMap<&'static str, u64>,
}

impl OperationStats {
    fn new() -> Self {
        OperationStats {
            latency: latency_histogram(),
            errors_by_code: BTreeMap::new(),
            outcomes: BTreeMap::new(),
        }
    }
}

/// Everything recorded; one per shard, merged into one for the report.
#[derive(Debug)]
pub struct Recorded {
    /// Scenario requests.
    pub latency: Histogram<u64>,
    /// Scenario requests with at least one RPC error.
    pub failed: u64,
    pub operations: BTreeMap<OpKind, OperationStats>,
    pub batch: Option<BatchTally>,
    /// Open loop: how late requests were sent (intended send time to actual send).
    pub send_lag: Histogram<u64>,
}

impl Recorded {
    pub fn new() -> Self {
        Recorded {
            latency: latency_histogram(),
            failed: 0,
            operations: BTreeMap::new(),
            batch: None,
            send_lag: latency_histogram(),
        }
    }

    pub fn record(&mut self, iteration: &Iteration, send_lag: Option<Duration>) {
        self.latency.saturating_record(micros(iteration.latency));
        if iteration.failed() {
            self.failed += 1;
        }
        for sample in &iteration.samples {
            let stats = self.operations.entry(sample.kind).or_insert_with(OperationStats::new);
            stats.latency.saturating_record(micros(sample.latency));
            match sample.outcome {
                Outcome::Ok => {}
                Outcome::Business(name) => *stats.outcomes.entry(name).or_default() += 1,
                Outcome::Error(code) => *stats.errors_by_code.entry(code_name(code)).or_default() += 1,
            }
        }
        if let Some(tally) = &iteration.batch {
            self.batch.get_or_insert_with(BatchTally::default).add(tally);
        }
        if let Some(lag) = send_lag {
            self.send_lag.saturating_record(micros(lag));
        }
    }

    pub fn merge(&mut self, other: &Recorded) {
        self.latency.add(&other.latency).expect("same bounds");
        self.failed += other.failed;
        for (kind, theirs) in &other.operations {
            let ours = self.operations.entry(*kind).or_insert_with(OperationStats::new);
            ours.latency.add(&theirs.latency).expect("same bounds");
            for (code, count) in &theirs.errors_by_code {
                *ours.errors_by_code.entry(code.clone()).or_default() += count;
            }
            for (name, count) in &theirs.outcomes {
                *ours.outcomes.entry(name).or_default() += count;
            }
        }
        if let Some(tally) = &other.batch {
            self.batch.get_or_insert_with(BatchTally::default).add(tally);
        }
        self.send_lag.add(&other.send_lag).expect("same bounds");
    }

    /// gRPC errors of every RPC, by code.
    pub fn errors_by_code(&self) -> BTreeMap<String, u64> {
        let mut total = BTreeMap::new();
        for stats in self.operations.values() {
            for (code, count) in &stats.errors_by_code {
                *total.entry(code.clone()).or_default() += count;
            }
        }
        total
    }

    /// Business outcomes of every RPC, by name.
    pub fn outcomes(&self) -> BTreeMap<&'static str, u64> {
        let mut total = BTreeMap::new();
        for stats in self.operations.values() {
            for (name, count) in &stats.outcomes {
                *total.entry(*name).or_default() += count;
            }
        }
        total
    }
}

/// The name of a gRPC code as the report prints it, e.g. "ResourceExhausted".
pub fn code_name(code: tonic::Code) -> String {
    format!("{code:?}")
}

/// The shards callers record into.
pub struct Recorder {
    shards: Vec<Mutex<Recorded>>,
}

impl Recorder {
    pub fn new() -> Self {
        Recorder { shards: (0..SHARD_COUNT).map(|_| Mutex::new(Recorded::new())).collect() }
    }

    pub fn record(&self, lane: usize, iteration: &Iteration, send_lag: Option<Duration>) {
        self.shards[lane % SHARD_COUNT].lock().expect("no panic while recording").record(iteration, send_lag);
    }

    /// Every shard merged; call once every request has been recorded.
    pub fn merged(&self) -> Recorded {
        let mut total = Recorded::new();
        for shard in &self.shards {
            total.merge(&shard.lock().expect("no panic while recording"));
        }
        total
    }
}
