//! In-doubt writes (docs/GUARANTEES.md G3): old copies of writes that a path may still execute.
//!
//! NBD cannot recall a request. When lunmpio gives up on a data-changing request on one path — the
//! path hung, its connection was reset or closed, or the request was merely slow and is hedged on
//! another path — the copy it sent may still be executed by that target, at any later time: a
//! SIGSTOPped server resumes, nbdkit and qemu-nbd finish what they had read after their client
//! vanished, a partitioned array works off its queue. The request is re-driven elsewhere and
//! acknowledged; if the old copy then lands *after a newer write* to the same blocks, acknowledged data
//! is lost. So every such copy is recorded here as a [`StaleCopy`], and while one overlaps a range,
//! new writes to that range wait. Reads never wait: the old copy carries the same data as the
//! acknowledged re-drive, so a read sees the right data before and after it lands. (Two *concurrent*
//! overlapping writes, both in flight when the copy was made, have no defined order anyway; a client
//! that waits for one before issuing the other is always ordered.)
//!
//! A copy stops holding its range only on real evidence that it can no longer execute:
//!
//! 1. **The target answered it** — the reply to that very request arrived on the old connection (which
//!    is therefore kept open, out of rotation, while it owes replies). A target that answered has
//!    finished with it: executed or refused, it will not execute it again.
//! 2. **A fence succeeded** — the configured `fence` program exited 0 for that path, which means its
//!    target will never execute anything it received on that path before.
//! 3. **`in_doubt_timeout` passed** — not evidence but a bound the operator chose: the hold lapses with
//!    an event, a warning and a metric, because from then on a late copy *can* overwrite newer data.
//!
//! A new connection to the same target answering a probe is *not* evidence: nbdkit and qemu-nbd serve
//! each connection on its own, so an old connection's held write can land after a new one works.
//!
//! Linux dm-multipath, NVMe multipath and SPDK do none of this (SPDK #3593; NVMe's CQT is
//! unimplemented): a re-driven write can be overwritten by its own stale copy there.
//!
//! The table is tiny and almost always empty: a writer checks one atomic counter and takes the lock
//! only while something is in doubt. The lock is a plain mutex, never held across an `.await`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::time::Instant;

/// Bound on copies in doubt at once per LUN. Far above what faults produce (the requests in flight on
/// the paths that failed); when reached, a request that would add one waits for room — a copy is never
/// forgotten to make space.
pub const IN_DOUBT_COPIES_MAX: usize = 16 * 1024;

/// One old copy of a data-changing request that a path may still execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleCopy {
    pub id: u64,
    pub offset: u64,
    pub length: u64,
    /// Slot index of the path that may still execute it (`usize::MAX`: a path no longer configured).
    pub path: usize,
    /// That path's id (kept for the journal, also for a path no longer configured).
    pub path_id: u64,
    /// Generation of the connection it was sent on; 0 for copies restored from `state_dir` (sent by an
    /// earlier run of the daemon).
    pub generation: u64,
    /// Wall-clock time it was put in doubt, in milliseconds since the Unix epoch (persisted).
    pub since_unix_ms: u64,
    /// When the hold lapses (`in_doubt_timeout`); `None`: never.
    pub expires: Option<Instant>,
    /// The same, in wall-clock milliseconds (persisted).
    pub expires_unix_ms: Option<u64>,
}

impl StaleCopy {
    fn overlaps(&self, offset: u64, length: u64) -> bool {
        let end = offset.saturating_add(length);
        let own_end = self.offset.saturating_add(self.length);
        offset < own_end && self.offset < end
    }

    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|at| at <= now)
    }
}

/// What a new copy needs to say; the table assigns the id and the clocks.
#[derive(Debug, Clone, Copy)]
pub struct NewCopy {
    pub offset: u64,
    pub length: u64,
    pub path: usize,
    pub path_id: u64,
    pub generation: u64,
    /// `in_doubt_timeout`; `None`: hold until evidence arrives.
    pub hold_max: Option<Duration>,
}

#[derive(Default)]
pub struct InDoubtTable {
    copies: Mutex<Vec<StaleCopy>>,
    count: AtomicUsize,
    next_id: AtomicU64,
    /// Woken whenever a copy leaves the table (writers waiting on a range, requests waiting for room).
    released: Notify,
    /// Woken on every change (the journal writer).
    changed: Notify,
    /// Bumped on every change, so a persister can tell what it has written.
    version: AtomicU64,
    /// Copies ever put in doubt, answered, released by a fence, expired.
    total: AtomicU64,
    answered_total: AtomicU64,
    fenced_total: AtomicU64,
    expired_total: AtomicU64,
}

pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl InDoubtTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a copy in doubt; waits for room while the table is full. Returns its id and the table
    /// version that includes it (what must be persisted before the write is acknowledged); `None` if
    /// `stop` came first (the LUN is shutting down and the request fails).
    pub async fn insert(
        &self,
        new: NewCopy,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<(u64, u64)> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(done) = self.try_insert(new) {
                return Some(done);
            }
            tokio::select! {
                _ = released => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    fn try_insert(&self, new: NewCopy) -> Option<(u64, u64)> {
        let now = Instant::now();
        let now_ms = unix_ms_now();
        let mut copies = self.lock();
        if copies.len() >= IN_DOUBT_COPIES_MAX {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        copies.push(StaleCopy {
            id,
            offset: new.offset,
            length: new.length,
            path: new.path,
            path_id: new.path_id,
            generation: new.generation,
            since_unix_ms: now_ms,
            expires: new.hold_max.map(|d| now + d),
            expires_unix_ms: new
                .hold_max
                .map(|d| now_ms.saturating_add(d.as_millis() as u64)),
        });
        self.count.store(copies.len(), Ordering::Release);
        self.total.fetch_add(1, Ordering::Relaxed);
        let version = self.version.fetch_add(1, Ordering::AcqRel) + 1;
        debug_assert!(copies.len() <= IN_DOUBT_COPIES_MAX);
        drop(copies);
        self.changed.notify_waiters();
        Some((id, version))
    }

    /// Puts back copies persisted by an earlier run (their ids are new; their clocks are kept).
    pub fn restore(&self, copies: impl IntoIterator<Item = StaleCopy>) -> usize {
        let mut table = self.lock();
        let mut restored = 0;
        for mut copy in copies {
            if table.len() >= IN_DOUBT_COPIES_MAX {
                break;
            }
            copy.id = self.next_id.fetch_add(1, Ordering::Relaxed);
            table.push(copy);
            restored += 1;
        }
        self.count.store(table.len(), Ordering::Release);
        self.total.fetch_add(restored as u64, Ordering::Relaxed);
        self.version.fetch_add(1, Ordering::AcqRel);
        drop(table);
        self.changed.notify_waiters();
        restored
    }

    /// Evidence 1: the target answered this copy.
    pub fn answered(&self, id: u64) -> bool {
        let removed = self.remove_where(|c| c.id == id);
        self.answered_total
            .fetch_add(removed.len() as u64, Ordering::Relaxed);
        !removed.is_empty()
    }

    /// Evidence 2: a fence of `path` succeeded; it covers every connection up to `through_generation`.
    pub fn fenced(&self, path: usize, through_generation: u64) -> Vec<StaleCopy> {
        let removed = self.remove_where(|c| c.path == path && c.generation <= through_generation);
        self.fenced_total
            .fetch_add(removed.len() as u64, Ordering::Relaxed);
        removed
    }

    /// The bound: removes and returns the copies whose hold has lapsed by `now`.
    pub fn expire(&self, now: Instant) -> Vec<StaleCopy> {
        let removed = self.remove_where(|c| c.expired(now));
        self.expired_total
            .fetch_add(removed.len() as u64, Ordering::Relaxed);
        removed
    }

    fn remove_where(&self, mut matches: impl FnMut(&StaleCopy) -> bool) -> Vec<StaleCopy> {
        let removed: Vec<StaleCopy> = {
            let mut copies = self.lock();
            if copies.is_empty() {
                return Vec::new();
            }
            let mut removed = Vec::new();
            copies.retain(|c| {
                if matches(c) {
                    removed.push(c.clone());
                    false
                } else {
                    true
                }
            });
            self.count.store(copies.len(), Ordering::Release);
            removed
        };
        if !removed.is_empty() {
            self.version.fetch_add(1, Ordering::AcqRel);
            self.released.notify_waiters();
            self.changed.notify_waiters();
        }
        removed
    }

    /// Waits until no copy in doubt overlaps `offset..offset+length`: what a write does before it is
    /// sent. Returns at once (one atomic load) when nothing is in doubt, the normal case. A copy whose
    /// hold has lapsed stops holding at once, even before the control task has logged its expiry.
    /// Returns false if `stop` came first.
    pub async fn wait_clear(
        &self,
        offset: u64,
        length: u64,
        stop: &tokio_util::sync::CancellationToken,
    ) -> bool {
        if length == 0 {
            return true;
        }
        loop {
            if self.count.load(Ordering::Acquire) == 0 {
                return true;
            }
            let released = self.released.notified();
            tokio::pin!(released);
            // Register interest before checking, so a release between the check and the await
            // cannot be missed.
            released.as_mut().enable();
            let (blocked, lapse) = self.check(offset, length);
            if !blocked {
                return true;
            }
            let lapse = lapse.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
            tokio::select! {
                _ = &mut released => {}
                _ = tokio::time::sleep_until(lapse) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Whether a write over the range is held now, and the earliest lapse among the copies holding it.
    fn check(&self, offset: u64, length: u64) -> (bool, Option<Instant>) {
        let now = Instant::now();
        let copies = self.lock();
        let mut blocked = false;
        let mut lapse: Option<Instant> = None;
        for c in copies
            .iter()
            .filter(|c| !c.expired(now) && c.overlaps(offset, length))
        {
            blocked = true;
            if let Some(at) = c.expires {
                lapse = Some(lapse.map_or(at, |l| l.min(at)));
            }
        }
        // A copy without a lapse holds until evidence: then only a release wakes us.
        let holds_forever = copies
            .iter()
            .any(|c| c.expires.is_none() && c.overlaps(offset, length));
        (blocked, if holds_forever { None } else { lapse })
    }

    /// Whether a write over the range would wait now.
    pub fn holds(&self, offset: u64, length: u64) -> bool {
        self.check(offset, length).0
    }

    /// When the oldest copy in doubt now was put in doubt (ms since the Unix epoch), if any.
    pub fn oldest_since_unix_ms(&self) -> Option<u64> {
        if self.is_empty() {
            return None;
        }
        self.lock().iter().map(|c| c.since_unix_ms).min()
    }

    /// The earliest lapse of any copy (the control task's timer).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.lock().iter().filter_map(|c| c.expires).min()
    }

    /// Copies of `path` from connections up to `through_generation` still in doubt.
    pub fn count_for(&self, path: usize, through_generation: u64) -> usize {
        if self.is_empty() {
            return 0;
        }
        self.lock()
            .iter()
            .filter(|c| c.path == path && c.generation <= through_generation)
            .count()
    }

    /// Whether any copy sent on connection `generation` of `path` is still in doubt.
    pub fn has_connection(&self, path: usize, generation: u64) -> bool {
        !self.is_empty()
            && self
                .lock()
                .iter()
                .any(|c| c.path == path && c.generation == generation)
    }

    /// Copies in doubt right now.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A future that resolves at the next change (insert, release, expiry, restore).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Copies ever put in doubt since start (restored ones included).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub fn answered_total(&self) -> u64 {
        self.answered_total.load(Ordering::Relaxed)
    }

    pub fn fenced_total(&self) -> u64 {
        self.fenced_total.load(Ordering::Relaxed)
    }

    pub fn expired_total(&self) -> u64 {
        self.expired_total.load(Ordering::Relaxed)
    }

    /// The copies in doubt right now, and the version they are (for persistence and statistics).
    pub fn snapshot(&self) -> (Vec<StaleCopy>, u64) {
        let copies = self.lock();
        (copies.clone(), self.version())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<StaleCopy>> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn never() -> tokio_util::sync::CancellationToken {
        tokio_util::sync::CancellationToken::new()
    }

    fn copy(offset: u64, length: u64, path: usize, generation: u64) -> NewCopy {
        NewCopy {
            offset,
            length,
            path,
            path_id: path as u64,
            generation,
            hold_max: Some(Duration::from_secs(60)),
        }
    }

    #[tokio::test]
    async fn empty_table_never_waits() {
        let t = InDoubtTable::new();
        t.wait_clear(0, 4096, &never()).await;
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn writes_wait_until_the_copy_is_answered_reads_never_wait() {
        let t = Arc::new(InDoubtTable::new());
        let (id, version) = t.insert(copy(8192, 4096, 0, 1), &never()).await.unwrap();
        assert_eq!((t.len(), t.version()), (1, version));
        // Not overlapping: proceeds at once. Zero length (FLUSH): never waits.
        t.wait_clear(0, 8192, &never()).await;
        t.wait_clear(12288, 4096, &never()).await;
        t.wait_clear(8192, 0, &never()).await;
        let writer = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.wait_clear(10000, 10, &never()).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!writer.is_finished(), "an overlapping write waits");
        assert!(t.answered(id));
        assert!(!t.answered(id), "answered once");
        tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .unwrap()
            .unwrap();
        assert!(t.is_empty());
        assert_eq!((t.total(), t.answered_total()), (1, 1));
    }

    #[tokio::test]
    async fn every_path_holding_a_copy_must_let_go() {
        // The review's case: one write left copies on two hung paths; one path coming back must not
        // release the range while the other may still execute its copy.
        let t = Arc::new(InDoubtTable::new());
        t.insert(copy(0, 4096, 0, 3), &never()).await.unwrap();
        let (p1, _) = t.insert(copy(0, 4096, 1, 5), &never()).await.unwrap();
        assert!(t.answered(p1));
        assert!(t.holds(0, 4096), "p0's copy still holds the range");
        assert_eq!(t.fenced(1, u64::MAX).len(), 0, "nothing of p1 is left");
        assert_eq!(
            t.fenced(0, 2).len(),
            0,
            "a fence before generation 3 does not cover it"
        );
        assert_eq!(t.fenced(0, 3).len(), 1);
        assert!(!t.holds(0, 4096));
        assert_eq!(t.fenced_total(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_lapses_at_its_bound_and_never_without_one() {
        let t = InDoubtTable::new();
        t.insert(copy(0, 4096, 0, 1), &never()).await.unwrap();
        assert_eq!(
            t.next_expiry().map(|at| at - Instant::now()),
            Some(Duration::from_secs(60))
        );
        let started = Instant::now();
        t.wait_clear(0, 4096, &never()).await;
        assert!(started.elapsed() >= Duration::from_secs(60));
        assert_eq!(t.expire(Instant::now()).len(), 1);
        assert_eq!(t.expired_total(), 1);

        t.insert(
            NewCopy {
                hold_max: None,
                ..copy(0, 4096, 0, 1)
            },
            &never(),
        )
        .await
        .unwrap();
        assert_eq!(t.next_expiry(), None);
        let held =
            tokio::time::timeout(Duration::from_secs(3600), t.wait_clear(0, 4096, &never())).await;
        assert!(held.is_err(), "`never` holds until evidence");
        assert!(t.expire(Instant::now()).is_empty());
    }

    #[tokio::test]
    async fn a_full_table_makes_the_next_copy_wait_for_room() {
        let t = Arc::new(InDoubtTable::new());
        for i in 0..IN_DOUBT_COPIES_MAX as u64 {
            assert!(t.try_insert(copy(i * 4096, 4096, 0, 1)).is_some());
        }
        assert!(t.try_insert(copy(0, 1, 1, 1)).is_none());
        let waiting = {
            let t = Arc::clone(&t);
            tokio::spawn(async move { t.insert(copy(0, 1, 1, 1), &never()).await.unwrap() })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished());
        assert_eq!(t.fenced(0, 1).len(), IN_DOUBT_COPIES_MAX);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ranges_overlap_by_half_open_intervals() {
        let r = StaleCopy {
            id: 0,
            offset: 100,
            length: 10,
            path: 0,
            path_id: 0,
            generation: 0,
            since_unix_ms: 0,
            expires: None,
            expires_unix_ms: None,
        };
        assert!(r.overlaps(109, 1));
        assert!(!r.overlaps(110, 5));
        assert!(!r.overlaps(90, 10));
        assert!(r.overlaps(90, 11));
        assert!(!r.overlaps(u64::MAX - 1, 10));
    }
}
