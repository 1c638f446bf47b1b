//! `allot.v1.Orders`: capture, holds, cancellation, the audit trail, the event feed and KPIs.
//! Parses each request once into a typed command (naming the field of any problem), calls the
//! order book, awaits the group commit, and converts the result.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{self, count, id, invalid, optional_id, quoted, timestamp};
use super::routing::reason_to_wire;
use super::{Core, ServiceError};
use crate::domain::{
    Address, AuditEvent, Channel, Customer, HoldReason, Method, Order, OrderId, OrderStatus, Payment,
    PaymentStatus, Sku, fingerprint_bytes,
};
use crate::events;
use crate::metrics::Rpc;
use crate::orders::CaptureCommand;
use crate::proto::v1;

/// Bytes of a free-text field at most (names, address parts, reasons).
const TEXT_BYTES_MAX: usize = 1_024;
/// Orders per ListOrders page: the default and the cap.
const PAGE_LEN_DEFAULT: usize = 100;
const PAGE_LEN_MAX: usize = 1_000;
/// Event types a WatchEvents filter may name at most.
const EVENT_TYPES_MAX: usize = 64;
/// Events GetOrderHistory returns at most.
const HISTORY_LEN_MAX: usize = 100_000;
/// The largest unit price or payment amount accepted, in cents (10^13: a price times the
/// largest quantity still fits an i64 sum when saturating).
const MONEY_MAX: i64 = 10_000_000_000_000;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct OrdersApi {
    core: Arc<Core>,
}

impl OrdersApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

pub fn parse_order_id(raw: &str, field: &str) -> Result<OrderId, ServiceError> {
    if raw.is_empty() {
        return Err(invalid(format!("{field}: must not be empty")));
    }
    OrderId::parse(raw)
        .ok_or_else(|| invalid(format!("{field}: {} is not an order id (ord-<number>)", quoted(raw))))
}

fn money(field: &str, value: i64) -> Result<i64, ServiceError> {
    if !(0..=MONEY_MAX).contains(&value) {
        return Err(invalid(format!("{field}: must be between 0 and {MONEY_MAX} cents (got {value})")));
    }
    Ok(value)
}

fn coordinate(field: &str, value: f64, limit: f64) -> Result<f64, ServiceError> {
    if !value.is_finite() || value.abs() > limit {
        return Err(invalid(format!("{field}: {value} is not a coordinate within ±{limit}")));
    }
    Ok(value)
}

fn parse_capture(raw: &v1::CaptureOrderRequest, core: &Core) -> Result<CaptureCommand, ServiceError> {
    let limits = core.index.limits();
    let channel = id(Channel::parse, &raw.channel, "channel")?;
    crate::domain::check_id(&raw.external_order_id)
        .map_err(|error| invalid(format!("external_order_id: {error}")))?;
    count("lines", raw.lines.len(), limits.lines_per_request_max)?;
    let mut line_ids = HashSet::with_capacity(raw.lines.len());
    let mut lines = Vec::with_capacity(raw.lines.len());
    for (index, line) in raw.lines.iter().enumerate() {
        crate::domain::check_id(&line.line_id)
            .map_err(|error| invalid(format!("lines[{index}].line_id: {error}")))?;
        if !line_ids.insert(line.line_id.as_str()) {
            return Err(invalid(format!("lines[{index}].line_id: {:?} appears twice", line.line_id)));
        }
        let sku = id(Sku::parse, &line.sku, format_args!("lines[{index}].sku"))?;
        let qty = convert::positive_qty(format_args!("lines[{index}].qty"), line.qty, limits.quantity_max)?;
        let unit_price = money(&format!("lines[{index}].unit_price"), line.unit_price)?;
        lines.push((line.line_id.clone(), sku, qty, unit_price));
    }
    let customer = raw.customer.clone().unwrap_or_default();
    let customer = Customer {
        customer_id: convert::text("customer.customer_id", &customer.customer_id, TEXT_BYTES_MAX)?,
        name: convert::text("customer.name", &customer.name, TEXT_BYTES_MAX)?,
        email: convert::text("customer.email", &customer.email, TEXT_BYTES_MAX)?,
    };
    let address = raw.ship_to.clone().unwrap_or_default();
    let ship_to = Address {
        line1: convert::text("ship_to.line1", &address.line1, TEXT_BYTES_MAX)?,
        line2: convert::text("ship_to.line2", &address.line2, TEXT_BYTES_MAX)?,
        city: convert::text("ship_to.city", &address.city, TEXT_BYTES_MAX)?,
        region: convert::text("ship_to.region", &address.region, TEXT_BYTES_MAX)?,
        postal_code: convert::text("ship_to.postal_code", &address.postal_code, TEXT_BYTES_MAX)?,
        country: convert::text("ship_to.country", &address.country, TEXT_BYTES_MAX)?,
        lat: coordinate("ship_to.lat", address.lat, 90.0)?,
        lon: coordinate("ship_to.lon", address.lon, 180.0)?,
    };
    let payment = raw.payment.clone().unwrap_or_default();
    let payment = Payment {
        authorization_id: convert::text(
            "payment.authorization_id",
            &payment.authorization_id,
            TEXT_BYTES_MAX,
        )?,
        status: match v1::payment::Status::try_from(payment.status) {
            Ok(v1::payment::Status::Authorized) => PaymentStatus::Authorized,
            Ok(v1::payment::Status::Pending | v1::payment::Status::Unspecified) => PaymentStatus::Pending,
            Ok(v1::payment::Status::Declined) => PaymentStatus::Declined,
            Err(_) => return Err(invalid(format!("payment.status: unknown value {}", payment.status))),
        },
        amount: money("payment.amount", payment.amount)?,
    };
    let method = match v1::Method::try_from(raw.method) {
        Ok(v1::Method::Unspecified | v1::Method::Ship) => Method::Ship,
        Ok(v1::Method::Pickup) => Method::Pickup,
        Err(_) => return Err(invalid(format!("method: unknown value {}", raw.method))),
    };
    let pickup_node_id = match method {
        Method::Pickup => {
            crate::domain::check_id(&raw.pickup_node_id)
                .map_err(|error| invalid(format!("pickup_node_id: {error} (required for PICKUP)")))?;
            raw.pickup_node_id.clone()
        }
        Method::Ship if raw.pickup_node_id.is_empty() => String::new(),
        Method::Ship => {
            return Err(invalid("pickup_node_id: only a PICKUP order names a pickup node"));
        }
    };
    Ok(CaptureCommand {
        channel,
        external_order_id: raw.external_order_id.clone(),
        customer,
        ship_to,
        lines,
        payment,
        method,
        pickup_node_id,
        fingerprint: fingerprint_bytes(&raw.encode_to_vec()),
    })
}

pub fn status_to_wire(status: OrderStatus) -> v1::order::Status {
    use v1::order::Status;
    match status {
        OrderStatus::Held => Status::Held,
        OrderStatus::Allocated => Status::Allocated,
        OrderStatus::Backordered => Status::Backordered,
        OrderStatus::Exception => Status::Exception,
        OrderStatus::PartiallyShipped => Status::PartiallyShipped,
        OrderStatus::Shipped => Status::Shipped,
        OrderStatus::Delivered => Status::Delivered,
        OrderStatus::Cancelled => Status::Cancelled,
    }
}

fn status_from_wire(raw: i32) -> Result<Option<OrderStatus>, ServiceError> {
    use v1::order::Status;
    Ok(match Status::try_from(raw) {
        Ok(Status::Unspecified) => None,
        Ok(Status::Held) => Some(OrderStatus::Held),
        Ok(Status::Allocated) => Some(OrderStatus::Allocated),
        Ok(Status::Backordered) => Some(OrderStatus::Backordered),
        Ok(Status::Exception) => Some(OrderStatus::Exception),
        Ok(Status::PartiallyShipped) => Some(OrderStatus::PartiallyShipped),
        Ok(Status::Shipped) => Some(OrderStatus::Shipped),
        Ok(Status::Delivered) => Some(OrderStatus::Delivered),
        Ok(Status::Cancelled) => Some(OrderStatus::Cancelled),
        Err(_) => return Err(invalid(format!("status: unknown value {raw}"))),
    })
}

pub fn address_to_wire(address: &Address) -> v1::Address {
    v1::Address {
        line1: address.line1.clone(),
        city: address.city.clone(),
        region: address.region.clone(),
        postal_code: address.postal_code.clone(),
        country: address.country.clone(),
        lat: address.lat,
        lon: address.lon,
        line2: address.line2.clone(),
    }
}

pub fn customer_to_wire(customer: &Customer) -> v1::Customer {
    v1::Customer {
        customer_id: customer.customer_id.clone(),
        name: customer.name.clone(),
        email: customer.email.clone(),
    }
}

pub fn method_to_wire(method: Method) -> i32 {
    match method {
        Method::Ship => v1::Method::Ship as i32,
        Method::Pickup => v1::Method::Pickup as i32,
    }
}

pub fn order_to_wire(order: &Order) -> v1::Order {
    use v1::order::HoldReason as Wire;
    v1::Order {
        order_id: order.id.to_string(),
        channel: order.channel.to_string(),
        external_order_id: order.external_order_id.clone(),
        customer: Some(customer_to_wire(&order.customer)),
        ship_to: Some(address_to_wire(&order.ship_to)),
        lines: order
            .lines
            .iter()
            .map(|line| v1::order::Line {
                line_id: line.line_id.clone(),
                sku: line.sku.to_string(),
                qty: line.qty,
                unit_price: line.unit_price,
                ordered: line.qty,
                allocated: line.allocated,
                backordered: line.backordered,
                shipped: line.shipped,
                delivered: line.delivered,
                cancelled: line.cancelled,
                returned: line.returned,
            })
            .collect(),
        payment: Some(v1::Payment {
            authorization_id: order.payment.authorization_id.clone(),
            status: match order.payment.status {
                PaymentStatus::Authorized => v1::payment::Status::Authorized,
                PaymentStatus::Pending => v1::payment::Status::Pending,
                PaymentStatus::Declined => v1::payment::Status::Declined,
            } as i32,
            amount: order.payment.amount,
        }),
        method: method_to_wire(order.method),
        pickup_node_id: order.pickup_node_id.clone(),
        status: status_to_wire(order.status) as i32,
        hold_reasons: order
            .hold_reasons
            .iter()
            .map(|reason| {
                (match reason {
                    HoldReason::PaymentNotAuthorized => Wire::PaymentNotAuthorized,
                    HoldReason::AddressIncomplete => Wire::AddressIncomplete,
                    HoldReason::UnknownSku => Wire::UnknownSku,
                    HoldReason::FraudReview => Wire::FraudReview,
                }) as i32
            })
            .collect(),
        exception_reason: order.exception.as_ref().map_or(0, |(reason, _)| reason_to_wire(*reason)),
        exception_detail: order.exception.as_ref().map_or_else(String::new, |(_, detail)| detail.clone()),
        fulfilment_order_ids: order.fulfilment_order_ids.iter().map(ToString::to_string).collect(),
        created_at: Some(timestamp(order.created_at_ms)),
        updated_at: Some(timestamp(order.updated_at_ms)),
        cancel_reason: order.cancel_reason.clone(),
        return_ids: order.return_ids.iter().map(ToString::to_string).collect(),
    }
}

pub fn event_to_wire(event: &AuditEvent) -> v1::Event {
    v1::Event {
        sequence: event.sequence,
        at: Some(timestamp(event.at_ms)),
        r#type: event.event_type.clone(),
        order_id: event.order_id.clone(),
        sku: event.sku.clone(),
        node_id: event.node_id.clone(),
        detail: event.detail.clone(),
        reservation_id: event
            .reservation_id
            .map_or_else(String::new, |id| crate::domain::ReservationId(id).to_string()),
        fulfilment_order_id: event.fulfilment_order_id.clone(),
        return_id: event.return_id.clone(),
        actor: event.actor.clone(),
        qty: event.qty,
    }
}

const PAGE_TOKEN_PREFIX: &str = "after-ord-";

#[tonic::async_trait]
impl v1::orders_server::Orders for OrdersApi {
    type WatchEventsStream = BoxStream<v1::Event>;

    async fn capture_order(
        &self,
        request: Request<v1::CaptureOrderRequest>,
    ) -> Result<Response<v1::Order>, Status> {
        let permit = self.core.admit(Rpc::CaptureOrder)?;
        let result = async {
            let command = parse_capture(request.get_ref(), &self.core)?;
            let order = self.core.orders.capture(command)?.durable().await?;
            Ok(order_to_wire(&order))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn get_order(&self, request: Request<v1::GetOrderRequest>) -> Result<Response<v1::Order>, Status> {
        let permit = self.core.admit(Rpc::GetOrder)?;
        let result = (|| {
            let id = parse_order_id(&request.get_ref().order_id, "order_id")?;
            let order = self.core.orders.order(id).ok_or_else(|| not_found(id))?;
            Ok(order_to_wire(&order))
        })();
        self.core.finish(permit, result)
    }

    async fn list_orders(
        &self,
        request: Request<v1::ListOrdersRequest>,
    ) -> Result<Response<v1::ListOrdersResponse>, Status> {
        let permit = self.core.admit(Rpc::ListOrders)?;
        let result = (|| {
            let raw = request.get_ref();
            let status = status_from_wire(raw.status)?;
            let channel = optional_id(Channel::parse, &raw.channel, "channel")?;
            let limit = match raw.page_size as usize {
                0 => PAGE_LEN_DEFAULT,
                size => size.min(PAGE_LEN_MAX),
            };
            let after = if raw.page_token.is_empty() {
                0
            } else {
                raw.page_token
                    .strip_prefix(PAGE_TOKEN_PREFIX)
                    .and_then(|number| number.parse::<u64>().ok())
                    .ok_or_else(|| invalid("page_token: not a token from a previous ListOrders"))?
            };
            let (orders, next) = self.core.orders.list(status, channel.as_ref(), after, limit);
            Ok(v1::ListOrdersResponse {
                orders: orders.iter().map(order_to_wire).collect(),
                next_page_token: next.map_or_else(String::new, |last| format!("{PAGE_TOKEN_PREFIX}{last}")),
            })
        })();
        self.core.finish(permit, result)
    }

    async fn release_hold(
        &self,
        request: Request<v1::ReleaseHoldRequest>,
    ) -> Result<Response<v1::Order>, Status> {
        let permit = self.core.admit(Rpc::ReleaseHold)?;
        let result = async {
            let id = parse_order_id(&request.get_ref().order_id, "order_id")?;
            let order = self.core.orders.release_hold(id)?.durable().await?;
            Ok(order_to_wire(&order))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn cancel_order(
        &self,
        request: Request<v1::CancelOrderRequest>,
    ) -> Result<Response<v1::Order>, Status> {
        let permit = self.core.admit(Rpc::CancelOrder)?;
        let result = async {
            let raw = request.get_ref();
            let id = parse_order_id(&raw.order_id, "order_id")?;
            let reason = convert::text("reason", &raw.reason, TEXT_BYTES_MAX)?;
            let order = self.core.orders.cancel(id, &reason)?.durable().await?;
            Ok(order_to_wire(&order))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn get_order_history(
        &self,
        request: Request<v1::GetOrderHistoryRequest>,
    ) -> Result<Response<v1::GetOrderHistoryResponse>, Status> {
        let permit = self.core.admit(Rpc::GetOrderHistory)?;
        let result = async {
            let id = parse_order_id(&request.get_ref().order_id, "order_id")?;
            if self.core.orders.order(id).is_none() {
                return Err(not_found(id));
            }
            // The order's last change may still be on its way to disk: wait for it, so the
            // history holds every change a reader has seen.
            let barrier = self.core.index.durable_barrier()?;
            barrier.await.map_err(|_| ServiceError::ShuttingDown)?;
            let store = self.core.store.clone();
            let order_id = id.to_string();
            let events =
                tokio::task::spawn_blocking(move || store.read_order_history(&order_id, HISTORY_LEN_MAX))
                    .await
                    .map_err(|error| ServiceError::Internal(error.to_string()))?
                    .map_err(|error| ServiceError::Internal(error.to_string()))?;
            Ok(v1::GetOrderHistoryResponse { events: events.iter().map(event_to_wire).collect() })
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<BoxStream<v1::Event>>, Status> {
        let permit = self.core.admit(Rpc::WatchEvents)?;
        let result = (|| {
            let raw = request.into_inner();
            if raw.types.len() > EVENT_TYPES_MAX {
                return Err(invalid(format!(
                    "types: {} entries, the limit is {EVENT_TYPES_MAX}",
                    raw.types.len()
                )));
            }
            for (index, event_type) in raw.types.iter().enumerate() {
                let well_formed = event_type.split_once('.').is_some_and(|(entity, change)| {
                    !entity.is_empty()
                        && !change.is_empty()
                        && event_type
                            .bytes()
                            .all(|byte| byte.is_ascii_lowercase() || byte == b'_' || byte == b'.')
                });
                if !well_formed || event_type.len() > 64 {
                    return Err(invalid(format!(
                        "types[{index}]: {} is not an event type (\"<entity>.<change>\", lower case)",
                        quoted(event_type)
                    )));
                }
            }
            let receiver = events::watch_events(
                self.core.store.clone(),
                self.core.index.wal().clone(),
                self.core.events.clone(),
                raw.from_sequence,
                raw.types,
                self.core.watch_out_len_max,
            )?;
            let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
            let stream = tokio_stream::StreamExt::map(stream, |item| match item {
                Ok(event) => Ok(event_to_wire(&event)),
                Err(error) => Err(Status::from(ServiceError::from(error))),
            });
            Ok(Box::pin(stream) as BoxStream<v1::Event>)
        })();
        self.core.finish(permit, result)
    }

    async fn get_stats(
        &self,
        request: Request<v1::GetStatsRequest>,
    ) -> Result<Response<v1::GetStatsResponse>, Status> {
        let permit = self.core.admit(Rpc::GetStats)?;
        let result = (|| {
            let channel = optional_id(Channel::parse, &request.get_ref().channel, "channel")?;
            let stats = self.core.orders.stats(channel.as_ref());
            Ok(v1::GetStatsResponse {
                orders_by_status: stats
                    .by_status
                    .iter()
                    .map(|(status, count)| v1::get_stats_response::StatusCount {
                        status: status_to_wire(*status) as i32,
                        count: *count,
                    })
                    .collect(),
                fill_rate: stats.fill_rate,
                split_rate: stats.split_rate,
                backorder_rate: stats.backorder_rate,
                cycle_time_p50_seconds: stats.cycle_time_p50_seconds,
                cycle_time_p95_seconds: stats.cycle_time_p95_seconds,
                return_rate: stats.return_rate,
                perfect_order_rate: stats.perfect_order_rate,
                orders_total: stats.orders_total,
            })
        })();
        self.core.finish(permit, result)
    }
}

fn not_found(id: OrderId) -> ServiceError {
    ServiceError::Index(crate::index::IndexError::NotFound(format!("order {id} does not exist")))
}
