//! `lunmpio serve --config FILE`: the multipath daemon, in the foreground.
//!
//! Start-up: read and check the configuration (a bad one stops here, naming the key and line);
//! start every LUN (connect its paths, settle its identity, restore persisted policy); export each
//! LUN over NBD under its name; open the control socket (0600) and the metrics endpoint.
//! SIGTERM/SIGINT: stop taking new requests, fail I/O queued for lack of a path, let requests on
//! live paths finish — all within `shutdown_timeout` — then close the paths and exit.

pub mod activation;
pub mod control_socket;
pub mod data_threads;
pub mod fds;
pub mod metrics;
pub mod reload;
pub mod upgrade;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lunmpio_engine::{EventLog, Lun};
use lunmpio_nbd::server::{Server, ServerOptions};

use crate::config::{Config, DaemonConfig, ListenAddr};
use data_threads::DataThreads;
use reload::Reconfigurer;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The TOML configuration (see docs/OPERATIONS.md for every key).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Exit bound after the drain: closing paths and tasks takes no longer than this.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How a daemon starts, besides its config.
#[derive(Debug, Default)]
pub struct StartOptions {
    /// Listeners handed over by systemd (socket activation).
    pub inherited: activation::Inherited,
    /// The file the config came from: `reload` reads it again.
    pub config_path: Option<PathBuf>,
    /// A live upgrade's handover (the new program's side): listeners, connections and LUN state.
    pub handover: Option<upgrade::Incoming>,
    /// The text `config` was parsed from (carried by an upgrade); empty when unknown.
    pub config_text: String,
}

/// A running daemon (in this process). Call [`Daemon::stop`] to stop it gracefully; dropping it ends
/// its data threads at once (no drain, the LUNs' I/O in flight is dropped).
pub struct Daemon {
    daemon_config: DaemonConfig,
    control_path: PathBuf,
    unlink_at_stop: UnlinkAtStop,
    server: Arc<Server<Lun>>,
    reconfig: Arc<Reconfigurer>,
    data_threads: DataThreads,
    events: Arc<EventLog>,
    stop: tokio_util::sync::CancellationToken,
    serving: tokio::task::JoinHandle<std::io::Result<()>>,
    nbd_address: Option<std::net::SocketAddr>,
    metrics_address: Option<std::net::SocketAddr>,
}

impl Daemon {
    /// Starts every LUN, the NBD exports, the control socket and the metrics endpoint; returns once
    /// all of them accept connections.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        Daemon::start_with(config, StartOptions::default()).await
    }

    /// [`Daemon::start`] with options: listeners handed over by systemd are used instead of binding,
    /// and left in place at stop (they belong to systemd).
    pub async fn start_with(config: Config, options: StartOptions) -> anyhow::Result<Daemon> {
        let handover = options.handover;
        // Everything that can fail about the handed-over connections, before anything serves.
        let handed_over = match &handover {
            Some(h) => h.connections()?,
            None => Vec::new(),
        };
        let inherited = match &handover {
            Some(h) => h.listeners()?,
            None => options.inherited,
        };
        let mut activated = activation::assign(inherited, &config)?;
        // Sockets from systemd are systemd's: never unlinked here, so they outlive this process.
        // After an upgrade, whoever bound them first decided.
        let unlink = |role: &str, bound_here: bool| {
            handover
                .as_ref()
                .and_then(|h| h.unlink_at_stop(role))
                .unwrap_or(bound_here)
        };
        let unlink_at_stop = UnlinkAtStop {
            control_socket: unlink("control", activated.control.is_none()),
            nbd_socket: unlink("nbd", activated.nbd.is_none()),
        };
        let events = Arc::new(match &handover {
            Some(h) => h.events(),
            None => EventLog::new(),
        });
        std::fs::create_dir_all(&config.daemon.state_dir)
            .with_context(|| format!("state_dir {}", config.daemon.state_dir.display()))?;
        let paths: usize = config.luns.iter().map(|l| l.paths.len()).sum();
        let (max_connections, lowered) = fds::connections_within_limit(
            config.daemon.max_connections,
            paths,
            fds::raise_open_file_limit(),
        );
        if let Some(why) = lowered {
            tracing::warn!("{why}");
        }
        let server = Arc::new(Server::new(ServerOptions {
            max_connections,
            ..ServerOptions::default()
        }));
        if let Some(tls) = &config.daemon.tls {
            server.set_tls(Some(tls.load().context("TLS on the exports")?));
        }
        let data_threads = DataThreads::start(
            data_threads::thread_count(config.daemon.data_threads, config.luns.len()),
            config.daemon.data_poll,
        )
        .context("cannot start the data threads")?;
        let starter = reload::LunStarter {
            state_dir: config.daemon.state_dir.clone(),
            events: Arc::clone(&events),
            server: Arc::clone(&server),
            runtimes: data_threads.handles(),
        };
        let mut luns = Vec::with_capacity(config.luns.len());
        for (i, lun_config) in config.luns.iter().enumerate() {
            let carry = handover.as_ref().and_then(|h| h.carry(&lun_config.name));
            luns.push(starter.start_exported(lun_config, i, carry).await?);
        }
        let lun_count = luns.len();
        let stop = tokio_util::sync::CancellationToken::new();
        let (program, args) = match &handover {
            Some(h) => (h.doc.program.clone(), h.doc.args.clone()),
            None => (
                std::env::current_exe().unwrap_or_default(),
                std::env::args_os()
                    .skip(1)
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
            ),
        };
        let reconfig = Arc::new(Reconfigurer {
            config_path: options.config_path,
            running: Arc::new(tokio::sync::Mutex::new(config.clone())),
            running_text: std::sync::Mutex::new(options.config_text),
            luns: Arc::new(reload::LunSet::from_pointee(luns)),
            starter,
            record: std::sync::Mutex::new(match &handover {
                Some(h) => h.record(),
                None => reload::DaemonRecord::new(),
            }),
            program,
            args,
            listeners: std::sync::OnceLock::new(),
            stop_services: stop.clone(),
            upgrading: tokio::sync::watch::Sender::new(false),
        });
        // Duplicates of the listeners for a later handover (role, descriptor, ours to unlink).
        let mut kept = Vec::new();
        let service = Arc::new(control_socket::ControlService {
            luns: Arc::clone(&reconfig.luns),
            reconfig: Arc::clone(&reconfig),
            events: Arc::clone(&events),
            server: Arc::clone(&server),
            accept_errors: Arc::default(),
        });
        let control_listener = match activated.control.take() {
            Some(std) => from_std_unix(std).context("control socket from systemd")?,
            None => control_socket::bind(&config.daemon.control_socket).with_context(|| {
                format!("control_socket {}", config.daemon.control_socket.display())
            })?,
        };
        kept.push((
            "control",
            dup_listener(&control_listener)?,
            unlink_at_stop.control_socket,
        ));
        // The path it really listens on (a handed-over socket keeps its path whatever the file says).
        let control_path = control_listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(std::path::Path::to_path_buf))
            .unwrap_or_else(|| config.daemon.control_socket.clone());
        tokio::spawn(control_socket::serve(
            control_listener,
            Arc::clone(&service),
            stop.clone(),
        ));

        let mut metrics_address = None;
        let metrics_listener = match (activated.metrics.take(), config.daemon.metrics_listen) {
            (Some(std), _) => Some(from_std_tcp(std).context("metrics listener from systemd")?),
            (None, Some(addr)) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("metrics_listen {addr}"))?,
            ),
            (None, None) => None,
        };
        if let Some(listener) = metrics_listener {
            kept.push(("metrics", dup_listener(&listener)?, false));
            metrics_address = Some(listener.local_addr()?);
            tracing::info!(address = %listener.local_addr()?, "metrics at /metrics");
            tokio::spawn(metrics::serve(listener, Arc::clone(&service), stop.clone()));
        }

        let mut nbd_address = None;
        let serving = match (activated.nbd.take(), &config.daemon.nbd_listen) {
            (Some(activation::NbdListener::Tcp(std)), _) => {
                let listener = from_std_tcp(std).context("NBD listener from systemd")?;
                kept.push(("nbd", dup_listener(&listener)?, false));
                nbd_address = Some(listener.local_addr()?);
                tracing::info!(address = %listener.local_addr()?, exports = lun_count, "NBD exports listening (socket from systemd or an upgrade)");
                tokio::spawn(Arc::clone(&server).serve_tcp(listener))
            }
            (Some(activation::NbdListener::Unix(std)), _) => {
                let listener = from_std_unix(std).context("NBD listener from systemd")?;
                kept.push(("nbd", dup_listener(&listener)?, unlink_at_stop.nbd_socket));
                tracing::info!(
                    exports = lun_count,
                    "NBD exports listening on a unix socket from systemd"
                );
                tokio::spawn(Arc::clone(&server).serve_unix(listener))
            }
            (None, ListenAddr::Tcp(addr)) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("nbd_listen {addr}"))?;
                kept.push(("nbd", dup_listener(&listener)?, false));
                nbd_address = Some(listener.local_addr()?);
                tracing::info!(address = %listener.local_addr()?, exports = lun_count, "NBD exports listening");
                tokio::spawn(Arc::clone(&server).serve_tcp(listener))
            }
            (None, ListenAddr::Unix(path)) => {
                let _ = std::fs::remove_file(path);
                let listener = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("nbd_listen unix:{}", path.display()))?;
                kept.push(("nbd", dup_listener(&listener)?, true));
                tracing::info!(socket = %path.display(), exports = lun_count, "NBD exports listening");
                tokio::spawn(Arc::clone(&server).serve_unix(listener))
            }
        };
        let _ = reconfig.listeners.set(
            kept.into_iter()
                .map(|(role, fd, unlink)| (role.to_string(), fd, unlink))
                .collect(),
        );
        // Last, once nothing else can fail: the connections of an upgrade resume here. One whose
        // LUN is no longer in the config file (or that admission refuses) closes, with a warning.
        if let Some(handover) = handover {
            for connection in handed_over {
                let export = connection.export.clone();
                if let Err(e) = server.attach(connection) {
                    tracing::warn!(export = %export, "upgrade: a connection could not resume and is closed: {e}");
                }
            }
            handover.commit(&reconfig.record);
        }
        Ok(Daemon {
            control_path,
            daemon_config: config.daemon,
            unlink_at_stop,
            server,
            reconfig,
            data_threads,
            events,
            stop,
            serving,
            nbd_address,
            metrics_address,
        })
    }

    /// The LUNs running now.
    pub fn luns(&self) -> Vec<Lun> {
        self.reconfig.luns.load().to_vec()
    }

    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    pub fn control_socket(&self) -> &std::path::Path {
        &self.control_path
    }

    /// The TCP address the exports listen on (useful when the config asked for port 0).
    pub fn nbd_address(&self) -> Option<std::net::SocketAddr> {
        self.nbd_address
    }

    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics_address
    }

    /// Reads the config file again and applies the difference (see [`reload`]).
    pub async fn reload(&self) -> anyhow::Result<reload::ReloadReport> {
        self.reconfig.reload().await
    }

    /// Graceful stop, bounded by `shutdown_timeout`: no new requests (ESHUTDOWN), queued I/O fails
    /// now, requests on live paths finish; then paths close.
    pub async fn stop(self) {
        // No reload runs from here on (it would start LUNs behind the drain).
        let _running = self.reconfig.running.lock().await;
        let timeout = self.daemon_config.shutdown_timeout;
        tracing::info!(timeout = ?timeout, "shutting down: draining in-flight I/O");
        let deadline = tokio::time::Instant::now() + timeout;
        self.server.shutdown();
        let luns = self.luns();
        for lun in &luns {
            lun.fail_queued(); // no path to finish them on: fail now rather than at the deadline
        }
        if tokio::time::timeout_at(deadline, self.server.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("shutdown_timeout passed with I/O still in flight; failing it");
        }
        for lun in &luns {
            lun.shutdown();
        }
        // The LUNs' last journal writes run on their data threads: done before those threads stop.
        let closed = async {
            for lun in &luns {
                lun.closed().await;
            }
        };
        if tokio::time::timeout(CLOSE_GRACE, closed).await.is_err() {
            tracing::warn!(
                "a LUN's last in-doubt journal write did not finish within {CLOSE_GRACE:?}"
            );
        }
        self.stop.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, self.serving).await;
        if self.unlink_at_stop.control_socket {
            let _ = std::fs::remove_file(&self.control_path);
        }
        if let (ListenAddr::Unix(path), true) = (
            &self.daemon_config.nbd_listen,
            self.unlink_at_stop.nbd_socket,
        ) {
            let _ = std::fs::remove_file(path);
        }
        self.data_threads.stop().await;
        tracing::info!("stopped");
    }
}

/// Which socket files this daemon created (and so removes at stop).
struct UnlinkAtStop {
    control_socket: bool,
    nbd_socket: bool,
}

/// A duplicate of a listener's descriptor, kept for a handover (CLOEXEC until then).
fn dup_listener(listener: &impl std::os::fd::AsFd) -> anyhow::Result<std::os::fd::OwnedFd> {
    listener
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate a listener for a later upgrade")
}

fn from_std_tcp(std: std::net::TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    std.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(std)
}

fn from_std_unix(
    std: std::os::unix::net::UnixListener,
) -> std::io::Result<tokio::net::UnixListener> {
    std.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(std)
}

/// Runs the daemon until SIGTERM/SIGINT. `inherited`: listeners from systemd
/// ([`activation::Inherited::take_from_env`], taken in `main` before the runtime's threads start).
pub async fn run(
    args: ServeArgs,
    inherited: activation::Inherited,
    handover: Option<upgrade::Incoming>,
) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP (or SIGTERM) right after the ready line must not find the default
    // action (which ends the process) in place.
    let signals = Signals::install()?;
    // An upgrade blocks these across its exec; their handlers are in place now.
    upgrade::unblock_stop_signals();
    // A takeover that fails hands back to the old program (upgrade, step 5).
    let fallback = handover.as_ref().map(|h| h.doc.clone());
    let started = async {
        // A fallback runs the config the old program ran; anyone else reads the file.
        let (config, config_text) = match handover.as_ref().filter(|h| h.doc.failure.is_some()) {
            Some(h) => {
                let file = args.config.display().to_string();
                let text = h.doc.config_text.clone();
                (Config::parse(&text, &file), text)
            }
            None => match Config::load_text(&args.config) {
                Ok((config, text)) => (Ok(config), text),
                Err(e) => (Err(e), String::new()),
            },
        };
        let config = config.map_err(|e| anyhow::anyhow!("{e}"))?;
        Daemon::start_with(
            config,
            StartOptions {
                inherited,
                // Absolute, so reloads and `lunmpio daemon` name the file wherever they run from;
                // not resolved: a Kubernetes ConfigMap's file is a symlink into a directory the
                // kubelet replaces on every update, and a reload must read the new one.
                config_path: Some(std::path::absolute(&args.config).unwrap_or(args.config.clone())),
                handover,
                config_text,
            },
        )
        .await
    };
    let daemon = match (started.await, fallback) {
        (Ok(daemon), _) => daemon,
        (Err(e), Some(doc)) => return Err(upgrade::fall_back(doc, format!("{e:#}"))),
        (Err(e), None) => return Err(e),
    };
    // Tell whoever started us that everything is up (tests and supervisors wait for this line).
    // One line, fields separated by "; ": `nbd ADDR` (TCP exports), `metrics ADDR` (when on).
    let mut line = format!("lunmpio: serving {} LUN(s)", daemon.luns().len());
    match (&daemon.daemon_config.nbd_listen, daemon.nbd_address()) {
        (_, Some(a)) => line += &format!("; nbd {a}"),
        (ListenAddr::Unix(path), None) => line += &format!("; nbd unix:{}", path.display()),
        _ => {}
    }
    if let Some(a) = daemon.metrics_address() {
        line += &format!("; metrics {a}");
    }
    line += &format!("; control socket {}", daemon.control_socket().display());
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
    serve_until_stopped(&daemon, signals).await;
    daemon.stop().await;
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }
}

/// Runs until SIGTERM or SIGINT. SIGHUP reloads the config file (as `lunmpio reload` does); a storm
/// of them costs one reload per signal that arrives while none runs (the signal stream coalesces
/// the rest).
async fn serve_until_stopped(daemon: &Daemon, mut signals: Signals) {
    loop {
        tokio::select! {
            _ = signals.term.recv() => return,
            _ = signals.int.recv() => return,
            _ = signals.hup.recv() => match daemon.reload().await {
                Ok(report) => tracing::info!(
                    added = ?report.added, removed = ?report.removed, restarted = ?report.restarted,
                    unchanged = report.unchanged, not_applied = ?report.not_applied,
                    failed = ?report.failed, "SIGHUP: config reloaded"
                ),
                Err(e) => tracing::error!("SIGHUP: reload failed, nothing changed: {e:#}"),
            },
        }
    }
}
