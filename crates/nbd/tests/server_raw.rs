//! The server driven by a scripted raw client: every option and every request bound.

mod common;

use common::raw::{AnyReply, Raw, req};
use common::*;
use lunmpio_nbd::proto::*;
use lunmpio_nbd::server::{ExportConfig, ServerOptions};
use lunmpio_nbd::*;
use std::sync::Arc;
use tokio::net::UnixStream;

const MIB: usize = 1 << 20;

async fn setup() -> (TestServer<MemBackend>, std::path::PathBuf, Arc<MemBackend>) {
    let b = MemBackend::new(MIB, Mode::Immediate);
    let mut cfg = ExportConfig::new("disk", MIB as u64);
    cfg.description = Some("a test disk".into());
    cfg.block_size = BlockSize {
        min: 512,
        preferred: 4096,
        max_payload: 128 << 10,
    };
    let mut other = ExportConfig::new("other", MIB as u64);
    other.flags = TransmissionFlags::HAS_FLAGS; // nothing optional advertised
    let ts = start_unix(server_with(
        vec![
            (cfg, Arc::clone(&b)),
            (other, MemBackend::new(MIB, Mode::Immediate)),
        ],
        ServerOptions::default(),
    ))
    .await;
    let Endpoint::Unix { path } = ts.endpoint.clone() else {
        unreachable!()
    };
    (ts, path, b)
}

async fn raw(path: &std::path::Path) -> Raw<UnixStream> {
    Raw::new(UnixStream::connect(path).await.unwrap())
}

#[tokio::test]
async fn greeting_and_options() {
    let (_ts, path, _) = setup().await;
    let mut r = raw(&path).await;
    let g = r
        .start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
        .await;
    assert_eq!(
        g.flags,
        HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES
    );

    // STARTTLS without TLS configured, and an unknown option: ERR_UNSUP, and negotiation goes on.
    // (Extended headers, qemu's first probe, are answered in tests/extended.rs.)
    for o in [
        ClientOption::StartTls,
        ClientOption::Unknown(RawOption {
            option: 99,
            data: bytes::Bytes::from_static(b"xyz"),
        }),
    ] {
        r.option(&o).await;
        let v = r.replies().await;
        assert!(
            matches!(
                v[..],
                [OptionReply::Error {
                    error: OptionError::Unsup,
                    ..
                }]
            ),
            "{o:?}: {v:?}"
        );
    }

    // LIST: one REP_SERVER per export, then ACK.
    r.option(&ClientOption::List).await;
    let v = r.replies().await;
    let names: Vec<_> = v
        .iter()
        .filter_map(|x| {
            if let OptionReply::Server { name, .. } = x {
                Some(name.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(names, vec!["disk".to_string(), "other".to_string()]);
    assert_eq!(v.last(), Some(&OptionReply::Ack));

    // Malformed data for a known option: ERR_INVALID.
    r.option(&ClientOption::Unknown(RawOption {
        option: NBD_OPT_GO,
        data: bytes::Bytes::from_static(b"\0\0"),
    }))
    .await;
    assert!(matches!(
        r.replies().await[..],
        [OptionReply::Error {
            error: OptionError::Invalid,
            ..
        }]
    ));
    r.option(&ClientOption::Unknown(RawOption {
        option: NBD_OPT_STRUCTURED_REPLY,
        data: bytes::Bytes::from_static(b"x"),
    }))
    .await;
    assert!(matches!(
        r.replies().await[..],
        [OptionReply::Error {
            error: OptionError::Invalid,
            ..
        }]
    ));

    // Meta contexts need structured replies first.
    r.option(&ClientOption::SetMetaContext {
        export: "disk".into(),
        queries: vec![BASE_ALLOCATION.into()],
    })
    .await;
    assert!(matches!(
        r.replies().await[..],
        [OptionReply::Error {
            error: OptionError::Invalid,
            ..
        }]
    ));
    r.option(&ClientOption::StructuredReply).await;
    assert_eq!(r.replies().await, vec![OptionReply::Ack]);

    // LIST_META_CONTEXT with the base: wildcard, with no query, and with an unknown one.
    for (q, expect) in [
        (vec!["base:".to_string()], true),
        (vec![], true),
        (vec!["qemu:dirty".into()], false),
    ] {
        r.option(&ClientOption::ListMetaContext {
            export: "disk".into(),
            queries: q,
        })
        .await;
        let v = r.replies().await;
        let has = v
            .iter()
            .any(|x| matches!(x, OptionReply::MetaContext { name, .. } if name == BASE_ALLOCATION));
        assert_eq!(has, expect, "{v:?}");
        assert_eq!(v.last(), Some(&OptionReply::Ack));
    }
    r.option(&ClientOption::ListMetaContext {
        export: "nope".into(),
        queries: vec![],
    })
    .await;
    assert!(matches!(
        r.replies().await[..],
        [OptionReply::Error {
            error: OptionError::Unknown,
            ..
        }]
    ));

    // INFO with name and description, on an unknown export, then a real one.
    r.option(&ClientOption::Info {
        name: "nope".into(),
        requests: vec![],
    })
    .await;
    assert!(matches!(
        r.replies().await[..],
        [OptionReply::Error {
            error: OptionError::Unknown,
            ..
        }]
    ));
    r.option(&ClientOption::Info {
        name: "disk".into(),
        requests: vec![NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE],
    })
    .await;
    let v = r.replies().await;
    assert!(v.contains(&OptionReply::Info(Info::Name("disk".into()))));
    assert!(v.contains(&OptionReply::Info(Info::Description("a test disk".into()))));
    assert!(v.contains(&OptionReply::Info(Info::BlockSize(BlockSize {
        min: 512,
        preferred: 4096,
        max_payload: 128 << 10
    }))));
    assert!(
        v.iter().any(
            |x| matches!(x, OptionReply::Info(Info::Export { size, .. }) if *size == MIB as u64)
        )
    );

    // SET_META_CONTEXT then GO.
    r.option(&ClientOption::SetMetaContext {
        export: "disk".into(),
        queries: vec![BASE_ALLOCATION.into()],
    })
    .await;
    let v = r.replies().await;
    assert!(matches!(
        v[..],
        [OptionReply::MetaContext { .. }, OptionReply::Ack]
    ));
    r.option(&ClientOption::Go {
        name: "disk".into(),
        requests: vec![],
    })
    .await;
    let v = r.replies().await;
    assert_eq!(v.last(), Some(&OptionReply::Ack));
    r.request(req(Command::BlockStatus, 1, 0, 4096), &[]).await;
    match r.any_reply(|_| 0).await.unwrap() {
        AnyReply::Chunk(c) => {
            assert!(matches!(c.payload, ChunkPayload::BlockStatus { .. }) && c.is_done())
        }
        other => panic!("{other:?}"),
    }
    // DISC: the server closes.
    r.request(req(Command::Disc, 2, 0, 0), &[]).await;
    assert!(within(r.at_eof()).await);
}

#[tokio::test]
async fn abort_and_export_name() {
    let (_ts, path, _) = setup().await;
    let mut r = raw(&path).await;
    r.start(ClientFlags::FIXED_NEWSTYLE).await;
    r.option(&ClientOption::Abort).await;
    assert_eq!(r.replies().await, vec![OptionReply::Ack]);
    assert!(within(r.at_eof()).await);

    // EXPORT_NAME without NO_ZEROES: 124 zero bytes follow.
    let mut r = raw(&path).await;
    r.start(ClientFlags::FIXED_NEWSTYLE).await;
    r.option(&ClientOption::ExportName("disk".into())).await;
    while r.buf.len() < ExportNameReply::wire_len(false) {
        assert!(r.more().await);
    }
    let rep = ExportNameReply::decode(&r.buf, false).unwrap().unwrap();
    assert_eq!(rep.size, MIB as u64);
    assert!(r.buf[10..134].iter().all(|&b| b == 0));
    bytes::Buf::advance(&mut r.buf, 134);
    r.request(req(Command::Read, 5, 0, 512), &[]).await;
    match r.any_reply(|_| 512).await.unwrap() {
        AnyReply::Simple(h, d) => assert_eq!((h.cookie, h.error, d.len()), (5, 0, 512)),
        other => panic!("{other:?}"),
    }

    // EXPORT_NAME of an unknown export: hang up.
    let mut r = raw(&path).await;
    r.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
        .await;
    r.option(&ClientOption::ExportName("nope".into())).await;
    assert!(within(r.at_eof()).await);
}

#[tokio::test]
async fn request_bounds() {
    let (_ts, path, b) = setup().await;
    let mut r = raw(&path).await;
    let (size, flags, ctx) = r.go("disk", true, false).await;
    assert_eq!(size, MIB as u64);
    assert!(flags.contains(TransmissionFlags::HAS_FLAGS));
    assert_eq!(ctx, None);
    let end = MIB as u64;
    let cases: Vec<(RequestHeader, Vec<u8>, u32)> = vec![
        // past the end
        (req(Command::Read, 1, end - 512, 1024), vec![], NBD_EINVAL),
        (
            req(Command::Read, 2, u64::MAX - 511, 512),
            vec![],
            NBD_EINVAL,
        ),
        (req(Command::Write, 3, end, 512), vec![0; 512], NBD_ENOSPC),
        (
            req(Command::WriteZeroes, 4, end - 512, 1024),
            vec![],
            NBD_ENOSPC,
        ),
        (req(Command::Trim, 5, end, 512), vec![], NBD_EINVAL),
        (req(Command::Cache, 6, end, 512), vec![], NBD_EINVAL),
        // misaligned to the 512-byte minimum block
        (req(Command::Read, 7, 100, 512), vec![], NBD_EINVAL),
        (req(Command::Write, 8, 0, 100), vec![0; 100], NBD_EINVAL),
        // above the advertised 128 KiB max payload (the payload is still consumed)
        (req(Command::Read, 9, 0, 256 << 10), vec![], NBD_EINVAL),
        (
            req(Command::Write, 10, 0, 256 << 10),
            vec![0; 256 << 10],
            NBD_EINVAL,
        ),
        // unknown command, RESIZE, flags not advertised or not for this command
        (req(Command::Unknown(42), 11, 0, 512), vec![], NBD_EINVAL),
        (req(Command::Resize, 12, 0, 0), vec![], NBD_EINVAL),
        (
            RequestHeader {
                flags: CommandFlags::DF,
                ..req(Command::Read, 13, 0, 512)
            },
            vec![],
            NBD_EINVAL,
        ),
        (
            RequestHeader {
                flags: CommandFlags::REQ_ONE,
                ..req(Command::Read, 14, 0, 512)
            },
            vec![],
            NBD_EINVAL,
        ),
        (
            RequestHeader {
                flags: CommandFlags::FAST_ZERO,
                ..req(Command::WriteZeroes, 15, 0, 512)
            },
            vec![],
            NBD_EINVAL,
        ),
        (
            RequestHeader {
                flags: CommandFlags::from_bits_retain(0x8000),
                ..req(Command::Flush, 16, 0, 0)
            },
            vec![],
            NBD_EINVAL,
        ),
        // BLOCK_STATUS without a negotiated context
        (req(Command::BlockStatus, 17, 0, 512), vec![], NBD_EINVAL),
        // fine
        (
            RequestHeader {
                flags: CommandFlags::FUA,
                ..req(Command::Write, 18, 0, 512)
            },
            vec![7; 512],
            0,
        ),
        (
            RequestHeader {
                flags: CommandFlags::NO_HOLE,
                ..req(Command::WriteZeroes, 19, 512, 512)
            },
            vec![],
            0,
        ),
        (req(Command::Cache, 20, 0, 4096), vec![], 0),
        (
            RequestHeader {
                flags: CommandFlags::FUA,
                ..req(Command::Flush, 21, 0, 0)
            },
            vec![],
            0,
        ),
        (req(Command::Trim, 22, 1024, 512), vec![], 0),
    ];
    for (h, payload, expect) in cases {
        r.request(h, &payload).await;
        let got = match within(r.any_reply(|_| 0)).await.expect("reply") {
            AnyReply::Simple(s, _) => {
                assert_eq!(s.cookie, h.cookie);
                s.error
            }
            AnyReply::Chunk(c) | AnyReply::Extended(c, _) => {
                assert_eq!(c.cookie, h.cookie);
                assert!(c.is_done());
                c.payload.error_value().unwrap_or(0)
            }
        };
        assert_eq!(got, expect, "{h:?}");
    }
    assert_eq!(b.contents(0, 512), vec![7; 512]);
    // READ errors under structured replies are ERROR chunks.
    r.request(req(Command::Read, 30, end, 512), &[]).await;
    match r.any_reply(|_| 0).await.unwrap() {
        AnyReply::Chunk(c) => assert!(matches!(
            c.payload,
            ChunkPayload::Error {
                error: NBD_EINVAL,
                ..
            }
        )),
        other => panic!("{other:?}"),
    }
    // A successful READ is one OFFSET_DATA chunk with DONE.
    r.request(req(Command::Read, 31, 0, 512), &[]).await;
    match r.any_reply(|_| 0).await.unwrap() {
        AnyReply::Chunk(c) => {
            assert!(c.is_done());
            assert_eq!(
                c.payload,
                ChunkPayload::OffsetData {
                    offset: 0,
                    data: bytes::Bytes::from(vec![7u8; 512])
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unadvertised_commands() {
    let (_ts, path, _) = setup().await;
    let mut r = raw(&path).await;
    let (_, flags, _) = r.go("other", false, false).await;
    assert_eq!(flags, TransmissionFlags::HAS_FLAGS);
    for (h, e) in [
        (req(Command::Flush, 1, 0, 0), NBD_EINVAL),
        (req(Command::Trim, 2, 0, 512), NBD_EINVAL),
        (req(Command::WriteZeroes, 3, 0, 512), NBD_EINVAL),
        (
            RequestHeader {
                flags: CommandFlags::FUA,
                ..req(Command::Write, 4, 0, 0)
            },
            NBD_EINVAL,
        ),
        // CACHE is accepted even when not advertised.
        (req(Command::Cache, 5, 0, 512), 0),
    ] {
        r.request(h, &[]).await;
        assert_eq!(r.errno_of_next().await, e, "{h:?}");
    }
}

#[test]
fn check_request_table() {
    use lunmpio_nbd::server::{RequestCheck, check_request};
    let c = RequestCheck {
        mode: lunmpio_nbd::TransmissionMode::Structured,
        size: 1 << 20,
        flags: TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM,
        block_size: BlockSize {
            min: 4096,
            preferred: 4096,
            max_payload: 1 << 16,
        },
        context_id: Some(1),
    };
    let ok = |h| check_request(&c, &h);
    assert_eq!(ok(req(Command::Read, 0, 0, 4096)), Ok(()));
    assert_eq!(
        ok(req(Command::Read, 0, 4096, 1 << 17)),
        Err(NbdErrno::Inval)
    );
    assert_eq!(
        ok(req(Command::Trim, 0, 0, 1 << 17)),
        Ok(()),
        "TRIM is not limited by max payload"
    );
    assert_eq!(
        ok(req(Command::Write, 0, 1 << 20, 4096)),
        Err(NbdErrno::NoSpc)
    );
    assert_eq!(
        ok(req(Command::WriteZeroes, 0, 0, 4096)),
        Err(NbdErrno::Inval)
    );
    assert_eq!(ok(req(Command::BlockStatus, 0, 0, 4096)), Ok(()));
    assert_eq!(ok(req(Command::BlockStatus, 0, 0, 0)), Err(NbdErrno::Inval));
    assert_eq!(ok(req(Command::Read, 0, 2048, 4096)), Err(NbdErrno::Inval));
    let ro = RequestCheck {
        flags: c.flags | TransmissionFlags::READ_ONLY,
        ..c
    };
    assert_eq!(
        check_request(&ro, &req(Command::Write, 0, 1 << 30, 1)),
        Err(NbdErrno::Perm),
        "EPERM wins"
    );
    assert_eq!(
        check_request(&ro, &req(Command::Flush, 0, 0, 0)),
        Err(NbdErrno::Inval),
        "no SEND_FLUSH"
    );
}
