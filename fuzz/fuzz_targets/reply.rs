//! Simple, structured and extended reply decoding, as the client sees it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    let _ = SimpleReply::decode(data);
    let _ = ChunkHeader::decode(data);
    let _ = ExtendedReplyHeader::decode(data);
    let mut b = BytesMut::from(data);
    loop {
        match peek_reply_magic(&b) {
            Some(NBD_SIMPLE_REPLY_MAGIC) => match SimpleReply::decode(&b) {
                Ok(Some(_)) => bytes::Buf::advance(&mut b, SIMPLE_REPLY_BYTES),
                _ => break,
            },
            Some(NBD_STRUCTURED_REPLY_MAGIC) => match Chunk::decode(&mut b) {
                Ok(Some(c)) => {
                    let _ = c.payload.error_value();
                    let mut w = BytesMut::new();
                    c.encode(&mut w);
                    let back = Chunk::decode(&mut w)
                        .expect("re-encoded chunk")
                        .expect("complete");
                    assert_eq!(back, c);
                }
                _ => break,
            },
            Some(NBD_EXTENDED_REPLY_MAGIC) => match Chunk::decode_extended(&mut b) {
                Ok(Some((c, offset))) => {
                    let mut w = BytesMut::new();
                    c.encode_extended(offset, &mut w);
                    let back = Chunk::decode_extended(&mut w)
                        .expect("re-encoded chunk")
                        .expect("complete");
                    assert_eq!(back, (c, offset));
                }
                _ => break,
            },
            _ => break,
        }
    }
});
