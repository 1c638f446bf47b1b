//! The gRPC edge: the only code that knows protobuf and `tonic::Status`. Each RPC parses its
//! request into a typed command once (naming the field and line of any problem), admits it
//! against the in-flight limit, calls the layer below, and maps the result to the wire.
//! One file per service; `errors.rs` holds the one exhaustive mapping to `Status`.

pub mod admin;
pub mod auth;
pub mod convert;
pub mod errors;
pub mod fulfilment;
pub mod inventory;
pub mod large;
pub mod orders;
pub mod oversize;
pub mod routing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

pub use errors::ServiceError;

use crate::events::{EventFeed, Feed};
use crate::index::Index;
use crate::metrics::{Rpc, RpcMetrics};
use crate::orders::OrderBook;
use crate::store::Store;

/// What every service handler shares.
pub struct Core {
    pub index: Arc<Index>,
    pub store: Arc<Store>,
    pub feed: Arc<Feed>,
    /// The order lifecycle (Orders and Fulfilment services).
    pub orders: Arc<OrderBook>,
    /// The event feed (WatchEvents).
    pub events: Arc<EventFeed>,
    pub admission: Admission,
    pub rpc_metrics: RpcMetrics,
    /// Items buffered per watch stream.
    pub watch_out_len_max: usize,
}

/// The in-flight request limit and the shutdown flag.
pub struct Admission {
    in_flight: AtomicUsize,
    in_flight_max: usize,
    shutting_down: AtomicBool,
}

/// Held for the duration of one request.
pub struct Permit<'a> {
    admission: &'a Admission,
    rpc: Rpc,
    started: Instant,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.admission.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(in_flight_max: usize) -> Self {
        Self { in_flight: AtomicUsize::new(0), in_flight_max, shutting_down: AtomicBool::new(false) }
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

impl Core {
    /// Admits one request or sheds it.
    pub fn admit(&self, rpc: Rpc) -> Result<Permit<'_>, tonic::Status> {
        let admission = &self.admission;
        let started = Instant::now();
        if admission.shutting_down.load(Ordering::Acquire) {
            let status = tonic::Status::from(ServiceError::ShuttingDown);
            self.rpc_metrics.observe(rpc, status.code(), started);
            return Err(status);
        }
        let before = admission.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= admission.in_flight_max {
            admission.in_flight.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("allot_shed_requests_total", "reason" => "in_flight").increment(1);
            let status = tonic::Status::from(ServiceError::Overloaded("too many requests in flight"));
            self.rpc_metrics.observe(rpc, status.code(), started);
            return Err(status);
        }
        Ok(Permit { admission, rpc, started })
    }

    /// Records the outcome of a request and converts errors to `Status`.
    pub fn finish<T>(
        &self,
        permit: Permit<'_>,
        result: Result<T, ServiceError>,
    ) -> Result<tonic::Response<T>, tonic::Status> {
        let result = result.map_err(tonic::Status::from);
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        };
        self.rpc_metrics.observe(permit.rpc, code, permit.started);
        // Request-level logging, at debug only (ALLOT_LOG=allot=debug): disabled, it costs one
        // callsite check.
        tracing::debug!(
            rpc = permit.rpc.name(),
            code = ?code,
            elapsed_us = permit.started.elapsed().as_micros() as u64,
            "request"
        );
        result.map(tonic::Response::new)
    }
}
