//! One health task per path (docs/GUARANTEES.md G5).
//!
//! While the path has a connection: watch for it to close (a reset on an idle path is noticed at
//! once, not at the next I/O), and probe it with a small read every `check_interval` — or at once
//! when the data path suspects it. While it has none: reconnect with exponential backoff, probe the
//! fresh connection, and hand it to the control task, which checks identity, hold-down and failback
//! before it may carry I/O.

use lunmpio_human::format_duration;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lunmpio_nbd::Request;
use tokio::sync::oneshot;

use super::{Admission, Control, Installed, Shared};
use crate::transport::{ConnectLimits, PathConnection};

/// First reconnect delay after a failure; doubles up to the check interval.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Bound on one connect attempt.
const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(5);

pub(super) async fn run(shared: Arc<Shared>, index: usize) {
    let mut backoff = Duration::ZERO;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        let installed = shared.slots[index].installed.load_full();
        let keep_going = match installed {
            Some(installed) => {
                backoff = RECONNECT_BACKOFF_MIN;
                watch(&shared, index, &installed).await
            }
            None => reconnect(&shared, index, &mut backoff).await,
        };
        if !keep_going {
            return;
        }
    }
}

/// Watches one installed connection until it is gone or replaced. Returns false on shutdown.
async fn watch(shared: &Arc<Shared>, index: usize, installed: &Arc<Installed>) -> bool {
    let slot = &shared.slots[index];
    let generation = installed.generation;
    loop {
        let still_installed = slot
            .installed
            .load()
            .as_ref()
            .is_some_and(|i| i.generation == generation);
        if !still_installed {
            return true;
        }
        let suspected = tokio::select! {
            _ = shared.stop.cancelled() => return false,
            _ = installed.connection.closed() => {
                shared.send(Control::Fault { index, generation, cause: "connection closed (reset or end of stream)".into() });
                // The control task removes it; wait for that rather than spin.
                wait_replaced(shared, index, generation).await;
                return !shared.stop.is_cancelled();
            }
            _ = tokio::time::sleep(shared.settings.check_interval) => false,
            _ = slot.probe_now.notified() => true,
        };
        if !suspected && !slot.load.is_unusable() && answered_lately(shared, index) {
            // Requests completed within the last check interval: the path is alive, and a probe
            // would only queue behind them.
            continue;
        }
        match probe(shared, index, &installed.connection).await {
            Ok(()) => shared.send(Control::ProbeOk { index, generation }),
            Err(cause) => {
                shared.send(Control::Fault {
                    index,
                    generation,
                    cause,
                });
                wait_replaced(shared, index, generation).await;
                return !shared.stop.is_cancelled();
            }
        }
    }
}

/// Waits until the control task has taken `generation` off the slot (it does so on every fault it
/// accepts; a stale report is ignored, in which case the connection is still current and the health
/// loop resumes after one check interval).
async fn wait_replaced(shared: &Arc<Shared>, index: usize, generation: u64) {
    let slot = &shared.slots[index];
    let deadline = tokio::time::Instant::now() + shared.settings.check_interval;
    loop {
        let changed = slot.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if slot
            .installed
            .load()
            .as_ref()
            .is_none_or(|i| i.generation != generation)
        {
            return;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = shared.stop.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// One reconnect attempt (after the backoff). Returns false on shutdown.
async fn reconnect(shared: &Arc<Shared>, index: usize, backoff: &mut Duration) -> bool {
    let slot = &shared.slots[index];
    if !backoff.is_zero() {
        tokio::select! {
            _ = shared.stop.cancelled() => return false,
            _ = tokio::time::sleep(*backoff) => {}
        }
    }
    let next = |b: Duration| {
        (b * 2).clamp(
            RECONNECT_BACKOFF_MIN,
            shared.settings.check_interval.max(RECONNECT_BACKOFF_MIN),
        )
    };
    let limits = ConnectLimits {
        connect_timeout: shared.settings.io_timeout.min(CONNECT_TIMEOUT_MAX),
        ..ConnectLimits::default()
    };
    let connected = tokio::select! {
        _ = shared.stop.cancelled() => return false,
        c = slot.target.connect(limits) => c,
    };
    let connection = match connected {
        Ok(c) => c,
        Err(e) => {
            shared.send(Control::ConnectFailed {
                index,
                cause: e.to_string(),
            });
            *backoff = next(*backoff);
            return true;
        }
    };
    // Identity first: a path that now leads to another volume must not even be read from.
    let geometry = shared.geometry.load();
    let info = connection.info();
    if super::identity::refusal(info, &geometry).is_some() {
        // The control task records the reason (and decides when to try again) without a probe.
        let (reply, admission) = oneshot::channel();
        shared.send(Control::Connected {
            index,
            connection,
            reply,
        });
        match admission.await {
            Ok(Admission::RetryAfter(delay)) => *backoff = delay,
            Ok(Admission::Installed) => *backoff = RECONNECT_BACKOFF_MIN,
            Err(_) => return false,
        }
        return true;
    }
    if let Err(cause) = probe(shared, index, &connection).await {
        connection.close();
        shared.send(Control::ConnectFailed {
            index,
            cause: format!("reconnected, but {cause}"),
        });
        *backoff = next(*backoff);
        return true;
    }
    let (reply, admission) = oneshot::channel();
    shared.send(Control::Connected {
        index,
        connection,
        reply,
    });
    match admission.await {
        Ok(Admission::Installed) => *backoff = RECONNECT_BACKOFF_MIN,
        Ok(Admission::RetryAfter(delay)) => *backoff = delay,
        Err(_) => return false, // the control task is gone: shutting down
    }
    true
}

/// Whether the path completed a request successfully within the last check interval.
fn answered_lately(shared: &Shared, index: usize) -> bool {
    let last = shared.slots[index].success_last_ns.load(Ordering::Acquire);
    last != 0
        && shared.now_ns().saturating_sub(last) < shared.settings.check_interval.as_nanos() as u64
}

/// A small read at the start of the volume, bounded by the path's adaptive timeout plus the time the
/// bytes already in flight on the path need to move (the probe waits behind them on the wire).
async fn probe(
    shared: &Arc<Shared>,
    index: usize,
    connection: &PathConnection,
) -> Result<(), String> {
    let slot = &shared.slots[index];
    let info = connection.info();
    let length = info
        .block_size
        .min
        .max(4096)
        .min(info.size_bytes.min(u64::from(u32::MAX)) as u32);
    if length == 0 {
        return Ok(()); // an empty volume has nothing to read; the connection itself answered
    }
    let transfer = slot.load.bytes_in_flight() + u64::from(length);
    let (timeout, _) = super::dispatch::deadlines(shared, slot, transfer, true);
    let request = Request::Read { offset: 0, length };
    match tokio::time::timeout(timeout, connection.submit(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(failed)) => Err(format!("probe failed: {}", failed.error)),
        Err(_) => Err(format!(
            "probe got no reply within {}",
            format_duration(timeout)
        )),
    }
}
