//! fio in the background: a write-and-verify workload (`verify=crc32c`) through an NBD URI while a
//! test breaks things, and its report (errors, mismatches, the longest client-visible stall).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::{
    ProcessGuard, fio_json, fio_verify_command, require_tool, stderr_text, stdout_text, tempdir,
};

pub struct Fio {
    pub process: ProcessGuard,
    dir: tempfile::TempDir,
}

pub struct FioReport {
    pub out: Output,
    pub json: Value,
    /// Largest completion latency of a read or a write.
    pub clat_max: Duration,
    /// Largest time between two consecutive completions (the client saw nothing complete).
    pub gap_max: Duration,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
}

impl Fio {
    /// Random 4 KiB writes over 32 MiB at queue depth 32, each block read back and checked (crc32c)
    /// while writing continues (`verify_backlog`), looping until `runtime`.
    pub fn start(uri: &str, runtime: Duration, extra: &[&str]) -> Fio {
        require_tool("fio", "fio");
        let dir = tempdir();
        let mut cmd = fio_verify_command(uri, "32M", dir.path());
        cmd.args([
            "--verify_backlog=1024",
            "--loops=1000000",
            &format!("--runtime={}ms", runtime.as_millis()),
        ])
        .arg(format!(
            "--write_lat_log={}",
            dir.path().join("lat").display()
        ));
        cmd.args(extra);
        let process = ProcessGuard::spawn("fio", &mut cmd);
        Fio { process, dir }
    }

    pub fn running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn assert_running(&mut self, when: &str) {
        let (out, err) = self.process.output_so_far();
        assert!(
            self.running(),
            "fio ended before {when}: the fault would not have hit running I/O\nstdout:\n{out}\nstderr:\n{err}"
        );
    }

    pub fn finish(mut self, timeout: Duration) -> FioReport {
        let status = self.process.wait_timeout(timeout);
        if status.is_none() {
            let (out, err) = self.process.output_so_far();
            self.process.kill();
            panic!("fio did not finish within {timeout:?}\nstdout:\n{out}\nstderr:\n{err}");
        }
        let dir = std::mem::replace(&mut self.dir, tempdir());
        let out = self.process_output();
        let text = stdout_text(&out);
        let json = if text.contains('{') {
            fio_json(&text)
        } else {
            Value::Null
        };
        let job = &json["jobs"][0];
        let ns = |dir: &str| job[dir]["clat_ns"]["max"].as_u64().unwrap_or(0);
        let clat_max = Duration::from_nanos(ns("read").max(ns("write")));
        let gap_max = completion_gap(&dir.path().join("lat_clat.1.log"));
        let errors = job["error"].as_u64().unwrap_or(u64::MAX)
            + job.get("total_err").and_then(Value::as_u64).unwrap_or(0);
        FioReport {
            read_bytes: job["read"]["io_bytes"].as_u64().unwrap_or(0),
            write_bytes: job["write"]["io_bytes"].as_u64().unwrap_or(0),
            out,
            json,
            clat_max,
            gap_max,
            errors,
        }
    }

    fn process_output(&mut self) -> Output {
        // `wait_output` consumes the guard; swap in a finished placeholder.
        let placeholder = ProcessGuard::spawn("true", &mut Command::new("true"));
        let process = std::mem::replace(&mut self.process, placeholder);
        process.wait_output(Duration::from_secs(5))
    }
}

/// The largest gap between consecutive completions in fio's per-I/O latency log (ms timestamps).
pub fn completion_gap(log: &Path) -> Duration {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Duration::ZERO;
    };
    let mut times: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split(',').next()?.trim().parse().ok())
        .collect();
    times.sort_unstable();
    let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    Duration::from_millis(gap)
}

impl FioReport {
    pub fn describe(&self) -> String {
        format!(
            "status {}\nstdout:\n{}\nstderr:\n{}",
            self.out.status,
            stdout_text(&self.out),
            stderr_text(&self.out)
        )
    }

    /// Zero errors, zero mismatches, data moved both ways.
    pub fn assert_clean(&self, case: &str) {
        assert!(
            self.out.status.success() && self.errors == 0,
            "{case}: fio saw errors or mismatches: {}",
            self.describe()
        );
        assert!(
            !stderr_text(&self.out).contains("verify"),
            "{case}: verify complaint: {}",
            self.describe()
        );
        assert!(
            self.read_bytes > 0 && self.write_bytes > 0,
            "{case}: no verified I/O: {}",
            self.describe()
        );
    }
}
