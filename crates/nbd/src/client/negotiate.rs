//! Client side of the handshake: connect, fixed newstyle, STRUCTURED_REPLY,
//! SET_META_CONTEXT base:allocation, GO with INFO_BLOCK_SIZE, EXPORT_NAME fallback.

use super::{Client, ClientError, ConnectOptions, Endpoint, ExportInfo, Negotiation};
use crate::io_util::fill;
use crate::proto::*;
use crate::{BlockSize, TransmissionFlags};
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Option replies accepted for one option (a LIST of a huge server, or a hostile one).
const OPTION_REPLIES_MAX: usize = 4096;

pub(super) async fn connect(options: &ConnectOptions) -> Result<Client, ClientError> {
    match &options.endpoint {
        Endpoint::Tcp { host, port, bind } => {
            let stream = connect_tcp(host, *port, *bind).await?;
            let (mut rd, mut wr) = stream.into_split();
            let (info, leftover) = negotiate(&mut rd, &mut wr, options).await?;
            Ok(Client::start(rd, wr, leftover, info, options))
        }
        Endpoint::Unix { path } => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                ClientError::Connection(format!("connect to {}: {e}", path.display()))
            })?;
            let (mut rd, mut wr) = stream.into_split();
            let (info, leftover) = negotiate(&mut rd, &mut wr, options).await?;
            Ok(Client::start(rd, wr, leftover, info, options))
        }
    }
}

async fn connect_tcp(
    host: &str,
    port: u16,
    bind: Option<std::net::IpAddr>,
) -> Result<tokio::net::TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ClientError::Connection(format!("resolve {host}: {e}")))?
        .collect();
    let mut last = ClientError::Connection(format!("{host} resolved to no address"));
    for addr in addrs {
        if let Some(b) = bind
            && b.is_ipv4() != addr.is_ipv4()
        {
            continue;
        }
        match connect_addr(addr, bind).await {
            Ok(s) => return Ok(s),
            Err(e) => last = ClientError::Connection(format!("connect to {addr}: {e}")),
        }
    }
    Err(last)
}

async fn connect_addr(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_keepalive(true)?;
    if let Some(ip) = bind {
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let std_stream: std::net::TcpStream = sock.into();
    let stream = tokio::net::TcpSocket::from_std_stream(std_stream)
        .connect(addr)
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn hs(msg: impl Into<String>) -> ClientError {
    ClientError::Handshake(msg.into())
}

fn io_err(e: std::io::Error) -> ClientError {
    ClientError::Handshake(format!("I/O error: {e}"))
}

struct Conv<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    buf: BytesMut,
    out: BytesMut,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conv<'_, R, W> {
    async fn more(&mut self) -> Result<(), ClientError> {
        if fill(self.rd, &mut self.buf).await.map_err(io_err)? == 0 {
            return Err(hs("server closed the connection"));
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<(), ClientError> {
        self.wr.write_all(&self.out).await.map_err(io_err)?;
        self.wr.flush().await.map_err(io_err)?;
        self.out.clear();
        Ok(())
    }

    async fn send_option(&mut self, opt: &ClientOption) -> Result<(), ClientError> {
        opt.encode(&mut self.out);
        self.send().await
    }

    /// Next reply to option `option`.
    async fn reply(&mut self, option: u32) -> Result<OptionReply, ClientError> {
        loop {
            match RawOptionReply::decode(&mut self.buf) {
                Ok(Some(raw)) => {
                    if raw.option != option {
                        return Err(hs(format!(
                            "reply to option {} while waiting for {option}",
                            raw.option
                        )));
                    }
                    return OptionReply::parse(&raw).map_err(|e| hs(e.to_string()));
                }
                Ok(None) => self.more().await?,
                Err(e) => return Err(hs(e.to_string())),
            }
        }
    }
}

/// Runs the handshake. Returns the export and any bytes read past its end.
pub(super) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    options: &ConnectOptions,
) -> Result<(ExportInfo, BytesMut), ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut c = Conv {
        rd,
        wr,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(512),
    };
    let greeting = loop {
        match Greeting::decode(&c.buf) {
            Ok(Some(g)) => break g,
            Ok(None) => c.more().await?,
            Err(e) => return Err(hs(e.to_string())),
        }
    };
    c.buf.advance(GREETING_BYTES);
    if !greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
        return Err(hs("server does not support fixed newstyle negotiation"));
    }
    let no_zeroes = greeting.flags.contains(HandshakeFlags::NO_ZEROES);
    let mut cflags = ClientFlags::FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= ClientFlags::NO_ZEROES;
    }
    encode_client_flags(cflags, &mut c.out);

    let mut structured = false;
    if options.structured_replies {
        c.send_option(&ClientOption::StructuredReply).await?;
        match c.reply(NBD_OPT_STRUCTURED_REPLY).await? {
            OptionReply::Ack => structured = true,
            OptionReply::Error { .. } => {}
            other => {
                return Err(hs(format!(
                    "unexpected reply to STRUCTURED_REPLY: {other:?}"
                )));
            }
        }
    } else {
        c.send().await?;
    }

    let mut base_allocation = None;
    if structured && options.base_allocation {
        c.send_option(&ClientOption::SetMetaContext {
            export: options.export.clone(),
            queries: vec![BASE_ALLOCATION.to_string()],
        })
        .await?;
        for _ in 0..OPTION_REPLIES_MAX {
            match c.reply(NBD_OPT_SET_META_CONTEXT).await? {
                OptionReply::MetaContext { id, name } if name == BASE_ALLOCATION => {
                    base_allocation = Some(id)
                }
                OptionReply::MetaContext { .. } => {}
                OptionReply::Ack => break,
                OptionReply::Error { .. } => {
                    base_allocation = None;
                    break;
                }
                other => {
                    return Err(hs(format!(
                        "unexpected reply to SET_META_CONTEXT: {other:?}"
                    )));
                }
            }
        }
    }

    c.send_option(&ClientOption::Go {
        name: options.export.clone(),
        requests: vec![NBD_INFO_BLOCK_SIZE],
    })
    .await?;
    let mut export: Option<(u64, TransmissionFlags)> = None;
    let mut block_size: Option<BlockSize> = None;
    let mut negotiated_with = Negotiation::Go;
    let mut fallback = false;
    for _ in 0..OPTION_REPLIES_MAX {
        match c.reply(NBD_OPT_GO).await? {
            OptionReply::Info(Info::Export { size, flags }) => export = Some((size, flags)),
            OptionReply::Info(Info::BlockSize(b)) => block_size = Some(b),
            OptionReply::Info(_) => {}
            OptionReply::Ack => break,
            OptionReply::Error {
                error: OptionError::Unsup,
                ..
            } => {
                fallback = true;
                break;
            }
            OptionReply::Error { error, message } => {
                return Err(hs(format!(
                    "server refused export {:?}: {}{}",
                    options.export,
                    error.name(),
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({message})")
                    }
                )));
            }
            other => return Err(hs(format!("unexpected reply to GO: {other:?}"))),
        }
    }
    if fallback {
        negotiated_with = Negotiation::ExportName;
        block_size = None;
        c.send_option(&ClientOption::ExportName(options.export.clone()))
            .await?;
        let r = loop {
            match ExportNameReply::decode(&c.buf, no_zeroes) {
                Ok(Some(r)) => break r,
                Ok(None) => {
                    if let Err(e) = c.more().await {
                        return Err(hs(format!(
                            "export {:?} refused (EXPORT_NAME): {e}",
                            options.export
                        )));
                    }
                }
                Err(e) => return Err(hs(e.to_string())),
            }
        };
        c.buf.advance(ExportNameReply::wire_len(no_zeroes));
        export = Some((r.size, r.flags));
    }
    let Some((size, flags)) = export else {
        return Err(hs("GO finished without NBD_INFO_EXPORT"));
    };
    let block_size = sanitize_block_size(block_size)?;
    let info = ExportInfo {
        name: options.export.clone(),
        size,
        flags,
        block_size,
        structured_replies: structured,
        base_allocation,
        negotiated_with,
    };
    Ok((info, c.buf))
}

/// Checks the server's constraints and makes them safe to use (see [`BlockSize::sanitize`]).
fn sanitize_block_size(b: Option<BlockSize>) -> Result<BlockSize, ClientError> {
    match b {
        None => Ok(BlockSize::default()),
        Some(b) => b.sanitize().map_err(|e| hs(format!("server's {e}"))),
    }
}
