//! Identifiers: 1..=128 bytes of printable ASCII without spaces (API.md). Parsed once at the
//! edge; inside the crate a `&Sku` is known to be valid.

use std::fmt;
use std::sync::Arc;

/// The longest identifier accepted, in bytes.
pub const ID_BYTES_MAX: usize = 128;

/// Why a raw string is not an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("is {len} bytes long, the maximum is {ID_BYTES_MAX}")]
    TooLong { len: usize },
    #[error("byte {position} is not printable ASCII without spaces")]
    NotPrintable { position: usize },
}

/// Checks the identifier rule shared by every id type.
pub fn check_id(raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    if raw.len() > ID_BYTES_MAX {
        return Err(IdError::TooLong { len: raw.len() });
    }
    match raw.bytes().position(|byte| !byte.is_ascii_graphic()) {
        Some(position) => Err(IdError::NotPrintable { position }),
        None => Ok(()),
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        /// Cheap to clone (shared string).
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                check_id(raw)?;
                Ok(Self(Arc::from(raw)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The shared text itself (a map keyed by it needs no copy).
            pub fn shared(&self) -> Arc<str> {
                Arc::clone(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, formatter)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A stock keeping unit.
    Sku
);
id_type!(
    /// A fulfilment node (warehouse, store, ...).
    NodeId
);
id_type!(
    /// A sales channel ("web", "marketplace-x", "pos", ...).
    Channel
);
id_type!(
    /// A client-chosen key that makes a retried mutation safe.
    IdempotencyKey
);

/// A reservation's number. On the wire it is `rsv-` followed by the decimal number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(pub u64);

impl ReservationId {
    const PREFIX: &'static str = "rsv-";

    /// `None` when the text cannot be a reservation id at all.
    pub fn parse(raw: &str) -> Option<Self> {
        let digits = raw.strip_prefix(Self::PREFIX)?;
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().map(ReservationId)
    }
}

impl fmt::Display for ReservationId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}{}", Self::PREFIX, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_rules() {
        // Goal: the boundary cases of the id rule. Method: each edge value once.
        assert!(Sku::parse("A").is_ok());
        assert!(Sku::parse(&"x".repeat(128)).is_ok());
        assert_eq!(Sku::parse(""), Err(IdError::Empty));
        assert_eq!(Sku::parse(&"x".repeat(129)), Err(IdError::TooLong { len: 129 }));
        assert_eq!(Sku::parse("a b"), Err(IdError::NotPrintable { position: 1 }));
        assert_eq!(Sku::parse("é"), Err(IdError::NotPrintable { position: 0 }));
        assert_eq!(Sku::parse("a\n"), Err(IdError::NotPrintable { position: 1 }));
    }

    #[test]
    fn reservation_id_round_trip() {
        // Goal: the wire form parses back; junk does not. Method: examples.
        let id = ReservationId(42);
        assert_eq!(ReservationId::parse(&id.to_string()), Some(id));
        assert_eq!(ReservationId::parse("rsv-"), None);
        assert_eq!(ReservationId::parse("rsv-1x"), None);
        assert_eq!(ReservationId::parse("42"), None);
        assert_eq!(ReservationId::parse("rsv-99999999999999999999999"), None);
    }
}
