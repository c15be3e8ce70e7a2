//! Bad or merely slow peers must never hurt the LUN (issue 10 D, PRODUCT.md §7.7): odd but legal values
//! from a target, a path stricter than the LUN, slow paths moving large I/O, clients that never read,
//! descriptor exhaustion, a hung local device. Each case runs real processes.

mod common;

use std::time::Duration;

use common::*;
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

fn path_reason(daemon: &Daemon, path: &str) -> String {
    let info = daemon.rpc_ok("GetPathInfo", json!({ "lun": LUN }));
    info["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == path)
        .and_then(|p| p["statusReason"].as_str())
        .unwrap_or("")
        .to_string()
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
        let reason = path_reason(&daemon, "p1");
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
    let reason = path_reason(&daemon, "p1");
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
