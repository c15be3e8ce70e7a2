//! What a thread's export connections have received, for a data thread that polls instead of
//! sleeping.
//!
//! Why: at low queue depth every request pays two wake-ups in lunmpio (the client's request, the
//! path's reply), and on a VM a wake-up costs tens of µs. A data thread with `data_poll_us` set keeps
//! its runtime polling its sockets for that long after the last read, as the kernel's `busy_poll`
//! and SPDK's reactors do, and sleeps again when the reads stop (docs/OPERATIONS.md).
//!
//! Thread-local, because a LUN's paths and export connections all run on its data thread: the
//! thread that reads is the one whose poller wants to know. When nothing polls, a read costs an
//! increment and an empty `take`.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

thread_local! {
    /// Reads that returned data on this thread (wraps; only compared for change).
    static READS: Cell<u64> = const { Cell::new(0) };
    /// The poller waiting for the next read on this thread, if one sleeps.
    static POLLER: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Counts a read of an export connection that returned data (requests from a client: only they start
/// a polling window, so an idle daemon's health probes do not keep it spinning), and wakes this
/// thread's sleeping poller.
pub(crate) fn note_read() {
    READS.with(|r| r.set(r.get().wrapping_add(1)));
    if let Some(w) = POLLER.with(Cell::take) {
        w.wake();
    }
}

/// Reads that returned data on this thread so far; compare two values for change.
pub fn reads() -> u64 {
    READS.with(Cell::get)
}

/// Resolves at the first read on this thread after the call. For one poller per thread: a second
/// one replaces the first's waker.
pub fn next_read() -> NextRead {
    NextRead { from: reads() }
}

/// The future of [`next_read`].
#[derive(Debug)]
pub struct NextRead {
    from: u64,
}

impl Future for NextRead {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if reads() != self.from {
            return Poll::Ready(());
        }
        POLLER.with(|p| p.set(Some(cx.waker().clone())));
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn next_read_waits_for_a_read_on_this_thread() {
        let before = reads();
        let waiting = tokio::spawn(next_read());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "nothing was read yet");
        // A read on another thread is not this thread's.
        std::thread::spawn(note_read).join().unwrap();
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "another thread's read does not count"
        );
        note_read();
        waiting.await.unwrap();
        assert_eq!(reads(), before.wrapping_add(1));
    }
}
