//! The rules of `lunmpio doctor`: pure functions of the config and the gathered facts.
//!
//! Each rule returns its findings in config order; codes are stable (scripts match on them) and
//! listed in docs/OPERATIONS.md.

use std::net::IpAddr;
use std::time::Duration;

use lunmpio_engine::transport::PathTarget;
use lunmpio_engine::{NoPathRetry, PathSpec};
use lunmpio_human::format_duration;
use lunmpio_nbd::client::Endpoint;
use lunmpio_vds::LoadBalancePolicy;

use super::facts::{Facts, LiveLun};
use super::{Finding, Severity};
use crate::config::{Config, ListenAddr, LunTable};
use crate::serve::fds;

/// Every finding for `config` given `facts`.
pub fn check(config: &Config, facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    for lun in &config.luns {
        let paths = lun.to_spec().paths;
        timeouts(lun, facts.client_timeout, &mut out);
        fencing(lun, &paths, &mut out);
        redundancy(lun, &paths, &mut out);
        if facts.live.is_none() {
            multi_conn_unverified(lun, &mut out);
        }
        unencrypted_paths(lun, &paths, &mut out);
    }
    unencrypted_export(config, &mut out);
    open_files(config, facts, &mut out);
    polling(config, facts, &mut out);
    if let Some(live) = &facts.live {
        if !live.info.config.is_empty() && !same_file(&live.info.config, &facts.config_path) {
            out.push(Finding::new(
                Severity::Info,
                "daemon.other_config",
                "daemon",
                format!(
                    "the daemon runs {}, not the file checked ({})",
                    live.info.config,
                    facts.config_path.display()
                ),
                format!(
                    "check the daemon's own file: lunmpio doctor --config {}",
                    live.info.config
                ),
            ));
        }
        for lun in &live.luns {
            let configured = config.luns.iter().find(|l| l.name == lun.summary.name);
            live_lun(lun, configured, &mut out);
        }
    }
    client_settings(config, &mut out);
    out
}

/// Whether the daemon's config path and the checked one name the same file (one may be a symlink,
/// as a Kubernetes ConfigMap's is).
fn same_file(daemon: &str, checked: &std::path::Path) -> bool {
    let daemon = std::path::Path::new(daemon);
    daemon == checked
        || std::fs::canonicalize(daemon)
            .ok()
            .zip(std::fs::canonicalize(checked).ok())
            .is_some_and(|(a, b)| a == b)
}

/// The time a request may take inside lunmpio before it fails, when every path is lost while it
/// runs: detecting the hung path, then waiting for one to come back. None: forever.
fn worst_case_wait(lun: &LunTable) -> Option<Duration> {
    let s = &lun.settings;
    match s.no_path_retry {
        NoPathRetry::Fail => Some(s.io_timeout),
        NoPathRetry::For(d) => Some(s.io_timeout + d),
        NoPathRetry::Queue => None,
    }
}

fn timeouts(lun: &LunTable, client_timeout: Option<Duration>, out: &mut Vec<Finding>) {
    let s = &lun.settings;
    let name = &lun.name;
    if let NoPathRetry::For(retry) = s.no_path_retry
        && s.check_interval >= retry
    {
        out.push(Finding::new(
            Severity::Warning,
            "timeouts.probe_slower_than_no_path_retry",
            name.as_str(),
            format!(
                "check_interval ({}) is not shorter than no_path_retry ({}): a failed path is retried at \
                 most every check_interval, so a path repaired while I/O queues may not be found before \
                 the queue fails",
                format_duration(s.check_interval),
                format_duration(retry)
            ),
            format!(
                "make check_interval a fraction of no_path_retry (e.g. check_interval = \"{}\")",
                format_duration((retry / 5).max(Duration::from_millis(100)))
            ),
        ));
    }
    let Some(client) = client_timeout else {
        return;
    };
    if client <= s.io_timeout {
        out.push(Finding::new(
            Severity::Error,
            "timeouts.client_before_io_timeout",
            name.as_str(),
            format!(
                "the clients time out after {} but a hung path is declared only after io_timeout ({}): \
                 the client fails the request before lunmpio can re-drive it on another path",
                format_duration(client),
                format_duration(s.io_timeout)
            ),
            format!(
                "lower io_timeout below the clients' timeout, or raise theirs above {}",
                format_duration(worst_case_wait(lun).unwrap_or(s.io_timeout) + Duration::from_secs(5))
            ),
        ));
    } else if worst_case_wait(lun).is_none_or(|w| client <= w) {
        let wait = worst_case_wait(lun).map_or_else(
            || "forever (no_path_retry = \"queue\")".to_string(),
            format_duration,
        );
        out.push(Finding::new(
            Severity::Warning,
            "timeouts.client_before_no_path_retry",
            name.as_str(),
            format!(
                "with every path down a request may wait {wait} inside lunmpio (io_timeout, then \
                 no_path_retry), but the clients give up after {}: they see errors while lunmpio still \
                 waits for a path",
                format_duration(client)
            ),
            "shorten no_path_retry so that io_timeout + no_path_retry is below the clients' timeout, or \
             lengthen theirs (or let them reconnect: docs/OPERATIONS.md, \"Restarts and crashes\")",
        ));
    }
}

fn fencing(lun: &LunTable, paths: &[PathSpec], out: &mut Vec<Finding>) {
    fence_programs(lun, paths, out);
    let Some(in_doubt) = lun.settings.in_doubt_timeout else {
        return;
    };
    let unfenced: Vec<&str> = paths
        .iter()
        .filter(|p| p.fence.is_none() && lun.settings.fence.is_none())
        .map(|p| p.name.as_str())
        .collect();
    if unfenced.is_empty() {
        return;
    }
    out.push(Finding::new(
        Severity::Warning,
        "in_doubt.no_fence",
        lun.name.as_str(),
        format!(
            "no fence for {} and in_doubt_timeout is {}: a write held by a hung path is waited for that \
             long, then overlapping writes go ahead; if the path resumes later and executes the held \
             write, it overwrites newer data (docs/GUARANTEES.md)",
            unfenced.join(", "),
            format_duration(in_doubt)
        ),
        "set fence = [\"/path/to/program\", ...] on the LUN or its paths (a program that cuts the path \
         off at the target), or in_doubt_timeout = \"never\" to wait for the answer however long",
    ));
}

/// A `fence` whose program cannot be run fails when it is needed: at a path fault.
fn fence_programs(lun: &LunTable, paths: &[PathSpec], out: &mut Vec<Finding>) {
    let mut programs: Vec<&str> = paths
        .iter()
        .filter_map(|p| p.fence.as_ref().or(lun.settings.fence.as_ref()))
        .filter_map(|argv| argv.first().map(String::as_str))
        .collect();
    programs.sort_unstable();
    programs.dedup();
    for program in programs {
        if let Some(why) = not_runnable(program) {
            out.push(Finding::new(
                Severity::Error,
                "fence.not_runnable",
                lun.name.as_str(),
                format!(
                    "the fence program {program:?} {why}: when a path hangs, its in-doubt writes cannot \
                     be fenced and wait for in_doubt_timeout"
                ),
                "install the program, or point fence at its full path (it must be executable by the \
                 daemon's user)",
            ));
        }
    }
}

/// Why `program` (a path, or a name looked up in `PATH`) cannot be executed, if it cannot.
fn not_runnable(program: &str) -> Option<&'static str> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = std::path::Path::new(program);
        return if !path.exists() {
            Some("does not exist")
        } else if !executable(path) {
            Some("is not an executable file")
        } else {
            None
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path_var).any(|dir| executable(&dir.join(program)));
    (!found).then_some("is not found in PATH")
}

/// The initiator of a TCP path without `bind`.
const UNBOUND: &str = "the default route";

/// Where a path leaves this host (its initiator port) and where it arrives (the target port).
fn ports(p: &PathSpec) -> (String, String) {
    match &p.target {
        PathTarget::Nbd { endpoint, .. } => match endpoint {
            Endpoint::Tcp { host, port, bind } => (
                bind.map_or_else(|| UNBOUND.to_string(), |b| b.to_string()),
                format!("{host}:{port}"),
            ),
            Endpoint::Unix { path } => ("this host".to_string(), path.display().to_string()),
        },
        PathTarget::File(f) => (
            p.hba_wwns
                .map_or_else(|| "this host".to_string(), |(_, port)| port.to_string()),
            f.path.display().to_string(),
        ),
    }
}

fn redundancy(lun: &LunTable, paths: &[PathSpec], out: &mut Vec<Finding>) {
    let name = lun.name.as_str();
    if paths.len() < 2 {
        out.push(Finding::new(
            Severity::Info,
            "paths.single",
            name,
            "one path: lunmpio can re-drive I/O on it after a reconnect, but nothing survives its loss",
            "add a second [[lun.path]] through another target port and another local interface",
        ));
        return;
    }
    let (initiators, targets): (Vec<String>, Vec<String>) = paths.iter().map(ports).unzip();
    let same_initiator = initiators.iter().all(|i| *i == initiators[0]);
    if same_initiator && initiators[0] == UNBOUND {
        out.push(Finding::new(
            Severity::Info,
            "paths.unbound",
            name,
            "no path sets bind: the kernel picks each path's interface by its route, so nothing keeps \
             the paths on different NICs (and GetPathInfo reports no initiator address)",
            "set bind = \"ADDRESS\" on each [[lun.path]], one local address per NIC",
        ));
    } else if same_initiator && !initiators[0].ends_with("this host") {
        out.push(Finding::new(
            Severity::Warning,
            "paths.one_initiator_port",
            name,
            format!(
                "all {} paths leave through one initiator port ({}): losing that interface loses every \
                 path at once",
                paths.len(),
                initiators[0]
            ),
            "give the paths different local interfaces: bind = \"ADDRESS\" on each [[lun.path]] (one \
             address per NIC)",
        ));
    }
    if targets.iter().all(|t| *t == targets[0]) {
        out.push(Finding::new(
            Severity::Warning,
            "paths.one_target_port",
            name,
            format!(
                "all {} paths reach one target port ({}): it is one path counted {} times",
                paths.len(),
                targets[0],
                paths.len()
            ),
            "point the paths at different ports (controllers) of the array",
        ));
    }
}

fn multi_conn_unverified(lun: &LunTable, out: &mut Vec<Finding>) {
    let policy = lun.settings.policy;
    if lun.paths.len() < 2 || lun.shared_backing || policy == LoadBalancePolicy::Failover {
        return;
    }
    out.push(Finding::new(
        Severity::Info,
        "multi_conn.unverified",
        lun.name.as_str(),
        format!(
            "policy {} spreads I/O over several connections: safe only if every path's target \
             advertises CAN_MULTI_CONN (lunmpio checks at connect and falls back to failover if one \
             does not); the daemon did not answer, so this was not checked",
            policy.config_name()
        ),
        "start the daemon and run doctor again, or set shared_backing = true if the paths reach one \
         array's shared cache",
    ));
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn unencrypted_paths(lun: &LunTable, paths: &[PathSpec], out: &mut Vec<Finding>) {
    let remote: Vec<String> = paths
        .iter()
        .filter_map(|p| match &p.target {
            PathTarget::Nbd {
                endpoint: Endpoint::Tcp { host, .. },
                tls: None,
                ..
            } if !is_loopback_host(host) => Some(format!("{} ({host})", p.name)),
            _ => None,
        })
        .collect();
    if remote.is_empty() {
        return;
    }
    out.push(Finding::new(
        Severity::Warning,
        "tls.path_unencrypted",
        lun.name.as_str(),
        format!(
            "{} cross{} the network as plain NBD: anyone on it can read or change the data",
            remote.join(", "),
            if remote.len() == 1 { "es" } else { "" }
        ),
        "use nbds:// with tls_ca (and tls_cert/tls_key if the server verifies its clients), or keep \
         the paths on an isolated storage network",
    ));
}

fn unencrypted_export(config: &Config, out: &mut Vec<Finding>) {
    let ListenAddr::Tcp(addr) = config.daemon.nbd_listen else {
        return;
    };
    if addr.ip().is_loopback() || config.daemon.tls.as_ref().is_some_and(|t| t.require) {
        return;
    }
    out.push(Finding::new(
        Severity::Warning,
        "tls.export_unencrypted",
        "daemon",
        format!(
            "nbd_listen = \"{addr}\" is reachable from other hosts, and plain NBD is served there{}: \
             any of them can read and write every LUN",
            if config.daemon.tls.is_some() { " (tls = \"on\" offers TLS but does not require it)" } else { "" }
        ),
        "set tls = \"require\" with tls_cert, tls_key (and tls_client_ca so that only clients with a \
         certificate get in), or listen on 127.0.0.1 or a unix: socket for local clients",
    ));
}

fn open_files(config: &Config, facts: &Facts, out: &mut Vec<Finding>) {
    let (limit, whose) = match facts.live.as_ref().and_then(|l| l.open_files_hard) {
        Some(n) => (Some(n), "the running daemon's"),
        None => (facts.host.open_files_hard, "this shell's"),
    };
    let paths: usize = config.luns.iter().map(|l| l.paths.len()).sum();
    let (allowed, why) = fds::connections_within_limit(config.daemon.max_connections, paths, limit);
    if why.is_none() {
        return;
    }
    out.push(Finding::new(
        Severity::Warning,
        "fds.limit",
        "daemon",
        format!(
            "{whose} open-file limit ({}) leaves room for {allowed} export connections, not \
             max_connections = {}",
            limit.unwrap_or(0),
            config.daemon.max_connections
        ),
        "raise the limit (systemd: LimitNOFILE= in the unit; packaging/lunmpio.service sets 65536), or \
         lower max_connections",
    ));
}

fn polling(config: &Config, facts: &Facts, out: &mut Vec<Finding>) {
    let Some(window) = config.daemon.data_poll else {
        return;
    };
    // As `data_threads::thread_count` does, with this host's CPU count from the facts.
    let threads = match config.daemon.data_threads {
        0 => config.luns.len().clamp(1, facts.host.cpus.max(1)),
        n => n,
    };
    if threads < facts.host.cpus {
        return;
    }
    out.push(Finding::new(
        Severity::Warning,
        "poll.no_spare_core",
        "daemon",
        format!(
            "data_poll_us = {} makes each of the {threads} data threads use a whole core while I/O \
             flows, and this host has {} CPUs: the polling takes the cores the clients and targets need",
            window.as_micros(),
            facts.host.cpus
        ),
        "lower data_threads below the number of CPUs, or set data_poll_us = 0",
    ));
}

fn live_lun(lun: &LiveLun, configured: Option<&LunTable>, out: &mut Vec<Finding>) {
    let name = lun.summary.name.as_str();
    for p in &lun.paths.paths {
        if p.status_name == "VDS_MPS_FAILED" {
            out.push(Finding::new(
                Severity::Warning,
                "path.failed",
                format!("{name}/{}", p.name),
                format!("the path is failed: {}", p.status_reason),
                "repair what the reason names; the daemon reconnects by itself (lunmpio events shows when)",
            ));
        }
    }
    match lun.summary.usable_paths {
        0 => out.push(Finding::new(
            Severity::Error,
            "lun.no_usable_path",
            name,
            "no path can carry I/O: requests queue or fail (no_path_retry)",
            "repair a path; lunmpio paths shows each one's status and reason",
        )),
        1 if lun.summary.paths > 1 => out.push(Finding::new(
            Severity::Warning,
            "lun.one_usable_path",
            name,
            format!(
                "1 of {} paths can carry I/O: one more fault stops the LUN",
                lun.summary.paths
            ),
            "repair the failed paths before anything else",
        )),
        _ => {}
    }
    let only_failover = lun.supported.policies.len() == 1
        && lun.supported.policies[0].name == LoadBalancePolicy::Failover.config_name();
    let wanted = configured.map(|c| c.settings.policy);
    if only_failover
        && lun.summary.paths > 1
        && wanted.is_some_and(|p| p != LoadBalancePolicy::Failover)
    {
        out.push(Finding::new(
            Severity::Warning,
            "multi_conn.fallback",
            name,
            format!(
                "policy {} is configured, but a path's target does not advertise CAN_MULTI_CONN: only \
                 failover is safe, and in force (one path carries all I/O)",
                wanted.map_or("?", LoadBalancePolicy::config_name)
            ),
            "enable multi-conn on the target (qemu-nbd: -e N with a shared image; nbdkit: \
             --filter=multi-conn), or set shared_backing = true if the paths reach one array's \
             shared cache",
        ));
    }
}

fn client_settings(config: &Config, out: &mut Vec<Finding>) {
    let Some(longest) = config
        .luns
        .iter()
        .map(worst_case_wait)
        .max_by_key(|w| w.unwrap_or(Duration::MAX))
    else {
        return;
    };
    let timeout = longest.map_or_else(
        || "none (no_path_retry = \"queue\" waits forever)".to_string(),
        |w| {
            format!(
                "of at least {}",
                format_duration(w + Duration::from_secs(5))
            )
        },
    );
    out.push(Finding::new(
        Severity::Info,
        "clients.settings",
        "clients",
        format!(
            "what the NBD clients should be set to: a request timeout {timeout}, and reconnect \
             when the daemon restarts"
        ),
        "qemu: reconnect-delay=5 on the nbd block device (libvirt: <reconnect delay='5'/>); nbd-client: \
         -persist and -timeout as above; docs/OPERATIONS.md, \"Restarts and crashes\"",
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::facts::Host;

    fn facts(client_timeout: Option<Duration>) -> Facts {
        Facts {
            host: Host {
                open_files_hard: Some(1 << 20),
                cpus: 8,
            },
            live: None,
            client_timeout,
            config_path: "t.toml".into(),
        }
    }

    fn codes(config: &str, facts: &Facts) -> Vec<&'static str> {
        let config = Config::parse(config, "t.toml").unwrap();
        check(&config, facts).iter().map(|f| f.code).collect()
    }

    const TWO_PATHS: &str = "[[lun]]\nname = \"a\"\nfence = [\"/bin/true\"]\n\
        [[lun.path]]\nuri = \"nbd://127.0.0.1:10001/x\"\nbind = \"127.0.0.2\"\n\
        [[lun.path]]\nuri = \"nbd://127.0.0.1:10002/x\"\nbind = \"127.0.0.3\"\n";

    #[test]
    fn a_sound_config_has_only_notes() {
        let found = codes(TWO_PATHS, &facts(Some(Duration::from_secs(120))));
        assert_eq!(found, ["multi_conn.unverified", "clients.settings"]);
    }

    #[test]
    fn timeouts_that_contradict_each_other_are_found() {
        let found = codes(TWO_PATHS, &facts(Some(Duration::from_secs(3))));
        assert!(
            found.contains(&"timeouts.client_before_io_timeout"),
            "{found:?}"
        );
        // io_timeout 5 s + no_path_retry 30 s: a 20 s client gives up while lunmpio waits.
        let found = codes(TWO_PATHS, &facts(Some(Duration::from_secs(20))));
        assert!(
            found.contains(&"timeouts.client_before_no_path_retry"),
            "{found:?}"
        );
        let queue = TWO_PATHS.replace(
            "name = \"a\"\n",
            "name = \"a\"\nno_path_retry = \"queue\"\n",
        );
        let found = codes(&queue, &facts(Some(Duration::from_secs(600))));
        assert!(
            found.contains(&"timeouts.client_before_no_path_retry"),
            "{found:?}"
        );
        let slow_probe = TWO_PATHS.replace(
            "name = \"a\"\n",
            "name = \"a\"\ncheck_interval = \"10s\"\nno_path_retry = \"5s\"\n",
        );
        let found = codes(&slow_probe, &facts(None));
        assert!(
            found.contains(&"timeouts.probe_slower_than_no_path_retry"),
            "{found:?}"
        );
    }

    #[test]
    fn a_finite_in_doubt_timeout_without_fence_is_found() {
        let unfenced = TWO_PATHS.replace("fence = [\"/bin/true\"]\n", "");
        assert!(codes(&unfenced, &facts(None)).contains(&"in_doubt.no_fence"));
        let never = unfenced.replace(
            "name = \"a\"\n",
            "name = \"a\"\nin_doubt_timeout = \"never\"\n",
        );
        assert!(!codes(&never, &facts(None)).contains(&"in_doubt.no_fence"));
    }

    #[test]
    fn a_fence_program_that_cannot_run_is_found() {
        assert!(
            !codes(TWO_PATHS, &facts(None)).contains(&"fence.not_runnable"),
            "/bin/true runs"
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let plain = plain.display().to_string();
        for missing in ["/nonexistent/fence", &plain, "no-such-fence-program"] {
            let config = TWO_PATHS.replace("/bin/true", missing);
            assert!(
                codes(&config, &facts(None)).contains(&"fence.not_runnable"),
                "{missing}"
            );
        }
        assert_eq!(not_runnable("true"), None, "found in PATH");
    }

    #[test]
    fn single_points_of_failure_are_found() {
        let one_nic = TWO_PATHS.replace("bind = \"127.0.0.3\"", "bind = \"127.0.0.2\"");
        assert!(codes(&one_nic, &facts(None)).contains(&"paths.one_initiator_port"));
        let no_bind = TWO_PATHS
            .replace("bind = \"127.0.0.2\"\n", "")
            .replace("bind = \"127.0.0.3\"\n", "");
        assert!(codes(&no_bind, &facts(None)).contains(&"paths.unbound"));
        assert!(!codes(&no_bind, &facts(None)).contains(&"paths.one_initiator_port"));
        let one_port = TWO_PATHS.replace(":10002/x", ":10001/y");
        assert!(codes(&one_port, &facts(None)).contains(&"paths.one_target_port"));
        let single = "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://127.0.0.1:1/x\"\n";
        assert!(codes(single, &facts(None)).contains(&"paths.single"));
    }

    #[test]
    fn plain_nbd_off_this_host_is_found() {
        let remote = TWO_PATHS.replace("127.0.0.1:10002", "10.1.2.3:10809");
        assert!(codes(&remote, &facts(None)).contains(&"tls.path_unencrypted"));
        let open = format!("[daemon]\nnbd_listen = \"0.0.0.0:10809\"\n{TWO_PATHS}");
        assert!(codes(&open, &facts(None)).contains(&"tls.export_unencrypted"));
        assert!(is_loopback_host("localhost") && is_loopback_host("[::1]"));
        assert!(!is_loopback_host("storage.example") && !is_loopback_host("10.0.0.1"));
    }

    #[test]
    fn a_low_open_file_limit_and_polling_without_a_spare_core_are_found() {
        let mut f = facts(None);
        f.host.open_files_hard = Some(512);
        assert!(codes(TWO_PATHS, &f).contains(&"fds.limit"));
        let mut f = facts(None);
        f.host.cpus = 1;
        let poll = format!("[daemon]\ndata_poll_us = 200\n{TWO_PATHS}");
        assert!(codes(&poll, &f).contains(&"poll.no_spare_core"));
        assert!(!codes(&poll, &facts(None)).contains(&"poll.no_spare_core"));
    }
}
