//! Holding an export's requests at a request boundary, for live reconfiguration and upgrade.
//!
//! While an export is held, its connections read no new request. A request that was being read when
//! the hold began waits aside ("parked") without running. Requests that already run finish, and
//! their replies are written. Once the export is *quiet* (nothing runs, nothing is unwritten), the
//! holder may swap the backend: the next request of every connection goes to the new one. Nothing is
//! failed and no connection is closed. The client only sees a pause.
//!
//! The race between a connection that has just read a request and a holder that has just begun
//! holding is settled the way Dekker's algorithm settles it. The connection counts the request
//! (`running += 1`) and then looks at `held`. The holder sets `held` and then looks at `running`.
//! Both use SeqCst, so at least one of them sees the other: either the connection parks the request,
//! or the holder waits for it to finish.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub(crate) struct Gate {
    held: AtomicBool,
    /// Holds in force (holds may nest: a reload during an upgrade's quiesce).
    holders: std::sync::Mutex<usize>,
    /// Requests counted in (read, and not yet answered with the reply written), over every
    /// connection of the export.
    running: AtomicUsize,
    /// Woken when `running` drops to zero.
    quiet: Notify,
    /// Requests read during a hold and waiting for its end.
    parked: AtomicUsize,
    /// Bumped at every release, after `held` clears: connections wait on it while held.
    released: watch::Sender<u64>,
    /// Connections of this export in transmission.
    connections: watch::Sender<usize>,
    /// Cancelled when the export is removed: its connections drain and close, as at shutdown.
    pub(crate) closing: CancellationToken,
}

impl Gate {
    pub(crate) fn new() -> Arc<Gate> {
        Arc::new(Gate {
            held: AtomicBool::new(false),
            holders: std::sync::Mutex::new(0),
            running: AtomicUsize::new(0),
            quiet: Notify::new(),
            parked: AtomicUsize::new(0),
            released: watch::Sender::new(0),
            connections: watch::Sender::new(0),
            closing: CancellationToken::new(),
        })
    }

    pub(crate) fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Counts a request in. `None` (and nothing counted) if the export is held: the caller parks the
    /// request until [`Gate::subscribe`] reports a release, then calls [`Gate::unpark`].
    pub(crate) fn enter(self: &Arc<Gate>) -> Option<Ticket> {
        self.running.fetch_add(1, Ordering::SeqCst);
        let ticket = Ticket(Arc::clone(self));
        if self.held.load(Ordering::SeqCst) {
            drop(ticket); // uncounts it, and wakes a holder waiting for quiet
            self.parked.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        Some(ticket)
    }

    /// A parked request left its place (it enters again, or is answered at shutdown).
    pub(crate) fn unpark(&self) {
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    pub(crate) fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.released.subscribe()
    }

    pub(crate) fn hold(&self) {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        *holders += 1;
        self.held.store(true, Ordering::SeqCst);
    }

    pub(crate) fn release(&self) {
        let mut holders = self.holders.lock().unwrap_or_else(|p| p.into_inner());
        assert!(*holders > 0, "a release matches a hold");
        *holders -= 1;
        if *holders == 0 {
            // `held` clears before the wake-up, so a woken connection never finds it still set (it
            // would wait again for a release that has already happened). A backend replaced during
            // the hold is published by its own generation (`ExportEntry::backend_generation`), set
            // before this.
            self.held.store(false, Ordering::SeqCst);
            self.released.send_modify(|g| *g += 1);
        }
    }

    /// Resolves once no request of the export runs or waits to be written (call while held).
    pub(crate) async fn quiet(&self) {
        loop {
            let notified = self.quiet.notified();
            tokio::pin!(notified);
            notified.as_mut().enable(); // registered before the check: a wake-up is never missed
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Counts a connection in transmission until the guard drops.
    pub(crate) fn connection(self: &Arc<Gate>) -> ConnectionGuard {
        self.connections.send_modify(|n| *n += 1);
        ConnectionGuard(Arc::clone(self))
    }

    pub(crate) fn connections(&self) -> usize {
        *self.connections.borrow()
    }

    /// Resolves once no connection of the export is in transmission.
    pub(crate) async fn no_connections(&self) {
        let mut rx = self.connections.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// One request counted in; uncounted when dropped (after its reply is written).
pub(crate) struct Ticket(Arc<Gate>);

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.quiet.notify_waiters();
        }
    }
}

pub(crate) struct ConnectionGuard(Arc<Gate>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_counted_before_the_hold_keeps_the_export_from_being_quiet() {
        let gate = Gate::new();
        let ticket = gate.enter().expect("not held");
        gate.hold();
        assert!(gate.enter().is_none(), "held: a new request parks");
        assert_eq!(gate.running(), 1);
        let quiet = gate.quiet();
        tokio::pin!(quiet);
        assert!(futures::poll!(quiet.as_mut()).is_pending());
        drop(ticket);
        quiet.await;
        let released = gate.subscribe();
        gate.release();
        assert!(released.has_changed().unwrap());
        assert!(gate.enter().is_some());
    }

    #[test]
    fn holds_nest() {
        let gate = Gate::new();
        gate.hold();
        gate.hold();
        gate.release();
        assert!(gate.is_held());
        gate.release();
        assert!(!gate.is_held());
    }
}
