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

/// NBD extended headers end to end, on a 10 GiB LUN with one path that has them (qemu-nbd) and one
/// that does not (an nbdkit 1.32 proxy in front of the same qemu-nbd): qemu-io and qemu-img
/// negotiate them with the export and send 64-bit BLOCK_STATUS lengths; nbdinfo (libnbd 1.14)
/// falls back to structured replies. Data far past 4 GiB round-trips, and the map is right.
#[test]
fn extended_headers_through_the_export_and_a_mixed_pair_of_paths() {
    require_tool("qemu-nbd", "qemu-utils");
    require_tool("nbdkit", "nbdkit");
    require_tool("nbdinfo", "libnbd-bin");
    const GIB: u64 = 1 << 30;
    let dir = tempdir();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(10 * GIB)
        .unwrap();
    let qsock = dir.path().join("qemu.sock");
    let _qemu = spawn_unix_server(
        "qemu-nbd",
        tool("qemu-nbd")
            .args(["-f", "raw", "-e", "8", "-t", "-k"])
            .arg(&qsock)
            .arg(&image),
        &qsock,
    );
    let psock = dir.path().join("proxy.sock");
    let _proxy = spawn_unix_server(
        "nbdkit",
        tool("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&psock)
            .arg("nbd")
            .arg(format!("socket={}", qsock.display())),
        &psock,
    );
    let uris = [unix_uri("", &qsock), unix_uri("", &psock)];
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &uris));
    let uri = daemon.uri("lun0");

    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in [
        "write -P 0xcd 6G 1M",
        "write -P 0x3c 9G 64k",
        "read -P 0xcd 6G 1M",
        "read -P 0x3c 9G 64k",
        "read -P 0 5G 64k",
        "write -z 9G 64k",
        "read -P 0 9G 64k",
        "flush",
    ] {
        c.args(["-c", cmd]);
    }
    let text = stdout_text(&run_ok(c.arg(&uri)));
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");

    // qemu-img asks BLOCK_STATUS for the whole 10 GiB at once (a 64-bit length).
    let out = run_ok(tool("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extents = map.as_array().expect("map is a list");
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 10 * GIB, "{map}");
    let data: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(data, vec![(6 * GIB, 1 << 20)], "{map}");

    let out = run_ok(tool("nbdinfo").args(["--map", &uri]));
    let text = stdout_text(&out);
    assert!(text.contains("data"), "{text}");

    let metrics = daemon.metrics.as_deref().expect("metrics on");
    let (_, body) = http_get(metrics, "/metrics");
    let negotiated = |mode: &str| {
        let series = format!("lunmpio_nbd_connections_negotiated_total{{mode=\"{mode}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    };
    assert!(negotiated("extended") >= 2, "qemu-io and qemu-img");
    assert!(negotiated("structured") >= 1, "nbdinfo");
    assert_spread(&daemon);
}
