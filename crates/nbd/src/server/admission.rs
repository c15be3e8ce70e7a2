//! Which connections the server serves: a bound on their number, and who makes room at the bound.
//!
//! A server that accepts without limit runs out of file descriptors and memory for whoever connects
//! most; one that refuses at a limit can be locked out by clients that connect and then do nothing.
//! So at `max_connections` a new connection evicts a connection that is *idle*: still in the
//! handshake (it has had its chance; the handshake timeout ends it anyway), or past it with no
//! request in flight for [`IDLE_EVICT_AFTER`]. Only when every connection is busy is the new one
//! refused (closed before the greeting: NBD has no way to say "busy" earlier).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A connection past its handshake with nothing in flight for this long may be evicted at the bound.
pub const IDLE_EVICT_AFTER: Duration = Duration::from_secs(30);

const PHASE_HANDSHAKE: u8 = 0;
const PHASE_TRANSMISSION: u8 = 1;

/// One admitted connection, shared by its task and the registry.
pub(crate) struct Admitted {
    id: u64,
    phase: AtomicU8,
    requests_in_flight: AtomicUsize,
    /// Milliseconds since the registry's epoch at the last request or reply.
    active_ms: AtomicU64,
    /// Cancelled when the connection is evicted to make room.
    pub(crate) evicted: CancellationToken,
    registry: Arc<Registry>,
}

impl Admitted {
    pub(crate) fn transmission_started(&self) {
        self.phase.store(PHASE_TRANSMISSION, Ordering::Release);
        self.touch();
    }

    pub(crate) fn request_started(&self) {
        self.requests_in_flight.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    pub(crate) fn request_done(&self) {
        self.requests_in_flight.fetch_sub(1, Ordering::AcqRel);
        self.touch();
    }

    fn touch(&self) {
        self.active_ms
            .store(self.registry.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

/// What admission decided.
pub(crate) enum Admission {
    Admitted(Arc<Admitted>),
    /// At the bound and every connection busy.
    Refused,
}

pub(crate) struct Registry {
    max: usize,
    /// [`coarse_ms`] when the registry started.
    epoch_ms: u64,
    next_id: AtomicU64,
    /// Weak: a connection's task owns its entry, and its drop removes it.
    conns: Mutex<HashMap<u64, Weak<Admitted>>>,
    /// Connections evicted and refused since start (statistics).
    pub(crate) evicted_total: AtomicU64,
    pub(crate) refused_total: AtomicU64,
}

impl Registry {
    pub(crate) fn new(max: usize) -> Arc<Registry> {
        Arc::new(Registry {
            max: max.max(1),
            epoch_ms: coarse_ms(),
            next_id: AtomicU64::new(0),
            conns: Mutex::new(HashMap::new()),
            evicted_total: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
        })
    }

    /// Milliseconds since the registry started, from the coarse monotonic clock: activity is
    /// stamped twice per request, and the coarse clock is read without the time counter (a few
    /// nanoseconds instead of tens in a VM) at a resolution far below `IDLE_EVICT_AFTER`.
    fn now_ms(&self) -> u64 {
        coarse_ms().saturating_sub(self.epoch_ms)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<Admitted>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection, evicting an idle one if the server is at its bound.
    pub(crate) fn admit(self: &Arc<Self>) -> Admission {
        let now = self.now_ms();
        let mut conns = self.lock();
        // Upgraded for the decision; released only after the lock (the last handle of a connection
        // that just ended may be one of these, and its drop takes the lock to remove itself).
        let others: Vec<Arc<Admitted>> = conns.values().filter_map(Weak::upgrade).collect();
        // Connections already told to go are not counted: they are on their way out.
        let live = others.iter().filter(|c| !c.evicted.is_cancelled()).count();
        let decision = if live < self.max {
            None
        } else {
            Some(idle_victim(&others, now))
        };
        let admission = match decision {
            Some(None) => {
                self.refused_total.fetch_add(1, Ordering::Relaxed);
                Admission::Refused
            }
            eviction => {
                if let Some(Some(victim)) = eviction {
                    victim.evicted.cancel();
                    self.evicted_total.fetch_add(1, Ordering::Relaxed);
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let admitted = Arc::new(Admitted {
                    id,
                    phase: AtomicU8::new(PHASE_HANDSHAKE),
                    requests_in_flight: AtomicUsize::new(0),
                    active_ms: AtomicU64::new(now),
                    evicted: CancellationToken::new(),
                    registry: Arc::clone(self),
                });
                conns.insert(id, Arc::downgrade(&admitted));
                Admission::Admitted(admitted)
            }
        };
        drop(conns);
        drop(others);
        admission
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The coarse monotonic clock in milliseconds (its resolution is the kernel's tick).
fn coarse_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    match clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE) {
        Ok(t) => t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000,
        // Every Linux since 2.6.32 has it; without it, the precise clock (always this one then).
        Err(_) => {
            static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            START
                .get_or_init(std::time::Instant::now)
                .elapsed()
                .as_millis() as u64
        }
    }
}

/// The connection to evict: the longest-idle one still in its handshake, else the longest-idle one
/// with nothing in flight for at least [`IDLE_EVICT_AFTER`].
fn idle_victim(conns: &[Arc<Admitted>], now_ms: u64) -> Option<Arc<Admitted>> {
    let idle_ms = |c: &Admitted| now_ms.saturating_sub(c.active_ms.load(Ordering::Relaxed));
    let candidates = conns.iter().filter(|c| !c.evicted.is_cancelled());
    let in_handshake = candidates
        .clone()
        .filter(|c| c.phase.load(Ordering::Acquire) == PHASE_HANDSHAKE)
        .max_by_key(|c| idle_ms(c));
    if let Some(c) = in_handshake {
        return Some(Arc::clone(c));
    }
    candidates
        .filter(|c| {
            c.requests_in_flight.load(Ordering::Acquire) == 0
                && idle_ms(c) >= IDLE_EVICT_AFTER.as_millis() as u64
        })
        .max_by_key(|c| idle_ms(c))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(a: Admission) -> Arc<Admitted> {
        match a {
            Admission::Admitted(a) => a,
            Admission::Refused => panic!("refused"),
        }
    }

    #[test]
    fn at_the_bound_a_connection_idle_in_its_handshake_makes_room() {
        let r = Registry::new(2);
        let busy = admitted(r.admit());
        busy.transmission_started();
        busy.request_started();
        let idle = admitted(r.admit());
        assert_eq!(r.len(), 2);
        let newcomer = admitted(r.admit());
        assert!(idle.evicted.is_cancelled(), "the handshake-phase one goes");
        assert!(!busy.evicted.is_cancelled());
        drop(idle);
        assert_eq!(r.len(), 2);
        // Now both are past the handshake, one busy and one fresh: nobody is idle long enough.
        newcomer.transmission_started();
        assert!(matches!(r.admit(), Admission::Refused));
        assert_eq!(r.refused_total.load(Ordering::Relaxed), 1);
        assert_eq!(r.evicted_total.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn dropping_a_connection_frees_its_place() {
        let r = Registry::new(1);
        let a = admitted(r.admit());
        a.transmission_started();
        assert!(matches!(r.admit(), Admission::Refused));
        drop(a);
        assert!(matches!(r.admit(), Admission::Admitted(_)));
    }
}
