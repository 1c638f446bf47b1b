//! Records of orders, fulfilment orders and returns (framed like every other record, see
//! `records`). Enums are stored as small numbers chosen here, never as wire enum values, so the
//! API can change without a store migration.

use prost::Message;

use super::records::DecodeError;
use crate::domain::{
    Address, Channel, Customer, FulfilmentLine, FulfilmentOrder, FulfilmentOrderId, HoldReason, Method,
    NodeId, Order, OrderId, OrderLine, OrderStatus, Parcel, Payment, PaymentStatus, ReservationId, Return,
    ReturnId, ReturnLine, Sku, UnroutableReason,
};

fn field(name: &str, error: impl std::fmt::Display) -> DecodeError {
    DecodeError::Field(format!("{name}: {error}"))
}

fn sku(raw: &str, name: &str) -> Result<Sku, DecodeError> {
    Sku::parse(raw).map_err(|error| field(name, error))
}

#[derive(Clone, PartialEq, Message)]
pub struct AddressRecord {
    #[prost(string, tag = "1")]
    pub line1: String,
    #[prost(string, tag = "2")]
    pub line2: String,
    #[prost(string, tag = "3")]
    pub city: String,
    #[prost(string, tag = "4")]
    pub region: String,
    #[prost(string, tag = "5")]
    pub postal_code: String,
    #[prost(string, tag = "6")]
    pub country: String,
    #[prost(double, tag = "7")]
    pub lat: f64,
    #[prost(double, tag = "8")]
    pub lon: f64,
}

#[derive(Clone, PartialEq, Message)]
pub struct OrderLineRecord {
    #[prost(string, tag = "1")]
    pub line_id: String,
    #[prost(string, tag = "2")]
    pub sku: String,
    #[prost(int64, tag = "3")]
    pub qty: i64,
    #[prost(int64, tag = "4")]
    pub unit_price: i64,
    #[prost(int64, tag = "5")]
    pub allocated: i64,
    #[prost(int64, tag = "6")]
    pub backordered: i64,
    #[prost(int64, tag = "7")]
    pub shipped: i64,
    #[prost(int64, tag = "8")]
    pub delivered: i64,
    #[prost(int64, tag = "9")]
    pub cancelled: i64,
    #[prost(int64, tag = "10")]
    pub returned: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct OrderRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub channel: String,
    #[prost(string, tag = "3")]
    pub external_order_id: String,
    #[prost(string, tag = "4")]
    pub customer_id: String,
    #[prost(string, tag = "5")]
    pub customer_name: String,
    #[prost(string, tag = "6")]
    pub customer_email: String,
    #[prost(message, optional, tag = "7")]
    pub ship_to: Option<AddressRecord>,
    #[prost(message, repeated, tag = "8")]
    pub lines: Vec<OrderLineRecord>,
    #[prost(string, tag = "9")]
    pub authorization_id: String,
    #[prost(uint32, tag = "10")]
    pub payment_status: u32,
    #[prost(int64, tag = "11")]
    pub payment_amount: i64,
    #[prost(uint32, tag = "12")]
    pub method: u32,
    #[prost(string, tag = "13")]
    pub pickup_node_id: String,
    #[prost(uint32, repeated, tag = "14")]
    pub hold_reasons: Vec<u32>,
    #[prost(uint32, tag = "15")]
    pub exception_reason: u32,
    #[prost(string, tag = "16")]
    pub exception_detail: String,
    #[prost(uint64, repeated, tag = "17")]
    pub fulfilment_order_ids: Vec<u64>,
    #[prost(uint64, repeated, tag = "18")]
    pub return_ids: Vec<u64>,
    #[prost(uint64, tag = "19")]
    pub created_at_ms: u64,
    #[prost(uint64, tag = "20")]
    pub updated_at_ms: u64,
    #[prost(string, tag = "21")]
    pub cancel_reason: String,
    #[prost(uint64, tag = "22")]
    pub capture_fingerprint: u64,
    #[prost(uint64, optional, tag = "23")]
    pub shipped_at_ms: Option<u64>,
    #[prost(bool, tag = "24")]
    pub ever_backordered: bool,
    #[prost(bool, tag = "25")]
    pub ever_short: bool,
    #[prost(bool, tag = "26")]
    pub ever_exception: bool,
}

fn hold_code(reason: HoldReason) -> u32 {
    match reason {
        HoldReason::PaymentNotAuthorized => 1,
        HoldReason::AddressIncomplete => 2,
        HoldReason::UnknownSku => 3,
        HoldReason::FraudReview => 4,
    }
}

fn hold_from(code: u32) -> Result<HoldReason, DecodeError> {
    Ok(match code {
        1 => HoldReason::PaymentNotAuthorized,
        2 => HoldReason::AddressIncomplete,
        3 => HoldReason::UnknownSku,
        4 => HoldReason::FraudReview,
        other => return Err(DecodeError::Field(format!("hold_reasons: {other}"))),
    })
}

fn reason_code(reason: UnroutableReason) -> u32 {
    match reason {
        UnroutableReason::NoStock => 1,
        UnroutableReason::NoEligibleNode => 2,
        UnroutableReason::PickupNodeLacksStock => 3,
        UnroutableReason::CapacityExhausted => 4,
        UnroutableReason::ChannelNotAllowed => 5,
        UnroutableReason::PickupNodeUnavailable => 6,
        UnroutableReason::MaxShipmentsExceeded => 7,
        UnroutableReason::PartialNotAllowed => 8,
    }
}

fn reason_from(code: u32) -> Result<Option<UnroutableReason>, DecodeError> {
    Ok(Some(match code {
        0 => return Ok(None),
        1 => UnroutableReason::NoStock,
        2 => UnroutableReason::NoEligibleNode,
        3 => UnroutableReason::PickupNodeLacksStock,
        4 => UnroutableReason::CapacityExhausted,
        5 => UnroutableReason::ChannelNotAllowed,
        6 => UnroutableReason::PickupNodeUnavailable,
        7 => UnroutableReason::MaxShipmentsExceeded,
        8 => UnroutableReason::PartialNotAllowed,
        other => return Err(DecodeError::Field(format!("exception_reason: {other}"))),
    }))
}

fn method_code(method: Method) -> u32 {
    match method {
        Method::Ship => 1,
        Method::Pickup => 2,
    }
}

fn method_from(code: u32) -> Result<Method, DecodeError> {
    match code {
        1 => Ok(Method::Ship),
        2 => Ok(Method::Pickup),
        other => Err(DecodeError::Field(format!("method: {other}"))),
    }
}

impl OrderRecord {
    pub fn from_order(order: &Order) -> Self {
        let ship_to = &order.ship_to;
        Self {
            id: order.id.0,
            channel: order.channel.to_string(),
            external_order_id: order.external_order_id.clone(),
            customer_id: order.customer.customer_id.clone(),
            customer_name: order.customer.name.clone(),
            customer_email: order.customer.email.clone(),
            ship_to: Some(AddressRecord {
                line1: ship_to.line1.clone(),
                line2: ship_to.line2.clone(),
                city: ship_to.city.clone(),
                region: ship_to.region.clone(),
                postal_code: ship_to.postal_code.clone(),
                country: ship_to.country.clone(),
                lat: ship_to.lat,
                lon: ship_to.lon,
            }),
            lines: order
                .lines
                .iter()
                .map(|line| OrderLineRecord {
                    line_id: line.line_id.clone(),
                    sku: line.sku.to_string(),
                    qty: line.qty,
                    unit_price: line.unit_price,
                    allocated: line.allocated,
                    backordered: line.backordered,
                    shipped: line.shipped,
                    delivered: line.delivered,
                    cancelled: line.cancelled,
                    returned: line.returned,
                })
                .collect(),
            authorization_id: order.payment.authorization_id.clone(),
            payment_status: match order.payment.status {
                PaymentStatus::Authorized => 1,
                PaymentStatus::Pending => 2,
                PaymentStatus::Declined => 3,
            },
            payment_amount: order.payment.amount,
            method: method_code(order.method),
            pickup_node_id: order.pickup_node_id.clone(),
            hold_reasons: order.hold_reasons.iter().map(|reason| hold_code(*reason)).collect(),
            exception_reason: order.exception.as_ref().map_or(0, |(reason, _)| reason_code(*reason)),
            exception_detail: order.exception.as_ref().map_or_else(String::new, |(_, detail)| detail.clone()),
            fulfilment_order_ids: order.fulfilment_order_ids.iter().map(|id| id.0).collect(),
            return_ids: order.return_ids.iter().map(|id| id.0).collect(),
            created_at_ms: order.created_at_ms,
            updated_at_ms: order.updated_at_ms,
            cancel_reason: order.cancel_reason.clone(),
            capture_fingerprint: order.capture_fingerprint,
            shipped_at_ms: order.shipped_at_ms,
            ever_backordered: order.ever_backordered,
            ever_short: order.ever_short,
            ever_exception: order.ever_exception,
        }
    }

    pub fn into_order(self) -> Result<Order, DecodeError> {
        let ship_to = self.ship_to.unwrap_or_default();
        let lines = self
            .lines
            .into_iter()
            .map(|line| {
                Ok(OrderLine {
                    line_id: line.line_id,
                    sku: sku(&line.sku, "lines.sku")?,
                    qty: line.qty,
                    unit_price: line.unit_price,
                    allocated: line.allocated,
                    backordered: line.backordered,
                    shipped: line.shipped,
                    delivered: line.delivered,
                    cancelled: line.cancelled,
                    returned: line.returned,
                })
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        let exception = reason_from(self.exception_reason)?.map(|reason| (reason, self.exception_detail));
        let mut order = Order {
            id: OrderId(self.id),
            channel: Channel::parse(&self.channel).map_err(|error| field("channel", error))?,
            external_order_id: self.external_order_id,
            customer: Customer {
                customer_id: self.customer_id,
                name: self.customer_name,
                email: self.customer_email,
            },
            ship_to: Address {
                line1: ship_to.line1,
                line2: ship_to.line2,
                city: ship_to.city,
                region: ship_to.region,
                postal_code: ship_to.postal_code,
                country: ship_to.country,
                lat: ship_to.lat,
                lon: ship_to.lon,
            },
            lines,
            payment: Payment {
                authorization_id: self.authorization_id,
                status: match self.payment_status {
                    1 => PaymentStatus::Authorized,
                    2 => PaymentStatus::Pending,
                    3 => PaymentStatus::Declined,
                    other => return Err(DecodeError::Field(format!("payment_status: {other}"))),
                },
                amount: self.payment_amount,
            },
            method: method_from(self.method)?,
            pickup_node_id: self.pickup_node_id,
            status: OrderStatus::Held,
            hold_reasons: self.hold_reasons.into_iter().map(hold_from).collect::<Result<_, _>>()?,
            exception,
            fulfilment_order_ids: self.fulfilment_order_ids.into_iter().map(FulfilmentOrderId).collect(),
            return_ids: self.return_ids.into_iter().map(ReturnId).collect(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            cancel_reason: self.cancel_reason,
            capture_fingerprint: self.capture_fingerprint,
            shipped_at_ms: self.shipped_at_ms,
            ever_backordered: self.ever_backordered,
            ever_short: self.ever_short,
            ever_exception: self.ever_exception,
        };
        for line in &order.lines {
            if line.qty <= 0
                || line.unrouted() < 0
                || line.delivered > line.shipped
                || line.returned > line.shipped
            {
                return Err(DecodeError::Field(format!("lines: counters of {} do not add up", line.line_id)));
            }
        }
        order.status = order.derive_status();
        Ok(order)
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct FulfilmentLineRecord {
    #[prost(string, tag = "1")]
    pub sku: String,
    #[prost(int64, tag = "2")]
    pub qty: i64,
    #[prost(int64, tag = "3")]
    pub shipped: i64,
    #[prost(int64, tag = "4")]
    pub short: i64,
    #[prost(int64, tag = "5")]
    pub cancelled: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SkuQtyRecord {
    #[prost(string, tag = "1")]
    pub sku: String,
    #[prost(int64, tag = "2")]
    pub qty: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ParcelRecord {
    #[prost(string, tag = "1")]
    pub carrier: String,
    #[prost(string, tag = "2")]
    pub tracking_number: String,
    #[prost(message, repeated, tag = "3")]
    pub lines: Vec<SkuQtyRecord>,
    #[prost(uint64, tag = "4")]
    pub shipped_at_ms: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct FulfilmentRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub order_id: u64,
    #[prost(string, tag = "3")]
    pub node_id: String,
    #[prost(uint32, tag = "4")]
    pub method: u32,
    #[prost(message, repeated, tag = "5")]
    pub lines: Vec<FulfilmentLineRecord>,
    #[prost(message, repeated, tag = "6")]
    pub parcels: Vec<ParcelRecord>,
    #[prost(uint64, tag = "7")]
    pub reservation_id: u64,
    #[prost(bool, tag = "8")]
    pub delivered: bool,
    #[prost(uint64, tag = "9")]
    pub created_at_ms: u64,
    #[prost(uint64, tag = "10")]
    pub updated_at_ms: u64,
}

impl FulfilmentRecord {
    pub fn from_fulfilment(order: &FulfilmentOrder) -> Self {
        Self {
            id: order.id.0,
            order_id: order.order_id.0,
            node_id: order.node_id.to_string(),
            method: method_code(order.method),
            lines: order
                .lines
                .iter()
                .map(|line| FulfilmentLineRecord {
                    sku: line.sku.to_string(),
                    qty: line.qty,
                    shipped: line.shipped,
                    short: line.short,
                    cancelled: line.cancelled,
                })
                .collect(),
            parcels: order
                .parcels
                .iter()
                .map(|parcel| ParcelRecord {
                    carrier: parcel.carrier.clone(),
                    tracking_number: parcel.tracking_number.clone(),
                    lines: parcel
                        .lines
                        .iter()
                        .map(|(sku, qty)| SkuQtyRecord { sku: sku.to_string(), qty: *qty })
                        .collect(),
                    shipped_at_ms: parcel.shipped_at_ms,
                })
                .collect(),
            reservation_id: order.reservation_id.0,
            delivered: order.delivered,
            created_at_ms: order.created_at_ms,
            updated_at_ms: order.updated_at_ms,
        }
    }

    pub fn into_fulfilment(self) -> Result<FulfilmentOrder, DecodeError> {
        let lines = self
            .lines
            .into_iter()
            .map(|line| {
                let line = FulfilmentLine {
                    sku: sku(&line.sku, "lines.sku")?,
                    qty: line.qty,
                    shipped: line.shipped,
                    short: line.short,
                    cancelled: line.cancelled,
                };
                if line.remaining() < 0 {
                    return Err(DecodeError::Field(format!("lines: counters of {} do not add up", line.sku)));
                }
                Ok(line)
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        let parcels = self
            .parcels
            .into_iter()
            .map(|parcel| {
                Ok(Parcel {
                    carrier: parcel.carrier,
                    tracking_number: parcel.tracking_number,
                    lines: parcel
                        .lines
                        .into_iter()
                        .map(|line| Ok((sku(&line.sku, "parcels.lines.sku")?, line.qty)))
                        .collect::<Result<Vec<_>, DecodeError>>()?,
                    shipped_at_ms: parcel.shipped_at_ms,
                })
            })
            .collect::<Result<Vec<_>, DecodeError>>()?;
        Ok(FulfilmentOrder {
            id: FulfilmentOrderId(self.id),
            order_id: OrderId(self.order_id),
            node_id: NodeId::parse(&self.node_id).map_err(|error| field("node_id", error))?,
            method: method_from(self.method)?,
            lines,
            parcels,
            reservation_id: ReservationId(self.reservation_id),
            delivered: self.delivered,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct ReturnLineRecord {
    #[prost(string, tag = "1")]
    pub sku: String,
    #[prost(int64, tag = "2")]
    pub qty: i64,
    #[prost(string, tag = "3")]
    pub reason: String,
    #[prost(int64, tag = "4")]
    pub received: i64,
    #[prost(int64, tag = "5")]
    pub resellable: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ReturnRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub order_id: u64,
    #[prost(message, repeated, tag = "3")]
    pub lines: Vec<ReturnLineRecord>,
    #[prost(int64, tag = "4")]
    pub refund_amount: i64,
    #[prost(uint64, tag = "5")]
    pub created_at_ms: u64,
    #[prost(uint64, tag = "6")]
    pub updated_at_ms: u64,
}

impl ReturnRecord {
    pub fn from_return(value: &Return) -> Self {
        Self {
            id: value.id.0,
            order_id: value.order_id.0,
            lines: value
                .lines
                .iter()
                .map(|line| ReturnLineRecord {
                    sku: line.sku.to_string(),
                    qty: line.qty,
                    reason: line.reason.clone(),
                    received: line.received,
                    resellable: line.resellable,
                })
                .collect(),
            refund_amount: value.refund_amount,
            created_at_ms: value.created_at_ms,
            updated_at_ms: value.updated_at_ms,
        }
    }

    pub fn into_return(self) -> Result<Return, DecodeError> {
        Ok(Return {
            id: ReturnId(self.id),
            order_id: OrderId(self.order_id),
            lines: self
                .lines
                .into_iter()
                .map(|line| {
                    Ok(ReturnLine {
                        sku: sku(&line.sku, "lines.sku")?,
                        qty: line.qty,
                        reason: line.reason,
                        received: line.received,
                        resellable: line.resellable,
                    })
                })
                .collect::<Result<Vec<_>, DecodeError>>()?,
            refund_amount: self.refund_amount,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
        })
    }
}
