//! The persisted per-LUN state: what SetLoadBalancePolicy and the administrative status calls change.
//!
//! The formats only: the engine reads and writes the files (`lunmpio_engine::state_files`, on a
//! blocking thread) and asks this module to parse, check and apply them. Format (version 1):
//!
//! ```json
//! {"format": "lunmpio-lun-state", "version": 1, "lun": "lun0", "sourceId": "0x00000000000000a1",
//!  "policy": "round-robin",
//!  "paths": [{"pathId": "0x0000000000000001", "name": "ctrlA-port0", "primary": true, "weight": 0, "admin": "none"}]}
//! ```
//!
//! - `policy` is the config name; `admin` is `none`, `failed` or `standby`; `name` is informational.
//! - Unknown fields are ignored (a later version-1 writer may add optional fields); anything
//!   incompatible must bump `version`.
//! - Writes are atomic: a temporary file in the same directory, write, fsync, rename over the old file,
//!   fsync the directory. A reader sees the old state or the new one, never a mix.
//! - Loading: a missing file is `Ok(None)`. A corrupt file (`VDS_E_PROVIDER_CACHE_CORRUPT`) or one written
//!   by a newer format version (`VDS_E_NOT_SUPPORTED`) is an error whose message says what is wrong and
//!   where the file went: it is renamed to `NAME.corrupt-<unix-time>` or `NAME.newer-v<N>` so it is never
//!   silently dropped and never read again by accident.
//! - [`apply_state`] applies a loaded state to a freshly configured [`LunMpio`]: path ids that no longer
//!   exist are skipped and reported; the result is re-validated, and a policy that no longer holds falls
//!   back (unsupported → failover; round-robin-with-subset without a primary → round-robin; failover
//!   with several primaries → the one in use), with a note saying so.

use crate::hresult::{Hresult, VdsError};
use crate::lun::{AdminStatus, LunMpio};
use crate::types::{LoadBalancePolicy, PathId, format_id64, id64};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `format` field of every state file.
pub const STATE_FORMAT: &str = "lunmpio-lun-state";
/// The format version this crate writes and the newest it reads.
pub const STATE_VERSION: u32 = 1;
/// A state file larger than this is corrupt (64 paths need a few KiB).
pub const STATE_FILE_BYTES_MAX: u64 = 1 << 20;

mod policy_name {
    use crate::types::LoadBalancePolicy;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        policy: &LoadBalancePolicy,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(policy.config_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<LoadBalancePolicy, D::Error> {
        let name = String::deserialize(deserializer)?;
        LoadBalancePolicy::from_config_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown policy {name:?}")))
    }
}

mod admin_name {
    use crate::lun::AdminStatus;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(admin: &AdminStatus, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(admin.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<AdminStatus, D::Error> {
        let name = String::deserialize(deserializer)?;
        AdminStatus::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown admin status {name:?}")))
    }
}

/// One LUN's persisted state.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LunState {
    pub format: String,
    pub version: u32,
    pub lun: String,
    #[serde(with = "id64")]
    pub source_id: u64,
    #[serde(with = "policy_name")]
    pub policy: LoadBalancePolicy,
    pub paths: Vec<PathState>,
}

/// One path's persisted state.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathState {
    #[serde(with = "id64")]
    pub path_id: u64,
    /// For people reading the file; not used when loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub primary: bool,
    pub weight: u32,
    #[serde(with = "admin_name")]
    pub admin: AdminStatus,
}

/// Why a state file's text was refused.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum StateProblem {
    Corrupt(String),
    Newer(u64),
}

impl LunState {
    /// The persisted part of `lun`'s current state.
    ///
    /// ```
    /// # use lunmpio_vds::*;
    /// # use lunmpio_vds::persist::LunState;
    /// let lun = LunMpio::new(LunConfig { name: "lun0".into(), source_id: 0xa1,
    ///     policy: LoadBalancePolicy::RoundRobin, multi_path_safe: true, paths: vec![] }).unwrap();
    /// let state = LunState::capture(&lun);
    /// let text = state.to_json();
    /// assert!(text.contains("\"format\": \"lunmpio-lun-state\""));
    /// assert!(text.contains("\"policy\": \"round-robin\""));
    /// assert_eq!(LunState::parse(&text).unwrap(), state);
    /// ```
    pub fn capture(lun: &LunMpio) -> LunState {
        LunState {
            format: STATE_FORMAT.to_owned(),
            version: STATE_VERSION,
            lun: lun.name().to_owned(),
            source_id: lun.source_id(),
            policy: lun.policy(),
            paths: lun
                .paths()
                .iter()
                .map(|p| PathState {
                    path_id: p.id().path_id,
                    name: Some(p.name().to_owned()),
                    primary: p.primary(),
                    weight: p.weight(),
                    admin: p.admin_status(),
                })
                .collect(),
        }
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a LunState always serializes");
        text.push('\n');
        text
    }

    /// Parses and checks a state file's text.
    pub fn parse(text: &str) -> Result<LunState, StateProblem> {
        let corrupt = |why: String| StateProblem::Corrupt(why);
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| corrupt("not a JSON object".into()))?;
        match object.get("format").and_then(|f| f.as_str()) {
            Some(STATE_FORMAT) => {}
            other => {
                return Err(corrupt(format!(
                    "format is {other:?}, expected {STATE_FORMAT:?}"
                )));
            }
        }
        let version = object
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| corrupt("no version number".into()))?;
        if version > u64::from(STATE_VERSION) {
            return Err(StateProblem::Newer(version));
        }
        if version != u64::from(STATE_VERSION) {
            return Err(corrupt(format!("version {version} was never written")));
        }
        let state: LunState =
            serde_json::from_value(value).map_err(|e| corrupt(format!("bad field: {e}")))?;
        let mut ids: Vec<u64> = state.paths.iter().map(|p| p.path_id).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(corrupt(format!(
                "path {} is listed twice",
                format_id64(pair[0])
            )));
        }
        Ok(state)
    }
}

/// Where LUN `lun_name`'s state lives under `state_dir`: `lun-<name>.json`, with every byte outside
/// `[A-Za-z0-9_.-]` written as `%XX` so any LUN name is a safe file name.
pub fn state_file_path(state_dir: &Path, lun_name: &str) -> PathBuf {
    let mut file = String::from("lun-");
    for byte in lun_name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'.' | b'-') {
            file.push(byte as char);
        } else {
            file.push_str(&format!("%{byte:02X}"));
        }
    }
    file.push_str(".json");
    state_dir.join(file)
}

// ---- the in-doubt journal ----

/// The `format` field of a LUN's in-doubt journal.
pub const IN_DOUBT_FORMAT: &str = "lunmpio-in-doubt";
/// The in-doubt journal format version this crate writes and the newest it reads.
pub const IN_DOUBT_VERSION: u32 = 1;
/// A journal larger than this is corrupt (the engine holds at most 16 Ki copies, ~200 bytes each).
pub const IN_DOUBT_FILE_BYTES_MAX: u64 = 8 << 20;

/// The copies of writes a LUN holds in doubt (docs/GUARANTEES.md G3), kept in `state_dir` so a restart does
/// not forget them: each names a range that a path may still overwrite with an old copy.
///
/// ```json
/// {"format": "lunmpio-in-doubt", "version": 1, "lun": "lun0",
///  "copies": [{"offset": 8192, "length": 4096, "pathId": "0x0000000000000001", "pathName": "p0",
///              "sinceUnixMs": 1764597600000, "expiresUnixMs": 1764597630000}]}
/// ```
///
/// `expiresUnixMs` is absent when the hold has no bound (`in_doubt_timeout = "never"`).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InDoubtJournal {
    pub format: String,
    pub version: u32,
    pub lun: String,
    pub copies: Vec<InDoubtRecord>,
}

/// One copy in doubt.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InDoubtRecord {
    pub offset: u64,
    pub length: u64,
    #[serde(with = "id64")]
    pub path_id: u64,
    /// For people reading the file; not used when loading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_name: Option<String>,
    pub since_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

impl InDoubtJournal {
    pub fn new(lun: &str, copies: Vec<InDoubtRecord>) -> InDoubtJournal {
        InDoubtJournal {
            format: IN_DOUBT_FORMAT.to_string(),
            version: IN_DOUBT_VERSION,
            lun: lun.to_string(),
            copies,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the journal always serializes")
    }

    /// Parses and checks a journal's text (format, version, ranges).
    ///
    /// ```
    /// # use lunmpio_vds::persist::*;
    /// let j = InDoubtJournal::new("lun0", vec![InDoubtRecord { offset: 0, length: 4096,
    ///     path_id: 1, path_name: None, since_unix_ms: 5, expires_unix_ms: None }]);
    /// assert_eq!(InDoubtJournal::parse(&j.to_json()).unwrap(), j);
    /// assert!(InDoubtJournal::parse("{}").is_err());
    /// ```
    pub fn parse(text: &str) -> Result<InDoubtJournal, StateProblem> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| StateProblem::Corrupt(format!("not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(IN_DOUBT_FORMAT) {
            return Err(StateProblem::Corrupt(format!(
                "not an in-doubt journal (format is not {IN_DOUBT_FORMAT:?})"
            )));
        }
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version > u64::from(IN_DOUBT_VERSION) {
            return Err(StateProblem::Newer(version));
        }
        let journal: InDoubtJournal = serde_json::from_value(value)
            .map_err(|e| StateProblem::Corrupt(format!("bad field: {e}")))?;
        if let Some(bad) = journal
            .copies
            .iter()
            .find(|c| c.length == 0 || c.offset.checked_add(c.length).is_none())
        {
            return Err(StateProblem::Corrupt(format!(
                "bad range {}+{}",
                bad.offset, bad.length
            )));
        }
        Ok(journal)
    }
}

/// Where LUN `lun_name`'s in-doubt journal lives under `state_dir`: beside its state file.
pub fn in_doubt_file_path(state_dir: &Path, lun_name: &str) -> PathBuf {
    let state = state_file_path(state_dir, lun_name);
    state.with_extension("in-doubt.json")
}

/// What [`apply_state`] did.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ApplyReport {
    /// Path ids in the state that the LUN no longer has.
    pub skipped_paths: Vec<u64>,
    pub policy_requested: LoadBalancePolicy,
    pub policy_applied: LoadBalancePolicy,
    /// One line per fallback or oddity, for the log.
    pub notes: Vec<String>,
}

/// Applies a loaded state to `lun` (normally right after [`LunMpio::new`], before paths connect).
/// A state of another LUN (by name) is `E_INVALIDARG` and changes nothing.
///
/// ```
/// # use lunmpio_vds::*;
/// # use lunmpio_vds::persist::{apply_state, LunState};
/// let path = |id: u64| PathConfig { id, name: format!("p{id}"), uri: format!("nbd://h{id}/x"),
///     transport: Transport::Tcp, hw_type: HwProviderType::Unknown, endpoints: PathEndpoints::None,
///     primary: false, weight: 0 };
/// let config = LunConfig { name: "lun0".into(), source_id: 1, policy: LoadBalancePolicy::RoundRobin,
///     multi_path_safe: true, paths: vec![path(1), path(2)] };
/// let mut lun = LunMpio::new(config.clone()).unwrap();
/// lun.set_load_balance_policy(LoadBalancePolicy::WeightedPaths as i32,
///     &[PathPolicyInput { path_id: PathId::new(1, 2), primary: None, weight: Some(9) }]).unwrap();
/// let state = LunState::capture(&lun);
///
/// let mut fresh = LunMpio::new(config).unwrap();
/// let report = apply_state(&mut fresh, &state).unwrap();
/// assert_eq!(report.policy_applied, LoadBalancePolicy::WeightedPaths);
/// assert_eq!(fresh.get_load_balance_policy(), lun.get_load_balance_policy());
/// ```
pub fn apply_state(lun: &mut LunMpio, state: &LunState) -> Result<ApplyReport, VdsError> {
    if state.lun != lun.name() {
        return Err(VdsError::invalid_arg(format!(
            "state of LUN {:?} cannot be applied to LUN {:?}",
            state.lun,
            lun.name()
        )));
    }
    let mut report = ApplyReport {
        skipped_paths: Vec::new(),
        policy_requested: state.policy,
        policy_applied: state.policy,
        notes: Vec::new(),
    };
    if state.source_id != lun.source_id() {
        report.notes.push(format!(
            "source id changed from {} to {}; paths matched by path id",
            format_id64(state.source_id),
            format_id64(lun.source_id())
        ));
    }
    for p in &state.paths {
        match lun.path_index(PathId::new(lun.source_id(), p.path_id)) {
            Some(i) => lun.restore_path(i, p.primary, p.weight, p.admin),
            None => report.skipped_paths.push(p.path_id),
        }
    }
    if !report.skipped_paths.is_empty() {
        let ids: Vec<String> = report
            .skipped_paths
            .iter()
            .map(|id| format_id64(*id))
            .collect();
        report.notes.push(format!(
            "paths no longer configured, skipped: {}",
            ids.join(", ")
        ));
    }

    let mut policy = state.policy;
    // Each fallback moves to a policy whose rules are weaker, so this ends within three rounds.
    for _round in 0..3 {
        let mut primary: Vec<bool> = lun.paths().iter().map(|p| p.primary()).collect();
        match lun.primaries_settled(policy, &mut primary) {
            Ok(()) => {
                lun.restore_policy(policy, &primary);
                report.policy_applied = policy;
                return Ok(report);
            }
            Err(e) if e.hresult == Hresult::VDS_E_NOT_SUPPORTED => {
                report.notes.push(format!(
                    "policy {} is no longer supported ({}); using failover",
                    policy.config_name(),
                    e.message
                ));
                policy = LoadBalancePolicy::Failover;
            }
            Err(_) if policy == LoadBalancePolicy::Failover => {
                let keep = lun.failover_active_path();
                let primary: Vec<bool> = (0..lun.paths().len()).map(|i| Some(i) == keep).collect();
                let kept = keep
                    .map(|i| lun.paths()[i].name().to_owned())
                    .unwrap_or_default();
                report
                    .notes
                    .push(format!("failover had several primary paths; kept {kept:?}"));
                lun.restore_policy(policy, &primary);
                report.policy_applied = policy;
                return Ok(report);
            }
            Err(e) => {
                report.notes.push(format!(
                    "policy {} no longer valid ({}); using round-robin",
                    policy.config_name(),
                    e.message
                ));
                policy = LoadBalancePolicy::RoundRobin;
            }
        }
    }
    unreachable!("apply_state: policy fallback did not settle");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lun::{
        LunConfig, OperStatus, PathConfig, PathEndpoints, PathPolicyInput, Transport,
    };
    use crate::types::{HwProviderType, PathStatus};

    fn config(policy: LoadBalancePolicy, safe: bool, ids: &[u64]) -> LunConfig {
        LunConfig {
            name: "lun/0 ü".into(),
            source_id: 0xa1,
            policy,
            multi_path_safe: safe,
            paths: ids
                .iter()
                .map(|&id| PathConfig {
                    id,
                    name: format!("p{id}"),
                    uri: format!("nbd://h{id}/x"),
                    transport: Transport::Tcp,
                    hw_type: HwProviderType::Unknown,
                    endpoints: PathEndpoints::None,
                    primary: id == ids[0],
                    weight: 0,
                })
                .collect(),
        }
    }

    fn set(
        lun: &mut LunMpio,
        policy: LoadBalancePolicy,
        inputs: &[(u64, Option<bool>, Option<u32>)],
    ) {
        let inputs: Vec<PathPolicyInput> = inputs
            .iter()
            .map(|&(id, primary, weight)| PathPolicyInput {
                path_id: PathId::new(lun.source_id(), id),
                primary,
                weight,
            })
            .collect();
        lun.set_load_balance_policy(policy as i32, &inputs).unwrap();
    }

    #[test]
    fn file_name_is_safe() {
        let p = state_file_path(Path::new("/var/lib/lunmpio"), "lun/0 ü");
        assert_eq!(p, Path::new("/var/lib/lunmpio/lun-lun%2F0%20%C3%BC.json"));
        assert_eq!(
            state_file_path(Path::new("d"), "a.b-c_d"),
            Path::new("d/lun-a.b-c_d.json")
        );
    }

    #[test]
    fn capture_parse_apply_round_trip() {
        let mut lun =
            LunMpio::new(config(LoadBalancePolicy::RoundRobin, true, &[1, 2, 3])).unwrap();
        set(
            &mut lun,
            LoadBalancePolicy::RoundRobinWithSubset,
            &[(2, Some(true), Some(5))],
        );
        lun.set_path_admin_status(PathId::new(0xa1, 3), PathStatus::Standby as i32)
            .unwrap();
        let state = LunState::capture(&lun);
        assert_eq!(LunState::parse(&state.to_json()).unwrap(), state);

        let mut fresh =
            LunMpio::new(config(LoadBalancePolicy::RoundRobin, true, &[1, 2, 3])).unwrap();
        let report = apply_state(&mut fresh, &state).unwrap();
        assert!(report.notes.is_empty(), "{:?}", report.notes);
        assert_eq!(
            fresh.get_load_balance_policy(),
            lun.get_load_balance_policy()
        );
        assert_eq!(fresh.paths()[2].admin_status(), AdminStatus::Standby);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text = r#"{"format": "lunmpio-lun-state", "version": 1, "lun": "x", "sourceId": 1, "policy": "service-time",
                       "extra": true, "paths": [{"pathId": "0x2", "primary": false, "weight": 3, "admin": "failed", "note": 1}]}"#;
        let state = LunState::parse(text).unwrap();
        assert_eq!(state.policy, LoadBalancePolicy::VendorSpecific);
        assert_eq!(state.paths[0].admin, AdminStatus::Failed);
    }

    #[test]
    fn apply_skips_missing_paths_and_falls_back() {
        // Saved under RRWS with path 2 the only primary; path 2 is gone now.
        let mut lun =
            LunMpio::new(config(LoadBalancePolicy::RoundRobin, true, &[1, 2, 3])).unwrap();
        set(
            &mut lun,
            LoadBalancePolicy::RoundRobinWithSubset,
            &[(1, Some(false), None), (2, Some(true), None)],
        );
        let state = LunState::capture(&lun);
        let mut fresh = LunMpio::new(config(LoadBalancePolicy::RoundRobin, true, &[1, 3])).unwrap();
        let report = apply_state(&mut fresh, &state).unwrap();
        assert_eq!(report.skipped_paths, [2]);
        assert_eq!(report.policy_applied, LoadBalancePolicy::RoundRobin);
        assert_eq!(fresh.policy(), LoadBalancePolicy::RoundRobin);

        // A multipath policy on a LUN that is no longer multi-path safe: failover.
        let mut unsafe_lun =
            LunMpio::new(config(LoadBalancePolicy::Failover, false, &[1, 2, 3])).unwrap();
        let mut state = LunState::capture(&lun);
        state.policy = LoadBalancePolicy::RoundRobin;
        for p in state.paths.iter_mut() {
            p.primary = true;
        }
        let report = apply_state(&mut unsafe_lun, &state).unwrap();
        assert_eq!(report.policy_applied, LoadBalancePolicy::Failover);
        assert_eq!(report.notes.len(), 2, "{:?}", report.notes);
        assert_eq!(unsafe_lun.paths().iter().filter(|p| p.primary()).count(), 1);

        // Another LUN's state changes nothing.
        let before = LunState::capture(&unsafe_lun);
        state.lun = "other".into();
        assert_eq!(
            apply_state(&mut unsafe_lun, &state).unwrap_err().hresult,
            Hresult::E_INVALIDARG
        );
        assert_eq!(LunState::capture(&unsafe_lun), before);
    }

    #[test]
    fn apply_restores_admin_failed_as_unusable() {
        let mut lun = LunMpio::new(config(LoadBalancePolicy::RoundRobin, true, &[1, 2])).unwrap();
        lun.set_path_admin_status(PathId::new(0xa1, 1), PathStatus::Failed as i32)
            .unwrap();
        let state = LunState::capture(&lun);
        let mut fresh = LunMpio::new(config(LoadBalancePolicy::RoundRobin, true, &[1, 2])).unwrap();
        apply_state(&mut fresh, &state).unwrap();
        fresh.set_oper_status(PathId::new(0xa1, 1), OperStatus::Online);
        fresh.set_oper_status(PathId::new(0xa1, 2), OperStatus::Online);
        assert_eq!(fresh.get_path_info()[0].status, PathStatus::Failed);
        assert_eq!(fresh.selector_snapshot().candidates().len(), 1);
        assert!(fresh.paths()[0].load().is_unusable());
    }
}
