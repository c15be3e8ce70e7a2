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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lunmpio_engine::{EventLog, Lun, LunOptions};
use lunmpio_nbd::server::{Server, ServerOptions};

use crate::config::{Config, ListenAddr};
use data_threads::DataThreads;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The TOML configuration (see docs/OPERATIONS.md for every key).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// Exit bound after the drain: closing paths and tasks takes no longer than this.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// A running daemon (in this process). Call [`Daemon::stop`] to stop it gracefully; dropping it ends
/// its data threads at once (no drain, the LUNs' I/O in flight is dropped).
pub struct Daemon {
    config: Config,
    unlink_at_stop: UnlinkAtStop,
    server: Arc<Server<Lun>>,
    luns: Vec<Lun>,
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
        Daemon::start_with(config, activation::Inherited::none()).await
    }

    /// [`Daemon::start`] with listeners handed over by systemd (socket activation): those are used
    /// instead of binding, and left in place at stop (they belong to systemd).
    pub async fn start_with(
        config: Config,
        inherited: activation::Inherited,
    ) -> anyhow::Result<Daemon> {
        let mut activated = activation::assign(inherited, &config)?;
        // Sockets from systemd are systemd's: never unlinked here, so they outlive this process.
        let unlink_at_stop = UnlinkAtStop {
            control_socket: activated.control.is_none(),
            nbd_socket: activated.nbd.is_none(),
        };
        let events = Arc::new(EventLog::new());
        std::fs::create_dir_all(&config.daemon.state_dir)
            .with_context(|| format!("state_dir {}", config.daemon.state_dir.display()))?;
        let mut luns = Vec::with_capacity(config.luns.len());
        let paths: usize = config.luns.iter().map(|l| l.paths.len()).sum();
        let (max_connections, lowered) = fds::connections_within_limit(
            config.daemon.max_connections,
            paths,
            fds::raise_open_file_limit(),
        );
        if let Some(why) = lowered {
            tracing::warn!("{why}");
        }
        let server = Server::new(ServerOptions {
            max_connections,
            ..ServerOptions::default()
        });
        let data_threads = DataThreads::start(data_threads::thread_count(
            config.daemon.data_threads,
            config.luns.len(),
        ))
        .context("cannot start the data threads")?;
        for (i, lun_config) in config.luns.iter().enumerate() {
            let spec = lun_config.to_spec();
            let options = LunOptions {
                state_dir: Some(config.daemon.state_dir.clone()),
                startup_timeout: None,
            };
            // Started on its data thread, so the LUN's tasks and path connections live there.
            let runtime = data_threads.for_lun(i).clone();
            let lun = runtime
                .spawn(Lun::start(spec, options, Arc::clone(&events)))
                .await
                .context("a data thread stopped while a LUN started")?
                .map_err(|e| {
                    anyhow::anyhow!(
                        "LUN {:?}: {} ({})",
                        lun_config.name,
                        e.message,
                        e.hresult.name()
                    )
                })?;
            // The LUN is the export's backend: NBD requests go straight to the engine.
            server
                .add_export_on(lun.export_config(), Arc::new(lun.clone()), runtime)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            tracing::info!(
                lun = %lun.name(), paths = lun_config.paths.len(), usable = lun.mpio().usable_path_count(),
                policy = lun.mpio().policy().config_name(), size = lun.geometry().size_bytes, "LUN started"
            );
            luns.push(lun);
        }
        let server = Arc::new(server);
        let service = Arc::new(control_socket::ControlService {
            luns: luns.clone(),
            events: Arc::clone(&events),
            server: Arc::clone(&server),
            accept_errors: Arc::default(),
        });
        let stop = tokio_util::sync::CancellationToken::new();

        let control_listener = match activated.control.take() {
            Some(std) => from_std_unix(std).context("control socket from systemd")?,
            None => control_socket::bind(&config.daemon.control_socket).with_context(|| {
                format!("control_socket {}", config.daemon.control_socket.display())
            })?,
        };
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
            metrics_address = Some(listener.local_addr()?);
            tracing::info!(address = %listener.local_addr()?, "metrics at /metrics");
            tokio::spawn(metrics::serve(listener, Arc::clone(&service), stop.clone()));
        }

        let mut nbd_address = None;
        let serving = match (activated.nbd.take(), &config.daemon.nbd_listen) {
            (Some(activation::NbdListener::Tcp(std)), _) => {
                let listener = from_std_tcp(std).context("NBD listener from systemd")?;
                nbd_address = Some(listener.local_addr()?);
                tracing::info!(address = %listener.local_addr()?, exports = luns.len(), "NBD exports listening (socket from systemd)");
                tokio::spawn(Arc::clone(&server).serve_tcp(listener))
            }
            (Some(activation::NbdListener::Unix(std)), _) => {
                let listener = from_std_unix(std).context("NBD listener from systemd")?;
                tracing::info!(
                    exports = luns.len(),
                    "NBD exports listening on a unix socket from systemd"
                );
                tokio::spawn(Arc::clone(&server).serve_unix(listener))
            }
            (None, ListenAddr::Tcp(addr)) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("nbd_listen {addr}"))?;
                nbd_address = Some(listener.local_addr()?);
                tracing::info!(address = %listener.local_addr()?, exports = luns.len(), "NBD exports listening");
                tokio::spawn(Arc::clone(&server).serve_tcp(listener))
            }
            (None, ListenAddr::Unix(path)) => {
                let _ = std::fs::remove_file(path);
                let listener = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("nbd_listen unix:{}", path.display()))?;
                tracing::info!(socket = %path.display(), exports = luns.len(), "NBD exports listening");
                tokio::spawn(Arc::clone(&server).serve_unix(listener))
            }
        };
        Ok(Daemon {
            config,
            unlink_at_stop,
            server,
            luns,
            data_threads,
            events,
            stop,
            serving,
            nbd_address,
            metrics_address,
        })
    }

    pub fn luns(&self) -> &[Lun] {
        &self.luns
    }

    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    pub fn control_socket(&self) -> &std::path::Path {
        &self.config.daemon.control_socket
    }

    /// The TCP address the exports listen on (useful when the config asked for port 0).
    pub fn nbd_address(&self) -> Option<std::net::SocketAddr> {
        self.nbd_address
    }

    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics_address
    }

    /// Graceful stop, bounded by `shutdown_timeout`: no new requests (ESHUTDOWN), queued I/O fails
    /// now, requests on live paths finish; then paths close.
    pub async fn stop(self) {
        tracing::info!(timeout = ?self.config.daemon.shutdown_timeout, "shutting down: draining in-flight I/O");
        let deadline = tokio::time::Instant::now() + self.config.daemon.shutdown_timeout;
        self.server.shutdown();
        for lun in &self.luns {
            lun.fail_queued(); // no path to finish them on: fail now rather than at the deadline
        }
        if tokio::time::timeout_at(deadline, self.server.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!("shutdown_timeout passed with I/O still in flight; failing it");
        }
        for lun in &self.luns {
            lun.shutdown();
        }
        // The LUNs' last journal writes run on their data threads: done before those threads stop.
        let closed = async {
            for lun in &self.luns {
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
            let _ = std::fs::remove_file(&self.config.daemon.control_socket);
        }
        if let (ListenAddr::Unix(path), true) = (
            &self.config.daemon.nbd_listen,
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
pub async fn run(args: ServeArgs, inherited: activation::Inherited) -> anyhow::Result<()> {
    let config = Config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let daemon = Daemon::start_with(config, inherited).await?;
    // Tell whoever started us that everything is up (tests and supervisors wait for this line).
    // One line, fields separated by "; ": `nbd ADDR` (TCP exports), `metrics ADDR` (when on).
    let mut line = format!("lunmpio: serving {} LUN(s)", daemon.luns().len());
    match (&daemon.config.daemon.nbd_listen, daemon.nbd_address()) {
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
    wait_for_signal().await?;
    daemon.stop().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
