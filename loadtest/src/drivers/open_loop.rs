//! Open loop: request i is due at start + i / `--rate`, whether or not earlier ones answered,
//! and runs in a task of its own. At most `--in-flight-max` run at once: a request due while
//! the cap is reached is dropped and counted, never sent (no silent queue). Latency is
//! measured from the request's due time, so a server (or generator) that falls behind shows
//! it in the percentiles instead of hiding it (no coordinated omission).

use std::sync::Arc;
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::{Measured, Window, stream_rng};
use crate::recorder::Recorder;
use crate::scenarios::{Clients, Lane, Workload, execute};
use crate::schedule::Schedule;

/// The open-loop bookkeeping of the recorded part of a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub rate_target: u64,
    /// Requests due in the recording window (the target rate times its length, or fewer if
    /// --requests-max ended it).
    pub scheduled: u64,
    pub sent: u64,
    /// Due while --in-flight-max requests were in flight: never sent.
    pub dropped: u64,
    pub in_flight_max: usize,
}

pub struct Settings {
    pub lanes: usize,
    pub seed: u64,
    pub rate: u64,
    pub in_flight_max: usize,
}

pub async fn run(
    workload: Arc<Workload>,
    channels: &[Channel],
    settings: Settings,
    window: Window,
) -> Measured {
    assert!(settings.lanes > 0 && settings.in_flight_max > 0 && !channels.is_empty());
    let recorder = Arc::new(Recorder::new());
    let in_flight = Arc::new(Semaphore::new(settings.in_flight_max));
    let lanes: Vec<(Arc<Lane>, Clients)> = (0..settings.lanes)
        .map(|lane| (Arc::new(Lane::new(lane)), Clients::new(channels[lane % channels.len()].clone())))
        .collect();
    let dispatcher = Dispatcher {
        runtime: Handle::current(),
        workload,
        recorder: recorder.clone(),
        in_flight: in_flight.clone(),
        lanes,
        settings,
        window,
    };
    let counts =
        tokio::task::spawn_blocking(move || dispatcher.run()).await.expect("the dispatcher never panics");
    // Every permit back = every request answered (each RPC is bounded by --timeout-ms).
    let all = u32::try_from(counts.in_flight_max).expect("validated in-flight limit");
    drop(in_flight.acquire_many(all).await.expect("the semaphore is never closed"));
    let elapsed = window.measure_start.elapsed();
    Measured { recorded: recorder.merged(), elapsed, open_loop: Some(counts) }
}

/// Sends the requests on time from a thread of its own: `std::thread::sleep` wakes within
/// tens of µs where the runtime's timer rounds up to the next ms, and every µs of dispatch
/// lag counts in the latency.
struct Dispatcher {
    runtime: Handle,
    workload: Arc<Workload>,
    recorder: Arc<Recorder>,
    in_flight: Arc<Semaphore>,
    lanes: Vec<(Arc<Lane>, Clients)>,
    settings: Settings,
    window: Window,
}

impl Dispatcher {
    fn run(self) -> Counts {
        let Dispatcher { runtime, workload, recorder, in_flight, lanes, settings, window } = self;
        let schedule = Schedule::new(settings.rate);
        // Requests 0..measured_from are the warmup; measured_from..end_index are recorded.
        let measured_from = schedule.due_before(window.measure_start - window.start);
        let mut end_index = schedule.due_before(window.end - window.start);
        if window.requests_max > 0 {
            end_index = end_index.min(measured_from.saturating_add(window.requests_max));
        }
        let mut counts = Counts {
            rate_target: settings.rate,
            scheduled: end_index.saturating_sub(measured_from),
            in_flight_max: settings.in_flight_max,
            ..Counts::default()
        };
        for index in 0..end_index {
            let due = window.start + schedule.due(index);
            let measured = index >= measured_from;
            let early = due.saturating_duration_since(Instant::now());
            if !early.is_zero() {
                std::thread::sleep(early);
            }
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                counts.dropped += u64::from(measured);
                continue;
            };
            counts.sent += u64::from(measured);
            let (lane, clients) = &lanes[(index % settings.lanes as u64) as usize];
            let (lane, mut clients, workload, recorder) =
                (lane.clone(), clients.clone(), workload.clone(), recorder.clone());
            let seed = settings.seed;
            runtime.spawn(async move {
                let send_lag = due.elapsed();
                let mut rng = stream_rng(seed, index);
                let iteration = execute(&workload, &lane, &mut clients, &mut rng, index, due).await;
                if measured {
                    recorder.record(lane.index, &iteration, Some(send_lag));
                }
                drop(permit);
            });
        }
        counts
    }
}
