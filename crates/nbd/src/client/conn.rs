//! The connection engine: pending-request table, writer task, reader task.

use super::{ClientError, ConnectOptions, ExportInfo, IN_FLIGHT_MAX, Reply, Request};
use crate::io_util::{READ_BUFFER_BYTES, WriteBatch, fill, reserve_total};
use crate::proto::*;
use crate::{CommandFlags, Extent, NbdErrno, TransmissionFlags, TransmissionMode, WideExtent};
use bytes::{Buf, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The writer sends its buffer once it holds this much, even if more requests are queued.
const WRITE_BATCH_BYTES: usize = 256 << 10;
/// How long `disconnect()` waits for in-flight requests before sending DISC anyway.
const DISCONNECT_DRAIN: Duration = Duration::from_secs(5);

type ReplyTx = oneshot::Sender<Result<Reply, ClientError>>;

/// A request on the wire, owed a reply.
struct Pending {
    kind: Kind,
    /// The request's offset, which an extended reply echoes.
    offset: u64,
    reply: ReplyTx,
    /// Holds the in-flight slot until the reply arrives (even after a timeout: the server
    /// still owes it, so the slot is still in use).
    _permit: OwnedSemaphorePermit,
    /// First error chunk seen (structured replies).
    error: Option<ClientError>,
}

enum Kind {
    Read {
        offset: u64,
        length: u32,
        asm: ReadAsm,
    },
    BlockStatus {
        /// The request's length: 64-bit extents are clipped to it.
        length: u32,
        extents: Option<Vec<Extent>>,
    },
    Other,
}

/// Assembles a structured READ reply. The common case, one OFFSET_DATA chunk covering the
/// whole range, is passed through without a copy.
#[derive(Default)]
struct ReadAsm {
    single: Option<Bytes>,
    buf: Option<BytesMut>,
    covered: u64,
    /// Ranges (start → end, relative to the request) covered so far, once there is more than one
    /// chunk: chunks must not overlap (proto.md), so that with `covered == length` every byte was
    /// sent exactly once and no hole of zeroes passes for data.
    ranges: Option<std::collections::BTreeMap<u32, u32>>,
}

impl ReadAsm {
    /// Records that a chunk covers `rel..rel+len` of the request; refuses an empty chunk or one that
    /// overlaps an earlier chunk.
    fn claim(&mut self, rel: u32, len: u32, length: u32) -> Result<(), Violation> {
        if len == 0 {
            return Err(Violation("READ chunk of length 0".into()));
        }
        if self.covered + u64::from(len) > u64::from(length) {
            return Err(Violation("READ chunks overlap".into()));
        }
        let end = rel + len; // `in_range` checked it lies within the request
        if self.covered == 0 && rel == 0 && len == length {
            self.covered = u64::from(len); // one chunk covers all: nothing to track
            return Ok(());
        }
        let ranges = self.ranges.get_or_insert_with(Default::default);
        let before = ranges.range(..=rel).next_back();
        let after = ranges.range(rel..).next();
        if before.is_some_and(|(_, &e)| e > rel) || after.is_some_and(|(&s, _)| s < end) {
            return Err(Violation("READ chunks overlap".into()));
        }
        ranges.insert(rel, end);
        self.covered += u64::from(len);
        debug_assert!(
            self.covered <= u64::from(length),
            "chunks never cover more than the request"
        );
        Ok(())
    }

    fn materialize(&mut self, length: u32) -> &mut BytesMut {
        let single = self.single.take();
        self.buf.get_or_insert_with(|| {
            // Bounded by the request's own length, which we chose.
            let mut b = BytesMut::zeroed(length as usize);
            if let Some(s) = single {
                b[..s.len()].copy_from_slice(&s);
            }
            b
        })
    }

    /// Places a chunk's data (already claimed).
    fn data(&mut self, rel: usize, data: Bytes, length: u32) {
        if rel == 0 && data.len() == length as usize && self.buf.is_none() && self.single.is_none()
        {
            self.single = Some(data);
            return;
        }
        let n = data.len();
        self.materialize(length)[rel..rel + n].copy_from_slice(&data);
    }

    /// A hole chunk (already claimed): the buffer starts zeroed, nothing to write.
    fn hole(&mut self, length: u32) {
        self.materialize(length);
    }

    fn finish(self) -> Bytes {
        match (self.single, self.buf) {
            (Some(s), None) => s,
            (_, Some(b)) => b.freeze(),
            (None, None) => Bytes::new(),
        }
    }
}

struct State {
    next_cookie: u64,
    pending: HashMap<u64, Pending, CookieHash>,
    /// Why the connection ended; set once.
    dead: Option<ClientError>,
}

/// Hashes the pending table's cookies: they are our own counter, so a multiply spreads them well
/// enough, and the default hasher's resistance to chosen keys buys nothing (it costs tens of
/// nanoseconds per lookup, twice per request).
#[derive(Default, Clone, Copy)]
struct CookieHash;

impl std::hash::BuildHasher for CookieHash {
    type Hasher = CookieHasher;

    fn build_hasher(&self) -> CookieHasher {
        CookieHasher(0)
    }
}

struct CookieHasher(u64);

impl std::hash::Hasher for CookieHasher {
    fn finish(&self) -> u64 {
        // Fibonacci hashing: the top bits (the table's tag) depend on every bit of the cookie, and an
        // odd multiplier keeps sequential cookies apart in the low bits (the bucket).
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed; anything else still hashes, just slowly.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A request header as it goes on the wire: compact, or extended.
struct WireHeader {
    bytes: [u8; EXTENDED_REQUEST_HEADER_BYTES],
    len: usize,
}

impl WireHeader {
    fn new(h: &RequestHeader, mode: TransmissionMode) -> WireHeader {
        let mut bytes = [0u8; EXTENDED_REQUEST_HEADER_BYTES];
        let len = if mode.extended() {
            bytes = h.to_bytes_extended();
            EXTENDED_REQUEST_HEADER_BYTES
        } else {
            bytes[..REQUEST_HEADER_BYTES].copy_from_slice(&h.to_bytes());
            REQUEST_HEADER_BYTES
        };
        WireHeader { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// One queued request for the writer.
struct Outgoing {
    header: WireHeader,
    payload: Option<Bytes>,
    /// Signalled once the bytes are handed to the socket (used by DISC).
    written: Option<oneshot::Sender<()>>,
}

pub(crate) struct Shared {
    pub(crate) info: ExportInfo,
    request_timeout: Option<Duration>,
    slots: Arc<Semaphore>,
    state: Mutex<State>,
    tx: mpsc::UnboundedSender<Outgoing>,
    pub(crate) closed: CancellationToken,
    /// Notified whenever the pending table becomes empty.
    idle: Notify,
    /// Largest piece per request, a multiple of the minimum block.
    max_chunk: u32,
}

/// Protocol violation while reading replies.
struct Violation(String);

impl Shared {
    pub(crate) fn start<R, W>(
        rd: R,
        wr: W,
        leftover: BytesMut,
        info: ExportInfo,
        options: &ConnectOptions,
    ) -> Arc<Shared>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let min = info.block_size.min.max(1);
        let max_chunk = (info.block_size.max_payload / min * min).max(min);
        let shared = Arc::new(Shared {
            info,
            request_timeout: options.request_timeout,
            slots: Arc::new(Semaphore::new(
                options.max_in_flight.clamp(1, IN_FLIGHT_MAX),
            )),
            state: Mutex::new(State {
                next_cookie: 1,
                pending: HashMap::default(),
                dead: None,
            }),
            tx,
            closed: CancellationToken::new(),
            idle: Notify::new(),
            max_chunk,
        });
        tokio::spawn(writer_task(wr, rx, Arc::clone(&shared)));
        tokio::spawn(reader_task(rd, leftover, Arc::clone(&shared)));
        shared
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated in a way that
        // matters more than losing the connection; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    pub(crate) fn close_reason(&self) -> Option<ClientError> {
        self.lock().dead.clone()
    }

    /// Ends the connection (first cause wins) and fails every in-flight request with `err`.
    pub(crate) fn fail_all(&self, err: ClientError) {
        let drained = {
            let mut st = self.lock();
            if st.dead.is_some() {
                return;
            }
            st.dead = Some(err.clone());
            std::mem::take(&mut st.pending)
        };
        self.slots.close();
        self.closed.cancel();
        for (_, p) in drained {
            let _ = p.reply.send(Err(err.clone()));
        }
        self.idle.notify_waiters();
    }

    fn dead_error(&self) -> ClientError {
        self.lock().dead.clone().unwrap_or(ClientError::Closed)
    }

    pub(crate) async fn disconnect(&self) {
        if self.closed.is_cancelled() {
            return;
        }
        let drained = tokio::time::timeout(DISCONNECT_DRAIN, async {
            loop {
                let idle = self.idle.notified();
                if self.in_flight() == 0 || self.closed.is_cancelled() {
                    return;
                }
                idle.await;
            }
        });
        let _ = drained.await;
        let header = RequestHeader {
            flags: CommandFlags::empty(),
            command: Command::Disc,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let (wtx, wrx) = oneshot::channel();
        if self
            .tx
            .send(Outgoing {
                header: WireHeader::new(&header, self.info.mode),
                payload: None,
                written: Some(wtx),
            })
            .is_ok()
        {
            let _ = tokio::time::timeout(DISCONNECT_DRAIN, wrx).await;
        }
        self.fail_all(ClientError::Closed);
    }

    /// Validates, splits and runs one logical request.
    pub(crate) async fn execute(&self, req: &Request) -> Result<Reply, ClientError> {
        let sent = AtomicBool::new(false);
        self.execute_tracked(req, &sent).await.map_err(|f| f.error)
    }

    /// Like [`Shared::execute`], and on failure also says whether any part of the request may have
    /// reached the server (see [`Failure::sent`]). A data-changing request that was split returns only
    /// once every piece is settled, so "answered" means every piece was answered.
    ///
    /// `sent` is set the moment any part of the request is handed to the connection's writer: until
    /// then, dropping the future guarantees the server never sees it.
    pub(crate) async fn execute_tracked(
        &self,
        req: &Request,
        sent: &AtomicBool,
    ) -> Result<Reply, Failure> {
        self.validate(req).map_err(Failure::unsent)?;
        let Some(wire) = self.wire_request(req) else {
            // A CACHE hint the server did not offer: nothing to do.
            return Ok(Reply::Done);
        };
        if !self.needs_split(&wire) {
            return self.one(wire, sent).await;
        }
        let whole = (wire.offset, wire.length);
        let parts = pieces(wire.offset, wire.length, self.max_chunk).map(|(offset, length)| {
            let rel = (offset - whole.0) as usize;
            let piece = WireRequest {
                command: wire.command,
                flags: wire.flags,
                offset,
                length,
                payload: wire
                    .payload
                    .as_ref()
                    .map(|data| data.slice(rel..rel + length as usize)),
            };
            self.one(piece, sent)
        });
        if wire.command != Command::Read {
            return settle_all(futures::future::join_all(parts).await);
        }
        let parts = futures::future::try_join_all(parts).await?;
        let mut out = BytesMut::with_capacity(whole.1 as usize);
        for p in parts {
            if let Reply::Read(b) = p {
                out.extend_from_slice(&b);
            }
        }
        Ok(Reply::Read(out.freeze()))
    }

    /// Local checks against the negotiated export, so a bad request never reaches the wire.
    fn validate(&self, req: &Request) -> Result<(), ClientError> {
        use TransmissionFlags as T;
        let info = &self.info;
        let f = info.flags;
        let inval = |m: String| Err(ClientError::Invalid(m));
        if let Request::Write { data, .. } = req
            && data.len() > u32::MAX as usize
        {
            return inval("write data longer than 4 GiB".into());
        }
        let mut allowed = CommandFlags::empty();
        if f.contains(T::SEND_FUA) {
            allowed |= CommandFlags::FUA;
        }
        let writes = matches!(
            req,
            Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. }
        );
        if writes && f.contains(T::READ_ONLY) {
            return inval("export is read-only".into());
        }
        match req {
            Request::Flush { .. } if !f.contains(T::SEND_FLUSH) => {
                return inval("server does not support FLUSH".into());
            }
            Request::Trim { .. } if !f.contains(T::SEND_TRIM) => {
                return inval("server does not support TRIM".into());
            }
            Request::WriteZeroes { .. } => {
                if !f.contains(T::SEND_WRITE_ZEROES) {
                    return inval("server does not support WRITE_ZEROES".into());
                }
                allowed |= CommandFlags::NO_HOLE;
                if f.contains(T::SEND_FAST_ZERO) {
                    allowed |= CommandFlags::FAST_ZERO;
                }
            }
            Request::BlockStatus { .. } => {
                if info.base_allocation.is_none() {
                    return inval("base:allocation was not negotiated".into());
                }
                allowed |= CommandFlags::REQ_ONE;
            }
            _ => {}
        }
        let extra = req.flags() - allowed;
        if !extra.is_empty() {
            return inval(format!(
                "flags {:#x} not allowed for {}",
                extra.bits(),
                req.command().name()
            ));
        }
        if matches!(req, Request::Flush { .. }) {
            return Ok(());
        }
        let (offset, length) = (req.offset(), req.length() as u64);
        if length == 0 {
            return inval(format!("{} of length 0", req.command().name()));
        }
        match offset.checked_add(length) {
            Some(end) if end <= info.size => {}
            _ => {
                return inval(format!(
                    "range {offset}+{length} beyond the export size {}",
                    info.size
                ));
            }
        }
        let min = info.block_size.min as u64;
        if offset % min != 0 || length % min != 0 {
            return inval(format!(
                "range {offset}+{length} not aligned to the minimum block {min}"
            ));
        }
        Ok(())
    }

    /// Runs one wire request, within the request timeout.
    async fn one(&self, wire: WireRequest, sent: &AtomicBool) -> Result<Reply, Failure> {
        match self.request_timeout {
            None => self.one_inner(wire, sent).await,
            Some(t) => match tokio::time::timeout(t, self.one_inner(wire, sent)).await {
                Ok(r) => r,
                // The pending entry stays: the late reply is read and discarded.
                Err(_) => Err(Failure::sent(ClientError::Timeout)),
            },
        }
    }

    async fn one_inner(&self, wire: WireRequest, sent: &AtomicBool) -> Result<Reply, Failure> {
        // A free slot is the common case: taken without building the waiting future.
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(p) => Ok(p),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                Arc::clone(&self.slots).acquire_owned().await
            }
            Err(tokio::sync::TryAcquireError::Closed) => {
                return Err(Failure::unsent(self.dead_error()));
            }
        };
        let Ok(permit) = permit else {
            return Err(Failure::unsent(self.dead_error()));
        };
        let rrx = self.queue(permit, wire, sent)?;
        match rrx.await {
            Ok(r) => r.map_err(Failure::sent),
            Err(_) => Err(Failure::sent(self.dead_error())),
        }
    }

    /// Puts one wire request in the pending table and hands it to the writer; the receiver gets the
    /// reply. `sent` is set once the writer may put it on the wire.
    fn queue(
        &self,
        permit: OwnedSemaphorePermit,
        wire: WireRequest,
        sent: &AtomicBool,
    ) -> Result<ReplyRx, Failure> {
        let WireRequest {
            command,
            flags,
            offset,
            length,
            payload,
        } = wire;
        let (rtx, rrx) = oneshot::channel();
        let kind = match command {
            Command::Read => Kind::Read {
                offset,
                length,
                asm: ReadAsm::default(),
            },
            Command::BlockStatus => Kind::BlockStatus {
                length,
                extents: None,
            },
            _ => Kind::Other,
        };
        let cookie = {
            let mut st = self.lock();
            if let Some(e) = &st.dead {
                return Err(Failure::unsent(e.clone()));
            }
            let cookie = st.next_cookie;
            st.next_cookie = st.next_cookie.wrapping_add(1);
            // From here on the writer may put it on the wire.
            sent.store(true, Ordering::Release);
            let earlier = st.pending.insert(
                cookie,
                Pending {
                    kind,
                    offset,
                    reply: rtx,
                    _permit: permit,
                    error: None,
                },
            );
            // A cookie names one request: in-flight requests are bounded far below 2^64.
            debug_assert!(earlier.is_none(), "cookie {cookie} reused while in flight");
            cookie
        };
        let mode = self.info.mode;
        // Under extended headers a payload is announced by a flag, not by the command.
        let flags = if mode.extended() && payload.is_some() {
            flags | CommandFlags::PAYLOAD_LEN
        } else {
            flags
        };
        let header = WireHeader::new(
            &RequestHeader {
                flags,
                command,
                cookie,
                offset,
                length: u64::from(length),
            },
            mode,
        );
        if self
            .tx
            .send(Outgoing {
                header,
                payload,
                written: None,
            })
            .is_err()
        {
            // Writer gone: the connection is dead (fail_all has run or will run). If fail_all already
            // took the entry, it may have been queued to a writer that died mid-write: count it sent.
            let never_queued = self.lock().pending.remove(&cookie).is_some();
            let error = self.dead_error();
            return Err(if never_queued {
                Failure::unsent(error)
            } else {
                Failure::sent(error)
            });
        }
        Ok(rrx)
    }

    /// Queues `req` without waiting, when it is one wire request, a slot is free and no client
    /// timeout applies: the common case, which then needs no future of its own. `None`: take the
    /// async path (`execute_tracked`), which waits, splits, or reports why the request cannot run.
    pub(crate) fn try_queue(
        &self,
        req: &Request,
        sent: &AtomicBool,
    ) -> Option<Result<ReplyRx, Failure>> {
        if self.request_timeout.is_some() || self.validate(req).is_err() {
            return None;
        }
        let wire = self.wire_request(req).filter(|w| !self.needs_split(w))?;
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(self.queue(permit, wire, sent))
    }

    /// `req` as one wire request, before any split; `None` for a CACHE hint the server did not
    /// offer (nothing goes on the wire).
    fn wire_request(&self, req: &Request) -> Option<WireRequest> {
        let (flags, offset, length, payload) = match req {
            Request::Read { offset, length } => (CommandFlags::empty(), *offset, *length, None),
            Request::Write {
                offset,
                data,
                flags,
            } => (*flags, *offset, data.len() as u32, Some(data.clone())),
            Request::Trim {
                offset,
                length,
                flags,
            }
            | Request::WriteZeroes {
                offset,
                length,
                flags,
            }
            | Request::BlockStatus {
                offset,
                length,
                flags,
            } => (*flags, *offset, *length, None),
            Request::Flush { flags } => (*flags, 0, 0, None),
            Request::Cache { offset, length } => {
                if !self.info.flags.contains(TransmissionFlags::SEND_CACHE) {
                    return None;
                }
                (CommandFlags::empty(), *offset, *length, None)
            }
        };
        Some(WireRequest {
            command: req.command(),
            flags,
            offset,
            length,
            payload,
        })
    }

    /// Whether `wire` goes out in pieces: data moves and range effects longer than the largest
    /// piece do; BLOCK_STATUS (whose length is a hint), FLUSH and CACHE never do.
    fn needs_split(&self, wire: &WireRequest) -> bool {
        wire.length > self.max_chunk
            && matches!(
                wire.command,
                Command::Read | Command::Write | Command::Trim | Command::WriteZeroes
            )
    }
}

/// What the reader answers one queued request with.
pub(crate) type ReplyRx = oneshot::Receiver<Result<Reply, ClientError>>;

/// One request as it goes on the wire (a piece of a split request, or all of it).
struct WireRequest {
    command: Command,
    flags: CommandFlags,
    offset: u64,
    length: u32,
    payload: Option<Bytes>,
}

/// A request that failed, and whether any of it may have reached the server.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) error: ClientError,
    /// False only when nothing of the request was handed to the connection's writer: it cannot
    /// execute on the server, ever. True otherwise, even if it probably never left our buffers.
    pub(crate) sent: bool,
}

impl Failure {
    fn unsent(error: ClientError) -> Failure {
        Failure { error, sent: false }
    }

    fn sent(error: ClientError) -> Failure {
        Failure { error, sent: true }
    }
}

impl From<ClientError> for Failure {
    /// Local refusals (`?` on validation) reach nothing.
    fn from(error: ClientError) -> Failure {
        Failure::unsent(error)
    }
}

/// Combines the pieces of a split data-changing request, every one settled: done when all are done;
/// otherwise a path fault wins over an error reply (the caller must treat the connection as broken),
/// and the request counts as sent if any piece was.
fn settle_all(results: Vec<Result<Reply, Failure>>) -> Result<Reply, Failure> {
    let sent = results.iter().any(|r| matches!(r, Err(f) if f.sent));
    let mut first: Option<ClientError> = None;
    for r in results {
        if let Err(f) = r {
            let replace = match &first {
                None => true,
                Some(e) => !e.is_path_fault() && f.error.is_path_fault(),
            };
            if replace {
                first = Some(f.error);
            }
        }
    }
    match first {
        None => Ok(Reply::Done),
        Some(error) => Err(Failure { error, sent }),
    }
}

/// Splits `[offset, offset+length)` into pieces of at most `max` bytes.
fn pieces(offset: u64, length: u32, max: u32) -> impl Iterator<Item = (u64, u32)> {
    let n = length.div_ceil(max);
    (0..n).map(move |i| {
        let start = i as u64 * max as u64;
        let l = (length as u64 - start).min(max as u64) as u32;
        (offset + start, l)
    })
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut batch = WriteBatch::new(WRITE_BATCH_BYTES, wr.is_write_vectored());
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    let token = shared.closed.clone();
    let r: std::io::Result<()> = async {
        loop {
            let first = tokio::select! {
                _ = token.cancelled() => return Ok(()),
                m = rx.recv() => match m { Some(m) => m, None => return Ok(()) },
            };
            // Let the other callers that are ready queue theirs first, so they share this write.
            behind_ready_tasks().await;
            let mut next = Some(first);
            while let Some(m) = next {
                batch.out().extend_from_slice(m.header.as_slice());
                if let Some(p) = m.payload {
                    // Written from the caller's buffer, not copied (when large enough).
                    batch.push_data(p);
                }
                if let Some(a) = m.written {
                    acks.push(a);
                }
                if batch.bytes() >= WRITE_BATCH_BYTES {
                    write_cancellable(&mut wr, &mut batch, &token).await?;
                }
                next = rx.try_recv().ok();
            }
            write_cancellable(&mut wr, &mut batch, &token).await?;
            wr.flush().await?;
            for a in acks.drain(..) {
                let _ = a.send(());
            }
        }
    }
    .await;
    if let Err(e) = r {
        shared.fail_all(ClientError::Connection(format!("write: {e}")));
    }
    let _ = wr.shutdown().await;
}

/// Puts the calling task behind the tasks already ready on its runtime, once: a wake-up of its own
/// while it runs sends it to the back of the run queue. Unlike `yield_now`, which waits until the
/// runtime has polled its sockets, this costs no `epoll_wait`: at depth 1 that was one system call
/// per request for nothing to gather (the requests of this turn are queued by then).
async fn behind_ready_tasks() {
    let mut queued = false;
    std::future::poll_fn(|cx| {
        if queued {
            return std::task::Poll::Ready(());
        }
        queued = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

async fn write_cancellable<W: AsyncWrite + Unpin>(
    wr: &mut W,
    batch: &mut WriteBatch,
    token: &CancellationToken,
) -> std::io::Result<()> {
    tokio::select! {
        // A stopped server must not wedge close(): give up on the write.
        _ = token.cancelled() => Err(std::io::Error::other("connection closed")),
        r = batch.write(wr) => r,
    }
}

async fn reader_task<R: AsyncRead + Unpin>(mut rd: R, leftover: BytesMut, shared: Arc<Shared>) {
    let mut buf = leftover;
    reserve_total(&mut buf, READ_BUFFER_BYTES);
    let token = shared.closed.clone();
    let r = tokio::select! {
        _ = token.cancelled() => return,
        r = read_loop(&mut rd, &mut buf, &shared) => r,
    };
    let err = match r {
        Ok(()) => ClientError::Connection("server closed the connection".into()),
        Err(ReadErr::Io(e)) => ClientError::Connection(format!("read: {e}")),
        Err(ReadErr::Violation(Violation(m))) => ClientError::Protocol(m),
    };
    tracing::debug!(error = %err, "nbd client connection ended");
    shared.fail_all(err);
}

enum ReadErr {
    Io(std::io::Error),
    Violation(Violation),
}

impl From<std::io::Error> for ReadErr {
    fn from(e: std::io::Error) -> Self {
        ReadErr::Io(e)
    }
}

impl From<Violation> for ReadErr {
    fn from(v: Violation) -> Self {
        ReadErr::Violation(v)
    }
}

impl From<ProtoError> for ReadErr {
    fn from(e: ProtoError) -> Self {
        ReadErr::Violation(Violation(e.to_string()))
    }
}

/// Reads until `buf` holds `n` bytes. `Ok(false)`: EOF.
async fn need<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    n: usize,
) -> std::io::Result<bool> {
    reserve_total(buf, n);
    while buf.len() < n {
        if fill(rd, buf).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `Ok(())` on EOF at a message boundary.
async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<(), ReadErr> {
    let eof_mid = || {
        ReadErr::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "EOF in the middle of a reply",
        ))
    };
    if shared.info.mode.extended() {
        return read_loop_extended(rd, buf, shared).await;
    }
    loop {
        if buf.len() < 4 {
            let empty = buf.is_empty();
            if !need(rd, buf, 4).await? {
                return if empty && buf.is_empty() {
                    Ok(())
                } else {
                    Err(eof_mid())
                };
            }
        }
        match peek_reply_magic(buf) {
            Some(NBD_SIMPLE_REPLY_MAGIC) => {
                if !need(rd, buf, SIMPLE_REPLY_BYTES).await? {
                    return Err(eof_mid());
                }
                let Some(h) = SimpleReply::decode(buf)? else {
                    return Err(eof_mid());
                };
                let data_len = shared.simple_data_len(&h)?;
                if !need(rd, buf, SIMPLE_REPLY_BYTES + data_len).await? {
                    return Err(eof_mid());
                }
                buf.advance(SIMPLE_REPLY_BYTES);
                let data = if data_len > 0 {
                    buf.split_to(data_len).freeze()
                } else {
                    Bytes::new()
                };
                shared.on_simple(h, data);
            }
            Some(NBD_STRUCTURED_REPLY_MAGIC) => {
                if !need(rd, buf, CHUNK_HEADER_BYTES).await? {
                    return Err(eof_mid());
                }
                let Some(h) = ChunkHeader::decode(buf)? else {
                    return Err(eof_mid());
                };
                if !need(rd, buf, CHUNK_HEADER_BYTES + h.length as usize).await? {
                    return Err(eof_mid());
                }
                let Some(chunk) = Chunk::decode(buf)? else {
                    return Err(eof_mid());
                };
                shared.on_chunk(chunk, None)?;
            }
            other => {
                return Err(Violation(format!("bad reply magic {:#x}", other.unwrap_or(0))).into());
            }
        }
        // Reclaim the buffer's front once it is drained.
        if buf.is_empty() && buf.capacity() < READ_BUFFER_BYTES / 2 {
            buf.reserve(READ_BUFFER_BYTES);
        }
    }
}

/// The reply stream under extended headers: only 32-byte extended chunks, nothing else.
async fn read_loop_extended<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Result<(), ReadErr> {
    loop {
        let empty = buf.is_empty();
        if !need(rd, buf, EXTENDED_REPLY_HEADER_BYTES).await? {
            return if empty && buf.is_empty() {
                Ok(())
            } else {
                Err(eof_in_reply())
            };
        }
        let Some(h) = ExtendedReplyHeader::decode(buf)? else {
            return Err(eof_in_reply());
        };
        // Bounded by the header check (at most CHUNK_PAYLOAD_BYTES_MAX).
        if !need(rd, buf, EXTENDED_REPLY_HEADER_BYTES + h.length as usize).await? {
            return Err(eof_in_reply());
        }
        let Some((chunk, offset)) = Chunk::decode_extended(buf)? else {
            return Err(eof_in_reply());
        };
        shared.on_chunk(chunk, Some(offset))?;
        if buf.is_empty() && buf.capacity() < READ_BUFFER_BYTES / 2 {
            buf.reserve(READ_BUFFER_BYTES);
        }
    }
}

fn eof_in_reply() -> ReadErr {
    ReadErr::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "EOF in the middle of a reply",
    ))
}

impl Shared {
    /// Bytes of READ data that follow a simple reply header.
    fn simple_data_len(&self, h: &SimpleReply) -> Result<usize, Violation> {
        let st = self.lock();
        let Some(p) = st.pending.get(&h.cookie) else {
            return Err(Violation(format!(
                "simple reply for unknown cookie {}",
                h.cookie
            )));
        };
        match &p.kind {
            Kind::Read { length, .. } if h.error == 0 => {
                if self.info.mode.chunked() {
                    return Err(Violation(
                        "successful simple reply to READ under structured replies".into(),
                    ));
                }
                Ok(*length as usize)
            }
            Kind::BlockStatus { .. } if h.error == 0 => Err(Violation(
                "simple reply to BLOCK_STATUS without an error".into(),
            )),
            _ => Ok(0),
        }
    }

    fn on_simple(&self, h: SimpleReply, data: Bytes) {
        let p = {
            let mut st = self.lock();
            let p = st.pending.remove(&h.cookie);
            if st.pending.is_empty() {
                self.idle.notify_waiters();
            }
            p
        };
        let Some(p) = p else { return };
        let r = if h.error != 0 {
            Err(ClientError::Server {
                errno: NbdErrno::from_wire(h.error),
                message: None,
            })
        } else {
            match p.kind {
                Kind::Read { .. } => Ok(Reply::Read(data)),
                _ => Ok(Reply::Done),
            }
        };
        // A dropped receiver (timed out caller) just discards the late reply.
        let _ = p.reply.send(r);
    }

    /// One reply chunk; `echoed` is the request offset an extended header carries.
    fn on_chunk(&self, chunk: Chunk, echoed: Option<u64>) -> Result<(), Violation> {
        let done = chunk.is_done();
        let cookie = chunk.cookie;
        let finished = {
            let mut st = self.lock();
            let Some(p) = st.pending.get_mut(&cookie) else {
                return Err(Violation(format!(
                    "structured reply for unknown cookie {cookie}"
                )));
            };
            if let Some(offset) = echoed
                && offset != p.offset
            {
                return Err(Violation(format!(
                    "extended reply for cookie {cookie} echoes offset {offset}, the request's is {}",
                    p.offset
                )));
            }
            if !self.info.mode.extended()
                && matches!(chunk.payload, ChunkPayload::BlockStatusExt { .. })
            {
                return Err(Violation(
                    "BLOCK_STATUS_EXT chunk without extended headers".into(),
                ));
            }
            apply_chunk(p, chunk.payload, done, self.info.base_allocation)?;
            if done {
                let p = st.pending.remove(&cookie);
                if st.pending.is_empty() {
                    self.idle.notify_waiters();
                }
                p
            } else {
                None
            }
        };
        if let Some(p) = finished {
            let reply = p.reply;
            match finish(p.kind, p.error) {
                Ok(r) => {
                    let _ = reply.send(r);
                }
                Err(v) => {
                    // Fail everything first, so this caller sees the same cause.
                    self.fail_all(ClientError::Protocol(v.0.clone()));
                    let _ = reply.send(Err(ClientError::Protocol(v.0.clone())));
                    return Err(v);
                }
            }
        }
        Ok(())
    }
}

fn apply_chunk(
    p: &mut Pending,
    payload: ChunkPayload,
    done: bool,
    ctx: Option<u32>,
) -> Result<(), Violation> {
    match payload {
        ChunkPayload::None => {
            if !done {
                return Err(Violation("NONE chunk without the DONE flag".into()));
            }
        }
        ChunkPayload::OffsetData { offset, data } => {
            let Kind::Read {
                offset: ro,
                length,
                asm,
            } = &mut p.kind
            else {
                return Err(Violation(
                    "OFFSET_DATA chunk for a request that is not a READ".into(),
                ));
            };
            let rel = in_range(offset, data.len() as u64, *ro, *length)?;
            asm.claim(rel as u32, data.len() as u32, *length)?;
            asm.data(rel, data, *length);
        }
        ChunkPayload::OffsetHole { offset, length: hl } => {
            let Kind::Read {
                offset: ro,
                length,
                asm,
            } = &mut p.kind
            else {
                return Err(Violation(
                    "OFFSET_HOLE chunk for a request that is not a READ".into(),
                ));
            };
            let rel = in_range(offset, hl as u64, *ro, *length)?;
            asm.claim(rel as u32, hl, *length)?;
            asm.hole(*length);
        }
        ChunkPayload::BlockStatus {
            context_id,
            extents,
        } => {
            let (slot, _) = status_slot(p, context_id, ctx)?;
            *slot = Some(extents);
        }
        ChunkPayload::BlockStatusExt {
            context_id,
            extents,
        } => {
            let (slot, length) = status_slot(p, context_id, ctx)?;
            *slot = Some(narrow_extents(&extents, length)?);
        }
        ref e @ (ChunkPayload::Error { .. }
        | ChunkPayload::ErrorOffset { .. }
        | ChunkPayload::Unknown { .. }) => {
            let Some(errno) = e.error_value() else {
                return Err(Violation(format!(
                    "unknown structured reply chunk type {}",
                    e.chunk_type()
                )));
            };
            if errno == 0 {
                return Err(Violation("error chunk with error value 0".into()));
            }
            let message = match e {
                ChunkPayload::Error { message, .. } | ChunkPayload::ErrorOffset { message, .. }
                    if !message.is_empty() =>
                {
                    Some(message.clone())
                }
                _ => None,
            };
            if p.error.is_none() {
                p.error = Some(ClientError::Server {
                    errno: NbdErrno::from_wire(errno),
                    message,
                });
            }
        }
    }
    Ok(())
}

/// Where a status chunk's extents go: the request's one slot (a second chunk for the context is a
/// violation), with the request's length.
fn status_slot(
    p: &mut Pending,
    context_id: u32,
    ctx: Option<u32>,
) -> Result<(&mut Option<Vec<Extent>>, u32), Violation> {
    let Kind::BlockStatus {
        extents: slot,
        length,
    } = &mut p.kind
    else {
        return Err(Violation("BLOCK_STATUS chunk for another command".into()));
    };
    if Some(context_id) != ctx {
        return Err(Violation(format!(
            "BLOCK_STATUS for context {context_id}, which was not negotiated"
        )));
    }
    if slot.is_some() {
        return Err(Violation("two BLOCK_STATUS chunks for one context".into()));
    }
    Ok((slot, *length))
}

/// 64-bit extents as the 32-bit ones a [`Reply::BlockStatus`] carries. Our requests are at most
/// 32 bits long, so clipping to the request loses nothing: only the last extent may reach past it
/// (proto.md), and what lies past the request is not asked for.
fn narrow_extents(wide: &[WideExtent], length: u32) -> Result<Vec<Extent>, Violation> {
    let mut left = u64::from(length);
    let mut out = Vec::with_capacity(wide.len().min(1024));
    for e in wide {
        if e.length == 0 {
            return Err(Violation("BLOCK_STATUS_EXT extent of length 0".into()));
        }
        if left == 0 {
            break;
        }
        let take = e.length.min(left);
        out.push(Extent {
            length: take as u32,
            flags: e.flags,
        });
        left -= take;
    }
    Ok(out)
}

/// Offset of a chunk inside its READ, checking it lies within the request.
fn in_range(offset: u64, len: u64, req_offset: u64, req_len: u32) -> Result<usize, Violation> {
    let ok = offset >= req_offset
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= req_offset + req_len as u64);
    if !ok {
        return Err(Violation(format!(
            "chunk {offset}+{len} outside the READ {req_offset}+{req_len}"
        )));
    }
    Ok((offset - req_offset) as usize)
}

/// The caller's result once the DONE chunk arrived.
fn finish(kind: Kind, error: Option<ClientError>) -> Result<Result<Reply, ClientError>, Violation> {
    if let Some(e) = error {
        return Ok(Err(e));
    }
    let r = match kind {
        Kind::Read { length, asm, .. } => {
            if asm.covered != length as u64 {
                return Err(Violation(format!(
                    "READ reply covers {} of {length} bytes",
                    asm.covered
                )));
            }
            Reply::Read(asm.finish())
        }
        Kind::BlockStatus { extents, .. } => match extents {
            Some(e) if !e.is_empty() => Reply::BlockStatus(e),
            _ => return Err(Violation("BLOCK_STATUS reply without extents".into())),
        },
        Kind::Other => Reply::Done,
    };
    Ok(Ok(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn behind_ready_tasks_lets_the_ready_tasks_run_first_and_returns() {
        // In a task of its own, as the writer runs (the test's own future is driven differently).
        tokio::spawn(async {
            let ran = Arc::new(AtomicBool::new(false));
            let other = tokio::spawn({
                let ran = Arc::clone(&ran);
                async move { ran.store(true, Ordering::Release) }
            });
            assert!(!ran.load(Ordering::Acquire), "spawned, not yet run");
            behind_ready_tasks().await;
            assert!(
                ran.load(Ordering::Acquire),
                "the task that was ready ran before this one went on"
            );
            other.await.unwrap();
            // Nothing else ready: it returns after one trip through the run queue.
            behind_ready_tasks().await;
        })
        .await
        .unwrap();
    }
}
