//! The control socket (docs/MANAGEMENT.md): JSON-RPC 2.0, one object per line, on a Unix socket created
//! with mode 0600. Each method maps onto the engine's VDS operations; answers carry VDS values with
//! their names, errors carry HRESULTs.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use lunmpio_engine::{Event, EventLog, Lun, LunStats};
use lunmpio_rpc::{
    Done, EventList, EventRecord, GetEventsParams, HbaPortParam, HbaPortResult, LINE_BYTES_MAX,
    LoadBalancePolicyInfo, LunList, LunParams, LunSummary, PathInfoList, PathStats, RpcError,
    Service, SetHbaPortParams, SetLoadBalancePolicyParams, SetPathStatusParams, Statistics,
    SupportedLbPolicies,
};
use lunmpio_vds::{HbaPortMatch, PathPolicyInput, VdsError, Wwn};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// ControlService connections served at once; more wait in the listen backlog.
const CONNECTIONS_MAX: usize = 64;

pub struct ControlService {
    /// The LUNs running now (a reload changes the set).
    pub luns: Arc<super::reload::LunSet>,
    /// Reload and daemon information.
    pub reconfig: Arc<super::reload::Reconfigurer>,
    pub events: Arc<EventLog>,
    /// The export server (connection counts for the metrics).
    pub server: Arc<lunmpio_nbd::Server<Lun>>,
    pub accept_errors: Arc<super::fds::AcceptErrors>,
}

/// Binds the control socket with mode 0600 (only root — or the daemon's user — may manage paths).
/// A socket left behind by a daemon that died is replaced; one a live daemon answers on is not (two
/// daemons managing the same paths would fight), and neither is a file that is not a socket.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            ));
        }
        Ok(_) if std::os::unix::net::UnixStream::connect(path).is_ok() => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another lunmpio daemon is serving on it (stop it first, or give this one another \
                 control_socket)",
            ));
        }
        Ok(_) => std::fs::remove_file(path)?,
    }
    // Bind with a restrictive umask so the socket is never reachable by others, not even briefly.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves management connections until `stop`.
pub async fn serve(
    listener: UnixListener,
    service: Arc<ControlService>,
    stop: tokio_util::sync::CancellationToken,
) {
    let errors = Arc::clone(&service.accept_errors);
    super::fds::accept_loop(
        listener,
        "control",
        &errors.control,
        CONNECTIONS_MAX,
        stop,
        |stream| {
            let service = Arc::clone(&service);
            async move {
                if let Err(e) = connection(stream, &service).await {
                    tracing::debug!(error = %e, "control connection ended");
                }
            }
        },
    )
    .await;
}

async fn connection(stream: UnixStream, service: &ControlService) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = if line.len() > LINE_BYTES_MAX {
            // Refuse and drop the connection: the rest of that line cannot be told from a new request.
            let e = RpcError::standard(
                lunmpio_rpc::INVALID_REQUEST,
                format!("request line longer than {LINE_BYTES_MAX} bytes"),
            );
            writer
                .write_all(
                    format!("{}\n", lunmpio_rpc::error_response(&Value::Null, &e)).as_bytes(),
                )
                .await?;
            return Ok(());
        } else {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            // An Upgrade call leaves its prepared handover here, for this connection only.
            let (response, prepared) = super::upgrade::PREPARED
                .scope(std::cell::RefCell::new(None), async {
                    let response = answer(text, service).await;
                    let prepared = super::upgrade::PREPARED.with(|p| p.borrow_mut().take());
                    (response, prepared)
                })
                .await;
            if let Some(pending) = prepared {
                // The answer goes first; the handover goes on even if it cannot be written (the
                // exports are held until then).
                let written = write_line(&mut writer, &response).await;
                service.reconfig.run_pending_upgrade(pending).await;
                return written;
            }
            response
        };
        write_line(&mut writer, &response).await?;
    }
}

async fn write_line(
    writer: &mut tokio::net::unix::OwnedWriteHalf,
    line: &str,
) -> std::io::Result<()> {
    writer.write_all(format!("{line}\n").as_bytes()).await?;
    writer.flush().await
}

/// One request line in, one response line out. Never panics on input.
pub async fn answer(line: &str, service: &ControlService) -> String {
    lunmpio_rpc::service::answer(service, line).await
}

/// The management interface over the engine: each call maps onto a LUN's VDS operations.
impl Service for ControlService {
    async fn get_path_info(&self, p: LunParams) -> Result<PathInfoList, RpcError> {
        let paths = self.lun(&p.lun)?.get_path_info();
        Ok(PathInfoList {
            paths: paths.iter().map(lunmpio_rpc::PathInfo::from).collect(),
        })
    }

    async fn get_load_balance_policy(
        &self,
        p: LunParams,
    ) -> Result<LoadBalancePolicyInfo, RpcError> {
        let (policy, paths) = self.lun(&p.lun)?.mpio().get_load_balance_policy();
        Ok(LoadBalancePolicyInfo::new(policy, paths))
    }

    async fn set_load_balance_policy(
        &self,
        p: SetLoadBalancePolicyParams,
    ) -> Result<Done, RpcError> {
        let lun = self.lun(&p.lun)?;
        let policy = p.policy.to_raw()?;
        let paths = p
            .paths
            .iter()
            .map(|x| PathPolicyInput {
                path_id: x.path_id,
                primary: x.primary,
                weight: x.weight,
            })
            .collect();
        lun.set_load_balance_policy(policy, paths).await?;
        Ok(Done {})
    }

    async fn get_supported_lb_policies(
        &self,
        p: LunParams,
    ) -> Result<SupportedLbPolicies, RpcError> {
        let flags = self.lun(&p.lun)?.mpio().get_supported_lb_policies();
        Ok(SupportedLbPolicies::from(flags))
    }

    async fn set_all_path_statuses_from_hba_port(
        &self,
        p: SetHbaPortParams,
    ) -> Result<HbaPortResult, RpcError> {
        let port = hba_port_match(&p.hba_port)?;
        let status = lunmpio_rpc::status_value(p.status)?;
        // Validated, then every LUN reserved, before any LUN is touched: a bad status or a Set
        // call running on any LUN changes nothing anywhere.
        let (hresult, outcomes) =
            lunmpio_engine::set_all_path_statuses_from_hba_port(&self.luns.load(), port, status)
                .await?;
        let sum = |count: fn(&lunmpio_vds::HbaPortOutcome) -> u32| outcomes.iter().map(count).sum();
        Ok(HbaPortResult {
            hresult: hresult.0,
            hresult_name: hresult.name().to_owned(),
            matched: sum(|o| o.matched),
            changed: sum(|o| o.changed),
            skipped: sum(|o| o.skipped),
            incomplete: sum(|o| o.incomplete),
        })
    }

    async fn list_luns(&self) -> Result<LunList, RpcError> {
        let luns = self
            .luns
            .load()
            .iter()
            .map(|lun| {
                let mpio = lun.mpio();
                let policy = mpio.policy();
                LunSummary {
                    name: lun.name().to_owned(),
                    source_id: lun.source_id(),
                    size: lun.geometry().size_bytes,
                    policy: policy as i32,
                    policy_name: policy.vds_name().to_owned(),
                    policy_config_name: policy.config_name().to_owned(),
                    paths: mpio.paths().len(),
                    usable_paths: mpio.usable_path_count(),
                }
            })
            .collect();
        Ok(LunList { luns })
    }

    async fn set_path_status(&self, p: SetPathStatusParams) -> Result<Done, RpcError> {
        let lun = self.lun(&p.lun)?;
        lun.set_path_status(p.path_id, lunmpio_rpc::status_value(p.status)?)
            .await?;
        Ok(Done {})
    }

    async fn get_statistics(&self, p: LunParams) -> Result<Statistics, RpcError> {
        Ok(statistics(&self.lun(&p.lun)?.statistics()))
    }

    async fn get_daemon_info(&self) -> Result<lunmpio_rpc::DaemonInfo, RpcError> {
        Ok(self.reconfig.info())
    }

    async fn reload(&self) -> Result<lunmpio_rpc::ReloadResult, RpcError> {
        let report = self.reconfig.reload().await.map_err(|e| {
            RpcError::from(VdsError::invalid_arg(format!(
                "reload: nothing changed: {e:#}"
            )))
        })?;
        Ok(super::reload::reload_result(report))
    }

    async fn upgrade(&self) -> Result<lunmpio_rpc::UpgradeStarted, RpcError> {
        // The handover itself runs once this answer is written (`connection`).
        self.reconfig.prepare_upgrade().await.map_err(|e| {
            RpcError::from(VdsError::object_status_failed(format!(
                "upgrade: nothing changed: {e:#}"
            )))
        })
    }

    async fn get_events(&self, p: GetEventsParams) -> Result<EventList, RpcError> {
        if let Some(lun) = &p.lun {
            self.lun(lun)?;
        }
        let events = self
            .events
            .since(p.since.unwrap_or(0), p.lun.as_deref())
            .iter()
            .map(event_record)
            .collect();
        Ok(EventList { events })
    }
}

fn hba_port_match(port: &HbaPortParam) -> Result<HbaPortMatch, RpcError> {
    Ok(match port {
        HbaPortParam::Wwn { wwn_node, wwn_port } => HbaPortMatch::Wwn {
            node: parse_wwn(wwn_node, "wwnNode")?,
            port: parse_wwn(wwn_port, "wwnPort")?,
        },
        HbaPortParam::Initiator { initiator } => {
            HbaPortMatch::Initiator(initiator.parse::<IpAddr>().map_err(|_| {
                RpcError::from(VdsError::invalid_arg(format!(
                    "initiator {initiator:?} is not an IP address"
                )))
            })?)
        }
    })
}

impl ControlService {
    fn lun(&self, name: &str) -> Result<Lun, RpcError> {
        let luns = self.luns.load();
        luns.iter()
            .find(|l| l.name() == name)
            .cloned()
            .ok_or_else(|| {
                let names: Vec<&str> = luns.iter().map(|l| l.name()).collect();
                RpcError::from(VdsError::object_not_found(format!(
                    "no LUN named {name:?} (LUNs: {})",
                    names.join(", ")
                )))
            })
    }
}

fn parse_wwn(text: &str, what: &str) -> Result<Wwn, RpcError> {
    text.parse::<Wwn>()
        .map_err(|e| RpcError::from(VdsError::invalid_arg(format!("{what}: {e}"))))
}

/// The engine's counters as GetStatistics' result.
pub fn statistics(s: &LunStats) -> Statistics {
    let paths = s
        .paths
        .iter()
        .map(|p| PathStats {
            path_id: p.path_id,
            name: p.name.clone(),
            status: p.status as i32,
            status_name: p.status.vds_name().to_owned(),
            reads: p.reads,
            writes: p.writes,
            ios: p.ios,
            bytes_read: p.bytes_read,
            bytes_written: p.bytes_written,
            errors: p.errors,
            in_flight: p.in_flight,
            in_flight_bytes: p.in_flight_bytes,
            latency_p50_us: p.latency_p50_us,
            latency_p99_us: p.latency_p99_us,
            failovers: p.failovers,
            timeout_ms: p.timeout_ms,
        })
        .collect();
    Statistics {
        paths,
        queued_ios: s.queued_ios,
        queued_bytes: s.queued_bytes,
        in_doubt_writes: s.in_doubt_writes,
        in_doubt_writes_total: s.in_doubt_writes_total,
        in_doubt_answered_total: s.in_doubt_answered_total,
        in_doubt_fenced_total: s.in_doubt_fenced_total,
        in_doubt_expired_total: s.in_doubt_expired_total,
        fences_ok_total: s.fences_ok_total,
        fences_failed_total: s.fences_failed_total,
    }
}

/// An engine event as GetEvents has it.
pub fn event_record(e: &Event) -> EventRecord {
    EventRecord::new(
        e.seq,
        humantime::format_rfc3339_millis(e.time).to_string(),
        e.lun.clone(),
        (e.path_id, e.path_name.clone()),
        (e.from, e.to),
        e.cause.clone(),
    )
}
