//! The control socket (PRODUCT.md §8): JSON-RPC 2.0, one object per line, on a Unix socket created
//! with mode 0600. Each method maps onto the engine's VDS operations; answers carry VDS values with
//! their names, errors carry HRESULTs.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use lunmpio_engine::{Event, EventLog, Lun, LunStats};
use lunmpio_rpc::{
    GetEventsParams, HbaPortParam, LINE_BYTES_MAX, LunParams, METHOD_NOT_FOUND, RpcError,
    SetHbaPortParams, SetLoadBalancePolicyParams, SetPathStatusParams, method, params,
};
use lunmpio_vds::{HbaPortMatch, PathPolicyInput, VdsError, Wwn, format_id64};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Management connections served at once; more wait in the listen backlog.
const CONNECTIONS_MAX: usize = 64;

pub struct Management {
    pub luns: Vec<Lun>,
    pub events: Arc<EventLog>,
    /// The export server (connection counts for the metrics).
    pub server: Arc<lunmpio_nbd::Server<super::export::LunBackend>>,
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

pub async fn serve(
    listener: UnixListener,
    management: Arc<Management>,
    stop: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    // Given up to accept a management connection when the process is out of descriptors.
    let spare = Arc::new(super::fds::Spare::new());
    let mut backoff = super::fds::Backoff::new("control");
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.reset();
                // Take a spare again if one is free (not while the freed one is wanted for this accept).
                spare.restore();
                stream
            }
            Err(e) if super::fds::out_of_descriptors(&e) && spare.release() => {
                tracing::warn!(
                    "out of file descriptors: using the spare one to accept a management connection"
                );
                continue;
            }
            Err(e) => {
                backoff.failed(&e, &management.accept_errors.control).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let management = Arc::clone(&management);
        let spare = Arc::clone(&spare);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, &management).await {
                tracing::debug!(error = %e, "control connection ended");
            }
            // Its descriptor was just closed: take it as the spare before an export client does.
            spare.restore();
            drop(permit);
        });
    }
}

async fn connection(stream: UnixStream, management: &Management) -> std::io::Result<()> {
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
            answer(text, management).await
        };
        writer.write_all(format!("{response}\n").as_bytes()).await?;
    }
}

/// One request line in, one response line out. Never panics on input.
pub async fn answer(line: &str, management: &Management) -> String {
    let request = match lunmpio_rpc::parse_request(line) {
        Ok(r) => r,
        Err(response) => return response,
    };
    match dispatch(&request.method, request.params, management).await {
        Ok(result) => lunmpio_rpc::result_response(&request.id, result),
        Err(e) => lunmpio_rpc::error_response(&request.id, &e),
    }
}

async fn dispatch(name: &str, raw: Value, m: &Management) -> Result<Value, RpcError> {
    match name {
        method::GET_PATH_INFO => {
            let p: LunParams = params(name, raw)?;
            let lun = m.lun(&p.lun)?;
            let paths: Vec<Value> = lun.get_path_info().iter().map(|p| p.to_json()).collect();
            Ok(json!({ "paths": paths }))
        }
        method::GET_LOAD_BALANCE_POLICY => {
            let p: LunParams = params(name, raw)?;
            Ok(m.lun(&p.lun)?.mpio().load_balance_policy_json())
        }
        method::GET_SUPPORTED_LB_POLICIES => {
            let p: LunParams = params(name, raw)?;
            Ok(m.lun(&p.lun)?.mpio().supported_lb_policies_json())
        }
        method::SET_LOAD_BALANCE_POLICY => {
            let p: SetLoadBalancePolicyParams = params(name, raw)?;
            let lun = m.lun(&p.lun)?;
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
            Ok(json!({}))
        }
        method::SET_PATH_STATUS => {
            let p: SetPathStatusParams = params(name, raw)?;
            let lun = m.lun(&p.lun)?;
            lun.set_path_status(p.path_id, lunmpio_rpc::status_value(p.status)?)
                .await?;
            Ok(json!({}))
        }
        method::SET_ALL_PATH_STATUSES_FROM_HBA_PORT => {
            let p: SetHbaPortParams = params(name, raw)?;
            let port = match &p.hba_port {
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
            };
            let status = lunmpio_rpc::status_value(p.status)?;
            // Validated, then every LUN reserved, before any LUN is touched: a bad status or a Set
            // call running on any LUN changes nothing anywhere.
            let (hresult, outcomes) =
                lunmpio_engine::set_all_path_statuses_from_hba_port(&m.luns, port, status).await?;
            let matched: u32 = outcomes.iter().map(|o| o.matched).sum();
            let changed: u32 = outcomes.iter().map(|o| o.changed).sum();
            let skipped: u32 = outcomes.iter().map(|o| o.skipped).sum();
            let incomplete: u32 = outcomes.iter().map(|o| o.incomplete).sum();
            Ok(json!({
                "hresult": hresult.0, "hresultName": hresult.name(),
                "matched": matched, "changed": changed, "skipped": skipped,
                "incomplete": incomplete,
            }))
        }
        method::LIST_LUNS => {
            let _: Value = raw;
            let luns: Vec<Value> = m
                .luns
                .iter()
                .map(|lun| {
                    let mpio = lun.mpio();
                    let policy = mpio.policy();
                    json!({
                        "name": lun.name(),
                        "sourceId": format_id64(lun.source_id()),
                        "size": lun.geometry().size_bytes,
                        "policy": policy as i32,
                        "policyName": policy.vds_name(),
                        "policyConfigName": policy.config_name(),
                        "paths": mpio.paths().len(),
                        "usablePaths": mpio.usable_path_count(),
                    })
                })
                .collect();
            Ok(json!({ "luns": luns }))
        }
        method::GET_STATISTICS => {
            let p: LunParams = params(name, raw)?;
            Ok(stats_json(&m.lun(&p.lun)?.statistics()))
        }
        method::GET_EVENTS => {
            let p: GetEventsParams = params(name, raw)?;
            if let Some(lun) = &p.lun {
                m.lun(lun)?;
            }
            let events: Vec<Value> = m
                .events
                .since(p.since.unwrap_or(0), p.lun.as_deref())
                .iter()
                .map(event_json)
                .collect();
            Ok(json!({ "events": events }))
        }
        other => Err(RpcError::standard(
            METHOD_NOT_FOUND,
            format!(
                "unknown method {other:?}; methods: {}",
                method::ALL.join(", ")
            ),
        )),
    }
}

impl Management {
    fn lun(&self, name: &str) -> Result<&Lun, RpcError> {
        self.luns.iter().find(|l| l.name() == name).ok_or_else(|| {
            let names: Vec<&str> = self.luns.iter().map(|l| l.name()).collect();
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

pub fn stats_json(s: &LunStats) -> Value {
    let paths: Vec<Value> = s
        .paths
        .iter()
        .map(|p| {
            json!({
                "pathId": p.path_id,
                "name": p.name,
                "status": p.status as i32,
                "statusName": p.status.vds_name(),
                "reads": p.reads,
                "writes": p.writes,
                "ios": p.ios,
                "bytesRead": p.bytes_read,
                "bytesWritten": p.bytes_written,
                "errors": p.errors,
                "inFlight": p.in_flight,
                "inFlightBytes": p.in_flight_bytes,
                "latencyP50Us": p.latency_p50_us,
                "latencyP99Us": p.latency_p99_us,
                "failovers": p.failovers,
                "timeoutMs": p.timeout_ms,
            })
        })
        .collect();
    json!({
        "paths": paths,
        "queuedIos": s.queued_ios,
        "queuedBytes": s.queued_bytes,
        "inDoubtWrites": s.in_doubt_writes,
        "inDoubtWritesTotal": s.in_doubt_writes_total,
        "inDoubtAnsweredTotal": s.in_doubt_answered_total,
        "inDoubtFencedTotal": s.in_doubt_fenced_total,
        "inDoubtExpiredTotal": s.in_doubt_expired_total,
        "fencesOkTotal": s.fences_ok_total,
        "fencesFailedTotal": s.fences_failed_total,
    })
}

pub fn event_json(e: &Event) -> Value {
    let time = humantime::format_rfc3339_millis(e.time).to_string();
    json!({
        "seq": e.seq,
        "time": time,
        "lun": e.lun,
        "pathId": e.path_id,
        "path": e.path_name,
        "from": e.from.map(|s| s as i32),
        "fromName": e.from.map(|s| s.vds_name()),
        "to": e.to.map(|s| s as i32),
        "toName": e.to.map(|s| s.vds_name()),
        "cause": e.cause,
    })
}
