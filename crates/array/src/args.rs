//! The simulated array's command line: `lunmpio target` (serve) and its `fault`, `status` and
//! `fence` clients. The one binary flattens these into its grammar.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Subcommand};

use crate::fault::Fault;

pub const AFTER_HELP: &str = "\
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
            lunmpio_human::parse_size(v)?
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

fn parse_size_arg(text: &str) -> Result<u64, String> {
    lunmpio_human::parse_size(text)
}

fn parse_nonzero_size_arg(text: &str) -> Result<u64, String> {
    match lunmpio_human::parse_size(text)? {
        0 => Err(format!("invalid size `{text}`: must be greater than 0")),
        n => Ok(n),
    }
}
