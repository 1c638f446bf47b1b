//! Order KPIs (definitions in orders.proto). Kept incrementally: every order write replaces
//! that order's contribution to its channel's aggregate, so GetStats and the gauges never scan
//! the orders (a scan under the book's lock would stall every capture behind it).

use std::collections::{BTreeMap, HashMap};

use super::book::{OrderBook, State};
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

/// What one order adds to its channel's aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Contribution {
    status: usize,
    filled: i64,
    wanted: i64,
    returned: i64,
    shipped: i64,
    routed: i64,
    split: i64,
    backordered: i64,
    delivered: i64,
    perfect: i64,
    cycle_ms: Option<u64>,
}

impl Contribution {
    /// `parcels`: parcels over the order's fulfilment orders.
    pub(crate) fn of(order: &Order, parcels: usize) -> Self {
        let routed = !order.fulfilment_order_ids.is_empty() || order.ever_backordered || order.ever_exception;
        let delivered = order.status == OrderStatus::Delivered;
        let perfect = delivered
            && order.fulfilment_order_ids.len() == 1
            && parcels == 1
            && !order.ever_backordered
            && !order.ever_short
            && !order.ever_exception
            && order.return_ids.is_empty()
            && order.lines.iter().all(|line| line.cancelled == 0 && line.returned == 0);
        let cycle_ms = match (order.status, order.shipped_at_ms) {
            (OrderStatus::Shipped | OrderStatus::Delivered, Some(at)) => {
                Some(at.saturating_sub(order.created_at_ms))
            }
            _ => None,
        };
        Self {
            status: OrderStatus::ALL
                .iter()
                .position(|status| *status == order.status)
                .expect("every status listed"),
            filled: order.lines.iter().map(|line| line.shipped + line.allocated).sum(),
            wanted: order.lines.iter().map(|line| line.qty - line.cancelled).sum(),
            returned: order.lines.iter().map(|line| line.returned).sum(),
            shipped: order.lines.iter().map(|line| line.shipped).sum(),
            routed: i64::from(routed),
            split: i64::from(routed && order.fulfilment_order_ids.len() > 1),
            backordered: i64::from(routed && order.ever_backordered),
            delivered: i64::from(delivered),
            perfect: i64::from(perfect),
            cycle_ms,
        }
    }
}

/// The sums of one channel's contributions.
#[derive(Debug, Clone, Default)]
pub(crate) struct Aggregate {
    by_status: [i64; OrderStatus::ALL.len()],
    filled: i64,
    wanted: i64,
    returned: i64,
    shipped: i64,
    routed: i64,
    split: i64,
    backordered: i64,
    delivered: i64,
    perfect: i64,
    /// Cycle times (ms) of shipped and delivered orders, with their counts.
    cycle_ms: BTreeMap<u64, i64>,
    cycle_count: i64,
}

impl Aggregate {
    pub(crate) fn apply(&mut self, contribution: &Contribution, sign: i64) {
        self.by_status[contribution.status] += sign;
        self.filled += sign * contribution.filled;
        self.wanted += sign * contribution.wanted;
        self.returned += sign * contribution.returned;
        self.shipped += sign * contribution.shipped;
        self.routed += sign * contribution.routed;
        self.split += sign * contribution.split;
        self.backordered += sign * contribution.backordered;
        self.delivered += sign * contribution.delivered;
        self.perfect += sign * contribution.perfect;
        if let Some(ms) = contribution.cycle_ms {
            let count = self.cycle_ms.entry(ms).or_default();
            *count += sign;
            if *count == 0 {
                self.cycle_ms.remove(&ms);
            }
            self.cycle_count += sign;
        }
    }

    fn merge(&mut self, other: &Aggregate) {
        for (mine, theirs) in self.by_status.iter_mut().zip(other.by_status) {
            *mine += theirs;
        }
        self.filled += other.filled;
        self.wanted += other.wanted;
        self.returned += other.returned;
        self.shipped += other.shipped;
        self.routed += other.routed;
        self.split += other.split;
        self.backordered += other.backordered;
        self.delivered += other.delivered;
        self.perfect += other.perfect;
        for (ms, count) in &other.cycle_ms {
            *self.cycle_ms.entry(*ms).or_default() += count;
        }
        self.cycle_count += other.cycle_count;
    }

    /// The nearest-rank percentile of the cycle times, in seconds; 0 for none.
    fn cycle_percentile(&self, fraction: f64) -> f64 {
        if self.cycle_count == 0 {
            return 0.0;
        }
        let rank = ((fraction * self.cycle_count as f64).ceil() as i64).clamp(1, self.cycle_count);
        let mut seen = 0;
        for (ms, count) in &self.cycle_ms {
            seen += count;
            if seen >= rank {
                return *ms as f64 / 1_000.0;
            }
        }
        unreachable!("the counts add up to cycle_count")
    }

    fn stats(&self) -> Stats {
        Stats {
            by_status: OrderStatus::ALL
                .iter()
                .zip(self.by_status)
                .filter(|(_, count)| *count > 0)
                .map(|(status, count)| (*status, count))
                .collect(),
            fill_rate: ratio(self.filled, self.wanted),
            split_rate: ratio(self.split, self.routed),
            backorder_rate: ratio(self.backordered, self.routed),
            cycle_time_p50_seconds: self.cycle_percentile(0.50),
            cycle_time_p95_seconds: self.cycle_percentile(0.95),
            return_rate: ratio(self.returned, self.shipped),
            perfect_order_rate: ratio(self.perfect, self.delivered),
            orders_total: self.by_status.iter().sum(),
        }
    }
}

fn ratio(numerator: i64, denominator: i64) -> f64 {
    if denominator == 0 { 0.0 } else { numerator as f64 / denominator as f64 }
}

/// Parcels over every fulfilment order of `order`.
pub(crate) fn parcel_count(state: &State, order: &Order) -> usize {
    order
        .fulfilment_order_ids
        .iter()
        .filter_map(|id| state.fulfilment.get(&id.0))
        .map(|fo| fo.parcels.len())
        .sum()
}

/// Per channel, the aggregate and each order's last contribution.
#[derive(Debug, Default)]
pub(crate) struct Kpis {
    by_channel: HashMap<Channel, Aggregate>,
    contributions: HashMap<u64, Contribution>,
}

impl Kpis {
    /// Replaces `order`'s contribution (call after every change of the order or of its
    /// fulfilment orders' parcels).
    pub(crate) fn update(&mut self, order: &Order, parcels: usize) {
        let contribution = Contribution::of(order, parcels);
        let aggregate = self.by_channel.entry(order.channel.clone()).or_default();
        if let Some(before) = self.contributions.get(&order.id.0) {
            if *before == contribution {
                return;
            }
            aggregate.apply(before, -1);
        }
        aggregate.apply(&contribution, 1);
        self.contributions.insert(order.id.0, contribution);
    }

    /// Takes a forgotten order out of the KPIs.
    pub(crate) fn remove(&mut self, order: &Order) {
        if let Some(before) = self.contributions.remove(&order.id.0)
            && let Some(aggregate) = self.by_channel.get_mut(&order.channel)
        {
            aggregate.apply(&before, -1);
        }
    }

    fn stats(&self, channel: Option<&Channel>) -> Stats {
        match channel {
            Some(channel) => self.by_channel.get(channel).map(Aggregate::stats).unwrap_or_default(),
            None => {
                let mut total = Aggregate::default();
                for aggregate in self.by_channel.values() {
                    total.merge(aggregate);
                }
                total.stats()
            }
        }
    }
}

impl OrderBook {
    /// KPIs over every order, or one channel's.
    pub fn stats(&self, channel: Option<&Channel>) -> Stats {
        self.lock().kpis.stats(channel)
    }

    /// KPIs per channel (for the metrics gauges): (channel, stats), sorted by channel.
    pub fn stats_by_channel(&self) -> Vec<(Channel, Stats)> {
        let state = self.lock();
        let mut stats: Vec<(Channel, Stats)> = state
            .kpis
            .by_channel
            .iter()
            .map(|(channel, aggregate)| (channel.clone(), aggregate.stats()))
            .collect();
        drop(state);
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SHIPPED order's contribution, shipped `seconds` after capture.
    fn shipped_after(seconds: u64) -> Contribution {
        Contribution {
            status: 5,
            filled: 0,
            wanted: 0,
            returned: 0,
            shipped: 0,
            routed: 0,
            split: 0,
            backordered: 0,
            delivered: 0,
            perfect: 0,
            cycle_ms: Some(seconds * 1_000),
        }
    }

    fn aggregate_of(cycle_seconds: &[u64]) -> Aggregate {
        let mut aggregate = Aggregate::default();
        for seconds in cycle_seconds {
            aggregate.apply(&shipped_after(*seconds), 1);
        }
        aggregate
    }

    #[test]
    fn nearest_rank_percentiles() {
        // Goal: p50/p95 by nearest rank, in seconds, from the counted cycle times. Method:
        // hand-computed examples, with a repeated value.
        assert_eq!(aggregate_of(&[]).cycle_percentile(0.5), 0.0);
        assert_eq!(aggregate_of(&[1]).cycle_percentile(0.95), 1.0);
        let values: Vec<u64> = (1..=20).collect();
        assert_eq!(aggregate_of(&values).cycle_percentile(0.5), 10.0);
        assert_eq!(aggregate_of(&values).cycle_percentile(0.95), 19.0);
        assert_eq!(aggregate_of(&[3, 3, 3, 9]).cycle_percentile(0.5), 3.0);
        assert_eq!(aggregate_of(&[3, 3, 3, 9]).cycle_percentile(0.95), 9.0);
    }

    #[test]
    fn replacing_a_contribution_leaves_no_trace() {
        // Goal: adding then removing contributions returns the aggregate to empty (no stale
        // cycle-time entries). Method: add two, remove both.
        let mut aggregate = aggregate_of(&[4, 7]);
        for seconds in [4, 7] {
            aggregate.apply(&shipped_after(seconds), -1);
        }
        assert!(aggregate.cycle_ms.is_empty());
        assert_eq!(aggregate.cycle_count, 0);
        assert_eq!(aggregate.by_status.iter().sum::<i64>(), 0);
    }
}
