//! The report of a run, as text or as one JSON object (`--json`). The top-level keys
//! requests, errors, seconds, ops_per_second and p50_ms..max_ms keep their earlier meaning and
//! are unique in the object (loadtest/compare reads them with sed); items and reservations
//! are the reserve-batch counts. Must not import the drivers' internals beyond `Measured`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::drivers::Measured;
use crate::flags::{Flags, Scenario};
use crate::recorder::Recorded;
use crate::scenarios::Mix;

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |micros: u64| round3(micros as f64 / 1_000.0);
        Percentiles {
            p50: ms(histogram.value_at_quantile(0.5)),
            p90: ms(histogram.value_at_quantile(0.9)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: round3(histogram.mean() / 1_000.0),
        }
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            self.p50, self.p90, self.p99, self.p999, self.max, self.mean
        )
    }
}

#[derive(Debug, Serialize)]
pub struct OperationReport {
    pub calls: u64,
    pub calls_per_second: f64,
    pub latency_ms: Percentiles,
    pub errors_by_code: BTreeMap<String, u64>,
    pub outcomes: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct OpenLoopReport {
    pub rate_target: u64,
    pub scheduled: u64,
    pub sent: u64,
    pub dropped: u64,
    pub completed: u64,
    /// Completed requests per second of the recording window (drain included).
    pub achieved_rate: f64,
    /// achieved_rate / rate_target.
    pub achieved_fraction: f64,
    pub in_flight_max: usize,
    /// How late requests were sent after their due time: the generator's own lag (timer tick,
    /// task scheduling), which the latency figures include.
    pub send_lag_ms: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct BatchReport {
    pub batch_len: usize,
    pub calls_per_second: f64,
    /// Items answered, and of them RESERVED, INSUFFICIENT and errors by code.
    pub items: u64,
    pub reservations: u64,
    pub insufficient: u64,
    pub item_errors_by_code: BTreeMap<String, u64>,
    pub items_per_second: f64,
    pub reservations_per_second: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// "closed" or "open".
    pub mode: &'static str,
    pub rate_target: Option<u64>,
    pub concurrency: usize,
    /// reserve-stream: callers (lanes) per ReserveStream.
    pub callers_per_stream: Option<usize>,
    pub connections: usize,
    pub seed: u64,
    pub run_id: u64,
    /// "uniform", "zipf" or "hot".
    pub distribution: &'static str,
    pub skew: Option<f64>,
    pub hot_skus: Option<usize>,
    pub hot_fraction: Option<f64>,
    pub skus: usize,
    pub nodes: usize,
    pub lines: usize,
    pub mix: Option<String>,
    pub warmup_secs: u64,
    pub duration_secs: u64,
    /// Scenario requests recorded (a checkout is one request of two RPCs).
    pub requests: u64,
    /// Requests with at least one RPC error.
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// RPC errors of every kind, by gRPC code.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Answers that are not errors but not what the scenario wanted (INSUFFICIENT, ...).
    pub outcomes: BTreeMap<&'static str, u64>,
    /// Per RPC kind.
    pub operations: BTreeMap<&'static str, OperationReport>,
    pub open_loop: Option<OpenLoopReport>,
    pub reserve_batch: Option<BatchReport>,
    /// The generator's own CPU time (user + system, all threads) in the recorded window.
    pub client_cpu_seconds: Option<f64>,
    /// `client_cpu_seconds` per recorded request, in µs.
    pub client_cpu_us_per_request: Option<f64>,
}

fn round3(value: f64) -> f64 {
    (value * 1_000.0).round() / 1_000.0
}

/// `count / seconds`, 0 for an empty window (JSON has no NaN).
fn per_second(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { round3(count as f64 / seconds) } else { 0.0 }
}

impl Report {
    pub fn new(
        flags: &Flags,
        mix: &Mix,
        run_id: u64,
        measured: &Measured,
        client_cpu: Option<std::time::Duration>,
    ) -> Self {
        let recorded: &Recorded = &measured.recorded;
        let seconds = measured.elapsed.as_secs_f64();
        let requests = recorded.latency.len();
        let latency = Percentiles::of(&recorded.latency);
        let operations = recorded
            .operations
            .iter()
            .map(|(kind, stats)| {
                let calls = stats.latency.len();
                let report = OperationReport {
                    calls,
                    calls_per_second: per_second(calls, seconds),
                    latency_ms: Percentiles::of(&stats.latency),
                    errors_by_code: stats.errors_by_code.clone(),
                    outcomes: stats.outcomes.clone(),
                };
                (kind.name(), report)
            })
            .collect();
        let open_loop = measured.open_loop.map(|counts| {
            let achieved_rate = per_second(requests, seconds);
            OpenLoopReport {
                rate_target: counts.rate_target,
                scheduled: counts.scheduled,
                sent: counts.sent,
                dropped: counts.dropped,
                completed: requests,
                achieved_rate,
                achieved_fraction: round3(achieved_rate / counts.rate_target as f64),
                in_flight_max: counts.in_flight_max,
                send_lag_ms: Percentiles::of(&recorded.send_lag),
            }
        });
        let reserve_batch = recorded.batch.as_ref().map(|tally| BatchReport {
            batch_len: flags.batch,
            calls_per_second: per_second(requests, seconds),
            items: tally.items,
            reservations: tally.reserved,
            insufficient: tally.insufficient,
            item_errors_by_code: tally.errors_by_code.clone(),
            items_per_second: per_second(tally.items, seconds),
            reservations_per_second: per_second(tally.reserved, seconds),
        });
        let distribution = match (flags.skew, flags.hot_skus) {
            (Some(_), _) => "zipf",
            (None, Some(_)) => "hot",
            (None, None) => "uniform",
        };
        Report {
            scenario: flags.scenario.name(),
            mode: if flags.rate.is_some() { "open" } else { "closed" },
            rate_target: flags.rate,
            concurrency: flags.concurrency,
            callers_per_stream: (flags.scenario == Scenario::ReserveStream)
                .then_some(flags.callers_per_stream),
            connections: flags.connections,
            seed: flags.seed,
            run_id,
            distribution,
            skew: flags.skew,
            hot_skus: flags.hot_skus,
            hot_fraction: flags.hot_skus.map(|_| flags.hot_fraction),
            skus: flags.skus,
            nodes: flags.nodes,
            lines: flags.lines,
            mix: (flags.scenario == Scenario::Mixed).then(|| mix.describe()),
            warmup_secs: flags.warmup_secs,
            duration_secs: flags.duration_secs,
            requests,
            errors: recorded.failed,
            seconds: round3(seconds),
            ops_per_second: per_second(requests, seconds),
            p50_ms: latency.p50,
            p90_ms: latency.p90,
            p99_ms: latency.p99,
            p999_ms: latency.p999,
            max_ms: latency.max,
            mean_ms: latency.mean,
            errors_by_code: recorded.errors_by_code(),
            outcomes: recorded.outcomes(),
            operations,
            open_loop,
            reserve_batch,
            client_cpu_seconds: client_cpu.map(|cpu| round3(cpu.as_secs_f64())),
            client_cpu_us_per_request: client_cpu
                .filter(|_| requests > 0)
                .map(|cpu| round3(cpu.as_secs_f64() * 1e6 / requests as f64)),
        }
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report always serializes")
    }

    pub fn text(&self) -> String {
        let mut lines = Vec::new();
        let mode = match (self.rate_target, &self.open_loop) {
            (Some(rate), Some(open)) => format!(
                "open loop at {rate}/s ({} lanes, {} connections, in flight at most {})",
                self.concurrency, self.connections, open.in_flight_max
            ),
            _ => format!("closed loop ({} callers, {} connections)", self.concurrency, self.connections),
        };
        let mode = match self.callers_per_stream {
            Some(callers) => format!("{mode}, {callers} per ReserveStream"),
            None => mode,
        };
        let distribution = match (self.skew, self.hot_skus) {
            (Some(skew), _) => format!("Zipf s={skew} over {} SKUs", self.skus),
            (None, Some(hot_skus)) => format!(
                "{hot_skus} hot SKUs taking {:.1}% of {} SKUs",
                self.hot_fraction.unwrap_or_default() * 100.0,
                self.skus
            ),
            (None, None) => format!("uniform over {} SKUs", self.skus),
        };
        lines.push(format!(
            "scenario {}{}: {mode}; {distribution}, {} nodes; seed {}, run {}",
            self.scenario,
            self.mix.as_ref().map(|mix| format!(" [{mix}]")).unwrap_or_default(),
            self.nodes,
            self.seed,
            self.run_id
        ));
        if self.duration_secs == 0 {
            lines.push("no load (--duration-secs 0)".into());
            return lines.join("\n");
        }
        lines.push(format!(
            "{} requests in {:.2} s (after {} s warmup) = {:.0} requests/s",
            self.requests, self.seconds, self.warmup_secs, self.ops_per_second
        ));
        lines.push(format!(
            "latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms
        ));
        lines
            .push(format!("failed requests: {}; RPC errors by code: {:?}", self.errors, self.errors_by_code));
        if !self.outcomes.is_empty() {
            lines.push(format!("business outcomes: {:?}", self.outcomes));
        }
        if let (Some(seconds), Some(per_request)) = (self.client_cpu_seconds, self.client_cpu_us_per_request)
        {
            lines.push(format!(
                "generator CPU: {seconds:.3} s in the window, {per_request:.1} µs per request"
            ));
        }
        if let Some(open) = &self.open_loop {
            lines.push(format!(
                "open loop: target {}/s, achieved {:.0}/s ({:.1}%); scheduled {}, sent {}, dropped {} (in-flight cap), completed {}",
                open.rate_target,
                open.achieved_rate,
                open.achieved_fraction * 100.0,
                open.scheduled,
                open.sent,
                open.dropped,
                open.completed
            ));
            lines.push(format!("  send lag ms: {}", open.send_lag_ms.text()));
        }
        if let Some(batch) = &self.reserve_batch {
            lines.push(format!(
                "reserve-batch of {}: {:.0} calls/s, {:.0} items/s, {:.0} reservations/s; items {}: reserved {}, insufficient {}, errors {:?}",
                batch.batch_len,
                batch.calls_per_second,
                batch.items_per_second,
                batch.reservations_per_second,
                batch.items,
                batch.reservations,
                batch.insufficient,
                batch.item_errors_by_code
            ));
        }
        lines.push("per RPC (latency ms):".into());
        for (name, operation) in &self.operations {
            lines.push(format!(
                "  {name:<14}{:>9} calls {:>9.0}/s  {}",
                operation.calls,
                operation.calls_per_second,
                operation.latency_ms.text()
            ));
            if !operation.errors_by_code.is_empty() || !operation.outcomes.is_empty() {
                lines.push(format!(
                    "  {:<14}errors {:?}  outcomes {:?}",
                    "", operation.errors_by_code, operation.outcomes
                ));
            }
        }
        lines.join("\n")
    }
}
