//! Rendering answers: aligned tables and key/value blocks for people, JSON for scripts.
//!
//! Owns stdout (a closed pipe, e.g. `| head`, ends the process quietly with exit 0) and the
//! JSON shape of every proto message allotctl prints: the proto's snake_case field names,
//! enums by name, timestamps as RFC 3339 strings (null when absent). Must not call the daemon.

use std::io::Write;

use allot::proto::v1;
use serde_json::{Value, json};

/// Writes to stdout; a reader that went away (EPIPE) ends the process with exit 0.
pub fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
    if let Err(error) = written {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("allotctl: writing to stdout: {error}");
    }
}

/// One JSON document, pretty-printed (for a whole command's answer).
pub fn print_json(value: &Value) {
    out(&format!("{value:#}\n"));
}

/// One JSON object on one line (for streams such as `events tail`).
pub fn print_json_line(value: &Value) {
    out(&format!("{value}\n"));
}

/// A table with a header row; numbers are right-aligned, everything else left-aligned.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Table {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "a row has one cell per column");
        self.rows.push(cells);
    }

    pub fn print(&self) {
        let mut widths: Vec<usize> = self.header.iter().map(|title| title.len()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        let header: Vec<String> = self.header.iter().map(|title| title.to_string()).collect();
        render_row(&mut text, &header, &widths, false);
        for row in &self.rows {
            render_row(&mut text, row, &widths, true);
        }
        out(&text);
    }
}

fn render_row(text: &mut String, cells: &[String], widths: &[usize], align_numbers: bool) {
    let mut line = String::new();
    for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if index > 0 {
            line.push_str("  ");
        }
        let is_number = align_numbers && !cell.is_empty() && cell.parse::<f64>().is_ok();
        if is_number {
            line.push_str(&format!("{cell:>width$}"));
        } else {
            line.push_str(&format!("{cell:<width$}"));
        }
    }
    text.push_str(line.trim_end());
    text.push('\n');
}

/// `name: value` lines with the values aligned; an empty value shows as `-`.
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (name, value) in fields {
        let value = if value.trim().is_empty() { "-" } else { value.trim() };
        text.push_str(&format!("{:<width$}  {value}\n", format!("{name}:"), width = width + 1));
    }
    out(&text);
}

/// An optional timestamp for people: RFC 3339, or `-`.
pub fn time_text(timestamp: Option<&prost_types::Timestamp>) -> String {
    timestamp.map_or_else(|| "-".to_string(), ToString::to_string)
}

/// An optional timestamp for scripts: an RFC 3339 string or null.
pub fn time_json(timestamp: Option<&prost_types::Timestamp>) -> Value {
    timestamp.map_or(Value::Null, |timestamp| Value::String(timestamp.to_string()))
}

pub fn node_type_name(value: i32) -> &'static str {
    v1::node::Type::try_from(value).map_or("UNKNOWN", |kind| kind.as_str_name())
}

pub fn reservation_status_name(value: i32) -> &'static str {
    v1::reservation::Status::try_from(value).map_or("UNKNOWN", |status| status.as_str_name())
}

pub fn order_status_name(value: i32) -> &'static str {
    v1::order::Status::try_from(value).map_or("UNKNOWN", |status| status.as_str_name())
}

pub fn node_json(node: &v1::Node) -> Value {
    let location = node.location.unwrap_or_default();
    let rates = node.rates.unwrap_or_default();
    json!({
        "node_id": node.node_id,
        "type": node_type_name(node.r#type),
        "location": { "lat": location.lat, "lon": location.lon },
        "enabled": node.enabled,
        "can_ship": node.can_ship,
        "can_pickup": node.can_pickup,
        "daily_capacity": node.daily_capacity,
        "processing_days": node.processing_days,
        "priority": node.priority,
        "rates": {
            "base_cost": rates.base_cost,
            "cost_per_km": rates.cost_per_km,
            "cost_per_unit": rates.cost_per_unit,
        },
        "default_safety_stock": node.default_safety_stock,
        "channels": node.channels,
    })
}

pub fn position_json(position: &v1::Position) -> Value {
    let mut value = json!({
        "node_id": position.node_id,
        "on_hand": position.on_hand,
        "reserved": position.reserved,
        "safety_stock": position.safety_stock,
        "atp": position.atp,
    });
    if !position.sku.is_empty() {
        value["sku"] = json!(position.sku);
    }
    value
}

pub fn availability_item_json(item: &v1::AvailabilityItem) -> Value {
    json!({
        "sku": item.sku,
        "total_atp": item.total_atp,
        "nodes": item.nodes.iter().map(position_json).collect::<Vec<_>>(),
    })
}

pub fn reserve_line_json(line: &v1::ReserveLine) -> Value {
    json!({ "sku": line.sku, "node_id": line.node_id, "qty": line.qty })
}

pub fn reservation_json(reservation: &v1::Reservation) -> Value {
    json!({
        "reservation_id": reservation.reservation_id,
        "status": reservation_status_name(reservation.status),
        "lines": reservation.lines.iter().map(reserve_line_json).collect::<Vec<_>>(),
        "reference": reservation.reference,
        "channel": reservation.channel,
        "idempotency_key": reservation.idempotency_key,
        "created_at": time_json(reservation.created_at.as_ref()),
        "expires_at": time_json(reservation.expires_at.as_ref()),
        "updated_at": time_json(reservation.updated_at.as_ref()),
    })
}

pub fn reserve_response_json(response: &v1::ReserveResponse) -> Value {
    let status = v1::reserve_response::Status::try_from(response.status)
        .map_or("UNKNOWN", |status| status.as_str_name());
    json!({
        "reservation_id": response.reservation_id,
        "status": status,
        "shortfalls": response.shortfalls.iter().map(|shortfall| json!({
            "sku": shortfall.sku,
            "node_id": shortfall.node_id,
            "requested": shortfall.requested,
            "available": shortfall.available,
        })).collect::<Vec<_>>(),
        "expires_at": time_json(response.expires_at.as_ref()),
    })
}

pub fn order_json(order: &v1::Order) -> Value {
    let hold_reasons: Vec<&str> = order
        .hold_reasons
        .iter()
        .map(|&reason| {
            v1::order::HoldReason::try_from(reason).map_or("UNKNOWN", |reason| reason.as_str_name())
        })
        .collect();
    let exception_reason = v1::route_plan::unroutable::Reason::try_from(order.exception_reason)
        .map_or("UNKNOWN", |reason| reason.as_str_name());
    let method = v1::Method::try_from(order.method).map_or("UNKNOWN", |method| method.as_str_name());
    let customer = order.customer.clone().unwrap_or_default();
    let ship_to = order.ship_to.clone().unwrap_or_default();
    let payment = order.payment.clone().unwrap_or_default();
    let payment_status =
        v1::payment::Status::try_from(payment.status).map_or("UNKNOWN", |status| status.as_str_name());
    json!({
        "order_id": order.order_id,
        "channel": order.channel,
        "external_order_id": order.external_order_id,
        "status": order_status_name(order.status),
        "hold_reasons": hold_reasons,
        "exception_reason": exception_reason,
        "exception_detail": order.exception_detail,
        "customer": {
            "customer_id": customer.customer_id,
            "name": customer.name,
            "email": customer.email,
        },
        "ship_to": {
            "line1": ship_to.line1,
            "line2": ship_to.line2,
            "city": ship_to.city,
            "region": ship_to.region,
            "postal_code": ship_to.postal_code,
            "country": ship_to.country,
            "lat": ship_to.lat,
            "lon": ship_to.lon,
        },
        "payment": {
            "authorization_id": payment.authorization_id,
            "status": payment_status,
            "amount": payment.amount,
        },
        "method": method,
        "pickup_node_id": order.pickup_node_id,
        "lines": order.lines.iter().map(|line| json!({
            "line_id": line.line_id,
            "sku": line.sku,
            "qty": line.qty,
            "unit_price": line.unit_price,
            "ordered": line.ordered,
            "allocated": line.allocated,
            "backordered": line.backordered,
            "shipped": line.shipped,
            "delivered": line.delivered,
            "cancelled": line.cancelled,
            "returned": line.returned,
        })).collect::<Vec<_>>(),
        "fulfilment_order_ids": order.fulfilment_order_ids,
        "return_ids": order.return_ids,
        "cancel_reason": order.cancel_reason,
        "created_at": time_json(order.created_at.as_ref()),
        "updated_at": time_json(order.updated_at.as_ref()),
    })
}

pub fn event_json(event: &v1::Event) -> Value {
    json!({
        "sequence": event.sequence,
        "at": time_json(event.at.as_ref()),
        "type": event.r#type,
        "order_id": event.order_id,
        "sku": event.sku,
        "node_id": event.node_id,
        "reservation_id": event.reservation_id,
        "fulfilment_order_id": event.fulfilment_order_id,
        "return_id": event.return_id,
        "actor": event.actor,
        "qty": event.qty,
        "detail": event.detail,
    })
}

/// One event on one line for people: sequence, time, type, the ids it names, detail.
pub fn event_text(event: &v1::Event) -> String {
    let mut text = format!("{:>8}  {}  {}", event.sequence, time_text(event.at.as_ref()), event.r#type);
    let named = [
        ("order", &event.order_id),
        ("reservation", &event.reservation_id),
        ("fulfilment", &event.fulfilment_order_id),
        ("return", &event.return_id),
        ("sku", &event.sku),
        ("node", &event.node_id),
        ("actor", &event.actor),
    ];
    for (name, value) in named {
        if !value.is_empty() {
            text.push_str(&format!(" {name}={value}"));
        }
    }
    if event.qty != 0 {
        text.push_str(&format!(" qty={}", event.qty));
    }
    if !event.detail.is_empty() {
        text.push_str(&format!("  {}", event.detail));
    }
    text
}

pub fn stats_json(stats: &v1::GetStatsResponse) -> Value {
    let by_status: serde_json::Map<String, Value> = stats
        .orders_by_status
        .iter()
        .map(|count| (order_status_name(count.status).to_string(), json!(count.count)))
        .collect();
    json!({
        "orders_total": stats.orders_total,
        "orders_by_status": by_status,
        "fill_rate": stats.fill_rate,
        "split_rate": stats.split_rate,
        "backorder_rate": stats.backorder_rate,
        "return_rate": stats.return_rate,
        "perfect_order_rate": stats.perfect_order_rate,
        "cycle_time_p50_seconds": stats.cycle_time_p50_seconds,
        "cycle_time_p95_seconds": stats.cycle_time_p95_seconds,
    })
}

pub fn backup_json(backup: &v1::BackupResponse) -> Value {
    json!({
        "dir": backup.dir,
        "last_sequence": backup.last_sequence,
        "last_event_sequence": backup.last_event_sequence,
        "files": backup.files,
        "bytes": backup.bytes,
        "taken_at": time_json(backup.taken_at.as_ref()),
    })
}
