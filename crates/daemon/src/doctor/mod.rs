//! `lunmpio doctor`: a preflight check of a config and, when it answers, the daemon running it.
//!
//! Each finding names what is wrong, where, and the fix. The checks are pure functions of the config
//! and of facts gathered first ([`Facts`]: this host, and the running daemon's own view over the
//! control socket), so each rule is tested on its own (`checks.rs`) and the command only gathers,
//! checks and prints (docs/OPERATIONS.md, "Preflight: lunmpio doctor").

mod checks;
mod facts;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{Config, ConfigError};

pub use checks::check;
pub use facts::{Facts, Host, Live, LiveLun, gather_live};

/// How bad a finding is; the exit status is the worst one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; nothing to change.
    Info,
    /// Works today, and fails (or loses a guarantee) in a case the config invites.
    Warning,
    /// Does not work: the daemon would not start, or a LUN cannot serve.
    Error,
}

impl Severity {
    pub const fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One finding: a stable code (`timeouts.client_before_io_timeout`), what it is about (`lun0`,
/// `lun0/p1`, `daemon`), the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: &'static str,
    pub subject: String,
    pub problem: String,
    pub fix: String,
}

impl Finding {
    pub fn new(
        severity: Severity,
        code: &'static str,
        subject: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            code,
            subject: subject.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// What `doctor` checked and found.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub config: PathBuf,
    /// The control socket asked, and whether the daemon answered (with why not).
    pub socket: PathBuf,
    pub daemon: String,
    pub findings: Vec<Finding>,
    pub errors: usize,
    pub warnings: usize,
}

/// What `doctor` is asked to check.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub config: PathBuf,
    /// The control socket; None: the config's `control_socket`.
    pub socket: Option<PathBuf>,
    /// The NBD clients' own I/O timeout, when they have one (kernel nbd-client `-timeout`).
    pub client_timeout: Option<Duration>,
}

/// Reads the config, asks the daemon (bounded: a daemon that does not answer within a few seconds
/// is reported as such), and checks.
pub fn run(options: &DoctorOptions) -> Report {
    let loaded = Config::load(&options.config);
    let socket = options.socket.clone().unwrap_or_else(|| match &loaded {
        Ok(c) => c.daemon.control_socket.clone(),
        Err(_) => PathBuf::from("/run/lunmpio/control.sock"),
    });
    let live = gather_live(&socket);
    let daemon = match &live {
        Ok(l) => format!(
            "answered on {} (pid {}, version {})",
            socket.display(),
            l.info.pid,
            l.info.version
        ),
        Err(why) => format!("not reachable: {why}"),
    };
    let findings = match &loaded {
        Ok(config) => {
            let facts = Facts {
                host: Host::this_process(),
                live: live.ok(),
                client_timeout: options.client_timeout,
                // The daemon reports its file as an absolute path.
                config_path: std::path::absolute(&options.config)
                    .unwrap_or_else(|_| options.config.clone()),
            };
            check(config, &facts)
        }
        Err(e) => vec![unreadable(&options.config, e)],
    };
    Report::new(options.config.clone(), socket, daemon, findings)
}

fn unreadable(path: &Path, e: &ConfigError) -> Finding {
    Finding::new(
        Severity::Error,
        "config.invalid",
        path.display().to_string(),
        e.to_string(),
        "correct the key at that line (docs/OPERATIONS.md lists every key); `lunmpio serve` refuses this file",
    )
}

impl Report {
    pub fn new(
        config: PathBuf,
        socket: PathBuf,
        daemon: String,
        mut findings: Vec<Finding>,
    ) -> Report {
        // Worst first; the checks' order within a severity (config order) is kept.
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        let count = |s: Severity| findings.iter().filter(|f| f.severity == s).count();
        Report {
            errors: count(Severity::Error),
            warnings: count(Severity::Warning),
            config,
            socket,
            daemon,
            findings,
        }
    }

    /// 0: nothing to fix; 1: warnings; 2: errors.
    pub fn exit_code(&self) -> u8 {
        if self.errors > 0 {
            2
        } else if self.warnings > 0 {
            1
        } else {
            0
        }
    }

    /// The report for people: one block per finding, its fix indented below it.
    pub fn render(&self) -> String {
        let mut out = format!(
            "config  {}\ndaemon  {}\n\n",
            self.config.display(),
            self.daemon
        );
        for f in &self.findings {
            out.push_str(&format!(
                "{:<7}  {}  [{}]\n         {}\n         fix: {}\n",
                f.severity.name(),
                f.subject,
                f.code,
                f.problem,
                f.fix
            ));
        }
        let infos = self.findings.len() - self.errors - self.warnings;
        out.push_str(&format!(
            "\n{} error(s), {} warning(s), {} note(s)\n",
            self.errors, self.warnings, infos
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: Severity) -> Finding {
        Finding::new(severity, "t.t", "lun0", "p", "f")
    }

    #[test]
    fn the_exit_status_is_the_worst_finding_and_the_worst_come_first() {
        let report = |fs: Vec<Finding>| Report::new("c".into(), "s".into(), "d".into(), fs);
        assert_eq!(report(vec![]).exit_code(), 0);
        assert_eq!(report(vec![finding(Severity::Info)]).exit_code(), 0);
        let r = report(vec![finding(Severity::Info), finding(Severity::Warning)]);
        assert_eq!((r.exit_code(), r.warnings), (1, 1));
        assert_eq!(r.findings[0].severity, Severity::Warning);
        let r = report(vec![
            finding(Severity::Warning),
            finding(Severity::Error),
            finding(Severity::Info),
        ]);
        assert_eq!((r.exit_code(), r.errors), (2, 1));
        assert_eq!(r.findings[0].severity, Severity::Error);
        assert!(r.render().contains("1 error(s), 1 warning(s), 1 note(s)"));
    }
}
