//! In-process peers: an in-memory NBD target (our server over a RAM disk) and a fault proxy per path that can cut (reset every connection, refuse new ones), hang (accept and
//! forward nothing) and restore — deterministic, in-process stand-ins for the real peers that the
//! daemon's interop suite breaks with signals and nbdkit filters.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::{Extent, NbdErrno, Reply, Request, TransmissionFlags};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// A RAM disk. Reads and writes are counted so tests can see which target carried I/O.
pub struct Memory {
    data: Mutex<Vec<u8>>,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

impl Memory {
    pub fn new(size: u64) -> Arc<Memory> {
        Arc::new(Memory {
            data: Mutex::new(vec![0; size as usize]),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }
}

impl Backend for Memory {
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        let range = |offset: u64, length: usize| offset as usize..offset as usize + length;
        Ok(match request {
            Request::Read { offset, length } => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let m = self.data.lock().unwrap();
                Reply::Read(Bytes::copy_from_slice(&m[range(offset, length as usize)]))
            }
            Request::Write { offset, data, .. } => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.data.lock().unwrap()[range(offset, data.len())].copy_from_slice(&data);
                Reply::Done
            }
            Request::WriteZeroes { offset, length, .. } => {
                self.data.lock().unwrap()[range(offset, length as usize)].fill(0);
                Reply::Done
            }
            Request::BlockStatus { length, .. } => {
                Reply::BlockStatus(vec![Extent { length, flags: 0 }])
            }
            Request::Flush { .. } | Request::Trim { .. } | Request::Cache { .. } => Reply::Done,
        })
    }
}

/// Serves `store` as export `lun0` on a Unix socket in `dir`; returns the socket path.
pub fn serve(dir: &Path, name: &str, store: Arc<Memory>, size: u64, multi_conn: bool) -> PathBuf {
    let socket = dir.join(format!("{name}.sock"));
    let server = Server::new(ServerOptions::default());
    let mut flags = TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES;
    if multi_conn {
        flags |= TransmissionFlags::CAN_MULTI_CONN;
    }
    let mut config = ExportConfig::new("lun0", size);
    config.flags = flags;
    server.add_export(config, store).unwrap();
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(Arc::new(server).serve_unix(listener));
    socket
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProxyMode {
    Up,
    /// Reset every connection; refuse new ones.
    Cut,
    /// Accept, forward nothing either way.
    Hang,
}

/// A Unix-socket proxy in front of a target: one per path, so each path can fail on its own.
pub struct FaultProxy {
    pub socket: PathBuf,
    mode: watch::Sender<ProxyMode>,
    pub connections: Arc<AtomicU64>,
}

impl FaultProxy {
    pub fn start(dir: &Path, name: &str, upstream: PathBuf) -> FaultProxy {
        let socket = dir.join(format!("{name}.proxy.sock"));
        let listener = UnixListener::bind(&socket).unwrap();
        let (mode, _) = watch::channel(ProxyMode::Up);
        let connections = Arc::new(AtomicU64::new(0));
        let mode_rx = mode.subscribe();
        let count = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mode = mode_rx.clone();
                if *mode.borrow() == ProxyMode::Cut {
                    drop(client);
                    continue;
                }
                count.fetch_add(1, Ordering::Relaxed);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = UnixStream::connect(&upstream).await else {
                        return;
                    };
                    relay(client, server, mode).await;
                });
            }
        });
        FaultProxy {
            socket,
            mode,
            connections,
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///lun0?socket={}", self.socket.display())
    }

    pub fn set(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }
}

async fn relay(client: UnixStream, server: UnixStream, mut mode: watch::Receiver<ProxyMode>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let mut cbuf = vec![0u8; 256 << 10];
    let mut sbuf = vec![0u8; 256 << 10];
    loop {
        let current = *mode.borrow();
        match current {
            ProxyMode::Cut => return, // dropping both halves closes both sockets
            ProxyMode::Hang => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            ProxyMode::Up => {}
        }
        tokio::select! {
            changed = mode.changed() => if changed.is_err() { return },
            n = tokio::io::AsyncReadExt::read(&mut cr, &mut cbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if hold_then_write(&mut sw, &cbuf[..n], &mut mode).await.is_err() { return },
            },
            n = tokio::io::AsyncReadExt::read(&mut sr, &mut sbuf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if hold_then_write(&mut cw, &sbuf[..n], &mut mode).await.is_err() { return },
            },
        }
    }
}

/// Forwards bytes already read — unless the proxy hangs or is cut meanwhile, in which case they are
/// held (hang) or dropped (cut), as a stuck or dead controller port would.
async fn hold_then_write<W: AsyncWriteExt + Unpin>(
    out: &mut W,
    bytes: &[u8],
    mode: &mut watch::Receiver<ProxyMode>,
) -> std::io::Result<()> {
    loop {
        let current = *mode.borrow();
        match current {
            ProxyMode::Up => return out.write_all(bytes).await,
            ProxyMode::Cut => return Err(std::io::Error::other("cut")),
            ProxyMode::Hang => {
                if mode.changed().await.is_err() {
                    return Err(std::io::Error::other("proxy gone"));
                }
            }
        }
    }
}

/// [`crate::pseudo_random`] as `Bytes`.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    Bytes::from(crate::pseudo_random(len, seed))
}
