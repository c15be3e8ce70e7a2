//! Live reconfiguration of a serving server: an export held at a request boundary and given a new
//! backend, an export removed while a client uses it, an export added while serving. Clients see a
//! pause, never an error, on the exports that stay.

mod common;

use common::*;
use lunmpio_nbd::server::{ExportConfig, ServerOptions};
use lunmpio_nbd::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;

const SIZE: usize = 1 << 20;

fn backend(fill: u8) -> Arc<MemBackend> {
    let b = MemBackend::new(SIZE, Mode::Immediate);
    b.poke(0, &vec![fill; SIZE]);
    b
}

#[tokio::test]
async fn a_held_export_finishes_what_runs_and_sends_what_comes_next_to_the_new_backend() {
    let old = backend(1);
    let new = backend(2);
    let server = server_with(
        vec![(ExportConfig::new("disk", SIZE as u64), Arc::clone(&old))],
        ServerOptions::default(),
    );
    let t = start_unix(server).await;
    let client = connect(&t.endpoint, "disk").await;

    // A read runs in the old backend, stopped there.
    old.gated.store(true, Ordering::SeqCst);
    let mut arrivals = old.set_arrivals();
    let first = tokio::spawn({
        let c = client.clone();
        async move { c.read(0, 4096).await }
    });
    within(arrivals.recv()).await;

    let hold = t.server.hold_export("disk").expect("the export exists");
    let second = {
        let quiet = hold.quiet();
        tokio::pin!(quiet);
        assert!(
            futures::poll!(quiet.as_mut()).is_pending(),
            "a request runs: not quiet"
        );
        // Sent during the hold: it must not run in either backend until the hold ends.
        let second = tokio::spawn({
            let c = client.clone();
            async move { c.read(4096, 4096).await }
        });
        // It reached the server, which set it aside.
        within(async {
            while hold.parked() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        old.open_gate();
        within(quiet).await;
        second
    };
    assert_eq!(hold.running(), 0);
    assert_eq!(
        old.ops.load(Ordering::SeqCst),
        1,
        "the request sent during the hold did not run in the old backend"
    );
    assert_eq!(hold.parked(), 1);
    hold.replace_backend(Arc::clone(&new));
    drop(hold);

    assert_eq!(within(first).await.unwrap().unwrap(), vec![1u8; 4096]);
    assert_eq!(
        within(second).await.unwrap().unwrap(),
        vec![2u8; 4096],
        "the held request ran in the new backend"
    );
    assert_eq!(within(client.read(0, 4096)).await.unwrap(), vec![2u8; 4096]);
    assert!(client.is_open(), "the connection stayed open throughout");
}

#[tokio::test]
async fn holds_that_end_without_a_new_backend_change_nothing() {
    let only = backend(3);
    let server = server_with(
        vec![(ExportConfig::new("disk", SIZE as u64), Arc::clone(&only))],
        ServerOptions::default(),
    );
    let t = start_unix(server).await;
    let client = connect(&t.endpoint, "disk").await;
    for _ in 0..3 {
        let hold = t.server.hold_export("disk").unwrap();
        let pending = tokio::spawn({
            let c = client.clone();
            async move {
                c.write(
                    0,
                    bytes::Bytes::from(vec![9u8; 4096]),
                    CommandFlags::empty(),
                )
                .await
            }
        });
        within(hold.quiet()).await;
        drop(hold);
        within(pending).await.unwrap().unwrap();
    }
    assert_eq!(within(client.read(0, 4096)).await.unwrap(), vec![9u8; 4096]);
    assert!(t.server.hold_export("nothing").is_none());
}

#[tokio::test]
async fn a_removed_export_drains_its_connections_and_refuses_new_clients() {
    let a = backend(1);
    let b = backend(2);
    let server = server_with(
        vec![
            (ExportConfig::new("a", SIZE as u64), Arc::clone(&a)),
            (ExportConfig::new("b", SIZE as u64), Arc::clone(&b)),
        ],
        ServerOptions::default(),
    );
    let t = start_unix(server).await;
    let on_a = connect(&t.endpoint, "a").await;
    let on_b = connect(&t.endpoint, "b").await;
    a.gated.store(true, Ordering::SeqCst);
    let mut arrivals = a.set_arrivals();
    let in_flight = tokio::spawn({
        let c = on_a.clone();
        async move { c.read(0, 4096).await }
    });
    within(arrivals.recv()).await;

    let removed = t.server.remove_export("a").expect("exists");
    assert_eq!(removed.connections(), 1);
    assert!(t.server.remove_export("a").is_none(), "removed once");
    let refused = Client::connect(opts(&t.endpoint, "a")).await;
    assert!(
        refused.is_err(),
        "a new client cannot choose a removed export"
    );
    a.open_gate();
    assert_eq!(
        within(in_flight).await.unwrap().unwrap(),
        vec![1u8; 4096],
        "the request in flight finished"
    );
    within(removed.closed()).await;
    assert_eq!(within(on_b.read(0, 4096)).await.unwrap(), vec![2u8; 4096]);
    assert_eq!(t.server.export_names(), vec!["b".to_string()]);
}

#[tokio::test]
async fn an_export_added_while_serving_takes_clients() {
    let server = server_with(
        vec![(ExportConfig::new("a", SIZE as u64), backend(1))],
        ServerOptions::default(),
    );
    let t = start_unix(server).await;
    t.server
        .add_export(ExportConfig::new("later", SIZE as u64), backend(5))
        .unwrap();
    assert!(matches!(
        t.server
            .add_export(ExportConfig::new("later", SIZE as u64), backend(5)),
        Err(server::ServerError::DuplicateExport(_))
    ));
    let client = connect(&t.endpoint, "later").await;
    assert_eq!(within(client.read(0, 4096)).await.unwrap(), vec![5u8; 4096]);
}
