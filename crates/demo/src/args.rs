//! `lunmpio demo`'s flags.

use std::path::PathBuf;

use clap::Args;

pub const AFTER_HELP: &str = "\
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
    let d = lunmpio_human::parse_duration(text)?;
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
