//! The disk-space guard. A write that fails in the commit thread stops the daemon (memory is
//! already ahead of disk by then), so a full disk must be seen before it: a background task
//! measures the data directory's file system, and while its free space is below
//! `store.disk_free_min_bytes` every writer is refused at admission (`WalHandle::try_slot`),
//! before any state changes. Reads go on; writes resume as soon as space returns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Free bytes while writes are allowed are not tracked: `u64::MAX` means "fine".
const FINE: u64 = u64::MAX;

#[derive(Debug)]
pub struct DiskGuard {
    path: PathBuf,
    free_min_bytes: u64,
    /// The free bytes last measured when below the minimum, else `FINE`.
    low_free_bytes: AtomicU64,
}

/// Why a writer was refused: the free space measured and the configured minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskLow {
    pub free_bytes: u64,
    pub free_min_bytes: u64,
}

impl DiskGuard {
    /// A guard for the file system holding `path`; `free_min_bytes` 0 never refuses.
    pub fn new(path: &Path, free_min_bytes: u64) -> DiskGuard {
        DiskGuard { path: path.to_path_buf(), free_min_bytes, low_free_bytes: AtomicU64::new(FINE) }
    }

    /// Measures the free space (for unprivileged writers: `f_bavail`), updates the state and
    /// the gauges, logs a change of state, and returns the free bytes.
    pub fn measure(&self) -> std::io::Result<u64> {
        let stat = rustix::fs::statvfs(&self.path).map_err(std::io::Error::from)?;
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        self.record(free);
        Ok(free)
    }

    /// Applies one measurement (separate from `measure` for the unit test).
    fn record(&self, free: u64) {
        // Every gauge on every measurement: the first ones may precede the metrics recorder.
        let low = free < self.free_min_bytes;
        metrics::gauge!("allot_disk_free_bytes").set(free as f64);
        metrics::gauge!("allot_disk_free_min_bytes").set(self.free_min_bytes as f64);
        metrics::gauge!("allot_disk_writes_refused").set(if low { 1.0 } else { 0.0 });
        let before = self.low_free_bytes.swap(if low { free } else { FINE }, Ordering::AcqRel);
        match (before != FINE, low) {
            (false, true) => {
                tracing::error!(
                    path = %self.path.display(),
                    free_bytes = free,
                    free_min_bytes = self.free_min_bytes,
                    "disk space low: refusing every write until space returns (reads go on)"
                );
            }
            (true, false) => {
                tracing::warn!(free_bytes = free, "disk space is back: writes resume");
            }
            _ => {}
        }
    }

    /// Some(..) while writes are refused.
    pub fn refusal(&self) -> Option<DiskLow> {
        let free = self.low_free_bytes.load(Ordering::Acquire);
        (free != FINE).then_some(DiskLow { free_bytes: free, free_min_bytes: self.free_min_bytes })
    }
}

impl std::fmt::Display for DiskLow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "disk space low on the data directory: {} bytes free, below store.disk_free_min_bytes = {}; \
             writes are refused until space returns (reads go on)",
            self.free_bytes, self.free_min_bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_below_the_minimum_and_resumes_above_it() {
        // Goal: the state follows each measurement both ways, and 0 never refuses. Method:
        // feed measurements around the minimum.
        let dir = tempfile::tempdir().unwrap();
        let guard = DiskGuard::new(dir.path(), 1_000);
        assert_eq!(guard.refusal(), None);
        guard.record(999);
        assert_eq!(guard.refusal(), Some(DiskLow { free_bytes: 999, free_min_bytes: 1_000 }));
        guard.record(10);
        assert_eq!(guard.refusal().map(|low| low.free_bytes), Some(10));
        guard.record(1_000);
        assert_eq!(guard.refusal(), None);
        let off = DiskGuard::new(dir.path(), 0);
        off.record(0);
        assert_eq!(off.refusal(), None);
        // A real measurement of the temp directory's file system.
        assert!(guard.measure().unwrap() > 0);
    }
}
