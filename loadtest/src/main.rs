//! allot-load: drives a running allotd over gRPC and reports throughput and latency.
//!
//! Closed loop (`--concurrency` callers) or open loop (`--rate` arrivals per second, latency
//! from the intended send time); scenarios from one RPC to a whole checkout, a mixed blend and
//! ReserveBatch; uniform, Zipf or hot-set SKU choice reproducible by `--seed`. Bounded by
//! `--duration-secs` and `--requests-max`; it stops by itself. Loopback addresses only.
//!
//! Layout: `flags` (command line), `keys` (SKU distributions), `schedule` (open-loop
//! arithmetic), `scenarios` (what a request sends), `drivers` (closed and open loop),
//! `recorder` (histograms and counts), `report` (text and JSON), `setup` (the data set),
//! `streams` (the ReserveStreams that callers share).

mod cpu;
mod drivers;
mod flags;
mod keys;
mod recorder;
mod report;
mod scenarios;
mod schedule;
mod setup;
mod streams;

/// mimalloc, as in allotd: the generator shares the cores with the daemon it measures, so
/// every cycle it spends on glibc malloc's bins is one the daemon does not get.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tonic::transport::{Channel, Endpoint};

use crate::drivers::{Measured, Window};
use crate::flags::Flags;
use crate::keys::SkuPicker;
use crate::recorder::Recorded;
use crate::report::Report;
use crate::scenarios::Workload;

/// Requests a connection may queue before the HTTP/2 layer takes them; the open loop sizes it
/// from --in-flight-max so that the generator, not tonic's default buffer, is the bound.
const CHANNEL_BUFFER_MIN: usize = 1_024;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flags = Flags::parse();
    let mix = match flags.validate() {
        Ok(mix) => mix,
        Err(problems) => return Err(problems.join("\n").into()),
    };
    let run_id = flags.run_id.unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|since| since.as_millis() as u64).unwrap_or_default()
    });
    let buffer_len = if flags.rate.is_some() {
        (flags.in_flight_max / flags.connections).max(CHANNEL_BUFFER_MIN)
    } else {
        CHANNEL_BUFFER_MIN
    };
    let endpoint =
        Endpoint::from_shared(format!("http://{}", flags.addr))?.tcp_nodelay(true).buffer_size(buffer_len);
    let mut channels: Vec<Channel> = Vec::with_capacity(flags.connections);
    for _ in 0..flags.connections {
        channels.push(endpoint.connect().await?);
    }
    if flags.setup {
        setup::setup(&channels[0], &flags).await?;
    }
    let picker = match (flags.skew, flags.hot_skus) {
        (Some(skew), _) => SkuPicker::zipf(flags.skus, skew),
        (None, Some(hot_skus)) => SkuPicker::hot(flags.skus, hot_skus, flags.hot_fraction),
        (None, None) => SkuPicker::uniform(flags.skus),
    };
    let workload = Arc::new(Workload {
        scenario: flags.scenario,
        picker,
        nodes: flags.nodes,
        lines: flags.lines,
        batch_len: flags.batch,
        ttl_ms: flags.ttl_ms,
        mix: mix.clone(),
        // None is opened until a reserve-stream request needs it.
        streams: streams::StreamPool::new(flags.concurrency, flags.callers_per_stream),
        key_prefix: format!("load-{}-{run_id}", flags.seed),
        timeout: Duration::from_millis(flags.timeout_ms),
    });
    let mut client_cpu = None;
    let measured = if flags.duration_secs == 0 {
        // Setup only (or nothing): no warmup either.
        Measured { recorded: Recorded::new(), elapsed: Duration::ZERO, open_loop: None }
    } else {
        let window = Window::new(
            Instant::now(),
            Duration::from_secs(flags.warmup_secs),
            Duration::from_secs(flags.duration_secs),
            flags.requests_max,
        );
        let cpu_window = cpu::CpuWindow::start_at(window.measure_start);
        let measured = match flags.rate {
            None => {
                drivers::closed_loop::run(workload, &channels, flags.concurrency, flags.seed, window).await?
            }
            Some(rate) => {
                let settings = drivers::open_loop::Settings {
                    lanes: flags.concurrency,
                    seed: flags.seed,
                    rate,
                    in_flight_max: flags.in_flight_max,
                };
                drivers::open_loop::run(workload, &channels, settings, window).await
            }
        };
        // The drivers return once the last recorded answer is in: the same window as `elapsed`.
        client_cpu = cpu_window.finish();
        measured
    };
    let report = Report::new(&flags, &mix, run_id, &measured, client_cpu);
    // An error, not a panic, when stdout is gone (e.g. piped into `head`).
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", if flags.json { report.json() } else { report.text() })?;
    Ok(())
}
