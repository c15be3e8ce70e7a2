//! Live upgrade: the daemon replaces its own program without closing a client connection.
//!
//! `lunmpio upgrade` (the `Upgrade` call) goes through these steps:
//! 1. **Check.** The program file the daemon was started from is run as `PROGRAM upgrade-check`.
//!    It must answer `lunmpio-handover 1 VERSION` within 5 s. A missing file, one that is not
//!    executable, or one that does not speak this handover version fails the call, and nothing
//!    changes.
//! 2. **Quiesce.** Every export is held at a request boundary, and the call waits until nothing
//!    runs: requests in flight finish, and new ones are parked. It gives up after twice the largest
//!    `io_timeout` (at least 1 s, at most 15 s); the holds are then released and the call fails. This happens with
//!    all paths down and I/O queued. The call then answers: the handover has begun.
//! 3. **Hand over.** The accept loops stop, and new clients wait in the listen backlogs. Every export
//!    connection detaches with its negotiated state and unread bytes (`nbd::server::handover`). Each
//!    LUN reports what it carries over (counters, hold-downs) and stops: its paths close and its
//!    in-doubt writes are journaled in `state_dir`. The handover document (below) is written to a
//!    memfd.
//! 4. **exec** of the program file, in place: same PID, same listeners, same connections. The new
//!    program reads the document (`LUNMPIO_HANDOVER_FD`). It starts the LUNs from the config file
//!    and `state_dir`, with what each carried. It re-exports them, takes the listeners, and only
//!    then re-attaches the connections, so client I/O resumes on paths that are connected again.
//!    Then it counts the upgrade.
//! 5. **Fallback.** If the new program fails to take over, it execs the old program, which it
//!    receives as an open descriptor, so a package that replaced the file does not matter. It hands
//!    over the same document, with the reason. The old program takes over and reports the reason as
//!    `lastUpgradeError` (GetDaemonInfo). A new program that crashes outright cannot fall back. Then
//!    socket activation and the clients' reconnect cover it, as for any crash (docs/OPERATIONS.md).
//!
//! The handover document is JSON: `{"format": "lunmpio-handover", "version": 1, ...}`. Every
//! descriptor it names is open across the exec. docs/HANDOVER.md describes each member. A program
//! refuses a version it does not know, and then falls back.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use lunmpio_engine::{Event, EventLog, LunCarry};
use lunmpio_nbd::TransmissionMode;
use lunmpio_nbd::server::{DetachedConnection, SocketKind};
use serde::{Deserialize, Serialize};

use super::activation::Inherited;
use super::reload::DaemonRecord;

pub const HANDOVER_FORMAT: &str = "lunmpio-handover";
/// The newest handover version: 2 adds `extended` to a connection (NBD extended headers).
pub const HANDOVER_VERSION: u32 = 2;
/// The versions this program reads, and may write: a document is written in the oldest version
/// that can say what it carries (version 1 while no connection uses extended headers), so an
/// older program can still take over (docs/HANDOVER.md, "Changing the format").
pub const HANDOVER_VERSIONS: [u32; 2] = [1, 2];
/// The environment variable that names the handover document's descriptor.
pub const HANDOVER_FD_ENV: &str = "LUNMPIO_HANDOVER_FD";
/// Bound on the document read at start (its connections' pending bytes are in `data_fd`).
const HANDOVER_BYTES_MAX: u64 = 256 << 20;
/// Bound on `PROGRAM upgrade-check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the wait for quiet before a handover.
/// (The check and the quiesce together stay under the management client's 30 s call timeout.)
pub const QUIESCE_TIMEOUT_MAX: Duration = Duration::from_secs(15);
/// Bound on waiting for the connections to detach: one stuck behind a client that never reads (a
/// removed export's, say) is left behind, and closes at the exec.
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// The handover document, version 1 or 2 (docs/HANDOVER.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handover {
    pub format: String,
    pub version: u32,
    /// The version of the program that wrote it.
    pub from_version: String,
    /// The program file to upgrade to next time (the one the daemon was first started from).
    pub program: PathBuf,
    /// The command line to run it with (argv after the program).
    pub args: Vec<String>,
    /// The text of the config the old program ran: a fallback runs it again. (The new program reads
    /// the config file, as a restart would.)
    pub config_text: String,
    pub record: RecordDoc,
    pub listeners: Vec<ListenerDoc>,
    pub connections: Vec<ConnectionDoc>,
    pub events: Vec<EventDoc>,
    pub next_event_seq: u64,
    pub luns: Vec<LunDoc>,
    /// The old program, open, for a takeover that fails.
    pub fallback_fd: Option<RawFd>,
    /// A memfd with the connections' pending bytes (none when no connection has any).
    pub data_fd: Option<RawFd>,
    /// Set in the document handed to the fallback: why the new program could not take over.
    pub failure: Option<String>,
    /// When the handover began (Unix ms), for the stall it caused.
    pub began_unix_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecordDoc {
    pub started_unix_ms: u64,
    pub reloads: u64,
    pub last_reload_unix_ms: Option<u64>,
    pub upgrades: u64,
    pub last_upgrade_unix_ms: Option<u64>,
    pub last_upgrade_error: Option<String>,
    pub upgrades_failed: u64,
}

/// A listening socket: `role` is `nbd`, `control` or `metrics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerDoc {
    pub role: String,
    pub fd: RawFd,
    /// The socket file is this daemon's to remove at stop (not systemd's).
    pub unlink_at_stop: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionDoc {
    pub fd: RawFd,
    /// `tcp` or `unix`.
    pub kind: String,
    pub export: String,
    pub flags: u16,
    pub structured: bool,
    /// Version 2: extended headers (then `structured` is true too). Absent in version 1.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub extended: bool,
    pub context_id: Option<u32>,
    /// The client's unhandled bytes: `pending_len` bytes at `pending_offset` in `data_fd`.
    pub pending_offset: u64,
    pub pending_len: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventDoc {
    pub seq: u64,
    pub unix_ms: u64,
    pub lun: String,
    pub path_id: Option<lunmpio_vds::PathId>,
    pub path_name: Option<String>,
    pub from: Option<i32>,
    pub to: Option<i32>,
    pub cause: String,
}

/// A LUN's carry (engine `LunCarry`, its members inline), by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LunDoc {
    pub name: String,
    #[serde(flatten)]
    pub carry: LunCarry,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bounded to year 9999, what RFC 3339 can say (a corrupt document must not break GetDaemonInfo).
fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.min(253_402_300_799_000))
}

impl RecordDoc {
    pub fn of(r: &DaemonRecord) -> RecordDoc {
        RecordDoc {
            started_unix_ms: unix_ms(r.started_at),
            reloads: r.reloads,
            last_reload_unix_ms: r.last_reload_at.map(unix_ms),
            upgrades: r.upgrades,
            last_upgrade_unix_ms: r.last_upgrade_at.map(unix_ms),
            last_upgrade_error: r.last_upgrade_error.clone(),
            upgrades_failed: r.upgrades_failed,
        }
    }

    pub fn to_record(&self) -> DaemonRecord {
        DaemonRecord {
            started_at: from_unix_ms(self.started_unix_ms),
            reloads: self.reloads,
            last_reload_at: self.last_reload_unix_ms.map(from_unix_ms),
            upgrades: self.upgrades,
            last_upgrade_at: self.last_upgrade_unix_ms.map(from_unix_ms),
            last_upgrade_error: self.last_upgrade_error.clone(),
            upgrades_failed: self.upgrades_failed,
        }
    }
}

pub fn event_docs(log: &EventLog) -> (Vec<EventDoc>, u64) {
    let (events, next) = log.export();
    let docs = events
        .into_iter()
        .map(|e| EventDoc {
            seq: e.seq,
            unix_ms: unix_ms(e.time),
            lun: e.lun,
            path_id: e.path_id,
            path_name: e.path_name,
            from: e.from.map(i32::from),
            to: e.to.map(i32::from),
            cause: e.cause,
        })
        .collect();
    (docs, next)
}

pub fn lun_doc(name: &str, carry: LunCarry) -> LunDoc {
    LunDoc {
        name: name.to_string(),
        carry,
    }
}

/// A connection's entry; its pending bytes are appended to `data` (written to `data_fd`).
pub fn connection_doc(c: DetachedConnection, data: &mut Vec<u8>) -> (ConnectionDoc, OwnedFd) {
    let pending_offset = data.len() as u64;
    data.extend_from_slice(&c.pending);
    let doc = ConnectionDoc {
        fd: c.socket.as_raw_fd(),
        kind: match c.kind {
            SocketKind::Tcp => "tcp".into(),
            SocketKind::Unix => "unix".into(),
        },
        export: c.export,
        flags: c.flags,
        structured: c.mode.chunked(),
        extended: c.mode.extended(),
        context_id: c.context_id,
        pending_offset,
        pending_len: c.pending.len() as u64,
    };
    (doc, c.socket)
}

// -------------------------------------------------------------------------------------------------
// The program check

/// What `PROGRAM upgrade-check` prints: the handover versions it reads, and its own version.
pub fn check_line() -> String {
    let versions: Vec<String> = HANDOVER_VERSIONS.iter().map(u32::to_string).collect();
    format!(
        "{HANDOVER_FORMAT} {} {}",
        versions.join(" "),
        env!("CARGO_PKG_VERSION")
    )
}

/// Runs `program upgrade-check`; its version if it reads a handover version this program writes. (A
/// document in a version it then does not read comes back: the fallback.)
pub async fn check_program(program: &Path) -> anyhow::Result<String> {
    let meta =
        std::fs::metadata(program).with_context(|| format!("program {}", program.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        anyhow::ensure!(
            meta.is_file() && meta.permissions().mode() & 0o111 != 0,
            "program {} is not an executable file",
            program.display()
        );
    }
    let run = tokio::process::Command::new(program)
        .arg("upgrade-check")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CHECK_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "`{} upgrade-check` did not answer within {CHECK_TIMEOUT:?}",
                program.display()
            )
        })?
        .with_context(|| format!("cannot run {}", program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim();
    // `lunmpio-handover V1 [V2 …] VERSION`: the versions it reads, then its own version.
    let words: Vec<&str> = line.split_whitespace().collect();
    let reads_ours = words.len() >= 3
        && words[0] == HANDOVER_FORMAT
        && HANDOVER_VERSIONS
            .iter()
            .any(|v| words[1..words.len() - 1].contains(&v.to_string().as_str()));
    anyhow::ensure!(
        out.status.success() && reads_ours,
        "{} does not take over a lunmpio daemon (handover version {HANDOVER_VERSION}): \
         `upgrade-check` said {:?}, exit {}",
        program.display(),
        line,
        out.status
    );
    Ok(words[words.len() - 1].to_string())
}

// -------------------------------------------------------------------------------------------------
// Writing, and exec

/// A memfd holding `bytes` (close-on-exec until [`keep_across_exec`]).
pub fn memfd_with(name: &std::ffi::CStr, bytes: &[u8]) -> anyhow::Result<OwnedFd> {
    // SAFETY: memfd_create with a valid C string; the result is a new descriptor we own, or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    anyhow::ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned here.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(owned.try_clone()?);
    file.write_all(bytes)?;
    file.flush()?;
    Ok(owned)
}

/// Lets a descriptor survive exec.
fn keep_across_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_SETFD on a descriptor we hold; fails cleanly on a bad one.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The old program as an open descriptor (survives exec): `/proc/self/exe`, even if the file was
/// replaced or removed since.
pub fn open_self() -> std::io::Result<OwnedFd> {
    let file = std::fs::File::open("/proc/self/exe")?;
    let fd = OwnedFd::from(file);
    keep_across_exec(fd.as_raw_fd())?;
    Ok(fd)
}

/// Replaces this process with `program` (a path, or `/proc/self/fd/N`), handing it `doc`. Returns
/// only if exec failed.
pub fn exec_with(program: &Path, doc: &Handover, keep: &[RawFd]) -> anyhow::Error {
    match serde_json::to_vec(doc) {
        Ok(bytes) => exec_bytes(program, &doc.args, &bytes, keep),
        Err(e) => anyhow::anyhow!("cannot write the handover document: {e}"),
    }
}

/// [`exec_with`] for a document already serialized (a refused one handed back as it came).
fn exec_bytes(program: &Path, args: &[String], bytes: &[u8], keep: &[RawFd]) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let document = match memfd_with(c"lunmpio-handover", bytes) {
        Ok(fd) => fd,
        Err(e) => return e.context("cannot write the handover document"),
    };
    for &fd in keep.iter().chain([document.as_raw_fd()].iter()) {
        if let Err(e) = keep_across_exec(fd) {
            return anyhow::anyhow!("descriptor {fd}: {e}");
        }
    }
    // SIGHUP, SIGTERM and SIGINT wait (blocked, the mask survives exec) until the next program has
    // its handlers: one arriving in between would otherwise end the process.
    let signals = stop_signals();
    let _ = signals.thread_block();
    let error = std::process::Command::new(program)
        .args(args)
        .env(HANDOVER_FD_ENV, document.as_raw_fd().to_string())
        .exec();
    let _ = signals.thread_unblock();
    anyhow::anyhow!("exec {}: {error}", program.display())
}

fn stop_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    set
}

/// Lets the signals an upgrade blocked across its exec through, once their handlers are installed
/// (a no-op on a normal start).
pub fn unblock_stop_signals() {
    let _ = stop_signals().thread_unblock();
}

/// Every descriptor a document names (they must survive exec).
pub fn descriptors(doc: &Handover) -> Vec<RawFd> {
    doc.listeners
        .iter()
        .map(|l| l.fd)
        .chain(doc.connections.iter().map(|c| c.fd))
        .chain(doc.fallback_fd)
        .chain(doc.data_fd)
        .collect()
}

/// The takeover failed: exec the old program (the fallback descriptor) with the same document and
/// the reason, so it takes over again. Returns only if that is impossible.
pub fn fall_back(mut doc: Handover, reason: String) -> anyhow::Error {
    let Some(fallback) = doc.fallback_fd.take() else {
        return anyhow::anyhow!(
            "the takeover failed and there is no program to fall back to: {reason}"
        );
    };
    if doc.failure.is_some() {
        return anyhow::anyhow!("the fallback failed to take over too: {reason}");
    }
    tracing::error!("upgrade: cannot take over ({reason}); handing back to the old program");
    doc.failure = Some(reason);
    let mut keep = descriptors(&doc);
    keep.push(fallback);
    exec_with(Path::new(&format!("/proc/self/fd/{fallback}")), &doc, &keep)
}

// -------------------------------------------------------------------------------------------------
// Reading, in the new program

/// A handover received at start.
#[derive(Debug)]
pub struct Incoming {
    /// As received (for a fallback): its descriptors stay open, untouched, until [`Incoming::commit`].
    pub doc: Handover,
}

impl Incoming {
    /// Reads the document named by `LUNMPIO_HANDOVER_FD` and removes the variable. Call before any
    /// other thread exists. `None`: a normal start.
    pub fn take_from_env() -> anyhow::Result<Option<Incoming>> {
        let Some(value) = std::env::var_os(HANDOVER_FD_ENV) else {
            return Ok(None);
        };
        // SAFETY: called from `main` before the runtime starts, while this is the only thread.
        unsafe { std::env::remove_var(HANDOVER_FD_ENV) };
        let fd: RawFd = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| anyhow::anyhow!("{HANDOVER_FD_ENV}={value:?} is not a descriptor"))?;
        // SAFETY: the descriptor was handed to us by the program that exec'd us; owned from here.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.rewind().context("handover document")?;
        let mut text = Vec::new();
        file.take(HANDOVER_BYTES_MAX + 1)
            .read_to_end(&mut text)
            .context("handover document")?;
        anyhow::ensure!(
            text.len() as u64 <= HANDOVER_BYTES_MAX,
            "handover document larger than {HANDOVER_BYTES_MAX} bytes"
        );
        match Incoming::parse(&text) {
            Ok(doc) => Ok(Some(Incoming { doc })),
            // A document this program refuses goes back, as it came, to the program that wrote it.
            Err(e) => Err(refuse(&text, format!("{e:#}"))),
        }
    }

    fn parse(text: &[u8]) -> anyhow::Result<Handover> {
        let doc: Handover = serde_json::from_slice(text).context("handover document")?;
        anyhow::ensure!(
            doc.format == HANDOVER_FORMAT && HANDOVER_VERSIONS.contains(&doc.version),
            "handover document {:?} version {} (this program reads {HANDOVER_FORMAT} versions \
             {HANDOVER_VERSIONS:?})",
            doc.format,
            doc.version
        );
        for fd in descriptors(&doc) {
            // SAFETY: F_GETFD only reads the flags of a descriptor number.
            let open = fd > 2 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
            anyhow::ensure!(
                open,
                "handover document names descriptor {fd}, which is not open"
            );
        }
        for c in &doc.connections {
            anyhow::ensure!(
                c.pending_len <= PENDING_BYTES_MAX && (c.pending_len == 0 || doc.data_fd.is_some()),
                "connection {}: {} pending bytes without data",
                c.fd,
                c.pending_len
            );
        }
        Ok(doc)
    }

    /// The listeners, as duplicates named by role (the originals stay for a fallback).
    pub fn listeners(&self) -> anyhow::Result<Inherited> {
        let mut fds = Vec::with_capacity(self.doc.listeners.len());
        for l in &self.doc.listeners {
            fds.push((duplicate(l.fd)?, Some(l.role.clone())));
        }
        Ok(Inherited::from_fds(fds))
    }

    /// Whether this daemon removes the socket file of `role` at stop.
    pub fn unlink_at_stop(&self, role: &str) -> Option<bool> {
        self.doc
            .listeners
            .iter()
            .find(|l| l.role == role)
            .map(|l| l.unlink_at_stop)
    }

    pub fn events(&self) -> EventLog {
        let events = self
            .doc
            .events
            .iter()
            .map(|e| Event {
                seq: e.seq,
                time: from_unix_ms(e.unix_ms),
                lun: e.lun.clone(),
                path_id: e.path_id,
                path_name: e.path_name.clone(),
                from: e
                    .from
                    .and_then(|v| lunmpio_vds::PathStatus::try_from(v).ok()),
                to: e.to.and_then(|v| lunmpio_vds::PathStatus::try_from(v).ok()),
                cause: e.cause.clone(),
            })
            .collect();
        EventLog::restored(events, self.doc.next_event_seq)
    }

    pub fn carry(&self, lun: &str) -> Option<LunCarry> {
        let l = self.doc.luns.iter().find(|l| l.name == lun)?;
        Some(l.carry.clone())
    }

    /// The record as the old program left it (the outcome is counted at [`Incoming::commit`]).
    pub fn record(&self) -> DaemonRecord {
        self.doc.record.to_record()
    }

    /// The connections, as duplicates (the originals stay for a fallback).
    pub fn connections(&self) -> anyhow::Result<Vec<DetachedConnection>> {
        self.doc
            .connections
            .iter()
            .map(|c| {
                let kind = match c.kind.as_str() {
                    "tcp" => SocketKind::Tcp,
                    "unix" => SocketKind::Unix,
                    other => anyhow::bail!("connection kind {other:?}"),
                };
                Ok(DetachedConnection {
                    socket: duplicate(c.fd)?,
                    kind,
                    export: c.export.clone(),
                    flags: c.flags,
                    mode: match (c.extended, c.structured) {
                        (true, _) => TransmissionMode::Extended,
                        (false, true) => TransmissionMode::Structured,
                        (false, false) => TransmissionMode::Simple,
                    },
                    context_id: c.context_id,
                    pending: self.pending(c)?,
                })
            })
            .collect()
    }

    /// The takeover succeeded: counts it in `record` (one more upgrade, or the reason the new
    /// program failed when this is the fallback), and closes the originals of every handed-over
    /// descriptor (the duplicates serve) and the fallback program.
    pub fn commit(self, record: &std::sync::Mutex<DaemonRecord>) {
        {
            let mut record = record.lock().unwrap_or_else(|p| p.into_inner());
            match &self.doc.failure {
                None => {
                    record.upgrades += 1;
                    record.last_upgrade_at = Some(SystemTime::now());
                    record.last_upgrade_error = None;
                }
                Some(reason) => {
                    record.last_upgrade_error = Some(reason.clone());
                    record.upgrades_failed += 1;
                }
            }
        }
        for fd in descriptors(&self.doc) {
            // SAFETY: handed to us by the document, not used by anything else here (we work on dups).
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let stall = unix_ms(SystemTime::now()).saturating_sub(self.doc.began_unix_ms);
        match &self.doc.failure {
            None => tracing::info!(
                from = %self.doc.from_version, to = env!("CARGO_PKG_VERSION"),
                connections = self.doc.connections.len(), handover_ms = stall, "upgrade: took over"
            ),
            Some(reason) => tracing::error!(
                handover_ms = stall,
                "upgrade failed, the old program serves again: {reason}"
            ),
        }
    }
}

/// Bound on one connection's pending bytes: a parked request (at most one, and at most
/// `MAX_PAYLOAD_BYTES` of payload) and what its read buffer held.
const PENDING_BYTES_MAX: u64 = 2 * lunmpio_nbd::MAX_PAYLOAD_BYTES as u64;

impl Incoming {
    fn pending(&self, c: &ConnectionDoc) -> anyhow::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut bytes = vec![0; c.pending_len as usize];
        if let (Some(fd), true) = (self.doc.data_fd, !bytes.is_empty()) {
            let file = std::fs::File::from(duplicate(fd)?);
            file.read_exact_at(&mut bytes, c.pending_offset)
                .with_context(|| format!("connection {}: its pending bytes", c.fd))?;
        }
        Ok(bytes)
    }
}

/// A handover document this program cannot take: hand it back to the old program (its
/// `fallback_fd`, read without assuming this program's idea of the format), with the reason.
/// Returns only if that is impossible.
fn refuse(text: &[u8], reason: String) -> anyhow::Error {
    match handback(text, &reason) {
        // The document's other descriptors were inherited without close-on-exec and are untouched.
        Ok((fallback, args, bytes)) => exec_bytes(
            Path::new(&format!("/proc/self/fd/{fallback}")),
            &args,
            &bytes,
            &[],
        ),
        Err(e) => anyhow::anyhow!("{reason}; {e}"),
    }
}

/// The refused document as it goes back: where (the fallback descriptor), with which arguments, and
/// the same document with `failure` set (nothing else changed: the old program wrote it, so it
/// reads it).
fn handback(text: &[u8], reason: &str) -> anyhow::Result<(RawFd, Vec<String>, Vec<u8>)> {
    let mut value: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| anyhow::anyhow!("not JSON ({e}): no way back"))?;
    let fallback = value["fallback_fd"]
        .as_i64()
        .filter(|fd| (3..=i64::from(i32::MAX)).contains(fd))
        .ok_or_else(|| anyhow::anyhow!("no program to hand it back to"))?;
    anyhow::ensure!(
        value["failure"].is_null(),
        "it was handed back already: no way back"
    );
    let args = value["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    value["failure"] =
        serde_json::Value::String(format!("the new program refused the handover: {reason}"));
    Ok((fallback as RawFd, args, serde_json::to_vec(&value)?))
}

/// A CLOEXEC duplicate of a handed-over descriptor.
fn duplicate(fd: RawFd) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    anyhow::ensure!(
        copy >= 0,
        "handed-over descriptor {fd}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: just created.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

// -------------------------------------------------------------------------------------------------
// The old program's side

tokio::task_local! {
    /// The upgrade a control connection's Upgrade call prepared, handed over once that connection
    /// has written the answer (and only by that connection).
    pub static PREPARED: std::cell::RefCell<Option<Pending>>;
}

/// An upgrade between its answer and its handover: every export held and quiet, reloads locked out.
pub struct Pending {
    _holds: Vec<lunmpio_nbd::server::ExportHold<lunmpio_engine::Lun>>,
    _running: tokio::sync::OwnedMutexGuard<crate::config::Config>,
    began: SystemTime,
}

impl super::reload::Reconfigurer {
    /// Steps 1 and 2 (module doc): checks the program and quiesces every export. On an error nothing
    /// has changed. On success the handover waits in `pending` for [`Self::run_pending_upgrade`].
    pub async fn prepare_upgrade(&self) -> anyhow::Result<lunmpio_rpc::UpgradeStarted> {
        anyhow::ensure!(
            self.config_path.is_some(),
            "this daemon was not started by `lunmpio serve --config FILE`: it cannot run a new program"
        );
        let running = std::sync::Arc::clone(&self.running).lock_owned().await;
        let to_version = check_program(&self.program).await?;
        // From here a reload waiting for the lock gives up (cleared again if this fails).
        self.upgrading.send_replace(true);
        let result = self.quiesce(running, to_version).await;
        if result.is_err() {
            self.upgrading.send_replace(false);
        }
        result
    }

    async fn quiesce(
        &self,
        running: tokio::sync::OwnedMutexGuard<crate::config::Config>,
        to_version: String,
    ) -> anyhow::Result<lunmpio_rpc::UpgradeStarted> {
        let began = SystemTime::now();
        let quiesce_started = std::time::Instant::now();
        let luns = self.luns.load_full();
        let holds: Vec<_> = luns
            .iter()
            .filter_map(|l| self.starter.server.hold_export(l.name()))
            .collect();
        let io_timeout_max = running
            .luns
            .iter()
            .map(|l| l.settings.io_timeout)
            .max()
            .unwrap_or(Duration::from_secs(5));
        let quiesce_max = (io_timeout_max * 2).clamp(Duration::from_secs(1), QUIESCE_TIMEOUT_MAX);
        let quiet = async {
            for hold in &holds {
                hold.quiet().await;
            }
        };
        if tokio::time::timeout(quiesce_max, quiet).await.is_err() {
            let still: usize = holds.iter().map(|h| h.running()).sum();
            drop(holds); // released: I/O goes on as before
            anyhow::bail!(
                "{still} requests still running after {quiesce_max:?} (are all paths of a LUN down \
                 with I/O queued?); nothing changed, the daemon serves on"
            );
        }
        let record = self
            .record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let started = lunmpio_rpc::UpgradeStarted {
            program: self.program.display().to_string(),
            to_version,
            from_version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            upgrades: record.upgrades,
            upgrades_failed: record.upgrades_failed,
            connections: self.starter.server.connections(),
            quiesce_ms: quiesce_started.elapsed().as_millis() as u64,
        };
        let pending = Pending {
            _holds: holds,
            _running: running,
            began,
        };
        // Kept by the calling connection (dropped, with its holds, if it has no place for it).
        let kept = PREPARED.try_with(|slot| slot.borrow_mut().replace(pending).is_none());
        anyhow::ensure!(
            kept == Ok(true),
            "an upgrade can only be asked for over the control socket"
        );
        tracing::info!(program = %self.program.display(), to = %started.to_version,
            connections = started.connections, quiesce_ms = started.quiesce_ms, "upgrade: quiet, handing over");
        Ok(started)
    }

    /// Steps 3 to 5, once the Upgrade call is answered (or its answer could not be written: the
    /// exports are held either way, and going on is the only way to release them). Never returns
    /// when the exec works; on any failure past the point of no return, the old program takes over
    /// its own handover.
    pub async fn run_pending_upgrade(&self, pending: Pending) {
        let error = self.hand_over(pending).await;
        // Nothing is left to serve from in this process: a daemon that cannot exec at all exits, and
        // systemd restarts it (the listeners and clients' reconnects cover that as a crash).
        tracing::error!("upgrade: handover impossible, exiting: {error:#}");
        std::process::exit(70);
    }

    async fn hand_over(&self, pending: Pending) -> anyhow::Error {
        let server = &self.starter.server;
        server.stop_accepting();
        self.stop_services.cancel();
        let detached = server.detach_all(DETACH_WAIT).await;
        let mut luns = Vec::new();
        for lun in self.luns.load().iter() {
            if let Some(carry) = lun.carry().await {
                luns.push(lun_doc(lun.name(), carry));
            }
            super::reload::stop_lun(lun).await;
        }
        let (events, next_event_seq) = event_docs(&self.starter.events);
        let record = RecordDoc::of(&self.record.lock().unwrap_or_else(|p| p.into_inner()));
        let mut data = Vec::new();
        let (connections, sockets): (Vec<_>, Vec<_>) = detached
            .into_iter()
            .map(|c| connection_doc(c, &mut data))
            .unzip();
        let data_fd = if data.is_empty() {
            None
        } else {
            match memfd_with(c"lunmpio-handover-data", &data) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    // Past the point of no return, and handing the connections over without their
                    // unread bytes would lose requests: the daemon exits (the clients see their
                    // connections close, and systemd restarts it).
                    tracing::error!("upgrade: cannot keep the connections' pending bytes: {e:#}");
                    return e;
                }
            }
        };
        let listeners = self
            .listeners
            .get()
            .map(|l| {
                l.iter()
                    .map(|(role, fd, unlink)| ListenerDoc {
                        role: role.clone(),
                        fd: fd.as_raw_fd(),
                        unlink_at_stop: *unlink,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let fallback = match open_self() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("upgrade: cannot keep the old program for a fallback: {e}");
                None
            }
        };
        let doc = Handover {
            format: HANDOVER_FORMAT.into(),
            version: if connections.iter().any(|c: &ConnectionDoc| c.extended) {
                HANDOVER_VERSION
            } else {
                HANDOVER_VERSIONS[0]
            },
            from_version: env!("CARGO_PKG_VERSION").into(),
            program: self.program.clone(),
            args: self.args.clone(),
            config_text: self
                .running_text
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            record,
            listeners,
            connections,
            events,
            next_event_seq,
            luns,
            fallback_fd: fallback.as_ref().map(|f| f.as_raw_fd()),
            data_fd: data_fd.as_ref().map(|f| f.as_raw_fd()),
            failure: None,
            began_unix_ms: unix_ms(pending.began),
        };
        tracing::info!(program = %self.program.display(), connections = doc.connections.len(), "upgrade: exec");
        let keep = descriptors(&doc);
        let exec_error = exec_with(&self.program, &doc, &keep);
        // exec failed (the file went away after the check, say): the old program takes over.
        let error = fall_back(doc, format!("{exec_error:#}"));
        drop((sockets, fallback, data_fd, pending));
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_document_goes_back_as_it_came_with_the_reason() {
        let doc = serde_json::json!({
            "format": "lunmpio-handover", "version": 7, "fallback_fd": 9,
            "args": ["serve", "--config", "c.toml"], "failure": null, "future": {"x": 1}
        });
        let text = serde_json::to_vec(&doc).unwrap();
        let (fd, args, bytes) = handback(&text, "version 7 unknown").unwrap();
        assert_eq!(fd, 9);
        assert_eq!(args, ["serve", "--config", "c.toml"]);
        let back: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back["version"], 7, "unchanged: the old program wrote it");
        assert_eq!(back["future"], doc["future"]);
        assert!(
            back["failure"]
                .as_str()
                .unwrap()
                .contains("version 7 unknown")
        );
        // Handed back once only, and only to a real descriptor.
        assert!(handback(&bytes, "again").is_err());
        let no_fallback = serde_json::json!({"version": 7, "failure": null});
        assert!(handback(&serde_json::to_vec(&no_fallback).unwrap(), "x").is_err());
        assert!(handback(b"not json", "x").is_err());
    }

    #[test]
    fn the_check_line_names_the_format_and_version() {
        let line = check_line();
        assert!(line.starts_with("lunmpio-handover 1 "), "{line}");
    }
}
