//! One timer for all the attempts in flight on a LUN, instead of one each.
//!
//! Every attempt on a path has a deadline (the adaptive or the hard timeout), and almost every
//! attempt is answered long before it. A tokio timer per attempt costs a registration and a removal
//! in the timer wheel on every I/O, and the wait for the path being taken out of service (a
//! cancellation token) takes more locks on top: about 1–2% of the CPU of an I/O against an in-memory
//! target (docs/BENCHMARKS.md, "One deadline watcher per LUN"). Here an attempt that has to wait
//! puts its waker and deadline in a slab (one uncontended lock) and takes it out when answered (one
//! more); one watcher task per LUN sleeps until the earliest deadline, marks the entries that are
//! due and wakes them. An entry that would be due before the watcher's alarm re-arms it.

use std::sync::Mutex;
use std::task::{Context, Waker};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a stopping watcher looks whether the last entry is gone.
const STOPPING_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Deadlines of the attempts waiting on a LUN's paths.
#[derive(Default)]
pub struct DeadlineWatch {
    state: Mutex<State>,
    /// Wakes the watcher for an entry due before its alarm.
    rearm: Notify,
}

#[derive(Default)]
struct State {
    entries: Vec<Entry>,
    /// Indexes of `Entry::Free` slots in `entries`.
    free: Vec<usize>,
    /// When the watcher wakes next (`None`: only when re-armed).
    alarm: Option<Instant>,
    /// Entries in use. Bounded by the attempts in flight, which the paths bound
    /// (`in_flight_max` per connection).
    used: usize,
    /// The watcher has returned (the LUN stopped): nothing would wake a new entry at its deadline,
    /// so a wait that starts now is due at once.
    closed: bool,
}

enum Entry {
    Free,
    Waiting {
        deadline: Instant,
        waker: Waker,
        /// Set by the watcher once `deadline` has passed.
        due: bool,
    },
}

impl DeadlineWatch {
    pub fn new() -> DeadlineWatch {
        DeadlineWatch::default()
    }

    /// A wait that ends at `deadline`. It is registered on its first poll, and removed when dropped.
    pub fn entry(&self, deadline: Instant) -> DeadlineEntry<'_> {
        DeadlineEntry {
            watch: self,
            deadline,
            key: None,
        }
    }

    /// Wakes every waiting entry, due or not: a path was taken out of service, and its attempts
    /// must look at it again.
    pub fn wake_all(&self) {
        let st = self.lock();
        for entry in &st.entries {
            if let Entry::Waiting { waker, .. } = entry {
                waker.wake_by_ref();
            }
        }
    }

    /// Entries in use (for tests and assertions).
    pub fn waiting(&self) -> usize {
        self.lock().used
    }

    /// The watcher: wakes entries when they are due. Returns once `stop` is cancelled and no entry
    /// waits any more (an attempt still waiting at shutdown keeps its deadline).
    pub async fn run(&self, stop: &CancellationToken) {
        loop {
            let rearm = self.rearm.notified();
            tokio::pin!(rearm);
            // Enabled before the scan: an entry registered after it re-arms this very wait.
            rearm.as_mut().enable();
            let alarm = self.wake_due(Instant::now());
            let stopping = stop.is_cancelled();
            if stopping && alarm.is_none() && self.close_if_idle() {
                return;
            }
            // Stopping, the watcher looks every so often for the last entry to go (a dropped entry
            // does not wake it: that would cost a wake-up per idle moment of the data path).
            let alarm = if stopping {
                let poll = Instant::now() + STOPPING_POLL;
                Some(alarm.map_or(poll, |a| a.min(poll)))
            } else {
                alarm
            };
            let sleep = async {
                match alarm {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut rearm => {}
                _ = sleep => {}
                _ = stop.cancelled(), if !stopping => {}
            }
        }
    }

    /// Marks the watch closed if no entry waits; returns whether it did.
    fn close_if_idle(&self) -> bool {
        let mut st = self.lock();
        st.closed = st.used == 0;
        st.closed
    }

    /// Marks and wakes the entries due at `now`; returns the earliest deadline still ahead.
    fn wake_due(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        let mut alarm: Option<Instant> = None;
        for entry in st.entries.iter_mut() {
            let Entry::Waiting {
                deadline,
                waker,
                due,
            } = entry
            else {
                continue;
            };
            if *due {
                continue;
            }
            if *deadline <= now {
                *due = true;
                waker.wake_by_ref();
            } else {
                alarm = Some(alarm.map_or(*deadline, |a| a.min(*deadline)));
            }
        }
        st.alarm = alarm;
        alarm
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere cannot leave it torn.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One attempt's deadline on a [`DeadlineWatch`].
pub struct DeadlineEntry<'a> {
    watch: &'a DeadlineWatch,
    deadline: Instant,
    key: Option<usize>,
}

impl DeadlineEntry<'_> {
    /// Registers the task to be woken at the deadline (or refreshes its waker); true once the
    /// deadline has passed. Registration comes before anything the caller checks after it, so a
    /// [`DeadlineWatch::wake_all`] that follows a flag the caller reads next is never missed.
    pub fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        let watch = self.watch;
        let mut st = watch.lock();
        if let Some(key) = self.key {
            let Entry::Waiting { waker, due, .. } = &mut st.entries[key] else {
                unreachable!("entry {key} is held by this registration");
            };
            if !waker.will_wake(cx.waker()) {
                *waker = cx.waker().clone();
            }
            return *due;
        }
        if st.closed {
            // Only after the LUN stopped, when its connections are closed: give up now rather
            // than wait without a deadline.
            return true;
        }
        let entry = Entry::Waiting {
            deadline: self.deadline,
            waker: cx.waker().clone(),
            due: false,
        };
        let key = match st.free.pop() {
            Some(key) => {
                st.entries[key] = entry;
                key
            }
            None => {
                st.entries.push(entry);
                st.entries.len() - 1
            }
        };
        st.used += 1;
        self.key = Some(key);
        let rearm = st.alarm.is_none_or(|alarm| self.deadline < alarm);
        if rearm {
            // Later entries compare against this one until the watcher scans again.
            st.alarm = Some(self.deadline);
        }
        drop(st);
        if rearm {
            watch.rearm.notify_one();
        }
        false
    }
}

impl Drop for DeadlineEntry<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut st = self.watch.lock();
        debug_assert!(matches!(st.entries[key], Entry::Waiting { .. }));
        st.entries[key] = Entry::Free;
        st.free.push(key);
        st.used -= 1;
        if st.used == 0 {
            // Idle: start again from slot 0, so the watcher's scans cover only what is in use
            // now, not every slot a burst once took (the capacity stays for the next burst).
            st.entries.clear();
            st.free.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    async fn wait(watch: &DeadlineWatch, deadline: Instant) {
        let mut entry = watch.entry(deadline);
        std::future::poll_fn(|cx| {
            if entry.poll_due(cx) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn entries_wake_at_their_deadlines_in_any_order_of_registration() {
        let watch = Arc::new(DeadlineWatch::new());
        let stop = CancellationToken::new();
        let watcher = tokio::spawn({
            let (watch, stop) = (Arc::clone(&watch), stop.clone());
            async move { watch.run(&stop).await }
        });
        let start = Instant::now();
        let mut waits = Vec::new();
        // The later deadline first: the earlier one must re-arm the watcher.
        for ms in [300u64, 100, 200] {
            let watch = Arc::clone(&watch);
            waits.push(tokio::spawn(async move {
                wait(&watch, start + Duration::from_millis(ms)).await;
                Instant::now() - start
            }));
            tokio::task::yield_now().await;
        }
        for (w, ms) in waits.into_iter().zip([300u64, 100, 200]) {
            let woke = w.await.unwrap();
            assert!(
                woke >= Duration::from_millis(ms),
                "woke at {woke:?}, before {ms} ms"
            );
            assert!(
                woke < Duration::from_millis(ms + 5),
                "woke at {woke:?}, late for {ms} ms"
            );
        }
        assert_eq!(watch.waiting(), 0, "answered entries are removed");
        stop.cancel();
        watcher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_that_is_answered_first_is_never_woken_and_leaves_nothing() {
        let watch = DeadlineWatch::new();
        let mut cx = Context::from_waker(Waker::noop());
        let mut entry = watch.entry(Instant::now() + Duration::from_secs(1));
        assert!(!entry.poll_due(&mut cx));
        assert_eq!(watch.waiting(), 1);
        drop(entry);
        assert_eq!(watch.waiting(), 0);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(watch.wake_due(Instant::now()), None, "nothing left to wake");
    }

    #[tokio::test(start_paused = true)]
    async fn wake_all_wakes_entries_that_are_not_due() {
        let watch = Arc::new(DeadlineWatch::new());
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let polls = tokio::spawn({
            let (watch, woken) = (Arc::clone(&watch), Arc::clone(&woken));
            async move {
                let mut entry = watch.entry(Instant::now() + Duration::from_secs(3600));
                std::future::poll_fn(|cx| {
                    let n = woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    assert!(!entry.poll_due(cx));
                    if n == 0 {
                        std::task::Poll::Pending
                    } else {
                        std::task::Poll::Ready(())
                    }
                })
                .await
            }
        });
        while watch.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        watch.wake_all();
        polls.await.unwrap();
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_starts_after_the_watcher_returned_is_due_at_once() {
        let watch = DeadlineWatch::new();
        let stop = CancellationToken::new();
        stop.cancel();
        watch.run(&stop).await;
        let mut cx = Context::from_waker(Waker::noop());
        let mut entry = watch.entry(Instant::now() + Duration::from_secs(3600));
        assert!(entry.poll_due(&mut cx), "no watcher would ever wake it");
        assert_eq!(watch.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watcher_outlives_stop_while_an_entry_still_waits() {
        let watch = Arc::new(DeadlineWatch::new());
        let stop = CancellationToken::new();
        let watcher = tokio::spawn({
            let (watch, stop) = (Arc::clone(&watch), stop.clone());
            async move { watch.run(&stop).await }
        });
        let waiting = tokio::spawn({
            let watch = Arc::clone(&watch);
            async move { wait(&watch, Instant::now() + Duration::from_secs(5)).await }
        });
        while watch.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        tokio::task::yield_now().await;
        assert!(
            !watcher.is_finished(),
            "an entry still waits for its deadline"
        );
        waiting.await.unwrap();
        watcher.await.unwrap();
    }
}
