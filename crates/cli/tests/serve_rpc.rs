//! Every JSON-RPC method of `lunmpio serve`'s control socket, over the real socket: results, every
//! error code, all-or-nothing Sets, protocol errors on a connection that stays usable, concurrency,
//! the socket's mode, and persistence across a restart.

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use lunmpio_rpc::RpcError;
use lunmpio_testkit::*;
use serde_json::{Value, json};

const E_INVALIDARG: u32 = 0x8007_0057;
const VDS_E_NOT_SUPPORTED: u32 = 0x8004_2400;
const VDS_E_OBJECT_NOT_FOUND: u32 = 0x8004_2405;
const VDS_E_ANOTHER_CALL_IN_PROGRESS: u32 = 0x8004_2404;
const VDS_S_STATUSES_INCOMPLETELY_SET: i64 = 0x0004_2702;

/// `lun0` over the three ports of one target: p0 through initiator 127.0.0.1, p1 through 127.0.0.2,
/// p2 unbound. `lun1` over two ports of another target, both through initiator 127.0.0.3.
struct Rig {
    daemon: Daemon,
    _t0: Target,
    _t1: Target,
}

fn rig_toml(t0: &Target, t1: &Target) -> String {
    format!(
        r#"[defaults]
check_interval = "200ms"

[[lun]]
name = "lun0"
policy = "round-robin"
[[lun.path]]
uri = "{}"
name = "p0"
bind = "127.0.0.1"
[[lun.path]]
uri = "{}"
name = "p1"
bind = "127.0.0.2"
[[lun.path]]
uri = "{}"
name = "p2"

[[lun]]
name = "lun1"
policy = "round-robin"
[[lun.path]]
uri = "{}"
name = "q0"
bind = "127.0.0.3"
[[lun.path]]
uri = "{}"
name = "q1"
bind = "127.0.0.3"
"#,
        t0.uri(0),
        t0.uri(1),
        t0.uri(2),
        t1.uri(0),
        t1.uri(1)
    )
}

fn rig() -> Rig {
    let t0 = TargetSpec::memory("32MiB", 3).spawn();
    let t1 = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = Daemon::spawn(&rig_toml(&t0, &t1));
    Rig {
        daemon,
        _t0: t0,
        _t1: t1,
    }
}

/// Asserts an error's code, `data.hresult` and `data.name`.
fn assert_hresult(e: &RpcError, hresult: u32, name: &str) {
    assert_eq!(e.code, hresult as i32, "{e:?}");
    let data = e
        .data
        .as_ref()
        .unwrap_or_else(|| panic!("no data in {e:?}"));
    assert_eq!(data["hresult"], format!("0x{hresult:08X}"), "{e:?}");
    assert_eq!(data["name"], name, "{e:?}");
    assert!(!e.message.is_empty());
}

fn expect(d: &Daemon, method: &str, params: Value, hresult: u32, name: &str) {
    let e = d.rpc_err(method, params);
    assert_hresult(&e, hresult, name);
}

/// Everything a failed Set must leave alone.
fn snapshot(d: &Daemon, lun: &str) -> (Value, Value, Value) {
    let info = d.rpc_ok("GetPathInfo", json!({ "lun": lun }));
    let statuses: Value = info["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| json!([p["pathId"], p["status"]]))
        .collect();
    (
        d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": lun })),
        statuses,
        d.rpc_ok("GetSupportedLbPolicies", json!({ "lun": lun })),
    )
}

fn unknown_path(d: &Daemon) -> Value {
    let mut id = d.path_id("lun0", "p0");
    id["pathId"] = json!("0x0000000000000001");
    id
}

#[test]
fn get_path_info_and_get_load_balance_policy_list_the_same_paths() {
    let r = rig();
    let d = &r.daemon;
    let info = d.rpc_ok("GetPathInfo", json!({ "lun": "lun0" }));
    let policy = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    let a: Vec<&Value> = info["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["pathId"])
        .collect();
    let b: Vec<&Value> = policy["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["pathId"])
        .collect();
    assert_eq!(a.len(), 3, "{info}");
    assert_eq!(a, b, "same ids, same order");
    let ids: Vec<u64> = a
        .iter()
        .map(|p| {
            u64::from_str_radix(p["pathId"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "sorted by path id: {ids:x?}"
    );
    let source = &a[0]["sourceId"];
    assert!(a.iter().all(|p| &p["sourceId"] == source));
    assert_eq!(policy["policy"], 2);
    assert_eq!(policy["policyName"], "VDS_LBP_ROUND_ROBIN");
    for p in info["paths"].as_array().unwrap() {
        assert_eq!(p["status"], 1, "{p}");
        assert_eq!(p["statusName"], "VDS_MPS_ONLINE", "{p}");
        assert!(
            p["typeName"].as_str().unwrap().starts_with("VDS_HWT_"),
            "{p}"
        );
        assert!(p["uri"].as_str().unwrap().starts_with("nbd://"), "{p}");
        assert!(
            p.get("transport").is_some() && p.get("statusReason").is_some(),
            "{p}"
        );
        assert!(p.get("targetPortalId").is_some(), "{p}");
    }
    let p0 = info["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "p0")
        .unwrap();
    assert_eq!(p0["initiatorPortalIpAddr"]["address"], "127.0.0.1", "{p0}");
    for p in policy["paths"].as_array().unwrap() {
        assert!(p["primary"].is_boolean() && p["weight"].is_u64(), "{p}");
    }
}

#[test]
fn set_load_balance_policy_succeeds_by_number_vds_name_and_config_name() {
    let r = rig();
    let d = &r.daemon;
    for (policy, value) in [
        (json!(4), 4),
        (json!("VDS_LBP_WEIGHTED_PATHS"), 5),
        (json!("least-blocks"), 6),
        (json!("service-time"), 7),
        (json!("VDS_LBP_VENDOR_SPECIFIC"), 7),
        (json!("round-robin"), 2),
    ] {
        let ok = d.rpc_ok(
            "SetLoadBalancePolicy",
            json!({ "lun": "lun0", "policy": policy, "paths": [] }),
        );
        assert_eq!(ok, json!({}));
        let now = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
        assert_eq!(now["policy"], value, "after {policy}: {now}");
    }
    // Listed paths change; unlisted ones keep their flag and weight.
    let p1 = d.path_id("lun0", "p1");
    d.rpc_ok(
        "SetLoadBalancePolicy",
        json!({ "lun": "lun0", "policy": "failover", "paths": [{ "pathId": p1, "primary": true, "weight": 3 }] }),
    );
    let now = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    let entry = |id: &Value| {
        now["paths"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| &p["pathId"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(entry(&p1)["primary"], true, "{now}");
    assert_eq!(entry(&p1)["weight"], 3, "{now}");
    assert_eq!(entry(&d.path_id("lun0", "p0"))["primary"], false, "{now}");
    // 64-bit ids are accepted as JSON numbers too.
    let numeric = json!({
        "sourceId": u64::from_str_radix(p1["sourceId"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap(),
        "pathId": u64::from_str_radix(p1["pathId"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap(),
    });
    d.rpc_ok(
        "SetLoadBalancePolicy",
        json!({ "lun": "lun0", "policy": 1, "paths": [{ "pathId": numeric, "weight": 4 }] }),
    );
    let now = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    assert!(
        now["paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pathId"] == p1 && p["weight"] == 4),
        "{now}"
    );
}

#[test]
fn a_failed_set_load_balance_policy_changes_nothing() {
    let r = rig();
    let d = &r.daemon;
    let (p0, p1, p2) = (
        d.path_id("lun0", "p0"),
        d.path_id("lun0", "p1"),
        d.path_id("lun0", "p2"),
    );
    // A non-default state to compare against.
    d.rpc_ok(
        "SetLoadBalancePolicy",
        json!({ "lun": "lun0", "policy": "weighted-paths", "paths": [{ "pathId": p2, "weight": 9 }] }),
    );
    let before = snapshot(d, "lun0");
    let cases: Vec<(Value, u32, &str)> = vec![
        (
            json!({ "policy": 0, "paths": [] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        (
            json!({ "policy": 99, "paths": [] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        (
            json!({ "policy": -1, "paths": [] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        (
            json!({ "policy": "fastest", "paths": [] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        (
            json!({ "policy": 2, "paths": [{ "pathId": unknown_path(d), "weight": 1 }] }),
            VDS_E_OBJECT_NOT_FOUND,
            "VDS_E_OBJECT_NOT_FOUND",
        ),
        (
            json!({ "policy": 2, "paths": [{ "pathId": p0, "weight": 1 }, { "pathId": p0, "weight": 2 }] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        (
            json!({ "policy": "failover", "paths": [{ "pathId": p0, "primary": true }, { "pathId": p1, "primary": true }] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        (
            json!({ "policy": "round-robin-with-subset", "paths": [
                { "pathId": p0, "primary": false }, { "pathId": p1, "primary": false }, { "pathId": p2, "primary": false }] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
        // A good entry before a bad one: nothing of it may stick.
        (
            json!({ "policy": 2, "paths": [{ "pathId": p1, "weight": 77 }, { "pathId": unknown_path(d) }] }),
            VDS_E_OBJECT_NOT_FOUND,
            "VDS_E_OBJECT_NOT_FOUND",
        ),
        (
            json!({ "policy": 2, "paths": [{ "pathId": p1, "weight": -5 }] }),
            E_INVALIDARG,
            "E_INVALIDARG",
        ),
    ];
    for (mut params, hresult, name) in cases {
        params["lun"] = json!("lun0");
        let e = d.rpc_err("SetLoadBalancePolicy", params.clone());
        assert_hresult(&e, hresult, name);
        assert_eq!(
            snapshot(d, "lun0"),
            before,
            "a failed Set ({params}) changed something"
        );
    }
}

#[test]
fn a_policy_the_paths_cannot_support_is_not_supported() {
    require_tool("nbdkit", "nbdkit");
    let dir = tempdir();
    let sock = dir.path().join("nomc.sock");
    let _server = spawn_unix_server(
        "nbdkit",
        tool("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U"])
            .arg(&sock)
            .args([
                "--filter=multi-conn",
                "memory",
                "16M",
                "multi-conn-mode=disable",
            ]),
        &sock,
    );
    let d = Daemon::spawn(&format!(
        "[[lun]]\nname = \"solo\"\npolicy = \"failover\"\n[[lun.path]]\nuri = \"{}\"\nname = \"a\"\nprimary = true\n[[lun.path]]\nuri = \"{}\"\nname = \"b\"\n",
        unix_uri("a", &sock),
        unix_uri("b", &sock)
    ));
    let supported = d.rpc_ok("GetSupportedLbPolicies", json!({ "lun": "solo" }));
    assert_eq!(supported["flags"], 0x01, "{supported}");
    assert_eq!(
        supported["policies"].as_array().unwrap().len(),
        1,
        "{supported}"
    );
    assert_eq!(supported["policies"][0]["policyName"], "VDS_LBP_FAILOVER");
    assert_eq!(supported["policies"][0]["name"], "failover");
    let before = snapshot(&d, "solo");
    for policy in [
        json!(2),
        json!("least-queue-depth"),
        json!("VDS_LBP_ROUND_ROBIN_WITH_SUBSET"),
    ] {
        expect(
            &d,
            "SetLoadBalancePolicy",
            json!({ "lun": "solo", "policy": policy, "paths": [] }),
            VDS_E_NOT_SUPPORTED,
            "VDS_E_NOT_SUPPORTED",
        );
        assert_eq!(snapshot(&d, "solo"), before);
    }
    d.rpc_ok(
        "SetLoadBalancePolicy",
        json!({ "lun": "solo", "policy": "failover", "paths": [{ "pathId": d.path_id("solo", "b"), "primary": true }, { "pathId": d.path_id("solo", "a"), "primary": false }] }),
    );
}

#[test]
fn get_supported_lb_policies_lists_all_seven_over_multi_conn_paths() {
    let r = rig();
    let s = r
        .daemon
        .rpc_ok("GetSupportedLbPolicies", json!({ "lun": "lun0" }));
    assert_eq!(s["flags"], 0x7f, "{s}");
    let policies = s["policies"].as_array().unwrap();
    let values: Vec<i64> = policies
        .iter()
        .map(|p| p["policy"].as_i64().unwrap())
        .collect();
    assert_eq!(values, [1, 2, 3, 4, 5, 6, 7], "{s}");
    assert_eq!(policies[0]["policyName"], "VDS_LBP_FAILOVER");
    assert_eq!(policies[1]["name"], "round-robin");
    assert_eq!(policies[6]["policyName"], "VDS_LBP_VENDOR_SPECIFIC");
    assert_eq!(policies[6]["name"], "service-time");
}

#[test]
fn set_all_path_statuses_from_hba_port() {
    let r = rig();
    let d = &r.daemon;
    let set = |ip: &str, status: i64| {
        d.rpc(
            "SetAllPathStatusesFromHbaPort",
            json!({ "hbaPort": { "initiator": ip }, "status": status }),
        )
    };
    // Initiator 127.0.0.1 carries only p0: it can go.
    let ok = set("127.0.0.1", 5).unwrap();
    assert_eq!(ok["hresult"], 0, "{ok}");
    assert_eq!(d.path_status("lun0", "p0"), "VDS_MPS_FAILED");
    assert_eq!(d.path_status("lun0", "p1"), "VDS_MPS_ONLINE");
    let ok = set("127.0.0.1", 1).unwrap();
    assert_eq!(ok["hresult"], 0, "{ok}");
    d.wait_path_status("lun0", "p0", "VDS_MPS_ONLINE", Duration::from_secs(10));
    // Initiator 127.0.0.3 carries every path of lun1: failing it would leave lun1 with no path.
    let partial = set("127.0.0.3", 5).unwrap();
    assert_eq!(
        partial["hresult"], VDS_S_STATUSES_INCOMPLETELY_SET,
        "{partial}"
    );
    assert_eq!(
        partial["hresultName"], "VDS_S_STATUSES_INCOMPLETELY_SET",
        "{partial}"
    );
    let usable = d.rpc_ok("ListLuns", json!({}))["luns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "lun1")
        .unwrap()["usablePaths"]
        .as_u64()
        .unwrap();
    assert!(usable >= 1, "lun1 kept a usable path");
    // Errors.
    assert_hresult(
        &set("10.9.9.9", 5).unwrap_err(),
        VDS_E_OBJECT_NOT_FOUND,
        "VDS_E_OBJECT_NOT_FOUND",
    );
    let e = d.rpc_err(
        "SetAllPathStatusesFromHbaPort",
        json!({ "hbaPort": { "wwnNode": "20:00:00:00:c9:00:00:01", "wwnPort": "10:00:00:00:c9:00:00:01" }, "status": 5 }),
    );
    assert_hresult(&e, VDS_E_OBJECT_NOT_FOUND, "VDS_E_OBJECT_NOT_FOUND");
    let before = snapshot(d, "lun0");
    for status in [0, 3, 99] {
        assert_hresult(
            &set("127.0.0.1", status).unwrap_err(),
            E_INVALIDARG,
            "E_INVALIDARG",
        );
        assert_eq!(snapshot(d, "lun0"), before, "a bad status changed nothing");
    }
    assert_hresult(
        &set("not-an-ip", 5).unwrap_err(),
        E_INVALIDARG,
        "E_INVALIDARG",
    );
}

#[test]
fn list_luns_reports_every_lun() {
    let r = rig();
    let luns = r.daemon.rpc_ok("ListLuns", json!({}));
    let luns = luns["luns"].as_array().unwrap();
    assert_eq!(luns.len(), 2);
    let lun0 = luns.iter().find(|l| l["name"] == "lun0").unwrap();
    assert_eq!(lun0["size"], 32 << 20, "{lun0}");
    assert_eq!(lun0["paths"], 3);
    assert_eq!(lun0["usablePaths"], 3);
    assert_eq!(lun0["policy"], 2);
    assert_eq!(lun0["policyName"], "VDS_LBP_ROUND_ROBIN");
    assert_eq!(lun0["sourceId"], r.daemon.path_id("lun0", "p0")["sourceId"]);
    let lun1 = luns.iter().find(|l| l["name"] == "lun1").unwrap();
    assert_eq!(lun1["size"], 16 << 20, "{lun1}");
}

/// The daemon's threads, by name.
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("proc tasks");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// Two LUNs on two data threads (the test daemon has `data_threads = 2`): each export serves I/O
/// from its own thread, verified by qemu-io through both at once.
#[test]
fn two_luns_serve_io_from_two_data_threads() {
    let r = rig();
    let names = thread_names(r.daemon.pid());
    for thread in ["lunmpio-data-0", "lunmpio-data-1"] {
        assert!(names.iter().any(|n| n == thread), "{thread} in {names:?}");
    }
    let io = |lun: &str, pattern: &str| {
        let mut c = tool("qemu-io");
        c.args(["-f", "raw", "-c", &format!("write -P {pattern} 0 1M")]);
        c.args(["-c", &format!("read -P {pattern} 0 1M")]);
        c.arg(r.daemon.uri(lun));
        c
    };
    let (mut a, mut b) = (io("lun0", "0x5a"), io("lun1", "0xa5"));
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| run_ok(&mut a));
        let b = s.spawn(|| run_ok(&mut b));
        (a.join().unwrap(), b.join().unwrap())
    });
    for out in [a, b] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
}

#[test]
fn set_path_status_fails_stands_by_and_reinstates_a_path() {
    let r = rig();
    let d = &r.daemon;
    let p1 = d.path_id("lun0", "p1");
    let set = |status: i64| {
        d.rpc(
            "SetPathStatus",
            json!({ "lun": "lun0", "pathId": p1, "status": status }),
        )
    };
    assert_eq!(set(5).unwrap(), json!({}));
    assert_eq!(d.path_status("lun0", "p1"), "VDS_MPS_FAILED");
    // Administratively failed: carries nothing.
    let before = d.stats("lun0");
    drive_reads(&d.nbd, "lun0", 30);
    let after = d.stats("lun0");
    assert_eq!(
        path_counter(&after, "p1", "reads"),
        path_counter(&before, "p1", "reads"),
        "{after}"
    );
    assert_eq!(set(7).unwrap(), json!({}));
    assert_eq!(d.path_status("lun0", "p1"), "VDS_MPS_STANDBY");
    assert_eq!(set(1).unwrap(), json!({}));
    d.wait_path_status("lun0", "p1", "VDS_MPS_ONLINE", Duration::from_secs(10));
    // Errors change nothing.
    let before = snapshot(d, "lun0");
    expect(
        d,
        "SetPathStatus",
        json!({ "lun": "lun0", "pathId": unknown_path(d), "status": 5 }),
        VDS_E_OBJECT_NOT_FOUND,
        "VDS_E_OBJECT_NOT_FOUND",
    );
    for status in [0, 2, 99] {
        assert_hresult(&set(status).unwrap_err(), E_INVALIDARG, "E_INVALIDARG");
    }
    assert_eq!(snapshot(d, "lun0"), before);
}

#[test]
fn get_statistics_and_get_events() {
    let r = rig();
    let d = &r.daemon;
    drive_reads(&d.nbd, "lun0", 30);
    let stats = d.stats("lun0");
    for key in ["queuedIos", "queuedBytes", "inDoubtWrites"] {
        assert!(stats[key].is_u64(), "{key}: {stats}");
    }
    let paths = stats["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 3);
    for p in paths {
        for key in [
            "reads",
            "writes",
            "ios",
            "bytesRead",
            "bytesWritten",
            "errors",
            "inFlight",
            "inFlightBytes",
            "latencyP50Us",
            "latencyP99Us",
            "failovers",
        ] {
            assert!(p[key].is_u64(), "{key}: {p}");
        }
        assert!(
            p["pathId"]["pathId"].is_string() && p["name"].is_string() && p["status"] == 1,
            "{p}"
        );
        assert_eq!(p["reads"], 10, "round robin spread 30 reads: {p}");
        assert_eq!(p["bytesRead"], 10 * 4096, "{p}");
    }

    let all = d.rpc_ok("GetEvents", json!({}));
    let last = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .max()
        .unwrap_or(0);
    // A fail and a reinstate of p2: two events with causes, after `last`, on lun0 only.
    let p2 = d.path_id("lun0", "p2");
    d.rpc_ok(
        "SetPathStatus",
        json!({ "lun": "lun0", "pathId": p2, "status": 5 }),
    );
    d.rpc_ok(
        "SetPathStatus",
        json!({ "lun": "lun0", "pathId": p2, "status": 1 }),
    );
    d.wait_path_status("lun0", "p2", "VDS_MPS_ONLINE", Duration::from_secs(10));
    let new = d.rpc_ok("GetEvents", json!({ "since": last }));
    let new = new["events"].as_array().unwrap().clone();
    assert!(new.len() >= 2, "{new:?}");
    assert!(
        new.iter().all(|e| e["seq"].as_u64().unwrap() > last),
        "since is exclusive: {new:?}"
    );
    let seqs: Vec<u64> = new.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {seqs:?}"
    );
    let failed = new
        .iter()
        .find(|e| e["pathId"] == p2 && e["to"] == 5)
        .unwrap_or_else(|| panic!("no Failed event of p2: {new:?}"));
    assert_eq!(failed["lun"], "lun0");
    assert_eq!(failed["from"], 1);
    assert_eq!(failed["toName"], "VDS_MPS_FAILED");
    assert!(!failed["cause"].as_str().unwrap().is_empty(), "{failed}");
    assert!(failed["time"].as_str().unwrap().contains('T'), "{failed}");
    assert!(
        new.iter().any(|e| e["pathId"] == p2 && e["to"] == 1),
        "{new:?}"
    );
    for e in &new {
        assert!(
            e["cause"].as_str().is_some_and(|c| !c.is_empty()),
            "every event has a cause: {e}"
        );
    }
    // Per LUN.
    let lun1 = d.rpc_ok("GetEvents", json!({ "lun": "lun1", "since": last }));
    assert!(
        lun1["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["lun"] == "lun1"),
        "{lun1}"
    );
    assert!(
        lun1["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["pathId"] != p2),
        "{lun1}"
    );
    let lun0 = d.rpc_ok("GetEvents", json!({ "lun": "lun0", "since": last }));
    assert_eq!(
        lun0["events"].as_array().unwrap().len(),
        new.iter().filter(|e| e["lun"] == "lun0").count()
    );
    let none = d.rpc_ok("GetEvents", json!({ "since": seqs.last().unwrap() }));
    assert!(
        none["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["seq"].as_u64().unwrap() > *seqs.last().unwrap())
    );
}

#[test]
fn an_unknown_lun_is_object_not_found_for_every_lun_method() {
    let r = rig();
    let d = &r.daemon;
    let p0 = d.path_id("lun0", "p0");
    for (method, params) in [
        ("GetPathInfo", json!({ "lun": "nope" })),
        ("GetLoadBalancePolicy", json!({ "lun": "nope" })),
        (
            "SetLoadBalancePolicy",
            json!({ "lun": "nope", "policy": 2, "paths": [] }),
        ),
        ("GetSupportedLbPolicies", json!({ "lun": "nope" })),
        (
            "SetPathStatus",
            json!({ "lun": "nope", "pathId": p0, "status": 5 }),
        ),
        ("GetStatistics", json!({ "lun": "nope" })),
        ("GetEvents", json!({ "lun": "nope" })),
    ] {
        let e = d.rpc_err(method, params);
        assert_hresult(&e, VDS_E_OBJECT_NOT_FOUND, "VDS_E_OBJECT_NOT_FOUND");
        assert!(e.message.contains("nope"), "{method}: {e:?}");
    }
}

#[test]
fn protocol_errors_are_answered_and_the_connection_stays_usable() {
    let r = rig();
    let d = &r.daemon;
    let mut c = lunmpio_rpc::client::Client::connect(&d.socket).unwrap();
    let parse = |line: String| -> Value { serde_json::from_str(&line).unwrap() };
    let r1 = parse(c.raw("{not json").unwrap());
    assert_eq!(r1["error"]["code"], -32700, "{r1}");
    assert_eq!(r1["id"], Value::Null);
    let r2 = parse(c.raw("[1, 2]").unwrap());
    assert_eq!(r2["error"]["code"], -32600, "{r2}");
    let r3 = parse(c.raw("42").unwrap());
    assert_eq!(r3["error"]["code"], -32600, "{r3}");
    let r4 = parse(
        c.raw(r#"{"jsonrpc":"2.0","id":7,"method":"Frobnicate","params":{}}"#)
            .unwrap(),
    );
    assert_eq!(r4["error"]["code"], -32601, "{r4}");
    assert_eq!(r4["id"], 7);
    // Bad params: E_INVALIDARG with its HRESULT and name.
    for line in [
        r#"{"jsonrpc":"2.0","id":8,"method":"GetPathInfo","params":{"lun":5}}"#,
        r#"{"jsonrpc":"2.0","id":8,"method":"GetPathInfo","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":8,"method":"GetPathInfo","params":{"lun":"lun0","extra":1}}"#,
        r#"{"jsonrpc":"2.0","id":8,"method":"GetPathInfo","params":[1]}"#,
        r#"{"jsonrpc":"2.0","id":8,"method":"SetPathStatus","params":{"lun":"lun0","pathId":"0x1","status":5}}"#,
    ] {
        let r = parse(c.raw(line).unwrap());
        assert_eq!(r["error"]["code"], E_INVALIDARG as i32, "{line} -> {r}");
        assert_eq!(r["error"]["data"]["hresult"], "0x80070057", "{r}");
        assert_eq!(r["error"]["data"]["name"], "E_INVALIDARG", "{r}");
    }
    // Still the same connection, still answering.
    let ok = c.call("ListLuns", json!({})).unwrap();
    assert_eq!(ok["luns"].as_array().unwrap().len(), 2);
    let again = parse(c.raw("}}}").unwrap());
    assert_eq!(again["error"]["code"], -32700);
    assert!(c.call("GetPathInfo", json!({ "lun": "lun0" })).is_ok());

    // A line longer than the bound is refused without being held whole, and that connection ends
    // (the rest of the line cannot be told from a new request); the daemon answers the next one.
    let long = format!("\"{}\"", "x".repeat(lunmpio_rpc::LINE_BYTES_MAX + 16));
    let refused = parse(c.raw(&long).unwrap());
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer than"),
        "{refused}"
    );
    assert!(
        c.call("ListLuns", json!({})).is_err(),
        "that connection is closed"
    );
    assert!(
        d.rpc("ListLuns", json!({})).is_ok(),
        "the daemon still answers"
    );
}

#[test]
fn concurrent_sets_on_one_lun_get_another_call_in_progress() {
    let r = rig();
    let d = &r.daemon;
    const CLIENTS: usize = 12;
    let mut seen = false;
    for _round in 0..30 {
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let threads: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let socket = d.socket.clone();
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let mut c = lunmpio_rpc::client::Client::connect(&socket).unwrap();
                    let policy = if i % 2 == 0 {
                        "least-queue-depth"
                    } else {
                        "round-robin"
                    };
                    barrier.wait();
                    c.call(
                        "SetLoadBalancePolicy",
                        json!({ "lun": "lun0", "policy": policy, "paths": [] }),
                    )
                })
            })
            .collect();
        for t in threads {
            match t.join().unwrap() {
                Ok(v) => assert_eq!(v, json!({})),
                Err(lunmpio_rpc::client::ClientError::Rpc(e)) => {
                    assert_hresult(
                        &e,
                        VDS_E_ANOTHER_CALL_IN_PROGRESS,
                        "VDS_E_ANOTHER_CALL_IN_PROGRESS",
                    );
                    seen = true;
                }
                Err(e) => panic!("{e}"),
            }
        }
        if seen {
            break;
        }
    }
    assert!(
        seen,
        "no Set ever collided with another in 30 rounds of {CLIENTS} parallel clients"
    );
    // Gets never wait, and the LUN is still consistent.
    let p = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    assert!([2, 4].contains(&p["policy"].as_i64().unwrap()), "{p}");
}

#[test]
fn the_control_socket_is_mode_0600() {
    let r = rig();
    let mode = std::fs::metadata(&r.daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
}

#[test]
fn a_policy_set_before_a_restart_is_in_force_after_it() {
    let t0 = TargetSpec::memory("32MiB", 3).spawn();
    let t1 = TargetSpec::memory("16MiB", 2).spawn();
    let d = Daemon::spawn(&rig_toml(&t0, &t1));
    let (p0, p1, p2) = (
        d.path_id("lun0", "p0"),
        d.path_id("lun0", "p1"),
        d.path_id("lun0", "p2"),
    );
    d.rpc_ok(
        "SetLoadBalancePolicy",
        json!({ "lun": "lun0", "policy": "weighted-paths", "paths": [
            { "pathId": p0, "weight": 10 }, { "pathId": p1, "weight": 20 }, { "pathId": p2, "weight": 7 }] }),
    );
    d.rpc_ok(
        "SetPathStatus",
        json!({ "lun": "lun0", "pathId": p1, "status": 7 }),
    );
    let before = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    let d = d.restart();
    let after = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun0" }));
    assert_eq!(
        after, before,
        "the config says round-robin; the persisted Set wins"
    );
    assert_eq!(after["policy"], 5);
    assert_eq!(
        d.path_status("lun0", "p1"),
        "VDS_MPS_STANDBY",
        "an administrative status persists too"
    );
    // Untouched LUN keeps its config policy.
    let lun1 = d.rpc_ok("GetLoadBalancePolicy", json!({ "lun": "lun1" }));
    assert_eq!(lun1["policy"], 2);
    // And the weights are used: all I/O on the lightest path p2.
    let before = d.stats("lun0");
    drive_reads(&d.nbd, "lun0", 20);
    let after = d.stats("lun0");
    assert_eq!(
        path_counter(&after, "p2", "reads") - path_counter(&before, "p2", "reads"),
        20,
        "{after}"
    );
}
