//! The one mapping from every error of the layers below to a gRPC status. Exhaustive on
//! purpose: a new error variant does not compile until someone decides its code.

use tonic::{Code, Status};

use crate::events::WatchError;
use crate::index::IndexError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Malformed input; nothing was stored. The message names the field (and line).
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("overloaded: {0}; retry later")]
    Overloaded(&'static str),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A broken expectation about stored data (a bug or a damaged store), never bad input.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let code = match &error {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::Index(index) => match index {
                IndexError::InvalidArgument(_) => Code::InvalidArgument,
                IndexError::NotFound(_) => Code::NotFound,
                IndexError::FailedPrecondition(_) => Code::FailedPrecondition,
                IndexError::AlreadyExists(_) => Code::AlreadyExists,
                IndexError::Overloaded | IndexError::DiskFull(_) => Code::ResourceExhausted,
                IndexError::Unavailable => Code::Unavailable,
            },
            ServiceError::Watch(watch) => match watch {
                WatchError::TooManyWatchers(_) => Code::ResourceExhausted,
                WatchError::TooOld { .. } => Code::OutOfRange,
                WatchError::Lagged { .. } => Code::ResourceExhausted,
                WatchError::Store(_) => Code::Internal,
                WatchError::Closed { .. } => Code::Unavailable,
            },
            ServiceError::Overloaded(_) => Code::ResourceExhausted,
            ServiceError::ShuttingDown => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
        };
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::warn!(error = %error, "request failed");
        }
        Status::new(code, error.to_string())
    }
}
