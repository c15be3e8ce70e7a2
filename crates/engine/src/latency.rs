//! Per-path latency: a fixed-bucket histogram (statistics, Prometheus) and a smoothed estimator
//! that sets the path's adaptive timeout (docs/GUARANTEES.md G3).
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

/// How fast a path drains what is queued on it, in bytes per second, from completions: a request's
/// latency covers the bytes that were in flight ahead of it plus its own (a path serves its queue
/// roughly in order), so `(ahead + own) / latency` samples the path's throughput. Only samples that
/// moved enough bytes to be dominated by transfer, not by per-request latency, are taken.
///
/// Used for deadlines that grow with the data a request must wait for and move (a 32 MiB write on a
/// 64 MiB/s path is not hung after 250 ms), and for the bound on bytes in flight per path.
#[derive(Default)]
pub struct ThroughputEstimator {
    bytes_per_sec: AtomicU64,
}

/// Samples moving fewer bytes than this say little about bandwidth.
pub const THROUGHPUT_SAMPLE_BYTES_MIN: u64 = 256 << 10;
/// Deadlines allow this many times the expected transfer time: bandwidth varies (other tenants, TCP
/// slow start after idle), and a false suspicion costs a re-drive.
const TRANSFER_SAFETY_FACTOR: u64 = 3;

impl ThroughputEstimator {
    pub fn record(&self, bytes_moved: u64, latency: Duration) {
        if bytes_moved < THROUGHPUT_SAMPLE_BYTES_MIN {
            return;
        }
        let ns = latency.as_nanos().clamp(1, u128::from(u64::MAX)) as u64;
        let sample = (u128::from(bytes_moved) * 1_000_000_000 / u128::from(ns))
            .clamp(1, u128::from(u64::MAX >> 4)) as u64;
        let old = self.bytes_per_sec.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old - old / 4 + sample / 4
        };
        self.bytes_per_sec.store(new.max(1), Ordering::Relaxed);
    }

    /// Bytes per second, once measured.
    pub fn rate(&self) -> Option<u64> {
        match self.bytes_per_sec.load(Ordering::Relaxed) {
            0 => None,
            r => Some(r),
        }
    }

    /// Time to allow for moving `bytes` at the measured rate (with a safety factor); `None` while the
    /// rate is unknown.
    pub fn allowance(&self, bytes: u64) -> Option<Duration> {
        let rate = self.rate()?;
        let ns = u128::from(bytes) * 1_000_000_000 * u128::from(TRANSFER_SAFETY_FACTOR)
            / u128::from(rate);
        Some(Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64))
    }

    /// Time `bytes` take at the measured rate, without margin.
    pub fn expected(&self, bytes: u64) -> Option<Duration> {
        let rate = self.rate()?;
        let ns = u128::from(bytes) * 1_000_000_000 / u128::from(rate);
        Some(Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64))
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
    fn throughput_is_learned_from_large_transfers_only() {
        let t = ThroughputEstimator::default();
        assert_eq!(t.rate(), None);
        assert_eq!(t.allowance(1 << 20), None);
        t.record(4096, Duration::from_micros(50));
        assert_eq!(
            t.rate(),
            None,
            "a small request says nothing about bandwidth"
        );
        // 32 MiB in 0.5 s: 64 MiB/s.
        t.record(32 << 20, Duration::from_millis(500));
        assert_eq!(t.rate(), Some(64 << 20));
        assert_eq!(t.expected(32 << 20), Some(Duration::from_millis(500)));
        assert_eq!(t.allowance(32 << 20), Some(Duration::from_millis(1500)));
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
