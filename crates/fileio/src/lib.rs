//! Linux file and block-device primitives, written once for the product's file transport
//! (`lunmpio-engine`) and the simulated array (`lunmpio-array`): buffers aligned for `O_DIRECT`,
//! `fallocate` (punch a hole, zero a range), the allocation map from `SEEK_DATA`/`SEEK_HOLE`, and the
//! size of a file or block device. Plain `io::Result`s: each caller maps errors to its own kind.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// The size of a regular file or a block device (for a block device `metadata().len()` is 0; the end
/// offset is its size for both kinds).
pub fn size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut handle = file;
    handle.seek(io::SeekFrom::End(0))
}

/// Deallocates `offset..offset+length`, which then reads as zeroes; the file keeps its size.
pub fn punch_hole(file: &File, offset: u64, length: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
}

/// Zeroes `offset..offset+length`, keeping it allocated; the file keeps its size.
pub fn zero_range(file: &File, offset: u64, length: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
}

/// Whether `fallocate` failed because the file system or device cannot do it (the caller falls back
/// to writing zeroes), rather than because of the request.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length))
    else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: a plain system call on a descriptor the caller owns.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, length) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One run of the allocation map: `length` bytes of data, or of hole (reads as zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    pub length: u64,
    pub hole: bool,
}

/// The allocation map of `offset..offset+length` from `SEEK_DATA`/`SEEK_HOLE`, adjacent runs of one
/// kind merged, at most `extents_max` runs (at least one; the last may end before `offset+length`).
/// A file system without `SEEK_DATA` reports everything as data. The file offset these calls move is
/// never used for I/O (everything is positioned), so concurrent calls are harmless.
pub fn extents(file: &File, offset: u64, length: u64, extents_max: usize) -> Vec<FileExtent> {
    assert!(extents_max >= 1, "at least one extent");
    let fd = file.as_raw_fd();
    let end = offset.saturating_add(length);
    let mut out: Vec<FileExtent> = Vec::new();
    let mut at = offset;
    while at < end {
        let (next, hole) = next_run(fd, at, end);
        debug_assert!(next > at && next <= end);
        let full = out.len() == extents_max;
        match out.last_mut() {
            Some(last) if last.hole == hole => last.length += next - at,
            _ if full => break,
            _ => out.push(FileExtent {
                length: next - at,
                hole,
            }),
        }
        at = next;
    }
    if out.is_empty() {
        out.push(FileExtent {
            length: 0,
            hole: false,
        });
    }
    out
}

/// Where the run that starts at `at` ends (at most `end`), and whether it is a hole.
fn next_run(fd: libc::c_int, at: u64, end: u64) -> (u64, bool) {
    let Ok(pos) = libc::off_t::try_from(at) else {
        return (end, false);
    };
    // SAFETY: lseek on a descriptor the caller owns.
    let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
    if data < 0 {
        let only_hole_left = io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        return (end, only_hole_left);
    }
    if data as u64 > at {
        return ((data as u64).min(end), true);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, pos, libc::SEEK_HOLE) };
    let hole = if hole < 0 { end } else { hole as u64 };
    (hole.clamp(at + 1, end), false)
}

/// A zeroed heap buffer with a chosen alignment (for `O_DIRECT`), which `Bytes::from_owner` can own
/// without a copy.
pub struct AlignedBuffer {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned heap memory; nothing is shared between threads.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared access is read-only (`as_slice`); mutation needs `&mut self`.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// `len` zero bytes at an address that is a multiple of `align` (a power of two). Out of memory
    /// is an error, not an abort.
    pub fn zeroed(len: usize, align: usize) -> io::Result<AlignedBuffer> {
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        // A zero-sized allocation is not allowed; keep at least one alignment unit.
        let layout = std::alloc::Layout::from_size_align(len.max(align), align)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuffer { ptr, len, layout })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() >= len bytes, initialised (zeroed), owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuffer {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn aligned_buffer_is_aligned_and_zeroed() {
        let mut b = AlignedBuffer::zeroed(8192, 4096).unwrap();
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[0] = 7;
        assert_eq!(b.as_ref()[0], 7);
        let empty = AlignedBuffer::zeroed(0, 512).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn extents_follow_data_and_holes_and_merge() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("x"))
            .unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&[1; 65536], 1 << 20).unwrap();
        assert_eq!(size(&file).unwrap(), 4 << 20);
        let map = extents(&file, 0, 4 << 20, 16);
        assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), 4 << 20);
        assert!(map.first().unwrap().hole, "{map:?}");
        assert!(map.iter().any(|e| !e.hole), "{map:?}");
        assert!(
            map.windows(2).all(|w| w[0].hole != w[1].hole),
            "merged: {map:?}"
        );
        let one = extents(&file, 0, 4 << 20, 1);
        assert_eq!(one.len(), 1);
        assert!(one[0].hole && one[0].length <= 1 << 20);
        // A hole punched in the data reads back as zeroes.
        punch_hole(&file, 1 << 20, 65536).unwrap();
        let mut back = [9u8; 16];
        file.read_exact_at(&mut back, 1 << 20).unwrap();
        assert_eq!(back, [0; 16]);
        zero_range(&file, 0, 4096).unwrap();
        assert_eq!(size(&file).unwrap(), 4 << 20, "sizes are kept");
    }
}
