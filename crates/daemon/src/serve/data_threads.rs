//! The threads that run the data path.
//!
//! Each LUN lives on one data thread: its control task, its path connections (their reader and writer
//! tasks, probes, reconnects) and, once the handshake has chosen it, every export connection of the
//! LUN. A request then goes from the client's socket through the engine to a path's socket and back
//! without a wake-up crossing threads, and the replies that complete together leave in one write
//! (docs/BENCHMARKS.md, "Where the CPU goes"). Each thread runs a current-thread runtime: a woken task
//! waits behind the tasks already ready, so a writer finds the whole batch queued. The accept loops,
//! the handshakes, the control socket and the metrics endpoint stay on the main runtime.
//!
//! With `data_poll_us` set, a thread keeps polling its sockets for that long after its last read
//! instead of sleeping (`poll_after_reads`), trading CPU for the wake-ups of low queue depths.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// How long `stop` waits for a data thread to leave its runtime.
const JOIN_GRACE: Duration = Duration::from_secs(2);
/// How long a data thread's runtime waits for its blocking calls when it stops.
const RUNTIME_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// One data thread: a current-thread runtime driven until `stop`.
struct DataThread {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

/// The daemon's data threads.
pub struct DataThreads {
    threads: Vec<DataThread>,
}

/// Threads for `luns` LUNs when the config asks for `configured` (0: one per LUN, at most one per CPU).
pub fn thread_count(configured: usize, luns: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    luns.clamp(1, cpus.max(1))
}

impl DataThreads {
    /// Starts `count` data threads (at least one). Each builds its runtime on its own thread (a runtime
    /// must not be dropped where async code runs, as it would be if the thread failed to start).
    /// `poll`: how long a thread polls after its last read before it sleeps (None: it sleeps at once).
    pub fn start(count: usize, poll: Option<Duration>) -> std::io::Result<DataThreads> {
        let mut started = DataThreads {
            threads: Vec::with_capacity(count.max(1)),
        };
        for i in 0..count.max(1) {
            let stop = CancellationToken::new();
            let until = stop.clone();
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("lunmpio-data-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    let runtime = match runtime {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    if let Some(window) = poll {
                        runtime.spawn(poll_after_reads(window));
                    }
                    runtime.block_on(until.cancelled());
                    // Bounded: a blocking call stuck on a hung device is not waited for.
                    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_GRACE);
                })?;
            // On an error here, `started` drops and stops the threads already running.
            let handle = handle_rx.recv().map_err(|_| {
                std::io::Error::other("a data thread ended before its runtime started")
            })??;
            started.threads.push(DataThread {
                handle,
                stop,
                thread,
            });
        }
        debug_assert!(!started.threads.is_empty(), "there is always a data thread");
        Ok(started)
    }

    pub fn len(&self) -> usize {
        self.threads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Every data thread's runtime, in order.
    pub fn handles(&self) -> Vec<tokio::runtime::Handle> {
        self.threads.iter().map(|t| t.handle.clone()).collect()
    }

    /// The runtime of the data thread that runs LUN number `lun` (in config order).
    pub fn for_lun(&self, lun: usize) -> &tokio::runtime::Handle {
        &self.threads[lun % self.threads.len()].handle
    }

    /// Stops every data thread; what still runs on them is dropped. Call once the LUNs are shut down.
    pub async fn stop(mut self) {
        let threads = std::mem::take(&mut self.threads);
        for t in &threads {
            t.stop.cancel();
        }
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.thread.join();
            }
        });
        if tokio::time::timeout(JOIN_GRACE, joined).await.is_err() {
            tracing::warn!("a data thread did not stop within {JOIN_GRACE:?}; leaving it");
        }
    }
}

/// Keeps the thread's runtime polling its sockets without sleeping until `window` has passed
/// without a read from an export connection, then lets it sleep until the next one. Path replies
/// that come while it polls are picked up without a wake-up too; health probes alone do not wake it.
///
/// How: a task that yields is run again only after the runtime has polled its sockets, and while a
/// task is waiting to run again the runtime polls with a zero timeout rather than sleeping. So while
/// this task yields, the thread spins through `epoll_wait(0)` and the tasks it makes ready, and a
/// request or a reply is picked up without a wake-up. Asleep, it costs nothing: the first read on
/// the thread wakes it, and that wake-up does not cross threads.
async fn poll_after_reads(window: Duration) {
    debug_assert!(
        !window.is_zero(),
        "a zero window is no polling: not started"
    );
    loop {
        lunmpio_nbd::activity::next_read().await;
        let mut seen = lunmpio_nbd::activity::reads();
        let mut last_read = Instant::now();
        while last_read.elapsed() < window {
            tokio::task::yield_now().await;
            let now = lunmpio_nbd::activity::reads();
            if now != seen {
                seen = now;
                last_read = Instant::now();
            }
        }
    }
}

impl Drop for DataThreads {
    /// A daemon that failed to start, or was dropped without `Daemon::stop`, drops its threads
    /// without `stop`: they end all the same (what runs on them is dropped, without a drain).
    fn drop(&mut self) {
        for t in &self.threads {
            t.stop.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_per_lun_at_most_one_per_cpu_unless_configured() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(thread_count(0, 1), 1);
        assert_eq!(thread_count(0, 0), 1, "a daemon without LUNs still has one");
        assert_eq!(thread_count(0, 10_000), cpus);
        assert_eq!(thread_count(3, 1), 3, "the config wins");
    }

    #[tokio::test]
    async fn luns_are_spread_over_the_threads_and_stop_ends_them() {
        let threads = DataThreads::start(2, None).unwrap();
        let name = |lun: usize| {
            let handle = threads.for_lun(lun).clone();
            async move {
                handle
                    .spawn(async { std::thread::current().name().map(str::to_string) })
                    .await
                    .unwrap()
            }
        };
        assert_eq!(name(0).await.as_deref(), Some("lunmpio-data-0"));
        assert_eq!(name(1).await.as_deref(), Some("lunmpio-data-1"));
        assert_eq!(name(2).await.as_deref(), Some("lunmpio-data-0"));
        threads.stop().await;
    }
}
