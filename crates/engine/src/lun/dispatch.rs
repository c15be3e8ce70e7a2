//! The data path of one request (docs/GUARANTEES.md).
//!
//! ```text
//! submit ─▶ a write waits while an in-doubt copy overlaps ─▶ pick a path (snapshot + atomics) ─▶ send
//!   ▲                                                                                              │
//!   └────────── re-drive with that path excluded ◀── path fault / EIO / no reply in time ◀─────────┘
//! ```
//!
//! - A reply that belongs to the request (EINVAL, ENOSPC, EPERM, …) goes back to the client at once.
//! - EIO from one path: the request is retried on another path, the path is probed; the client sees
//!   EIO only when every usable path failed this request.
//! - A broken connection: the path is marked unusable at once (one atomic store, before the control
//!   task has even heard of it) and the request is re-driven.
//! - No reply within the path's adaptive timeout, and another path can take it: the path is suspected
//!   (out of rotation until a probe answers) and the request is re-driven now. At `io_timeout`, or when
//!   the control task takes the path out of service, every request still waiting on it is re-driven.
//! - Whenever a data-changing request is given up on a path after it may have reached the target, that
//!   copy is *in doubt* (`crate::in_doubt`): it is recorded before the re-drive, and new writes to its
//!   range wait until the target answers it, a fence succeeds, or `in_doubt_timeout` passes — so an old
//!   copy can never land over newer data. Where it can still be answered, a watcher keeps waiting for
//!   the reply on the old connection.
//! - No usable path: `no_path_retry` decides (queue, bounded in time and bytes, or fail).

use lunmpio_human::format_duration;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

use lunmpio_nbd::{CommandFlags, Extent, NbdErrno};
use lunmpio_nbd::{Reply, Request};

use super::{Control, Installed, Lun, OutstandingWrite, PathSlot, Shared};
use crate::in_doubt::NewCopy;
use crate::latency::THROUGHPUT_SAMPLE_BYTES_MIN;
use crate::no_path::NoPathError;
use crate::settings::ADAPTIVE_TIMEOUT_FLOOR;
use crate::transport::ConnectLimits;
use crate::transport::{Failed, PathError, PathErrorKind};

/// A request that failed for the client: the NBD errno to answer with, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct IoError {
    pub errno: NbdErrno,
    pub message: String,
}

impl IoError {
    fn new(errno: NbdErrno, message: impl Into<String>) -> Self {
        IoError {
            errno,
            message: message.into(),
        }
    }
}

/// How one attempt on one path ended, when it did not succeed. The attempt has already done what the
/// failure means for the path (suspect, report, put a copy in doubt); the loop only decides where next.
enum Attempt {
    /// The error belongs to the request: answer the client with it.
    Request(PathError),
    /// The path answered EIO (or another error that a different path may not give).
    ErrorReply(PathError),
    /// The path is broken, hung or out of service.
    Fault(PathError),
    /// No reply within the adaptive timeout, and another path can take the request.
    Slow(PathError),
}

fn shutting_down() -> IoError {
    IoError::new(NbdErrno::Shutdown, "the LUN is shutting down")
}

/// The in-flight request of one attempt, owned so that an abandoned write can be handed to a watcher.
type Sent = crate::transport::Started;

/// An abandoned write's copy still on its connection: the watcher waits for its answer.
struct Watch {
    sent: Sent,
    outstanding: OutstandingWrite,
    /// When the copy's own `io_timeout` runs out.
    hard_deadline: tokio::time::Instant,
    hard: Duration,
}

/// Waits for the target's answer to an in-doubt copy: any answer — data, EIO, ENOSPC — means the
/// target is done with it, and ends the doubt. A broken connection answers nothing: the copy stays in
/// doubt (a fence or `in_doubt_timeout` ends it). If no answer comes within the copy's `io_timeout`,
/// the path is failed, which takes the connection out of service and fences the path: a copy hedged
/// on a slow path that then hangs must not wait for `in_doubt_timeout` when a fence could end it.
async fn watch_copy(shared: Arc<Shared>, index: usize, generation: u64, id: u64, watch: Watch) {
    let Watch {
        mut sent,
        outstanding,
        hard_deadline,
        hard,
    } = watch;
    let result = tokio::select! {
        r = &mut sent => r,
        _ = tokio::time::sleep_until(hard_deadline) => {
            shared.slots[index].load.mark_unusable();
            shared.send(Control::Fault {
                index,
                generation,
                cause: format!(
                    "a write in doubt got no reply after {} (io_timeout); path failed",
                    format_duration(hard)
                ),
            });
            sent.await
        }
    };
    let answered = match result {
        Ok(_) => true,
        Err(failed) => !failed.error.is_path_fault(),
    };
    if answered {
        shared.in_doubt.answered(id);
    }
    drop(outstanding);
}

/// How long a request that got an error reply from every usable path waits for another path to
/// come back before the error is returned: two health checks (a held-down marginal path checks back
/// once per `check_interval`), at most `io_timeout`.
fn error_reply_grace(s: &Shared) -> Duration {
    (s.settings.check_interval * 2).min(s.settings.io_timeout)
}

/// Bytes in flight on a path whose bandwidth is not measured yet (one request of any size is always
/// admitted on an idle path).
const PATH_BYTES_UNMEASURED_MAX: u64 = 16 << 20;
/// Bounds on bytes in flight per path once its bandwidth is known: about a quarter of `io_timeout`'s
/// worth of data, so what waits on the path ahead of a request never eats its deadline.
const PATH_BYTES_MIN: u64 = 4 << 20;
const PATH_BYTES_MAX: u64 = 256 << 20;
/// Without a measured bandwidth, a transfer this large (with what is ahead of it) is not judged by
/// the adaptive timeout: only `io_timeout` applies.
const TRANSFER_UNMEASURED_MAX: u64 = 1 << 20;

/// The most a transfer's measured size may stretch a deadline: this many times `io_timeout`.
const DEADLINE_STRETCH_MAX: u32 = 4;

/// Bound on bytes in flight on one path (docs/GUARANTEES.md G3): enough to keep a fast path busy, little
/// enough that a slow one drains it well within `io_timeout`.
pub(super) fn path_bytes_max(s: &Shared, slot: &PathSlot) -> u64 {
    match slot.throughput.rate() {
        None => PATH_BYTES_UNMEASURED_MAX,
        Some(rate) => ((rate as f64 * s.settings.io_timeout.as_secs_f64() / 4.0) as u64)
            .clamp(PATH_BYTES_MIN, PATH_BYTES_MAX),
    }
}

/// The adaptive (`soft`) and the hard deadline of a request that must wait for `transfer` bytes to
/// move (those in flight ahead of it and its own). Both count time on the path only, and both allow
/// for the transfer at the path's measured bandwidth: a 32 MiB write on a 64 MiB/s path behind two
/// more is slow, not hung. `io_timeout` stretches only for a transfer the measured bandwidth cannot
/// move within it.
pub(super) fn deadlines(
    s: &Shared,
    slot: &PathSlot,
    transfer: u64,
    hedge: bool,
) -> (Duration, Duration) {
    let io = s.settings.io_timeout;
    // Capped: a path whose measured bandwidth collapses must not earn itself endless deadlines.
    let allowance = match slot.throughput.allowance(transfer) {
        Some(a) => Some(a.min(io * DEADLINE_STRETCH_MAX)),
        None if transfer >= TRANSFER_UNMEASURED_MAX => None,
        None => Some(Duration::ZERO),
    };
    let hard = io.max(allowance.unwrap_or(Duration::ZERO));
    let soft = match allowance {
        Some(a) if hedge && s.settings.adaptive_timeout => {
            let base = slot.latency.timeout(ADAPTIVE_TIMEOUT_FLOOR.min(io), io);
            (base + a).min(hard)
        }
        _ => hard,
    };
    (soft, hard)
}

/// Counts a request of `bytes` in on the path if it has room now; returns the bytes that were in
/// flight ahead of it.
fn try_reserve(s: &Shared, slot: &PathSlot, bytes: u32) -> Option<u64> {
    let requests_max = ConnectLimits::default().in_flight_max as u64;
    let ahead = slot.load.bytes_in_flight();
    slot.load
        .try_dispatch(bytes, requests_max, path_bytes_max(s, slot))
        .then_some(ahead)
}

/// Upper bound on attempts for one request between two waits for a path: every path twice. Past it
/// something is flapping faster than we can use it, and the no-path policy decides.
fn attempts_max(paths: usize) -> usize {
    2 * paths + 2
}

fn range(request: &Request) -> (u64, u64) {
    match request {
        Request::Read { offset, length }
        | Request::Trim { offset, length, .. }
        | Request::WriteZeroes { offset, length, .. }
        | Request::BlockStatus { offset, length, .. }
        | Request::Cache { offset, length } => (*offset, u64::from(*length)),
        Request::Write { offset, data, .. } => (*offset, data.len() as u64),
        Request::Flush { .. } => (0, 0),
    }
}

/// Bytes the request moves over the path (Least Blocks and service-time weigh by these).
fn payload_bytes(request: &Request) -> u32 {
    match request {
        Request::Read { length, .. } => *length,
        Request::Write { data, .. } => data.len().min(u32::MAX as usize) as u32,
        _ => 0,
    }
}

fn changes_data(request: &Request) -> bool {
    matches!(
        request,
        Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. }
    )
}

/// What the completion of a request counts, known before the request goes to a path (a path that
/// completes it keeps it).
#[derive(Clone, Copy)]
struct Shape {
    read_bytes: Option<u64>,
    write_bytes: Option<u64>,
    changes_data: bool,
}

impl Shape {
    fn of(request: &Request) -> Shape {
        Shape {
            read_bytes: match request {
                Request::Read { length, .. } => Some(u64::from(*length)),
                _ => None,
            },
            write_bytes: match request {
                Request::Write { data, .. } => Some(data.len() as u64),
                _ => None,
            },
            changes_data: changes_data(request),
        }
    }
}

/// One attempt as sent: on which path, when, and how many bytes it and the data ahead of it carry.
struct OnPath {
    index: usize,
    started: Instant,
    transfer: u64,
    bytes: u32,
}

/// Where one request stands across its attempts.
#[derive(Default)]
struct Progress {
    /// Paths already tried, one bit per path index (`PATHS_PER_LUN_MAX` ≤ 64 bits, asserted there).
    excluded_slots: u64,
    error_replies: u32,
    last_error: Option<PathError>,
    attempts: usize,
    error_grace: Option<Instant>,
    /// The in-doubt table version that must be on disk before the request may be acknowledged.
    in_doubt_version: Option<u64>,
}

impl Lun {
    /// Runs one request on the LUN. Errors are what the client should see.
    pub async fn submit(&self, request: Request) -> Result<Reply, IoError> {
        let s = &*self.shared;
        if s.stopping.load(Ordering::Acquire) {
            return Err(IoError::new(NbdErrno::Shutdown, "the LUN is shutting down"));
        }
        match &request {
            // Boxed, like every rare branch below: a request's future is moved whole when it starts,
            // so its size is paid on every I/O (docs/BENCHMARKS.md, "Where the CPU goes").
            Request::Flush { .. } => return Box::pin(self.flush(request)).await,
            Request::BlockStatus { length, .. } if !s.geometry.load().base_allocation => {
                // Not every path can tell allocation: "allocated, contents unknown" is always true.
                return Ok(Reply::BlockStatus(vec![Extent {
                    length: *length,
                    flags: 0,
                }]));
            }
            _ => {}
        }
        if changes_data(&request) {
            // Ordered after every old copy of an earlier write to this range that may still land.
            let (offset, length) = range(&request);
            if !s.in_doubt.wait_clear(offset, length, &s.stop).await {
                return Err(shutting_down());
            }
        }
        self.dispatch(request).await
    }

    /// Runs a request over the paths; whatever the outcome, the in-doubt copies it left behind are in
    /// the journal before the client hears back (a crash right after the reply must not forget them).
    async fn dispatch(&self, request: Request) -> Result<Reply, IoError> {
        let mut p = Progress::default();
        let result = self.dispatch_attempts(request, &mut p).await;
        match p.in_doubt_version {
            Some(version)
                if !Box::pin(super::journal::ensure_written(&self.shared, version)).await =>
            {
                // Not on disk (the LUN stops and the write failed): do not acknowledge.
                result.and(Err(shutting_down()))
            }
            _ => result,
        }
    }

    async fn dispatch_attempts(
        &self,
        request: Request,
        p: &mut Progress,
    ) -> Result<Reply, IoError> {
        let s = &*self.shared;
        let bytes = payload_bytes(&request);
        let shape = Shape::of(&request);
        let mut request = request;
        loop {
            if s.stopped.load(Ordering::Acquire) {
                return Err(shutting_down());
            }
            let snapshot = s.snapshot.load_full();
            let exclude = candidate_mask(&snapshot, p.excluded_slots);
            // One clock read for the pick and, when the path has room at once, the attempt's start.
            let now = Instant::now();
            let picked = if p.attempts >= attempts_max(s.slots.len()) {
                None
            } else {
                s.selector.pick(&snapshot, bytes, s.ns_at(now), exclude)
            };
            let Some(candidate) = picked else {
                Box::pin(self.no_candidate(p, &snapshot, bytes)).await?;
                continue;
            };
            p.attempts += 1;
            let index = snapshot.candidates()[candidate].index;
            let slot = &s.slots[index];
            let Some(installed) = slot.installed.load_full() else {
                // The control task has not published the failure yet; the slot has no connection.
                slot.load.mark_unusable();
                p.excluded_slots |= 1 << index;
                continue;
            };
            let alternatives = snapshot.candidates().len() > 1;
            // Room on the path first (requests and bytes in flight are bounded): time spent waiting
            // here is time inside lunmpio, and the deadlines start only after it.
            let (bytes_ahead, started) = match try_reserve(s, slot, bytes) {
                Some(ahead) => (ahead, now),
                None => match Box::pin(self.reserve(slot, &installed, bytes)).await {
                    Some(ahead) => (ahead, Instant::now()),
                    None => {
                        p.excluded_slots |= 1 << index;
                        continue;
                    }
                },
            };
            let transfer = bytes_ahead + u64::from(bytes);
            let outcome = self
                .attempt(
                    (slot, index, &installed),
                    request,
                    (started, transfer, alternatives),
                    p,
                )
                .await;
            let sent = OnPath {
                index,
                started,
                transfer,
                bytes,
            };
            // A failed attempt hands the request back: that one is re-driven.
            let (outcome, back) = match outcome {
                Ok(reply) => (Ok(reply), None),
                Err((attempt, back)) => (Err(attempt), Some(back)),
            };
            if let Some(result) = self.book(slot, &installed, shape, sent, outcome, p) {
                return result;
            }
            request =
                back.expect("only a failed attempt is re-driven, and it hands its request back");
        }
    }

    /// Books one attempt's outcome on its path. `Some`: the request's answer (a reply, or an error
    /// that belongs to the request); `None`: the path is excluded and the request is re-driven.
    fn book(
        &self,
        slot: &PathSlot,
        installed: &Installed,
        shape: Shape,
        sent: OnPath,
        outcome: Result<Reply, Attempt>,
        p: &mut Progress,
    ) -> Option<Result<Reply, IoError>> {
        let s = &*self.shared;
        // One clock read for everything the completion records.
        let done = Instant::now();
        let latency = done.saturating_duration_since(sent.started);
        let (elapsed_ns, now_ns) = (latency.as_nanos() as u64, s.ns_at(done));
        // The path's in-flight counters drop first, then waiters for room are woken: a waiter woken
        // before the drop would see no room and sleep through it.
        let answer = match outcome {
            Ok(reply) => {
                slot.load.on_complete(sent.bytes, elapsed_ns, now_ns);
                learn(slot, sent.transfer, latency, now_ns);
                count_success(s, slot, installed, shape);
                Ok(Ok(reply))
            }
            Err(Attempt::Request(e)) => {
                slot.load.on_complete(sent.bytes, elapsed_ns, now_ns);
                slot.counters.errors.fetch_add(1, Ordering::Relaxed);
                Ok(Err(IoError::new(e.errno(), e.message)))
            }
            Err(Attempt::ErrorReply(e)) => {
                slot.load.on_complete(sent.bytes, elapsed_ns, now_ns);
                slot.counters.errors.fetch_add(1, Ordering::Relaxed);
                p.error_replies += 1;
                Err(e)
            }
            Err(Attempt::Slow(e)) => {
                slot.load.on_abandon(sent.bytes);
                Err(e)
            }
            Err(Attempt::Fault(e)) => {
                slot.load.on_abandon(sent.bytes);
                slot.counters.errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        };
        room_released(slot);
        let error = match answer {
            Ok(answer) => return Some(answer),
            Err(error) => error,
        };
        p.excluded_slots |= 1 << sent.index;
        p.last_error = Some(error);
        None
    }

    /// No path can take the request now: give the error replies a short grace, then either return the
    /// request's error or wait for a path (the no-path policy).
    async fn no_candidate(
        &self,
        p: &mut Progress,
        snapshot: &lunmpio_vds::SelectorSnapshot,
        bytes: u32,
    ) -> Result<(), IoError> {
        let s = &*self.shared;
        let within_attempts = p.attempts < attempts_max(s.slots.len());
        if p.error_replies > 0 && within_attempts {
            // Every usable path failed this request. If another path may come back soon (failed,
            // reconnecting, or a healthy path held down as marginal that is admitted when nothing
            // else is usable), give it a short grace before the error is the request's.
            let grace = *p.error_grace.get_or_insert_with(|| {
                let grace = error_reply_grace(s);
                s.path_wanted_until_ns
                    .fetch_max(s.now_ns() + grace.as_nanos() as u64, Ordering::AcqRel);
                Instant::now() + grace
            });
            let others = snapshot.candidates().len() < s.slots.len();
            if others && Instant::now() < grace && !s.stopping.load(Ordering::Acquire) {
                self.paths_changed_or(grace.into()).await;
                return Ok(());
            }
        }
        if p.error_replies > 0 {
            // Every usable path failed this request: it is the request's error now.
            let e = p
                .last_error
                .take()
                .unwrap_or_else(|| PathError::new(PathErrorKind::Reply(NbdErrno::Io), "I/O error"));
            return Err(IoError::new(
                e.errno(),
                format!("every usable path failed: {}", e.message),
            ));
        }
        self.wait_for_path(bytes).await?;
        p.excluded_slots = 0;
        p.attempts = 0;
        Ok(())
    }

    /// Waits until a path may have become usable, or `deadline`.
    async fn paths_changed_or(&self, deadline: tokio::time::Instant) {
        let s = &*self.shared;
        tokio::select! {
            _ = s.paths_changed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = s.stop.cancelled() => {}
        }
    }

    /// Counts a request of `bytes` in on the path once there is room for it; returns the bytes that
    /// were in flight ahead of it. `None`: the path went out of service while the request waited.
    /// The common case, room at once, is [`try_reserve`] without a future.
    async fn reserve(&self, slot: &PathSlot, installed: &Installed, bytes: u32) -> Option<u64> {
        let s = &*self.shared;
        let requests_max = ConnectLimits::default().in_flight_max as u64;
        loop {
            // What was in flight when room was looked for: a change means room may have come.
            let seen = slot.load.bytes_in_flight();
            if let Some(ahead) = try_reserve(s, slot, bytes) {
                return Some(ahead);
            }
            slot.room_waiters.fetch_add(1, Ordering::AcqRel);
            let room = slot.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let retry = slot.load.bytes_in_flight() != seen
                || slot.load.requests_in_flight() < requests_max && seen == 0;
            if !retry {
                tokio::select! {
                    _ = &mut room => {}
                    _ = installed.abandoned.cancelled() => {}
                    _ = s.stop.cancelled() => {}
                    // A safety net against a lost wake-up, not the mechanism.
                    _ = tokio::time::sleep(s.settings.check_interval) => {}
                }
            }
            slot.room_waiters.fetch_sub(1, Ordering::AcqRel);
            if slot.load.is_unusable() || installed.is_abandoned() || s.stop.is_cancelled() {
                return None;
            }
        }
    }

    /// One attempt on one path, with the adaptive and the hard deadline. Does everything the outcome
    /// means for the path: suspects it, reports a fault, puts an abandoned write's copy in doubt.
    /// `transfer` is the bytes it waits for and moves; `hedge`: another path could take it.
    async fn attempt(
        &self,
        (slot, index, installed): (&PathSlot, usize, &Arc<Installed>),
        request: Request,
        (started, transfer, hedge): (Instant, u64, bool),
        progress: &mut Progress,
    ) -> Result<Reply, (Attempt, Request)> {
        let s = &*self.shared;
        if installed.is_abandoned() {
            // Out of service since it was picked: nothing was sent, nothing is in doubt.
            let error = PathError::new(PathErrorKind::Closed, "the path was taken out of service");
            return Err((Attempt::Fault(error), request));
        }
        let (soft, hard) = deadlines(s, slot, transfer, hedge);
        let started = tokio::time::Instant::from_std(started);
        let hard_deadline = started + hard;
        let writes = changes_data(&request);
        let (offset, length) = range(&request);
        let outstanding = writes.then(|| OutstandingWrite::new(installed));
        // For the one case the path cannot hand the request back: no reply in time, when the copy on
        // the wire stays with its watcher (or is dropped unsent). A copy of a few integers, or for a
        // write another handle to the same bytes.
        let spare = request.clone();
        // Until it may reach the storage (`reached`), giving up on it means dropping it, and
        // nothing is in doubt.
        let mut sent: Sent = installed.connection.start(request);
        // The answer, the path going out of service, or the adaptive deadline, in that order: one
        // registration with the LUN's deadline watch instead of a timer and a token wait each.
        let mut deadline = s.deadlines.entry(started + soft);
        let waited = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut sent).poll(cx) {
                return Poll::Ready(Ok(result));
            }
            // Registered before the flag is read: `retire` sets the flag, then wakes every entry.
            let due = deadline.poll_due(cx);
            if installed.is_abandoned() {
                return Poll::Ready(Err(false));
            }
            if due {
                return Poll::Ready(Err(true));
            }
            Poll::Pending
        })
        .await;
        drop(deadline);
        let timed_out = match waited {
            Ok(Ok(reply)) => return Ok(reply),
            Ok(Err(failed)) => {
                // Boxed: the failure's path (in doubt, a fault report) is rare, and a request's
                // future is moved whole when it starts.
                let on = (slot, index, installed);
                let settled = self.settle(on, failed, (offset, length), progress);
                return Box::pin(settled).await;
            }
            Err(timed_out) => timed_out,
        };
        let error = if !timed_out {
            // The control task took the path out of service while this waited.
            PathError::new(
                PathErrorKind::Closed,
                "the path was taken out of service while the request waited",
            )
        } else if soft < hard {
            let cause = format!(
                "no reply after {} (adaptive timeout)",
                format_duration(soft)
            );
            self.suspect(slot, index, installed.generation, cause.clone());
            PathError::new(PathErrorKind::Timeout, cause)
        } else {
            let cause = format!(
                "no reply after {} (io_timeout); path failed",
                format_duration(hard)
            );
            self.report_fault(slot, index, installed, &cause);
            PathError::new(PathErrorKind::Timeout, cause)
        };
        match outstanding {
            Some(outstanding) if sent.reached() => {
                // The target may still execute this copy; keep listening for its answer, and fail
                // the path if none comes within io_timeout (so it is fenced).
                let watch = Watch {
                    sent,
                    outstanding,
                    hard_deadline,
                    hard,
                };
                let range = (offset, length);
                if !Box::pin(self.put_in_doubt(index, installed, range, Some(watch), progress))
                    .await
                {
                    let error = PathError::new(PathErrorKind::Closed, "the LUN is shutting down");
                    return Err((Attempt::Fault(error), spare));
                }
            }
            // Never handed to the connection: dropped here, it can never reach the storage.
            _ => drop(sent),
        }
        Err((
            if timed_out && soft < hard {
                Attempt::Slow(error)
            } else {
                Attempt::Fault(error)
            },
            spare,
        ))
    }

    /// What a failed attempt means; hands back the request the path returned.
    async fn settle(
        &self,
        (slot, index, installed): (&PathSlot, usize, &Arc<Installed>),
        failed: Failed,
        (offset, length): (u64, u64),
        progress: &mut Progress,
    ) -> Result<Reply, (Attempt, Request)> {
        let Failed {
            request,
            error,
            sent,
        } = failed;
        if error.belongs_to_request() {
            return Err((Attempt::Request(error), request));
        }
        if !error.is_path_fault() {
            self.suspect(
                slot,
                index,
                installed.generation,
                format!("{} on a request", error.kind),
            );
            return Err((Attempt::ErrorReply(error), request));
        }
        self.report_fault(slot, index, installed, &error.message);
        if sent && changes_data(&request) {
            // It may have reached the target, which may still execute it: nothing will answer it
            // now, so only a fence or in_doubt_timeout ends the doubt.
            Box::pin(self.put_in_doubt(index, installed, (offset, length), None, progress)).await;
        }
        Err((Attempt::Fault(error), request))
    }

    /// Records an old copy of a write that path `index` may still execute, and, while its connection
    /// can still answer, a watcher that ends the doubt when it does. Returns false if the LUN stopped
    /// before the copy could be recorded (the request then fails).
    async fn put_in_doubt(
        &self,
        index: usize,
        installed: &Arc<Installed>,
        (offset, length): (u64, u64),
        watch: Option<Watch>,
        progress: &mut Progress,
    ) -> bool {
        let s = &self.shared;
        let generation = installed.generation;
        let new = NewCopy {
            offset,
            length,
            path: index,
            path_id: s.slots[index].id.path_id,
            generation,
            hold_max: s.settings.in_doubt_timeout,
        };
        let Some((id, version)) = s.in_doubt.insert(new, &s.stop).await else {
            return false;
        };
        progress.in_doubt_version = Some(progress.in_doubt_version.unwrap_or(0).max(version));
        s.send(Control::InDoubt { index, generation });
        if let Some(watch) = watch {
            tokio::spawn(watch_copy(Arc::clone(s), index, generation, id, watch));
        }
        true
    }

    /// Takes the path out of rotation at once and tells the control task, which fails it.
    fn report_fault(&self, slot: &PathSlot, index: usize, installed: &Installed, cause: &str) {
        slot.load.mark_unusable();
        self.shared.send(Control::Fault {
            index,
            generation: installed.generation,
            cause: cause.to_string(),
        });
    }

    fn suspect(&self, slot: &PathSlot, index: usize, generation: u64, cause: String) {
        slot.load.mark_unusable();
        self.shared.send(Control::Suspect {
            index,
            generation,
            cause,
        });
        slot.probe_now.notify_one();
    }

    async fn wait_for_path(&self, bytes: u32) -> Result<(), IoError> {
        let s = &*self.shared;
        match s.no_path.wait_while_down(u64::from(bytes)).await {
            Ok(()) => Ok(()),
            Err(NoPathError::NotDown) => {
                // Every candidate is out of rotation for the moment (suspected, probing) but the
                // control task still counts a usable path: it resolves that within a probe timeout
                // (the path fails, or its probe answers). Wait for that; this is not "no path", so
                // neither `no_path_retry = "fail"` nor its clock applies.
                if s.stopping.load(Ordering::Acquire) {
                    return Err(IoError::new(NbdErrno::Shutdown, "the LUN is shutting down"));
                }
                let deadline = tokio::time::Instant::now() + s.settings.check_interval;
                self.paths_changed_or(deadline).await;
                Ok(())
            }
            Err(NoPathError::NotQueueing) => Err(IoError::new(
                NbdErrno::Io,
                "no usable path (no_path_retry = \"fail\")",
            )),
            Err(NoPathError::Full) => Err(IoError::new(
                NbdErrno::Io,
                "no usable path and the no-path queue is full",
            )),
            Err(NoPathError::Expired) => Err(IoError::new(
                NbdErrno::Io,
                "no usable path within no_path_retry",
            )),
            Err(NoPathError::Shutdown) => {
                Err(IoError::new(NbdErrno::Shutdown, "the LUN is shutting down"))
            }
        }
    }

    /// FLUSH (docs/GUARANTEES.md, FLUSH): succeeds only when every write acknowledged before it is durable.
    ///
    /// - Writes acknowledged on a connection that was lost before a flush covered them, on a path
    ///   that shares no cache with the others (no CAN_MULTI_CONN, no `shared_backing`): nothing can
    ///   make them durable any more, so this FLUSH fails with EIO and an event says why.
    /// - Where the dirty connections are coherent (`shared_backing`, or all CAN_MULTI_CONN, which
    ///   docs/GUARANTEES.md takes as one cache across the paths), one flush on any path covers everything.
    /// - Otherwise every connection holding unflushed writes is flushed — on *that* connection, since
    ///   a flush on another one does not cover a private cache.
    async fn flush(&self, request: Request) -> Result<Reply, IoError> {
        let s = &*self.shared;
        // Order matters (see the control task's `retire`): the dirty connections first, then the
        // writes of connections retired meanwhile — a connection retired in between is in one of the
        // two.
        let dirty: Vec<(usize, Arc<Installed>, u64)> = s
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let installed = slot.installed.load_full()?;
                let acked = installed.writes_acked.load(Ordering::SeqCst);
                (acked > installed.writes_flushed.load(Ordering::SeqCst))
                    .then_some((i, installed, acked))
            })
            .collect();
        let orphaned: Vec<u64> = s
            .slots
            .iter()
            .map(|slot| slot.unflushed_orphaned.swap(0, Ordering::AcqRel))
            .collect();
        if let Some(lost) = self.take_lost_writes() {
            for (slot, n) in s.slots.iter().zip(&orphaned) {
                slot.unflushed_orphaned.fetch_add(*n, Ordering::AcqRel);
            }
            return Err(lost);
        }
        // Coherent: one store without private caches, or every dirty connection advertises
        // CAN_MULTI_CONN, which docs/GUARANTEES.md takes as one cache across the LUN's paths.
        let coherent = s.shared_backing
            || dirty
                .iter()
                .all(|(_, installed, _)| installed.connection.info().can_multi_conn());
        let result = if coherent {
            // One flush, on whichever path the policy picks (re-driven like any request).
            self.dispatch(request).await.map(|_| ())
        } else {
            // Private caches: each dirty connection on itself; writes left on lost connections of
            // CAN_MULTI_CONN paths by one flush more.
            self.flush_each(&dirty, orphaned.iter().any(|&n| n > 0))
                .await
        };
        match result {
            Ok(()) => {
                for (_, installed, acked) in &dirty {
                    installed.writes_flushed.fetch_max(*acked, Ordering::SeqCst);
                }
                Ok(Reply::Done)
            }
            Err(e) => {
                // Not covered after all: the next flush must try again.
                for (slot, n) in s.slots.iter().zip(orphaned) {
                    slot.unflushed_orphaned.fetch_add(n, Ordering::AcqRel);
                }
                Err(e)
            }
        }
    }

    /// Flushes every dirty connection on itself (and, if coherent paths left writes behind on lost
    /// connections, one path more).
    async fn flush_each(
        &self,
        dirty: &[(usize, Arc<Installed>, u64)],
        orphans: bool,
    ) -> Result<(), IoError> {
        let flushes = dirty
            .iter()
            .map(|(i, installed, acked)| self.flush_on(*i, installed, *acked));
        let results = super::futures_join(flushes).await;
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
        if orphans || dirty.is_empty() {
            self.dispatch(Request::Flush {
                flags: CommandFlags::empty(),
            })
            .await?;
        }
        Ok(())
    }

    /// Flushes exactly this connection. If it cannot, the writes cached there are lost for durability.
    async fn flush_on(
        &self,
        index: usize,
        installed: &Arc<Installed>,
        acked: u64,
    ) -> Result<(), IoError> {
        let s = &*self.shared;
        let slot = &s.slots[index];
        let request = Request::Flush {
            flags: CommandFlags::empty(),
        };
        slot.load.on_dispatch(0);
        let started = Instant::now();
        let mut progress = Progress::default();
        let transfer = slot.load.bytes_in_flight();
        let result = self
            .attempt(
                (slot, index, installed),
                request,
                (started, transfer, false),
                &mut progress,
            )
            .await;
        let elapsed = started.elapsed().as_nanos() as u64;
        match result {
            Ok(_) => {
                slot.load.on_complete(0, elapsed, s.now_ns());
                room_released(slot);
                slot.counters.ios.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(attempt) => {
                slot.load.on_abandon(0);
                room_released(slot);
                let why = match attempt.0 {
                    Attempt::Request(e)
                    | Attempt::ErrorReply(e)
                    | Attempt::Fault(e)
                    | Attempt::Slow(e) => e.message,
                };
                let unflushed = installed.unflushed();
                // Reported now, by this FLUSH: when the connection is retired they are not counted as
                // lost a second time (a durability error is reported once, as fsync reports it).
                installed.writes_flushed.fetch_max(acked, Ordering::SeqCst);
                let text = format!(
                    "FLUSH failed: {unflushed} writes acknowledged on path {} are cached on a \
                     connection that could not be flushed ({why}); without CAN_MULTI_CONN or \
                     shared_backing no other path can make them durable",
                    slot.name
                );
                self.flush_failure_event(index, &text);
                Err(IoError::new(NbdErrno::Io, text))
            }
        }
    }

    /// Writes whose connection was lost before a flush covered them, on paths without a shared
    /// cache: reported once, by the FLUSH that cannot cover them.
    fn take_lost_writes(&self) -> Option<IoError> {
        let s = &*self.shared;
        let mut text = None;
        for (index, slot) in s.slots.iter().enumerate() {
            let lost = slot.unflushed_lost.swap(0, Ordering::AcqRel);
            if lost == 0 {
                continue;
            }
            let message = format!(
                "FLUSH failed: {lost} writes acknowledged on path {} were cached on a connection that \
                 was lost before a flush covered them; the path advertises no CAN_MULTI_CONN and \
                 shared_backing is off, so their durability cannot be established",
                slot.name
            );
            self.flush_failure_event(index, &message);
            text.get_or_insert(message);
        }
        text.map(|t| IoError::new(NbdErrno::Io, t))
    }

    fn flush_failure_event(&self, index: usize, text: &str) {
        let s = &*self.shared;
        let slot = &s.slots[index];
        tracing::error!(lun = %s.name, path = %slot.name, "{text}");
        s.events
            .push(&s.name, Some((slot.id, &slot.name)), None, None, text);
    }
}

/// What a completed request teaches about its path: throughput from the bytes it waited for and moved,
/// and latency net of that transfer (so the adaptive timeout reflects the path's responsiveness, not
/// the size of recent requests).
fn learn(slot: &PathSlot, transfer: u64, latency: Duration, now_ns: u64) {
    slot.throughput.record(transfer, latency);
    slot.histogram.record(latency);
    match slot.throughput.expected(transfer) {
        Some(moving) => slot.latency.record(latency.saturating_sub(moving)),
        None if transfer < THROUGHPUT_SAMPLE_BYTES_MIN => slot.latency.record(latency),
        None => {}
    }
    slot.success_last_ns.fetch_max(now_ns, Ordering::AcqRel);
}

/// A request left the path's in-flight counts: wake requests waiting for room, if any.
fn room_released(slot: &PathSlot) {
    if slot.room_waiters.load(Ordering::Acquire) > 0 {
        slot.room.notify_waiters();
    }
}

/// Counts a completed request. A write acknowledged on a connection that has been taken out of
/// service meanwhile is counted where the control task counts that connection's unflushed writes.
fn count_success(s: &Shared, slot: &PathSlot, installed: &Installed, shape: Shape) {
    let c = &slot.counters;
    c.ios.fetch_add(1, Ordering::Relaxed);
    if let Some(bytes) = shape.read_bytes {
        c.reads.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(bytes, Ordering::Relaxed);
    }
    if let Some(bytes) = shape.write_bytes {
        c.writes.fetch_add(1, Ordering::Relaxed);
        c.bytes_written.fetch_add(bytes, Ordering::Relaxed);
    }
    if shape.changes_data {
        // SeqCst with `Installed::abandon` and the control task's retirement count: one of the two
        // sees this write (both may; counting twice only makes one flush more careful).
        installed.writes_acked.fetch_add(1, Ordering::SeqCst);
        if installed.is_abandoned() {
            unflushed_on_retired(s, slot, installed, 1);
        }
    }
}

/// Accounts `n` writes left unflushed on a connection taken out of service.
pub(super) fn unflushed_on_retired(s: &Shared, slot: &PathSlot, installed: &Installed, n: u64) {
    if n == 0 {
        return;
    }
    if s.shared_backing || installed.connection.info().can_multi_conn() {
        slot.unflushed_orphaned.fetch_add(n, Ordering::AcqRel);
    } else {
        slot.unflushed_lost.fetch_add(n, Ordering::AcqRel);
    }
}

/// The selector's exclude mask (candidate indices) for the slots already tried.
fn candidate_mask(snapshot: &lunmpio_vds::SelectorSnapshot, excluded_slots: u64) -> u64 {
    if excluded_slots == 0 {
        return 0;
    }
    snapshot
        .candidates()
        .iter()
        .enumerate()
        .filter(|(_, c)| excluded_slots & (1 << c.index) != 0)
        .fold(0, |mask, (i, _)| mask | 1 << i)
}
