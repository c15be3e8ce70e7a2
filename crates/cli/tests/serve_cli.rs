//! The management command line end to end against a running `lunmpio serve`: every command with and
//! without `--json`, paths by name and by id, errors with their VDS name and HRESULT.

use std::process::{Command, Output};
use std::time::Duration;

use lunmpio_testkit::*;
use serde_json::{Value, json};

fn rig() -> (Daemon, Target) {
    let target = TargetSpec::memory("32MiB", 3).spawn();
    let daemon = Daemon::spawn(&format!(
        r#"[[lun]]
name = "lun0"
policy = "round-robin"
[[lun.path]]
uri = "{}"
name = "p0"
bind = "127.0.0.1"
[[lun.path]]
uri = "{}"
name = "p1"
[[lun.path]]
uri = "{}"
name = "p2"
"#,
        target.uri(0),
        target.uri(1),
        target.uri(2)
    ));
    (daemon, target)
}

fn cli(d: &Daemon, args: &[&str]) -> Output {
    let mut c: Command = d.cli();
    c.args(args);
    run_ok(&mut c)
}

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = cli(d, &all);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?} --json is not JSON ({e}):\n{}", stdout_text(&out)))
}

fn cli_text(d: &Daemon, args: &[&str]) -> String {
    stdout_text(&cli(d, args))
}

fn cli_fails(d: &Daemon, args: &[&str]) -> String {
    let mut c = d.cli();
    c.args(args);
    let out = run_fails(&mut c);
    stderr_text(&out)
}

#[test]
fn luns_topology_paths_and_policies() {
    let (d, _t) = rig();
    let text = cli_text(&d, &["luns"]);
    assert!(
        text.contains("lun0") && text.contains("VDS_LBP_ROUND_ROBIN"),
        "{text}"
    );
    let j = cli_json(&d, &["luns"]);
    assert_eq!(j["luns"][0]["name"], "lun0", "{j}");
    assert_eq!(j["luns"][0]["usablePaths"], 3, "{j}");

    let text = cli_text(&d, &["topology"]);
    assert!(
        text.contains("lun0") && text.contains("policy=round-robin"),
        "{text}"
    );
    for p in ["p0", "p1", "p2"] {
        assert!(text.contains(p), "{p} missing from:\n{text}");
    }
    let j = cli_json(&d, &["topology"]);
    assert_eq!(j[0]["lun"]["name"], "lun0", "{j}");
    assert_eq!(j[0]["paths"].as_array().unwrap().len(), 3, "{j}");

    let text = cli_text(&d, &["paths", "lun0"]);
    assert!(
        text.contains("VDS_MPS_ONLINE") && text.contains("p1") && text.contains("nbd://"),
        "{text}"
    );
    let j = cli_json(&d, &["paths", "lun0"]);
    assert_eq!(j, d.rpc_ok("GetPathInfo", json!({ "lun": "lun0" })));

    let text = cli_text(&d, &["policies", "lun0"]);
    assert!(
        text.contains("0x7f") && text.contains("service-time") && text.contains("VDS_LBP_FAILOVER"),
        "{text}"
    );
    let j = cli_json(&d, &["policies", "lun0"]);
    assert_eq!(j["flags"], 0x7f);
}

#[test]
fn policy_get_and_set() {
    let (d, _t) = rig();
    let text = cli_text(&d, &["policy", "get", "lun0"]);
    assert!(
        text.contains("VDS_LBP_ROUND_ROBIN") && text.contains("p2"),
        "{text}"
    );

    let text = cli_text(
        &d,
        &[
            "policy",
            "set",
            "lun0",
            "failover",
            "--primary",
            "p1",
            "--weight",
            "p2=5",
        ],
    );
    assert!(text.contains("lun0"), "{text}");
    let j = cli_json(&d, &["policy", "get", "lun0"]);
    assert_eq!(j["policy"], 1, "{j}");
    assert_eq!(j["policyName"], "VDS_LBP_FAILOVER");
    let entry = |j: &Value, p: &str| {
        let id = d.path_id("lun0", p);
        j["paths"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["pathId"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(entry(&j, "p1")["primary"], true, "{j}");
    assert_eq!(entry(&j, "p2")["weight"], 5, "{j}");
    assert_eq!(entry(&j, "p0")["primary"], false, "{j}");

    // By VDS name, by number, with a path given by its id, with --json.
    let p2_id = d.path_id("lun0", "p2")["pathId"]
        .as_str()
        .unwrap()
        .to_string();
    let out = cli_json(
        &d,
        &[
            "policy",
            "set",
            "lun0",
            "VDS_LBP_WEIGHTED_PATHS",
            "--weight",
            &format!("{p2_id}=1"),
        ],
    );
    assert_eq!(out, json!({}));
    assert_eq!(
        entry(&cli_json(&d, &["policy", "get", "lun0"]), "p2")["weight"],
        1
    );
    cli(&d, &["policy", "set", "lun0", "2"]);
    assert_eq!(cli_json(&d, &["policy", "get", "lun0"])["policy"], 2);

    // Errors name the VDS constant and the HRESULT, and exit non-zero.
    let err = cli_fails(&d, &["policy", "set", "lun0", "99"]);
    assert!(err.contains("E_INVALIDARG 0x80070057"), "{err}");
    let err = cli_fails(
        &d,
        &[
            "policy",
            "set",
            "lun0",
            "failover",
            "--primary",
            "p0",
            "--primary",
            "p1",
        ],
    );
    assert!(err.contains("E_INVALIDARG 0x80070057"), "{err}");
    let err = cli_fails(
        &d,
        &["policy", "set", "lun0", "failover", "--primary", "nosuch"],
    );
    assert!(err.contains("VDS_E_OBJECT_NOT_FOUND 0x80042405"), "{err}");
    let err = cli_fails(&d, &["policy", "get", "nolun"]);
    assert!(err.contains("VDS_E_OBJECT_NOT_FOUND 0x80042405"), "{err}");
    assert_eq!(
        cli_json(&d, &["policy", "get", "lun0"])["policy"],
        2,
        "failed sets changed nothing"
    );
}

#[test]
fn path_fail_standby_reinstate_by_name_and_by_id() {
    let (d, _t) = rig();
    let text = cli_text(&d, &["path", "fail", "lun0", "p1"]);
    assert!(text.contains("p1"), "{text}");
    assert_eq!(d.path_status("lun0", "p1"), "VDS_MPS_FAILED");
    assert_eq!(
        cli_json(&d, &["path", "reinstate", "lun0", "p1"]),
        json!({})
    );
    d.wait_path_status("lun0", "p1", "VDS_MPS_ONLINE", Duration::from_secs(10));

    let id = d.path_id("lun0", "p2")["pathId"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(id.starts_with("0x"));
    cli(&d, &["path", "standby", "lun0", &id]);
    assert_eq!(d.path_status("lun0", "p2"), "VDS_MPS_STANDBY");
    assert_eq!(cli_json(&d, &["path", "fail", "lun0", &id]), json!({}));
    assert_eq!(d.path_status("lun0", "p2"), "VDS_MPS_FAILED");
    cli(&d, &["path", "reinstate", "lun0", &id]);
    d.wait_path_status("lun0", "p2", "VDS_MPS_ONLINE", Duration::from_secs(10));

    let err = cli_fails(&d, &["path", "fail", "lun0", "nosuch"]);
    assert!(err.contains("VDS_E_OBJECT_NOT_FOUND 0x80042405"), "{err}");
    let err = cli_fails(&d, &["path", "fail", "nolun", "p0"]);
    assert!(err.contains("VDS_E_OBJECT_NOT_FOUND 0x80042405"), "{err}");
}

#[test]
fn hba_port_set_status_stats_and_events() {
    let (d, _t) = rig();
    let text = cli_text(
        &d,
        &[
            "hba-port",
            "set-status",
            "--initiator",
            "127.0.0.1",
            "failed",
        ],
    );
    assert!(
        text.contains("S_OK") || text.contains("0x00000000"),
        "{text}"
    );
    assert_eq!(d.path_status("lun0", "p0"), "VDS_MPS_FAILED");
    let j = cli_json(
        &d,
        &[
            "hba-port",
            "set-status",
            "--initiator",
            "127.0.0.1",
            "online",
        ],
    );
    assert_eq!(j["hresult"], 0, "{j}");
    d.wait_path_status("lun0", "p0", "VDS_MPS_ONLINE", Duration::from_secs(10));
    let err = cli_fails(
        &d,
        &[
            "hba-port",
            "set-status",
            "--initiator",
            "10.7.7.7",
            "failed",
        ],
    );
    assert!(err.contains("VDS_E_OBJECT_NOT_FOUND 0x80042405"), "{err}");
    let err = cli_fails(
        &d,
        &["hba-port", "set-status", "--initiator", "127.0.0.1", "3"],
    );
    assert!(err.contains("E_INVALIDARG 0x80070057"), "{err}");

    drive_reads(&d.nbd, "lun0", 30);
    let text = cli_text(&d, &["stats", "lun0"]);
    assert!(
        text.contains("READS") && text.contains("p2") && text.contains("ONLINE"),
        "{text}"
    );
    let j = cli_json(&d, &["stats", "lun0"]);
    let reads: u64 = j["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["reads"].as_u64().unwrap())
        .sum();
    assert_eq!(reads, 30, "{j}");

    let text = cli_text(&d, &["events"]);
    assert!(
        text.contains("lun0") && text.contains("p0") && text.contains("FAILED"),
        "{text}"
    );
    let out = cli(&d, &["events", "--json"]);
    let events: Vec<Value> = stdout_text(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let failed = events
        .iter()
        .find(|e| e["path"] == "p0" && e["toName"] == "VDS_MPS_FAILED")
        .unwrap_or_else(|| panic!("no p0 failed event: {events:?}"));
    assert!(!failed["cause"].as_str().unwrap().is_empty());
    let last = events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    let out = cli(
        &d,
        &[
            "events",
            "--json",
            "--since",
            &last.to_string(),
            "--lun",
            "lun0",
        ],
    );
    assert!(
        stdout_text(&out).trim().is_empty(),
        "nothing after the last seq: {}",
        stdout_text(&out)
    );
    let err = cli_fails(&d, &["stats", "nolun"]);
    assert!(err.contains("VDS_E_OBJECT_NOT_FOUND 0x80042405"), "{err}");
}

#[test]
fn an_unreachable_socket_is_a_clear_error() {
    let dir = tempdir();
    let missing = dir.path().join("nobody.sock");
    let mut c = Command::new(lunmpio_bin());
    c.arg("luns").arg("--socket").arg(&missing);
    let out = run_fails(&mut c);
    let err = stderr_text(&out);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("lunmpio serve"), "says what to do: {err}");
    // Through the environment variable too, and for every command.
    for args in [
        vec!["topology"],
        vec!["paths", "lun0"],
        vec!["events"],
        vec!["policy", "get", "lun0"],
    ] {
        let mut c = Command::new(lunmpio_bin());
        c.env("LUNMPIO_SOCKET", &missing).args(&args);
        let err = stderr_text(&run_fails(&mut c));
        assert!(
            err.contains("nobody.sock") && err.contains("lunmpio serve"),
            "{args:?}: {err}"
        );
    }
}

/// `lunmpio doctor --json` on `config`; the exit status and the findings' codes.
fn doctor(config: &std::path::Path, socket: &std::path::Path, extra: &[&str]) -> (i32, Value) {
    let out = run(
        Command::new(lunmpio_bin())
            .arg("doctor")
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(socket)
            .arg("--json")
            .args(extra),
        Duration::from_secs(30),
    );
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}\n{}", stdout_text(&out)));
    (out.status.code().unwrap_or(-1), report)
}

fn codes(report: &Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

/// Without a daemon, doctor checks the file: a client timeout shorter than io_timeout is an error,
/// a finite in_doubt_timeout without fence and every path through one target port are warnings;
/// each finding has a fix, and the text report prints it.
#[test]
fn doctor_checks_a_config_without_a_daemon() {
    let dir = tempdir();
    let config = dir.path().join("lunmpio.toml");
    std::fs::write(
        &config,
        "[[lun]]\nname = \"vol\"\nio_timeout = \"10s\"\n\
         [[lun.path]]\nuri = \"nbd://127.0.0.1:10809/vol\"\n\
         [[lun.path]]\nuri = \"nbd://127.0.0.1:10809/vol-b\"\nname = \"again\"\n",
    )
    .unwrap();
    let socket = dir.path().join("none.sock");
    let (status, report) = doctor(&config, &socket, &["--client-timeout", "5s"]);
    let found = codes(&report);
    assert_eq!(status, 2, "{report:#}");
    for code in [
        "timeouts.client_before_io_timeout",
        "in_doubt.no_fence",
        "paths.one_target_port",
        "clients.settings",
    ] {
        assert!(
            found.iter().any(|c| c == code),
            "{code} missing: {report:#}"
        );
    }
    assert!(
        report["daemon"].as_str().unwrap().contains("not reachable"),
        "{report:#}"
    );
    for f in report["findings"].as_array().unwrap() {
        assert!(
            !f["fix"].as_str().unwrap().is_empty(),
            "a finding without a fix: {f}"
        );
    }
    assert_eq!(
        report["findings"][0]["severity"], "error",
        "worst first: {report:#}"
    );

    let text = run(
        Command::new(lunmpio_bin())
            .args(["doctor", "--client-timeout", "5s", "--config"])
            .arg(&config)
            .arg("--socket")
            .arg(&socket),
        Duration::from_secs(30),
    );
    let text = stdout_text(&text);
    assert!(
        text.contains("fix: ") && text.contains("[in_doubt.no_fence]"),
        "{text}"
    );
    assert!(text.contains("1 error(s)"), "{text}");
}

/// A config that does not parse is an error naming the line; nothing else is claimed.
#[test]
fn doctor_reports_a_broken_config_with_its_line() {
    let dir = tempdir();
    let config = dir.path().join("lunmpio.toml");
    std::fs::write(&config, "[[lun]]\nname = \"vol\"\nio_timeut = \"5s\"\n").unwrap();
    let (status, report) = doctor(&config, &dir.path().join("none.sock"), &[]);
    assert_eq!(status, 2, "{report:#}");
    assert_eq!(codes(&report), ["config.invalid"], "{report:#}");
    let problem = report["findings"][0]["problem"].as_str().unwrap();
    assert!(
        problem.contains(":3:") && problem.contains("io_timeut"),
        "{problem}"
    );
    let (status, report) = doctor(
        &dir.path().join("missing.toml"),
        &dir.path().join("none.sock"),
        &[],
    );
    assert_eq!(
        (status, codes(&report)),
        (2, vec!["config.invalid".to_string()])
    );
}

/// With the daemon answering, doctor reads its live state: a failed path (a port of the target
/// down) with its reason, a LUN left with one usable path, and a LUN whose target does not
/// advertise CAN_MULTI_CONN so the configured round robin fell back to failover. Once the port is
/// back and only the multi-conn LUN is left out, a sound config has notes only: exit 0.
#[test]
fn doctor_reads_the_running_daemon() {
    require_tool("nbdkit", "nbdkit");
    let target = TargetSpec::memory("32MiB", 2).spawn();
    let dir = tempdir();
    let nbdkit_sock = dir.path().join("nomc.sock");
    let _nbdkit = spawn_unix_server(
        "nbdkit",
        tool("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&nbdkit_sock)
            .args([
                "--filter=multi-conn",
                "memory",
                "16M",
                "multi-conn-mode=disable",
            ]),
        &nbdkit_sock,
    );
    let sound = format!(
        "[[lun]]\nname = \"lun0\"\nin_doubt_timeout = \"never\"\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p0\"\nbind = \"127.0.0.1\"\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"p1\"\nbind = \"127.0.0.2\"\n",
        target.uri(0),
        target.uri(1)
    );
    let single_cache = format!(
        "[[lun]]\nname = \"nomc\"\npolicy = \"round-robin\"\nin_doubt_timeout = \"never\"\n\
         [[lun.path]]\nuri = \"{}\"\nname = \"a\"\n[[lun.path]]\nuri = \"{}\"\nname = \"b\"\n",
        unix_uri("a", &nbdkit_sock),
        unix_uri("b", &nbdkit_sock)
    );
    let daemon = Daemon::spawn_with("max_connections = 64\n", &format!("{sound}{single_cache}"));
    target.fault(1, "down");
    daemon.wait_path_status("lun0", "p1", "VDS_MPS_FAILED", Duration::from_secs(10));
    let (status, report) = doctor(&daemon.config, &daemon.socket, &[]);
    let found = codes(&report);
    assert_eq!(status, 1, "{report:#}");
    for code in ["path.failed", "lun.one_usable_path", "multi_conn.fallback"] {
        assert!(
            found.iter().any(|c| c == code),
            "{code} missing: {report:#}"
        );
    }
    assert!(
        report["daemon"].as_str().unwrap().starts_with("answered"),
        "{report:#}"
    );
    let failed = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "path.failed")
        .unwrap();
    assert_eq!(failed["subject"], "lun0/p1", "{failed}");

    target.fault(1, "up");
    daemon.wait_path_status("lun0", "p1", "VDS_MPS_ONLINE", Duration::from_secs(10));
    let sound_only = dir.path().join("sound.toml");
    let daemon_keys = std::fs::read_to_string(&daemon.config).unwrap();
    let daemon_keys = &daemon_keys[..daemon_keys.find("[[lun]]").unwrap()];
    std::fs::write(&sound_only, format!("{daemon_keys}{sound}")).unwrap();
    let (status, report) = doctor(&sound_only, &daemon.socket, &["--client-timeout", "5m"]);
    let serious: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] != "info" && f["subject"] != "nomc")
        .collect();
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(
        codes(&report).iter().any(|c| c == "daemon.other_config"),
        "{report:#}"
    );
    // The nomc LUN is live but not in sound.toml: nothing is claimed about its configured policy.
    assert_eq!(status, 0, "{report:#}");
}
