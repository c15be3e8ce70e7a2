//! `lunmpio demo`: the self-contained showcase (README.md).
//!
//! Everything runs in this process over real loopback TCP: the simulated array (N controller ports,
//! one RAM-backed LUN), the multipath daemon ([`Daemon::start`] with a generated configuration whose
//! paths are the N port URIs), its NBD export, and a verifying random read/write workload driven
//! through the export with lunmpio's own NBD client. The scenario then breaks and repairs ports the
//! way `lunmpio target fault` does, while a live view shows per-path status and throughput and one
//! line per event of the daemon's event log. The summary at the end says whether the guarantees of
//! docs/GUARANTEES.md held; the exit status is non-zero if one did not.

pub mod args;
pub mod plot;
pub mod upgrade;
pub mod view;
pub mod workload;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use lunmpio_engine::{Event, Lun};
use lunmpio_nbd::{Client, ConnectOptions, Endpoint};
use lunmpio_vds::{LoadBalancePolicy, PathStatus};
use serde_json::{Value, json};

use crate::args::DemoArgs;
use lunmpio_array::fault::Fault;
use lunmpio_array::{Array, ArrayConfig, Backing};
use lunmpio_daemon::config::Config;
use lunmpio_daemon::serve::Daemon;
use lunmpio_human::{format_duration, format_size};
use view::{Live, Output};
use workload::Workload;

const LUN_NAME: &str = "lun0";
const LUN_SIZE: u64 = 256 << 20;
/// Added latency on the slow port.
const SLOW_DELAY: Duration = Duration::from_millis(20);
/// How long a repaired path may take to be Online again before the demo says so.
const RETURN_TIMEOUT: Duration = Duration::from_secs(15);
/// Stall bound with a path left, beyond `io_timeout` (docs/BENCHMARKS.md: io_timeout + 50 ms; the demo
/// allows for a loaded machine).
const STALL_SLACK: Duration = Duration::from_millis(1000);
/// Goal for a crash/reset stall (docs/GUARANTEES.md G2); reported, not enforced.
const CRASH_STALL_GOAL: Duration = Duration::from_millis(50);

/// The scenario's sizes, from the flags.
struct Plan {
    total: Duration,
    paths: usize,
    region: u64,
    depth: usize,
    outage: Duration,
    check_interval: &'static str,
    io_timeout: Duration,
}

impl Plan {
    fn new(args: &DemoArgs) -> Plan {
        let total = if args.quick {
            args.duration.unwrap_or(Duration::from_secs(6))
        } else {
            args.duration.unwrap_or(Duration::from_secs(60))
        };
        let outage = total
            .mul_f64(0.04)
            .clamp(Duration::from_millis(500), Duration::from_secs(3));
        Plan {
            total,
            paths: args.paths,
            region: if args.quick { 16 << 20 } else { 64 << 20 },
            depth: if args.quick { 16 } else { 32 },
            outage,
            check_interval: if args.quick { "250ms" } else { "500ms" },
            io_timeout: Duration::from_secs(5),
        }
    }

    fn part(&self, fraction: f64) -> Duration {
        self.total.mul_f64(fraction)
    }
}

/// A fault the scenario injected, to match with the event that detected it.
struct Injected {
    port: usize,
    fault: &'static str,
    phase: usize,
    at_ns: u64,
}

/// One phase of the scenario, with what was measured in it.
struct Phase {
    name: String,
    policy: LoadBalancePolicy,
    start_ns: u64,
    end_ns: u64,
    ios: u64,
    bytes: u64,
    latency_sum_ns: u64,
    path_ios: Vec<u64>,
    path_bytes: Vec<u64>,
}

struct Mark {
    ns: u64,
    ios: u64,
    bytes: u64,
    latency_sum_ns: u64,
    path_ios: Vec<u64>,
    path_bytes: Vec<u64>,
}

/// Removes the demo's scratch directory however the demo ends.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir() -> anyhow::Result<ScratchDir> {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("lunmpio-demo-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    Ok(ScratchDir(dir))
}

/// The configuration the demo's daemon runs with: one LUN, one path per controller port, each fenced
/// through the array's fencing API (`lunmpio target fence`, this very program) when `fence_program`
/// is known.
fn generate_config(
    dir: &std::path::Path,
    uris: &[String],
    plan: &Plan,
    fence_program: Option<&std::path::Path>,
) -> String {
    let mut text = format!(
        "[daemon]\n\
         nbd_listen = \"127.0.0.1:0\"\n\
         control_socket = \"{}\"\n\
         metrics_listen = \"\"\n\
         state_dir = \"{}\"\n\
         \n\
         [defaults]\n\
         policy = \"round-robin\"\n\
         io_timeout = \"{}\"\n\
         check_interval = \"{}\"\n\
         no_path_retry = \"30s\"\n\
         failback = \"immediate\"\n\
         \n\
         [[lun]]\n\
         name = \"{LUN_NAME}\"\n",
        dir.join("control.sock").display(),
        dir.join("state").display(),
        format_duration(plan.io_timeout),
        plan.check_interval,
    );
    for (i, uri) in uris.iter().enumerate() {
        text.push_str(&format!(
            "\n[[lun.path]]\nuri = \"{uri}\"\nname = \"port{i}\"\n"
        ));
        if let Some(program) = fence_program {
            text.push_str(&format!(
                "fence = [{:?}, \"target\", \"fence\", \"--control\", {:?}, \"--port\", \"{i}\"]\n",
                program.display().to_string(),
                dir.join(ARRAY_CONTROL).display().to_string(),
            ));
        }
    }
    text
}

/// The array's control socket in the scratch directory (the fences use it).
const ARRAY_CONTROL: &str = "array.sock";

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(&args);
    // With --json, stdout carries only the summary object; people read stderr.
    let output = if args.json {
        Output::stderr()
    } else {
        Output::stdout()
    };
    let scratch = scratch_dir()?;

    let array = std::sync::Arc::new(
        Array::start(ArrayConfig {
            backing: Backing::Memory { size: LUN_SIZE },
            name: Some(LUN_NAME.into()),
            ports: plan.paths as u16,
            listen: "127.0.0.1:0".into(),
            block_size: None,
        })
        .await?,
    );
    // The array's fencing API, for the paths' `fence`: a hung or crashed port's in-doubt writes are
    // released as soon as the port is fenced, instead of holding their blocks for in_doubt_timeout.
    let control = lunmpio_array::fault_api::ControlServer::start(
        &scratch.0.join(ARRAY_CONTROL),
        std::sync::Arc::clone(&array),
    )?;
    let fence_program = std::env::current_exe().ok();
    let config_text = generate_config(&scratch.0, &array.uris(), &plan, fence_program.as_deref());
    let config = Config::parse(&config_text, "<demo>").map_err(|e| anyhow::anyhow!("{e}"))?;
    let daemon = match Daemon::start(config).await {
        Ok(d) => d,
        Err(e) => {
            array.shutdown(Duration::from_secs(1)).await;
            return Err(e);
        }
    };
    let result = scenario(&args, &plan, &array, &daemon, &output).await;
    daemon.stop().await;
    control.stop();
    array.shutdown(Duration::from_secs(2)).await;
    let mut report = result?;
    // Last: a daemon of its own replaces its program under load (see `upgrade`).
    match upgrade::run(&scratch.0, &output).await {
        Ok(outcome) => {
            if !outcome.held {
                output.line("  result: FAIL: the live upgrade did not hold");
            }
            report.held &= outcome.held;
            report.json["liveUpgrade"] = outcome.json;
        }
        Err(e) => {
            output.line(&format!("live upgrade: could not run: {e:#}"));
            report.held = false;
            report.json["liveUpgrade"] = json!({ "held": false, "error": format!("{e:#}") });
        }
    }
    drop(scratch);

    if let Some(file) = &args.plot {
        std::fs::write(file, &report.svg)
            .with_context(|| format!("writing the plot to {}", file.display()))?;
        output.line(&format!("plot written to {}", file.display()));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json)?);
    }
    Ok(if report.held {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Report {
    json: Value,
    svg: String,
    held: bool,
}

async fn scenario(
    args: &DemoArgs,
    plan: &Plan,
    array: &Array,
    daemon: &Daemon,
    output: &Output,
) -> anyhow::Result<Report> {
    let lun = daemon
        .luns()
        .first()
        .cloned()
        .context("the daemon started no LUN")?;
    let nbd = daemon
        .nbd_address()
        .context("the export has no TCP address")?;
    let epoch = Instant::now();
    let epoch_system = SystemTime::now();

    output.line(&format!(
        "lunmpio demo: a multipath LUN over {} controller ports of a simulated array, a verifying workload \
         through its NBD export, and faults. About {} in all.",
        plan.paths,
        format_duration(plan.total)
    ));
    output.line(&format!(
        "  array: {} RAM disk `{LUN_NAME}` on ports {}",
        format_size(array.size()),
        array
            .addrs()
            .iter()
            .map(|a| a.port().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    output.line(&format!(
        "  daemon: LUN `{LUN_NAME}` over paths port0..port{} (nbd://127.0.0.1:PORT/{LUN_NAME}), export at nbd://{nbd}/{LUN_NAME}, \
         io_timeout {}, check_interval {}, failback immediate, no_path_retry 30s",
        plan.paths - 1,
        format_duration(plan.io_timeout),
        plan.check_interval
    ));

    let mut options = ConnectOptions::new(
        Endpoint::Tcp {
            host: nbd.ip().to_string(),
            port: nbd.port(),
            bind: None,
        },
        LUN_NAME,
    );
    options.connect_timeout = Duration::from_secs(5);
    let client = Client::connect(options)
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to the export nbd://{nbd}/{LUN_NAME}: {e}"))?;
    let workload = Workload::new(client.clone(), plan.region, epoch, 0x6c75_6e6d_7069_6f21);
    output.line(&format!(
        "  workload: random 4-64 KiB reads (60%) and writes (40%) over {} with {} in flight, every block checked \
         (CRC32C + generation)\n",
        format_size(workload.region_bytes()),
        plan.depth
    ));

    let path_names: Vec<String> = by_name(&lun.statistics().paths)
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let tty = output.is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb");
    let live = Live::new(
        lun.clone(),
        Arc::clone(&workload),
        output.clone(),
        tty,
        epoch,
        plain_interval(plan.total),
    );
    let events_task = live.follow_events(daemon.events().subscribe(), epoch_system);
    let ticker = live.start_ticker();
    let workers = workload.start(plan.depth);

    let mut runner = Runner {
        lun: &lun,
        array,
        live: &live,
        workload: &workload,
        phases: Vec::new(),
        injected: Vec::new(),
        current: None,
    };
    let outcome = runner.walk(plan).await;

    workload.stop();
    for w in workers {
        let _ = w.await;
    }
    let phases = std::mem::take(&mut runner.phases);
    let injected = std::mem::take(&mut runner.injected);
    live.say("» final check: reading the whole region back and comparing every block".into());
    let (checked, final_mismatches) = workload.verify_all().await;
    live.say(format!(
        "  {checked} blocks read back, {final_mismatches} mismatch(es)"
    ));
    live.stop_ticker(ticker).await;
    events_task.abort();
    client.disconnect().await;
    outcome?;

    let events = live.events();
    let report = report(
        args,
        plan,
        &path_names,
        &workload,
        &phases,
        &injected,
        &events,
        &live,
        epoch_system,
        checked,
    );
    output.block(&report.0);
    Ok(Report {
        json: report.1,
        svg: report.2,
        held: report.3,
    })
}

fn plain_interval(total: Duration) -> Duration {
    (total / 30).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

struct Runner<'a> {
    lun: &'a Lun,
    array: &'a Array,
    live: &'a Live,
    workload: &'a Arc<Workload>,
    phases: Vec<Phase>,
    injected: Vec<Injected>,
    current: Option<(String, LoadBalancePolicy, Mark)>,
}

impl Runner<'_> {
    async fn walk(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let n = plan.paths;
        let all: Vec<usize> = (0..n).collect();

        self.begin("all paths, round-robin");
        tokio::time::sleep(plan.part(0.10)).await;

        self.begin("port0 crashed (down)");
        self.live.marker("port0 down", true);
        self.fault(0, Fault::Down, "down")?;
        tokio::time::sleep(plan.part(0.10)).await;

        self.begin("port1 hung too (hang)");
        self.live.marker("port1 hang", true);
        self.fault(1, Fault::Hang, "hang")?;
        tokio::time::sleep(plan.part(0.10)).await;

        self.begin("port0 and port1 up");
        self.live.marker("port0+1 up", false);
        self.fault(0, Fault::Up, "up")?;
        // The hung port was fenced when lunmpio failed it (the array's fencing API discarded what it
        // held), so it resumes with nothing stale to land. Without a fence, lunmpio would keep newer
        // writes to those blocks waiting until the port answered its old copies (engine `in_doubt`).
        self.fault(1, Fault::Up, "up")?;
        let wait = self.wait_online(&all).await;
        tokio::time::sleep(plan.part(0.10).saturating_sub(wait)).await;

        self.begin(&format!(
            "port2 slow (delay={}), round-robin",
            format_duration(SLOW_DELAY)
        ));
        self.live.marker("port2 slow", true);
        self.fault(2, Fault::Delay(SLOW_DELAY), "delay")?;
        tokio::time::sleep(plan.part(0.12)).await;

        self.live.marker("least-queue-depth", false);
        self.policy(LoadBalancePolicy::DynLeastQueueDepth).await?;
        self.begin("port2 slow, least-queue-depth");
        tokio::time::sleep(plan.part(0.12)).await;

        self.live.marker("service-time", false);
        self.policy(LoadBalancePolicy::VendorSpecific).await?;
        self.begin("port2 slow, service-time");
        tokio::time::sleep(plan.part(0.12)).await;

        self.fault(2, Fault::Clear, "clear")?;
        self.policy(LoadBalancePolicy::RoundRobin).await?;
        self.begin(&format!(
            "all ports down for {}",
            format_duration(plan.outage)
        ));
        self.live.marker("all down", true);
        for p in 0..n {
            self.fault(p, Fault::Down, "all-down")?;
        }
        tokio::time::sleep(plan.outage).await;
        self.live.marker("all up", false);
        for p in 0..n {
            self.fault(p, Fault::Up, "up")?;
        }
        let wait = self.wait_online(&all).await;

        self.begin("all paths back, round-robin");
        tokio::time::sleep(plan.part(0.10).saturating_sub(wait / 2)).await;
        self.end();
        Ok(())
    }

    fn mark(&self) -> Mark {
        let c = &self.workload.counters;
        let stats = self.lun.statistics();
        Mark {
            ns: self.workload.now_ns(),
            ios: c.ios(),
            bytes: c.bytes.load(std::sync::atomic::Ordering::Relaxed),
            latency_sum_ns: c.latency_sum_ns.load(std::sync::atomic::Ordering::Relaxed),
            path_ios: by_name(&stats.paths)
                .iter()
                .map(|p| p.reads + p.writes)
                .collect(),
            path_bytes: by_name(&stats.paths)
                .iter()
                .map(|p| p.bytes_read + p.bytes_written)
                .collect(),
        }
    }

    fn begin(&mut self, name: &str) {
        self.end();
        let policy = self.lun.mpio().policy();
        self.live.set_phase(self.phases.len() + 1, name);
        self.live.say(format!(
            "── phase {}: {name} ({})",
            self.phases.len() + 1,
            policy.config_name()
        ));
        self.current = Some((name.to_string(), policy, self.mark()));
    }

    fn end(&mut self) {
        let Some((name, policy, start)) = self.current.take() else {
            return;
        };
        let end = self.mark();
        self.phases.push(Phase {
            name,
            policy,
            start_ns: start.ns,
            end_ns: end.ns,
            ios: end.ios - start.ios,
            bytes: end.bytes - start.bytes,
            latency_sum_ns: end.latency_sum_ns - start.latency_sum_ns,
            path_ios: diff(&end.path_ios, &start.path_ios),
            path_bytes: diff(&end.path_bytes, &start.path_bytes),
        });
    }

    fn fault(&mut self, port: usize, fault: Fault, kind: &'static str) -> anyhow::Result<()> {
        let at_ns = self.workload.now_ns();
        self.array
            .apply_fault(port, fault)
            .map_err(anyhow::Error::msg)?;
        self.live
            .say(format!("» fault injected: port{port} {fault}"));
        if matches!(kind, "down" | "hang" | "all-down") {
            self.injected.push(Injected {
                port,
                fault: kind,
                phase: self.phases.len() + usize::from(self.current.is_some()),
                at_ns,
            });
        }
        Ok(())
    }

    async fn policy(&mut self, policy: LoadBalancePolicy) -> anyhow::Result<()> {
        self.lun
            .set_load_balance_policy(policy as i32, Vec::new())
            .await
            .map_err(|e| anyhow::anyhow!("SetLoadBalancePolicy({}): {e}", policy.config_name()))?;
        self.live.say(format!(
            "» SetLoadBalancePolicy {} ({})",
            policy.config_name(),
            policy.vds_name()
        ));
        Ok(())
    }

    /// Waits (bounded) until every path in `ports` is Online; returns how long that took.
    async fn wait_online(&self, ports: &[usize]) -> Duration {
        let t = Instant::now();
        while t.elapsed() < RETURN_TIMEOUT {
            let stats = self.lun.statistics();
            if ports.iter().all(|&p| {
                stats
                    .paths
                    .iter()
                    .find(|s| s.name == format!("port{p}"))
                    .is_some_and(|s| s.status == PathStatus::Online)
            }) {
                return t.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.live.say(format!(
            "  (not every path is Online after {}; going on)",
            format_duration(RETURN_TIMEOUT)
        ));
        t.elapsed()
    }
}

/// Paths in name order (`port0`, `port1`, … `port10`), as people count them; the engine keeps them
/// in path-id order.
pub(crate) fn by_name(paths: &[lunmpio_engine::PathStats]) -> Vec<&lunmpio_engine::PathStats> {
    let mut v: Vec<_> = paths.iter().collect();
    v.sort_by_key(|p| {
        let digits: String = p.name.chars().filter(char::is_ascii_digit).collect();
        (digits.parse::<u64>().unwrap_or(u64::MAX), p.name.clone())
    });
    v
}

fn diff(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter()
        .zip(b.iter().chain(std::iter::repeat(&0)))
        .map(|(x, y)| x.saturating_sub(*y))
        .collect()
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 10.0).round() / 10.0
}

fn event_ns(e: &Event, epoch_system: SystemTime) -> u64 {
    e.time
        .duration_since(epoch_system)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The longest a request waited among those in flight at `from` or started in `[from, to]`.
fn stall_ns(slow: &[workload::SlowIo], from: u64, to: u64) -> u64 {
    slow.iter()
        .filter(|s| s.end_ns >= from && s.start_ns <= to)
        .map(|s| s.end_ns - s.start_ns)
        .max()
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &DemoArgs,
    plan: &Plan,
    path_names: &[String],
    workload: &Workload,
    phases: &[Phase],
    injected: &[Injected],
    events: &[Event],
    live: &Live,
    epoch_system: SystemTime,
    blocks_checked: u64,
) -> (String, Value, String, bool) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &workload.counters;
    let slow = workload.slow_ios();
    let errors = c.errors.load(Relaxed);
    let mismatches = c.mismatches.load(Relaxed);
    let max_stall = c.max_latency_ns.load(Relaxed);

    // Failovers: each single-port fault matched with the event that failed the path.
    let mut failovers = Vec::new();
    let mut checks: Vec<(String, bool, String)> = Vec::new();
    for inj in injected.iter().filter(|i| i.fault != "all-down") {
        let name = format!("port{}", inj.port);
        let detected = events.iter().find(|e| {
            e.path_name.as_deref() == Some(name.as_str())
                && e.to == Some(PathStatus::Failed)
                && event_ns(e, epoch_system) + 1_000_000 >= inj.at_ns
        });
        let detect_ns = detected.map(|e| event_ns(e, epoch_system).saturating_sub(inj.at_ns));
        let window_end = inj.at_ns + detect_ns.unwrap_or(0) + 1_000_000;
        let stall = stall_ns(&slow, inj.at_ns, window_end);
        let cause = detected.map(|e| e.cause.clone()).unwrap_or_default();
        failovers.push(json!({
            "path": name,
            "fault": inj.fault,
            "phase": inj.phase,
            "cause": cause,
            "detectMs": detect_ns.map(ms),
            "stallMs": ms(stall),
        }));
        checks.push((
            format!("{name} {} detected and failed (G2, G3)", inj.fault),
            detected.is_some(),
            match detect_ns {
                Some(d) => format!(
                    "Failed {} after the fault: {cause}",
                    format_duration(Duration::from_nanos(d))
                ),
                None => "no Failed event for this path".into(),
            },
        ));
        let bound = if inj.fault == "hang" {
            plan.io_timeout + STALL_SLACK
        } else {
            plan.io_timeout
        };
        checks.push((
            format!("{name} {} stall bounded (G3)", inj.fault),
            Duration::from_nanos(stall) <= bound,
            format!(
                "longest wait {} (bound {})",
                format_duration(Duration::from_nanos(stall)),
                format_duration(bound)
            ),
        ));
    }
    // All paths down: queued, then completed.
    let outage = injected
        .iter()
        .filter(|i| i.fault == "all-down")
        .map(|i| i.at_ns)
        .min();
    let outage_phase = phases
        .iter()
        .position(|p| p.name.starts_with("all ports down"));
    let all_down = outage.map(|from| {
        let to = outage_phase
            .and_then(|i| phases.get(i))
            .map_or(from, |p| p.end_ns);
        let stall = stall_ns(&slow, from, to);
        json!({
            "outageMs": ms(plan.outage.as_nanos() as u64),
            "queuedIosMax": live.max_queued(),
            "stallMs": ms(stall),
        })
    });
    let down_window = outage.map(|from| {
        let to = outage_phase
            .and_then(|i| phases.get(i))
            .map_or(from, |p| p.end_ns);
        (from, to)
    });
    let stall_with_path = slow
        .iter()
        .filter(|s| down_window.is_none_or(|(a, b)| s.end_ns < a || s.start_ns > b))
        .map(|s| s.end_ns - s.start_ns)
        .max()
        .unwrap_or(0);

    checks.insert(
        0,
        (
            "no error reached the application (G1, G4, G6)".into(),
            errors == 0,
            format!("{errors} error(s)"),
        ),
    );
    checks.insert(
        1,
        (
            "data read back is the data last written (G1)".into(),
            mismatches == 0,
            format!("{mismatches} mismatch(es); final pass checked {blocks_checked} blocks"),
        ),
    );
    let held = checks.iter().all(|(_, ok, _)| *ok);

    // Per-phase shares.
    let phase_json: Vec<Value> = phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let secs = (p.end_ns - p.start_ns) as f64 / 1e9;
            let total: u64 = p.path_ios.iter().sum();
            let shares: serde_json::Map<String, Value> = path_names
                .iter()
                .zip(&p.path_ios)
                .map(|(n, v)| {
                    let share = if total == 0 { 0.0 } else { *v as f64 / total as f64 };
                    (n.clone(), json!((share * 1000.0).round() / 1000.0))
                })
                .collect();
            json!({
                "phase": i + 1,
                "name": p.name,
                "policy": p.policy.config_name(),
                "durationMs": ms(p.end_ns - p.start_ns),
                "ios": p.ios,
                "bytes": p.bytes,
                "iops": if secs > 0.0 { (p.ios as f64 / secs).round() } else { 0.0 },
                "mibPerSec": if secs > 0.0 { ((p.bytes as f64 / secs / 1048576.0) * 10.0).round() / 10.0 } else { 0.0 },
                "meanLatencyMs": p.latency_sum_ns.checked_div(p.ios).map_or(0.0, ms),
                "shares": shares,
                "pathBytes": path_names.iter().cloned().zip(p.path_bytes.iter().map(|b| json!(b))).collect::<serde_json::Map<String, Value>>(),
            })
        })
        .collect();

    let event_json: Vec<Value> = events
        .iter()
        .map(|e| {
            json!({
                "tMs": ms(event_ns(e, epoch_system)),
                "path": e.path_name,
                "from": e.from.map(|s| s.vds_name()),
                "to": e.to.map(|s| s.vds_name()),
                "cause": e.cause,
            })
        })
        .collect();

    let json = json!({
        "ios": c.ios(),
        "reads": c.reads.load(Relaxed),
        "writes": c.writes.load(Relaxed),
        "flushes": c.flushes.load(Relaxed),
        "bytes": c.bytes.load(Relaxed),
        "errors": errors,
        "mismatches": mismatches,
        "blocksVerifiedAtEnd": blocks_checked,
        "maxStallMs": ms(max_stall),
        "maxStallWithPathLeftMs": ms(stall_with_path),
        "failovers": failovers,
        "allPathsDown": all_down,
        "phases": phase_json,
        "events": event_json,
        "checks": checks.iter().map(|(n, ok, d)| json!({"name": n, "held": ok, "detail": d})).collect::<Vec<_>>(),
        "guaranteesHeld": held,
        "errorSamples": *workload.error_samples.lock().unwrap_or_else(|p| p.into_inner()),
        "mismatchSamples": *workload.mismatch_samples.lock().unwrap_or_else(|p| p.into_inner()),
        "paths": path_names,
        "durationMs": ms(workload.now_ns()),
        "quick": args.quick,
    });

    let text = view::summary_text(&json, path_names, CRASH_STALL_GOAL);
    let svg = plot::render(
        &format!(
            "lunmpio demo: per-path throughput, {} paths, {} in flight",
            path_names.len(),
            plan.depth
        ),
        path_names,
        &live.samples(),
        &live.markers(),
        &phases
            .iter()
            .map(|p| plot::Span {
                start: p.start_ns as f64 / 1e9,
                end: p.end_ns as f64 / 1e9,
                label: p.name.clone(),
            })
            .collect::<Vec<_>>(),
    );
    (text, json, svg, held)
}
