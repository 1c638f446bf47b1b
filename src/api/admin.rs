//! `allot.v1.Admin`: operations on the daemon itself. Backup takes a RocksDB checkpoint
//! online, off the async workers.

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{invalid, timestamp};
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
        return Err(invalid(format!("dir: {raw:?} is not absolute (it is a path on the daemon's machine)")));
    }
    if dir.exists() {
        return Err(invalid(format!("dir: {raw:?} already exists; a backup goes into a new directory")));
    }
    match dir.parent() {
        Some(parent) if parent.is_dir() => Ok(dir),
        _ => Err(invalid(format!("dir: the parent of {raw:?} is not an existing directory"))),
    }
}

#[tonic::async_trait]
impl v1::admin_server::Admin for AdminApi {
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
