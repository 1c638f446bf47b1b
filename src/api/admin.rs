//! `allot.v1.Admin`: operations on the daemon itself. Backup takes a RocksDB checkpoint
//! online, off the async workers.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{invalid, quoted, timestamp};
use super::{Core, ServiceError};
use crate::index::IndexError;
use crate::metrics::Rpc;
use crate::proto::v1;

pub struct AdminApi {
    core: Arc<Core>,
}

impl AdminApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

/// An absolute directory that does not exist yet, under an existing parent.
fn backup_dir(raw: &str) -> Result<PathBuf, ServiceError> {
    if raw.is_empty() {
        return Err(invalid("dir: must not be empty"));
    }
    if raw.chars().any(char::is_control) || raw.len() > 4_096 {
        return Err(invalid("dir: not a usable path"));
    }
    let dir = PathBuf::from(raw);
    if !dir.is_absolute() {
        return Err(invalid(format!(
            "dir: {} is not absolute (it is a path on the daemon's machine)",
            quoted(raw)
        )));
    }
    if dir.exists() {
        return Err(invalid(format!(
            "dir: {} already exists; a backup goes into a new directory",
            quoted(raw)
        )));
    }
    match dir.parent() {
        Some(parent) if parent.is_dir() => Ok(dir),
        _ => Err(invalid(format!("dir: the parent of {} is not an existing directory", quoted(raw)))),
    }
}

/// Drifted positions and problems a Check lists by default.
const CHECK_LISTED_DEFAULT: usize = 100;
const CHECK_LISTED_MAX: usize = 10_000;

/// Runs the index and order-book checks (blocking: call off the async workers).
pub fn run_check(core: &Core, listed_max: usize) -> (crate::index::ConsistencyReport, u64) {
    let started = std::time::Instant::now();
    let mut report = core.index.check_consistency(listed_max);
    core.orders.check_consistency(&mut report, listed_max);
    let elapsed_us = started.elapsed().as_micros() as u64;
    metrics::counter!("allot_consistency_checks_total").increment(1);
    metrics::gauge!("allot_consistency_drift").set((report.drift_count + report.problems.len()) as f64);
    metrics::histogram!("allot_consistency_check_seconds").record(elapsed_us as f64 / 1e6);
    if !report.is_clean() {
        tracing::error!(
            drift = report.drift_count,
            problems = report.problems.len(),
            first_problem = report.problems.first().map(String::as_str).unwrap_or(""),
            "consistency check found drift"
        );
    }
    (report, elapsed_us)
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminApi {
    async fn check(&self, request: Request<v1::CheckRequest>) -> Result<Response<v1::CheckResponse>, Status> {
        let permit = self.core.admit(Rpc::Check)?;
        let result = async {
            let listed_max = match request.get_ref().listed_max as usize {
                0 => CHECK_LISTED_DEFAULT,
                asked => asked.min(CHECK_LISTED_MAX),
            };
            let core = self.core.clone();
            let (report, elapsed_us) = tokio::task::spawn_blocking(move || run_check(&core, listed_max))
                .await
                .map_err(|error| ServiceError::Internal(error.to_string()))?;
            Ok(v1::CheckResponse {
                clean: report.is_clean(),
                positions_checked: report.positions_checked as u64,
                reservations_checked: report.reservations_checked as u64,
                orders_checked: report.orders_checked as u64,
                drift_count: report.drift_count as u64,
                drift: report
                    .drift
                    .iter()
                    .map(|drift| v1::check_response::Drift {
                        sku: drift.sku.to_string(),
                        node_id: drift.node_id.to_string(),
                        reserved: drift.reserved,
                        held: drift.held,
                    })
                    .collect(),
                problems: report.problems,
                elapsed_us,
            })
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn backup(
        &self,
        request: Request<v1::BackupRequest>,
    ) -> Result<Response<v1::BackupResponse>, Status> {
        let permit = self.core.admit(Rpc::Backup)?;
        let result = async {
            let dir = backup_dir(&request.get_ref().dir)?;
            // Everything acknowledged before the call is in the store once this resolves.
            let barrier = self.core.index.durable_barrier()?;
            barrier.await.map_err(|_| ServiceError::ShuttingDown)?;
            let last_sequence = self.core.index.wal().last_sequence();
            let last_event_sequence = self.core.index.wal().last_event_sequence();
            let taken_at_ms = self.core.index.clock().now_ms();
            let store = self.core.store.clone();
            let target = dir.clone();
            let (files, bytes) = tokio::task::spawn_blocking(move || store.checkpoint(&target))
                .await
                .map_err(|error| ServiceError::Internal(error.to_string()))?
                .map_err(|error| {
                    ServiceError::Index(IndexError::FailedPrecondition(format!(
                        "the checkpoint could not be written to {}: {error}",
                        dir.display()
                    )))
                })?;
            tracing::info!(dir = %dir.display(), files, bytes, last_sequence, last_event_sequence, "backup taken");
            Ok(v1::BackupResponse {
                dir: dir.display().to_string(),
                last_sequence,
                last_event_sequence,
                files,
                bytes,
                taken_at: Some(timestamp(taken_at_ms)),
            })
        }
        .await;
        self.core.finish(permit, result)
    }
}
