//! The server's STARTTLS, driven by a scripted raw client with certificates made in the test:
//! what was negotiated in plaintext is forgotten after STARTTLS, and `require` refuses every option
//! but STARTTLS and ABORT before TLS.

mod common;

use common::raw::{AnyReply, Raw, req};
use common::*;
use lunmpio_nbd::proto::*;
use lunmpio_nbd::server::{ExportConfig, ServerOptions};
use lunmpio_nbd::tls::{ClientTls, ServerTls};
use lunmpio_nbd::*;
use std::sync::Arc;
use tokio::net::UnixStream;

const MIB: usize = 1 << 20;

async fn tls_server(
    certs: &lunmpio_testkit::tls::Certs,
    require: bool,
) -> (TestServer<MemBackend>, std::path::PathBuf) {
    let server = server_with(
        vec![(
            ExportConfig::new("disk", MIB as u64),
            MemBackend::new(MIB, Mode::Immediate),
        )],
        ServerOptions::default(),
    );
    server.set_tls(Some(
        ServerTls::new(
            &certs.path("server-cert.pem"),
            &certs.path("server-key.pem"),
            None,
            require,
        )
        .unwrap(),
    ));
    let ts = start_unix(server).await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    (ts, path)
}

#[tokio::test]
async fn options_negotiated_before_starttls_are_forgotten() {
    let certs = lunmpio_testkit::tls::make_certs("raw test CA");
    let (_ts, path) = tls_server(&certs, false).await;
    let mut r = Raw::new(UnixStream::connect(&path).await.unwrap());
    r.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
        .await;
    // Structured replies and extended headers in plaintext (an attacker on the path could have
    // sent these), then TLS.
    r.option(&ClientOption::StructuredReply).await;
    assert_eq!(r.replies().await, vec![OptionReply::Ack]);
    r.option(&ClientOption::ExtendedHeaders).await;
    assert_eq!(r.replies().await, vec![OptionReply::Ack]);
    r.option(&ClientOption::StartTls).await;
    assert_eq!(r.replies().await, vec![OptionReply::Ack]);
    assert!(
        r.buf.is_empty(),
        "nothing but the TLS handshake follows the ACK"
    );
    let tls = ClientTls::new(&certs.ca(), None, "localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
        .connect(tls.server_name.clone(), r.s)
        .await
        .expect("TLS handshake");
    let mut t = Raw::new(stream);
    t.option(&ClientOption::Go {
        name: "disk".into(),
        requests: vec![],
    })
    .await;
    assert!(
        t.replies()
            .await
            .iter()
            .any(|r| matches!(r, OptionReply::Info(Info::Export { .. }))),
        "GO over TLS"
    );
    // A second STARTTLS inside TLS would be refused; here, transmission: a compact READ gets a
    // simple reply, since neither structured replies nor extended headers were negotiated over TLS.
    t.request(req(Command::Read, 7, 0, 4096), &[]).await;
    match t.any_reply(|_| 4096).await.expect("a reply") {
        AnyReply::Simple(h, data) => assert_eq!((h.cookie, h.error, data.len()), (7, 0, 4096)),
        other => panic!("structured replies survived STARTTLS: {other:?}"),
    }
}

#[tokio::test]
async fn require_refuses_options_before_tls_and_export_name_closes() {
    let certs = lunmpio_testkit::tls::make_certs("raw test CA");
    let (_ts, path) = tls_server(&certs, true).await;
    let mut r = Raw::new(UnixStream::connect(&path).await.unwrap());
    r.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
        .await;
    for o in [
        ClientOption::List,
        ClientOption::StructuredReply,
        ClientOption::Go {
            name: "disk".into(),
            requests: vec![],
        },
    ] {
        r.option(&o).await;
        let replies = r.replies().await;
        assert!(
            matches!(
                replies.as_slice(),
                [OptionReply::Error {
                    error: OptionError::TlsReqd,
                    ..
                }]
            ),
            "{o:?}: {replies:?}"
        );
    }
    r.option(&ClientOption::ExportName("disk".into())).await;
    assert!(
        r.at_eof().await,
        "EXPORT_NAME before TLS ends the connection"
    );
}
