//! Handing live connections from one server to another (live upgrade): detached at a request
//! boundary with their negotiated state and unread bytes, attached to a new server, and the client
//! never sees its socket close.

mod common;

use bytes::Bytes;
use common::raw::{AnyReply, Raw, req};
use common::*;
use lunmpio_nbd::proto::{Command, EXTENDED_REQUEST_HEADER_BYTES};
use lunmpio_nbd::server::{ExportConfig, ServerOptions};
use lunmpio_nbd::*;
use std::sync::Arc;

const SIZE: usize = 1 << 20;

/// A server with one export over `store`, listening on TCP.
async fn serving(store: &Arc<MemBackend>) -> TestServer<MemBackend> {
    let server = server_with(
        vec![(ExportConfig::new("disk", SIZE as u64), Arc::clone(store))],
        ServerOptions::default(),
    );
    start_tcp(server).await
}

/// Holds every export, stops accepting, waits for quiet and detaches every connection.
async fn detach(t: &TestServer<MemBackend>) -> Vec<server::DetachedConnection> {
    let hold = t.server.hold_export("disk").unwrap();
    t.server.stop_accepting();
    within(hold.quiet()).await;
    let detached = within(t.server.detach_all(TEST_DEADLINE)).await;
    drop(hold);
    detached
}

#[tokio::test]
async fn a_connection_moves_to_a_new_server_with_its_state_and_a_request_sent_meanwhile() {
    let store = MemBackend::new(SIZE, Mode::Immediate);
    let old = serving(&store).await;
    let client = connect(&old.endpoint, "disk").await;
    client
        .write(0, pattern(4096, 1), CommandFlags::empty())
        .await
        .unwrap();

    // A request sent while the old server holds the export: it is carried over, not lost.
    let hold = old.server.hold_export("disk").unwrap();
    let sent_during_hold = tokio::spawn({
        let c = client.clone();
        async move { c.read(0, 4096).await }
    });
    within(async {
        while hold.parked() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    old.server.stop_accepting();
    within(hold.quiet()).await;
    let mut detached = within(old.server.detach_all(TEST_DEADLINE)).await;
    drop(hold);
    assert_eq!(detached.len(), 1);
    let c = detached.pop().unwrap();
    assert_eq!(c.export, "disk");
    assert_eq!(c.kind, server::SocketKind::Tcp);
    // Our client negotiated extended headers: the parked READ goes back in their 32-byte form.
    assert_eq!(c.mode, lunmpio_nbd::TransmissionMode::Extended);
    assert_eq!(
        c.pending.len(),
        EXTENDED_REQUEST_HEADER_BYTES,
        "the parked READ, encoded back"
    );

    // The new server (same store: the same LUN behind it) takes the connection.
    let new = serving(&store).await;
    new.server.attach(c).unwrap();
    assert_eq!(
        within(sent_during_hold).await.unwrap().unwrap(),
        pattern(4096, 1).to_vec()
    );
    client
        .write(4096, pattern(4096, 2), CommandFlags::FUA)
        .await
        .unwrap();
    assert_eq!(
        within(client.read(4096, 4096)).await.unwrap(),
        pattern(4096, 2).to_vec()
    );
    assert!(client.is_open(), "the client never saw its socket close");
    assert_eq!(old.server.connections(), 0);
    assert_eq!(new.server.connections(), 1);
}

#[tokio::test]
async fn half_a_request_sent_before_the_handover_is_finished_after_it() {
    let store = MemBackend::new(SIZE, Mode::Immediate);
    store.poke(0, &[7u8; 512]);
    let old = serving(&store).await;
    let Endpoint::Tcp { port, .. } = old.endpoint.clone() else {
        unreachable!()
    };
    let mut raw = Raw::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap(),
    );
    let (_, _, context) = raw.go("disk", true, true).await;
    assert!(context.is_some());

    let mut wire = bytes::BytesMut::new();
    req(Command::Read, 42, 0, 512).encode(&mut wire);
    // A whole request and the first ten bytes of the next in one segment: once the first is
    // answered, the server has read the ten bytes too (one read takes the whole segment).
    let mut first = bytes::BytesMut::new();
    req(Command::Read, 41, 0, 512).encode(&mut first);
    first.extend_from_slice(&wire[..10]);
    raw.send(&first).await;
    assert!(matches!(
        within(raw.any_reply(|_| 512)).await,
        Some(AnyReply::Chunk(_))
    ));
    // The server holds the ten bytes when it detaches; they travel with the socket.
    let new = serving(&store).await;
    let mut detached = detach(&old).await;
    assert_eq!(detached.len(), 1);
    assert_eq!(detached[0].pending, wire[..10].to_vec());
    assert_eq!(detached[0].mode, lunmpio_nbd::TransmissionMode::Structured);
    assert_eq!(detached[0].context_id, context);
    new.server.attach(detached.pop().unwrap()).unwrap();
    raw.send(&wire[10..]).await;
    match within(raw.any_reply(|_| 512)).await.expect("a reply") {
        AnyReply::Chunk(c) => {
            assert_eq!(c.cookie, 42);
            let lunmpio_nbd::proto::ChunkPayload::OffsetData { data, .. } = c.payload else {
                panic!("expected data, got {:?}", c.payload);
            };
            assert_eq!(
                data,
                Bytes::from(vec![7u8; 512]),
                "structured replies stay on"
            );
        }
        other => panic!("expected a structured reply, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_in_its_handshake_is_closed_and_the_others_are_detached() {
    let store = MemBackend::new(SIZE, Mode::Immediate);
    let old = serving(&store).await;
    let Endpoint::Tcp { port, .. } = old.endpoint.clone() else {
        unreachable!()
    };
    let client = connect(&old.endpoint, "disk").await;
    let mut in_handshake = Raw::new(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap(),
    );
    in_handshake.greeting().await;
    let detached = detach(&old).await;
    assert_eq!(detached.len(), 1, "only the connection in transmission");
    assert!(within(in_handshake.at_eof()).await);
    drop(client);
}
