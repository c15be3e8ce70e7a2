//! The in-doubt copies, kept in `state_dir` across restarts (docs/GUARANTEES.md G3, issue 10 B5).
//!
//! A daemon that restarts — crash, upgrade, reboot — must not forget that a path may still execute an
//! old copy of a write: the target does not know lunmpio restarted. So every change of the LUN's
//! [`InDoubtTable`] is written to `lun-<name>.in-doubt.json` (format in `lunmpio_vds::persist`) by one
//! task, on the blocking pool, atomically; a write whose re-drive put a copy in doubt is acknowledged
//! only once the journal holding that copy is on disk. At start the journal is read back: the copies
//! hold their ranges again (they came from an earlier connection, generation 0) until the path's fence
//! succeeds or their original `in_doubt_timeout` passes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lunmpio_vds::persist::{self, InDoubtJournal, InDoubtRecord};
use tokio::sync::Notify;

use super::{PathSlot, Shared};
use crate::events::EventLog;
use crate::in_doubt::{InDoubtTable, StaleCopy, unix_ms_now};

/// Path index of a restored copy whose path is no longer configured: nothing can fence it, so only its
/// bound releases it.
pub(crate) const PATH_GONE: usize = usize::MAX;

pub(crate) struct Journal {
    /// `None` without a `state_dir`: in memory only.
    file: Option<PathBuf>,
    /// The table version last written to disk.
    written: AtomicU64,
    written_changed: Notify,
    /// The last write problem reported, so a failing disk gives one event per new problem.
    problem: Mutex<Option<String>>,
    /// One write at a time (the writer task, or a request writing it itself during shutdown).
    writing: tokio::sync::Mutex<()>,
}

impl Journal {
    pub(crate) fn new(state_dir: Option<&Path>, lun: &str) -> Journal {
        Journal {
            file: state_dir.map(|dir| persist::in_doubt_file_path(dir, lun)),
            written: AtomicU64::new(0),
            written_changed: Notify::new(),
            problem: Mutex::new(None),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads back what an earlier run left in doubt.
    pub(crate) async fn restore(
        &self,
        lun: &str,
        slots: &[PathSlot],
        table: &InDoubtTable,
        events: &EventLog,
    ) {
        let Some(file) = self.file.clone() else {
            return;
        };
        let loaded =
            tokio::task::spawn_blocking(move || crate::state_files::load_in_doubt(&file)).await;
        let journal = match loaded {
            Ok(Ok(Some(journal))) => journal,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                // A corrupt or newer journal was already set aside by `load_in_doubt`; one that could
                // not be read at all is set aside here, so the first write of this run does not
                // replace what it may still hold.
                let file = self.file.clone().expect("checked above");
                let aside = file.with_extension(format!("unreadable-{}", unix_ms_now() / 1000));
                let kept = match std::fs::rename(&file, &aside) {
                    Ok(()) => format!("; kept as {}", aside.display()),
                    Err(_) => String::new(),
                };
                events.push(
                    lun,
                    None,
                    None,
                    None,
                    format!(
                        "in-doubt journal problem: {}{kept}; in-doubt writes of the last run are not known",
                        e.message
                    ),
                );
                return;
            }
            Err(e) => {
                events.push(
                    lun,
                    None,
                    None,
                    None,
                    format!("in-doubt journal not read: {e}"),
                );
                return;
            }
        };
        let now = tokio::time::Instant::now();
        let now_ms = unix_ms_now();
        let copies: Vec<StaleCopy> = journal
            .copies
            .iter()
            .map(|r| StaleCopy {
                id: 0,
                offset: r.offset,
                length: r.length,
                path: slots
                    .iter()
                    .position(|s| s.id.path_id == r.path_id)
                    .unwrap_or(PATH_GONE),
                path_id: r.path_id,
                generation: 0,
                since_unix_ms: r.since_unix_ms,
                expires: r
                    .expires_unix_ms
                    .map(|at| now + Duration::from_millis(at.saturating_sub(now_ms))),
                expires_unix_ms: r.expires_unix_ms,
            })
            .collect();
        let gone = copies.iter().filter(|c| c.path == PATH_GONE).count();
        let restored = table.restore(copies);
        if restored > 0 {
            let mut text = format!(
                "restored {restored} in-doubt writes from the last run: new writes to their blocks \
                 wait until the path's fence succeeds or their in_doubt_timeout passes"
            );
            if gone > 0 {
                text += &format!(
                    " ({gone} of them from paths no longer configured: only their timeout ends them)"
                );
            }
            events.push(lun, None, None, None, text);
        }
    }

    fn mark_written(&self, version: u64) {
        self.written.fetch_max(version, Ordering::AcqRel);
        self.written_changed.notify_waiters();
    }
}

/// Waits until the table version `version` (or a later one) is on disk: at once without a
/// `state_dir`. Once the LUN is stopping (the writer task has ended), writes it here and now. Returns
/// whether it is on disk (or there is no journal); a failing disk counts as written — writes must not
/// stop completing because of it, and an event says the restart guarantee is at risk.
pub(crate) async fn ensure_written(shared: &Shared, version: u64) -> bool {
    let journal = &shared.journal;
    if journal.file.is_none() {
        return true;
    }
    loop {
        let changed = journal.written_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if journal.written.load(Ordering::Acquire) >= version {
            return true;
        }
        if shared.stop.is_cancelled() {
            return write_now(shared).await >= version;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = shared.stop.cancelled() => {}
        }
    }
}

/// Writes the table to the journal whenever it changes; once more when the LUN stops.
pub(crate) async fn persist_task(shared: Arc<Shared>) {
    if shared.journal.file.is_none() {
        return;
    }
    loop {
        let changed = shared.in_doubt.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if shared.journal.written.load(Ordering::Acquire) < shared.in_doubt.version() {
            write_now(&shared).await;
        }
        tokio::select! {
            _ = &mut changed => {}
            _ = shared.stop.cancelled() => {
                write_now(&shared).await;
                return;
            }
        }
    }
}

/// Writes the current table (one writer at a time); returns the version now on disk.
async fn write_now(shared: &Shared) -> u64 {
    let Some(file) = shared.journal.file.clone() else {
        return u64::MAX;
    };
    let _one_writer = shared.journal.writing.lock().await;
    let (copies, version) = shared.in_doubt.snapshot();
    if shared.journal.written.load(Ordering::Acquire) >= version {
        return version;
    }
    let journal = InDoubtJournal::new(
        &shared.name,
        copies.iter().map(|c| record(shared, c)).collect(),
    );
    let result = tokio::task::spawn_blocking(move || write(&file, &journal)).await;
    let problem = match result {
        Ok(Ok(())) => None,
        Ok(Err(message)) => Some(message),
        Err(e) => Some(format!("the write task failed: {e}")),
    };
    report(shared, problem);
    shared.journal.mark_written(version);
    version
}

fn record(shared: &Shared, copy: &StaleCopy) -> InDoubtRecord {
    let slot = shared.slots.get(copy.path);
    InDoubtRecord {
        offset: copy.offset,
        length: copy.length,
        path_id: copy.path_id,
        path_name: slot.map(|s| s.name.clone()),
        since_unix_ms: copy.since_unix_ms,
        expires_unix_ms: copy.expires_unix_ms,
    }
}

/// Writes the journal, or removes it when nothing is in doubt.
fn write(file: &Path, journal: &InDoubtJournal) -> Result<(), String> {
    if journal.copies.is_empty() {
        return match std::fs::remove_file(file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("cannot remove {}: {e}", file.display())),
        };
    }
    crate::state_files::save_in_doubt(file, journal).map_err(|e| e.message)
}

fn report(shared: &Shared, problem: Option<String>) {
    let mut last = shared
        .journal
        .problem
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if *last == problem {
        return;
    }
    match &problem {
        Some(message) => {
            tracing::error!(lun = %shared.name, error = %message, "in-doubt journal not written");
            shared.events.push(
                &shared.name,
                None,
                None,
                None,
                format!(
                    "in-doubt writes not persisted ({message}): a restart now would forget them"
                ),
            );
        }
        None => {
            shared.events.push(
                &shared.name,
                None,
                None,
                None,
                "in-doubt journal written again",
            );
        }
    }
    *last = problem;
}
