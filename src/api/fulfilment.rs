//! `allot.v1.Fulfilment`: the work queue of a node, shipments, shortages, deliveries and
//! returns. Idempotent requests remember their encoded response; a replay answers with it.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{self, count, id, invalid, quoted, timestamp};
use super::orders::{address_to_wire, customer_to_wire, method_to_wire, parse_order_id};
use super::{Core, ServiceError};
use crate::domain::{
    FulfilmentOrder, FulfilmentOrderId, FulfilmentStatus, Method, NodeId, Order, Return, ReturnId,
    ReturnStatus, Sku, fingerprint_bytes,
};
use crate::fulfilment::{ReceiveCommand, ReturnCommand, ShipCommand, ShortageCommand};
use crate::index::IndexError;
use crate::metrics::Rpc;
use crate::orders::Outcome;
use crate::proto::v1;

/// Bytes of a free-text field at most (carrier, tracking number, reasons).
const TEXT_BYTES_MAX: usize = 1_024;

pub struct FulfilmentApi {
    core: Arc<Core>,
}

impl FulfilmentApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn parse_fulfilment_id(raw: &str) -> Result<FulfilmentOrderId, ServiceError> {
    if raw.is_empty() {
        return Err(invalid("fulfilment_order_id: must not be empty"));
    }
    FulfilmentOrderId::parse(raw).ok_or_else(|| {
        invalid(format!("fulfilment_order_id: {} is not a fulfilment order id (fo-<number>)", quoted(raw)))
    })
}

fn parse_return_id(raw: &str) -> Result<ReturnId, ServiceError> {
    if raw.is_empty() {
        return Err(invalid("return_id: must not be empty"));
    }
    ReturnId::parse(raw)
        .ok_or_else(|| invalid(format!("return_id: {} is not a return id (ret-<number>)", quoted(raw))))
}

/// An optional idempotency key: empty = none.
fn optional_key(raw: &str) -> Result<String, ServiceError> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    crate::domain::check_id(raw).map_err(|error| invalid(format!("idempotency_key: {error}")))?;
    Ok(raw.to_string())
}

fn fulfilment_status_to_wire(status: FulfilmentStatus) -> v1::fulfilment_order::Status {
    use v1::fulfilment_order::Status;
    match status {
        FulfilmentStatus::Released => Status::Released,
        FulfilmentStatus::PartiallyShipped => Status::PartiallyShipped,
        FulfilmentStatus::Shipped => Status::Shipped,
        FulfilmentStatus::Delivered => Status::Delivered,
        FulfilmentStatus::Cancelled => Status::Cancelled,
    }
}

pub fn fulfilment_to_wire(fo: &FulfilmentOrder, order: &Order) -> v1::FulfilmentOrder {
    v1::FulfilmentOrder {
        fulfilment_order_id: fo.id.to_string(),
        order_id: fo.order_id.to_string(),
        node_id: fo.node_id.to_string(),
        status: fulfilment_status_to_wire(fo.status()) as i32,
        lines: fo
            .lines
            .iter()
            .map(|line| v1::fulfilment_order::Line {
                sku: line.sku.to_string(),
                qty: line.qty,
                shipped: line.shipped,
                short: line.short,
                cancelled: line.cancelled,
            })
            .collect(),
        shipments: fo
            .parcels
            .iter()
            .map(|parcel| v1::fulfilment_order::Shipment {
                carrier: parcel.carrier.clone(),
                tracking_number: parcel.tracking_number.clone(),
                lines: parcel
                    .lines
                    .iter()
                    .map(|(sku, qty)| v1::SkuQty { sku: sku.to_string(), qty: *qty })
                    .collect(),
                shipped_at: Some(timestamp(parcel.shipped_at_ms)),
            })
            .collect(),
        created_at: Some(timestamp(fo.created_at_ms)),
        updated_at: Some(timestamp(fo.updated_at_ms)),
        method: method_to_wire(fo.method),
        ship_to: (fo.method == Method::Ship).then(|| address_to_wire(&order.ship_to)),
        customer: Some(customer_to_wire(&order.customer)),
        reservation_id: fo.reservation_id.to_string(),
    }
}

pub fn return_to_wire(value: &Return) -> v1::Return {
    use v1::r#return::Status;
    v1::Return {
        return_id: value.id.to_string(),
        order_id: value.order_id.to_string(),
        status: match value.status() {
            ReturnStatus::Requested => Status::Requested,
            ReturnStatus::PartiallyReceived => Status::PartiallyReceived,
            ReturnStatus::Received => Status::Received,
        } as i32,
        lines: value
            .lines
            .iter()
            .map(|line| v1::r#return::Line {
                sku: line.sku.to_string(),
                qty: line.qty,
                reason: line.reason.clone(),
                received: line.received,
                resellable: line.resellable,
            })
            .collect(),
        refund_amount: value.refund_amount,
        created_at: Some(timestamp(value.created_at_ms)),
        updated_at: Some(timestamp(value.updated_at_ms)),
    }
}

/// The response of an idempotent RPC: fresh, or the remembered one decoded.
fn answer<T, M: Message + Default>(
    outcome: Outcome<T>,
    fresh: impl FnOnce(T) -> M,
) -> Result<M, ServiceError> {
    match outcome {
        Outcome::Done(value) => Ok(fresh(value)),
        Outcome::Replayed(bytes) => M::decode(&bytes[..]).map_err(|error| {
            ServiceError::Internal(format!("a remembered response does not decode: {error}"))
        }),
    }
}

#[tonic::async_trait]
impl v1::fulfilment_server::Fulfilment for FulfilmentApi {
    async fn list_fulfilment_orders(
        &self,
        request: Request<v1::ListFulfilmentOrdersRequest>,
    ) -> Result<Response<v1::ListFulfilmentOrdersResponse>, Status> {
        let permit = self.core.admit(Rpc::ListFulfilmentOrders)?;
        let result = (|| {
            let raw = request.get_ref();
            let node_id = id(NodeId::parse, &raw.node_id, "node_id")?;
            if self.core.index.nodes().get(&node_id).is_none() {
                return Err(ServiceError::Index(IndexError::NotFound(format!(
                    "node {node_id} does not exist"
                ))));
            }
            use v1::fulfilment_order::Status as Wire;
            let status = match Wire::try_from(raw.status) {
                Ok(Wire::Unspecified) => None,
                Ok(Wire::Released) => Some(FulfilmentStatus::Released),
                Ok(Wire::PartiallyShipped) => Some(FulfilmentStatus::PartiallyShipped),
                Ok(Wire::Shipped) => Some(FulfilmentStatus::Shipped),
                Ok(Wire::Delivered) => Some(FulfilmentStatus::Delivered),
                Ok(Wire::Cancelled) => Some(FulfilmentStatus::Cancelled),
                Err(_) => return Err(invalid(format!("status: unknown value {}", raw.status))),
            };
            let fulfilment_orders = self.core.orders.node_fulfilment_orders(&node_id, status);
            let wire = fulfilment_orders
                .iter()
                .filter_map(|fo| {
                    self.core.orders.order(fo.order_id).map(|order| fulfilment_to_wire(fo, &order))
                })
                .collect();
            Ok(v1::ListFulfilmentOrdersResponse { fulfilment_orders: wire })
        })();
        self.core.finish(permit, result)
    }

    async fn confirm_shipment(
        &self,
        request: Request<v1::ConfirmShipmentRequest>,
    ) -> Result<Response<v1::FulfilmentOrder>, Status> {
        let permit = self.core.admit(Rpc::ConfirmShipment)?;
        let result = async {
            let raw = request.get_ref();
            let fulfilment_order_id = parse_fulfilment_id(&raw.fulfilment_order_id)?;
            crate::domain::check_id(&raw.idempotency_key)
                .map_err(|error| invalid(format!("idempotency_key: {error}")))?;
            if raw.lines.len() > self.core.index.limits().lines_per_request_max {
                return Err(invalid(format!(
                    "lines: {} entries, the limit is {}",
                    raw.lines.len(),
                    self.core.index.limits().lines_per_request_max
                )));
            }
            let mut seen = HashSet::with_capacity(raw.lines.len());
            let mut lines = Vec::with_capacity(raw.lines.len());
            for (index, line) in raw.lines.iter().enumerate() {
                let sku = id(Sku::parse, &line.sku, format_args!("lines[{index}].sku"))?;
                let qty = convert::positive_qty(
                    format_args!("lines[{index}].qty"),
                    line.qty,
                    self.core.index.limits().quantity_max,
                )?;
                if !seen.insert(sku.clone()) {
                    return Err(invalid(format!("lines[{index}].sku: {sku} appears twice")));
                }
                lines.push((sku, qty));
            }
            let command = ShipCommand {
                fulfilment_order_id,
                idempotency_key: raw.idempotency_key.clone(),
                lines,
                carrier: convert::text("carrier", &raw.carrier, TEXT_BYTES_MAX)?,
                tracking_number: convert::text("tracking_number", &raw.tracking_number, TEXT_BYTES_MAX)?,
                fingerprint: fingerprint_bytes(&raw.encode_to_vec()),
            };
            let outcome = self
                .core
                .orders
                .confirm_shipment(&command, |fo, order| fulfilment_to_wire(fo, order).encode_to_vec())?
                .durable()
                .await?;
            answer(outcome, |(fo, order)| fulfilment_to_wire(&fo, &order))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn report_shortage(
        &self,
        request: Request<v1::ReportShortageRequest>,
    ) -> Result<Response<v1::FulfilmentOrder>, Status> {
        let permit = self.core.admit(Rpc::ReportShortage)?;
        let result = async {
            let raw = request.get_ref();
            let command = ShortageCommand {
                fulfilment_order_id: parse_fulfilment_id(&raw.fulfilment_order_id)?,
                sku: id(Sku::parse, &raw.sku, "sku")?,
                missing_qty: convert::positive_qty(
                    "missing_qty",
                    raw.missing_qty,
                    self.core.index.limits().quantity_max,
                )?,
                idempotency_key: optional_key(&raw.idempotency_key)?,
                fingerprint: fingerprint_bytes(&raw.encode_to_vec()),
            };
            let outcome = self
                .core
                .orders
                .report_shortage(&command, |fo, order| fulfilment_to_wire(fo, order).encode_to_vec())?
                .durable()
                .await?;
            answer(outcome, |(fo, order)| fulfilment_to_wire(&fo, &order))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn confirm_delivery(
        &self,
        request: Request<v1::ConfirmDeliveryRequest>,
    ) -> Result<Response<v1::FulfilmentOrder>, Status> {
        let permit = self.core.admit(Rpc::ConfirmDelivery)?;
        let result = async {
            let id = parse_fulfilment_id(&request.get_ref().fulfilment_order_id)?;
            let (fo, order) = self.core.orders.confirm_delivery(id)?.durable().await?;
            Ok(fulfilment_to_wire(&fo, &order))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn create_return(
        &self,
        request: Request<v1::CreateReturnRequest>,
    ) -> Result<Response<v1::Return>, Status> {
        let permit = self.core.admit(Rpc::CreateReturn)?;
        let result = async {
            let raw = request.get_ref();
            let order_id = parse_order_id(&raw.order_id, "order_id")?;
            count("lines", raw.lines.len(), self.core.index.limits().lines_per_request_max)?;
            let mut seen = HashSet::with_capacity(raw.lines.len());
            let mut lines = Vec::with_capacity(raw.lines.len());
            for (index, line) in raw.lines.iter().enumerate() {
                let sku = id(Sku::parse, &line.sku, format_args!("lines[{index}].sku"))?;
                let qty = convert::positive_qty(
                    format_args!("lines[{index}].qty"),
                    line.qty,
                    self.core.index.limits().quantity_max,
                )?;
                if !seen.insert(sku.clone()) {
                    return Err(invalid(format!("lines[{index}].sku: {sku} appears twice")));
                }
                let reason = convert::text(&format!("lines[{index}].reason"), &line.reason, TEXT_BYTES_MAX)?;
                lines.push((sku, qty, reason));
            }
            let command = ReturnCommand {
                order_id,
                lines,
                idempotency_key: optional_key(&raw.idempotency_key)?,
                fingerprint: fingerprint_bytes(&raw.encode_to_vec()),
            };
            let outcome = self
                .core
                .orders
                .create_return(&command, |value| return_to_wire(value).encode_to_vec())?
                .durable()
                .await?;
            answer(outcome, |value| return_to_wire(&value))
        }
        .await;
        self.core.finish(permit, result)
    }

    async fn receive_return(
        &self,
        request: Request<v1::ReceiveReturnRequest>,
    ) -> Result<Response<v1::Return>, Status> {
        let permit = self.core.admit(Rpc::ReceiveReturn)?;
        let result = async {
            let raw = request.get_ref();
            let return_id = parse_return_id(&raw.return_id)?;
            let node_id = id(NodeId::parse, &raw.node_id, "node_id")?;
            count("lines", raw.lines.len(), self.core.index.limits().lines_per_request_max)?;
            let mut lines = Vec::with_capacity(raw.lines.len());
            for (index, line) in raw.lines.iter().enumerate() {
                let sku = id(Sku::parse, &line.sku, format_args!("lines[{index}].sku"))?;
                let qty = convert::positive_qty(
                    format_args!("lines[{index}].qty"),
                    line.qty,
                    self.core.index.limits().quantity_max,
                )?;
                lines.push((sku, qty, line.resellable));
            }
            let command = ReceiveCommand {
                return_id,
                node_id,
                lines,
                idempotency_key: optional_key(&raw.idempotency_key)?,
                fingerprint: fingerprint_bytes(&raw.encode_to_vec()),
            };
            let outcome = self
                .core
                .orders
                .receive_return(&command, |value| return_to_wire(value).encode_to_vec())?
                .durable()
                .await?;
            answer(outcome, |value| return_to_wire(&value))
        }
        .await;
        self.core.finish(permit, result)
    }
}
