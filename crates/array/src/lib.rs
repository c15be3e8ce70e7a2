//! `lunmpio target`: the built-in simulated storage array, a fixture beside the product (it stands in
//! for a real array in tests and in the demo; nothing in the data path depends on it).
//!
//! One LUN (an image file or a sparse RAM disk) is served over N TCP controller ports. Each port has its
//! own NBD server with one export and its own fault state, so a test or the demo can break one path to
//! the LUN while the others keep working — like a dual-controller array with a failing port.

pub mod args;
pub mod commands;
pub mod fault;
pub mod fault_api;
pub mod port;
pub mod store;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use lunmpio_nbd::{BlockSize, ExportConfig, Server, ServerOptions, TransmissionFlags};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::args::TargetServeArgs;
use fault::Fault;
use lunmpio_human::format_size;
use port::{FaultStream, Port, PortBackend, set_reset_on_close};
use store::{FileStore, MemStore, Store};

/// What backs the LUN.
#[derive(Debug, Clone)]
pub enum Backing {
    Image { path: PathBuf, size: Option<u64> },
    Memory { size: u64 },
}

#[derive(Debug, Clone)]
pub struct ArrayConfig {
    pub backing: Backing,
    /// Export name; `None` picks the image stem or `lun0`.
    pub name: Option<String>,
    pub ports: u16,
    /// `HOST:PORT` of port 0.
    pub listen: String,
    /// Advertised block-size constraints (`None`: 1, 4 KiB, 32 MiB).
    pub block_size: Option<BlockSize>,
}

/// How long a fence waits for the connections it reset to end.
const FENCE_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running simulated array.
pub struct Array {
    name: String,
    store: Arc<Store>,
    ports: Vec<Arc<Port>>,
    servers: Vec<Arc<Server<PortBackend>>>,
    stop_accepting: CancellationToken,
    tasks: TaskTracker,
}

impl Array {
    /// Binds every port, then starts serving. When this returns, every port accepts connections.
    pub async fn start(config: ArrayConfig) -> anyhow::Result<Array> {
        if config.ports == 0 {
            bail!("an array needs at least one controller port");
        }
        let name = export_name(&config)?;
        let store = match &config.backing {
            Backing::Memory { size } => Store::Memory(MemStore::new(*size)),
            Backing::Image { path, size } => {
                let (path, size) = (path.clone(), *size);
                // Opening may create and extend a large file: keep it off the runtime.
                let file = tokio::task::spawn_blocking(move || FileStore::open(&path, size))
                    .await
                    .context("opening the image panicked")??;
                Store::File(file)
            }
        };
        let store = Arc::new(store);
        let listeners = bind_ports(&config.listen, config.ports).await?;

        let stop_accepting = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut ports = Vec::new();
        let mut servers = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let addr = listener
                .local_addr()
                .context("listener has no local address")?;
            let port = Arc::new(Port::new(index, addr, nbd_uri(addr, &name)));
            let server = Server::new(ServerOptions::default());
            server
                .add_export(
                    ExportConfig {
                        name: name.clone(),
                        description: Some(format!(
                            "lunmpio simulated array, controller port {index}"
                        )),
                        size: store.size(),
                        flags: export_flags(),
                        block_size: config.block_size.unwrap_or(BlockSize {
                            min: 1,
                            preferred: 4096,
                            max_payload: 32 << 20,
                        }),
                    },
                    Arc::new(PortBackend::new(port.clone(), store.clone())),
                )
                .map_err(|e| anyhow::anyhow!("cannot add export `{name}`: {e}"))?;
            let server = Arc::new(server);
            tasks.spawn(accept_loop(
                listener,
                port.clone(),
                server.clone(),
                stop_accepting.clone(),
                tasks.clone(),
            ));
            ports.push(port);
            servers.push(server);
        }
        tracing::info!(
            export = %name,
            size = store.size(),
            backing = %store.describe(),
            ports = ports.len(),
            "simulated array serving"
        );
        Ok(Array {
            name,
            store,
            ports,
            servers,
            stop_accepting,
            tasks,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.store.size()
    }

    pub fn uris(&self) -> Vec<String> {
        self.ports.iter().map(|p| p.uri.clone()).collect()
    }

    /// Socket addresses of the ports, in port order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.ports.iter().map(|p| p.addr).collect()
    }

    /// Applies a fault to one port; the only failure is a port number out of range.
    pub fn apply_fault(&self, port: usize, fault: Fault) -> Result<(), String> {
        let Some(p) = self.ports.get(port) else {
            return Err(format!(
                "no port {port}: this array has ports 0..={}",
                self.ports.len() - 1
            ));
        };
        p.apply(fault);
        Ok(())
    }

    /// The array's fencing API for one port (see [`Port::fence`]).
    pub async fn fence(&self, port: usize) -> Result<port::FenceReport, String> {
        let Some(p) = self.ports.get(port) else {
            return Err(format!(
                "no port {port}: this array has ports 0..={}",
                self.ports.len() - 1
            ));
        };
        p.fence(FENCE_DRAIN_TIMEOUT).await
    }

    pub fn status_json(&self) -> serde_json::Value {
        let mut export = serde_json::json!({
            "name": self.name,
            "size": self.store.size(),
            "backing": self.store.describe(),
        });
        if let Store::Memory(m) = &*self.store {
            export["allocatedBytes"] = m.allocated_bytes().into();
        }
        serde_json::json!({
            "export": export,
            "ports": self.ports.iter().map(|p| p.status_json()).collect::<Vec<_>>(),
        })
    }

    /// Graceful stop: refuse new connections, let in-flight requests finish (bounded by `timeout`),
    /// then flush the store.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stop_accepting.cancel();
        for server in &self.servers {
            server.shutdown();
        }
        // A hung port holds its connections on purpose; release them so they can drain.
        for port in &self.ports {
            if port.fault_state().hang {
                port.apply(Fault::Up);
            }
        }
        // Drain first: requests in flight complete and idle connections close. A connection that does
        // not finish in time (a client idling in the handshake, a stuck peer) is then reset.
        if !self.wait_idle(timeout).await {
            tracing::warn!(
                "connections still open after {}; resetting them",
                lunmpio_human::format_duration(timeout)
            );
            for port in &self.ports {
                port.reset_connections();
            }
            self.wait_idle(Duration::from_secs(1)).await;
        }
        self.tasks.close();
        if let Err(e) = self.store.flush().await {
            tracing::warn!(error = %e, "final flush of the image failed");
        }
    }
}

impl Array {
    async fn wait_idle(&self, timeout: Duration) -> bool {
        let idle = async {
            for server in &self.servers {
                server.wait_idle().await;
            }
        };
        tokio::time::timeout(timeout, idle).await.is_ok()
    }
}

fn export_flags() -> TransmissionFlags {
    TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_CACHE
        // Honest: every port serves one shared store with no private cache, so a flush on any
        // connection covers writes completed on all of them.
        | TransmissionFlags::CAN_MULTI_CONN
}

fn export_name(config: &ArrayConfig) -> anyhow::Result<String> {
    let name = match (&config.name, &config.backing) {
        (Some(n), _) => n.clone(),
        (None, Backing::Image { path, .. }) => path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .unwrap_or("lun0")
            .to_string(),
        (None, Backing::Memory { .. }) => "lun0".to_string(),
    };
    if name.len() > 4096 {
        bail!(
            "export name is {} bytes; NBD allows at most 4096",
            name.len()
        );
    }
    Ok(name)
}

/// Resolves `HOST:PORT` and binds N listeners: PORT..PORT+N-1, or N OS-chosen ports for port 0.
async fn bind_ports(listen: &str, count: u16) -> anyhow::Result<Vec<TcpListener>> {
    let base: SocketAddr = listen
        .to_socket_addrs()
        .with_context(|| {
            format!("invalid --listen `{listen}`: expected HOST:PORT such as 127.0.0.1:10810")
        })?
        .next()
        .with_context(|| format!("--listen `{listen}` resolves to no address"))?;
    if base.port() != 0 && base.port() as u32 + count as u32 - 1 > u16::MAX as u32 {
        bail!(
            "--listen port {} with --ports {count} would need ports beyond 65535",
            base.port()
        );
    }
    let mut listeners = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut addr = base;
        if base.port() != 0 {
            addr.set_port(base.port() + i);
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (controller port {i})"))?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// `nbd://HOST:PORT/NAME`, with the export name percent-encoded where a URI needs it.
pub fn nbd_uri(addr: SocketAddr, name: &str) -> String {
    let mut encoded = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("nbd://{addr}/{encoded}")
}

async fn accept_loop(
    listener: TcpListener,
    port: Arc<Port>,
    server: Arc<Server<PortBackend>>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener stays usable.
                tracing::warn!(port = port.index, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if port.is_down() {
            // A dead controller port: the connection is reset at once, before any greeting.
            set_reset_on_close(&stream);
            port.counters
                .connections_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            continue;
        }
        let _ = stream.set_nodelay(true);
        port.counters
            .connections_total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = port.clone();
        let server = server.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            if port.fault_state().hang {
                // No greeting while hung; the connection is held, not handed to the server, so the
                // server's handshake timeout does not run out during a long hang.
                let released = tokio::select! {
                    ok = port.wait_until_not_hung() => ok,
                    _ = stop.cancelled() => false,
                };
                if !released {
                    set_reset_on_close(&stream);
                    return;
                }
            }
            tracing::debug!(port = port.index, %peer, "connection");
            if let Err(e) = server
                .serve_connection(FaultStream::new(stream, port.clone()))
                .await
            {
                tracing::debug!(port = port.index, %peer, error = %e, "connection ended");
            }
        });
    }
}

/// `lunmpio target ...`: run the array in the foreground until SIGTERM/SIGINT.
pub async fn run(args: TargetServeArgs) -> anyhow::Result<()> {
    let backing = match (&args.image, args.memory) {
        (Some(path), None) => Backing::Image {
            path: path.clone(),
            size: args.size,
        },
        (None, Some(size)) => Backing::Memory { size },
        // clap enforces exactly one; keep a clear message rather than a panic anyway.
        _ => bail!("give exactly one of --image FILE or --memory SIZE"),
    };
    let config = ArrayConfig {
        backing,
        name: args.name,
        ports: args.ports,
        listen: args.listen,
        block_size: args.block_size,
    };
    // Install signal handlers before anything is printed, so a supervisor that reacts to the URIs by
    // sending SIGTERM never hits the default (fatal) disposition.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot install the SIGINT handler")?;

    let array = Arc::new(Array::start(config).await?);
    let control = match &args.control {
        Some(path) => Some(fault_api::ControlServer::start(path, array.clone())?),
        None => None,
    };

    {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for uri in array.uris() {
            writeln!(out, "{uri}").context("cannot write the URIs to stdout")?;
        }
        out.flush().context("cannot flush stdout")?;
    }
    tracing::info!(
        size = %format_size(array.size()),
        control = %args.control.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        "ready"
    );

    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!(signal, "shutting down");
    if let Some(control) = control {
        control.stop();
    }
    array.shutdown(Duration::from_secs(1)).await;
    tracing::info!("stopped");
    Ok(())
}
