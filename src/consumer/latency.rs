//! A latency histogram with fixed buckets, lock-free: many tasks record into it while a metrics
//! scrape or a summary reads it. Pure, no I/O.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the buckets, in milliseconds (Prometheus `le`); one more bucket holds the
/// rest.
pub const BOUNDS_MS: [u64; 14] = [
    5, 10, 25, 50, 75, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000,
];

/// Counts per bucket, and the sum.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BOUNDS_MS.len() + 1],
    sum_ms: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, latency: Duration) {
        let ms = latency.as_millis().min(u128::from(u64::MAX)) as u64;
        let bucket = BOUNDS_MS.partition_point(|&bound| bound < ms);
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_ms.fetch_add(ms, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Sum of the observations, in milliseconds.
    pub fn sum_ms(&self) -> u64 {
        self.sum_ms.load(Relaxed)
    }

    /// Cumulative counts per bound (`le`), then the total (`+Inf`), as Prometheus wants them.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Relaxed);
            out.push((BOUNDS_MS.get(i).copied(), total));
        }
        out
    }

    /// The bucket bound under which a `q` share (0..=1) of the observations fall: an upper
    /// estimate of the quantile. `None` when empty; `u64::MAX` when it lies past the last bound.
    pub fn quantile_bound_ms(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        self.cumulative()
            .into_iter()
            .find(|(_, cumulative)| *cumulative >= rank)
            .map(|(bound, _)| bound.unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        for ms in [0, 5, 6, 100, 101, 70_000] {
            h.record(Duration::from_millis(ms));
        }
        let c = h.cumulative();
        assert_eq!(c[0], (Some(5), 2), "0 and 5 are <= 5");
        assert_eq!(c[1], (Some(10), 3));
        assert_eq!(c[5], (Some(100), 4));
        assert_eq!(c[6], (Some(250), 5));
        assert_eq!(*c.last().unwrap(), (None, 6));
        assert_eq!(h.count(), 6);
        assert_eq!(h.sum_ms(), 5 + 6 + 100 + 101 + 70_000);
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Histogram::default();
        assert_eq!(h.quantile_bound_ms(0.5), None);
        for _ in 0..98 {
            h.record(Duration::from_millis(20));
        }
        h.record(Duration::from_millis(400));
        h.record(Duration::from_millis(90_000));
        assert_eq!(h.quantile_bound_ms(0.5), Some(25));
        assert_eq!(h.quantile_bound_ms(0.98), Some(25));
        assert_eq!(h.quantile_bound_ms(0.99), Some(500));
        assert_eq!(h.quantile_bound_ms(1.0), Some(u64::MAX));
    }
}
