//! Local paths: a regular file or a block device (for direct-attached multipath, such as two
//! `/dev/sdX` nodes of one Fibre Channel LUN).
//!
//! Opened with `O_DIRECT` where the file system allows it, so two paths to one device share no page
//! cache (a block device's page cache is per node: without `O_DIRECT`, two nodes of one LUN would
//! each cache privately, which is not safe to use together). Every system call runs on tokio's
//! blocking pool: the async runtime never waits on the disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use lunmpio_fileio::AlignedBuffer;
use lunmpio_nbd::{BlockSize, CommandFlags, Extent, NbdErrno, TransmissionFlags};
use lunmpio_nbd::{Reply, Request};
use tokio::sync::Notify;

use super::{Failed, Geometry, PathError, PathErrorKind};

/// Alignment of buffers, offsets and lengths under `O_DIRECT`. 4 KiB satisfies every logical block
/// size in use (512 and 4096) and every file system we may sit on.
const DIRECT_ALIGN_BYTES: usize = 4096;
/// Largest single request we run as one system call; larger ones are refused (the engine splits to
/// the advertised maximum payload first).
const REQUEST_BYTES_MAX: u32 = 32 << 20;
/// Bound on extents returned by one BLOCK_STATUS, so a fragmented file cannot make us build a huge
/// reply.
const EXTENTS_PER_REPLY_MAX: usize = 1024;

/// NBD's base:allocation flags.
const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

/// System calls of one file path running at once (opens, probes, requests, over every connection of
/// the path). A hung device holds each of its calls forever; without this bound every probe and every
/// retried request would pin one more thread of the blocking pool.
pub const FILE_CALLS_MAX: usize = 64;

/// How a file path is opened.
#[derive(Debug, Clone)]
pub struct FileTarget {
    pub path: PathBuf,
    /// Try `O_DIRECT` first (fall back to buffered I/O where the file system refuses it, for regular
    /// files only: a block device opened buffered is not safe to share with a second node).
    pub direct: bool,
    /// Shared by every connection of the path: see [`FILE_CALLS_MAX`].
    calls: Arc<tokio::sync::Semaphore>,
}

impl PartialEq for FileTarget {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.direct == other.direct
    }
}

impl Eq for FileTarget {}

impl FileTarget {
    pub fn new(path: PathBuf) -> Self {
        FileTarget {
            path,
            direct: true,
            calls: Arc::new(tokio::sync::Semaphore::new(FILE_CALLS_MAX)),
        }
    }

    pub(super) async fn open(&self) -> Result<FileConnection, PathError> {
        let target = self.clone();
        let call = Arc::clone(&self.calls)
            .acquire_owned()
            .await
            .map_err(|_| PathError::new(PathErrorKind::Connect, "file path closed"))?;
        tokio::task::spawn_blocking(move || {
            let _call = call;
            target.open_blocking()
        })
        .await
        .map_err(|e| PathError::new(PathErrorKind::Connect, format!("open task failed: {e}")))?
    }

    fn open_blocking(&self) -> Result<FileConnection, PathError> {
        let connect_err = |e: io::Error| {
            PathError::new(
                PathErrorKind::Connect,
                format!("{}: {e}", self.path.display()),
            )
        };
        let metadata = std::fs::metadata(&self.path).map_err(connect_err)?;
        let is_block_device = metadata.file_type().is_block_device();
        if !is_block_device && !metadata.is_file() {
            return Err(PathError::new(
                PathErrorKind::Connect,
                format!(
                    "{}: not a regular file or a block device",
                    self.path.display()
                ),
            ));
        }
        let (file, read_only, direct) = self.open_file(is_block_device).map_err(connect_err)?;
        let size_bytes = lunmpio_fileio::size(&file).map_err(connect_err)?;
        let mut flags = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_CACHE;
        if read_only {
            flags |= TransmissionFlags::READ_ONLY;
        } else {
            flags |= TransmissionFlags::SEND_TRIM | TransmissionFlags::SEND_WRITE_ZEROES;
        }
        // Safe to use together with other paths to the same volume: a regular file's page cache is
        // shared by every open of the inode; a block device is shared only without its page cache.
        if !is_block_device || direct {
            flags |= TransmissionFlags::CAN_MULTI_CONN;
        }
        let min = if direct { DIRECT_ALIGN_BYTES as u32 } else { 1 };
        let info = Geometry {
            size_bytes,
            read_only,
            flags,
            block_size: BlockSize {
                min,
                preferred: 4096,
                max_payload: REQUEST_BYTES_MAX,
            },
            base_allocation: !is_block_device,
            identity: None,
        };
        Ok(FileConnection {
            inner: Arc::new(FileInner {
                calls: Arc::clone(&self.calls),
                file,
                info,
                direct,
                block_device: is_block_device,
                open: AtomicBool::new(true),
                closed: Notify::new(),
            }),
        })
    }

    /// Opens read-write, else read-only; with `O_DIRECT`, else (regular files only) buffered.
    fn open_file(&self, is_block_device: bool) -> io::Result<(File, bool, bool)> {
        let attempts: &[(bool, bool)] = if self.direct && is_block_device {
            &[(true, true), (false, true)]
        } else if self.direct {
            &[(true, true), (false, true), (true, false), (false, false)]
        } else {
            &[(true, false), (false, false)]
        };
        let mut last_error = io::Error::other("no open attempted");
        for &(writable, direct) in attempts {
            let mut options = std::fs::OpenOptions::new();
            options.read(true).write(writable);
            if direct {
                options.custom_flags(libc::O_DIRECT);
            }
            match options.open(&self.path) {
                Ok(file) => return Ok((file, !writable, direct)),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }
}

/// One open of a file path. Clones share the descriptor.
#[derive(Clone)]
pub struct FileConnection {
    inner: Arc<FileInner>,
}

struct FileInner {
    calls: Arc<tokio::sync::Semaphore>,
    file: File,
    info: Geometry,
    direct: bool,
    block_device: bool,
    open: AtomicBool,
    closed: Notify,
}

impl FileConnection {
    pub fn info(&self) -> &Geometry {
        &self.inner.info
    }

    pub async fn submit(
        &self,
        request: Request,
        sent: &std::sync::atomic::AtomicBool,
    ) -> Result<Reply, Failed> {
        if !self.is_open() {
            return Err(Failed {
                request,
                error: PathError::new(PathErrorKind::Closed, "path closed"),
                sent: false,
            });
        }
        if let Err(error) = self.inner.check(&request) {
            return Err(Failed {
                request,
                error,
                sent: false,
            });
        }
        let inner = Arc::clone(&self.inner);
        let Ok(call) = Arc::clone(&self.inner.calls).acquire_owned().await else {
            return Err(Failed {
                request,
                error: PathError::new(PathErrorKind::Closed, "path closed"),
                sent: false,
            });
        };
        // Keep a handle to hand back on failure (cloning a request clones a `Bytes`, not the data).
        let handed_back = request.clone();
        sent.store(true, Ordering::Release);
        let joined = tokio::task::spawn_blocking(move || {
            let _call = call;
            inner.execute(&request)
        })
        .await;
        match joined {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => Err(Failed {
                request: handed_back,
                error,
                sent: true,
            }),
            Err(join_error) => Err(Failed {
                request: handed_back,
                sent: true,
                error: PathError::new(
                    PathErrorKind::Broken,
                    format!("I/O task failed: {join_error}"),
                ),
            }),
        }
    }

    /// Stops accepting requests. System calls already running complete (they cannot be recalled).
    pub fn close(&self) {
        if self.inner.open.swap(false, Ordering::AcqRel) {
            self.inner.closed.notify_waiters();
        }
    }

    pub fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    pub async fn closed(&self) {
        let notified = self.inner.closed.notified();
        if !self.is_open() {
            return;
        }
        notified.await
    }
}

impl FileInner {
    /// Local checks, so a bad request never reaches the kernel as something surprising.
    fn check(&self, request: &Request) -> Result<(), PathError> {
        let (offset, length, writes) = match request {
            Request::Read { offset, length } => (*offset, *length, false),
            Request::Write { offset, data, .. } => {
                let length = u32::try_from(data.len()).map_err(|_| invalid("write above 4 GiB"))?;
                (*offset, length, true)
            }
            Request::Trim { offset, length, .. } | Request::WriteZeroes { offset, length, .. } => {
                (*offset, *length, true)
            }
            Request::BlockStatus { offset, length, .. } | Request::Cache { offset, length } => {
                (*offset, *length, false)
            }
            Request::Flush { .. } => return Ok(()),
        };
        if writes && self.info.read_only {
            return Err(PathError::new(
                PathErrorKind::Reply(NbdErrno::Perm),
                "path is read-only",
            ));
        }
        let end = offset
            .checked_add(u64::from(length))
            .ok_or_else(|| invalid("offset + length overflows"))?;
        if end > self.info.size_bytes {
            let errno = if writes {
                NbdErrno::NoSpc
            } else {
                NbdErrno::Inval
            };
            return Err(PathError::new(
                PathErrorKind::Reply(errno),
                format!(
                    "{offset}+{length} is past the end ({})",
                    self.info.size_bytes
                ),
            ));
        }
        if matches!(request, Request::Read { .. } | Request::Write { .. })
            && length > REQUEST_BYTES_MAX
        {
            return Err(invalid("request above the maximum payload"));
        }
        let align = u64::from(self.info.block_size.min);
        let data_moves = matches!(
            request,
            Request::Read { .. } | Request::Write { .. } | Request::WriteZeroes { .. }
        );
        if data_moves && (!offset.is_multiple_of(align) || !u64::from(length).is_multiple_of(align))
        {
            return Err(invalid(format!(
                "{offset}+{length} is not aligned to {align} bytes"
            )));
        }
        Ok(())
    }

    fn execute(&self, request: &Request) -> Result<Reply, PathError> {
        match request {
            Request::Read { offset, length } => self.read(*offset, *length).map(Reply::Read),
            Request::Write {
                offset,
                data,
                flags,
            } => self
                .write(*offset, data, flags.contains(CommandFlags::FUA))
                .map(|_| Reply::Done),
            Request::Flush { .. } => self.file.sync_data().map(|_| Reply::Done).map_err(io_error),
            Request::Trim {
                offset,
                length,
                flags,
            } => self
                .trim(*offset, *length, flags.contains(CommandFlags::FUA))
                .map(|_| Reply::Done),
            Request::WriteZeroes {
                offset,
                length,
                flags,
            } => self
                .write_zeroes(*offset, *length, flags.contains(CommandFlags::FUA))
                .map(|_| Reply::Done),
            Request::BlockStatus {
                offset,
                length,
                flags,
            } => self
                .block_status(*offset, *length, flags.contains(CommandFlags::REQ_ONE))
                .map(Reply::BlockStatus),
            Request::Cache { offset, length } => {
                // A hint: ask the kernel to read ahead; failure is not an error of the request.
                // SAFETY: plain syscall on a descriptor we own; no memory is passed.
                unsafe {
                    libc::posix_fadvise(
                        self.file.as_raw_fd(),
                        *offset as libc::off_t,
                        *length as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
                Ok(Reply::Done)
            }
        }
    }

    fn read(&self, offset: u64, length: u32) -> Result<Bytes, PathError> {
        let mut buffer = aligned_buffer(length as usize, self.alignment())?;
        read_exact_at(&self.file, buffer.as_mut_slice(), offset)?;
        Ok(Bytes::from_owner(buffer))
    }

    fn write(&self, offset: u64, data: &Bytes, fua: bool) -> Result<(), PathError> {
        let align = self.alignment();
        if self.direct && !(data.as_ptr() as usize).is_multiple_of(align) {
            // O_DIRECT needs an aligned buffer; the data came off a socket at any address.
            let mut buffer = aligned_buffer(data.len(), align)?;
            buffer.as_mut_slice().copy_from_slice(data);
            self.file
                .write_all_at(buffer.as_slice(), offset)
                .map_err(io_error)?;
        } else {
            self.file.write_all_at(data, offset).map_err(io_error)?;
        }
        if fua {
            self.file.sync_data().map_err(io_error)?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), PathError> {
        if length == 0 {
            return Ok(());
        }
        let result = if self.block_device {
            ioctl_range(&self.file, BLKDISCARD, offset, length)
        } else {
            lunmpio_fileio::punch_hole(&self.file, offset, u64::from(length))
        };
        match result {
            // TRIM is a hint (NBD spec): a device or file system that cannot discard did nothing
            // wrong by ignoring it.
            Err(e) if lunmpio_fileio::is_unsupported(&e) => {}
            Err(e) => return Err(io_error(e)),
            Ok(()) => {}
        }
        if fua {
            self.file.sync_data().map_err(io_error)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u32, fua: bool) -> Result<(), PathError> {
        if length == 0 {
            return Ok(());
        }
        let fast = if self.block_device {
            ioctl_range(&self.file, BLKZEROOUT, offset, length)
        } else {
            lunmpio_fileio::zero_range(&self.file, offset, u64::from(length))
        };
        if fast.is_err() {
            // Fall back to writing zeroes, in bounded pieces.
            const PIECE_BYTES: usize = 1 << 20;
            let piece = aligned_buffer(PIECE_BYTES.min(length as usize), self.alignment())?;
            let mut done = 0u64;
            while done < u64::from(length) {
                let n = (u64::from(length) - done).min(piece.len() as u64) as usize;
                self.file
                    .write_all_at(&piece.as_slice()[..n], offset + done)
                    .map_err(io_error)?;
                done += n as u64;
            }
        }
        if fua {
            self.file.sync_data().map_err(io_error)?;
        }
        Ok(())
    }

    /// Allocation map from SEEK_DATA / SEEK_HOLE (regular files only).
    fn block_status(
        &self,
        offset: u64,
        length: u32,
        req_one: bool,
    ) -> Result<Vec<Extent>, PathError> {
        if self.block_device || length == 0 {
            return Ok(vec![Extent { length, flags: 0 }]);
        }
        let extents_max = if req_one { 1 } else { EXTENTS_PER_REPLY_MAX };
        let extents: Vec<Extent> =
            lunmpio_fileio::extents(&self.file, offset, u64::from(length), extents_max)
                .into_iter()
                .map(|e| Extent {
                    // A run never exceeds the `length` (a u32) it was asked for.
                    length: e.length as u32,
                    flags: if e.hole { STATE_HOLE | STATE_ZERO } else { 0 },
                })
                .collect();
        debug_assert!(!extents.is_empty());
        debug_assert!(
            extents.iter().map(|e| u64::from(e.length)).sum::<u64>() <= u64::from(length)
        );
        Ok(extents)
    }

    fn alignment(&self) -> usize {
        if self.direct { DIRECT_ALIGN_BYTES } else { 1 }
    }
}

fn read_exact_at(file: &File, buffer: &mut [u8], offset: u64) -> Result<(), PathError> {
    let mut done = 0;
    while done < buffer.len() {
        match file.read_at(&mut buffer[done..], offset + done as u64) {
            Ok(0) => {
                return Err(PathError::new(
                    PathErrorKind::Reply(NbdErrno::Io),
                    "short read: the file shrank under us",
                ));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(e)),
        }
    }
    Ok(())
}

const BLKDISCARD: libc::c_ulong = 0x1277; // _IO(0x12, 119)
const BLKZEROOUT: libc::c_ulong = 0x127f; // _IO(0x12, 127)

fn ioctl_range(file: &File, request: libc::c_ulong, offset: u64, length: u32) -> io::Result<()> {
    let range: [u64; 2] = [offset, u64::from(length)];
    // SAFETY: BLKDISCARD / BLKZEROOUT read a [u64; 2] (start, length) from the pointer, which is
    // valid for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, range.as_ptr()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn invalid(message: impl Into<String>) -> PathError {
    PathError::new(PathErrorKind::Invalid, message)
}

/// Maps an OS error of a local path: the ones that belong to the request keep their meaning; a
/// device that went away is a broken path; anything else is EIO (retry on another path).
fn io_error(e: io::Error) -> PathError {
    let kind = match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => {
            PathErrorKind::Reply(NbdErrno::NoSpc)
        }
        Some(libc::EINVAL) => PathErrorKind::Reply(NbdErrno::Inval),
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => {
            PathErrorKind::Reply(NbdErrno::Perm)
        }
        Some(libc::ENXIO) | Some(libc::ENODEV) | Some(libc::ESHUTDOWN) => PathErrorKind::Broken,
        _ => PathErrorKind::Reply(NbdErrno::Io),
    };
    PathError::new(kind, e.to_string())
}

/// An aligned buffer for O_DIRECT; out of memory is `ENOMEM` for the request, not an abort.
fn aligned_buffer(len: usize, align: usize) -> Result<AlignedBuffer, PathError> {
    AlignedBuffer::zeroed(len, align)
        .map_err(|_| PathError::new(PathErrorKind::Reply(NbdErrno::NoMem), "out of memory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_become_bytes_without_a_copy() {
        let b = aligned_buffer(8192, 4096).unwrap();
        let at = b.as_slice().as_ptr();
        let bytes = Bytes::from_owner(b);
        assert_eq!(bytes.as_ptr(), at);
        assert_eq!(bytes.len(), 8192);
    }

    #[test]
    fn os_errors_map_to_request_or_path_errors() {
        assert_eq!(
            io_error(io::Error::from_raw_os_error(libc::ENOSPC)).kind,
            PathErrorKind::Reply(NbdErrno::NoSpc)
        );
        assert_eq!(
            io_error(io::Error::from_raw_os_error(libc::ENODEV)).kind,
            PathErrorKind::Broken
        );
        assert_eq!(
            io_error(io::Error::from_raw_os_error(libc::EIO)).kind,
            PathErrorKind::Reply(NbdErrno::Io)
        );
    }
}
