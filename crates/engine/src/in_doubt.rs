//! In-doubt writes (PRODUCT.md §7.3).
//!
//! A write that was in flight on a path that hung or broke may or may not have reached the storage,
//! and a *hung* target may still apply it later, whenever it resumes. Two holds keep that from
//! corrupting data:
//!
//! 1. **Re-drive hold.** Before such a write is re-driven on another path the old path is fenced (its
//!    connection closed); while the re-driven write runs, its range is in doubt and *any* later I/O
//!    that overlaps it waits, so it is ordered after the re-drive.
//! 2. **Quarantine** (hung paths only). Closing our end of a connection does not stop a stalled target
//!    from executing the requests it already holds when it resumes — the stale copy of the write then
//!    lands on top of whatever was written since (the demo caught exactly that: blocks went back to
//!    older generations after a hung port was released). So after the re-drive completes, the range
//!    stays quarantined for *writes* until the fenced path has reconnected and answered a probe (a
//!    resumed target has worked off its backlog by then) or, if it never returns, until a bound passes.
//!    Reads are not held by a quarantine: the stale copy carries the same data as the completed
//!    re-drive, so a read sees the right data before and after it lands.
//!
//! Linux dm-multipath, NVMe multipath and SPDK do neither (SPDK #3593; NVMe's CQT is unimplemented).
//! The quarantine narrows the window to "a target that resumes *after* the bound, or after answering
//! a new connection's probe while still holding old requests"; closing it fully needs target-side
//! fencing (persistent reservations), which NBD does not have.
//!
//! The table is tiny and almost always empty: the data path checks one atomic counter and takes the
//! lock only while something is in doubt. The lock is a plain mutex, never held across an `.await`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Bound on ranges in doubt at once: every request in flight on every path of a LUN (paths ×
/// in-flight limit).
pub const IN_DOUBT_RANGES_MAX: usize = 64 * 256;

/// Why a range is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// A re-driven write is running: every overlapping request waits.
    Redrive,
    /// The re-drive completed, but the hung path it came from may still apply the old copy: writes
    /// wait until that path is back (`release_path`) or `until`.
    Quarantine { path: usize, until: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InDoubtRange {
    pub id: u64,
    pub offset: u64,
    pub length: u64,
    pub hold: Hold,
}

impl InDoubtRange {
    fn overlaps(&self, offset: u64, length: u64) -> bool {
        let end = offset.saturating_add(length);
        let own_end = self.offset.saturating_add(self.length);
        offset < own_end && self.offset < end
    }

    /// Whether this hold makes a request over `offset..offset+length` wait.
    fn blocks(&self, offset: u64, length: u64, writes: bool) -> bool {
        match self.hold {
            // A zero-length request (FLUSH) overlaps nothing by range, but must be ordered after every
            // running re-drive: a flush promises durability of everything acknowledged before it.
            Hold::Redrive => length == 0 || self.overlaps(offset, length),
            Hold::Quarantine { .. } => writes && length != 0 && self.overlaps(offset, length),
        }
    }
}

#[derive(Default)]
pub struct InDoubtTable {
    ranges: Mutex<Vec<InDoubtRange>>,
    count: AtomicUsize,
    next_id: AtomicU64,
    changed: Notify,
    /// Cumulative number of writes that were ever in doubt (statistics).
    total: AtomicU64,
}

/// Holds one range in doubt while its re-drive runs; dropping it releases every I/O waiting on it.
pub struct InDoubtGuard<'a> {
    table: &'a InDoubtTable,
    id: u64,
}

impl InDoubtTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `offset..offset+length` in doubt (re-drive hold) until the guard is dropped.
    pub fn register(&self, offset: u64, length: u64) -> InDoubtGuard<'_> {
        let id = self.insert(offset, length, Hold::Redrive);
        self.total.fetch_add(1, Ordering::Relaxed);
        InDoubtGuard { table: self, id }
    }

    /// Quarantines a completed re-drive's range for writes until `release_path(path)` or `until`.
    pub fn quarantine(&self, offset: u64, length: u64, path: usize, until: Instant) {
        self.insert(offset, length, Hold::Quarantine { path, until });
    }

    /// The fenced path is back (reconnected, identity verified, probe answered): lift its quarantines.
    pub fn release_path(&self, path: usize) {
        let released = {
            let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
            let before = ranges.len();
            ranges.retain(|r| !matches!(r.hold, Hold::Quarantine { path: p, .. } if p == path));
            self.count.store(ranges.len(), Ordering::Release);
            before != ranges.len()
        };
        if released {
            self.changed.notify_waiters();
        }
    }

    fn insert(&self, offset: u64, length: u64, hold: Hold) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        ranges.push(InDoubtRange {
            id,
            offset,
            length,
            hold,
        });
        self.count.store(ranges.len(), Ordering::Release);
        debug_assert!(ranges.len() <= IN_DOUBT_RANGES_MAX * 2);
        id
    }

    /// Waits until nothing in doubt holds a request over `offset..offset+length` (`writes`: the
    /// request changes data). Returns at once (one atomic load) when nothing is in doubt, which is the
    /// normal case.
    pub async fn wait_clear(&self, offset: u64, length: u64, writes: bool) {
        loop {
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Register interest before checking, so a release between the check and the await
            // cannot be missed.
            changed.as_mut().enable();
            let (blocked, expiry) = self.check(offset, length, writes);
            if !blocked {
                return;
            }
            match expiry {
                Some(at) => {
                    tokio::select! {
                        _ = &mut changed => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Whether a request is held, and the earliest quarantine expiry (to wake up for). Drops expired
    /// quarantines on the way.
    fn check(&self, offset: u64, length: u64, writes: bool) -> (bool, Option<Instant>) {
        let now = Instant::now();
        let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        ranges.retain(|r| !matches!(r.hold, Hold::Quarantine { until, .. } if until <= now));
        self.count.store(ranges.len(), Ordering::Release);
        let blocked = ranges.iter().any(|r| r.blocks(offset, length, writes));
        let expiry = ranges
            .iter()
            .filter_map(|r| match r.hold {
                Hold::Quarantine { until, .. } => Some(until),
                Hold::Redrive => None,
            })
            .min();
        (blocked, expiry)
    }

    /// Whether any hold overlaps the range (for tests and statistics).
    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        self.check(offset, length, true).0
    }

    /// Ranges in doubt right now (re-drives running plus quarantines).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes ever in doubt since start.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The ranges in doubt right now (for statistics).
    pub fn snapshot(&self) -> Vec<InDoubtRange> {
        self.ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn release(&self, id: u64) {
        {
            let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
            let before = ranges.len();
            ranges.retain(|r| r.id != id);
            debug_assert_eq!(
                ranges.len() + 1,
                before,
                "released a range that was not registered"
            );
            self.count.store(ranges.len(), Ordering::Release);
        }
        self.changed.notify_waiters();
    }
}

impl Drop for InDoubtGuard<'_> {
    fn drop(&mut self) {
        self.table.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn empty_table_never_waits() {
        let t = InDoubtTable::new();
        t.wait_clear(0, 4096, true).await;
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn overlapping_io_waits_for_the_redriven_write() {
        let t = Arc::new(InDoubtTable::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let guard = t.register(8192, 4096);
        assert_eq!(t.len(), 1);
        // Not overlapping: proceeds at once.
        t.wait_clear(0, 8192, true).await;
        t.wait_clear(12288, 4096, true).await;
        let waiter = {
            let (t, order) = (Arc::clone(&t), Arc::clone(&order));
            tokio::spawn(async move {
                t.wait_clear(10000, 10, false).await;
                order.lock().unwrap().push("later io");
            })
        };
        // Give the waiter every chance to run; it must still be blocked.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(order.lock().unwrap().is_empty());
        order.lock().unwrap().push("redriven write done");
        drop(guard);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            *order.lock().unwrap(),
            vec!["redriven write done", "later io"]
        );
        assert_eq!(t.total(), 1);
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn flush_is_ordered_after_every_redrive_but_not_a_quarantine() {
        let t = InDoubtTable::new();
        let g = t.register(1 << 30, 512);
        assert!(
            t.check(0, 0, true).0,
            "a flush waits for a running re-drive"
        );
        drop(g);
        t.quarantine(0, 4096, 1, Instant::now() + Duration::from_secs(60));
        assert!(
            !t.check(0, 0, true).0,
            "a flush does not wait for a quarantine"
        );
    }

    #[tokio::test]
    async fn quarantine_holds_writes_not_reads_until_the_path_returns() {
        let t = Arc::new(InDoubtTable::new());
        t.quarantine(4096, 4096, 2, Instant::now() + Duration::from_secs(60));
        t.wait_clear(4096, 4096, false).await; // a read passes
        let writer = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.wait_clear(6000, 100, true).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished(), "an overlapping write waits");
        t.release_path(1); // another path: nothing changes
        assert_eq!(t.len(), 1);
        t.release_path(2);
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn quarantine_expires_if_the_path_never_returns() {
        let t = InDoubtTable::new();
        t.quarantine(0, 4096, 0, Instant::now() + Duration::from_secs(30));
        let started = Instant::now();
        t.wait_clear(0, 4096, true).await;
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert!(t.is_empty());
    }

    #[test]
    fn ranges_overlap_by_half_open_intervals() {
        let r = InDoubtRange {
            id: 0,
            offset: 100,
            length: 10,
            hold: Hold::Redrive,
        };
        assert!(r.overlaps(109, 1));
        assert!(!r.overlaps(110, 5));
        assert!(!r.overlaps(90, 10));
        assert!(r.overlaps(90, 11));
        assert!(!r.overlaps(u64::MAX - 1, 10));
    }
}
