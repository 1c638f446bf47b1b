//! The open-loop arrival schedule: request i is due at start + i / rate, whatever the answers.
//! Integer nanosecond arithmetic, so the schedule never drifts however long the run. Pure: no
//! clock, no I/O.

use std::time::Duration;

const NANOS_PER_SECOND: u128 = 1_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    rate_per_second: u64,
}

impl Schedule {
    pub fn new(rate_per_second: u64) -> Self {
        assert!(rate_per_second > 0);
        Schedule { rate_per_second }
    }

    /// When request `index` is due, from the start of the schedule (rounded down to the ns).
    pub fn due(&self, index: u64) -> Duration {
        let nanos = u128::from(index) * NANOS_PER_SECOND / u128::from(self.rate_per_second);
        Duration::from_nanos(u64::try_from(nanos).expect("schedule beyond 584 years"))
    }

    /// How many requests are due strictly before `offset`: the index of the first request due
    /// at or after it.
    pub fn due_before(&self, offset: Duration) -> u64 {
        // Request i is due before t  <=>  floor(i * 1e9 / rate) < t_ns  <=>  i * 1e9 < t_ns * rate
        // (t_ns an integer)  <=>  i < ceil(t_ns * rate / 1e9).
        let scaled = offset.as_nanos() * u128::from(self.rate_per_second);
        u64::try_from(scaled.div_ceil(NANOS_PER_SECOND)).expect("schedule beyond u64 requests")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_due_at_index_over_rate() {
        // Goal: request i is due at i / rate exactly. Method: known points at 1,000/s, 3/s and
        // 7/s, including one far into a long run where float arithmetic would drift.
        let per_ms = Schedule::new(1_000);
        assert_eq!(per_ms.due(0), Duration::ZERO);
        assert_eq!(per_ms.due(1), Duration::from_millis(1));
        assert_eq!(per_ms.due(2_500), Duration::from_millis(2_500));
        let thirds = Schedule::new(3);
        assert_eq!(thirds.due(1), Duration::from_nanos(333_333_333));
        assert_eq!(thirds.due(3), Duration::from_secs(1));
        assert_eq!(thirds.due(3 * 86_400 * 365), Duration::from_secs(86_400 * 365));
        assert_eq!(Schedule::new(7).due(7_000_000_001), Duration::from_nanos(1_000_000_000_142_857_142));
    }

    #[test]
    fn due_before_counts_the_requests_of_a_window() {
        // Goal: due_before is the inverse of due, so a window's scheduled count is exact.
        // Method: for several rates and indexes, request i is due before due(i) + 1 ns and not
        // before due(i); a 10 s window at 2,000/s holds 20,000 requests.
        for rate in [1, 3, 7, 1_000, 33_333, 1_000_000] {
            let schedule = Schedule::new(rate);
            for index in [0, 1, 2, 10, 999, 123_456] {
                let due = schedule.due(index);
                assert_eq!(schedule.due_before(due), index, "rate {rate} index {index}");
                assert_eq!(schedule.due_before(due + Duration::from_nanos(1)), index + 1);
            }
        }
        let schedule = Schedule::new(2_000);
        let window =
            schedule.due_before(Duration::from_secs(11)) - schedule.due_before(Duration::from_secs(1));
        assert_eq!(window, 20_000);
    }
}
