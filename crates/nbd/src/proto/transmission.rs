//! Transmission-phase messages: request header (+ WRITE payload), simple reply, structured
//! reply chunks.

use super::ProtoError;
use super::consts::*;
use super::cursor::Cursor;
use crate::{CommandFlags, Extent, MAX_PAYLOAD_BYTES, TransmissionMode, WideExtent};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A command type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
    Unknown(u16),
}

impl Command {
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Resize => NBD_CMD_RESIZE,
            Command::Unknown(v) => v,
        }
    }

    pub fn from_wire(v: u16) -> Command {
        match v {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            NBD_CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "READ",
            Command::Write => "WRITE",
            Command::Disc => "DISC",
            Command::Flush => "FLUSH",
            Command::Trim => "TRIM",
            Command::Cache => "CACHE",
            Command::WriteZeroes => "WRITE_ZEROES",
            Command::BlockStatus => "BLOCK_STATUS",
            Command::Resize => "RESIZE",
            Command::Unknown(_) => "UNKNOWN",
        }
    }
}

/// A request header. On the wire it is compact (28 bytes, a 32-bit length) or, once extended
/// headers are negotiated, extended (32 bytes, a 64-bit length). The length is a payload length
/// when a payload follows (see [`RequestHeader::payload_len`]), otherwise an effect length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CommandFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl RequestHeader {
    /// Appends the header in the form `mode` uses.
    pub fn encode_in(&self, mode: TransmissionMode, dst: &mut BytesMut) {
        if mode.extended() {
            dst.put_slice(&self.to_bytes_extended());
        } else {
            dst.put_slice(&self.to_bytes());
        }
    }

    /// Appends the compact header.
    pub fn encode(&self, dst: &mut BytesMut) {
        self.encode_in(TransmissionMode::Simple, dst);
    }

    /// The compact header on the stack (no allocation on the client's hot path). The length must
    /// fit 32 bits: a compact header has no room for more.
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_BYTES] {
        debug_assert!(
            self.length <= u64::from(u32::MAX),
            "a compact request carries a 32-bit length"
        );
        let mut a = [0u8; REQUEST_HEADER_BYTES];
        self.put_common(NBD_REQUEST_MAGIC, &mut a);
        a[24..28].copy_from_slice(&(self.length as u32).to_be_bytes());
        a
    }

    /// The extended header on the stack.
    pub fn to_bytes_extended(&self) -> [u8; EXTENDED_REQUEST_HEADER_BYTES] {
        let mut a = [0u8; EXTENDED_REQUEST_HEADER_BYTES];
        self.put_common(NBD_EXTENDED_REQUEST_MAGIC, &mut a);
        a[24..32].copy_from_slice(&self.length.to_be_bytes());
        a
    }

    /// The 24 bytes both forms share: magic, flags, type, cookie, offset.
    fn put_common(&self, magic: u32, a: &mut [u8]) {
        a[0..4].copy_from_slice(&magic.to_be_bytes());
        a[4..6].copy_from_slice(&self.flags.bits().to_be_bytes());
        a[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        a[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        a[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }

    /// Bytes of payload that follow this header on the wire: a WRITE's data; under extended
    /// headers also `length` bytes whenever `NBD_CMD_FLAG_PAYLOAD_LEN` is set (whatever the
    /// command: a server consumes them even for a command that takes none, then refuses it).
    ///
    /// A WRITE carries its data even without the flag under extended headers. proto.md says it
    /// must set the flag, but qemu 10's client does not, and qemu's server reads the data anyway
    /// (it traces `nbd_co_receive_ext_payload_compliance`); reading it is the only way to stay in
    /// step with such a client.
    pub fn payload_len(&self, mode: TransmissionMode) -> u64 {
        let has_payload = self.command == Command::Write
            || (mode.extended() && self.flags.contains(CommandFlags::PAYLOAD_LEN));
        if has_payload { self.length } else { 0 }
    }

    /// Decodes a compact header without consuming; the caller advances by
    /// [`REQUEST_HEADER_BYTES`].
    pub fn decode(src: &[u8]) -> Result<Option<RequestHeader>, ProtoError> {
        RequestHeader::decode_in(src, TransmissionMode::Simple)
    }

    /// Decodes the header form `mode` uses without consuming; the caller advances by
    /// [`request_header_bytes`]. The other form's magic is an error.
    pub fn decode_in(
        src: &[u8],
        mode: TransmissionMode,
    ) -> Result<Option<RequestHeader>, ProtoError> {
        const WHAT: &str = "request";
        let (magic, size) = if mode.extended() {
            (NBD_EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_HEADER_BYTES)
        } else {
            (NBD_REQUEST_MAGIC, REQUEST_HEADER_BYTES)
        };
        if src.len() >= 4 {
            let found = Cursor::new(src, WHAT).u32()?;
            ProtoError::check_magic(WHAT, u64::from(found), u64::from(magic))?;
        }
        if src.len() < size {
            return Ok(None);
        }
        let mut c = Cursor::new(&src[4..], WHAT);
        Ok(Some(RequestHeader {
            flags: CommandFlags::from_bits_retain(c.u16()?),
            command: Command::from_wire(c.u16()?),
            cookie: c.u64()?,
            offset: c.u64()?,
            length: if mode.extended() {
                c.u64()?
            } else {
                u64::from(c.u32()?)
            },
        }))
    }
}

/// The size of a request header in `mode`.
pub fn request_header_bytes(mode: TransmissionMode) -> usize {
    if mode.extended() {
        EXTENDED_REQUEST_HEADER_BYTES
    } else {
        REQUEST_HEADER_BYTES
    }
}

/// Consumes one complete compact request (header plus WRITE data) from `buf`.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<(RequestHeader, Bytes)>, ProtoError> {
    decode_request_in(buf, TransmissionMode::Simple)
}

/// Consumes one complete request (header plus payload) in the form `mode` uses. A payload above
/// [`MAX_PAYLOAD_BYTES`] is an error (the connection cannot be resynchronised), never an
/// allocation.
pub fn decode_request_in(
    buf: &mut BytesMut,
    mode: TransmissionMode,
) -> Result<Option<(RequestHeader, Bytes)>, ProtoError> {
    let Some(header) = RequestHeader::decode_in(buf, mode)? else {
        return Ok(None);
    };
    let payload = header.payload_len(mode);
    ProtoError::check_length("request payload", payload, u64::from(MAX_PAYLOAD_BYTES))?;
    let size = request_header_bytes(mode);
    // Bounded by the check above.
    let payload = payload as usize;
    if buf.len() < size + payload {
        return Ok(None);
    }
    buf.advance(size);
    let data = if payload == 0 {
        Bytes::new()
    } else {
        buf.split_to(payload).freeze()
    };
    Ok(Some((header, data)))
}

/// Simple reply header (16 bytes). READ data follows when `error` is 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(NBD_SIMPLE_REPLY_MAGIC);
        dst.put_u32(self.error);
        dst.put_u64(self.cookie);
    }

    /// Decodes without consuming; the caller advances by [`SIMPLE_REPLY_BYTES`].
    pub fn decode(src: &[u8]) -> Result<Option<SimpleReply>, ProtoError> {
        const WHAT: &str = "simple reply";
        if src.len() >= 4 {
            let magic = Cursor::new(src, WHAT).u32()?;
            ProtoError::check_magic(WHAT, u64::from(magic), u64::from(NBD_SIMPLE_REPLY_MAGIC))?;
        }
        if src.len() < SIMPLE_REPLY_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&src[4..], WHAT);
        Ok(Some(SimpleReply {
            error: c.u32()?,
            cookie: c.u64()?,
        }))
    }
}

/// The magic of the next reply, once 4 bytes are present.
pub fn peek_reply_magic(src: &[u8]) -> Option<u32> {
    let b = src.get(..4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Structured reply chunk header (20 bytes); `length` bytes of payload follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(NBD_STRUCTURED_REPLY_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.chunk_type);
        dst.put_u64(self.cookie);
        dst.put_u32(self.length);
    }

    /// Decodes without consuming; checks the payload length against
    /// [`CHUNK_PAYLOAD_BYTES_MAX`].
    pub fn decode(src: &[u8]) -> Result<Option<ChunkHeader>, ProtoError> {
        const WHAT: &str = "structured reply chunk";
        if src.len() >= 4 {
            let magic = Cursor::new(src, WHAT).u32()?;
            ProtoError::check_magic(
                WHAT,
                u64::from(magic),
                u64::from(NBD_STRUCTURED_REPLY_MAGIC),
            )?;
        }
        if src.len() < CHUNK_HEADER_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&src[4..], WHAT);
        let h = ChunkHeader {
            flags: c.u16()?,
            chunk_type: c.u16()?,
            cookie: c.u64()?,
            length: c.u32()?,
        };
        ProtoError::check_length(
            WHAT,
            u64::from(h.length),
            u64::from(CHUNK_PAYLOAD_BYTES_MAX),
        )?;
        Ok(Some(h))
    }
}

/// Extended reply chunk header (32 bytes, extended headers only); `length` bytes of payload
/// follow. `offset` echoes the request's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendedReplyHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl ExtendedReplyHeader {
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(NBD_EXTENDED_REPLY_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.chunk_type);
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        dst.put_u64(self.length);
    }

    /// Decodes without consuming; checks the payload length against
    /// [`CHUNK_PAYLOAD_BYTES_MAX`] (the reply length is 64 bits on the wire, but no payload is
    /// ever that large).
    pub fn decode(src: &[u8]) -> Result<Option<ExtendedReplyHeader>, ProtoError> {
        const WHAT: &str = "extended reply chunk";
        if src.len() >= 4 {
            let magic = Cursor::new(src, WHAT).u32()?;
            ProtoError::check_magic(WHAT, u64::from(magic), u64::from(NBD_EXTENDED_REPLY_MAGIC))?;
        }
        if src.len() < EXTENDED_REPLY_HEADER_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&src[4..], WHAT);
        let h = ExtendedReplyHeader {
            flags: c.u16()?,
            chunk_type: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u64()?,
        };
        ProtoError::check_length(WHAT, h.length, u64::from(CHUNK_PAYLOAD_BYTES_MAX))?;
        Ok(Some(h))
    }
}

/// A structured reply chunk's payload, interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkPayload {
    None,
    OffsetData {
        offset: u64,
        data: Bytes,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<Extent>,
    },
    /// 64-bit extents; only under extended headers.
    BlockStatusExt {
        context_id: u32,
        extents: Vec<WideExtent>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
    /// An unknown chunk type; `chunk_type & NBD_REPLY_TYPE_ERROR_BIT` tells whether it is an
    /// error (fails only its request) or not (the client must hang up).
    Unknown {
        chunk_type: u16,
        data: Bytes,
    },
}

impl ChunkPayload {
    pub fn chunk_type(&self) -> u16 {
        match self {
            ChunkPayload::None => NBD_REPLY_TYPE_NONE,
            ChunkPayload::OffsetData { .. } => NBD_REPLY_TYPE_OFFSET_DATA,
            ChunkPayload::OffsetHole { .. } => NBD_REPLY_TYPE_OFFSET_HOLE,
            ChunkPayload::BlockStatus { .. } => NBD_REPLY_TYPE_BLOCK_STATUS,
            ChunkPayload::BlockStatusExt { .. } => NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
            ChunkPayload::Error { .. } => NBD_REPLY_TYPE_ERROR,
            ChunkPayload::ErrorOffset { .. } => NBD_REPLY_TYPE_ERROR_OFFSET,
            ChunkPayload::Unknown { chunk_type, .. } => *chunk_type,
        }
    }

    fn wire_len(&self) -> usize {
        match self {
            ChunkPayload::None => 0,
            ChunkPayload::OffsetData { data, .. } => 8 + data.len(),
            ChunkPayload::OffsetHole { .. } => 12,
            ChunkPayload::BlockStatus { extents, .. } => 4 + 8 * extents.len(),
            ChunkPayload::BlockStatusExt { extents, .. } => 8 + 16 * extents.len(),
            ChunkPayload::Error { message, .. } => 6 + message.len(),
            ChunkPayload::ErrorOffset { message, .. } => 14 + message.len(),
            ChunkPayload::Unknown { data, .. } => data.len(),
        }
    }

    /// Appends a complete structured chunk (compact header and payload).
    pub fn encode(&self, cookie: u64, flags: u16, dst: &mut BytesMut) {
        let length = self.wire_len();
        dst.reserve(CHUNK_HEADER_BYTES + length);
        ChunkHeader {
            flags,
            chunk_type: self.chunk_type(),
            cookie,
            length: length as u32,
        }
        .encode(dst);
        self.encode_payload(dst);
    }

    /// Appends a complete extended chunk; `offset` is the request's.
    pub fn encode_extended(&self, cookie: u64, flags: u16, offset: u64, dst: &mut BytesMut) {
        let length = self.wire_len();
        dst.reserve(EXTENDED_REPLY_HEADER_BYTES + length);
        ExtendedReplyHeader {
            flags,
            chunk_type: self.chunk_type(),
            cookie,
            offset,
            length: length as u64,
        }
        .encode(dst);
        self.encode_payload(dst);
    }

    /// Appends a chunk in the form `mode` uses (chunked modes only).
    pub fn encode_in(
        &self,
        mode: TransmissionMode,
        cookie: u64,
        flags: u16,
        offset: u64,
        dst: &mut BytesMut,
    ) {
        debug_assert!(mode.chunked(), "chunks need structured or extended replies");
        if mode.extended() {
            self.encode_extended(cookie, flags, offset, dst);
        } else {
            self.encode(cookie, flags, dst);
        }
    }

    fn encode_payload(&self, dst: &mut BytesMut) {
        match self {
            ChunkPayload::None => {}
            ChunkPayload::OffsetData { offset, data } => {
                dst.put_u64(*offset);
                dst.put_slice(data);
            }
            ChunkPayload::OffsetHole { offset, length } => {
                dst.put_u64(*offset);
                dst.put_u32(*length);
            }
            ChunkPayload::BlockStatus {
                context_id,
                extents,
            } => {
                dst.put_u32(*context_id);
                for e in extents {
                    dst.put_u32(e.length);
                    dst.put_u32(e.flags);
                }
            }
            ChunkPayload::BlockStatusExt {
                context_id,
                extents,
            } => {
                dst.put_u32(*context_id);
                // The descriptor count is optional on the wire; we always fill it in.
                dst.put_u32(u32::try_from(extents.len()).unwrap_or(0));
                for e in extents {
                    dst.put_u64(e.length);
                    dst.put_u32(0);
                    dst.put_u32(e.flags);
                }
            }
            ChunkPayload::Error { error, message } => {
                dst.put_u32(*error);
                dst.put_u16(message.len() as u16);
                dst.put_slice(message.as_bytes());
            }
            ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            } => {
                dst.put_u32(*error);
                dst.put_u16(message.len() as u16);
                dst.put_slice(message.as_bytes());
                dst.put_u64(*offset);
            }
            ChunkPayload::Unknown { data, .. } => dst.put_slice(data),
        }
    }

    /// Interprets a chunk payload (complete, at most [`CHUNK_PAYLOAD_BYTES_MAX`] bytes).
    pub fn parse(chunk_type: u16, data: Bytes) -> Result<ChunkPayload, ProtoError> {
        const WHAT: &str = "structured reply chunk";
        let mut c = Cursor::new(&data, WHAT);
        let payload = match chunk_type {
            NBD_REPLY_TYPE_NONE => ChunkPayload::None,
            NBD_REPLY_TYPE_OFFSET_DATA => {
                let offset = c.u64()?;
                if c.remaining() == 0 {
                    return Err(ProtoError::malformed(WHAT, "OFFSET_DATA without data"));
                }
                return Ok(ChunkPayload::OffsetData {
                    offset,
                    data: data.slice(8..),
                });
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                let offset = c.u64()?;
                let length = c.u32()?;
                if length == 0 {
                    return Err(ProtoError::malformed(WHAT, "OFFSET_HOLE of length 0"));
                }
                ChunkPayload::OffsetHole { offset, length }
            }
            NBD_REPLY_TYPE_BLOCK_STATUS => {
                let context_id = c.u32()?;
                if c.remaining() == 0 || !c.remaining().is_multiple_of(8) {
                    return Err(ProtoError::malformed(
                        WHAT,
                        "BLOCK_STATUS extents are not 8-byte pairs",
                    ));
                }
                let mut extents = Vec::with_capacity(c.remaining() / 8);
                while c.remaining() > 0 {
                    extents.push(Extent {
                        length: c.u32()?,
                        flags: c.u32()?,
                    });
                }
                ChunkPayload::BlockStatus {
                    context_id,
                    extents,
                }
            }
            NBD_REPLY_TYPE_BLOCK_STATUS_EXT => {
                let context_id = c.u32()?;
                let count = c.u32()?;
                if c.remaining() == 0 || !c.remaining().is_multiple_of(16) {
                    return Err(ProtoError::malformed(
                        WHAT,
                        "BLOCK_STATUS_EXT descriptors are not 16 bytes each",
                    ));
                }
                let n = c.remaining() / 16;
                if count != 0 && count as usize != n {
                    return Err(ProtoError::malformed(
                        WHAT,
                        format!("BLOCK_STATUS_EXT says {count} descriptors and carries {n}"),
                    ));
                }
                let mut extents = Vec::with_capacity(n);
                while c.remaining() > 0 {
                    let length = c.u64()?;
                    // Padding: must be zero, and means nothing either way.
                    c.u32()?;
                    extents.push(WideExtent {
                        length,
                        flags: c.u32()?,
                    });
                }
                ChunkPayload::BlockStatusExt {
                    context_id,
                    extents,
                }
            }
            NBD_REPLY_TYPE_ERROR | NBD_REPLY_TYPE_ERROR_OFFSET => {
                let error = c.u32()?;
                let len = c.u16()? as usize;
                let raw = c.take(len)?;
                // Messages are for humans; a bad byte must not turn an error into a hang-up.
                let message = String::from_utf8_lossy(raw).into_owned();
                if chunk_type == NBD_REPLY_TYPE_ERROR {
                    ChunkPayload::Error { error, message }
                } else {
                    ChunkPayload::ErrorOffset {
                        error,
                        message,
                        offset: c.u64()?,
                    }
                }
            }
            other => {
                return Ok(ChunkPayload::Unknown {
                    chunk_type: other,
                    data,
                });
            }
        };
        c.end()?;
        Ok(payload)
    }

    /// The error value of an error chunk, including unknown error types (which share the
    /// u32 error prefix per proto.md). `None` for non-error chunks.
    pub fn error_value(&self) -> Option<u32> {
        match self {
            ChunkPayload::Error { error, .. } | ChunkPayload::ErrorOffset { error, .. } => {
                Some(*error)
            }
            ChunkPayload::Unknown { chunk_type, data }
                if chunk_type & NBD_REPLY_TYPE_ERROR_BIT != 0 =>
            {
                Some(Cursor::new(data, "error chunk").u32().unwrap_or(NBD_EINVAL))
            }
            _ => None,
        }
    }
}

/// One complete structured reply chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub cookie: u64,
    pub payload: ChunkPayload,
}

impl Chunk {
    pub fn is_done(&self) -> bool {
        self.flags & NBD_REPLY_FLAG_DONE != 0
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        self.payload.encode(self.cookie, self.flags, dst);
    }

    /// Consumes one complete chunk from `buf` (`Ok(None)`: need more bytes).
    pub fn decode(buf: &mut BytesMut) -> Result<Option<Chunk>, ProtoError> {
        let Some(h) = ChunkHeader::decode(buf)? else {
            return Ok(None);
        };
        if buf.len() < CHUNK_HEADER_BYTES + h.length as usize {
            return Ok(None);
        }
        buf.advance(CHUNK_HEADER_BYTES);
        let data = buf.split_to(h.length as usize).freeze();
        let payload = ChunkPayload::parse(h.chunk_type, data)?;
        Ok(Some(Chunk {
            flags: h.flags,
            cookie: h.cookie,
            payload,
        }))
    }

    /// Appends the chunk with an extended header; `offset` is the request's.
    pub fn encode_extended(&self, offset: u64, dst: &mut BytesMut) {
        self.payload
            .encode_extended(self.cookie, self.flags, offset, dst);
    }

    /// Consumes one complete extended chunk from `buf`, with the request offset its header
    /// echoes (`Ok(None)`: need more bytes).
    pub fn decode_extended(buf: &mut BytesMut) -> Result<Option<(Chunk, u64)>, ProtoError> {
        let Some(h) = ExtendedReplyHeader::decode(buf)? else {
            return Ok(None);
        };
        // Bounded by the header check.
        let length = h.length as usize;
        if buf.len() < EXTENDED_REPLY_HEADER_BYTES + length {
            return Ok(None);
        }
        buf.advance(EXTENDED_REPLY_HEADER_BYTES);
        let data = buf.split_to(length).freeze();
        let payload = ChunkPayload::parse(h.chunk_type, data)?;
        let chunk = Chunk {
            flags: h.flags,
            cookie: h.cookie,
            payload,
        };
        Ok(Some((chunk, h.offset)))
    }
}
