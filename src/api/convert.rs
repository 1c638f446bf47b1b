//! Parsing wire values into domain values, with errors that name the field.

use std::fmt::Display;

use crate::domain::IdError;

use super::ServiceError;

/// Parses an id; `field` names where it was ("lines[2].sku").
/// A client's text quoted in an error message, cut to its first 64 characters: the message
/// travels as a header (grpc-message), and a megabyte of garbage must not come back in it.
pub fn quoted(raw: &str) -> String {
    const SHOWN_CHARS_MAX: usize = 64;
    match raw.char_indices().nth(SHOWN_CHARS_MAX) {
        None => format!("{raw:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &raw[..end], raw.len()),
    }
}

pub fn id<T>(
    parse: fn(&str) -> Result<T, IdError>,
    raw: &str,
    field: impl Display,
) -> Result<T, ServiceError> {
    parse(raw).map_err(|error| ServiceError::InvalidArgument(format!("{field}: {error}")))
}

/// An optional id: empty means absent.
pub fn optional_id<T>(
    parse: fn(&str) -> Result<T, IdError>,
    raw: &str,
    field: impl Display,
) -> Result<Option<T>, ServiceError> {
    if raw.is_empty() { Ok(None) } else { id(parse, raw, field).map(Some) }
}

pub fn invalid(message: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(message.into())
}

/// A list length within 1..=max.
pub fn count(field: &str, len: usize, max: usize) -> Result<(), ServiceError> {
    if len == 0 {
        return Err(invalid(format!("{field}: at least one entry is required")));
    }
    if len > max {
        return Err(invalid(format!("{field}: {len} entries, the limit is {max}")));
    }
    Ok(())
}

/// A quantity within 1..=max.
pub fn positive_qty(field: impl Display, qty: i64, max: i64) -> Result<i64, ServiceError> {
    if qty <= 0 {
        return Err(invalid(format!("{field}: must be positive (got {qty})")));
    }
    if qty > max {
        return Err(invalid(format!("{field}: {qty} is above the limit of {max}")));
    }
    Ok(qty)
}

/// A quantity within 0..=max.
pub fn non_negative_qty(field: impl Display, qty: i64, max: i64) -> Result<i64, ServiceError> {
    if qty < 0 {
        return Err(invalid(format!("{field}: must not be negative (got {qty})")));
    }
    if qty > max {
        return Err(invalid(format!("{field}: {qty} is above the limit of {max}")));
    }
    Ok(qty)
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1_000) as i64, nanos: ((ms % 1_000) * 1_000_000) as i32 }
}

/// Free text (references, reasons): bounded and printable.
pub fn text(field: &str, raw: &str, bytes_max: usize) -> Result<String, ServiceError> {
    if raw.len() > bytes_max {
        return Err(invalid(format!("{field}: {} bytes, the limit is {bytes_max}", raw.len())));
    }
    if raw.chars().any(char::is_control) {
        return Err(invalid(format!("{field}: must not contain control characters")));
    }
    Ok(raw.to_string())
}
