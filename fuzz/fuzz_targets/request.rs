//! Request decoding (header plus WRITE payload), as the server sees it.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = RequestHeader::decode(data) {
        assert_eq!(RequestHeader::decode(&h.to_bytes()).unwrap(), Some(h));
    }
    let mut b = BytesMut::from(data);
    while let Ok(Some((h, payload))) = decode_request(&mut b) {
        assert_eq!(payload.len() as u32, h.payload_len());
    }
});
