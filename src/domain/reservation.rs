//! Reservations: the hold lifecycle HELD → CONFIRMED → FULFILLED, or → RELEASED / EXPIRED
//! (TigerBeetle's pending → post / void / timeout), and the all-or-nothing decision.

use super::ids::{Channel, IdempotencyKey, NodeId, ReservationId, Sku};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReservationStatus {
    Held,
    Confirmed,
    Released,
    Expired,
    Fulfilled,
}

impl ReservationStatus {
    /// Whether the reservation still holds its units.
    pub fn is_open(self) -> bool {
        matches!(self, Self::Held | Self::Confirmed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveLine {
    pub sku: Sku,
    pub node_id: NodeId,
    pub qty: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub id: ReservationId,
    pub status: ReservationStatus,
    pub lines: Vec<ReserveLine>,
    pub reference: String,
    pub channel: Option<Channel>,
    pub idempotency_key: Option<IdempotencyKey>,
    pub created_at_ms: u64,
    /// `None`: no TTL (or confirmed).
    pub expires_at_ms: Option<u64>,
    pub updated_at_ms: u64,
    /// What made the hold, with what that kind of hold keeps. One field for the three kinds
    /// keeps a reservation in a 160-byte allocation (three separate fields took 192).
    pub origin: HoldOrigin,
}

/// What made a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOrigin {
    /// Nothing more is kept: a Reserve from before store format 3.
    Plain,
    /// Inventory.Reserve: what a replay of that request answers. The reservation's record
    /// carries it, so its idempotency key needs no record of its own while the reservation is
    /// kept (see `Index::purge_expired_history`).
    Reserve(ReserveRequest),
    /// Allocate, which took one shipment of capacity at each of the hold's nodes on
    /// `capacity_day`.
    Allocate { capacity_day: u64 },
    /// A fulfilment order's hold (orders only). It moves with its fulfilment order (shipment,
    /// shortage, cancellation), never by the Inventory service's confirm, extend or release.
    Fulfilment { order_id: u64, capacity_day: Option<u64> },
}

impl Reservation {
    /// The capacity day on which this hold took node capacity, if it did.
    pub fn capacity_day(&self) -> Option<u64> {
        match self.origin {
            HoldOrigin::Allocate { capacity_day } => Some(capacity_day),
            HoldOrigin::Fulfilment { capacity_day, .. } => capacity_day,
            HoldOrigin::Plain | HoldOrigin::Reserve(_) => None,
        }
    }

    /// The fulfilment order this reservation backs, if any.
    pub fn fulfilment_order_id(&self) -> Option<u64> {
        match self.origin {
            HoldOrigin::Fulfilment { order_id, .. } => Some(order_id),
            _ => None,
        }
    }

    /// The Reserve request that made this hold, if one did (since store format 3).
    pub fn reserve_request(&self) -> Option<ReserveRequest> {
        match self.origin {
            HoldOrigin::Reserve(request) => Some(request),
            _ => None,
        }
    }
}

/// The Reserve request behind a hold, as its idempotency key remembers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReserveRequest {
    pub fingerprint: u64,
    /// The expiry the first answer gave (an extension does not change a replay's answer).
    pub expires_at_ms: Option<u64>,
}

/// One line that could not be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub sku: Sku,
    pub node_id: NodeId,
    pub requested: i64,
    pub available: i64,
}

/// A state transition asked of an existing reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Confirm,
    Extend { expires_at_ms: u64 },
    Release,
    Expire,
}

/// What a transition does to a reservation in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionOutcome {
    /// Apply: the new status, and whether the held units go back to ATP.
    Apply { status: ReservationStatus, returns_units: bool },
    /// Nothing to do; answer with the reservation as it is (releasing twice is fine).
    NoOp,
    /// A state conflict, named for the error message.
    Conflict(&'static str),
}

/// The reservation state machine, as a pure function.
pub fn transition(status: ReservationStatus, transition: Transition) -> TransitionOutcome {
    use ReservationStatus::*;
    use TransitionOutcome::*;
    match (status, transition) {
        (Held, Transition::Confirm) => Apply { status: Confirmed, returns_units: false },
        (Confirmed, Transition::Confirm) => NoOp,
        (Held, Transition::Extend { .. }) => Apply { status: Held, returns_units: false },
        (Confirmed, Transition::Extend { .. }) => {
            Conflict("the reservation is confirmed and has no TTL to extend")
        }
        (Held | Confirmed, Transition::Release) => Apply { status: Released, returns_units: true },
        (Released | Expired, Transition::Release) => NoOp,
        (Held, Transition::Expire) => Apply { status: Expired, returns_units: true },
        (Confirmed | Released | Expired | Fulfilled, Transition::Expire) => NoOp,
        (Released, Transition::Confirm | Transition::Extend { .. }) => {
            Conflict("the reservation was released")
        }
        (Expired, Transition::Confirm | Transition::Extend { .. }) => Conflict("the reservation has expired"),
        (Fulfilled, Transition::Confirm) => NoOp,
        (Fulfilled, Transition::Extend { .. } | Transition::Release) => {
            Conflict("the reservation is already fulfilled")
        }
    }
}

/// Decides an all-or-nothing hold: `available[i]` is the ATP of `lines[i]`'s position.
/// Returns every short line, or an empty list when every line fits.
pub fn shortfalls(lines: &[ReserveLine], available: &[i64]) -> Vec<Shortfall> {
    assert_eq!(lines.len(), available.len());
    lines
        .iter()
        .zip(available)
        .filter(|(line, available)| line.qty > **available)
        .map(|(line, available)| Shortfall {
            sku: line.sku.clone(),
            node_id: line.node_id.clone(),
            requested: line.qty,
            available: *available,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_table() {
        // Goal: the lifecycle of API.md. Method: every (status, transition) pair checked.
        use ReservationStatus::*;
        let all = [Held, Confirmed, Released, Expired, Fulfilled];
        for status in all {
            let release = transition(status, Transition::Release);
            match status {
                Held | Confirmed => assert!(matches!(
                    release,
                    TransitionOutcome::Apply { status: Released, returns_units: true }
                )),
                Released | Expired => assert_eq!(release, TransitionOutcome::NoOp),
                Fulfilled => assert!(matches!(release, TransitionOutcome::Conflict(_))),
            }
            let extend = transition(status, Transition::Extend { expires_at_ms: 1 });
            assert_eq!(matches!(extend, TransitionOutcome::Apply { .. }), status == Held);
            let expire = transition(status, Transition::Expire);
            assert_eq!(matches!(expire, TransitionOutcome::Apply { .. }), status == Held);
        }
        assert!(matches!(transition(Expired, Transition::Confirm), TransitionOutcome::Conflict(_)));
    }
}
