//! What the engine needs to know to build a multipath LUN: its settings and its paths.
//! The daemon fills these in from the TOML configuration (docs/OPERATIONS.md, configuration).

use std::net::IpAddr;
use std::time::Duration;

use lunmpio_vds::{HwProviderType, LoadBalancePolicy, Wwn};

pub use crate::no_path::NoPathRetry;
use crate::transport::PathTarget;

/// When a repaired path carries I/O again (`failback`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failback {
    /// As soon as it reconnects, proves its identity and answers a probe.
    Immediate,
    /// Only when an administrator reinstates it (`lunmpio path reinstate`).
    Manual,
    /// After it has stayed healthy this long.
    After(Duration),
}

/// Per-LUN behaviour (every `[defaults]` key).
#[derive(Debug, Clone, PartialEq)]
pub struct LunSettings {
    pub policy: LoadBalancePolicy,
    /// Upper bound on one path I/O: older than this, the path is declared hung and fenced.
    pub io_timeout: Duration,
    /// Suspect a path sooner when its own latency says so (floor [`ADAPTIVE_TIMEOUT_FLOOR`]).
    pub adaptive_timeout: bool,
    /// Health probe period per path.
    pub check_interval: Duration,
    pub no_path_retry: NoPathRetry,
    pub failback: Failback,
    /// Bound on bytes queued while no path is left.
    pub no_path_queue_bytes_max: u64,
    /// How long writes to a range wait for an in-doubt copy of an earlier write (one that a failed,
    /// hung or slow path may still execute) to be answered or fenced (`crate::in_doubt`). `None`
    /// (`"never"`): until then, however long. When it passes, the guarantee lapses, visibly.
    pub in_doubt_timeout: Option<Duration>,
    /// Bound on one run of a path's `fence` program.
    pub fence_timeout: Duration,
    /// The LUN's `fence` (program and arguments), for paths that do not set their own.
    pub fence: Option<Vec<String>>,
}

/// The adaptive timeout never goes below this: a path is not suspected for latency within normal
/// scheduling noise.
pub const ADAPTIVE_TIMEOUT_FLOOR: Duration = Duration::from_millis(250);

impl Default for LunSettings {
    fn default() -> Self {
        LunSettings {
            policy: LoadBalancePolicy::RoundRobin,
            io_timeout: Duration::from_secs(5),
            adaptive_timeout: true,
            check_interval: Duration::from_secs(1),
            no_path_retry: NoPathRetry::For(Duration::from_secs(30)),
            failback: Failback::Immediate,
            no_path_queue_bytes_max: 256 << 20,
            in_doubt_timeout: Some(IN_DOUBT_TIMEOUT_DEFAULT),
            fence_timeout: FENCE_TIMEOUT_DEFAULT,
            fence: None,
        }
    }
}

/// Default `in_doubt_timeout`: long enough for a stopped or partitioned target to come back in the
/// common cases, short enough that writes to a few blocks do not wait for minutes without a fence.
pub const IN_DOUBT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default `fence_timeout`.
pub const FENCE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);

/// One path of a LUN, as configured.
#[derive(Debug, Clone)]
pub struct PathSpec {
    /// Stable path id (config `id`, else a hash of the URI).
    pub id: u64,
    pub name: String,
    pub uri: String,
    pub target: PathTarget,
    pub primary: bool,
    pub weight: u32,
    /// Local source address of a TCP path: its initiator port.
    pub bind: Option<IpAddr>,
    /// The VDS interconnect type to report (default: Unknown for NBD).
    pub interconnect: Option<HwProviderType>,
    /// The initiator HBA port of a local path (WWNN, WWPN), where known.
    pub hba_wwns: Option<(Wwn, Wwn)>,
    /// The program and arguments that fence this path (`fence`, docs/GUARANTEES.md G3), when it has its
    /// own (else the LUN's): run without a shell when the path fails while writes sent on it are in
    /// doubt. Exit status 0 means its target will never execute anything it received on this path
    /// before.
    pub fence: Option<Vec<String>>,
}

/// One LUN, as configured.
#[derive(Debug, Clone)]
pub struct LunSpec {
    pub name: String,
    /// Stable LUN id (config `id`, else a hash of the name).
    pub source_id: u64,
    pub settings: LunSettings,
    /// Declared identity: every path must match.
    pub size_bytes: Option<u64>,
    pub wwid: Option<String>,
    /// The paths share one store without private caches (docs/OPERATIONS.md, paths (consistency)).
    pub shared_backing: bool,
    pub paths: Vec<PathSpec>,
}

/// FNV-1a, 64-bit: the stable default id of a LUN (from its name) or a path (from its URI), so ids
/// survive restarts and config reordering without anyone writing them down.
pub fn stable_id(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_ids_are_stable_and_distinct() {
        assert_eq!(
            stable_id("nbd://10.0.1.10/lun0"),
            stable_id("nbd://10.0.1.10/lun0")
        );
        assert_ne!(
            stable_id("nbd://10.0.1.10/lun0"),
            stable_id("nbd://10.0.2.10/lun0")
        );
        // Pinned: a change here would renumber every path of every installation.
        assert_eq!(stable_id(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_id("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
