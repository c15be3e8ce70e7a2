//! File descriptors: NBD clients must never starve the daemon's own paths or its management plane.
//!
//! Three layers (issue 10 D4):
//! 1. At start the soft `RLIMIT_NOFILE` is raised to the hard limit, and `max_connections` is held
//!    below what remains after a reserve for path connections, files and management connections —
//!    so export clients are refused (or idle ones evicted) by the NBD server before the process runs
//!    out of descriptors.
//! 2. The control socket keeps one spare descriptor (`/dev/null`): when `accept` fails with EMFILE or
//!    ENFILE, the spare is given up so the pending management connection can be accepted, and taken
//!    again when possible. An operator can always ask the daemon what is wrong.
//! 3. Every accept loop backs off on errors (`lunmpio_nbd::server::AcceptBackoff`: 10 ms doubling to
//!    1 s) instead of spinning, counts them
//!    (`lunmpio_accept_errors_total`) and logs at most one warning per 10 s per listener.

use std::fs::File;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Descriptors kept for everything but export connections: the listeners, log and state files, and
/// management connections.
const RESERVE_BASE: u64 = 96;
/// Per path: its connection, connections lingering while they owe replies, a reconnect attempt.
const RESERVE_PER_PATH: u64 = 8;

/// Raises the soft open-file limit to the hard one. Returns the soft limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    Some(limit.rlim_cur)
}

/// `max_connections` as far as the open-file limit allows, and why it was lowered, if it was.
pub fn connections_within_limit(
    max_connections: usize,
    paths: usize,
    open_files: Option<u64>,
) -> (usize, Option<String>) {
    let Some(limit) = open_files else {
        return (max_connections, None);
    };
    let reserve = RESERVE_BASE + RESERVE_PER_PATH * paths as u64;
    let room = limit.saturating_sub(reserve).max(1);
    if (max_connections as u64) <= room {
        return (max_connections, None);
    }
    let lowered = room as usize;
    let why = format!(
        "max_connections lowered from {max_connections} to {lowered}: the open-file limit is {limit} and \
         {reserve} descriptors are kept for {paths} paths and management (raise LimitNOFILE to serve more)"
    );
    (lowered, Some(why))
}

/// One spare descriptor, given up so the control socket can accept when the process is out of them.
pub struct Spare {
    file: Mutex<Option<File>>,
}

impl Spare {
    pub fn new() -> Spare {
        Spare {
            file: Mutex::new(File::open("/dev/null").ok()),
        }
    }

    /// Frees the spare descriptor; returns whether there was one to free.
    pub fn release(&self) -> bool {
        self.lock().take().is_some()
    }

    /// Takes a spare descriptor again if there is none (fails quietly while none is free).
    pub fn restore(&self) {
        let mut file = self.lock();
        if file.is_none() {
            *file = File::open("/dev/null").ok();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<File>> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for Spare {
    fn default() -> Self {
        Spare::new()
    }
}

/// Whether an accept error means "out of descriptors".
pub fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Accept errors of every listener, for the metrics.
#[derive(Default)]
pub struct AcceptErrors {
    pub nbd: AtomicU64,
    pub control: AtomicU64,
    pub metrics: AtomicU64,
}

/// Takes the spare descriptor back when dropped.
struct RestoreSpare(std::sync::Arc<Spare>);

impl Drop for RestoreSpare {
    fn drop(&mut self) {
        self.0.restore();
    }
}

/// A listener of the daemon's own services (the control socket, /metrics).
pub trait Listener {
    type Stream: Send + 'static;
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        tokio::net::UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Stream> {
        tokio::net::TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

/// Accepts connections until `stop` and serves each on its own task, at most `connections_max` at
/// once (more wait in the listen backlog). Out of descriptors, a spare one is given up so the
/// accept can go through and the connection be served (an operator needs these services most
/// then); it is taken back once a connection has closed. Other errors back off and are counted.
pub async fn accept_loop<L, F, Fut>(
    listener: L,
    what: &'static str,
    errors: &AtomicU64,
    connections_max: usize,
    stop: tokio_util::sync::CancellationToken,
    serve: F,
) where
    L: Listener,
    F: Fn(L::Stream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(connections_max));
    let spare = std::sync::Arc::new(Spare::new());
    let mut backoff = lunmpio_nbd::server::AcceptBackoff::new(what);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok(stream) => {
                backoff.reset();
                // Take a spare again if one is free (not while the freed one is wanted for this accept).
                spare.restore();
                stream
            }
            Err(e) if out_of_descriptors(&e) && spare.release() => {
                tracing::warn!(
                    "out of file descriptors: using the spare one to accept a {what} connection"
                );
                continue;
            }
            Err(e) => {
                backoff.failed(&e, errors).await;
                continue;
            }
        };
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = std::sync::Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let served = serve(stream);
        let spare = RestoreSpare(std::sync::Arc::clone(&spare));
        tokio::spawn(async move {
            served.await;
            // The connection's descriptor is closed by now; `spare` takes it as the spare before an
            // export client does (also if serving panicked), then the slot is free.
            drop(spare);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_stay_below_the_open_file_limit() {
        assert_eq!(connections_within_limit(1024, 4, None), (1024, None));
        assert_eq!(
            connections_within_limit(1024, 4, Some(1 << 20)),
            (1024, None)
        );
        let (n, why) = connections_within_limit(1024, 4, Some(1024));
        assert_eq!(n, 1024 - 96 - 32);
        assert!(why.unwrap().contains("open-file limit is 1024"));
        assert_eq!(connections_within_limit(1024, 64, Some(64)).0, 1);
    }

    #[test]
    fn the_spare_can_be_given_up_and_taken_again() {
        let spare = Spare::new();
        assert!(spare.release());
        assert!(!spare.release());
        spare.restore();
        assert!(spare.release());
    }
}
