//! A TCP relay in front of a real NBD server that can *reset one side*: the partition a flaky switch or
//! a dying NIC makes. lunmpio connects to the relay; the relay connects on to the server (a Unix
//! socket). `reset_and_refuse` answers lunmpio's side with an RST and refuses new connections, while the
//! server's side stays open: the server goes on executing whatever it has already read, exactly what
//! nbdkit and qemu-nbd do after their client vanishes. `forward` lets new connections through again.
//!
//! It runs on its own thread with its own runtime, so a synchronous test can drive it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    ResetAndRefuse,
}

/// A running relay; dropping it stops it (and closes the server-side connections it held).
pub struct ResetRelay {
    /// `127.0.0.1:PORT` to point lunmpio at.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bytes forwarded from lunmpio to the server, over every connection.
    to_server: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ResetRelay {
    /// Relays TCP connections on a free local port to the Unix socket `upstream`.
    pub fn start(upstream: &Path) -> ResetRelay {
        let upstream = upstream.to_path_buf();
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("relay address");
        let (mode, mode_rx) = watch::channel(Mode::Forward);
        let to_server = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let counter = Arc::clone(&to_server);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("relay runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("tokio listener");
                tokio::select! {
                    _ = stop_rx => {}
                    _ = accept_loop(listener, upstream, mode_rx, counter) => {}
                }
            });
        });
        ResetRelay {
            addr,
            mode,
            to_server,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` through the relay.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    /// Resets every client connection (RST to lunmpio) and refuses new ones; server sides stay open.
    pub fn reset_and_refuse(&self) {
        self.mode.send_replace(Mode::ResetAndRefuse);
    }

    /// Lets new connections through again.
    pub fn forward(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    pub fn bytes_to_server(&self) -> u64 {
        self.to_server.load(Ordering::Acquire)
    }
}

impl Drop for ResetRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: PathBuf,
    mode: watch::Receiver<Mode>,
    to_server: Arc<AtomicU64>,
) {
    // Server sides of reset connections: kept open (unread) until the relay stops.
    let held: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if *mode.borrow() == Mode::ResetAndRefuse {
            reset(client);
            continue;
        }
        let Ok(server) = UnixStream::connect(&upstream).await else {
            reset(client);
            continue;
        };
        tokio::spawn(relay_one(
            client,
            server,
            mode.clone(),
            Arc::clone(&to_server),
            Arc::clone(&held),
        ));
    }
}

async fn relay_one(
    client: TcpStream,
    server: UnixStream,
    mut mode: watch::Receiver<Mode>,
    to_server: Arc<AtomicU64>,
    held: Arc<Mutex<Vec<UnixStream>>>,
) {
    let _ = client.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let upward = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = client_rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            server_wr.write_all(&buf[..n]).await?;
            to_server.fetch_add(n as u64, Ordering::AcqRel);
        }
    };
    let downward = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = server_rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            client_wr.write_all(&buf[..n]).await?;
        }
    };
    let reset_now = mode.wait_for(|m| *m == Mode::ResetAndRefuse);
    tokio::select! {
        _ = upward => {}
        _ = downward => {}
        _ = reset_now => {
            let client = client_rd.reunite(client_wr).expect("same stream");
            reset(client);
            let server = server_rd.reunite(server_wr).expect("same stream");
            held.lock().unwrap().push(server);
        }
    }
}

/// Closes with an RST (SO_LINGER on, timeout 0), not a FIN.
fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
