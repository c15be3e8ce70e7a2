//! Nothing acknowledged is ever lost (issue 10, docs/GUARANTEES.md G1 and G3): the stale-write cases.
//!
//! NBD cannot recall a request. A path that hung, or whose connection was reset, may still hold a copy
//! of a write that lunmpio has since re-driven on another path and acknowledged; if that old copy lands
//! after a newer write to the same blocks, the newer data is gone. Each test here builds that race with
//! real processes — our simulated array's `hang`, nbdkit holding a write in its delay filter behind a
//! TCP relay that resets lunmpio's side — and checks what a client reads back at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lunmpio_testkit::relay::ResetRelay;
use lunmpio_testkit::*;
use serde_json::json;

const LUN: &str = "vol";
const FAILED: &str = "VDS_MPS_FAILED";
const WAIT: Duration = Duration::from_secs(30);

/// Waits until a path carries I/O or stands by for it (Failover reports the non-active ones Standby).
fn wait_usable(daemon: &Daemon, path: &str) {
    let ok = wait_until(WAIT, || {
        matches!(
            daemon.path_status(LUN, path).as_str(),
            "VDS_MPS_ONLINE" | "VDS_MPS_STANDBY"
        )
    });
    assert!(
        ok,
        "path {path} is not usable: {}; log:\n{}",
        daemon.path_status(LUN, path),
        daemon.log()
    );
}

/// qemu-io against an NBD URI, one `-c` per command.
fn qemu_io(uri: &str, commands: &[&str]) -> Command {
    require_tool("qemu-io", "qemu-utils");
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in commands {
        c.args(["-c", cmd]);
    }
    c
}

/// Reads `len` bytes at `offset` through `uri` and checks every byte is `pattern`.
fn assert_pattern(uri: &str, offset: u64, len: u64, pattern: u8, what: &str, daemon: &Daemon) {
    let out = run(
        &mut qemu_io(uri, &[&format!("read -P {pattern:#x} {offset} {len}")]),
        TOOL_TIMEOUT,
    );
    let text = format!("{}{}", stdout_text(&out), stderr_text(&out));
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "{what}: the block does not read back {pattern:#x}:\n{text}\nevents:\n{}\nlog:\n{}",
        events_text(daemon),
        daemon.log()
    );
}

fn events_text(daemon: &Daemon) -> String {
    let r = daemon.rpc_ok("GetEvents", json!({ "lun": LUN }));
    r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "#{} {} {}",
                e["seq"],
                e["path"].as_str().unwrap_or("-"),
                e["cause"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn event_causes(daemon: &Daemon) -> Vec<String> {
    let r = daemon.rpc_ok("GetEvents", json!({ "lun": LUN }));
    r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["cause"].as_str().unwrap_or("").to_string())
        .collect()
}

/// Waits for a process to finish within `timeout`; `None` if it is still running then.
fn finished_within(
    guard: &mut ProcessGuard,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    guard.wait_timeout(timeout)
}

// -------------------------------------------------------------------------------------------------
// B1: two hung paths

/// Three controller ports; p0 and p1 hang with a write in flight, so the write is re-driven twice and
/// acknowledged through p2. p1 comes back first and a newer write to the same block is made; then p0
/// resumes and executes the copy it held. Every path that may still hold an old copy must keep the
/// block quarantined — not only the last one (the review found the quarantine remembering only one).
#[test]
fn two_hung_paths_each_keep_their_stale_copy_from_landing_over_newer_data() {
    let target = TargetSpec::memory("16MiB", 3).spawn();
    // Failover by weight: p0 first, then p1, then p2, so the write visits the hung paths in turn.
    let mut config = format!(
        "[defaults]\nio_timeout = \"1s\"\n[[lun]]\nname = \"{LUN}\"\npolicy = \"failover\"\nshared_backing = true\n"
    );
    for (i, weight) in [0, 1, 2].iter().enumerate() {
        config += &format!(
            "[[lun.path]]\nuri = \"{}\"\nname = \"p{i}\"\nweight = {weight}\nprimary = {}\n",
            target.uri(i),
            i == 0
        );
    }
    let daemon = Daemon::spawn(&config);
    for i in 0..3 {
        wait_usable(&daemon, &format!("p{i}"));
    }
    let uri = daemon.uri(LUN);
    run_ok(&mut qemu_io(&uri, &["write -P 0x11 0 4k"]));

    target.fault(0, "hang");
    target.fault(1, "hang");
    let writes_before = [target.counter(0, "writes"), target.counter(1, "writes")];
    // W1: held by p0, then by p1, acknowledged through p2.
    run_ok(&mut qemu_io(&uri, &["write -P 0xaa 0 4k"]));
    daemon.wait_path_status(LUN, "p0", FAILED, WAIT);
    daemon.wait_path_status(LUN, "p1", FAILED, WAIT);

    // p1 comes back: it executes its held copy of W1 (harmless: W1 is the newest data so far).
    target.fault(1, "up");
    wait_usable(&daemon, "p1");
    assert!(
        wait_until(WAIT, || target.counter(1, "writes") > writes_before[1]),
        "p1 never executed its held copy of W1"
    );

    // W2 over the same block while p0 still holds its old copy of W1. It may wait for p0 (that is the
    // guarantee at work); it must not be overwritten by it.
    let mut w2 = ProcessGuard::spawn("qemu-io W2", &mut qemu_io(&uri, &["write -P 0xbb 0 4k"]));
    let w2_early = finished_within(&mut w2, Duration::from_secs(3));
    target.fault(0, "up");
    assert!(
        wait_until(WAIT, || target.counter(0, "writes") > writes_before[0]),
        "p0 never executed its held copy of W1"
    );
    let status = w2_early.or_else(|| finished_within(&mut w2, WAIT));
    assert!(
        status.is_some_and(|s| s.success()),
        "W2 did not complete: {status:?}\nlog:\n{}",
        daemon.log()
    );
    wait_usable(&daemon, "p0");
    assert_pattern(
        &uri,
        0,
        4096,
        0xbb,
        "W2 must survive p0's late copy of W1",
        &daemon,
    );
}

// -------------------------------------------------------------------------------------------------
// B2: a reset path whose server still holds a write

/// An nbdkit serving `image` on a Unix socket, with the log filter (so the test sees when a request
/// enters and leaves) and, when `write_delay` is set, the delay filter holding every write that long.
fn nbdkit_file(
    dir: &Path,
    name: &str,
    image: &Path,
    write_delay: Option<&str>,
) -> (ProcessGuard, PathBuf, PathBuf) {
    require_tool("nbdkit", "nbdkit");
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = tool("nbdkit");
    cmd.args(["-f", "-U"]).arg(&socket).arg("--filter=log");
    if write_delay.is_some() {
        cmd.arg("--filter=delay");
    }
    cmd.arg("file")
        .arg(format!("file={}", image.display()))
        .arg(format!("logfile={}", log.display()));
    if let Some(d) = write_delay {
        cmd.arg(format!("wdelay={d}"));
    }
    let guard = spawn_unix_server("nbdkit", &mut cmd, &socket);
    (guard, socket, log)
}

/// Lines of an nbdkit log filter file (empty while it does not exist yet).
fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The log filter's id of the newest 4 KiB WRITE at offset 0 that has entered, and whether it has
/// returned.
fn write_at_zero(log: &Path) -> Option<(String, bool)> {
    let lines = log_lines(log);
    let id = lines
        .iter()
        .rev()
        .find(|l| {
            l.contains(" Write id=")
                && l.contains("offset=0x0 count=0x1000")
                && !l.contains("...Write")
        })
        .and_then(|l| l.split("Write id=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)?;
    let returned = lines
        .iter()
        .any(|l| l.contains(&format!("...Write id={id} return")));
    Some((id, returned))
}

struct ResetCase {
    primary: ProcessGuard,
    _backup: ProcessGuard,
    primary_log: PathBuf,
    relay: ResetRelay,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

/// Two nbdkit processes over one image file: the primary path goes through the reset relay to an
/// nbdkit that holds each write for `write_delay`; the backup path reaches a plain nbdkit directly.
/// `extra` is added to `[defaults]`; with `fence`, the primary path is fenced by `kill -9` of its
/// nbdkit.
fn reset_case(write_delay: &str, extra: &str, fence: bool) -> ResetCase {
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the image");
    let (primary, primary_sock, primary_log) =
        nbdkit_file(dir.path(), "primary", &image, Some(write_delay));
    let (backup, backup_sock, _) = nbdkit_file(dir.path(), "backup", &image, None);
    let relay = ResetRelay::start(&primary_sock);
    let fence_line = if fence {
        format!("fence = [\"kill\", \"-9\", \"{}\"]\n", primary.pid())
    } else {
        String::new()
    };
    // No adaptive timeout and a long io_timeout: the held write is not given up on because it is slow;
    // it is lost with its connection, which is the case under test.
    let config = format!(
        "[defaults]\nadaptive_timeout = false\nio_timeout = \"20s\"\n{extra}\n\
         [[lun]]\nname = \"{LUN}\"\npolicy = \"failover\"\nshared_backing = true\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p0\"\nprimary = true\n{fence_line}\
         [[lun.path]]\nuri = \"{}\"\nname = \"p1\"\n",
        relay.uri(""),
        unix_uri("", &backup_sock),
    );
    let daemon = Daemon::spawn(&config);
    wait_usable(&daemon, "p0");
    wait_usable(&daemon, "p1");
    ResetCase {
        primary,
        _backup: backup,
        primary_log,
        relay,
        daemon,
        _dir: dir,
    }
}

/// W1 goes to the primary and is held there; the relay resets lunmpio's side, so W1 is re-driven on the
/// backup and acknowledged, while nbdkit still holds the old copy. Returns once W1 is acknowledged.
fn write_w1_then_reset(case: &ResetCase) {
    let uri = case.daemon.uri(LUN);
    let mut w1 = ProcessGuard::spawn("qemu-io W1", &mut qemu_io(&uri, &["write -P 0xaa 0 4k"]));
    let held = wait_until(WAIT, || {
        write_at_zero(&case.primary_log).is_some_and(|(_, returned)| !returned)
    });
    assert!(
        held,
        "W1 never reached the primary nbdkit; log:\n{}",
        case.daemon.log()
    );
    case.relay.reset_and_refuse();
    let status = w1.wait_timeout(WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "W1 was not acknowledged after the reset ({status:?}); log:\n{}",
        case.daemon.log()
    );
    let (_, returned) = write_at_zero(&case.primary_log).expect("W1 entered");
    assert!(
        !returned,
        "the primary finished W1 before the reset: the race was not built (raise the delay)"
    );
}

/// The relay resets lunmpio's side of the primary path while nbdkit's delay filter holds W1; lunmpio
/// re-drives W1 on the backup. A newer write W2 must not be overwritten when nbdkit finally executes
/// its old copy: with no fence configured, W2 waits until `in_doubt_timeout` (longer than the hold
/// here), and the expiry is visible in the events, the log and the metrics.
#[test]
fn a_reset_path_cannot_land_its_held_write_over_newer_data() {
    let case = reset_case("3", "in_doubt_timeout = \"8s\"", false);
    write_w1_then_reset(&case);
    let uri = case.daemon.uri(LUN);
    let started = Instant::now();
    let mut w2 = ProcessGuard::spawn("qemu-io W2", &mut qemu_io(&uri, &["write -P 0xbb 0 4k"]));
    // nbdkit executes its held copy of W1 when its delay ends.
    assert!(
        wait_until(WAIT, || write_at_zero(&case.primary_log)
            .is_some_and(|(_, r)| r)),
        "the primary never finished its held copy of W1"
    );
    let status = w2.wait_timeout(WAIT);
    assert!(
        status.is_some_and(|s| s.success()),
        "W2 failed or hung: {status:?}; log:\n{}",
        case.daemon.log()
    );
    eprintln!("W2 completed after {} ms", started.elapsed().as_millis());
    assert_pattern(
        &uri,
        0,
        4096,
        0xbb,
        "W2 after the reset path's late W1",
        &case.daemon,
    );

    // The lapse of the hold is visible: an event with the cause, a warning, a metric.
    let causes = event_causes(&case.daemon);
    assert!(
        causes.iter().any(|c| c.contains("in_doubt_timeout")),
        "no in-doubt expiry event; events:\n{}",
        causes.join("\n")
    );
    assert!(
        case.daemon.log().contains("in_doubt_timeout"),
        "no warning in the log:\n{}",
        case.daemon.log()
    );
    let (code, metrics) = http_get(
        case.daemon.metrics.as_deref().expect("metrics on"),
        "/metrics",
    );
    assert_eq!(code, 200);
    let expired: u64 = metrics
        .lines()
        .find(|l| l.starts_with("lunmpio_lun_in_doubt_expired_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no lunmpio_lun_in_doubt_expired_total in:\n{metrics}"));
    assert!(expired >= 1, "expired = {expired}");
}

/// The same race with a fence: `kill -9` of the primary nbdkit. The fence is real evidence that the
/// old copy can never execute, so W2 need not wait out `in_doubt_timeout`, and W1's held copy never
/// lands.
#[test]
fn a_fence_releases_the_reset_paths_writes_at_once() {
    let case = reset_case("3", "in_doubt_timeout = \"60s\"", true);
    write_w1_then_reset(&case);
    let uri = case.daemon.uri(LUN);
    let started = Instant::now();
    run_ok(&mut qemu_io(&uri, &["write -P 0xbb 0 4k"]));
    let w2_ms = started.elapsed().as_millis();
    eprintln!("W2 completed after {w2_ms} ms");
    assert_pattern(
        &uri,
        0,
        4096,
        0xbb,
        "W2 after a fenced reset path",
        &case.daemon,
    );
    let causes = event_causes(&case.daemon);
    assert!(
        causes
            .iter()
            .any(|c| c.contains("fence") && c.contains("released")),
        "no fence event; events:\n{}",
        causes.join("\n")
    );
    assert!(
        !causes.iter().any(|c| c.contains("in_doubt_timeout")),
        "the hold expired instead of being released by the fence:\n{}",
        causes.join("\n")
    );
    // The fenced nbdkit is gone, and never finished W1.
    let (_, returned) = write_at_zero(&case.primary_log).expect("W1 entered");
    assert!(!returned, "the fenced primary still executed W1");
    let mut case = case;
    assert!(
        case.primary.wait_timeout(Duration::from_secs(10)).is_some(),
        "the fence did not kill the primary"
    );
    // Generous: the hold was released by the fence, far sooner than in_doubt_timeout (60 s here).
    assert!(w2_ms < 30_000, "W2 waited {w2_ms} ms");
}

// -------------------------------------------------------------------------------------------------
// B5: in-doubt state survives a crash of the daemon

/// Two ports, p1 the primary. p1 hangs with W1 in flight: W1 is re-driven on p0 and acknowledged, and
/// p1's copy is in doubt. Then the daemon crashes (SIGKILL) and is started again.
fn hung_copy_then_crash(target: &Target, in_doubt_timeout: &str) -> Daemon {
    let config = format!(
        "[defaults]\nio_timeout = \"1s\"\nin_doubt_timeout = \"{in_doubt_timeout}\"\n\
         [[lun]]\nname = \"{LUN}\"\npolicy = \"failover\"\nshared_backing = true\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p0\"\nweight = 1\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p1\"\nprimary = true\n",
        target.uri(0),
        target.uri(1),
    );
    let daemon = Daemon::spawn(&config);
    wait_usable(&daemon, "p0");
    wait_usable(&daemon, "p1");
    let uri = daemon.uri(LUN);
    run_ok(&mut qemu_io(&uri, &["write -P 0x11 0 4k"]));
    target.fault(1, "hang");
    run_ok(&mut qemu_io(&uri, &["write -P 0xaa 0 4k"]));
    daemon.wait_path_status(LUN, "p1", FAILED, WAIT);
    let held = daemon.stats(LUN)["inDoubtWrites"].as_u64().unwrap_or(0);
    assert!(
        held >= 1,
        "W1's copy on p1 is not in doubt: {}",
        daemon.stats(LUN)
    );
    daemon.crash_and_restart(|text| text)
}

/// The restarted daemon has forgotten nothing: W1's copy on the hung port still holds the block, so a
/// newer W2 waits (here until the persisted `in_doubt_timeout`), and the stale W1 that the port
/// executes when it resumes lands first.
#[test]
fn in_doubt_writes_survive_a_daemon_crash() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = hung_copy_then_crash(&target, "8s");
    wait_usable(&daemon, "p0");
    let stats = daemon.stats(LUN);
    assert!(
        stats["inDoubtWrites"].as_u64().unwrap_or(0) >= 1,
        "the restarted daemon forgot the in-doubt copy: {stats}\nevents:\n{}",
        events_text(&daemon)
    );
    assert!(
        event_causes(&daemon).iter().any(|c| c.contains("restored")),
        "no restore event:\n{}",
        events_text(&daemon)
    );
    let uri = daemon.uri(LUN);
    let writes_before = target.counter(1, "writes");
    let mut w2 = ProcessGuard::spawn("qemu-io W2", &mut qemu_io(&uri, &["write -P 0xbb 0 4k"]));
    let early = w2.wait_timeout(Duration::from_millis(500));
    // The port resumes and executes the copy it held from the crashed daemon's connection.
    target.fault(1, "up");
    assert!(
        wait_until(WAIT, || target.counter(1, "writes") > writes_before),
        "port 1 never executed its held copy of W1"
    );
    let status = early.or_else(|| w2.wait_timeout(WAIT));
    assert!(status.is_some_and(|s| s.success()), "W2: {status:?}");
    assert_pattern(
        &uri,
        0,
        4096,
        0xbb,
        "W2 after a crash and the held W1",
        &daemon,
    );
}

/// Restored copies are fenced at start when a fence is configured: then nothing waits.
#[test]
fn restored_in_doubt_writes_are_fenced_at_start() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = hung_copy_then_crash(&target, "60s");
    // The operator adds the array's fence before the restart.
    let fence = target.fence_toml(1);
    let daemon = daemon.crash_and_restart(|text| {
        text.replace("name = \"p1\"\n", &format!("name = \"p1\"\n{fence}\n"))
    });
    let ok = wait_until(WAIT, || {
        daemon.stats(LUN)["inDoubtWrites"].as_u64() == Some(0)
    });
    assert!(
        ok,
        "restored copies not released; events:\n{}",
        events_text(&daemon)
    );
    assert!(
        event_causes(&daemon)
            .iter()
            .any(|c| c.contains("fence of p1 succeeded")),
        "no fence event:\n{}",
        events_text(&daemon)
    );
    wait_usable(&daemon, "p0");
    let uri = daemon.uri(LUN);
    run_ok(&mut qemu_io(&uri, &["write -P 0xbb 0 4k"]));
    target.fault(1, "up");
    wait_usable(&daemon, "p1");
    assert_pattern(&uri, 0, 4096, 0xbb, "W2 after a fenced restart", &daemon);
    assert!(target.counter(1, "requestsDiscarded") + target.counter(1, "connectionsFenced") >= 1);
}

// -------------------------------------------------------------------------------------------------
// B4: FLUSH reaches the connections that hold the writes

/// An nbdkit over `image` that does not advertise CAN_MULTI_CONN (its connections are not promised
/// to share a cache), logging every request.
fn nbdkit_private(dir: &Path, name: &str, image: &Path) -> (ProcessGuard, PathBuf, PathBuf) {
    require_tool("nbdkit", "nbdkit");
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    let mut cmd = tool("nbdkit");
    cmd.args(["-f", "-U"])
        .arg(&socket)
        .args(["--filter=log", "--filter=multi-conn"])
        .arg("file")
        .arg(format!("file={}", image.display()))
        .arg(format!("logfile={}", log.display()))
        .arg("multi-conn-mode=disable");
    let guard = spawn_unix_server("nbdkit", &mut cmd, &socket);
    (guard, socket, log)
}

struct FlushCase {
    p0: ProcessGuard,
    _p1: ProcessGuard,
    p1_log: PathBuf,
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

fn flush_case() -> FlushCase {
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the image");
    let (p0, s0, _) = nbdkit_private(dir.path(), "p0", &image);
    let (p1, s1, p1_log) = nbdkit_private(dir.path(), "p1", &image);
    // No shared_backing: lunmpio must assume each path caches privately.
    let config = format!(
        "[[lun]]\nname = \"{LUN}\"\npolicy = \"failover\"\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p0\"\nprimary = true\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p1\"\n",
        unix_uri("", &s0),
        unix_uri("", &s1),
    );
    let daemon = Daemon::spawn(&config);
    wait_usable(&daemon, "p0");
    wait_usable(&daemon, "p1");
    FlushCase {
        p0,
        _p1: p1,
        p1_log,
        daemon,
        _dir: dir,
    }
}

/// Writes `count` 4 KiB blocks through our own NBD client and disconnects without a flush (qemu-io
/// would flush on close, which is not what is under test).
fn write_without_flush(daemon: &Daemon, count: u64) {
    block_on(async {
        let client = nbd_connect(&daemon.nbd, LUN).await;
        for i in 0..count {
            client
                .write(
                    i * 4096,
                    bytes::Bytes::from(vec![0x5a; 4096]),
                    Default::default(),
                )
                .await
                .unwrap_or_else(|e| panic!("write {i}: {e}"));
        }
        client.disconnect().await;
    });
}

/// One FLUSH on a new client connection.
fn flush_once(daemon: &Daemon) -> Result<(), String> {
    block_on(async {
        let client = nbd_connect(&daemon.nbd, LUN).await;
        let r = client.flush().await.map_err(|e| e.to_string());
        client.disconnect().await;
        r
    })
}

fn set_path_status(daemon: &Daemon, path: &str, status: u32) {
    let id = daemon.path_id(LUN, path);
    daemon.rpc_ok(
        "SetPathStatus",
        json!({ "lun": LUN, "pathId": id, "status": status }),
    );
}

/// Writes acknowledged on p1 (p0 administratively failed), then p0 is back and the policy's choice:
/// a FLUSH from another client connection must still reach p1's connection, which holds the writes
/// (p1 advertises no CAN_MULTI_CONN: a flush on p0 does not cover them). This is also what makes the
/// export's CAN_MULTI_CONN honest: a flush on one client connection covers writes acknowledged on
/// every other.
#[test]
fn flush_goes_to_the_connection_that_acknowledged_the_writes() {
    let case = flush_case();
    let flushes = |log: &Path| {
        log_lines(log)
            .iter()
            .filter(|l| l.contains(" Flush id=") && !l.contains("...Flush"))
            .count()
    };
    set_path_status(&case.daemon, "p0", 5);
    write_without_flush(&case.daemon, 8);
    set_path_status(&case.daemon, "p0", 1);
    case.daemon
        .wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    let before = flushes(&case.p1_log);
    flush_once(&case.daemon).expect("FLUSH succeeds");
    assert!(
        flushes(&case.p1_log) > before,
        "the FLUSH did not reach p1, which acknowledged the writes; p1's log:\n{}",
        log_lines(&case.p1_log).join("\n")
    );
}

/// Writes acknowledged on p0's connection, not yet flushed, and p0's server dies: nothing can make
/// those writes durable now (p1's connection does not share p0's cache). The next FLUSH fails with
/// EIO and an event says why — it must not report success for writes it cannot vouch for.
#[test]
fn flush_fails_when_the_writes_it_covers_were_lost_with_their_connection() {
    let mut case = flush_case();
    write_without_flush(&case.daemon, 8);
    case.p0.kill();
    case.daemon.wait_path_status(LUN, "p0", FAILED, WAIT);
    let err = flush_once(&case.daemon).expect_err("the FLUSH must fail");
    assert!(err.contains("EIO") || err.contains("I/O"), "{err}");
    assert!(
        event_causes(&case.daemon)
            .iter()
            .any(|c| c.contains("FLUSH failed") && c.contains("p0")),
        "no event says why:\n{}",
        events_text(&case.daemon)
    );
    // Reported once, as fsync reports a write-back error once; later flushes cover later writes.
    flush_once(&case.daemon).expect("the next FLUSH succeeds");
}

// -------------------------------------------------------------------------------------------------
// A write stuck on a path that still answers reads

/// nbdkit's delay filter holds every write on p0 for a minute while its reads (the health probes) are
/// answered at once: p0 looks alive. Writes that land on p0 are re-driven on p1 at the adaptive timeout
/// and their old copies are in doubt; newer writes to the same blocks must not wait for
/// `in_doubt_timeout` (a minute here) when a fence is configured: a copy with no answer after
/// `io_timeout` fails its path, which runs the fence, which releases the copies.
#[test]
fn a_write_stuck_on_a_path_that_answers_reads_is_fenced_at_io_timeout() {
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("create the image");
    let (mut stuck, stuck_sock, stuck_log) = nbdkit_file(dir.path(), "stuck", &image, Some("60"));
    let (_plain, plain_sock, _) = nbdkit_file(dir.path(), "plain", &image, None);
    let config = format!(
        "[defaults]\nio_timeout = \"1s\"\nin_doubt_timeout = \"60s\"\n\
         [[lun]]\nname = \"{LUN}\"\npolicy = \"round-robin\"\nshared_backing = true\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p0\"\nfence = [\"kill\", \"-9\", \"{}\"]\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p1\"\n",
        unix_uri("", &stuck_sock),
        stuck.pid(),
        unix_uri("", &plain_sock),
    );
    let daemon = Daemon::spawn(&config);
    wait_usable(&daemon, "p0");
    wait_usable(&daemon, "p1");
    let uri = daemon.uri(LUN);
    // Warm up: both paths learn that they answer in microseconds.
    run_ok(&mut qemu_io(
        &uri,
        &["read 0 64k", "read 64k 64k", "read 0 64k"],
    ));
    let blocks: Vec<String> = (0..8)
        .map(|i| format!("write -P 0xaa {} 4k", i * 4096))
        .collect();
    let refs: Vec<&str> = blocks.iter().map(String::as_str).collect();
    run_ok(&mut qemu_io(&uri, &refs));
    assert!(
        log_lines(&stuck_log)
            .iter()
            .any(|l| l.contains(" Write id=")),
        "no write reached p0: the case was not built"
    );
    let started = Instant::now();
    let newer: Vec<String> = (0..8)
        .map(|i| format!("write -P 0xbb {} 4k", i * 4096))
        .collect();
    let refs: Vec<&str> = newer.iter().map(String::as_str).collect();
    run_ok(&mut qemu_io(&uri, &refs));
    let waited = started.elapsed();
    eprintln!("the newer writes completed after {} ms", waited.as_millis());
    // Generous against io_timeout (1 s) plus the fence, far below in_doubt_timeout (60 s).
    assert!(
        waited < Duration::from_secs(20),
        "newer writes waited {waited:?}: the stuck copies were not fenced; events:\n{}",
        events_text(&daemon)
    );
    assert!(
        event_causes(&daemon)
            .iter()
            .any(|c| c.contains("fence of p0 succeeded")),
        "no fence; events:\n{}",
        events_text(&daemon)
    );
    assert!(
        stuck.wait_timeout(Duration::from_secs(10)).is_some(),
        "p0's nbdkit was not fenced"
    );
    for i in 0..8u64 {
        assert_pattern(&uri, i * 4096, 4096, 0xbb, "the newer writes", &daemon);
    }
}
