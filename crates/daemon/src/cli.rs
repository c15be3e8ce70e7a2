//! Command-line interface: every subcommand and flag, with help text meant to teach.
//!
//! Values are parsed here (sizes, durations, fault commands) so a typo is reported by clap with the
//! flag's name before anything starts.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::manage::{HbaPortAction, ManageOptions, PathAction, PolicyAction};
pub use crate::serve::ServeArgs;
use crate::target::fault::Fault;
use crate::units;

const ABOUT: &str = "User-space multipath I/O for block storage";

// One line per paragraph: clap wraps to the terminal width itself.
const LONG_ABOUT: &str = "lunmpio joins several paths to one LUN (NBD connections through different controller ports, or local devices) into one logical LUN, spreads I/O over them by a load-balance policy, hides path failures from the application, and is managed through an interface with the semantics of the Windows VDS IVdsLunMpio.\n\nOne binary: the multipath daemon (`lunmpio serve`), the management commands that wrap every call of its control socket, the built-in simulated storage array with live fault injection per controller port (`lunmpio target`), and a self-contained showcase (`lunmpio demo`).";

const AFTER_HELP: &str = "\
Examples:
  # Run the self-contained showcase (no configuration, no external programs):
  lunmpio demo

  # Run the daemon, then look at it:
  lunmpio serve --config /etc/lunmpio/lunmpio.toml
  lunmpio topology
  lunmpio policy set lun0 least-queue-depth

  # Serve a 1 GiB sparse RAM disk over 4 controller ports on free TCP ports:
  lunmpio target --memory 1GiB --ports 4 --listen 127.0.0.1:0 --control /tmp/array.sock

  # Make controller port 1 slow, then look at every port's counters:
  lunmpio target fault --control /tmp/array.sock --port 1 delay=200ms
  lunmpio target status --control /tmp/array.sock

Logs go to stderr; set RUST_LOG (for example RUST_LOG=debug) to change the level.";

#[derive(Debug, Parser)]
#[command(
    name = "lunmpio",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// Log format on stderr: `text` for people, `json` for machines.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the built-in simulated storage array: one LUN served over N NBD controller ports, with
    /// live fault injection per port.
    #[command(after_help = TARGET_AFTER_HELP)]
    Target(TargetCommand),

    /// Run the self-contained showcase against an in-process simulated array.
    #[command(after_help = DEMO_AFTER_HELP)]
    Demo(DemoArgs),

    /// Run the multipath daemon in the foreground; SIGTERM/SIGINT drain in-flight I/O and stop it.
    #[command(after_help = SERVE_AFTER_HELP)]
    Serve(ServeArgs),

    /// List the LUNs of the running daemon (ListLuns).
    Luns(ManageOptions),

    /// A tree of LUNs and their paths with status, role and load, like `multipath -ll`.
    Topology(ManageOptions),

    /// The paths of a LUN with their VDS type and status (GetPathInfo).
    Paths(LunArgs),

    /// Get or set a LUN's load-balance policy (GetLoadBalancePolicy / SetLoadBalancePolicy).
    Policy(PolicyCommand),

    /// The load-balance policies a LUN supports (GetSupportedLbPolicies).
    Policies(LunArgs),

    /// Administratively fail, stand by or reinstate one path (SetPathStatus). PATH is a name or an id.
    Path(PathCommand),

    /// Set the status of every path through one initiator port (SetAllPathStatusesFromHbaPort).
    HbaPort(HbaPortCommand),

    /// Per-path I/O counters, latency and in-flight requests of a LUN (GetStatistics).
    Stats(LunArgs),

    /// Path status changes with their causes, oldest first (GetEvents).
    Events(EventsArgs),

    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

const SERVE_AFTER_HELP: &str = "\
The configuration is TOML (docs/OPERATIONS.md lists every key; packaging/lunmpio.toml is an example).
A bad configuration stops start-up with a message naming the key and the line. Each [[lun]] is exported
over NBD under its name; the control socket (mode 0600) takes the management commands below; metrics
are served at http://METRICS_LISTEN/metrics.

Examples:
  lunmpio serve --config /etc/lunmpio/lunmpio.toml
  lunmpio topology --socket /run/lunmpio/control.sock
  lunmpio policy set lun0 failover --primary ctrlA-port0
  lunmpio path fail lun0 ctrlB-port1";

#[derive(Debug, Args)]
pub struct LunArgs {
    /// The LUN's name.
    pub lun: String,
    #[command(flatten)]
    pub options: ManageOptions,
}

#[derive(Debug, Args)]
pub struct PolicyCommand {
    #[command(subcommand)]
    pub action: PolicyAction,
    #[command(flatten)]
    pub options: ManageOptions,
}

#[derive(Debug, Args)]
pub struct PathCommand {
    #[command(subcommand)]
    pub action: PathAction,
    #[command(flatten)]
    pub options: ManageOptions,
}

#[derive(Debug, Args)]
pub struct HbaPortCommand {
    #[command(subcommand)]
    pub action: HbaPortAction,
    #[command(flatten)]
    pub options: ManageOptions,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only this LUN's events.
    #[arg(long)]
    pub lun: Option<String>,
    /// Only events after this sequence number.
    #[arg(long, default_value_t = 0)]
    pub since: u64,
    /// Keep printing new events as they happen.
    #[arg(long, short)]
    pub follow: bool,
    #[command(flatten)]
    pub options: ManageOptions,
}

const TARGET_AFTER_HELP: &str = "\
Every port is a controller port with its own NBD server and one export (flags FLUSH, FUA, TRIM,
WRITE_ZEROES, CACHE and CAN_MULTI_CONN; block sizes 1 / 4096 / 32 MiB). Ports are PORT..PORT+N-1, or N
free ports when PORT is 0. Once every port accepts connections, one `nbd://HOST:PORT/NAME` URI per port
is printed on stdout in port order; ports are numbered from 0 in that order. SIGTERM or SIGINT shuts
down gracefully.

Faults (`lunmpio target fault --port I CMD`):
  down              reset open connections (TCP RST) and refuse new ones
  up                clear down and hang
  hang              answer nothing on open or new connections until up/clear
  delay=DURATION    add latency to every request (200ms, 1s; 0 removes it)
  error-rate=P      answer a fraction of requests with NBD_EIO (0.05 or 5%)
  rate=BYTES/s      cap the port's bandwidth (50MiB); rate=off removes the cap
  clear             back to normal

Examples:
  lunmpio target --image lun0.img --size 10GiB --ports 2 --listen 0.0.0.0:10810 --control /run/array.sock
  lunmpio target --memory 256MiB --ports 4 --listen 127.0.0.1:0 --control /tmp/array.sock
  lunmpio target fault --control /tmp/array.sock --port 0 down
  lunmpio target fault --control /tmp/array.sock --port 2 error-rate=5%
  lunmpio target status --control /tmp/array.sock --json";

const DEMO_AFTER_HELP: &str = "\
Runs in this process, over real loopback TCP: a simulated array with N controller ports, the multipath
daemon with one LUN whose paths are those ports, its NBD export, and a verifying random read/write
workload through the export (every block checked). The scenario: round-robin over all paths; port0
crashes; port1 hangs; both come back; port2 turns slow under round-robin, least-queue-depth and
service-time; every port goes down briefly with I/O queued, then comes back.

The live view is redrawn on a terminal, plain lines otherwise. The summary gives I/Os, errors,
mismatches, the longest stall, each failover's detection time and stall, and the share of I/O per path
in each phase. Exit status 1 if a guarantee of docs/GUARANTEES.md was broken (an error while a path
remained, or data that did not read back as written).

Examples:
  lunmpio demo
  lunmpio demo --quick --json | jq .failovers
  lunmpio demo --duration 30s --paths 6 --plot demo.svg";

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    group(ArgGroup::new("backing").required(true).args(["image", "memory"]))
)]
pub struct TargetCommand {
    #[command(subcommand)]
    pub action: Option<TargetAction>,

    #[command(flatten)]
    pub serve: TargetServeArgs,
}

#[derive(Debug, Args)]
pub struct TargetServeArgs {
    /// LUN image: a regular file (or block device) served by every port.
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,

    /// Create the image, or extend it, to this size (256MiB, 10GiB). Never shrinks an image.
    #[arg(long, value_name = "SIZE", conflicts_with = "memory", value_parser = parse_size_arg)]
    pub size: Option<u64>,

    /// Serve a sparse RAM disk of this size instead of a file; memory is used only where written.
    #[arg(long, value_name = "SIZE", value_parser = parse_nonzero_size_arg)]
    pub memory: Option<u64>,

    /// Export name on every port [default: the image file's stem, or `lun0`].
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Number of controller ports.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub ports: u16,

    /// Address of port 0; port I listens on PORT+I. With port 0 the OS picks N free ports.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    pub listen: String,

    /// Unix socket taking fault and status commands (created with mode 0600).
    #[arg(long, value_name = "SOCKET", env = "LUNMPIO_TARGET_CONTROL")]
    pub control: Option<PathBuf>,

    /// Block-size constraints every port advertises, MIN:PREFERRED:MAX in bytes (suffixes allowed:
    /// 4KiB:64MiB:32MiB), for testing how clients cope with odd but legal values. MAX may be
    /// 0xffffffff ("no limit"); requests above 32 MiB are still refused [default: 1:4KiB:32MiB].
    #[arg(long, value_name = "MIN:PREF:MAX", value_parser = parse_block_size_arg)]
    pub block_size: Option<lunmpio_nbd::BlockSize>,
}

/// `MIN:PREFERRED:MAX`, each a size; checked against the protocol's rules.
fn parse_block_size_arg(text: &str) -> Result<lunmpio_nbd::BlockSize, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [min, preferred, max] = parts.as_slice() else {
        return Err(format!("expected MIN:PREFERRED:MAX, got {text:?}"));
    };
    let size = |v: &str| -> Result<u32, String> {
        let bytes = if let Some(hex) = v.strip_prefix("0x") {
            u64::from_str_radix(hex, 16).map_err(|e| format!("{v:?}: {e}"))?
        } else {
            crate::units::parse_size(v)?
        };
        u32::try_from(bytes).map_err(|_| format!("{v:?} is above 4 GiB - 1"))
    };
    let block_size = lunmpio_nbd::BlockSize {
        min: size(min)?,
        preferred: size(preferred)?,
        max_payload: size(max)?,
    };
    block_size.validate()?;
    Ok(block_size)
}

#[derive(Debug, Subcommand)]
pub enum TargetAction {
    /// Inject or clear a fault on one controller port of a running target.
    Fault(TargetFaultArgs),
    /// Show every port's fault state and counters.
    Status(TargetStatusArgs),
    /// Fence one controller port: discard every request it holds (including those stuck behind `hang`,
    /// `delay` or `rate`), reset its connections, and never execute them. The port's fault state is
    /// otherwise unchanged. Exits 0 once nothing the port received before can still execute — the
    /// contract of lunmpio's `fence` setting, so this command can be configured as one.
    #[command(
        after_help = "Example, as the fence of the paths of a LUN in lunmpio's config:\n\n  [[lun.path]]\n  uri = \"nbd://127.0.0.1:10810/lun0\"\n  fence = [\"lunmpio\", \"target\", \"fence\", \"--control\", \"/run/array.sock\", \"--port\", \"0\"]"
    )]
    Fence(TargetFenceArgs),
}

#[derive(Debug, Args)]
pub struct TargetFenceArgs {
    /// The target's control socket.
    #[arg(long, value_name = "SOCKET", env = "LUNMPIO_TARGET_CONTROL")]
    pub control: PathBuf,

    /// Controller port, numbered from 0 in the order the target printed its URIs.
    #[arg(long, value_name = "I")]
    pub port: usize,
}

#[derive(Debug, Args)]
pub struct TargetFaultArgs {
    /// The target's control socket.
    #[arg(long, value_name = "SOCKET", env = "LUNMPIO_TARGET_CONTROL")]
    pub control: PathBuf,

    /// Controller port, numbered from 0 in the order the target printed its URIs.
    #[arg(long, value_name = "I")]
    pub port: usize,

    /// down | up | hang | delay=DURATION | error-rate=P | rate=BYTES/s | clear
    #[arg(value_name = "FAULT", value_parser = Fault::parse)]
    pub fault: Fault,
}

#[derive(Debug, Args)]
pub struct TargetStatusArgs {
    /// The target's control socket.
    #[arg(long, value_name = "SOCKET", env = "LUNMPIO_TARGET_CONTROL")]
    pub control: PathBuf,

    /// Print the raw JSON status object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Total length of the scenario; the phases are scaled to it (10s to 1h) [default: 60s, or 6s
    /// with --quick].
    #[arg(long, value_name = "DURATION", value_parser = parse_demo_duration)]
    pub duration: Option<std::time::Duration>,

    /// Number of controller ports of the simulated array, i.e. paths of the LUN (3 to 16).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_demo_paths)]
    pub paths: usize,

    /// Print the summary as one JSON object on stdout (the live view goes to stderr).
    #[arg(long)]
    pub json: bool,

    /// Write per-path throughput over time, with the faults marked, as an SVG image.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// A short run (about 6 s, a smaller region): for smoke tests.
    #[arg(long)]
    pub quick: bool,
}

fn parse_demo_duration(text: &str) -> Result<std::time::Duration, String> {
    let d = units::parse_duration(text)?;
    if d < std::time::Duration::from_secs(3) || d > std::time::Duration::from_secs(3600) {
        return Err(format!(
            "`{text}`: the demo runs between 3s and 1h (the phases are scaled to it)"
        ));
    }
    Ok(d)
}

fn parse_demo_paths(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (3..=16).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{text}`: expected 3 to 16 (the scenario breaks two ports and slows a third)"
        )),
    }
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    units::parse_size(text)
}

fn parse_nonzero_size_arg(text: &str) -> Result<u64, String> {
    match units::parse_size(text)? {
        0 => Err(format!("invalid size `{text}`: must be greater than 0")),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn fault_subcommand_does_not_need_serve_flags() {
        let cli = Cli::try_parse_from([
            "lunmpio",
            "target",
            "fault",
            "--control",
            "/tmp/x",
            "--port",
            "1",
            "delay=5ms",
        ])
        .unwrap();
        let Command::Target(t) = cli.command else {
            panic!("not target")
        };
        assert!(matches!(t.action, Some(TargetAction::Fault(_))));
    }

    #[test]
    fn serve_needs_a_backing() {
        let err = Cli::try_parse_from(["lunmpio", "target", "--ports", "2"]).unwrap_err();
        assert!(err.to_string().contains("--image"), "{err}");
        assert!(
            Cli::try_parse_from(["lunmpio", "target", "--memory", "1M", "--image", "x"]).is_err()
        );
    }
}
