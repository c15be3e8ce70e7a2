//! TLS for the client side of NBD connections (`nbds://`, `NBD_OPT_STARTTLS`): TLS 1.3 through
//! rustls with the `ring` provider, a CA file to verify the server, and optionally a client
//! certificate for servers that verify their peers (qemu-nbd's `tls-creds-x509` does by default).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// What a path needs to speak TLS to its server: the verified name it expects, and the rustls
/// configuration built from the files (kept to compare and to report).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
    pub ca: PathBuf,
    /// The client certificate and its key, when the server wants one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl PartialEq for ClientTls {
    /// The same files and the same name (the configuration is built from them).
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.ca == other.ca
            && self.identity == other.identity
    }
}

/// Why TLS material could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

impl ClientTls {
    /// TLS 1.3 to a server whose certificate chains to a certificate of `ca` and names
    /// `server_name` (a DNS name or an IP address), with the client identity `cert`/`key` if given.
    pub fn new(
        ca: &Path,
        identity: Option<(&Path, &Path)>,
        server_name: &str,
    ) -> Result<ClientTls, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(ca)? {
            roots.add(cert).map_err(|e| file_error(ca, e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?
            }
        };
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|e| TlsError::Config(format!("server name {server_name:?}: {e}")))?;
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
            ca: ca.to_path_buf(),
            identity: identity.map(|(c, k)| (c.to_path_buf(), k.to_path_buf())),
        })
    }
}

/// The export's TLS: its certificate and key, whether clients must use TLS, and the CA that signs
/// client certificates when clients must present one (mutual TLS).
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// `require`: every option but STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD before
    /// TLS, as the protocol says; otherwise TLS is offered and plain clients are served too.
    pub require: bool,
}

impl ServerTls {
    pub fn new(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        require: bool,
    ) -> Result<ServerTls, TlsError> {
        let chain = certificates(cert)?;
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_error(key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates(ca)? {
                    roots.add(c).map_err(|e| file_error(ca, e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| file_error(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| TlsError::Config(format!("{}: {e}", cert.display())))?;
        Ok(ServerTls {
            config: Arc::new(config),
            require,
        })
    }
}
