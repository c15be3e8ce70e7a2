//! The management commands (PRODUCT.md §9): one per JSON-RPC method of the control socket, with tables
//! for people and `--json` for programs. A path may be named by its name or its id. Errors print the
//! VDS name and the HRESULT and exit non-zero.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use lunmpio_rpc::client::{Client, ClientError};
use lunmpio_rpc::method;
use lunmpio_vds::{PathId, parse_id64};
use serde_json::{Value, json};

use crate::table::render_table;
use crate::units::format_size;

/// Where the daemon listens, and how to print.
#[derive(Debug, Clone, Args)]
pub struct ManageOptions {
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

pub fn luns(o: &ManageOptions) -> anyhow::Result<ExitCode> {
    let r = call(o, method::LIST_LUNS, json!({}))?;
    show(o, &r, || {
        let mut rows = vec![row(&[
            "LUN",
            "SOURCE ID",
            "SIZE",
            "POLICY",
            "PATHS",
            "USABLE",
        ])];
        for l in arr(&r["luns"]) {
            rows.push(vec![
                s(&l["name"]),
                s(&l["sourceId"]),
                l["size"].as_u64().map(format_size).unwrap_or_default(),
                format!("{} ({})", s(&l["policyConfigName"]), s(&l["policyName"])),
                s(&l["paths"]),
                s(&l["usablePaths"]),
            ]);
        }
        render_table(&rows)
    })
}

/// A `multipath -ll`-like tree: each LUN, its policy, and each path with status, role and load.
pub fn topology(o: &ManageOptions) -> anyhow::Result<ExitCode> {
    let mut client = connect(o)?;
    let luns = client
        .call(method::LIST_LUNS, json!({}))
        .map_err(rpc_error)?;
    let mut all = Vec::new();
    for l in arr(&luns["luns"]) {
        let name = s(&l["name"]);
        let info = client
            .call(method::GET_PATH_INFO, json!({ "lun": name }))
            .map_err(rpc_error)?;
        let policy = client
            .call(method::GET_LOAD_BALANCE_POLICY, json!({ "lun": name }))
            .map_err(rpc_error)?;
        let stats = client
            .call(method::GET_STATISTICS, json!({ "lun": name }))
            .map_err(rpc_error)?;
        all.push(json!({ "lun": l, "paths": info["paths"], "policy": policy, "stats": stats }));
    }
    let all = Value::Array(all);
    show(o, &all, || {
        let mut out = String::new();
        for entry in arr(&all) {
            let l = &entry["lun"];
            out.push_str(&format!(
                "{} (source {}) size={} policy={} ({}) paths={} usable={}\n",
                s(&l["name"]),
                s(&l["sourceId"]),
                l["size"].as_u64().map(format_size).unwrap_or_default(),
                s(&l["policyConfigName"]),
                s(&l["policyName"]),
                s(&l["paths"]),
                s(&l["usablePaths"]),
            ));
            let paths = arr(&entry["paths"]);
            let policies = arr(&entry["policy"]["paths"]);
            let stats = arr(&entry["stats"]["paths"]);
            let mut rows = Vec::new();
            for (i, p) in paths.iter().enumerate() {
                let branch = if i + 1 == paths.len() { "`-" } else { "|-" };
                let pol = policies.get(i).cloned().unwrap_or(Value::Null);
                let st = stats.get(i).cloned().unwrap_or(Value::Null);
                let role = if pol["primary"] == json!(true) {
                    "primary"
                } else {
                    "-"
                };
                rows.push(vec![
                    format!("{branch} {}", s(&p["name"])),
                    s(&p["uri"]),
                    status_word(&p["statusName"]),
                    role.to_string(),
                    format!("w={}", s(&pol["weight"])),
                    format!("ios={}", s(&st["ios"])),
                    format!("inflight={}", s(&st["inFlight"])),
                    format!("p99={}us", s(&st["latencyP99Us"])),
                    s(&p["statusReason"]),
                ]);
            }
            out.push_str(&render_table(&rows));
        }
        out
    })
}

pub fn paths(o: &ManageOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let r = call(o, method::GET_PATH_INFO, json!({ "lun": lun }))?;
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
        for p in arr(&r["paths"]) {
            rows.push(vec![
                s(&p["name"]),
                s(&p["pathId"]["pathId"]),
                format!("{} ({})", s(&p["typeName"]), s(&p["type"])),
                format!("{} ({})", s(&p["statusName"]), s(&p["status"])),
                s(&p["transport"]),
                s(&p["uri"]),
                s(&p["statusReason"]),
            ]);
        }
        render_table(&rows)
    })
}

pub fn policy(o: &ManageOptions, action: PolicyAction) -> anyhow::Result<ExitCode> {
    match action {
        PolicyAction::Get { lun } => {
            let mut client = connect(o)?;
            let r = client
                .call(method::GET_LOAD_BALANCE_POLICY, json!({ "lun": lun }))
                .map_err(rpc_error)?;
            let info = client
                .call(method::GET_PATH_INFO, json!({ "lun": lun }))
                .map_err(rpc_error)?;
            show(o, &r, || {
                let mut out = format!("policy {} ({})\n", s(&r["policyName"]), s(&r["policy"]));
                let mut rows = vec![row(&["PATH", "PATH ID", "PRIMARY", "WEIGHT"])];
                for (i, p) in arr(&r["paths"]).iter().enumerate() {
                    let name = arr(&info["paths"])
                        .get(i)
                        .map(|x| s(&x["name"]))
                        .unwrap_or_default();
                    rows.push(vec![
                        name,
                        s(&p["pathId"]["pathId"]),
                        s(&p["primary"]),
                        s(&p["weight"]),
                    ]);
                }
                out.push_str(&render_table(&rows));
                out
            })
        }
        PolicyAction::Set(args) => {
            let mut client = connect(o)?;
            let info = client
                .call(method::GET_PATH_INFO, json!({ "lun": args.lun }))
                .map_err(rpc_error)?;
            let mut updates = Vec::new();
            for p in &args.primary {
                updates.push((resolve(&info, p)?, Some(true), None));
            }
            for p in &args.not_primary {
                updates.push((resolve(&info, p)?, Some(false), None));
            }
            for w in &args.weight {
                let (p, n) = w
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--weight {w:?}: expected PATH=N"))?;
                let n: u32 = n.parse().map_err(|_| {
                    anyhow::anyhow!("--weight {w:?}: {n:?} is not a number 0..=4294967295")
                })?;
                updates.push((resolve(&info, p)?, None, Some(n)));
            }
            // One entry per path, merging its --primary/--not-primary and --weight options.
            let mut entries: Vec<(PathId, Option<bool>, Option<u32>)> = Vec::new();
            for (id, primary, weight) in updates {
                let i = match entries.iter().position(|e| e.0 == id) {
                    Some(i) => i,
                    None => {
                        entries.push((id, None, None));
                        entries.len() - 1
                    }
                };
                entries[i].1 = primary.or(entries[i].1);
                entries[i].2 = weight.or(entries[i].2);
            }
            let paths: Vec<Value> = entries
                .iter()
                .map(|(id, primary, weight)| {
                    let mut v = json!({ "pathId": id });
                    if let Some(p) = primary {
                        v["primary"] = json!(p);
                    }
                    if let Some(w) = weight {
                        v["weight"] = json!(w);
                    }
                    v
                })
                .collect();
            let policy: Value = args
                .policy
                .parse::<i64>()
                .map(Value::from)
                .unwrap_or_else(|_| json!(args.policy));
            let r = client
                .call(
                    method::SET_LOAD_BALANCE_POLICY,
                    json!({ "lun": args.lun, "policy": policy, "paths": paths }),
                )
                .map_err(rpc_error)?;
            show(o, &r, || {
                format!("{}: policy set to {}\n", args.lun, args.policy)
            })
        }
    }
}

pub fn policies(o: &ManageOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let r = call(o, method::GET_SUPPORTED_LB_POLICIES, json!({ "lun": lun }))?;
    show(o, &r, || {
        let mut out = format!("supported: 0x{:02x}\n", r["flags"].as_u64().unwrap_or(0));
        let mut rows = vec![row(&["VALUE", "VDS NAME", "NAME"])];
        for p in arr(&r["policies"]) {
            rows.push(vec![s(&p["policy"]), s(&p["policyName"]), s(&p["name"])]);
        }
        out.push_str(&render_table(&rows));
        out
    })
}

pub fn path(o: &ManageOptions, action: PathAction) -> anyhow::Result<ExitCode> {
    let (lun, path, status, verb) = match action {
        PathAction::Fail { lun, path } => (lun, path, 5, "failed"),
        PathAction::Standby { lun, path } => (lun, path, 7, "standby"),
        PathAction::Reinstate { lun, path } => (lun, path, 1, "reinstated"),
    };
    let mut client = connect(o)?;
    let info = client
        .call(method::GET_PATH_INFO, json!({ "lun": lun }))
        .map_err(rpc_error)?;
    let id = resolve(&info, &path)?;
    let r = client
        .call(
            method::SET_PATH_STATUS,
            json!({ "lun": lun, "pathId": id, "status": status }),
        )
        .map_err(rpc_error)?;
    show(o, &r, || format!("{lun}: path {path} {verb}\n"))
}

pub fn hba_port(o: &ManageOptions, action: HbaPortAction) -> anyhow::Result<ExitCode> {
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
        (Some(n), Some(p), _) => json!({ "wwnNode": n, "wwnPort": p }),
        (_, _, Some(ip)) => json!({ "initiator": ip }),
        _ => anyhow::bail!("give --wwnn and --wwpn, or --initiator"),
    };
    let r = call(
        o,
        method::SET_ALL_PATH_STATUSES_FROM_HBA_PORT,
        json!({ "hbaPort": port, "status": status }),
    )?;
    show(o, &r, || {
        format!(
            "{} ({}): {} path(s) matched, {} changed, {} skipped because the change would break a LUN's policy, {} set but still not in that status (kept on standby by the policy, or their connection is down)\n",
            s(&r["hresultName"]),
            r["hresult"]
                .as_i64()
                .map(|h| format!("0x{:08X}", h as u32))
                .unwrap_or_default(),
            s(&r["matched"]),
            s(&r["changed"]),
            s(&r["skipped"]),
            s(&r["incomplete"]),
        )
    })
}

pub fn stats(o: &ManageOptions, lun: &str) -> anyhow::Result<ExitCode> {
    let r = call(o, method::GET_STATISTICS, json!({ "lun": lun }))?;
    show(o, &r, || {
        let mut out = format!(
            "queued: {} I/Os, {}   in doubt: {} writes ({} since start: {} answered, {} fenced, {} expired)\n",
            s(&r["queuedIos"]),
            r["queuedBytes"]
                .as_u64()
                .map(format_size)
                .unwrap_or_default(),
            s(&r["inDoubtWrites"]),
            s(&r["inDoubtWritesTotal"]),
            s(&r["inDoubtAnsweredTotal"]),
            s(&r["inDoubtFencedTotal"]),
            s(&r["inDoubtExpiredTotal"]),
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
        for p in arr(&r["paths"]) {
            rows.push(vec![
                s(&p["name"]),
                status_word(&p["statusName"]),
                s(&p["reads"]),
                s(&p["writes"]),
                s(&p["ios"]),
                p["bytesRead"].as_u64().map(format_size).unwrap_or_default(),
                p["bytesWritten"]
                    .as_u64()
                    .map(format_size)
                    .unwrap_or_default(),
                s(&p["errors"]),
                s(&p["inFlight"]),
                s(&p["latencyP50Us"]),
                s(&p["latencyP99Us"]),
                s(&p["failovers"]),
                s(&p["timeoutMs"]),
            ]);
        }
        out.push_str(&render_table(&rows));
        out
    })
}

pub fn events(
    o: &ManageOptions,
    lun: Option<String>,
    since: u64,
    follow: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(o)?;
    let mut since = since;
    loop {
        let mut params = json!({ "since": since });
        if let Some(l) = &lun {
            params["lun"] = json!(l);
        }
        let r = client.call(method::GET_EVENTS, params).map_err(rpc_error)?;
        for e in arr(&r["events"]) {
            since = since.max(e["seq"].as_u64().unwrap_or(0));
            if o.json {
                println!("{e}");
            } else {
                let change = match (e["fromName"].as_str(), e["toName"].as_str()) {
                    (Some(from), Some(to)) => format!("{} -> {}", short(from), short(to)),
                    _ => String::new(),
                };
                let path = e["path"]
                    .as_str()
                    .map(|p| format!(" path {p}"))
                    .unwrap_or_default();
                println!(
                    "{:>5} {} {}{} {} {}",
                    s(&e["seq"]),
                    s(&e["time"]),
                    s(&e["lun"]),
                    path,
                    change,
                    s(&e["cause"])
                );
            }
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn connect(o: &ManageOptions) -> anyhow::Result<Client> {
    Client::connect(&o.socket).map_err(rpc_error)
}

fn call(o: &ManageOptions, method: &str, params: Value) -> anyhow::Result<Value> {
    connect(o)?.call(method, params).map_err(rpc_error)
}

/// A daemon error names the VDS constant and the HRESULT: "no LUN named "x" (VDS_E_OBJECT_NOT_FOUND 0x80042405)".
fn rpc_error(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn show(
    o: &ManageOptions,
    value: &Value,
    table: impl FnOnce() -> String,
) -> anyhow::Result<ExitCode> {
    if o.json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", table());
    }
    Ok(ExitCode::SUCCESS)
}

/// A path named by its name, or by its id (`0x…` or decimal).
fn resolve(info: &Value, name_or_id: &str) -> anyhow::Result<PathId> {
    let paths = arr(&info["paths"]);
    let parse = |p: &Value| -> Option<PathId> { serde_json::from_value(p["pathId"].clone()).ok() };
    if let Some(p) = paths
        .iter()
        .find(|p| p["name"].as_str() == Some(name_or_id))
    {
        return parse(p).ok_or_else(|| anyhow::anyhow!("bad path id in the daemon's answer"));
    }
    if let Ok(id) = parse_id64(name_or_id)
        && let Some(found) = paths.iter().filter_map(parse).find(|p| p.path_id == id)
    {
        return Ok(found);
    }
    let names: Vec<String> = paths.iter().map(|p| s(&p["name"])).collect();
    anyhow::bail!(
        "no path {name_or_id:?} on this LUN (paths: {}) (VDS_E_OBJECT_NOT_FOUND 0x80042405)",
        names.join(", ")
    )
}

fn arr(v: &Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

fn status_word(v: &Value) -> String {
    short(v.as_str().unwrap_or("?")).to_string()
}

/// `VDS_MPS_ONLINE` → `ONLINE`.
fn short(name: &str) -> &str {
    name.strip_prefix("VDS_MPS_").unwrap_or(name)
}
