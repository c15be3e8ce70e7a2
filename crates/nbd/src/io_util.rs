//! Small buffered-I/O helpers shared by the client and the server.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the receive buffer of every connection: large enough that a QD32 burst of 4 KiB
/// replies or write requests arrives in one or two reads.
pub(crate) const READ_BUFFER_BYTES: usize = 256 << 10;
/// Below this much free space the buffer grows before the next read, so reads stay large.
const READ_SPACE_MIN_BYTES: usize = 32 << 10;

/// Reads once into `buf`, making room first. `Ok(0)` is EOF. Cancel-safe: bytes already read
/// stay in `buf`.
pub(crate) async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SPACE_MIN_BYTES {
        buf.reserve(READ_BUFFER_BYTES);
    }
    rd.read_buf(buf).await
}

/// Makes sure `buf` can hold `total` bytes without growing during the reads that follow.
pub(crate) fn reserve_total(buf: &mut BytesMut, total: usize) {
    if total > buf.len() {
        buf.reserve(total - buf.len());
    }
}

/// A future polled only after it has woken its task.
///
/// Why: a connection's request loop polls every branch of its `select!` each time the task wakes,
/// which is once or more per request. Some branches almost never fire (shutdown, removal, eviction,
/// a handover). Each poll of their cancellation futures takes two mutexes: the token's, and its
/// `Notify`'s. Wrapped in this, such a branch is polled once to register, and then only when its
/// own wake-up came. Between those wake-ups a poll costs one atomic swap: the task's waker is
/// registered again only when it changes, and a wake-up leaves it registered (it wakes by reference).
pub(crate) struct PollWhenWoken<F> {
    inner: std::pin::Pin<Box<F>>,
    flag: std::sync::Arc<WakeFlag>,
    /// The waker the flag holds.
    registered: Option<std::task::Waker>,
}

struct WakeFlag {
    woken: std::sync::atomic::AtomicBool,
    task: std::sync::Mutex<Option<std::task::Waker>>,
}

impl WakeFlag {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<std::task::Waker>> {
        // A waker swap cannot be left half done.
        self.task.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::task::Wake for WakeFlag {
    fn wake(self: std::sync::Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &std::sync::Arc<Self>) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: std::future::Future> PollWhenWoken<F> {
    pub(crate) fn new(inner: F) -> Self {
        PollWhenWoken {
            inner: Box::pin(inner),
            flag: std::sync::Arc::new(WakeFlag {
                // Polled the first time, to register.
                woken: std::sync::atomic::AtomicBool::new(true),
                task: std::sync::Mutex::new(None),
            }),
            registered: None,
        }
    }
}

impl<F: std::future::Future> std::future::Future for PollWhenWoken<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // Registered before the flag is read: a wake-up in between is never lost (it sets the flag,
        // then wakes whatever waker is registered by then).
        let current = self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()));
        if !current {
            let waker = cx.waker().clone();
            *self.flag.task() = Some(waker.clone());
            self.registered = Some(waker);
        }
        if !self
            .flag
            .woken
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            return std::task::Poll::Pending;
        }
        let waker = std::task::Waker::from(std::sync::Arc::clone(&self.flag));
        let mut inner_cx = std::task::Context::from_waker(&waker);
        self.inner.as_mut().poll(&mut inner_cx)
    }
}

impl<F> Unpin for PollWhenWoken<F> {}

#[cfg(test)]
mod poll_when_woken_tests {
    use super::PollWhenWoken;

    #[tokio::test]
    async fn it_completes_when_its_inner_future_does_and_not_before() {
        let token = tokio_util::sync::CancellationToken::new();
        let mut waiting = PollWhenWoken::new(token.clone().cancelled_owned());
        assert!(futures::poll!(&mut waiting).is_pending());
        assert!(
            futures::poll!(&mut waiting).is_pending(),
            "not woken: not polled"
        );
        token.cancel();
        assert!(futures::poll!(&mut waiting).is_ready());
    }

    #[tokio::test]
    async fn a_wake_up_that_does_not_finish_it_leaves_it_registered_for_the_next() {
        use std::sync::Arc;
        let (first, second) = (
            Arc::new(tokio::sync::Notify::new()),
            Arc::new(tokio::sync::Notify::new()),
        );
        let (a, b) = (Arc::clone(&first), Arc::clone(&second));
        let waiting = tokio::spawn(PollWhenWoken::new(async move {
            a.notified().await;
            b.notified().await;
        }));
        tokio::task::yield_now().await;
        // Woken, polled, still pending: the next wake-up must reach the task again.
        first.notify_one();
        tokio::task::yield_now().await;
        second.notify_one();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the second wake-up")
            .unwrap();
    }

    #[tokio::test]
    async fn it_wakes_the_task_that_waits_on_it() {
        let token = tokio_util::sync::CancellationToken::new();
        let waiting = tokio::spawn(PollWhenWoken::new(token.clone().cancelled_owned()));
        tokio::task::yield_now().await;
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
    }
}
