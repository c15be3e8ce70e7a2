//! lunmpio-nbd: the NBD protocol for lunmpio.
//!
//! * [`proto`]: a sans-I/O codec for the fixed-newstyle handshake and the transmission phase.
//! * [`client`]: an async (tokio) client with many requests in flight on one connection.
//! * [`server`]: an async server generic over a [`server::Backend`].
//! * [`uri`]: NBD URIs (`nbd://`, `nbd+unix://`).
//! * [`tls`]: TLS 1.3 (rustls) for `nbds://` paths: the client side of NBD_OPT_STARTTLS.
//! * [`activity`]: what a thread's connections have read, for a data thread that polls.
//!
//! The public surface is the contract in `docs/NBD_API.md`.

pub mod activity;
pub mod client;
mod io_util;
pub mod proto;
mod request;
pub mod server;
pub mod tls;
mod types;
pub mod uri;

pub use client::{
    Client, ClientError, ConnectOptions, Endpoint, ExportInfo, Negotiation, RequestError,
};
pub use request::{Reply, Request};
pub use server::{Backend, ExportConfig, Server, ServerError, ServerOptions};
pub use types::{
    BlockSize, CommandFlags, Extent, MAX_PAYLOAD_BYTES, NbdErrno, TransmissionFlags,
    TransmissionMode, WideExtent,
};
pub use uri::{NbdUri, UriError};
