//! The requests one export connection runs at once, polled by the connection's own task.
//!
//! Why not `FuturesUnordered`: it allocates a task per future it is given. A request's future is
//! about 2 KiB (the engine's whole attempt loop), past the allocator's per-thread cache, so every
//! request paid a slow `malloc`/`free` pair plus the task's reference counting on each wake-up
//! (docs/BENCHMARKS.md, "Where the CPU goes"). Here a connection keeps one boxed slot per request
//! in flight, reused for the next request, and each slot's waker is made once: running a request
//! allocates nothing. The number of slots is bounded by the connection's in-flight limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

/// Which slots were woken since the set last looked, one bit per slot, and the task to wake.
struct Ready {
    bits: Vec<AtomicU64>,
    /// Set by the first wake-up after the set last looked: the ones after it need not wake the
    /// task again (several replies usually complete in one turn of the path's reader).
    notified: AtomicBool,
    /// Woken by reference, so it stays registered: the set registers again only when its task's
    /// waker changes.
    task: Mutex<Option<Waker>>,
}

impl Ready {
    fn mark(&self, index: usize) {
        self.bits[index / 64].fetch_or(1 << (index % 64), Ordering::SeqCst);
    }

    fn task(&self) -> MutexGuard<'_, Option<Waker>> {
        // A waker swap cannot be left half done.
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Slots a set keeps while it runs nothing.
const SLOTS_KEPT_IDLE: usize = 32;

/// The waker of one slot: marks the slot ready and wakes the connection's task.
struct SlotWake {
    index: usize,
    ready: Arc<Ready>,
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.mark(self.index);
        // After the mark: the set clears `notified` before it reads the marks, so either it sees
        // this mark or this sees `notified` cleared and wakes it.
        if !self.ready.notified.swap(true, Ordering::SeqCst)
            && let Some(task) = self.ready.task().as_ref()
        {
            task.wake_by_ref();
        }
    }
}

struct Slot<F> {
    /// Boxed once, so the future stays pinned while the slab grows; empty between requests.
    future: Pin<Box<Option<F>>>,
    waker: Waker,
}

/// A bounded set of futures of one type, run by whoever polls it; yields their outputs in the order
/// they complete. A stale wake-up (a slot's earlier future, or a slot now empty) costs one poll.
pub(crate) struct RunningSet<F> {
    slots: Vec<Slot<F>>,
    /// Slots without a future.
    free: Vec<usize>,
    len: usize,
    capacity: usize,
    ready: Arc<Ready>,
    /// The waker `ready` holds.
    registered: Option<Waker>,
}

impl<F: Future> RunningSet<F> {
    /// A set that holds at most `capacity` futures (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let words = capacity.div_ceil(64);
        RunningSet {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
            capacity,
            ready: Arc::new(Ready {
                bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
                notified: AtomicBool::new(false),
                task: Mutex::new(None),
            }),
            registered: None,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a future; it is first polled by the next `poll_next`. The caller bounds what it pushes
    /// (the connection's in-flight slots): more than `capacity` at once is a bug.
    pub(crate) fn push(&mut self, future: F) {
        assert!(self.len < self.capacity, "running set over its capacity");
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = self.slots.len();
                let waker = Waker::from(Arc::new(SlotWake {
                    index,
                    ready: Arc::clone(&self.ready),
                }));
                self.slots.push(Slot {
                    future: Box::pin(None),
                    waker,
                });
                index
            }
        };
        let slot = &mut self.slots[index];
        debug_assert!(slot.future.is_none(), "a free slot holds no future");
        slot.future.as_mut().set(Some(future));
        self.len += 1;
        self.ready.mark(index);
    }

    /// The next output of a future that completed; `None` when the set is empty.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        if self.len == 0 {
            return Poll::Ready(None);
        }
        // Registered, and `notified` cleared, before the bits are read: a wake-up after the read
        // wakes this task again.
        if !self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            let waker = cx.waker().clone();
            *self.ready.task() = Some(waker.clone());
            self.registered = Some(waker);
        }
        self.ready.notified.store(false, Ordering::SeqCst);
        for word in 0..self.ready.bits.len() {
            // A load first: most words are empty, and a load costs less than a swap.
            if self.ready.bits[word].load(Ordering::SeqCst) == 0 {
                continue;
            }
            let mut bits = self.ready.bits[word].swap(0, Ordering::SeqCst);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let index = word * 64 + bit;
                let Some(output) = self.poll_slot(index) else {
                    continue;
                };
                // The rest of this word's wake-ups wait for the next call.
                if bits != 0 {
                    self.ready.bits[word].fetch_or(bits, Ordering::SeqCst);
                }
                return Poll::Ready(Some(output));
            }
        }
        Poll::Pending
    }

    /// Polls slot `index` if it holds a future; its output frees the slot.
    fn poll_slot(&mut self, index: usize) -> Option<F::Output> {
        let slot = self.slots.get_mut(index)?;
        let future = slot.future.as_mut().as_pin_mut()?;
        let mut cx = Context::from_waker(&slot.waker);
        let Poll::Ready(output) = future.poll(&mut cx) else {
            return None;
        };
        slot.future.as_mut().set(None);
        self.free.push(index);
        self.len -= 1;
        if self.len == 0 && self.slots.len() > SLOTS_KEPT_IDLE {
            // Idle after a burst: keep a few slots, not the burst's (each holds a request's
            // future, about 2 KiB). A stale wake-up of a dropped slot finds nothing to poll.
            self.slots.truncate(SLOTS_KEPT_IDLE);
            self.free.clear();
            self.free.extend(0..SLOTS_KEPT_IDLE);
        }
        Some(output)
    }
}

impl<F: Future> futures::Stream for RunningSet<F> {
    type Item = F::Output;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        // The futures are pinned in their own boxes; the set itself moves freely.
        RunningSet::poll_next(self.get_mut(), cx)
    }
}

impl<F> Unpin for RunningSet<F> {}

#[cfg(test)]
mod tests {
    use super::RunningSet;
    use futures::StreamExt;
    use futures::future::BoxFuture;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn outputs_come_in_the_order_the_futures_complete_and_slots_are_reused() {
        let mut set: RunningSet<BoxFuture<'static, u32>> = RunningSet::new(3);
        let mut senders = Vec::new();
        for i in 0..3u32 {
            let (tx, rx) = oneshot::channel::<u32>();
            senders.push(tx);
            set.push(Box::pin(async move { rx.await.unwrap() + i * 100 }));
        }
        assert_eq!(set.len(), 3);
        assert!(
            futures::poll!(set.next()).is_pending(),
            "nothing is done yet"
        );
        let third = senders.pop().unwrap();
        third.send(7).unwrap();
        assert_eq!(set.next().await, Some(207));
        // The freed slot takes the next future; no new slot is made.
        let (tx, rx) = oneshot::channel::<u32>();
        set.push(Box::pin(async move { rx.await.unwrap() + 1000 }));
        assert_eq!(set.slots.len(), 3);
        senders.remove(0).send(1).unwrap();
        tx.send(2).unwrap();
        let mut got = vec![set.next().await.unwrap(), set.next().await.unwrap()];
        got.sort();
        assert_eq!(got, vec![1, 1002]);
        senders.remove(0).send(5).unwrap();
        assert_eq!(set.next().await, Some(105));
        assert!(set.is_empty());
        assert_eq!(set.next().await, None, "an empty set is done");
    }

    #[tokio::test]
    async fn a_future_woken_from_another_task_wakes_the_set() {
        let mut set: RunningSet<BoxFuture<'static, u32>> = RunningSet::new(130);
        let mut senders = Vec::new();
        // Past one word of ready bits, so the second word is exercised too.
        for i in 0..130u32 {
            let (tx, rx) = oneshot::channel::<u32>();
            senders.push(tx);
            set.push(Box::pin(async move { rx.await.unwrap() + i }));
        }
        assert!(futures::poll!(set.next()).is_pending());
        let last = senders.pop().unwrap();
        tokio::spawn(async move { last.send(0).unwrap() });
        assert_eq!(set.next().await, Some(129));
    }

    #[tokio::test]
    async fn wake_ups_that_come_together_all_reach_the_set() {
        let mut set: RunningSet<BoxFuture<'static, u32>> = RunningSet::new(8);
        let mut senders = Vec::new();
        for i in 0..8u32 {
            let (tx, rx) = oneshot::channel::<u32>();
            senders.push(tx);
            set.push(Box::pin(async move { rx.await.unwrap() + i }));
        }
        assert!(futures::poll!(set.next()).is_pending());
        // All answered in one turn of another task: one wake-up of the set, eight outputs.
        tokio::spawn(async move {
            for tx in senders {
                tx.send(100).unwrap();
            }
        });
        let mut got = Vec::new();
        for _ in 0..8 {
            got.push(set.next().await.unwrap());
        }
        got.sort();
        assert_eq!(got, (100..108).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_future_that_wakes_itself_while_polled_is_polled_again() {
        let mut set: RunningSet<BoxFuture<'static, u32>> = RunningSet::new(1);
        set.push(Box::pin(async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
            5
        }));
        assert_eq!(set.next().await, Some(5));
    }

    #[tokio::test]
    async fn an_idle_set_keeps_few_slots_and_grows_again() {
        let mut set: RunningSet<BoxFuture<'static, usize>> = RunningSet::new(100);
        let mut senders = Vec::new();
        for i in 0..100 {
            let (tx, rx) = oneshot::channel::<()>();
            senders.push(tx);
            set.push(Box::pin(async move {
                rx.await.unwrap();
                i
            }));
        }
        assert!(futures::poll!(set.next()).is_pending());
        for tx in senders {
            tx.send(()).unwrap();
        }
        let mut got: Vec<usize> = Vec::new();
        for _ in 0..100 {
            got.push(set.next().await.unwrap());
        }
        got.sort();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
        assert_eq!(
            set.slots.len(),
            super::SLOTS_KEPT_IDLE,
            "the burst's slots are let go"
        );
        // Full again: every future still runs to its end.
        for i in 0..100 {
            set.push(Box::pin(async move { i }));
        }
        let mut sum = 0;
        while let Some(i) = set.next().await {
            sum += i;
        }
        assert_eq!(sum, (0..100).sum::<usize>());
    }

    #[tokio::test]
    async fn a_ready_future_completes_on_its_first_poll() {
        let mut set: RunningSet<BoxFuture<'static, u32>> = RunningSet::new(1);
        set.push(Box::pin(async { 3 }));
        assert_eq!(set.next().await, Some(3));
    }

    #[test]
    #[should_panic(expected = "over its capacity")]
    fn pushing_past_the_capacity_is_a_bug() {
        let mut set: RunningSet<BoxFuture<'static, ()>> = RunningSet::new(1);
        set.push(Box::pin(std::future::pending::<()>()));
        set.push(Box::pin(std::future::pending::<()>()));
    }
}
