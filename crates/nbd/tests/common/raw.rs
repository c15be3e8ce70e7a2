//! A scripted NBD peer built on the sans-I/O codec, for driving the server with requests the
//! real client would refuse, and for playing a misbehaving server against the client.
#![allow(dead_code)]

use bytes::{Buf, Bytes, BytesMut};
use lunmpio_nbd::TransmissionFlags;
use lunmpio_nbd::proto::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub struct Raw<S> {
    pub s: S,
    pub buf: BytesMut,
    /// Extended headers negotiated: requests go out in 32 bytes, replies come as extended chunks.
    pub extended: bool,
}

#[derive(Debug)]
pub enum AnyReply {
    Simple(SimpleReply, Bytes),
    Chunk(Chunk),
    /// An extended chunk, with the request offset its header echoes.
    Extended(Chunk, u64),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub fn new(s: S) -> Self {
        Raw {
            s,
            buf: BytesMut::with_capacity(1 << 16),
            extended: false,
        }
    }

    /// Reads more; false on EOF.
    pub async fn more(&mut self) -> bool {
        self.buf.reserve(1 << 16);
        match self.s.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => false,
            Ok(_) => true,
        }
    }

    pub async fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).await.unwrap();
    }

    /// True when the peer closed the connection (after draining whatever it sent).
    pub async fn at_eof(&mut self) -> bool {
        loop {
            self.buf.clear();
            if !self.more().await {
                return true;
            }
        }
    }

    pub async fn greeting(&mut self) -> Greeting {
        loop {
            if let Some(g) = Greeting::decode(&self.buf).unwrap() {
                self.buf.advance(GREETING_BYTES);
                return g;
            }
            assert!(self.more().await, "EOF before greeting");
        }
    }

    pub async fn start(&mut self, flags: ClientFlags) -> Greeting {
        let g = self.greeting().await;
        let mut b = BytesMut::new();
        encode_client_flags(flags, &mut b);
        self.send(&b).await;
        g
    }

    pub async fn option(&mut self, o: &ClientOption) {
        let mut b = BytesMut::new();
        o.encode(&mut b);
        self.send(&b).await;
    }

    pub async fn reply(&mut self) -> Option<(u32, OptionReply)> {
        loop {
            if let Some(r) = RawOptionReply::decode(&mut self.buf).unwrap() {
                return Some((r.option, OptionReply::parse(&r).unwrap()));
            }
            if !self.more().await {
                return None;
            }
        }
    }

    /// Replies to one option up to and including the final one (ACK or error).
    pub async fn replies(&mut self) -> Vec<OptionReply> {
        let mut v = Vec::new();
        loop {
            let (_, r) = self.reply().await.expect("EOF during option replies");
            let last = matches!(r, OptionReply::Ack | OptionReply::Error { .. });
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Full handshake with GO. Returns (size, flags, context id).
    pub async fn go(
        &mut self,
        name: &str,
        structured: bool,
        meta: bool,
    ) -> (u64, TransmissionFlags, Option<u32>) {
        self.start(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
            .await;
        if structured {
            self.option(&ClientOption::StructuredReply).await;
            assert_eq!(self.replies().await, vec![OptionReply::Ack]);
        }
        let mut ctx = None;
        if meta {
            self.option(&ClientOption::SetMetaContext {
                export: name.into(),
                queries: vec![BASE_ALLOCATION.into()],
            })
            .await;
            for r in self.replies().await {
                if let OptionReply::MetaContext { id, .. } = r {
                    ctx = Some(id);
                }
            }
        }
        self.option(&ClientOption::Go {
            name: name.into(),
            requests: vec![NBD_INFO_BLOCK_SIZE],
        })
        .await;
        let mut export = None;
        for r in self.replies().await {
            if let OptionReply::Info(Info::Export { size, flags }) = r {
                export = Some((size, flags));
            }
            if let OptionReply::Error { .. } = r {
                panic!("GO failed: {r:?}");
            }
        }
        let (size, flags) = export.expect("no INFO_EXPORT");
        (size, flags, ctx)
    }

    pub async fn request(&mut self, h: RequestHeader, payload: &[u8]) {
        let mut b = BytesMut::new();
        let mode = if self.extended {
            lunmpio_nbd::TransmissionMode::Extended
        } else {
            lunmpio_nbd::TransmissionMode::Structured
        };
        h.encode_in(mode, &mut b);
        b.extend_from_slice(payload);
        self.send(&b).await;
    }

    /// Next reply; `read_len` is the data length of a successful simple READ reply.
    pub async fn any_reply(&mut self, read_len: impl Fn(u64) -> usize) -> Option<AnyReply> {
        loop {
            match peek_reply_magic(&self.buf) {
                Some(NBD_SIMPLE_REPLY_MAGIC) => {
                    if let Some(h) = SimpleReply::decode(&self.buf).unwrap() {
                        let n = if h.error == 0 { read_len(h.cookie) } else { 0 };
                        if self.buf.len() >= SIMPLE_REPLY_BYTES + n {
                            self.buf.advance(SIMPLE_REPLY_BYTES);
                            let d = self.buf.split_to(n).freeze();
                            return Some(AnyReply::Simple(h, d));
                        }
                    }
                }
                Some(NBD_STRUCTURED_REPLY_MAGIC) => {
                    if let Some(c) = Chunk::decode(&mut self.buf).unwrap() {
                        return Some(AnyReply::Chunk(c));
                    }
                }
                Some(NBD_EXTENDED_REPLY_MAGIC) => {
                    if let Some((c, offset)) = Chunk::decode_extended(&mut self.buf).unwrap() {
                        return Some(AnyReply::Extended(c, offset));
                    }
                }
                Some(m) => panic!("bad magic {m:#x}"),
                None => {}
            }
            if !self.more().await {
                return None;
            }
        }
    }

    /// Simple-reply error value of the next reply (0 = ok), or the error of an ERROR chunk.
    pub async fn errno_of_next(&mut self) -> u32 {
        match self.any_reply(|_| 0).await.expect("EOF instead of a reply") {
            AnyReply::Simple(h, _) => h.error,
            AnyReply::Chunk(c) | AnyReply::Extended(c, _) => c.payload.error_value().unwrap_or(0),
        }
    }
}

pub fn req(command: Command, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags: lunmpio_nbd::CommandFlags::empty(),
        command,
        cookie,
        offset,
        length: u64::from(length),
    }
}
