//! Background work in bounded batches: reservation expiry, retention purges, gauge refresh.
//! Each task stops when the shutdown signal fires.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::Core;
use crate::store::DiskGuard;

/// Terminal reservations and idempotency keys forgotten per purge mutation at most.
const PURGE_BATCH_LEN_MAX: usize = 10_000;
/// How often gauges are refreshed.
const GAUGE_INTERVAL_MS: u64 = 1_000;
/// Drifted positions and problems a background check logs at most.
const CONSISTENCY_LISTED_MAX: usize = 10;
/// How often the order KPI gauges are recomputed (a scan of every order).
const ORDER_GAUGE_INTERVAL_MS: u64 = 10_000;

pub struct BackgroundOptions {
    pub expiry_sweep_interval_ms: u64,
    pub expiry_batch_len_max: usize,
    pub purge_interval_ms: u64,
    pub commit_queue_len_max: usize,
    pub idempotency_retention_ms: u64,
    pub backorder_retry_interval_ms: u64,
    pub backorder_retry_batch_len_max: usize,
    pub backorder_full_pass_interval_ms: u64,
    pub consistency_check_interval_ms: u64,
    pub disk_check_interval_ms: u64,
}

/// Starts the background tasks; they end when `stop` becomes true.
pub fn spawn(
    core: Arc<Core>,
    options: BackgroundOptions,
    disk_guard: Arc<DiskGuard>,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    // Free space of the data directory: below the minimum, writers are refused at admission
    // (statvfs is one short system call).
    tasks.push(every(options.disk_check_interval_ms, stop.clone(), move || {
        if let Err(error) = disk_guard.measure() {
            tracing::warn!(%error, "measuring the data directory's free space failed");
        }
    }));
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
        let options_idempotency_retention_ms = options.idempotency_retention_ms;
        tasks.push(every(options.purge_interval_ms, stop.clone(), move || {
            loop {
                match core.index.purge_expired_history(PURGE_BATCH_LEN_MAX) {
                    Ok(handled) if handled == PURGE_BATCH_LEN_MAX => {
                        // Each batch durable before the next: a backlog (a long retention
                        // ending at once) never becomes one huge group commit.
                        if let Ok(durable) = core.index.durable_barrier() {
                            let _ = durable.blocking_recv();
                        }
                    }
                    Ok(_) => break,
                    Err(error) => {
                        tracing::warn!(%error, "retention purge skipped");
                        break;
                    }
                }
            }
            let cutoff_ms = core.index.clock().now_ms().saturating_sub(options_idempotency_retention_ms);
            if let Err(error) = core.orders.purge_idempotency(cutoff_ms, PURGE_BATCH_LEN_MAX) {
                tracing::warn!(%error, "order idempotency purge skipped");
            }
            let retention_ms = core.orders.rules().closed_order_retention_ms;
            if retention_ms > 0 {
                let cutoff_ms = core.index.clock().now_ms().saturating_sub(retention_ms);
                if let Err(error) = core.orders.purge_closed_orders(cutoff_ms, PURGE_BATCH_LEN_MAX) {
                    tracing::warn!(%error, "closed order purge skipped");
                }
            }
        }));
    }
    {
        // Backorders: re-route orders waiting for a SKU whose ATP rose, oldest first, in
        // bounded batches; every full-pass interval, every backorder whatever moved (capacity
        // resets at the start of a capacity day without any stock change).
        let core = core.clone();
        let batch = options.backorder_retry_batch_len_max;
        let full_pass_every =
            (options.backorder_full_pass_interval_ms / options.backorder_retry_interval_ms).max(1);
        let passes = parking_lot::Mutex::new(BackorderPasses::default());
        tasks.push(every(options.backorder_retry_interval_ms, stop.clone(), move || {
            let mut passes = passes.lock();
            passes.tick += 1;
            passes.note(core.index.take_risen().map_or(Due::All, Due::Skus));
            if passes.tick.is_multiple_of(full_pass_every) {
                passes.note(Due::All);
            }
            if core.orders.backordered_count() == 0 {
                passes.current = None;
                passes.next = Due::Nothing;
                return;
            }
            if passes.current.is_none() {
                passes.current = match std::mem::replace(&mut passes.next, Due::Nothing) {
                    Due::Nothing => return,
                    Due::Skus(skus) if skus.is_empty() => return,
                    Due::Skus(skus) => Some((Some(skus), 0)),
                    Due::All => Some((None, 0)),
                };
            }
            let (filter, after) = passes.current.as_ref().expect("set above");
            let (changed, resume) = core.orders.retry_backorders(filter.as_ref(), *after, batch);
            match resume {
                Some(after) => passes.current.as_mut().expect("set above").1 = after,
                None => passes.current = None,
            }
            if changed > 0 {
                metrics::counter!("allot_backorder_retries_total").increment(changed as u64);
            }
        }));
    }
    {
        let core = core.clone();
        tasks.push(every(ORDER_GAUGE_INTERVAL_MS, stop.clone(), move || {
            let stats = core.orders.stats(None);
            for status in crate::domain::OrderStatus::ALL {
                let count = stats.by_status.iter().find(|(s, _)| *s == status).map_or(0, |(_, count)| *count);
                metrics::gauge!("allot_orders", "status" => status.name()).set(count as f64);
            }
            let rates = [
                ("allot_order_fill_rate", stats.fill_rate),
                ("allot_order_split_rate", stats.split_rate),
                ("allot_order_backorder_rate", stats.backorder_rate),
                ("allot_order_return_rate", stats.return_rate),
                ("allot_order_perfect_rate", stats.perfect_order_rate),
                ("allot_order_cycle_time_p50_seconds", stats.cycle_time_p50_seconds),
                ("allot_order_cycle_time_p95_seconds", stats.cycle_time_p95_seconds),
            ];
            for (name, value) in rates {
                metrics::gauge!(name).set(value);
            }
            // Channels are few (web, marketplace, POS, B2B): a bounded label.
            for (channel, stats) in core.orders.stats_by_channel() {
                // Every status, zeros included: a status an order left must drop to 0.
                for status in crate::domain::OrderStatus::ALL {
                    let count = stats.by_status.iter().find(|(s, _)| *s == status).map_or(0, |(_, count)| *count);
                    metrics::gauge!("allot_channel_orders", "status" => status.name(), "channel" => channel.to_string())
                        .set(count as f64);
                }
            }
            metrics::gauge!("allot_backordered_orders").set(core.orders.backordered_count() as f64);
            metrics::gauge!("allot_event_watchers").set(core.events.watchers() as f64);
            metrics::gauge!("allot_last_event_sequence").set(core.index.wal().last_event_sequence() as f64);
        }));
    }
    if options.consistency_check_interval_ms > 0 {
        let core = core.clone();
        let interval_ms = options.consistency_check_interval_ms;
        let first = std::sync::atomic::AtomicBool::new(true);
        tasks.push(every(interval_ms, stop.clone(), move || {
            // The interval's first tick is immediate: skip it, start-up has enough to do.
            if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let _ = crate::api::admin::run_check(&core, CONSISTENCY_LISTED_MAX);
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

/// What the next backorder pass must look at.
#[derive(Default)]
enum Due {
    #[default]
    Nothing,
    /// Orders waiting for these SKUs (their ATP rose).
    Skus(std::collections::HashSet<crate::domain::Sku>),
    /// Every backordered order.
    All,
}

/// The backorder retry's progress: the pass under way (its SKU filter, `None` = all, and the
/// last order id done) and what the next pass must cover (what rose meanwhile).
#[derive(Default)]
struct BackorderPasses {
    tick: u64,
    current: Option<(Option<std::collections::HashSet<crate::domain::Sku>>, u64)>,
    next: Due,
}

impl BackorderPasses {
    fn note(&mut self, due: Due) {
        self.next = match (std::mem::take(&mut self.next), due) {
            (Due::All, _) | (_, Due::All) => Due::All,
            (Due::Nothing, due) => due,
            (due, Due::Nothing) => due,
            (Due::Skus(mut skus), Due::Skus(more)) => {
                skus.extend(more);
                Due::Skus(skus)
            }
        };
    }
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
