//! A bounds-checked big-endian reader over a byte slice: the panic-free counterpart of
//! `bytes::Buf` (whose getters panic on short input).

use super::ProtoError;
use bytes::Bytes;

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.remaining() < n {
            return Err(ProtoError::malformed(
                self.what,
                format!(
                    "truncated: need {n} bytes at offset {}, have {}",
                    self.pos,
                    self.remaining()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        let s = self.take(4)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        let s = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }

    /// A UTF-8 string of `len` bytes, at most `STRING_BYTES_MAX`.
    pub(crate) fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > super::STRING_BYTES_MAX as usize {
            return Err(ProtoError::TooLarge {
                what: self.what,
                length: len as u64,
                limit: super::STRING_BYTES_MAX as u64,
            });
        }
        let s = self.take(len)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| ProtoError::malformed(self.what, "string is not UTF-8"))
    }

    /// A string prefixed by a u32 length.
    pub(crate) fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()?;
        self.string(len as usize)
    }

    pub(crate) fn rest_string(&mut self) -> Result<String, ProtoError> {
        let n = self.remaining();
        self.string(n)
    }

    pub(crate) fn end(&self) -> Result<(), ProtoError> {
        if self.remaining() != 0 {
            return Err(ProtoError::malformed(
                self.what,
                format!("{} trailing bytes", self.remaining()),
            ));
        }
        Ok(())
    }
}

/// The part of `data` after the cursor's position, without copying.
pub(crate) fn rest_bytes(data: &Bytes, cur: &Cursor<'_>) -> Bytes {
    data.slice(cur.pos()..)
}
