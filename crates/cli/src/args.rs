//! Command-line interface: every subcommand and flag, with help text meant to teach.
//!
//! Values are parsed here (sizes, durations, fault commands) so a typo is reported by clap with the
//! flag's name before anything starts.

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::rpc_commands::{HbaPortAction, PathAction, PolicyAction, SocketOptions};
pub use lunmpio_array::args::{TargetAction, TargetCommand};
pub use lunmpio_daemon::serve::ServeArgs;
pub use lunmpio_demo::args::DemoArgs;

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
    #[command(after_help = lunmpio_array::args::AFTER_HELP)]
    Target(TargetCommand),

    /// Run the self-contained showcase against an in-process simulated array.
    #[command(after_help = lunmpio_demo::args::AFTER_HELP)]
    Demo(DemoArgs),

    /// Run the multipath daemon in the foreground; SIGTERM/SIGINT drain in-flight I/O and stop it.
    #[command(after_help = SERVE_AFTER_HELP)]
    Serve(ServeArgs),

    /// List the LUNs of the running daemon (ListLuns).
    Luns(SocketOptions),

    /// A tree of LUNs and their paths with status, role and load, like `multipath -ll`.
    Topology(SocketOptions),

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

    /// Re-read the daemon's config file and apply the difference without pausing anything
    /// unchanged (Reload; SIGHUP does the same).
    #[command(after_help = RELOAD_AFTER_HELP)]
    Reload(SocketOptions),

    /// The running daemon: version, PID, program, start time, reloads and upgrades (GetDaemonInfo).
    Daemon(SocketOptions),

    /// Replace the running daemon's program with the file it was started from, without closing a
    /// client connection (Upgrade); waits until the new program serves.
    #[command(after_help = UPGRADE_AFTER_HELP)]
    Upgrade(SocketOptions),

    /// A live full-screen console: LUNs, paths with status, rates, latency and trends, the last
    /// events; keys change the policy and fail, stand by or reinstate a path.
    #[command(after_help = TOP_AFTER_HELP)]
    Top(TopArgs),

    /// Check a config, and the daemon running it when it answers, for mistakes that bite later:
    /// contradicting timeouts, missing fencing, single points of failure, unencrypted networks,
    /// file-descriptor limits. Prints a fix for each finding.
    #[command(after_help = DOCTOR_AFTER_HELP)]
    Doctor(DoctorArgs),

    /// What a program answers before it takes over a daemon (used by `upgrade`).
    #[command(hide = true)]
    UpgradeCheck,

    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `lunmpio top`'s options.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// The daemon's control socket.
    #[arg(
        long,
        env = "LUNMPIO_SOCKET",
        default_value = "/run/lunmpio/control.sock",
        value_name = "PATH"
    )]
    pub socket: std::path::PathBuf,
    /// How often to refresh, 100ms … 60s.
    #[arg(long, default_value = "1s", value_name = "DURATION", value_parser = parse_interval)]
    pub interval: std::time::Duration,
    /// The LUN to show first (else the first one).
    #[arg(long, value_name = "NAME")]
    pub lun: Option<String>,
}

fn parse_interval(text: &str) -> Result<std::time::Duration, String> {
    let d = lunmpio_human::parse_duration(text)?;
    let (min, max) = (
        lunmpio_console::app::INTERVAL_MIN,
        lunmpio_console::app::INTERVAL_MAX,
    );
    if d < min || d > max {
        return Err(format!("{text} is not between {min:?} and {max:?}"));
    }
    Ok(d)
}

const TOP_AFTER_HELP: &str = "\
Screen (80x24 at least; it grows with the window):
  title      the daemon's version and PID, the refresh period
  LUN tabs   every LUN; the selected one is highlighted
  summary    size, policy, usable/total paths, queued I/O, in-doubt writes
  paths      status, IOPS, MiB/s, p99 latency, requests in flight (QD), an IOPS sparkline, reason
  events     the newest status changes and LUN events with their causes

Keys:
  left/right, Tab   switch LUN            up/down, j/k   select a path
  p                 change the policy (a list of the LUN's supported policies, then y/n)
  f / s / r         fail / stand by / reinstate the selected path (y/n first)
  q, Esc, Ctrl-C    quit
Each change shows the daemon's VDS result (S_OK, or the error's name and HRESULT). The console exits
with the reason when the daemon goes away.

Examples:
  lunmpio top
  lunmpio top --socket /tmp/tour/control.sock --interval 500ms --lun db-data
";

/// `lunmpio doctor`'s options.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The config file to check.
    #[arg(long, value_name = "FILE", default_value = "/etc/lunmpio/lunmpio.toml")]
    pub config: std::path::PathBuf,
    /// The running daemon's control socket (default: the config's control_socket).
    #[arg(long, env = "LUNMPIO_SOCKET", value_name = "PATH")]
    pub socket: Option<std::path::PathBuf>,
    /// The NBD clients' own request timeout (kernel nbd-client -timeout, a VM's I/O timeout), to
    /// check against io_timeout and no_path_retry: 30s, 2m.
    #[arg(long, value_name = "DURATION", value_parser = lunmpio_human::parse_duration)]
    pub client_timeout: Option<std::time::Duration>,
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

const DOCTOR_AFTER_HELP: &str = "\
Each finding has a severity, what it is about, a stable code, the problem and the fix:
  error     does not work: the config does not parse, a LUN has no usable path, the clients give
            up before lunmpio can re-drive a request
  warning   works today, fails (or loses a guarantee) in a case the config invites: no fence with
            a finite in_doubt_timeout, every path through one port, plain NBD across a network,
            too few file descriptors, a failed path
  info      worth knowing: the client settings to use, a check that needs the running daemon
The config is checked on its own; when the daemon answers on its control socket, its live state is
checked too (failed paths, targets without CAN_MULTI_CONN, its own open-file limit).

Exit status: 0 nothing to fix, 1 warnings, 2 errors.

Examples:
  lunmpio doctor --config /etc/lunmpio/lunmpio.toml
  lunmpio doctor --client-timeout 30s        # the clients are kernel nbd-client -timeout 30
  lunmpio doctor --json | jq '.findings[] | select(.severity != \"info\")'
";

const RELOAD_AFTER_HELP: &str = "\
What a reload does:
  a LUN added        starts, and its export appears
  a LUN removed      its clients' requests in flight finish, new ones get ESHUTDOWN, the connections
                     close, then the LUN stops (in-doubt writes are journaled)
  a LUN changed      (paths added or removed, settings) restarts under its export: in-flight requests
                     finish, new ones wait, then run on the new LUN (a pause, never an error)
  unchanged LUNs     are not touched
  [daemon] keys      are listed as not applied: `lunmpio upgrade` applies them, except the
                     listeners (nbd_listen, control_socket, metrics_listen): those need a restart
Settings made through management calls (policy, administrative path states) keep winning over the
file, as at start. A config that does not parse or validate changes nothing: the command fails with
the same key-and-line message as at start. Every change is an event (`lunmpio events --lun LUN`).

Examples:
  lunmpio reload
  systemctl reload lunmpio        # sends SIGHUP (ExecReload= in packaging/lunmpio.service)
";

const UPGRADE_AFTER_HELP: &str = "\
What happens:
  1. check     the program file (the path the daemon was started from) must answer
               `upgrade-check` with handover version 1; otherwise nothing changes
  2. quiesce   every export is held at a request boundary: requests in flight finish, new ones
               wait (if they do not finish within 2 x io_timeout, at most 15 s, nothing changes)
  3. hand over listeners, client connections (with their negotiated state and unread requests),
               counters, hold-downs and the event log go to the new program; in-doubt writes are
               journaled in state_dir
  4. exec      same PID; the new program reconnects the paths, then resumes every connection
A new program that cannot take over hands back to the old one, which reports why (exit 1).
Clients see a pause, never an error. The new program reads the config file, as a restart would.

Examples:
  apt-get install ./lunmpio_0.2.0_amd64.deb && lunmpio upgrade
  lunmpio upgrade --json
";

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
    pub options: SocketOptions,
}

#[derive(Debug, Args)]
pub struct PolicyCommand {
    #[command(subcommand)]
    pub action: PolicyAction,
    #[command(flatten)]
    pub options: SocketOptions,
}

#[derive(Debug, Args)]
pub struct PathCommand {
    #[command(subcommand)]
    pub action: PathAction,
    #[command(flatten)]
    pub options: SocketOptions,
}

#[derive(Debug, Args)]
pub struct HbaPortCommand {
    #[command(subcommand)]
    pub action: HbaPortAction,
    #[command(flatten)]
    pub options: SocketOptions,
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
    pub options: SocketOptions,
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
