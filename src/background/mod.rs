//! Background work in bounded batches: reservation expiry, retention purges, gauge refresh.
//! Each task stops when the shutdown signal fires.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Core;

/// Terminal reservations and idempotency keys forgotten per purge at most.
const PURGE_BATCH_LEN_MAX: usize = 10_000;
/// How often gauges are refreshed.
const GAUGE_INTERVAL_MS: u64 = 1_000;

pub struct BackgroundOptions {
    pub expiry_sweep_interval_ms: u64,
    pub expiry_batch_len_max: usize,
    pub purge_interval_ms: u64,
    pub commit_queue_len_max: usize,
}

/// Starts the background tasks; they end when `stop` becomes true.
pub fn spawn(
    core: Arc<Core>,
    options: BackgroundOptions,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    {
        let core = core.clone();
        let batch = options.expiry_batch_len_max;
        tasks.push(every(options.expiry_sweep_interval_ms, stop.clone(), move || {
            // Drain what is due in bounded batches; a full batch means more may be waiting.
            while core.index.expire_due(batch) == batch {}
        }));
    }
    {
        let core = core.clone();
        tasks.push(every(options.purge_interval_ms, stop.clone(), move || {
            if let Err(error) = core.index.purge_expired_history(PURGE_BATCH_LEN_MAX) {
                tracing::warn!(%error, "retention purge skipped");
            }
        }));
    }
    {
        let capacity = options.commit_queue_len_max;
        tasks.push(every(GAUGE_INTERVAL_MS, stop, move || {
            let index = &core.index;
            metrics::gauge!("allot_positions").set(index.position_count() as f64);
            metrics::gauge!("allot_open_reservations").set(index.open_reservation_count() as f64);
            metrics::gauge!("allot_reservations").set(index.reservation_count() as f64);
            metrics::gauge!("allot_commit_queue_depth").set(index.wal().queued() as f64);
            metrics::gauge!("allot_commit_queue_capacity").set(capacity as f64);
            metrics::gauge!("allot_last_sequence").set(index.wal().last_sequence() as f64);
            metrics::gauge!("allot_watchers").set(core.feed.watchers() as f64);
            metrics::gauge!("allot_in_flight_requests").set(core.admission.in_flight() as f64);
        }));
    }
    tasks
}

/// Runs `work` on a blocking thread every `interval_ms` until `stop`.
fn every(
    interval_ms: u64,
    mut stop: watch::Receiver<bool>,
    work: impl Fn() + Send + Sync + 'static,
) -> JoinHandle<()> {
    let work = Arc::new(work);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_millis(interval_ms));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let work = work.clone();
            // The index work takes shard locks: keep it off the async workers.
            if tokio::task::spawn_blocking(move || work()).await.is_err() {
                return;
            }
        }
    })
}
