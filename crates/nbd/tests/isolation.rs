//! A connection's requests run in one task: a backend that panics on one request fails that request
//! (EIO) and leaves the others on the connection running.

mod common;

use common::*;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::*;
use std::sync::Arc;

/// Panics on a read at offset 0; a read at any other offset waits for the gate.
#[derive(Default)]
struct PanicsAtZero {
    gate: tokio::sync::Notify,
    waiting: tokio::sync::Notify,
}

impl Backend for PanicsAtZero {
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        match request {
            Request::Read { offset: 0, .. } => panic!("a backend bug"),
            Request::Read { length, .. } => {
                let opened = self.gate.notified();
                self.waiting.notify_one();
                opened.await;
                Ok(Reply::Read(bytes::Bytes::from(vec![7; length as usize])))
            }
            _ => Ok(Reply::Done),
        }
    }
}

#[tokio::test]
async fn a_panic_in_the_backend_fails_only_its_request() {
    let backend = Arc::new(PanicsAtZero::default());
    let server = Server::new(ServerOptions::default());
    server
        .add_export(ExportConfig::new("disk", 1 << 20), Arc::clone(&backend))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(Arc::new(server).serve_unix(listener));
    let client = connect(&Endpoint::Unix { path }, "disk").await;
    let waiting = backend.waiting.notified();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.read(4096, 4096).await })
    };
    within(waiting).await;
    let failed = within(client.read(0, 4096)).await.unwrap_err();
    assert_eq!(
        failed,
        ClientError::Server {
            errno: NbdErrno::Io,
            message: None
        },
        "the request that met the panic gets EIO"
    );
    backend.gate.notify_waiters();
    let data = within(slow)
        .await
        .unwrap()
        .expect("the other request completes");
    assert_eq!(data, vec![7u8; 4096]);
    assert!(client.is_open(), "the connection survives");
}
