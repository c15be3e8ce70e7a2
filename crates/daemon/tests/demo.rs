//! `lunmpio demo`: the showcase runs the simulated array end to end and passes, quickly.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn demo(args: &[&str], budget: Duration) {
    let t = Instant::now();
    let out = run(
        Command::new(LUNMPIO).arg("demo").args(args),
        Duration::from_secs(60),
    );
    let took = t.elapsed();
    let text = stdout_text(&out);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{text}\n{}",
        out.status,
        stderr_text(&out)
    );
    assert!(
        text.contains("arrives with the"),
        "says the full demo comes later:\n{text}"
    );
    assert!(text.contains("multipath engine"), "{text}");
    assert_eq!(
        text.matches("nbd://127.0.0.1:").count(),
        4,
        "prints the four URIs:\n{text}"
    );
    assert!(text.contains("verification mismatches: 0"), "{text}");
    assert!(text.contains("result: PASS"), "{text}");
    assert!(!text.contains("[FAIL]"), "{text}");
    for fault in ["down", "hang", "delay=", "error-rate=", "rate="] {
        assert!(text.contains(fault), "shows the {fault} fault:\n{text}");
    }
    assert!(
        took < budget,
        "demo {args:?} took {took:?}, budget {budget:?}"
    );
}

#[test]
fn demo_quick_passes() {
    demo(&["--quick"], Duration::from_secs(10));
}

#[test]
fn demo_default_passes_within_twenty_seconds() {
    demo(&[], Duration::from_secs(20));
}
