//! `allot.v1.Routing`: Route (a quote) and Allocate (plan and reserve atomically).
//! HOT PATH: parse, admit, call the index, await the group commit (Allocate), reply.

use std::collections::HashSet;
use std::sync::Arc;

use prost::Message;
use tonic::{Request, Response, Status};

use super::convert::{self, count, id, invalid, optional_id, timestamp};
use super::{Core, ServiceError};
use crate::domain::{Channel, IdempotencyKey, Limits, NodeId, ReservationId, Sku, fingerprint_bytes};
use crate::index::{AllocateCommand, AllocateOutcome};
use crate::metrics::Rpc;
use crate::proto::v1;
use crate::routing::{
    Destination, ExplanationReason, RouteOptions, RoutePlan, RouteRequest, UnroutableReason,
};
use crate::store::keys::IdemNamespace;

/// Bytes of a free-text field at most.
const TEXT_BYTES_MAX: usize = 1_024;

pub struct RoutingApi {
    core: Arc<Core>,
}

impl RoutingApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

#[tonic::async_trait]
impl v1::routing_server::Routing for RoutingApi {
    async fn route(&self, request: Request<v1::RouteRequest>) -> Result<Response<v1::RoutePlan>, Status> {
        let permit = self.core.admit(Rpc::Route)?;
        let result = (|| {
            let raw = request.into_inner();
            let request = parse_route(
                &raw.lines,
                raw.ship_to.as_ref(),
                &raw.channel,
                raw.method,
                &raw.pickup_node_id,
                raw.options.as_ref(),
                self.core.index.limits(),
            )?;
            let plan = self.core.index.route(&request)?;
            Ok(plan_to_wire(&plan))
        })();
        self.core.finish(permit, result)
    }

    async fn allocate(
        &self,
        request: Request<v1::AllocateRequest>,
    ) -> Result<Response<v1::AllocateResponse>, Status> {
        let permit = self.core.admit(Rpc::Allocate)?;
        let result = async {
            let mut raw = request.into_inner();
            let limits = self.core.index.limits();
            let idempotency_key = id(IdempotencyKey::parse, &raw.idempotency_key, "idempotency_key")?;
            if raw.ttl_ms > limits.ttl_ms_max {
                return Err(invalid(format!(
                    "ttl_ms: {} is above the maximum of {}",
                    raw.ttl_ms, limits.ttl_ms_max
                )));
            }
            let reference = convert::text("reference", &raw.reference, TEXT_BYTES_MAX)?;
            let route = parse_route(
                &raw.lines,
                raw.ship_to.as_ref(),
                &raw.channel,
                raw.method,
                &raw.pickup_node_id,
                raw.options.as_ref(),
                limits,
            )?;
            // The digest covers everything but the key itself.
            raw.idempotency_key.clear();
            let fingerprint = fingerprint_bytes(&raw.encode_to_vec());
            let command = AllocateCommand {
                idempotency_key,
                request: route,
                ttl_ms: raw.ttl_ms,
                reference,
                fingerprint,
            };
            // The response is built once: encoded for replays by the index, and sent as is.
            let mut built: Option<v1::AllocateResponse> = None;
            let encode = |plan: &RoutePlan, reservation: ReservationId, expires_at_ms: Option<u64>| {
                let response = allocate_response(plan, reservation, expires_at_ms);
                let bytes = response.encode_to_vec();
                built = Some(response);
                bytes
            };
            let outcome = self.core.index.allocate(&command, encode)?.durable().await?;
            Ok(match outcome {
                AllocateOutcome::Reserved { plan, reservation, expires_at_ms } => {
                    built.take().unwrap_or_else(|| allocate_response(&plan, reservation, expires_at_ms))
                }
                AllocateOutcome::Unreserved { plan } => v1::AllocateResponse {
                    plan: Some(plan_to_wire(&plan)),
                    reservation_id: String::new(),
                    expires_at: None,
                },
                AllocateOutcome::Replayed => self.replayed(command.idempotency_key.as_str()).await?,
            })
        }
        .await;
        self.core.finish(permit, result)
    }
}

impl RoutingApi {
    /// The original response of a replayed Allocate, read back from the store (a replay is
    /// rare; keeping every response in memory for the retention period is not).
    async fn replayed(&self, key: &str) -> Result<v1::AllocateResponse, ServiceError> {
        let store = self.core.store.clone();
        let key = key.to_string();
        let record =
            tokio::task::spawn_blocking(move || store.read_idempotency(IdemNamespace::Allocate, &key))
                .await
                .map_err(|error| ServiceError::Internal(error.to_string()))?
                .map_err(|error| ServiceError::Internal(error.to_string()))?
                .ok_or_else(|| {
                    ServiceError::Internal("a remembered allocation has no stored response".into())
                })?;
        v1::AllocateResponse::decode(&record.response[..])
            .map_err(|error| ServiceError::Internal(error.to_string()))
    }
}

fn allocate_response(
    plan: &RoutePlan,
    reservation: ReservationId,
    expires_at_ms: Option<u64>,
) -> v1::AllocateResponse {
    v1::AllocateResponse {
        plan: Some(plan_to_wire(plan)),
        reservation_id: reservation.to_string(),
        expires_at: expires_at_ms.map(timestamp),
    }
}

/// Parses the fields Route and Allocate share.
pub fn parse_route(
    lines: &[v1::SkuQty],
    ship_to: Option<&v1::Location>,
    channel: &str,
    method: i32,
    pickup_node_id: &str,
    options: Option<&v1::RouteOptions>,
    limits: &Limits,
) -> Result<RouteRequest, ServiceError> {
    count("lines", lines.len(), limits.lines_per_request_max)?;
    let mut seen = HashSet::with_capacity(lines.len());
    let mut parsed = Vec::with_capacity(lines.len());
    for (index, line) in lines.iter().enumerate() {
        let sku = id(Sku::parse, &line.sku, format_args!("lines[{index}].sku"))?;
        let qty = convert::positive_qty(format_args!("lines[{index}].qty"), line.qty, limits.quantity_max)?;
        if !seen.insert(sku.clone()) {
            return Err(invalid(format!("lines[{index}].sku: {sku} appears on two lines")));
        }
        parsed.push((sku, qty));
    }
    let channel = optional_id(Channel::parse, channel, "channel")?;
    let destination = match v1::Method::try_from(method) {
        Ok(v1::Method::Unspecified | v1::Method::Ship) => {
            let location = ship_to.ok_or_else(|| invalid("ship_to: is required for SHIP"))?;
            if !(-90.0..=90.0).contains(&location.lat) {
                return Err(invalid(format!("ship_to.lat: {} is outside [-90, 90]", location.lat)));
            }
            if !(-180.0..=180.0).contains(&location.lon) {
                return Err(invalid(format!("ship_to.lon: {} is outside [-180, 180]", location.lon)));
            }
            Destination::Ship { lat: location.lat, lon: location.lon }
        }
        Ok(v1::Method::Pickup) => {
            if pickup_node_id.is_empty() {
                return Err(invalid("pickup_node_id: is required for PICKUP"));
            }
            Destination::Pickup { node_id: id(NodeId::parse, pickup_node_id, "pickup_node_id")? }
        }
        Err(_) => return Err(invalid(format!("method: {method} is not SHIP or PICKUP"))),
    };
    let options = options.copied().unwrap_or_default();
    Ok(RouteRequest {
        lines: parsed,
        destination,
        channel,
        options: RouteOptions {
            max_shipments: options.max_shipments as usize,
            allow_partial: options.allow_partial,
            allow_backorder: options.allow_backorder,
        },
    })
}

pub fn plan_to_wire(plan: &RoutePlan) -> v1::RoutePlan {
    use v1::route_plan::{Explanation, Shipment, Unroutable, explanation};
    let sku_qty = |(sku, qty): &(Sku, i64)| v1::SkuQty { sku: sku.to_string(), qty: *qty };
    v1::RoutePlan {
        shipments: plan
            .shipments
            .iter()
            .map(|shipment| Shipment {
                node_id: shipment.node_id.to_string(),
                lines: shipment.lines.iter().map(sku_qty).collect(),
                cost: shipment.cost,
                distance_km: shipment.distance_km,
                estimated_days: shipment.estimated_days,
            })
            .collect(),
        backordered: plan.backordered.iter().map(sku_qty).collect(),
        unroutable: plan
            .unroutable
            .iter()
            .map(|entry| Unroutable {
                sku: entry.sku.to_string(),
                qty: entry.qty,
                reason: reason_to_wire(entry.reason),
                detail: entry.detail.clone(),
            })
            .collect(),
        total_cost: plan.total_cost,
        explanation: plan
            .explanation
            .iter()
            .map(|entry| Explanation {
                node_id: entry.node_id.to_string(),
                considered: entry.considered,
                reason: match entry.reason {
                    ExplanationReason::Selected => explanation::Reason::Selected,
                    ExplanationReason::NotSelected => explanation::Reason::NotSelected,
                    ExplanationReason::Disabled => explanation::Reason::Disabled,
                    ExplanationReason::CannotShip => explanation::Reason::CannotShip,
                    ExplanationReason::CannotPickup => explanation::Reason::CannotPickup,
                    ExplanationReason::ChannelNotAllowed => explanation::Reason::ChannelNotAllowed,
                    ExplanationReason::CapacityExhausted => explanation::Reason::CapacityExhausted,
                    ExplanationReason::NoAtp => explanation::Reason::NoAtp,
                    ExplanationReason::NotPickupNode => explanation::Reason::NotPickupNode,
                } as i32,
                sku: entry.sku.as_ref().map(ToString::to_string).unwrap_or_default(),
                detail: String::new(),
            })
            .collect(),
        optimal: plan.optimal,
        objective: plan.objective,
        objective_lower_bound: plan.objective_lower_bound,
    }
}

/// The wire value of an unroutable reason.
pub fn reason_to_wire(reason: UnroutableReason) -> i32 {
    use v1::route_plan::unroutable;
    (match reason {
        UnroutableReason::NoStock => unroutable::Reason::NoStock,
        UnroutableReason::NoEligibleNode => unroutable::Reason::NoEligibleNode,
        UnroutableReason::PickupNodeLacksStock => unroutable::Reason::PickupNodeLacksStock,
        UnroutableReason::CapacityExhausted => unroutable::Reason::CapacityExhausted,
        UnroutableReason::ChannelNotAllowed => unroutable::Reason::ChannelNotAllowed,
        UnroutableReason::PickupNodeUnavailable => unroutable::Reason::PickupNodeUnavailable,
        UnroutableReason::MaxShipmentsExceeded => unroutable::Reason::MaxShipmentsExceeded,
        UnroutableReason::PartialNotAllowed => unroutable::Reason::PartialNotAllowed,
    }) as i32
}
