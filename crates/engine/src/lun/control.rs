//! The LUN's control task: the one owner of the mutable VDS state ([`LunMpio`]).
//!
//! Everything that changes a path's status or the policy arrives here as a message — faults and
//! suspicions from the data path, probes and reconnections from the health tasks, management calls —
//! and is applied in order, so Set calls are serialized and never race a failover. After each change
//! the task logs an event per status transition, persists what management calls changed (before they
//! return), and publishes a new selector snapshot and a new copy of the state for Gets.

use lunmpio_human::format_duration;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lunmpio_vds::persist::{self, LunState};

use crate::state_files;
use lunmpio_vds::{
    LunMpio, OperStatus, PathStatus, StatusTransition, VdsError, status_transitions,
};
use tokio::sync::mpsc;

use super::{Admission, Control, Installed, Manage, Shared, fence, identity};
use crate::events::EventLog;
use crate::settings::Failback;
use crate::transport::{Geometry, PathConnection};

/// A path that fails this many times within [`MARGINAL_WINDOW`] is marginal: held out.
pub(crate) const MARGINAL_FAILURES: usize = 3;
pub(crate) const MARGINAL_WINDOW: Duration = Duration::from_secs(60);
/// First hold-down of a marginal path; doubles each time it is held again, up to the max.
pub(crate) const HOLD_DOWN_BASE: Duration = Duration::from_secs(8);
pub(crate) const HOLD_DOWN_MAX: Duration = Duration::from_secs(300);
/// A path without a failure for this long is forgiven its past hold-downs.
pub(crate) const HOLD_DOWN_DECAY: Duration = Duration::from_secs(600);
/// Connections of one path kept open after they left service because they still owe replies to
/// writes in doubt. Past this, the oldest is closed (its copies then wait for a fence or their bound).
const LINGERING_PER_PATH_MAX: usize = 4;
/// How long a path whose identity does not match waits before it is tried again.
const IDENTITY_RETRY: Duration = Duration::from_secs(5);

#[derive(Default)]
struct PathHealth {
    failures: VecDeque<Instant>,
    hold_until: Option<Instant>,
    hold_level: u32,
    /// The last failure: a path that has stayed healthy for [`HOLD_DOWN_DECAY`] since starts again
    /// from the first hold-down, so one bad hour does not mark a path for good.
    failure_last: Option<Instant>,
    /// Has carried I/O since start (a path's first arrival is not a failback).
    ever_online: bool,
    info: Option<Geometry>,
}

pub(super) struct ControlTask {
    shared: Arc<Shared>,
    mpio: LunMpio,
    state_file: Option<PathBuf>,
    health: Vec<PathHealth>,
    fencing: Vec<Fencing>,
}

/// Per path: connections taken out of service, and the fence.
#[derive(Default)]
struct Fencing {
    /// Highest connection generation taken out of service; copies in doubt up to it are what a fence
    /// of the path must cover. (0 covers copies restored from an earlier run.)
    retired_through: u64,
    /// Retired connections still open because they owe replies to writes in doubt.
    lingering: Vec<Arc<Installed>>,
    /// The generation a running fence covers.
    running: Option<u64>,
    /// Copies of later connections arrived while a fence ran: fence again when it ends.
    again: bool,
    /// The last `retired_through` for which "held without a fence" was said (said once per failure).
    noted: Option<u64>,
}

/// Writes the LUN's state file on a blocking thread.
async fn save_state_blocking(file: std::path::PathBuf, state: LunState) -> Result<(), VdsError> {
    tokio::task::spawn_blocking(move || state_files::save_state(&file, &state))
        .await
        .unwrap_or_else(|e| Err(VdsError::internal(format!("state file writer failed: {e}"))))
}

/// Restores what earlier Set calls persisted. A corrupt or newer file is reported and set aside by
/// `state_files::load_state`; the LUN then starts from its configuration. Runs once at start, before
/// any I/O (on a blocking thread: see `Lun::start`).
pub(super) fn restore_state(mpio: &mut LunMpio, file: &Path, events: &EventLog) {
    match state_files::load_state(file) {
        Ok(None) => {}
        Ok(Some(state)) => match persist::apply_state(mpio, &state) {
            Ok(report) => {
                let mut text = format!(
                    "restored persisted state: policy {}",
                    report.policy_applied.config_name()
                );
                if report.policy_applied != report.policy_requested {
                    text += &format!(
                        " (persisted {} is no longer possible)",
                        report.policy_requested.config_name()
                    );
                }
                for note in &report.notes {
                    text += &format!("; {note}");
                }
                events.push(mpio.name(), None, None, None, text);
            }
            Err(e) => {
                events.push(
                    mpio.name(),
                    None,
                    None,
                    None,
                    format!(
                        "persisted state not applied ({}): {}; using the configuration",
                        e.hresult.name(),
                        e.message
                    ),
                );
            }
        },
        Err(e) => {
            events.push(
                mpio.name(),
                None,
                None,
                None,
                format!("state file problem: {}", e.message),
            );
        }
    }
}

impl ControlTask {
    pub(super) fn new(
        shared: Arc<Shared>,
        mpio: LunMpio,
        state_file: Option<PathBuf>,
        carried: &super::LunCarry,
    ) -> Self {
        let now = Instant::now();
        let health = shared
            .slots
            .iter()
            .map(|slot| {
                let Some(p) = carried.paths.iter().find(|p| p.path_id == slot.id.path_id) else {
                    return PathHealth::default();
                };
                let h = p.instants(now);
                PathHealth {
                    failures: h.failures,
                    hold_until: h.hold_until,
                    hold_level: h.hold_level,
                    failure_last: h.failure_last,
                    ever_online: h.ever_online,
                    info: None,
                }
            })
            .collect();
        let fencing = (0..shared.slots.len())
            .map(|_| Fencing::default())
            .collect();
        let task = ControlTask {
            shared,
            mpio,
            state_file,
            health,
            fencing,
        };
        // Hold-downs carried over a restart show in the statistics from the start.
        for index in 0..task.health.len() {
            task.publish_hold(index);
        }
        task
    }

    /// Installs the connections of the first attempts that match the LUN's identity. A path still in
    /// a hold-down carried from an earlier run (a marginal path) waits it out, unless the LUN has
    /// no other usable path.
    pub(super) fn admit_initial(&mut self, results: Vec<Result<PathConnection, String>>) {
        let now = Instant::now();
        let mut held = Vec::new();
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Ok(connection) => {
                    let info = connection.info().clone();
                    if let Some(reason) = self.identity_mismatch(&info) {
                        connection.close();
                        self.set_oper(index, OperStatus::Failed { reason });
                        continue;
                    }
                    self.health[index].info = Some(info);
                    if self.health[index].hold_until.is_some_and(|t| t > now) {
                        held.push((index, connection));
                        continue;
                    }
                    self.health[index].ever_online = true;
                    self.install(index, connection);
                    self.set_oper(index, OperStatus::Online);
                }
                Err(cause) => self.set_oper(index, OperStatus::Failed { reason: cause }),
            }
        }
        for (index, connection) in held {
            if self.needs_marginal_path(index) {
                self.install(index, connection);
                self.set_oper(index, OperStatus::Online);
                continue;
            }
            connection.close();
            let left = self.health[index]
                .hold_until
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(now));
            let reason = format!(
                "marginal: in hold-down for {} more (carried over a restart)",
                format_duration(left)
            );
            self.set_oper(index, OperStatus::Failed { reason });
        }
        self.update_multi_path_safety();
        self.publish();
        // Copies restored from an earlier run: their paths' fences run now.
        for index in 0..self.shared.slots.len() {
            self.maybe_fence(index);
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Control>) {
        loop {
            let expiry = self.shared.in_doubt.next_expiry();
            let message = tokio::select! {
                _ = self.shared.stop.cancelled() => break,
                message = rx.recv() => message,
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)), if expiry.is_some() => {
                    self.expire_in_doubt();
                    continue;
                }
            };
            let Some(message) = message else { break };
            self.handle(message).await;
        }
        for fencing in &mut self.fencing {
            for installed in fencing.lingering.drain(..) {
                installed.connection.close();
            }
        }
        // Shutting down: answer what is still waiting, so no caller hangs.
        rx.close();
        while let Ok(message) = rx.try_recv() {
            if let Control::Manage(manage) = message {
                let gone = || {
                    VdsError::object_deleted(format!("LUN {:?} is shutting down", self.shared.name))
                };
                match manage {
                    Manage::Policy { reply, .. } | Manage::PathStatus { reply, .. } => {
                        let _ = reply.send(Err(gone()));
                    }
                    Manage::HbaPort { reply, .. } => {
                        let _ = reply.send(Err(gone()));
                    }
                    Manage::Carry { .. } => {} // dropped: the caller sees the LUN is gone
                }
            }
        }
    }

    async fn handle(&mut self, message: Control) {
        match message {
            Control::Fault {
                index,
                generation,
                cause,
            } => self.on_fault(index, generation, cause),
            Control::Suspect {
                index,
                generation,
                cause,
            } => {
                if self.is_current(index, generation) {
                    tracing::debug!(lun = %self.shared.name, path = %self.shared.slots[index].name, %cause, "path suspect; probing");
                }
            }
            Control::ProbeOk { index, generation } => {
                let slot = &self.shared.slots[index];
                if self.is_current(index, generation) && self.mpio.paths()[index].is_usable() {
                    slot.load.mark_usable();
                    self.shared.paths_changed.notify_waiters();
                }
            }
            Control::InDoubt { index, generation } => {
                if generation <= self.fencing[index].retired_through {
                    self.maybe_fence(index);
                }
            }
            Control::FenceDone {
                index,
                through_generation,
                outcome,
            } => self.on_fence_done(index, through_generation, outcome),
            Control::Connected {
                index,
                connection,
                reply,
            } => {
                let admission = self.on_connected(index, connection);
                let _ = reply.send(admission);
            }
            Control::ConnectFailed { index, cause } => {
                let held = self.health[index]
                    .hold_until
                    .is_some_and(|t| t > Instant::now());
                if !held {
                    self.set_oper(index, OperStatus::Failed { reason: cause });
                    self.publish_state_only();
                }
            }
            Control::FailbackDue { index, generation } => {
                if self.is_current(index, generation) {
                    let id = self.shared.slots[index].id;
                    if let Some(t) = self.mpio.set_failback_pending(id, false) {
                        self.log_transition(&t, "failback delay passed; back in service");
                    }
                    self.publish();
                }
            }
            // Set calls persist before they answer: on a blocking thread, awaited here.
            Control::Manage(manage) => self.on_manage(manage).await,
        }
    }

    fn is_current(&self, index: usize, generation: u64) -> bool {
        self.shared.slots[index]
            .installed
            .load()
            .as_ref()
            .is_some_and(|i| i.generation == generation)
    }

    fn on_fault(&mut self, index: usize, generation: u64, cause: String) {
        if !self.is_current(index, generation) {
            // Already handled (a second request of the same connection reporting it), or about a
            // connection since replaced. The reporter marked the slot unusable; if the path is
            // usable, a probe of the current connection puts it back in rotation.
            if self.mpio.paths()[index].is_usable() {
                self.shared.slots[index].probe_now.notify_one();
            }
            return;
        }
        let slot = &self.shared.slots[index];
        slot.load.mark_unusable();
        if let Some(installed) = slot.installed.load_full() {
            // Whatever still waits on it is re-driven now; it closes once it owes no write a reply.
            // Retired (its unflushed writes counted) *before* it is unpublished, so a FLUSH either
            // still sees it or sees those writes counted: never neither.
            self.retire(index, installed);
        }
        let slot = &self.shared.slots[index];
        slot.installed.store(None);
        let slot = &self.shared.slots[index];
        slot.changed.notify_waiters();
        let was_online = matches!(self.mpio.paths()[index].oper_status(), OperStatus::Online);
        if was_online {
            slot.counters.failovers.fetch_add(1, Ordering::Relaxed);
        }
        let reason = self.record_failure(index, &cause);
        self.set_oper(index, OperStatus::Failed { reason });
        self.publish();
        self.maybe_fence(index);
    }

    /// Takes a connection out of service. Requests waiting on it are re-driven at once; writes
    /// acknowledged on it but not flushed are counted for the next FLUSH; it stays open (lingering)
    /// while it owes replies to writes in doubt, so the target can still prove it finished them.
    fn retire(&mut self, index: usize, installed: Arc<Installed>) {
        let fencing = &mut self.fencing[index];
        fencing.retired_through = fencing.retired_through.max(installed.generation);
        let lingers = installed.abandon();
        // Its attempts look again now, each re-driven elsewhere (after the flag, see `attempt`).
        self.shared.deadlines.wake_all();
        let slot = &self.shared.slots[index];
        super::dispatch::unflushed_on_retired(
            &self.shared,
            slot,
            &installed,
            installed.unflushed(),
        );
        fencing.lingering.retain(|c| c.connection.is_open());
        if lingers {
            fencing.lingering.push(installed);
            if fencing.lingering.len() > LINGERING_PER_PATH_MAX {
                let oldest = fencing.lingering.remove(0);
                oldest.connection.close();
            }
        }
    }

    /// Runs the path's fence if copies sent on its retired connections are in doubt (and says, once
    /// per failure, that they are held when there is no fence).
    fn maybe_fence(&mut self, index: usize) {
        let through = self.fencing[index].retired_through;
        let held = self.shared.in_doubt.count_for(index, through);
        if held == 0 {
            return;
        }
        let fencing = &mut self.fencing[index];
        if let Some(running) = fencing.running {
            fencing.again |= through > running;
            return;
        }
        let slot = &self.shared.slots[index];
        let Some(command) = slot.fence.clone() else {
            if fencing.noted != Some(through) {
                fencing.noted = Some(through);
                let until = match self.shared.settings.in_doubt_timeout {
                    Some(d) => format!("in_doubt_timeout ({}) passes", format_duration(d)),
                    None => "forever (in_doubt_timeout = \"never\")".to_string(),
                };
                let text = format!(
                    "{held} writes sent on {} before it failed are in doubt (its target may still \
                     execute them): new writes to their blocks wait until it answers them or {until}; \
                     no `fence` is configured to end the doubt at once",
                    slot.name
                );
                self.path_event(index, text);
            }
            return;
        };
        fencing.running = Some(through);
        fencing.again = false;
        self.path_event(
            index,
            format!(
                "fencing {}: {held} writes in doubt; running `{}`",
                slot.name,
                fence::describe(&command)
            ),
        );
        let shared = Arc::clone(&self.shared);
        let timeout = shared.settings.fence_timeout;
        tokio::spawn(async move {
            let slot = &shared.slots[index];
            let subject = fence::Subject {
                lun: &shared.name,
                path: &slot.name,
                path_id: slot.id.path_id,
                uri: &slot.uri,
            };
            let outcome = tokio::select! {
                outcome = fence::run(&command, subject, timeout) => outcome,
                _ = shared.stop.cancelled() => return,
            };
            shared.send(Control::FenceDone {
                index,
                through_generation: through,
                outcome,
            });
        });
    }

    fn on_fence_done(&mut self, index: usize, through: u64, outcome: fence::Outcome) {
        let name = self.shared.slots[index].name.clone();
        match outcome {
            fence::Outcome::Succeeded { took } => {
                self.shared.fences_ok.fetch_add(1, Ordering::Relaxed);
                let released = self.shared.in_doubt.fenced(index, through);
                // The fenced target will never answer what it held: those connections are dead.
                let fencing = &mut self.fencing[index];
                fencing.lingering.retain(|c| {
                    let covered = c.generation <= through;
                    if covered {
                        c.connection.close();
                    }
                    !covered
                });
                self.path_event(
                    index,
                    format!(
                        "fence of {name} succeeded in {} ms: released {} in-doubt writes",
                        took.as_millis(),
                        released.len()
                    ),
                );
            }
            fence::Outcome::Failed { reason, took } => {
                self.shared.fences_failed.fetch_add(1, Ordering::Relaxed);
                let held = self.shared.in_doubt.count_for(index, through);
                tracing::warn!(lun = %self.shared.name, path = %name, %reason, "fence failed");
                self.path_event(
                    index,
                    format!(
                        "fence of {name} failed after {} ms ({reason}): {held} writes stay in doubt \
                         until answered or in_doubt_timeout",
                        took.as_millis()
                    ),
                );
            }
        }
        let fencing = &mut self.fencing[index];
        fencing.running = None;
        if std::mem::take(&mut fencing.again) {
            self.maybe_fence(index);
        }
    }

    /// The bound: copies whose `in_doubt_timeout` passed stop holding their ranges. From now on an old
    /// copy from that path *can* overwrite newer data — said loudly.
    fn expire_in_doubt(&mut self) {
        let expired = self.shared.in_doubt.expire(tokio::time::Instant::now());
        if expired.is_empty() {
            return;
        }
        let mut paths: Vec<usize> = expired.iter().map(|c| c.path).collect();
        paths.sort_unstable();
        paths.dedup();
        for index in paths {
            let count = expired.iter().filter(|c| c.path == index).count();
            let name = self.shared.slots.get(index).map_or_else(
                || "a path no longer configured".to_string(),
                |s| s.name.clone(),
            );
            let timeout = self
                .shared
                .settings
                .in_doubt_timeout
                .map_or_else(|| "?".to_string(), format_duration);
            let text = format!(
                "in_doubt_timeout ({timeout}) passed for {count} writes in doubt on {name}, which \
                 neither answered them nor was fenced: their blocks take new writes again, and a late \
                 copy from {name} could now overwrite newer data"
            );
            tracing::warn!(lun = %self.shared.name, path = %name, writes = count, "{text}");
            if index < self.shared.slots.len() {
                self.path_event(index, text);
                // Nothing waits for those connections' answers any more.
                let table = &self.shared.in_doubt;
                self.fencing[index].lingering.retain(|c| {
                    let waited_for = table.has_connection(index, c.generation);
                    if !waited_for {
                        c.connection.close();
                    }
                    waited_for
                });
            } else {
                self.shared
                    .events
                    .push(&self.shared.name, None, None, None, text);
            }
        }
    }

    /// An event about one path that is not a status change.
    /// An event of the whole LUN (no path, no status change).
    fn lun_event(&self, text: String) {
        self.shared
            .events
            .push(&self.shared.name, None, None, None, text);
    }

    fn path_event(&self, index: usize, text: String) {
        let slot = &self.shared.slots[index];
        self.shared.events.push(
            &self.shared.name,
            Some((slot.id, &slot.name)),
            None,
            None,
            text,
        );
    }

    /// Publishes the end of a path's hold-down for the statistics (`hold_until_ns`, 0: none).
    fn publish_hold(&self, index: usize) {
        let until = self.health[index]
            .hold_until
            .map_or(0, |t| self.shared.ns_at(t).max(1));
        self.shared.slots[index]
            .hold_until_ns
            .store(until, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a failure; a path failing too often is held out with an exponential hold-down.
    fn record_failure(&mut self, index: usize, cause: &str) -> String {
        let now = Instant::now();
        let h = &mut self.health[index];
        if h.failure_last
            .is_some_and(|t| now.duration_since(t) > HOLD_DOWN_DECAY)
        {
            h.hold_level = 0;
        }
        h.failure_last = Some(now);
        h.failures.push_back(now);
        while h
            .failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > MARGINAL_WINDOW)
        {
            h.failures.pop_front();
        }
        if h.failures.len() < MARGINAL_FAILURES {
            return cause.to_string();
        }
        let hold = HOLD_DOWN_BASE
            .saturating_mul(1 << h.hold_level.min(16))
            .min(HOLD_DOWN_MAX);
        h.hold_level += 1;
        h.hold_until = Some(now + hold);
        h.failures.clear();
        self.publish_hold(index);
        format!(
            "{cause}; marginal: {MARGINAL_FAILURES} failures in {}, hold-down {}",
            format_duration(MARGINAL_WINDOW),
            format_duration(hold)
        )
    }

    /// A path's health task connected it: refuse it (held down, another volume) or put it in service.
    fn on_connected(&mut self, index: usize, connection: PathConnection) -> Admission {
        let now = Instant::now();
        if self.shared.stopping.load(Ordering::Acquire) {
            connection.close();
            return Admission::RetryAfter(HOLD_DOWN_MAX);
        }
        let in_hold = self.health[index].hold_until.filter(|&until| until > now);
        if let Some(until) = in_hold
            && !self.needs_marginal_path(index)
        {
            connection.close();
            return Admission::RetryAfter((until - now).min(self.shared.settings.check_interval));
        }
        let info = connection.info().clone();
        if let Some(reason) = self.identity_mismatch(&info) {
            connection.close();
            self.refuse_other_volume(index, reason);
            return Admission::RetryAfter(IDENTITY_RETRY);
        }
        let generation = self.install(index, connection);
        let h = &mut self.health[index];
        h.info = Some(info);
        let failback = if h.ever_online && in_hold.is_none() {
            self.shared.settings.failback
        } else {
            Failback::Immediate
        };
        h.ever_online = true;
        if h.hold_until.is_some_and(|t| t <= now) {
            h.hold_until = None; // served its hold-down; the level stays, so the next one is longer
            self.publish_hold(index);
        }
        let cause = if in_hold.is_some() {
            self.start_failback(index, generation, Failback::Immediate);
            "reconnected and answering; marginal (in hold-down), but no other path is usable or every \
             usable one failed a request"
                .to_string()
        } else {
            self.start_failback(index, generation, failback)
        };
        self.set_oper_with_cause(index, OperStatus::Online, &cause);
        self.update_multi_path_safety();
        self.publish();
        Admission::Installed
    }

    /// Whether a marginal path in hold-down must come back anyway. It is held out while the LUN has
    /// another usable path, not *instead of* having a path (multipath-tools' marginal groups are a
    /// last resort too); it checks back every `check_interval`, so when the other paths go, it is
    /// there. "Usable" means usable and not under suspicion right now: a path that keeps answering
    /// EIO or timing out does not keep a healthy marginal path out, nor does a request that every
    /// usable path answered with an error.
    fn needs_marginal_path(&self, index: usize) -> bool {
        let others_usable =
            self.mpio.paths().iter().enumerate().any(|(i, p)| {
                i != index && p.is_usable() && !self.shared.slots[i].load.is_unusable()
            });
        let wanted =
            self.shared.path_wanted_until_ns.load(Ordering::Acquire) > self.shared.now_ns();
        !others_usable || wanted
    }

    /// A path that leads to another volume stays Failed with the reason; a new reason is an event
    /// even when the status does not change (it failed first, then came back as another volume).
    fn refuse_other_volume(&mut self, index: usize, reason: String) {
        let id = self.shared.slots[index].id;
        let before = self
            .mpio
            .path(id)
            .map(|p| p.reported_status(self.mpio.policy()));
        let failed = OperStatus::Failed {
            reason: reason.clone(),
        };
        match self.mpio.set_oper_status(id, failed) {
            Some(t) => self.log_transition(&t, &reason),
            None => {
                if let Some((status, old_reason)) = before
                    && old_reason != reason
                {
                    let name = self.shared.slots[index].name.clone();
                    self.shared.events.push(
                        &self.shared.name,
                        Some((id, &name)),
                        Some(status),
                        Some(status),
                        reason,
                    );
                }
            }
        }
        self.publish_state_only();
    }

    /// Puts a returning path's failback in motion (now, by hand, or after a delay: a timer that
    /// sends `FailbackDue` for this connection); the cause for its event.
    fn start_failback(&mut self, index: usize, generation: u64, failback: Failback) -> String {
        let id = self.shared.slots[index].id;
        self.mpio
            .set_failback_pending(id, failback != Failback::Immediate);
        match failback {
            Failback::Immediate => "reconnected, identity verified, probe answered".to_string(),
            Failback::Manual => {
                "reconnected and healthy; waiting for a manual reinstate (failback = manual)"
                    .to_string()
            }
            Failback::After(delay) => {
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = shared.stop.cancelled() => {}
                        _ = tokio::time::sleep(delay) => shared.send(Control::FailbackDue { index, generation }),
                    }
                });
                format!(
                    "reconnected and healthy; failback in {}",
                    format_duration(delay)
                )
            }
        }
    }

    fn install(&mut self, index: usize, connection: PathConnection) -> u64 {
        let slot = &self.shared.slots[index];
        let generation = slot.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let fresh = Arc::new(Installed::new(connection, generation));
        if let Some(old) = slot.installed.load_full() {
            self.retire(index, old);
        }
        self.shared.slots[index].installed.store(Some(fresh));
        self.shared.slots[index].changed.notify_waiters();
        // Copies the old connection still holds are fenced now (a hedged write on it, say).
        self.maybe_fence(index);
        generation
    }

    fn identity_mismatch(&self, info: &Geometry) -> Option<String> {
        identity::refusal(info, &self.shared.geometry.load())
    }

    /// The paths are safe to use together when they share a store or every path known so far
    /// advertises CAN_MULTI_CONN; if that stops holding under a multipath policy, Failover it is.
    fn update_multi_path_safety(&mut self) {
        let safe = self.shared.shared_backing
            || self
                .health
                .iter()
                .filter_map(|h| h.info.as_ref())
                .all(Geometry::can_multi_conn);
        if let Some(old) = self.mpio.set_multi_path_safe(safe) {
            self.lun_event(format!(
                    "policy {} is not safe here: a path does not advertise CAN_MULTI_CONN and shared_backing \
                     is not set; only Failover is supported (now in force)",
                    old.config_name()
                ));
        }
    }

    fn set_oper(&mut self, index: usize, oper: OperStatus) {
        let cause = match &oper {
            OperStatus::Failed { reason } => reason.clone(),
            OperStatus::Online => "connected, identity verified".to_string(),
            OperStatus::Unknown => "unknown".to_string(),
        };
        self.set_oper_with_cause(index, oper, &cause);
    }

    fn set_oper_with_cause(&mut self, index: usize, oper: OperStatus, cause: &str) {
        let id = self.shared.slots[index].id;
        if let Some(t) = self.mpio.set_oper_status(id, oper) {
            self.log_transition(&t, cause);
        }
    }

    fn log_transition(&self, t: &StatusTransition, cause: &str) {
        let name = self
            .mpio
            .path(t.path_id)
            .map(|p| p.name().to_string())
            .unwrap_or_default();
        self.shared.events.push(
            &self.shared.name,
            Some((t.path_id, &name)),
            Some(t.from),
            Some(t.to),
            cause,
        );
    }

    async fn on_manage(&mut self, manage: Manage) {
        match manage {
            Manage::Policy {
                policy,
                paths,
                reply,
            } => {
                let result = self
                    .change(|mpio| mpio.set_load_balance_policy(policy, &paths).map(|_| ()))
                    .await;
                if result.is_ok() {
                    let p = self.mpio.policy();
                    self.lun_event(format!(
                        "policy set to {} ({})",
                        p.config_name(),
                        p.vds_name()
                    ));
                }
                let _ = reply.send(result);
            }
            Manage::PathStatus {
                path,
                status,
                reply,
            } => {
                let result = self
                    .change(|mpio| {
                        mpio.set_path_admin_status(path, status)?;
                        if status == PathStatus::Online as i32 {
                            mpio.set_failback_pending(path, false); // an administrator's reinstate is the failback
                        }
                        Ok(())
                    })
                    .await;
                if result.is_ok()
                    && status == PathStatus::Online as i32
                    && let Some(index) = self.mpio.path_index(path)
                {
                    // A reinstate also forgives the path's failure history.
                    self.health[index].hold_until = None;
                    self.health[index].failures.clear();
                    self.publish_hold(index);
                    self.shared.slots[index].probe_now.notify_one();
                }
                let _ = reply.send(result);
            }
            Manage::HbaPort {
                port,
                status,
                reply,
            } => {
                let mut outcome = None;
                let result = self
                    .change(|mpio| {
                        outcome = Some(mpio.set_hba_port_statuses(&port, status)?);
                        Ok(())
                    })
                    .await;
                let _ = reply.send(result.map(|_| outcome.unwrap_or_default()));
            }
            Manage::Carry { reply } => {
                let now = Instant::now();
                let health = self
                    .health
                    .iter()
                    .map(|h| {
                        super::carry::HealthCarry::of(
                            h.hold_until,
                            h.hold_level,
                            &h.failures,
                            h.failure_last,
                            h.ever_online,
                            now,
                        )
                    })
                    .collect();
                let _ = reply.send(health);
            }
        }
    }

    /// Applies a management change all-or-nothing: on a validation error nothing changed (vds
    /// guarantees it); if the change cannot be persisted, it is rolled back and the call fails. The
    /// file is written (with its fsyncs) on a blocking thread; this task waits for it, so Set calls
    /// stay ordered and a Get never sees a change that is not on disk.
    async fn change(
        &mut self,
        apply: impl FnOnce(&mut LunMpio) -> Result<(), VdsError>,
    ) -> Result<(), VdsError> {
        let before = self.mpio.clone();
        apply(&mut self.mpio)?;
        if let Some(file) = &self.state_file
            && let Err(e) = save_state_blocking(file.clone(), LunState::capture(&self.mpio)).await
        {
            self.mpio = before;
            return Err(VdsError::internal(format!(
                "the change was not applied: cannot persist it: {}",
                e.message
            )));
        }
        for t in status_transitions(&before.get_path_info(), &self.mpio.get_path_info()) {
            let cause = if t.reason.is_empty() {
                "administrative change".to_string()
            } else {
                t.reason.clone()
            };
            self.log_transition(&t, &cause);
        }
        self.publish();
        Ok(())
    }

    /// Publishes the state for Gets and a new snapshot for the data path; starts or ends the no-path
    /// state.
    fn publish(&mut self) {
        let snapshot = self.mpio.selector_snapshot();
        let usable = !snapshot.is_empty();
        self.shared.snapshot.store(Arc::new(snapshot));
        self.shared.paths_changed.notify_waiters();
        self.publish_state_only();
        let no_path = &self.shared.no_path;
        match (usable, no_path.down_since().is_some()) {
            (true, true) => {
                let queued = no_path.queued_ios();
                self.lun_event(format!(
                    "a path is usable again; resuming {queued} queued I/O"
                ));
                no_path.path_available();
            }
            (false, false) => {
                no_path.all_paths_down();
                let how = match no_path.retry() {
                    crate::no_path::NoPathRetry::Fail => {
                        "failing I/O (no_path_retry = fail)".to_string()
                    }
                    crate::no_path::NoPathRetry::Queue => {
                        "queueing I/O until a path returns (no_path_retry = queue)".to_string()
                    }
                    crate::no_path::NoPathRetry::For(d) => {
                        format!(
                            "queueing I/O for up to {} (no_path_retry)",
                            format_duration(d)
                        )
                    }
                };
                self.lun_event(format!("all paths down; {how}"));
            }
            _ => {}
        }
    }

    fn publish_state_only(&self) {
        self.shared.published.store(Arc::new(self.mpio.clone()));
    }
}
