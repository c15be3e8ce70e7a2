//! The management contract on the wire, pinned: every method and every kind of error, sent as raw
//! request lines to a live `lunmpio serve` and compared with `tests/golden/wire.txt`.
//!
//! The daemon's answers are compared after masking what differs from run to run (the temporary
//! directory, event times and sequence numbers, latencies); everything else — member names, value
//! types, numbers, names, the order of members on the line — must match byte for byte. A change to
//! the contract shows up here as a diff; if it is intended, regenerate the file with
//! `LUNMPIO_BLESS=1 cargo test -p lunmpio --test wire_golden` and review the diff.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use lunmpio_testkit::*;
use serde_json::Value;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/wire.txt");

/// LUN `fc`: three file paths to one image (hard links) on two HBA ports, an iSCSI-typed NBD path
/// whose target refuses connections, and an NBD-over-Unix path whose socket does not exist.
/// LUN `solo`: two file paths, Least Queue Depth.
fn config(dir: &Path) -> String {
    for (image, size) in [("fc.img", 8u64 << 20), ("solo.img", 4 << 20)] {
        let file = std::fs::File::create(dir.join(image)).unwrap();
        file.set_len(size).unwrap();
    }
    for link in ["fc-b.img", "fc-c.img"] {
        std::fs::hard_link(dir.join("fc.img"), dir.join(link)).unwrap();
    }
    std::fs::hard_link(dir.join("solo.img"), dir.join("solo-b.img")).unwrap();
    let d = dir.display();
    format!(
        r#"[defaults]
check_interval = "1h"

[[lun]]
name = "fc"
policy = "round-robin"
shared_backing = true
[[lun.path]]
uri = "file://{d}/fc.img"
name = "a0"
interconnect = "fibre-channel"
hba_wwnn = "20:00:00:25:b5:00:00:01"
hba_wwpn = "21:00:00:25:b5:00:00:01"
[[lun.path]]
uri = "file://{d}/fc-b.img"
name = "a1"
interconnect = "fibre-channel"
hba_wwnn = "20:00:00:25:b5:00:00:01"
hba_wwpn = "21:00:00:25:b5:00:00:01"
[[lun.path]]
uri = "file://{d}/fc-c.img"
name = "b0"
interconnect = "fibre-channel"
hba_wwnn = "20:00:00:25:b5:00:00:02"
hba_wwpn = "21:00:00:25:b5:00:00:02"
[[lun.path]]
uri = "nbd://127.0.0.1:1/fc"
name = "iscsi0"
interconnect = "iscsi"
bind = "127.0.0.1"
[[lun.path]]
uri = "nbd+unix:///fc?socket={d}/missing.sock"
name = "unix0"

[[lun]]
name = "solo"
policy = "least-queue-depth"
shared_backing = true
[[lun.path]]
uri = "file://{d}/solo.img"
name = "s0"
[[lun.path]]
uri = "file://{d}/solo-b.img"
name = "s1"
"#
    )
}

/// The conversation: request lines, `$NAME` standing for the pathId object of path NAME, `$SEQ` for
/// the sequence number of the last event before the conversation.
const CONVERSATION: &[&str] = &[
    // Reads of every method.
    r#"{"jsonrpc":"2.0","id":1,"method":"ListLuns"}"#,
    r#"{"jsonrpc":"2.0","id":2,"method":"GetPathInfo","params":{"lun":"fc"}}"#,
    r#"{"jsonrpc":"2.0","id":3,"method":"GetLoadBalancePolicy","params":{"lun":"fc"}}"#,
    r#"{"jsonrpc":"2.0","id":4,"method":"GetSupportedLbPolicies","params":{"lun":"fc"}}"#,
    r#"{"jsonrpc":"2.0","id":5,"method":"GetPathInfo","params":{"lun":"solo"}}"#,
    r#"{"jsonrpc":"2.0","id":6,"method":"GetLoadBalancePolicy","params":{"lun":"solo"}}"#,
    r#"{"jsonrpc":"2.0","id":7,"method":"GetSupportedLbPolicies","params":{"lun":"solo"}}"#,
    r#"{"jsonrpc":"2.0","id":8,"method":"GetStatistics","params":{"lun":"solo"}}"#,
    // Sets that succeed, by number, VDS name and config name, with per-path parameters.
    r#"{"jsonrpc":"2.0","id":"s1","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":"VDS_LBP_FAILOVER","paths":[{"pathId":$a1,"primary":true}]}}"#,
    r#"{"jsonrpc":"2.0","id":"s2","method":"GetLoadBalancePolicy","params":{"lun":"fc"}}"#,
    r#"{"jsonrpc":"2.0","id":"s3","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":5,"paths":[{"pathId":$a0,"weight":3},{"pathId":$a1,"weight":1},{"pathId":$b0,"weight":2}]}}"#,
    r#"{"jsonrpc":"2.0","id":"s4","method":"GetLoadBalancePolicy","params":{"lun":"fc"}}"#,
    r#"{"jsonrpc":"2.0","id":"s5","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":"round-robin"}}"#,
    r#"{"jsonrpc":"2.0","id":"s6","method":"SetPathStatus","params":{"lun":"solo","pathId":$s1,"status":5}}"#,
    r#"{"jsonrpc":"2.0","id":"s7","method":"SetPathStatus","params":{"lun":"solo","pathId":$s1,"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"s8","method":"GetEvents","params":{"lun":"solo","since":$SEQ}}"#,
    r#"{"jsonrpc":"2.0","id":"s9","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"wwnNode":"20:00:00:25:b5:00:00:02","wwnPort":"21:00:00:25:b5:00:00:02"},"status":5}}"#,
    r#"{"jsonrpc":"2.0","id":"s10","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"wwnNode":"20:00:00:25:b5:00:00:02","wwnPort":"21:00:00:25:b5:00:00:02"},"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"s11","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"initiator":"127.0.0.1"},"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"s12","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"initiator":"10.9.9.9"},"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"s13","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":1,"paths":[{"pathId":$a1,"primary":false},{"pathId":$b0,"primary":true}]}}"#,
    r#"{"jsonrpc":"2.0","id":"s14","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"wwnNode":"20:00:00:25:b5:00:00:01","wwnPort":"21:00:00:25:b5:00:00:01"},"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"s15","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":"round-robin"}}"#,
    // VDS errors.
    r#"{"jsonrpc":"2.0","id":"e1","method":"GetPathInfo","params":{"lun":"nope"}}"#,
    r#"{"jsonrpc":"2.0","id":"e2","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":9}}"#,
    r#"{"jsonrpc":"2.0","id":"e3","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":"sideways"}}"#,
    r#"{"jsonrpc":"2.0","id":"e4","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":1,"paths":[{"pathId":$a0,"primary":true},{"pathId":$a1,"primary":true}]}}"#,
    r#"{"jsonrpc":"2.0","id":"e5","method":"SetLoadBalancePolicy","params":{"lun":"fc","policy":1,"paths":[{"pathId":{"sourceId":"0x0000000000000001","pathId":"0x0000000000000099"},"primary":true}]}}"#,
    r#"{"jsonrpc":"2.0","id":"e6","method":"SetPathStatus","params":{"lun":"solo","pathId":$s1,"status":99}}"#,
    r#"{"jsonrpc":"2.0","id":"e7","method":"SetPathStatus","params":{"lun":"solo","pathId":$s1,"status":4294967296}}"#,
    r#"{"jsonrpc":"2.0","id":"e8","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"initiator":"not-an-ip"},"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"e9","method":"SetAllPathStatusesFromHbaPort","params":{"hbaPort":{"wwnNode":"zz","wwnPort":"21:00:00:25:b5:00:00:02"},"status":1}}"#,
    r#"{"jsonrpc":"2.0","id":"e10","method":"GetPathInfo","params":{"lun":"fc","extra":1}}"#,
    r#"{"jsonrpc":"2.0","id":"e11","method":"GetPathInfo","params":[1]}"#,
    r#"{"jsonrpc":"2.0","id":"e12","method":"GetEvents","params":{"lun":"nope"}}"#,
    r#"{"jsonrpc":"2.0","id":"e13","method":"GetStatistics"}"#,
    // JSON-RPC errors.
    r#"{"jsonrpc":"2.0","id":"j1","method":"Frobnicate"}"#,
    r#"{not json"#,
    r#"[1,2]"#,
    r#"{"jsonrpc":"1.0","id":"j4","method":"ListLuns"}"#,
    r#"{"jsonrpc":"2.0","id":{"x":1},"method":"ListLuns"}"#,
    r#"{"jsonrpc":"2.0","id":"j6"}"#,
    r#"{"jsonrpc":"2.0","method":"ListLuns"}"#,
];

#[test]
fn every_method_and_error_answers_as_the_golden_file_says() {
    let dir = tempdir();
    let daemon = Daemon::spawn(&config(dir.path()));
    for path in ["a0", "a1", "b0"] {
        daemon.wait_path_status("fc", path, "VDS_MPS_ONLINE", Duration::from_secs(30));
    }
    for path in ["s0", "s1"] {
        daemon.wait_path_status("solo", path, "VDS_MPS_ONLINE", Duration::from_secs(30));
    }
    let path_ids = path_ids(&daemon);
    let last_seq = daemon.rpc_ok("GetEvents", serde_json::json!({}))["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap_or(0);

    let stream = UnixStream::connect(&daemon.socket).expect("control socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut transcript = String::new();
    for template in CONVERSATION {
        let mut line = template.replace("$SEQ", &last_seq.to_string());
        for (name, id) in &path_ids {
            line = line.replace(&format!("${name}"), id);
        }
        writer.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).expect("an answer line");
        assert!(
            answer.ends_with('\n'),
            "answer to {line} cut short: {answer:?}"
        );
        let answer = answer.trim_end();
        let masked = mask(answer, dir.path(), last_seq, &path_ids);
        transcript += &format!(">>> {template}\n<<< {masked}\n");
    }

    if std::env::var_os("LUNMPIO_BLESS").is_some() {
        std::fs::create_dir_all(Path::new(GOLDEN).parent().unwrap()).unwrap();
        std::fs::write(GOLDEN, &transcript).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(GOLDEN)
        .unwrap_or_else(|e| panic!("{GOLDEN}: {e} (create it with LUNMPIO_BLESS=1)"));
    let mismatches: Vec<String> = golden
        .lines()
        .zip(transcript.lines())
        .filter(|(want, got)| want != got)
        .map(|(want, got)| format!("want {want}\n got {got}"))
        .collect();
    assert!(
        mismatches.is_empty() && golden.lines().count() == transcript.lines().count(),
        "the management contract changed on the wire ({} lines differ; {} golden lines, {} now):\n{}",
        mismatches.len(),
        golden.lines().count(),
        transcript.lines().count(),
        mismatches.join("\n")
    );
}

/// `(name, pathId JSON)` of every path of both LUNs.
fn path_ids(daemon: &Daemon) -> Vec<(String, String)> {
    let mut ids = Vec::new();
    for lun in ["fc", "solo"] {
        let info = daemon.rpc_ok("GetPathInfo", serde_json::json!({ "lun": lun }));
        for path in info["paths"].as_array().unwrap() {
            ids.push((
                path["name"].as_str().unwrap().to_string(),
                path["pathId"].to_string(),
            ));
        }
    }
    // Longest names first, so `$a1` is never read as `$a` followed by `1`.
    ids.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    ids
}

/// The answer line with what differs between runs replaced: the temporary directory by `$DIR`, a
/// path's ID (derived from its URI, so from the directory) by `$NAME`, a controller port's ID (the
/// same) by `$GUID`, event times by `$TIME`, event sequence numbers counted from the conversation's
/// start, latencies by `$US`. Lists of paths come in path-ID order, so after masking they are put in
/// name order. The daemon's own line must be in canonical member order (sorted, compact): then the
/// comparison of masked lines is a comparison of the text.
fn mask(answer: &str, dir: &Path, last_seq: u64, path_ids: &[(String, String)]) -> String {
    let text = answer.replace(&dir.display().to_string(), "$DIR");
    let mut value: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer is not JSON ({e}): {text}"));
    assert_eq!(
        value.to_string(),
        text,
        "the daemon's line is not in canonical member order"
    );
    let names: Vec<(String, String)> = path_ids
        .iter()
        .map(|(name, id)| {
            let id: Value = serde_json::from_str(id).unwrap();
            (id["pathId"].as_str().unwrap().to_string(), name.clone())
        })
        .collect();
    mask_value(&mut value, last_seq, &names);
    value.to_string()
}

fn mask_value(value: &mut Value, last_seq: u64, names: &[(String, String)]) {
    match value {
        Value::Object(object) => {
            for (key, member) in object.iter_mut() {
                match key.as_str() {
                    "time" if member.is_string() => *member = Value::from("$TIME"),
                    "seq" => {
                        let seq = member.as_u64().expect("seq is a number");
                        *member = Value::from(format!("$SEQ+{}", seq - last_seq));
                    }
                    "latencyP50Us" | "latencyP99Us" if member.is_u64() => {
                        *member = Value::from("$US")
                    }
                    "controllerPortId" if member.as_str().is_some_and(|s| s.len() == 36) => {
                        *member = Value::from("$GUID")
                    }
                    _ => mask_value(member, last_seq, names),
                }
            }
        }
        Value::Array(items) => {
            items
                .iter_mut()
                .for_each(|v| mask_value(v, last_seq, names));
            if items
                .iter()
                .all(|v| v.get("pathId").is_some() && v.get("seq").is_none())
            {
                items.sort_by_key(|v| v["pathId"].to_string());
            }
        }
        Value::String(text) => {
            if let Some((_, name)) = names.iter().find(|(id, _)| id == text) {
                *text = format!("${name}");
            }
        }
        _ => {}
    }
}
