//! What a LUN carries across its own restart, when a live upgrade or a reload starts it again. Its
//! counters do not reset, and a marginal path stays held down for the rest of its hold-down.
//!
//! The rest of the LUN's state has its own way across:
//! - the policy and administrative states are persisted in `state_dir`;
//! - in-doubt ranges are journaled there;
//! - operational statuses come back from the first connection attempts;
//! - the event log belongs to the daemon ([`crate::EventLog::export`]).
//!
//! Times are carried as durations ("held for 5 s more"), never as instants, because the monotonic
//! clock of one process means nothing to the next.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{PathCounters, PathSlot};

/// Bound on the failures remembered per path (only those within the marginal window matter).
const FAILURES_CARRIED_MAX: usize = 64;

/// Serialized as is in a live upgrade's handover document (docs/HANDOVER.md, `luns`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LunCarry {
    /// The size the LUN had: a LUN whose config declares none can start again with every path down.
    pub size_bytes: Option<u64>,
    pub paths: Vec<PathCarry>,
    pub fences_ok: u64,
    pub fences_failed: u64,
}

/// One path, found again by its id.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathCarry {
    pub path_id: u64,
    #[serde(flatten)]
    pub counters: CounterValues,
    /// What is left of a marginal path's hold-down.
    pub hold_left_ms: Option<u64>,
    pub hold_level: u32,
    /// How long ago each recent failure was, oldest first.
    pub failures_ago_ms: Vec<u64>,
    /// How long ago the last failure was.
    pub failure_last_ago_ms: Option<u64>,
    pub ever_online: bool,
    /// The path was failed, and why: it starts failed with this reason (and reconnects in the
    /// background) instead of holding the restart for a connection attempt.
    #[serde(default)]
    pub failed_reason: Option<String>,
}

/// A path's counters ([`PathCounters`]) as plain values.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterValues {
    pub reads: u64,
    pub writes: u64,
    pub ios: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub failovers: u64,
}

impl PathCounters {
    pub(crate) fn values(&self) -> CounterValues {
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            reads: load(&self.reads),
            writes: load(&self.writes),
            ios: load(&self.ios),
            bytes_read: load(&self.bytes_read),
            bytes_written: load(&self.bytes_written),
            errors: load(&self.errors),
            failovers: load(&self.failovers),
        }
    }

    /// Sets every counter to an earlier run's values (a restart that carries them).
    pub(crate) fn restore(&self, v: &CounterValues) {
        for (counter, value) in [
            (&self.reads, v.reads),
            (&self.writes, v.writes),
            (&self.ios, v.ios),
            (&self.bytes_read, v.bytes_read),
            (&self.bytes_written, v.bytes_written),
            (&self.errors, v.errors),
            (&self.failovers, v.failovers),
        ] {
            counter.store(value, Ordering::Relaxed);
        }
    }
}

/// The control task's part of a path's carry (hold-downs and failure history).
#[derive(Debug, Clone, Default)]
pub(crate) struct HealthCarry {
    pub(crate) hold_left: Option<Duration>,
    pub(crate) hold_level: u32,
    pub(crate) failures_ago: Vec<Duration>,
    pub(crate) failure_last_ago: Option<Duration>,
    pub(crate) ever_online: bool,
}

impl HealthCarry {
    pub(crate) fn of(
        hold_until: Option<Instant>,
        hold_level: u32,
        failures: &VecDeque<Instant>,
        failure_last: Option<Instant>,
        ever_online: bool,
        now: Instant,
    ) -> HealthCarry {
        HealthCarry {
            hold_left: hold_until
                .filter(|&t| t > now)
                .map(|t| t.duration_since(now)),
            hold_level,
            failures_ago: failures
                .iter()
                .rev()
                .take(FAILURES_CARRIED_MAX)
                .rev()
                .map(|&t| now.saturating_duration_since(t))
                .collect(),
            failure_last_ago: failure_last.map(|t| now.saturating_duration_since(t)),
            ever_online,
        }
    }
}

pub(crate) fn path_carry(
    slot: &PathSlot,
    health: HealthCarry,
    failed_reason: Option<String>,
) -> PathCarry {
    let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
    PathCarry {
        path_id: slot.id.path_id,
        counters: slot.counters.values(),
        hold_left_ms: health.hold_left.map(ms),
        hold_level: health.hold_level,
        failures_ago_ms: health.failures_ago.into_iter().map(ms).collect(),
        failure_last_ago_ms: health.failure_last_ago.map(ms),
        ever_online: health.ever_online,
        failed_reason,
    }
}

impl PathCarry {
    /// Back to instants of this process's clock.
    pub(crate) fn instants(&self, now: Instant) -> RestoredHealth {
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
        // A hold-down never exceeds its maximum (a corrupt value must not overflow the clock).
        let hold_max_ms = super::control::HOLD_DOWN_MAX.as_millis() as u64;
        RestoredHealth {
            hold_until: self
                .hold_left_ms
                .map(|ms| now + Duration::from_millis(ms.min(hold_max_ms))),
            hold_level: self.hold_level,
            failures: self
                .failures_ago_ms
                .iter()
                .take(FAILURES_CARRIED_MAX)
                .map(|&ms| ago(ms))
                .collect(),
            failure_last: self.failure_last_ago_ms.map(ago),
            ever_online: self.ever_online,
        }
    }
}

pub(crate) struct RestoredHealth {
    pub(crate) hold_until: Option<Instant>,
    pub(crate) hold_level: u32,
    pub(crate) failures: VecDeque<Instant>,
    pub(crate) failure_last: Option<Instant>,
    pub(crate) ever_online: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hold_down_carried_keeps_what_is_left_of_it() {
        let then = Instant::now();
        let failures: VecDeque<Instant> = [then, then + Duration::from_millis(500)].into();
        let carried = HealthCarry::of(
            Some(then + Duration::from_secs(5)),
            2,
            &failures,
            failures.back().copied(),
            true,
            then + Duration::from_secs(1),
        );
        assert_eq!(carried.hold_left, Some(Duration::from_secs(4)));
        assert_eq!(
            carried.failures_ago,
            vec![Duration::from_secs(1), Duration::from_millis(500)]
        );
        let p = PathCarry {
            hold_left_ms: carried.hold_left.map(|d| d.as_millis() as u64),
            hold_level: 2,
            failures_ago_ms: vec![1000, 500],
            ..PathCarry::default()
        };
        let later = Instant::now() + Duration::from_secs(100);
        let back = p.instants(later);
        assert_eq!(back.hold_until, Some(later + Duration::from_secs(4)));
        let corrupt = PathCarry {
            hold_left_ms: Some(u64::MAX),
            ..PathCarry::default()
        };
        let capped = corrupt.instants(later).hold_until.unwrap();
        assert_eq!(capped, later + super::super::control::HOLD_DOWN_MAX);
        assert_eq!(back.failures.len(), 2);
        assert_eq!(back.hold_level, 2);
    }
}
