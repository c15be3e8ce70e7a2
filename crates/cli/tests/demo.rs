//! `lunmpio demo`: the showcase runs the whole scenario end to end, and its summary says what happened.
//!
//! The checks read the `--json` summary's fields and values (not just the exit status): no error, no
//! mismatch, every guarantee held, both single-port faults detected with a cause, and shares of I/O
//! per path that match each phase (a crashed path carries nothing; all paths carry I/O again after the
//! repair; least-queue-depth and service-time send less to the slow path than round-robin does).

use std::process::Command;
use std::time::Duration;

use lunmpio_testkit::*;
use serde_json::Value;

const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

fn quick_json(extra: &[&str]) -> (Value, String) {
    let out = run(
        Command::new(lunmpio_bin())
            .args(["demo", "--quick", "--json"])
            .args(extra),
        DEMO_TIMEOUT,
    );
    let stdout = stdout_text(&out);
    let stderr = stderr_text(&out);
    assert!(
        out.status.success(),
        "demo failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let summary: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}):\n{stdout}"));
    (summary, stderr)
}

fn share(phase: &Value, path: &str) -> f64 {
    phase["shares"][path]
        .as_f64()
        .unwrap_or_else(|| panic!("no share for {path} in {phase}"))
}

fn phase<'a>(summary: &'a Value, starts_with: &str) -> &'a Value {
    summary["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .find(|p| p["name"].as_str().unwrap_or("").starts_with(starts_with))
        .unwrap_or_else(|| panic!("no phase {starts_with:?} in {}", summary["phases"]))
}

#[test]
fn quick_json_summary_reports_a_clean_run() {
    let (s, stderr) = quick_json(&[]);

    // Totals and the guarantees.
    assert!(s["ios"].as_u64().unwrap() > 100, "{s}");
    assert!(s["bytes"].as_u64().unwrap() > 1 << 20, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["mismatches"], 0, "{s}");
    assert_eq!(s["guaranteesHeld"], true, "{s}");
    // The last phase: a `lunmpio serve` of its own replaced its program under load.
    let up = &s["liveUpgrade"];
    assert_eq!(up["held"], true, "{up}");
    assert_eq!(up["samePid"], true, "{up}");
    assert_eq!(
        (up["errors"].as_u64(), up["mismatches"].as_u64()),
        (Some(0), Some(0)),
        "{up}"
    );
    assert_eq!(up["upgrades"], 1, "{up}");
    assert!(s["blocksVerifiedAtEnd"].as_u64().unwrap() > 0, "{s}");
    let max_stall = s["maxStallMs"].as_f64().expect("maxStallMs");
    assert!(max_stall > 0.0 && max_stall < 30_000.0, "{max_stall}");
    for check in s["checks"].as_array().expect("checks") {
        assert_eq!(check["held"], true, "{check}");
    }

    // Failovers: port0 crashed, port1 hung; each detected, with the engine's cause.
    let failovers = s["failovers"].as_array().expect("failovers");
    assert_eq!(failovers.len(), 2, "{failovers:?}");
    let down = &failovers[0];
    assert_eq!(down["path"], "port0");
    assert_eq!(down["fault"], "down");
    let cause = down["cause"].as_str().unwrap();
    assert!(
        cause.contains("closed") || cause.contains("reset"),
        "crash cause: {cause}"
    );
    let hang = &failovers[1];
    assert_eq!(hang["path"], "port1");
    assert_eq!(hang["fault"], "hang");
    let cause = hang["cause"].as_str().unwrap();
    assert!(
        cause.contains("no reply") || cause.contains("timed out"),
        "hang cause: {cause}"
    );
    for f in failovers {
        let detect = f["detectMs"].as_f64().expect("detected");
        let stall = f["stallMs"].as_f64().expect("stallMs");
        assert!((0.0..6000.0).contains(&detect), "{f}");
        // A hang is bounded by io_timeout (5 s) plus slack; a crash by far less.
        assert!((0.0..6000.0).contains(&stall), "{f}");
    }

    // All paths down: I/O was queued and completed.
    let all_down = &s["allPathsDown"];
    assert!(all_down["queuedIosMax"].as_u64().unwrap() > 0, "{all_down}");

    // Shares per phase.
    let phases = s["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 9, "{phases:?}");
    for p in phases {
        let sum: f64 = ["port0", "port1", "port2", "port3"]
            .iter()
            .map(|n| share(p, n))
            .sum();
        assert!(
            p["ios"].as_u64().unwrap() == 0 || (sum - 1.0).abs() < 0.01,
            "{p}"
        );
    }
    let first = phase(&s, "all paths, round-robin");
    for n in ["port0", "port1", "port2", "port3"] {
        let v = share(first, n);
        assert!((0.15..0.35).contains(&v), "round-robin share of {n}: {v}");
    }
    let crashed = phase(&s, "port0 crashed");
    assert!(share(crashed, "port0") < 0.05, "{crashed}");
    let hung = phase(&s, "port1 hung");
    assert!(share(hung, "port0") < 0.05, "{hung}");
    assert!(share(hung, "port1") < 0.5, "{hung}");
    let back = phase(&s, "all paths back");
    for n in ["port0", "port1", "port2", "port3"] {
        assert!(share(back, n) > 0.1, "{n} carries I/O again: {back}");
    }
    let rr = share(phase(&s, "port2 slow (delay"), "port2");
    let lqd = share(phase(&s, "port2 slow, least-queue-depth"), "port2");
    let st = share(phase(&s, "port2 slow, service-time"), "port2");
    assert!(
        rr > 0.15,
        "round-robin keeps sending to the slow path: {rr}"
    );
    assert!(
        lqd < rr,
        "least-queue-depth avoids the slow path: {lqd} vs {rr}"
    );
    assert!(st < rr, "service-time avoids the slow path: {st} vs {rr}");

    // The people's view went to stderr, with an event line per transition.
    assert!(stderr.contains("port0: Online → Failed"), "{stderr}");
    assert!(stderr.contains("port1: Online → Failed"), "{stderr}");
    assert!(stderr.contains("Failed → Online"), "{stderr}");
    assert!(stderr.contains("all paths down"), "{stderr}");
    assert!(
        stderr.contains("policy set to least-queue-depth"),
        "{stderr}"
    );
    assert!(stderr.contains("result: PASS"), "{stderr}");
}

/// A deliberately small well-formedness check: every tag closes in order, attributes are quoted,
/// text has no bare `<` or `&`.
fn assert_well_formed_xml(text: &str) {
    let body = text
        .strip_prefix("<?xml")
        .and_then(|r| r.split_once("?>"))
        .map_or(text, |(_, r)| r);
    let mut stack: Vec<String> = Vec::new();
    let mut rest = body;
    while let Some(start) = rest.find(['<', '&']) {
        let (before, at) = rest.split_at(start);
        assert!(!before.contains('>'), "stray '>' in text: {before:?}");
        if at.starts_with('&') {
            let end = at.find(';').expect("entity ends with ';'");
            let entity = &at[..=end];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].contains(&entity),
                "unknown entity {entity}"
            );
            rest = &at[end + 1..];
            continue;
        }
        let end = at.find('>').expect("tag closes");
        let tag = &at[1..end];
        rest = &at[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "closing tag order"
            );
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name = tag.split_whitespace().next().expect("tag name");
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        assert!(!tag.contains('<'), "'<' inside <{tag}>");
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    assert!(stack.is_empty(), "unclosed tags: {stack:?}");
}

#[test]
fn plot_writes_a_well_formed_svg() {
    let dir = tempdir();
    let file = dir.path().join("demo.svg");
    let (s, stderr) = quick_json(&["--plot", file.to_str().unwrap()]);
    assert_eq!(s["guaranteesHeld"], true);
    assert!(stderr.contains("plot written to"), "{stderr}");
    let svg = std::fs::read_to_string(&file).expect("the SVG was written");
    assert!(svg.starts_with("<?xml"), "{}", &svg[..80.min(svg.len())]);
    assert!(svg.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_well_formed_xml(&svg);
    // One line per path, a legend entry per path, the faults marked.
    assert_eq!(svg.matches("<polyline").count(), 4, "one line per path");
    for n in ["port0", "port1", "port2", "port3"] {
        assert!(svg.contains(&format!(">{n}</text>")), "legend for {n}");
    }
    for label in ["port0 down", "port1 hang", "all down", "all up"] {
        assert!(svg.contains(label), "marker {label}");
    }
}

#[test]
fn bad_flags_are_refused_with_a_message() {
    for args in [
        &["demo", "--paths", "2"][..],
        &["demo", "--paths", "x"],
        &["demo", "--duration", "1s"],
        &["demo", "--duration", "soon"],
        &["demo", "--bogus"],
    ] {
        let out = run(
            Command::new(lunmpio_bin()).args(args),
            Duration::from_secs(20),
        );
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr_text(&out)
        );
        let err = stderr_text(&out);
        assert!(err.contains("error:"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// On a terminal (tmux) the live view is a ratatui inline viewport with the paths table of
/// `lunmpio top` under the phase and workload lines, the event lines scroll above it, the last panel
/// stays on the screen above the summary, and the run passes.
#[test]
fn on_a_terminal_the_live_view_draws_the_consoles_paths_table() {
    let bin = lunmpio_testkit::lunmpio_bin();
    let screen =
        lunmpio_testkit::tmux::Tmux::start(&[bin.to_str().unwrap(), "demo", "--quick"], 110, 32);
    // One wait for the whole panel: a capture can catch a frame half drawn.
    screen.wait_screen("the live panel", Duration::from_secs(60), |s| {
        s.contains("── t=")
            && s.contains("PATH       STATUS   IOPS")
            && s.contains("port0")
            && s.contains("workload:")
    });
    assert_eq!(
        screen.wait_exit(Duration::from_secs(120)),
        0,
        "{}",
        screen.scrollback()
    );
    let all = screen.scrollback();
    let panel = all.rfind("── t=").expect("the last panel");
    let summary = all.rfind("summary").expect("the summary");
    assert!(
        panel < summary,
        "the last panel stays above the summary:\n{all}"
    );
    assert!(all.contains("result: PASS"), "{all}");
    assert!(
        all.contains("── phase 2: port0 crashed"),
        "event lines scroll above:\n{all}"
    );
}

/// With `--json` the view goes to stderr (a terminal here) and stdout to a file: the file holds the
/// JSON summary and nothing else (no terminal query, no panel).
#[test]
fn json_on_stdout_stays_clean_when_the_view_is_on_a_terminal() {
    let bin = lunmpio_testkit::lunmpio_bin();
    let dir = tempdir();
    let json = dir.path().join("summary.json");
    let script = format!(
        "'{}' demo --quick --json > '{}'",
        bin.display(),
        json.display()
    );
    let screen = lunmpio_testkit::tmux::Tmux::start(&["sh", "-c", &script], 110, 32);
    assert_eq!(
        screen.wait_exit(Duration::from_secs(120)),
        0,
        "{}",
        screen.scrollback()
    );
    let text = std::fs::read_to_string(&json).expect("the summary file");
    let summary: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("stdout is not only JSON ({e}):\n{text:?}"));
    assert_eq!(summary["guaranteesHeld"], true, "{summary}");
}
