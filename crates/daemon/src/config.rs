//! `lunmpio serve --config FILE`: the TOML configuration of docs/OPERATIONS.md, configuration.
//!
//! Parsing is strict: an unknown key, a bad value, a duplicate LUN or path name is an error that names
//! the key and the line, and the daemon does not start. Every `[defaults]` key may be repeated in a
//! `[[lun]]` table, which wins.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lunmpio_engine::transport::{PathTarget, TlsFiles};
use lunmpio_engine::{Failback, LunSettings, LunSpec, NoPathRetry, PathSpec, stable_id};
use lunmpio_vds::{HwProviderType, LoadBalancePolicy, Wwn};
use serde::Deserialize;
use toml::Spanned;

use lunmpio_human::{parse_duration, parse_size};

pub use lunmpio_vds::limits::{LUNS_MAX, NAME_BYTES_MAX, PATHS_PER_LUN_MAX};
/// Bound on a `fence` command's program plus arguments.
pub const FENCE_ARGS_MAX: usize = 64;

#[derive(Debug, Clone)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub luns: Vec<LunTable>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub nbd_listen: ListenAddr,
    pub control_socket: PathBuf,
    /// None: no metrics endpoint (`metrics_listen = ""`).
    pub metrics_listen: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub shutdown_timeout: Duration,
    /// Export connections served at once (NBD clients); at the bound an idle one makes room, else a
    /// new one is refused.
    pub max_connections: usize,
    /// Threads that run the data path (each LUN, its paths and its export connections on one of
    /// them); 0: one per LUN, at most one per CPU.
    pub data_threads: usize,
    /// How long a data thread keeps polling its sockets after its last read instead of sleeping;
    /// None (`data_poll_us = 0`): it sleeps at once.
    pub data_poll: Option<Duration>,
    /// TLS on the exports (`tls = "on"` or `"require"`); None: `"off"`.
    pub tls: Option<ExportTls>,
}

/// `[daemon] tls`, `tls_cert`, `tls_key`, `tls_client_ca`: the files, read again at every start
/// and reload (a renewed certificate is taken without a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportTls {
    /// `require`: clients must start TLS before any other option.
    pub require: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Mutual TLS: clients must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl ExportTls {
    /// The rustls configuration from the files as they are now.
    pub fn load(&self) -> Result<lunmpio_nbd::tls::ServerTls, lunmpio_nbd::tls::TlsError> {
        lunmpio_nbd::tls::ServerTls::new(
            &self.cert,
            &self.key,
            self.client_ca.as_deref(),
            self.require,
        )
    }
}

/// Bound of `data_threads`.
pub const DATA_THREADS_MAX: usize = 256;
/// Bound of `data_poll_us`: past a few ms, polling saves nothing a sleep would not.
pub const DATA_POLL_US_MAX: u64 = 10_000;

/// Default and bound of `max_connections`.
pub const MAX_CONNECTIONS_DEFAULT: usize = 1024;
pub const MAX_CONNECTIONS_LIMIT: usize = 1 << 16;

/// One `[[lun]]` table of the config file, checked. (The engine runs it as an
/// `engine::LunSpec`; the VDS rules see it as a `vds::LunConfig`.)
#[derive(Debug, Clone)]
pub struct LunTable {
    pub name: String,
    pub id: Option<u64>,
    pub settings: LunSettings,
    pub size_bytes: Option<u64>,
    pub wwid: Option<String>,
    pub shared_backing: bool,
    pub paths: Vec<PathTable>,
}

/// One `[[lun.path]]` table of the config file, checked (an `engine::PathSpec` once resolved).
#[derive(Debug, Clone)]
pub struct PathTable {
    pub uri: String,
    pub target: PathTarget,
    pub name: Option<String>,
    pub id: Option<u64>,
    pub primary: bool,
    pub weight: u32,
    pub bind: Option<IpAddr>,
    pub interconnect: Option<HwProviderType>,
    /// The initiator HBA port's WWNs, for local paths (lunmpio does not read them from sysfs).
    pub hba_wwnn: Option<Wwn>,
    pub hba_wwpn: Option<Wwn>,
    /// The path's own `fence` (else the LUN's).
    pub fence: Option<Vec<String>>,
}

/// A configuration problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The key's path, e.g. `lun[0].path[1].weight`.
    pub key: String,
    pub message: String,
}

impl LunTable {
    /// The engine's view of this LUN. Ids default to stable hashes (of the LUN name, of the path URI)
    /// so they survive restarts and reordering; names default to something readable from the URI.
    pub fn to_spec(&self) -> LunSpec {
        let mut used = std::collections::HashSet::new();
        let paths = self
            .paths
            .iter()
            .enumerate()
            .map(|(j, p)| {
                let name = p.name.clone().unwrap_or_else(|| {
                    let base = default_path_name(&p.uri, j);
                    if used.contains(&base) {
                        format!("{base}-{j}")
                    } else {
                        base
                    }
                });
                used.insert(name.clone());
                PathSpec {
                    id: p.id.unwrap_or_else(|| stable_id(&p.uri)),
                    name,
                    uri: p.uri.clone(),
                    target: p.target.clone(),
                    primary: p.primary,
                    weight: p.weight,
                    bind: p.bind,
                    interconnect: p.interconnect,
                    hba_wwns: p.hba_wwnn.zip(p.hba_wwpn),
                    fence: p.fence.clone(),
                }
            })
            .collect();
        LunSpec {
            name: self.name.clone(),
            source_id: self.id.unwrap_or_else(|| stable_id(&self.name)),
            settings: self.settings.clone(),
            size_bytes: self.size_bytes,
            wwid: self.wwid.clone(),
            shared_backing: self.shared_backing,
            paths,
        }
    }
}

/// The longest `-N` suffix `to_spec` adds to a derived path name (N < PATHS_PER_LUN_MAX).
const DEDUP_SUFFIX_BYTES_MAX: usize = 4;
const _: () = assert!(PATHS_PER_LUN_MAX <= 999);

/// `10.0.1.10:10809`, `ctrl-a.sock`, `sdb`: the part of a URI that tells paths apart.
fn default_path_name(uri: &str, index: usize) -> String {
    let tail = if let Some(rest) = uri.strip_prefix("nbd://") {
        rest.split('/').next().unwrap_or("").to_string()
    } else if let Some(pos) = uri.find("socket=") {
        let socket = &uri[pos + "socket=".len()..];
        let socket = socket.split('&').next().unwrap_or(socket);
        socket.rsplit('/').next().unwrap_or(socket).to_string()
    } else {
        uri.rsplit('/').next().unwrap_or("").to_string()
    };
    let mut clean: String = tail
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        .collect();
    // Within the name limit, with room for the `-N` that tells equal names apart (ASCII: any byte
    // is a character boundary).
    clean.truncate(NAME_BYTES_MAX - DEDUP_SUFFIX_BYTES_MAX);
    if clean.is_empty() {
        format!("path{index}")
    } else {
        clean
    }
}

// ---- the raw shape of the file (serde), spans kept for error messages ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Option<RawDaemon>,
    defaults: Option<RawSettings>,
    #[serde(default)]
    lun: Vec<Spanned<RawLun>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    nbd_listen: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    data_threads: Option<Spanned<i64>>,
    data_poll_us: Option<Spanned<i64>>,
    tls: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    tls_client_ca: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    policy: Option<Spanned<String>>,
    io_timeout: Option<Spanned<String>>,
    adaptive_timeout: Option<bool>,
    check_interval: Option<Spanned<String>>,
    no_path_retry: Option<Spanned<String>>,
    failback: Option<Spanned<String>>,
    no_path_queue_max: Option<Spanned<String>>,
    in_doubt_timeout: Option<Spanned<String>>,
    fence: Option<Spanned<Vec<String>>>,
    fence_timeout: Option<Spanned<String>>,
    tls_ca: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
}

/// The TLS file keys a path inherits from its `[[lun]]` and `[defaults]` (used by `nbds://` paths
/// only).
#[derive(Clone, Default)]
struct TlsKeys {
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

impl TlsKeys {
    /// These keys where set, else `outer`'s.
    fn or(&self, outer: &TlsKeys) -> TlsKeys {
        TlsKeys {
            ca: self.ca.clone().or_else(|| outer.ca.clone()),
            cert: self.cert.clone().or_else(|| outer.cert.clone()),
            key: self.key.clone().or_else(|| outer.key.clone()),
        }
    }
}

/// A `[[lun]]` table. The settings keys are repeated here rather than flattened from
/// [`RawSettings`]: serde's flatten buffers values and loses the spans that error messages need.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLun {
    name: Spanned<String>,
    id: Option<Spanned<toml::Value>>,
    size: Option<Spanned<String>>,
    wwid: Option<Spanned<String>>,
    shared_backing: Option<bool>,
    policy: Option<Spanned<String>>,
    io_timeout: Option<Spanned<String>>,
    adaptive_timeout: Option<bool>,
    check_interval: Option<Spanned<String>>,
    no_path_retry: Option<Spanned<String>>,
    failback: Option<Spanned<String>>,
    no_path_queue_max: Option<Spanned<String>>,
    in_doubt_timeout: Option<Spanned<String>>,
    fence: Option<Spanned<Vec<String>>>,
    fence_timeout: Option<Spanned<String>>,
    tls_ca: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    #[serde(default)]
    path: Vec<Spanned<RawPath>>,
}

impl RawLun {
    fn settings(&self) -> RawSettings {
        RawSettings {
            policy: self.policy.clone(),
            io_timeout: self.io_timeout.clone(),
            adaptive_timeout: self.adaptive_timeout,
            check_interval: self.check_interval.clone(),
            no_path_retry: self.no_path_retry.clone(),
            failback: self.failback.clone(),
            no_path_queue_max: self.no_path_queue_max.clone(),
            in_doubt_timeout: self.in_doubt_timeout.clone(),
            fence: self.fence.clone(),
            fence_timeout: self.fence_timeout.clone(),
            tls_ca: self.tls_ca.clone(),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
        }
    }

    fn tls_keys(&self) -> TlsKeys {
        TlsKeys {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    uri: Spanned<String>,
    name: Option<Spanned<String>>,
    id: Option<Spanned<toml::Value>>,
    primary: Option<bool>,
    weight: Option<Spanned<i64>>,
    bind: Option<Spanned<String>>,
    interconnect: Option<Spanned<String>>,
    hba_wwnn: Option<Spanned<String>>,
    hba_wwpn: Option<Spanned<String>>,
    fence: Option<Spanned<Vec<String>>>,
    tls_ca: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_text(path).map(|(config, _)| config)
    }

    /// [`Config::load`], and the text it was parsed from (a live upgrade carries it).
    pub fn load_text(path: &Path) -> Result<(Config, String), ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            key: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &file).map(|config| (config, text))
    }

    /// Parses and validates a configuration. `file` only labels error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cx = Context { text, file };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            // serde's message names the unknown or mistyped key; keep its first line.
            let message = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_string();
            cx.error(span, key_at(text, e.span()), message)
        })?;
        let daemon = cx.daemon(raw.daemon)?;
        let defaults = cx.settings(raw.defaults.as_ref(), &LunSettings::default(), "defaults")?;
        let tls_defaults = raw
            .defaults
            .as_ref()
            .map(|d| TlsKeys {
                ca: d.tls_ca.clone(),
                cert: d.tls_cert.clone(),
                key: d.tls_key.clone(),
            })
            .unwrap_or_default();
        if raw.lun.len() > LUNS_MAX {
            return Err(cx.error(0..0, "lun".into(), format!("more than {LUNS_MAX} LUNs")));
        }
        let mut names = HashSet::new();
        let mut luns = Vec::with_capacity(raw.lun.len());
        for (i, lun) in raw.lun.iter().enumerate() {
            let parsed = cx.lun(lun, i, &defaults, &tls_defaults)?;
            if !names.insert(parsed.name.clone()) {
                return Err(cx.error(
                    lun.get_ref().name.span(),
                    format!("lun[{i}].name"),
                    format!("duplicate LUN name {:?}", parsed.name),
                ));
            }
            luns.push(parsed);
        }
        Ok(Config { daemon, luns })
    }
}

struct Context<'a> {
    text: &'a str,
    file: &'a str,
}

impl Context<'_> {
    /// A path's `tls_ca`, `tls_cert` and `tls_key`; relative file names are relative to the config
    /// file's directory.
    /// A file named in the config: relative names are relative to the config file's directory.
    fn relative_to_config(&self, name: &str) -> PathBuf {
        let path = Path::new(name);
        match Path::new(self.file).parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    fn tls_files(&self, raw: &TlsKeys, table: &str) -> Result<Option<TlsFiles>, ConfigError> {
        let file = |v: &Spanned<String>| self.relative_to_config(v.get_ref());
        let identity = match (&raw.cert, &raw.key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((file(cert), file(key))),
            (Some(v), None) | (None, Some(v)) => {
                return Err(self.error(
                    v.span(),
                    format!("{table}.tls_cert"),
                    "tls_cert and tls_key go together (the client certificate and its key)",
                ));
            }
        };
        match (&raw.ca, identity) {
            (None, None) => Ok(None),
            (Some(ca), identity) => Ok(Some(TlsFiles {
                ca: file(ca),
                identity,
            })),
            (None, Some(_)) => {
                let span = raw.cert.as_ref().map(|v| v.span()).unwrap_or(0..0);
                Err(self.error(
                    span,
                    format!("{table}.tls_ca"),
                    "a client certificate needs tls_ca too (the CA that signed the server's certificate)",
                ))
            }
        }
    }

    fn error(&self, span: Range<usize>, key: String, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError {
            file: self.file.to_string(),
            line,
            column,
            key,
            message: message.into(),
        }
    }

    fn daemon(&self, raw: Option<RawDaemon>) -> Result<DaemonConfig, ConfigError> {
        let raw = raw.unwrap_or(RawDaemon {
            nbd_listen: None,
            control_socket: None,
            metrics_listen: None,
            state_dir: None,
            shutdown_timeout: None,
            max_connections: None,
            data_threads: None,
            data_poll_us: None,
            tls: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        });
        let nbd_listen = match &raw.nbd_listen {
            None => ListenAddr::Tcp("127.0.0.1:10809".parse().expect("constant")),
            Some(v) => parse_listen(v.get_ref())
                .map_err(|m| self.error(v.span(), "daemon.nbd_listen".into(), m))?,
        };
        let metrics_listen = match &raw.metrics_listen {
            None => Some("127.0.0.1:9109".parse().expect("constant")),
            Some(v) if v.get_ref().is_empty() => None,
            Some(v) => Some(v.get_ref().parse().map_err(|_| {
                self.error(
                    v.span(),
                    "daemon.metrics_listen".into(),
                    format!(
                        "{:?} is not HOST:PORT (or \"\" to turn metrics off)",
                        v.get_ref()
                    ),
                )
            })?),
        };
        let shutdown_timeout = match &raw.shutdown_timeout {
            None => Duration::from_secs(10),
            Some(v) => self.duration(v, "daemon.shutdown_timeout")?,
        };
        let max_connections = match &raw.max_connections {
            None => MAX_CONNECTIONS_DEFAULT,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| (1..=MAX_CONNECTIONS_LIMIT).contains(n))
                .ok_or_else(|| {
                    self.error(
                        v.span(),
                        "daemon.max_connections".into(),
                        format!("{} is not in 1..={MAX_CONNECTIONS_LIMIT}", v.get_ref()),
                    )
                })?,
        };
        let data_threads = match &raw.data_threads {
            None => 0,
            Some(v) => usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| *n <= DATA_THREADS_MAX)
                .ok_or_else(|| {
                    self.error(
                        v.span(),
                        "daemon.data_threads".into(),
                        format!(
                            "{} is not in 0..={DATA_THREADS_MAX} (0: one per LUN, at most one per CPU)",
                            v.get_ref()
                        ),
                    )
                })?,
        };
        let data_poll = match &raw.data_poll_us {
            None => None,
            Some(v) => u64::try_from(*v.get_ref())
                .ok()
                .filter(|us| *us <= DATA_POLL_US_MAX)
                .map(|us| (us > 0).then(|| Duration::from_micros(us)))
                .ok_or_else(|| {
                    self.error(
                        v.span(),
                        "daemon.data_poll_us".into(),
                        format!(
                            "{} is not in 0..={DATA_POLL_US_MAX} (0: a data thread sleeps when idle)",
                            v.get_ref()
                        ),
                    )
                })?,
        };
        let tls = self.export_tls(&raw)?;
        let path = |v: &Option<Spanned<String>>,
                    default: &str,
                    key: &str|
         -> Result<PathBuf, ConfigError> {
            match v {
                None => Ok(PathBuf::from(default)),
                Some(v) if v.get_ref().is_empty() => {
                    Err(self.error(v.span(), key.into(), "must not be empty"))
                }
                Some(v) => Ok(PathBuf::from(v.get_ref())),
            }
        };
        Ok(DaemonConfig {
            nbd_listen,
            control_socket: path(
                &raw.control_socket,
                "/run/lunmpio/control.sock",
                "daemon.control_socket",
            )?,
            metrics_listen,
            state_dir: path(&raw.state_dir, "/var/lib/lunmpio", "daemon.state_dir")?,
            shutdown_timeout,
            max_connections,
            data_threads,
            data_poll,
            tls,
        })
    }

    /// `tls = "off" | "on" | "require"` with its files; the files are read now, so a missing or
    /// broken one stops the start with the key and the line.
    fn export_tls(&self, raw: &RawDaemon) -> Result<Option<ExportTls>, ConfigError> {
        let require = match &raw.tls {
            None => return self.no_tls_files(raw),
            Some(v) => match v.get_ref().as_str() {
                "off" => return self.no_tls_files(raw),
                "on" => false,
                "require" => true,
                other => {
                    return Err(self.error(
                        v.span(),
                        "daemon.tls".into(),
                        format!("{other:?} is not off, on or require"),
                    ));
                }
            },
        };
        let span = raw.tls.as_ref().map(|v| v.span()).unwrap_or(0..0);
        let file = |v: &Option<Spanned<String>>, key: &str| -> Result<PathBuf, ConfigError> {
            let v = v.as_ref().ok_or_else(|| {
                self.error(
                    span.clone(),
                    format!("daemon.{key}"),
                    "TLS on the exports needs tls_cert and tls_key",
                )
            })?;
            Ok(self.relative_to_config(v.get_ref()))
        };
        let tls = ExportTls {
            require,
            cert: file(&raw.tls_cert, "tls_cert")?,
            key: file(&raw.tls_key, "tls_key")?,
            client_ca: match &raw.tls_client_ca {
                None => None,
                Some(_) => Some(file(&raw.tls_client_ca, "tls_client_ca")?),
            },
        };
        tls.load()
            .map_err(|e| self.error(span, "daemon.tls".into(), e.to_string()))?;
        Ok(Some(tls))
    }

    fn no_tls_files(&self, raw: &RawDaemon) -> Result<Option<ExportTls>, ConfigError> {
        for (v, key) in [
            (&raw.tls_cert, "tls_cert"),
            (&raw.tls_key, "tls_key"),
            (&raw.tls_client_ca, "tls_client_ca"),
        ] {
            if let Some(v) = v {
                return Err(self.error(
                    v.span(),
                    format!("daemon.{key}"),
                    "set tls = \"on\" or \"require\" to use TLS on the exports",
                ));
            }
        }
        Ok(None)
    }

    fn settings(
        &self,
        raw: Option<&RawSettings>,
        base: &LunSettings,
        table: &str,
    ) -> Result<LunSettings, ConfigError> {
        let mut s = base.clone();
        let Some(raw) = raw else { return Ok(s) };
        let key = |k: &str| format!("{table}.{k}");
        if let Some(v) = &raw.policy {
            s.policy = LoadBalancePolicy::parse_any(v.get_ref())
                .map_err(|e| self.error(v.span(), key("policy"), e.message))?;
        }
        if let Some(v) = &raw.io_timeout {
            s.io_timeout = self.duration(v, &key("io_timeout"))?;
            if s.io_timeout < Duration::from_millis(10) {
                return Err(self.error(v.span(), key("io_timeout"), "must be at least 10ms"));
            }
        }
        if let Some(v) = raw.adaptive_timeout {
            s.adaptive_timeout = v;
        }
        if let Some(v) = &raw.check_interval {
            s.check_interval = self.duration(v, &key("check_interval"))?;
            if s.check_interval < Duration::from_millis(10) {
                return Err(self.error(v.span(), key("check_interval"), "must be at least 10ms"));
            }
        }
        if let Some(v) = &raw.no_path_retry {
            s.no_path_retry = match v.get_ref().as_str() {
                "fail" => NoPathRetry::Fail,
                "queue" => NoPathRetry::Queue,
                other => NoPathRetry::For(parse_duration(other).map_err(|m| {
                    self.error(
                        v.span(),
                        key("no_path_retry"),
                        format!("expected \"fail\", \"queue\" or a duration: {m}"),
                    )
                })?),
            };
        }
        if let Some(v) = &raw.failback {
            s.failback = match v.get_ref().as_str() {
                "immediate" => Failback::Immediate,
                "manual" => Failback::Manual,
                other => Failback::After(parse_duration(other).map_err(|m| {
                    self.error(
                        v.span(),
                        key("failback"),
                        format!("expected \"immediate\", \"manual\" or a duration: {m}"),
                    )
                })?),
            };
        }
        if let Some(v) = &raw.no_path_queue_max {
            s.no_path_queue_bytes_max = parse_size(v.get_ref())
                .map_err(|m| self.error(v.span(), key("no_path_queue_max"), m))?;
        }
        if let Some(v) = &raw.in_doubt_timeout {
            s.in_doubt_timeout = match v.get_ref().as_str() {
                "never" => None,
                other => Some(parse_duration(other).map_err(|m| {
                    self.error(
                        v.span(),
                        key("in_doubt_timeout"),
                        format!("expected a duration or \"never\": {m}"),
                    )
                })?),
            };
        }
        if let Some(v) = &raw.fence_timeout {
            s.fence_timeout = self.duration(v, &key("fence_timeout"))?;
            if s.fence_timeout.is_zero() {
                return Err(self.error(v.span(), key("fence_timeout"), "must be above zero"));
            }
        }
        if let Some(v) = &raw.fence {
            s.fence = Some(self.fence(v, &key("fence"))?);
        }
        Ok(s)
    }

    /// `fence = ["program", "arg", ...]`: run without a shell, so the first element is the program.
    fn fence(&self, v: &Spanned<Vec<String>>, key: &str) -> Result<Vec<String>, ConfigError> {
        let command = v.get_ref();
        match command.first() {
            None => Err(self.error(
                v.span(),
                key.into(),
                "needs at least the program: fence = [\"/usr/local/bin/fence-path\", \"arg\"]",
            )),
            Some(program) if program.trim().is_empty() => {
                Err(self.error(v.span(), key.into(), "the program name is empty"))
            }
            Some(_) if command.len() > FENCE_ARGS_MAX => Err(self.error(
                v.span(),
                key.into(),
                format!("more than {FENCE_ARGS_MAX} arguments"),
            )),
            Some(_) if command.iter().any(|a| a.contains('\0')) => {
                Err(self.error(v.span(), key.into(), "an argument contains a NUL byte"))
            }
            Some(_) => Ok(command.clone()),
        }
    }

    fn duration(&self, v: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        parse_duration(v.get_ref()).map_err(|m| self.error(v.span(), key.into(), m))
    }

    fn lun(
        &self,
        spanned: &Spanned<RawLun>,
        i: usize,
        defaults: &LunSettings,
        tls_defaults: &TlsKeys,
    ) -> Result<LunTable, ConfigError> {
        let raw = spanned.get_ref();
        let name = raw.name.get_ref().clone();
        check_name(&name).map_err(|m| self.error(raw.name.span(), format!("lun[{i}].name"), m))?;
        let table = format!("lun[{i}]");
        let settings = self.settings(Some(&raw.settings()), defaults, &table)?;
        let size_bytes = match &raw.size {
            None => None,
            Some(v) => Some(
                parse_size(v.get_ref())
                    .map_err(|m| self.error(v.span(), format!("{table}.size"), m))?,
            ),
        };
        if raw.path.is_empty() {
            return Err(self.error(
                spanned.span(),
                format!("{table}.path"),
                "a LUN needs at least one [[lun.path]]",
            ));
        }
        if raw.path.len() > PATHS_PER_LUN_MAX {
            return Err(self.error(
                spanned.span(),
                format!("{table}.path"),
                format!("more than {PATHS_PER_LUN_MAX} paths"),
            ));
        }
        let mut paths = Vec::with_capacity(raw.path.len());
        let mut seen_names = HashSet::new();
        let mut seen_uris = HashSet::new();
        let mut seen_ids = HashSet::new();
        for (j, p) in raw.path.iter().enumerate() {
            let inherited = raw.tls_keys().or(tls_defaults);
            let path = self.path(p.get_ref(), &format!("{table}.path[{j}]"), &inherited)?;
            let r = p.get_ref();
            if !seen_uris.insert(path.uri.clone()) {
                return Err(self.error(
                    r.uri.span(),
                    format!("{table}.path[{j}].uri"),
                    format!("duplicate path URI {:?}", path.uri),
                ));
            }
            if let Some(n) = &path.name
                && !seen_names.insert(n.clone())
            {
                let span = r.name.as_ref().map(|s| s.span()).unwrap_or(0..0);
                return Err(self.error(
                    span,
                    format!("{table}.path[{j}].name"),
                    format!("duplicate path name {n:?}"),
                ));
            }
            if let Some(id) = path.id
                && !seen_ids.insert(id)
            {
                let span = r.id.as_ref().map(|s| s.span()).unwrap_or(0..0);
                return Err(self.error(
                    span,
                    format!("{table}.path[{j}].id"),
                    format!("duplicate path id {id:#x}"),
                ));
            }
            paths.push(path);
        }
        let id = match &raw.id {
            None => None,
            Some(v) => Some(self.id(v, &format!("{table}.id"))?),
        };
        Ok(LunTable {
            name,
            id,
            settings,
            size_bytes,
            wwid: raw.wwid.as_ref().map(|w| w.get_ref().clone()),
            shared_backing: raw.shared_backing.unwrap_or(false),
            paths,
        })
    }

    fn path(
        &self,
        raw: &RawPath,
        table: &str,
        inherited: &TlsKeys,
    ) -> Result<PathTable, ConfigError> {
        let uri = raw.uri.get_ref().clone();
        let supported = [
            "nbd://",
            "nbd+unix://",
            "nbds://",
            "nbds+unix://",
            "file://",
        ];
        if !supported.iter().any(|s| uri.starts_with(s)) {
            return Err(self.error(
                raw.uri.span(),
                format!("{table}.uri"),
                format!("{uri:?}: expected nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, their TLS forms nbds:// and nbds+unix://, or file:///PATH"),
            ));
        }
        let name = match &raw.name {
            None => None,
            Some(v) => {
                check_name(v.get_ref())
                    .map_err(|m| self.error(v.span(), format!("{table}.name"), m))?;
                Some(v.get_ref().clone())
            }
        };
        let weight = match &raw.weight {
            None => 0,
            Some(v) => u32::try_from(*v.get_ref()).map_err(|_| {
                self.error(
                    v.span(),
                    format!("{table}.weight"),
                    format!("{} is not in 0..={}", v.get_ref(), u32::MAX),
                )
            })?,
        };
        let bind = match &raw.bind {
            None => None,
            Some(v) => Some(v.get_ref().parse::<IpAddr>().map_err(|_| {
                self.error(
                    v.span(),
                    format!("{table}.bind"),
                    format!("{:?} is not an IP address", v.get_ref()),
                )
            })?),
        };
        if bind.is_some() && !(uri.starts_with("nbd://") || uri.starts_with("nbds://")) {
            let span = raw.bind.as_ref().map(|b| b.span()).unwrap_or(0..0);
            return Err(self.error(
                span,
                format!("{table}.bind"),
                "bind applies to nbd:// and nbds:// (TCP) paths only",
            ));
        }
        // A `nbds://` path takes the TLS keys its `[[lun]]` or `[defaults]` set; a plain one only
        // its own (which are an error there).
        let own = TlsKeys {
            ca: raw.tls_ca.clone(),
            cert: raw.tls_cert.clone(),
            key: raw.tls_key.clone(),
        };
        let keys = if uri.starts_with("nbds") {
            own.or(inherited)
        } else {
            own
        };
        let tls = self.tls_files(&keys, table)?;
        let target = PathTarget::parse_tls(&uri, bind, tls.as_ref())
            .map_err(|e| self.error(raw.uri.span(), format!("{table}.uri"), e.reason))?;
        let interconnect = match &raw.interconnect {
            None => None,
            Some(v) => Some(
                parse_interconnect(v.get_ref())
                    .map_err(|m| self.error(v.span(), format!("{table}.interconnect"), m))?,
            ),
        };
        let wwn = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<Wwn>, ConfigError> {
            match v {
                None => Ok(None),
                Some(v) => v
                    .get_ref()
                    .parse::<Wwn>()
                    .map(Some)
                    .map_err(|e| self.error(v.span(), format!("{table}.{key}"), e.to_string())),
            }
        };
        let id = match &raw.id {
            None => None,
            Some(v) => Some(self.id(v, &format!("{table}.id"))?),
        };
        let fence = match &raw.fence {
            None => None,
            Some(v) => Some(self.fence(v, &format!("{table}.fence"))?),
        };
        Ok(PathTable {
            fence,
            uri,
            target,
            name,
            id,
            primary: raw.primary.unwrap_or(false),
            weight,
            bind,
            interconnect,
            hba_wwnn: wwn(&raw.hba_wwnn, "hba_wwnn")?,
            hba_wwpn: wwn(&raw.hba_wwpn, "hba_wwpn")?,
        })
    }

    /// Ids are 64-bit: a non-negative integer, or a string "0x…" (TOML integers are signed 64-bit).
    fn id(&self, v: &Spanned<toml::Value>, key: &str) -> Result<u64, ConfigError> {
        match v.get_ref() {
            toml::Value::Integer(n) if *n >= 0 => Ok(*n as u64),
            toml::Value::String(s) => {
                lunmpio_vds::parse_id64(s).map_err(|e| self.error(v.span(), key.into(), e.message))
            }
            _ => Err(self.error(
                v.span(),
                key.into(),
                "expected a non-negative integer or a string \"0x…\"",
            )),
        }
    }
}

fn parse_listen(text: &str) -> Result<ListenAddr, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!(
                "{text:?}: a Unix socket needs an absolute path (unix:/run/lunmpio/nbd.sock)"
            ));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    text.parse::<SocketAddr>()
        .map(ListenAddr::Tcp)
        .map_err(|_| format!("{text:?} is not HOST:PORT or unix:/PATH"))
}

fn parse_interconnect(text: &str) -> Result<HwProviderType, String> {
    match text {
        "unknown" => Ok(HwProviderType::Unknown),
        "pci-raid" => Ok(HwProviderType::PciRaid),
        "fibre-channel" | "fc" => Ok(HwProviderType::FibreChannel),
        "iscsi" => Ok(HwProviderType::Iscsi),
        "sas" => Ok(HwProviderType::Sas),
        other => Err(format!(
            "{other:?}: expected unknown, pci-raid, fibre-channel, iscsi or sas (hybrid is never a path's type)"
        )),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!("longer than {NAME_BYTES_MAX} bytes"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "{name:?}: use letters, digits, '-', '_' and '.' only"
        ));
    }
    Ok(())
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map(|nl| offset - nl)
        .unwrap_or(offset + 1);
    (line, column)
}

/// The bare key at an error span, for messages from the TOML parser itself.
fn key_at(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else { return "-".into() };
    let snippet = text.get(span).unwrap_or("").trim();
    let key: String = snippet
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .collect();
    if key.is_empty() { "-".into() } else { key }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[daemon]
nbd_listen      = "127.0.0.1:10809"
control_socket  = "/run/lunmpio/control.sock"
metrics_listen  = "127.0.0.1:9109"
state_dir       = "/var/lib/lunmpio"
shutdown_timeout = "10s"

[defaults]
policy          = "round-robin"
io_timeout      = "5s"
adaptive_timeout = true
check_interval  = "1s"
no_path_retry   = "30s"
failback        = "immediate"

[[lun]]
name = "lun0"
policy = "failover"
[[lun.path]]
uri = "nbd://10.0.1.10/lun0"
name = "ctrlA-port0"
primary = true
[[lun.path]]
uri = "nbd://10.0.2.10/lun0"
bind = "10.0.2.5"
weight = 10
"#;

    fn err(text: &str) -> ConfigError {
        Config::parse(text, "t.toml").expect_err("must be refused")
    }

    #[test]
    fn the_example_of_the_spec_parses() {
        let c = Config::parse(EXAMPLE, "t.toml").unwrap();
        assert_eq!(
            c.daemon.nbd_listen,
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert_eq!(c.daemon.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.luns.len(), 1);
        let lun = &c.luns[0];
        assert_eq!(
            lun.settings.policy,
            LoadBalancePolicy::Failover,
            "per-LUN key wins"
        );
        assert_eq!(
            lun.settings.no_path_retry,
            NoPathRetry::For(Duration::from_secs(30))
        );
        assert_eq!(lun.paths.len(), 2);
        assert!(lun.paths[0].primary);
        assert_eq!(lun.paths[1].weight, 10);
        assert_eq!(lun.paths[1].bind, Some("10.0.2.5".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_line() {
        let e = err("[defaults]\npolicy = \"failover\"\nio_timeut = \"5s\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.to_string().contains("io_timeut"), "{e}");
        let e = err("[[lun]]\nname = \"a\"\ncolour = 1\n[[lun.path]]\nuri = \"nbd://x/y\"\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_the_line() {
        let e = err("[defaults]\n\npolicy = \"fastest\"\n");
        assert_eq!((e.line, e.key.as_str()), (3, "defaults.policy"), "{e}");
        let e = err("[defaults]\nno_path_retry = \"sometimes\"\n");
        assert_eq!(
            (e.line, e.key.as_str()),
            (2, "defaults.no_path_retry"),
            "{e}"
        );
        let e = err("[daemon]\nnbd_listen = \"nowhere\"\n");
        assert_eq!(e.key, "daemon.nbd_listen");
        let e = err("[daemon]\ndata_threads = -1\n");
        assert_eq!((e.line, e.key.as_str()), (2, "daemon.data_threads"), "{e}");
        let e = err("[daemon]\ndata_threads = 257\n");
        assert!(e.to_string().contains("0..=256"), "{e}");
        let ok = Config::parse("[daemon]\ndata_threads = 4\n", "t.toml").unwrap();
        assert_eq!(ok.daemon.data_threads, 4);
        let e = err("[daemon]\ndata_poll_us = -5\n");
        assert_eq!((e.line, e.key.as_str()), (2, "daemon.data_poll_us"), "{e}");
        let e = err("[daemon]\ndata_poll_us = 10001\n");
        assert!(e.to_string().contains("0..=10000"), "{e}");
        let ok = Config::parse("[daemon]\ndata_poll_us = 50\n", "t.toml").unwrap();
        assert_eq!(ok.daemon.data_poll, Some(Duration::from_micros(50)));
        let ok = Config::parse("[daemon]\ndata_poll_us = 0\n", "t.toml").unwrap();
        assert_eq!(ok.daemon.data_poll, None, "0 is no polling");
        let e = err("[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://x/y\"\nweight = -1\n");
        assert_eq!(
            (e.line, e.key.as_str()),
            (5, "lun[0].path[0].weight"),
            "{e}"
        );
        let e = err("[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"http://x/y\"\n");
        assert_eq!(e.key, "lun[0].path[0].uri");
        let e = err(
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"file:///dev/sdb\"\nbind = \"10.0.0.1\"\n",
        );
        assert_eq!(e.key, "lun[0].path[0].bind");
        let e = err("[[lun]]\nname = \"a\"\nsize = \"lots\"\n[[lun.path]]\nuri = \"nbd://x/y\"\n");
        assert_eq!((e.line, e.key.as_str()), (3, "lun[0].size"), "{e}");
    }

    #[test]
    fn duplicates_are_refused() {
        let e = err(
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://x/y\"\n[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://x/z\"\n",
        );
        assert_eq!((e.line, e.key.as_str()), (6, "lun[1].name"), "{e}");
        let e = err(
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://x/y\"\nname = \"p\"\n[[lun.path]]\nuri = \"nbd://x/z\"\nname = \"p\"\n",
        );
        assert_eq!((e.line, e.key.as_str()), (8, "lun[0].path[1].name"), "{e}");
        let e = err(
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://x/y\"\n[[lun.path]]\nuri = \"nbd://x/y\"\n",
        );
        assert_eq!(e.key, "lun[0].path[1].uri");
    }

    #[test]
    fn a_lun_needs_a_path() {
        let e = err("[[lun]]\nname = \"a\"\n");
        assert_eq!(e.key, "lun[0].path");
    }

    #[test]
    fn ids_accept_hex_strings_and_integers() {
        let c = Config::parse(
            "[[lun]]\nname = \"a\"\nid = \"0x00000000000000ff\"\n[[lun.path]]\nuri = \"nbd://x/y\"\nid = 7\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.luns[0].id, Some(255));
        assert_eq!(c.luns[0].paths[0].id, Some(7));
        let e = err("[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://x/y\"\nid = -7\n");
        assert_eq!(e.key, "lun[0].path[0].id");
    }

    #[test]
    fn defaults_apply_and_metrics_can_be_turned_off() {
        let c = Config::parse(
            "[daemon]\nmetrics_listen = \"\"\nnbd_listen = \"unix:/run/x.sock\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.daemon.metrics_listen, None);
        assert_eq!(c.daemon.nbd_listen, ListenAddr::Unix("/run/x.sock".into()));
        assert!(c.luns.is_empty());
        let s = LunSettings::default();
        assert_eq!(s.policy, LoadBalancePolicy::RoundRobin);
        assert_eq!(s.failback, Failback::Immediate);
    }

    #[test]
    fn specs_get_stable_ids_and_readable_names() {
        let c = Config::parse(EXAMPLE, "t.toml").unwrap();
        let spec = c.luns[0].to_spec();
        assert_eq!(spec.source_id, stable_id("lun0"));
        assert_eq!(spec.paths[0].name, "ctrlA-port0");
        assert_eq!(spec.paths[1].name, "10.0.2.10");
        assert_eq!(spec.paths[1].id, stable_id("nbd://10.0.2.10/lun0"));
        assert_eq!(
            default_path_name("nbd+unix:///lun0?socket=/run/ctrl-a.sock", 0),
            "ctrl-a.sock"
        );
        assert_eq!(default_path_name("file:///dev/sdb", 0), "sdb");
    }

    #[test]
    fn derived_path_names_stay_within_the_name_limit() {
        let long = "d".repeat(300);
        let text = format!(
            "[[lun]]\nname = \"l\"\n[[lun.path]]\nuri = \"file:///x/{long}\"\n[[lun.path]]\nuri = \"file:///y/{long}\"\n"
        );
        let spec = Config::parse(&text, "t.toml").unwrap().luns[0].to_spec();
        let names: Vec<&str> = spec.paths.iter().map(|p| p.name.as_str()).collect();
        assert!(names.iter().all(|n| n.len() <= NAME_BYTES_MAX), "{names:?}");
        assert_ne!(names[0], names[1], "equal derived names are told apart");
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            "",
            "[",
            "[[lun]]",
            "lun = 3",
            "[daemon]\nnbd_listen = 5",
            "\u{0}\u{1}",
            "[[lun]]\nname=\"\"\n",
        ] {
            let _ = Config::parse(text, "t");
        }
    }
}
