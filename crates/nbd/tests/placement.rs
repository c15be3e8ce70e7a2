//! `Server::add_export_on`: once the handshake has chosen the export, the connection's requests run on
//! the export's runtime (the daemon's data thread), over TCP and Unix sockets alike.

mod common;

use common::*;
use lunmpio_nbd::server::{Backend, ExportConfig, Server, ServerOptions};
use lunmpio_nbd::*;
use std::sync::{Arc, Mutex};

/// Answers every request and remembers the thread each one ran on.
#[derive(Default)]
struct Threads {
    seen: Mutex<Vec<String>>,
}

impl Backend for Threads {
    async fn handle(&self, request: Request) -> Result<Reply, NbdErrno> {
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.seen.lock().unwrap().push(name);
        Ok(match request {
            Request::Read { length, .. } => {
                Reply::Read(bytes::Bytes::from(vec![0; length as usize]))
            }
            _ => Reply::Done,
        })
    }
}

/// A current-thread runtime driven by its own thread, named `name`, until the sender is dropped.
fn export_thread(name: &str) -> (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = runtime.block_on(stopped);
        })
        .unwrap();
    (handle, stop)
}

async fn requests_run_on_the_export_thread(tcp: bool) {
    let (runtime, _stop) = export_thread("export-thread");
    let backend = Arc::new(Threads::default());
    let server = Server::new(ServerOptions::default());
    server
        .add_export_on(
            ExportConfig::new("disk", 1 << 20),
            Arc::clone(&backend),
            runtime,
        )
        .unwrap();
    let server = Arc::new(server);
    let dir = tempfile::tempdir().unwrap();
    let endpoint = if tcp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(Arc::clone(&server).serve_tcp(listener));
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port,
            bind: None,
        }
    } else {
        let path = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(Arc::clone(&server).serve_unix(listener));
        Endpoint::Unix { path }
    };
    let client = connect(&endpoint, "disk").await;
    let data = pattern(8192, 3);
    client.write(0, data, CommandFlags::empty()).await.unwrap();
    assert_eq!(client.read(4096, 4096).await.unwrap().len(), 4096);
    client.flush().await.unwrap();
    client.disconnect().await;
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        3,
        "three requests reached the backend: {seen:?}"
    );
    assert!(
        seen.iter().all(|t| t == "export-thread"),
        "every request ran on the export's thread, not the accepting one: {seen:?}"
    );
    server.shutdown();
    server.wait_idle().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_moves_to_its_exports_runtime() {
    requests_run_on_the_export_thread(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_connection_moves_to_its_exports_runtime() {
    requests_run_on_the_export_thread(false).await;
}
