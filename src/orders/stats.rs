//! Order KPIs, computed from the orders the book holds (definitions in orders.proto).

use super::book::OrderBook;
use crate::domain::{Channel, Order, OrderStatus};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Statuses with at least one order, in enum order.
    pub by_status: Vec<(OrderStatus, i64)>,
    pub fill_rate: f64,
    pub split_rate: f64,
    pub backorder_rate: f64,
    pub cycle_time_p50_seconds: f64,
    pub cycle_time_p95_seconds: f64,
    pub return_rate: f64,
    pub perfect_order_rate: f64,
    pub orders_total: i64,
}

fn ratio(numerator: i64, denominator: i64) -> f64 {
    if denominator == 0 { 0.0 } else { numerator as f64 / denominator as f64 }
}

/// The nearest-rank percentile of sorted values; 0 for none.
fn percentile(sorted: &[u64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((fraction * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1_000.0
}

/// Whether routing was attempted (the order left HELD at least once).
fn routed(order: &Order) -> bool {
    !order.fulfilment_order_ids.is_empty() || order.ever_backordered || order.ever_exception
}

/// Computes the KPIs over `orders`; `parcels` counts the parcels of an order's one
/// fulfilment order (a perfect order shipped in exactly one).
pub fn compute<'a>(orders: impl Iterator<Item = &'a Order>, parcels: impl Fn(&Order) -> usize) -> Stats {
    let mut by_status = [0i64; OrderStatus::ALL.len()];
    let (mut filled, mut wanted) = (0i64, 0i64);
    let (mut routed_orders, mut split, mut backordered) = (0i64, 0i64, 0i64);
    let (mut returned, mut shipped) = (0i64, 0i64);
    let (mut delivered_orders, mut perfect) = (0i64, 0i64);
    let mut cycle_ms = Vec::new();
    let mut total = 0;
    for order in orders {
        total += 1;
        by_status[OrderStatus::ALL
            .iter()
            .position(|status| *status == order.status)
            .expect("every status listed")] += 1;
        for line in &order.lines {
            filled += line.shipped + line.allocated;
            wanted += line.qty - line.cancelled;
            returned += line.returned;
            shipped += line.shipped;
        }
        if routed(order) {
            routed_orders += 1;
            split += i64::from(order.fulfilment_order_ids.len() > 1);
            backordered += i64::from(order.ever_backordered);
        }
        if matches!(order.status, OrderStatus::Shipped | OrderStatus::Delivered)
            && let Some(shipped_at_ms) = order.shipped_at_ms
        {
            cycle_ms.push(shipped_at_ms.saturating_sub(order.created_at_ms));
        }
        if order.status == OrderStatus::Delivered {
            delivered_orders += 1;
            let clean = order.fulfilment_order_ids.len() == 1
                && parcels(order) == 1
                && !order.ever_backordered
                && !order.ever_short
                && !order.ever_exception
                && order.return_ids.is_empty()
                && order.lines.iter().all(|line| line.cancelled == 0 && line.returned == 0);
            perfect += i64::from(clean);
        }
    }
    cycle_ms.sort_unstable();
    Stats {
        by_status: OrderStatus::ALL
            .iter()
            .zip(by_status)
            .filter(|(_, count)| *count > 0)
            .map(|(status, count)| (*status, count))
            .collect(),
        fill_rate: ratio(filled, wanted),
        split_rate: ratio(split, routed_orders),
        backorder_rate: ratio(backordered, routed_orders),
        cycle_time_p50_seconds: percentile(&cycle_ms, 0.50),
        cycle_time_p95_seconds: percentile(&cycle_ms, 0.95),
        return_rate: ratio(returned, shipped),
        perfect_order_rate: ratio(perfect, delivered_orders),
        orders_total: total,
    }
}

/// Parcels over every fulfilment order of `order`.
fn parcel_count(state: &super::book::State, order: &Order) -> usize {
    order
        .fulfilment_order_ids
        .iter()
        .filter_map(|id| state.fulfilment.get(&id.0))
        .map(|fo| fo.parcels.len())
        .sum()
}

impl OrderBook {
    /// KPIs over every order, or one channel's.
    pub fn stats(&self, channel: Option<&Channel>) -> Stats {
        let state = self.lock();
        let parcels = |order: &Order| parcel_count(&state, order);
        compute(
            state.orders.values().filter(|order| channel.is_none_or(|channel| order.channel == *channel)),
            parcels,
        )
    }

    /// KPIs per channel (for the metrics gauges): (channel, stats).
    pub fn stats_by_channel(&self) -> Vec<(Channel, Stats)> {
        let state = self.lock();
        let mut channels: Vec<Channel> = state.orders.values().map(|order| order.channel.clone()).collect();
        channels.sort();
        channels.dedup();
        channels
            .into_iter()
            .map(|channel| {
                let parcels = |order: &Order| parcel_count(&state, order);
                let stats = compute(state.orders.values().filter(|order| order.channel == channel), parcels);
                (channel, stats)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        // Goal: p50/p95 by nearest rank, in seconds. Method: hand-computed examples.
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[1_000], 0.95), 1.0);
        let values: Vec<u64> = (1..=20).map(|second| second * 1_000).collect();
        assert_eq!(percentile(&values, 0.5), 10.0);
        assert_eq!(percentile(&values, 0.95), 19.0);
    }
}
