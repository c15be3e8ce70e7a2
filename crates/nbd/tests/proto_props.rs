//! Property tests of the codec: every message round-trips, strict prefixes ask for more
//! bytes, and arbitrary input never panics.

use bytes::{Bytes, BytesMut};
use lunmpio_nbd::proto::*;
use lunmpio_nbd::{
    BlockSize, CommandFlags, Extent, TransmissionFlags, TransmissionMode, WideExtent,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9:/_ é-]{0,40}"
}

fn raw_unknown_option() -> impl Strategy<Value = RawOption> {
    (12u32.., proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(option, d)| RawOption {
        option,
        data: Bytes::from(d),
    })
}

fn client_option() -> impl Strategy<Value = ClientOption> {
    prop_oneof![
        name().prop_map(ClientOption::ExportName),
        Just(ClientOption::Abort),
        Just(ClientOption::List),
        Just(ClientOption::StartTls),
        (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| ClientOption::Info { name, requests }),
        (name(), proptest::collection::vec(any::<u16>(), 0..8))
            .prop_map(|(name, requests)| ClientOption::Go { name, requests }),
        Just(ClientOption::StructuredReply),
        (name(), proptest::collection::vec(name(), 0..5))
            .prop_map(|(export, queries)| ClientOption::ListMetaContext { export, queries }),
        (name(), proptest::collection::vec(name(), 0..5))
            .prop_map(|(export, queries)| ClientOption::SetMetaContext { export, queries }),
        Just(ClientOption::ExtendedHeaders),
        raw_unknown_option().prop_map(ClientOption::Unknown),
    ]
}

fn option_error() -> impl Strategy<Value = OptionError> {
    prop_oneof![
        Just(OptionError::Unsup),
        Just(OptionError::Policy),
        Just(OptionError::Invalid),
        Just(OptionError::Platform),
        Just(OptionError::TlsReqd),
        Just(OptionError::Unknown),
        Just(OptionError::Shutdown),
        Just(OptionError::BlockSizeReqd),
        Just(OptionError::TooBig),
        Just(OptionError::ExtHeaderReqd),
        (11u32..0x7fff_ffff).prop_map(|v| OptionError::Other(v | NBD_REP_FLAG_ERROR)),
    ]
}

fn block_size() -> impl Strategy<Value = BlockSize> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(min, preferred, max_payload)| BlockSize {
        min,
        preferred,
        max_payload,
    })
}

fn option_reply() -> impl Strategy<Value = OptionReply> {
    prop_oneof![
        Just(OptionReply::Ack),
        (name(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(name, d)| {
            OptionReply::Server {
                name,
                details: Bytes::from(d),
            }
        }),
        (any::<u64>(), any::<u16>()).prop_map(|(size, f)| OptionReply::Info(Info::Export {
            size,
            flags: TransmissionFlags::from_bits_retain(f)
        })),
        name().prop_map(|n| OptionReply::Info(Info::Name(n))),
        name().prop_map(|n| OptionReply::Info(Info::Description(n))),
        block_size().prop_map(|b| OptionReply::Info(Info::BlockSize(b))),
        (4u16.., proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(info_type, d)| {
            OptionReply::Info(Info::Unknown {
                info_type,
                data: Bytes::from(d),
            })
        }),
        (any::<u32>(), name()).prop_map(|(id, name)| OptionReply::MetaContext { id, name }),
        (option_error(), name()).prop_map(|(error, message)| OptionReply::Error { error, message }),
        (
            5u32..0x7fff_ffff,
            proptest::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(reply_type, d)| OptionReply::Unknown {
                reply_type,
                data: Bytes::from(d)
            }),
    ]
}

/// A compact request header (32-bit length).
fn request_header() -> impl Strategy<Value = RequestHeader> {
    extended_request_header().prop_map(|h| RequestHeader {
        length: h.length & u64::from(u32::MAX),
        ..h
    })
}

/// An extended request header (64-bit length).
fn extended_request_header() -> impl Strategy<Value = RequestHeader> {
    (
        any::<u16>(),
        any::<u16>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(f, c, cookie, offset, length)| RequestHeader {
            flags: CommandFlags::from_bits_retain(f),
            command: Command::from_wire(c),
            cookie,
            offset,
            length,
        })
}

fn chunk_payload() -> impl Strategy<Value = ChunkPayload> {
    prop_oneof![
        Just(ChunkPayload::None),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 1..256)).prop_map(|(offset, d)| {
            ChunkPayload::OffsetData {
                offset,
                data: Bytes::from(d),
            }
        }),
        (any::<u64>(), 1u32..)
            .prop_map(|(offset, length)| ChunkPayload::OffsetHole { offset, length }),
        (
            any::<u32>(),
            proptest::collection::vec((any::<u32>(), any::<u32>()), 1..16)
        )
            .prop_map(|(context_id, e)| {
                ChunkPayload::BlockStatus {
                    context_id,
                    extents: e
                        .into_iter()
                        .map(|(length, flags)| Extent { length, flags })
                        .collect(),
                }
            }),
        (
            any::<u32>(),
            proptest::collection::vec((1u64.., any::<u32>()), 1..16)
        )
            .prop_map(|(context_id, e)| {
                ChunkPayload::BlockStatusExt {
                    context_id,
                    extents: e
                        .into_iter()
                        .map(|(length, flags)| WideExtent { length, flags })
                        .collect(),
                }
            }),
        (any::<u32>(), name()).prop_map(|(error, message)| ChunkPayload::Error { error, message }),
        (any::<u32>(), name(), any::<u64>()).prop_map(|(error, message, offset)| {
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            }
        }),
        (
            prop_oneof![3u16..5, 7u16..0x8001, 0x8003u16..],
            proptest::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(chunk_type, d)| ChunkPayload::Unknown {
                chunk_type,
                data: Bytes::from(d)
            }),
    ]
}

/// Every strict prefix of a message must decode as "need more bytes" without consuming.
fn check_prefixes<T: std::fmt::Debug>(
    wire: &[u8],
    mut dec: impl FnMut(&mut BytesMut) -> Result<Option<T>, ProtoError>,
) {
    for n in 0..wire.len() {
        let mut b = BytesMut::from(&wire[..n]);
        let r = dec(&mut b);
        assert!(matches!(r, Ok(None)), "prefix {n}/{}: {r:?}", wire.len());
        assert_eq!(b.len(), n, "a partial message must not be consumed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn greeting_round_trip(f in any::<u16>()) {
        let g = Greeting { flags: HandshakeFlags::from_bits_retain(f) };
        let mut b = BytesMut::new();
        g.encode(&mut b);
        prop_assert_eq!(b.len(), GREETING_BYTES);
        prop_assert_eq!(Greeting::decode(&b).unwrap(), Some(g));
        for n in 0..b.len() {
            prop_assert_eq!(Greeting::decode(&b[..n]).unwrap(), None);
        }
    }

    #[test]
    fn client_flags_round_trip(f in any::<u32>()) {
        let mut b = BytesMut::new();
        encode_client_flags(ClientFlags::from_bits_retain(f), &mut b);
        prop_assert_eq!(decode_client_flags(&b).unwrap(), Some(ClientFlags::from_bits_retain(f)));
    }

    #[test]
    fn option_round_trip(o in client_option()) {
        let mut b = BytesMut::new();
        o.encode(&mut b);
        let wire = b.clone().freeze();
        let raw = RawOption::decode(&mut b).unwrap().unwrap();
        prop_assert!(b.is_empty());
        prop_assert_eq!(raw.option, o.code());
        prop_assert_eq!(ClientOption::parse(&raw).unwrap(), o);
        check_prefixes(&wire, RawOption::decode);
    }

    #[test]
    fn option_reply_round_trip(r in option_reply(), option in any::<u32>()) {
        let mut b = BytesMut::new();
        r.encode(option, &mut b);
        let wire = b.clone().freeze();
        let raw = RawOptionReply::decode(&mut b).unwrap().unwrap();
        prop_assert!(b.is_empty());
        prop_assert_eq!(raw.option, option);
        prop_assert_eq!(OptionReply::parse(&raw).unwrap(), r);
        check_prefixes(&wire, RawOptionReply::decode);
    }

    #[test]
    fn export_name_reply_round_trip(size in any::<u64>(), f in any::<u16>(), nz in any::<bool>()) {
        let r = ExportNameReply { size, flags: TransmissionFlags::from_bits_retain(f) };
        let mut b = BytesMut::new();
        r.encode(nz, &mut b);
        prop_assert_eq!(b.len(), ExportNameReply::wire_len(nz));
        prop_assert_eq!(ExportNameReply::decode(&b, nz).unwrap(), Some(r));
        prop_assert_eq!(ExportNameReply::decode(&b[..b.len() - 1], nz).unwrap(), None);
    }

    #[test]
    fn request_round_trip(h in request_header(), extra in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut b = BytesMut::new();
        h.encode(&mut b);
        prop_assert_eq!(&b[..], &h.to_bytes()[..]);
        prop_assert_eq!(RequestHeader::decode(&b).unwrap(), Some(h));
        for n in 0..b.len() {
            prop_assert_eq!(RequestHeader::decode(&b[..n]).unwrap(), None);
        }
        // With a small WRITE payload, decode_request returns it exactly.
        let h = RequestHeader { command: Command::Write, length: extra.len() as u64, ..h };
        let mut b = BytesMut::new();
        h.encode(&mut b);
        b.extend_from_slice(&extra);
        let wire = b.clone().freeze();
        let (got, payload) = decode_request(&mut b).unwrap().unwrap();
        prop_assert_eq!(got, h);
        prop_assert_eq!(&payload[..], &extra[..]);
        prop_assert!(b.is_empty());
        check_prefixes(&wire, decode_request);
    }

    /// Extended requests: 32 bytes, a 64-bit length, and a payload when PAYLOAD_LEN says so (any
    /// command) or for a WRITE (with or without the flag: qemu 10 leaves it out).
    #[test]
    fn extended_request_round_trip(h in extended_request_header(),
                                   extra in proptest::collection::vec(any::<u8>(), 0..64)) {
        let ext = TransmissionMode::Extended;
        let mut b = BytesMut::new();
        h.encode_in(ext, &mut b);
        prop_assert_eq!(b.len(), EXTENDED_REQUEST_HEADER_BYTES);
        prop_assert_eq!(&b[..], &h.to_bytes_extended()[..]);
        prop_assert_eq!(RequestHeader::decode_in(&b, ext).unwrap(), Some(h));
        // The other form's magic is refused either way round.
        prop_assert!(RequestHeader::decode(&b).is_err());
        let compact = RequestHeader { length: h.length & u64::from(u32::MAX), ..h };
        prop_assert!(RequestHeader::decode_in(&compact.to_bytes(), ext).is_err());
        let flags = h.flags | CommandFlags::PAYLOAD_LEN;
        let h = RequestHeader { flags, length: extra.len() as u64, ..h };
        let mut b = BytesMut::new();
        h.encode_in(ext, &mut b);
        b.extend_from_slice(&extra);
        let wire = b.clone().freeze();
        let (got, payload) = decode_request_in(&mut b, ext).unwrap().unwrap();
        prop_assert_eq!(got, h);
        prop_assert_eq!(&payload[..], &extra[..]);
        prop_assert!(b.is_empty());
        check_prefixes(&wire, |b| decode_request_in(b, ext));
        let h = RequestHeader { flags: flags - CommandFlags::PAYLOAD_LEN, command: Command::Write, ..h };
        let mut b = BytesMut::new();
        h.encode_in(ext, &mut b);
        b.extend_from_slice(&extra);
        let (got, payload) = decode_request_in(&mut b, ext).unwrap().unwrap();
        prop_assert_eq!(got, h);
        prop_assert_eq!(&payload[..], &extra[..]);
        // Without the flag, another command's length is an effect length: no payload.
        let h = RequestHeader { command: Command::Trim, length: u64::MAX, ..h };
        let mut b = BytesMut::new();
        h.encode_in(ext, &mut b);
        let (got, payload) = decode_request_in(&mut b, ext).unwrap().unwrap();
        prop_assert_eq!(got, h);
        prop_assert!(payload.is_empty());
    }

    #[test]
    fn extended_chunk_round_trip(p in chunk_payload(), cookie in any::<u64>(), flags in any::<u16>(),
                                 offset in any::<u64>()) {
        let c = Chunk { flags, cookie, payload: p };
        let mut b = BytesMut::new();
        c.encode_extended(offset, &mut b);
        let wire = b.clone().freeze();
        prop_assert_eq!(Chunk::decode_extended(&mut b).unwrap(), Some((c, offset)));
        prop_assert!(b.is_empty());
        check_prefixes(&wire, Chunk::decode_extended);
    }

    #[test]
    fn simple_reply_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
        let r = SimpleReply { error, cookie };
        let mut b = BytesMut::new();
        r.encode(&mut b);
        prop_assert_eq!(SimpleReply::decode(&b).unwrap(), Some(r));
        prop_assert_eq!(peek_reply_magic(&b), Some(NBD_SIMPLE_REPLY_MAGIC));
    }

    #[test]
    fn chunk_round_trip(p in chunk_payload(), cookie in any::<u64>(), flags in any::<u16>()) {
        let c = Chunk { flags, cookie, payload: p };
        let mut b = BytesMut::new();
        c.encode(&mut b);
        let wire = b.clone().freeze();
        prop_assert_eq!(Chunk::decode(&mut b).unwrap(), Some(c));
        prop_assert!(b.is_empty());
        check_prefixes(&wire, Chunk::decode);
    }

    #[test]
    fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512), nz in any::<bool>()) {
        let _ = Greeting::decode(&data);
        let _ = decode_client_flags(&data);
        let _ = ExportNameReply::decode(&data, nz);
        let _ = RequestHeader::decode(&data);
        let _ = SimpleReply::decode(&data);
        let _ = ChunkHeader::decode(&data);
        let mut b = BytesMut::from(&data[..]);
        if let Ok(Some(raw)) = RawOption::decode(&mut b) { let _ = ClientOption::parse(&raw); }
        let mut b = BytesMut::from(&data[..]);
        if let Ok(Some(raw)) = RawOptionReply::decode(&mut b) { let _ = OptionReply::parse(&raw); }
        let mut b = BytesMut::from(&data[..]);
        let _ = decode_request(&mut b);
        let mut b = BytesMut::from(&data[..]);
        let _ = Chunk::decode(&mut b);
        let _ = RequestHeader::decode_in(&data, TransmissionMode::Extended);
        let _ = ExtendedReplyHeader::decode(&data);
        let mut b = BytesMut::from(&data[..]);
        let _ = decode_request_in(&mut b, TransmissionMode::Extended);
        let mut b = BytesMut::from(&data[..]);
        let _ = Chunk::decode_extended(&mut b);
        if data.len() >= 2 {
            let t = u16::from_be_bytes([data[0], data[1]]);
            let p = ChunkPayload::parse(t, Bytes::copy_from_slice(&data[2..]));
            if let Ok(p) = p { let _ = p.error_value(); }
        }
        if data.len() >= 4 {
            let t = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            let _ = ClientOption::parse(&RawOption { option: t % 16, data: Bytes::copy_from_slice(&data[4..]) });
            let _ = OptionReply::parse(&RawOptionReply {
                option: 0,
                reply_type: if t & 1 == 0 { t % 8 } else { t },
                data: Bytes::copy_from_slice(&data[4..]),
            });
        }
        let s = String::from_utf8_lossy(&data);
        let _ = lunmpio_nbd::uri::parse(&s);
    }

    /// Valid messages with a corrupted byte or a truncated data section decode or fail cleanly.
    #[test]
    fn corrupted_messages_fail_cleanly(o in client_option(), r in option_reply(), p in chunk_payload(),
                                       pos in any::<usize>(), byte in any::<u8>()) {
        let mut wires = Vec::new();
        let mut b = BytesMut::new(); o.encode(&mut b); wires.push(b);
        let mut b = BytesMut::new(); r.encode(1, &mut b); wires.push(b);
        let mut b = BytesMut::new(); p.encode(7, 1, &mut b); wires.push(b);
        for (i, w) in wires.into_iter().enumerate() {
            let mut w = w.to_vec();
            let at = pos % w.len();
            w[at] = byte;
            let mut b = BytesMut::from(&w[..]);
            match i {
                0 => { if let Ok(Some(raw)) = RawOption::decode(&mut b) { let _ = ClientOption::parse(&raw); } }
                1 => { if let Ok(Some(raw)) = RawOptionReply::decode(&mut b) { let _ = OptionReply::parse(&raw); } }
                _ => { let _ = Chunk::decode(&mut b); }
            }
        }
    }
}

#[test]
fn oversized_lengths_are_errors_not_allocations() {
    let mut b = BytesMut::new();
    bytes::BufMut::put_u64(&mut b, IHAVEOPT);
    bytes::BufMut::put_u32(&mut b, NBD_OPT_GO);
    bytes::BufMut::put_u32(&mut b, OPTION_DATA_BYTES_MAX + 1);
    assert!(matches!(
        RawOption::decode(&mut b),
        Err(ProtoError::TooLarge { .. })
    ));

    let h = RequestHeader {
        flags: CommandFlags::empty(),
        command: Command::Write,
        cookie: 1,
        offset: 0,
        length: u64::from(u32::MAX),
    };
    let mut b = BytesMut::new();
    h.encode(&mut b);
    assert!(matches!(
        decode_request(&mut b),
        Err(ProtoError::TooLarge { .. })
    ));
    // An extended payload length of 2^64-1 is refused before anything is allocated; the same
    // length as an effect length (no PAYLOAD_LEN) is just a header.
    let ext = TransmissionMode::Extended;
    let h = RequestHeader {
        flags: CommandFlags::PAYLOAD_LEN,
        command: Command::Trim,
        length: u64::MAX,
        ..h
    };
    let mut b = BytesMut::new();
    h.encode_in(ext, &mut b);
    assert!(matches!(
        decode_request_in(&mut b, ext),
        Err(ProtoError::TooLarge { .. })
    ));
    let h = RequestHeader {
        flags: CommandFlags::empty(),
        ..h
    };
    let mut b = BytesMut::new();
    h.encode_in(ext, &mut b);
    assert_eq!(decode_request_in(&mut b, ext).unwrap().unwrap().0, h);
    let mut b = BytesMut::new();
    ExtendedReplyHeader {
        flags: 0,
        chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
        cookie: 1,
        offset: 0,
        length: u64::MAX,
    }
    .encode(&mut b);
    assert!(matches!(
        Chunk::decode_extended(&mut b),
        Err(ProtoError::TooLarge { .. })
    ));
    // A descriptor count that disagrees with the length is malformed.
    let mut d = BytesMut::new();
    for v in [1u32, 2, 0, 4096, 0, 0] {
        bytes::BufMut::put_u32(&mut d, v);
    }
    assert!(matches!(
        ChunkPayload::parse(NBD_REPLY_TYPE_BLOCK_STATUS_EXT, d.freeze()),
        Err(ProtoError::Malformed { .. })
    ));

    let mut b = BytesMut::new();
    ChunkHeader {
        flags: 0,
        chunk_type: NBD_REPLY_TYPE_OFFSET_DATA,
        cookie: 1,
        length: u32::MAX,
    }
    .encode(&mut b);
    assert!(matches!(
        Chunk::decode(&mut b),
        Err(ProtoError::TooLarge { .. })
    ));

    // Count fields larger than the data are errors, not huge Vecs.
    let mut d = BytesMut::new();
    bytes::BufMut::put_u32(&mut d, 0);
    bytes::BufMut::put_u32(&mut d, 1000);
    assert!(
        ClientOption::parse(&RawOption {
            option: NBD_OPT_SET_META_CONTEXT,
            data: d.freeze()
        })
        .is_err()
    );
    let mut d = BytesMut::new();
    bytes::BufMut::put_u32(&mut d, 0);
    bytes::BufMut::put_u16(&mut d, 1000);
    assert!(
        ClientOption::parse(&RawOption {
            option: NBD_OPT_GO,
            data: d.freeze()
        })
        .is_err()
    );
}

#[test]
fn errno_mapping() {
    use lunmpio_nbd::NbdErrno;
    for (e, v, n) in [
        (NbdErrno::Perm, 1, "EPERM"),
        (NbdErrno::Io, 5, "EIO"),
        (NbdErrno::NoMem, 12, "ENOMEM"),
        (NbdErrno::Inval, 22, "EINVAL"),
        (NbdErrno::NoSpc, 28, "ENOSPC"),
        (NbdErrno::Overflow, 75, "EOVERFLOW"),
        (NbdErrno::NotSup, 95, "ENOTSUP"),
        (NbdErrno::Shutdown, 108, "ESHUTDOWN"),
    ] {
        assert_eq!(e.to_wire(), v);
        assert_eq!(NbdErrno::from_wire(v), e);
        assert_eq!(e.name(), n);
    }
    assert_eq!(NbdErrno::from_wire(4242), NbdErrno::Other(4242));
    assert_eq!(NbdErrno::Other(4242).to_wire(), 4242);
    assert_eq!(
        NbdErrno::from_io_error(&std::io::Error::from_raw_os_error(122)),
        NbdErrno::NoSpc
    );
    assert_eq!(
        NbdErrno::from_io_error(&std::io::Error::from_raw_os_error(30)),
        NbdErrno::Perm
    );
    assert_eq!(
        NbdErrno::from_io_error(&std::io::Error::other("x")),
        NbdErrno::Io
    );
}
