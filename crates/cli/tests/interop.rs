//! `lunmpio target` against NBD peers we did not write: qemu-io, qemu-img, nbdinfo, nbdcopy and fio.

use lunmpio_testkit::*;

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, commands: &[&str]) -> std::process::Output {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in commands {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    run_ok(&mut c)
}

#[test]
fn qemu_io_pattern_write_read_verify_and_flush() {
    require_tool("qemu-io", "qemu-utils");
    let target = TargetSpec::memory("64MiB", 1).spawn();
    let uri = target.uri(0);
    qemu_io(
        uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0x5a 3M 64k",
            // Unaligned, sub-sector I/O: the export's minimum block is 1 byte.
            "write -P 0x11 5000 333",
            "flush",
            "read -P 0xab 0 4999",
            "read -P 0x11 5000 333",
            "read -P 0xab 5333 1043243",
            "read -P 0x5a 3M 64k",
            "read -P 0x00 2M 64k",
        ],
    );
    // The verification is real: a wrong pattern fails.
    let out = run_fails(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0xcd 0 4k", uri]));
    assert!(
        stdout_text(&out).contains("Pattern verification failed"),
        "{}",
        stdout_text(&out)
    );
}

#[test]
fn data_written_through_port_0_reads_back_through_port_1() {
    require_tool("qemu-io", "qemu-utils");
    let target = TargetSpec::memory("64MiB", 3).spawn();
    qemu_io(
        target.uri(0),
        &["write -P 0x42 8M 2M", "write -z 9M 64k", "flush"],
    );
    qemu_io(
        target.uri(1),
        &[
            "read -P 0x42 8M 1M",
            "read -P 0 9M 64k",
            "read -P 0x42 9280k 960k",
        ],
    );
    qemu_io(target.uri(2), &["write -P 0x43 8M 4k"]);
    qemu_io(
        target.uri(0),
        &["read -P 0x43 8M 4k", "read -P 0x42 8196k 4k"],
    );
}

#[test]
fn image_backed_target_with_qemu_io_across_ports() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempdir();
    let image = dir.path().join("lun.img");
    let target = TargetSpec::image(&image, Some("32MiB"), 2).spawn();
    qemu_io(
        target.uri(0),
        &[
            "write -P 0x77 1M 1M",
            "write -f -P 0x78 0 4k",
            "discard 4M 1M",
            "write -z 2M 1M",
            "flush",
        ],
    );
    qemu_io(
        target.uri(1),
        &["read -P 0x77 1M 1M", "read -P 0x78 0 4k", "read -P 0 2M 1M"],
    );
    let data = std::fs::read(&image).unwrap();
    assert!(
        data[1 << 20..2 << 20].iter().all(|&b| b == 0x77),
        "the image file holds the data"
    );
}

#[test]
fn qemu_img_info_convert_compare_and_map() {
    require_tool("qemu-img", "qemu-utils");
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let expected = make_raw(&src, 16 * MIB, 3 * MIB, 7);

    let out = run_ok(tool("qemu-img").args(["info", "--output=json", "-f", "raw", target.uri(0)]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["virtual-size"], 16 * MIB, "{info}");

    // Into the export through port 0, out of it through port 1.
    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(target.uri(0)),
    );
    let back = dir.path().join("back.raw");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", target.uri(1)])
            .arg(&back),
    );
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&back),
    );
    assert_same_file(&back, &expected);
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(target.uri(1)),
    );

    // Block status: the data region is reported as data, the untouched tail as a zero hole.
    let out = run_ok(tool("qemu-img").args(["map", "--output=json", "-f", "raw", target.uri(1)]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extents = map.as_array().expect("map is a list");
    let total: u64 = extents.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 16 * MIB, "{map}");
    let first = &extents[0];
    assert_eq!(first["start"], 0);
    assert_eq!(first["data"], true, "{map}");
    assert!(first["length"].as_u64().unwrap() >= 3 * MIB, "{map}");
    assert!(
        extents
            .iter()
            .any(|e| e["data"] == false && e["zero"] == true),
        "no hole reported: {map}"
    );
}

#[test]
fn nbdinfo_json_reports_size_multi_conn_and_block_sizes() {
    require_tool("nbdinfo", "libnbd-bin");
    let target = TargetSpec::memory("48MiB", 2).name("lun-info").spawn();
    let out = run_ok(tool("nbdinfo").args(["--json", target.uri(1)]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "lun-info", "{info}");
    assert_eq!(export["export-size"], 48 * MIB);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(
        export["description"],
        "lunmpio simulated array, controller port 1"
    );
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_cache"] {
        assert_eq!(export[flag], true, "{flag}: {info}");
    }
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    assert!(
        export["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "base:allocation"),
        "{info}"
    );
}

#[test]
fn nbdinfo_list_shows_the_export() {
    require_tool("nbdinfo", "libnbd-bin");
    let target = TargetSpec::memory("8MiB", 1).name("listed").spawn();
    let out = run_ok(tool("nbdinfo").args(["--list", target.uri(0)]));
    let text = stdout_text(&out);
    assert!(text.contains("export=\"listed\""), "{text}");
}

#[test]
fn nbdcopy_to_and_from_the_export() {
    require_tool("nbdcopy", "libnbd-bin");
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let dir = tempdir();
    let src = dir.path().join("src.raw");
    let expected = make_raw(&src, 16 * MIB, 5 * MIB + 12345, 11);
    run_ok(tool("nbdcopy").arg(&src).arg(target.uri(0)));
    let back = dir.path().join("back.raw");
    run_ok(tool("nbdcopy").arg(target.uri(1)).arg(&back));
    assert_same_file(&back, &expected);
}

fn fio_verify(uri: &str) {
    // fio drops verify state files into its working directory; keep them out of the source tree.
    let scratch = tempdir();
    let out = run_ok(tool("fio").current_dir(scratch.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--numjobs=4",
        // Each job verifies its own region; overlapping jobs would overwrite each other's blocks.
        "--size=16M",
        "--offset_increment=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let json = fio_json(&stdout_text(&out));
    let jobs = json["jobs"].as_array().expect("fio jobs");
    assert_eq!(jobs.len(), 4, "{json}");
    for job in jobs {
        assert_eq!(job["error"], 0, "job error: {job}");
        assert_eq!(
            job["write"]["io_bytes"],
            16 * MIB,
            "every block written: {job}"
        );
        assert_eq!(
            job["read"]["io_bytes"],
            16 * MIB,
            "every block verified: {job}"
        );
        if let Some(total_err) = job.get("total_err") {
            assert_eq!(total_err, 0, "{job}");
        }
    }
}

#[test]
fn fio_verified_random_writes_memory_backend() {
    require_tool("fio", "fio");
    let target = TargetSpec::memory("64MiB", 1).spawn();
    fio_verify(target.uri(0));
}

#[test]
fn fio_verified_random_writes_image_backend() {
    require_tool("fio", "fio");
    let dir = tempdir();
    let target = TargetSpec::image(&dir.path().join("fio.img"), Some("64MiB"), 1).spawn();
    fio_verify(target.uri(0));
}
