//! Server side of the transmission phase: request validation, concurrent execution, and a
//! writer that coalesces out-of-order replies.

use super::admission::Admitted;
use super::credits::{Credit, Credits};
use super::gate::Ticket;
use super::handshake::Negotiated;
use super::running::RunningSet;
use super::{Backend, Server, ServerError};
use crate::io_util::{PollWhenWoken, WriteBatch, fill, reserve_total};
use crate::proto::*;
use crate::request::{Reply, Request};
use crate::{
    BlockSize, CommandFlags, Extent, NbdErrno, TransmissionFlags, TransmissionMode, WideExtent,
};
use bytes::{Bytes, BytesMut};
use futures::stream::StreamExt;
use std::future::Future;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The writer sends its buffer once it holds this much, even if more replies are queued.
const WRITE_BATCH_BYTES: usize = 256 << 10;

/// What a request is checked against.
#[derive(Clone, Copy, Debug)]
pub struct RequestCheck {
    pub size: u64,
    /// The flags advertised on this connection.
    pub flags: TransmissionFlags,
    pub block_size: BlockSize,
    /// `base:allocation` negotiated.
    pub context_id: Option<u32>,
    /// Extended headers decide which commands may carry `NBD_CMD_FLAG_PAYLOAD_LEN`.
    pub mode: TransmissionMode,
}

/// Validates a request header against the export; the error is the value to reply with.
/// Order matters: EPERM for writes to a read-only export comes first, then flags, then
/// bounds (ENOSPC for writes past the end, EINVAL otherwise), then alignment and size.
pub fn check_request(c: &RequestCheck, h: &RequestHeader) -> Result<(), NbdErrno> {
    use TransmissionFlags as T;
    let f = c.flags;
    let ro = f.contains(T::READ_ONLY);
    let mut allowed = CommandFlags::empty();
    if f.contains(T::SEND_FUA) {
        allowed |= CommandFlags::FUA;
    }
    let (past_end, payload_cmd) = match h.command {
        Command::Read => {
            if f.contains(T::SEND_DF) {
                allowed |= CommandFlags::DF;
            }
            (NbdErrno::Inval, true)
        }
        Command::Write => {
            if ro {
                return Err(NbdErrno::Perm);
            }
            if c.mode.extended() {
                // Under extended headers a WRITE should say its length is its payload's; one that
                // does not (qemu 10) brought its data all the same (see `payload_len`).
                allowed |= CommandFlags::PAYLOAD_LEN;
            }
            (NbdErrno::NoSpc, true)
        }
        Command::Trim => {
            if ro {
                return Err(NbdErrno::Perm);
            }
            if !f.contains(T::SEND_TRIM) {
                return Err(NbdErrno::Inval);
            }
            (NbdErrno::Inval, false)
        }
        Command::WriteZeroes => {
            if ro {
                return Err(NbdErrno::Perm);
            }
            if !f.contains(T::SEND_WRITE_ZEROES) {
                return Err(NbdErrno::Inval);
            }
            allowed |= CommandFlags::NO_HOLE;
            if f.contains(T::SEND_FAST_ZERO) {
                allowed |= CommandFlags::FAST_ZERO;
            }
            (NbdErrno::NoSpc, false)
        }
        Command::Flush => {
            if !f.contains(T::SEND_FLUSH) {
                return Err(NbdErrno::Inval);
            }
            if !(h.flags - allowed).is_empty() {
                return Err(NbdErrno::Inval);
            }
            return Ok(());
        }
        Command::Cache => (NbdErrno::Inval, false),
        Command::BlockStatus => {
            if c.context_id.is_none() || h.length == 0 {
                return Err(NbdErrno::Inval);
            }
            allowed |= CommandFlags::REQ_ONE;
            (NbdErrno::Inval, false)
        }
        Command::Disc => return Ok(()),
        Command::Resize | Command::Unknown(_) => return Err(NbdErrno::Inval),
    };
    if !(h.flags - allowed).is_empty() {
        return Err(NbdErrno::Inval);
    }
    match h.offset.checked_add(h.length) {
        Some(end) if end <= c.size => {}
        _ => return Err(past_end),
    }
    let min = u64::from(c.block_size.min);
    if !h.offset.is_multiple_of(min) || !h.length.is_multiple_of(min) {
        return Err(NbdErrno::Inval);
    }
    let payload_max = c.block_size.max_payload.min(crate::MAX_PAYLOAD_BYTES);
    if payload_cmd && h.length > u64::from(payload_max) {
        return Err(NbdErrno::Inval);
    }
    Ok(())
}

/// What one request holds from the moment it is read until its reply is written: its in-flight slot
/// and the bytes it occupies (its payload, or the data its READ reply will carry). Dropping it — after
/// the reply went to the socket — gives both back.
struct Held {
    _slot: Credit,
    _bytes: Option<Credit>,
    /// Counted in the export's gate while the request runs and its reply waits to be written (none
    /// for a request parked by a hold, or answered ESHUTDOWN).
    ticket: Option<Ticket>,
    connection: Arc<Admitted>,
}

impl Held {
    /// A request read into `slot`: counted as in flight on `connection` until this is dropped.
    fn started(slot: Credit, connection: &Arc<Admitted>) -> Held {
        connection.request_started();
        Held {
            _slot: slot,
            _bytes: None,
            ticket: None,
            connection: Arc::clone(connection),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.connection.request_done();
    }
}

/// A reply on its way to the writer, with what its request holds.
struct Out {
    cookie: u64,
    offset: u64,
    body: Body,
    /// READ and BLOCK_STATUS errors go out as ERROR chunks under structured replies (and every
    /// error does under extended headers).
    chunked_error: bool,
    _held: Option<Held>,
}

impl Out {
    /// The ESHUTDOWN answer to a request that will not run because the server is shutting down.
    fn shutdown(h: &RequestHeader, mode: TransmissionMode, held: Held) -> Out {
        Out {
            cookie: h.cookie,
            offset: h.offset,
            body: Body::Err(NbdErrno::Shutdown),
            chunked_error: chunked_error(mode, h.command),
            _held: Some(held),
        }
    }
}

/// Bytes a request holds while it runs and until its reply is written: the payload it brought, or the
/// data its READ reply will carry (bounded by the budget, so one maximum-size request always fits).
fn request_bytes(h: &RequestHeader, payload: &Bytes, budget_max: usize) -> usize {
    let bytes = match h.command {
        Command::Read => usize::try_from(h.length).unwrap_or(usize::MAX),
        _ => payload.len(),
    };
    bytes.min(budget_max)
}

enum Body {
    Ok,
    Err(NbdErrno),
    Read(Bytes),
    BlockStatus(u32, Vec<Extent>),
}

/// A connection that left at a request boundary for a handover (see `handover`).
pub(crate) struct Detached<S> {
    pub(crate) stream: S,
    pub(crate) pending: Vec<u8>,
    pub(crate) export: String,
    pub(crate) flags: u16,
    pub(crate) mode: TransmissionMode,
    pub(crate) context_id: Option<u32>,
}

/// Why the request loop ended.
#[derive(PartialEq)]
enum Exit {
    /// The client went, the connection failed or was evicted: close.
    Close,
    /// Shutdown or export removal: drain, then close.
    Drain,
    /// Handover: leave with the socket open.
    Detach,
}

impl<B: Backend> Server<B> {
    /// The transmission phase of one connection. `Some` when it detached for a handover
    /// (`can_detach`, and [`Server::detach_all`] was called), with nothing running and every reply
    /// written.
    pub(crate) async fn transmission<S>(
        self: &Arc<Self>,
        stream: S,
        mut buf: BytesMut,
        n: Negotiated<B>,
        connection: &Arc<Admitted>,
        can_detach: bool,
    ) -> Result<Option<Detached<S>>, ServerError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let max = self.options.max_in_flight_per_connection;
        let slots = Credits::new(max);
        let budget_max = self.options.connection_bytes_max;
        let budget = Credits::new(budget_max);
        let (tx, rx) = mpsc::unbounded_channel::<Out>();
        let writer = tokio::spawn(write_replies(wr, rx, n.mode));
        let check = RequestCheck {
            size: n.export.config.size,
            flags: n.flags,
            block_size: n.export.config.block_size,
            context_id: n.context_id,
            mode: n.mode,
        };

        let mut result = Ok(());
        let mut exit = Exit::Close;
        // The requests running now, polled by this task: a request goes from the client's socket through
        // the backend to the writer without a task of its own (and without a hand-off between tasks).
        let mut running = running_set(run_request::<B>, max);
        // The in-flight slot for the next request; none free: nothing more is read.
        let mut slot: Option<Credit> = None;
        // A request read while the connection is at its byte budget (a client that does not read its
        // replies): it waits for room, and nothing further is read.
        let mut waiting: Option<(RequestHeader, Bytes, Held)> = None;
        // A request read as the export was held (live reconfiguration): it runs after the release.
        let mut parked: Option<(RequestHeader, Bytes, Held)> = None;
        let gate = Arc::clone(&n.export.gate);
        let _counted = gate.connection();
        let mut at = ExportBackend::new(&n);
        // Registered once, and polled only when they fire (`PollWhenWoken`): they almost never do,
        // and the loop goes round once or more per request.
        let mut shutdown = PollWhenWoken::new(self.shutdown.clone().cancelled_owned());
        let mut removed = PollWhenWoken::new(gate.closing.clone().cancelled_owned());
        let mut evicted = PollWhenWoken::new(connection.evicted.clone().cancelled_owned());
        let mut detach = PollWhenWoken::new(self.detach.clone().cancelled_owned());
        loop {
            if slot.is_none() {
                slot = slots.try_take(1);
            }
            let held = gate.is_held();
            let reading = slot.is_some() && waiting.is_none() && parked.is_none() && !held;
            let budget_wanted = waiting
                .as_ref()
                .map_or(0, |(h, data, _)| request_bytes(h, data, budget_max));
            let next = tokio::select! {
                biased;
                _ = &mut shutdown => { exit = Exit::Drain; break; }
                _ = &mut removed => { exit = Exit::Drain; break; }
                Some(out) = running.next(), if !running.is_empty() => { let _ = tx.send(out); continue; }
                // Handover: only at a request boundary (the holder waited for quiet; this waits too).
                // A connection that cannot be handed over (its TLS session lives in this process)
                // ends there instead, every reply written: its client reconnects to the new
                // program rather than holding the handover up.
                _ = &mut detach, if running.is_empty() && waiting.is_none() => {
                    exit = if can_detach { Exit::Detach } else { Exit::Close };
                    break;
                }
                bytes = budget.take(budget_wanted), if waiting.is_some() => {
                    let (h, data, mut held) = waiting.take().expect("guarded by the branch condition");
                    held._bytes = Some(bytes);
                    let run = self.start_request(&n, &check, (h, data), held, &tx, at.current());
                    if let Some(run) = run {
                        running.push(run_request(run));
                    }
                    continue;
                }
                // Held: wait for the release (a parked request then enters again).
                _ = at.releases.changed(), if held || parked.is_some() => {
                    match parked.take() {
                        Some(request) => {
                            gate.unpark();
                            request
                        }
                        None => continue,
                    }
                }
                // All slots taken: wait for one (the writer frees them as replies leave).
                p = slots.take(1), if slot.is_none() && waiting.is_none() => {
                    slot = Some(p);
                    continue;
                }
                // Only a connection with nothing in flight is ever evicted.
                _ = &mut evicted, if reading => break,
                r = read_request(&mut rd, &mut buf, n.mode), if reading => match r {
                    Ok(Some((h, _))) if h.command == Command::Disc => break,
                    Ok(Some((h, data))) => {
                        let slot = slot.take().expect("guarded by the branch condition");
                        (h, data, Held::started(slot, connection))
                    }
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                },
            };
            // A request read (or un-parked): counted in the gate, or parked again if held.
            let (h, data, mut held) = next;
            match gate.enter() {
                Some(ticket) => held.ticket = Some(ticket),
                None => {
                    parked = Some((h, data, held));
                    continue;
                }
            }
            // The bytes this request will hold: it starts once the connection has room.
            let wanted = request_bytes(&h, &data, budget_max);
            match budget.try_take(wanted) {
                _ if wanted == 0 => {}
                Some(bytes) => held._bytes = Some(bytes),
                None => {
                    waiting = Some((h, data, held));
                    continue;
                }
            }
            let run = self.start_request(&n, &check, (h, data), held, &tx, at.current());
            if let Some(run) = run {
                running.push(run_request(run));
            }
        }
        let mut pending = Vec::new();
        if let Some((h, data, held)) = parked.take() {
            gate.unpark();
            if exit == Exit::Detach {
                // Read during the hold, never started: it goes back on the wire to the next program.
                let mut wire = BytesMut::new();
                h.encode_in(n.mode, &mut wire);
                pending.extend_from_slice(&wire);
                pending.extend_from_slice(&data);
                drop(held);
            } else {
                // Shut down (or removed) while held: it never started.
                let _ = tx.send(Out::shutdown(&h, n.mode, held));
            }
        }
        drop(slot);
        if let Some((h, _, held)) = waiting.take() {
            // Shut down while it waited for room: it never started.
            let _ = tx.send(Out::shutdown(&h, n.mode, held));
        }
        if exit == Exit::Drain {
            // Shutdown: answer new requests with ESHUTDOWN until everything in flight is done. Each
            // answer holds a slot like a request does, so a client that does not read its replies
            // stops being read from here too.
            let mut slot: Option<Credit> = None;
            loop {
                if slot.is_none() {
                    slot = slots.try_take(1);
                }
                let spare = usize::from(slot.is_some());
                let req = tokio::select! {
                    biased;
                    Some(out) = running.next(), if !running.is_empty() => {
                        let _ = tx.send(out);
                        continue;
                    }
                    // Asked before "all done" so that a slot that comes back is taken first.
                    p = slots.take(1), if slot.is_none() => {
                        slot = Some(p);
                        continue;
                    }
                    // Everything in flight answered and written (the slot kept for the next aside).
                    _ = slots.free_at_least(max - spare) => break,
                    r = read_request(&mut rd, &mut buf, n.mode), if slot.is_some() => r,
                };
                match req {
                    Ok(Some((h, _))) if h.command == Command::Disc => break,
                    Ok(Some((h, _))) => {
                        let held =
                            Held::started(slot.take().expect("read only with a slot"), connection);
                        let _ = tx.send(Out::shutdown(&h, n.mode, held));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        // Whatever ended the connection, the requests it started run to their end: a write the target
        // may still execute must be settled by the backend (the engine puts it in doubt), not dropped.
        while let Some(out) = running.next().await {
            let _ = tx.send(out);
        }
        // Every reply is queued: the writer ends after writing them. An evicted connection's writer may
        // be stuck on a client that does not read: it is not waited for.
        drop(tx);
        let mut writer = writer;
        let written = tokio::select! {
            w = &mut writer => w,
            _ = connection.evicted.cancelled() => {
                writer.abort();
                return Err(ServerError::Evicted);
            }
        };
        // The first error wins: the connection's own, else the writer's.
        let (mut wr, written) = match written {
            Ok(w) => w,
            Err(join) => {
                result?;
                return Err(ServerError::Io(std::io::Error::other(join.to_string())));
            }
        };
        if let Err(e) = written {
            result?;
            return Err(ServerError::Io(e));
        }
        if exit == Exit::Detach && result.is_ok() {
            debug_assert!(running.is_empty(), "detached with nothing running");
            pending.extend_from_slice(&buf);
            return Ok(Some(Detached {
                stream: rd.unsplit(wr),
                pending,
                export: n.export.config.name.clone(),
                flags: n.flags.bits(),
                mode: n.mode,
                context_id: n.context_id,
            }));
        }
        let _ = wr.shutdown().await;
        result.map(|()| None)
    }

    /// Checks one request: the request to run (its reply goes to the writer when it completes), or
    /// `None` when it was answered at once (refused, or empty).
    fn start_request(
        &self,
        n: &Negotiated<B>,
        check: &RequestCheck,
        (h, data): (RequestHeader, Bytes),
        held: Held,
        tx: &mpsc::UnboundedSender<Out>,
        backend: &Arc<B>,
    ) -> Option<ToRun<B>> {
        let chunked_error = chunked_error(n.mode, h.command);
        let reply = |body: Body, held| Out {
            cookie: h.cookie,
            offset: h.offset,
            body,
            chunked_error,
            _held: held,
        };
        if let Err(e) = check_request(check, &h) {
            let _ = tx.send(reply(body_err(e), Some(held)));
            return None;
        }
        debug_assert!(
            h.command != Command::Write || data.len() as u64 == h.length,
            "a WRITE carries exactly its length (read_request reads it so)"
        );
        // Zero-length data commands need no backend call.
        if h.length == 0
            && matches!(
                h.command,
                Command::Read
                    | Command::Write
                    | Command::Trim
                    | Command::WriteZeroes
                    | Command::Cache
            )
        {
            let body = if h.command == Command::Read {
                Body::Read(Bytes::new())
            } else {
                Body::Ok
            };
            let _ = tx.send(reply(body, Some(held)));
            return None;
        }
        Some(ToRun {
            backend: Arc::clone(backend),
            h,
            data,
            context_id: n.context_id.unwrap_or(0),
            piece_max: effect_piece_max(check.block_size),
            chunked_error,
            held,
        })
    }
}

/// The backend a connection sends its requests to: the export's, read again whenever a live
/// reconfiguration replaced it (its generation moved).
struct ExportBackend<B> {
    backend: Arc<B>,
    generation: u64,
    export: Arc<super::ExportEntry<B>>,
    /// Wakes the connection when a hold ends.
    releases: tokio::sync::watch::Receiver<u64>,
}

impl<B> ExportBackend<B> {
    fn new(n: &Negotiated<B>) -> ExportBackend<B> {
        let (backend, generation) = n.export.backend();
        ExportBackend {
            backend,
            generation,
            export: Arc::clone(&n.export),
            releases: n.export.gate.subscribe(),
        }
    }

    /// The backend for a request that entered the gate now. A replacement bumps the generation
    /// before the hold ends, and entering saw the hold ended (SeqCst), so this sees the bump.
    fn current(&mut self) -> &Arc<B> {
        let generation = self
            .export
            .backend_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        if generation != self.generation {
            (self.backend, self.generation) = self.export.backend();
        }
        &self.backend
    }
}

/// A checked request ready for the backend.
struct ToRun<B> {
    backend: Arc<B>,
    h: RequestHeader,
    data: Bytes,
    context_id: u32,
    /// The longest range the backend gets in one request (see [`effect_piece_max`]).
    piece_max: u64,
    chunked_error: bool,
    held: Held,
}

/// An empty set of running requests, typed by the function that makes them (their future's type has
/// no name to write).
fn running_set<B, F: Future<Output = Out>>(
    _make: fn(ToRun<B>) -> F,
    capacity: usize,
) -> RunningSet<F> {
    RunningSet::new(capacity)
}

/// One checked request through the backend, to the reply the writer sends.
fn run_request<B: Backend>(r: ToRun<B>) -> impl Future<Output = Out> {
    let ToRun {
        backend,
        h,
        data,
        context_id,
        piece_max,
        chunked_error,
        held,
    } = r;
    async move {
        let body = if h.length > piece_max {
            run_long(&*backend, &h, context_id, piece_max).await
        } else {
            run_one(&*backend, &h, data, context_id).await
        };
        Out {
            cookie: h.cookie,
            offset: h.offset,
            body,
            chunked_error,
            _held: Some(held),
        }
    }
}

/// A request whose length fits 32 bits (every request under compact headers).
async fn run_one<B: Backend>(backend: &B, h: &RequestHeader, data: Bytes, context_id: u32) -> Body {
    let Ok(length) = u32::try_from(h.length) else {
        return Body::Err(NbdErrno::Inval);
    };
    let Some(request) = request_of(h, data, h.offset, length) else {
        // Filtered out by check_request.
        return Body::Err(NbdErrno::Inval);
    };
    match (h.command, handle_isolated(backend, request).await) {
        (_, Err(e)) => body_err(e),
        (Command::Read, Ok(Reply::Read(d))) if d.len() == length as usize => Body::Read(d),
        (Command::BlockStatus, Ok(Reply::BlockStatus(ext))) => {
            Body::BlockStatus(context_id, clip_extents(ext, length, h.flags))
        }
        (
            Command::Write | Command::Flush | Command::Trim | Command::WriteZeroes | Command::Cache,
            Ok(Reply::Done),
        ) => Body::Ok,
        // A reply of the wrong kind (or a short read) is the backend's bug: the client gets EIO,
        // never a malformed reply.
        (_, Ok(_)) => Body::Err(NbdErrno::Io),
    }
}

/// A request longer than 32 bits (extended headers: TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS; READ
/// and WRITE are bounded by the payload limit). BLOCK_STATUS answers its first piece (the length
/// is a hint, and a shorter answer is allowed). The others run piece by piece, in order; the first
/// error ends the request (what was done stays done, as with any TRIM or WRITE_ZEROES that fails).
async fn run_long<B: Backend>(
    backend: &B,
    h: &RequestHeader,
    context_id: u32,
    piece_max: u64,
) -> Body {
    debug_assert!(h.length > piece_max && piece_max > 0);
    if h.command == Command::BlockStatus {
        let first = RequestHeader {
            length: piece_max,
            ..*h
        };
        return run_one(backend, &first, Bytes::new(), context_id).await;
    }
    let mut done = 0u64;
    while done < h.length {
        let length = (h.length - done).min(piece_max) as u32;
        let Some(request) = request_of(h, Bytes::new(), h.offset + done, length) else {
            return Body::Err(NbdErrno::Inval);
        };
        match handle_isolated(backend, request).await {
            Ok(Reply::Done) => {}
            Ok(_) => return Body::Err(NbdErrno::Io),
            Err(e) => return body_err(e),
        }
        done += u64::from(length);
    }
    Body::Ok
}

/// The longest range handed to the backend in one request: 32 bits (the backend's requests carry
/// 32-bit lengths), rounded down to the export's preferred block (a multiple of the minimum: both
/// are powers of two), so every piece, and the next BLOCK_STATUS a client sends, stays aligned.
fn effect_piece_max(block_size: BlockSize) -> u64 {
    let align = u64::from(block_size.min.max(block_size.preferred).max(1));
    u64::from(u32::MAX) / align * align
}

/// Runs one request in the backend; a panic there fails that request with EIO and nothing else (the
/// connection's other requests run in the same task and must run to their end).
async fn handle_isolated<B: Backend>(backend: &B, request: Request) -> Result<Reply, NbdErrno> {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(backend.handle(request))
        .catch_unwind()
        .await
    {
        Ok(reply) => reply,
        Err(_) => {
            tracing::error!("the backend panicked on a request; answering it EIO");
            Err(NbdErrno::Io)
        }
    }
}

/// Whether an error reply to `command` goes out as an ERROR chunk: for READ and BLOCK_STATUS
/// once chunks are negotiated, and for everything under extended headers (no simple replies).
fn chunked_error(mode: TransmissionMode, command: Command) -> bool {
    mode.extended() || (mode.chunked() && matches!(command, Command::Read | Command::BlockStatus))
}

/// Error 0 on the wire would read as success.
fn body_err(e: NbdErrno) -> Body {
    if e.to_wire() == 0 {
        Body::Err(NbdErrno::Io)
    } else {
        Body::Err(e)
    }
}

/// The backend's request for a checked header (and the WRITE's payload); `None` for commands that
/// never reach a backend (DISC, RESIZE, unknown ones: check_request refuses them).
fn request_of(h: &RequestHeader, data: Bytes, offset: u64, length: u32) -> Option<Request> {
    let flags = h.flags - CommandFlags::PAYLOAD_LEN;
    Some(match h.command {
        Command::Read => Request::Read { offset, length },
        Command::Write => Request::Write {
            offset,
            data,
            flags,
        },
        Command::Flush => Request::Flush { flags },
        Command::Trim => Request::Trim {
            offset,
            length,
            flags,
        },
        Command::WriteZeroes => Request::WriteZeroes {
            offset,
            length,
            flags,
        },
        Command::BlockStatus => Request::BlockStatus {
            offset,
            length,
            flags,
        },
        Command::Cache => Request::Cache { offset, length },
        Command::Disc | Command::Resize | Command::Unknown(_) => return None,
    })
}

/// Clips extents to the request, drops empty ones, honours REQ_ONE, never returns none.
fn clip_extents(ext: Vec<Extent>, length: u32, flags: CommandFlags) -> Vec<Extent> {
    let mut out = ext;
    let mut left = length;
    out.retain_mut(|e| {
        if left == 0 || e.length == 0 {
            return false;
        }
        e.length = e.length.min(left);
        left -= e.length;
        true
    });
    if out.is_empty() {
        out.push(Extent { length, flags: 0 });
    }
    if flags.contains(CommandFlags::REQ_ONE) {
        out.truncate(1);
    }
    debug_assert!(
        !out.is_empty(),
        "a BLOCK_STATUS reply has at least one extent"
    );
    debug_assert!(
        out.iter().map(|e| u64::from(e.length)).sum::<u64>() <= u64::from(length),
        "extents never describe more than the request"
    );
    out
}

/// Reads one complete request. `Ok(None)`: clean EOF between requests. Cancel-safe: partial
/// input stays in `buf`.
async fn read_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    mode: TransmissionMode,
) -> Result<Option<(RequestHeader, Bytes)>, ServerError> {
    loop {
        if let Some(r) = decode_request_in(buf, mode)? {
            return Ok(Some(r));
        }
        if let Some(h) = RequestHeader::decode_in(buf, mode)? {
            // Bounded by decode_request_in: the payload is at most MAX_PAYLOAD_BYTES.
            reserve_total(
                buf,
                request_header_bytes(mode) + h.payload_len(mode) as usize,
            );
        }
        if fill(rd, buf).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ServerError::Truncated);
        }
        // A client's requests keep a polling data thread polling; a path's probe replies do not.
        crate::activity::note_read();
    }
}

/// Encodes replies in completion order and sends them in as few writes as possible.
/// Writes replies until every sender is gone; gives the socket half back (not shut down: a
/// detached connection stays open).
async fn write_replies<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    mode: TransmissionMode,
) -> (W, std::io::Result<()>) {
    let mut batch = WriteBatch::new(WRITE_BATCH_BYTES, wr.is_write_vectored());
    // What the replies in the batch hold (their slots and bytes): released once the batch is on the
    // socket, not when a reply is queued in it, so a client that does not read keeps its requests
    // counted.
    let mut held: Vec<Held> = Vec::new();
    let r = async {
        while let Some(first) = rx.recv().await {
            // No yield before writing (the path client's writer has one): the replies come from the
            // connection's task, which finishes every request that is ready in one turn, so they are
            // all queued before this task runs. A yield here only added a trip through the event
            // loop: without it, 5% less CPU per I/O and up to 5% more IOPS at QD32 (docs/BENCHMARKS.md,
            // "The reply writer's yield").
            let mut next = Some(first);
            while let Some(mut reply) = next {
                held.extend(reply._held.take());
                if let Some(data) = encode_reply(batch.out(), reply, mode) {
                    batch.push_data(data);
                }
                if batch.bytes() >= WRITE_BATCH_BYTES {
                    batch.write(&mut wr).await?;
                    held.clear();
                }
                next = rx.try_recv().ok();
            }
            batch.write(&mut wr).await?;
            wr.flush().await?;
            held.clear();
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    drop(held);
    if r.is_err() {
        // Keep consuming so in-flight tasks can finish and free their slots.
        rx.close();
        while rx.recv().await.is_some() {}
    }
    (wr, r)
}

/// Encodes a reply into `out`; a READ's data is returned for the caller to place after it.
fn encode_reply(out: &mut BytesMut, reply: Out, mode: TransmissionMode) -> Option<Bytes> {
    let (cookie, offset) = (reply.cookie, reply.offset);
    let done = NBD_REPLY_FLAG_DONE;
    match reply.body {
        Body::Ok if mode.extended() => {
            ChunkPayload::None.encode_extended(cookie, done, offset, out)
        }
        Body::Ok => SimpleReply { error: 0, cookie }.encode(out),
        Body::Err(e) if reply.chunked_error => ChunkPayload::Error {
            error: e.to_wire(),
            message: String::new(),
        }
        .encode_in(mode, cookie, done, offset, out),
        Body::Err(e) => SimpleReply {
            error: e.to_wire(),
            cookie,
        }
        .encode(out),
        Body::BlockStatus(context_id, extents) if mode.extended() => ChunkPayload::BlockStatusExt {
            context_id,
            extents: extents
                .iter()
                .map(|e| WideExtent {
                    length: u64::from(e.length),
                    flags: e.flags,
                })
                .collect(),
        }
        .encode_extended(cookie, done, offset, out),
        Body::BlockStatus(context_id, extents) => ChunkPayload::BlockStatus {
            context_id,
            extents,
        }
        .encode(cookie, done, out),
        Body::Read(data) => {
            if mode.chunked() && data.is_empty() {
                ChunkPayload::None.encode_in(mode, cookie, done, offset, out);
                return None;
            }
            let chunk_len = data.len() as u64 + 8;
            match mode {
                TransmissionMode::Extended => {
                    ExtendedReplyHeader {
                        flags: done,
                        chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        offset,
                        length: chunk_len,
                    }
                    .encode(out);
                    bytes::BufMut::put_u64(out, offset);
                }
                TransmissionMode::Structured => {
                    ChunkHeader {
                        flags: done,
                        chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        length: chunk_len as u32,
                    }
                    .encode(out);
                    bytes::BufMut::put_u64(out, offset);
                }
                TransmissionMode::Simple => SimpleReply { error: 0, cookie }.encode(out),
            }
            return Some(data);
        }
    }
    None
}
