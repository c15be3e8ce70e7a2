//! What happens to I/O when a LUN has no usable path left (`no_path_retry`, docs/GUARANTEES.md G6).
//!
//! `fail`: EIO at once. `queue`: wait until a path returns (or shutdown). A duration: wait, but no
//! longer than that duration after the LUN lost its last path; then EIO. The queue is bounded in
//! bytes as well as in time (a client cannot make us hold unbounded memory while the storage is
//! away), its size is visible (`queued_ios`, `queued_bytes`), waiters are resumed in arrival order
//! when a path returns, and shutdown fails whatever is still queued — it never waits on it.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPathRetry {
    Fail,
    Queue,
    For(Duration),
}

/// Why a queued request was let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// A path is back: dispatch again.
    Retry,
    /// The LUN is shutting down: fail the request.
    Shutdown,
}

/// Why a request could not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPathError {
    /// `no_path_retry = "fail"`.
    NotQueueing,
    /// The queue's byte or request bound is reached.
    Full,
    /// The deadline after the last path failed has passed.
    Expired,
    /// Shutting down.
    Shutdown,
    /// The control task has not declared the LUN path-less (it still counts a usable path, e.g. one
    /// whose probe is running): try again shortly instead of queueing.
    NotDown,
}

/// Bound on requests queued at once, whatever their size: FLUSH, TRIM and WRITE_ZEROES carry no
/// payload, yet each waiting request costs memory; the byte bound alone would not stop them.
pub const QUEUED_IOS_MAX: u64 = 16 * 1024;

pub struct NoPathQueue {
    retry: NoPathRetry,
    bytes_max: u64,
    waiters: Mutex<Waiters>,
    queued_ios: AtomicU64,
    queued_bytes: AtomicU64,
}

struct Waiters {
    queue: VecDeque<oneshot::Sender<Release>>,
    /// When the LUN lost its last path (None while it has one).
    down_since: Option<Instant>,
    /// Time without a path in earlier outages (the current one is `down_since`'s).
    down_before: Duration,
    shutting_down: bool,
}

impl NoPathQueue {
    pub fn new(retry: NoPathRetry, bytes_max: u64) -> Self {
        NoPathQueue {
            retry,
            bytes_max,
            waiters: Mutex::new(Waiters {
                queue: VecDeque::new(),
                down_since: None,
                down_before: Duration::ZERO,
                shutting_down: false,
            }),
            queued_ios: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
        }
    }

    pub fn retry(&self) -> NoPathRetry {
        self.retry
    }

    pub fn queued_ios(&self) -> u64 {
        self.queued_ios.load(Ordering::Relaxed)
    }

    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Waits for a path, per `no_path_retry`. `Ok(())` means: dispatch again.
    pub async fn wait_for_path(&self, bytes: u64) -> Result<(), NoPathError> {
        self.wait(bytes, false).await
    }

    /// Like [`wait_for_path`](Self::wait_for_path), but only once [`all_paths_down`](Self::all_paths_down)
    /// has been called (checked under the same lock [`path_available`](Self::path_available) takes, so
    /// a request can never queue just after the last release and wait for nobody); otherwise
    /// `NotDown`. The data path uses this: running out of candidates while the control task still
    /// counts a usable path (every path suspected at once, a probe running) is not "no path".
    pub async fn wait_while_down(&self, bytes: u64) -> Result<(), NoPathError> {
        self.wait(bytes, true).await
    }

    async fn wait(&self, bytes: u64, require_down: bool) -> Result<(), NoPathError> {
        let (receiver, deadline) = {
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            if w.shutting_down {
                return Err(NoPathError::Shutdown);
            }
            if require_down && w.down_since.is_none() {
                return Err(NoPathError::NotDown);
            }
            let now = Instant::now();
            let down_since = *w.down_since.get_or_insert(now);
            let deadline = match self.retry {
                NoPathRetry::Fail => return Err(NoPathError::NotQueueing),
                NoPathRetry::Queue => None,
                NoPathRetry::For(limit) => {
                    let deadline = down_since + limit;
                    if deadline <= now {
                        return Err(NoPathError::Expired);
                    }
                    Some(deadline)
                }
            };
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if queued.saturating_add(bytes) > self.bytes_max
                || self.queued_ios.load(Ordering::Relaxed) >= QUEUED_IOS_MAX
            {
                return Err(NoPathError::Full);
            }
            let (sender, receiver) = oneshot::channel();
            w.queue.push_back(sender);
            self.queued_ios.fetch_add(1, Ordering::Relaxed);
            self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            (receiver, deadline)
        };
        let _accounting = Accounting { queue: self, bytes };
        let outcome = match deadline {
            None => receiver.await.ok(),
            Some(deadline) => match tokio::time::timeout_at(deadline, receiver).await {
                Ok(released) => released.ok(),
                Err(_) => return Err(NoPathError::Expired),
            },
        };
        match outcome {
            Some(Release::Retry) => Ok(()),
            Some(Release::Shutdown) | None => Err(NoPathError::Shutdown),
        }
    }

    /// A path is usable again: resume every waiter, oldest first.
    pub fn path_available(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = w.down_since.take() {
            w.down_before += since.elapsed();
        }
        while let Some(sender) = w.queue.pop_front() {
            let _ = sender.send(Release::Retry); // a waiter that gave up (deadline) is simply gone
        }
    }

    /// The LUN lost its last usable path now (starts the `no_path_retry` clock if not running).
    pub fn all_paths_down(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.down_since.get_or_insert_with(Instant::now);
    }

    /// Since when the LUN has had no path, if it has none.
    pub fn down_since(&self) -> Option<Instant> {
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .down_since
    }

    /// How long the LUN has been without a path now (zero while it has one), and in all (this
    /// outage and the earlier ones).
    pub fn down_durations(&self) -> (Duration, Duration) {
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        let now = w.down_since.map_or(Duration::ZERO, |since| since.elapsed());
        (now, w.down_before + now)
    }

    /// Shutdown: fail everything queued now, and everything that would queue later.
    pub fn shutdown(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        w.shutting_down = true;
        while let Some(sender) = w.queue.pop_front() {
            let _ = sender.send(Release::Shutdown);
        }
    }
}

/// Keeps the queue's counters right however the wait ends (released, expired, or cancelled).
struct Accounting<'a> {
    queue: &'a NoPathQueue,
    bytes: u64,
}

impl Drop for Accounting<'_> {
    fn drop(&mut self) {
        self.queue.queued_ios.fetch_sub(1, Ordering::Relaxed);
        self.queue
            .queued_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn requests_without_payload_are_bounded_by_count() {
        let q = std::sync::Arc::new(NoPathQueue::new(NoPathRetry::Queue, 1 << 20));
        q.all_paths_down();
        let mut waiting = Vec::new();
        for _ in 0..QUEUED_IOS_MAX {
            let q = std::sync::Arc::clone(&q);
            waiting.push(tokio::spawn(async move { q.wait_while_down(0).await }));
        }
        while q.queued_ios() < QUEUED_IOS_MAX {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.wait_while_down(0).await, Err(NoPathError::Full));
        q.path_available();
        for w in waiting {
            assert_eq!(w.await.unwrap(), Ok(()));
        }
    }

    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_data_path_queues_only_once_the_lun_is_declared_pathless() {
        // Every candidate suspected at once is not "no path": no queueing, no EIO in fail mode, and
        // no no_path_retry clock started behind the control task's back.
        for retry in [NoPathRetry::Fail, NoPathRetry::Queue] {
            let q = NoPathQueue::new(retry, 1 << 20);
            assert_eq!(q.wait_while_down(4096).await, Err(NoPathError::NotDown));
            assert_eq!(q.down_since(), None);
            q.all_paths_down();
            q.path_available();
            assert_eq!(q.wait_while_down(4096).await, Err(NoPathError::NotDown));
        }
        let q = NoPathQueue::new(NoPathRetry::Fail, 1 << 20);
        q.all_paths_down();
        assert_eq!(q.wait_while_down(4096).await, Err(NoPathError::NotQueueing));
    }

    #[tokio::test]
    async fn fail_mode_never_queues() {
        let q = NoPathQueue::new(NoPathRetry::Fail, 1 << 20);
        assert_eq!(q.wait_for_path(4096).await, Err(NoPathError::NotQueueing));
        assert_eq!(q.queued_ios(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_io_resumes_in_order_when_a_path_returns() {
        let q = Arc::new(NoPathQueue::new(NoPathRetry::Queue, 1 << 20));
        q.all_paths_down();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (queue, tx) = (Arc::clone(&q), tx.clone());
            tasks.push(tokio::spawn(async move {
                queue.wait_for_path(4096).await.unwrap();
                tx.send(i).unwrap();
            }));
            // Let each waiter enqueue before the next, so arrival order is known.
            while q.queued_ios() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(q.queued_bytes(), 5 * 4096);
        q.path_available();
        for t in tasks {
            t.await.unwrap();
        }
        let order: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(order.len(), 5);
        assert_eq!(q.queued_ios(), 0);
        assert_eq!(q.queued_bytes(), 0);
        assert!(q.down_since().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_counts_from_the_loss_of_the_last_path() {
        let q = NoPathQueue::new(NoPathRetry::For(Duration::from_secs(30)), 1 << 20);
        q.all_paths_down();
        tokio::time::advance(Duration::from_secs(20)).await;
        let started = Instant::now();
        assert_eq!(q.wait_for_path(512).await, Err(NoPathError::Expired));
        let waited = started.elapsed();
        assert!(
            waited <= Duration::from_secs(10) + Duration::from_millis(1),
            "{waited:?}"
        );
        // Past the deadline: fail at once.
        assert_eq!(q.wait_for_path(512).await, Err(NoPathError::Expired));
        assert_eq!(q.queued_ios(), 0);
    }

    #[tokio::test]
    async fn byte_bound_refuses_more() {
        let q = Arc::new(NoPathQueue::new(NoPathRetry::Queue, 8192));
        let q2 = Arc::clone(&q);
        let first = tokio::spawn(async move { q2.wait_for_path(8192).await });
        while q.queued_ios() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.wait_for_path(1).await, Err(NoPathError::Full));
        q.shutdown();
        assert_eq!(first.await.unwrap(), Err(NoPathError::Shutdown));
        assert_eq!(q.wait_for_path(1).await, Err(NoPathError::Shutdown));
    }
}
