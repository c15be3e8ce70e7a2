//! Our client against our server, in one process, over Unix and TCP sockets.

mod common;

use bytes::Bytes;
use common::raw::{AnyReply, Raw, req};
use common::*;
use lunmpio_nbd::proto::*;
use lunmpio_nbd::server::{ExportConfig, ServerOptions};
use lunmpio_nbd::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const MIB: usize = 1 << 20;

fn export(name: &str, size: usize) -> ExportConfig {
    let mut c = ExportConfig::new(name, size as u64);
    c.flags |= TransmissionFlags::CAN_MULTI_CONN | TransmissionFlags::SEND_FAST_ZERO;
    c
}

async fn exercise(endpoint: &Endpoint) {
    let c = connect(endpoint, "disk").await;
    let info = c.info().clone();
    assert_eq!(info.size, 8 * MIB as u64);
    assert_eq!(info.negotiated_with, Negotiation::Go);
    assert_eq!(info.mode, TransmissionMode::Extended);
    assert!(info.base_allocation.is_some());
    assert!(info.flags.contains(TransmissionFlags::CAN_MULTI_CONN));
    assert_eq!(info.block_size, BlockSize::default());

    let data = pattern(64 << 10, 7);
    c.write(4096, data.clone(), CommandFlags::FUA)
        .await
        .unwrap();
    assert_eq!(c.read(4096, 64 << 10).await.unwrap(), data);
    c.flush().await.unwrap();
    c.cache(0, 4096).await.unwrap();

    // Block status: [0,4K) hole, [4K, 68K) data, rest hole.
    let ext = c
        .block_status(0, 128 << 10, CommandFlags::empty())
        .await
        .unwrap();
    assert_eq!(
        ext,
        vec![
            Extent {
                length: 4096,
                flags: Extent::HOLE | Extent::ZERO
            },
            Extent {
                length: 64 << 10,
                flags: 0
            },
            Extent {
                length: 60 << 10,
                flags: Extent::HOLE | Extent::ZERO
            },
        ]
    );
    let one = c
        .block_status(0, 128 << 10, CommandFlags::REQ_ONE)
        .await
        .unwrap();
    assert_eq!(one.len(), 1);

    c.trim(4096, 4096, CommandFlags::empty()).await.unwrap();
    c.write_zeroes(8192, 8192, CommandFlags::NO_HOLE)
        .await
        .unwrap();
    let r = c.read(4096, 16384).await.unwrap();
    assert!(r[..12288].iter().all(|&b| b == 0));
    assert_eq!(&r[12288..], &data[12288..16384]);

    // Data written on one connection reads back on another.
    let c2 = connect(endpoint, "disk").await;
    assert_eq!(
        c2.read(4096 + 16384, 4096).await.unwrap(),
        &data[16384..20480]
    );

    c.disconnect().await;
    assert!(!c.is_open());
    assert_eq!(c.read(0, 512).await.unwrap_err(), ClientError::Closed);
    c2.close();
}

#[tokio::test]
async fn basic_ops_unix() {
    let b = MemBackend::new(8 * MIB, Mode::Immediate);
    let ts = start_unix(server_with(
        vec![(export("disk", 8 * MIB), b)],
        ServerOptions::default(),
    ))
    .await;
    within(exercise(&ts.endpoint)).await;
}

#[tokio::test]
async fn basic_ops_tcp() {
    let b = MemBackend::new(8 * MIB, Mode::Immediate);
    let ts = start_tcp(server_with(
        vec![(export("disk", 8 * MIB), b)],
        ServerOptions::default(),
    ))
    .await;
    within(exercise(&ts.endpoint)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_in_flight_replied_in_reverse() {
    const N: usize = 256;
    let data = pattern(4 * MIB, 3);
    // Every read of a batch is held until all N arrived, then they finish last-first: this
    // only completes if N requests are in flight at once on one connection.
    let b = MemBackend::new(4 * MIB, Mode::ReverseBatches(N));
    b.poke(0, &data);
    let ts = start_unix(server_with(
        vec![(export("disk", 4 * MIB), Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let c = connect(&ts.endpoint, "disk").await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let futs = (0..N).map(|i| {
        let c = c.clone();
        let order = Arc::clone(&order);
        async move {
            let r = c.read((i * 4096) as u64, 4096).await;
            order.lock().unwrap().push(i);
            (i, r)
        }
    });
    let results = within(futures::future::join_all(futs)).await;
    for (i, r) in results {
        assert_eq!(r.unwrap(), &data[i * 4096..(i + 1) * 4096], "read {i}");
    }
    let order = order.lock().unwrap().clone();
    let sorted: Vec<usize> = (0..N).collect();
    assert_ne!(order, sorted, "replies should complete out of order");
    assert_eq!(c.in_flight(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_order_mixed_load() {
    let b = MemBackend::new(4 * MIB, Mode::Shuffle);
    let ts = start_tcp(server_with(
        vec![(export("disk", 4 * MIB), Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let mut o = opts(&ts.endpoint, "disk");
    o.max_in_flight = 64;
    let c = Client::connect(o).await.unwrap();
    // 1024 writes of distinct blocks, then 1024 reads, all concurrent within each phase.
    let writes = (0..1024u64).map(|i| {
        let c = c.clone();
        async move {
            c.write(i * 4096, pattern(4096, i as u8), CommandFlags::empty())
                .await
        }
    });
    for r in within(futures::future::join_all(writes)).await {
        r.unwrap();
    }
    let reads = (0..1024u64).map(|i| {
        let c = c.clone();
        async move { (i, c.read(i * 4096, 4096).await.unwrap()) }
    });
    for (i, d) in within(futures::future::join_all(reads)).await {
        assert_eq!(d, pattern(4096, i as u8));
    }
}

#[tokio::test]
async fn splits_above_max_payload() {
    let b = MemBackend::new(4 * MIB, Mode::Immediate);
    let mut cfg = export("disk", 4 * MIB);
    cfg.block_size = BlockSize {
        min: 512,
        preferred: 4096,
        max_payload: 64 << 10,
    };
    let ts = start_unix(server_with(
        vec![(cfg, Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let c = connect(&ts.endpoint, "disk").await;
    assert_eq!(c.info().block_size.max_payload, 64 << 10);
    let data = pattern(MIB + 512, 9);
    within(c.write(512, data.clone(), CommandFlags::empty()))
        .await
        .unwrap();
    assert_eq!(within(c.read(512, (MIB + 512) as u32)).await.unwrap(), data);
    assert_eq!(b.contents(512, MIB + 512), data.to_vec());
    assert_eq!(b.max_len.load(Ordering::SeqCst), 64 << 10);
    c.write_zeroes(0, 2 * MIB as u32, CommandFlags::empty())
        .await
        .unwrap();
    assert!(b.contents(0, 2 * MIB).iter().all(|&x| x == 0));
    // Misaligned and out-of-range requests are refused locally.
    assert!(matches!(
        c.read(100, 512).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(c.read(0, 100).await, Err(ClientError::Invalid(_))));
    assert!(matches!(
        c.read(4 * MIB as u64, 512).await,
        Err(ClientError::Invalid(_))
    ));
    let e = c
        .submit(Request::Read {
            offset: u64::MAX - 511,
            length: 512,
        })
        .await
        .unwrap_err();
    assert!(matches!(e.error, ClientError::Invalid(_)));
    assert_eq!(
        e.request,
        Request::Read {
            offset: u64::MAX - 511,
            length: 512
        }
    );
}

#[tokio::test]
async fn read_only_export() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut cfg = export("ro", MIB);
    cfg.flags |= TransmissionFlags::READ_ONLY;
    let ts = start_unix(server_with(vec![(cfg, b)], ServerOptions::default())).await;
    let c = connect(&ts.endpoint, "ro").await;
    assert!(c.info().flags.contains(TransmissionFlags::READ_ONLY));
    assert!(matches!(
        c.write(0, pattern(512, 1), CommandFlags::empty()).await,
        Err(ClientError::Invalid(_))
    ));
    assert!(matches!(
        c.trim(0, 512, CommandFlags::empty()).await,
        Err(ClientError::Invalid(_))
    ));
    c.read(0, 512).await.unwrap();
    c.flush().await.unwrap();
    // The server refuses too (raw client, bypassing the local check).
    let Endpoint::Unix { path } = &ts.endpoint else {
        unreachable!()
    };
    let mut raw = Raw::new(tokio::net::UnixStream::connect(path).await.unwrap());
    raw.go("ro", true, false).await;
    raw.request(req(Command::Write, 1, 0, 512), &[0u8; 512])
        .await;
    assert_eq!(raw.errno_of_next().await, NBD_EPERM);
    raw.request(req(Command::WriteZeroes, 2, 0, 512), &[]).await;
    assert_eq!(raw.errno_of_next().await, NBD_EPERM);
    raw.request(req(Command::Trim, 3, 0, 512), &[]).await;
    assert_eq!(raw.errno_of_next().await, NBD_EPERM);
}

#[tokio::test]
async fn structured_replies_off() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), b)],
        ServerOptions::default(),
    ))
    .await;
    let mut o = opts(&ts.endpoint, "disk");
    o.structured_replies = false;
    let c = Client::connect(o).await.unwrap();
    assert_eq!(c.info().mode, TransmissionMode::Simple);
    assert_eq!(c.info().base_allocation, None);
    let d = pattern(8192, 5);
    c.write(0, d.clone(), CommandFlags::empty()).await.unwrap();
    assert_eq!(c.read(0, 8192).await.unwrap(), d);
    assert!(matches!(
        c.block_status(0, 4096, CommandFlags::empty()).await,
        Err(ClientError::Invalid(_))
    ));
    // Errors come back as simple replies: EINVAL from the server for an unadvertised... (the
    // client refuses locally, so check a server error through a raw request instead).
    let Endpoint::Unix { path } = &ts.endpoint else {
        unreachable!()
    };
    let mut raw = Raw::new(tokio::net::UnixStream::connect(path).await.unwrap());
    raw.go("disk", false, false).await;
    raw.request(req(Command::Read, 9, MIB as u64, 512), &[])
        .await;
    match raw.any_reply(|_| 512).await.unwrap() {
        AnyReply::Simple(h, _) => assert_eq!((h.cookie, h.error), (9, NBD_EINVAL)),
        other => panic!("{other:?}"),
    }
    raw.request(req(Command::Read, 10, 0, 512), &[]).await;
    match raw.any_reply(|_| 512).await.unwrap() {
        AnyReply::Simple(h, data) => assert_eq!((h.cookie, h.error, &data[..]), (10, 0, &d[..512])),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn base_allocation_not_requested() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), b)],
        ServerOptions::default(),
    ))
    .await;
    let mut o = opts(&ts.endpoint, "disk");
    o.base_allocation = false;
    let c = Client::connect(o).await.unwrap();
    assert!(c.info().mode.chunked());
    assert_eq!(c.info().base_allocation, None);
    assert!(matches!(
        c.block_status(0, 4096, CommandFlags::empty()).await,
        Err(ClientError::Invalid(_))
    ));
}

#[tokio::test]
async fn unknown_export_and_default_export() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), b)],
        ServerOptions::default(),
    ))
    .await;
    let e = Client::connect(opts(&ts.endpoint, "nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ClientError::Handshake(m) if m.contains("NBD_REP_ERR_UNKNOWN")),
        "{e}"
    );
    // The empty name selects the only export.
    let c = connect(&ts.endpoint, "").await;
    assert_eq!(c.info().size, MIB as u64);
}

#[tokio::test]
async fn request_timeout_leaves_connection_open() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let mut o = opts(&ts.endpoint, "disk");
    o.request_timeout = Some(Duration::from_millis(200));
    let c = Client::connect(o).await.unwrap();
    b.gated.store(true, Ordering::SeqCst);
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
    assert!(e.error.is_path_fault());
    assert!(c.is_open());
    assert_eq!(c.in_flight(), 1, "the server still owes the reply");
    b.open_gate();
    // The late reply is discarded; the connection keeps working.
    c.read(0, 4096).await.unwrap();
    within(async {
        while c.in_flight() != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test]
async fn close_hands_back_every_in_flight_request() {
    const N: usize = 50;
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    b.gated.store(true, Ordering::SeqCst);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let c = connect(&ts.endpoint, "disk").await;
    let mut tasks = Vec::new();
    for i in 0..N {
        let c = c.clone();
        let r = if i % 2 == 0 {
            Request::Read {
                offset: (i * 4096) as u64,
                length: 4096,
            }
        } else {
            Request::Write {
                offset: (i * 4096) as u64,
                data: pattern(4096, i as u8),
                flags: CommandFlags::empty(),
            }
        };
        tasks.push(tokio::spawn(async move { (r.clone(), c.submit(r).await) }));
    }
    for _ in 0..N {
        within(arrivals.recv()).await.unwrap();
    }
    assert_eq!(c.in_flight(), N);
    let watcher = {
        let c = c.clone();
        tokio::spawn(async move { c.closed().await })
    };
    c.close();
    for t in tasks {
        let (sent, r) = within(t).await.unwrap();
        let e = r.unwrap_err();
        assert_eq!(e.error, ClientError::Closed);
        assert_eq!(e.request, sent);
    }
    within(watcher).await.unwrap();
    assert!(!c.is_open());
    assert_eq!(c.in_flight(), 0);
    b.open_gate();
}

#[tokio::test]
async fn shutdown_drains_and_refuses_new_requests() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    b.gated.store(true, Ordering::SeqCst);
    let server = server_with(
        vec![(export("disk", MIB), Arc::clone(&b))],
        ServerOptions::default(),
    );
    let ts = start_unix(Arc::clone(&server)).await;
    let c = connect(&ts.endpoint, "disk").await;
    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.read(0, 4096).await })
    };
    within(arrivals.recv()).await.unwrap();
    server.shutdown();
    // A request sent after the shutdown gets ESHUTDOWN (the first one is still in flight).
    let e = within(c.write(4096, pattern(4096, 1), CommandFlags::empty()))
        .await
        .unwrap_err();
    assert_eq!(
        e,
        ClientError::Server {
            errno: NbdErrno::Shutdown,
            message: None
        }
    );
    assert!(e.is_path_fault());
    b.open_gate();
    within(first).await.unwrap().unwrap();
    within(server.wait_idle()).await;
    within(c.closed()).await;
    within(ts.task).await.unwrap().unwrap();
    assert_eq!(b.contents(4096, 4096), vec![0; 4096]);
}

/// A request read while its connection is at its byte budget (the client has not read the reply
/// ahead of it) has not started when the server shuts down: it is answered ESHUTDOWN, not dropped
/// (a client would wait for that reply forever).
#[tokio::test]
async fn a_request_waiting_for_the_byte_budget_at_shutdown_is_answered() {
    let max = MAX_PAYLOAD_BYTES;
    let b = MemBackend::new(2 * max as usize, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    b.gated.store(true, Ordering::SeqCst);
    let options = ServerOptions {
        connection_bytes_max: max as usize,
        ..ServerOptions::default()
    };
    let server = server_with(vec![(export("disk", 2 * max as usize), b.clone())], options);
    let ts = start_unix(Arc::clone(&server)).await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.go("disk", false, false).await;
    // Both in one write, so the server reads them together: the first takes the whole budget, the
    // second waits for room.
    let mut both = bytes::BytesMut::new();
    req(Command::Read, 1, 0, max).encode(&mut both);
    req(Command::Read, 2, 0, 4096).encode(&mut both);
    raw.send(&both).await;
    within(arrivals.recv()).await.unwrap();
    server.shutdown();
    b.open_gate();
    let read_len = |cookie: u64| if cookie == 1 { max as usize } else { 4096 };
    let mut errors = std::collections::HashMap::new();
    for _ in 0..2 {
        match within(raw.any_reply(read_len)).await {
            Some(AnyReply::Simple(h, _)) => errors.insert(h.cookie, h.error),
            other => panic!("a simple reply for each request, got {other:?}"),
        };
    }
    assert_eq!(errors[&1], 0, "the first read completes");
    assert_eq!(
        errors[&2],
        NbdErrno::Shutdown.to_wire(),
        "the waiting one is refused with ESHUTDOWN"
    );
    assert!(within(raw.at_eof()).await);
    within(server.wait_idle()).await;
}

#[tokio::test]
async fn garbage_closes_only_that_connection() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), b)],
        ServerOptions::default(),
    ))
    .await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    let good = connect(&ts.endpoint, "disk").await;

    // Garbage instead of client flags.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.greeting().await;
    raw.send(b"\xde\xad\xbe\xef garbage garbage garbage").await;
    assert!(within(raw.at_eof()).await);

    // Garbage instead of an option.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.start(ClientFlags::FIXED_NEWSTYLE).await;
    raw.send(&[0x55; 64]).await;
    assert!(within(raw.at_eof()).await);

    // An absurd option length.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.start(ClientFlags::FIXED_NEWSTYLE).await;
    let mut b = bytes::BytesMut::new();
    bytes::BufMut::put_u64(&mut b, IHAVEOPT);
    bytes::BufMut::put_u32(&mut b, NBD_OPT_GO);
    bytes::BufMut::put_u32(&mut b, u32::MAX);
    raw.send(&b).await;
    assert!(within(raw.at_eof()).await);

    // Garbage in transmission.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.go("disk", true, true).await;
    raw.send(&[0xff; 100]).await;
    assert!(within(raw.at_eof()).await);

    // A WRITE claiming a 4 GiB payload is never allocated: the connection closes.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.go("disk", true, true).await;
    raw.request(req(Command::Write, 1, 0, u32::MAX), &[1, 2, 3])
        .await;
    assert!(within(raw.at_eof()).await);

    // A truncated request then EOF.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.go("disk", false, false).await;
    raw.send(&NBD_REQUEST_MAGIC.to_be_bytes()).await;
    raw.s.shutdown().await.unwrap();
    assert!(within(raw.at_eof()).await);

    // Unknown client flags.
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.start(ClientFlags::from_bits_retain(0x80)).await;
    assert!(within(raw.at_eof()).await);

    // The other connection and new ones are fine.
    good.write(0, pattern(4096, 2), CommandFlags::empty())
        .await
        .unwrap();
    let c2 = connect(&ts.endpoint, "disk").await;
    assert_eq!(c2.read(0, 4096).await.unwrap(), pattern(4096, 2));
}

use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn handshake_timeout_closes_idle_connection() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let options = ServerOptions {
        handshake_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let ts = start_unix(server_with(vec![(export("disk", MIB), b)], options)).await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    let mut raw = Raw::new(tokio::net::UnixStream::connect(&path).await.unwrap());
    raw.greeting().await;
    assert!(within(raw.at_eof()).await);
    within(ts.server.wait_idle()).await;
}

#[tokio::test]
async fn server_bounds_in_flight_per_connection() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    b.gated.store(true, Ordering::SeqCst);
    let options = ServerOptions {
        max_in_flight_per_connection: 4,
        ..Default::default()
    };
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), Arc::clone(&b))],
        options,
    ))
    .await;
    let c = connect(&ts.endpoint, "disk").await;
    let tasks: Vec<_> = (0..10u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    for _ in 0..4 {
        within(arrivals.recv()).await.unwrap();
    }
    // Absence cannot be awaited: give the server a moment to (wrongly) read more.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(b.ops.load(Ordering::SeqCst), 4);
    assert_eq!(c.in_flight(), 10);
    b.open_gate();
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn client_bounds_in_flight() {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    b.gated.store(true, Ordering::SeqCst);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let mut o = opts(&ts.endpoint, "disk");
    o.max_in_flight = 3;
    let c = Client::connect(o).await.unwrap();
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move { c.read(i * 4096, 4096).await })
        })
        .collect();
    for _ in 0..3 {
        within(arrivals.recv()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(c.in_flight(), 3);
    b.open_gate();
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
}

/// `try_start` hands a request over without waiting only when it can: one wire request, a free
/// slot. The future it returns may be moved while it waits, and a connection that dies hands the
/// request back marked sent.
#[tokio::test]
async fn try_start_hands_over_at_once_or_gives_the_request_back() {
    let b = MemBackend::new(4 * MIB, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    let mut cfg = export("disk", 4 * MIB);
    cfg.block_size = BlockSize {
        min: 512,
        preferred: 4096,
        max_payload: 64 << 10,
    };
    let ts = start_unix(server_with(
        vec![(cfg, Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let mut o = opts(&ts.endpoint, "disk");
    o.max_in_flight = 2;
    let c = Client::connect(o).await.unwrap();
    let write = Request::Write {
        offset: 4096,
        data: pattern(4096, 3),
        flags: CommandFlags::empty(),
    };
    let started = c.try_start(write).expect("one piece, a free slot");
    assert!(started.sent());
    // Moved into another task while it waits.
    let reply = within(tokio::spawn(started)).await.unwrap();
    assert_eq!(reply.unwrap(), Reply::Done);
    assert_eq!(b.contents(4096, 4096), pattern(4096, 3).to_vec());
    // Longer than the maximum payload: it must be split, which the async path does.
    let long = Request::Read {
        offset: 0,
        length: 128 << 10,
    };
    assert_eq!(c.try_start(long.clone()).err(), Some(long));
    // Both slots taken: nothing is handed over, nothing is sent.
    b.gated.store(true, Ordering::SeqCst);
    let first = c
        .try_start(Request::Read {
            offset: 0,
            length: 512,
        })
        .unwrap();
    let second = c
        .try_start(Request::Read {
            offset: 512,
            length: 512,
        })
        .unwrap();
    for _ in 0..2 {
        within(arrivals.recv()).await.unwrap();
    }
    let third = Request::Read {
        offset: 1024,
        length: 512,
    };
    assert_eq!(c.try_start(third.clone()).err(), Some(third));
    // The connection closes under them: each comes back, marked sent.
    c.close();
    for (started, offset) in [(first, 0), (second, 512)] {
        let e = within(started).await.unwrap_err();
        assert_eq!(e.error, ClientError::Closed);
        assert!(e.sent);
        assert_eq!(
            e.request,
            Request::Read {
                offset,
                length: 512
            }
        );
    }
    b.open_gate();
}

/// A scripted server: answers GO with ERR_UNSUP, accepts EXPORT_NAME with the 124 zero bytes
/// (no NO_ZEROES in its greeting), then answers one READ with a simple reply.
#[tokio::test]
async fn export_name_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut raw = Raw::new(s);
        let mut out = bytes::BytesMut::new();
        Greeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE,
        }
        .encode(&mut out);
        raw.send(&out).await;
        while raw.buf.len() < 4 {
            assert!(raw.more().await);
        }
        let flags = decode_client_flags(&raw.buf).unwrap().unwrap();
        assert!(!flags.contains(ClientFlags::NO_ZEROES));
        bytes::Buf::advance(&mut raw.buf, 4);
        loop {
            let opt = loop {
                if let Some(o) = RawOption::decode(&mut raw.buf).unwrap() {
                    break o;
                }
                assert!(raw.more().await);
            };
            let mut out = bytes::BytesMut::new();
            if opt.option == NBD_OPT_EXPORT_NAME {
                assert_eq!(&opt.data[..], b"legacy");
                ExportNameReply {
                    size: 1 << 20,
                    flags: TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH,
                }
                .encode(false, &mut out);
                raw.send(&out).await;
                break;
            }
            OptionReply::Error {
                error: OptionError::Unsup,
                message: String::new(),
            }
            .encode(opt.option, &mut out);
            raw.send(&out).await;
        }
        let (h, _) = loop {
            if let Some(r) = decode_request(&mut raw.buf).unwrap() {
                break r;
            }
            assert!(raw.more().await);
        };
        assert_eq!(h.command, Command::Read);
        let mut out = bytes::BytesMut::new();
        SimpleReply {
            error: 0,
            cookie: h.cookie,
        }
        .encode(&mut out);
        out.extend_from_slice(&vec![0xabu8; h.length as usize]);
        raw.send(&out).await;
        raw.at_eof().await;
    });
    let c = within(Client::connect(opts(
        &Endpoint::Unix { path: path.clone() },
        "legacy",
    )))
    .await
    .unwrap();
    let info = c.info();
    assert_eq!(info.negotiated_with, Negotiation::ExportName);
    assert_eq!(info.mode, TransmissionMode::Simple);
    assert_eq!(info.size, 1 << 20);
    assert_eq!(c.read(512, 1024).await.unwrap(), vec![0xab; 1024]);
    c.close();
    within(fake).await.unwrap();
}

/// The server side of a handshake, scripted: fixed newstyle, structured replies, `base:allocation`
/// under context id `meta` if given (else ERR_UNSUP like every other option), a 1 MiB export on GO.
async fn scripted_handshake(raw: &mut Raw<tokio::net::UnixStream>, meta: Option<u32>) {
    let mut out = bytes::BytesMut::new();
    Greeting {
        flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
    }
    .encode(&mut out);
    raw.send(&out).await;
    while raw.buf.len() < 4 {
        assert!(raw.more().await);
    }
    bytes::Buf::advance(&mut raw.buf, 4);
    loop {
        let opt = loop {
            if let Some(o) = RawOption::decode(&mut raw.buf).unwrap() {
                break o;
            }
            assert!(raw.more().await);
        };
        let mut out = bytes::BytesMut::new();
        match (opt.option, meta) {
            (NBD_OPT_STRUCTURED_REPLY, _) => OptionReply::Ack.encode(opt.option, &mut out),
            (NBD_OPT_SET_META_CONTEXT, Some(id)) => {
                OptionReply::MetaContext {
                    id,
                    name: BASE_ALLOCATION.into(),
                }
                .encode(opt.option, &mut out);
                OptionReply::Ack.encode(opt.option, &mut out);
            }
            (NBD_OPT_GO, _) => {
                OptionReply::Info(Info::Export {
                    size: 1 << 20,
                    flags: TransmissionFlags::HAS_FLAGS,
                })
                .encode(opt.option, &mut out);
                OptionReply::Ack.encode(opt.option, &mut out);
                raw.send(&out).await;
                return;
            }
            _ => OptionReply::Error {
                error: OptionError::Unsup,
                message: String::new(),
            }
            .encode(opt.option, &mut out),
        }
        raw.send(&out).await;
    }
}

/// A scripted server speaking structured replies badly: multi-chunk reads with holes, an
/// unknown error chunk (fails only that request), then an unknown non-error chunk (hang-up).
#[tokio::test]
async fn structured_chunk_handling() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut raw = Raw::new(s);
        scripted_handshake(&mut raw, Some(42)).await;
        let mut reqs = Vec::new();
        while reqs.len() < 4 {
            if let Some((h, _)) = decode_request(&mut raw.buf).unwrap() {
                reqs.push(h);
                continue;
            }
            assert!(raw.more().await);
        }
        let mut out = bytes::BytesMut::new();
        // Request 0: READ 0+8192, answered in reverse with a hole in the middle.
        let r0 = reqs[0];
        ChunkPayload::OffsetData {
            offset: 6144,
            data: Bytes::from(vec![3u8; 2048]),
        }
        .encode(r0.cookie, 0, &mut out);
        ChunkPayload::OffsetHole {
            offset: 2048,
            length: 4096,
        }
        .encode(r0.cookie, 0, &mut out);
        // Request 1 (BLOCK_STATUS) interleaved.
        let r1 = reqs[1];
        ChunkPayload::BlockStatus {
            context_id: 42,
            extents: vec![Extent {
                length: 4096,
                flags: 3,
            }],
        }
        .encode(r1.cookie, NBD_REPLY_FLAG_DONE, &mut out);
        ChunkPayload::OffsetData {
            offset: 0,
            data: Bytes::from(vec![1u8; 2048]),
        }
        .encode(r0.cookie, 0, &mut out);
        ChunkPayload::None.encode(r0.cookie, NBD_REPLY_FLAG_DONE, &mut out);
        // Request 2: an unknown error chunk type.
        let r2 = reqs[2];
        let mut e = bytes::BytesMut::new();
        bytes::BufMut::put_u32(&mut e, NBD_EIO);
        bytes::BufMut::put_u16(&mut e, 0);
        ChunkPayload::Unknown {
            chunk_type: NBD_REPLY_TYPE_ERROR_BIT | 77,
            data: e.freeze(),
        }
        .encode(r2.cookie, NBD_REPLY_FLAG_DONE, &mut out);
        raw.send(&out).await;
        // Request 3: wait for request 4 to arrive, then an unknown non-error chunk.
        let r4 = loop {
            if let Some((h, _)) = decode_request(&mut raw.buf).unwrap() {
                break h;
            }
            assert!(raw.more().await);
        };
        let _ = r4;
        let mut out = bytes::BytesMut::new();
        ChunkPayload::Unknown {
            chunk_type: 99,
            data: Bytes::new(),
        }
        .encode(reqs[3].cookie, NBD_REPLY_FLAG_DONE, &mut out);
        raw.send(&out).await;
        raw.at_eof().await;
    });
    let c = within(Client::connect(opts(
        &Endpoint::Unix { path: path.clone() },
        "x",
    )))
    .await
    .unwrap();
    assert_eq!(c.info().base_allocation, Some(42));
    let (a, b) = (c.clone(), c.clone());
    // Submit one at a time so the fake server sees them in this order.
    let t0 = tokio::spawn(async move { a.read(0, 8192).await });
    within(async {
        while c.in_flight() < 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let t1 = tokio::spawn(async move { b.block_status(0, 4096, CommandFlags::empty()).await });
    within(async {
        while c.in_flight() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let c2 = c.clone();
    let t2 = tokio::spawn(async move { c2.read(8192, 512).await });
    within(async {
        while c.in_flight() < 3 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let c3 = c.clone();
    let t3 = tokio::spawn(async move { c3.read(16384, 512).await });
    let r0 = within(t0).await.unwrap().unwrap();
    let mut expect = vec![1u8; 2048];
    expect.extend(vec![0u8; 4096]);
    expect.extend(vec![3u8; 2048]);
    assert_eq!(r0, expect);
    let r1 = within(t1).await.unwrap().unwrap();
    assert_eq!(
        r1,
        vec![Extent {
            length: 4096,
            flags: 3
        }]
    );
    let r2 = within(t2).await.unwrap().unwrap_err();
    assert_eq!(
        r2,
        ClientError::Server {
            errno: NbdErrno::Io,
            message: None
        }
    );
    assert!(c.is_open(), "an unknown error chunk fails only its request");
    let c4 = c.clone();
    let t4 = tokio::spawn(async move {
        c4.submit(Request::Read {
            offset: 0,
            length: 512,
        })
        .await
    });
    let r3 = within(t3).await.unwrap().unwrap_err();
    assert!(matches!(r3, ClientError::Protocol(_)), "{r3:?}");
    let r4 = within(t4).await.unwrap().unwrap_err();
    assert!(matches!(r4.error, ClientError::Protocol(_)));
    assert_eq!(
        r4.request,
        Request::Read {
            offset: 0,
            length: 512
        }
    );
    within(c.closed()).await;
    within(fake).await.unwrap();
}

#[tokio::test]
async fn server_dies_fails_all_in_flight_with_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut arrivals = b.set_arrivals();
    b.gated.store(true, Ordering::SeqCst);
    let ts = start_unix(server_with(
        vec![(export("disk", MIB), Arc::clone(&b))],
        ServerOptions::default(),
    ))
    .await;
    let Endpoint::Unix { path: server_path } = ts.endpoint.clone() else {
        unreachable!()
    };
    // A proxy we can abort: dropping both of its sockets looks like a crashed server.
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let srv = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut up = tokio::net::UnixStream::connect(&server_path).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
    });
    let c = connect(&Endpoint::Unix { path }, "disk").await;
    let tasks: Vec<_> = (0..20u64)
        .map(|i| {
            let c = c.clone();
            tokio::spawn(async move {
                c.submit(Request::Read {
                    offset: i * 512,
                    length: 512,
                })
                .await
            })
        })
        .collect();
    for _ in 0..20 {
        within(arrivals.recv()).await.unwrap();
    }
    srv.abort();
    for (i, t) in tasks.into_iter().enumerate() {
        let e = within(t).await.unwrap().unwrap_err();
        assert!(matches!(e.error, ClientError::Connection(_)), "{e:?}");
        assert!(e.error.is_path_fault());
        assert_eq!(
            e.request,
            Request::Read {
                offset: i as u64 * 512,
                length: 512
            }
        );
    }
    within(c.closed()).await;
    assert!(matches!(c.close_reason(), Some(ClientError::Connection(_))));
    b.open_gate();
}

#[tokio::test]
async fn many_connections_and_exports() {
    let b1 = MemBackend::new(MIB, Mode::Immediate);
    let b2 = MemBackend::new(2 * MIB, Mode::Immediate);
    let server = server_with(
        vec![
            (export("one", MIB), Arc::clone(&b1)),
            (export("two", 2 * MIB), Arc::clone(&b2)),
        ],
        ServerOptions::default(),
    );
    let s2 = lunmpio_nbd::Server::<MemBackend>::new(ServerOptions::default());
    s2.add_export(export("one", MIB), Arc::clone(&b1)).unwrap();
    assert!(matches!(
        s2.add_export(export("one", MIB), b1.clone()),
        Err(ServerError::DuplicateExport(_))
    ));
    let ts = start_tcp(server).await;
    let clients: Vec<_> = futures::future::join_all((0..8).map(|i| {
        let ep = ts.endpoint.clone();
        async move { connect(&ep, if i % 2 == 0 { "one" } else { "two" }).await }
    }))
    .await;
    for (i, c) in clients.iter().enumerate() {
        c.write(
            i as u64 * 4096,
            pattern(4096, i as u8),
            CommandFlags::empty(),
        )
        .await
        .unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(
            c.read(i as u64 * 4096, 4096).await.unwrap(),
            pattern(4096, i as u8)
        );
    }
    assert_eq!(ts.server.connections(), 8);
    drop(clients);
    within(ts.server.wait_idle()).await;
}

/// A scripted server answering one READ of 4096 bytes with two OFFSET_DATA chunks that overlap
/// (0..2048 and 1024..3072): their lengths add up to the request, but 3072..4096 was never sent. The
/// client must refuse the reply (a protocol violation), never hand back zeroes as data.
#[tokio::test]
async fn overlapping_read_chunks_that_leave_a_hole_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let mut raw = Raw::new(s);
        scripted_handshake(&mut raw, None).await;
        let read = loop {
            if let Some((h, _)) = decode_request(&mut raw.buf).unwrap() {
                break h;
            }
            assert!(raw.more().await);
        };
        let mut out = bytes::BytesMut::new();
        for (offset, len) in [(0u64, 2048usize), (1024, 2048)] {
            ChunkPayload::OffsetData {
                offset,
                data: Bytes::from(vec![7u8; len]),
            }
            .encode(read.cookie, 0, &mut out);
        }
        ChunkPayload::None.encode(read.cookie, NBD_REPLY_FLAG_DONE, &mut out);
        raw.send(&out).await;
        raw.at_eof().await;
    });
    let c = within(Client::connect(opts(&Endpoint::Unix { path }, "x")))
        .await
        .unwrap();
    let err = within(c.read(0, 4096)).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(ref m) if m.contains("overlap")),
        "{err:?}"
    );
    within(c.closed()).await;
    within(fake).await.unwrap();
}
