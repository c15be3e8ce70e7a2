//! Client side of the handshake: connect, fixed newstyle, STRUCTURED_REPLY,
//! SET_META_CONTEXT base:allocation, GO with INFO_BLOCK_SIZE, EXPORT_NAME fallback.

use super::{Client, ClientError, ConnectOptions, Endpoint, ExportInfo, Negotiation};
use crate::io_util::fill;
use crate::proto::*;
use crate::{BlockSize, TransmissionFlags, TransmissionMode};
use bytes::{Buf, BytesMut};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Option replies accepted for one option (a LIST of a huge server, or a hostile one).
const OPTION_REPLIES_MAX: usize = 4096;

pub(super) async fn connect(options: &ConnectOptions) -> Result<Client, ClientError> {
    match &options.endpoint {
        Endpoint::Tcp { host, port, bind } => {
            let stream = connect_tcp(host, *port, *bind).await?;
            if let Some(tls) = &options.tls {
                return with_tls(stream, tls, options).await;
            }
            let (mut rd, mut wr) = stream.into_split();
            let (info, leftover) = negotiate(&mut rd, &mut wr, options).await?;
            Ok(Client::start(rd, wr, leftover, info, options))
        }
        Endpoint::Unix { path } => {
            let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                ClientError::Connection(format!("connect to {}: {e}", path.display()))
            })?;
            if let Some(tls) = &options.tls {
                return with_tls(stream, tls, options).await;
            }
            let (mut rd, mut wr) = stream.into_split();
            let (info, leftover) = negotiate(&mut rd, &mut wr, options).await?;
            Ok(Client::start(rd, wr, leftover, info, options))
        }
    }
}

/// STARTTLS on the plain stream, then the TLS handshake and the options over TLS.
async fn with_tls<S>(
    stream: S,
    tls: &crate::tls::ClientTls,
    options: &ConnectOptions,
) -> Result<Client, ClientError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let no_zeroes = start_tls(&mut rd, &mut wr).await?;
    over_tls(rd.unsplit(wr), tls, no_zeroes, options).await
}

/// The greeting and NBD_OPT_STARTTLS on the plain stream; whether the zero padding is off. Nothing
/// but the TLS handshake may follow the server's acknowledgement.
async fn start_tls<R, W>(rd: &mut R, wr: &mut W) -> Result<bool, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut c = Conv::new(rd, wr);
    let no_zeroes = c.greet().await?;
    c.send_option(&ClientOption::StartTls).await?;
    match c.reply(NBD_OPT_STARTTLS).await? {
        OptionReply::Ack => {}
        OptionReply::Error { error, message } => {
            return Err(hs(format!(
                "the server refused TLS (NBD_OPT_STARTTLS: {}{})",
                error.name(),
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                }
            )));
        }
        other => {
            return Err(hs(format!(
                "unexpected reply to NBD_OPT_STARTTLS: {other:?}"
            )));
        }
    }
    if !c.buf.is_empty() {
        return Err(hs("the server sent data after acknowledging STARTTLS"));
    }
    Ok(no_zeroes)
}

/// The TLS handshake on `stream`, then the rest of the negotiation over TLS.
async fn over_tls<S>(
    stream: S,
    tls: &crate::tls::ClientTls,
    no_zeroes: bool,
    options: &ConnectOptions,
) -> Result<Client, ClientError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&tls.config));
    let stream = connector
        .connect(tls.server_name.clone(), stream)
        .await
        .map_err(|e| hs(format!("TLS handshake: {e}")))?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let c = Conv::new(&mut rd, &mut wr);
    let (info, leftover) = c.negotiate_options(options, no_zeroes).await.map_err(|e| {
        // In TLS 1.3 the server judges the client's certificate after the handshake has
        // completed on our side: a refusal shows as the session closing under the first option.
        let text = e.to_string();
        if options.tls.as_ref().is_some_and(|t| t.identity.is_none())
            && (text.contains("close_notify") || text.contains("closed"))
        {
            hs(format!(
                "the server closed the TLS session (does it require a client certificate? set \
                 tls_cert and tls_key): {text}"
            ))
        } else {
            e
        }
    })?;
    Ok(Client::start(rd, wr, leftover, info, options))
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

impl<'a, R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conv<'a, R, W> {
    fn new(rd: &'a mut R, wr: &'a mut W) -> Self {
        Conv {
            rd,
            wr,
            buf: BytesMut::with_capacity(4096),
            out: BytesMut::with_capacity(512),
        }
    }

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
    let mut c = Conv::new(rd, wr);
    let no_zeroes = c.greet().await?;
    c.negotiate_options(options, no_zeroes).await
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conv<'_, R, W> {
    /// Everything after the greeting (and after STARTTLS, over TLS): structured replies, the
    /// metadata context, GO or EXPORT_NAME.
    async fn negotiate_options(
        mut self,
        options: &ConnectOptions,
        no_zeroes: bool,
    ) -> Result<(ExportInfo, BytesMut), ClientError> {
        let c = &mut self;
        let mode = c.transmission_mode(options).await?;
        let base_allocation = if mode.chunked() && options.base_allocation {
            c.base_allocation(&options.export).await?
        } else {
            None
        };
        let (size, flags, block_size, negotiated_with) = match c.go(&options.export).await? {
            Some((size, flags, block_size)) => (size, flags, block_size, Negotiation::Go),
            // proto.md: a server that acknowledged extended headers must support GO, and the client
            // must not use EXPORT_NAME then.
            None if mode.extended() => {
                return Err(hs(
                    "the server acknowledged extended headers but refused NBD_OPT_GO",
                ));
            }
            // An old server: EXPORT_NAME, which says nothing of block sizes.
            None => {
                let (size, flags) = c.export_name(&options.export, no_zeroes).await?;
                (size, flags, None, Negotiation::ExportName)
            }
        };
        let info = ExportInfo {
            name: options.export.clone(),
            size,
            flags,
            block_size: sanitize_block_size(block_size)?,
            mode,
            base_allocation,
            negotiated_with,
        };
        Ok((info, std::mem::take(&mut c.buf)))
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Conv<'_, R, W> {
    /// Reads the server's greeting and queues our flags; whether the zero padding is off.
    async fn greet(&mut self) -> Result<bool, ClientError> {
        let greeting = loop {
            match Greeting::decode(&self.buf) {
                Ok(Some(g)) => break g,
                Ok(None) => self.more().await?,
                Err(e) => return Err(hs(e.to_string())),
            }
        };
        self.buf.advance(GREETING_BYTES);
        if !greeting.flags.contains(HandshakeFlags::FIXED_NEWSTYLE) {
            return Err(hs("server does not support fixed newstyle negotiation"));
        }
        let no_zeroes = greeting.flags.contains(HandshakeFlags::NO_ZEROES);
        let mut flags = ClientFlags::FIXED_NEWSTYLE;
        if no_zeroes {
            flags |= ClientFlags::NO_ZEROES;
        }
        encode_client_flags(flags, &mut self.out);
        Ok(no_zeroes)
    }

    /// EXTENDED_HEADERS when wanted, else (or when the server has none) STRUCTURED_REPLY when
    /// wanted: the transmission mode the server agreed to.
    async fn transmission_mode(
        &mut self,
        options: &ConnectOptions,
    ) -> Result<TransmissionMode, ClientError> {
        if options.structured_replies && options.extended_headers {
            self.send_option(&ClientOption::ExtendedHeaders).await?;
            match self.reply(NBD_OPT_EXTENDED_HEADERS).await? {
                OptionReply::Ack => return Ok(TransmissionMode::Extended),
                // An older server (ERR_UNSUP) or one that will not: structured replies, then.
                OptionReply::Error { .. } => {}
                other => {
                    return Err(hs(format!(
                        "unexpected reply to EXTENDED_HEADERS: {other:?}"
                    )));
                }
            }
        }
        Ok(
            if self.structured_replies(options.structured_replies).await? {
                TransmissionMode::Structured
            } else {
                TransmissionMode::Simple
            },
        )
    }

    /// STRUCTURED_REPLY when `wanted`; whether the server agreed. Sends the queued client flags either way.
    async fn structured_replies(&mut self, wanted: bool) -> Result<bool, ClientError> {
        if !wanted {
            self.send().await?;
            return Ok(false);
        }
        self.send_option(&ClientOption::StructuredReply).await?;
        match self.reply(NBD_OPT_STRUCTURED_REPLY).await? {
            OptionReply::Ack => Ok(true),
            OptionReply::Error { .. } => Ok(false),
            other => Err(hs(format!(
                "unexpected reply to STRUCTURED_REPLY: {other:?}"
            ))),
        }
    }

    /// SET_META_CONTEXT `base:allocation`: its context id, if the server has it.
    async fn base_allocation(&mut self, export: &str) -> Result<Option<u32>, ClientError> {
        self.send_option(&ClientOption::SetMetaContext {
            export: export.to_owned(),
            queries: vec![BASE_ALLOCATION.to_string()],
        })
        .await?;
        let mut id = None;
        for _ in 0..OPTION_REPLIES_MAX {
            match self.reply(NBD_OPT_SET_META_CONTEXT).await? {
                OptionReply::MetaContext { id: got, name } if name == BASE_ALLOCATION => {
                    id = Some(got)
                }
                OptionReply::MetaContext { .. } => {}
                OptionReply::Ack => return Ok(id),
                OptionReply::Error { .. } => return Ok(None),
                other => {
                    return Err(hs(format!(
                        "unexpected reply to SET_META_CONTEXT: {other:?}"
                    )));
                }
            }
        }
        Ok(id)
    }

    /// GO: size, flags and block size of `export`; `None` when the server does not know GO.
    async fn go(
        &mut self,
        export: &str,
    ) -> Result<Option<(u64, TransmissionFlags, Option<BlockSize>)>, ClientError> {
        self.send_option(&ClientOption::Go {
            name: export.to_owned(),
            requests: vec![NBD_INFO_BLOCK_SIZE],
        })
        .await?;
        let mut size_and_flags = None;
        let mut block_size = None;
        for _ in 0..OPTION_REPLIES_MAX {
            match self.reply(NBD_OPT_GO).await? {
                OptionReply::Info(Info::Export { size, flags }) => {
                    size_and_flags = Some((size, flags))
                }
                OptionReply::Info(Info::BlockSize(b)) => block_size = Some(b),
                OptionReply::Info(_) => {}
                OptionReply::Ack => break,
                OptionReply::Error {
                    error: OptionError::Unsup,
                    ..
                } => return Ok(None),
                OptionReply::Error { error, message } => {
                    let detail = if message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({message})")
                    };
                    let hint = if error == OptionError::TlsReqd {
                        " (the server requires TLS: use an nbds:// URI with tls_ca)"
                    } else {
                        ""
                    };
                    return Err(hs(format!(
                        "server refused export {export:?}: {}{detail}{hint}",
                        error.name()
                    )));
                }
                other => return Err(hs(format!("unexpected reply to GO: {other:?}"))),
            }
        }
        let Some((size, flags)) = size_and_flags else {
            return Err(hs("GO finished without NBD_INFO_EXPORT"));
        };
        Ok(Some((size, flags, block_size)))
    }

    /// EXPORT_NAME, for servers without GO: size and flags, or the connection closes.
    async fn export_name(
        &mut self,
        export: &str,
        no_zeroes: bool,
    ) -> Result<(u64, TransmissionFlags), ClientError> {
        self.send_option(&ClientOption::ExportName(export.to_owned()))
            .await?;
        let reply = loop {
            match ExportNameReply::decode(&self.buf, no_zeroes) {
                Ok(Some(r)) => break r,
                Ok(None) => {
                    if let Err(e) = self.more().await {
                        return Err(hs(format!("export {export:?} refused (EXPORT_NAME): {e}")));
                    }
                }
                Err(e) => return Err(hs(e.to_string())),
            }
        };
        self.buf.advance(ExportNameReply::wire_len(no_zeroes));
        Ok((reply.size, reply.flags))
    }
}

/// Checks the server's constraints and makes them safe to use (see [`BlockSize::sanitize`]).
fn sanitize_block_size(b: Option<BlockSize>) -> Result<BlockSize, ClientError> {
    match b {
        None => Ok(BlockSize::default()),
        Some(b) => b.sanitize().map_err(|e| hs(format!("server's {e}"))),
    }
}
