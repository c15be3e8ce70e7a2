//! Arbitrary bytes from a "client" into the server's handshake and transmission, over an
//! in-memory duplex stream. The connection must end (no hang) without a panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::{NbdErrno, Reply, Request};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;

struct Zero;

impl Backend for Zero {
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        match request {
            Request::Read { length, .. } => {
                Ok(Reply::Read(Bytes::from(vec![0u8; length as usize])))
            }
            // One command fails, so error replies are on the fuzzed paths too.
            Request::Trim { .. } => Err(NbdErrno::Io),
            Request::BlockStatus { length, .. } => {
                Ok(Reply::BlockStatus(vec![lunmpio_nbd::Extent {
                    length,
                    flags: 0,
                }]))
            }
            _ => Ok(Reply::Done),
        }
    }
}

fn setup() -> &'static (tokio::runtime::Runtime, Arc<Server<Zero>>) {
    static S: OnceLock<(tokio::runtime::Runtime, Arc<Server<Zero>>)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = Server::new(ServerOptions {
            max_in_flight_per_connection: 16,
            handshake_timeout: Duration::from_secs(5),
            ..ServerOptions::default()
        });
        s.add_export(ExportConfig::new("", SIZE), Arc::new(Zero))
            .unwrap();
        let mut ro = ExportConfig::new("ro", SIZE);
        ro.flags |= lunmpio_nbd::TransmissionFlags::READ_ONLY;
        s.add_export(ro, Arc::new(Zero)).unwrap();
        (rt, Arc::new(s))
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, server) = setup();
    rt.block_on(async {
        let (mut client, server_side) = tokio::io::duplex(1 << 20);
        let srv = Arc::clone(server);
        let task = tokio::spawn(async move { srv.serve_connection(server_side).await });
        let input = data.to_vec();
        let io = async move {
            let (mut rd, mut wr) = tokio::io::split(&mut client);
            let write = async {
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            tokio::join!(write, read);
        };
        tokio::time::timeout(Duration::from_secs(10), io)
            .await
            .expect("server connection hung");
        let _ = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server task hung");
    });
});
