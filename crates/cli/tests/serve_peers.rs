//! NBD peers we did not write against `lunmpio serve`'s multipath export, exactly as against a plain
//! NBD server: qemu-img, qemu-io, nbdinfo, nbdcopy, and a kernel file system through nbdfuse.

use lunmpio_testkit::*;

const MIB: u64 = 1 << 20;

/// A daemon exporting `lun0` (round robin over the target's ports).
fn rig(size: &str, ports: u16) -> (Daemon, Target) {
    let target = TargetSpec::memory(size, ports).spawn();
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    (daemon, target)
}

/// Every path carried some of the work: the export really is multipath.
fn assert_spread(daemon: &Daemon) {
    let ios = daemon.path_ios("lun0");
    assert!(
        ios.iter().all(|n| *n > 0),
        "not every path carried I/O: {ios:?}"
    );
}

#[test]
fn qemu_io_pattern_write_read_verify_and_flush() {
    require_tool("qemu-io", "qemu-utils");
    let (daemon, _t) = rig("64MiB", 2);
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in [
        "write -P 0xab 0 1M",
        "write -P 0x5a 3M 64k",
        "write -P 0x11 5000 333",
        "flush",
        "read -P 0xab 0 4999",
        "read -P 0x11 5000 333",
        "read -P 0xab 5333 1043243",
        "read -P 0x5a 3M 64k",
        "read -P 0x00 2M 64k",
        "aio_write -P 0x77 8M 1M",
        "aio_write -P 0x78 9M 1M",
        "aio_flush",
        "read -P 0x77 8M 1M",
        "read -P 0x78 9M 1M",
    ] {
        c.args(["-c", cmd]);
    }
    c.arg(daemon.uri("lun0"));
    let out = run_ok(&mut c);
    let text = stdout_text(&out);
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    assert_spread(&daemon);
}

#[test]
fn qemu_img_info_convert_compare_and_map() {
    require_tool("qemu-img", "qemu-utils");
    let (daemon, _t) = rig("16MiB", 3);
    let uri = daemon.uri("lun0");
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let expected = make_raw(&src, 16 * MIB, 3 * MIB, 7);

    let out = run_ok(tool("qemu-img").args(["info", "--output=json", "-f", "raw", &uri]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB, "{info}");

    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let back = dir.path().join("back.raw");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri])
            .arg(&back),
    );
    assert_same_file(&back, &expected);
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );

    let out = run_ok(tool("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extents = map.as_array().expect("map is a list");
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 16 * MIB, "{map}");
    assert_eq!(extents[0]["start"], 0);
    assert_eq!(extents[0]["data"], true, "{map}");
    assert!(extents[0]["length"].as_u64().unwrap() >= 3 * MIB, "{map}");
    assert!(
        extents
            .iter()
            .any(|e| e["data"] == false && e["zero"] == true),
        "no hole reported through the export: {map}"
    );
    assert_spread(&daemon);
}

#[test]
fn nbdinfo_json_and_list() {
    require_tool("nbdinfo", "libnbd-bin");
    let target = TargetSpec::memory("48MiB", 2).spawn();
    let other = TargetSpec::memory("8MiB", 1).spawn();
    let daemon = Daemon::spawn(&format!(
        "{}\n{}",
        lun_toml("lun0", "round-robin", &target.uris),
        lun_toml("lun1", "failover", &other.uris)
    ));
    let out = run_ok(tool("nbdinfo").args(["--json", &daemon.uri("lun0")]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "lun0", "{info}");
    assert_eq!(export["export-size"], 48 * MIB, "{info}");
    assert_eq!(
        export["can_multi_conn"], true,
        "every path is multi-conn: {info}"
    );
    assert_eq!(export["is_read_only"], false);
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero"] {
        assert_eq!(export[flag], true, "{flag}: {info}");
    }
    assert!(
        export["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{info}"
    );
    let out = run_ok(tool("nbdinfo").args(["--json", &daemon.uri("lun1")]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 8 * MIB, "{info}");

    let out = run_ok(tool("nbdinfo").args(["--list", &daemon.uri("lun0")]));
    let text = stdout_text(&out);
    assert!(
        text.contains("export=\"lun0\"") && text.contains("export=\"lun1\""),
        "{text}"
    );
    // An export that does not exist is refused by name.
    let out = run_fails(tool("nbdinfo").arg(daemon.uri("nope")));
    assert!(!stderr_text(&out).is_empty());
}

#[test]
fn nbdcopy_to_and_from_the_export() {
    require_tool("nbdcopy", "libnbd-bin");
    let (daemon, _t) = rig("16MiB", 2);
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let expected = make_raw(&src, 16 * MIB, 5 * MIB + 12345, 11);
    run_ok(tool("nbdcopy").arg(&src).arg(daemon.uri("lun0")));
    let back = dir.path().join("back.raw");
    run_ok(tool("nbdcopy").arg(daemon.uri("lun0")).arg(&back));
    assert_same_file(&back, &expected);
    assert_spread(&daemon);
}

// ---- nbdfuse + loop device + ext4 (shared with tests/nbdfuse.rs) ----

#[test]
fn ext4_on_a_loop_device_on_nbdfuse_on_the_export() {
    let (daemon, _target) = rig("128MiB", 2);
    ext4_on_nbdfuse(&daemon.uri("lun0"), 128 * MIB);
    let stats = daemon.stats("lun0");
    let written: u64 = stats["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["bytesWritten"].as_u64().unwrap())
        .sum();
    assert!(
        written >= 3 << 20,
        "the file system went through the multipath export: {stats}"
    );
    assert_spread(&daemon);
}
