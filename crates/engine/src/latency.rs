//! Per-path latency: a fixed-bucket histogram (statistics, Prometheus) and a smoothed estimator
//! that sets the path's adaptive timeout (PRODUCT.md §7.3).
//!
//! Both are lock-free and allocation-free on the per-I/O path. Concurrent updates of the estimator
//! may lose a sample now and then; it is an estimate, and that is cheaper than a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in microseconds (the last bucket is unbounded).
pub const BUCKET_BOUNDS_US: [u64; 18] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
const BUCKETS: usize = BUCKET_BOUNDS_US.len() + 1;

#[derive(Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, latency: Duration) {
        let us = latency.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = BUCKET_BOUNDS_US.partition_point(|&bound| bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Counts per bucket (cumulative = false), for exposition.
    pub fn counts(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed))
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    pub fn count(&self) -> u64 {
        self.counts().iter().sum()
    }

    /// The `q` quantile (0..=1) in microseconds, interpolated inside its bucket; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let counts = self.counts();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, &n) in counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if seen + n >= rank {
                let low = if i == 0 { 0 } else { BUCKET_BOUNDS_US[i - 1] };
                let high = BUCKET_BOUNDS_US.get(i).copied().unwrap_or(low * 2);
                let within = (rank - seen) as f64 / n as f64;
                return low + ((high - low) as f64 * within) as u64;
            }
            seen += n;
        }
        *BUCKET_BOUNDS_US.last().unwrap_or(&0)
    }
}

/// Smoothed latency and its mean deviation (Jacobson/Karels, as TCP's retransmission timer), from
/// which a path's adaptive timeout is derived: `smoothed + 4 × deviation`, scaled by a safety factor
/// and clamped between a floor and the configured `io_timeout`.
#[derive(Default)]
pub struct LatencyEstimator {
    smoothed_ns: AtomicU64,
    deviation_ns: AtomicU64,
}

/// Multiplier on the classic `srtt + 4 rttvar` bound: storage latency has heavier tails than
/// network round trips (a flush behind a burst of writes), and a false suspicion costs a probe.
const TIMEOUT_SAFETY_FACTOR: u64 = 4;

impl LatencyEstimator {
    pub fn record(&self, latency: Duration) {
        let sample = latency.as_nanos().min(u128::from(u64::MAX / 8)) as u64;
        let smoothed = self.smoothed_ns.load(Ordering::Relaxed);
        if smoothed == 0 {
            self.smoothed_ns.store(sample.max(1), Ordering::Relaxed);
            self.deviation_ns.store(sample / 2, Ordering::Relaxed);
            return;
        }
        let deviation = self.deviation_ns.load(Ordering::Relaxed);
        let error = smoothed.abs_diff(sample);
        self.deviation_ns
            .store(deviation - deviation / 4 + error / 4, Ordering::Relaxed);
        self.smoothed_ns.store(
            (smoothed - smoothed / 8 + sample / 8).max(1),
            Ordering::Relaxed,
        );
    }

    pub fn smoothed(&self) -> Duration {
        Duration::from_nanos(self.smoothed_ns.load(Ordering::Relaxed))
    }

    /// Whether enough has been seen to trust the estimate.
    pub fn is_primed(&self) -> bool {
        self.smoothed_ns.load(Ordering::Relaxed) != 0
    }

    /// The adaptive deadline for one request on this path.
    pub fn timeout(&self, floor: Duration, ceiling: Duration) -> Duration {
        debug_assert!(floor <= ceiling);
        if !self.is_primed() {
            return ceiling;
        }
        let smoothed = self.smoothed_ns.load(Ordering::Relaxed);
        let deviation = self.deviation_ns.load(Ordering::Relaxed);
        let bound = smoothed
            .saturating_add(deviation.saturating_mul(4))
            .saturating_mul(TIMEOUT_SAFETY_FACTOR);
        Duration::from_nanos(bound).clamp(floor, ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_follow_the_samples() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), 0);
        for _ in 0..99 {
            h.record(Duration::from_micros(80)); // bucket 50..100
        }
        h.record(Duration::from_millis(30)); // bucket 25ms..50ms
        assert_eq!(h.count(), 100);
        let p50 = h.quantile_us(0.5);
        assert!((50..=100).contains(&p50), "p50 {p50}");
        let p99 = h.quantile_us(0.99);
        assert!((50..=100).contains(&p99), "p99 {p99}");
        let p100 = h.quantile_us(1.0);
        assert!((25_000..=50_000).contains(&p100), "max {p100}");
    }

    #[test]
    fn huge_latencies_land_in_the_last_bucket() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_secs(3600));
        assert_eq!(h.counts()[BUCKETS - 1], 1);
        assert!(h.quantile_us(0.5) >= 10_000_000);
    }

    #[test]
    fn adaptive_timeout_tracks_the_path_and_respects_bounds() {
        let e = LatencyEstimator::default();
        let floor = Duration::from_millis(250);
        let ceiling = Duration::from_secs(5);
        assert_eq!(
            e.timeout(floor, ceiling),
            ceiling,
            "unknown path: the configured bound"
        );
        for _ in 0..50 {
            e.record(Duration::from_micros(300));
        }
        assert_eq!(e.timeout(floor, ceiling), floor, "fast path: the floor");
        for _ in 0..50 {
            e.record(Duration::from_millis(400));
        }
        let t = e.timeout(floor, ceiling);
        assert!(
            t > Duration::from_millis(400) && t <= ceiling,
            "slow path: above its latency, {t:?}"
        );
        for _ in 0..50 {
            e.record(Duration::from_secs(30));
        }
        assert_eq!(e.timeout(floor, ceiling), ceiling, "never above io_timeout");
    }
}
