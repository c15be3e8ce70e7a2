//! Arbitrary bytes from a "server" into the client's handshake and reply parsing, over an
//! in-memory duplex stream. The client must fail cleanly, never panic or hang.
//!
//! Each run gets its own runtime, dropped at the end of the run: dropping a runtime drops every task
//! still in it (the fake server, the client's reader and writer), so nothing a run started outlives
//! it. A runtime shared across runs kept aborted-but-never-polled tasks (and the duplex stream they
//! own) alive until exit, which LeakSanitizer rightly reported.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::{Client, ConnectOptions, Endpoint};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client_side, mut server) = tokio::io::duplex(1 << 20);
        let input = data.to_vec();
        let fake = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(&mut server);
            let write = async {
                let _ = wr.write_all(&input).await;
                // EOF after the input, so the client fails fast instead of timing out.
                let _ = wr.shutdown().await;
            };
            let read = async {
                let mut sink = vec![0u8; 1 << 16];
                while let Ok(n) = rd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(write, read);
        });
        let mut o = ConnectOptions::new(
            Endpoint::Unix {
                path: "fuzz".into(),
            },
            "x",
        );
        o.connect_timeout = Duration::from_millis(200);
        o.request_timeout = Some(Duration::from_millis(200));
        if let Ok(c) = Client::connect_stream(client_side, o).await {
            let size = c.info().size.min(1 << 16) as u32;
            let min = c.info().block_size.min.max(1);
            let len = (size / min * min).min(4096);
            if len > 0 {
                let _ = tokio::join!(
                    c.read(0, len),
                    c.read(0, len),
                    c.flush(),
                    c.block_status(0, len, Default::default())
                );
            }
            c.close();
        }
        fake.abort();
        let _ = fake.await;
    });
    drop(runtime);
});
