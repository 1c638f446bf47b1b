//! Every command except the file imports: one function per command, each a call (or a few)
//! to the daemon and its rendering, as a table for people or one JSON document with `--json`.
//!
//! Arguments arrive checked: clap runs the parsers here (`id_value`, `parse_reserve_line`, ...)
//! before anything connects, so a bad argument is exit 2 and never a round trip. Must not
//! parse files (that is `import`) or decide exit codes (`failure`).

use std::path::Path;
use std::time::Duration;

use allot::domain::{Limits, check_id};
use allot::proto::v1;
use serde_json::json;
use tonic::Code;

use crate::client::Context;
use crate::failure::{Failure, Outcome};
use crate::output::{self, Table, print_fields, print_json, time_text};

/// clap parser of an id argument (SKU, node, key, channel): the daemon's identifier rule.
pub fn id_value(raw: &str) -> Result<String, String> {
    check_id(raw).map(|()| raw.to_string()).map_err(|error| error.to_string())
}

/// clap parser of a stock delta: a whole number, not 0.
pub fn delta_value(raw: &str) -> Result<i64, String> {
    match raw.parse::<i64>() {
        Ok(0) => Err("must not be 0".into()),
        Ok(delta) => Ok(delta),
        Err(_) => Err(format!("{raw:?} is not a whole number")),
    }
}

/// clap parser of an order status name (case-insensitive).
pub fn order_status_value(raw: &str) -> Result<v1::order::Status, String> {
    v1::order::Status::from_str_name(&raw.to_ascii_uppercase())
        .filter(|status| *status != v1::order::Status::Unspecified)
        .ok_or_else(|| "not an order status (HELD, ALLOCATED, BACKORDERED, EXCEPTION, ...)".to_string())
}

// ----- nodes, stock, availability ------------------------------------------------------------

pub async fn nodes_list(context: &Context) -> Result<Outcome, Failure> {
    let response = context.call(context.inventory().list_nodes(v1::ListNodesRequest {})).await?;
    if context.json {
        print_json(&json!({ "nodes": response.nodes.iter().map(output::node_json).collect::<Vec<_>>() }));
        return Ok(Outcome::Done);
    }
    let mut table = Table::new(&[
        "NODE_ID",
        "TYPE",
        "LAT",
        "LON",
        "ENABLED",
        "SHIP",
        "PICKUP",
        "CAPACITY",
        "DAYS",
        "PRIORITY",
        "BASE_COST",
        "COST_PER_KM",
        "COST_PER_UNIT",
        "SAFETY",
        "CHANNELS",
    ]);
    for node in &response.nodes {
        let location = node.location.unwrap_or_default();
        let rates = node.rates.unwrap_or_default();
        table.row(vec![
            node.node_id.clone(),
            output::node_type_name(node.r#type).to_string(),
            location.lat.to_string(),
            location.lon.to_string(),
            yes_no(node.enabled),
            yes_no(node.can_ship),
            yes_no(node.can_pickup),
            node.daily_capacity.to_string(),
            node.processing_days.to_string(),
            node.priority.to_string(),
            rates.base_cost.to_string(),
            rates.cost_per_km.to_string(),
            rates.cost_per_unit.to_string(),
            node.default_safety_stock.to_string(),
            if node.channels.is_empty() { "*".to_string() } else { node.channels.join(";") },
        ]);
    }
    table.print();
    Ok(Outcome::Done)
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

pub async fn stock_adjust(
    context: &Context,
    adjustment_id: &str,
    sku: &str,
    node_id: &str,
    delta: i64,
    reason: &str,
) -> Result<Outcome, Failure> {
    assert_ne!(delta, 0, "delta_value refuses 0");
    let request = v1::AdjustStockRequest {
        adjustment_id: adjustment_id.to_string(),
        entries: vec![v1::StockAdjustment {
            sku: sku.to_string(),
            node_id: node_id.to_string(),
            delta,
            reason: reason.to_string(),
        }],
    };
    let response = context.call(context.inventory().adjust_stock(request)).await?;
    if context.json {
        print_json(&json!({
            "adjustment_id": adjustment_id,
            "positions": response.positions.iter().map(output::position_json).collect::<Vec<_>>(),
        }));
    } else {
        let mut table = Table::new(&["SKU", "NODE", "ON_HAND", "RESERVED", "SAFETY", "ATP"]);
        for position in &response.positions {
            table.row(vec![
                position.sku.clone(),
                position.node_id.clone(),
                position.on_hand.to_string(),
                position.reserved.to_string(),
                position.safety_stock.to_string(),
                position.atp.to_string(),
            ]);
        }
        table.print();
    }
    Ok(Outcome::Done)
}

pub async fn atp(
    context: &Context,
    skus: &[String],
    channel: Option<&str>,
    node_ids: &[String],
) -> Result<Outcome, Failure> {
    let channel = channel.unwrap_or_default().to_string();
    let mut items = Vec::with_capacity(skus.len());
    // The daemon answers at most `skus_per_query_max` SKUs per request.
    for chunk in skus.chunks(Limits::default().skus_per_query_max) {
        let request = v1::GetAvailabilityRequest {
            skus: chunk.to_vec(),
            channel: channel.clone(),
            node_ids: node_ids.to_vec(),
        };
        items.extend(context.call(context.inventory().get_availability(request)).await?.items);
    }
    if context.json {
        print_json(&json!({ "items": items.iter().map(output::availability_item_json).collect::<Vec<_>>() }));
        return Ok(Outcome::Done);
    }
    let mut table = Table::new(&["SKU", "NODE", "ON_HAND", "RESERVED", "SAFETY", "ATP"]);
    for item in &items {
        for position in &item.nodes {
            table.row(vec![
                item.sku.clone(),
                position.node_id.clone(),
                position.on_hand.to_string(),
                position.reserved.to_string(),
                position.safety_stock.to_string(),
                position.atp.to_string(),
            ]);
        }
        let total = vec![item.sku.clone(), "(total)".into(), String::new(), String::new(), String::new()];
        table.row([total, vec![item.total_atp.to_string()]].concat());
    }
    table.print();
    Ok(Outcome::Done)
}

// ----- reservations --------------------------------------------------------------------------

/// `SKU:NODE:QTY`, split from the right: a SKU may contain `:`, a node id may not.
pub fn parse_reserve_line(raw: &str) -> Result<v1::ReserveLine, String> {
    let mut parts = raw.rsplitn(3, ':');
    let (Some(qty), Some(node_id), Some(sku)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("{raw:?}: expected SKU:NODE:QTY"));
    };
    check_id(sku).map_err(|error| format!("{raw:?}: SKU {error}"))?;
    check_id(node_id).map_err(|error| format!("{raw:?}: NODE {error}"))?;
    let qty: i64 = qty.parse().map_err(|_| format!("{raw:?}: QTY {qty:?} is not a whole number"))?;
    if qty <= 0 {
        return Err(format!("{raw:?}: QTY must be positive"));
    }
    Ok(v1::ReserveLine { sku: sku.to_string(), node_id: node_id.to_string(), qty })
}

pub async fn reserve(
    context: &Context,
    key: &str,
    ttl_ms: u64,
    reference: &str,
    channel: Option<&str>,
    lines: &[v1::ReserveLine],
) -> Result<Outcome, Failure> {
    let channel = channel.unwrap_or_default().to_string();
    let request = v1::ReserveRequest {
        idempotency_key: key.to_string(),
        lines: lines.to_vec(),
        ttl_ms,
        reference: reference.to_string(),
        channel,
    };
    let response = context.call(context.inventory().reserve(request)).await?;
    let reserved = response.status == v1::reserve_response::Status::Reserved as i32;
    if context.json {
        print_json(&output::reserve_response_json(&response));
    } else if reserved {
        print_fields(&[
            ("reservation_id", response.reservation_id.clone()),
            ("status", "RESERVED".into()),
            ("expires_at", time_text(response.expires_at.as_ref())),
        ]);
    } else {
        output::out("INSUFFICIENT: nothing is held\n");
        let mut table = Table::new(&["SKU", "NODE", "REQUESTED", "AVAILABLE"]);
        for shortfall in &response.shortfalls {
            table.row(vec![
                shortfall.sku.clone(),
                shortfall.node_id.clone(),
                shortfall.requested.to_string(),
                shortfall.available.to_string(),
            ]);
        }
        table.print();
    }
    Ok(if reserved { Outcome::Done } else { Outcome::Insufficient })
}

/// What to do with a reservation.
pub enum ReservationAction {
    Show,
    Release,
    Confirm { reference: String },
    Extend { ttl_ms: u64 },
}

pub async fn reservation(
    context: &Context,
    reservation_id: &str,
    action: ReservationAction,
) -> Result<Outcome, Failure> {
    let id = reservation_id.to_string();
    let mut inventory = context.inventory();
    let reservation = match action {
        ReservationAction::Show => {
            context.call(inventory.get_reservation(v1::GetReservationRequest { reservation_id: id })).await?
        }
        ReservationAction::Release => {
            context
                .call(inventory.release_reservation(v1::ReleaseReservationRequest { reservation_id: id }))
                .await?
        }
        ReservationAction::Confirm { reference } => {
            let request = v1::ConfirmReservationRequest { reservation_id: id, reference };
            context.call(inventory.confirm_reservation(request)).await?
        }
        ReservationAction::Extend { ttl_ms } => {
            let request = v1::ExtendReservationRequest { reservation_id: id, ttl_ms };
            context.call(inventory.extend_reservation(request)).await?
        }
    };
    if context.json {
        print_json(&output::reservation_json(&reservation));
        return Ok(Outcome::Done);
    }
    print_fields(&[
        ("reservation_id", reservation.reservation_id.clone()),
        ("status", output::reservation_status_name(reservation.status).to_string()),
        ("reference", reservation.reference.clone()),
        ("channel", reservation.channel.clone()),
        ("idempotency_key", reservation.idempotency_key.clone()),
        ("created_at", time_text(reservation.created_at.as_ref())),
        ("expires_at", time_text(reservation.expires_at.as_ref())),
        ("updated_at", time_text(reservation.updated_at.as_ref())),
    ]);
    let mut table = Table::new(&["SKU", "NODE", "QTY"]);
    for line in &reservation.lines {
        table.row(vec![line.sku.clone(), line.node_id.clone(), line.qty.to_string()]);
    }
    output::out("\n");
    table.print();
    Ok(Outcome::Done)
}

// ----- orders and events ---------------------------------------------------------------------

pub async fn order_show(context: &Context, order_id: &str) -> Result<Outcome, Failure> {
    let request = v1::GetOrderRequest { order_id: order_id.to_string() };
    let order = context.call(context.orders().get_order(request)).await?;
    if context.json {
        print_json(&output::order_json(&order));
        return Ok(Outcome::Done);
    }
    let document = output::order_json(&order);
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    print_fields(&[
        ("order_id", order.order_id.clone()),
        ("channel", order.channel.clone()),
        ("external_order_id", order.external_order_id.clone()),
        ("status", output::order_status_name(order.status).to_string()),
        ("hold_reasons", text(&document["hold_reasons"])),
        ("exception", format!("{} {}", text(&document["exception_reason"]), order.exception_detail)),
        ("method", text(&document["method"])),
        ("pickup_node_id", order.pickup_node_id.clone()),
        ("customer_id", text(&document["customer"]["customer_id"])),
        (
            "payment",
            format!("{} {}", text(&document["payment"]["status"]), text(&document["payment"]["amount"])),
        ),
        ("fulfilment_orders", order.fulfilment_order_ids.join(" ")),
        ("returns", order.return_ids.join(" ")),
        ("cancel_reason", order.cancel_reason.clone()),
        ("created_at", time_text(order.created_at.as_ref())),
        ("updated_at", time_text(order.updated_at.as_ref())),
    ]);
    let mut table = Table::new(&[
        "LINE",
        "SKU",
        "QTY",
        "UNIT_PRICE",
        "ALLOCATED",
        "BACKORDERED",
        "SHIPPED",
        "DELIVERED",
        "CANCELLED",
        "RETURNED",
    ]);
    for line in &order.lines {
        table.row(vec![
            line.line_id.clone(),
            line.sku.clone(),
            line.qty.to_string(),
            line.unit_price.to_string(),
            line.allocated.to_string(),
            line.backordered.to_string(),
            line.shipped.to_string(),
            line.delivered.to_string(),
            line.cancelled.to_string(),
            line.returned.to_string(),
        ]);
    }
    output::out("\n");
    table.print();
    Ok(Outcome::Done)
}

pub async fn order_history(context: &Context, order_id: &str) -> Result<Outcome, Failure> {
    let request = v1::GetOrderHistoryRequest { order_id: order_id.to_string() };
    let history = context.call(context.orders().get_order_history(request)).await?;
    if context.json {
        print_json(&json!({
            "order_id": order_id,
            "events": history.events.iter().map(output::event_json).collect::<Vec<_>>(),
        }));
    } else {
        let text: String = history.events.iter().map(|event| output::event_text(event) + "\n").collect();
        output::out(&text);
    }
    Ok(Outcome::Done)
}

/// Orders per ListOrders page at most (the daemon caps pages at 1,000).
const ORDERS_PAGE_LEN_MAX: usize = 1_000;

pub async fn order_list(
    context: &Context,
    status: Option<v1::order::Status>,
    channel: Option<&str>,
    limit: usize,
) -> Result<Outcome, Failure> {
    let status = status.unwrap_or(v1::order::Status::Unspecified);
    let channel = channel.unwrap_or_default().to_string();
    let mut orders = Vec::new();
    let mut page_token = String::new();
    let mut orders_client = context.orders();
    while orders.len() < limit {
        let request = v1::ListOrdersRequest {
            status: status as i32,
            channel: channel.clone(),
            page_size: (limit - orders.len()).min(ORDERS_PAGE_LEN_MAX) as u32,
            page_token: page_token.clone(),
        };
        let page = context.call(orders_client.list_orders(request)).await?;
        orders.extend(page.orders);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    orders.truncate(limit);
    if context.json {
        print_json(&json!({ "orders": orders.iter().map(output::order_json).collect::<Vec<_>>() }));
        return Ok(Outcome::Done);
    }
    let mut table =
        Table::new(&["ORDER_ID", "CHANNEL", "EXTERNAL_ORDER_ID", "STATUS", "LINES", "UNITS", "CREATED_AT"]);
    for order in &orders {
        table.row(vec![
            order.order_id.clone(),
            order.channel.clone(),
            order.external_order_id.clone(),
            output::order_status_name(order.status).to_string(),
            order.lines.len().to_string(),
            order.lines.iter().map(|line| line.qty).sum::<i64>().to_string(),
            time_text(order.created_at.as_ref()),
        ]);
    }
    table.print();
    Ok(Outcome::Done)
}

/// How `events tail` decides it is done.
pub struct TailOptions {
    pub from_sequence: u64,
    pub types: Vec<String>,
    /// Keep following live events until interrupted.
    pub follow: bool,
    /// Without `follow`: stop once no event arrived for this long (the replay is caught up).
    pub idle: Duration,
    /// Stop after this many events (0 = no limit).
    pub limit: u64,
}

pub async fn events_tail(context: &Context, options: TailOptions) -> Result<Outcome, Failure> {
    let request = v1::WatchEventsRequest { from_sequence: options.from_sequence, types: options.types };
    let mut stream = context.call(context.orders().watch_events(request)).await?;
    let mut printed = 0u64;
    loop {
        if options.limit > 0 && printed >= options.limit {
            return Ok(Outcome::Done);
        }
        let next = if options.follow {
            stream.message().await
        } else {
            match tokio::time::timeout(options.idle, stream.message()).await {
                Ok(next) => next,
                // Nothing new for `idle`: what existed has been printed.
                Err(_elapsed) => return Ok(Outcome::Done),
            }
        };
        match next {
            Ok(Some(event)) => {
                if context.json {
                    output::print_json_line(&output::event_json(&event));
                } else {
                    output::out(&(output::event_text(&event) + "\n"));
                }
                printed += 1;
            }
            Ok(None) if options.follow => {
                return Err(Failure::Status(tonic::Status::unavailable("the daemon ended the event stream")));
            }
            Ok(None) => return Ok(Outcome::Done),
            Err(status) => return Err(status.into()),
        }
    }
}

pub async fn stats(context: &Context, channel: Option<&str>) -> Result<Outcome, Failure> {
    let channel = channel.unwrap_or_default().to_string();
    let stats = context.call(context.orders().get_stats(v1::GetStatsRequest { channel })).await?;
    if context.json {
        print_json(&output::stats_json(&stats));
        return Ok(Outcome::Done);
    }
    let by_status: Vec<String> = stats
        .orders_by_status
        .iter()
        .map(|count| format!("{}={}", output::order_status_name(count.status), count.count))
        .collect();
    print_fields(&[
        ("orders_total", stats.orders_total.to_string()),
        ("orders_by_status", by_status.join(" ")),
        ("fill_rate", format!("{:.4}", stats.fill_rate)),
        ("split_rate", format!("{:.4}", stats.split_rate)),
        ("backorder_rate", format!("{:.4}", stats.backorder_rate)),
        ("return_rate", format!("{:.4}", stats.return_rate)),
        ("perfect_order_rate", format!("{:.4}", stats.perfect_order_rate)),
        ("cycle_time_p50_seconds", format!("{:.3}", stats.cycle_time_p50_seconds)),
        ("cycle_time_p95_seconds", format!("{:.3}", stats.cycle_time_p95_seconds)),
    ]);
    Ok(Outcome::Done)
}

// ----- daemon operations ---------------------------------------------------------------------

/// Makes `dir` absolute against allotctl's working directory: the daemon resolves nothing,
/// and an operator typing `allotctl backup nightly` means the directory they are in.
pub fn backup_dir_absolute(dir: &Path) -> Result<String, Failure> {
    let absolute = std::path::absolute(dir).map_err(|error| {
        Failure::Usage(format!("DIR {}: cannot make it absolute: {error}", dir.display()))
    })?;
    absolute
        .into_os_string()
        .into_string()
        .map_err(|raw| Failure::Usage(format!("DIR {}: not UTF-8", raw.to_string_lossy())))
}

/// `dir` is absolute already (`backup_dir_absolute`, before connecting).
pub async fn backup(context: &Context, dir: String) -> Result<Outcome, Failure> {
    let backup = context.call(context.admin().backup(v1::BackupRequest { dir })).await?;
    if context.json {
        print_json(&output::backup_json(&backup));
        return Ok(Outcome::Done);
    }
    print_fields(&[
        ("dir", backup.dir.clone()),
        ("taken_at", time_text(backup.taken_at.as_ref())),
        ("files", backup.files.to_string()),
        ("bytes", backup.bytes.to_string()),
        ("last_sequence", backup.last_sequence.to_string()),
        ("last_event_sequence", backup.last_event_sequence.to_string()),
    ]);
    Ok(Outcome::Done)
}

pub async fn check(context: &Context, listed_max: u32) -> Result<Outcome, Failure> {
    let report = context.call(context.admin().check(v1::CheckRequest { listed_max })).await?;
    let outcome = if report.clean { Outcome::Done } else { Outcome::Inconsistent };
    if context.json {
        print_json(&json!({
            "clean": report.clean,
            "positions_checked": report.positions_checked,
            "reservations_checked": report.reservations_checked,
            "orders_checked": report.orders_checked,
            "drift_count": report.drift_count,
            "drift": report.drift.iter().map(|drift| json!({
                "sku": drift.sku,
                "node_id": drift.node_id,
                "reserved": drift.reserved,
                "held": drift.held,
            })).collect::<Vec<_>>(),
            "problems": report.problems,
            "elapsed_us": report.elapsed_us,
        }));
        return Ok(outcome);
    }
    print_fields(&[
        ("clean", report.clean.to_string()),
        ("positions_checked", report.positions_checked.to_string()),
        ("reservations_checked", report.reservations_checked.to_string()),
        ("orders_checked", report.orders_checked.to_string()),
        ("drift_count", report.drift_count.to_string()),
        ("elapsed_us", report.elapsed_us.to_string()),
    ]);
    for drift in &report.drift {
        println!(
            "drift: {} at {}: reserved {} but open reservations hold {}",
            drift.sku, drift.node_id, drift.reserved, drift.held
        );
    }
    for problem in &report.problems {
        println!("problem: {problem}");
    }
    Ok(outcome)
}

pub async fn health(context: &Context, service: &str) -> Result<Outcome, Failure> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let request = tonic_health::pb::HealthCheckRequest { service: service.to_string() };
    let response = match context.call_status(context.health().check(request)).await {
        Ok(response) => response,
        Err(status) if status.code() == Code::NotFound => {
            return Err(Failure::Status(tonic::Status::not_found(format!(
                "no health status for service {service:?}"
            ))));
        }
        Err(status) => return Err(status.into()),
    };
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    if context.json {
        print_json(&json!({ "service": service, "status": status.as_str_name() }));
    } else {
        output::out(&format!("{}\n", status.as_str_name()));
    }
    Ok(if status == ServingStatus::Serving { Outcome::Done } else { Outcome::NotServing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_lines_split_from_the_right() {
        // Goal: SKU:NODE:QTY parses with ':' inside the SKU, and bad lines are refused.
        // Method: table of inputs.
        let line = parse_reserve_line("A:B:C:N0:3").unwrap();
        assert_eq!((line.sku.as_str(), line.node_id.as_str(), line.qty), ("A:B:C", "N0", 3));
        for bad in ["A:N0", "A:N0:0", "A:N0:-1", "A:N0:x", ":N0:1", "A::1", "A B:N0:1"] {
            assert!(parse_reserve_line(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
