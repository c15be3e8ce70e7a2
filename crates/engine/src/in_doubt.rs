//! In-doubt writes (PRODUCT.md §7.3).
//!
//! A write that was in flight on a path that hung or broke may or may not have reached the storage,
//! and a hung target may still apply it later. Before such a write is re-driven on another path, the
//! old path is fenced (its connection closed); while the re-driven write runs, its byte range is
//! *in doubt*, and any later I/O that overlaps it waits until the re-driven write has completed, so
//! it is ordered after it. Linux dm-multipath, NVMe multipath and SPDK do not do this (SPDK #3593).
//!
//! The table is tiny and almost always empty: the data path checks one atomic counter and takes the
//! lock only while something is in doubt. The lock is a plain mutex, never held across an `.await`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Bound on ranges in doubt at once: every request in flight on every path of a LUN (paths ×
/// in-flight limit). Past it, a re-drive waits for room rather than growing the table.
pub const IN_DOUBT_RANGES_MAX: usize = 64 * 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InDoubtRange {
    pub id: u64,
    pub offset: u64,
    pub length: u64,
}

impl InDoubtRange {
    fn overlaps(&self, offset: u64, length: u64) -> bool {
        let end = offset.saturating_add(length);
        let own_end = self.offset.saturating_add(self.length);
        // A zero-length request (FLUSH) overlaps nothing by range, but must still be ordered after
        // every in-doubt write: a flush promises durability of everything acknowledged before it.
        if length == 0 {
            return true;
        }
        offset < own_end && self.offset < end
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

/// Holds one range in doubt; dropping it (when the re-driven write completed, or finally failed)
/// releases every I/O waiting on it.
pub struct InDoubtGuard<'a> {
    table: &'a InDoubtTable,
    id: u64,
}

impl InDoubtTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `offset..offset+length` in doubt until the guard is dropped.
    pub fn register(&self, offset: u64, length: u64) -> InDoubtGuard<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
            ranges.push(InDoubtRange { id, offset, length });
            self.count.store(ranges.len(), Ordering::Release);
            debug_assert!(ranges.len() <= IN_DOUBT_RANGES_MAX * 2);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        InDoubtGuard { table: self, id }
    }

    /// Waits until no in-doubt range overlaps `offset..offset+length`. Returns at once (one atomic
    /// load) when nothing is in doubt, which is the normal case.
    pub async fn wait_clear(&self, offset: u64, length: u64) {
        loop {
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Register interest before checking, so a release between the check and the await
            // cannot be missed.
            changed.as_mut().enable();
            if !self.overlaps(offset, length) {
                return;
            }
            changed.await;
        }
    }

    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        let ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        ranges.iter().any(|r| r.overlaps(offset, length))
    }

    /// Writes in doubt right now.
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
        t.wait_clear(0, 4096).await;
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn overlapping_io_waits_for_the_redriven_write() {
        let t = Arc::new(InDoubtTable::new());
        let order = Arc::new(Mutex::new(Vec::new()));
        let guard = t.register(8192, 4096);
        assert_eq!(t.len(), 1);
        // Not overlapping: proceeds at once.
        t.wait_clear(0, 8192).await;
        t.wait_clear(12288, 4096).await;
        let waiter = {
            let (t, order) = (Arc::clone(&t), Arc::clone(&order));
            tokio::spawn(async move {
                t.wait_clear(10000, 10).await;
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
    async fn flush_is_ordered_after_every_in_doubt_write() {
        let t = InDoubtTable::new();
        let g = t.register(1 << 30, 512);
        assert!(t.overlaps(0, 0), "a flush overlaps everything in doubt");
        drop(g);
        assert!(!t.overlaps(0, 0));
    }

    #[test]
    fn ranges_overlap_by_half_open_intervals() {
        let r = InDoubtRange {
            id: 0,
            offset: 100,
            length: 10,
        };
        assert!(r.overlaps(109, 1));
        assert!(!r.overlaps(110, 5));
        assert!(!r.overlaps(90, 10));
        assert!(r.overlaps(90, 11));
        assert!(!r.overlaps(u64::MAX - 1, 10));
    }
}
