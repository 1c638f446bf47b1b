//! Why the index refused a request. Business outcomes (insufficient stock) are not here: they
//! are values of `ReserveOutcome`.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The commit queue is full: shed.
    #[error("the commit queue is full; retry later")]
    Overloaded,
    /// The data directory's disk is nearly full: every write is refused until space returns.
    #[error("{0}")]
    DiskFull(String),
    /// The commit thread is gone (shutting down after a fatal storage error).
    #[error("the store is not accepting writes")]
    Unavailable,
}
