//! Prometheus metrics: the recorder, metric descriptions (HELP text, as promtool wants), the
//! per-RPC handles bound once, and the `/metrics` HTTP endpoint on its own port.
//! No SKU- or id-valued labels anywhere: label values come from small fixed sets.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Instant;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets: fine below a millisecond, where the targets are.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5,
];
const BATCH_BUCKETS: &[f64] =
    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// Every RPC, for label values and per-RPC handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    UpsertNodes,
    ListNodes,
    SetStock,
    AdjustStock,
    GetAvailability,
    Reserve,
    ReserveBatch,
    ReserveStream,
    ConfirmReservation,
    ExtendReservation,
    ReleaseReservation,
    GetReservation,
    WatchAvailability,
    Route,
    Allocate,
    CaptureOrder,
    GetOrder,
    ListOrders,
    ReleaseHold,
    CancelOrder,
    GetOrderHistory,
    WatchEvents,
    GetStats,
    ListFulfilmentOrders,
    ConfirmShipment,
    ReportShortage,
    ConfirmDelivery,
    CreateReturn,
    ReceiveReturn,
    Backup,
    Check,
}

impl Rpc {
    pub const ALL: [Rpc; 31] = [
        Rpc::UpsertNodes,
        Rpc::ListNodes,
        Rpc::SetStock,
        Rpc::AdjustStock,
        Rpc::GetAvailability,
        Rpc::Reserve,
        Rpc::ReserveBatch,
        Rpc::ReserveStream,
        Rpc::ConfirmReservation,
        Rpc::ExtendReservation,
        Rpc::ReleaseReservation,
        Rpc::GetReservation,
        Rpc::WatchAvailability,
        Rpc::Route,
        Rpc::Allocate,
        Rpc::CaptureOrder,
        Rpc::GetOrder,
        Rpc::ListOrders,
        Rpc::ReleaseHold,
        Rpc::CancelOrder,
        Rpc::GetOrderHistory,
        Rpc::WatchEvents,
        Rpc::GetStats,
        Rpc::ListFulfilmentOrders,
        Rpc::ConfirmShipment,
        Rpc::ReportShortage,
        Rpc::ConfirmDelivery,
        Rpc::CreateReturn,
        Rpc::ReceiveReturn,
        Rpc::Backup,
        Rpc::Check,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::UpsertNodes => "UpsertNodes",
            Rpc::ListNodes => "ListNodes",
            Rpc::SetStock => "SetStock",
            Rpc::AdjustStock => "AdjustStock",
            Rpc::GetAvailability => "GetAvailability",
            Rpc::Reserve => "Reserve",
            Rpc::ReserveBatch => "ReserveBatch",
            Rpc::ReserveStream => "ReserveStream",
            Rpc::ConfirmReservation => "ConfirmReservation",
            Rpc::ExtendReservation => "ExtendReservation",
            Rpc::ReleaseReservation => "ReleaseReservation",
            Rpc::GetReservation => "GetReservation",
            Rpc::WatchAvailability => "WatchAvailability",
            Rpc::Route => "Route",
            Rpc::Allocate => "Allocate",
            Rpc::CaptureOrder => "CaptureOrder",
            Rpc::GetOrder => "GetOrder",
            Rpc::ListOrders => "ListOrders",
            Rpc::ReleaseHold => "ReleaseHold",
            Rpc::CancelOrder => "CancelOrder",
            Rpc::GetOrderHistory => "GetOrderHistory",
            Rpc::WatchEvents => "WatchEvents",
            Rpc::GetStats => "GetStats",
            Rpc::ListFulfilmentOrders => "ListFulfilmentOrders",
            Rpc::ConfirmShipment => "ConfirmShipment",
            Rpc::ReportShortage => "ReportShortage",
            Rpc::ConfirmDelivery => "ConfirmDelivery",
            Rpc::CreateReturn => "CreateReturn",
            Rpc::ReceiveReturn => "ReceiveReturn",
            Rpc::Backup => "Backup",
            Rpc::Check => "Check",
        }
    }
}

/// gRPC codes 0..=16.
const CODE_COUNT: usize = 17;

fn code_name(code: usize) -> &'static str {
    [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ][code]
}

struct RpcHandles {
    requests: Vec<Counter>,
    duration: Histogram,
}

/// Per-RPC counters (by code) and latency histograms, bound once at start-up so the hot path
/// does no registry lookup.
pub struct RpcMetrics {
    handles: Vec<RpcHandles>,
    /// Reserve decisions: RESERVED and INSUFFICIENT.
    pub reserved: Counter,
    pub insufficient: Counter,
}

impl Default for RpcMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RpcMetrics {
    pub fn new() -> Self {
        let handles = Rpc::ALL
            .iter()
            .map(|rpc| RpcHandles {
                requests: (0..CODE_COUNT)
                    .map(|code| metrics::counter!("allot_grpc_requests_total", "rpc" => rpc.name(), "code" => code_name(code)))
                    .collect(),
                duration: metrics::histogram!("allot_grpc_request_duration_seconds", "rpc" => rpc.name()),
            })
            .collect();
        Self {
            handles,
            reserved: metrics::counter!("allot_reserve_outcomes_total", "outcome" => "reserved"),
            insufficient: metrics::counter!("allot_reserve_outcomes_total", "outcome" => "insufficient"),
        }
    }

    pub fn observe(&self, rpc: Rpc, code: tonic::Code, started: Instant) {
        let handles = &self.handles[rpc as usize];
        handles.requests[(code as usize).min(CODE_COUNT - 1)].increment(1);
        handles.duration.record(started.elapsed().as_secs_f64());
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (several in-process servers in tests share it).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .expect("non-empty buckets")
                .set_buckets_for_metric(Matcher::Full("allot_commit_batch_mutations".into()), BATCH_BUCKETS)
                .expect("non-empty buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (an embedding program's).
            let _ = metrics::set_global_recorder(recorder);
            describe();
            register_at_zero();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("allot_grpc_requests_total", "gRPC requests answered, by RPC and status code.");
    describe_histogram!(
        "allot_grpc_request_duration_seconds",
        Unit::Seconds,
        "gRPC request latency, by RPC."
    );
    describe_counter!(
        "allot_reserve_outcomes_total",
        "Reserve decisions, by outcome (reserved, insufficient)."
    );
    describe_histogram!(
        "allot_commit_fsync_seconds",
        Unit::Seconds,
        "Time to write one group commit to the journal and make it durable (fsync or write-through)."
    );
    describe_histogram!(
        "allot_commit_apply_seconds",
        Unit::Seconds,
        "Time to apply one durable group commit to RocksDB (memtables; a write stall shows here)."
    );
    describe_histogram!("allot_commit_batch_mutations", "Mutations per group commit.");
    describe_gauge!("allot_commit_queue_depth", "Mutations waiting for the commit thread.");
    describe_gauge!("allot_commit_queue_capacity", "Mutations the commit queue holds before shedding.");
    describe_gauge!("allot_positions", "Stock positions (SKU x node) in the index.");
    describe_gauge!(
        "allot_disk_free_bytes",
        Unit::Bytes,
        "Free space of the data directory's file system, as last measured."
    );
    describe_gauge!(
        "allot_disk_free_min_bytes",
        Unit::Bytes,
        "store.disk_free_min_bytes: below it every write is refused."
    );
    describe_counter!(
        "allot_accept_errors_total",
        "Failed accepts on the gRPC port (e.g. out of file descriptors); each waits 50 ms."
    );
    describe_counter!(
        "allot_large_requests_total",
        "Requests of 256 KiB or more; they are decoded and handled one at a time."
    );
    describe_gauge!(
        "allot_disk_writes_refused",
        "1 while writes are refused for lack of disk space, else 0."
    );
    describe_gauge!("allot_open_reservations", "Reservations holding units (HELD or CONFIRMED).");
    describe_gauge!("allot_reservations", "Reservations in memory, terminal ones included.");
    describe_counter!("allot_reservations_expired_total", "Reservations expired by their TTL.");
    describe_counter!(
        "allot_shed_requests_total",
        "Requests refused with RESOURCE_EXHAUSTED to shed load, by reason."
    );
    describe_counter!("allot_watch_dropped_total", "Watch streams ended because the consumer fell behind.");
    describe_gauge!("allot_watchers", "Open WatchAvailability streams.");
    describe_gauge!("allot_in_flight_requests", "Requests being processed.");
    describe_gauge!("allot_last_sequence", "Sequence number of the last durable availability change.");
    describe_counter!("allot_orders_captured_total", "Orders captured (replays not counted).");
    describe_counter!("allot_shipments_total", "Shipments confirmed (replays not counted).");
    describe_counter!("allot_backorder_retries_total", "Backordered orders re-routed by the retry.");
    describe_gauge!("allot_orders", "Orders in each status, every channel.");
    describe_gauge!("allot_channel_orders", "Orders in each status, per channel.");
    describe_gauge!("allot_backordered_orders", "Orders with units waiting for stock.");
    describe_gauge!("allot_order_fill_rate", "Units shipped or allocated / units ordered and not cancelled.");
    describe_gauge!(
        "allot_order_split_rate",
        "Routed orders with more than one fulfilment order / routed orders."
    );
    describe_gauge!("allot_order_backorder_rate", "Orders that ever had a backordered unit / routed orders.");
    describe_gauge!("allot_order_return_rate", "Units returned / units shipped.");
    describe_gauge!("allot_order_perfect_rate", "Perfect orders / delivered orders.");
    describe_gauge!("allot_order_cycle_time_p50_seconds", "Capture to fully shipped, median.");
    describe_gauge!("allot_order_cycle_time_p95_seconds", "Capture to fully shipped, 95th percentile.");
    describe_gauge!("allot_event_watchers", "Open WatchEvents streams.");
    describe_gauge!(
        "allot_consistency_drift",
        "Drifted positions plus broken invariants found by the last consistency check (0 = clean)."
    );
    describe_counter!("allot_consistency_checks_total", "Consistency checks run.");
    describe_histogram!("allot_consistency_check_seconds", Unit::Seconds, "Time one consistency check took.");
    describe_gauge!("allot_last_event_sequence", "Sequence number of the last durable event.");
}

/// Metrics otherwise created on their first event, so that a fresh daemon already exports
/// every series that dashboards and alerts query (and `rate()` starts from a known zero).
fn register_at_zero() {
    for reason in ["commit_queue", "in_flight", "message_too_large"] {
        metrics::counter!("allot_shed_requests_total", "reason" => reason).increment(0);
    }
    metrics::counter!("allot_watch_dropped_total", "reason" => "lagged").increment(0);
    metrics::counter!("allot_reservations_expired_total").increment(0);
    metrics::counter!("allot_orders_captured_total").increment(0);
    metrics::counter!("allot_shipments_total").increment(0);
    metrics::counter!("allot_backorder_retries_total").increment(0);
    metrics::counter!("allot_consistency_checks_total").increment(0);
    metrics::gauge!("allot_consistency_drift").set(0.0);
    let _ = metrics::histogram!("allot_commit_fsync_seconds");
    let _ = metrics::histogram!("allot_commit_apply_seconds");
    let _ = metrics::histogram!("allot_commit_batch_mutations");
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                handle.run_upkeep();
                ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render())
            }
        }),
    );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// The bound address, for the log line.
pub fn describe_address(address: SocketAddr) -> String {
    format!("http://{address}/metrics")
}
