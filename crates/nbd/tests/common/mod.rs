//! Test helpers: an in-memory backend with knobs for reordering and gating, and server
//! start-up helpers.
#![allow(dead_code)]

use bytes::Bytes;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::{
    Client, CommandFlags, ConnectOptions, Endpoint, Extent, NbdErrno, Reply, Request,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, oneshot};

/// Allocation granularity of the block-status model.
pub const GRAIN: u64 = 4096;

/// In-memory disk. Tracks allocation per 4 KiB grain for BLOCK_STATUS.
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    allocated: Mutex<Vec<bool>>,
    /// Completion order control.
    pub mode: Mode,
    reorder: Mutex<Vec<oneshot::Sender<()>>>,
    /// Every op first reports here (if set), so a test knows it reached the backend.
    pub arrivals: Mutex<Option<mpsc::UnboundedSender<()>>>,
    /// While set, ops wait for `release` to be notified.
    pub gate: Notify,
    pub gated: std::sync::atomic::AtomicBool,
    pub ops: AtomicUsize,
    pub flushes: AtomicUsize,
    /// Longest single op seen (bytes).
    pub max_len: AtomicUsize,
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Complete at once.
    Immediate,
    /// Hold ops until `n` have arrived, then complete them last-first.
    ReverseBatches(usize),
    /// Yield a pseudo-random number of times before completing (shuffles completion).
    Shuffle,
}

impl MemBackend {
    pub fn new(size: usize, mode: Mode) -> Arc<Self> {
        Arc::new(MemBackend {
            data: Mutex::new(vec![0; size]),
            allocated: Mutex::new(vec![false; size.div_ceil(GRAIN as usize)]),
            mode,
            reorder: Mutex::new(Vec::new()),
            arrivals: Mutex::new(None),
            gate: Notify::new(),
            gated: std::sync::atomic::AtomicBool::new(false),
            ops: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            max_len: AtomicUsize::new(0),
        })
    }

    pub fn contents(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset..offset + len].to_vec()
    }

    /// Writes directly into the store (no op counted).
    pub fn poke(&self, offset: usize, data: &[u8]) {
        self.data.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
        self.mark(offset as u64, data.len() as u64, true);
    }

    pub fn set_arrivals(&self) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.arrivals.lock().unwrap() = Some(tx);
        rx
    }

    pub fn open_gate(&self) {
        self.gated.store(false, Ordering::SeqCst);
        self.gate.notify_waiters();
    }

    async fn enter_len(&self, salt: u64, len: u64) {
        self.max_len.fetch_max(len as usize, Ordering::SeqCst);
        self.enter(salt).await;
    }

    async fn enter(&self, salt: u64) {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = self.arrivals.lock().unwrap().as_ref() {
            let _ = tx.send(());
        }
        loop {
            let notified = self.gate.notified();
            if !self.gated.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        match self.mode {
            Mode::Immediate => {}
            Mode::ReverseBatches(batch) => {
                let (tx, rx) = oneshot::channel();
                let release = {
                    let mut v = self.reorder.lock().unwrap();
                    v.push(tx);
                    if v.len() >= batch {
                        std::mem::take(&mut *v)
                    } else {
                        Vec::new()
                    }
                };
                for t in release.into_iter().rev() {
                    let _ = t.send(());
                }
                let _ = rx.await;
            }
            Mode::Shuffle => {
                let mut x = salt ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                x ^= x >> 29;
                for _ in 0..(x % 17) {
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let mut a = self.allocated.lock().unwrap();
        let first = offset / GRAIN;
        let last = (offset + len).div_ceil(GRAIN);
        for g in first..last {
            // Only whole grains become holes.
            let whole = g * GRAIN >= offset && (g + 1) * GRAIN <= offset + len;
            if allocated || whole {
                a[g as usize] = allocated;
            }
        }
    }
}

impl Backend for MemBackend {
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        Ok(match request {
            Request::Read { offset, length } => Reply::Read(self.read(offset, length).await),
            Request::Write { offset, data, .. } => {
                self.write(offset, data).await;
                Reply::Done
            }
            Request::Flush { .. } => {
                self.flush().await;
                Reply::Done
            }
            Request::Trim { offset, length, .. } => {
                self.trim(offset, length).await;
                Reply::Done
            }
            Request::WriteZeroes {
                offset,
                length,
                flags,
            } => {
                self.write_zeroes(offset, length, flags).await;
                Reply::Done
            }
            Request::BlockStatus { offset, length, .. } => {
                Reply::BlockStatus(self.block_status(offset, length).await)
            }
            Request::Cache { .. } => Reply::Done,
        })
    }
}

/// The model's commands, called by `handle`.
impl MemBackend {
    async fn read(&self, offset: u64, length: u32) -> Bytes {
        self.enter_len(offset, length as u64).await;
        let d = self.data.lock().unwrap();
        Bytes::copy_from_slice(&d[offset as usize..offset as usize + length as usize])
    }

    async fn write(&self, offset: u64, data: Bytes) {
        self.enter_len(offset, data.len() as u64).await;
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        self.mark(offset, data.len() as u64, true);
    }

    async fn flush(&self) {
        self.enter(0).await;
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }

    async fn trim(&self, offset: u64, length: u32) {
        self.enter(offset).await;
        self.data.lock().unwrap()[offset as usize..offset as usize + length as usize].fill(0);
        self.mark(offset, length as u64, false);
    }

    async fn write_zeroes(&self, offset: u64, length: u32, flags: CommandFlags) {
        self.enter(offset).await;
        self.data.lock().unwrap()[offset as usize..offset as usize + length as usize].fill(0);
        let keep = flags.contains(CommandFlags::NO_HOLE);
        self.mark(offset, length as u64, keep);
    }

    async fn block_status(&self, offset: u64, length: u32) -> Vec<Extent> {
        self.enter(offset).await;
        let a = self.allocated.lock().unwrap();
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + length as u64;
        let mut pos = offset;
        while pos < end {
            let g = pos / GRAIN;
            let next = ((g + 1) * GRAIN).min(end);
            let flags = if a[g as usize] {
                0
            } else {
                Extent::HOLE | Extent::ZERO
            };
            let len = (next - pos) as u32;
            match out.last_mut() {
                Some(e) if e.flags == flags => e.length += len,
                _ => out.push(Extent { length: len, flags }),
            }
            pos = next;
        }
        out
    }
}

pub struct TestServer<B: Backend> {
    pub server: Arc<Server<B>>,
    pub endpoint: Endpoint,
    pub dir: tempfile::TempDir,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub fn server_with(
    exports: Vec<(ExportConfig, Arc<MemBackend>)>,
    options: ServerOptions,
) -> Arc<Server<MemBackend>> {
    let s = Server::new(options);
    for (cfg, b) in exports {
        s.add_export(cfg, b).unwrap();
    }
    Arc::new(s)
}

pub async fn start_unix(server: Arc<Server<MemBackend>>) -> TestServer<MemBackend> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let task = tokio::spawn(Arc::clone(&server).serve_unix(listener));
    TestServer {
        server,
        endpoint: Endpoint::Unix { path },
        dir,
        task,
    }
}

pub async fn start_tcp(server: Arc<Server<MemBackend>>) -> TestServer<MemBackend> {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(Arc::clone(&server).serve_tcp(listener));
    TestServer {
        server,
        endpoint: Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
            bind: None,
        },
        dir,
        task,
    }
}

pub fn opts(endpoint: &Endpoint, export: &str) -> ConnectOptions {
    ConnectOptions::new(endpoint.clone(), export)
}

pub async fn connect(endpoint: &Endpoint, export: &str) -> Client {
    Client::connect(opts(endpoint, export)).await.unwrap()
}

/// Deterministic test pattern.
pub fn pattern(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// Upper bound for any single wait in a test, so a bug fails instead of hanging.
pub const TEST_DEADLINE: Duration = Duration::from_secs(20);

pub async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_DEADLINE, f)
        .await
        .expect("test step exceeded its deadline")
}

pub mod raw;
