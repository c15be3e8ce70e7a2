//! Handshake decoders: greeting, client flags, options, option replies, EXPORT_NAME reply.
//! Every decoded message must re-encode to something that decodes to the same value.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use lunmpio_nbd::proto::*;

fuzz_target!(|data: &[u8]| {
    let _ = Greeting::decode(data);
    let _ = decode_client_flags(data);
    let _ = ExportNameReply::decode(data, true);
    let _ = ExportNameReply::decode(data, false);

    let mut b = BytesMut::from(data);
    while let Ok(Some(raw)) = RawOption::decode(&mut b) {
        if let Ok(opt) = ClientOption::parse(&raw) {
            let mut w = BytesMut::new();
            opt.encode(&mut w);
            let back = RawOption::decode(&mut w)
                .expect("re-encoded option")
                .expect("complete");
            assert_eq!(
                ClientOption::parse(&back).expect("re-encoded option parses"),
                opt
            );
        }
    }
    let mut b = BytesMut::from(data);
    while let Ok(Some(raw)) = RawOptionReply::decode(&mut b) {
        let _ = OptionReply::parse(&raw);
    }
});
