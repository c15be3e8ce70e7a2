//! Our client against real NBD servers: qemu-nbd and nbdkit (memory, file, and the error,
//! delay and blocksize-policy filters), plus killed and stopped servers.
//!
//! Every spawned process lives in a `ProcessGuard` (lunmpio-testkit) that kills it by its own PID on drop;
//! nbdkit also runs with `--exit-with-parent`. Sockets live in a tempdir, TCP ports are picked
//! free at run time.

mod common;

use common::{TEST_DEADLINE, pattern, within};
use lunmpio_nbd::*;
use lunmpio_testkit::{ProcessGuard, free_port, require_tool, spawn_tcp_server, spawn_unix_server};
use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// A child process killed (by its own PID) when dropped; a stopped one is continued first.
/// A peer and the directory its socket and image live in (removed after the peer is killed).
struct Proc {
    guard: ProcessGuard,
    _dir: Option<tempfile::TempDir>,
}

/// nbdkit on a Unix socket in a fresh tempdir. `args` are filters, the plugin and its params.
async fn nbdkit(args: &[&str]) -> (Proc, Endpoint, PathBuf) {
    require_tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let guard = spawn_unix_server(
        "nbdkit",
        Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-t", "16", "-U"])
            .arg(&sock)
            .args(args),
        &sock,
    );
    let d = dir.path().to_path_buf();
    (
        Proc {
            guard,
            _dir: Some(dir),
        },
        Endpoint::Unix { path: sock },
        d,
    )
}

fn raw_image(dir: &Path, size: usize) -> PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(size as u64)
        .unwrap();
    p
}

async fn qemu_nbd_unix(shared: u32) -> (Proc, Endpoint) {
    qemu_nbd_unix_sized(shared, 16 * MIB).await
}

async fn qemu_nbd_unix_sized(shared: u32, size: usize) -> (Proc, Endpoint) {
    require_tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), size);
    let sock = dir.path().join("qemu.sock");
    let guard = spawn_unix_server(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--persistent",
                "-t",
                "-x",
                "disk",
                "-e",
                &shared.to_string(),
                "-k",
            ])
            .arg(&sock)
            .arg(&img),
        &sock,
    );
    (
        Proc {
            guard,
            _dir: Some(dir),
        },
        Endpoint::Unix { path: sock },
    )
}

async fn client(ep: &Endpoint, export: &str) -> Client {
    within(Client::connect(ConnectOptions::new(ep.clone(), export)))
        .await
        .unwrap()
}

/// Write through one connection, read back through another, plus the other commands.
async fn exercise(ep: &Endpoint, export: &str) {
    let a = client(ep, export).await;
    let b = client(ep, export).await;
    let d = pattern(256 << 10, 11);
    a.write(MIB as u64, d.clone(), CommandFlags::empty())
        .await
        .unwrap();
    a.flush().await.unwrap();
    assert_eq!(b.read(MIB as u64, 256 << 10).await.unwrap(), d);
    // Many in flight on one connection.
    let futs = (0..64u64).map(|i| {
        let a = a.clone();
        async move {
            a.write(i * 4096, pattern(4096, i as u8), CommandFlags::empty())
                .await
        }
    });
    for r in futures::future::join_all(futs).await {
        r.unwrap();
    }
    let futs = (0..64u64).map(|i| {
        let b = b.clone();
        async move { (i, b.read(i * 4096, 4096).await.unwrap()) }
    });
    for (i, r) in futures::future::join_all(futs).await {
        assert_eq!(r, pattern(4096, i as u8));
    }
    if a.info()
        .flags
        .contains(TransmissionFlags::SEND_WRITE_ZEROES)
    {
        a.write_zeroes(0, 8192, CommandFlags::empty())
            .await
            .unwrap();
        assert!(b.read(0, 8192).await.unwrap().iter().all(|&x| x == 0));
    }
    if a.info().flags.contains(TransmissionFlags::SEND_TRIM) {
        a.trim(2 * MIB as u64, 65536, CommandFlags::empty())
            .await
            .unwrap();
    }
    if a.info().base_allocation.is_some() {
        let e = a
            .block_status(0, MIB as u32, CommandFlags::empty())
            .await
            .unwrap();
        assert!(!e.is_empty());
        assert!(e.iter().map(|x| x.length as u64).sum::<u64>() <= MIB as u64);
    }
    a.cache(0, 4096).await.unwrap();
    a.disconnect().await;
    b.disconnect().await;
}

#[tokio::test]
async fn qemu_nbd_single_connection_export() {
    let (_p, ep) = qemu_nbd_unix(1).await;
    let c = client(&ep, "disk").await;
    let info = c.info().clone();
    assert_eq!(info.size, 16 * MIB as u64);
    assert!(
        !info.flags.contains(TransmissionFlags::CAN_MULTI_CONN),
        "-e 1: no MULTI_CONN"
    );
    // qemu 10 has extended headers, and our client asks for them first.
    assert_eq!(info.mode, lunmpio_nbd::TransmissionMode::Extended);
    assert!(info.base_allocation.is_some());
    assert_eq!(info.negotiated_with, Negotiation::Go);
    let d = pattern(64 << 10, 1);
    c.write(0, d.clone(), CommandFlags::FUA).await.unwrap();
    assert_eq!(c.read(0, 64 << 10).await.unwrap(), d);
    // A range that is allocated then one that is not (raw file, sparse).
    let e = c
        .block_status(0, 128 << 10, CommandFlags::empty())
        .await
        .unwrap();
    assert_eq!(e[0].flags & Extent::HOLE, 0);
}

/// Extended headers with qemu-nbd on a 10 GiB sparse image: its BLOCK_STATUS_EXT extents run past
/// 32 bits (a 6 GiB hole), and come back clipped to each request; data far past 4 GiB round-trips.
#[tokio::test]
async fn qemu_nbd_extended_headers_past_four_gib() {
    const GIB: u64 = 1 << 30;
    let (_p, ep) = qemu_nbd_unix_sized(2, 10 << 30).await;
    let c = client(&ep, "disk").await;
    assert_eq!(c.info().mode, lunmpio_nbd::TransmissionMode::Extended);
    let d = pattern(1 << 20, 5);
    c.write(6 * GIB, d.clone(), CommandFlags::FUA)
        .await
        .unwrap();
    assert_eq!(c.read(6 * GIB, 1 << 20).await.unwrap(), d);
    // From 1 GiB, the hole runs 5 GiB; a request of just under 4 GiB gets one extent covering it.
    let length = u32::MAX / 4096 * 4096;
    let e = c
        .block_status(GIB, length, CommandFlags::empty())
        .await
        .unwrap();
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].length, length);
    assert_ne!(e[0].flags & Extent::HOLE, 0, "{e:?}");
    // Across the data: a hole up to 6 GiB, then data.
    let e = c
        .block_status(6 * GIB - 65536, 1 << 20, CommandFlags::empty())
        .await
        .unwrap();
    assert_eq!(e[0].length, 65536, "{e:?}");
    assert_eq!(e[1].flags & Extent::HOLE, 0, "{e:?}");
    c.write_zeroes(6 * GIB, 1 << 20, CommandFlags::empty())
        .await
        .unwrap();
    assert!(c.read(6 * GIB, 4096).await.unwrap().iter().all(|&b| b == 0));
    c.disconnect().await;
}

#[tokio::test]
async fn qemu_nbd_multi_connection_export() {
    let (_p, ep) = qemu_nbd_unix(8).await;
    let c = client(&ep, "disk").await;
    assert!(
        c.info().flags.contains(TransmissionFlags::CAN_MULTI_CONN),
        "-e 8: MULTI_CONN"
    );
    drop(c);
    within(exercise(&ep, "disk")).await;
}

#[tokio::test]
async fn qemu_nbd_over_tcp() {
    require_tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 16 * MIB);
    let port = free_port();
    let guard = spawn_tcp_server(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--persistent",
                "-t",
                "-x",
                "disk",
                "-e",
                "4",
                "-b",
                "127.0.0.1",
                "-p",
            ])
            .arg(port.to_string())
            .arg(&img),
        port,
    );
    let _p = Proc {
        guard,
        _dir: Some(dir),
    };
    let ep = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
        bind: Some("127.0.0.1".parse().unwrap()),
    };
    within(exercise(&ep, "disk")).await;
    let e = Client::connect(ConnectOptions::new(ep.clone(), "missing"))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Handshake(_)), "{e}");
}

#[tokio::test]
async fn nbdkit_memory() {
    let (_p, ep, _) = nbdkit(&["memory", "64M"]).await;
    let c = client(&ep, "").await;
    assert_eq!(c.info().size, 64 * MIB as u64);
    assert!(c.info().flags.contains(TransmissionFlags::CAN_MULTI_CONN));
    // nbdkit 1.32 answers EXTENDED_HEADERS with ERR_UNSUP: the client fell back to structured
    // replies, and everything below runs in compact headers.
    assert_eq!(c.info().mode, lunmpio_nbd::TransmissionMode::Structured);
    drop(c);
    within(exercise(&ep, "")).await;
}

#[tokio::test]
async fn nbdkit_file() {
    require_tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 16 * MIB);
    let (_p, ep, _) = nbdkit(&["file", img.to_str().unwrap()]).await;
    within(exercise(&ep, "")).await;
    // The data is really in the file.
    let on_disk = std::fs::read(&img).unwrap();
    assert_eq!(&on_disk[MIB..MIB + 4096], &pattern(256 << 10, 11)[..4096]);
}

#[tokio::test]
async fn nbdkit_error_filter() {
    require_tool("nbdkit", "nbdkit");
    let flagdir = tempfile::tempdir().unwrap();
    let flag = flagdir.path().join("fail");
    let error_file = format!("error-file={}", flag.display());
    let (_p, ep, _) = nbdkit(&[
        "--filter=error",
        "memory",
        "16M",
        "error-pread-rate=100%",
        "error=EIO",
        &error_file,
    ])
    .await;
    let c = client(&ep, "").await;
    c.write(0, pattern(4096, 3), CommandFlags::empty())
        .await
        .unwrap();
    assert_eq!(c.read(0, 4096).await.unwrap(), pattern(4096, 3));
    std::fs::write(&flag, b"").unwrap();
    for _ in 0..3 {
        let e = c.read(0, 4096).await.unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Server {
                    errno: NbdErrno::Io,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_path_fault());
    }
    // Writes are unaffected and the connection still works.
    c.write(4096, pattern(4096, 4), CommandFlags::empty())
        .await
        .unwrap();
    std::fs::remove_file(&flag).unwrap();
    assert_eq!(c.read(4096, 4096).await.unwrap(), pattern(4096, 4));
    assert!(c.is_open());
}

#[tokio::test]
async fn nbdkit_delay_filter_times_out() {
    let (_p, ep, _) = nbdkit(&["--filter=delay", "memory", "16M", "rdelay=3"]).await;
    let mut o = ConnectOptions::new(ep.clone(), "");
    o.request_timeout = Some(Duration::from_millis(300));
    let c = within(Client::connect(o)).await.unwrap();
    let e = within(c.submit(Request::Read {
        offset: 0,
        length: 4096,
    }))
    .await
    .unwrap_err();
    assert_eq!(e.error, ClientError::Timeout);
    assert_eq!(
        e.request,
        Request::Read {
            offset: 0,
            length: 4096
        }
    );
    assert!(c.is_open());
    // Writes are not delayed; the connection stays usable.
    c.write(0, pattern(4096, 9), CommandFlags::empty())
        .await
        .unwrap();
}

#[tokio::test]
async fn nbdkit_blocksize_policy_is_obeyed() {
    let (_p, ep, _) = nbdkit(&[
        "--filter=blocksize-policy",
        "memory",
        "16M",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=131072",
        "blocksize-error-policy=error",
    ])
    .await;
    let c = client(&ep, "").await;
    assert_eq!(
        c.info().block_size,
        BlockSize {
            min: 4096,
            preferred: 65536,
            max_payload: 131072
        }
    );
    // 1 MiB + 4 KiB: split into 128 KiB pieces; the server would refuse anything larger.
    let d = pattern(MIB + 4096, 21);
    within(c.write(4096, d.clone(), CommandFlags::empty()))
        .await
        .unwrap();
    assert_eq!(within(c.read(4096, (MIB + 4096) as u32)).await.unwrap(), d);
    within(c.write_zeroes(0, 2 * MIB as u32, CommandFlags::empty()))
        .await
        .unwrap();
    assert!(matches!(
        c.read(512, 4096).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(c.read(0, 512).await, Err(ClientError::Invalid(_))));
}

async fn start_inflight(
    c: &Client,
    n: u64,
) -> Vec<tokio::task::JoinHandle<(Request, Result<Reply, RequestError>)>> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let c = c.clone();
            let r = Request::Read {
                offset: i * 4096,
                length: 4096,
            };
            tokio::spawn(async move { (r.clone(), c.submit(r).await) })
        })
        .collect();
    within(async {
        while c.in_flight() < n as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    tasks
}

#[tokio::test]
async fn killed_server_fails_every_in_flight_request() {
    let (mut p, ep, _) = nbdkit(&["--filter=delay", "memory", "16M", "rdelay=10"]).await;
    let c = client(&ep, "").await;
    let tasks = start_inflight(&c, 16).await;
    p.guard.signal(Signal::SIGKILL);
    for t in tasks {
        let (sent, r) = within(t).await.unwrap();
        let e = r.unwrap_err();
        assert!(matches!(e.error, ClientError::Connection(_)), "{e:?}");
        assert!(e.error.is_path_fault());
        assert_eq!(e.request, sent);
    }
    within(c.closed()).await;
    drop(p);
}

#[tokio::test]
async fn stopped_server_times_out_every_in_flight_request() {
    let (mut p, ep, _) = nbdkit(&["memory", "16M"]).await;
    let mut o = ConnectOptions::new(ep.clone(), "");
    o.request_timeout = Some(Duration::from_millis(400));
    let c = within(Client::connect(o)).await.unwrap();
    c.write(0, pattern(4096, 1), CommandFlags::empty())
        .await
        .unwrap();
    p.guard.signal(Signal::SIGSTOP);
    p.guard.wait_stopped(TEST_DEADLINE);
    let tasks: Vec<_> = (0..16u64)
        .map(|i| {
            let c = c.clone();
            let r = Request::Read {
                offset: i * 4096,
                length: 4096,
            };
            tokio::spawn(async move { (r.clone(), c.submit(r).await) })
        })
        .collect();
    for t in tasks {
        let (sent, r) = within(t).await.unwrap();
        let Err(e) = r else {
            panic!("a request to a stopped server succeeded")
        };
        assert_eq!(e.error, ClientError::Timeout);
        assert_eq!(e.request, sent);
    }
    // The caller fences the path: close() returns at once even though the server is frozen.
    assert!(c.is_open());
    assert_eq!(c.in_flight(), 16);
    c.close();
    within(c.closed()).await;
    assert_eq!(c.in_flight(), 0);
    p.guard.signal(Signal::SIGCONT);
    drop(p);
}

#[tokio::test]
async fn nbdinfo_against_our_server() {
    require_tool("nbdinfo", "libnbd-bin");
    use common::{MemBackend, Mode, server_with, start_unix};
    let b = MemBackend::new(4 * MIB, Mode::Immediate);
    let mut cfg = lunmpio_nbd::server::ExportConfig::new("lun0", 4 * MIB as u64);
    cfg.description = Some("our export".into());
    let ts = start_unix(server_with(vec![(cfg, b)], Default::default())).await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    let uri = format!("nbd+unix:///lun0?socket={}", path.display());
    let out = tokio::process::Command::new("nbdinfo")
        .arg("--json")
        .arg(&uri)
        .output();
    let out = within(out).await.unwrap();
    assert!(
        out.status.success(),
        "nbdinfo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("\"export-size\": 4194304"), "{s}");
    assert!(s.contains("base:allocation"), "{s}");
    let uri_list = format!("nbd+unix://?socket={}", path.display());
    let out = within(
        tokio::process::Command::new("nbdinfo")
            .arg("--list")
            .arg(&uri_list)
            .output(),
    )
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo --list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("lun0"));
}

#[tokio::test]
async fn qemu_io_against_our_server() {
    require_tool("qemu-io", "qemu-utils");
    use common::{MemBackend, Mode, server_with, start_unix};
    let b = MemBackend::new(4 * MIB, Mode::Immediate);
    let cfg = lunmpio_nbd::server::ExportConfig::new("lun0", 4 * MIB as u64);
    let ts = start_unix(server_with(
        vec![(cfg, std::sync::Arc::clone(&b))],
        Default::default(),
    ))
    .await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    let uri = format!("nbd+unix:///lun0?socket={}", path.display());
    let out = tokio::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "flush",
            "-c",
            "discard 64k 64k",
        ])
        .arg(&uri)
        .output();
    let out = within(out).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("ailed"),
        "qemu-io: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.contents(0, 65536), vec![0xab; 65536]);
}
