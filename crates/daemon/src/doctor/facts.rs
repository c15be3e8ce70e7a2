//! What the checks look at besides the config: this host, and the running daemon's own view.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lunmpio_rpc::client::{Client, ClientError};
use lunmpio_rpc::{DaemonInfo, LunSummary, PathInfoList, SupportedLbPolicies};

/// How long the daemon has to answer each question before it is reported as not reachable.
const DAEMON_ANSWER_MAX: Duration = Duration::from_secs(3);
/// LUNs asked about at most (the rest are not checked live; the config checks still cover them).
const LIVE_LUNS_MAX: usize = 1024;

/// Everything the checks use besides the config.
#[derive(Debug, Clone)]
pub struct Facts {
    pub host: Host,
    /// None: the daemon did not answer.
    pub live: Option<Live>,
    /// The NBD clients' own I/O timeout, when given.
    pub client_timeout: Option<Duration>,
    /// The file checked (compared with the one the daemon runs).
    pub config_path: PathBuf,
}

/// This host, as `lunmpio serve` started here would find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// The hard `RLIMIT_NOFILE` (the daemon raises its soft limit to it at start).
    pub open_files_hard: Option<u64>,
    pub cpus: usize,
}

impl Host {
    /// This process's limits: those a daemon started from this shell would get. A daemon started by
    /// systemd gets its unit's `LimitNOFILE=` instead; when it answers, its own limit is read.
    pub fn this_process() -> Host {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes the struct we own.
        let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
        Host {
            open_files_hard: ok.then_some(limit.rlim_max),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The running daemon, as it answers over its control socket.
#[derive(Debug, Clone)]
pub struct Live {
    pub info: DaemonInfo,
    pub luns: Vec<LiveLun>,
    /// The daemon's own hard open-file limit (`/proc/PID/limits`), when readable.
    pub open_files_hard: Option<u64>,
}

/// One LUN of the running daemon.
#[derive(Debug, Clone)]
pub struct LiveLun {
    pub summary: LunSummary,
    pub supported: SupportedLbPolicies,
    pub paths: PathInfoList,
}

/// Asks the daemon behind `socket` what it runs. `Err`: why it could not be asked, for the report.
pub fn gather_live(socket: &Path) -> Result<Live, String> {
    if !socket.exists() {
        return Err(format!("no socket at {}", socket.display()));
    }
    let mut client = Client::connect_with_timeout(socket, DAEMON_ANSWER_MAX)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    let info = client
        .get_daemon_info()
        .map_err(|e| format!("GetDaemonInfo failed: {e}"))?;
    let list = client
        .list_luns()
        .map_err(|e| format!("ListLuns failed: {e}"))?;
    let mut luns = Vec::with_capacity(list.luns.len().min(LIVE_LUNS_MAX));
    for summary in list.luns.into_iter().take(LIVE_LUNS_MAX) {
        let answers = client
            .get_supported_lb_policies(&summary.name)
            .and_then(|supported| Ok((supported, client.get_path_info(&summary.name)?)));
        match answers {
            Ok((supported, paths)) => luns.push(LiveLun {
                summary,
                supported,
                paths,
            }),
            // The LUN went since ListLuns (a reload): the others are still checked.
            Err(ClientError::Rpc(_)) => continue,
            Err(e) => return Err(format!("asking about LUN {}: {e}", summary.name)),
        }
    }
    let open_files_hard = hard_open_files_of(info.pid);
    Ok(Live {
        info,
        luns,
        open_files_hard,
    })
}

/// The hard "Max open files" of a process, from `/proc/PID/limits`, if that PID is a `lunmpio serve`
/// here: in another PID namespace (a daemon in a container, asked through its socket on the node)
/// the PID it reports is some other process of ours, whose limit says nothing about it.
fn hard_open_files_of(pid: u32) -> Option<u64> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    if !args.iter().any(|a| *a == b"serve") {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_hard_open_files(&text)
}

fn parse_hard_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    // Columns: name (with spaces), soft, hard, units.
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    match *fields.get(1)? {
        "unlimited" => Some(u64::MAX),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hard_open_file_limit_is_read_from_proc_limits() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max cpu time              unlimited            unlimited            seconds   \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(parse_hard_open_files(text), Some(524_288));
        assert_eq!(
            parse_hard_open_files("Max open files  1024 unlimited files"),
            Some(u64::MAX)
        );
        assert_eq!(parse_hard_open_files("nothing here"), None);
        assert_eq!(
            parse_hard_open_files("Max open files  1024"),
            None,
            "a short line"
        );
        assert_eq!(
            hard_open_files_of(std::process::id()),
            None,
            "a process that is not `lunmpio serve` is not read"
        );
    }

    #[test]
    fn a_missing_socket_is_reported_not_waited_for() {
        let e = gather_live(Path::new("/nonexistent/lunmpio.sock")).unwrap_err();
        assert!(e.contains("no socket"), "{e}");
    }
}
