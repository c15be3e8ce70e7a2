//! One request and its reply, as both sides of the protocol see them: the client sends a [`Request`]
//! and gets a [`Reply`]; the server hands each request it receives to its `Backend` as a
//! [`Request`] and sends back the [`Reply`]. A request here is logical: the client splits one above
//! the server's maximum payload, and the server has checked it against the export before a backend
//! sees it.

use std::fmt;

use bytes::Bytes;

use crate::proto::Command;
use crate::types::{CommandFlags, Extent};

/// One logical request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        data: Bytes,
        flags: CommandFlags,
    },
    Flush {
        flags: CommandFlags,
    },
    Trim {
        offset: u64,
        length: u32,
        flags: CommandFlags,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        flags: CommandFlags,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        flags: CommandFlags,
    },
    Cache {
        offset: u64,
        length: u32,
    },
}

impl Request {
    pub fn command(&self) -> Command {
        match self {
            Request::Read { .. } => Command::Read,
            Request::Write { .. } => Command::Write,
            Request::Flush { .. } => Command::Flush,
            Request::Trim { .. } => Command::Trim,
            Request::WriteZeroes { .. } => Command::WriteZeroes,
            Request::BlockStatus { .. } => Command::BlockStatus,
            Request::Cache { .. } => Command::Cache,
        }
    }

    pub fn offset(&self) -> u64 {
        match self {
            Request::Flush { .. } => 0,
            Request::Read { offset, .. }
            | Request::Write { offset, .. }
            | Request::Trim { offset, .. }
            | Request::WriteZeroes { offset, .. }
            | Request::BlockStatus { offset, .. }
            | Request::Cache { offset, .. } => *offset,
        }
    }

    /// Length in bytes (for WRITE, of the data; saturates at u32::MAX).
    pub fn length(&self) -> u32 {
        match self {
            Request::Flush { .. } => 0,
            Request::Write { data, .. } => u32::try_from(data.len()).unwrap_or(u32::MAX),
            Request::Read { length, .. }
            | Request::Trim { length, .. }
            | Request::WriteZeroes { length, .. }
            | Request::BlockStatus { length, .. }
            | Request::Cache { length, .. } => *length,
        }
    }

    /// The same request, keeping only the flags in `keep`.
    pub fn with_flags_within(mut self, keep: CommandFlags) -> Request {
        match &mut self {
            Request::Write { flags, .. }
            | Request::Flush { flags }
            | Request::Trim { flags, .. }
            | Request::WriteZeroes { flags, .. }
            | Request::BlockStatus { flags, .. } => *flags &= keep,
            Request::Read { .. } | Request::Cache { .. } => {}
        }
        self
    }

    pub fn flags(&self) -> CommandFlags {
        match self {
            Request::Read { .. } | Request::Cache { .. } => CommandFlags::empty(),
            Request::Write { flags, .. }
            | Request::Flush { flags }
            | Request::Trim { flags, .. }
            | Request::WriteZeroes { flags, .. }
            | Request::BlockStatus { flags, .. } => *flags,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} offset={} length={}",
            self.command().name(),
            self.offset(),
            self.length()
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Read(Bytes),
    Done,
    BlockStatus(Vec<Extent>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_outside_the_mask_are_dropped() {
        let write = Request::Write {
            offset: 0,
            data: Bytes::from_static(b"x"),
            flags: CommandFlags::FUA | CommandFlags::DF,
        };
        assert_eq!(
            write.with_flags_within(CommandFlags::FUA).flags(),
            CommandFlags::FUA
        );
        let read = Request::Read {
            offset: 8,
            length: 4,
        };
        assert_eq!(read.clone().with_flags_within(CommandFlags::empty()), read);
    }
}
