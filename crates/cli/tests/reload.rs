//! Live reconfiguration (issue 13 §1): `lunmpio reload` and SIGHUP apply a changed config file to a
//! running daemon. LUNs are added and removed, and paths are added and removed under fio
//! verify=crc32c, with 0 errors. A broken config changes nothing, and SIGHUP storms leave a
//! serving daemon.

use std::time::Duration;

use lunmpio_testkit::fio::Fio;
use lunmpio_testkit::*;
use nix::sys::signal::Signal;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// Writes a new `[[lun]]` part under the daemon's generated `[daemon]` table.
fn rewrite(daemon: &Daemon, rest: &str) {
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let (head, _) = text.split_once("\n\n").expect("[daemon] then the rest");
    std::fs::write(&daemon.config, format!("{head}\n\n{rest}")).unwrap();
}

fn reload(daemon: &Daemon) -> Value {
    let out = run_ok(daemon.cli().args(["reload", "--json"]));
    serde_json::from_str(&stdout_text(&out)).expect("reload --json")
}

/// A LUN's path names, sorted (GetPathInfo lists them by path id).
fn path_names(daemon: &Daemon, lun: &str) -> Vec<String> {
    let mut names: Vec<String> = daemon
        .path_info(lun)
        .paths
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    names
}

fn path_ios(daemon: &Daemon, lun: &str, path: &str) -> u64 {
    let stats = daemon.statistics(lun);
    stats
        .paths
        .iter()
        .find(|p| p.name == path)
        .map_or(0, |p| p.ios)
}

fn lun_names(daemon: &Daemon) -> Vec<String> {
    daemon
        .client()
        .list_luns()
        .unwrap()
        .luns
        .into_iter()
        .map(|l| l.name)
        .collect()
}

fn nbdinfo(uri: &str) -> std::process::Output {
    require_tool("nbdinfo", "libnbd-bin");
    run(tool("nbdinfo").arg(uri), WAIT)
}

fn lun(name: &str, paths: &[(&str, &str)]) -> String {
    let mut t = format!("[[lun]]\nname = \"{name}\"\npolicy = \"round-robin\"\n");
    for (path, uri) in paths {
        t += &format!("[[lun.path]]\nuri = \"{uri}\"\nname = \"{path}\"\n");
    }
    t
}

#[test]
fn reloads_add_remove_and_change_luns_under_verified_io() {
    let target = TargetSpec::memory("64MiB", 3).spawn();
    let other = TargetSpec::memory("16MiB", 1).spawn();
    let (t0, t1, t2, u0) = (target.uri(0), target.uri(1), target.uri(2), other.uri(0));
    let daemon = Daemon::spawn(&lun("vol", &[("p0", t0), ("p1", t1)]));
    let mut fio = Fio::start(&daemon.uri("vol"), Duration::from_secs(12), &[]);
    assert!(wait_until(WAIT, || daemon
        .path_ios("vol")
        .iter()
        .sum::<u64>()
        > 2_000));

    // A policy set through management wins over the file across the LUN's restart, and the
    // counters of a path that stays go on.
    run_ok(
        daemon
            .cli()
            .args(["policy", "set", "vol", "least-queue-depth"]),
    );
    let p0_before = path_ios(&daemon, "vol", "p0");
    // p1 out, p2 in, and a second LUN.
    rewrite(
        &daemon,
        &format!(
            "{}{}",
            lun("vol", &[("p0", t0), ("p2", t2)]),
            lun("extra", &[("q0", u0)])
        ),
    );
    fio.assert_running("the first reload");
    let r = reload(&daemon);
    assert_eq!(r["restarted"], serde_json::json!(["vol"]), "{r}");
    assert_eq!(r["added"], serde_json::json!(["extra"]), "{r}");
    assert_eq!(r["failed"], serde_json::json!([]), "{r}");
    assert_eq!(path_names(&daemon, "vol"), vec!["p0", "p2"]);
    assert!(
        path_ios(&daemon, "vol", "p0") >= p0_before,
        "p0's counters carried over"
    );
    let policy = daemon.client().get_load_balance_policy("vol").unwrap();
    assert_eq!(
        policy.policy_name, "VDS_LBP_DYN_LEAST_QUEUE_DEPTH",
        "the persisted policy won"
    );
    assert!(nbdinfo(&daemon.uri("extra")).status.success());
    // I/O goes on over the new path.
    assert!(wait_until(WAIT, || path_ios(&daemon, "vol", "p2") > 0));

    // The second LUN goes away again; vol is untouched.
    rewrite(&daemon, &lun("vol", &[("p0", t0), ("p2", t2)]));
    let r = reload(&daemon);
    assert_eq!(r["removed"], serde_json::json!(["extra"]), "{r}");
    assert_eq!(r["restarted"], serde_json::json!([]), "{r}");
    assert_eq!(r["unchanged"], 1);
    assert!(!nbdinfo(&daemon.uri("extra")).status.success());
    assert_eq!(lun_names(&daemon), vec!["vol"]);

    // A broken file changes nothing and says where it is broken.
    rewrite(
        &daemon,
        &format!("{}polcy = \"failover\"\n", lun("vol", &[("p0", t0)])),
    );
    let out = run_fails(daemon.cli().arg("reload"));
    let err = stderr_text(&out);
    assert!(
        err.contains("lunmpio.toml:") && err.contains("polcy") && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(path_names(&daemon, "vol"), vec!["p0", "p2"]);

    let report = fio.finish(Duration::from_secs(90));
    report.assert_clean("reloads under fio");
    eprintln!(
        "reloads under fio verify: longest completion {} ms, longest gap between completions {} ms",
        report.clat_max.as_millis(),
        report.gap_max.as_millis()
    );
    let events = run_ok(daemon.cli().args(["events", "--lun", "vol"]));
    assert!(
        stdout_text(&events).contains("reload: LUN restarted (path p2 added; path p1 removed)"),
        "{}",
        stdout_text(&events)
    );
    let info = run_ok(daemon.cli().args(["daemon", "--json"]));
    let info: Value = serde_json::from_str(&stdout_text(&info)).unwrap();
    assert_eq!(info["reloads"], 2, "{info}");
    assert_eq!(info["pid"], daemon.pid());
    let config = std::fs::canonicalize(&daemon.config).unwrap();
    assert_eq!(info["config"], config.display().to_string());
}

#[test]
fn a_storm_of_sighups_reloads_and_leaves_a_serving_daemon() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let mut daemon = Daemon::spawn(&lun("a", &[("p0", target.uri(0))]));
    rewrite(
        &daemon,
        &format!(
            "{}{}",
            lun("a", &[("p0", target.uri(0))]),
            lun("b", &[("p0", target.uri(1))])
        ),
    );
    for _ in 0..50 {
        daemon.process().signal(Signal::SIGHUP);
    }
    assert!(
        wait_until(WAIT, || lun_names(&daemon) == ["a", "b"]),
        "LUN b appeared; log:\n{}",
        daemon.log()
    );
    assert!(daemon.process().is_running());
    assert!(nbdinfo(&daemon.uri("b")).status.success());
    assert!(nbdinfo(&daemon.uri("a")).status.success());
    let reloads = daemon.client().get_daemon_info().unwrap().reloads;
    assert!((1..=50).contains(&reloads), "{reloads} reloads");
    assert!(
        daemon.log().contains("SIGHUP: config reloaded"),
        "{}",
        daemon.log()
    );
}
