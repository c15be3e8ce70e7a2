//! One conformance suite, run against every path transport (cloud-hypervisor's `block` crate does the
//! same for its backends): local files (buffered and `O_DIRECT`), and NBD against real peers we did
//! not write — `nbdkit memory` over a Unix socket, `qemu-nbd` on a raw file over TCP — and against our
//! own NBD server.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lunmpio_engine::transport::{
    ConnectLimits, FileTarget, PathConnection, PathErrorKind, PathTarget, Reply, Request,
};
use lunmpio_nbd::{CommandFlags, NbdErrno, TransmissionFlags};

use lunmpio_testkit::inprocess::pattern;
use lunmpio_testkit::{ProcessGuard, free_port, require_tool};

const SIZE_BYTES: u64 = 64 << 20;

async fn connect_with_deadline(target: &PathTarget) -> PathConnection {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match target.connect(ConnectLimits::default()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("could not connect to {target:?}: {e}"),
        }
    }
}

async fn read(conn: &PathConnection, offset: u64, length: u32) -> Bytes {
    match conn.submit(Request::Read { offset, length }).await {
        Ok(Reply::Read(data)) => data,
        Ok(other) => panic!("read answered {other:?}"),
        Err(f) => panic!("read {offset}+{length} failed: {}", f.error),
    }
}

async fn write(conn: &PathConnection, offset: u64, data: Bytes, flags: CommandFlags) {
    match conn
        .submit(Request::Write {
            offset,
            data,
            flags,
        })
        .await
    {
        Ok(Reply::Done) => {}
        Ok(other) => panic!("write answered {other:?}"),
        Err(f) => panic!("write {offset} failed: {}", f.error),
    }
}

/// The suite. Every transport must pass it unchanged.
async fn conformance(conn: PathConnection) {
    let info = conn.info().clone();
    assert_eq!(info.size_bytes, SIZE_BYTES, "size");
    assert!(!info.read_only);
    let block = info.block_size.min.max(4096) as u64;

    // Write then read back, at the start, in the middle, at the very end.
    for (i, offset) in [0, 17 * block, SIZE_BYTES - 2 * block]
        .into_iter()
        .enumerate()
    {
        let data = pattern(i as u64, 2 * block as usize);
        write(&conn, offset, data.clone(), CommandFlags::empty()).await;
        assert_eq!(
            read(&conn, offset, 2 * block as u32).await,
            data,
            "read back at {offset}"
        );
    }

    // FUA write and FLUSH.
    if info.flags.contains(TransmissionFlags::SEND_FUA) {
        write(&conn, block, pattern(9, block as usize), CommandFlags::FUA).await;
    }
    if info.flags.contains(TransmissionFlags::SEND_FLUSH) {
        let reply = conn
            .submit(Request::Flush {
                flags: CommandFlags::empty(),
            })
            .await;
        assert!(matches!(reply, Ok(Reply::Done)), "flush");
    }

    // WRITE_ZEROES reads back as zeroes; TRIM is accepted.
    if info.flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
        let offset = 40 * block;
        write(
            &conn,
            offset,
            pattern(3, 4 * block as usize),
            CommandFlags::empty(),
        )
        .await;
        let reply = conn
            .submit(Request::WriteZeroes {
                offset,
                length: 4 * block as u32,
                flags: CommandFlags::empty(),
            })
            .await;
        assert!(matches!(reply, Ok(Reply::Done)), "write zeroes");
        assert!(
            read(&conn, offset, 4 * block as u32)
                .await
                .iter()
                .all(|&b| b == 0)
        );
    }
    if info.flags.contains(TransmissionFlags::SEND_TRIM) {
        let reply = conn
            .submit(Request::Trim {
                offset: 100 * block,
                length: block as u32,
                flags: CommandFlags::empty(),
            })
            .await;
        assert!(matches!(reply, Ok(Reply::Done)), "trim");
    }

    // BLOCK_STATUS: at least one extent, never longer than asked.
    if info.base_allocation {
        let length = 64 * block as u32;
        match conn
            .submit(Request::BlockStatus {
                offset: 0,
                length,
                flags: CommandFlags::empty(),
            })
            .await
        {
            Ok(Reply::BlockStatus(extents)) => {
                assert!(!extents.is_empty());
                let total: u64 = extents.iter().map(|e| u64::from(e.length)).sum();
                assert!(
                    total > 0 && total <= u64::from(length),
                    "extents cover {total} of {length}"
                );
            }
            other => panic!("block status answered {:?}", other.map_err(|f| f.error)),
        }
    }

    // Many requests in flight at once, each to its own block.
    let blocks = 64u64;
    let base = 200 * block;
    let writes = (0..blocks).map(|i| {
        let conn = conn.clone();
        async move {
            write(
                &conn,
                base + i * block,
                pattern(1000 + i, block as usize),
                CommandFlags::empty(),
            )
            .await
        }
    });
    futures_join_all(writes).await;
    let reads = (0..blocks).map(|i| {
        let conn = conn.clone();
        async move { (i, read(&conn, base + i * block, block as u32).await) }
    });
    for (i, data) in futures_join_all(reads).await {
        assert_eq!(
            data,
            pattern(1000 + i, block as usize),
            "concurrent block {i}"
        );
    }

    // Errors that belong to the request come back with the request, and leave the path usable.
    let past_end = Request::Read {
        offset: SIZE_BYTES,
        length: block as u32,
    };
    let failed = conn
        .submit(past_end.clone())
        .await
        .expect_err("read past the end");
    assert!(failed.error.belongs_to_request(), "{:?}", failed.error);
    assert!(!failed.error.is_path_fault());
    assert_eq!(
        failed.request, past_end,
        "the request is handed back unchanged"
    );
    let write_past_end = Request::Write {
        offset: SIZE_BYTES,
        data: pattern(5, block as usize),
        flags: CommandFlags::empty(),
    };
    let failed = conn
        .submit(write_past_end)
        .await
        .expect_err("write past the end");
    assert!(
        matches!(
            failed.error.kind,
            PathErrorKind::Reply(NbdErrno::NoSpc)
                | PathErrorKind::Reply(NbdErrno::Inval)
                | PathErrorKind::Invalid
        ),
        "{:?}",
        failed.error
    );
    assert_eq!(
        read(&conn, 0, block as u32).await,
        pattern(0, 2 * block as usize).slice(..block as usize)
    );

    // Fencing: after close(), nothing runs and every request is handed back as Closed.
    conn.close();
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("closed() resolves");
    assert!(!conn.is_open());
    let request = Request::Read {
        offset: 0,
        length: block as u32,
    };
    let failed = conn
        .submit(request.clone())
        .await
        .expect_err("submit after close");
    assert!(failed.error.is_path_fault(), "{:?}", failed.error);
    assert_eq!(failed.request, request);
}

async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("lun0.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE_BYTES).unwrap();
    path
}

#[tokio::test]
async fn file_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = FileTarget::new(image(dir.path()));
    file.direct = false;
    let target = PathTarget::File(file);
    let conn = connect_with_deadline(&target).await;
    assert_eq!(conn.info().block_size.min, 1);
    conformance(conn).await;
}

#[tokio::test]
async fn file_direct() {
    // Created under the crate's target dir: tmpfs (where /tmp sometimes is) refuses O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let target =
        PathTarget::parse(&format!("file://{}", image(dir.path()).display()), None).unwrap();
    let conn = connect_with_deadline(&target).await;
    assert!(conn.info().can_multi_conn());
    conformance(conn).await;
}

#[tokio::test]
async fn file_missing_is_a_connect_error() {
    let target = PathTarget::parse("file:///nonexistent/lunmpio/disk", None).unwrap();
    let err = target
        .connect(ConnectLimits::default())
        .await
        .err()
        .expect("must fail");
    assert_eq!(err.kind, PathErrorKind::Connect);
    assert!(
        err.message.contains("/nonexistent/lunmpio/disk"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn nbd_nbdkit_memory_over_unix() {
    require_tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbdkit.sock");
    let _guard = ProcessGuard::spawn(
        "nbdkit",
        Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&socket)
            .args(["-e", "lun0", "memory", &SIZE_BYTES.to_string()])
            .stderr(Stdio::null()),
    );
    let uri = format!("nbd+unix:///lun0?socket={}", socket.display());
    let conn = connect_with_deadline(&PathTarget::parse(&uri, None).unwrap()).await;
    assert!(
        conn.info().can_multi_conn(),
        "nbdkit memory advertises multi-conn"
    );
    conformance(conn).await;
}

#[tokio::test]
async fn nbd_qemu_nbd_over_tcp() {
    require_tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _guard = ProcessGuard::spawn(
        "qemu-nbd",
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-x",
                "lun0",
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-e",
                "4",
                "-t",
            ])
            .arg(image(dir.path()))
            .stderr(Stdio::null()),
    );
    let uri = format!("nbd://127.0.0.1:{port}/lun0");
    let conn = connect_with_deadline(
        &PathTarget::parse(&uri, Some("127.0.0.1".parse().unwrap())).unwrap(),
    )
    .await;
    conformance(conn).await;
}

mod in_process {
    //! Our own server, with a memory backend, to keep the suite honest on both ends.
    use super::*;

    #[tokio::test]
    async fn nbd_our_server_over_unix() {
        let dir = tempfile::tempdir().unwrap();
        let socket = lunmpio_testkit::inprocess::serve(
            dir.path(),
            "ours",
            lunmpio_testkit::inprocess::Memory::new(SIZE_BYTES),
            SIZE_BYTES,
            true,
        );
        let uri = format!("nbd+unix:///lun0?socket={}", socket.display());
        let conn = connect_with_deadline(&PathTarget::parse(&uri, None).unwrap()).await;
        conformance(conn).await;
    }
}
