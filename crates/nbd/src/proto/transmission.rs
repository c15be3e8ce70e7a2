//! Transmission-phase messages: request header (+ WRITE payload), simple reply, structured
//! reply chunks.

use super::ProtoError;
use super::consts::*;
use super::cursor::Cursor;
use crate::{CommandFlags, Extent, MAX_PAYLOAD_BYTES};
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

/// Request header (compact form, 28 bytes). WRITE data of `length` bytes follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CommandFlags,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(NBD_REQUEST_MAGIC);
        dst.put_u16(self.flags.bits());
        dst.put_u16(self.command.to_wire());
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        dst.put_u32(self.length);
    }

    /// The encoded header on the stack (no allocation on the client's hot path).
    pub fn to_bytes(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut a = [0u8; REQUEST_HEADER_BYTES];
        a[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        a[4..6].copy_from_slice(&self.flags.bits().to_be_bytes());
        a[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        a[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        a[16..24].copy_from_slice(&self.offset.to_be_bytes());
        a[24..28].copy_from_slice(&self.length.to_be_bytes());
        a
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Decodes without consuming; the caller advances by [`REQUEST_HEADER_BYTES`].
    pub fn decode(src: &[u8]) -> Result<Option<RequestHeader>, ProtoError> {
        const WHAT: &str = "request";
        if src.len() >= 4 {
            let magic = Cursor::new(src, WHAT).u32()?;
            ProtoError::check_magic(WHAT, u64::from(magic), u64::from(NBD_REQUEST_MAGIC))?;
        }
        if src.len() < REQUEST_HEADER_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&src[4..], WHAT);
        Ok(Some(RequestHeader {
            flags: CommandFlags::from_bits_retain(c.u16()?),
            command: Command::from_wire(c.u16()?),
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u32()?,
        }))
    }
}

/// Consumes one complete request (header plus WRITE data) from `buf`. A WRITE payload above
/// [`MAX_PAYLOAD_BYTES`] is an error, never an allocation.
pub fn decode_request(buf: &mut BytesMut) -> Result<Option<(RequestHeader, Bytes)>, ProtoError> {
    let Some(header) = RequestHeader::decode(buf)? else {
        return Ok(None);
    };
    let payload = header.payload_len();
    ProtoError::check_length(
        "write payload",
        u64::from(payload),
        u64::from(MAX_PAYLOAD_BYTES),
    )?;
    if buf.len() < REQUEST_HEADER_BYTES + payload as usize {
        return Ok(None);
    }
    buf.advance(REQUEST_HEADER_BYTES);
    let data = if payload == 0 {
        Bytes::new()
    } else {
        buf.split_to(payload as usize).freeze()
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
            ChunkPayload::Error { message, .. } => 6 + message.len(),
            ChunkPayload::ErrorOffset { message, .. } => 14 + message.len(),
            ChunkPayload::Unknown { data, .. } => data.len(),
        }
    }

    /// Appends a complete chunk (header and payload).
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
}
