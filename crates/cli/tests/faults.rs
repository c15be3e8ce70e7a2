//! Every fault of `lunmpio target fault`, observed from real clients (qemu-io, nbdinfo, a raw socket).
//! Timing assertions are lower bounds only: a slow machine makes things slower, never faster.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lunmpio_testkit::*;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(15);

fn qemu_io_session(uri: &str) -> Interactive {
    let mut session = Interactive::spawn("qemu-io", tool("qemu-io").args(["-f", "raw", uri]));
    session.send("read 0 4k");
    assert!(
        session.expect("read 4096/4096", LONG).is_some(),
        "qemu-io could not read before the fault:\n{}",
        session.transcript()
    );
    session
}

fn nbdinfo(uri: &str) -> std::process::Command {
    let mut c = tool("nbdinfo");
    c.args(["--size", uri]);
    c
}

#[test]
fn down_resets_connected_clients_and_refuses_new_ones_until_up() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let mut raw = TcpStream::connect(target.addr(0)).unwrap();
    raw.set_read_timeout(Some(LONG)).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    let mut session = qemu_io_session(target.uri(0));

    target.fault(0, "down");

    // A connected client sees a reset (RST), not an orderly close.
    let mut byte = [0u8; 1];
    let err = raw.read(&mut byte).expect_err("the connection must fail");
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    session.send("read 0 4k");
    assert!(
        session.expect("failed", LONG).is_some(),
        "qemu-io did not see the path fail:\n{}",
        session.transcript()
    );
    // New connections are refused.
    run_fails(&mut nbdinfo(target.uri(0)));
    // The other port is unaffected.
    run_ok(&mut nbdinfo(target.uri(1)));

    target.fault(0, "up");
    let out = run_ok(&mut nbdinfo(target.uri(0)));
    assert_eq!(stdout_text(&out).trim(), (16u64 << 20).to_string());
    let status = target.status();
    assert!(
        status["ports"][0]["connectionsReset"].as_u64().unwrap() >= 2,
        "{status}"
    );
    assert!(
        status["ports"][0]["connectionsRefused"].as_u64().unwrap() >= 1,
        "{status}"
    );
    session.finish(Duration::from_secs(5));
}

#[test]
fn hang_answers_nothing_until_up_then_everything_proceeds() {
    require_tool("qemu-io", "qemu-utils");
    require_tool("nbdinfo", "libnbd-bin");
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let mut session = qemu_io_session(target.uri(0));

    target.fault(0, "hang");
    session.send("read 4k 4k");
    // A new connection gets no greeting either.
    let mut late = ProcessGuard::spawn("nbdinfo", &mut nbdinfo(target.uri(0)));
    assert!(
        session.expect("read 4096/4096", SHORT).is_none(),
        "a request completed on a hung port:\n{}",
        session.transcript()
    );
    assert!(late.is_running(), "nbdinfo finished against a hung port");
    assert_eq!(target.status()["ports"][0]["state"], "hung");
    // The other port still answers.
    run_ok(&mut nbdinfo(target.uri(1)));

    target.fault(0, "up");
    assert!(
        session.expect("read 4096/4096", LONG).is_some(),
        "the held request did not complete after up:\n{}",
        session.transcript()
    );
    let out = late.wait_output(LONG);
    assert!(
        out.status.success(),
        "held nbdinfo failed: {}",
        stderr_text(&out)
    );
    assert_eq!(stdout_text(&out).trim(), (16u64 << 20).to_string());
    session.finish(Duration::from_secs(5));
}

#[test]
fn delay_adds_latency_to_every_request() {
    require_tool("qemu-io", "qemu-utils");
    let target = TargetSpec::memory("16MiB", 1).spawn();
    let delay = Duration::from_millis(200);
    target.fault(0, "delay=200ms");
    assert_eq!(target.status()["ports"][0]["faults"]["delayMs"], 200.0);
    let reads = 3;
    let t = Instant::now();
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 0 4k",
        "-c",
        "read 4k 4k",
        "-c",
        "read 8k 4k",
        target.uri(0),
    ]));
    let took = t.elapsed();
    assert!(
        took >= delay * reads,
        "{reads} sequential reads took {took:?}, expected >= {:?}",
        delay * reads
    );

    target.fault(0, "delay=0");
    assert_eq!(target.status()["ports"][0]["faults"]["delayMs"], 0.0);
}

#[test]
fn error_rate_answers_eio_and_clear_restores() {
    require_tool("qemu-io", "qemu-utils");
    let target = TargetSpec::memory("16MiB", 2).spawn();
    target.fault(0, "error-rate=100%");
    let out = run_fails(tool("qemu-io").args(["-f", "raw", "-c", "read 0 4k", target.uri(0)]));
    let text = format!("{}{}", stdout_text(&out), stderr_text(&out));
    assert!(text.contains("Input/output error"), "{text}");
    assert!(target.counter(0, "errorsInjected") >= 1);
    // Port 1 is unaffected.
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "read 0 4k", target.uri(1)]));

    target.fault(0, "clear");
    let injected = target.counter(0, "errorsInjected");
    run_ok(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "read 0 4k",
        "-c",
        "write -P 1 0 4k",
        target.uri(0),
    ]));
    assert_eq!(
        target.counter(0, "errorsInjected"),
        injected,
        "no errors after clear"
    );

    // Both spellings of a probability are accepted and reported as a fraction.
    target.fault(1, "error-rate=5%");
    assert_eq!(target.status()["ports"][1]["faults"]["errorRate"], 0.05);
    target.fault(1, "error-rate=0.25");
    assert_eq!(target.status()["ports"][1]["faults"]["errorRate"], 0.25);
}

#[test]
fn rate_caps_bandwidth() {
    require_tool("qemu-io", "qemu-utils");
    let target = TargetSpec::memory("32MiB", 1).spawn();
    let rate = 16u64 << 20;
    let bytes = 16u64 << 20;
    target.fault(0, "rate=16MiB");
    assert_eq!(
        target.status()["ports"][0]["faults"]["rateBytesPerSec"],
        rate
    );
    let t = Instant::now();
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "read 0 16M", target.uri(0)]));
    let took = t.elapsed().as_secs_f64();
    // N/R is 1 s; the bucket's 50 ms burst and timer slack allow a little less. A generous floor only.
    let floor = 0.7 * bytes as f64 / rate as f64;
    assert!(
        took >= floor,
        "16 MiB at 16 MiB/s took {took:.3}s, expected >= {floor:.3}s"
    );
    assert!(target.counter(0, "bytesRead") >= bytes);

    target.fault(0, "rate=off");
    assert!(target.status()["ports"][0]["faults"]["rateBytesPerSec"].is_null());
}

#[test]
fn clear_removes_every_fault() {
    require_tool("qemu-io", "qemu-utils");
    let target = TargetSpec::memory("16MiB", 1).spawn();
    for fault in ["delay=1s", "error-rate=100%", "rate=1MiB", "hang", "down"] {
        target.fault(0, fault);
    }
    let port = &target.status()["ports"][0];
    assert_eq!(port["state"], "down");
    assert_eq!(port["faults"]["hang"], true);
    target.fault(0, "clear");
    let port = &target.status()["ports"][0];
    assert_eq!(port["state"], "up");
    assert_eq!(port["faults"]["delayMs"], 0.0);
    assert_eq!(port["faults"]["errorRate"], 0.0);
    assert!(port["faults"]["rateBytesPerSec"].is_null());
    let t = Instant::now();
    run_ok(tool("qemu-io").args(["-f", "raw", "-c", "read 0 1M", target.uri(0)]));
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "still slow after clear: {:?}",
        t.elapsed()
    );
}

#[test]
fn up_keeps_request_faults() {
    let target = TargetSpec::memory("1MiB", 1).spawn();
    target.fault(0, "delay=50ms");
    target.fault(0, "down");
    target.fault(0, "up");
    let port = &target.status()["ports"][0];
    assert_eq!(port["state"], "up");
    assert_eq!(port["faults"]["delayMs"], 50.0);
}

#[test]
fn bad_fault_values_are_rejected_and_change_nothing() {
    let target = TargetSpec::memory("1MiB", 2).spawn();
    for (port, fault, needle) in [
        (0, "delay=fast", "invalid duration `fast`"),
        (0, "error-rate=120%", "between 0 and 1"),
        (0, "rate=-1", "invalid rate"),
        (0, "sideways", "unknown fault `sideways`"),
        (5, "down", "no port 5"),
    ] {
        let out = run_fails(&mut target.fault_command(port, fault));
        let err = stderr_text(&out);
        assert!(err.contains(needle), "port {port} {fault}: {err}");
    }
    for port in target.status()["ports"].as_array().unwrap() {
        assert_eq!(port["state"], "up");
        assert_eq!(port["faults"]["delayMs"], 0.0);
        assert_eq!(port["faults"]["errorRate"], 0.0);
    }
}
