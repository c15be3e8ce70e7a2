//! Live upgrade (issue 13 §2): `lunmpio upgrade` replaces the running program with the file it was
//! started from. The PID, the listeners and every client connection stay; client I/O pauses and
//! never fails. A broken program, a broken config, I/O stuck with every path down, or a reload at
//! the same time each leave a serving daemon and a clear message.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use lunmpio_testkit::fio::Fio;
use lunmpio_testkit::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn lun(name: &str, extra: &str, paths: &[(&str, &str)]) -> String {
    let mut t = format!("[[lun]]\nname = \"{name}\"\npolicy = \"round-robin\"\n{extra}");
    for (path, uri) in paths {
        t += &format!("[[lun.path]]\nuri = \"{uri}\"\nname = \"{path}\"\n");
    }
    t
}

/// Writes a new `[[lun]]` part under the daemon's generated `[daemon]` table.
fn rewrite(daemon: &Daemon, rest: &str) {
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let (head, _) = text.split_once("\n\n").expect("[daemon] then the rest");
    std::fs::write(&daemon.config, format!("{head}\n\n{rest}")).unwrap();
}

/// A new program file at the daemon's program path, replacing the old one the way a package manager
/// does (a new file renamed over it). Returns the new file's inode.
fn install_new_program(daemon: &Daemon, marker: &str) -> u64 {
    let mut bytes = std::fs::read(lunmpio_bin()).unwrap();
    bytes.extend_from_slice(marker.as_bytes()); // trailing bytes: still the same program, a new file
    replace_program(&daemon.program, &bytes, 0o755)
}

/// Puts a new file at `path` (written beside it, renamed over it: the running file is never
/// written to). Returns its inode.
fn replace_program(path: &Path, bytes: &[u8], mode: u32) -> u64 {
    let staged = path.with_extension("new");
    std::fs::write(&staged, bytes).unwrap();
    set_mode(&staged, mode);
    std::fs::rename(&staged, path).unwrap();
    std::fs::metadata(path).unwrap().ino()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The inode of the program the process runs now.
fn running_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
}

fn upgrade(daemon: &Daemon) -> Output {
    run(daemon.cli().arg("upgrade"), Duration::from_secs(150))
}

fn upgrade_ok(daemon: &Daemon) {
    let out = upgrade(daemon);
    assert!(
        out.status.success(),
        "upgrade failed: {}{}\nlog:\n{}",
        stdout_text(&out),
        stderr_text(&out),
        daemon.log()
    );
    assert!(
        stdout_text(&out).contains("upgraded: pid"),
        "{}",
        stdout_text(&out)
    );
}

fn reload_ok(daemon: &Daemon) -> Value {
    let out = run_ok(daemon.cli().args(["reload", "--json"]));
    serde_json::from_str(&stdout_text(&out)).unwrap()
}

fn info(daemon: &Daemon) -> Value {
    let out = run_ok(daemon.cli().args(["daemon", "--json"]));
    serde_json::from_str(&stdout_text(&out)).unwrap()
}

fn total_ios(daemon: &Daemon, lun: &str) -> u64 {
    daemon.path_ios(lun).iter().sum()
}

/// Waits until `lun` has served `more` requests beyond now (I/O flows after a step).
fn wait_progress(daemon: &Daemon, lun: &str, more: u64) {
    let start = total_ios(daemon, lun);
    assert!(
        wait_until(WAIT, || total_ios(daemon, lun) >= start + more),
        "no I/O progress on {lun}; log:\n{}",
        daemon.log()
    );
}

fn nbdinfo_ok(uri: &str) -> bool {
    require_tool("nbdinfo", "libnbd-bin");
    run(tool("nbdinfo").arg(uri), WAIT).status.success()
}

#[test]
fn three_upgrades_and_two_reloads_under_verified_io_lose_nothing() {
    let target = TargetSpec::memory("64MiB", 4).spawn();
    let other = TargetSpec::memory("16MiB", 1).spawn();
    let (t0, t1, t2, t3) = (target.uri(0), target.uri(1), target.uri(2), target.uri(3));
    let three = [("p0", t0), ("p1", t1), ("p2", t2)];
    let daemon = Daemon::spawn_program(&lun("vol", "", &three));
    let pid = daemon.pid();
    let mut fio = Fio::start(&daemon.uri("vol"), Duration::from_secs(20), &[]);
    wait_progress(&daemon, "vol", 2_000);

    for (round, step) in ["upgrade", "reload", "upgrade", "reload", "upgrade"]
        .iter()
        .enumerate()
    {
        fio.assert_running(step);
        match *step {
            "upgrade" => {
                let inode = install_new_program(&daemon, &format!("round {round}"));
                assert_ne!(running_inode(pid), inode);
                upgrade_ok(&daemon);
                assert_eq!(daemon.pid(), pid);
                assert_eq!(
                    running_inode(pid),
                    inode,
                    "the running program is the new file"
                );
            }
            _ if round == 1 => {
                // A LUN and a path added.
                let four = [("p0", t0), ("p1", t1), ("p2", t2), ("p3", t3)];
                let text = lun("vol", "", &four) + &lun("extra", "", &[("q0", other.uri(0))]);
                rewrite(&daemon, &text);
                let r = reload_ok(&daemon);
                assert_eq!(r["added"], serde_json::json!(["extra"]), "{r}");
                assert_eq!(r["restarted"], serde_json::json!(["vol"]), "{r}");
                assert!(nbdinfo_ok(&daemon.uri("extra")));
            }
            _ => {
                // The LUN and a path removed again.
                rewrite(
                    &daemon,
                    &lun("vol", "", &[("p0", t0), ("p1", t1), ("p3", t3)]),
                );
                let r = reload_ok(&daemon);
                assert_eq!(r["removed"], serde_json::json!(["extra"]), "{r}");
                assert_eq!(r["restarted"], serde_json::json!(["vol"]), "{r}");
            }
        }
        wait_progress(&daemon, "vol", 1_000);
    }
    let report = fio.finish(Duration::from_secs(120));
    report.assert_clean("3 upgrades and 2 reloads under fio");
    eprintln!(
        "3 upgrades + 2 reloads under fio verify QD32: longest completion {} ms, longest gap \
         between completions {} ms, {} MiB verified",
        report.clat_max.as_millis(),
        report.gap_max.as_millis(),
        (report.read_bytes + report.write_bytes) >> 20
    );
    let info = info(&daemon);
    assert_eq!(info["pid"], pid);
    assert_eq!(info["upgrades"], 3, "{info}");
    assert_eq!(info["reloads"], 2, "{info}");
    assert_eq!(info["upgradesFailed"], 0, "{info}");
    // The event log went across every upgrade: numbers only grow, none repeats.
    let events = daemon.rpc_ok("GetEvents", serde_json::json!({}));
    let seqs: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(
        seqs.first() == Some(&1),
        "the first event survived: {seqs:?}"
    );
}

#[test]
fn a_broken_program_file_changes_nothing() {
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let daemon = Daemon::spawn_program(&lun("vol", "", &[("p0", target.uri(0))]));
    let pid = daemon.pid();
    let original = running_inode(pid);
    let program = std::fs::read(lunmpio_bin()).unwrap();
    let cases: [(&str, &[u8], u32); 3] = [
        ("not an executable file", &program, 0o644),
        ("cannot run", b"this is not a program\n", 0o755),
        (
            "does not take over a lunmpio daemon",
            b"#!/bin/sh\necho something else\n",
            0o755,
        ),
    ];
    for (expected, bytes, mode) in cases {
        replace_program(&daemon.program, bytes, mode);
        let out = upgrade(&daemon);
        assert!(!out.status.success());
        let err = stderr_text(&out);
        assert!(
            err.contains(expected) && err.contains("nothing changed"),
            "{expected}: {err}"
        );
    }
    std::fs::remove_file(&daemon.program).unwrap();
    let err = stderr_text(&upgrade(&daemon));
    assert!(err.contains("No such file"), "{err}");
    assert_eq!(daemon.pid(), pid);
    assert_eq!(running_inode(pid), original);
    assert!(nbdinfo_ok(&daemon.uri("vol")));
    assert_eq!(info(&daemon)["upgrades"], 0);
}

#[test]
fn a_takeover_that_fails_hands_back_to_the_old_program_under_io() {
    let target = TargetSpec::memory("64MiB", 2).spawn();
    let paths = [("p0", target.uri(0)), ("p1", target.uri(1))];
    let daemon = Daemon::spawn_program(&lun("vol", "", &paths));
    let pid = daemon.pid();
    let original = running_inode(pid);
    let mut fio = Fio::start(&daemon.uri("vol"), Duration::from_secs(8), &[]);
    wait_progress(&daemon, "vol", 2_000);
    // The new program reads the config file, which no longer parses: it cannot take over.
    install_new_program(&daemon, "new");
    rewrite(&daemon, &format!("{}polcy = 1\n", lun("vol", "", &paths)));
    fio.assert_running("the upgrade");
    let out = upgrade(&daemon);
    let err = stderr_text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("the old program serves again") && err.contains("polcy"),
        "{err}\nlog:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.pid(), pid);
    assert_eq!(running_inode(pid), original, "the old program runs again");
    wait_progress(&daemon, "vol", 1_000);
    let report = fio.finish(Duration::from_secs(60));
    report.assert_clean("a failed takeover under fio");
    let info = info(&daemon);
    assert_eq!(info["upgrades"], 0, "{info}");
    assert_eq!(info["upgradesFailed"], 1, "{info}");
    assert!(
        info["lastUpgradeError"].as_str().unwrap().contains("polcy"),
        "{info}"
    );
}

#[test]
fn an_upgrade_with_every_path_down_and_io_queued_changes_nothing() {
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let daemon = Daemon::spawn_program(&lun(
        "vol",
        "io_timeout = \"1s\"\n",
        &[("p0", target.uri(0))],
    ));
    target.fault(0, "down");
    daemon.wait_path_status("vol", "p0", "VDS_MPS_FAILED", WAIT);
    require_tool("qemu-io", "qemu-utils");
    let mut queued = ProcessGuard::spawn(
        "qemu-io",
        tool("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 4096"])
            .arg(daemon.uri("vol")),
    );
    assert!(wait_until(WAIT, || daemon.statistics("vol").queued_ios > 0));
    let out = upgrade(&daemon);
    let err = stderr_text(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("requests still running") && err.contains("nothing changed"),
        "{err}"
    );
    // The queued write completes once a path is back.
    target.fault(0, "up");
    let status = queued
        .wait_timeout(WAIT)
        .expect("the queued write finished");
    assert!(status.success(), "{:?}", queued.output_so_far());
    assert_eq!(info(&daemon)["upgrades"], 0);
}

#[test]
fn an_upgrade_and_a_reload_at_once_both_happen() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = Daemon::spawn_program(&lun("a", "", &[("p0", target.uri(0))]));
    rewrite(
        &daemon,
        &(lun("a", "", &[("p0", target.uri(0))]) + &lun("b", "", &[("p0", target.uri(1))])),
    );
    install_new_program(&daemon, "concurrent");
    let mut reload = daemon.cli();
    reload.arg("reload");
    let reload = std::thread::spawn(move || run(&mut reload, Duration::from_secs(60)));
    upgrade_ok(&daemon);
    let reloaded = reload.join().unwrap();
    // Serialized: the reload ran first, or it met the upgrade and said so (nothing half-done).
    let said = stderr_text(&reloaded);
    assert!(
        reloaded.status.success() || said.contains("upgrade"),
        "{said}"
    );
    // Either way b is served: added by the reload, or read from the file by the new program.
    assert!(nbdinfo_ok(&daemon.uri("b")));
    assert!(nbdinfo_ok(&daemon.uri("a")));
    assert_eq!(info(&daemon)["upgrades"], 1);
}
