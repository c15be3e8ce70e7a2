//! Request decoding (header plus payload), as the server sees it: compact requests, and extended
//! ones (64-bit lengths, payloads announced by PAYLOAD_LEN).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::TransmissionMode;
use lunmpio_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = RequestHeader::decode(data) {
        assert_eq!(RequestHeader::decode(&h.to_bytes()).unwrap(), Some(h));
    }
    let ext = TransmissionMode::Extended;
    if let Ok(Some(h)) = RequestHeader::decode_in(data, ext) {
        assert_eq!(
            RequestHeader::decode_in(&h.to_bytes_extended(), ext).unwrap(),
            Some(h)
        );
    }
    for mode in [TransmissionMode::Simple, ext] {
        let mut b = BytesMut::from(data);
        while let Ok(Some((h, payload))) = decode_request_in(&mut b, mode) {
            assert_eq!(payload.len() as u64, h.payload_len(mode));
        }
    }
});
