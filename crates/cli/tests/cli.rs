//! The command line: help that teaches, a version, and clear errors with a non-zero exit for bad input.

use std::time::Duration;

use assert_cmd::Command;
use predicates::prelude::*;

/// Every CLI test has a deadline: a bad argument that slipped through would otherwise start a server
/// that never exits.
fn lunmpio() -> Command {
    let mut c = Command::new(lunmpio_testkit::lunmpio_bin());
    c.timeout(Duration::from_secs(30));
    c
}

#[test]
fn help_teaches() {
    lunmpio()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("multipath"))
        .stdout(predicate::str::contains("Examples:"))
        .stdout(predicate::str::contains("target"))
        .stdout(predicate::str::contains("demo"));
}

#[test]
fn target_help_lists_faults_and_examples() {
    lunmpio()
        .args(["target", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--memory"))
        .stdout(predicate::str::contains("error-rate=P"))
        .stdout(predicate::str::contains("lunmpio target fault"));
    lunmpio()
        .args(["target", "fault", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("--port"));
}

#[test]
fn version() {
    lunmpio()
        .arg("--version")
        .assert()
        .success()
        .stdout(predicate::str::starts_with(format!(
            "lunmpio {}",
            env!("CARGO_PKG_VERSION")
        )));
}

#[test]
fn no_subcommand_is_an_error() {
    lunmpio()
        .assert()
        .failure()
        .stderr(predicate::str::contains("Usage"));
}

#[test]
fn unknown_subcommand_is_an_error() {
    lunmpio()
        .arg("frobnicate")
        .assert()
        .code(2)
        .stderr(predicate::str::contains("unrecognized subcommand"));
}

#[test]
fn target_needs_a_backing() {
    lunmpio()
        .args(["target", "--ports", "2"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("--image").and(predicate::str::contains("--memory")));
}

#[test]
fn target_rejects_both_backings() {
    lunmpio()
        .args(["target", "--memory", "1M", "--image", "/tmp/x.img"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains("cannot be used with"));
}

#[test]
fn target_rejects_bad_sizes_and_counts() {
    for (args, needle) in [
        (&["--memory", "lots"][..], "invalid size `lots`"),
        (&["--memory", "0"], "must be greater than 0"),
        (&["--memory", "1M", "--ports", "0"], "--ports"),
        (&["--memory", "1M", "--ports", "many"], "--ports"),
        (&["--memory", "1M", "--size", "1M"], "cannot be used with"),
    ] {
        lunmpio()
            .arg("target")
            .args(args)
            .assert()
            .code(2)
            .stderr(predicate::str::contains(needle));
    }
}

#[test]
fn target_rejects_bad_listen_address() {
    lunmpio()
        .args(["target", "--memory", "1M", "--listen", "not-an-address"])
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "invalid --listen `not-an-address`",
        ));
    lunmpio()
        .args([
            "target",
            "--memory",
            "1M",
            "--ports",
            "4",
            "--listen",
            "127.0.0.1:65534",
        ])
        .assert()
        .failure()
        .stderr(predicate::str::contains("beyond 65535"));
}

#[test]
fn target_reports_a_missing_image() {
    let dir = lunmpio_testkit::tempdir();
    lunmpio()
        .args(["target", "--image"])
        .arg(dir.path().join("missing.img"))
        .assert()
        .failure()
        .stderr(predicate::str::contains(
            "does not exist (give --size to create it)",
        ));
}

#[test]
fn fault_rejects_bad_values_before_connecting() {
    for (fault, needle) in [
        ("explode", "unknown fault `explode`"),
        ("delay=soon", "invalid duration `soon`"),
        ("delay=200", "missing unit"),
        ("error-rate=2", "between 0 and 1"),
        ("rate=0", "greater than 0"),
        ("down=now", "takes no value"),
    ] {
        lunmpio()
            .args([
                "target",
                "fault",
                "--control",
                "/nonexistent.sock",
                "--port",
                "0",
                fault,
            ])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(needle));
    }
}

#[test]
fn fault_reports_an_unreachable_control_socket() {
    lunmpio()
        .args([
            "target",
            "fault",
            "--control",
            "/nonexistent/ctl.sock",
            "--port",
            "0",
            "down",
        ])
        .assert()
        .code(1)
        .stderr(predicate::str::contains(
            "cannot connect to control socket /nonexistent/ctl.sock",
        ));
    lunmpio()
        .args(["target", "status", "--control", "/nonexistent/ctl.sock"])
        .assert()
        .code(1)
        .stderr(predicate::str::contains("cannot connect to control socket"));
}

#[test]
fn demo_help_says_what_it_does_today() {
    lunmpio()
        .args(["demo", "--help"])
        .assert()
        .success()
        .stdout(predicate::str::contains("service-time"))
        .stdout(predicate::str::contains("--plot"))
        .stdout(predicate::str::contains("--json"))
        .stdout(predicate::str::contains("--quick"));
}
