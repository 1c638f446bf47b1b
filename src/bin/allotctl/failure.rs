//! Exit codes and the failures that lead to them: the part of allotctl that scripts rely on.
//!
//! Owns the mapping from every way a command can end to one exit code, and how a failure is
//! printed (text on stderr; with `--json` also one JSON document on stdout). Must not import
//! the command modules: they depend on this, not the other way round.

use std::process::ExitCode;

use tonic::{Code, Status};

/// The command did what was asked.
pub const EXIT_OK: u8 = 0;
/// The daemon answered with an error (its code and message are printed).
pub const EXIT_DAEMON_ERROR: u8 = 1;
/// Bad flags or arguments, or an input file that cannot be read or has no valid header.
pub const EXIT_USAGE: u8 = 2;
/// Could not connect, no answer in time, or the daemon is unavailable (shutting down,
/// health NOT_SERVING).
pub const EXIT_UNREACHABLE: u8 = 3;
/// Partial success: some import rows were rejected (each reported as `line N: reason`).
pub const EXIT_PARTIAL: u8 = 4;
/// `reserve` answered INSUFFICIENT: nothing is held (a business outcome, not an error).
pub const EXIT_INSUFFICIENT: u8 = 5;
/// `check` found drift or a broken invariant (listed on stdout).
pub const EXIT_INCONSISTENT: u8 = 6;

/// The exit-code table for `--help`; keep it equal to the constants above.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  the daemon answered with an error (its code and message are printed)
  2  usage error, or a bad input file (unreadable, no valid header)
  3  could not connect, no answer in time, or the daemon is unavailable / NOT_SERVING
  4  partial success: some import rows were rejected (`line N: reason` on stderr)
  5  reserve: INSUFFICIENT stock, nothing held (shortfalls are printed)
  6  check: the daemon's state drifted (what drifted is printed)";

/// How a command that ran to its end went (it printed its own result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Some rows were rejected, the others stored.
    Partial,
    /// A reservation was refused for lack of stock.
    Insufficient,
    /// Health answered, but not SERVING.
    NotServing,
    /// The consistency check found drift.
    Inconsistent,
}

impl Outcome {
    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Outcome::Done => EXIT_OK,
            Outcome::Partial => EXIT_PARTIAL,
            Outcome::Insufficient => EXIT_INSUFFICIENT,
            Outcome::NotServing => EXIT_UNREACHABLE,
            Outcome::Inconsistent => EXIT_INCONSISTENT,
        })
    }
}

/// Why a command stopped before its end.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or input file: nothing was sent (or the import stopped there).
    Usage(String),
    /// No connection to the daemon.
    Connect(String),
    /// The daemon (or the transport on its behalf) answered with an error status.
    Status(Status),
}

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        // A status the client's own transport made up (a TLS alert such as a refused client
        // certificate, a broken connection): the daemon decided nothing, so it is the
        // unreachable case, with the transport's reasons rather than "transport error".
        // A status the daemon sent never has a source; one made up on this side does.
        if let Some(source) = std::error::Error::source(&status) {
            let mut reasons: Vec<String> = Vec::new();
            let mut cause: Option<&dyn std::error::Error> = Some(source);
            while let Some(error) = cause {
                let text = error.to_string();
                if !reasons.contains(&text) {
                    reasons.push(text);
                }
                cause = error.source();
            }
            return Failure::Connect(format!("the connection failed: {}", reasons.join(": ")));
        }
        Failure::Status(status)
    }
}

impl Failure {
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::Usage(_) => EXIT_USAGE,
            Failure::Connect(_) => EXIT_UNREACHABLE,
            Failure::Status(status) => match status.code() {
                // UNAVAILABLE: shutting down or the connection broke; DEADLINE_EXCEEDED: no answer
                // within --timeout-ms. Either way the daemon did not decide anything.
                Code::Unavailable | Code::DeadlineExceeded => EXIT_UNREACHABLE,
                _ => EXIT_DAEMON_ERROR,
            },
        })
    }

    /// Prints the failure: always a line on stderr, and with `--json` a document on stdout
    /// (`{"error": {"code": ..., "message": ...}}`) so a script parsing stdout sees it too.
    pub fn report(&self, json: bool) {
        let (code, message) = match self {
            Failure::Usage(message) => ("USAGE", message.clone()),
            Failure::Connect(message) => ("CONNECT", message.clone()),
            Failure::Status(status) => (code_name(status.code()), status.message().to_string()),
        };
        eprintln!("allotctl: {code}: {message}");
        if json {
            let document = serde_json::json!({ "error": { "code": code, "message": message } });
            crate::output::print_json(&document);
        }
    }
}

/// The canonical upper-case name of a gRPC status code, as in the gRPC spec.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
