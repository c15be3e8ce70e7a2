//! `lunmpio top` under a real pseudo-terminal (tmux): the screen shows the daemon's paths and their
//! statuses as they change, keys change the policy and a path's status through a confirmation that
//! shows the VDS result, `q` ends it cleanly, and a daemon that goes away ends it with the reason.

use std::time::Duration;

use lunmpio_testkit::tmux::Tmux;
use lunmpio_testkit::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// The STATUS column of `path`'s row in the paths table.
fn status<'s>(screen: &'s str, path: &str) -> Option<&'s str> {
    screen
        .lines()
        .find(|l| l.starts_with(&format!("{path} ")))
        .and_then(|l| l.split_whitespace().nth(1))
}

fn online(screen: &str, paths: &[&str]) -> bool {
    paths.iter().all(|p| status(screen, p) == Some("ONLINE"))
}

fn top(daemon: &Daemon, width: u16, height: u16) -> Tmux {
    let bin = lunmpio_bin();
    let socket = daemon.socket.display().to_string();
    Tmux::start(
        &[
            bin.to_str().unwrap(),
            "top",
            "--socket",
            &socket,
            "--interval",
            "200ms",
        ],
        width,
        height,
    )
}

#[test]
fn top_shows_paths_and_changes_policy_and_path_status_on_keys() {
    let target = TargetSpec::memory("32MiB", 2).spawn();
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    let screen = top(&daemon, 80, 24);
    screen.wait_screen("both paths online", WAIT, |s| {
        online(s, &["p0", "p1"]) && s.contains("usable 2/2")
    });

    // A port of the target goes down: the screen follows, with the event.
    target.fault(1, "down");
    // The event is part of the wait: it is drawn below the table, and a capture can catch a frame
    // half drawn.
    screen.wait_screen("p1 failed, and the event listed", WAIT, |s| {
        status(s, "p1") == Some("FAILED")
            && online(s, &["p0"])
            && s.contains("usable 1/2")
            && s.contains("lun0/p1 → FAILED")
    });
    target.fault(1, "up");
    screen.wait_screen("p1 back", WAIT, |s| online(s, &["p0", "p1"]));

    // p: the supported policies, starting at the current one (round-robin); two down is
    // least-queue-depth; Enter asks; y sets it and shows the VDS result.
    screen.keys(&["p"]);
    screen.wait_screen("the policy list", WAIT, |s| s.contains("> round-robin (2)"));
    screen.keys(&["Down", "Down"]);
    screen.wait_screen("least-queue-depth selected", WAIT, |s| {
        s.contains("> least-queue-depth (4)")
    });
    screen.keys(&["Enter"]);
    screen.wait_screen("the confirmation", WAIT, |s| {
        s.contains("set the policy of lun0 to least-queue-depth?")
    });
    screen.keys(&["y"]);
    screen.wait_screen("the result", WAIT, |s| {
        s.contains("SetLoadBalancePolicy lun0 least-queue-depth: S_OK")
            && s.contains("policy least-queue-depth")
    });
    let policy = daemon.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    assert_eq!(policy["policy"], 4, "{policy}");

    // Select p1 (the rows are in path-id order; the first is selected), f asks, n cancels, f
    // then y fails it (administratively); r, y reinstates.
    let rows: Vec<String> = screen
        .screen()
        .lines()
        .filter(|l| l.starts_with("p0 ") || l.starts_with("p1 "))
        .map(str::to_string)
        .collect();
    if rows[0].starts_with("p0 ") {
        screen.keys(&["Down"]);
    }
    screen.keys(&["f"]);
    screen.wait_screen("the question", WAIT, |s| {
        s.contains("fail path p1 of lun0?")
    });
    screen.keys(&["n"]);
    screen.wait_screen("cancelled", WAIT, |s| s.contains("cancelled"));
    assert_eq!(daemon.path_status("lun0", "p1"), "VDS_MPS_ONLINE");
    screen.keys(&["f"]);
    screen.wait_screen("the question", WAIT, |s| {
        s.contains("fail path p1 of lun0?")
    });
    screen.keys(&["y"]);
    screen.wait_screen("p1 failed by hand", WAIT, |s| {
        s.contains("SetPathStatus lun0/p1 VDS_MPS_FAILED: S_OK")
            && status(s, "p1") == Some("FAILED")
    });
    assert_eq!(daemon.path_status("lun0", "p1"), "VDS_MPS_FAILED");
    screen.keys(&["r"]);
    screen.wait_screen("the question", WAIT, |s| {
        s.contains("reinstate path p1 of lun0?")
    });
    screen.keys(&["y"]);
    screen.wait_screen("p1 reinstated", WAIT, |s| online(s, &["p0", "p1"]));

    screen.keys(&["q"]);
    assert_eq!(screen.wait_exit(WAIT), 0, "q ends it cleanly");
}

/// The console fits 80x24 and grows with the window: at 132x40 the reason column has room.
#[test]
fn top_grows_with_the_window_and_a_gone_daemon_ends_it_with_the_reason() {
    let target = TargetSpec::memory("32MiB", 2).spawn();
    let mut daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    target.fault(0, "down");
    daemon.wait_path_status("lun0", "p0", "VDS_MPS_FAILED", WAIT);
    let screen = top(&daemon, 132, 40);
    // Waited for as a whole: a capture can catch a frame half drawn (the status cell written, the
    // rest of the row not yet), which is how an assertion after a narrower wait failed under load.
    let row_of = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("p0 "))
            .unwrap_or_default()
            .trim_end()
            .to_owned()
    };
    // The row uses the wider screen (the reason column shows from 120 columns); the wait fails
    // with the last screen if it never does.
    screen.wait_screen("the failed path's row using the wider screen", WAIT, |s| {
        status(s, "p0") == Some("FAILED") && s.contains("REASON") && row_of(s).len() > 80
    });

    daemon.process().kill();
    let status = screen.wait_exit(WAIT);
    assert_ne!(status, 0, "a gone daemon is an error exit");
    let s = screen.scrollback();
    assert!(
        s.contains("the daemon went away"),
        "the reason is printed:\n{s}"
    );
}

/// Ctrl-C quits too, and a socket with no daemon behind it is a plain error before the screen
/// is taken over.
#[test]
fn ctrl_c_quits_and_a_missing_daemon_is_a_plain_error() {
    let target = TargetSpec::memory("32MiB", 1).spawn();
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    let screen = top(&daemon, 80, 24);
    screen.wait_screen("the path", WAIT, |s| online(s, &["p0"]));
    screen.keys(&["C-c"]);
    assert_eq!(screen.wait_exit(WAIT), 0);

    let dir = tempdir();
    let out = run(
        std::process::Command::new(lunmpio_bin())
            .args(["top", "--socket"])
            .arg(dir.path().join("none.sock")),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    assert!(
        stderr_text(&out).contains("cannot connect to the daemon"),
        "{}",
        stderr_text(&out)
    );
}
