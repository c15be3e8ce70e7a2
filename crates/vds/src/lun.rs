//! One LUN's multipath state and the IVdsLunMpio / IVdsHwProviderPrivateMpio operations on it.
//!
//! [`LunMpio`] is owned by the LUN's control task (one writer); the data path sees it only through the
//! [`SelectorSnapshot`] it builds and the per-path [`PathLoad`] atomics. Every Set operation validates
//! everything first and commits only when all checks passed, so a failed call changes nothing.
//!
//! # Reported status (GetPathInfo)
//!
//! In this order, the first rule that applies:
//!
//! 1. administratively failed → Failed, "administratively failed";
//! 2. operationally failed → Failed, with the engine's reason ("connection reset", "identity mismatch: …");
//! 3. administratively standby → Standby, "administratively standby";
//! 4. non-primary under Failover or Round Robin with Subset → Standby, "not primary under …";
//! 5. awaiting failback (engine-controlled, [`LunMpio::set_failback_pending`]) → Standby, "awaiting failback";
//! 6. before the first connection attempt settled → Unknown, "connecting";
//! 7. otherwise Online, "".
//!
//! A path's reported status depends only on its own state and the LUN's policy, so an operational change
//! of one path changes at most that path's status ([`StatusTransition`]).

use crate::hresult::{Hresult, VdsError};
use crate::select::{Candidate, CandidateClass, PathLoad, SelectorSnapshot};
use crate::types::{
    Guid, HbaPortProp, HwProviderType, IpAddress, LbSupportFlags, LoadBalancePolicy, PathId,
    PathPolicy, PathStatus, Wwn, format_id64, parse_id64,
};
use std::net::IpAddr;
use std::sync::Arc;

pub use crate::limits::{NAME_BYTES_MAX, PATHS_PER_LUN_MAX};

/// How a path reaches the target.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Transport {
    Tcp,
    Unix,
    File,
}

impl Transport {
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Unix => "unix",
            Transport::File => "file",
        }
    }
}

/// The two ends of a path, as `VDS_PATH_INFO`'s unions have them (research Q1: the interconnect type
/// selects the arm; here the enum *is* the arm).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum PathEndpoints {
    /// iSCSI-like: a target portal, an initiator adapter and the initiator portal (bind) address.
    Network {
        target_portal_id: Guid,
        initiator_adapter_id: Guid,
        initiator: IpAddress,
    },
    /// HBA-based (Fibre Channel, SAS, PCI RAID, or a local block device).
    Hba {
        controller_port_id: Guid,
        hba_port_id: Guid,
        hba_port: HbaPortProp,
    },
    None,
}

/// What the engine last learned about the path's connection.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum OperStatus {
    /// The first connection attempt has not settled yet.
    Unknown,
    /// Connected, identity verified: may carry I/O.
    Online,
    Failed {
        reason: String,
    },
}

/// What an administrator asked for (SetPathStatus, SetAllPathStatusesFromHbaPort). Persisted.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum AdminStatus {
    None,
    Failed,
    Standby,
}

impl AdminStatus {
    pub const fn name(self) -> &'static str {
        match self {
            AdminStatus::None => "none",
            AdminStatus::Failed => "failed",
            AdminStatus::Standby => "standby",
        }
    }

    pub fn from_name(name: &str) -> Option<AdminStatus> {
        [AdminStatus::None, AdminStatus::Failed, AdminStatus::Standby]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// The administrative meaning of a `VDS_PATH_STATUS` request: 1 clears, 5 fails, 7 stands by;
    /// 0 and undefined values are `E_INVALIDARG`.
    pub fn from_requested_status(status: i32) -> Result<AdminStatus, VdsError> {
        match PathStatus::try_from(status)? {
            PathStatus::Online => Ok(AdminStatus::None),
            PathStatus::Failed => Ok(AdminStatus::Failed),
            PathStatus::Standby => Ok(AdminStatus::Standby),
            PathStatus::Unknown => Err(VdsError::invalid_arg(
                "VDS_MPS_UNKNOWN (0) cannot be requested as a path status",
            )),
        }
    }
}

/// A path as configured: the input of [`LunMpio::new`].
#[derive(Clone, Debug)]
pub struct PathConfig {
    /// The path's id within the LUN (`VDS_PATH_ID.ullPathId`).
    pub id: u64,
    pub name: String,
    pub uri: String,
    pub transport: Transport,
    pub hw_type: HwProviderType,
    pub endpoints: PathEndpoints,
    pub primary: bool,
    pub weight: u32,
}

/// A LUN as configured: the input of [`LunMpio::new`].
#[derive(Clone, Debug)]
pub struct LunConfig {
    pub name: String,
    pub source_id: u64,
    pub policy: LoadBalancePolicy,
    /// Every path advertises CAN_MULTI_CONN, or the paths share one backing store (docs/OPERATIONS.md, paths).
    pub multi_path_safe: bool,
    pub paths: Vec<PathConfig>,
}

/// One path of a LUN. Policy-relevant fields are changed only through [`LunMpio`]'s operations.
#[derive(Clone, Debug)]
pub struct Path {
    id: PathId,
    name: String,
    uri: String,
    transport: Transport,
    hw_type: HwProviderType,
    endpoints: PathEndpoints,
    oper: OperStatus,
    admin: AdminStatus,
    failback_pending: bool,
    primary: bool,
    weight: u32,
    load: Arc<PathLoad>,
}

impl Path {
    pub fn id(&self) -> PathId {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn uri(&self) -> &str {
        &self.uri
    }
    pub fn transport(&self) -> Transport {
        self.transport
    }
    pub fn hw_type(&self) -> HwProviderType {
        self.hw_type
    }
    pub fn endpoints(&self) -> &PathEndpoints {
        &self.endpoints
    }
    pub fn oper_status(&self) -> &OperStatus {
        &self.oper
    }
    pub fn admin_status(&self) -> AdminStatus {
        self.admin
    }
    pub fn failback_pending(&self) -> bool {
        self.failback_pending
    }
    pub fn primary(&self) -> bool {
        self.primary
    }
    pub fn weight(&self) -> u32 {
        self.weight
    }
    /// The path's load counters, shared with the data path.
    pub fn load(&self) -> &Arc<PathLoad> {
        &self.load
    }

    /// May carry I/O (a candidate): operationally online and not administratively failed.
    /// Administrative standby still counts: standby paths are used when nothing else is left.
    pub fn is_usable(&self) -> bool {
        self.oper == OperStatus::Online && self.admin != AdminStatus::Failed
    }

    /// Replaces the endpoints (for example once the bind address of a reconnect is known).
    pub fn set_endpoints(&mut self, endpoints: PathEndpoints) {
        self.endpoints = endpoints;
    }

    /// Changes the reported interconnect type; `VDS_HWT_HYBRID` is `E_INVALIDARG`.
    pub fn set_hw_type(&mut self, hw_type: HwProviderType) -> Result<(), VdsError> {
        check_hw_type(hw_type, &self.name)?;
        self.hw_type = hw_type;
        Ok(())
    }

    /// Status and reason as GetPathInfo reports them under `policy` (module docs).
    pub fn reported_status(&self, policy: LoadBalancePolicy) -> (PathStatus, String) {
        if self.admin == AdminStatus::Failed {
            return (PathStatus::Failed, "administratively failed".to_owned());
        }
        if let OperStatus::Failed { reason } = &self.oper {
            return (PathStatus::Failed, reason.clone());
        }
        if self.admin == AdminStatus::Standby {
            return (PathStatus::Standby, "administratively standby".to_owned());
        }
        if policy.uses_primary() && !self.primary {
            return (
                PathStatus::Standby,
                format!("not primary under {}", policy.config_name()),
            );
        }
        if self.failback_pending {
            return (PathStatus::Standby, "awaiting failback".to_owned());
        }
        if self.oper == OperStatus::Unknown {
            return (PathStatus::Unknown, "connecting".to_owned());
        }
        (PathStatus::Online, String::new())
    }

    /// The selector class of a usable path.
    fn candidate_class(&self, policy: LoadBalancePolicy) -> CandidateClass {
        debug_assert!(self.is_usable());
        if self.admin == AdminStatus::Standby {
            CandidateClass::AdminStandby
        } else if (policy.uses_primary() && !self.primary) || self.failback_pending {
            CandidateClass::Standby
        } else {
            CandidateClass::Active
        }
    }
}

/// One element of GetPathInfo: `VDS_PATH_INFO` plus lunmpio's name, URI, transport and reason.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PathInfo {
    pub path_id: PathId,
    pub hw_type: HwProviderType,
    pub status: PathStatus,
    pub status_reason: String,
    pub name: String,
    pub uri: String,
    pub transport: Transport,
    pub endpoints: PathEndpoints,
}

/// One element of SetLoadBalancePolicy's input: `None` keeps the path's current value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct PathPolicyInput {
    pub path_id: PathId,
    pub primary: Option<bool>,
    pub weight: Option<u32>,
}

/// A change of one path's reported status, for the event log.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StatusTransition {
    pub path_id: PathId,
    pub from: PathStatus,
    pub to: PathStatus,
    pub reason: String,
}

/// The transitions between two GetPathInfo results of the same LUN (paths matched by id).
pub fn status_transitions(before: &[PathInfo], after: &[PathInfo]) -> Vec<StatusTransition> {
    after
        .iter()
        .filter_map(|new| {
            let old = before.iter().find(|old| old.path_id == new.path_id)?;
            (old.status != new.status).then(|| StatusTransition {
                path_id: new.path_id,
                from: old.status,
                to: new.status,
                reason: new.status_reason.clone(),
            })
        })
        .collect()
}

/// Which paths SetAllPathStatusesFromHbaPort addresses.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum HbaPortMatch {
    /// Paths whose HBA endpoint has this WWN pair (the only fields VDS says to look at).
    Wwn { node: Wwn, port: Wwn },
    /// Network paths whose initiator (bind) address is this address.
    Initiator(IpAddr),
}

impl HbaPortMatch {
    pub fn matches(&self, endpoints: &PathEndpoints) -> bool {
        match (self, endpoints) {
            (HbaPortMatch::Wwn { node, port }, PathEndpoints::Hba { hba_port, .. }) => {
                hba_port.wwn_node == *node && hba_port.wwn_port == *port
            }
            (HbaPortMatch::Initiator(ip), PathEndpoints::Network { initiator, .. }) => {
                initiator.to_ip() == Some(*ip)
            }
            _ => false,
        }
    }
}

/// The result of SetAllPathStatusesFromHbaPort on one LUN.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct HbaPortOutcome {
    /// Paths of the port.
    pub matched: u32,
    /// Paths whose administrative status changed.
    pub changed: u32,
    /// Paths left alone because the change would break the policy.
    pub skipped: u32,
    /// Paths set as asked whose reported status is still not the requested one: reinstated (Online
    /// requested) but kept on standby by the policy (a non-primary under Failover or Round Robin with
    /// Subset) or still failed by their connection. Microsoft documents exactly this as the case for
    /// `VDS_S_STATUSES_INCOMPLETELY_SET` ("the status conflicts with the current load balance policy").
    pub incomplete: u32,
    /// Reported-status changes, for the event log.
    pub transitions: Vec<StatusTransition>,
}

/// Folds the per-LUN outcomes of one SetAllPathStatusesFromHbaPort call into its HRESULT:
/// `VDS_E_OBJECT_NOT_FOUND` when no path of any LUN matched the port, `VDS_S_STATUSES_INCOMPLETELY_SET`
/// when any path was skipped or does not report the requested status, else `S_OK`.
///
/// ```
/// use lunmpio_vds::{aggregate_hba_outcomes, HbaPortOutcome, Hresult};
/// let ok = HbaPortOutcome { matched: 2, changed: 2, ..Default::default() };
/// let partial = HbaPortOutcome { matched: 1, skipped: 1, ..Default::default() };
/// assert_eq!(aggregate_hba_outcomes([ok.clone()]).unwrap(), Hresult::S_OK);
/// assert_eq!(aggregate_hba_outcomes([ok, partial]).unwrap(), Hresult::VDS_S_STATUSES_INCOMPLETELY_SET);
/// assert_eq!(aggregate_hba_outcomes([HbaPortOutcome::default()]).unwrap_err().hresult,
///            Hresult::VDS_E_OBJECT_NOT_FOUND);
/// ```
pub fn aggregate_hba_outcomes(
    outcomes: impl IntoIterator<Item = HbaPortOutcome>,
) -> Result<Hresult, VdsError> {
    let (mut matched, mut skipped) = (0u64, 0u64);
    for outcome in outcomes {
        matched += u64::from(outcome.matched);
        skipped += u64::from(outcome.skipped) + u64::from(outcome.incomplete);
    }
    if matched == 0 {
        return Err(VdsError::object_not_found(
            "no path of any LUN originates at this HBA port",
        ));
    }
    Ok(if skipped > 0 {
        Hresult::VDS_S_STATUSES_INCOMPLETELY_SET
    } else {
        Hresult::S_OK
    })
}

fn check_hw_type(hw_type: HwProviderType, path: &str) -> Result<(), VdsError> {
    if hw_type.is_valid_on_path() {
        Ok(())
    } else {
        Err(VdsError::invalid_arg(format!(
            "path {path:?}: VDS_HWT_HYBRID is never valid on a path"
        )))
    }
}

fn check_name(what: &str, name: &str) -> Result<(), VdsError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX || name.chars().any(char::is_control) {
        return Err(VdsError::invalid_arg(format!(
            "{what} name {name:?} must be 1-{NAME_BYTES_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

/// A LUN's paths, policy and multipath safety: the state behind IVdsLunMpio.
///
/// ```
/// use lunmpio_vds::*;
/// let path = |id: u64, primary| PathConfig {
///     id, name: format!("p{id}"), uri: format!("nbd://10.0.{id}.10/lun0"), transport: Transport::Tcp,
///     hw_type: HwProviderType::Unknown, endpoints: PathEndpoints::None, primary, weight: 0,
/// };
/// let mut lun = LunMpio::new(LunConfig {
///     name: "lun0".into(), source_id: 7, policy: LoadBalancePolicy::Failover,
///     multi_path_safe: true, paths: vec![path(2, false), path(1, true)],
/// }).unwrap();
/// lun.set_oper_status(PathId::new(7, 1), OperStatus::Online);
/// lun.set_oper_status(PathId::new(7, 2), OperStatus::Online);
///
/// let info = lun.get_path_info();
/// assert_eq!(info[0].status, PathStatus::Online);   // the primary
/// assert_eq!(info[1].status, PathStatus::Standby);  // non-primary under Failover
///
/// lun.set_load_balance_policy(LoadBalancePolicy::RoundRobin as i32, &[]).unwrap();
/// let (policy, paths) = lun.get_load_balance_policy();
/// assert_eq!(policy, LoadBalancePolicy::RoundRobin);
/// assert_eq!(paths.len(), 2);
///
/// let err = lun.set_load_balance_policy(0, &[]).unwrap_err();
/// assert_eq!(err.hresult, Hresult::E_INVALIDARG);
/// ```
#[derive(Clone, Debug)]
pub struct LunMpio {
    name: String,
    source_id: u64,
    policy: LoadBalancePolicy,
    multi_path_safe: bool,
    /// Sorted by path id, unique.
    paths: Vec<Path>,
}

impl LunMpio {
    /// Builds a LUN from its configuration, enforcing the same rules as SetLoadBalancePolicy:
    /// at most [`PATHS_PER_LUN_MAX`] paths with unique ids and names, no Hybrid type, a supported
    /// policy (`VDS_E_NOT_SUPPORTED` for a multipath policy on a LUN that is not multi-path safe),
    /// Failover with at most one primary (none: the first path by (weight, id) becomes primary),
    /// Round Robin with Subset with at least one primary.
    pub fn new(config: LunConfig) -> Result<LunMpio, VdsError> {
        check_name("LUN", &config.name)?;
        if config.paths.len() > PATHS_PER_LUN_MAX {
            return Err(VdsError::invalid_arg(format!(
                "LUN {:?} has {} paths, at most {PATHS_PER_LUN_MAX}",
                config.name,
                config.paths.len()
            )));
        }
        let mut paths = Vec::with_capacity(config.paths.len());
        for p in config.paths {
            check_name("path", &p.name)?;
            check_hw_type(p.hw_type, &p.name)?;
            paths.push(Path {
                id: PathId::new(config.source_id, p.id),
                name: p.name,
                uri: p.uri,
                transport: p.transport,
                hw_type: p.hw_type,
                endpoints: p.endpoints,
                oper: OperStatus::Unknown,
                admin: AdminStatus::None,
                failback_pending: false,
                primary: p.primary,
                weight: p.weight,
                load: Arc::new(PathLoad::new()),
            });
        }
        paths.sort_by_key(|p| p.id);
        for pair in paths.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(VdsError::invalid_arg(format!(
                    "LUN {:?}: path id {} is used twice",
                    config.name,
                    format_id64(pair[0].id.path_id)
                )));
            }
        }
        for (i, a) in paths.iter().enumerate() {
            if paths[i + 1..].iter().any(|b| b.name == a.name) {
                return Err(VdsError::invalid_arg(format!(
                    "LUN {:?}: path name {:?} is used twice",
                    config.name, a.name
                )));
            }
        }
        for p in paths.iter_mut() {
            p.load.mark_unusable(); // Nothing is connected yet.
        }
        let mut lun = LunMpio {
            name: config.name,
            source_id: config.source_id,
            policy: config.policy,
            multi_path_safe: config.multi_path_safe,
            paths,
        };
        lun.check_supported(config.policy)?;
        let mut primary: Vec<bool> = lun.paths.iter().map(|p| p.primary).collect();
        lun.settle_primaries(config.policy, &mut primary)?;
        for (p, primary) in lun.paths.iter_mut().zip(primary) {
            p.primary = primary;
        }
        lun.assert_invariants();
        Ok(lun)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source_id(&self) -> u64 {
        self.source_id
    }

    pub fn policy(&self) -> LoadBalancePolicy {
        self.policy
    }

    pub fn multi_path_safe(&self) -> bool {
        self.multi_path_safe
    }

    /// The paths, sorted by path id.
    pub fn paths(&self) -> &[Path] {
        &self.paths
    }

    /// Paths that may carry I/O now.
    pub fn usable_path_count(&self) -> usize {
        self.paths.iter().filter(|p| p.is_usable()).count()
    }

    pub fn path_index(&self, path_id: PathId) -> Option<usize> {
        if path_id.source_id != self.source_id {
            return None;
        }
        self.paths.binary_search_by_key(&path_id, |p| p.id).ok()
    }

    pub fn path(&self, path_id: PathId) -> Option<&Path> {
        self.path_index(path_id).map(|i| &self.paths[i])
    }

    /// Mutable access for the engine-owned, non-policy fields ([`Path::set_endpoints`], [`Path::set_hw_type`]).
    pub fn path_mut(&mut self, path_id: PathId) -> Option<&mut Path> {
        self.path_index(path_id).map(|i| &mut self.paths[i])
    }

    pub fn path_by_name(&self, name: &str) -> Option<&Path> {
        self.paths.iter().find(|p| p.name == name)
    }

    /// Resolves a path named the way the CLI allows: its name, or its path id (`0x…` or decimal).
    /// Unknown → `VDS_E_OBJECT_NOT_FOUND`.
    pub fn resolve_path(&self, name_or_id: &str) -> Result<PathId, VdsError> {
        if let Some(p) = self.path_by_name(name_or_id) {
            return Ok(p.id);
        }
        parse_id64(name_or_id)
            .ok()
            .and_then(|id| self.path(PathId::new(self.source_id, id)))
            .map(|p| p.id)
            .ok_or_else(|| {
                VdsError::object_not_found(format!(
                    "LUN {:?} has no path {name_or_id:?}",
                    self.name
                ))
            })
    }

    fn not_found(&self, path_id: PathId) -> VdsError {
        VdsError::object_not_found(format!("{path_id} is not a path of LUN {:?}", self.name))
    }

    // ---------------------------------------------------------------------------------------------
    // IVdsLunMpio

    /// GetPathInfo: every path, sorted by path id.
    pub fn get_path_info(&self) -> Vec<PathInfo> {
        self.paths
            .iter()
            .map(|p| {
                let (status, status_reason) = p.reported_status(self.policy);
                PathInfo {
                    path_id: p.id,
                    hw_type: p.hw_type,
                    status,
                    status_reason,
                    name: p.name.clone(),
                    uri: p.uri.clone(),
                    transport: p.transport,
                    endpoints: p.endpoints.clone(),
                }
            })
            .collect()
    }

    /// GetLoadBalancePolicy: the policy and every path's primary flag and weight, in GetPathInfo's order.
    pub fn get_load_balance_policy(&self) -> (LoadBalancePolicy, Vec<PathPolicy>) {
        let paths = self
            .paths
            .iter()
            .map(|p| PathPolicy {
                path_id: p.id,
                primary: p.primary,
                weight: p.weight,
            })
            .collect();
        (self.policy, paths)
    }

    /// GetSupportedLbPolicies: all seven when the paths are safe to use together, else Failover only.
    pub fn get_supported_lb_policies(&self) -> LbSupportFlags {
        if self.multi_path_safe {
            LbSupportFlags::ALL
        } else {
            LbSupportFlags::FAILOVER
        }
    }

    /// SetLoadBalancePolicy with the caller's count, as the C ABI receives it: a negative count or one
    /// that disagrees with `paths` is `E_INVALIDARG`; then as [`LunMpio::set_load_balance_policy`].
    pub fn set_load_balance_policy_raw(
        &mut self,
        policy: i32,
        paths: &[PathPolicyInput],
        count: i32,
    ) -> Result<(), VdsError> {
        if count < 0 {
            return Err(VdsError::invalid_arg(format!(
                "path count {count} is negative"
            )));
        }
        if count as usize != paths.len() {
            return Err(VdsError::invalid_arg(format!(
                "path count {count} but {} path records",
                paths.len()
            )));
        }
        self.set_load_balance_policy(policy, paths)
    }

    /// SetLoadBalancePolicy (docs/VDS_MAPPING.md, policies), all-or-nothing:
    ///
    /// - policy 0 or undefined → `E_INVALIDARG`; not in [`LunMpio::get_supported_lb_policies`] →
    ///   `VDS_E_NOT_SUPPORTED`;
    /// - a path id not of this LUN → `VDS_E_OBJECT_NOT_FOUND`; a path listed twice → `E_INVALIDARG`
    ///   (the first offending record, in input order, decides);
    /// - unlisted paths, and `None` fields, keep their primary flag and weight;
    /// - Failover with more than one primary after merging → `E_INVALIDARG`; with none → the path
    ///   Failover uses now becomes primary ([`LunMpio::failover_active_path`]);
    /// - Round Robin with Subset with no primary after merging → `E_INVALIDARG`.
    pub fn set_load_balance_policy(
        &mut self,
        policy: i32,
        paths: &[PathPolicyInput],
    ) -> Result<(), VdsError> {
        let policy = LoadBalancePolicy::try_from(policy)?;
        self.check_supported(policy)?;

        let mut primary: Vec<bool> = self.paths.iter().map(|p| p.primary).collect();
        let mut weight: Vec<u32> = self.paths.iter().map(|p| p.weight).collect();
        let mut listed = [false; PATHS_PER_LUN_MAX];
        for input in paths {
            let i = self
                .path_index(input.path_id)
                .ok_or_else(|| self.not_found(input.path_id))?;
            if listed[i] {
                return Err(VdsError::invalid_arg(format!(
                    "{} is listed twice",
                    input.path_id
                )));
            }
            listed[i] = true;
            if let Some(value) = input.primary {
                primary[i] = value;
            }
            if let Some(value) = input.weight {
                weight[i] = value;
            }
        }
        self.settle_primaries(policy, &mut primary)?;

        // Commit: nothing below can fail.
        self.policy = policy;
        for ((p, primary), weight) in self.paths.iter_mut().zip(primary).zip(weight) {
            p.primary = primary;
            p.weight = weight;
        }
        self.assert_invariants();
        Ok(())
    }

    fn check_supported(&self, policy: LoadBalancePolicy) -> Result<(), VdsError> {
        if self.get_supported_lb_policies().contains(policy) {
            return Ok(());
        }
        Err(VdsError::not_supported(format!(
            "LUN {:?} supports only failover: its paths neither advertise CAN_MULTI_CONN nor share one backing store",
            self.name
        )))
    }

    /// Applies the primary rules of `policy` to a proposed set of primary flags.
    fn settle_primaries(
        &self,
        policy: LoadBalancePolicy,
        primary: &mut [bool],
    ) -> Result<(), VdsError> {
        debug_assert_eq!(primary.len(), self.paths.len());
        let primaries = primary.iter().filter(|p| **p).count();
        match policy {
            LoadBalancePolicy::Failover if primaries > 1 => Err(VdsError::invalid_arg(format!(
                "failover allows one primary path, {primaries} would be primary"
            ))),
            LoadBalancePolicy::Failover if primaries == 0 => {
                if let Some(i) = self.failover_active_path() {
                    primary[i] = true;
                }
                Ok(())
            }
            LoadBalancePolicy::RoundRobinWithSubset if primaries == 0 && !self.paths.is_empty() => {
                Err(VdsError::invalid_arg(
                    "round-robin-with-subset needs at least one primary path",
                ))
            }
            _ => Ok(()),
        }
    }

    /// The path Failover would pick now, by the current flags and weights: the primary if usable, else
    /// the first usable path by (weight, id), preferring paths that are not administratively standby;
    /// with no usable path at all, the same order over all paths. `None` only without paths.
    pub fn failover_active_path(&self) -> Option<usize> {
        // The order of a Failover snapshot (class, primary first, weight, id), with unusable paths last.
        let rank = |i: usize| {
            let p = &self.paths[i];
            let class = if p.admin == AdminStatus::Standby {
                CandidateClass::AdminStandby
            } else if !p.primary || p.failback_pending {
                CandidateClass::Standby
            } else {
                CandidateClass::Active
            };
            (!p.is_usable(), class, !p.primary, p.weight, p.id)
        };
        (0..self.paths.len()).min_by_key(|&i| rank(i))
    }

    // ---------------------------------------------------------------------------------------------
    // Administrative status

    /// SetPathStatus: 5 → administratively failed, 7 → administratively standby, 1 → clear.
    /// 0 or an undefined value → `E_INVALIDARG`; unknown path → `VDS_E_OBJECT_NOT_FOUND`.
    /// An explicit single-path request is obeyed even when it fails the last usable path or stands by
    /// the only primary. Returns the reported-status change, if any.
    pub fn set_path_admin_status(
        &mut self,
        path_id: PathId,
        status: i32,
    ) -> Result<Option<StatusTransition>, VdsError> {
        let admin = AdminStatus::from_requested_status(status)?;
        let i = self
            .path_index(path_id)
            .ok_or_else(|| self.not_found(path_id))?;
        Ok(self.set_admin(i, admin))
    }

    fn set_admin(&mut self, i: usize, admin: AdminStatus) -> Option<StatusTransition> {
        let policy = self.policy;
        let path = &mut self.paths[i];
        let (from, _) = path.reported_status(policy);
        path.admin = admin;
        sync_usable_flag(path);
        let (to, reason) = path.reported_status(policy);
        (from != to).then_some(StatusTransition {
            path_id: path.id,
            from,
            to,
            reason,
        })
    }

    /// SetAllPathStatusesFromHbaPort on this LUN. The status is checked first (`E_INVALIDARG` for 0 or
    /// an undefined value, even when nothing matches). Matching paths are visited in path-id order; each
    /// sees the changes made to the ones before it. A path is skipped (left as is) when applying the
    /// status would break the policy:
    ///
    /// - Failed, when it is the LUN's last usable path (standby counts as usable);
    /// - Standby, when it is a primary under Failover or Round Robin with Subset and no other primary
    ///   would remain usable and not standby.
    ///
    /// Online clears the administrative status (a non-primary then reports Standby under Failover:
    /// that is the policy, not a skip). A path already in the requested state is matched, not changed.
    pub fn set_hba_port_statuses(
        &mut self,
        port: &HbaPortMatch,
        status: i32,
    ) -> Result<HbaPortOutcome, VdsError> {
        let admin = AdminStatus::from_requested_status(status)?;
        let requested = PathStatus::try_from(status)?;
        let mut outcome = HbaPortOutcome::default();
        let mut unchanged = 0;
        let mut applied = Vec::new();
        for i in 0..self.paths.len() {
            if !port.matches(&self.paths[i].endpoints) {
                continue;
            }
            outcome.matched += 1;
            if self.paths[i].admin == admin {
                unchanged += 1;
                applied.push(i);
                continue;
            }
            if self.hba_change_breaks_policy(i, admin) {
                outcome.skipped += 1;
                continue;
            }
            outcome.changed += 1;
            applied.push(i);
            if let Some(transition) = self.set_admin(i, admin) {
                outcome.transitions.push(transition);
            }
        }
        outcome.incomplete = applied
            .iter()
            .filter(|&&i| self.paths[i].reported_status(self.policy).0 != requested)
            .count() as u32;
        assert_eq!(
            outcome.matched,
            outcome.changed + outcome.skipped + unchanged
        );
        assert!(outcome.incomplete <= outcome.changed + unchanged);
        assert!(outcome.transitions.len() <= outcome.changed as usize);
        self.assert_invariants();
        Ok(outcome)
    }

    fn hba_change_breaks_policy(&self, i: usize, admin: AdminStatus) -> bool {
        let path = &self.paths[i];
        match admin {
            AdminStatus::None => false,
            AdminStatus::Failed => path.is_usable() && self.usable_path_count() == 1,
            AdminStatus::Standby => {
                self.policy.uses_primary()
                    && path.primary
                    && !self.paths.iter().enumerate().any(|(j, other)| {
                        j != i
                            && other.primary
                            && other.is_usable()
                            && other.admin != AdminStatus::Standby
                    })
            }
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Engine-facing

    /// Records what the engine learned about a path's connection and returns the change of its reported
    /// status, if any. Also syncs the path's `unusable` flag: usable again only when Online (and not
    /// administratively failed). Unknown path → `None` (the engine owns the ids, so this is a bug there;
    /// debug builds assert).
    pub fn set_oper_status(
        &mut self,
        path_id: PathId,
        oper: OperStatus,
    ) -> Option<StatusTransition> {
        let Some(i) = self.path_index(path_id) else {
            debug_assert!(false, "set_oper_status on unknown {path_id}");
            return None;
        };
        let policy = self.policy;
        let path = &mut self.paths[i];
        let (from, _) = path.reported_status(policy);
        path.oper = oper;
        sync_usable_flag(path);
        let (to, reason) = path.reported_status(policy);
        (from != to).then_some(StatusTransition {
            path_id,
            from,
            to,
            reason,
        })
    }

    /// Marks a returned path as waiting for failback (`failback = manual` or a delay): it is then used
    /// only as a Standby candidate and reports Standby, "awaiting failback", until cleared.
    pub fn set_failback_pending(
        &mut self,
        path_id: PathId,
        pending: bool,
    ) -> Option<StatusTransition> {
        let Some(i) = self.path_index(path_id) else {
            debug_assert!(false, "set_failback_pending on unknown {path_id}");
            return None;
        };
        let policy = self.policy;
        let path = &mut self.paths[i];
        let (from, _) = path.reported_status(policy);
        path.failback_pending = pending;
        let (to, reason) = path.reported_status(policy);
        (from != to).then_some(StatusTransition {
            path_id,
            from,
            to,
            reason,
        })
    }

    /// Records whether the paths are safe to use together (it can change when a path reconnects with
    /// other NBD flags). When it becomes unsafe under a multipath policy, the policy falls back to
    /// Failover (the current active path becomes the only primary) and the old policy is returned.
    pub fn set_multi_path_safe(&mut self, safe: bool) -> Option<LoadBalancePolicy> {
        self.multi_path_safe = safe;
        if self.check_supported(self.policy).is_ok() {
            return None;
        }
        let old = self.policy;
        let keep = self.failover_active_path();
        for (i, p) in self.paths.iter_mut().enumerate() {
            p.primary = Some(i) == keep;
        }
        self.policy = LoadBalancePolicy::Failover;
        self.assert_invariants();
        Some(old)
    }

    /// The candidates for the data path: usable paths (oper Online, not administratively failed), each
    /// with its class, in the canonical order of [`SelectorSnapshot::new`].
    pub fn selector_snapshot(&self) -> SelectorSnapshot {
        let candidates = self
            .paths
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_usable())
            .map(|(index, p)| Candidate {
                index,
                path_id: p.id,
                weight: p.weight,
                primary: p.primary,
                class: p.candidate_class(self.policy),
                load: Arc::clone(&p.load),
            })
            .collect();
        SelectorSnapshot::new(self.policy, candidates)
    }

    // ---------------------------------------------------------------------------------------------
    // Persistence support (see `persist`)

    /// Sets one path's persisted fields without the Set rules (used by [`crate::persist::apply_state`],
    /// which re-validates afterwards).
    pub(crate) fn restore_path(
        &mut self,
        i: usize,
        primary: bool,
        weight: u32,
        admin: AdminStatus,
    ) {
        let path = &mut self.paths[i];
        path.primary = primary;
        path.weight = weight;
        path.admin = admin;
        sync_usable_flag(path);
    }

    /// Sets policy and primaries after a restore; the caller has made them consistent.
    pub(crate) fn restore_policy(&mut self, policy: LoadBalancePolicy, primary: &[bool]) {
        self.policy = policy;
        for (p, primary) in self.paths.iter_mut().zip(primary) {
            p.primary = *primary;
        }
        self.assert_invariants();
    }

    pub(crate) fn primaries_settled(
        &self,
        policy: LoadBalancePolicy,
        primary: &mut [bool],
    ) -> Result<(), VdsError> {
        self.check_supported(policy)?;
        self.settle_primaries(policy, primary)
    }

    fn assert_invariants(&self) {
        assert!(self.paths.len() <= PATHS_PER_LUN_MAX);
        assert!(
            self.paths.windows(2).all(|w| w[0].id < w[1].id),
            "paths sorted by unique id"
        );
        assert!(self.paths.iter().all(|p| p.id.source_id == self.source_id));
        assert!(self.get_supported_lb_policies().contains(self.policy));
        let primaries = self.paths.iter().filter(|p| p.primary).count();
        match self.policy {
            LoadBalancePolicy::Failover => assert!(primaries == 1 || self.paths.is_empty()),
            LoadBalancePolicy::RoundRobinWithSubset => {
                assert!(primaries >= 1 || self.paths.is_empty())
            }
            _ => {}
        }
    }
}

/// The `unusable` flag follows the control plane's view whenever the control plane changes it.
fn sync_usable_flag(path: &Path) {
    if path.is_usable() {
        path.load.mark_usable();
    } else {
        path.load.mark_unusable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{HbaPortSpeedFlags, HbaPortStatus, HbaPortType};

    const SOURCE: u64 = 0x10;

    fn config(id: u64, primary: bool, weight: u32) -> PathConfig {
        PathConfig {
            id,
            name: format!("p{id}"),
            uri: format!("nbd://10.0.{id}.10/lun0"),
            transport: Transport::Tcp,
            hw_type: HwProviderType::Unknown,
            endpoints: PathEndpoints::None,
            primary,
            weight,
        }
    }

    fn lun(policy: LoadBalancePolicy, paths: Vec<PathConfig>) -> LunMpio {
        let mut lun = LunMpio::new(LunConfig {
            name: "lun0".into(),
            source_id: SOURCE,
            policy,
            multi_path_safe: true,
            paths,
        })
        .unwrap();
        let ids: Vec<PathId> = lun.paths().iter().map(|p| p.id()).collect();
        for id in ids {
            lun.set_oper_status(id, OperStatus::Online);
        }
        lun
    }

    fn id(path: u64) -> PathId {
        PathId::new(SOURCE, path)
    }

    fn input(path: u64, primary: Option<bool>, weight: Option<u32>) -> PathPolicyInput {
        PathPolicyInput {
            path_id: id(path),
            primary,
            weight,
        }
    }

    fn statuses(lun: &LunMpio) -> Vec<PathStatus> {
        lun.get_path_info().iter().map(|i| i.status).collect()
    }

    fn primaries(lun: &LunMpio) -> Vec<bool> {
        lun.paths().iter().map(|p| p.primary()).collect()
    }

    fn code(result: Result<(), VdsError>) -> Hresult {
        result.err().map(|e| e.hresult).unwrap_or(Hresult::S_OK)
    }

    fn hba_config(id: u64, node: u64, port: u64) -> PathConfig {
        let mut c = config(id, false, 0);
        c.hw_type = HwProviderType::FibreChannel;
        c.transport = Transport::File;
        c.endpoints = PathEndpoints::Hba {
            controller_port_id: Guid::derive("controller-port", &id.to_string()),
            hba_port_id: Guid::NIL,
            hba_port: HbaPortProp {
                id: Guid::NIL,
                wwn_node: Wwn::from_u64(node),
                wwn_port: Wwn::from_u64(port),
                port_type: HbaPortType::NPort,
                status: HbaPortStatus::Online,
                port_speed: HbaPortSpeedFlags::GBIT_4,
                supported_port_speed: HbaPortSpeedFlags(0xf),
            },
        };
        c
    }

    fn net_config(id: u64, bind: &str) -> PathConfig {
        let mut c = config(id, false, 0);
        c.endpoints = PathEndpoints::Network {
            target_portal_id: Guid::derive("target-portal", &c.uri),
            initiator_adapter_id: Guid::derive("initiator-adapter", "tcp"),
            initiator: IpAddress::from_ip(bind.parse().unwrap(), 0),
        };
        c
    }

    #[test]
    fn new_validates_the_configuration() {
        let base = |paths, policy, safe| LunConfig {
            name: "l".into(),
            source_id: 1,
            policy,
            multi_path_safe: safe,
            paths,
        };
        let e = |r: Result<LunMpio, VdsError>| r.unwrap_err().hresult;
        let too_many = (0..65).map(|i| config(i, false, 0)).collect();
        assert_eq!(
            e(LunMpio::new(base(
                too_many,
                LoadBalancePolicy::RoundRobin,
                true
            ))),
            Hresult::E_INVALIDARG
        );
        let dup = vec![config(1, false, 0), config(1, false, 0)];
        assert_eq!(
            e(LunMpio::new(base(dup, LoadBalancePolicy::RoundRobin, true))),
            Hresult::E_INVALIDARG
        );
        let mut same_name = vec![config(1, false, 0), config(2, false, 0)];
        same_name[1].name = "p1".into();
        assert_eq!(
            e(LunMpio::new(base(
                same_name,
                LoadBalancePolicy::RoundRobin,
                true
            ))),
            Hresult::E_INVALIDARG
        );
        let mut hybrid = vec![config(1, false, 0)];
        hybrid[0].hw_type = HwProviderType::Hybrid;
        assert_eq!(
            e(LunMpio::new(base(
                hybrid,
                LoadBalancePolicy::RoundRobin,
                true
            ))),
            Hresult::E_INVALIDARG
        );
        let two_primaries = vec![config(1, true, 0), config(2, true, 0)];
        assert_eq!(
            e(LunMpio::new(base(
                two_primaries,
                LoadBalancePolicy::Failover,
                true
            ))),
            Hresult::E_INVALIDARG
        );
        let no_primary = vec![config(1, false, 0)];
        assert_eq!(
            e(LunMpio::new(base(
                no_primary,
                LoadBalancePolicy::RoundRobinWithSubset,
                true
            ))),
            Hresult::E_INVALIDARG
        );
        let unsafe_rr = vec![config(1, false, 0)];
        assert_eq!(
            e(LunMpio::new(base(
                unsafe_rr,
                LoadBalancePolicy::RoundRobin,
                false
            ))),
            Hresult::VDS_E_NOT_SUPPORTED
        );
        let mut bad_name = base(vec![], LoadBalancePolicy::RoundRobin, true);
        bad_name.name = String::new();
        assert_eq!(e(LunMpio::new(bad_name)), Hresult::E_INVALIDARG);
        // Failover without a primary: the lightest path becomes primary.
        let l = LunMpio::new(base(
            vec![config(1, false, 5), config(2, false, 1)],
            LoadBalancePolicy::Failover,
            false,
        ))
        .unwrap();
        assert_eq!(primaries(&l), [false, true]);
        // No paths at all is fine under every policy.
        assert!(LunMpio::new(base(vec![], LoadBalancePolicy::RoundRobinWithSubset, true)).is_ok());
    }

    #[test]
    fn paths_are_sorted_and_reported_unknown_before_connecting() {
        let l = LunMpio::new(LunConfig {
            name: "l".into(),
            source_id: SOURCE,
            policy: LoadBalancePolicy::RoundRobin,
            multi_path_safe: true,
            paths: vec![
                config(3, false, 0),
                config(1, false, 0),
                config(2, false, 0),
            ],
        })
        .unwrap();
        let info = l.get_path_info();
        assert_eq!(
            info.iter().map(|i| i.path_id.path_id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(
            info.iter()
                .all(|i| i.status == PathStatus::Unknown && i.status_reason == "connecting")
        );
        assert!(l.selector_snapshot().is_empty());
        assert!(l.paths().iter().all(|p| p.load().is_unusable()));
    }

    #[test]
    fn reported_status_rules() {
        let mut l = lun(
            LoadBalancePolicy::Failover,
            vec![config(1, true, 0), config(2, false, 0), config(3, false, 0)],
        );
        assert_eq!(
            statuses(&l),
            [PathStatus::Online, PathStatus::Standby, PathStatus::Standby]
        );
        assert_eq!(
            l.get_path_info()[1].status_reason,
            "not primary under failover"
        );
        let t = l
            .set_oper_status(
                id(1),
                OperStatus::Failed {
                    reason: "connection reset".into(),
                },
            )
            .unwrap();
        assert_eq!(
            (t.from, t.to, t.reason.as_str()),
            (PathStatus::Online, PathStatus::Failed, "connection reset")
        );
        assert!(l.paths()[0].load().is_unusable());
        // Same status again: no transition.
        assert!(
            l.set_oper_status(
                id(1),
                OperStatus::Failed {
                    reason: "refused".into()
                }
            )
            .is_none()
        );
        l.set_path_admin_status(id(2), PathStatus::Failed as i32)
            .unwrap();
        assert_eq!(
            l.get_path_info()[1].status_reason,
            "administratively failed"
        );
        l.set_path_admin_status(id(3), PathStatus::Standby as i32)
            .unwrap();
        assert_eq!(
            l.get_path_info()[2].status_reason,
            "administratively standby"
        );
        l.set_load_balance_policy(LoadBalancePolicy::RoundRobin as i32, &[])
            .unwrap();
        l.set_path_admin_status(id(3), PathStatus::Online as i32)
            .unwrap();
        l.set_oper_status(id(1), OperStatus::Online);
        assert_eq!(
            statuses(&l),
            [PathStatus::Online, PathStatus::Failed, PathStatus::Online]
        );
        l.set_failback_pending(id(1), true);
        assert_eq!(l.get_path_info()[0].status, PathStatus::Standby);
        assert_eq!(l.get_path_info()[0].status_reason, "awaiting failback");
        assert_eq!(
            l.selector_snapshot().class(CandidateClass::Standby).len(),
            1
        );
    }

    #[test]
    fn both_gets_agree() {
        let l = lun(
            LoadBalancePolicy::WeightedPaths,
            vec![config(9, false, 3), config(4, true, 1), config(6, false, 2)],
        );
        let info = l.get_path_info();
        let (policy, paths) = l.get_load_balance_policy();
        assert_eq!(policy, LoadBalancePolicy::WeightedPaths);
        assert_eq!(info.len(), paths.len());
        assert!(info.iter().zip(&paths).all(|(i, p)| i.path_id == p.path_id));
        assert_eq!(
            paths[0],
            PathPolicy {
                path_id: id(4),
                primary: true,
                weight: 1
            }
        );
    }

    #[test]
    fn supported_policies_follow_safety() {
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, false, 0), config(2, false, 5)],
        );
        assert_eq!(l.get_supported_lb_policies(), LbSupportFlags::ALL);
        assert_eq!(l.get_supported_lb_policies().policies().count(), 7);
        assert_eq!(
            l.set_multi_path_safe(false),
            Some(LoadBalancePolicy::RoundRobin)
        );
        assert_eq!(l.get_supported_lb_policies(), LbSupportFlags::FAILOVER);
        assert_eq!(l.policy(), LoadBalancePolicy::Failover);
        assert_eq!(primaries(&l), [true, false]);
        assert_eq!(
            code(l.set_load_balance_policy(LoadBalancePolicy::RoundRobin as i32, &[])),
            Hresult::VDS_E_NOT_SUPPORTED
        );
        assert_eq!(l.set_multi_path_safe(false), None);
        assert_eq!(l.set_multi_path_safe(true), None);
    }

    #[test]
    fn set_policy_argument_errors() {
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, false, 0), config(2, false, 0)],
        );
        for bad in [0, -1, 8, i32::MAX] {
            assert_eq!(
                code(l.set_load_balance_policy(bad, &[])),
                Hresult::E_INVALIDARG,
                "{bad}"
            );
        }
        let rr = LoadBalancePolicy::RoundRobin as i32;
        assert_eq!(
            code(l.set_load_balance_policy(rr, &[input(3, None, None)])),
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
        let wrong_source = PathPolicyInput {
            path_id: PathId::new(SOURCE + 1, 1),
            primary: None,
            weight: None,
        };
        assert_eq!(
            code(l.set_load_balance_policy(rr, &[wrong_source])),
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
        let twice = [input(1, Some(true), None), input(1, None, Some(3))];
        assert_eq!(
            code(l.set_load_balance_policy(rr, &twice)),
            Hresult::E_INVALIDARG
        );
        // The first offending record decides.
        assert_eq!(
            code(l.set_load_balance_policy(
                rr,
                &[
                    input(1, None, None),
                    input(1, None, None),
                    input(7, None, None)
                ]
            )),
            Hresult::E_INVALIDARG
        );
        assert_eq!(
            code(l.set_load_balance_policy(
                rr,
                &[
                    input(7, None, None),
                    input(1, None, None),
                    input(1, None, None)
                ]
            )),
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
        // Raw counts.
        assert_eq!(
            code(l.set_load_balance_policy_raw(rr, &[], -1)),
            Hresult::E_INVALIDARG
        );
        assert_eq!(
            code(l.set_load_balance_policy_raw(rr, &[input(1, None, None)], 2)),
            Hresult::E_INVALIDARG
        );
        assert_eq!(
            code(l.set_load_balance_policy_raw(rr, &[input(1, None, Some(4))], 1)),
            Hresult::S_OK
        );
        assert_eq!(l.paths()[0].weight(), 4);
    }

    #[test]
    fn set_policy_merges_unlisted_paths() {
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, true, 7), config(2, false, 8), config(3, true, 9)],
        );
        l.set_load_balance_policy(
            LoadBalancePolicy::WeightedPaths as i32,
            &[input(2, Some(true), Some(1))],
        )
        .unwrap();
        let (_, paths) = l.get_load_balance_policy();
        assert_eq!(
            paths
                .iter()
                .map(|p| (p.primary, p.weight))
                .collect::<Vec<_>>(),
            [(true, 7), (true, 1), (true, 9)]
        );
        l.set_load_balance_policy(
            LoadBalancePolicy::WeightedPaths as i32,
            &[input(2, None, None)],
        )
        .unwrap();
        assert_eq!(l.get_load_balance_policy().1[1].weight, 1);
    }

    #[test]
    fn failover_primary_rules() {
        let fo = LoadBalancePolicy::Failover as i32;
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, true, 0), config(2, true, 0), config(3, false, 0)],
        );
        // Two primaries after merging (both unlisted): refused, nothing changed.
        assert_eq!(
            code(l.set_load_balance_policy(fo, &[])),
            Hresult::E_INVALIDARG
        );
        assert_eq!(l.policy(), LoadBalancePolicy::RoundRobin);
        // Two listed as primary.
        let two = [
            input(1, Some(true), None),
            input(2, Some(true), None),
            input(3, Some(false), None),
        ];
        assert_eq!(
            code(l.set_load_balance_policy(fo, &two)),
            Hresult::E_INVALIDARG
        );
        // One primary.
        l.set_load_balance_policy(fo, &[input(2, Some(false), None)])
            .unwrap();
        assert_eq!(primaries(&l), [true, false, false]);
        // Moving the primary by naming another one and clearing the old.
        l.set_load_balance_policy(
            fo,
            &[input(1, Some(false), None), input(3, Some(true), None)],
        )
        .unwrap();
        assert_eq!(primaries(&l), [false, false, true]);
        // No primary named: clearing the only primary keeps the current active path.
        l.set_load_balance_policy(fo, &[input(3, Some(false), None)])
            .unwrap();
        assert_eq!(primaries(&l), [false, false, true]);
    }

    #[test]
    fn failover_without_primary_takes_the_path_in_use() {
        let fo = LoadBalancePolicy::Failover as i32;
        // Current policy RR, no primaries, path 1 failed: the first usable by (weight, id) is path 3.
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![
                config(1, false, 0),
                config(2, false, 5),
                config(3, false, 2),
            ],
        );
        l.set_oper_status(
            id(1),
            OperStatus::Failed {
                reason: "reset".into(),
            },
        );
        l.set_load_balance_policy(fo, &[]).unwrap();
        assert_eq!(primaries(&l), [false, false, true]);
        // Under failover with the primary failed, clearing it moves the primary to the stand-in in use.
        l.set_oper_status(id(1), OperStatus::Online);
        l.set_load_balance_policy(
            fo,
            &[input(1, Some(true), None), input(3, Some(false), None)],
        )
        .unwrap();
        l.set_oper_status(
            id(1),
            OperStatus::Failed {
                reason: "reset".into(),
            },
        );
        let active = l.selector_snapshot().candidates()[0].path_id;
        assert_eq!(active, id(3));
        l.set_load_balance_policy(fo, &[input(1, Some(false), None)])
            .unwrap();
        assert_eq!(primaries(&l), [false, false, true]);
        // Weights named in the same call do not change which path is in use now.
        l.set_load_balance_policy(fo, &[input(3, Some(false), Some(100))])
            .unwrap();
        assert_eq!(primaries(&l), [false, false, true]);
        assert_eq!(l.paths()[2].weight(), 100);
    }

    #[test]
    fn round_robin_with_subset_needs_a_primary() {
        let rrws = LoadBalancePolicy::RoundRobinWithSubset as i32;
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, false, 0), config(2, false, 0)],
        );
        assert_eq!(
            code(l.set_load_balance_policy(rrws, &[])),
            Hresult::E_INVALIDARG
        );
        l.set_load_balance_policy(rrws, &[input(2, Some(true), None)])
            .unwrap();
        assert_eq!(statuses(&l), [PathStatus::Standby, PathStatus::Online]);
        assert_eq!(
            code(l.set_load_balance_policy(rrws, &[input(2, Some(false), None)])),
            Hresult::E_INVALIDARG
        );
        assert_eq!(primaries(&l), [false, true]);
    }

    #[test]
    fn admin_status_errors_and_last_path() {
        let mut l = lun(LoadBalancePolicy::RoundRobin, vec![config(1, false, 0)]);
        for bad in [0, 2, 6, -1, 8] {
            assert_eq!(
                l.set_path_admin_status(id(1), bad).unwrap_err().hresult,
                Hresult::E_INVALIDARG,
                "{bad}"
            );
        }
        assert_eq!(
            l.set_path_admin_status(id(2), 5).unwrap_err().hresult,
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
        assert_eq!(
            l.set_path_admin_status(PathId::new(0, 1), 5)
                .unwrap_err()
                .hresult,
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
        // The admin may fail the last path: an explicit single-path request.
        let t = l.set_path_admin_status(id(1), 5).unwrap().unwrap();
        assert_eq!((t.from, t.to), (PathStatus::Online, PathStatus::Failed));
        assert!(l.selector_snapshot().is_empty());
        assert!(l.paths()[0].load().is_unusable());
        assert!(l.set_path_admin_status(id(1), 5).unwrap().is_none());
        l.set_path_admin_status(id(1), 1).unwrap();
        assert_eq!(l.selector_snapshot().candidates().len(), 1);
        assert!(!l.paths()[0].load().is_unusable());
        // Clearing the admin state does not revive an operationally failed path.
        l.set_oper_status(
            id(1),
            OperStatus::Failed {
                reason: "eof".into(),
            },
        );
        l.set_path_admin_status(id(1), 7).unwrap();
        l.set_path_admin_status(id(1), 1).unwrap();
        assert!(l.paths()[0].load().is_unusable());
    }

    #[test]
    fn snapshot_classes() {
        let mut l = lun(
            LoadBalancePolicy::Failover,
            vec![
                config(1, true, 0),
                config(2, false, 9),
                config(3, false, 1),
                config(4, false, 0),
            ],
        );
        l.set_path_admin_status(id(4), 7).unwrap();
        let snap = l.selector_snapshot();
        let order: Vec<(u64, CandidateClass)> = snap
            .candidates()
            .iter()
            .map(|c| (c.path_id.path_id, c.class))
            .collect();
        assert_eq!(
            order,
            [
                (1, CandidateClass::Active),
                (3, CandidateClass::Standby),
                (2, CandidateClass::Standby),
                (4, CandidateClass::AdminStandby)
            ]
        );
        // An admin-standby primary is used after the policy standbys.
        l.set_path_admin_status(id(1), 7).unwrap();
        let snap = l.selector_snapshot();
        assert_eq!(snap.candidates()[0].path_id, id(3));
        assert_eq!(snap.class(CandidateClass::AdminStandby).len(), 2);
        assert_eq!(
            snap.candidates()[snap.candidates().len() - 2].path_id,
            id(1)
        );
    }

    #[test]
    fn hba_port_by_wwn() {
        let (node, port_a, port_b) = (
            0x2000_0000_0000_0001,
            0x2100_0000_0000_000a,
            0x2100_0000_0000_000b,
        );
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![
                hba_config(1, node, port_a),
                hba_config(2, node, port_a),
                hba_config(3, node, port_b),
            ],
        );
        let port = HbaPortMatch::Wwn {
            node: Wwn::from_u64(node),
            port: Wwn::from_u64(port_a),
        };
        assert_eq!(
            l.set_hba_port_statuses(&port, 0).unwrap_err().hresult,
            Hresult::E_INVALIDARG
        );
        assert_eq!(
            l.set_hba_port_statuses(&port, 3).unwrap_err().hresult,
            Hresult::E_INVALIDARG
        );
        let outcome = l.set_hba_port_statuses(&port, 5).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 2, 0)
        );
        assert_eq!(outcome.transitions.len(), 2);
        assert_eq!(
            statuses(&l),
            [PathStatus::Failed, PathStatus::Failed, PathStatus::Online]
        );
        // Again: matched, nothing to change.
        let outcome = l.set_hba_port_statuses(&port, 5).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 0, 0)
        );
        // Failing port B would leave no usable path: skipped.
        let port_b_match = HbaPortMatch::Wwn {
            node: Wwn::from_u64(node),
            port: Wwn::from_u64(port_b),
        };
        let outcome = l.set_hba_port_statuses(&port_b_match, 5).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (1, 0, 1)
        );
        assert_eq!(
            aggregate_hba_outcomes([outcome]).unwrap(),
            Hresult::VDS_S_STATUSES_INCOMPLETELY_SET
        );
        // Online clears.
        let outcome = l.set_hba_port_statuses(&port, 1).unwrap();
        assert_eq!((outcome.matched, outcome.changed), (2, 2));
        assert_eq!(statuses(&l), [PathStatus::Online; 3]);
        // A port nobody uses.
        let nobody = HbaPortMatch::Wwn {
            node: Wwn::from_u64(1),
            port: Wwn::from_u64(2),
        };
        let outcome = l.set_hba_port_statuses(&nobody, 5).unwrap();
        assert_eq!(outcome.matched, 0);
        assert_eq!(
            aggregate_hba_outcomes([outcome]).unwrap_err().hresult,
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
    }

    /// Reinstating a port whose paths the policy keeps on standby (backups under Failover), or whose
    /// connection is down, sets what it can and says so: VDS_S_STATUSES_INCOMPLETELY_SET, as Microsoft
    /// documents for a status that conflicts with the load-balance policy.
    #[test]
    fn hba_port_online_that_the_policy_or_the_connection_overrides_is_incomplete() {
        let (node, port_a, port_b) = (0x2000_0000_0000_0001, 0xa, 0xb);
        let mut primary = hba_config(1, node, port_b);
        primary.primary = true;
        let mut l = lun(
            LoadBalancePolicy::Failover,
            vec![
                primary,
                hba_config(2, node, port_a),
                hba_config(3, node, port_a),
            ],
        );
        let port = HbaPortMatch::Wwn {
            node: Wwn::from_u64(node),
            port: Wwn::from_u64(port_a),
        };
        assert_eq!(
            statuses(&l),
            [PathStatus::Online, PathStatus::Standby, PathStatus::Standby]
        );
        let outcome = l.set_hba_port_statuses(&port, 1).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.incomplete),
            (2, 0, 2)
        );
        assert_eq!(
            aggregate_hba_outcomes([outcome]).unwrap(),
            Hresult::VDS_S_STATUSES_INCOMPLETELY_SET
        );
        // Failing them is exactly what was asked: complete.
        let outcome = l.set_hba_port_statuses(&port, 5).unwrap();
        assert_eq!(aggregate_hba_outcomes([outcome]).unwrap(), Hresult::S_OK);
        // Under Round Robin they come back Online: complete again, unless a connection is down.
        l.set_load_balance_policy(LoadBalancePolicy::RoundRobin as i32, &[])
            .unwrap();
        let id3 = l.paths()[2].id();
        l.set_oper_status(
            id3,
            OperStatus::Failed {
                reason: "connection refused".into(),
            },
        );
        let outcome = l.set_hba_port_statuses(&port, 1).unwrap();
        assert_eq!((outcome.changed, outcome.incomplete), (2, 1));
        assert_eq!(
            aggregate_hba_outcomes([outcome]).unwrap(),
            Hresult::VDS_S_STATUSES_INCOMPLETELY_SET
        );
    }

    #[test]
    fn hba_port_failing_all_paths_of_one_port_keeps_the_last() {
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![hba_config(1, 1, 2), hba_config(2, 1, 2)],
        );
        let port = HbaPortMatch::Wwn {
            node: Wwn::from_u64(1),
            port: Wwn::from_u64(2),
        };
        let outcome = l.set_hba_port_statuses(&port, 5).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 1, 1)
        );
        assert_eq!(statuses(&l), [PathStatus::Failed, PathStatus::Online]);
    }

    #[test]
    fn hba_port_standby_rules() {
        let port = HbaPortMatch::Initiator("10.0.2.5".parse().unwrap());
        // Failover: standby on the primary is skipped, on a non-primary applied.
        let mut paths = vec![
            net_config(1, "10.0.2.5"),
            net_config(2, "10.0.2.5"),
            net_config(3, "10.0.1.5"),
        ];
        paths[0].primary = true;
        let mut l = lun(LoadBalancePolicy::Failover, paths);
        let outcome = l.set_hba_port_statuses(&port, 7).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 1, 1)
        );
        assert_eq!(l.paths()[0].admin_status(), AdminStatus::None);
        assert_eq!(l.paths()[1].admin_status(), AdminStatus::Standby);
        // Online clears; the non-primary still reports Standby under Failover and that is not a skip.
        let outcome = l.set_hba_port_statuses(&port, 1).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 1, 0)
        );
        assert!(outcome.transitions.is_empty());
        assert_eq!(
            statuses(&l),
            [PathStatus::Online, PathStatus::Standby, PathStatus::Standby]
        );

        // RRWS: two primaries on the port, one elsewhere: both may go standby.
        let mut paths = vec![
            net_config(1, "10.0.2.5"),
            net_config(2, "10.0.2.5"),
            net_config(3, "10.0.1.5"),
        ];
        for p in paths.iter_mut() {
            p.primary = true;
        }
        let mut l = lun(LoadBalancePolicy::RoundRobinWithSubset, paths);
        let outcome = l.set_hba_port_statuses(&port, 7).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 2, 0)
        );
        // The remaining primary fails: now the last of the port's primaries cannot go standby... they
        // already are; clear and retry: the second one is skipped.
        l.set_hba_port_statuses(&port, 1).unwrap();
        l.set_oper_status(
            id(3),
            OperStatus::Failed {
                reason: "reset".into(),
            },
        );
        let outcome = l.set_hba_port_statuses(&port, 7).unwrap();
        assert_eq!(
            (outcome.matched, outcome.changed, outcome.skipped),
            (2, 1, 1)
        );
        // Under round robin (no primaries), standby is always allowed.
        l.set_load_balance_policy(LoadBalancePolicy::RoundRobin as i32, &[])
            .unwrap();
        let outcome = l.set_hba_port_statuses(&port, 7).unwrap();
        assert_eq!((outcome.changed, outcome.skipped), (1, 0));
        // IPv6 initiator that nobody has.
        let outcome = l
            .set_hba_port_statuses(&HbaPortMatch::Initiator("::1".parse().unwrap()), 7)
            .unwrap();
        assert_eq!(outcome.matched, 0);
    }

    #[test]
    fn path_lookup() {
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, false, 0), config(0x2a, false, 0)],
        );
        assert_eq!(l.resolve_path("p42").unwrap(), id(0x2a));
        assert_eq!(l.resolve_path("0x2a").unwrap(), id(0x2a));
        assert_eq!(l.resolve_path("1").unwrap(), id(1));
        assert_eq!(
            l.resolve_path("p3").unwrap_err().hresult,
            Hresult::VDS_E_OBJECT_NOT_FOUND
        );
        assert_eq!(l.path_by_name("p1").unwrap().id(), id(1));
        assert!(l.path(PathId::new(SOURCE + 1, 1)).is_none());
        let p = l.path_mut(id(1)).unwrap();
        assert_eq!(
            p.set_hw_type(HwProviderType::Hybrid).unwrap_err().hresult,
            Hresult::E_INVALIDARG
        );
        p.set_hw_type(HwProviderType::Iscsi).unwrap();
        p.set_endpoints(PathEndpoints::None);
        assert_eq!(l.get_path_info()[0].hw_type, HwProviderType::Iscsi);
    }

    #[test]
    fn transitions_between_infos() {
        let mut l = lun(
            LoadBalancePolicy::RoundRobin,
            vec![config(1, true, 0), config(2, false, 0)],
        );
        let before = l.get_path_info();
        l.set_load_balance_policy(LoadBalancePolicy::Failover as i32, &[])
            .unwrap();
        let after = l.get_path_info();
        let t = status_transitions(&before, &after);
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].path_id, t[0].from, t[0].to),
            (id(2), PathStatus::Online, PathStatus::Standby)
        );
    }
}
