//! The management commands (docs/OPERATIONS.md, command line): one per JSON-RPC method of the control socket, with tables
//! for people and `--json` for programs. A path may be named by its name or its id. Errors print the
//! VDS name and the HRESULT and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use lunmpio_rpc::client::{Client, ClientError};
use lunmpio_rpc::{
    HbaPortParam, LoadBalancePolicyInfo, LunSummary, PathInfo, PathInfoList, PathPolicyParam,
    PolicyValue, SetLoadBalancePolicyParams, Statistics,
};
use lunmpio_vds::{PathId, parse_id64};
use serde::Serialize;

use lunmpio_human::{format_size, render_table};

/// Where the daemon listens, and how to print.
#[derive(Debug, Clone, Args)]
pub struct SocketOptions {
    /// The daemon's control socket.
    #[arg(
        long,
        global = true,
        env = "LUNMPIO_SOCKET",
        default_value = "/run/lunmpio/control.sock",
        value_name = "PATH"
    )]
    pub socket: PathBuf,
    /// Print the daemon's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PolicyAction {
    /// Show the policy and every path's primary flag and weight (GetLoadBalancePolicy).
    Get { lun: String },
    /// Set the policy (SetLoadBalancePolicy); unlisted paths keep their primary flag and weight.
    Set(PolicySetArgs),
}

#[derive(Debug, Args)]
pub struct PolicySetArgs {
    pub lun: String,
    /// failover, round-robin, round-robin-with-subset, least-queue-depth, weighted-paths,
    /// least-blocks, service-time — or a VDS name or number.
    pub policy: String,
    /// Make PATH a primary path (repeatable).
    #[arg(long, value_name = "PATH")]
    pub primary: Vec<String>,
    /// Make PATH a non-primary path (repeatable).
    #[arg(long, value_name = "PATH")]
    pub not_primary: Vec<String>,
    /// Set PATH's weight, lower = preferred (repeatable): --weight ctrlA-port0=10
    #[arg(long, value_name = "PATH=N")]
    pub weight: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum PathAction {
    /// Take a path out of service (administrative fail, status 5).
    Fail { lun: String, path: String },
    /// Use a path only when nothing else is usable (administrative standby, status 7).
    Standby { lun: String, path: String },
    /// Clear an administrative fail or standby, and any manual failback wait (status 1).
    Reinstate { lun: String, path: String },
}

#[derive(Debug, Subcommand)]
pub enum HbaPortAction {
    /// Fail, stand by or reinstate every path through one initiator port, as when a NIC or HBA is
    /// serviced (SetAllPathStatusesFromHbaPort).
    SetStatus(HbaPortArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("port").required(true).args(["wwnn", "initiator"])))]
pub struct HbaPortArgs {
    /// The HBA port's node WWN (with --wwpn).
    #[arg(long, requires = "wwpn")]
    pub wwnn: Option<String>,
    /// The HBA port's port WWN.
    #[arg(long, requires = "wwnn")]
    pub wwpn: Option<String>,
    /// The initiator address (a path's `bind` address) for network paths.
    #[arg(long)]
    pub initiator: Option<String>,
    /// online (1), failed (5) or standby (7).
    pub status: String,
}

pub fn luns(o: &SocketOptions) -> anyhow::Result<ExitCode> {
    let r = connect(o)?.list_luns().map_err(rpc_error)?;
    show(o, &r, || {
        let mut rows = vec![row(&[
            "LUN",
            "SOURCE ID",
            "SIZE",
            "POLICY",
            "PATHS",
            "USABLE",
        ])];
        for l in &r.luns {
            rows.push(vec![
                l.name.clone(),
                lunmpio_vds::format_id64(l.source_id),
                format_size(l.size),
                format!("{} ({})", l.policy_config_name, l.policy_name),
                l.paths.to_string(),
                l.usable_paths.to_string(),
            ]);
        }
        render_table(&rows)
    })
}

/// `lunmpio reload`: what changed, one line per LUN; exit 1 when a LUN's change failed.
pub fn reload(o: &SocketOptions) -> anyhow::Result<ExitCode> {
    let r = connect(o)?.reload().map_err(|e| match e {
        // Connected, then cut off without an answer: the process was replaced or stopped meanwhile.
        ClientError::Io { .. } => anyhow::anyhow!(
            "{e}: the daemon went away before it answered (an upgrade or a restart?); \
             see `lunmpio daemon`, then reload again"
        ),
        e => rpc_error(e),
    })?;
    let code = if r.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    show(o, &r, || {
        let mut out = String::new();
        for lun in &r.added {
            out += &format!("added      {lun}\n");
        }
        for lun in &r.removed {
            out += &format!("removed    {lun}\n");
        }
        for lun in &r.restarted {
            out += &format!("restarted  {lun}\n");
        }
        for f in &r.failed {
            out += &format!("FAILED     {}: {}\n", f.lun, f.reason);
        }
        out += &format!("unchanged  {} LUN(s)\n", r.unchanged);
        for key in &r.not_applied {
            out +=
                &format!("not applied: {key} (an upgrade applies it; listeners need a restart)\n");
        }
        out
    })?;
    Ok(code)
}

/// How long `lunmpio upgrade` waits for the new program to serve.
const UPGRADE_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// `lunmpio upgrade`: asks for the handover, then waits until the daemon answers again and says
/// which program serves: one more upgrade (success), or the reason the old program came back.
pub fn upgrade(o: &SocketOptions) -> anyhow::Result<ExitCode> {
    let started = std::time::Instant::now();
    let begun = connect(o)?.upgrade().map_err(rpc_error)?;
    if !o.json {
        println!(
            "handing over: {} {} -> {} (pid {}, {} connection(s), quiet after {} ms)",
            begun.program,
            begun.from_version,
            begun.to_version,
            begun.pid,
            begun.connections,
            begun.quiesce_ms
        );
    }
    loop {
        // The control socket is handed over too: a call made during the exec waits in its backlog.
        if let Ok(info) = connect(o).and_then(|mut c| c.get_daemon_info().map_err(rpc_error)) {
            if info.upgrades > begun.upgrades {
                let took_ms = started.elapsed().as_millis();
                if o.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "started": begun, "daemon": info, "tookMs": took_ms
                        }))?
                    );
                } else {
                    println!(
                        "upgraded: pid {} now runs {} (upgrade {}, {} ms)",
                        info.pid, info.version, info.upgrades, took_ms
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            if info.upgrades_failed > begun.upgrades_failed {
                let reason = info.last_upgrade_error.unwrap_or_default();
                anyhow::bail!("upgrade failed, the old program serves again: {reason}");
            }
        }
        anyhow::ensure!(
            started.elapsed() < UPGRADE_WAIT,
            "the daemon did not report the upgrade within {UPGRADE_WAIT:?}; see its log"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `lunmpio daemon`: the running daemon's identity and history.
pub fn daemon(o: &SocketOptions) -> anyhow::Result<ExitCode> {
    let r = connect(o)?.get_daemon_info().map_err(rpc_error)?;
    show(o, &r, || {
        let never = || "never".to_string();
        let rows = vec![
            vec!["version".to_string(), r.version.clone()],
            vec!["pid".to_string(), r.pid.to_string()],
            vec!["program".to_string(), r.program.clone()],
            vec!["config".to_string(), r.config.clone()],
            vec!["started".to_string(), r.started_at.clone()],
            vec!["LUNs".to_string(), r.luns.to_string()],
            vec!["reloads".to_string(), r.reloads.to_string()],
            vec![
                "last reload".to_string(),
                r.last_reload_at.clone().unwrap_or_else(never),
            ],
            vec!["upgrades".to_string(), r.upgrades.to_string()],
            vec![
                "last upgrade".to_string(),
                r.last_upgrade_at.clone().unwrap_or_else(never),
            ],
            vec![
                "last upgrade error".to_string(),
                r.last_upgrade_error
                    .clone()
                    .unwrap_or_else(|| "none".into()),
            ],
        ];
        render_table(&rows)
    })
}

/// One LUN of `topology --json`.
#[derive(Serialize)]
struct TopologyEntry {
    lun: LunSummary,
    paths: Vec<PathInfo>,
    policy: LoadBalancePolicyInfo,
    stats: Statistics,
}

/// A `multipath -ll`-like tree: each LUN, its policy, and each path with status, role and load.
pub fn topology(o: &SocketOptions) -> anyhow::Result<ExitCode> {
    let mut client = connect(o)?;
    let luns = client.list_luns().map_err(rpc_error)?;
    let mut all = Vec::new();
    for lun in luns.luns {
        all.push(TopologyEntry {
            paths: client.get_path_info(&lun.name).map_err(rpc_error)?.paths,
            policy: client
                .get_load_balance_policy(&lun.name)
                .map_err(rpc_error)?,
            stats: client.get_statistics(&lun.name).map_err(rpc_error)?,
            lun,
        });
    }
    show(o, &all, || all.iter().map(topology_text).collect())
}

fn topology_text(entry: &TopologyEntry) -> String {
    let l = &entry.lun;
    let mut out = format!(
        "{} (source {}) size={} policy={} ({}) paths={} usable={}\n",
        l.name,
        lunmpio_vds::format_id64(l.source_id),
        format_size(l.size),
        l.policy_config_name,
        l.policy_name,
        l.paths,
        l.usable_paths,
    );
    let mut rows = Vec::new();
    for (i, p) in entry.paths.iter().enumerate() {
        let branch = if i + 1 == entry.paths.len() {
            "`-"
        } else {
            "|-"
        };
        let policy = entry.policy.paths.get(i);
        let stats = entry.stats.paths.get(i);
        let role = if policy.is_some_and(|x| x.primary) {
            "primary"
        } else {
            "-"
        };
        let stat = |f: fn(&lunmpio_rpc::PathStats) -> u64| stats.map(f).map(|n| n.to_string());
        rows.push(vec![
            format!("{branch} {}", p.name),
            p.uri.clone(),
            short(&p.status_name).to_string(),
            role.to_string(),
            format!("w={}", text(policy.map(|x| x.weight))),
            format!("ios={}", stat(|s| s.ios).unwrap_or_default()),
            format!("inflight={}", stat(|s| s.in_flight).unwrap_or_default()),
            format!("p99={}us", stat(|s| s.latency_p99_us).unwrap_or_default()),
            p.status_reason.clone(),
        ]);
    }
    out.push_str(&render_table(&rows));
    out
}

pub fn paths(o: &SocketOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let r = connect(o)?.get_path_info(lun).map_err(rpc_error)?;
    show(o, &r, || {
        let mut rows = vec![row(&[
            "PATH",
            "PATH ID",
            "TYPE",
            "STATUS",
            "TRANSPORT",
            "URI",
            "REASON",
        ])];
        for p in &r.paths {
            rows.push(vec![
                p.name.clone(),
                lunmpio_vds::format_id64(p.path_id.path_id),
                format!("{} ({})", p.type_name, p.hw_type),
                format!("{} ({})", p.status_name, p.status),
                p.transport.clone(),
                p.uri.clone(),
                p.status_reason.clone(),
            ]);
        }
        render_table(&rows)
    })
}

pub fn policy(o: &SocketOptions, action: PolicyAction) -> anyhow::Result<ExitCode> {
    match action {
        PolicyAction::Get { lun } => policy_get(o, &lun),
        PolicyAction::Set(args) => policy_set(o, args),
    }
}

fn policy_get(o: &SocketOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let mut client = connect(o)?;
    let r = client.get_load_balance_policy(lun).map_err(rpc_error)?;
    let info = client.get_path_info(lun).map_err(rpc_error)?;
    show(o, &r, || {
        let mut out = format!("policy {} ({})\n", r.policy_name, r.policy);
        let mut rows = vec![row(&["PATH", "PATH ID", "PRIMARY", "WEIGHT"])];
        for (i, p) in r.paths.iter().enumerate() {
            let name = info
                .paths
                .get(i)
                .map(|x| x.name.clone())
                .unwrap_or_default();
            rows.push(vec![
                name,
                lunmpio_vds::format_id64(p.path_id.path_id),
                p.primary.to_string(),
                p.weight.to_string(),
            ]);
        }
        out.push_str(&render_table(&rows));
        out
    })
}

fn policy_set(o: &SocketOptions, args: PolicySetArgs) -> anyhow::Result<ExitCode> {
    let mut client = connect(o)?;
    let info = client.get_path_info(&args.lun).map_err(rpc_error)?;
    let paths = path_policy_params(&info, &args)?;
    let policy = match args.policy.parse::<i64>() {
        Ok(number) => PolicyValue::Number(number),
        Err(_) => PolicyValue::Name(args.policy.clone()),
    };
    let r = client
        .set_load_balance_policy(SetLoadBalancePolicyParams {
            lun: args.lun.clone(),
            policy,
            paths,
        })
        .map_err(rpc_error)?;
    show(o, &r, || {
        format!("{}: policy set to {}\n", args.lun, args.policy)
    })
}

/// One entry per path named in `--primary`, `--not-primary` and `--weight`, merging a path's options.
fn path_policy_params(
    info: &PathInfoList,
    args: &PolicySetArgs,
) -> anyhow::Result<Vec<PathPolicyParam>> {
    let mut updates = Vec::new();
    for p in &args.primary {
        updates.push((resolve(info, p)?, Some(true), None));
    }
    for p in &args.not_primary {
        updates.push((resolve(info, p)?, Some(false), None));
    }
    for w in &args.weight {
        let (p, n) = w
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--weight {w:?}: expected PATH=N"))?;
        let n: u32 = n
            .parse()
            .map_err(|_| anyhow::anyhow!("--weight {w:?}: {n:?} is not a number 0..=4294967295"))?;
        updates.push((resolve(info, p)?, None, Some(n)));
    }
    let mut entries: Vec<PathPolicyParam> = Vec::new();
    for (path_id, primary, weight) in updates {
        let i = match entries.iter().position(|e| e.path_id == path_id) {
            Some(i) => i,
            None => {
                entries.push(PathPolicyParam {
                    path_id,
                    primary: None,
                    weight: None,
                });
                entries.len() - 1
            }
        };
        entries[i].primary = primary.or(entries[i].primary);
        entries[i].weight = weight.or(entries[i].weight);
    }
    Ok(entries)
}

pub fn policies(o: &SocketOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let r = connect(o)?
        .get_supported_lb_policies(lun)
        .map_err(rpc_error)?;
    show(o, &r, || {
        let mut out = format!("supported: 0x{:02x}\n", r.flags);
        let mut rows = vec![row(&["VALUE", "VDS NAME", "NAME"])];
        for p in &r.policies {
            rows.push(vec![
                p.policy.to_string(),
                p.policy_name.clone(),
                p.name.clone(),
            ]);
        }
        out.push_str(&render_table(&rows));
        out
    })
}

pub fn path(o: &SocketOptions, action: PathAction) -> anyhow::Result<ExitCode> {
    let (lun, path, status, verb) = match action {
        PathAction::Fail { lun, path } => (lun, path, 5, "failed"),
        PathAction::Standby { lun, path } => (lun, path, 7, "standby"),
        PathAction::Reinstate { lun, path } => (lun, path, 1, "reinstated"),
    };
    let mut client = connect(o)?;
    let info = client.get_path_info(&lun).map_err(rpc_error)?;
    let id = resolve(&info, &path)?;
    let r = client
        .set_path_status(&lun, id, status)
        .map_err(rpc_error)?;
    show(o, &r, || format!("{lun}: path {path} {verb}\n"))
}

pub fn hba_port(o: &SocketOptions, action: HbaPortAction) -> anyhow::Result<ExitCode> {
    let HbaPortAction::SetStatus(args) = action;
    let status: i64 = match args.status.as_str() {
        "online" | "reinstate" => 1,
        "failed" | "fail" => 5,
        "standby" => 7,
        other => other.parse().map_err(|_| {
            anyhow::anyhow!("status {other:?}: expected online, failed, standby or a VDS number")
        })?,
    };
    let port = match (&args.wwnn, &args.wwpn, &args.initiator) {
        (Some(n), Some(p), _) => HbaPortParam::Wwn {
            wwn_node: n.clone(),
            wwn_port: p.clone(),
        },
        (_, _, Some(ip)) => HbaPortParam::Initiator {
            initiator: ip.clone(),
        },
        _ => anyhow::bail!("give --wwnn and --wwpn, or --initiator"),
    };
    let r = connect(o)?
        .set_all_path_statuses_from_hba_port(port, status)
        .map_err(rpc_error)?;
    show(o, &r, || {
        format!(
            "{} (0x{:08X}): {} path(s) matched, {} changed, {} skipped because the change would break a LUN's policy, {} set but still not in that status (kept on standby by the policy, or their connection is down)\n",
            r.hresult_name, r.hresult as u32, r.matched, r.changed, r.skipped, r.incomplete,
        )
    })
}

pub fn stats(o: &SocketOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let r = connect(o)?.get_statistics(lun).map_err(rpc_error)?;
    show(o, &r, || {
        let mut out = format!(
            "queued: {} I/Os, {}   in doubt: {} writes ({} since start: {} answered, {} fenced, {} expired)\n",
            r.queued_ios,
            format_size(r.queued_bytes),
            r.in_doubt_writes,
            r.in_doubt_writes_total,
            r.in_doubt_answered_total,
            r.in_doubt_fenced_total,
            r.in_doubt_expired_total,
        );
        let mut rows = vec![row(&[
            "PATH",
            "STATUS",
            "READS",
            "WRITES",
            "IOS",
            "READ",
            "WRITTEN",
            "ERRORS",
            "INFLIGHT",
            "P50 US",
            "P99 US",
            "FAILOVERS",
            "TIMEOUT MS",
        ])];
        for p in &r.paths {
            rows.push(vec![
                p.name.clone(),
                short(&p.status_name).to_string(),
                p.reads.to_string(),
                p.writes.to_string(),
                p.ios.to_string(),
                format_size(p.bytes_read),
                format_size(p.bytes_written),
                p.errors.to_string(),
                p.in_flight.to_string(),
                p.latency_p50_us.to_string(),
                p.latency_p99_us.to_string(),
                p.failovers.to_string(),
                p.timeout_ms.to_string(),
            ]);
        }
        out.push_str(&render_table(&rows));
        out
    })
}

pub fn events(
    o: &SocketOptions,
    lun: Option<String>,
    since: u64,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(o)?;
    let mut since = since;
    loop {
        let r = client
            .get_events(lun.as_deref(), since)
            .map_err(rpc_error)?;
        for e in &r.events {
            since = since.max(e.seq);
            if o.json {
                println!("{}", serde_json::to_value(e)?);
            } else {
                let change = match (&e.from_name, &e.to_name) {
                    (Some(from), Some(to)) => format!("{} -> {}", short(from), short(to)),
                    _ => String::new(),
                };
                let path = e
                    .path
                    .as_ref()
                    .map(|p| format!(" path {p}"))
                    .unwrap_or_default();
                println!(
                    "{:>5} {} {}{} {} {}",
                    e.seq, e.time, e.lun, path, change, e.cause
                );
            }
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn connect(o: &SocketOptions) -> anyhow::Result<Client> {
    Client::connect(&o.socket).map_err(rpc_error)
}

/// A daemon error names the VDS constant and the HRESULT: "no LUN named "x" (VDS_E_OBJECT_NOT_FOUND 0x80042405)".
fn rpc_error(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// `--json`: the daemon's answer as JSON (members sorted, as on the wire); otherwise the table.
fn show(
    o: &SocketOptions,
    value: &impl Serialize,
    table: impl FnOnce() -> String,
) -> anyhow::Result<ExitCode> {
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(value)?)?
        );
    } else {
        print!("{}", table());
    }
    Ok(ExitCode::SUCCESS)
}

/// A path named by its name, or by its id (`0x…` or decimal).
fn resolve(info: &PathInfoList, name_or_id: &str) -> anyhow::Result<PathId> {
    if let Some(p) = info.paths.iter().find(|p| p.name == name_or_id) {
        return Ok(p.path_id);
    }
    if let Ok(id) = parse_id64(name_or_id)
        && let Some(p) = info.paths.iter().find(|p| p.path_id.path_id == id)
    {
        return Ok(p.path_id);
    }
    let names: Vec<&str> = info.paths.iter().map(|p| p.name.as_str()).collect();
    anyhow::bail!(
        "no path {name_or_id:?} on this LUN (paths: {}) (VDS_E_OBJECT_NOT_FOUND 0x80042405)",
        names.join(", ")
    )
}

fn text(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_default()
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// `VDS_MPS_ONLINE` → `ONLINE`.
fn short(name: &str) -> &str {
    name.strip_prefix("VDS_MPS_").unwrap_or(name)
}
