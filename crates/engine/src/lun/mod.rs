//! The multipath LUN: one logical LUN over N paths.
//!
//! Split the way libublk-rs splits control from data:
//!
//! - **Data path** ([`dispatch`]): [`Lun::submit`] runs one request. It reads the current selector
//!   snapshot (`ArcSwap`, no lock), lets the selector pick a path from it and per-path atomics, sends
//!   the request on that path's connection, and on a path fault marks the path unusable *at once*
//!   (one atomic store), tells the control task, and re-drives the request on another path. Each
//!   attempt sends a clone (payloads are `Bytes` handles, not copies); the copy a failed path hands
//!   back is dropped, the dispatcher re-drives its own. Hung paths are suspected after an adaptive timeout and fenced at
//!   `io_timeout`; in-doubt writes order later overlapping I/O after their re-drive.
//! - **Control plane** ([`control`]): one task per LUN owns the mutable [`LunMpio`] (the VDS state),
//!   applies faults, recoveries and management calls to it, persists what Set calls change, logs
//!   events, and publishes new snapshots. Management reads (GetPathInfo, GetLoadBalancePolicy, …) use
//!   the last published state and never wait for I/O.
//! - **Health** ([`health`]): one task per path watches its connection, probes it every
//!   `check_interval`, and reconnects a failed path with exponential backoff.

mod carry;
mod control;
mod dispatch;
mod export;
mod fence;
mod health;
pub mod identity;
mod journal;

use lunmpio_human::format_duration;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use lunmpio_vds::{
    Guid, HbaPortMatch, HbaPortOutcome, HbaPortProp, HbaPortSpeedFlags, HbaPortStatus, HbaPortType,
    HwProviderType, IpAddress, LbSupportFlags, LoadBalancePolicy, LunMpio, PathEndpoints, PathId,
    PathInfo, PathLoad, PathPolicy, PathPolicyInput, Selector, SelectorSnapshot, Transport,
    VdsError,
};
use tokio::sync::{Notify, mpsc, oneshot};

use crate::events::EventLog;
use crate::in_doubt::InDoubtTable;
use crate::latency::{LatencyEstimator, LatencyHistogram, ThroughputEstimator};
use crate::no_path::NoPathQueue;
use crate::settings::{LunSettings, LunSpec, PathSpec};
pub use crate::transport::Geometry;
use crate::transport::{ConnectLimits, PathConnection, PathTarget};

pub use carry::{CounterValues, LunCarry, PathCarry};
pub use dispatch::IoError;

/// Per-path counters (cumulative since start).
#[derive(Default)]
pub struct PathCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub ios: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
    /// Times this path was failed away from.
    pub failovers: AtomicU64,
}

/// A connection installed on a path, with the generation that tells a stale fault report from a
/// current one.
pub(crate) struct Installed {
    pub(crate) connection: PathConnection,
    pub(crate) generation: u64,
    /// Cancelled when the control task takes the connection out of service (the path failed or was
    /// reconnected): every request still waiting on it is re-driven at once.
    pub(crate) abandoned: tokio_util::sync::CancellationToken,
    /// The same fact as an atomic, ordered with `writes_outstanding` (see [`Installed::abandon`]).
    abandoned_flag: AtomicBool,
    /// Data-changing requests sent on this connection and not answered yet, including copies whose
    /// requests were re-driven elsewhere (in doubt). An abandoned connection stays open while this is
    /// above zero, so the target's late replies can still prove those copies finished.
    writes_outstanding: AtomicUsize,
    /// Writes acknowledged on this connection, and how many of them a completed flush covers: FLUSH
    /// goes to every connection with `writes_acked > writes_flushed` (docs/GUARANTEES.md, FLUSH).
    pub(crate) writes_acked: AtomicU64,
    pub(crate) writes_flushed: AtomicU64,
}

impl Installed {
    pub(crate) fn new(connection: PathConnection, generation: u64) -> Installed {
        Installed {
            connection,
            generation,
            abandoned: tokio_util::sync::CancellationToken::new(),
            abandoned_flag: AtomicBool::new(false),
            writes_outstanding: AtomicUsize::new(0),
            writes_acked: AtomicU64::new(0),
            writes_flushed: AtomicU64::new(0),
        }
    }

    /// Takes the connection out of service. It is closed now if it owes no write a reply, else when
    /// the last one is answered (or by a fence, an expiry or shutdown). Returns whether it stays open.
    pub(crate) fn abandon(&self) -> bool {
        self.abandoned_flag.store(true, Ordering::SeqCst);
        self.abandoned.cancel();
        // SeqCst with `OutstandingWrite::drop`: either this load sees the last write still out, or
        // that drop sees the flag — never neither, so the connection is always closed in the end.
        if self.writes_outstanding.load(Ordering::SeqCst) == 0 {
            self.connection.close();
            return false;
        }
        self.connection.is_open()
    }

    pub(crate) fn is_abandoned(&self) -> bool {
        self.abandoned_flag.load(Ordering::SeqCst)
    }

    /// Writes acknowledged here and not yet covered by a flush.
    pub(crate) fn unflushed(&self) -> u64 {
        self.writes_acked
            .load(Ordering::SeqCst)
            .saturating_sub(self.writes_flushed.load(Ordering::SeqCst))
    }
}

/// One data-changing request out on a connection, until it is answered or the connection is gone.
pub(crate) struct OutstandingWrite(Arc<Installed>);

impl OutstandingWrite {
    pub(crate) fn new(installed: &Arc<Installed>) -> OutstandingWrite {
        installed.writes_outstanding.fetch_add(1, Ordering::SeqCst);
        OutstandingWrite(Arc::clone(installed))
    }
}

impl Drop for OutstandingWrite {
    fn drop(&mut self) {
        let installed = &self.0;
        if installed.writes_outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && installed.abandoned_flag.load(Ordering::SeqCst)
        {
            installed.connection.close();
        }
    }
}

/// One path's runtime state, shared by the data path, the control task and the health task. Slots
/// are in the same order as `LunMpio::paths()` (sorted by path id), so a selector candidate's `index`
/// is a slot index.
pub(crate) struct PathSlot {
    pub(crate) id: PathId,
    pub(crate) name: String,
    pub(crate) target: PathTarget,
    pub(crate) load: Arc<PathLoad>,
    pub(crate) installed: ArcSwapOption<Installed>,
    pub(crate) generation: AtomicU64,
    /// Writes acknowledged on connections of this path that were abandoned before a flush covered
    /// them, when nothing else can make them durable (no CAN_MULTI_CONN, no `shared_backing`): the
    /// next FLUSH fails with EIO and says so.
    pub(crate) unflushed_lost: AtomicU64,
    /// The same for coherent paths (multi-conn or shared backing): a flush on any path covers them.
    pub(crate) unflushed_orphaned: AtomicU64,
    /// `fence`: the program and arguments that fence this path.
    pub(crate) fence: Option<Vec<String>>,
    pub(crate) uri: String,
    pub(crate) latency: LatencyEstimator,
    pub(crate) throughput: ThroughputEstimator,
    pub(crate) histogram: LatencyHistogram,
    pub(crate) counters: PathCounters,
    /// Requests waiting for room on this path (bytes or requests in flight at their bound), and their
    /// wake-up: completions notify only when someone waits.
    pub(crate) room_waiters: AtomicUsize,
    pub(crate) room: Notify,
    /// `now_ns` of the last request this path completed successfully: proof of life, so the periodic
    /// probe is skipped while I/O flows.
    pub(crate) success_last_ns: AtomicU64,
    /// `now_ns` at which a marginal path's hold-down ends (0: none), published by the control task
    /// for the statistics.
    pub(crate) hold_until_ns: AtomicU64,
    /// Wakes the health task for a probe now (a request on the path timed out or failed).
    pub(crate) probe_now: Notify,
    /// Signalled whenever the control task installs or removes the connection.
    pub(crate) changed: Notify,
}

/// Messages to the LUN's control task.
pub(crate) enum Control {
    /// The data path or the health task saw the connection of `generation` break, or fenced it.
    Fault {
        index: usize,
        generation: u64,
        cause: String,
    },
    /// A request was slow or got EIO: the path is out of rotation until a probe answers.
    Suspect {
        index: usize,
        generation: u64,
        cause: String,
    },
    /// A copy of a write sent on connection `generation` of the path is now in doubt: if that
    /// connection is out of service, fence the path.
    InDoubt {
        index: usize,
        generation: u64,
    },
    /// A fence run ended; it covers every connection of the path up to `through_generation`.
    FenceDone {
        index: usize,
        through_generation: u64,
        outcome: fence::Outcome,
    },
    /// The health task's probe answered on the connection of `generation`.
    ProbeOk {
        index: usize,
        generation: u64,
    },
    /// The health task (re)connected and probed a path; the control task decides whether it may carry
    /// I/O (identity, hold-down, failback) and answers when to try again if not.
    Connected {
        index: usize,
        connection: PathConnection,
        reply: oneshot::Sender<Admission>,
    },
    /// The health task could not connect (for the status reason).
    ConnectFailed {
        index: usize,
        cause: String,
    },
    /// A failback delay ran out.
    FailbackDue {
        index: usize,
        generation: u64,
    },
    Manage(Manage),
}

/// What the control task says to a freshly connected path.
#[derive(Debug)]
pub(crate) enum Admission {
    Installed,
    RetryAfter(Duration),
}

/// Management calls, answered on a oneshot.
pub(crate) enum Manage {
    Policy {
        policy: i32,
        paths: Vec<PathPolicyInput>,
        reply: oneshot::Sender<Result<(), VdsError>>,
    },
    PathStatus {
        path: PathId,
        status: i32,
        reply: oneshot::Sender<Result<(), VdsError>>,
    },
    HbaPort {
        port: HbaPortMatch,
        status: i32,
        reply: oneshot::Sender<Result<HbaPortOutcome, VdsError>>,
    },
    /// The control task's part of [`LunCarry`], per slot.
    Carry {
        reply: oneshot::Sender<Vec<carry::HealthCarry>>,
    },
}

pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) source_id: u64,
    pub(crate) settings: LunSettings,
    pub(crate) shared_backing: bool,
    pub(crate) slots: Box<[PathSlot]>,
    pub(crate) selector: Selector,
    pub(crate) snapshot: ArcSwap<SelectorSnapshot>,
    /// The VDS state as last published by the control task (for Gets).
    pub(crate) published: ArcSwap<LunMpio>,
    pub(crate) geometry: ArcSwap<Geometry>,
    pub(crate) control: mpsc::UnboundedSender<Control>,
    pub(crate) no_path: NoPathQueue,
    pub(crate) in_doubt: InDoubtTable,
    pub(crate) events: Arc<EventLog>,
    pub(crate) set_in_progress: AtomicBool,
    pub(crate) epoch: Instant,
    pub(crate) stopping: AtomicBool,
    pub(crate) stop: tokio_util::sync::CancellationToken,
    /// `stop` as an atomic, for the data path's checks (reading the token takes its lock).
    pub(crate) stopped: AtomicBool,
    /// The task that writes the in-doubt journal, last of all when the LUN stops ([`Lun::closed`]).
    journal_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Until when (`now_ns`) a request is waiting for a path because every usable one failed it:
    /// a healthy path held down as marginal is admitted meanwhile (better marginal than an error).
    pub(crate) path_wanted_until_ns: AtomicU64,
    /// Woken whenever a path may have become usable (a new snapshot, a probe answered): requests
    /// waiting for a candidate look again.
    pub(crate) paths_changed: Notify,
    /// Where the in-doubt copies are kept across restarts (`state_dir`), and how far they are written.
    pub(crate) journal: journal::Journal,
    pub(crate) fences_ok: AtomicU64,
    pub(crate) fences_failed: AtomicU64,
    /// The deadlines of the attempts waiting on the paths, watched by one task.
    pub(crate) deadlines: crate::deadline_watch::DeadlineWatch,
}

impl Shared {
    /// Monotonic nanoseconds since the LUN started (the selectors' clock).
    pub(crate) fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// [`Shared::now_ns`] of an instant already read (the data path reads the clock once per step).
    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub(crate) fn send(&self, message: Control) {
        // The control task lives as long as the LUN; after shutdown nobody needs the message.
        let _ = self.control.send(message);
    }
}

/// Where to keep what management calls change.
#[derive(Debug, Clone, Default)]
pub struct LunOptions {
    /// `state_dir`: the LUN's policy and administrative path states are persisted here.
    pub state_dir: Option<PathBuf>,
    /// Bound on the first connection attempts when the LUN starts.
    pub startup_timeout: Option<Duration>,
    /// Counters and hold-downs of an earlier run of this LUN ([`Lun::carry`]).
    pub carry: Option<LunCarry>,
}

/// A multipath LUN. Cheap to clone; every clone is the same LUN.
#[derive(Clone)]
pub struct Lun {
    pub(crate) shared: Arc<Shared>,
}

/// What GetStatistics reports about one path.
#[derive(Debug, Clone, PartialEq)]
pub struct PathStats {
    pub path_id: PathId,
    pub name: String,
    pub status: lunmpio_vds::PathStatus,
    pub reads: u64,
    pub writes: u64,
    pub ios: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub in_flight_bytes: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub failovers: u64,
    /// The adaptive deadline a request on this path gets now.
    pub timeout_ms: u64,
    pub latency_buckets: Vec<u64>,
    pub latency_sum_us: u64,
    /// What is left of a marginal path's hold-down (0: none).
    pub hold_down_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LunStats {
    pub paths: Vec<PathStats>,
    pub queued_ios: u64,
    pub queued_bytes: u64,
    /// Copies of writes in doubt now (each holds its range for new writes).
    pub in_doubt_writes: u64,
    /// Copies ever put in doubt, and how their holds ended: answered by the target, released by a
    /// fence, or lapsed at `in_doubt_timeout` (the guarantee did not hold for those).
    pub in_doubt_writes_total: u64,
    pub in_doubt_answered_total: u64,
    pub in_doubt_fenced_total: u64,
    pub in_doubt_expired_total: u64,
    /// Fence runs that succeeded and that failed (or timed out).
    pub fences_ok_total: u64,
    pub fences_failed_total: u64,
    /// How long the oldest write in doubt now has been (0: none).
    pub in_doubt_oldest_ms: u64,
    /// Time until the earliest in-doubt copy's `in_doubt_timeout` lapses (None: none pending, or
    /// `in_doubt_timeout = "never"`).
    pub in_doubt_expires_in_ms: Option<u64>,
    /// How long the LUN has been without a usable path now (0 while it has one).
    pub all_paths_down_ms: u64,
    /// Time without a usable path since the LUN started, the current outage included.
    pub all_paths_down_ms_total: u64,
}

impl Lun {
    /// Builds the LUN, connects its paths (bounded by the startup timeout), settles its identity,
    /// restores persisted policy and administrative states, and starts its control and health tasks.
    pub async fn start(
        spec: LunSpec,
        options: LunOptions,
        events: Arc<EventLog>,
    ) -> Result<Lun, VdsError> {
        assert!(
            !spec.paths.is_empty(),
            "a LUN has at least one path (the config checks)"
        );
        let mut paths = spec.paths.clone();
        paths.sort_by_key(|p| p.id);
        let mpio_config = lunmpio_vds::LunConfig {
            name: spec.name.clone(),
            source_id: spec.source_id,
            policy: spec.settings.policy,
            // Optimistic until the paths have said otherwise: a configured multipath policy stays in
            // force unless a path turns out not to be safe to share (then Failover, with an event).
            multi_path_safe: true,
            paths: paths.iter().map(vds_path_config).collect(),
        };
        let mut mpio = LunMpio::new(mpio_config)?;
        let settings_fence = spec.settings.fence.clone();
        let slots: Box<[PathSlot]> = mpio
            .paths()
            .iter()
            .zip(&paths)
            .map(|(p, spec)| {
                debug_assert_eq!(p.id().path_id, spec.id);
                PathSlot {
                    id: p.id(),
                    name: spec.name.clone(),
                    target: spec.target.clone(),
                    load: Arc::clone(p.load()),
                    installed: ArcSwapOption::empty(),
                    generation: AtomicU64::new(0),
                    unflushed_lost: AtomicU64::new(0),
                    unflushed_orphaned: AtomicU64::new(0),
                    fence: spec.fence.clone().or_else(|| settings_fence.clone()),
                    uri: spec.uri.clone(),
                    latency: LatencyEstimator::default(),
                    throughput: ThroughputEstimator::default(),
                    histogram: LatencyHistogram::default(),
                    counters: PathCounters::default(),
                    room_waiters: AtomicUsize::new(0),
                    room: Notify::new(),
                    success_last_ns: AtomicU64::new(0),
                    hold_until_ns: AtomicU64::new(0),
                    probe_now: Notify::new(),
                    changed: Notify::new(),
                }
            })
            .collect();

        let state_file = options
            .state_dir
            .as_ref()
            .map(|dir| lunmpio_vds::persist::state_file_path(dir, &spec.name));
        if let Some(file) = state_file.clone() {
            // Reading (and perhaps setting aside) the state file is blocking file I/O.
            let events = Arc::clone(&events);
            mpio = tokio::task::spawn_blocking(move || {
                control::restore_state(&mut mpio, &file, &events);
                mpio
            })
            .await
            .map_err(|e| VdsError::internal(format!("restoring the state file failed: {e}")))?;
        }
        let journal = journal::Journal::new(options.state_dir.as_deref(), &spec.name);
        let in_doubt = InDoubtTable::new();
        journal
            .restore(&spec.name, &slots, &in_doubt, &events)
            .await;

        // First connections, all at once, bounded.
        let startup_timeout = options.startup_timeout.unwrap_or(Duration::from_secs(5));
        let limits = ConnectLimits {
            connect_timeout: startup_timeout,
            ..ConnectLimits::default()
        };
        // A path that was failed when the LUN last ran (an upgrade or a reload restarts it) starts
        // failed, with its reason, and is reconnected in the background: a hung target must not
        // hold the restart (and its clients) for the whole startup timeout.
        let carried_failure = |id: u64| {
            options
                .carry
                .as_ref()?
                .paths
                .iter()
                .find(|c| c.path_id == id)?
                .failed_reason
                .clone()
        };
        let attempts = paths.iter().map(|p| {
            let target = p.target.clone();
            let failed = carried_failure(p.id);
            async move {
                if let Some(reason) = failed {
                    return Err(reason);
                }
                match tokio::time::timeout(startup_timeout, target.connect(limits)).await {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no answer within {}",
                        format_duration(startup_timeout)
                    )),
                }
            }
        });
        let results: Vec<Result<PathConnection, String>> = futures_join(attempts).await;
        // A restart (upgrade, reload) knows the size even when no path answers now.
        let carried_size = options.carry.as_ref().and_then(|c| c.size_bytes);
        let geometry = if spec.size_bytes.is_none() && carried_size.is_some() {
            let mut known = spec.clone();
            known.size_bytes = carried_size;
            identity::settle(&known, &results)?
        } else {
            identity::settle(&spec, &results)?
        };

        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            name: spec.name.clone(),
            source_id: spec.source_id,
            settings: spec.settings.clone(),
            shared_backing: spec.shared_backing,
            slots,
            selector: Selector::new(),
            snapshot: ArcSwap::from_pointee(SelectorSnapshot::empty(mpio.policy())),
            published: ArcSwap::from_pointee(mpio.clone()),
            geometry: ArcSwap::from_pointee(geometry.clone()),
            control: control_tx,
            no_path: NoPathQueue::new(
                spec.settings.no_path_retry,
                spec.settings.no_path_queue_bytes_max,
            ),
            in_doubt,
            events,
            set_in_progress: AtomicBool::new(false),
            epoch: Instant::now(),
            stopping: AtomicBool::new(false),
            stop: tokio_util::sync::CancellationToken::new(),
            stopped: AtomicBool::new(false),
            journal_task: std::sync::Mutex::new(None),
            path_wanted_until_ns: AtomicU64::new(0),
            paths_changed: Notify::new(),
            journal,
            fences_ok: AtomicU64::new(0),
            fences_failed: AtomicU64::new(0),
            deadlines: crate::deadline_watch::DeadlineWatch::new(),
        });
        let carried = options.carry.unwrap_or_default();
        for slot in shared.slots.iter() {
            if let Some(p) = carried.paths.iter().find(|p| p.path_id == slot.id.path_id) {
                slot.counters.restore(&p.counters);
            }
        }
        shared.fences_ok.store(carried.fences_ok, Ordering::Relaxed);
        shared
            .fences_failed
            .store(carried.fences_failed, Ordering::Relaxed);
        let mut control =
            control::ControlTask::new(Arc::clone(&shared), mpio, state_file, &carried);
        control.admit_initial(results);
        tokio::spawn(control.run(control_rx));
        let journal_task = tokio::spawn(journal::persist_task(Arc::clone(&shared)));
        *shared
            .journal_task
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(journal_task);
        for index in 0..shared.slots.len() {
            tokio::spawn(health::run(Arc::clone(&shared), index));
        }
        tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { shared.deadlines.run(&shared.stop).await }
        });
        Ok(Lun { shared })
    }

    /// What a restart of this LUN carries over (see [`LunCarry`]): its counters and hold-downs now.
    /// `None` once the LUN is shutting down.
    pub async fn carry(&self) -> Option<LunCarry> {
        let (reply, rx) = oneshot::channel();
        self.shared.send(Control::Manage(Manage::Carry { reply }));
        let health = rx.await.ok()?;
        let mpio = self.mpio();
        let paths = self
            .shared
            .slots
            .iter()
            .zip(health)
            .map(|(slot, h)| {
                let failed = match mpio.path(slot.id).map(|p| p.oper_status()) {
                    Some(lunmpio_vds::OperStatus::Failed { reason }) => Some(reason.clone()),
                    _ => None,
                };
                carry::path_carry(slot, h, failed)
            })
            .collect();
        Some(LunCarry {
            size_bytes: Some(self.shared.geometry.load().size_bytes),
            paths,
            fences_ok: self.shared.fences_ok.load(Ordering::Relaxed),
            fences_failed: self.shared.fences_failed.load(Ordering::Relaxed),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn source_id(&self) -> u64 {
        self.shared.source_id
    }

    pub fn geometry(&self) -> Arc<Geometry> {
        self.shared.geometry.load_full()
    }

    /// The VDS state as last published (never waits for I/O or for a Set call).
    pub fn mpio(&self) -> Arc<LunMpio> {
        self.shared.published.load_full()
    }

    pub fn get_path_info(&self) -> Vec<PathInfo> {
        self.mpio().get_path_info()
    }

    pub fn get_load_balance_policy(&self) -> (LoadBalancePolicy, Vec<PathPolicy>) {
        self.mpio().get_load_balance_policy()
    }

    pub fn get_supported_lb_policies(&self) -> LbSupportFlags {
        self.mpio().get_supported_lb_policies()
    }

    /// SetLoadBalancePolicy: validated and applied all-or-nothing by the control task, persisted before
    /// it returns. A second Set on this LUN while one is running gets `VDS_E_ANOTHER_CALL_IN_PROGRESS`.
    pub async fn set_load_balance_policy(
        &self,
        policy: i32,
        paths: Vec<PathPolicyInput>,
    ) -> Result<(), VdsError> {
        self.manage(|reply| Manage::Policy {
            policy,
            paths,
            reply,
        })
        .await
    }

    /// Administrative fail (5), standby (7) or reinstate (1) of one path.
    pub async fn set_path_status(&self, path: PathId, status: i32) -> Result<(), VdsError> {
        self.manage(|reply| Manage::PathStatus {
            path,
            status,
            reply,
        })
        .await
    }

    /// This LUN's part of SetAllPathStatusesFromHbaPort, under a reservation the caller holds for every
    /// LUN of the call (see [`set_all_path_statuses_from_hba_port`]).
    pub async fn set_hba_port_statuses_reserved(
        &self,
        reservation: &SetReservation<'_>,
        port: HbaPortMatch,
        status: i32,
    ) -> Result<HbaPortOutcome, VdsError> {
        self.manage_reserved(reservation, |reply| Manage::HbaPort {
            port,
            status,
            reply,
        })
        .await
    }

    /// This LUN's part of SetAllPathStatusesFromHbaPort (the caller aggregates over LUNs).
    pub async fn set_hba_port_statuses(
        &self,
        port: HbaPortMatch,
        status: i32,
    ) -> Result<HbaPortOutcome, VdsError> {
        self.manage(|reply| Manage::HbaPort {
            port,
            status,
            reply,
        })
        .await
    }

    async fn manage<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, VdsError>>) -> Manage,
    ) -> Result<T, VdsError> {
        let reservation = self.try_reserve_set()?;
        self.manage_reserved(&reservation, make).await
    }

    /// Reserves this LUN for one Set call: until the reservation is dropped, any other Set call on it
    /// gets `VDS_E_ANOTHER_CALL_IN_PROGRESS`. A call that spans LUNs reserves all of them first, so it
    /// either changes every LUN or none.
    pub fn try_reserve_set(&self) -> Result<SetReservation<'_>, VdsError> {
        if self
            .shared
            .set_in_progress
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(VdsError::another_call_in_progress(format!(
                "another Set call on LUN {:?} is in progress",
                self.shared.name
            )));
        }
        Ok(SetReservation(&self.shared.set_in_progress))
    }

    async fn manage_reserved<T>(
        &self,
        reservation: &SetReservation<'_>,
        make: impl FnOnce(oneshot::Sender<Result<T, VdsError>>) -> Manage,
    ) -> Result<T, VdsError> {
        debug_assert!(std::ptr::eq(reservation.0, &self.shared.set_in_progress));
        let (reply, answer) = oneshot::channel();
        self.shared.send(Control::Manage(make(reply)));
        answer.await.unwrap_or_else(|_| {
            Err(VdsError::object_deleted(format!(
                "LUN {:?} is shutting down",
                self.shared.name
            )))
        })
    }

    /// GetStatistics.
    pub fn statistics(&self) -> LunStats {
        let mpio = self.mpio();
        let now_ns = self.shared.now_ns();
        let (down_now, down_total) = self.shared.no_path.down_durations();
        let timeout_floor =
            crate::settings::ADAPTIVE_TIMEOUT_FLOOR.min(self.shared.settings.io_timeout);
        let paths = self
            .shared
            .slots
            .iter()
            .zip(mpio.paths())
            .map(|(slot, path)| {
                let c = slot.counters.values();
                PathStats {
                    path_id: slot.id,
                    name: slot.name.clone(),
                    status: path.reported_status(mpio.policy()).0,
                    reads: c.reads,
                    writes: c.writes,
                    ios: c.ios,
                    bytes_read: c.bytes_read,
                    bytes_written: c.bytes_written,
                    errors: c.errors,
                    in_flight: slot.load.requests_in_flight(),
                    in_flight_bytes: slot.load.bytes_in_flight(),
                    latency_p50_us: slot.histogram.quantile_us(0.50),
                    latency_p99_us: slot.histogram.quantile_us(0.99),
                    failovers: c.failovers,
                    timeout_ms: if self.shared.settings.adaptive_timeout {
                        slot.latency
                            .timeout(timeout_floor, self.shared.settings.io_timeout)
                            .as_millis() as u64
                    } else {
                        self.shared.settings.io_timeout.as_millis() as u64
                    },
                    latency_buckets: slot.histogram.counts().to_vec(),
                    latency_sum_us: slot.histogram.sum_us(),
                    hold_down_ms: slot
                        .hold_until_ns
                        .load(Ordering::Relaxed)
                        .saturating_sub(now_ns)
                        / 1_000_000,
                }
            })
            .collect();
        LunStats {
            paths,
            queued_ios: self.shared.no_path.queued_ios(),
            queued_bytes: self.shared.no_path.queued_bytes(),
            in_doubt_writes: self.shared.in_doubt.len() as u64,
            in_doubt_writes_total: self.shared.in_doubt.total(),
            in_doubt_answered_total: self.shared.in_doubt.answered_total(),
            in_doubt_fenced_total: self.shared.in_doubt.fenced_total(),
            in_doubt_expired_total: self.shared.in_doubt.expired_total(),
            fences_ok_total: self.shared.fences_ok.load(Ordering::Relaxed),
            fences_failed_total: self.shared.fences_failed.load(Ordering::Relaxed),
            in_doubt_oldest_ms: self
                .shared
                .in_doubt
                .oldest_since_unix_ms()
                .map_or(0, |since| {
                    crate::in_doubt::unix_ms_now().saturating_sub(since)
                }),
            in_doubt_expires_in_ms: self.shared.in_doubt.next_expiry().map(|at| {
                at.saturating_duration_since(tokio::time::Instant::now())
                    .as_millis() as u64
            }),
            all_paths_down_ms: down_now.as_millis() as u64,
            all_paths_down_ms_total: down_total.as_millis() as u64,
        }
    }

    /// The first step of a graceful stop: I/O waiting for a path fails now (it has nowhere to go), and
    /// new I/O fails with ESHUTDOWN; requests already on a path run on.
    pub fn fail_queued(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.no_path.shutdown();
    }

    /// Resolves once a stopped LUN ([`Lun::shutdown`]) has written its in-doubt journal for the last
    /// time: the runtime it lives on may end after that without losing a record.
    pub async fn closed(&self) {
        let task = self
            .shared
            .journal_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Stops the LUN: queued I/O (no path) fails now, new I/O fails with ESHUTDOWN, health and
    /// control tasks end, connections close. I/O already on a path may still complete; the daemon
    /// waits for the export to drain (bounded by `shutdown_timeout`) before calling this.
    pub fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.no_path.shutdown();
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.stop.cancel();
        for slot in self.shared.slots.iter() {
            if let Some(installed) = slot.installed.swap(None) {
                installed.connection.close();
            }
        }
    }
}

/// A LUN reserved for one Set call (see [`Lun::try_reserve_set`]); dropping it ends the reservation.
pub struct SetReservation<'a>(&'a AtomicBool);

impl Drop for SetReservation<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// IVdsHwProviderPrivateMpio::SetAllPathStatusesFromHbaPort over every LUN, all-or-nothing as to
/// validation and reservation: the status is checked, then every LUN is reserved — if another Set
/// call is running on any of them, the call fails with `VDS_E_ANOTHER_CALL_IN_PROGRESS` and changes
/// nothing anywhere — and only then is each LUN changed. Returns the HRESULT (`S_OK` or
/// `VDS_S_STATUSES_INCOMPLETELY_SET`) and each LUN's outcome, in the order of `luns`.
pub async fn set_all_path_statuses_from_hba_port(
    luns: &[Lun],
    port: HbaPortMatch,
    status: i32,
) -> Result<(lunmpio_vds::Hresult, Vec<HbaPortOutcome>), VdsError> {
    lunmpio_vds::AdminStatus::from_requested_status(status)?;
    let reservations = luns
        .iter()
        .map(Lun::try_reserve_set)
        .collect::<Result<Vec<_>, _>>()?;
    let mut outcomes = Vec::with_capacity(luns.len());
    for (lun, reservation) in luns.iter().zip(&reservations) {
        outcomes.push(
            lun.set_hba_port_statuses_reserved(reservation, port, status)
                .await?,
        );
    }
    let hresult = lunmpio_vds::aggregate_hba_outcomes(outcomes.iter().cloned())?;
    Ok((hresult, outcomes))
}

/// The VDS description of a configured path.
fn vds_path_config(p: &PathSpec) -> lunmpio_vds::PathConfig {
    let transport = match p.target.transport_name() {
        "tcp" => Transport::Tcp,
        "unix" => Transport::Unix,
        _ => Transport::File,
    };
    let endpoints = match (&p.target, p.hba_wwns) {
        (PathTarget::Nbd { endpoint, .. }, _) => match endpoint {
            lunmpio_nbd::client::Endpoint::Tcp { host, port, bind } => PathEndpoints::Network {
                target_portal_id: Guid::derive("target-portal", &format!("{host}:{port}")),
                initiator_adapter_id: Guid::derive(
                    "initiator-adapter",
                    &bind.map(|b| b.to_string()).unwrap_or_default(),
                ),
                initiator: bind
                    .map(|ip| IpAddress::from_ip(ip, 0))
                    .unwrap_or(IpAddress::EMPTY),
            },
            lunmpio_nbd::client::Endpoint::Unix { .. } => PathEndpoints::None,
        },
        (PathTarget::File(file), Some((node, port))) => {
            // One HBA port, one id: `hbaPortId` and `hbaPortProp.id` name the same object.
            let hba_port_id = Guid::derive("hba-port", &format!("{node}/{port}"));
            PathEndpoints::Hba {
                controller_port_id: Guid::derive(
                    "controller-port",
                    &file.path.display().to_string(),
                ),
                hba_port_id,
                hba_port: HbaPortProp {
                    id: hba_port_id,
                    wwn_node: node,
                    wwn_port: port,
                    port_type: HbaPortType::Unknown,
                    status: HbaPortStatus::Online,
                    port_speed: HbaPortSpeedFlags::UNKNOWN,
                    supported_port_speed: HbaPortSpeedFlags::UNKNOWN,
                },
            }
        }
        (PathTarget::File(_), None) => PathEndpoints::None,
    };
    lunmpio_vds::PathConfig {
        id: p.id,
        name: p.name.clone(),
        uri: p.uri.clone(),
        transport,
        hw_type: p.interconnect.unwrap_or(HwProviderType::Unknown),
        endpoints,
        primary: p.primary,
        weight: p.weight,
    }
}

async fn futures_join<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (i, f) in pending.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future completed"))
        .collect()
}
