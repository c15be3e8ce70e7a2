//! `lunmpio serve` end to end with real peers: fio verifies data through the multipath export while one
//! path's server is killed and another answers EIO, and the per-path I/O counts follow each policy.

use std::time::{Duration, Instant};

use lunmpio_testkit::fio::Fio;
use lunmpio_testkit::*;
use serde_json::{Value, json};

const LUN: &str = "lun0";
/// fio's verified random writes: 32 Ki writes of 4 KiB, then 32 Ki verifying reads.
const FIO_SIZE: &str = "128M";
const FIO_BYTES: u64 = 128 << 20;

/// fio through the export in the background; `inject` runs once I/O is moving, while fio still runs.
fn fio_survives(daemon: &Daemon, inject: impl FnOnce()) -> Value {
    let scratch = tempdir();
    let before: u64 = daemon.path_ios(LUN).iter().sum();
    let mut fio = ProcessGuard::spawn(
        "fio",
        &mut fio_verify_command(&daemon.uri(LUN), FIO_SIZE, scratch.path()),
    );
    assert!(
        daemon.wait_io_moving(LUN, before, 2000, Duration::from_secs(30)),
        "fio moved no I/O through the export; fio: {:?}\nlog:\n{}",
        fio.output_so_far(),
        daemon.log()
    );
    assert!(
        fio.is_running(),
        "fio finished before the faults could be injected (raise FIO_SIZE)"
    );
    let injected = Instant::now();
    inject();
    assert!(
        fio.is_running(),
        "fio finished while the faults were injected ({:?}); they did not hit it in flight",
        injected.elapsed()
    );
    let out = fio.wait_output(Duration::from_secs(120));
    let text = stdout_text(&out);
    assert!(
        out.status.success(),
        "fio failed ({}):\n{text}\n{}\nlog:\n{}",
        out.status,
        stderr_text(&out),
        daemon.log()
    );
    let json = fio_json(&text);
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio saw an error: {job}");
    if let Some(total_err) = job.get("total_err") {
        assert_eq!(total_err, 0, "fio saw errors: {job}");
    }
    assert_eq!(
        job["write"]["io_bytes"], FIO_BYTES,
        "every block written: {job}"
    );
    assert_eq!(
        job["read"]["io_bytes"], FIO_BYTES,
        "every block read back and verified (no mismatch): {job}"
    );
    job.clone()
}

/// Three `nbdkit nbd` proxies (each with an error filter armed by a flag file) in front of one
/// `qemu-nbd -e 16` on a raw file.
struct ProxiedVolume {
    // Field order: proxies and server die before the directory goes.
    proxies: Vec<ProcessGuard>,
    _qemu: ProcessGuard,
    uris: Vec<String>,
    flags: Vec<std::path::PathBuf>,
    _dir: tempfile::TempDir,
}

fn proxied_volume(size: u64, paths: usize) -> ProxiedVolume {
    require_tool("qemu-nbd", "qemu-utils");
    require_tool("nbdkit", "nbdkit");
    let dir = tempdir();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(size)
        .unwrap();
    let qsock = dir.path().join("qemu.sock");
    let qemu = spawn_unix_server(
        "qemu-nbd",
        tool("qemu-nbd")
            .args(["-f", "raw", "-e", "16", "-t", "-k"])
            .arg(&qsock)
            .arg(&image),
        &qsock,
    );
    let mut proxies = Vec::new();
    let mut uris = Vec::new();
    let mut flags = Vec::new();
    for i in 0..paths {
        let sock = dir.path().join(format!("proxy{i}.sock"));
        let flag = dir.path().join(format!("eio{i}"));
        proxies.push(spawn_unix_server(
            "nbdkit",
            tool("nbdkit")
                .args(["--foreground", "--exit-with-parent", "-U"])
                .arg(&sock)
                .args(["--filter=error", "nbd"])
                .arg(format!("socket={}", qsock.display()))
                .arg("error-rate=100%")
                .arg(format!("error-file={}", flag.display())),
            &sock,
        ));
        uris.push(unix_uri("", &sock));
        flags.push(flag);
    }
    ProxiedVolume {
        proxies,
        _qemu: qemu,
        uris,
        flags,
        _dir: dir,
    }
}

fn assert_survivor_carried_io(daemon: &Daemon, survivor: &str, before: &Value) {
    let after = daemon.stats(LUN);
    assert!(
        path_counter(&after, survivor, "ios") > path_counter(before, survivor, "ios"),
        "the surviving path {survivor} carried nothing after the faults: {after}"
    );
}

#[test]
fn fio_verify_survives_a_killed_proxy_and_an_eio_proxy() {
    require_tool("fio", "fio");
    let mut volume = proxied_volume(FIO_BYTES, 3);
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &volume.uris));
    assert_eq!(
        daemon.rpc_ok("GetSupportedLbPolicies", json!({ "lun": LUN }))["flags"],
        0x7f,
        "nbdkit passes qemu-nbd's CAN_MULTI_CONN through"
    );
    let mut mid = Value::Null;
    let job = fio_survives(&daemon, || {
        // p0: the process dies (SIGKILL by PID); p1: every request answers EIO.
        volume.proxies[0].kill();
        daemon.wait_path_status(LUN, "p0", "VDS_MPS_FAILED", Duration::from_secs(10));
        std::fs::write(&volume.flags[1], b"").unwrap();
        daemon.wait_path_status(LUN, "p1", "VDS_MPS_FAILED", Duration::from_secs(10));
        mid = daemon.stats(LUN);
    });
    assert_survivor_carried_io(&daemon, "p2", &mid);
    let stats = daemon.stats(LUN);
    assert_eq!(daemon.path_status(LUN, "p2"), "VDS_MPS_ONLINE");
    assert!(
        path_counter(&stats, "p0", "failovers") >= 1
            && path_counter(&stats, "p1", "failovers") >= 1,
        "both faults were failed away from: {stats}"
    );
    eprintln!("fio: {} write IOPS", job["write"]["iops"]);
}

#[test]
fn fio_verify_survives_a_port_down_and_an_eio_port_of_the_target() {
    require_tool("fio", "fio");
    let target = TargetSpec::memory("128MiB", 3).spawn();
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    let mut mid = Value::Null;
    fio_survives(&daemon, || {
        target.fault(0, "down");
        daemon.wait_path_status(LUN, "p0", "VDS_MPS_FAILED", Duration::from_secs(10));
        target.fault(1, "error-rate=100%");
        daemon.wait_path_status(LUN, "p1", "VDS_MPS_FAILED", Duration::from_secs(10));
        mid = daemon.stats(LUN);
    });
    assert_survivor_carried_io(&daemon, "p2", &mid);
    assert_eq!(daemon.path_status(LUN, "p2"), "VDS_MPS_ONLINE");
}

fn reads(daemon: &Daemon) -> Vec<u64> {
    let stats = daemon.stats(LUN);
    ["p0", "p1", "p2"]
        .iter()
        .map(|p| path_counter(&stats, p, "reads"))
        .collect()
}

/// Exactly `count` reads through the export; the per-path deltas of GetStatistics' `reads`.
fn deltas(daemon: &Daemon, count: usize) -> Vec<u64> {
    let before = reads(daemon);
    drive_reads(&daemon.nbd, LUN, count);
    let after = reads(daemon);
    after.iter().zip(&before).map(|(a, b)| a - b).collect()
}

fn set_policy(daemon: &Daemon, policy: &str, paths: Value) {
    daemon.rpc_ok(
        "SetLoadBalancePolicy",
        json!({ "lun": LUN, "policy": policy, "paths": paths }),
    );
    let now = daemon.rpc_ok("GetLoadBalancePolicy", json!({ "lun": LUN }));
    assert_eq!(
        now["policy"].as_i64().unwrap(),
        lunmpio_vds::LoadBalancePolicy::parse_any(policy).unwrap() as i64,
        "{now}"
    );
}

#[test]
fn per_path_io_counts_follow_each_policy() {
    let target = TargetSpec::memory("16MiB", 3).spawn();
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    let id = |p: &str| daemon.path_id(LUN, p);

    // Round robin: every path in turn.
    assert_eq!(deltas(&daemon, 300), [100, 100, 100], "round robin");

    // Failover: everything on the primary.
    set_policy(
        &daemon,
        "failover",
        json!([{ "pathId": id("p1"), "primary": true }]),
    );
    assert_eq!(deltas(&daemon, 90), [0, 90, 0], "failover on primary p1");

    // Weighted paths: everything on the lightest.
    set_policy(
        &daemon,
        "weighted-paths",
        json!([
            { "pathId": id("p0"), "weight": 10 },
            { "pathId": id("p1"), "weight": 20 },
            { "pathId": id("p2"), "weight": 1 },
        ]),
    );
    assert_eq!(
        deltas(&daemon, 90),
        [0, 0, 90],
        "weighted paths: lightest p2"
    );

    // Round robin with subset: the primaries in turn, never the non-primary.
    set_policy(
        &daemon,
        "round-robin-with-subset",
        json!([
            { "pathId": id("p0"), "primary": true },
            { "pathId": id("p1"), "primary": false },
            { "pathId": id("p2"), "primary": true },
        ]),
    );
    assert_eq!(
        deltas(&daemon, 100),
        [50, 0, 50],
        "round robin with subset over p0, p2"
    );
}

/// `data_poll_us`: a data thread that keeps polling its sockets after each read instead of sleeping.
/// Under a verifying workload at queue depth 1 it carries the I/O without going to sleep between
/// requests (its voluntary context switches stay far below the I/O count; a thread that sleeps makes
/// one or more per request), through a port going down, with zero errors. Once the I/O stops it
/// sleeps: the daemon's CPU time stays nearly flat (a poller that never stopped would use a core).
#[test]
fn a_polling_data_thread_skips_the_sleeps_under_io_and_sleeps_when_idle() {
    const DATA_THREAD: &str = "lunmpio-data";
    let target = TargetSpec::memory("64MiB", 2).spawn();
    let daemon = Daemon::spawn_with(
        // Long enough that a loaded machine's scheduling gaps between requests stay inside it.
        "data_poll_us = 5000\ndata_threads = 1\n",
        &lun_toml(LUN, "round-robin", &target.uris),
    );
    let switches_before = voluntary_switches(daemon.pid(), DATA_THREAD);
    let ios_before: u64 = daemon.path_ios(LUN).iter().sum();
    let mut fio = Fio::start(&daemon.uri(LUN), Duration::from_secs(3), &["--iodepth=1"]);
    assert!(wait_until(Duration::from_secs(10), || daemon
        .path_ios(LUN)
        .iter()
        .sum::<u64>()
        > ios_before + 500));
    fio.assert_running("the port went down");
    target.fault(0, "down");
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_FAILED", Duration::from_secs(10));
    let report = fio.finish(Duration::from_secs(60));
    report.assert_clean("polling data thread");
    let ios = daemon.path_ios(LUN).iter().sum::<u64>() - ios_before;
    let switches = voluntary_switches(daemon.pid(), DATA_THREAD) - switches_before;
    eprintln!("{ios} I/Os through a polling data thread, {switches} voluntary context switches");
    assert!(ios > 1_000, "too little I/O to judge: {ios}");
    assert!(
        switches * 4 < ios,
        "the data thread slept {switches} times for {ios} I/Os: it is not polling"
    );

    let idle = Duration::from_secs(1);
    let ticks_before = cpu_ticks(daemon.pid());
    std::thread::sleep(idle); // measuring an idle second, not waiting for an event
    let ticks = cpu_ticks(daemon.pid()) - ticks_before;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        ticks * 4 < ticks_per_second,
        "the idle daemon used {ticks} of {ticks_per_second} clock ticks in {idle:?}: the poller does not sleep"
    );
}
