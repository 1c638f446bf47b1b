//! The command line: flags, the scenario list with what each one measures, and `validate()`,
//! which lists every problem at once. Owns no I/O; must not import the drivers or reporting.

use std::net::SocketAddr;

use clap::{Parser, ValueEnum};

use crate::scenarios::Mix;

/// Most SKUs `--skus` may name: the Zipf picker keeps one f64 per SKU (80 MB at this size).
pub const SKUS_MAX: usize = 10_000_000;
/// Most requests a run may keep in flight in open loop (`--in-flight-max`).
pub const IN_FLIGHT_MAX_LIMIT: usize = 1_000_000;
/// Highest open-loop arrival rate (`--rate`), requests per second.
pub const RATE_MAX: u64 = 10_000_000;
/// Most items in one ReserveBatch call; allotd's default limits.lines_per_request_max.
pub const BATCH_LEN_MAX: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// grpc.health.v1 Check: the transport's own ceiling.
    Health,
    /// GetAvailability of one SKU.
    Atp,
    /// One-line durable Reserve (qty 1, --ttl-ms) of one SKU at a random node.
    Reserve,
    /// Reserve, then ReleaseReservation of it; both calls measured separately.
    ReserveRelease,
    /// Inventory.ReserveBatch of --batch one-line reservations (qty 1 each): calls/s and
    /// reservations/s, latency per call, item outcomes by kind.
    ReserveBatch,
    /// Inventory.ReserveStream: one-line reservations (qty 1) on bidirectional streams that
    /// --callers-per-stream callers share (each caller one reservation at a time); latency per
    /// reservation, from its send to its durable answer. --concurrency is the reservations in
    /// flight, over --concurrency / --callers-per-stream streams.
    ReserveStream,
    /// Route (a quote, nothing reserved) of --lines SKUs to a random US address.
    Route,
    /// Allocate (plan and reserve, durable) of --lines SKUs, qty 1 each.
    Allocate,
    /// CaptureOrder (validate, route, one fulfilment order per node, durable) of --lines SKUs.
    Capture,
    /// What a checkout service does: Routing.Allocate, then Inventory.ConfirmReservation of
    /// its reservation (the durable promise; no TTL left). Shipping is not part of it: no RPC
    /// ships a bare reservation, units ship through fulfilment orders (see order-checkout).
    Checkout,
    /// The full order path including shipping: CaptureOrder, then ConfirmShipment of every
    /// fulfilment order it made.
    OrderCheckout,
    /// A checkout-service blend, one RPC per request, weights from --mix; latency is also
    /// broken down per RPC.
    Mixed,
}

impl Scenario {
    /// The name as written on the command line (and in the JSON report).
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Health => "health",
            Scenario::Atp => "atp",
            Scenario::Reserve => "reserve",
            Scenario::ReserveRelease => "reserve-release",
            Scenario::ReserveBatch => "reserve-batch",
            Scenario::ReserveStream => "reserve-stream",
            Scenario::Route => "route",
            Scenario::Allocate => "allocate",
            Scenario::Capture => "capture",
            Scenario::Checkout => "checkout",
            Scenario::OrderCheckout => "order-checkout",
            Scenario::Mixed => "mixed",
        }
    }
}

const AFTER_HELP: &str = "\
Modes:
  closed loop (default)  --concurrency callers, each sending its next request when the previous
                         one answered. Latency is measured from the actual send.
  open loop (--rate N)   request i is due at start + i/N whatever the answers; each runs in a
                         task of its own, at most --in-flight-max at once: a request due while
                         the cap is reached is counted as dropped and never sent (no silent
                         queue). Latency is measured from the request's intended send time (no
                         coordinated omission); --concurrency is then the number of lanes
                         (request i is in lane i mod concurrency: a lane owns the reservations
                         that mixed may release). The report gives the achieved rate against
                         the target and the generator's own send lag.

SKUs: uniform by default; --skew S: Zipf with exponent S (SKU 0 the most popular); --hot-skus K:
  --hot-fraction of the picks go to SKUs 0..K, the rest uniformly to the others.
  Deterministic by --seed: a closed-loop caller's RNG is seeded from seed and its index, an
  open-loop request's from seed and its index. Idempotency keys also carry --run-id (default:
  the start time), so a rerun with the same seed is new work, not a replay.

Checkout: `checkout` is Allocate -> ConfirmReservation, the durable promise a checkout service
  makes; no RPC ships a bare reservation (AdjustStock would not release it), so shipping is
  measured by `order-checkout`: CaptureOrder -> ConfirmShipment of each fulfilment order.

Runs --warmup-secs unrecorded, then --duration-secs recorded (0: no load, e.g. only --setup),
  or until --requests-max recorded requests. Loopback addresses only.";

#[derive(Debug, Parser)]
#[command(about = "Load generator for allotd (gRPC, 127.0.0.1 only)", after_help = AFTER_HELP)]
pub struct Flags {
    /// allotd gRPC address (loopback only).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,
    #[arg(long, value_enum, default_value = "reserve")]
    pub scenario: Scenario,
    /// Closed loop: callers in flight at once. Open loop: lanes the requests are spread over.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Open loop: the arrival rate, requests per second (absent: closed loop).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Open loop: requests in flight at most; a request due beyond it is dropped.
    #[arg(long, default_value_t = 10_000)]
    pub in_flight_max: usize,
    /// Recorded seconds, after the warmup (0: no load at all).
    #[arg(long, default_value_t = 10)]
    pub duration_secs: u64,
    /// Seconds of load before recording starts (its requests are not counted).
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Stop after this many recorded requests (0 = only the duration bounds the run).
    #[arg(long, default_value_t = 0)]
    pub requests_max: u64,
    /// A request (each RPC of it) not answered within this is an error DeadlineExceeded.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// SKUs in the data set.
    #[arg(long, default_value_t = 10_000)]
    pub skus: usize,
    /// Nodes in the data set.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// Units on hand per position that --setup writes.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub on_hand: i64,
    /// Create the nodes and stock first (through the API).
    #[arg(long)]
    pub setup: bool,
    /// Zipf exponent of the SKU popularity (> 0, e.g. 0.99); absent: uniform.
    #[arg(long)]
    pub skew: Option<f64>,
    /// Hot-SKU contention: SKUs 0..K receive --hot-fraction of the picks.
    #[arg(long)]
    pub hot_skus: Option<usize>,
    /// Share of the picks that go to the --hot-skus.
    #[arg(long, default_value_t = 0.9)]
    pub hot_fraction: f64,
    /// Lines per order (route, allocate, capture, checkout, order-checkout).
    #[arg(long, default_value_t = 3)]
    pub lines: usize,
    /// reserve-stream: callers (open loop: lanes) that share one ReserveStream, so each stream
    /// carries up to this many reservations in flight.
    #[arg(long, default_value_t = 1)]
    pub callers_per_stream: usize,
    /// Items per ReserveBatch call (reserve-batch).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// The mixed scenario's blend: RPC=weight pairs over health, atp, reserve, release (of a
    /// reservation its lane made; a Reserve while it has none), route, allocate, capture.
    #[arg(long, default_value = crate::scenarios::MIX_DEFAULT)]
    pub mix: String,
    /// Reservation TTL.
    #[arg(long, default_value_t = 60_000)]
    pub ttl_ms: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Part of every idempotency key and order id (default: the start time in ms).
    #[arg(long)]
    pub run_id: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl Flags {
    /// Every problem with the flags, or the parsed mix.
    pub fn validate(&self) -> Result<Mix, Vec<String>> {
        let mut problems = Vec::new();
        if !self.addr.ip().is_loopback() {
            problems.push(format!(
                "--addr {} is not a loopback address; allot-load only targets this machine",
                self.addr
            ));
        }
        for (name, value) in [
            ("--concurrency", self.concurrency),
            ("--connections", self.connections),
            ("--skus", self.skus),
            ("--nodes", self.nodes),
            ("--lines", self.lines),
            ("--batch", self.batch),
            ("--callers-per-stream", self.callers_per_stream),
            ("--in-flight-max", self.in_flight_max),
        ] {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if self.skus > SKUS_MAX {
            problems.push(format!("--skus must be at most {SKUS_MAX}"));
        }
        if self.batch > BATCH_LEN_MAX {
            problems.push(format!("--batch must be at most {BATCH_LEN_MAX} (allotd's default limit)"));
        }
        if self.in_flight_max > IN_FLIGHT_MAX_LIMIT {
            problems.push(format!("--in-flight-max must be at most {IN_FLIGHT_MAX_LIMIT}"));
        }
        if let Some(rate) = self.rate
            && !(1..=RATE_MAX).contains(&rate)
        {
            problems.push(format!("--rate must be between 1 and {RATE_MAX} requests per second"));
        }
        let timeout_ms_max = crate::recorder::LATENCY_MAX_US / 1_000;
        if !(1..=timeout_ms_max).contains(&self.timeout_ms) {
            problems.push(format!("--timeout-ms must be between 1 and {timeout_ms_max}"));
        }
        if self.on_hand < 0 {
            problems.push("--on-hand must not be negative".into());
        }
        if let Some(skew) = self.skew
            && !(skew.is_finite() && skew > 0.0)
        {
            problems.push("--skew must be a number above 0 (e.g. 0.99)".into());
        }
        if let Some(hot_skus) = self.hot_skus {
            if hot_skus == 0 || hot_skus > self.skus {
                problems.push("--hot-skus must be between 1 and --skus".into());
            }
            if self.skew.is_some() {
                problems.push("--skew and --hot-skus are exclusive: pick one SKU distribution".into());
            }
        }
        if !(0.0..=1.0).contains(&self.hot_fraction) {
            problems.push("--hot-fraction must be between 0 and 1".into());
        }
        let mix = Mix::parse(&self.mix).map_err(|problem| problems.push(format!("--mix: {problem}")));
        match mix {
            Ok(mix) if problems.is_empty() => Ok(mix),
            _ => Err(problems),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(arguments: &[&str]) -> Flags {
        Flags::try_parse_from([&["allot-load"], arguments].concat()).unwrap()
    }

    #[test]
    fn validate_lists_every_problem() {
        // Goal: a bad command line is refused with all its problems at once, and the defaults
        // are valid. Method: one line with five mistakes; the defaults; an open-loop line.
        assert!(parse(&[]).validate().is_ok());
        assert!(parse(&["--rate", "5000", "--skew", "0.99", "--scenario", "mixed"]).validate().is_ok());
        let problems = parse(&[
            "--addr",
            "10.0.0.1:50051",
            "--skew",
            "0",
            "--hot-skus",
            "5",
            "--rate",
            "0",
            "--mix",
            "atp=x",
        ])
        .validate()
        .unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }
}
