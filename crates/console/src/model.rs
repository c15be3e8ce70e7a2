//! What the console shows: the daemon's answers (a [`Snapshot`] per refresh) turned into rates and
//! short histories ([`Model`]). Pure: the tests feed it snapshots, the console feeds it the control
//! socket's answers.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use lunmpio_rpc::{DaemonInfo, EventRecord, LunSummary, PathInfo, Statistics, SupportedLbPolicies};
use lunmpio_vds::PathId;

/// Refreshes of history kept per path for its sparkline (at the default 1 s: the last two minutes).
pub const HISTORY_MAX: usize = 120;
/// Events kept for the events pane.
pub const EVENTS_MAX: usize = 200;

/// One refresh: the daemon, its LUNs, and the selected LUN in detail.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub daemon: DaemonInfo,
    pub luns: Vec<LunSummary>,
    /// None when the daemon has no LUN.
    pub lun: Option<LunDetail>,
}

/// The selected LUN: its paths, counters and the policies it supports.
#[derive(Debug, Clone)]
pub struct LunDetail {
    pub name: String,
    pub paths: Vec<PathInfo>,
    pub stats: Statistics,
    pub supported: SupportedLbPolicies,
}

/// One row of the paths table.
#[derive(Debug, Clone, PartialEq)]
pub struct PathRow {
    pub id: PathId,
    pub name: String,
    /// `ONLINE`, `FAILED`, `STANDBY`, `UNKNOWN`.
    pub status: &'static str,
    pub reason: String,
    pub iops: f64,
    pub mib_s: f64,
    pub p99_us: u64,
    pub in_flight: u64,
    /// IOPS at each refresh, oldest first.
    pub history: Vec<u64>,
}

/// Counters of one path at one refresh, to turn into rates at the next.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    ios: u64,
    bytes: u64,
}

/// The console's state between refreshes.
#[derive(Debug, Default)]
pub struct Model {
    pub snapshot: Option<Snapshot>,
    pub rows: Vec<PathRow>,
    pub events: VecDeque<EventRecord>,
    /// The newest event seen (GetEvents `since`).
    pub last_event_seq: u64,
    last: HashMap<(String, PathId), Sample>,
    history: HashMap<(String, PathId), VecDeque<u64>>,
}

/// A path status as the console prints it.
pub fn status_word(status_name: &str) -> &'static str {
    match status_name {
        "VDS_MPS_ONLINE" => "ONLINE",
        "VDS_MPS_FAILED" => "FAILED",
        "VDS_MPS_STANDBY" => "STANDBY",
        _ => "UNKNOWN",
    }
}

impl Model {
    /// Takes a refresh taken at `at`: rates are the counters' change since the previous refresh of
    /// the same LUN (none at the first one, or after a counter went back, as after a restart).
    pub fn update(&mut self, snapshot: Snapshot, at: Instant) {
        self.rows.clear();
        let shown = |s: Option<&Snapshot>| s.and_then(|s| s.lun.as_ref()).map(|l| l.name.clone());
        if shown(self.snapshot.as_ref()) != shown(Some(&snapshot)) {
            // Back on a LUN shown before: its counters moved while it was not shown, and a rate over
            // that whole time would mislead; the first refresh has none.
            self.last.clear();
        }
        if let Some(lun) = &snapshot.lun {
            for info in &lun.paths {
                let key = (lun.name.clone(), info.path_id);
                let stats = lun.stats.paths.iter().find(|s| s.path_id == info.path_id);
                let now = Sample {
                    at,
                    ios: stats.map_or(0, |s| s.ios),
                    bytes: stats.map_or(0, |s| s.bytes_read + s.bytes_written),
                };
                let (iops, bytes_s) = match self.last.insert(key.clone(), now) {
                    Some(before) if now.ios >= before.ios && now.bytes >= before.bytes => {
                        let secs = now.at.duration_since(before.at).as_secs_f64();
                        if secs > 0.0 {
                            (
                                (now.ios - before.ios) as f64 / secs,
                                (now.bytes - before.bytes) as f64 / secs,
                            )
                        } else {
                            (0.0, 0.0)
                        }
                    }
                    _ => (0.0, 0.0),
                };
                let history = self.history.entry(key).or_default();
                if history.len() == HISTORY_MAX {
                    history.pop_front();
                }
                history.push_back(iops.round() as u64);
                self.rows.push(PathRow {
                    id: info.path_id,
                    name: info.name.clone(),
                    status: status_word(&info.status_name),
                    reason: info.status_reason.clone(),
                    iops,
                    mib_s: bytes_s / (1 << 20) as f64,
                    p99_us: stats.map_or(0, |s| s.latency_p99_us),
                    in_flight: stats.map_or(0, |s| s.in_flight),
                    history: history.iter().copied().collect(),
                });
            }
        }
        self.snapshot = Some(snapshot);
        debug_assert!(self.events.len() <= EVENTS_MAX);
    }

    /// Adds events newer than the last seen, keeping the newest [`EVENTS_MAX`].
    pub fn add_events(&mut self, events: Vec<EventRecord>) {
        for e in events {
            if e.seq <= self.last_event_seq {
                continue;
            }
            self.last_event_seq = e.seq;
            if self.events.len() == EVENTS_MAX {
                self.events.pop_front();
            }
            self.events.push_back(e);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn path(id: u64, name: &str, status: &str, reason: &str) -> PathInfo {
        serde_json::from_value(serde_json::json!({
            "pathId": {"sourceId": "0x1", "pathId": format!("{id:#x}")}, "type": 0, "typeName": "VDS_HWT_UNKNOWN",
            "status": if status == "VDS_MPS_FAILED" { 5 } else { 1 }, "statusName": status,
            "statusReason": reason, "name": name, "uri": format!("nbd://127.0.0.1:{id}/lun0"),
            "transport": "tcp"
        }))
        .expect("a PathInfo")
    }

    pub(crate) fn stats(paths: &[(u64, &str, u64, u64)]) -> Statistics {
        serde_json::from_value(serde_json::json!({
            "paths": paths.iter().map(|(id, name, ios, bytes)| serde_json::json!({
                "pathId": {"sourceId": "0x1", "pathId": format!("{id:#x}")}, "name": name, "status": 1, "reads": ios,
                "writes": 0, "ios": ios, "bytesRead": bytes, "bytesWritten": 0, "errors": 0,
                "inFlight": 2, "inFlightBytes": 0, "latencyP50Us": 90, "latencyP99Us": 250,
                "failovers": 0, "timeoutMs": 5000
            })).collect::<Vec<_>>(),
            "queuedIos": 0, "queuedBytes": 0, "inDoubtWrites": 0, "inDoubtWritesTotal": 0,
            "inDoubtAnsweredTotal": 0, "inDoubtFencedTotal": 0, "inDoubtExpiredTotal": 0,
            "fencesOkTotal": 0, "fencesFailedTotal": 0
        }))
        .expect("Statistics")
    }

    pub(crate) fn snapshot(ios: u64, failed: bool) -> Snapshot {
        let daemon: DaemonInfo = serde_json::from_value(serde_json::json!({
            "version": "0.1.0", "pid": 42, "program": "/usr/bin/lunmpio", "config": "/etc/lunmpio.toml",
            "startedAt": "2026-12-02T00:00:00Z", "upgrades": 0, "lastUpgradeAt": null, "reloads": 0,
            "lastReloadAt": null, "luns": 1
        }))
        .expect("DaemonInfo");
        let lun: LunSummary = serde_json::from_value(serde_json::json!({
            "name": "lun0", "sourceId": 1, "size": 1u64 << 30, "policy": 2,
            "policyName": "VDS_LBP_ROUND_ROBIN", "policyConfigName": "round-robin", "paths": 2,
            "usablePaths": if failed { 1 } else { 2 }
        }))
        .expect("LunSummary");
        let supported: SupportedLbPolicies = serde_json::from_value(serde_json::json!({
            "flags": 3, "policies": [
                {"policy": 1, "policyName": "VDS_LBP_FAILOVER", "name": "failover"},
                {"policy": 2, "policyName": "VDS_LBP_ROUND_ROBIN", "name": "round-robin"}]
        }))
        .expect("SupportedLbPolicies");
        let b = if failed {
            path(2, "ctrlB", "VDS_MPS_FAILED", "connection refused")
        } else {
            path(2, "ctrlB", "VDS_MPS_ONLINE", "")
        };
        Snapshot {
            daemon,
            luns: vec![lun],
            lun: Some(LunDetail {
                name: "lun0".into(),
                paths: vec![path(1, "ctrlA", "VDS_MPS_ONLINE", ""), b],
                stats: stats(&[(1, "ctrlA", ios, ios * 4096), (2, "ctrlB", ios, ios * 4096)]),
                supported,
            }),
        }
    }

    #[test]
    fn rates_come_from_the_change_between_refreshes_and_history_is_bounded() {
        let mut m = Model::default();
        let t0 = Instant::now();
        m.update(snapshot(1000, false), t0);
        assert_eq!(m.rows[0].iops, 0.0, "no rate at the first refresh");
        m.update(snapshot(3000, false), t0 + Duration::from_secs(2));
        assert_eq!(m.rows[0].iops, 1000.0);
        assert!((m.rows[0].mib_s - 1000.0 * 4096.0 / 1048576.0).abs() < 1e-9);
        assert_eq!(m.rows[0].history, vec![0, 1000]);
        // A counter that went back (a restarted daemon) gives no rate, not a huge one.
        m.update(snapshot(10, false), t0 + Duration::from_secs(3));
        assert_eq!(m.rows[0].iops, 0.0);
        for i in 0..(HISTORY_MAX as u64 + 10) {
            m.update(snapshot(10 + i, false), t0 + Duration::from_secs(4 + i));
        }
        assert_eq!(m.rows[0].history.len(), HISTORY_MAX);
        assert_eq!(m.rows[1].status, "ONLINE");
        m.update(snapshot(5000, true), t0 + Duration::from_secs(1000));
        assert_eq!(
            (m.rows[1].status, m.rows[1].reason.as_str()),
            ("FAILED", "connection refused")
        );
    }

    #[test]
    fn events_are_taken_once_and_bounded() {
        let event = |seq: u64| -> EventRecord {
            serde_json::from_value(serde_json::json!({
                "seq": seq, "time": "2026-12-02T00:00:00Z", "lun": "lun0", "pathId": null,
                "path": null, "from": null, "fromName": null, "to": null, "toName": null,
                "cause": format!("event {seq}")
            }))
            .expect("EventRecord")
        };
        let mut m = Model::default();
        m.add_events((1..=3).map(event).collect());
        m.add_events((2..=4).map(event).collect());
        assert_eq!(m.events.len(), 4, "2 and 3 came twice");
        assert_eq!(m.last_event_seq, 4);
        m.add_events((5..=(EVENTS_MAX as u64 + 10)).map(event).collect());
        assert_eq!(m.events.len(), EVENTS_MAX);
        assert_eq!(m.events.back().unwrap().seq, EVENTS_MAX as u64 + 10);
    }
}
