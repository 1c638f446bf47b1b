//! Orders, fulfilment orders and returns as values, with the pure rules that move their unit
//! counters and derive their status. Nothing here knows how an order is routed or stored.
//!
//! Unit accounting of an order line (the invariant every operation keeps):
//!   qty = unrouted + allocated + backordered + shipped + cancelled,
//!   delivered <= shipped, returned <= shipped.
//! `unrouted` is derived: units held, or unroutable (EXCEPTION), or between two states.

use std::fmt;

use super::ids::{Channel, NodeId, ReservationId, Sku};

macro_rules! numbered_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub u64);

        impl $name {
            /// Parses the wire form (`<prefix>-<number>`).
            pub fn parse(raw: &str) -> Option<Self> {
                let number = raw.strip_prefix(concat!($prefix, "-"))?;
                if number.is_empty() || !number.bytes().all(|byte| byte.is_ascii_digit()) {
                    return None;
                }
                number.parse().ok().map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, concat!($prefix, "-{}"), self.0)
            }
        }
    };
}

numbered_id!(
    /// An order, assigned at capture ("ord-N").
    OrderId,
    "ord"
);
numbered_id!(
    /// A fulfilment order ("fo-N").
    FulfilmentOrderId,
    "fo"
);
numbered_id!(
    /// A return authorisation ("ret-N").
    ReturnId,
    "ret"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OrderStatus {
    Held,
    Allocated,
    Backordered,
    Exception,
    PartiallyShipped,
    Shipped,
    Delivered,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 8] = [
        Self::Held,
        Self::Allocated,
        Self::Backordered,
        Self::Exception,
        Self::PartiallyShipped,
        Self::Shipped,
        Self::Delivered,
        Self::Cancelled,
    ];

    /// The lower-case name used in event types and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Allocated => "allocated",
            Self::Backordered => "backordered",
            Self::Exception => "exception",
            Self::PartiallyShipped => "partially_shipped",
            Self::Shipped => "shipped",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HoldReason {
    PaymentNotAuthorized,
    AddressIncomplete,
    UnknownSku,
    FraudReview,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    Authorized,
    Pending,
    Declined,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Ship,
    Pickup,
}

/// Why units could not be routed (the planner's reasons; an order in EXCEPTION keeps one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnroutableReason {
    NoStock,
    NoEligibleNode,
    PickupNodeLacksStock,
    CapacityExhausted,
    ChannelNotAllowed,
    PickupNodeUnavailable,
    MaxShipmentsExceeded,
    PartialNotAllowed,
}

impl UnroutableReason {
    /// Lack of stock or capacity: such units may wait as a backorder.
    pub fn backorderable(self) -> bool {
        matches!(self, Self::NoStock | Self::CapacityExhausted | Self::PickupNodeLacksStock)
    }
}

pub type ExceptionReason = UnroutableReason;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Address {
    pub line1: String,
    pub line2: String,
    pub city: String,
    pub region: String,
    pub postal_code: String,
    pub country: String,
    pub lat: f64,
    pub lon: f64,
}

impl Address {
    /// Everything a carrier needs, and coordinates to route from.
    pub fn is_complete(&self) -> bool {
        let has_position = self.lat != 0.0 || self.lon != 0.0;
        !self.line1.is_empty()
            && !self.city.is_empty()
            && !self.postal_code.is_empty()
            && !self.country.is_empty()
            && has_position
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Customer {
    pub customer_id: String,
    pub name: String,
    pub email: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    pub authorization_id: String,
    pub status: PaymentStatus,
    pub amount: i64,
}

/// Where a line's units are; `Unrouted` is derived from the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Unrouted,
    Allocated,
    Backordered,
    Shipped,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderLine {
    pub line_id: String,
    pub sku: Sku,
    pub qty: i64,
    pub unit_price: i64,
    pub allocated: i64,
    pub backordered: i64,
    pub shipped: i64,
    pub delivered: i64,
    pub cancelled: i64,
    pub returned: i64,
}

impl OrderLine {
    pub fn new(line_id: String, sku: Sku, qty: i64, unit_price: i64) -> Self {
        Self {
            line_id,
            sku,
            qty,
            unit_price,
            allocated: 0,
            backordered: 0,
            shipped: 0,
            delivered: 0,
            cancelled: 0,
            returned: 0,
        }
    }

    pub fn unrouted(&self) -> i64 {
        self.qty - self.allocated - self.backordered - self.shipped - self.cancelled
    }

    pub fn count(&self, bucket: Bucket) -> i64 {
        match bucket {
            Bucket::Unrouted => self.unrouted(),
            Bucket::Allocated => self.allocated,
            Bucket::Backordered => self.backordered,
            Bucket::Shipped => self.shipped,
            Bucket::Cancelled => self.cancelled,
        }
    }

    fn add(&mut self, bucket: Bucket, delta: i64) {
        match bucket {
            Bucket::Unrouted => {}
            Bucket::Allocated => self.allocated += delta,
            Bucket::Backordered => self.backordered += delta,
            Bucket::Shipped => self.shipped += delta,
            Bucket::Cancelled => self.cancelled += delta,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Order {
    pub id: OrderId,
    pub channel: Channel,
    pub external_order_id: String,
    pub customer: Customer,
    pub ship_to: Address,
    pub lines: Vec<OrderLine>,
    pub payment: Payment,
    pub method: Method,
    /// The pickup store as the channel named it (it may not exist: then EXCEPTION).
    pub pickup_node_id: String,
    pub status: OrderStatus,
    pub hold_reasons: Vec<HoldReason>,
    pub exception: Option<(ExceptionReason, String)>,
    pub fulfilment_order_ids: Vec<FulfilmentOrderId>,
    pub return_ids: Vec<ReturnId>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub cancel_reason: String,
    /// Digest of the capture request: a replay with another request is ALREADY_EXISTS.
    pub capture_fingerprint: u64,
    /// When the last unit to ship shipped (cycle time); `None` until then.
    pub shipped_at_ms: Option<u64>,
    /// KPI history: ever had a backordered unit, a shortage, an exception.
    pub ever_backordered: bool,
    pub ever_short: bool,
    pub ever_exception: bool,
}

impl Order {
    /// The distinct SKUs of the order, sorted.
    pub fn skus(&self) -> Vec<Sku> {
        let mut skus: Vec<Sku> = self.lines.iter().map(|line| line.sku.clone()).collect();
        skus.sort();
        skus.dedup();
        skus
    }

    /// Units of `sku` in `bucket`, over every line of that SKU.
    pub fn units(&self, sku: &Sku, bucket: Bucket) -> i64 {
        self.lines.iter().filter(|line| line.sku == *sku).map(|line| line.count(bucket)).sum()
    }

    /// Per SKU (sorted), the units in `bucket`, leaving out zeros.
    pub fn units_by_sku(&self, bucket: Bucket) -> Vec<(Sku, i64)> {
        self.skus()
            .into_iter()
            .map(|sku| {
                let units = self.units(&sku, bucket);
                (sku, units)
            })
            .filter(|(_, units)| *units > 0)
            .collect()
    }

    /// Moves `qty` units of `sku` from one bucket to another, first line first.
    /// Panics if the lines of that SKU hold fewer than `qty` in `from`: callers decide from
    /// these same counters, so a shortfall is a broken invariant.
    pub fn move_units(&mut self, sku: &Sku, from: Bucket, to: Bucket, qty: i64) {
        assert!(qty >= 0, "moving a negative quantity");
        let mut left = qty;
        for line in self.lines.iter_mut().filter(|line| line.sku == *sku) {
            if left == 0 {
                break;
            }
            let take = line.count(from).min(left);
            if take > 0 {
                line.add(from, -take);
                line.add(to, take);
                left -= take;
            }
        }
        assert_eq!(left, 0, "order {}: {qty} units of {sku} are not all in {from:?}", self.id);
    }

    /// Marks `qty` shipped units of `sku` delivered; returns how many were (at most the shipped
    /// ones not yet delivered).
    pub fn mark_delivered(&mut self, sku: &Sku, qty: i64) -> i64 {
        let mut left = qty;
        for line in self.lines.iter_mut().filter(|line| line.sku == *sku) {
            let take = (line.shipped - line.delivered).min(left);
            line.delivered += take;
            left -= take;
        }
        qty - left
    }

    /// Units of `sku` shipped and not yet returned.
    pub fn returnable(&self, sku: &Sku) -> i64 {
        self.lines.iter().filter(|line| line.sku == *sku).map(|line| line.shipped - line.returned).sum()
    }

    /// Marks `qty` units of `sku` returned; returns the refund (units × each line's unit
    /// price), first line first.
    pub fn mark_returned(&mut self, sku: &Sku, qty: i64) -> i64 {
        let mut left = qty;
        let mut refund = 0i64;
        for line in self.lines.iter_mut().filter(|line| line.sku == *sku) {
            let take = (line.shipped - line.returned).min(left);
            line.returned += take;
            left -= take;
            refund = refund.saturating_add(take.saturating_mul(line.unit_price));
        }
        assert_eq!(left, 0, "order {}: returning more of {sku} than shipped", self.id);
        refund
    }

    /// The order's total in cents (saturating: a fraud rule compares it, nothing adds it).
    pub fn amount(&self) -> i64 {
        self.lines
            .iter()
            .fold(0i64, |total, line| total.saturating_add(line.qty.saturating_mul(line.unit_price)))
    }

    fn total(&self, bucket: Bucket) -> i64 {
        self.lines.iter().map(|line| line.count(bucket)).sum()
    }

    /// The status the counters and holds imply (see the module comment of orders.proto).
    pub fn derive_status(&self) -> OrderStatus {
        let ordered: i64 = self.lines.iter().map(|line| line.qty).sum();
        let cancelled = self.total(Bucket::Cancelled);
        let shipped = self.total(Bucket::Shipped);
        let delivered: i64 = self.lines.iter().map(|line| line.delivered).sum();
        if cancelled == ordered {
            return OrderStatus::Cancelled;
        }
        if !self.hold_reasons.is_empty() {
            return OrderStatus::Held;
        }
        if shipped + cancelled == ordered {
            return if delivered == shipped { OrderStatus::Delivered } else { OrderStatus::Shipped };
        }
        if self.total(Bucket::Unrouted) > 0 {
            return OrderStatus::Exception;
        }
        if self.total(Bucket::Backordered) > 0 {
            return OrderStatus::Backordered;
        }
        if shipped > 0 {
            return OrderStatus::PartiallyShipped;
        }
        OrderStatus::Allocated
    }

    /// Units not shipped and not cancelled (what CancelOrder would cancel).
    pub fn open_units(&self) -> i64 {
        self.lines.iter().map(|line| line.qty - line.shipped - line.cancelled).sum()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FulfilmentStatus {
    Released,
    PartiallyShipped,
    Shipped,
    Delivered,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FulfilmentLine {
    pub sku: Sku,
    pub qty: i64,
    pub shipped: i64,
    pub short: i64,
    pub cancelled: i64,
}

impl FulfilmentLine {
    pub fn remaining(&self) -> i64 {
        self.qty - self.shipped - self.short - self.cancelled
    }
}

/// One parcel (or pickup hand-over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parcel {
    pub carrier: String,
    pub tracking_number: String,
    pub lines: Vec<(Sku, i64)>,
    pub shipped_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FulfilmentOrder {
    pub id: FulfilmentOrderId,
    pub order_id: OrderId,
    pub node_id: NodeId,
    pub method: Method,
    /// Ordered by SKU.
    pub lines: Vec<FulfilmentLine>,
    pub parcels: Vec<Parcel>,
    pub reservation_id: ReservationId,
    pub delivered: bool,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl FulfilmentOrder {
    pub fn line(&self, sku: &Sku) -> Option<&FulfilmentLine> {
        self.lines.iter().find(|line| line.sku == *sku)
    }

    pub fn line_mut(&mut self, sku: &Sku) -> Option<&mut FulfilmentLine> {
        self.lines.iter_mut().find(|line| line.sku == *sku)
    }

    pub fn remaining(&self) -> i64 {
        self.lines.iter().map(FulfilmentLine::remaining).sum()
    }

    pub fn shipped(&self) -> i64 {
        self.lines.iter().map(|line| line.shipped).sum()
    }

    pub fn status(&self) -> FulfilmentStatus {
        match (self.remaining() > 0, self.shipped() > 0) {
            (true, true) => FulfilmentStatus::PartiallyShipped,
            (true, false) => FulfilmentStatus::Released,
            (false, true) if self.delivered => FulfilmentStatus::Delivered,
            (false, true) => FulfilmentStatus::Shipped,
            (false, false) => FulfilmentStatus::Cancelled,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReturnStatus {
    Requested,
    PartiallyReceived,
    Received,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnLine {
    pub sku: Sku,
    pub qty: i64,
    pub reason: String,
    pub received: i64,
    pub resellable: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Return {
    pub id: ReturnId,
    pub order_id: OrderId,
    /// Ordered by SKU.
    pub lines: Vec<ReturnLine>,
    pub refund_amount: i64,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
}

impl Return {
    pub fn status(&self) -> ReturnStatus {
        let received: i64 = self.lines.iter().map(|line| line.received).sum();
        let qty: i64 = self.lines.iter().map(|line| line.qty).sum();
        if received == 0 {
            ReturnStatus::Requested
        } else if received < qty {
            ReturnStatus::PartiallyReceived
        } else {
            ReturnStatus::Received
        }
    }

    /// Units of `sku` requested and not yet received.
    pub fn expected(&self, sku: &Sku) -> i64 {
        self.lines.iter().filter(|line| line.sku == *sku).map(|line| line.qty - line.received).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(lines: &[(&str, &str, i64)]) -> Order {
        Order {
            id: OrderId(1),
            channel: Channel::parse("web").unwrap(),
            external_order_id: "x".into(),
            customer: Customer::default(),
            ship_to: Address::default(),
            lines: lines
                .iter()
                .map(|(line_id, sku, qty)| {
                    OrderLine::new(line_id.to_string(), Sku::parse(sku).unwrap(), *qty, 100)
                })
                .collect(),
            payment: Payment {
                authorization_id: String::new(),
                status: PaymentStatus::Authorized,
                amount: 0,
            },
            method: Method::Ship,
            pickup_node_id: String::new(),
            status: OrderStatus::Held,
            hold_reasons: Vec::new(),
            exception: None,
            fulfilment_order_ids: Vec::new(),
            return_ids: Vec::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            cancel_reason: String::new(),
            capture_fingerprint: 0,
            shipped_at_ms: None,
            ever_backordered: false,
            ever_short: false,
            ever_exception: false,
        }
    }

    #[test]
    fn units_move_first_line_first_and_status_follows() {
        // Goal: counters move across lines of one SKU in line order and the derived status
        // follows the precedence of orders.proto. Method: a two-line order walked through.
        let a = Sku::parse("A").unwrap();
        let mut order = order(&[("1", "A", 2), ("2", "A", 3)]);
        assert_eq!(order.derive_status(), OrderStatus::Exception);
        order.move_units(&a, Bucket::Unrouted, Bucket::Allocated, 4);
        assert_eq!((order.lines[0].allocated, order.lines[1].allocated), (2, 2));
        order.move_units(&a, Bucket::Unrouted, Bucket::Backordered, 1);
        assert_eq!(order.derive_status(), OrderStatus::Backordered);
        order.move_units(&a, Bucket::Allocated, Bucket::Shipped, 3);
        order.move_units(&a, Bucket::Backordered, Bucket::Cancelled, 1);
        assert_eq!(order.derive_status(), OrderStatus::PartiallyShipped);
        order.move_units(&a, Bucket::Allocated, Bucket::Shipped, 1);
        assert_eq!(order.derive_status(), OrderStatus::Shipped);
        assert_eq!(order.mark_delivered(&a, 10), 4);
        assert_eq!(order.derive_status(), OrderStatus::Delivered);
        assert_eq!(order.mark_returned(&a, 3), 300);
        assert_eq!(order.returnable(&a), 1);
    }

    #[test]
    fn cancelled_and_held() {
        // Goal: all cancelled is CANCELLED even when held; holds win over routing states.
        // Method: examples.
        let a = Sku::parse("A").unwrap();
        let mut order = order(&[("1", "A", 2)]);
        order.hold_reasons.push(HoldReason::FraudReview);
        assert_eq!(order.derive_status(), OrderStatus::Held);
        order.move_units(&a, Bucket::Unrouted, Bucket::Cancelled, 2);
        assert_eq!(order.derive_status(), OrderStatus::Cancelled);
    }

    #[test]
    fn ids_round_trip() {
        // Goal: the wire ids parse back; junk does not. Method: examples.
        assert_eq!(OrderId::parse("ord-12"), Some(OrderId(12)));
        assert_eq!(OrderId(12).to_string(), "ord-12");
        assert_eq!(FulfilmentOrderId::parse("fo-3"), Some(FulfilmentOrderId(3)));
        assert_eq!(ReturnId::parse("ret-"), None);
        assert_eq!(ReturnId::parse("ret-+1"), None);
        assert_eq!(OrderId::parse("fo-1"), None);
    }
}
