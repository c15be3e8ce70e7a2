//! lunmpio's test kit, shared by every crate's tests: process guards, running external tools with
//! deadlines, free ports, polling, an in-process NBD target and fault proxy ([`inprocess`]), the TCP
//! fault relay ([`relay`]), and fixtures for `lunmpio target`, `lunmpio serve`, fio and nbdfuse.
//!
//! Rules these helpers enforce, so individual tests cannot forget them:
//! * every spawned process lives in a [`ProcessGuard`] that kills it **by PID** and reaps it on drop, so
//!   a failing assertion never leaks a server;
//! * every wait has a deadline, and waits poll for the event rather than sleeping a fixed time;
//! * a missing external tool fails the test with the package to install — tests are never skipped.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod fio;
pub mod inprocess;
pub mod relay;
pub mod tls;
pub mod tmux;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `lunmpio` binary of this build: next to the test binary's `deps/` directory, where Cargo puts
/// it before it runs the `lunmpio` package's integration tests.
pub fn lunmpio_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("lunmpio"))
            .expect("the test binary lives in target/PROFILE/deps");
        assert!(
            bin.is_file(),
            "{} is missing: build it with `cargo build -p lunmpio` (Cargo builds it before the \
             lunmpio package's own tests)",
            bin.display()
        );
        bin
    })
}

/// Generous bound for a tool run that normally takes well under a second; CI boxes with 2 cores are slow.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

// -------------------------------------------------------------------------------------------------
// Process guard

/// Owns a child process. On drop, a child that is still running is killed with SIGKILL by its PID and
/// reaped. The PID is only signalled while the child is known not to have been reaped, so a recycled PID
/// is never hit.
pub struct ProcessGuard {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout: Option<OutputSink>,
    stderr: Option<OutputSink>,
}

/// Collects one pipe of a child in a background thread, so the child never blocks on a full pipe.
struct OutputSink {
    buf: Arc<Mutex<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl OutputSink {
    fn collect(mut pipe: impl Read + Send + 'static) -> OutputSink {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let thread = std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        OutputSink {
            buf,
            thread: Some(thread),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf.lock().unwrap()).into_owned()
    }

    fn finish(&mut self) -> Vec<u8> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.buf.lock().unwrap())
    }
}

impl ProcessGuard {
    /// Spawns `cmd` with stdin closed and stdout/stderr collected in the background.
    pub fn spawn(name: &str, cmd: &mut Command) -> ProcessGuard {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        let stdout = child.stdout.take().map(OutputSink::collect);
        let stderr = child.stderr.take().map(OutputSink::collect);
        ProcessGuard {
            name: name.to_string(),
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    /// Wraps a child whose pipes the caller manages itself.
    pub fn adopt(name: &str, child: Child) -> ProcessGuard {
        ProcessGuard {
            name: name.to_string(),
            child,
            status: None,
            stdout: None,
            stderr: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exit status, if the child has exited (reaps it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends `signal` to the child by PID, unless it has already been reaped.
    pub fn signal(&mut self, signal: Signal) {
        if self.try_wait().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), signal);
        }
    }

    /// Waits for the child to exit, polling until `timeout`. `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the child is really stopped (SIGSTOP is delivered asynchronously): its state in
    /// `/proc/PID/stat` is `T`. Fails the test after `timeout`.
    pub fn wait_stopped(&mut self, timeout: Duration) {
        let stat = format!("/proc/{}/stat", self.child.id());
        let stopped = wait_until(timeout, || {
            let s = std::fs::read_to_string(&stat).unwrap_or_default();
            // The state follows the parenthesised command name.
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        });
        assert!(stopped, "{} did not stop within {timeout:?}", self.name);
    }

    /// SIGKILL by PID and reap. Idempotent.
    pub fn kill(&mut self) {
        self.signal(Signal::SIGKILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }

    /// Output collected so far (stdout, stderr), for diagnostics while the child still runs.
    pub fn output_so_far(&self) -> (String, String) {
        (
            self.stdout
                .as_ref()
                .map(OutputSink::text)
                .unwrap_or_default(),
            self.stderr
                .as_ref()
                .map(OutputSink::text)
                .unwrap_or_default(),
        )
    }

    /// Waits up to `timeout` for the child to exit and returns its output; on timeout the child is killed
    /// and the test fails with everything it printed.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let status = match self.wait_timeout(timeout) {
            Some(s) => s,
            None => {
                self.kill();
                let (out, err) = self.output_so_far();
                panic!(
                    "{} did not finish within {timeout:?}; killed.\nstdout:\n{out}\nstderr:\n{err}",
                    self.name
                );
            }
        };
        let stdout = self
            .stdout
            .as_mut()
            .map(OutputSink::finish)
            .unwrap_or_default();
        let stderr = self
            .stderr
            .as_mut()
            .map(OutputSink::finish)
            .unwrap_or_default();
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

// -------------------------------------------------------------------------------------------------
// Running tools

/// Fails the test unless `tool` is on PATH. Tests that need a peer we did not write never skip.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(tool))))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} not found: install it with `apt-get install {package}`"
    );
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs a command to completion within `timeout`; the child is killed by PID if it overruns.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let name = cmd.get_program().to_string_lossy().into_owned();
    ProcessGuard::spawn(&name, cmd).wait_output(timeout)
}

/// Like [`run`], and fails the test with the full output unless the command succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let desc = describe(cmd);
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "`{desc}` failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Like [`run`], and fails the test if the command succeeded.
pub fn run_fails(cmd: &mut Command) -> Output {
    let desc = describe(cmd);
    let out = run(cmd, TOOL_TIMEOUT);
    assert!(
        !out.status.success(),
        "`{desc}` unexpectedly succeeded\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn stdout_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `Command` for a tool, with a clean locale so messages are stable.
pub fn tool(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program.as_ref());
    c.env("LC_ALL", "C");
    c
}

// -------------------------------------------------------------------------------------------------
// Polling and ports

/// Polls `cond` every few milliseconds until it holds or `timeout` passes. Returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP port on 127.0.0.1 that is free right now (for peers that cannot be told to pick one).
pub fn free_port() -> u16 {
    free_port_range(1)
}

/// A base port such that `count` consecutive ports on 127.0.0.1 are free right now. Prefer `--listen
/// 127.0.0.1:0` (the OS picks); use this only to test explicit port numbers.
pub fn free_port_range(count: u16) -> u16 {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let base = first.local_addr().unwrap().port();
        if base as u32 + count as u32 > u16::MAX as u32 {
            continue;
        }
        let rest: Vec<_> = (1..count)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if rest.iter().all(Result::is_ok) {
            return base;
        }
    }
    panic!("could not find {count} consecutive free ports");
}

/// CPU time (user + system) a process has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Times the threads of `pid` whose name starts with `prefix` went to sleep on their own
/// (`voluntary_ctxt_switches`, summed): a thread that polls instead of sleeping barely adds to it.
pub fn voluntary_switches(pid: u32, prefix: &str) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("proc task");
    let mut total = 0;
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lunmpio-test-")
        .tempdir()
        .expect("create a temporary directory")
}

// -------------------------------------------------------------------------------------------------
// The simulated array fixture

/// How to start `lunmpio target`.
#[derive(Clone, Debug)]
pub struct TargetSpec {
    /// `--memory SIZE`, or `None` with `image` set.
    pub memory: Option<String>,
    pub image: Option<PathBuf>,
    pub size: Option<String>,
    pub name: Option<String>,
    pub ports: u16,
    pub listen: String,
    /// More arguments for `lunmpio target` (e.g. `--block-size`).
    pub extra: Vec<String>,
}

impl TargetSpec {
    pub fn memory(size: &str, ports: u16) -> TargetSpec {
        TargetSpec {
            memory: Some(size.into()),
            image: None,
            size: None,
            name: None,
            ports,
            listen: "127.0.0.1:0".into(),
            extra: Vec::new(),
        }
    }

    pub fn image(path: &Path, size: Option<&str>, ports: u16) -> TargetSpec {
        TargetSpec {
            memory: None,
            image: Some(path.to_path_buf()),
            size: size.map(Into::into),
            name: None,
            ports,
            listen: "127.0.0.1:0".into(),
            extra: Vec::new(),
        }
    }

    pub fn name(mut self, name: &str) -> TargetSpec {
        self.name = Some(name.into());
        self
    }

    pub fn listen(mut self, listen: &str) -> TargetSpec {
        self.listen = listen.into();
        self
    }

    pub fn spawn(&self) -> Target {
        Target::spawn(self)
    }
}

/// A running `lunmpio target` with a control socket in its own temporary directory.
pub struct Target {
    // Field order matters: the process is killed before the directory holding its socket is removed.
    process: ProcessGuard,
    pub uris: Vec<String>,
    pub control: PathBuf,
    stderr: LogTail,
    stdout_rest: Receiver<String>,
    pub dir: tempfile::TempDir,
}

/// How long a target may take to print its URIs.
const TARGET_START_TIMEOUT: Duration = Duration::from_secs(15);

impl Target {
    pub fn spawn(spec: &TargetSpec) -> Target {
        let dir = tempdir();
        let control = dir.path().join("control.sock");
        let mut cmd = Command::new(lunmpio_bin());
        cmd.arg("target");
        if let Some(m) = &spec.memory {
            cmd.args(["--memory", m]);
        }
        if let Some(i) = &spec.image {
            cmd.arg("--image").arg(i);
        }
        if let Some(s) = &spec.size {
            cmd.args(["--size", s]);
        }
        if let Some(n) = &spec.name {
            cmd.args(["--name", n]);
        }
        cmd.args(&spec.extra);
        cmd.args(["--ports", &spec.ports.to_string(), "--listen", &spec.listen])
            .arg("--control")
            .arg(&control)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn lunmpio target");
        let stdout = child.stdout.take().expect("stdout pipe");
        let stderr_pipe = child.stderr.take().expect("stderr pipe");
        let process = ProcessGuard::adopt("lunmpio target", child);

        let rx = line_channel(stdout);
        let stderr = tail_lines(stderr_pipe, 400);

        let mut target = Target {
            process,
            uris: Vec::new(),
            control,
            stderr,
            stdout_rest: rx,
            dir,
        };
        let deadline = Instant::now() + TARGET_START_TIMEOUT;
        while target.uris.len() < spec.ports as usize {
            let left = deadline.saturating_duration_since(Instant::now());
            match target.stdout_rest.recv_timeout(left) {
                Ok(line) => target.uris.push(line),
                Err(_) => {
                    let status = target.process.try_wait();
                    panic!(
                        "lunmpio target printed {} of {} URIs within {TARGET_START_TIMEOUT:?} (exit: {status:?}); log:\n{}",
                        target.uris.len(),
                        spec.ports,
                        target.log()
                    );
                }
            }
        }
        target
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn uri(&self, port: usize) -> &str {
        &self.uris[port]
    }

    /// `HOST:PORT` of a controller port, parsed from its URI.
    pub fn addr(&self, port: usize) -> String {
        let uri = self.uri(port);
        let rest = uri.strip_prefix("nbd://").expect("nbd:// URI");
        rest.split('/').next().unwrap().to_string()
    }

    /// The target's log so far (stderr).
    pub fn log(&self) -> String {
        self.stderr.text()
    }

    /// `lunmpio target fault --control ... --port I CMD`, which must succeed.
    pub fn fault(&self, port: usize, cmd: &str) {
        let out = run(&mut self.fault_command(port, cmd), TOOL_TIMEOUT);
        assert!(
            out.status.success(),
            "fault {cmd} on port {port} failed: {}{}\ntarget log:\n{}",
            stdout_text(&out),
            stderr_text(&out),
            self.log()
        );
    }

    /// A `fence = [...]` line for lunmpio's config that fences controller port `port` of this array
    /// through its fencing API (`lunmpio target fence`).
    pub fn fence_toml(&self, port: usize) -> String {
        format!(
            "fence = [\"{}\", \"target\", \"fence\", \"--control\", \"{}\", \"--port\", \"{port}\"]",
            lunmpio_bin().display(),
            self.control.display()
        )
    }

    pub fn fault_command(&self, port: usize, cmd: &str) -> Command {
        let mut c = Command::new(lunmpio_bin());
        c.args(["target", "fault", "--control"])
            .arg(&self.control)
            .args(["--port", &port.to_string(), cmd]);
        c
    }

    /// `lunmpio target status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let mut c = Command::new(lunmpio_bin());
        c.args(["target", "status", "--json", "--control"])
            .arg(&self.control);
        let out = run_ok(&mut c);
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// A counter of one port from `target status`.
    pub fn counter(&self, port: usize, name: &str) -> u64 {
        self.status()["ports"][port][name]
            .as_u64()
            .unwrap_or_else(|| panic!("status has no counter {name} for port {port}"))
    }

    /// SIGTERM, then wait for a graceful exit; returns the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.process.signal(Signal::SIGTERM);
        match self.process.wait_timeout(timeout) {
            Some(s) => {
                self.stderr.wait_ended(LOG_END_WAIT);
                s
            }
            None => {
                self.process.kill();
                panic!(
                    "lunmpio target did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    pub fn process(&mut self) -> &mut ProcessGuard {
        &mut self.process
    }
}

// -------------------------------------------------------------------------------------------------
// Small data helpers

/// Deterministic pseudo-random bytes (xorshift), so test data is reproducible without a dependency.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Extracts the JSON object fio prints after its "fio: connected to NBD server" chatter.
pub fn fio_json(stdout: &str) -> serde_json::Value {
    let start = stdout
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| stdout.starts_with('{').then_some(0))
        .unwrap_or_else(|| panic!("no JSON object in fio output:\n{stdout}"));
    serde_json::from_str(&stdout[start..])
        .unwrap_or_else(|e| panic!("fio JSON does not parse ({e}):\n{stdout}"))
}

// -------------------------------------------------------------------------------------------------
// Interactive tools

/// A long-running interactive tool (for example `qemu-io` reading commands from stdin), so a test can
/// hold a connection open across fault changes and watch what that connection sees.
pub struct Interactive {
    process: ProcessGuard,
    stdin: Option<std::process::ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Interactive {
    pub fn spawn(name: &str, cmd: &mut Command) -> Interactive {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"));
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Interactive {
            process: ProcessGuard::adopt(name, child),
            stdin,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Sends one command line.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to the tool's stdin");
        stdin.flush().expect("flush the tool's stdin");
    }

    /// Waits up to `timeout` for an output line containing `needle`; returns it, or `None`.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Everything read so far, for failure messages.
    pub fn transcript(&self) -> String {
        self.seen.join("\n")
    }

    /// Closes stdin (the tool's cue to quit) and waits for it to exit; kills it after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Option<ExitStatus> {
        self.stdin = None;
        let status = self.process.wait_timeout(timeout);
        if status.is_none() {
            self.process.kill();
        }
        status
    }
}

// -------------------------------------------------------------------------------------------------
// The multipath daemon fixture

/// A running `lunmpio serve` with its config, state directory and control socket in its own temporary
/// directory, exporting on a free TCP port.
pub struct Daemon {
    // Field order matters: the process dies before its directory is removed.
    process: ProcessGuard,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// `127.0.0.1:PORT` of the NBD exports.
    pub nbd: String,
    /// `127.0.0.1:PORT` of /metrics, when the config asked for it.
    pub metrics: Option<String>,
    stderr: LogTail,
    /// Sockets handed over as by systemd, when started with [`Daemon::spawn_activated`].
    activation: Option<Arc<Activation>>,
    /// The program file it runs (`lunmpio_bin()` unless [`Daemon::spawn_program`]).
    pub program: PathBuf,
    pub dir: tempfile::TempDir,
}

const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Starts a daemon whose config is `[daemon]` (generated: free ports, sockets and state in a
    /// temporary directory, metrics on, two data threads) plus `rest` (`[defaults]` and `[[lun]]`
    /// tables). Two data threads whatever the machine's CPUs, so that a config with several LUNs
    /// spreads them over threads (connections moved between runtimes) on every machine.
    pub fn spawn(rest: &str) -> Daemon {
        let dir = tempdir();
        let config = dir.path().join("lunmpio.toml");
        let socket = dir.path().join("control.sock");
        let text = format!(
            "[daemon]\nnbd_listen = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\nmetrics_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nshutdown_timeout = \"5s\"\ndata_threads = 2\n\n{rest}",
            socket.display(),
            dir.path().join("state").display()
        );
        std::fs::write(&config, text).expect("write config");
        Daemon::start(dir, config, socket)
    }

    fn start(dir: tempfile::TempDir, config: PathBuf, socket: PathBuf) -> Daemon {
        Daemon::launch(dir, config, socket, None, lunmpio_bin().to_path_buf())
    }

    /// Like [`Daemon::spawn`], running a copy of the lunmpio program at `dir/bin/lunmpio` (a file
    /// the test may replace, as a package upgrade does, before `lunmpio upgrade`).
    pub fn spawn_program(rest: &str) -> Daemon {
        let dir = tempdir();
        let config = dir.path().join("lunmpio.toml");
        let socket = dir.path().join("control.sock");
        std::fs::write(
            &config,
            config_text(&dir, &socket, "data_threads = 2", rest),
        )
        .expect("write config");
        let program = dir.path().join("bin").join("lunmpio");
        std::fs::create_dir_all(program.parent().unwrap()).unwrap();
        std::fs::copy(lunmpio_bin(), &program).expect("copy the program");
        Daemon::launch(dir, config, socket, None, program)
    }

    fn launch(
        dir: tempfile::TempDir,
        config: PathBuf,
        socket: PathBuf,
        activation: Option<Arc<Activation>>,
        program: PathBuf,
    ) -> Daemon {
        let mut cmd = Command::new(&program);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info");
        if let Some(a) = &activation {
            cmd = a.apply(cmd);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn lunmpio serve");
        let stdout = child.stdout.take().expect("stdout pipe");
        let stderr_pipe = child.stderr.take().expect("stderr pipe");
        let mut process = ProcessGuard::adopt("lunmpio serve", child);
        let stderr = tail_lines(stderr_pipe, 2000);
        let rx = line_channel(stdout);
        let ready = match rx.recv_timeout(DAEMON_START_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let status = process.try_wait();
                let log = stderr.text();
                panic!(
                    "lunmpio serve did not report ready within {DAEMON_START_TIMEOUT:?} (exit: {status:?}); log:\n{log}"
                );
            }
        };
        let field = |name: &str| -> Option<String> {
            ready
                .split(';')
                .map(str::trim)
                .find_map(|part| part.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let nbd = field("nbd ").unwrap_or_else(|| panic!("no nbd address in {ready:?}"));
        let metrics = field("metrics ");
        Daemon {
            process,
            socket,
            config,
            nbd,
            metrics,
            stderr,
            activation,
            program,
            dir,
        }
    }

    /// `nbd://127.0.0.1:PORT/LUN`
    pub fn uri(&self, lun: &str) -> String {
        format!("nbd://{}/{lun}", self.nbd)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn log(&self) -> String {
        self.stderr.text()
    }

    /// One JSON-RPC call over the control socket.
    pub fn rpc(
        &self,
        method: &str,
        params: serde_json::Value,
    ) -> Result<serde_json::Value, lunmpio_rpc::RpcError> {
        let mut client = lunmpio_rpc::client::Client::connect(&self.socket)
            .expect("connect to the control socket");
        match client.call(method, params) {
            Ok(v) => Ok(v),
            Err(lunmpio_rpc::client::ClientError::Rpc(e)) => Err(e),
            Err(e) => panic!("control socket failed: {e}\nlog:\n{}", self.log()),
        }
    }

    /// An `rpc` that must succeed.
    pub fn rpc_ok(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.rpc(method, params.clone())
            .unwrap_or_else(|e| panic!("{method} {params} failed: {e}\nlog:\n{}", self.log()))
    }

    /// The HRESULT name of a call that must fail.
    pub fn rpc_err(&self, method: &str, params: serde_json::Value) -> lunmpio_rpc::RpcError {
        match self.rpc(method, params.clone()) {
            Ok(v) => panic!("{method} {params} succeeded ({v}) but should have failed"),
            Err(e) => e,
        }
    }

    /// `lunmpio …` pointed at this daemon's socket.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(lunmpio_bin());
        c.env("LUNMPIO_SOCKET", &self.socket).env("LC_ALL", "C");
        c
    }

    /// GetStatistics' per-path `ios`, in GetPathInfo order.
    pub fn path_ios(&self, lun: &str) -> Vec<u64> {
        self.statistics(lun).paths.iter().map(|p| p.ios).collect()
    }

    /// A typed client of the control socket (the management contract's own types).
    pub fn client(&self) -> lunmpio_rpc::client::Client {
        lunmpio_rpc::client::Client::connect(&self.socket)
            .unwrap_or_else(|e| panic!("control socket: {e}\nlog:\n{}", self.log()))
    }

    /// GetPathInfo, typed.
    pub fn path_info(&self, lun: &str) -> lunmpio_rpc::PathInfoList {
        self.client()
            .get_path_info(lun)
            .unwrap_or_else(|e| panic!("GetPathInfo {lun}: {e}\nlog:\n{}", self.log()))
    }

    /// GetStatistics, typed.
    pub fn statistics(&self, lun: &str) -> lunmpio_rpc::Statistics {
        self.client()
            .get_statistics(lun)
            .unwrap_or_else(|e| panic!("GetStatistics {lun}: {e}\nlog:\n{}", self.log()))
    }

    /// One path of GetPathInfo, by name.
    pub fn path(&self, lun: &str, path: &str) -> lunmpio_rpc::PathInfo {
        let info = self.path_info(lun);
        info.paths
            .into_iter()
            .find(|p| p.name == path)
            .unwrap_or_else(|| panic!("no path {path} in LUN {lun}"))
    }

    /// GetPathInfo's status name of a path, by name.
    pub fn path_status(&self, lun: &str, path: &str) -> String {
        self.path(lun, path).status_name
    }

    /// Waits until a path reports `status` (e.g. "VDS_MPS_FAILED").
    pub fn wait_path_status(&self, lun: &str, path: &str, status: &str, timeout: Duration) {
        let ok = wait_until(timeout, || self.path_status(lun, path) == status);
        assert!(
            ok,
            "path {path} of {lun} did not become {status} within {timeout:?}; now {}; log:\n{}",
            self.path_status(lun, path),
            self.log()
        );
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.process.signal(Signal::SIGTERM);
        match self.process.wait_timeout(timeout) {
            Some(s) => {
                self.stderr.wait_ended(LOG_END_WAIT);
                s
            }
            None => {
                self.process.kill();
                panic!(
                    "lunmpio serve did not exit within {timeout:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Stops the daemon (SIGTERM) and starts it again with the same config and state directory.
    pub fn restart(self) -> Daemon {
        self.stop_and_start(Signal::SIGTERM, |text| text)
    }

    /// Kills the daemon with SIGKILL (a crash: nothing is flushed or saved on the way out), lets
    /// `edit` change its config file, and starts it again with the same state directory.
    pub fn crash_and_restart(self, edit: impl FnOnce(String) -> String) -> Daemon {
        self.stop_and_start(Signal::SIGKILL, edit)
    }

    fn stop_and_start(self, signal: Signal, edit: impl FnOnce(String) -> String) -> Daemon {
        let Daemon {
            mut process,
            socket,
            config,
            dir,
            activation,
            program,
            ..
        } = self;
        process.signal(signal);
        assert!(
            process.wait_timeout(Duration::from_secs(15)).is_some(),
            "daemon did not stop ({signal}) for a restart"
        );
        drop(process);
        let text = std::fs::read_to_string(&config).expect("read the config");
        std::fs::write(&config, edit(text)).expect("write the config");
        Daemon::launch(dir, config, socket, activation, program)
    }

    /// GetPathInfo's status reason of a path, by name ("" when it has none).
    pub fn path_reason(&self, lun: &str, path: &str) -> String {
        self.path(lun, path).status_reason
    }

    pub fn process(&mut self) -> &mut ProcessGuard {
        &mut self.process
    }
}

/// `[[lun]]` TOML for a LUN over the given path URIs, named p0, p1, ….
pub fn lun_toml(name: &str, policy: &str, uris: &[String]) -> String {
    let mut t = format!("[[lun]]\nname = \"{name}\"\npolicy = \"{policy}\"\n");
    for (i, uri) in uris.iter().enumerate() {
        t += &format!("[[lun.path]]\nuri = \"{uri}\"\nname = \"p{i}\"\n");
    }
    t
}

// -------------------------------------------------------------------------------------------------
// Helpers of the `serve_*` suites (lunmpio serve end to end)

/// A Unix-socket NBD server we did not write (qemu-nbd, nbdkit), started in a guard; returns once the
/// socket accepts connections. Fails with the server's output if it dies first.
pub fn spawn_unix_server(name: &str, cmd: &mut Command, socket: &Path) -> ProcessGuard {
    let mut guard = ProcessGuard::spawn(name, cmd);
    let up = wait_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(socket).is_ok() || !guard.is_running()
    });
    if !(up && guard.is_running()) {
        guard.kill();
        let (out, err) = guard.output_so_far();
        panic!(
            "{name} did not come up on {} (`{}`):\n{out}\n{err}",
            socket.display(),
            describe(cmd)
        );
    }
    guard
}

/// A TCP NBD server we did not write, started in a guard; returns once 127.0.0.1:`port` accepts
/// connections. Fails with the server's output if it dies first.
pub fn spawn_tcp_server(name: &str, cmd: &mut Command, port: u16) -> ProcessGuard {
    let mut guard = ProcessGuard::spawn(name, cmd);
    let up = wait_until(Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || !guard.is_running()
    });
    if !(up && guard.is_running()) {
        guard.kill();
        let (out, err) = guard.output_so_far();
        panic!(
            "{name} did not come up on port {port} (`{}`):\n{out}\n{err}",
            describe(cmd)
        );
    }
    guard
}

/// `nbd+unix:///EXPORT?socket=PATH`
pub fn unix_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Per-path counters from GetStatistics, by path name.
pub fn path_counter(stats: &serde_json::Value, path: &str, counter: &str) -> u64 {
    stats["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == path)
        .unwrap_or_else(|| panic!("no path {path} in {stats}"))[counter]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {counter} for {path} in {stats}"))
}

/// Runs an async block on a fresh current-thread runtime (the test binaries are synchronous).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// Connects our own NBD client to `export` at `addr` (`127.0.0.1:PORT`).
pub async fn nbd_connect(addr: &str, export: &str) -> lunmpio_nbd::client::Client {
    let (host, port) = addr.rsplit_once(':').expect("HOST:PORT");
    let endpoint = lunmpio_nbd::client::Endpoint::Tcp {
        host: host.to_string(),
        port: port.parse().expect("port"),
        bind: None,
    };
    lunmpio_nbd::client::Client::connect(lunmpio_nbd::client::ConnectOptions::new(endpoint, export))
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}/{export}: {e}"))
}

/// Exactly `count` 4 KiB reads through the export, one at a time, then a clean disconnect.
pub fn drive_reads(addr: &str, export: &str, count: usize) {
    block_on(async {
        let client = nbd_connect(addr, export).await;
        for i in 0..count {
            let offset = (i as u64 % 1024) * 4096;
            client
                .read(offset, 4096)
                .await
                .unwrap_or_else(|e| panic!("read {i} at {offset} failed: {e}"));
        }
        client.disconnect().await;
    });
}

/// One HTTP/1.1 GET over a plain TCP connection: (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http_get_with(addr, path, "");
    (status, body)
}

/// `GET path` with extra header lines (`"Accept: ...\r\n"`): the status, the response's header
/// block and its body.
pub fn http_get_with(addr: &str, path: &str, headers: &str) -> (u16, String, String) {
    use std::io::Write;
    let mut s =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the HTTP response");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// fio's verified random-write job through an NBD URI, as a command (the caller runs or spawns it).
pub fn fio_verify_command(uri: &str, size: &str, workdir: &Path) -> Command {
    let mut c = tool("fio");
    c.current_dir(workdir).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        &format!("--size={size}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--continue_on_error=none",
        "--output-format=json",
    ]);
    c
}

/// A daemon config: generated `[daemon]` keys (free ports, files in `dir`), replaced by those of
/// `daemon_extra` with the same name, then `rest`.
fn config_text(dir: &tempfile::TempDir, socket: &Path, daemon_extra: &str, rest: &str) -> String {
    let overridden: Vec<&str> = daemon_extra
        .lines()
        .filter_map(|l| l.split('=').next())
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    let mut text = String::from("[daemon]\n");
    for (k, v) in [
        ("nbd_listen", "\"127.0.0.1:0\"".to_string()),
        ("control_socket", format!("\"{}\"", socket.display())),
        ("metrics_listen", "\"127.0.0.1:0\"".to_string()),
        (
            "state_dir",
            format!("\"{}\"", dir.path().join("state").display()),
        ),
        ("shutdown_timeout", "\"5s\"".to_string()),
    ] {
        if !overridden.contains(&k) {
            text += &format!("{k} = {v}\n");
        }
    }
    text += daemon_extra;
    text += "\n\n";
    text += rest;
    text
}

/// Listening sockets held by the test as systemd holds them for a `.socket` unit: bound once, passed
/// to every daemon started on them (descriptors 3 and 4, named `nbd` and `control`).
pub struct Activation {
    pub nbd_addr: std::net::SocketAddr,
    /// Copies at high descriptor numbers, so moving them to 3 and 4 in the child never overwrites
    /// one with the other.
    nbd: std::os::fd::OwnedFd,
    control: std::os::fd::OwnedFd,
}

impl Activation {
    fn bind(control_socket: &Path) -> Activation {
        let nbd = TcpListener::bind("127.0.0.1:0").expect("bind the NBD listener");
        let nbd_addr = nbd.local_addr().expect("local address");
        let control = std::os::unix::net::UnixListener::bind(control_socket)
            .expect("bind the control socket");
        Activation {
            nbd_addr,
            nbd: high_copy(std::os::fd::OwnedFd::from(nbd)),
            control: high_copy(std::os::fd::OwnedFd::from(control)),
        }
    }

    /// Makes `cmd` receive the sockets: `sh` sets `LISTEN_PID` to its own PID and `exec`s the
    /// program, which keeps that PID.
    fn apply(&self, cmd: Command) -> Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let mut wrapped = Command::new("sh");
        wrapped
            .arg("-c")
            .arg("export LISTEN_PID=$$; exec \"$0\" \"$@\"")
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "nbd:control");
        for (k, v) in cmd.get_envs() {
            if let Some(v) = v {
                wrapped.env(k, v);
            }
        }
        let (nbd, control) = (self.nbd.as_raw_fd(), self.control.as_raw_fd());
        // SAFETY: only dup2 (async-signal-safe) between fork and exec.
        unsafe {
            wrapped.pre_exec(move || {
                if libc::dup2(nbd, 3) < 0 || libc::dup2(control, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        wrapped
    }
}

fn high_copy(fd: std::os::fd::OwnedFd) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we own, or -1.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
    assert!(copy >= 0, "dup: {}", std::io::Error::last_os_error());
    unsafe { std::os::fd::OwnedFd::from_raw_fd(copy) }
}

impl Daemon {
    /// Like [`Daemon::spawn`], with extra `[daemon]` keys (`daemon_extra`, one `key = value` a line)
    /// replacing the generated ones of the same name.
    pub fn spawn_with(daemon_extra: &str, rest: &str) -> Daemon {
        let dir = tempdir();
        let config = dir.path().join("lunmpio.toml");
        let socket = dir.path().join("control.sock");
        std::fs::write(&config, config_text(&dir, &socket, daemon_extra, rest))
            .expect("write config");
        Daemon::start(dir, config, socket)
    }

    /// Like [`Daemon::spawn_with`], with the NBD listener and the control socket bound by the test
    /// and handed to the daemon the way systemd does (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`).
    /// The test keeps them: every restart of this daemon gets the same sockets, and connections
    /// made while it is down wait in their backlog.
    pub fn spawn_activated(daemon_extra: &str, rest: &str) -> Daemon {
        let dir = tempdir();
        let config = dir.path().join("lunmpio.toml");
        let socket = dir.path().join("control.sock");
        let activation = Arc::new(Activation::bind(&socket));
        let extra = format!("nbd_listen = \"{}\"\n{daemon_extra}", activation.nbd_addr);
        std::fs::write(&config, config_text(&dir, &socket, &extra, rest)).expect("write config");
        Daemon::launch(
            dir,
            config,
            socket,
            Some(activation),
            lunmpio_bin().to_path_buf(),
        )
    }

    /// The full GetStatistics answer.
    pub fn stats(&self, lun: &str) -> serde_json::Value {
        self.rpc_ok("GetStatistics", serde_json::json!({ "lun": lun }))
    }

    /// GetPathInfo's `pathId` object of a path, by name.
    pub fn path_id(&self, lun: &str, path: &str) -> serde_json::Value {
        serde_json::to_value(self.path(lun, path).path_id).expect("a path id is JSON")
    }

    /// Waits until the LUN has moved at least `ios` more requests than `since` (summed over paths).
    pub fn wait_io_moving(&self, lun: &str, since: u64, ios: u64, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.path_ios(lun).iter().sum::<u64>() >= since + ios
        })
    }
}

// -------------------------------------------------------------------------------------------------
// nbdfuse + loop device + ext4

/// Unmounts a FUSE mount point on drop (the nbdfuse process then exits on its own).
pub struct FuseMount {
    dir: PathBuf,
    nbdfuse: Option<ProcessGuard>,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        let _ = run(
            tool("fusermount3").arg("-u").arg(&self.dir),
            Duration::from_secs(20),
        );
        if let Some(mut p) = self.nbdfuse.take() {
            // nbdfuse exits once unmounted; the guard kills it by PID if it does not.
            p.wait_timeout(Duration::from_secs(10));
        }
    }
}

/// Detaches a loop device on drop.
pub struct LoopDevice(pub String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run(
            tool("losetup").args(["-d", &self.0]),
            Duration::from_secs(20),
        );
    }
}

/// Unmounts a file system on drop; lazily if a plain unmount fails.
pub struct Mounted {
    dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    pub fn unmount(&mut self) {
        run_ok(tool("umount").arg(&self.dir));
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let out = run(tool("umount").arg(&self.dir), Duration::from_secs(20));
            if !out.status.success() {
                let _ = run(
                    tool("umount").arg("-l").arg(&self.dir),
                    Duration::from_secs(20),
                );
            }
        }
    }
}

pub fn mount_nbdfuse(dir: &Path, uri: &str) -> FuseMount {
    let pidfile = dir.with_extension("pid");
    let process = ProcessGuard::spawn(
        "nbdfuse",
        tool("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg(uri),
    );
    let mut mount = FuseMount {
        dir: dir.to_path_buf(),
        nbdfuse: Some(process),
    };
    // nbdfuse writes its pid file once it serves the mount point.
    let ready = wait_until(Duration::from_secs(20), || {
        pidfile.exists() || !mount.nbdfuse.as_mut().unwrap().is_running()
    });
    let running = mount.nbdfuse.as_mut().unwrap().is_running();
    if !(ready && running) {
        let (out, err) = mount.nbdfuse.as_ref().unwrap().output_so_far();
        panic!("nbdfuse did not come up (ready {ready}, running {running}):\n{out}\n{err}");
    }
    mount
}

/// The kernel-client check shared by the target's and the daemon's suites: nbdfuse exposes `uri` as a
/// file, a loop device turns it into a block device, ext4 is created, mounted, written (3 MiB),
/// unmounted and checked clean with `fsck.ext4 -fn`. Every step that changes system state has a guard
/// that undoes it on drop, in reverse order, so a failing assertion leaves no mount, loop device or
/// FUSE mount behind.
pub fn ext4_on_nbdfuse(uri: &str, size_bytes: u64) {
    for (t, p) in [
        ("nbdfuse", "nbdfuse"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("fsck.ext4", "e2fsprogs"),
    ] {
        require_tool(t, p);
    }
    let dir = tempdir();
    let fuse_dir = dir.path().join("fuse");
    let fs_dir = dir.path().join("fs");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&fs_dir).unwrap();

    let fuse = mount_nbdfuse(&fuse_dir, uri);
    let disk = fuse_dir.join("disk");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), size_bytes);

    let out = run_ok(tool("losetup").args(["-f", "--show"]).arg(&disk));
    let device = LoopDevice(stdout_text(&out).trim().to_string());
    assert!(
        device.0.starts_with("/dev/loop"),
        "losetup printed {:?}",
        device.0
    );

    run_ok(tool("mkfs.ext4").args(["-q", &device.0]));
    run_ok(tool("mount").arg(&device.0).arg(&fs_dir));
    let mut mounted = Mounted {
        dir: fs_dir.clone(),
        mounted: true,
    };
    let payload = pseudo_random(3 << 20, 99);
    std::fs::write(fs_dir.join("hello.bin"), &payload).unwrap();
    run_ok(Command::new("sync").arg("-f").arg(fs_dir.join("hello.bin")));
    assert_eq!(std::fs::read(fs_dir.join("hello.bin")).unwrap(), payload);
    mounted.unmount();

    let out = run(tool("fsck.ext4").args(["-fn", &device.0]), TOOL_TIMEOUT);
    assert!(
        out.status.success(),
        "fsck.ext4 found problems ({}):\n{}{}",
        out.status,
        stdout_text(&out),
        stderr_text(&out)
    );
    drop(mounted);
    drop(device);
    drop(fuse);
}

// -------------------------------------------------------------------------------------------------
// Child output plumbing shared by the fixtures

/// Every line of a child's pipe into a channel, so a test can wait for a line with a deadline.
fn line_channel(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The last `max` lines of a child's pipe, kept for failure messages (bounded: logs can be long).
/// The last lines a child wrote to a pipe, read in the background, and whether the pipe has ended.
struct LogTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    ended: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl LogTail {
    fn text(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (bounded) until the reader has seen the end of the pipe: once the child has exited,
    /// its last lines are then in `text()`.
    fn wait_ended(&self, timeout: Duration) {
        let (ended, changed) = &*self.ended;
        let guard = ended.lock().unwrap();
        let _ = changed
            .wait_timeout_while(guard, timeout, |ended| !*ended)
            .unwrap();
    }
}

fn tail_lines(pipe: impl Read + Send + 'static, max: usize) -> LogTail {
    let lines = Arc::new(Mutex::new(VecDeque::new()));
    let ended = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (sink, done) = (lines.clone(), ended.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut q = sink.lock().unwrap();
            if q.len() >= max {
                q.pop_front();
            }
            q.push_back(line);
        }
        *done.0.lock().unwrap() = true;
        done.1.notify_all();
    });
    LogTail { lines, ended }
}

/// How long a log's last lines may take to arrive after its process exited.
const LOG_END_WAIT: Duration = Duration::from_secs(5);

// -------------------------------------------------------------------------------------------------
// Files

/// A raw file of `size` bytes: pseudo-random data in the first `data` bytes, zeroes after.
pub fn make_raw(path: &Path, size: u64, data: u64, seed: u64) -> Vec<u8> {
    let mut bytes = pseudo_random(data as usize, seed);
    bytes.resize(size as usize, 0);
    std::fs::write(path, &bytes).unwrap();
    bytes
}

pub fn assert_same_file(path: &Path, expected: &[u8]) {
    let got = std::fs::read(path).unwrap();
    assert_eq!(
        got.len(),
        expected.len(),
        "{} has the wrong size",
        path.display()
    );
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{} differs from the source at byte {at}", path.display());
    }
}
