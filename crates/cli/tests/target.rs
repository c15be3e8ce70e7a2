//! `lunmpio target` lifecycle: URIs, ports, images, the control socket, and graceful shutdown.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use lunmpio_testkit::*;
use nix::sys::signal::Signal;

/// Reads the NBD fixed-newstyle greeting from a raw TCP connection.
fn greeting(addr: &str) -> [u8; 18] {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 18];
    s.read_exact(&mut buf).expect("NBD greeting");
    buf
}

#[test]
fn prints_one_uri_per_port_in_order_and_every_port_serves() {
    let target = TargetSpec::memory("16MiB", 3).spawn();
    assert_eq!(target.uris.len(), 3);
    let mut ports = Vec::new();
    for (i, uri) in target.uris.iter().enumerate() {
        assert!(
            uri.starts_with("nbd://127.0.0.1:") && uri.ends_with("/lun0"),
            "URI {i}: {uri}"
        );
        let g = greeting(&target.addr(i));
        assert_eq!(
            &g[..16],
            b"NBDMAGICIHAVEOPT",
            "port {i} greets like an NBD server"
        );
        ports.push(target.addr(i));
    }
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "three distinct ports");
    let status = target.status();
    assert_eq!(status["export"]["name"], "lun0");
    assert_eq!(status["export"]["size"], 16 << 20);
    for i in 0..3 {
        assert_eq!(status["ports"][i]["port"], i);
        assert_eq!(status["ports"][i]["uri"], target.uris[i].as_str());
        assert_eq!(status["ports"][i]["state"], "up");
    }
}

#[test]
fn explicit_listen_port_uses_consecutive_ports() {
    let base = free_port_range(3);
    let target = TargetSpec::memory("1MiB", 3)
        .name("vol-a")
        .listen(&format!("127.0.0.1:{base}"))
        .spawn();
    for i in 0..3 {
        assert_eq!(
            target.uris[i],
            format!("nbd://127.0.0.1:{}/vol-a", base + i as u16)
        );
    }
}

#[test]
fn a_port_in_use_is_reported_by_address() {
    let target = TargetSpec::memory("1MiB", 1).spawn();
    let addr = target.addr(0);
    let out = run_fails(Command::new(lunmpio_bin()).args([
        "target", "--memory", "1M", "--ports", "1", "--listen", &addr,
    ]));
    let err = stderr_text(&out);
    assert!(
        err.contains(&format!("cannot listen on {addr} (controller port 0)")),
        "{err}"
    );
}

#[test]
fn image_is_created_extended_named_after_its_stem_and_persists() {
    require_tool("qemu-io", "qemu-utils");
    let dir = tempdir();
    let image = dir.path().join("disk7.img");

    let mut target = TargetSpec::image(&image, Some("8MiB"), 2).spawn();
    assert!(target.uris[0].ends_with("/disk7"), "{}", target.uris[0]);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 8 << 20);
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "write -P 0x5c 1M 64k", &target.uris[1]]));
    assert!(target.terminate(Duration::from_secs(10)).success());

    // Extended, never shrunk; the data written before survives a restart.
    let target = TargetSpec::image(&image, Some("16MiB"), 1).spawn();
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 16 << 20);
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "read -P 0x5c 1M 64k", &target.uris[0]]));
    drop(target);

    let out = run_fails(
        Command::new(lunmpio_bin())
            .args(["target", "--size", "4MiB", "--image"])
            .arg(&image),
    );
    assert!(
        stderr_text(&out).contains("never shrinks"),
        "{}",
        stderr_text(&out)
    );
}

#[test]
fn control_socket_is_private_and_survives_bad_requests() {
    let target = TargetSpec::memory("1MiB", 2).spawn();
    let mode = std::fs::metadata(&target.control)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "control socket mode {mode:o}");

    let stream = UnixStream::connect(&target.control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |line: &str| -> serde_json::Value {
        (&stream).write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("answer to {line} is not JSON ({e}): {answer}"))
    };
    for (request, needle) in [
        ("this is not json", "invalid JSON"),
        ("[]", "not a JSON object"),
        (r#"{"port":7,"fault":"down"}"#, "no port 7"),
        (r#"{"port":0,"fault":"rate=fast"}"#, "invalid rate `fast`"),
        (r#"{"port":0,"fault":"delay=-5ms"}"#, "invalid duration"),
        (r#"{"port":0,"fault":"error-rate=1.5"}"#, "between 0 and 1"),
        (r#"{"port":0,"fault":"melt"}"#, "unknown fault `melt`"),
        (r#"{"port":0}"#, "missing `fault`"),
        (r#"{"status":true,"extra":1}"#, "unknown field `extra`"),
    ] {
        let answer = ask(request);
        assert_eq!(answer["ok"], false, "{request} -> {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{request} -> {error}");
    }
    // The same connection still works, and nothing changed.
    let status = ask(r#"{"status":true}"#);
    assert_eq!(status["ok"], true);
    for port in status["ports"].as_array().unwrap() {
        assert_eq!(port["state"], "up");
        assert_eq!(port["faults"]["delayMs"], 0.0);
        assert_eq!(port["faults"]["errorRate"], 0.0);
        assert!(port["faults"]["rateBytesPerSec"].is_null());
    }
    assert_eq!(ask(r#"{"port":1,"fault":"delay=5ms"}"#)["ok"], true);

    let out = run_fails(&mut target.fault_command(9, "down"));
    assert!(
        stderr_text(&out).contains("no port 9: this array has ports 0..=1"),
        "{}",
        stderr_text(&out)
    );
}

#[test]
fn a_live_control_socket_is_not_stolen() {
    let target = TargetSpec::memory("1MiB", 1).spawn();
    let out = run_fails(
        Command::new(lunmpio_bin())
            .args(["target", "--memory", "1M", "--control"])
            .arg(&target.control),
    );
    assert!(
        stderr_text(&out).contains("in use by another running target"),
        "{}",
        stderr_text(&out)
    );
    // The first target still answers.
    assert_eq!(target.status()["ports"][0]["state"], "up");
}

#[test]
fn status_table_for_people() {
    let target = TargetSpec::memory("1MiB", 2).spawn();
    target.fault(1, "delay=200ms");
    let out = run_ok(
        Command::new(lunmpio_bin())
            .args(["target", "status", "--control"])
            .arg(&target.control),
    );
    let text = stdout_text(&out);
    assert!(text.contains("export lun0  size 1 MiB"), "{text}");
    assert!(text.contains("PORT  ADDRESS"), "{text}");
    assert!(text.contains("delay=200ms"), "{text}");
}

#[test]
fn sigterm_shuts_down_gracefully_and_removes_the_control_socket() {
    let mut target = TargetSpec::memory("1MiB", 2).spawn();
    // A connected client must not keep the target alive.
    let _held = TcpStream::connect(target.addr(0)).unwrap();
    let t = std::time::Instant::now();
    let status = target.terminate(Duration::from_secs(10));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    assert!(status.success(), "exit {status}; log:\n{}", target.log());
    assert!(!target.control.exists(), "control socket removed on exit");
    assert!(target.log().contains("stopped"), "{}", target.log());
}

#[test]
fn sigint_shuts_down_gracefully() {
    let mut target = TargetSpec::memory("1MiB", 1).spawn();
    target.process().signal(Signal::SIGINT);
    let status = target.process().wait_timeout(Duration::from_secs(10));
    assert!(
        matches!(status, Some(s) if s.success()),
        "{status:?}; log:\n{}",
        target.log()
    );
}
