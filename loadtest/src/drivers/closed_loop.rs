//! Closed loop: `--concurrency` callers over `--connections` connections, each sending its
//! next request as soon as the previous one answered. Offered load adapts to the server, so
//! latency is measured from each actual send.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tonic::transport::Channel;

use super::{Measured, Window, stream_rng};
use crate::recorder::Recorder;
use crate::scenarios::{Clients, Lane, Workload, execute};

pub async fn run(
    workload: Arc<Workload>,
    channels: &[Channel],
    concurrency: usize,
    seed: u64,
    window: Window,
) -> Result<Measured, tokio::task::JoinError> {
    assert!(concurrency > 0 && !channels.is_empty());
    let recorder = Arc::new(Recorder::new());
    let recorded_count = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::with_capacity(concurrency);
    for caller in 0..concurrency {
        let mut clients = Clients::new(channels[caller % channels.len()].clone());
        let (workload, recorder, recorded_count) =
            (workload.clone(), recorder.clone(), recorded_count.clone());
        callers.push(tokio::spawn(async move {
            let lane = Lane::new(caller);
            let mut rng = stream_rng(seed, caller as u64);
            let mut sequence = 0u64;
            loop {
                let started = Instant::now();
                if started >= window.end {
                    break;
                }
                let measured = started >= window.measure_start;
                if measured
                    && window.requests_max > 0
                    && recorded_count.fetch_add(1, Ordering::Relaxed) >= window.requests_max
                {
                    break;
                }
                sequence += 1;
                let iteration = execute(&workload, &lane, &mut clients, &mut rng, sequence, started).await;
                if measured {
                    recorder.record(caller, &iteration, None);
                }
            }
        }));
    }
    for caller in callers {
        caller.await?;
    }
    let elapsed = window.measure_start.elapsed();
    Ok(Measured { recorded: recorder.merged(), elapsed, open_loop: None })
}
