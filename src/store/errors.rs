//! Storage failures. Distinct from business outcomes: a storage failure is never a reason to
//! answer "insufficient", and an fsync failure stops the daemon.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("corrupt record in column family {cf} at key {key}: {reason}")]
    Corrupt { cf: &'static str, key: String, reason: String },
    #[error("data directory {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("the store was written by format version {found}; this build reads {supported}")]
    FormatVersion { found: u32, supported: u32 },
}
