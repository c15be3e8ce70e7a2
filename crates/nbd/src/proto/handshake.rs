//! Fixed-newstyle handshake messages: greeting, client flags, options, option replies and
//! the EXPORT_NAME reply.

use super::ProtoError;
use super::consts::*;
use super::cursor::{Cursor, rest_bytes};
use crate::{BlockSize, TransmissionFlags};
use bytes::{Buf, BufMut, Bytes, BytesMut};

bitflags::bitflags! {
    /// Handshake flags sent by the server in the greeting.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct HandshakeFlags: u16 {
        const FIXED_NEWSTYLE = NBD_FLAG_FIXED_NEWSTYLE;
        const NO_ZEROES = NBD_FLAG_NO_ZEROES;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Client flags sent in reply to the greeting.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct ClientFlags: u32 {
        const FIXED_NEWSTYLE = NBD_FLAG_C_FIXED_NEWSTYLE;
        const NO_ZEROES = NBD_FLAG_C_NO_ZEROES;
        const _ = !0;
    }
}

impl ClientFlags {
    pub const KNOWN: ClientFlags = ClientFlags::from_bits_retain(0x3);
}

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub flags: HandshakeFlags,
}

impl Greeting {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(NBDMAGIC);
        dst.put_u64(IHAVEOPT);
        dst.put_u16(self.flags.bits());
    }

    /// Decodes without consuming; `Ok(None)` until [`GREETING_BYTES`] are present.
    pub fn decode(src: &[u8]) -> Result<Option<Greeting>, ProtoError> {
        const WHAT: &str = "greeting";
        if src.len() >= 8 {
            let mut c = Cursor::new(src, WHAT);
            let magic = c.u64()?;
            ProtoError::check_magic(WHAT, magic, NBDMAGIC)?;
        }
        if src.len() >= 16 {
            let mut c = Cursor::new(&src[8..], WHAT);
            let magic = c.u64()?;
            if magic == NBD_OLDSTYLE_MAGIC {
                return Err(ProtoError::malformed(
                    WHAT,
                    "oldstyle negotiation is not supported",
                ));
            }
            ProtoError::check_magic(WHAT, magic, IHAVEOPT)?;
        }
        if src.len() < GREETING_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&src[16..], WHAT);
        Ok(Some(Greeting {
            flags: HandshakeFlags::from_bits_retain(c.u16()?),
        }))
    }
}

/// Client flags message (4 bytes).
pub fn encode_client_flags(flags: ClientFlags, dst: &mut BytesMut) {
    dst.put_u32(flags.bits());
}

/// Decodes the client flags without consuming.
pub fn decode_client_flags(src: &[u8]) -> Result<Option<ClientFlags>, ProtoError> {
    if src.len() < CLIENT_FLAGS_BYTES {
        return Ok(None);
    }
    let mut c = Cursor::new(src, "client flags");
    Ok(Some(ClientFlags::from_bits_retain(c.u32()?)))
}

/// One option as framed on the wire, before its data is interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOption {
    pub option: u32,
    pub data: Bytes,
}

impl RawOption {
    /// Consumes one complete option from `buf`. Checks the IHAVEOPT magic and that the data
    /// length is at most [`OPTION_DATA_BYTES_MAX`].
    pub fn decode(buf: &mut BytesMut) -> Result<Option<RawOption>, ProtoError> {
        const WHAT: &str = "option";
        if buf.len() >= 8 {
            let magic = Cursor::new(buf, WHAT).u64()?;
            ProtoError::check_magic(WHAT, magic, IHAVEOPT)?;
        }
        if buf.len() < OPTION_HEADER_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&buf[8..], WHAT);
        let option = c.u32()?;
        let length = c.u32()?;
        ProtoError::check_length(WHAT, u64::from(length), u64::from(OPTION_DATA_BYTES_MAX))?;
        let total = OPTION_HEADER_BYTES + length as usize;
        if buf.len() < total {
            return Ok(None);
        }
        buf.advance(OPTION_HEADER_BYTES);
        let data = buf.split_to(length as usize).freeze();
        Ok(Some(RawOption { option, data }))
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(IHAVEOPT);
        dst.put_u32(self.option);
        dst.put_u32(self.data.len() as u32);
        dst.put_slice(&self.data);
    }
}

/// A client option, interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    /// INFO: export name plus the information types requested (INFO_EXPORT is implied).
    Info {
        name: String,
        requests: Vec<u16>,
    },
    Go {
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ListMetaContext {
        export: String,
        queries: Vec<String>,
    },
    SetMetaContext {
        export: String,
        queries: Vec<String>,
    },
    /// Recognised (qemu probes it first) but not implemented.
    ExtendedHeaders,
    /// Any other option, kept raw.
    Unknown(RawOption),
}

impl ClientOption {
    pub fn code(&self) -> u32 {
        match self {
            ClientOption::ExportName(_) => NBD_OPT_EXPORT_NAME,
            ClientOption::Abort => NBD_OPT_ABORT,
            ClientOption::List => NBD_OPT_LIST,
            ClientOption::StartTls => NBD_OPT_STARTTLS,
            ClientOption::Info { .. } => NBD_OPT_INFO,
            ClientOption::Go { .. } => NBD_OPT_GO,
            ClientOption::StructuredReply => NBD_OPT_STRUCTURED_REPLY,
            ClientOption::ListMetaContext { .. } => NBD_OPT_LIST_META_CONTEXT,
            ClientOption::SetMetaContext { .. } => NBD_OPT_SET_META_CONTEXT,
            ClientOption::ExtendedHeaders => NBD_OPT_EXTENDED_HEADERS,
            ClientOption::Unknown(raw) => raw.option,
        }
    }

    /// Interprets a framed option. An error here is `NBD_REP_ERR_INVALID`, not a reason to drop
    /// the connection: the framing is intact.
    pub fn parse(raw: &RawOption) -> Result<ClientOption, ProtoError> {
        const WHAT: &str = "option data";
        let mut c = Cursor::new(&raw.data, WHAT);
        let opt = match raw.option {
            NBD_OPT_EXPORT_NAME => return Ok(ClientOption::ExportName(c.rest_string()?)),
            NBD_OPT_ABORT => ClientOption::Abort,
            NBD_OPT_LIST => ClientOption::List,
            NBD_OPT_STARTTLS => ClientOption::StartTls,
            NBD_OPT_STRUCTURED_REPLY => ClientOption::StructuredReply,
            NBD_OPT_EXTENDED_HEADERS => ClientOption::ExtendedHeaders,
            NBD_OPT_INFO | NBD_OPT_GO => {
                let name = c.string32()?;
                let n = c.u16()? as u32;
                ProtoError::check_length(
                    "information requests",
                    n as u64,
                    OPTION_ITEMS_MAX as u64,
                )?;
                // n <= remaining/2 is checked by the reads; allocate no more than what is there.
                let mut requests = Vec::with_capacity((n as usize).min(c.remaining() / 2));
                for _ in 0..n {
                    requests.push(c.u16()?);
                }
                if raw.option == NBD_OPT_GO {
                    ClientOption::Go { name, requests }
                } else {
                    ClientOption::Info { name, requests }
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let export = c.string32()?;
                let n = c.u32()?;
                ProtoError::check_length(
                    "metadata context queries",
                    n as u64,
                    OPTION_ITEMS_MAX as u64,
                )?;
                let mut queries = Vec::with_capacity((n as usize).min(c.remaining() / 4));
                for _ in 0..n {
                    queries.push(c.string32()?);
                }
                if raw.option == NBD_OPT_SET_META_CONTEXT {
                    ClientOption::SetMetaContext { export, queries }
                } else {
                    ClientOption::ListMetaContext { export, queries }
                }
            }
            _ => return Ok(ClientOption::Unknown(raw.clone())),
        };
        c.end()?;
        Ok(opt)
    }

    pub fn to_raw(&self) -> RawOption {
        let mut d = BytesMut::new();
        match self {
            ClientOption::ExportName(name) => d.put_slice(name.as_bytes()),
            ClientOption::Abort
            | ClientOption::List
            | ClientOption::StartTls
            | ClientOption::StructuredReply
            | ClientOption::ExtendedHeaders => {}
            ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                put_string32(&mut d, name);
                d.put_u16(requests.len() as u16);
                for r in requests {
                    d.put_u16(*r);
                }
            }
            ClientOption::ListMetaContext { export, queries }
            | ClientOption::SetMetaContext { export, queries } => {
                put_string32(&mut d, export);
                d.put_u32(queries.len() as u32);
                for q in queries {
                    put_string32(&mut d, q);
                }
            }
            ClientOption::Unknown(raw) => return raw.clone(),
        }
        RawOption {
            option: self.code(),
            data: d.freeze(),
        }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        self.to_raw().encode(dst);
    }
}

fn put_string32(d: &mut BytesMut, s: &str) {
    d.put_u32(s.len() as u32);
    d.put_slice(s.as_bytes());
}

/// An option reply as framed on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawOptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Bytes,
}

impl RawOptionReply {
    /// Consumes one complete option reply (data at most [`OPTION_DATA_BYTES_MAX`]).
    pub fn decode(buf: &mut BytesMut) -> Result<Option<RawOptionReply>, ProtoError> {
        const WHAT: &str = "option reply";
        if buf.len() >= 8 {
            let magic = Cursor::new(buf, WHAT).u64()?;
            ProtoError::check_magic(WHAT, magic, NBD_REP_MAGIC)?;
        }
        if buf.len() < OPTION_REPLY_HEADER_BYTES {
            return Ok(None);
        }
        let mut c = Cursor::new(&buf[8..], WHAT);
        let option = c.u32()?;
        let reply_type = c.u32()?;
        let length = c.u32()?;
        ProtoError::check_length(WHAT, u64::from(length), u64::from(OPTION_DATA_BYTES_MAX))?;
        if buf.len() < OPTION_REPLY_HEADER_BYTES + length as usize {
            return Ok(None);
        }
        buf.advance(OPTION_REPLY_HEADER_BYTES);
        let data = buf.split_to(length as usize).freeze();
        Ok(Some(RawOptionReply {
            option,
            reply_type,
            data,
        }))
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(NBD_REP_MAGIC);
        dst.put_u32(self.option);
        dst.put_u32(self.reply_type);
        dst.put_u32(self.data.len() as u32);
        dst.put_slice(&self.data);
    }
}

/// Option error replies (bit 31 set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptionError {
    Unsup,
    Policy,
    Invalid,
    Platform,
    TlsReqd,
    Unknown,
    Shutdown,
    BlockSizeReqd,
    TooBig,
    ExtHeaderReqd,
    /// Another value with bit 31 set.
    Other(u32),
}

impl OptionError {
    pub fn to_wire(self) -> u32 {
        match self {
            OptionError::Unsup => NBD_REP_ERR_UNSUP,
            OptionError::Policy => NBD_REP_ERR_POLICY,
            OptionError::Invalid => NBD_REP_ERR_INVALID,
            OptionError::Platform => NBD_REP_ERR_PLATFORM,
            OptionError::TlsReqd => NBD_REP_ERR_TLS_REQD,
            OptionError::Unknown => NBD_REP_ERR_UNKNOWN,
            OptionError::Shutdown => NBD_REP_ERR_SHUTDOWN,
            OptionError::BlockSizeReqd => NBD_REP_ERR_BLOCK_SIZE_REQD,
            OptionError::TooBig => NBD_REP_ERR_TOO_BIG,
            OptionError::ExtHeaderReqd => NBD_REP_ERR_EXT_HEADER_REQD,
            OptionError::Other(v) => v | NBD_REP_FLAG_ERROR,
        }
    }

    pub fn from_wire(v: u32) -> OptionError {
        match v {
            NBD_REP_ERR_UNSUP => OptionError::Unsup,
            NBD_REP_ERR_POLICY => OptionError::Policy,
            NBD_REP_ERR_INVALID => OptionError::Invalid,
            NBD_REP_ERR_PLATFORM => OptionError::Platform,
            NBD_REP_ERR_TLS_REQD => OptionError::TlsReqd,
            NBD_REP_ERR_UNKNOWN => OptionError::Unknown,
            NBD_REP_ERR_SHUTDOWN => OptionError::Shutdown,
            NBD_REP_ERR_BLOCK_SIZE_REQD => OptionError::BlockSizeReqd,
            NBD_REP_ERR_TOO_BIG => OptionError::TooBig,
            NBD_REP_ERR_EXT_HEADER_REQD => OptionError::ExtHeaderReqd,
            other => OptionError::Other(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            OptionError::Unsup => "NBD_REP_ERR_UNSUP",
            OptionError::Policy => "NBD_REP_ERR_POLICY",
            OptionError::Invalid => "NBD_REP_ERR_INVALID",
            OptionError::Platform => "NBD_REP_ERR_PLATFORM",
            OptionError::TlsReqd => "NBD_REP_ERR_TLS_REQD",
            OptionError::Unknown => "NBD_REP_ERR_UNKNOWN",
            OptionError::Shutdown => "NBD_REP_ERR_SHUTDOWN",
            OptionError::BlockSizeReqd => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            OptionError::TooBig => "NBD_REP_ERR_TOO_BIG",
            OptionError::ExtHeaderReqd => "NBD_REP_ERR_EXT_HEADER_REQD",
            OptionError::Other(_) => "NBD_REP_ERR_(unknown)",
        }
    }
}

/// NBD_REP_INFO payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: TransmissionFlags },
    Name(String),
    Description(String),
    BlockSize(BlockSize),
    Unknown { info_type: u16, data: Bytes },
}

/// An option reply, interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply {
    Ack,
    /// REP_SERVER (LIST): export name plus implementation-defined details.
    Server {
        name: String,
        details: Bytes,
    },
    Info(Info),
    MetaContext {
        id: u32,
        name: String,
    },
    Error {
        error: OptionError,
        message: String,
    },
    Unknown {
        reply_type: u32,
        data: Bytes,
    },
}

impl OptionReply {
    pub fn parse(raw: &RawOptionReply) -> Result<OptionReply, ProtoError> {
        const WHAT: &str = "option reply data";
        let mut c = Cursor::new(&raw.data, WHAT);
        let reply = match raw.reply_type {
            NBD_REP_ACK => OptionReply::Ack,
            NBD_REP_SERVER => {
                let name = c.string32()?;
                let details = rest_bytes(&raw.data, &c);
                return Ok(OptionReply::Server { name, details });
            }
            NBD_REP_INFO => {
                let info_type = c.u16()?;
                let info = match info_type {
                    NBD_INFO_EXPORT => {
                        let size = c.u64()?;
                        let flags = TransmissionFlags::from_bits_retain(c.u16()?);
                        Info::Export { size, flags }
                    }
                    NBD_INFO_NAME => Info::Name(c.rest_string()?),
                    NBD_INFO_DESCRIPTION => Info::Description(c.rest_string()?),
                    NBD_INFO_BLOCK_SIZE => Info::BlockSize(BlockSize {
                        min: c.u32()?,
                        preferred: c.u32()?,
                        max_payload: c.u32()?,
                    }),
                    _ => {
                        return Ok(OptionReply::Info(Info::Unknown {
                            info_type,
                            data: rest_bytes(&raw.data, &c),
                        }));
                    }
                };
                OptionReply::Info(info)
            }
            NBD_REP_META_CONTEXT => {
                let id = c.u32()?;
                OptionReply::MetaContext {
                    id,
                    name: c.rest_string()?,
                }
            }
            t if t & NBD_REP_FLAG_ERROR != 0 => {
                // The message is for humans: tolerate bad UTF-8 rather than fail the option.
                let n = c.remaining().min(STRING_BYTES_MAX as usize);
                let message = String::from_utf8_lossy(c.take(n)?).into_owned();
                return Ok(OptionReply::Error {
                    error: OptionError::from_wire(t),
                    message,
                });
            }
            t => {
                return Ok(OptionReply::Unknown {
                    reply_type: t,
                    data: raw.data.clone(),
                });
            }
        };
        c.end()?;
        Ok(reply)
    }

    pub fn reply_type(&self) -> u32 {
        match self {
            OptionReply::Ack => NBD_REP_ACK,
            OptionReply::Server { .. } => NBD_REP_SERVER,
            OptionReply::Info(_) => NBD_REP_INFO,
            OptionReply::MetaContext { .. } => NBD_REP_META_CONTEXT,
            OptionReply::Error { error, .. } => error.to_wire(),
            OptionReply::Unknown { reply_type, .. } => *reply_type,
        }
    }

    /// Appends the complete reply to option `option`.
    pub fn encode(&self, option: u32, dst: &mut BytesMut) {
        let mut d = BytesMut::new();
        match self {
            OptionReply::Ack => {}
            OptionReply::Server { name, details } => {
                put_string32(&mut d, name);
                d.put_slice(details);
            }
            OptionReply::Info(info) => match info {
                Info::Export { size, flags } => {
                    d.put_u16(NBD_INFO_EXPORT);
                    d.put_u64(*size);
                    d.put_u16(flags.bits());
                }
                Info::Name(n) => {
                    d.put_u16(NBD_INFO_NAME);
                    d.put_slice(n.as_bytes());
                }
                Info::Description(s) => {
                    d.put_u16(NBD_INFO_DESCRIPTION);
                    d.put_slice(s.as_bytes());
                }
                Info::BlockSize(b) => {
                    d.put_u16(NBD_INFO_BLOCK_SIZE);
                    d.put_u32(b.min);
                    d.put_u32(b.preferred);
                    d.put_u32(b.max_payload);
                }
                Info::Unknown { info_type, data } => {
                    d.put_u16(*info_type);
                    d.put_slice(data);
                }
            },
            OptionReply::MetaContext { id, name } => {
                d.put_u32(*id);
                d.put_slice(name.as_bytes());
            }
            OptionReply::Error { message, .. } => d.put_slice(message.as_bytes()),
            OptionReply::Unknown { data, .. } => d.put_slice(data),
        }
        RawOptionReply {
            option,
            reply_type: self.reply_type(),
            data: d.freeze(),
        }
        .encode(dst);
    }
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless both
/// sides agreed on NO_ZEROES.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: TransmissionFlags,
}

impl ExportNameReply {
    pub fn wire_len(no_zeroes: bool) -> usize {
        if no_zeroes {
            EXPORT_NAME_REPLY_BYTES
        } else {
            EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES
        }
    }

    pub fn encode(&self, no_zeroes: bool, dst: &mut BytesMut) {
        dst.put_u64(self.size);
        dst.put_u16(self.flags.bits());
        if !no_zeroes {
            dst.put_bytes(0, EXPORT_NAME_ZEROES_BYTES);
        }
    }

    /// Decodes without consuming; the caller advances by [`ExportNameReply::wire_len`].
    pub fn decode(src: &[u8], no_zeroes: bool) -> Result<Option<ExportNameReply>, ProtoError> {
        if src.len() < Self::wire_len(no_zeroes) {
            return Ok(None);
        }
        let mut c = Cursor::new(src, "export name reply");
        let size = c.u64()?;
        let flags = TransmissionFlags::from_bits_retain(c.u16()?);
        Ok(Some(ExportNameReply { size, flags }))
    }
}
