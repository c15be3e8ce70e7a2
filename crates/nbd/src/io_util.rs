//! Small buffered-I/O helpers shared by the client and the server.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Size of the receive buffer of every connection: large enough that a QD32 burst of 4 KiB
/// replies or write requests arrives in one or two reads.
pub(crate) const READ_BUFFER_BYTES: usize = 256 << 10;
/// Below this much free space the buffer grows before the next read, so reads stay large.
const READ_SPACE_MIN_BYTES: usize = 32 << 10;

/// Reads once into `buf`, making room first. `Ok(0)` is EOF. Cancel-safe: bytes already read
/// stay in `buf`.
pub(crate) async fn fill<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < READ_SPACE_MIN_BYTES {
        buf.reserve(READ_BUFFER_BYTES);
    }
    rd.read_buf(buf).await
}

/// Makes sure `buf` can hold `total` bytes without growing during the reads that follow.
pub(crate) fn reserve_total(buf: &mut BytesMut, total: usize) {
    if total > buf.len() {
        buf.reserve(total - buf.len());
    }
}
