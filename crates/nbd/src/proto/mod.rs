//! Sans-I/O codec for the NBD fixed-newstyle handshake and the transmission phase.
//!
//! Conventions:
//! * Fixed-size headers decode from a `&[u8]` without consuming it (`Ok(None)`: need more
//!   bytes); the caller advances by the header size. That makes readers cancel-safe.
//! * Variable-size messages decode from a `&mut BytesMut` and consume only a complete message.
//! * Every length read from the wire is checked against a fixed limit from [`consts`] before
//!   anything is allocated; malformed input is a [`ProtoError`], never a panic.
//! * Encoders append to a `BytesMut`.

pub mod consts;
mod cursor;
pub mod handshake;
pub mod transmission;

pub use consts::*;
pub use handshake::*;
pub use transmission::*;

/// A malformed or oversized message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("{what}: bad magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("{what}: length {length} exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        length: u64,
        limit: u64,
    },
    #[error("{what}: {detail}")]
    Malformed { what: &'static str, detail: String },
}

impl ProtoError {
    /// A magic number from the wire against the one expected.
    pub(crate) fn check_magic(
        what: &'static str,
        found: u64,
        expected: u64,
    ) -> Result<(), ProtoError> {
        if found == expected {
            Ok(())
        } else {
            Err(ProtoError::BadMagic { what, found })
        }
    }

    /// A length from the wire against its named limit, before anything is allocated for it.
    pub(crate) fn check_length(
        what: &'static str,
        length: u64,
        limit: u64,
    ) -> Result<(), ProtoError> {
        if length <= limit {
            Ok(())
        } else {
            Err(ProtoError::TooLarge {
                what,
                length,
                limit,
            })
        }
    }

    pub(crate) fn malformed(what: &'static str, detail: impl Into<String>) -> Self {
        ProtoError::Malformed {
            what,
            detail: detail.into(),
        }
    }
}
