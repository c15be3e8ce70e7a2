//! The result of every method, typed, with the wire names of the management interface
//! (docs/MANAGEMENT.md). Enum values travel as their numbers with the VDS constant's name beside them
//! (`"status": 1, "statusName": "VDS_MPS_ONLINE"`).
//!
//! VDS enums are open: a newer daemon may report a value an older client does not know, and the C ABI
//! passes such values through. So the numbers are kept as `i32` here, and each has an accessor that
//! gives the typed value when it is one this build knows.

use lunmpio_vds::{
    Guid, HbaPortProp, HwProviderType, IpAddress, LbSupportFlags, LoadBalancePolicy, PathEndpoints,
    PathId, PathPolicy, PathStatus, Wwn,
};
use serde::{Deserialize, Serialize};

/// The result of the Set methods (SetLoadBalancePolicy, SetPathStatus): `{}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Done {}

/// GetPathInfo: `{"paths": [PathInfo]}`, in path-id order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathInfoList {
    pub paths: Vec<PathInfo>,
}

/// One path of GetPathInfo: `VDS_PATH_INFO` plus lunmpio's name, URI, transport and reason. The far
/// and near ends appear as the interconnect has them: network paths carry `targetPortalId`,
/// `initiatorAdapterId` and `initiatorPortalIpAddr`; HBA paths `controllerPortId`, `hbaPortId` and
/// `hbaPortProp`; paths with neither carry none of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    pub path_id: PathId,
    #[serde(rename = "type")]
    pub hw_type: i32,
    #[serde(default)]
    pub type_name: String,
    pub status: i32,
    #[serde(default)]
    pub status_name: String,
    #[serde(default)]
    pub status_reason: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub transport: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_portal_id: Option<Guid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_adapter_id: Option<Guid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_portal_ip_addr: Option<IpAddressInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_port_id: Option<Guid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hba_port_id: Option<Guid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hba_port_prop: Option<HbaPortInfo>,
}

impl PathInfo {
    pub fn status(&self) -> Option<PathStatus> {
        PathStatus::try_from(self.status).ok()
    }

    pub fn hw_type(&self) -> Option<HwProviderType> {
        HwProviderType::try_from(self.hw_type).ok()
    }
}

impl From<&lunmpio_vds::PathInfo> for PathInfo {
    fn from(info: &lunmpio_vds::PathInfo) -> PathInfo {
        let mut out = PathInfo {
            path_id: info.path_id,
            hw_type: info.hw_type as i32,
            type_name: info.hw_type.vds_name().to_owned(),
            status: info.status as i32,
            status_name: info.status.vds_name().to_owned(),
            status_reason: info.status_reason.clone(),
            name: info.name.clone(),
            uri: info.uri.clone(),
            transport: info.transport.name().to_owned(),
            target_portal_id: None,
            initiator_adapter_id: None,
            initiator_portal_ip_addr: None,
            controller_port_id: None,
            hba_port_id: None,
            hba_port_prop: None,
        };
        match &info.endpoints {
            PathEndpoints::Network {
                target_portal_id,
                initiator_adapter_id,
                initiator,
            } => {
                out.target_portal_id = Some(*target_portal_id);
                out.initiator_adapter_id = Some(*initiator_adapter_id);
                out.initiator_portal_ip_addr = Some(IpAddressInfo::from(initiator));
            }
            PathEndpoints::Hba {
                controller_port_id,
                hba_port_id,
                hba_port,
            } => {
                out.controller_port_id = Some(*controller_port_id);
                out.hba_port_id = Some(*hba_port_id);
                out.hba_port_prop = Some(HbaPortInfo::from(hba_port));
            }
            PathEndpoints::None => {}
        }
        out
    }
}

/// `VDS_IPADDRESS` on the wire: `{"type", "typeName", "address", "port"}` (IPv6 flow info and scope
/// id, which lunmpio never sets, are accepted on input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressInfo {
    #[serde(rename = "type")]
    pub address_type: i32,
    #[serde(default)]
    pub type_name: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub port: u32,
    #[serde(default, skip_serializing)]
    pub flow_info: u32,
    #[serde(default, skip_serializing)]
    pub scope_id: u32,
}

impl From<&IpAddress> for IpAddressInfo {
    fn from(ip: &IpAddress) -> IpAddressInfo {
        IpAddressInfo {
            address_type: ip.address_type() as i32,
            type_name: ip.address_type().vds_name().to_owned(),
            address: ip.address_text(),
            port: ip.port,
            flow_info: 0,
            scope_id: 0,
        }
    }
}

/// `VDS_HBAPORT_PROP` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HbaPortInfo {
    /// `GUID_NULL` when the port is not known.
    #[serde(default)]
    pub id: Guid,
    pub wwn_node: Wwn,
    pub wwn_port: Wwn,
    #[serde(rename = "type")]
    pub port_type: i32,
    #[serde(default)]
    pub type_name: String,
    pub status: i32,
    #[serde(default)]
    pub status_name: String,
    #[serde(default)]
    pub port_speed: u32,
    #[serde(default)]
    pub supported_port_speed: u32,
}

impl From<&HbaPortProp> for HbaPortInfo {
    fn from(port: &HbaPortProp) -> HbaPortInfo {
        HbaPortInfo {
            id: port.id,
            wwn_node: port.wwn_node,
            wwn_port: port.wwn_port,
            port_type: port.port_type as i32,
            type_name: port.port_type.vds_name().to_owned(),
            status: port.status as i32,
            status_name: port.status.vds_name().to_owned(),
            port_speed: port.port_speed.0,
            supported_port_speed: port.supported_port_speed.0,
        }
    }
}

/// GetLoadBalancePolicy: the policy and every path's primary flag and weight, in path-id order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancePolicyInfo {
    pub policy: i32,
    #[serde(default)]
    pub policy_name: String,
    #[serde(default)]
    pub paths: Vec<PathPolicy>,
}

impl LoadBalancePolicyInfo {
    pub fn new(policy: LoadBalancePolicy, paths: Vec<PathPolicy>) -> LoadBalancePolicyInfo {
        LoadBalancePolicyInfo {
            policy: policy as i32,
            policy_name: policy.vds_name().to_owned(),
            paths,
        }
    }

    pub fn policy(&self) -> Option<LoadBalancePolicy> {
        LoadBalancePolicy::try_from(self.policy).ok()
    }
}

/// GetSupportedLbPolicies: the `VDS_PROVIDER_LBSUPPORT_FLAG` mask and the policies it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupportedLbPolicies {
    pub flags: u32,
    #[serde(default)]
    pub policies: Vec<SupportedPolicy>,
}

impl From<LbSupportFlags> for SupportedLbPolicies {
    fn from(flags: LbSupportFlags) -> SupportedLbPolicies {
        SupportedLbPolicies {
            flags: flags.0,
            policies: flags
                .policies()
                .map(|policy| SupportedPolicy {
                    policy: policy as i32,
                    policy_name: policy.vds_name().to_owned(),
                    name: policy.config_name().to_owned(),
                })
                .collect(),
        }
    }
}

/// One supported policy: its number, VDS name and config name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedPolicy {
    pub policy: i32,
    pub policy_name: String,
    pub name: String,
}

/// SetAllPathStatusesFromHbaPort: the HRESULT of success (`S_OK`, or
/// `VDS_S_STATUSES_INCOMPLETELY_SET` when a path set as asked still reports otherwise) and counts
/// over every LUN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HbaPortResult {
    pub hresult: i32,
    #[serde(default)]
    pub hresult_name: String,
    /// Paths that originate at the port.
    #[serde(default)]
    pub matched: u32,
    /// Paths whose administrative state changed.
    #[serde(default)]
    pub changed: u32,
    /// Paths left alone because the change would break their LUN's policy.
    #[serde(default)]
    pub skipped: u32,
    /// Paths set as asked that still report another status.
    #[serde(default)]
    pub incomplete: u32,
}

impl HbaPortResult {
    pub fn hresult(&self) -> lunmpio_vds::Hresult {
        lunmpio_vds::Hresult(self.hresult)
    }
}

/// ListLuns: `{"luns": [LunSummary]}`, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunList {
    pub luns: Vec<LunSummary>,
}

/// One LUN of ListLuns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LunSummary {
    pub name: String,
    #[serde(with = "lunmpio_vds::types::id64")]
    pub source_id: u64,
    /// Bytes.
    pub size: u64,
    pub policy: i32,
    #[serde(default)]
    pub policy_name: String,
    #[serde(default)]
    pub policy_config_name: String,
    /// Paths configured.
    pub paths: usize,
    /// Paths that can carry I/O now.
    pub usable_paths: usize,
}

impl LunSummary {
    pub fn policy(&self) -> Option<LoadBalancePolicy> {
        LoadBalancePolicy::try_from(self.policy).ok()
    }
}

/// GetStatistics: per-path counters (cumulative since the daemon started) and the LUN's queue and
/// in-doubt counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Statistics {
    pub paths: Vec<PathStats>,
    /// I/Os waiting for a usable path.
    pub queued_ios: u64,
    pub queued_bytes: u64,
    /// Writes whose outcome on a lost path is not known yet.
    pub in_doubt_writes: u64,
    pub in_doubt_writes_total: u64,
    pub in_doubt_answered_total: u64,
    pub in_doubt_fenced_total: u64,
    pub in_doubt_expired_total: u64,
    pub fences_ok_total: u64,
    pub fences_failed_total: u64,
}

/// One path of GetStatistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathStats {
    pub path_id: PathId,
    pub name: String,
    pub status: i32,
    #[serde(default)]
    pub status_name: String,
    pub reads: u64,
    pub writes: u64,
    /// Every command, not only reads and writes.
    pub ios: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
    pub in_flight: u64,
    pub in_flight_bytes: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    /// Times I/O was failed away from this path.
    pub failovers: u64,
    /// The path's current I/O timeout.
    pub timeout_ms: u64,
}

impl PathStats {
    pub fn status(&self) -> Option<PathStatus> {
        PathStatus::try_from(self.status).ok()
    }
}

/// GetEvents: `{"events": [EventRecord]}`, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventList {
    pub events: Vec<EventRecord>,
}

/// One event: a path's status change (`from`/`to`) or a LUN-wide event (no path, no statuses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRecord {
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub lun: String,
    pub path_id: Option<PathId>,
    /// The path's name.
    pub path: Option<String>,
    pub from: Option<i32>,
    pub from_name: Option<String>,
    pub to: Option<i32>,
    pub to_name: Option<String>,
    pub cause: String,
}

impl EventRecord {
    /// An event with its statuses' names filled in.
    pub fn new(
        seq: u64,
        time: String,
        lun: String,
        (path_id, path): (Option<PathId>, Option<String>),
        change: (Option<PathStatus>, Option<PathStatus>),
        cause: String,
    ) -> EventRecord {
        EventRecord {
            seq,
            time,
            lun,
            path_id,
            path,
            from: change.0.map(|s| s as i32),
            from_name: change.0.map(|s| s.vds_name().to_owned()),
            to: change.1.map(|s| s as i32),
            to_name: change.1.map(|s| s.vds_name().to_owned()),
            cause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lunmpio_vds::{
        HbaPortSpeedFlags, HbaPortStatus, HbaPortType, IpAddress, PathEndpoints, Transport,
    };
    use serde_json::json;

    fn vds_path(hw_type: HwProviderType, endpoints: PathEndpoints) -> lunmpio_vds::PathInfo {
        lunmpio_vds::PathInfo {
            path_id: PathId::new(1, 2),
            hw_type,
            status: PathStatus::Online,
            status_reason: String::new(),
            name: "a".into(),
            uri: "file:///dev/sdb".into(),
            transport: Transport::File,
            endpoints,
        }
    }

    #[test]
    fn path_info_has_the_arm_of_its_interconnect_and_round_trips() {
        let hba = vds_path(
            HwProviderType::FibreChannel,
            PathEndpoints::Hba {
                controller_port_id: Guid::derive("controller-port", "x"),
                hba_port_id: Guid::derive("hba-port", "y"),
                hba_port: HbaPortProp {
                    id: Guid::derive("hba-port", "y"),
                    wwn_node: Wwn::from_u64(1),
                    wwn_port: Wwn::from_u64(2),
                    port_type: HbaPortType::NPort,
                    status: HbaPortStatus::Online,
                    port_speed: HbaPortSpeedFlags::GBIT_4,
                    supported_port_speed: HbaPortSpeedFlags::GBIT_4,
                },
            },
        );
        let wire = PathInfo::from(&hba);
        let json = serde_json::to_value(&wire).unwrap();
        assert_eq!(json["typeName"], "VDS_HWT_FIBRE_CHANNEL");
        assert_eq!(json["statusName"], "VDS_MPS_ONLINE");
        assert_eq!(json["pathId"]["pathId"], "0x0000000000000002");
        assert_eq!(json["hbaPortProp"]["wwnPort"], "00:00:00:00:00:00:00:02");
        assert_eq!(json["hbaPortProp"]["portSpeed"], 8);
        assert_eq!(json["hbaPortProp"]["id"], json["hbaPortId"]);
        assert!(json.get("initiatorPortalIpAddr").is_none());
        assert_eq!(serde_json::from_value::<PathInfo>(json).unwrap(), wire);
        assert_eq!(wire.status(), Some(PathStatus::Online));

        let net = vds_path(
            HwProviderType::Iscsi,
            PathEndpoints::Network {
                target_portal_id: Guid::derive("target-portal", "t"),
                initiator_adapter_id: Guid::derive("initiator-adapter", "i"),
                initiator: IpAddress::from_ip("10.0.2.5".parse().unwrap(), 0),
            },
        );
        let json = serde_json::to_value(PathInfo::from(&net)).unwrap();
        assert_eq!(json["initiatorPortalIpAddr"]["address"], "10.0.2.5");
        assert_eq!(json["initiatorPortalIpAddr"]["type"], 1);
        assert_eq!(json["initiatorPortalIpAddr"]["typeName"], "VDS_IPT_IPV4");
        assert!(json.get("hbaPortProp").is_none());
        assert!(json.get("flowInfo").is_none());

        let none = serde_json::to_value(PathInfo::from(&vds_path(
            HwProviderType::Unknown,
            PathEndpoints::None,
        )))
        .unwrap();
        let keys: Vec<&str> = none
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "name",
                "pathId",
                "status",
                "statusName",
                "statusReason",
                "transport",
                "type",
                "typeName",
                "uri"
            ]
        );
    }

    #[test]
    fn values_this_build_does_not_know_pass_through() {
        let json = json!({"pathId": {"sourceId": 1, "pathId": 2}, "type": 99, "status": 42});
        let info: PathInfo = serde_json::from_value(json).unwrap();
        assert_eq!((info.hw_type, info.status), (99, 42));
        assert_eq!((info.hw_type(), info.status()), (None, None));
    }

    #[test]
    fn policies_and_events_carry_names_beside_numbers() {
        let p = LoadBalancePolicyInfo::new(LoadBalancePolicy::WeightedPaths, vec![]);
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"policy": 5, "policyName": "VDS_LBP_WEIGHTED_PATHS", "paths": []})
        );
        let s = SupportedLbPolicies::from(LbSupportFlags::FAILOVER);
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"flags": 1, "policies": [{"policy": 1, "policyName": "VDS_LBP_FAILOVER", "name": "failover"}]})
        );
        let e = EventRecord::new(
            3,
            "t".into(),
            "lun0".into(),
            (None, None),
            (None, None),
            "policy changed".into(),
        );
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v["from"],
            json!(null),
            "absent statuses are null, not missing"
        );
        assert_eq!(v["pathId"], json!(null));
        assert_eq!(serde_json::from_value::<EventRecord>(v).unwrap(), e);
    }
}

/// GetDaemonInfo: who is serving, since when, and what changed it since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonInfo {
    /// The running program's version (`lunmpio --version`).
    pub version: String,
    pub pid: u32,
    /// The program file the daemon runs (an upgrade runs this path again).
    pub program: String,
    /// The config file a reload reads ("" when the daemon was not started from a file).
    pub config: String,
    /// When this daemon started (RFC 3339), kept across upgrades.
    pub started_at: String,
    pub upgrades: u64,
    /// RFC 3339, or null before the first upgrade.
    pub last_upgrade_at: Option<String>,
    /// Why the last upgrade failed after the handover began (the old program took over again), or
    /// null. Earlier failures are the Upgrade call's own error.
    #[serde(default)]
    pub last_upgrade_error: Option<String>,
    /// Upgrades that failed after their handover began.
    #[serde(default)]
    pub upgrades_failed: u64,
    pub reloads: u64,
    pub last_reload_at: Option<String>,
    /// LUNs served now.
    pub luns: usize,
}

/// Reload: what the new config changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadResult {
    /// LUNs started and exported.
    pub added: Vec<String>,
    /// LUNs whose connections drained and closed, and that stopped.
    pub removed: Vec<String>,
    /// LUNs restarted under their export (paths or settings changed); their clients saw a pause.
    pub restarted: Vec<String>,
    pub unchanged: usize,
    /// `[daemon]` keys that changed in the file: they need a restart or an upgrade.
    pub not_applied: Vec<String>,
    /// LUNs whose change failed; each runs as before (an added one is not running).
    pub failed: Vec<ReloadFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadFailure {
    pub lun: String,
    pub reason: String,
}

/// Upgrade: the handover has begun. Every export is quiet and held, and the daemon is about to run
/// `program`. Poll GetDaemonInfo: `upgrades` goes up once the new program serves, or
/// `lastUpgradeError` says why the old one took over again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStarted {
    pub program: String,
    /// What `program upgrade-check` reported.
    pub to_version: String,
    pub from_version: String,
    pub pid: u32,
    /// Upgrades before this one, and failed ones.
    pub upgrades: u64,
    pub upgrades_failed: u64,
    /// Export connections handed over.
    pub connections: usize,
    /// How long the exports took to become quiet.
    pub quiesce_ms: u64,
}
