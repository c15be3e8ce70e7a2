//! Small buffered-I/O helpers shared by the client and the server.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

/// Without vectored writes, data at least this large is written straight from its own buffer, not
/// copied.
const DIRECT_WRITE_BYTES: usize = 64 << 10;
/// With vectored writes, data at least this large is written from its own buffer: below it, copying
/// costs less than one more I/O vector.
const SEGMENT_BYTES_MIN: usize = 1024;
/// The most I/O vectors one write takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Messages queued for one write: headers (and small payloads) encoded in one buffer, large payloads
/// kept in their own buffers and written from there with one vectored write — not copied.
pub(crate) struct WriteBatch {
    /// Encoded bytes not yet in `segments`.
    out: BytesMut,
    /// What goes on the wire, in order, before `out`.
    segments: Vec<Bytes>,
    /// Payloads at least this large become a segment of their own instead of being copied.
    segment_bytes_min: usize,
    segment_bytes: usize,
}

impl WriteBatch {
    /// `capacity`: the bytes a batch usually holds before it is written.
    pub(crate) fn new(capacity: usize, vectored: bool) -> WriteBatch {
        WriteBatch {
            out: BytesMut::with_capacity(capacity + 4096),
            segments: Vec::new(),
            // Without vectored writes each segment is a write of its own: only worth it when large.
            segment_bytes_min: if vectored {
                SEGMENT_BYTES_MIN
            } else {
                DIRECT_WRITE_BYTES
            },
            segment_bytes: 0,
        }
    }

    /// Where the next header is encoded.
    pub(crate) fn out(&mut self) -> &mut BytesMut {
        &mut self.out
    }

    /// Bytes queued.
    pub(crate) fn bytes(&self) -> usize {
        self.segment_bytes + self.out.len()
    }

    /// Queues a payload after what is encoded so far.
    pub(crate) fn push_data(&mut self, data: Bytes) {
        if data.len() < self.segment_bytes_min {
            self.out.extend_from_slice(&data);
            return;
        }
        if !self.out.is_empty() {
            let encoded = self.out.split().freeze();
            self.segment_bytes += encoded.len();
            self.segments.push(encoded);
        }
        self.segment_bytes += data.len();
        self.segments.push(data);
    }

    /// Writes everything queued, in order.
    pub(crate) async fn write<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        if self.segments.is_empty() {
            if !self.out.is_empty() {
                wr.write_all(&self.out).await?;
                self.out.clear();
            }
            return Ok(());
        }
        if !self.out.is_empty() {
            self.segments.push(self.out.split().freeze());
        }
        let written = if wr.is_write_vectored() {
            write_all_vectored(wr, &mut self.segments).await
        } else {
            write_each(wr, &self.segments).await
        };
        // Dropped before the buffer is reused, so `out` owns it alone again and reclaims it.
        self.segments.clear();
        self.segment_bytes = 0;
        written
    }
}

async fn write_each<W: AsyncWrite + Unpin>(wr: &mut W, segments: &[Bytes]) -> std::io::Result<()> {
    for segment in segments {
        wr.write_all(segment).await?;
    }
    Ok(())
}

/// Writes every segment, in order, in as few system calls as the socket takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    segments: &mut [Bytes],
) -> std::io::Result<()> {
    let mut first = 0;
    while first < segments.len() {
        let n = {
            let slices: Vec<std::io::IoSlice<'_>> = segments[first..]
                .iter()
                .take(IOV_MAX)
                .map(|s| std::io::IoSlice::new(s))
                .collect();
            wr.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 && first < segments.len() {
            let len = segments[first].len();
            if left >= len {
                left -= len;
                first += 1;
            } else {
                bytes::Buf::advance(&mut segments[first], left);
                left = 0;
            }
        }
        while first < segments.len() && segments[first].is_empty() {
            first += 1;
        }
    }
    Ok(())
}

/// A future polled only after it has woken its task.
///
/// Why: a connection's request loop polls every branch of its `select!` each time the task wakes,
/// which is once or more per request. Some branches almost never fire (shutdown, removal, eviction,
/// a handover). Each poll of their cancellation futures takes two mutexes: the token's, and its
/// `Notify`'s. Wrapped in this, such a branch is polled once to register, and then only when its
/// own wake-up came. Between those wake-ups a poll costs one atomic load: the task's waker is
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
        // A load first: the flag is almost never set, and a load costs less than a swap.
        let woken = &self.flag.woken;
        if !woken.load(std::sync::atomic::Ordering::Acquire)
            || !woken.swap(false, std::sync::atomic::Ordering::AcqRel)
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

#[cfg(test)]
mod write_batch_tests {
    use super::write_all_vectored;
    use bytes::Bytes;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most `max` bytes per call, across several I/O vectors, like a socket whose buffer
    /// is nearly full.
    struct Trickle {
        got: Vec<u8>,
        max: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max);
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
                if n == self.max {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_vectored_write_taken_a_few_bytes_at_a_time_keeps_every_byte_in_order() {
        let parts: Vec<Bytes> = vec![
            Bytes::from_static(b"header-1"),
            Bytes::from(vec![7u8; 5000]),
            Bytes::new(),
            Bytes::from_static(b"h2"),
            Bytes::from(vec![9u8; 33]),
        ];
        let expected: Vec<u8> = parts.iter().flat_map(|b| b.to_vec()).collect();
        for max in [1, 3, 8, 10, 4096, 1 << 20] {
            let mut segments = parts.clone();
            let mut w = Trickle {
                got: Vec::new(),
                max,
            };
            write_all_vectored(&mut w, &mut segments).await.unwrap();
            assert_eq!(w.got, expected, "at most {max} bytes per write");
        }
    }
}
