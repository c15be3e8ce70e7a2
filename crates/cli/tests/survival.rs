//! lunmpio's own restart is as invisible as a path fault (issue 13): socket activation, so the
//! listener outlives the process; in-doubt state from `state_dir`; and a client with reconnect.
//!
//! Every case runs real processes: fio (verify=crc32c) → qemu-storage-daemon (an `nbd` blockdev with
//! `reconnect-delay` on lunmpio's export, exported again over NBD) → `lunmpio serve` → two ports of
//! `lunmpio target` (a process of its own, which the crash does not touch).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lunmpio_testkit::fio::Fio;
use lunmpio_testkit::*;
use nix::sys::signal::Signal;

const LUN: &str = "vol";
const WAIT: Duration = Duration::from_secs(30);

/// qemu-storage-daemon re-exporting lunmpio's LUN: its NBD client reconnects for up to
/// `reconnect_delay_s` and re-sends the requests a lost connection held.
fn qemu_storage_daemon(
    dir: &Path,
    lunmpio: &str,
    reconnect_delay_s: u32,
) -> (ProcessGuard, PathBuf) {
    require_tool("qemu-storage-daemon", "qemu-utils");
    let (host, port) = lunmpio.rsplit_once(':').expect("host:port");
    let socket = dir.join("qsd.sock");
    let guard = spawn_unix_server(
        "qemu-storage-daemon",
        tool("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=lun,server.type=inet,server.host={host},server.port={port},\
                 export={LUN},reconnect-delay={reconnect_delay_s}"
            ))
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", socket.display()))
            .arg("--export")
            .arg("type=nbd,id=e0,node-name=lun,name=lun,writable=on"),
        &socket,
    );
    (guard, socket)
}

/// Waits until the daemon has served at least `ios` requests on its LUN (fio is past its start).
fn wait_ios(daemon: &Daemon, ios: u64) {
    let served = || daemon.path_ios(LUN).iter().sum::<u64>();
    assert!(
        wait_until(WAIT, || served() >= ios),
        "only {} requests reached lunmpio; log:\n{}",
        served(),
        daemon.log()
    );
}

/// fio through qemu-storage-daemon through lunmpio; lunmpio is killed (SIGKILL) mid-run and started
/// again on the same config and state. Returns fio's longest completion.
fn crash_under_verified_io(activated: bool) -> Duration {
    // The array simulator in its own process: two ports to one volume, untouched by the crash.
    let target = TargetSpec::memory("256MiB", 2).spawn();
    let paths = [target.uri(0).to_string(), target.uri(1).to_string()];
    let lun = lun_toml(LUN, "round-robin", &paths);
    let daemon = if activated {
        Daemon::spawn_activated("", &lun)
    } else {
        // The daemon binds the listener itself (a fixed port, so the restart binds it again).
        Daemon::spawn_with(&format!("nbd_listen = \"127.0.0.1:{}\"", free_port()), &lun)
    };
    let dir = tempdir();
    let (_qsd, qsd_socket) = qemu_storage_daemon(dir.path(), &daemon.nbd, 30);
    let mut fio = Fio::start(&unix_uri("lun", &qsd_socket), Duration::from_secs(10), &[]);
    wait_ios(&daemon, 5_000);
    fio.assert_running("the crash");
    let pid_before = daemon.pid();
    let crashed_at = Instant::now();
    let daemon = daemon.crash_and_restart(|config| config);
    let back_after = crashed_at.elapsed();
    assert_ne!(daemon.pid(), pid_before, "a new process serves");
    // I/O resumes through the new process (its counters start again from zero).
    wait_ios(&daemon, 1_000);
    let report = fio.finish(Duration::from_secs(90));
    let case = if activated {
        "kill -9, listener from systemd"
    } else {
        "kill -9, listener bound by the daemon"
    };
    report.assert_clean(case);
    eprintln!(
        "{case}: new daemon ready {} ms after SIGKILL; fio's longest completion {} ms, longest gap \
         between completions {} ms, {} MiB verified",
        back_after.as_millis(),
        report.clat_max.as_millis(),
        report.gap_max.as_millis(),
        (report.read_bytes + report.write_bytes) >> 20
    );
    assert_eq!(
        daemon.log().contains("socket from systemd"),
        activated,
        "the restarted daemon served the inherited listener; log:\n{}",
        daemon.log()
    );
    report.clat_max
}

#[test]
fn a_crash_under_verified_io_loses_nothing_with_socket_activation_and_reconnect() {
    crash_under_verified_io(true);
}

/// Without socket activation the client's reconnect is refused until the new daemon binds: still
/// nothing lost (qemu retries), but the stall includes qemu's reconnect backoff.
#[test]
fn a_crash_under_verified_io_loses_nothing_with_reconnect_alone() {
    crash_under_verified_io(false);
}

/// `systemd-socket-activate` (systemd's own tool) binds the listener, waits for the first
/// connection, and starts the daemon on it: that connection waits in the backlog and is served.
#[test]
fn systemd_socket_activate_starts_the_daemon_on_a_waiting_connection() {
    require_tool("systemd-socket-activate", "systemd");
    require_tool("nbdinfo", "libnbd-bin");
    let dir = tempdir();
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let port = free_port();
    let config = write_config(
        dir.path(),
        &format!("nbd_listen = \"127.0.0.1:{port}\""),
        &lun_toml(LUN, "round-robin", &[target.uri(0).to_string()]),
    );
    let mut activator = socket_activate(port, "nbd", &config);
    assert!(activator.is_running(), "{:?}", activator.output_so_far());
    let out = run_ok(tool("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/{LUN}")));
    assert!(
        stdout_text(&out).contains("export-size: 16777216"),
        "{}",
        stdout_text(&out)
    );
    let (_, log) = activator.output_so_far();
    assert!(log.contains("socket from systemd"), "{log}");
    activator.signal(Signal::SIGTERM);
    assert!(
        activator.wait_timeout(WAIT).is_some(),
        "the daemon stopped on SIGTERM"
    );
}

/// A socket handed over that matches none of the config's listeners stops the start, naming it.
#[test]
fn a_socket_that_matches_no_listener_stops_the_start_with_its_address() {
    require_tool("systemd-socket-activate", "systemd");
    let dir = tempdir();
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let (port, other) = (free_port(), free_port());
    let config = write_config(
        dir.path(),
        &format!("nbd_listen = \"127.0.0.1:{other}\""),
        &lun_toml(LUN, "round-robin", &[target.uri(0).to_string()]),
    );
    let activator = socket_activate(port, "stray", &config);
    // Everything it wrote, read to the end: the pipe may still hold the last line when it exits.
    let out = activator.wait_output(WAIT);
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        log.contains(&format!("127.0.0.1:{port}, named \"stray\") matches none")),
        "{log}"
    );
}

/// `systemd-socket-activate` listening on 127.0.0.1:`port` (descriptor named `name`) for
/// `lunmpio serve --config CONFIG`; returns once the port takes connections (the daemon starts on
/// the first one), or once it has exited.
fn socket_activate(port: u16, name: &str, config: &Path) -> ProcessGuard {
    let mut activator = ProcessGuard::spawn(
        "systemd-socket-activate",
        tool("systemd-socket-activate")
            .args([
                "-l",
                &format!("127.0.0.1:{port}"),
                &format!("--fdname={name}"),
            ])
            .arg(lunmpio_bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info"),
    );
    let listening = wait_until(WAIT, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() || !activator.is_running()
    });
    assert!(listening, "{:?}", activator.output_so_far());
    activator
}

fn write_config(dir: &Path, daemon_extra: &str, rest: &str) -> PathBuf {
    let config = dir.join("lunmpio.toml");
    let text = format!(
        "[daemon]\n{daemon_extra}\ncontrol_socket = \"{}\"\nstate_dir = \"{}\"\n\n{rest}",
        dir.join("control.sock").display(),
        dir.join("state").display()
    );
    std::fs::write(&config, text).unwrap();
    config
}
