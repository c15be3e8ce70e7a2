//! Live reconfiguration (`lunmpio reload`, SIGHUP): the config file read again, its difference from
//! the running config applied without pausing anything unchanged.
//!
//! - **A LUN added** starts, and its export appears.
//! - **A LUN removed**: its export goes away (new clients cannot choose it), and its connections drain
//!   as at shutdown: requests in flight finish, new ones get ESHUTDOWN, then the connections close.
//!   The LUN then stops, and its in-doubt state is journaled.
//! - **A LUN changed** (paths added or removed, settings, identity) restarts under its export:
//!   1. The export is held at a request boundary: requests already in flight finish, including
//!      any re-drive off a removed path, and new ones wait.
//!   2. Once nothing runs, the LUN stops, which journals its in-doubt writes.
//!   3. The LUN starts again from the new table. It restores the persisted policy, the
//!      administrative path states and the in-doubt ranges, as at a daemon start.
//!   4. The export is released onto it.
//!
//!   The LUN's clients see a pause (the restart, milliseconds when its paths answer), never an
//!   error. If the new LUN cannot start, the old table starts again and the reload says why.
//! - **Unchanged LUNs** are not touched.
//! - **`[daemon]` keys** (listeners, `state_dir`, threads, limits) are not applied live. The reload
//!   lists them; `lunmpio upgrade` applies them, except the listeners, which need a restart.
//!
//! A config that does not parse or validate changes nothing. The reload fails with the same
//! key-and-line message as at start. Reloads, upgrades and the stop are serialized by one lock.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use lunmpio_engine::{EventLog, Lun, LunCarry, LunOptions, LunSpec};
use lunmpio_nbd::server::Server;

use crate::config::{Config, DaemonConfig, LunTable};

/// How long a changed LUN's export may take to become quiet before the reload gives up on that LUN
/// (and leaves it as it was).
pub const QUIET_TIMEOUT_MAX: Duration = Duration::from_secs(30);

/// What a reload will do.
#[derive(Debug, Default, PartialEq)]
pub struct ReloadPlan {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// LUN name and what changed in it.
    pub changed: Vec<(String, Vec<String>)>,
    pub unchanged: Vec<String>,
    /// `[daemon]` keys whose new value needs a restart.
    pub not_applied: Vec<String>,
}

impl ReloadPlan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// The difference between the running config and a new one.
pub fn plan(current: &Config, new: &Config) -> ReloadPlan {
    let mut plan = ReloadPlan {
        not_applied: daemon_keys_changed(&current.daemon, &new.daemon),
        ..ReloadPlan::default()
    };
    for lun in &new.luns {
        match current.luns.iter().find(|l| l.name == lun.name) {
            None => plan.added.push(lun.name.clone()),
            Some(old) => {
                let what = lun_changes(old, lun);
                if what.is_empty() {
                    plan.unchanged.push(lun.name.clone());
                } else {
                    plan.changed.push((lun.name.clone(), what));
                }
            }
        }
    }
    for lun in &current.luns {
        if !new.luns.iter().any(|l| l.name == lun.name) {
            plan.removed.push(lun.name.clone());
        }
    }
    plan
}

fn daemon_keys_changed(a: &DaemonConfig, b: &DaemonConfig) -> Vec<String> {
    differing(&[
        ("nbd_listen", a.nbd_listen == b.nbd_listen),
        ("control_socket", a.control_socket == b.control_socket),
        ("metrics_listen", a.metrics_listen == b.metrics_listen),
        ("state_dir", a.state_dir == b.state_dir),
        ("shutdown_timeout", a.shutdown_timeout == b.shutdown_timeout),
        ("max_connections", a.max_connections == b.max_connections),
        ("data_threads", a.data_threads == b.data_threads),
        ("data_poll_us", a.data_poll == b.data_poll),
        // tls, tls_cert, tls_key and tls_client_ca are applied (see `Reconfigurer::apply`).
    ])
    .into_iter()
    .map(|key| format!("daemon.{key}"))
    .collect()
}

/// The keys whose values differ, from (key, same) pairs.
fn differing(keys: &[(&'static str, bool)]) -> Vec<&'static str> {
    keys.iter()
        .filter(|(_, same)| !same)
        .map(|(key, _)| *key)
        .collect()
}

/// What differs between two tables of one LUN, in words ("path p2 added", "io_timeout 5s → 2s").
fn lun_changes(old: &LunTable, new: &LunTable) -> Vec<String> {
    let (a, b) = (old.to_spec(), new.to_spec());
    let mut what = Vec::new();
    for p in &b.paths {
        match a.paths.iter().find(|q| q.name == p.name) {
            None => what.push(format!("path {} added", p.name)),
            Some(q) if format!("{q:?}") != format!("{p:?}") => {
                what.push(format!("path {} changed", p.name))
            }
            Some(_) => {}
        }
    }
    for q in &a.paths {
        if !b.paths.iter().any(|p| p.name == q.name) {
            what.push(format!("path {} removed", q.name));
        }
    }
    if a.settings != b.settings {
        what.push(settings_changes(&a, &b));
    }
    if a.source_id != b.source_id {
        what.push("id changed".into());
    }
    if (&a.size_bytes, &a.wwid, a.shared_backing) != (&b.size_bytes, &b.wwid, b.shared_backing) {
        what.push("identity (size, wwid or shared_backing) changed".into());
    }
    what
}

fn settings_changes(a: &LunSpec, b: &LunSpec) -> String {
    let (x, y) = (&a.settings, &b.settings);
    let keys = differing(&[
        ("policy", x.policy == y.policy),
        ("io_timeout", x.io_timeout == y.io_timeout),
        ("adaptive_timeout", x.adaptive_timeout == y.adaptive_timeout),
        ("check_interval", x.check_interval == y.check_interval),
        ("no_path_retry", x.no_path_retry == y.no_path_retry),
        ("failback", x.failback == y.failback),
        (
            "no_path_queue_max",
            x.no_path_queue_bytes_max == y.no_path_queue_bytes_max,
        ),
        ("in_doubt_timeout", x.in_doubt_timeout == y.in_doubt_timeout),
        ("fence_timeout", x.fence_timeout == y.fence_timeout),
        ("fence", x.fence == y.fence),
    ]);
    format!("settings changed: {}", keys.join(", "))
}

/// What a reload did, for the management call, the log and the events.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    pub unchanged: usize,
    pub not_applied: Vec<String>,
    /// LUNs whose change failed (and were left as they were), and why.
    pub failed: Vec<(String, String)>,
}

/// The daemon's record of itself (GetDaemonInfo).
#[derive(Debug, Clone)]
pub struct DaemonRecord {
    pub started_at: SystemTime,
    pub reloads: u64,
    pub last_reload_at: Option<SystemTime>,
    pub upgrades: u64,
    pub last_upgrade_at: Option<SystemTime>,
    /// Why the last upgrade failed after its handover began (the old program serves again).
    pub last_upgrade_error: Option<String>,
    pub upgrades_failed: u64,
}

impl DaemonRecord {
    pub fn new() -> DaemonRecord {
        DaemonRecord {
            started_at: SystemTime::now(),
            reloads: 0,
            last_reload_at: None,
            upgrades: 0,
            last_upgrade_at: None,
            last_upgrade_error: None,
            upgrades_failed: 0,
        }
    }
}

impl Default for DaemonRecord {
    fn default() -> Self {
        DaemonRecord::new()
    }
}

/// The running set of LUNs, read by management calls and metrics without a lock.
pub type LunSet = ArcSwap<Vec<Lun>>;

/// What starting one LUN needs.
pub struct LunStarter {
    pub state_dir: PathBuf,
    pub events: Arc<EventLog>,
    pub server: Arc<Server<Lun>>,
    /// The data threads' runtimes; a LUN goes to the one at its config position (modulo).
    pub runtimes: Vec<tokio::runtime::Handle>,
}

impl LunStarter {
    pub fn runtime(&self, position: usize) -> tokio::runtime::Handle {
        self.runtimes[position % self.runtimes.len()].clone()
    }

    /// Starts a LUN on a data thread (its tasks and path connections live there), with what an
    /// earlier run of it carried over.
    pub async fn start(
        &self,
        table: &LunTable,
        runtime: tokio::runtime::Handle,
        carry: Option<LunCarry>,
    ) -> anyhow::Result<Lun> {
        let options = LunOptions {
            state_dir: Some(self.state_dir.clone()),
            startup_timeout: None,
            carry,
        };
        let lun = runtime
            .spawn(Lun::start(
                table.to_spec(),
                options,
                Arc::clone(&self.events),
            ))
            .await
            .context("a data thread stopped while a LUN started")?
            .map_err(|e| {
                anyhow::anyhow!("LUN {:?}: {} ({})", table.name, e.message, e.hresult.name())
            })?;
        tracing::info!(
            lun = %lun.name(), paths = table.paths.len(), usable = lun.mpio().usable_path_count(),
            policy = lun.mpio().policy().config_name(), size = lun.geometry().size_bytes, "LUN started"
        );
        Ok(lun)
    }

    /// Starts a LUN and exports it (the LUN is the export's backend).
    pub async fn start_exported(
        &self,
        table: &LunTable,
        position: usize,
        carry: Option<LunCarry>,
    ) -> anyhow::Result<Lun> {
        let lun = self.start(table, self.runtime(position), carry).await?;
        if let Err(e) = self.server.add_export_on(
            lun.export_config(),
            Arc::new(lun.clone()),
            self.runtime(position),
        ) {
            stop_lun(&lun).await;
            return Err(anyhow::anyhow!("{e}"));
        }
        Ok(lun)
    }
}

/// Stops a LUN whose export no longer sends it requests: queued I/O fails, paths close, the last
/// in-doubt journal write finishes (bounded).
pub async fn stop_lun(lun: &Lun) {
    lun.fail_queued();
    lun.shutdown();
    if tokio::time::timeout(Duration::from_secs(2), lun.closed())
        .await
        .is_err()
    {
        tracing::warn!(lun = %lun.name(), "the LUN's last in-doubt journal write did not finish within 2s");
    }
}

/// Applies reloads and upgrades; holds the running config.
pub struct Reconfigurer {
    pub config_path: Option<PathBuf>,
    /// The running config. The lock also serializes reloads, upgrades and the stop.
    pub running: Arc<tokio::sync::Mutex<Config>>,
    /// The text the running config was read from: an upgrade that fails hands it back, so the old
    /// program runs exactly what it ran (whatever the file says by then).
    pub running_text: std::sync::Mutex<String>,
    pub luns: Arc<LunSet>,
    pub starter: LunStarter,
    pub record: std::sync::Mutex<DaemonRecord>,
    /// The program file an upgrade runs, and its arguments (the daemon's own command line).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Duplicates of the listeners (role, descriptor, socket file ours to remove), for a handover.
    pub listeners: std::sync::OnceLock<Vec<(String, std::os::fd::OwnedFd, bool)>>,
    /// Stops the control socket's and the metrics' accept loops.
    pub stop_services: tokio_util::sync::CancellationToken,
    /// True from the moment an upgrade holds the running config: a reload waiting for it gives up
    /// (this process is about to be replaced) instead of waiting to be cut off.
    pub upgrading: tokio::sync::watch::Sender<bool>,
}

impl Reconfigurer {
    /// Reads the config file again and applies the difference. An unreadable or invalid file
    /// changes nothing.
    pub async fn reload(&self) -> anyhow::Result<ReloadReport> {
        let path = self
            .config_path
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this daemon was not started from a config file"))?;
        let (new, text) = Config::load_text(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let report = self.apply(new).await?;
        // The text a failed upgrade's fallback runs. After a partly failed reload no text says what
        // runs; the one before it started is kept (it ran).
        if report.failed.is_empty() {
            *self.running_text.lock().unwrap_or_else(|p| p.into_inner()) = text;
        }
        Ok(report)
    }

    /// Applies a new config (checked already).
    pub async fn apply(&self, new: Config) -> anyhow::Result<ReloadReport> {
        let mut upgrading = self.upgrading.subscribe();
        let mut running = tokio::select! {
            running = self.running.lock() => running,
            _ = upgrading.wait_for(|u| *u) => anyhow::bail!(
                "an upgrade is under way; reload once it is done (`lunmpio daemon` shows it)"
            ),
        };
        let plan = plan(&running, &new);
        // TLS on the exports: the files are read again even when the keys did not change, so a
        // renewed certificate is taken; connections already running keep their session.
        match &new.daemon.tls {
            None => self.starter.server.set_tls(None),
            Some(tls) => match tls.load() {
                Ok(t) => self.starter.server.set_tls(Some(t)),
                Err(e) => anyhow::bail!("TLS on the exports: {e} (nothing was changed)"),
            },
        }
        tracing::info!(
            added = ?plan.added, removed = ?plan.removed, changed = ?plan.changed,
            not_applied = ?plan.not_applied, "reload"
        );
        let mut report = ReloadReport {
            unchanged: plan.unchanged.len(),
            not_applied: plan.not_applied.clone(),
            ..ReloadReport::default()
        };
        for name in &plan.removed {
            self.remove(name, running.daemon.shutdown_timeout).await;
            report.removed.push(name.clone());
        }
        for (name, what) in &plan.changed {
            let (old, table) = (lun_table(&running, name), lun_table(&new, name));
            let position = new.luns.iter().position(|l| l.name == *name).unwrap_or(0);
            match self.restart(old, table, position, what).await {
                Ok(()) => report.restarted.push(name.clone()),
                Err(e) => report.failed.push((name.clone(), format!("{e:#}"))),
            }
        }
        for name in &plan.added {
            let table = lun_table(&new, name);
            let position = new.luns.iter().position(|l| l.name == *name).unwrap_or(0);
            match self.starter.start_exported(table, position, None).await {
                Ok(lun) => {
                    self.starter.events.push(
                        name,
                        None,
                        None,
                        None,
                        format!("reload: LUN added ({} paths)", table.paths.len()),
                    );
                    self.set_lun(name, Some(lun));
                    report.added.push(name.clone());
                }
                Err(e) => report.failed.push((name.clone(), format!("{e:#}"))),
            }
        }
        // The running config follows what was applied: a LUN whose change failed keeps its old table.
        *running = merged(&running, &new, &report);
        let mut record = self.record.lock().unwrap_or_else(|p| p.into_inner());
        record.reloads += 1;
        record.last_reload_at = Some(SystemTime::now());
        Ok(report)
    }

    async fn remove(&self, name: &str, drain_max: Duration) {
        let lun = self.lun(name);
        if let Some(removed) = self.starter.server.remove_export(name)
            && tokio::time::timeout(drain_max, removed.closed())
                .await
                .is_err()
        {
            tracing::warn!(lun = %name, connections = removed.connections(),
                "connections of a removed LUN still open after shutdown_timeout; stopping the LUN");
        }
        if let Some(lun) = lun {
            stop_lun(&lun).await;
        }
        self.set_lun(name, None);
        self.starter
            .events
            .push(name, None, None, None, "reload: LUN removed");
    }

    /// Restarts a changed LUN under its held export (see the module doc).
    async fn restart(
        &self,
        old: &LunTable,
        table: &LunTable,
        position: usize,
        what: &[String],
    ) -> anyhow::Result<()> {
        let name = &table.name;
        let current = self
            .lun(name)
            .ok_or_else(|| anyhow::anyhow!("not running"))?;
        let hold = self
            .starter
            .server
            .hold_export(name)
            .ok_or_else(|| anyhow::anyhow!("no export"))?;
        let quiet_max = table.settings.io_timeout.max(Duration::from_secs(1)) * 2;
        let quiet_max = quiet_max.min(QUIET_TIMEOUT_MAX);
        if tokio::time::timeout(quiet_max, hold.quiet()).await.is_err() {
            anyhow::bail!(
                "{} requests still running after {quiet_max:?}; left unchanged",
                hold.running()
            );
        }
        // Counters and hold-downs go on (paths found again by id). The LUN stays on the data
        // thread of its export's connections.
        let carry = current.carry().await;
        let server = &self.starter.server;
        let runtime = server
            .export_runtime(name)
            .unwrap_or_else(|| self.starter.runtime(position));
        // Connected clients were told the export's size, flags and block sizes: those must stay.
        let told = |c: lunmpio_nbd::server::ExportConfig| (c.size, c.flags, c.block_size);
        let export = server.export_config(name).map(told);
        stop_lun(&current).await;
        let started = match self
            .starter
            .start(table, runtime.clone(), carry.clone())
            .await
        {
            Ok(lun) if Some(told(lun.export_config())) != export => {
                let now = told(lun.export_config());
                stop_lun(&lun).await;
                Err(anyhow::anyhow!(
                    "the export would change (size, flags, block sizes: {export:?} to {now:?}), \
                     which connected clients cannot follow: remove the LUN, reload, add it back \
                     and reload"
                ))
            }
            started => started,
        };
        let (lun, result) = match started {
            Ok(lun) => (lun, Ok(())),
            Err(e) => match self.starter.start(old, runtime, carry).await {
                // The old table again, as at a restart: the export must have a LUN behind it.
                Ok(again) => (
                    again,
                    Err(e.context("the new table did not start; the old one runs again")),
                ),
                Err(again) => {
                    // Nothing can serve the export: take it away, so its clients see their
                    // connections end rather than errors.
                    drop(hold);
                    let _ = server.remove_export(name);
                    self.set_lun(name, None);
                    let why = format!(
                        "the new table failed ({e:#}) and the old one did not start again \
                         ({again:#}); the LUN is removed"
                    );
                    self.starter
                        .events
                        .push(name, None, None, None, format!("reload: {why}"));
                    anyhow::bail!(why);
                }
            },
        };
        hold.replace_backend(Arc::new(lun.clone()));
        drop(hold);
        self.set_lun(name, Some(lun));
        let cause = match &result {
            Ok(()) => format!("reload: LUN restarted ({})", what.join("; ")),
            Err(e) => format!("reload: change failed, LUN runs as before: {e:#}"),
        };
        self.starter.events.push(name, None, None, None, cause);
        result
    }

    /// GetDaemonInfo's answer.
    pub fn info(&self) -> lunmpio_rpc::DaemonInfo {
        let record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let time = |t: SystemTime| humantime::format_rfc3339_millis(t).to_string();
        lunmpio_rpc::DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            program: self.program.display().to_string(),
            config: self
                .config_path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            started_at: time(record.started_at),
            upgrades: record.upgrades,
            last_upgrade_at: record.last_upgrade_at.map(time),
            last_upgrade_error: record.last_upgrade_error.clone(),
            upgrades_failed: record.upgrades_failed,
            reloads: record.reloads,
            last_reload_at: record.last_reload_at.map(time),
            luns: self.luns.load().len(),
        }
    }

    pub fn lun(&self, name: &str) -> Option<Lun> {
        self.luns.load().iter().find(|l| l.name() == name).cloned()
    }

    fn set_lun(&self, name: &str, lun: Option<Lun>) {
        let mut next: Vec<Lun> = self
            .luns
            .load()
            .iter()
            .filter(|l| l.name() != name)
            .cloned()
            .collect();
        next.extend(lun);
        self.luns.store(Arc::new(next));
    }
}

fn lun_table<'a>(config: &'a Config, name: &str) -> &'a LunTable {
    config
        .luns
        .iter()
        .find(|l| l.name == name)
        .expect("the plan names LUNs of its configs")
}

/// The config now running: the new one, except LUNs whose change failed (their old table, or none).
fn merged(old: &Config, new: &Config, report: &ReloadReport) -> Config {
    let failed = |name: &str| report.failed.iter().any(|(f, _)| f == name);
    let mut luns = Vec::with_capacity(new.luns.len());
    for lun in &new.luns {
        if !failed(&lun.name) {
            luns.push(lun.clone());
        } else if let Some(before) = old.luns.iter().find(|l| l.name == lun.name) {
            luns.push(before.clone());
        }
    }
    Config {
        daemon: old.daemon.clone(),
        luns,
    }
}

/// Reload's answer on the wire.
pub fn reload_result(report: ReloadReport) -> lunmpio_rpc::ReloadResult {
    lunmpio_rpc::ReloadResult {
        added: report.added,
        removed: report.removed,
        restarted: report.restarted,
        unchanged: report.unchanged,
        not_applied: report.not_applied,
        failed: report
            .failed
            .into_iter()
            .map(|(lun, reason)| lunmpio_rpc::ReloadFailure { lun, reason })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(luns: &str) -> Config {
        Config::parse(
            &format!("[daemon]\nnbd_listen = \"127.0.0.1:1\"\n{luns}"),
            "test.toml",
        )
        .unwrap()
    }

    const A: &str = "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"file:///a0\"\nname = \"p0\"\n";
    const B: &str = "[[lun]]\nname = \"b\"\n[[lun.path]]\nuri = \"file:///b0\"\nname = \"p0\"\n";

    #[test]
    fn luns_added_removed_changed_and_unchanged() {
        let before = config(&format!("{A}{B}"));
        let a_more = A.replace("name = \"a\"\n", "name = \"a\"\nio_timeout = \"2s\"\n")
            + "[[lun.path]]\nuri = \"file:///a1\"\nname = \"p1\"\n";
        let c = B.replace("\"b\"", "\"c\"").replace("b0", "c0");
        let after = config(&format!("{a_more}{c}"));
        let p = plan(&before, &after);
        assert_eq!(p.added, vec!["c"]);
        assert_eq!(p.removed, vec!["b"]);
        assert_eq!(p.changed.len(), 1);
        assert_eq!(p.changed[0].0, "a");
        let what = p.changed[0].1.join("; ");
        assert!(what.contains("path p1 added"), "{what}");
        assert!(what.contains("settings changed: io_timeout"), "{what}");
        assert!(p.not_applied.is_empty());
        assert!(plan(&before, &before).is_empty());
        assert_eq!(plan(&before, &before).unchanged, vec!["a", "b"]);
    }

    #[test]
    fn daemon_keys_are_listed_not_applied() {
        let before = config(A);
        let after = Config::parse(
            &format!("[daemon]\nnbd_listen = \"127.0.0.1:2\"\n{A}"),
            "test.toml",
        )
        .unwrap();
        let p = plan(&before, &after);
        assert!(p.is_empty());
        assert_eq!(p.not_applied, vec!["daemon.nbd_listen"]);
    }

    #[test]
    fn a_removed_path_is_a_change() {
        let two = format!("{A}[[lun.path]]\nuri = \"file:///a1\"\nname = \"p1\"\n");
        let p = plan(&config(&two), &config(A));
        assert_eq!(
            p.changed,
            vec![("a".to_string(), vec!["path p1 removed".to_string()])]
        );
    }
}
