//! Counted room on one export connection (in-flight slots, bytes held by requests): taken by the
//! connection's task as it reads a request, given back by the reply writer once the reply is out.
//!
//! Why not `tokio::sync::Semaphore`: giving permits back always takes the semaphore's wait-list
//! mutex, and each request gives back twice (its slot and its bytes). Here giving back is one atomic
//! add, plus a wake-up only while the connection's task waits for room — rare: it means the client
//! does not read its replies or keeps the connection at its in-flight limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;

use futures::task::AtomicWaker;

/// Room for at most `total` units. Only one task waits on it at a time (the connection's), though
/// it may wait in several places at once.
pub(crate) struct Credits {
    total: usize,
    available: AtomicUsize,
    /// Waits in progress: while there are none, giving back wakes nobody.
    waiters: AtomicUsize,
    task: AtomicWaker,
}

/// Units taken from [`Credits`]; dropping it gives them back.
pub(crate) struct Credit {
    credits: Arc<Credits>,
    units: usize,
}

impl Drop for Credit {
    fn drop(&mut self) {
        // SeqCst with the waiter's count and check: either the waiter sees these units, or this
        // sees the waiter and wakes it.
        self.credits
            .available
            .fetch_add(self.units, Ordering::SeqCst);
        if self.credits.waiters.load(Ordering::SeqCst) > 0 {
            self.credits.task.wake();
        }
    }
}

/// Counts one wait while it lasts (also when its future is dropped unfinished).
struct Waiting<'a>(&'a Credits);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Credits {
    pub(crate) fn new(total: usize) -> Arc<Credits> {
        Arc::new(Credits {
            total,
            available: AtomicUsize::new(total),
            waiters: AtomicUsize::new(0),
            task: AtomicWaker::new(),
        })
    }

    /// `units` now, if that many are free.
    pub(crate) fn try_take(self: &Arc<Self>, units: usize) -> Option<Credit> {
        let mut free = self.available.load(Ordering::SeqCst);
        loop {
            if free < units {
                return None;
            }
            match self.available.compare_exchange_weak(
                free,
                free - units,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    return Some(Credit {
                        credits: Arc::clone(self),
                        units,
                    });
                }
                Err(now) => free = now,
            }
        }
    }

    /// `units`, once that many are free. At most `total` (more could never be free).
    pub(crate) async fn take(self: &Arc<Self>, units: usize) -> Credit {
        assert!(units <= self.total, "{units} units asked of {}", self.total);
        self.wait_for(|| self.try_take(units)).await
    }

    /// Returns once at least `units` are free, taking none (every unit back: everything is done).
    pub(crate) async fn free_at_least(&self, units: usize) {
        assert!(
            units <= self.total,
            "{units} units awaited of {}",
            self.total
        );
        self.wait_for(|| (self.available.load(Ordering::SeqCst) >= units).then_some(()))
            .await
    }

    async fn wait_for<T>(&self, mut ready: impl FnMut() -> Option<T>) -> T {
        if let Some(t) = ready() {
            return t;
        }
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(self);
        std::future::poll_fn(|cx| {
            // Registered, and counted as waiting, before the check: a unit given back after the
            // check wakes this task.
            self.task.register(cx.waker());
            match ready() {
                Some(t) => Poll::Ready(t),
                None => Poll::Pending,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::Credits;
    use std::time::Duration;

    #[tokio::test]
    async fn units_come_back_when_a_credit_drops_and_wake_the_waiter() {
        let credits = Credits::new(3);
        let two = credits.try_take(2).expect("free");
        assert!(credits.try_take(2).is_none(), "only one left");
        let one = credits.try_take(1).expect("the last one");
        let waiting = tokio::spawn({
            let credits = credits.clone();
            async move { credits.take(3).await.units }
        });
        tokio::task::yield_now().await;
        drop(two);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "two of three back is not enough");
        drop(one);
        let units = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the last unit came back")
            .unwrap();
        assert_eq!(units, 3);
    }

    #[tokio::test]
    async fn free_at_least_waits_for_everything_back_and_takes_nothing() {
        let credits = Credits::new(2);
        let held = credits.try_take(1).unwrap();
        let all_back = tokio::spawn({
            let credits = credits.clone();
            async move { credits.free_at_least(2).await }
        });
        tokio::task::yield_now().await;
        assert!(!all_back.is_finished());
        // From another thread, as a writer on another worker would.
        std::thread::spawn(move || drop(held)).join().unwrap();
        tokio::time::timeout(Duration::from_secs(5), all_back)
            .await
            .expect("woken")
            .unwrap();
        assert!(
            credits.try_take(2).is_some(),
            "nothing was taken by the wait"
        );
    }

    #[tokio::test]
    async fn a_dropped_wait_stops_counting_as_a_waiter() {
        let credits = Credits::new(1);
        let held = credits.try_take(1).unwrap();
        let wait = credits.take(1);
        assert!(futures::poll!(Box::pin(wait)).is_pending());
        assert_eq!(credits.waiters.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(held);
        assert!(credits.try_take(1).is_some());
    }
}
