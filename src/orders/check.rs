//! The order book's part of the consistency checker (see `Index::check_consistency`).

use super::book::OrderBook;

impl OrderBook {
    /// Adds the order book's invariants to `report`: line counters add up; each order's
    /// allocated units equal what its open fulfilment orders have left to ship; each open
    /// fulfilment order's reservation is open and holds exactly that, and a finished one's is
    /// closed. Holds the book's lock (fulfilment reservations change only under it).
    pub fn check_consistency(&self, report: &mut crate::index::ConsistencyReport, listed_max: usize) {
        use crate::domain::Bucket;
        let state = self.lock();
        for order in state.orders.values() {
            report.orders_checked += 1;
            for line in &order.lines {
                let counters_ok = line.unrouted() >= 0
                    && line.allocated >= 0
                    && line.backordered >= 0
                    && line.cancelled >= 0
                    && line.delivered <= line.shipped
                    && line.returned <= line.shipped;
                if !counters_ok {
                    report.problem(
                        listed_max,
                        format!("order {} line {}: counters do not add up", order.id, line.line_id),
                    );
                }
            }
            for sku in order.skus() {
                let remaining: i64 = order
                    .fulfilment_order_ids
                    .iter()
                    .filter_map(|id| state.fulfilment.get(&id.0))
                    .filter_map(|fo| fo.line(&sku))
                    .map(|line| line.remaining())
                    .sum();
                let allocated = order.units(&sku, Bucket::Allocated);
                if remaining != allocated {
                    report.problem(
                        listed_max,
                        format!("order {}: {allocated} units of {sku} allocated, {remaining} left on its fulfilment orders", order.id),
                    );
                }
            }
        }
        for fo in state.fulfilment.values() {
            let reservation = self.index.reservation(fo.reservation_id);
            match (fo.remaining() > 0, reservation) {
                (true, None) => {
                    report.problem(
                        listed_max,
                        format!("fulfilment order {}: reservation {} is missing", fo.id, fo.reservation_id),
                    );
                }
                (true, Some(reservation)) => {
                    if !reservation.status.is_open() {
                        report.problem(
                            listed_max,
                            format!(
                                "fulfilment order {} has units to ship but reservation {} is closed",
                                fo.id, reservation.id
                            ),
                        );
                    }
                    for line in &fo.lines {
                        let held: i64 = reservation
                            .lines
                            .iter()
                            .filter(|held| held.sku == line.sku)
                            .map(|held| held.qty)
                            .sum();
                        if held != line.remaining() {
                            report.problem(
                                listed_max,
                                format!(
                                    "fulfilment order {}: {} of {} left to ship, reservation {} holds {held}",
                                    fo.id,
                                    line.remaining(),
                                    line.sku,
                                    reservation.id
                                ),
                            );
                        }
                    }
                }
                (false, Some(reservation)) if reservation.status.is_open() => {
                    report.problem(
                        listed_max,
                        format!(
                            "fulfilment order {} is finished but reservation {} is still open",
                            fo.id, reservation.id
                        ),
                    );
                }
                (false, _) => {}
            }
        }
    }
}
