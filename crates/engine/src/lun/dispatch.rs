//! The data path of one request (PRODUCT.md §7).
//!
//! ```text
//! submit ─▶ wait while an in-doubt write overlaps ─▶ pick a path (snapshot + atomics) ─▶ send
//!   ▲                                                                                    │
//!   └── re-drive with that path excluded ◀── path fault / EIO / slow read ◀──────────────┘
//! ```
//!
//! - A reply that belongs to the request (EINVAL, ENOSPC, EPERM, …) goes back to the client at once.
//! - EIO from one path: the request is retried on another path, the path is probed; the client sees
//!   EIO only when every usable path failed this request.
//! - A broken connection: the path is marked unusable at once (one atomic store, before the control
//!   task has even heard of it), the request is re-driven. A write that was in flight there is *in
//!   doubt*: its range is registered so later overlapping I/O is ordered after its re-drive.
//! - No reply within the path's adaptive timeout: if another path can take the request, the path is
//!   suspected (out of rotation until a probe answers) and a read is re-driven at once; a write keeps
//!   waiting, because re-sending it before the old path is fenced could let the old copy land later.
//!   At `io_timeout` the connection is closed (fenced) and the write is re-driven.
//! - No usable path: `no_path_retry` decides (queue, bounded in time and bytes, or fail).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lunmpio_nbd::client::{Reply, Request};
use lunmpio_nbd::{CommandFlags, Extent, NbdErrno};

use super::{Control, Installed, Lun, PathSlot, Shared, humanize};
use crate::in_doubt::{InDoubtGuard, InDoubtTable};
use crate::no_path::NoPathError;
use crate::settings::ADAPTIVE_TIMEOUT_FLOOR;
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

/// How one attempt on one path ended, when it did not succeed.
enum Attempt {
    /// The error belongs to the request: answer the client with it.
    Request(PathError),
    /// The path answered EIO (or another error that a different path may not give).
    ErrorReply(PathError),
    /// The path is broken, fenced or hung.
    Fault(PathError),
    /// A read got no reply within the adaptive timeout and another path can take it.
    Slow(PathError),
}

/// How often a request with every candidate out of rotation (but the LUN not path-less) looks again.
const NOT_DOWN_RECHECK: Duration = Duration::from_millis(2);

/// How long a request that got an error reply from every usable path waits for another path to
/// come back before the error is returned: two health checks (a held-down marginal path checks back
/// once per `check_interval`), at most `io_timeout`.
fn error_reply_grace(s: &Shared) -> Duration {
    (s.settings.check_interval * 2).min(s.settings.io_timeout)
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

impl Lun {
    /// Runs one request on the LUN. Errors are what the client should see.
    pub async fn submit(&self, request: Request) -> Result<Reply, IoError> {
        let s = &*self.shared;
        if s.stopping.load(Ordering::Acquire) {
            return Err(IoError::new(NbdErrno::Shutdown, "the LUN is shutting down"));
        }
        match &request {
            Request::Flush { .. } => return self.flush(request).await,
            Request::BlockStatus { length, .. } if !s.geometry.load().base_allocation => {
                // Not every path can tell allocation: "allocated, contents unknown" is always true.
                return Ok(Reply::BlockStatus(vec![Extent {
                    length: *length,
                    flags: 0,
                }]));
            }
            _ => {}
        }
        let (offset, length) = range(&request);
        s.in_doubt
            .wait_clear(offset, length, changes_data(&request))
            .await;
        self.dispatch(request).await
    }

    async fn dispatch(&self, request: Request) -> Result<Reply, IoError> {
        let s = &*self.shared;
        let bytes = payload_bytes(&request);
        let (offset, length) = range(&request);
        let mut excluded_slots = 0u64;
        let mut error_replies = 0u32;
        let mut last_error: Option<PathError> = None;
        let mut in_doubt: Option<InDoubt<'_>> = None;
        let mut attempts = 0usize;
        let mut error_grace: Option<Instant> = None;
        loop {
            let snapshot = s.snapshot.load();
            let exclude = candidate_mask(&snapshot, excluded_slots);
            let picked = if attempts >= attempts_max(s.slots.len()) {
                None
            } else {
                s.selector.pick(&snapshot, bytes, s.now_ns(), exclude)
            };
            let Some(candidate) = picked else {
                if error_replies > 0 && attempts < attempts_max(s.slots.len()) {
                    // Every usable path failed this request. If another path may come back soon
                    // (failed, reconnecting, or a healthy path held down as marginal that is
                    // admitted when nothing else is usable), give it a short grace before the
                    // error is the request's.
                    let grace = *error_grace.get_or_insert_with(|| {
                        let grace = error_reply_grace(s);
                        s.path_wanted_until_ns
                            .fetch_max(s.now_ns() + grace.as_nanos() as u64, Ordering::AcqRel);
                        Instant::now() + grace
                    });
                    let others = snapshot.candidates().len() < s.slots.len();
                    if others && Instant::now() < grace && !s.stopping.load(Ordering::Acquire) {
                        tokio::time::sleep(NOT_DOWN_RECHECK).await;
                        continue;
                    }
                }
                if error_replies > 0 {
                    // Every usable path failed this request: it is the request's error now.
                    let e = last_error.take().unwrap_or_else(|| {
                        PathError::new(PathErrorKind::Reply(NbdErrno::Io), "I/O error")
                    });
                    return Err(IoError::new(
                        e.errno(),
                        format!("every usable path failed: {}", e.message),
                    ));
                }
                self.wait_for_path(bytes).await?;
                excluded_slots = 0;
                attempts = 0;
                continue;
            };
            attempts += 1;
            let index = snapshot.candidates()[candidate].index;
            let slot = &s.slots[index];
            let Some(installed) = slot.installed.load_full() else {
                // The control task has not published the failure yet; the slot has no connection.
                slot.load.mark_unusable();
                excluded_slots |= 1 << index;
                continue;
            };
            let alternatives = snapshot.candidates().len() > 1;
            // Each attempt sends a clone (a `Bytes` handle, not the data): a read abandoned at its
            // adaptive timeout leaves its copy behind on the old path, and we still hold ours.
            slot.load.on_dispatch(bytes);
            let started = Instant::now();
            match self
                .attempt(slot, index, &installed, request.clone(), alternatives)
                .await
            {
                Ok(reply) => {
                    let latency = started.elapsed();
                    slot.load
                        .on_complete(bytes, latency.as_nanos() as u64, s.now_ns());
                    slot.latency.record(latency);
                    slot.histogram.record(latency);
                    count_success(slot, &request);
                    drop(in_doubt);
                    return Ok(reply);
                }
                Err(Attempt::Request(e)) => {
                    slot.load
                        .on_complete(bytes, started.elapsed().as_nanos() as u64, s.now_ns());
                    slot.counters.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(IoError::new(e.errno(), e.message));
                }
                Err(Attempt::ErrorReply(e)) => {
                    slot.load
                        .on_complete(bytes, started.elapsed().as_nanos() as u64, s.now_ns());
                    slot.counters.errors.fetch_add(1, Ordering::Relaxed);
                    self.suspect(
                        slot,
                        index,
                        installed.generation,
                        format!("{} on a request", e.kind),
                    );
                    error_replies += 1;
                    excluded_slots |= 1 << index;
                    last_error = Some(e);
                }
                Err(Attempt::Slow(e)) => {
                    slot.load.on_abandon(bytes);
                    excluded_slots |= 1 << index;
                    last_error = Some(e);
                }
                Err(Attempt::Fault(e)) => {
                    slot.load.on_abandon(bytes);
                    slot.counters.errors.fetch_add(1, Ordering::Relaxed);
                    slot.load.mark_unusable();
                    s.send(Control::Fault {
                        index,
                        generation: installed.generation,
                        cause: e.message.clone(),
                    });
                    excluded_slots |= 1 << index;
                    if changes_data(&request) {
                        // It may have reached the storage, or may still: order later overlapping I/O
                        // after its re-drive; if the path hung (fenced, not reset), also quarantine
                        // the range for writes until that path is back.
                        let hung = matches!(e.kind, PathErrorKind::Timeout | PathErrorKind::Closed);
                        let hold = in_doubt.get_or_insert_with(|| InDoubt {
                            guard: s.in_doubt.register(offset, length),
                            table: &s.in_doubt,
                            offset,
                            length,
                            hung_path: None,
                            quarantine: quarantine_bound(s.settings.io_timeout),
                        });
                        if hung {
                            hold.hung_path = Some(index);
                        }
                    }
                    last_error = Some(e);
                }
            }
        }
    }

    /// One attempt on one path, with the adaptive and the hard deadline.
    async fn attempt(
        &self,
        slot: &PathSlot,
        index: usize,
        installed: &Arc<Installed>,
        request: Request,
        alternatives: bool,
    ) -> Result<Reply, Attempt> {
        let s = &*self.shared;
        let hard = s.settings.io_timeout;
        let soft = if s.settings.adaptive_timeout && alternatives {
            slot.latency.timeout(ADAPTIVE_TIMEOUT_FLOOR.min(hard), hard)
        } else {
            hard
        };
        let writes = changes_data(&request);
        let future = installed.connection.submit(request);
        tokio::pin!(future);
        match tokio::time::timeout(soft, &mut future).await {
            Ok(result) => return classify(result),
            Err(_) if soft >= hard => return Err(self.fence(slot, index, installed, hard)),
            Err(_) => {}
        }
        // Slow: take the path out of rotation until a probe answers.
        let cause = format!("no reply after {} (adaptive timeout)", humanize(soft));
        self.suspect(slot, index, installed.generation, cause.clone());
        if !writes {
            return Err(Attempt::Slow(PathError::new(PathErrorKind::Timeout, cause)));
        }
        // A write: wait for its reply, until `io_timeout` or until the probe declares the path dead and
        // the control task fences it (then `future` ends with Closed).
        match tokio::time::timeout(hard.saturating_sub(soft), &mut future).await {
            Ok(result) => classify(result),
            Err(_) => Err(self.fence(slot, index, installed, hard)),
        }
    }

    /// Closes a hung path's connection (every request on it comes back `Closed` and is re-driven)
    /// and reports it.
    fn fence(
        &self,
        slot: &PathSlot,
        index: usize,
        installed: &Installed,
        after: Duration,
    ) -> Attempt {
        let cause = format!(
            "timed out after {} (io_timeout); connection fenced",
            humanize(after)
        );
        slot.load.mark_unusable();
        installed.connection.close();
        self.shared.send(Control::Fault {
            index,
            generation: installed.generation,
            cause: cause.clone(),
        });
        Attempt::Fault(PathError::new(PathErrorKind::Timeout, cause))
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
                // (the path fails, or its probe answers). Look again shortly; this is not "no path",
                // so neither `no_path_retry = "fail"` nor its clock applies.
                if s.stopping.load(Ordering::Acquire) {
                    return Err(IoError::new(NbdErrno::Shutdown, "the LUN is shutting down"));
                }
                tokio::time::sleep(NOT_DOWN_RECHECK).await;
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

    /// FLUSH (PRODUCT.md §3): complete only after every path that acknowledged a write since its
    /// last flush has been flushed; one flush covers all when every such path is multi-conn.
    async fn flush(&self, request: Request) -> Result<Reply, IoError> {
        let s = &*self.shared;
        s.in_doubt.wait_clear(0, 0, false).await; // a flush is ordered after every running re-drive
        let dirty: Vec<(usize, u64)> = s
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let acked = slot.writes_acked.load(Ordering::Acquire);
                (acked > slot.writes_flushed.load(Ordering::Acquire)).then_some((i, acked))
            })
            .collect();
        let multi_conn = dirty.iter().all(|&(i, _)| {
            s.slots[i]
                .installed
                .load()
                .as_ref()
                .is_some_and(|inst| inst.connection.info().can_multi_conn())
        });
        if dirty.len() <= 1 || multi_conn || s.shared_backing {
            // One flush, on whichever path the policy picks, reaches the shared store.
            let reply = self.dispatch(request).await?;
            mark_flushed(s, &dirty);
            return Ok(reply);
        }
        // Paths with private caches: flush each one that holds acknowledged writes.
        let flushes = dirty.iter().map(|&(i, _)| self.flush_path(i));
        let results = super::futures_join(flushes).await;
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
        mark_flushed(s, &dirty);
        Ok(Reply::Done)
    }

    /// Flushes one path; if it is gone, a flush through any path is the best that can be done.
    async fn flush_path(&self, index: usize) -> Result<Reply, IoError> {
        let s = &*self.shared;
        let slot = &s.slots[index];
        let request = Request::Flush {
            flags: CommandFlags::empty(),
        };
        if let Some(installed) = slot.installed.load_full()
            && !slot.load.is_unusable()
        {
            slot.load.on_dispatch(0);
            let started = Instant::now();
            let result = self
                .attempt(slot, index, &installed, request.clone(), false)
                .await;
            match result {
                Ok(reply) => {
                    slot.load
                        .on_complete(0, started.elapsed().as_nanos() as u64, s.now_ns());
                    slot.counters.ios.fetch_add(1, Ordering::Relaxed);
                    return Ok(reply);
                }
                Err(Attempt::Request(e)) => {
                    slot.load
                        .on_complete(0, started.elapsed().as_nanos() as u64, s.now_ns());
                    return Err(IoError::new(e.errno(), e.message));
                }
                Err(Attempt::Fault(e)) => {
                    slot.load.on_abandon(0);
                    slot.load.mark_unusable();
                    s.send(Control::Fault {
                        index,
                        generation: installed.generation,
                        cause: e.message,
                    });
                }
                Err(Attempt::ErrorReply(_)) | Err(Attempt::Slow(_)) => {
                    slot.load.on_abandon(0);
                }
            }
        }
        self.dispatch(request).await
    }
}

/// How long a hung path's in-doubt ranges stay quarantined if the path never returns.
fn quarantine_bound(io_timeout: Duration) -> Duration {
    (io_timeout * 6).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

/// One request's in-doubt hold while it is re-driven (see `crate::in_doubt`). When it ends — the
/// re-drive completed or finally failed — a write that came from a hung path leaves a quarantine
/// behind for that path, inserted before the re-drive hold is released so there is no gap.
struct InDoubt<'a> {
    guard: InDoubtGuard<'a>,
    table: &'a InDoubtTable,
    offset: u64,
    length: u64,
    hung_path: Option<usize>,
    quarantine: Duration,
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if let Some(path) = self.hung_path {
            let until = tokio::time::Instant::now() + self.quarantine;
            self.table.quarantine(self.offset, self.length, path, until);
        }
        // `guard` is dropped after this body: the re-drive hold ends once the quarantine is in place.
        let _ = &self.guard;
    }
}

fn mark_flushed(s: &Shared, dirty: &[(usize, u64)]) {
    for &(i, acked) in dirty {
        s.slots[i].writes_flushed.fetch_max(acked, Ordering::AcqRel);
    }
}

fn count_success(slot: &PathSlot, request: &Request) {
    let c = &slot.counters;
    c.ios.fetch_add(1, Ordering::Relaxed);
    match request {
        Request::Read { length, .. } => {
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.bytes_read
                .fetch_add(u64::from(*length), Ordering::Relaxed);
        }
        Request::Write { data, .. } => {
            c.writes.fetch_add(1, Ordering::Relaxed);
            c.bytes_written
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        _ => {}
    }
    if changes_data(request) {
        slot.writes_acked.fetch_add(1, Ordering::AcqRel);
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

fn classify(result: Result<Reply, Failed>) -> Result<Reply, Attempt> {
    match result {
        Ok(reply) => Ok(reply),
        Err(Failed { error, .. }) if error.belongs_to_request() => Err(Attempt::Request(error)),
        Err(Failed { error, .. }) if error.is_path_fault() => Err(Attempt::Fault(error)),
        Err(Failed { error, .. }) => Err(Attempt::ErrorReply(error)),
    }
}
