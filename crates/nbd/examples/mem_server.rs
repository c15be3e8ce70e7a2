//! A memory-backed NBD server, for benchmarks and manual interop checks:
//! `cargo run --release -p lunmpio-nbd --example mem_server -- /tmp/nbd.sock 1073741824`
//! then `fio --ioengine=nbd --uri='nbd+unix:///mem?socket=/tmp/nbd.sock' ...`.

use bytes::Bytes;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::{NbdErrno, Reply, Request, TransmissionFlags};
use std::sync::{Arc, RwLock};

/// Sharded so concurrent 4 KiB requests rarely contend.
struct Mem {
    shards: Vec<RwLock<Vec<u8>>>,
}

const SHARD_BYTES: u64 = 1 << 20;

impl Mem {
    fn new(size: u64) -> Self {
        let n = size.div_ceil(SHARD_BYTES);
        Mem {
            shards: (0..n)
                .map(|_| RwLock::new(vec![0; SHARD_BYTES as usize]))
                .collect(),
        }
    }

    fn each(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&RwLock<Vec<u8>>, usize, usize, usize),
    ) {
        let mut pos = offset;
        let mut done = 0usize;
        while pos < offset + len {
            let shard = (pos / SHARD_BYTES) as usize;
            let at = (pos % SHARD_BYTES) as usize;
            let n = ((SHARD_BYTES - pos % SHARD_BYTES).min(offset + len - pos)) as usize;
            f(&self.shards[shard], at, n, done);
            pos += n as u64;
            done += n;
        }
    }
}

impl Backend for Mem {
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        Ok(match request {
            Request::Read { offset, length } => {
                let mut out = vec![0u8; length as usize];
                self.each(offset, length as u64, |s, at, n, done| {
                    let g = s.read().unwrap_or_else(|p| p.into_inner());
                    out[done..done + n].copy_from_slice(&g[at..at + n]);
                });
                Reply::Read(Bytes::from(out))
            }
            Request::Write { offset, data, .. } => {
                self.each(offset, data.len() as u64, |s, at, n, done| {
                    let mut g = s.write().unwrap_or_else(|p| p.into_inner());
                    g[at..at + n].copy_from_slice(&data[done..done + n]);
                });
                Reply::Done
            }
            Request::Trim { offset, length, .. } | Request::WriteZeroes { offset, length, .. } => {
                self.each(offset, length as u64, |s, at, n, _| {
                    s.write().unwrap_or_else(|p| p.into_inner())[at..at + n].fill(0);
                });
                Reply::Done
            }
            Request::BlockStatus { length, .. } => {
                Reply::BlockStatus(vec![lunmpio_nbd::Extent { length, flags: 0 }])
            }
            Request::Flush { .. } | Request::Cache { .. } => Reply::Done,
        })
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "/tmp/lunmpio-nbd.sock".into());
    let size: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1 << 30);
    let _ = std::fs::remove_file(&path);
    let server = Server::new(ServerOptions::default());
    let mut cfg = ExportConfig::new("mem", size);
    cfg.flags |= TransmissionFlags::CAN_MULTI_CONN;
    server
        .add_export(cfg, Arc::new(Mem::new(size)))
        .map_err(std::io::Error::other)?;
    let listener = tokio::net::UnixListener::bind(&path)?;
    eprintln!("serving nbd+unix:///mem?socket={path}");
    Arc::new(server).serve_unix(listener).await
}
