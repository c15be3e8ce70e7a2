//! Vocabulary shared by the codec, the client and the server: error values, flags, block sizes.

use std::fmt;

/// The largest payload (READ reply data, WRITE data) ever allocated on the word of a peer.
/// It is also the NBD default maximum payload (proto.md, "Size constraints").
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// An NBD error value (proto.md, "Error values").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NbdErrno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
    /// A value this implementation does not know; clients treat it like EINVAL.
    Other(u32),
}

impl NbdErrno {
    pub fn to_wire(self) -> u32 {
        match self {
            NbdErrno::Perm => 1,
            NbdErrno::Io => 5,
            NbdErrno::NoMem => 12,
            NbdErrno::Inval => 22,
            NbdErrno::NoSpc => 28,
            NbdErrno::Overflow => 75,
            NbdErrno::NotSup => 95,
            NbdErrno::Shutdown => 108,
            NbdErrno::Other(v) => v,
        }
    }

    pub fn from_wire(v: u32) -> Self {
        match v {
            1 => NbdErrno::Perm,
            5 => NbdErrno::Io,
            12 => NbdErrno::NoMem,
            22 => NbdErrno::Inval,
            28 => NbdErrno::NoSpc,
            75 => NbdErrno::Overflow,
            95 => NbdErrno::NotSup,
            108 => NbdErrno::Shutdown,
            other => NbdErrno::Other(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            NbdErrno::Perm => "EPERM",
            NbdErrno::Io => "EIO",
            NbdErrno::NoMem => "ENOMEM",
            NbdErrno::Inval => "EINVAL",
            NbdErrno::NoSpc => "ENOSPC",
            NbdErrno::Overflow => "EOVERFLOW",
            NbdErrno::NotSup => "ENOTSUP",
            NbdErrno::Shutdown => "ESHUTDOWN",
            NbdErrno::Other(_) => "EUNKNOWN",
        }
    }

    /// Maps a host I/O error to the closest NBD value (EDQUOT and EFBIG become ENOSPC, EROFS and
    /// EACCES become EPERM, as proto.md asks). Linux errno numbers.
    pub fn from_io_error(err: &std::io::Error) -> Self {
        match err.raw_os_error() {
            Some(1 | 13 | 30) => NbdErrno::Perm,
            Some(12) => NbdErrno::NoMem,
            Some(22) => NbdErrno::Inval,
            Some(27 | 28 | 122) => NbdErrno::NoSpc,
            Some(75) => NbdErrno::Overflow,
            Some(95) => NbdErrno::NotSup,
            Some(108) => NbdErrno::Shutdown,
            Some(_) => NbdErrno::Io,
            None => match err.kind() {
                std::io::ErrorKind::PermissionDenied => NbdErrno::Perm,
                std::io::ErrorKind::OutOfMemory => NbdErrno::NoMem,
                std::io::ErrorKind::InvalidInput => NbdErrno::Inval,
                std::io::ErrorKind::StorageFull => NbdErrno::NoSpc,
                std::io::ErrorKind::Unsupported => NbdErrno::NotSup,
                _ => NbdErrno::Io,
            },
        }
    }
}

impl fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdErrno::Other(v) => write!(f, "NBD error {v}"),
            known => f.write_str(known.name()),
        }
    }
}

impl std::error::Error for NbdErrno {}

bitflags::bitflags! {
    /// Transmission flags (per export, sent in INFO_EXPORT or the EXPORT_NAME reply).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct TransmissionFlags: u16 {
        const HAS_FLAGS = 1 << 0;
        const READ_ONLY = 1 << 1;
        const SEND_FLUSH = 1 << 2;
        const SEND_FUA = 1 << 3;
        const ROTATIONAL = 1 << 4;
        const SEND_TRIM = 1 << 5;
        const SEND_WRITE_ZEROES = 1 << 6;
        const SEND_DF = 1 << 7;
        const CAN_MULTI_CONN = 1 << 8;
        const SEND_RESIZE = 1 << 9;
        const SEND_CACHE = 1 << 10;
        const SEND_FAST_ZERO = 1 << 11;
        const BLOCK_STATUS_PAYLOAD = 1 << 12;
        // Keep unknown bits on decode: a peer's future flags must survive a round trip.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Command flags (per request).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct CommandFlags: u16 {
        const FUA = 1 << 0;
        const NO_HOLE = 1 << 1;
        const DF = 1 << 2;
        const REQ_ONE = 1 << 3;
        const FAST_ZERO = 1 << 4;
        const PAYLOAD_LEN = 1 << 5;
        const _ = !0;
    }
}

impl CommandFlags {
    /// Every flag this implementation knows.
    pub const KNOWN: CommandFlags = CommandFlags::from_bits_retain(0x3f);
}

/// Block size constraints (INFO_BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max_payload: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        BlockSize {
            min: 1,
            preferred: 4096,
            max_payload: MAX_PAYLOAD_BYTES,
        }
    }
}

/// The largest minimum block size the protocol allows.
pub const MIN_BLOCK_BYTES_MAX: u32 = 64 << 10;

impl BlockSize {
    /// Checks the rules of proto.md "Size constraints": min a power of two up to 64 KiB,
    /// preferred a power of two at least 512 and at least min, max payload a multiple of min
    /// and at least preferred (or 0xffffffff, "no limit").
    pub fn validate(&self) -> Result<(), String> {
        if !self.min.is_power_of_two() || self.min > MIN_BLOCK_BYTES_MAX {
            return Err(format!(
                "minimum block {} is not a power of two up to 64 KiB",
                self.min
            ));
        }
        if !self.preferred.is_power_of_two() || self.preferred < 512 || self.preferred < self.min {
            return Err(format!(
                "preferred block {} is not a power of two >= 512 and >= the minimum",
                self.preferred
            ));
        }
        if self.max_payload != u32::MAX
            && (!self.max_payload.is_multiple_of(self.min) || self.max_payload < self.preferred)
        {
            return Err(format!(
                "maximum payload {} is not a multiple of the minimum block and >= the preferred",
                self.max_payload
            ));
        }
        Ok(())
    }
}

impl BlockSize {
    /// What a client may rely on from a server's advertised constraints, whatever their values: the
    /// minimum must be legal (a power of two up to 64 KiB) or the export is refused; the maximum
    /// payload is capped at [`crate::MAX_PAYLOAD_BYTES`] (what we allocate) and made a multiple of the
    /// minimum; the preferred size is made a power of two between the minimum and the maximum. Odd but
    /// legal values (a preferred size above 32 MiB, "no limit" maxima) come out usable; nothing the
    /// server says can produce a `min > preferred > max_payload` triple downstream.
    pub fn sanitize(mut self) -> Result<BlockSize, String> {
        if !self.min.is_power_of_two() || self.min > MIN_BLOCK_BYTES_MAX {
            return Err(format!("minimum block size {} is invalid", self.min));
        }
        let max = self.max_payload.min(crate::MAX_PAYLOAD_BYTES);
        self.max_payload = max - max % self.min;
        if self.max_payload == 0 {
            return Err(format!(
                "maximum payload {max} is below the minimum block size {}",
                self.min
            ));
        }
        let preferred = if self.preferred == 0 {
            4096
        } else {
            self.preferred
        };
        // Largest power of two <= preferred, then into [min, largest power of two <= max_payload].
        let floor_pow2 = |v: u32| 1u32 << (31 - v.max(1).leading_zeros());
        self.preferred = floor_pow2(preferred)
            .min(floor_pow2(self.max_payload))
            .max(self.min);
        debug_assert!(self.min <= self.preferred && self.preferred <= self.max_payload);
        Ok(self)
    }
}

/// The headers and replies a connection's transmission phase uses, as its handshake settled them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TransmissionMode {
    /// Compact (28-byte) requests, simple replies only.
    #[default]
    Simple,
    /// Compact requests; simple replies and structured reply chunks (NBD_OPT_STRUCTURED_REPLY).
    Structured,
    /// 32-byte requests with 64-bit lengths, and only 32-byte extended reply chunks
    /// (NBD_OPT_EXTENDED_HEADERS): no simple replies at all.
    Extended,
}

impl TransmissionMode {
    /// Replies come as chunks (structured or extended): READ errors and BLOCK_STATUS need them.
    pub fn chunked(self) -> bool {
        self != TransmissionMode::Simple
    }

    pub fn extended(self) -> bool {
        self == TransmissionMode::Extended
    }

    pub fn name(self) -> &'static str {
        match self {
            TransmissionMode::Simple => "simple",
            TransmissionMode::Structured => "structured",
            TransmissionMode::Extended => "extended",
        }
    }
}

/// One extent of a BLOCK_STATUS reply (32-bit form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub length: u32,
    pub flags: u32,
}

impl Extent {
    /// base:allocation: not allocated.
    pub const HOLE: u32 = 1;
    /// base:allocation: reads as zeroes.
    pub const ZERO: u32 = 2;
}

/// One extent of a BLOCK_STATUS_EXT reply (64-bit lengths, extended headers only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WideExtent {
    pub length: u64,
    pub flags: u32,
}
