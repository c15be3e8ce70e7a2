//! Bad or merely slow peers must never hurt the LUN (issue 10 D, docs/GUARANTEES.md G7): odd but legal values
//! from a target, a path stricter than the LUN, slow paths moving large I/O, clients that never read,
//! descriptor exhaustion, a hung local device. Each case runs real processes.

use std::time::Duration;

use lunmpio_testkit::*;
use serde_json::json;

const LUN: &str = "vol";
const WAIT: Duration = Duration::from_secs(30);

fn qemu_io(uri: &str, commands: &[&str]) -> std::process::Command {
    require_tool("qemu-io", "qemu-utils");
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in commands {
        c.args(["-c", cmd]);
    }
    c
}

// -------------------------------------------------------------------------------------------------
// D1: odd but legal values from a target

/// A target advertising a preferred block size of 64 MiB and no maximum payload (legal in NBD): the
/// daemon starts, exports a usable geometry, and moves data.
#[test]
fn a_target_with_a_huge_preferred_block_size_is_served() {
    let mut spec = TargetSpec::memory("16MiB", 2);
    spec.extra = vec!["--block-size".into(), "1:64MiB:0xffffffff".into()];
    let target = spec.spawn();
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    let uri = daemon.uri(LUN);
    run_ok(&mut qemu_io(
        &uri,
        &["write -P 0x42 0 1M", "read -P 0x42 0 1M"],
    ));
    require_tool("nbdinfo", "libnbd-bin");
    let out = stdout_text(&run_ok(tool("nbdinfo").arg(&uri)));
    assert!(out.contains("block_size_preferred"), "{out}");
}

// -------------------------------------------------------------------------------------------------
// D5: a path whose alignment is stricter than the LUN's

/// The LUN settles at 1-byte alignment from its first path (our array over an image file). A second
/// path to the same image appears later as `file://` with O_DIRECT, which needs 4096-byte alignment:
/// it is refused with the reason, and unaligned client I/O keeps working on the first path (it used to
/// be sent to the strict path and fail with EINVAL).
#[test]
fn a_path_needing_stricter_alignment_than_the_lun_is_refused() {
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    make_raw(&image, 16 << 20, 0, 1);
    let target = TargetSpec::image(&image, None, 1).spawn();
    // The file path is a symlink created only after the daemon settled the LUN's geometry.
    let late = dir.path().join("late-path.img");
    let config = format!(
        "[defaults]\ncheck_interval = \"100ms\"\n[[lun]]\nname = \"{LUN}\"\npolicy = \"round-robin\"\nshared_backing = true\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p0\"\n\
         [[lun.path]]\nuri = \"file://{}\"\nname = \"p1\"\n",
        target.uri(0),
        late.display()
    );
    let daemon = Daemon::spawn(&config);
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    std::os::unix::fs::symlink(&image, &late).expect("symlink");
    // Wait until p1 has connected again and been judged: admitted, or refused with a reason.
    let judged = wait_until(WAIT, || {
        let reason = daemon.path_reason(LUN, "p1");
        daemon.path_status(LUN, "p1") != "VDS_MPS_FAILED" || !reason.contains("No such file")
    });
    assert!(judged, "p1 never reconnected; log:\n{}", daemon.log());
    // Unaligned writes and reads, many of them (round-robin would give p1 half).
    let uri = daemon.uri(LUN);
    let commands: Vec<String> = (0..16)
        .flat_map(|i| {
            [
                format!("write -P {} {} 512", i + 1, 512 + i * 4096),
                format!("read -P {} {} 512", i + 1, 512 + i * 4096),
            ]
        })
        .collect();
    let refs: Vec<&str> = commands.iter().map(String::as_str).collect();
    let out = run(&mut qemu_io(&uri, &refs), TOOL_TIMEOUT);
    assert!(
        out.status.success() && !stdout_text(&out).contains("failed"),
        "unaligned I/O failed:\n{}{}",
        stdout_text(&out),
        stderr_text(&out)
    );
    let reason = daemon.path_reason(LUN, "p1");
    assert!(
        reason.contains("4096-byte alignment"),
        "p1 not refused with the reason: {reason:?}"
    );
    assert_eq!(daemon.path_status(LUN, "p1"), "VDS_MPS_FAILED");
}

// -------------------------------------------------------------------------------------------------
// D2: healthy but slow paths carrying large I/O

/// Two ports capped at 64 MiB/s each, and one client keeping 16 writes of 32 MiB in flight (then
/// reading them back to verify). Each write spends half a second on the wire and waits behind others:
/// slow, not hung. Nothing may be failed, nothing may reach the client as an error.
#[test]
fn healthy_slow_paths_carry_large_sequential_io_without_errors() {
    require_tool("fio", "fio");
    let target = TargetSpec::memory("640MiB", 2).spawn();
    target.fault(0, "rate=64MiB");
    target.fault(1, "rate=64MiB");
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    daemon.wait_path_status(LUN, "p1", "VDS_MPS_ONLINE", WAIT);
    // A warm LUN: small I/O first teaches both paths that they answer in microseconds.
    drive_reads(&daemon.nbd, LUN, 400);
    let work = tempdir();
    let out = run(
        tool("fio").current_dir(work.path()).args([
            "--name=large",
            "--ioengine=nbd",
            &format!("--uri={}", daemon.uri(LUN)),
            "--rw=write",
            "--bs=32M",
            "--iodepth=16",
            "--size=512M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ]),
        Duration::from_secs(180),
    );
    let text = stdout_text(&out);
    let json = fio_json(&text);
    let job = &json["jobs"][0];
    assert!(
        out.status.success() && job["error"].as_u64() == Some(0),
        "fio failed:\n{text}\n{}\nevents:\n{}\nlog:\n{}",
        stderr_text(&out),
        serde_json::to_string_pretty(&daemon.rpc_ok("GetEvents", json!({ "lun": LUN }))).unwrap(),
        daemon.log()
    );
    assert!(job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 512 << 20);
    let events = daemon.rpc_ok("GetEvents", json!({ "lun": LUN }));
    let failed: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["toName"] == "VDS_MPS_FAILED")
        .collect();
    assert!(
        failed.is_empty(),
        "a healthy slow path was failed: {failed:?}"
    );
}

// -------------------------------------------------------------------------------------------------
// D3: a client that never reads its replies

/// Resident memory of a process, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb << 10)
        .expect("VmRSS")
}

/// Opens an NBD connection by hand (fixed newstyle, NBD_OPT_EXPORT_NAME) and returns the socket
/// positioned at the transmission phase.
fn raw_nbd_connect(addr: &str, export: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    s.write_all(&opt).unwrap();
    let mut answer = [0u8; 10];
    s.read_exact(&mut answer).expect("export size and flags");
    s
}

/// Sends `count` READs of `length` bytes from offset 0 and does not read a single reply.
fn send_reads_and_never_read(s: &mut std::net::TcpStream, count: u64, length: u32) {
    use std::io::Write;
    let mut requests = Vec::new();
    for cookie in 0..count {
        requests.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        requests.extend_from_slice(&0u16.to_be_bytes()); // flags
        requests.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        requests.extend_from_slice(&cookie.to_be_bytes());
        requests.extend_from_slice(&0u64.to_be_bytes());
        requests.extend_from_slice(&length.to_be_bytes());
    }
    s.write_all(&requests).expect("send the requests");
}

/// Waits until a process's memory stops growing (two samples 300 ms apart within 4 MiB), at most
/// `timeout`; returns the last sample.
fn settled_rss(pid: u32, timeout: Duration) -> u64 {
    let deadline = std::time::Instant::now() + timeout;
    let mut last = rss_bytes(pid);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = rss_bytes(pid);
        if now.abs_diff(last) < 4 << 20 || std::time::Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

/// 32 READs of 32 MiB from a client that never reads the replies: each server (the array and the
/// daemon's export run the same NBD server) may hold a bounded number of replies, not 1 GiB.
#[test]
fn a_client_that_never_reads_cannot_make_the_server_hold_a_gigabyte() {
    let target = TargetSpec::memory("64MiB", 1).spawn();
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    // Real data, so a read's buffer is real memory (a hole would read as untouched zero pages).
    run_ok(&mut qemu_io(&daemon.uri(LUN), &["write -P 0x33 0 32M"]));
    let cases = [
        ("lunmpio target", target.pid(), target.addr(0), "lun0"),
        ("lunmpio serve", daemon.pid(), daemon.nbd.clone(), LUN),
    ];
    for (name, pid, addr, export) in cases {
        let before = settled_rss(pid, Duration::from_secs(5));
        let mut s = raw_nbd_connect(&addr, export);
        send_reads_and_never_read(&mut s, 32, 32 << 20);
        let after = settled_rss(pid, Duration::from_secs(10));
        let grown = after.saturating_sub(before);
        eprintln!("{name}: resident memory grew by {} MiB", grown >> 20);
        assert!(
            grown < 320 << 20,
            "{name} holds {} MiB for a client that never reads",
            grown >> 20
        );
        drop(s);
    }
}

// -------------------------------------------------------------------------------------------------
// D4: out of file descriptors

/// The daemon's open-file limit is exhausted by NBD clients (set low with prlimit while it runs):
/// the accept loops back off instead of spinning, the control socket still answers (a spare
/// descriptor is kept for it), and the condition is counted in the metrics.
#[test]
fn exhausted_file_descriptors_keep_the_management_plane_reachable() {
    require_tool("prlimit", "util-linux");
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let daemon = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    run_ok(
        tool("prlimit")
            .arg(format!("--pid={}", daemon.pid()))
            .arg("--nofile=96:96"),
    );
    // Far more connections than descriptors left; they stay open, idle in the handshake.
    let mut held = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = std::net::TcpStream::connect(&daemon.nbd) {
            held.push(s);
        }
    }
    // The NBD accept loop meets EMFILE (it says so in the log) and backs off.
    let hit = wait_until(WAIT, || daemon.log().contains("Too many open files"));
    assert!(
        hit,
        "the accept loop never met EMFILE; log:\n{}",
        daemon.log()
    );
    // A management connection and a scrape waiting to be accepted: with no descriptor to accept
    // them, an accept loop that retries at once spins.
    let waiting_control = std::os::unix::net::UnixStream::connect(&daemon.socket);
    let waiting_scrape = std::net::TcpStream::connect(daemon.metrics.as_deref().unwrap());
    let ticks_before = cpu_ticks(daemon.pid());
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(daemon.pid()) - ticks_before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let cpu = Duration::from_millis(ticks * 1000 / hz);
    eprintln!("daemon CPU over 2 s with descriptors exhausted: {cpu:?}");
    assert!(
        cpu < Duration::from_millis(600),
        "the daemon spins with descriptors exhausted: {cpu:?} of CPU in 2 s"
    );
    drop((waiting_control, waiting_scrape));
    // The management plane answers, again and again (the spare descriptor comes back after each).
    for _ in 0..3 {
        let out = run(
            daemon.cli().args(["luns", "--json"]),
            Duration::from_secs(15),
        );
        assert!(
            out.status.success(),
            "the control socket does not answer with descriptors exhausted:\n{}{}\nlog:\n{}",
            stdout_text(&out),
            stderr_text(&out),
            daemon.log()
        );
    }
    // So does the metrics endpoint, and it counts the condition.
    let (code, metrics) = http_get(daemon.metrics.as_deref().unwrap(), "/metrics");
    assert_eq!(code, 200);
    let nbd_errors = metrics
        .lines()
        .find(|l| l.starts_with("lunmpio_accept_errors_total{listener=\"nbd\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(nbd_errors > 0, "accept errors not counted:\n{metrics}");
    drop(held);
}

// -------------------------------------------------------------------------------------------------
// D6: a hung local device

/// Threads of a process.
fn threads(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("Threads")
}

/// A `file://` path whose device hangs (a file on nbdfuse whose nbdkit is stopped) under 128 client
/// reads in flight: lunmpio's blocking threads stay bounded, and SIGTERM ends the daemon within
/// `shutdown_timeout` though system calls are stuck in the kernel. (The kernel keeps a thread that is
/// inside a FUSE call until the call returns, so the process is a zombie until the device answers;
/// what the daemon controls — stop serving, close its sockets, return from `main` — happens in time.)
#[test]
fn a_hung_file_path_pins_bounded_threads_and_does_not_block_shutdown() {
    require_tool("nbdkit", "nbdkit");
    require_tool("nbdfuse", "libnbd-bin");
    require_tool("fio", "fio");
    let dir = tempdir();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let socket = dir.path().join("kit.sock");
    let kit = spawn_unix_server(
        "nbdkit",
        tool("nbdkit")
            .args(["-f", "-U"])
            .arg(&socket)
            .args(["memory", "256M"]),
        &socket,
    );
    let _fuse = mount_nbdfuse(&mnt, &unix_uri("", &socket));
    let config = format!(
        "[defaults]\ncheck_interval = \"100ms\"\nio_timeout = \"1s\"\n\
         [[lun]]\nname = \"{LUN}\"\n[[lun.path]]\nuri = \"file://{}\"\nname = \"p0\"\n",
        mnt.join("disk").display()
    );
    let mut daemon = Daemon::spawn_with("shutdown_timeout = \"3s\"", &config);
    daemon.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    // Bound again after the daemon so that it is dropped (killed) first whatever happens: nothing can
    // reap the daemon while its threads are stuck in calls to the stopped device.
    let mut kit = kit;
    kit.signal(nix::sys::signal::Signal::SIGSTOP);
    let work = tempdir();
    let _fio = ProcessGuard::spawn(
        "fio",
        tool("fio").current_dir(work.path()).args([
            "--name=hung",
            "--ioengine=nbd",
            &format!("--uri={}", daemon.uri(LUN)),
            "--rw=randread",
            "--bs=4k",
            "--iodepth=128",
            "--size=256M",
            "--runtime=60",
            "--time_based",
        ]),
    );
    // Give the hung device every chance to pin threads: many requests, probes every 100 ms.
    let mut most = 0;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        most = most.max(threads(daemon.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("threads with the device hung: at most {most}");
    assert!(
        most <= 64 + 40,
        "{most} threads: the hung device pins a thread per request"
    );
    let t = std::time::Instant::now();
    let pid = daemon.pid();
    daemon.process().signal(nix::sys::signal::Signal::SIGTERM);
    let ended = wait_until(Duration::from_secs(10), || process_ended(pid));
    let took = t.elapsed();
    eprintln!("SIGTERM to the end of main: {} ms", took.as_millis());
    // Release the stuck calls before anything waits for the process (or the test would hang too).
    kit.kill();
    assert!(
        ended && took < Duration::from_secs(5),
        "the daemon did not end within shutdown_timeout (3 s) + 2 s: {took:?}; log:\n{}",
        daemon.log()
    );
    assert!(
        std::net::TcpStream::connect(&daemon.nbd).is_err(),
        "the export still accepts connections"
    );
}

/// Whether a process has ended: gone, or a zombie whose `main` returned (threads stuck in the kernel
/// keep a zombie from being reaped, but it serves nothing).
fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').map_or(0, |i| i + 2)..].starts_with('Z'),
    }
}

// -------------------------------------------------------------------------------------------------
// D7: a second daemon on the same control socket

/// A daemon started with the control socket of one that is running refuses to start (it used to
/// unlink the live socket and take it over, leaving the first daemon unmanageable); the first one
/// still answers. A socket left by a daemon that died is replaced.
#[test]
fn a_live_control_socket_is_never_taken_over() {
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let mut first = Daemon::spawn(&lun_toml(LUN, "round-robin", &target.uris));
    first.wait_path_status(LUN, "p0", "VDS_MPS_ONLINE", WAIT);
    let dir = tempdir();
    let config = dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nnbd_listen = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\nmetrics_listen = \"\"\nstate_dir = \"{}\"\n\n{}",
            first.socket.display(),
            dir.path().join("state").display(),
            lun_toml("other", "round-robin", &target.uris)
        ),
    )
    .unwrap();
    let out = run(
        std::process::Command::new(lunmpio_bin())
            .args(["serve", "--config"])
            .arg(&config),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "a second daemon started on a live control socket"
    );
    let err = stderr_text(&out);
    assert!(err.contains("another lunmpio daemon"), "{err}");
    run_ok(first.cli().args(["luns"]));
    // A crashed daemon's socket is stale: the next daemon replaces it.
    let socket = first.socket.clone();
    first.process().kill();
    assert!(socket.exists(), "the crashed daemon left no socket behind");
    let out = ProcessGuard::spawn(
        "lunmpio serve",
        std::process::Command::new(lunmpio_bin())
            .args(["serve", "--config"])
            .arg(&config),
    );
    let answered = wait_until(WAIT, || {
        run(
            tool(lunmpio_bin())
                .env("LUNMPIO_SOCKET", &socket)
                .arg("luns"),
            Duration::from_secs(10),
        )
        .status
        .success()
    });
    drop(out);
    assert!(answered, "the stale socket was not replaced");
}
