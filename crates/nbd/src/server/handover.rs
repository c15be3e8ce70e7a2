//! Handing live connections to another process (live upgrade), and taking them over there.
//!
//! A connection is *detached* only at a request boundary. Its export is held and quiet, so no
//! request runs and every reply has been written. What the connection still holds is:
//! - its socket;
//! - the state the handshake settled (the export, the transmission flags, the transmission mode, the
//!   `base:allocation` context id);
//! - the bytes the client has sent that are not handled yet. This is a partial request left in the
//!   read buffer, or a request read during the hold. Such a request is encoded back to its wire
//!   form.
//!
//! [`Server::attach`] resumes such a connection. This happens in the new program, or in the old one
//! when the new program could not take over. The client never sees the socket close, and every
//! request it sent is answered exactly once. The one exception is a connection whose export is gone
//! there: it is closed, so the client sees it end.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::BytesMut;

use super::handshake::Negotiated;
use super::{Backend, ConnGuard, Server, ServerError};
use crate::TransmissionFlags;

/// The kind of socket a detached connection is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Tcp,
    Unix,
}

/// A connection taken out of a server at a request boundary, ready for [`Server::attach`].
#[derive(Debug)]
pub struct DetachedConnection {
    pub socket: OwnedFd,
    pub kind: SocketKind,
    /// The export the handshake chose.
    pub export: String,
    /// The transmission flags the client was given.
    pub flags: u16,
    /// The transmission mode (simple, structured or extended replies) the handshake settled.
    pub mode: crate::TransmissionMode,
    /// The `base:allocation` context id, when negotiated.
    pub context_id: Option<u32>,
    /// Bytes the client sent that were not handled yet: the start of its next requests.
    pub pending: Vec<u8>,
}

/// How a stream type moves between runtimes and out of the process.
pub(crate) struct StreamOps<S> {
    /// Moves an accepted socket to another runtime's reactor, so that its readiness wakes that
    /// runtime's thread rather than the one that accepted it.
    pub(crate) rehome: fn(S, &tokio::runtime::Handle) -> std::io::Result<S>,
    /// The socket, out of the runtime, for a handover.
    pub(crate) detach: fn(S) -> std::io::Result<OwnedFd>,
    pub(crate) kind: SocketKind,
}

impl<S> Clone for StreamOps<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for StreamOps<S> {}

pub(crate) fn tcp_ops() -> StreamOps<tokio::net::TcpStream> {
    StreamOps {
        rehome: |stream, runtime| {
            let stream = stream.into_std()?;
            let _entered = runtime.enter();
            tokio::net::TcpStream::from_std(stream)
        },
        detach: |stream| Ok(OwnedFd::from(stream.into_std()?)),
        kind: SocketKind::Tcp,
    }
}

pub(crate) fn unix_ops() -> StreamOps<tokio::net::UnixStream> {
    StreamOps {
        rehome: |stream, runtime| {
            let stream = stream.into_std()?;
            let _entered = runtime.enter();
            tokio::net::UnixStream::from_std(stream)
        },
        detach: |stream| Ok(OwnedFd::from(stream.into_std()?)),
        kind: SocketKind::Unix,
    }
}

impl<B: Backend> Server<B> {
    /// Stops the accept loops ([`Server::serve_tcp`], [`Server::serve_unix`]) without draining:
    /// new clients wait in the listen backlog for whoever listens next.
    pub fn stop_accepting(&self) {
        self.accepting.cancel();
    }

    /// Detaches every connection. Hold every export and wait until each is quiet first: a connection
    /// detaches only with nothing running. Connections still in their handshake are closed. Returns
    /// once no connection is served here, or after `wait_max` with those detached so far (one whose
    /// writer is stuck on a client that never reads stays behind).
    pub async fn detach_all(&self, wait_max: std::time::Duration) -> Vec<DetachedConnection> {
        self.detach.cancel();
        if tokio::time::timeout(wait_max, self.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.connections(),
                "connections did not detach within {wait_max:?}; they are left behind"
            );
        }
        std::mem::take(&mut *self.detached.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn keep_detached(&self, connection: DetachedConnection) {
        self.detached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(connection);
    }

    /// Resumes a detached connection on its export (which must exist here): the client's next request
    /// is the first of `pending`. Runs on the export's runtime, like an accepted connection.
    pub fn attach(self: &Arc<Self>, c: DetachedConnection) -> Result<(), ServerError> {
        let export = self
            .find_export(&c.export)
            .ok_or_else(|| ServerError::Handshake(format!("no export {:?} here", c.export)))?;
        let negotiated = Negotiated {
            export,
            flags: TransmissionFlags::from_bits_retain(c.flags),
            mode: c.mode,
            context_id: c.context_id,
        };
        let admitted = self.admit()?;
        admitted.transmission_started();
        let guard = ConnGuard::new(&self.active);
        let buf = BytesMut::from(&c.pending[..]);
        let server = Arc::clone(self);
        match c.kind {
            SocketKind::Tcp => {
                let std = std::net::TcpStream::from(c.socket);
                std.set_nonblocking(true)?;
                let stream = tokio::net::TcpStream::from_std(std)?;
                tokio::spawn(async move {
                    let r = server
                        .transmit(stream, buf, negotiated, &admitted, Some(tcp_ops()))
                        .await;
                    log_end(r);
                    drop(guard);
                });
            }
            SocketKind::Unix => {
                let std = std::os::unix::net::UnixStream::from(c.socket);
                std.set_nonblocking(true)?;
                let stream = tokio::net::UnixStream::from_std(std)?;
                tokio::spawn(async move {
                    let r = server
                        .transmit(stream, buf, negotiated, &admitted, Some(unix_ops()))
                        .await;
                    log_end(r);
                    drop(guard);
                });
            }
        }
        Ok(())
    }
}

pub(crate) fn log_end(r: Result<(), ServerError>) {
    if let Err(e) = r {
        tracing::debug!(error = %e, "nbd connection ended with an error");
    }
}
