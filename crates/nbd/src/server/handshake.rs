//! Server side of the fixed-newstyle handshake.

use super::{Backend, ExportEntry, Server, ServerError};
use crate::io_util::fill;
use crate::proto::*;
use crate::{TransmissionFlags, TransmissionMode};
use bytes::{Buf, BytesMut};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// The context id this server gives `base:allocation`.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake settled.
pub(crate) struct Negotiated<B> {
    pub(crate) export: Arc<ExportEntry<B>>,
    pub(crate) flags: TransmissionFlags,
    pub(crate) mode: TransmissionMode,
    pub(crate) context_id: Option<u32>,
}

/// Option state carried between options (and across the switch to TLS).
#[derive(Default)]
pub(crate) struct OptState {
    no_zeroes: bool,
    structured: bool,
    /// NBD_OPT_EXTENDED_HEADERS acknowledged: it takes precedence over `structured`.
    extended: bool,
    /// Export name for which `base:allocation` was selected by SET_META_CONTEXT.
    meta_export: Option<String>,
    /// The export's TLS as it was when the connection came (a reload changes later connections).
    tls: Option<Arc<crate::tls::ServerTls>>,
    /// The options now travel over TLS.
    tls_active: bool,
}

/// How a handshake ended.
pub(crate) enum HandshakeEnd<B> {
    /// Transmission starts.
    Negotiated(Negotiated<B>),
    /// The client asked for TLS and was told yes: the TLS handshake comes next, then the options
    /// go on with this state.
    StartTls(OptState),
}

impl OptState {
    /// The transmission mode the options so far settle on.
    fn mode(&self) -> TransmissionMode {
        if self.extended {
            TransmissionMode::Extended
        } else if self.structured {
            TransmissionMode::Structured
        } else {
            TransmissionMode::Simple
        }
    }

    pub(crate) fn tls_config(&self) -> Option<&Arc<crate::tls::ServerTls>> {
        self.tls.as_ref()
    }
}

enum Step<B> {
    Continue,
    Abort,
    Transmit(Negotiated<B>),
    StartTls,
}

impl<B: Backend> Server<B> {
    /// Runs the handshake. `Ok(None)`: the client aborted or went away cleanly. `resume`: the state
    /// of a handshake that switched to TLS, going on over the TLS stream (no greeting then).
    pub(crate) async fn handshake<R, W>(
        self: &Arc<Self>,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        resume: Option<OptState>,
    ) -> Result<Option<HandshakeEnd<B>>, ServerError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut out = BytesMut::with_capacity(1024);
        let st = match resume {
            Some(st) => st,
            None => match self.greet(rd, wr, buf, &mut out).await? {
                Some(st) => st,
                None => return Ok(None),
            },
        };
        self.haggle(rd, wr, buf, out, st).await
    }

    /// The greeting and the client's flags; the option state they start.
    async fn greet<R, W>(
        self: &Arc<Self>,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Option<OptState>, ServerError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        Greeting {
            flags: HandshakeFlags::FIXED_NEWSTYLE | HandshakeFlags::NO_ZEROES,
        }
        .encode(out);
        wr.write_all(out).await?;
        wr.flush().await?;
        out.clear();

        let flags = loop {
            if let Some(f) = decode_client_flags(buf)? {
                buf.advance(CLIENT_FLAGS_BYTES);
                break f;
            }
            if fill(rd, buf).await? == 0 {
                return Ok(None);
            }
        };
        if !(flags - ClientFlags::KNOWN).is_empty() {
            return Err(ServerError::Handshake(format!(
                "unknown client flags {:#x}",
                flags.bits()
            )));
        }
        if !flags.contains(ClientFlags::FIXED_NEWSTYLE) {
            return Err(ServerError::Handshake(
                "client does not speak fixed newstyle".into(),
            ));
        }
        Ok(Some(OptState {
            no_zeroes: flags.contains(ClientFlags::NO_ZEROES),
            tls: self.tls(),
            ..Default::default()
        }))
    }

    /// The option haggling, until transmission, an abort, or a switch to TLS.
    async fn haggle<R, W>(
        self: &Arc<Self>,
        rd: &mut R,
        wr: &mut W,
        buf: &mut BytesMut,
        mut out: BytesMut,
        mut st: OptState,
    ) -> Result<Option<HandshakeEnd<B>>, ServerError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            let raw = loop {
                if let Some(raw) = RawOption::decode(buf)? {
                    break raw;
                }
                // An idle negotiating client must not hold shutdown up.
                let n = tokio::select! {
                    _ = self.shutdown.cancelled() => return Ok(None),
                    n = fill(rd, buf) => n?,
                };
                if n == 0 {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(ServerError::Truncated);
                }
            };
            let step = self.handle_option(&raw, &mut st, &mut out);
            if !out.is_empty() {
                wr.write_all(&out).await?;
                wr.flush().await?;
                out.clear();
            }
            match step? {
                Step::Continue => {}
                Step::Abort => return Ok(None),
                Step::Transmit(n) => return Ok(Some(HandshakeEnd::Negotiated(n))),
                Step::StartTls => {
                    // The client waits for our reply before its TLS handshake: anything already
                    // here would be plaintext injected into the session.
                    if !buf.is_empty() {
                        return Err(ServerError::Handshake(
                            "data after NBD_OPT_STARTTLS, before the TLS handshake".into(),
                        ));
                    }
                    st.tls_active = true;
                    // What was negotiated in plaintext could have been injected by anyone on the
                    // path: it is forgotten, and the client negotiates again over TLS.
                    st.structured = false;
                    st.extended = false;
                    st.meta_export = None;
                    return Ok(Some(HandshakeEnd::StartTls(st)));
                }
            }
        }
    }

    /// One option of the handshake: its replies go to `out`; the step says what follows.
    fn handle_option(
        &self,
        raw: &RawOption,
        st: &mut OptState,
        out: &mut BytesMut,
    ) -> Result<Step<B>, ServerError> {
        let code = raw.option;
        let parsed = match ClientOption::parse(raw) {
            Ok(p) => p,
            Err(e) if code == NBD_OPT_EXPORT_NAME => {
                // EXPORT_NAME cannot fail politely.
                return Err(ServerError::Protocol(e));
            }
            Err(e) => {
                error_reply(code, OptionError::Invalid, &e.to_string(), out);
                return Ok(Step::Continue);
            }
        };
        if self.shutdown.is_cancelled() {
            return shutting_down(code, parsed, out);
        }
        let tls_required = st.tls.as_ref().is_some_and(|t| t.require) && !st.tls_active;
        if tls_required && !matches!(parsed, ClientOption::StartTls | ClientOption::Abort) {
            if let ClientOption::ExportName(_) = parsed {
                // EXPORT_NAME has no error reply: the connection ends.
                return Err(ServerError::Handshake(
                    "EXPORT_NAME before TLS, and this server requires TLS".into(),
                ));
            }
            error_reply(
                code,
                OptionError::TlsReqd,
                "TLS is required: send NBD_OPT_STARTTLS first",
                out,
            );
            return Ok(Step::Continue);
        }
        match parsed {
            ClientOption::Abort => {
                OptionReply::Ack.encode(code, out);
                Ok(Step::Abort)
            }
            ClientOption::List => {
                for name in self.export_names() {
                    OptionReply::Server {
                        name,
                        details: Default::default(),
                    }
                    .encode(code, out);
                }
                OptionReply::Ack.encode(code, out);
                Ok(Step::Continue)
            }
            // Extended headers cannot be downgraded (proto.md: ERR_EXT_HEADER_REQD).
            ClientOption::StructuredReply if st.extended => {
                error_reply(
                    code,
                    OptionError::ExtHeaderReqd,
                    "extended headers are already negotiated",
                    out,
                );
                Ok(Step::Continue)
            }
            ClientOption::StructuredReply => {
                st.structured = true;
                OptionReply::Ack.encode(code, out);
                Ok(Step::Continue)
            }
            ClientOption::ExtendedHeaders if st.extended => {
                error_reply(
                    code,
                    OptionError::Invalid,
                    "extended headers are already negotiated",
                    out,
                );
                Ok(Step::Continue)
            }
            ClientOption::ExtendedHeaders => {
                st.extended = true;
                OptionReply::Ack.encode(code, out);
                Ok(Step::Continue)
            }
            ClientOption::ListMetaContext { export, queries } => {
                self.list_meta_context(code, &export, &queries, st, out);
                Ok(Step::Continue)
            }
            ClientOption::SetMetaContext { export, queries } => {
                self.set_meta_context(code, export, &queries, st, out);
                Ok(Step::Continue)
            }
            ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                Ok(self.info_or_go(code, &name, &requests, st, out))
            }
            ClientOption::ExportName(_) if st.extended => {
                // proto.md: a client that negotiated extended headers MUST NOT use EXPORT_NAME,
                // and EXPORT_NAME has no error reply.
                Err(ServerError::Handshake(
                    "EXPORT_NAME after extended headers were negotiated".into(),
                ))
            }
            ClientOption::ExportName(name) => {
                let Some(export) = self.find_export(&name) else {
                    return Err(ServerError::Handshake(format!("unknown export {name:?}")));
                };
                let flags = advertised_flags(&export.config.flags, st.mode());
                ExportNameReply {
                    size: export.config.size,
                    flags,
                }
                .encode(st.no_zeroes, out);
                Ok(Step::Transmit(self.negotiated(export, flags, st, &name)))
            }
            ClientOption::StartTls if st.tls_active => {
                error_reply(code, OptionError::Invalid, "TLS is already active", out);
                Ok(Step::Continue)
            }
            ClientOption::StartTls if st.tls.is_none() => {
                error_reply(
                    code,
                    OptionError::Unsup,
                    "TLS is not configured on this server",
                    out,
                );
                Ok(Step::Continue)
            }
            ClientOption::StartTls => {
                OptionReply::Ack.encode(code, out);
                Ok(Step::StartTls)
            }
            ClientOption::Unknown(_) => {
                error_reply(code, OptionError::Unsup, "option not supported", out);
                Ok(Step::Continue)
            }
        }
    }

    /// LIST_META_CONTEXT: `base:allocation` when the queries ask for it (or for everything).
    fn list_meta_context(
        &self,
        code: u32,
        export: &str,
        queries: &[String],
        st: &OptState,
        out: &mut BytesMut,
    ) {
        if let Err((error, message)) = self.meta_context_allowed(export, st) {
            return error_reply(code, error, message, out);
        }
        let any =
            queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION);
        if any {
            OptionReply::MetaContext {
                id: 0,
                name: BASE_ALLOCATION.into(),
            }
            .encode(code, out);
        }
        OptionReply::Ack.encode(code, out);
    }

    /// SET_META_CONTEXT: replaces whatever an earlier SET chose; only `base:allocation` exists.
    fn set_meta_context(
        &self,
        code: u32,
        export: String,
        queries: &[String],
        st: &mut OptState,
        out: &mut BytesMut,
    ) {
        st.meta_export = None;
        if let Err((error, message)) = self.meta_context_allowed(&export, st) {
            return error_reply(code, error, message, out);
        }
        if queries.iter().any(|q| q == BASE_ALLOCATION) {
            OptionReply::MetaContext {
                id: BASE_ALLOCATION_ID,
                name: BASE_ALLOCATION.into(),
            }
            .encode(code, out);
            st.meta_export = Some(export);
        }
        OptionReply::Ack.encode(code, out);
    }

    /// Meta contexts need structured replies (or extended headers) and an export we have.
    fn meta_context_allowed(
        &self,
        export: &str,
        st: &OptState,
    ) -> Result<(), (OptionError, &'static str)> {
        if !st.mode().chunked() {
            Err((OptionError::Invalid, "structured replies not negotiated"))
        } else if self.find_export(export).is_none() {
            Err((OptionError::Unknown, "unknown export"))
        } else {
            Ok(())
        }
    }

    /// INFO and GO: the export's information (size and flags, the block size always, name and
    /// description when asked); GO then ends the handshake.
    fn info_or_go(
        &self,
        code: u32,
        name: &str,
        requests: &[u16],
        st: &OptState,
        out: &mut BytesMut,
    ) -> Step<B> {
        let Some(export) = self.find_export(name) else {
            error_reply(code, OptionError::Unknown, "unknown export", out);
            return Step::Continue;
        };
        let flags = advertised_flags(&export.config.flags, st.mode());
        let cfg = &export.config;
        OptionReply::Info(Info::Export {
            size: cfg.size,
            flags,
        })
        .encode(code, out);
        if requests.contains(&NBD_INFO_NAME) {
            OptionReply::Info(Info::Name(cfg.name.clone())).encode(code, out);
        }
        if requests.contains(&NBD_INFO_DESCRIPTION)
            && let Some(d) = &cfg.description
        {
            OptionReply::Info(Info::Description(d.clone())).encode(code, out);
        }
        // Always sent: a client that did not ask may ignore it, one that did must obey.
        OptionReply::Info(Info::BlockSize(cfg.block_size)).encode(code, out);
        OptionReply::Ack.encode(code, out);
        if code == NBD_OPT_INFO {
            return Step::Continue;
        }
        Step::Transmit(self.negotiated(export, flags, st, name))
    }

    fn negotiated(
        &self,
        export: Arc<ExportEntry<B>>,
        flags: TransmissionFlags,
        st: &OptState,
        name: &str,
    ) -> Negotiated<B> {
        let context_id = match &st.meta_export {
            Some(m) if st.mode().chunked() && (m == name || m == &export.config.name) => {
                Some(BASE_ALLOCATION_ID)
            }
            _ => None,
        };
        Negotiated {
            export,
            flags,
            mode: st.mode(),
            context_id,
        }
    }
}

/// While the server shuts down: ABORT is honoured, EXPORT_NAME (which cannot fail politely) ends the
/// connection, anything else gets `NBD_REP_ERR_SHUTDOWN`.
fn shutting_down<B>(
    code: u32,
    parsed: ClientOption,
    out: &mut BytesMut,
) -> Result<Step<B>, ServerError> {
    match parsed {
        ClientOption::Abort => {
            OptionReply::Ack.encode(code, out);
            Ok(Step::Abort)
        }
        ClientOption::ExportName(_) => {
            Err(ServerError::Handshake("server is shutting down".into()))
        }
        _ => {
            error_reply(code, OptionError::Shutdown, "server is shutting down", out);
            Ok(Step::Continue)
        }
    }
}

fn error_reply(code: u32, error: OptionError, message: &str, out: &mut BytesMut) {
    OptionReply::Error {
        error,
        message: message.to_string(),
    }
    .encode(code, out);
}

/// The flags actually sent for an export.
pub(crate) fn advertised_flags(
    cfg: &TransmissionFlags,
    mode: TransmissionMode,
) -> TransmissionFlags {
    let mut f = *cfg | TransmissionFlags::HAS_FLAGS;
    f.remove(TransmissionFlags::SEND_RESIZE | TransmissionFlags::BLOCK_STATUS_PAYLOAD);
    if !mode.chunked() {
        // DF only has a meaning with structured replies.
        f.remove(TransmissionFlags::SEND_DF);
    }
    f & TransmissionFlags::from_bits_retain(0x1fff)
}
