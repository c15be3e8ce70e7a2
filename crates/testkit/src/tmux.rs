//! A full-screen program under a real pseudo-terminal: tmux, on a server of its own per test, with
//! the screen read by `capture-pane` and keys sent by `send-keys`. The guard kills the program by its
//! PID and the tmux server when the test ends.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::{require_tool, wait_until};

static NEXT: AtomicU64 = AtomicU64::new(0);

pub struct Tmux {
    /// `tmux -L NAME`: this test's own server.
    server: String,
    /// Holds the server's config (remain-on-exit, so an ended program's last screen stays).
    _dir: tempfile::TempDir,
    /// Where the program's exit status is written when it ends.
    status_file: PathBuf,
    pub pane_pid: u32,
}

impl Tmux {
    /// Runs `argv` in a new `width`×`height` terminal.
    pub fn start(argv: &[&str], width: u16, height: u16) -> Tmux {
        require_tool("tmux", "tmux");
        let dir = crate::tempdir();
        let conf: PathBuf = dir.path().join("tmux.conf");
        std::fs::write(&conf, "set -g remain-on-exit on\nset -g status off\n").expect("tmux.conf");
        let server = format!(
            "lunmpio-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        // A shell runs the program and writes its exit status to a file: tmux's own record of it
        // (`pane_dead_status`) is not always there when the pane is marked dead.
        let status_file = dir.path().join("exit-status");
        let script = format!("\"$@\"; echo $? > '{}'", status_file.display());
        let out = Command::new("tmux")
            .args(["-L", &server, "-f"])
            .arg(&conf)
            .args([
                "new-session",
                "-d",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
                "--",
                "sh",
                "-c",
                &script,
                "sh",
            ])
            .args(argv)
            .env_remove("TMUX")
            .output()
            .expect("run tmux");
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut t = Tmux {
            server,
            _dir: dir,
            status_file,
            pane_pid: 0,
        };
        t.pane_pid = t.format("#{pane_pid}").trim().parse().expect("pane pid");
        t
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.server])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn format(&self, format: &str) -> String {
        String::from_utf8_lossy(&self.tmux(&["display-message", "-p", format]).stdout).into_owned()
    }

    /// The screen as text, one line per row.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p"]).stdout).into_owned()
    }

    /// The screen and the lines scrolled off it (what a program printed last, once it has ended).
    pub fn scrollback(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-J", "-S", "-"]).stdout)
            .into_owned()
    }

    /// Waits until the screen satisfies `want`; fails the test with the last screen otherwise.
    pub fn wait_screen(
        &self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&str) -> bool,
    ) -> String {
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            last = self.screen();
            want(&last)
        });
        assert!(
            ok,
            "the screen never showed {what} within {timeout:?}:\n{last}"
        );
        last
    }

    /// Sends keys (tmux names: `Down`, `Enter`, `Escape`, `C-c`, or literal text).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys"];
        args.extend_from_slice(keys);
        let out = self.tmux(&args);
        assert!(out.status.success(), "send-keys {keys:?}");
    }

    /// The program's exit status once it has ended (None while it runs): its exit code, or 128 +
    /// the signal that killed it, as the shell reports them.
    pub fn exit_status(&self) -> Option<i32> {
        let text = std::fs::read_to_string(&self.status_file).ok()?;
        text.trim().parse().ok()
    }

    /// Waits for the program to end and returns its exit status.
    pub fn wait_exit(&self, timeout: Duration) -> i32 {
        let ok = wait_until(timeout, || self.exit_status().is_some());
        assert!(
            ok,
            "the program did not end within {timeout:?}:\n{}",
            self.screen()
        );
        self.exit_status().expect("ended")
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if self.pane_pid > 0 && self.exit_status().is_none() {
            // SAFETY: kill(2) on the pane's process group (the shell and the program it runs), which
            // this guard started: tmux makes the pane's shell a process group leader.
            unsafe {
                libc::kill(-(self.pane_pid as i32), libc::SIGKILL);
            }
        }
        let _ = self.tmux(&["kill-server"]);
    }
}
