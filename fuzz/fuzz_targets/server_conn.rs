//! Arbitrary bytes from a "client" into the server's handshake and transmission, over an
//! in-memory duplex stream. The connection must end (no hang) without a panic.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::{CommandFlags, NbdErrno};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;

struct Zero;

impl Backend for Zero {
    async fn read(&self, _offset: u64, length: u32) -> Result<Bytes, NbdErrno> {
        Ok(Bytes::from(vec![0u8; length as usize]))
    }
    async fn write(
        &self,
        _offset: u64,
        _data: Bytes,
        _flags: CommandFlags,
    ) -> Result<(), NbdErrno> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), NbdErrno> {
        Ok(())
    }
    async fn trim(&self, _offset: u64, _length: u32, _flags: CommandFlags) -> Result<(), NbdErrno> {
        Err(NbdErrno::Io)
    }
    async fn write_zeroes(
        &self,
        _offset: u64,
        _length: u32,
        _flags: CommandFlags,
    ) -> Result<(), NbdErrno> {
        Ok(())
    }
}

fn setup() -> &'static (tokio::runtime::Runtime, Arc<Server<Zero>>) {
    static S: OnceLock<(tokio::runtime::Runtime, Arc<Server<Zero>>)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut s = Server::new(ServerOptions {
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
