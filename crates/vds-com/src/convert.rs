//! The daemon's typed answers (`lunmpio_rpc::results`) ↔ the C structures, in safe Rust.
//!
//! Decoding the JSON is the typed client's work (an answer without the documented shape is
//! `ClientError::BadResult`, which the C ABI reports as `VDS_E_BAD_PROVIDER_DATA`). Here the typed
//! results become C structures: VDS enums are open, so values this crate does not know pass through
//! as numbers. What the C structures cannot represent (a text address longer than 256 UTF-16 units,
//! both union arms at once) is a [`BadData`] error, reported the same way.

use std::net::{Ipv4Addr, Ipv6Addr};

use lunmpio_rpc::{
    HbaPortInfo, HbaPortParam, LoadBalancePolicyInfo, PathInfoList, PathPolicyParam, PolicyValue,
    SetLoadBalancePolicyParams,
};
use lunmpio_vds::{Guid as VdsGuid, Wwn};

use crate::abi::{
    Guid, VDS_HWT_FIBRE_CHANNEL, VDS_HWT_ISCSI, VDS_HWT_PCI_RAID, VDS_HWT_SAS, VDS_IPT_EMPTY,
    VDS_IPT_IPV4, VDS_IPT_IPV6, VDS_IPT_TEXT, VDS_TEXT_ADDRESS_WCHARS, VdsHbaPortProp,
    VdsIpAddress, VdsPathId, VdsPathPolicy, VdsWwn,
};

/// The daemon said something this crate cannot turn into the C structures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadData(pub String);

impl std::fmt::Display for BadData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unexpected answer from the daemon: {}", self.0)
    }
}

/// The third union of `VDS_PATH_INFO`, owned (it becomes its own task-memory block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathEndpoint {
    /// No local end (NULL pointer, zero GUIDs).
    None,
    /// `pHbaPortProp`.
    Hba(VdsHbaPortProp),
    /// `pInitiatorPortalIpAddr`.
    Ip(Box<VdsIpAddress>),
}

/// One `VDS_PATH_INFO`, before allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRecord {
    pub path_id: VdsPathId,
    pub hw_type: i32,
    pub status: i32,
    /// `controllerPortId` or `targetPortalId`.
    pub far_end_id: Guid,
    /// `hbaPortId` or `initiatorAdapterId`.
    pub near_end_id: Guid,
    pub endpoint: PathEndpoint,
}

fn guid(value: Option<VdsGuid>) -> Guid {
    value.map(Guid::from_vds).unwrap_or(Guid::NULL)
}
/// `VDS_IPADDRESS` from the JSON `{type, address, port}`: IPv4 as its numeric value (Q12), IPv6 as
/// its 16 octets, text as NUL-terminated UTF-16 (at most 256 units), empty as zeros. A type this
/// crate does not know keeps its number, with only the port filled in.
pub fn ip_address(
    address_type: i32,
    address: &str,
    port: u32,
    flow_info: u32,
    scope_id: u32,
) -> Result<VdsIpAddress, BadData> {
    let mut out = VdsIpAddress::ZERO;
    out.address_type = address_type;
    out.ul_port = port;
    match address_type {
        VDS_IPT_IPV4 => {
            let ip: Ipv4Addr = address
                .parse()
                .map_err(|_| BadData(format!("{address:?} is not an IPv4 address")))?;
            out.ipv4_address = u32::from(ip);
        }
        VDS_IPT_IPV6 => {
            let ip: Ipv6Addr = address
                .parse()
                .map_err(|_| BadData(format!("{address:?} is not an IPv6 address")))?;
            out.ipv6_address = ip.octets();
            out.ul_ipv6_flow_info = flow_info;
            out.ul_ipv6_scope_id = scope_id;
        }
        VDS_IPT_TEXT => {
            let units: Vec<u16> = address.encode_utf16().collect();
            if units.len() >= VDS_TEXT_ADDRESS_WCHARS {
                return Err(BadData(format!(
                    "text address of {} UTF-16 units does not fit wszTextAddress[{VDS_TEXT_ADDRESS_WCHARS}]",
                    units.len()
                )));
            }
            out.wsz_text_address[..units.len()].copy_from_slice(&units);
        }
        VDS_IPT_EMPTY => {}
        _ => {}
    }
    Ok(out)
}

/// `VDS_HBAPORT_PROP` from the wire's `hbaPortProp`.
fn hba_port(wire: &HbaPortInfo) -> VdsHbaPortProp {
    VdsHbaPortProp {
        id: Guid::from_vds(wire.id),
        wwn_node: VdsWwn {
            rguch_wwn: wire.wwn_node.0,
        },
        wwn_port: VdsWwn {
            rguch_wwn: wire.wwn_port.0,
        },
        port_type: wire.port_type,
        status: wire.status,
        ul_port_speed: wire.port_speed,
        ul_supported_port_speed: wire.supported_port_speed,
    }
}

/// Which arm `VDS_PATH_INFO.type` selects (research Q1): `Some(true)` the HBA arm (Fibre Channel,
/// SAS, PCI RAID), `Some(false)` the network arm (iSCSI), `None` neither (unknown, or a type this
/// crate does not know).
pub fn arm_of_type(hw_type: i32) -> Option<bool> {
    match hw_type {
        VDS_HWT_FIBRE_CHANNEL | VDS_HWT_SAS | VDS_HWT_PCI_RAID => Some(true),
        VDS_HWT_ISCSI => Some(false),
        _ => None,
    }
}

/// GetPathInfo's result → records, in the daemon's order.
///
/// The two GUID unions take whichever ids the daemon reported (`controllerPortId`/`hbaPortId` for
/// HBA paths, `targetPortalId`/`initiatorAdapterId` for network paths, zero for neither). The
/// pointer union is set only when the path's `type` selects the arm the daemon filled in, so a C
/// caller can always tell which structure the pointer holds from `type` alone: iSCSI →
/// `pInitiatorPortalIpAddr`, Fibre Channel/SAS/PCI RAID → `pHbaPortProp`, anything else → NULL
/// (for example an NBD-over-TCP path configured without `interconnect = "iscsi"`).
pub fn path_infos(result: &PathInfoList) -> Result<Vec<PathRecord>, BadData> {
    result.paths.iter().map(path_record).collect()
}

fn path_record(w: &lunmpio_rpc::PathInfo) -> Result<PathRecord, BadData> {
    let hba =
        w.hba_port_prop.is_some() || w.controller_port_id.is_some() || w.hba_port_id.is_some();
    let net = w.initiator_portal_ip_addr.is_some()
        || w.target_portal_id.is_some()
        || w.initiator_adapter_id.is_some();
    let type_arm = arm_of_type(w.hw_type);
    let (far_end_id, near_end_id, endpoint) = match (hba, net) {
        (true, true) => {
            return Err(BadData(format!(
                "path {} has both HBA and network endpoints",
                w.path_id
            )));
        }
        (true, false) => (
            guid(w.controller_port_id),
            guid(w.hba_port_id),
            match &w.hba_port_prop {
                Some(h) if type_arm == Some(true) => PathEndpoint::Hba(hba_port(h)),
                _ => PathEndpoint::None,
            },
        ),
        (false, true) => (
            guid(w.target_portal_id),
            guid(w.initiator_adapter_id),
            match &w.initiator_portal_ip_addr {
                Some(ip) if type_arm == Some(false) => PathEndpoint::Ip(Box::new(ip_address(
                    ip.address_type,
                    &ip.address,
                    ip.port,
                    ip.flow_info,
                    ip.scope_id,
                )?)),
                _ => PathEndpoint::None,
            },
        ),
        (false, false) => (Guid::NULL, Guid::NULL, PathEndpoint::None),
    };
    Ok(PathRecord {
        path_id: VdsPathId::from_vds(w.path_id),
        hw_type: w.hw_type,
        status: w.status,
        far_end_id,
        near_end_id,
        endpoint,
    })
}

/// GetLoadBalancePolicy's result → the policy number and the C records, in the daemon's order.
pub fn load_balance_policy(result: &LoadBalancePolicyInfo) -> (i32, Vec<VdsPathPolicy>) {
    let paths = result
        .paths
        .iter()
        .map(|p| VdsPathPolicy {
            path_id: VdsPathId::from_vds(p.path_id),
            b_primary_path: i32::from(p.primary),
            ul_weight: p.weight,
        })
        .collect();
    (result.policy, paths)
}

/// SetLoadBalancePolicy's parameters. The policy number goes through unchanged (the daemon's VDS
/// rules judge it); each record sets both the primary flag (`bPrimaryPath != 0`) and the weight.
pub fn set_load_balance_policy_params(
    lun: &str,
    policy: i32,
    paths: &[VdsPathPolicy],
) -> SetLoadBalancePolicyParams {
    SetLoadBalancePolicyParams {
        lun: lun.to_owned(),
        policy: PolicyValue::Number(i64::from(policy)),
        paths: paths
            .iter()
            .map(|p| PathPolicyParam {
                path_id: p.path_id.to_vds(),
                primary: Some(p.b_primary_path != 0),
                weight: Some(p.ul_weight),
            })
            .collect(),
    }
}

/// SetAllPathStatusesFromHbaPort's port: only the WWN pair matters (research §3.1).
pub fn hba_port_param(prop: &VdsHbaPortProp) -> HbaPortParam {
    HbaPortParam::Wwn {
        wwn_node: Wwn(prop.wwn_node.rguch_wwn).to_string(),
        wwn_port: Wwn(prop.wwn_port.rguch_wwn).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::VDS_MPS_ONLINE;
    use lunmpio_rpc::{HbaPortResult, SetHbaPortParams, SupportedLbPolicies};
    use serde_json::{Value, json};

    /// What the typed client does with an answer: decode it, or report it as bad data.
    fn decoded<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, BadData> {
        serde_json::from_value(v).map_err(|e| BadData(e.to_string()))
    }

    fn path_infos_of(v: Value) -> Result<Vec<PathRecord>, BadData> {
        path_infos(&decoded(v)?)
    }

    fn policy_of(v: Value) -> Result<(i32, Vec<VdsPathPolicy>), BadData> {
        decoded::<LoadBalancePolicyInfo>(v).map(|r| load_balance_policy(&r))
    }

    fn flags_of(v: Value) -> Result<u32, BadData> {
        decoded::<SupportedLbPolicies>(v).map(|r| r.flags)
    }

    fn hresult_of(v: Value) -> Result<i32, BadData> {
        decoded::<HbaPortResult>(v).map(|r| r.hresult)
    }

    fn utf16z(units: &[u16]) -> String {
        let end = units.iter().position(|&u| u == 0).unwrap();
        String::from_utf16(&units[..end]).unwrap()
    }

    #[test]
    fn path_info_arms_follow_the_daemon_json() {
        let result = json!({"paths": [
            {
                "pathId": {"sourceId": "0x00000000000000a1", "pathId": "0x0000000000000001"},
                "type": 2, "typeName": "VDS_HWT_FIBRE_CHANNEL", "status": 1, "statusName": "VDS_MPS_ONLINE",
                "statusReason": "", "name": "fc0", "uri": "file:///x", "transport": "file",
                "controllerPortId": "6c756e6d-7069-4f00-8000-7664735f6964",
                "hbaPortId": "00112233-4455-6677-8899-aabbccddeeff",
                "hbaPortProp": {"id": "00000000-0000-0000-0000-000000000000",
                    "wwnNode": "20:00:00:25:b5:00:00:0a", "wwnPort": "21:00:00:25:b5:00:00:0a",
                    "type": 1, "typeName": "VDS_HPT_UNKNOWN", "status": 2, "statusName": "VDS_HPS_ONLINE",
                    "portSpeed": 8, "supportedPortSpeed": 15}
            },
            {
                "pathId": {"sourceId": 161, "pathId": "0x2"},
                "type": 3, "status": 5,
                "targetPortalId": "{00112233-4455-6677-8899-aabbccddeeff}",
                "initiatorAdapterId": "ffeeddcc-bbaa-9988-7766-554433221100",
                "initiatorPortalIpAddr": {"type": 1, "typeName": "VDS_IPT_IPV4", "address": "10.0.2.5", "port": 3260}
            },
            {
                "pathId": {"sourceId": "0xa1", "pathId": "0x3"},
                "type": 0, "status": 7, "name": "unix"
            },
            {
                "pathId": {"sourceId": "0xa1", "pathId": "0x4"},
                "type": 42, "status": 99,
                "targetPortalId": "00112233-4455-6677-8899-aabbccddeeff",
                "initiatorAdapterId": "00000000-0000-0000-0000-000000000000",
                "initiatorPortalIpAddr": {"type": 0, "address": "initiator.example", "port": 0}
            },
            {
                "pathId": {"sourceId": "0xa1", "pathId": "0x5"},
                "type": 3, "status": 1,
                "targetPortalId": "00000000-0000-0000-0000-000000000000",
                "initiatorAdapterId": "00000000-0000-0000-0000-000000000000",
                "initiatorPortalIpAddr": {"type": 0, "address": "initiator.example", "port": 0}
            },
            {
                "pathId": {"sourceId": "0xa1", "pathId": "0x6"},
                "type": 0, "status": 1,
                "controllerPortId": "00112233-4455-6677-8899-aabbccddeeff",
                "hbaPortId": "00112233-4455-6677-8899-aabbccddeeff",
                "hbaPortProp": {"wwnNode": "20:00:00:25:b5:00:00:0a", "wwnPort": "21:00:00:25:b5:00:00:0a", "type": 1, "status": 2}
            }
        ]});
        let r = path_infos_of(result).unwrap();
        assert_eq!(r.len(), 6);

        assert_eq!(
            r[0].path_id,
            VdsPathId {
                ull_source_id: 0xa1,
                ull_path_id: 1
            }
        );
        assert_eq!(
            (r[0].hw_type, r[0].status),
            (VDS_HWT_FIBRE_CHANNEL, VDS_MPS_ONLINE)
        );
        assert_eq!(r[0].far_end_id.data1, 0x6c75_6e6d);
        assert_eq!(
            r[0].far_end_id.data4,
            [0x80, 0, 0x76, 0x64, 0x73, 0x5f, 0x69, 0x64]
        );
        assert_eq!(
            r[0].near_end_id,
            Guid {
                data1: 0x0011_2233,
                data2: 0x4455,
                data3: 0x6677,
                data4: [0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff]
            }
        );
        let PathEndpoint::Hba(h) = &r[0].endpoint else {
            panic!("{:?}", r[0].endpoint)
        };
        assert_eq!(h.id, Guid::NULL);
        assert_eq!(
            h.wwn_node.rguch_wwn,
            [0x20, 0, 0, 0x25, 0xb5, 0, 0, 0x0a],
            "element 0 is the most significant byte"
        );
        assert_eq!(h.wwn_port.rguch_wwn[0], 0x21);
        assert_eq!(
            (
                h.port_type,
                h.status,
                h.ul_port_speed,
                h.ul_supported_port_speed
            ),
            (1, 2, 8, 15)
        );

        assert_eq!(r[1].hw_type, VDS_HWT_ISCSI);
        assert_eq!(r[1].far_end_id.data1, 0x0011_2233);
        let PathEndpoint::Ip(ip) = &r[1].endpoint else {
            panic!()
        };
        assert_eq!(ip.address_type, VDS_IPT_IPV4);
        assert_eq!(
            ip.ipv4_address, 0x0a00_0205,
            "numeric value, octet 0 in bits 24-31 (Q12)"
        );
        assert_eq!(ip.ul_port, 3260);
        assert_eq!(ip.wsz_text_address[0], 0);

        assert_eq!(r[2].endpoint, PathEndpoint::None);
        assert_eq!(
            (r[2].far_end_id, r[2].near_end_id),
            (Guid::NULL, Guid::NULL)
        );
        assert_eq!(r[2].status, 7);

        assert_eq!(
            (r[3].hw_type, r[3].status),
            (42, 99),
            "open enums pass through"
        );
        assert_eq!(
            r[3].endpoint,
            PathEndpoint::None,
            "a type that selects no arm has no pointer"
        );
        assert_eq!(r[3].far_end_id.data1, 0x0011_2233, "the ids are kept");
        assert_eq!(
            r[5].endpoint,
            PathEndpoint::None,
            "HBA data on an unknown type"
        );
        assert_eq!(r[5].near_end_id.data1, 0x0011_2233);
        let PathEndpoint::Ip(ip) = &r[4].endpoint else {
            panic!()
        };
        assert_eq!(ip.address_type, VDS_IPT_TEXT);
        assert_eq!(utf16z(&ip.wsz_text_address), "initiator.example");
    }

    #[test]
    fn ip_addresses() {
        let v6 = ip_address(VDS_IPT_IPV6, "fe80::1", 10809, 3, 2).unwrap();
        assert_eq!(v6.ipv6_address[0..2], [0xfe, 0x80]);
        assert_eq!(v6.ipv6_address[15], 1);
        assert_eq!((v6.ul_ipv6_flow_info, v6.ul_ipv6_scope_id), (3, 2));
        let empty = ip_address(VDS_IPT_EMPTY, "", 0, 0, 0).unwrap();
        assert_eq!(
            empty,
            VdsIpAddress {
                address_type: VDS_IPT_EMPTY,
                ..VdsIpAddress::ZERO
            }
        );
        // 256 units fit with the NUL; 257 do not. Non-ASCII text is UTF-16, not UTF-8.
        let long = "a".repeat(256);
        let t = ip_address(VDS_IPT_TEXT, &long, 0, 0, 0).unwrap();
        assert_eq!((t.wsz_text_address[255], t.wsz_text_address[256]), (97, 0));
        assert!(ip_address(VDS_IPT_TEXT, &"a".repeat(257), 0, 0, 0).is_err());
        let u = ip_address(VDS_IPT_TEXT, "hôte-𝄞", 1, 0, 0).unwrap();
        assert_eq!(utf16z(&u.wsz_text_address), "hôte-𝄞");
        assert_eq!(u.wsz_text_address[1], 0xf4);
        assert!(ip_address(VDS_IPT_IPV4, "not-an-ip", 0, 0, 0).is_err());
        assert!(ip_address(VDS_IPT_IPV6, "10.0.0.1", 0, 0, 0).is_err());
    }

    #[test]
    fn bad_data_is_reported_not_panicked() {
        for bad in [
            json!({}),
            json!({"paths": 3}),
            json!({"paths": [{"type": 0, "status": 1}]}),
            json!({"paths": [{"pathId": {"sourceId": "0xzz", "pathId": 1}, "type": 0, "status": 1}]}),
            json!({"paths": [{"pathId": {"sourceId": 1, "pathId": 1}, "type": 0, "status": 1,
                    "hbaPortProp": {"wwnNode": "20:00", "wwnPort": "20:00:00:25:b5:00:00:0a", "type": 1, "status": 1}}]}),
            json!({"paths": [{"pathId": {"sourceId": 1, "pathId": 1}, "type": 0, "status": 1,
                    "hbaPortId": "00000000-0000-0000-0000-000000000000",
                    "targetPortalId": "00000000-0000-0000-0000-000000000000"}]}),
        ] {
            assert!(path_infos_of(bad.clone()).is_err(), "{bad}");
        }
        assert!(policy_of(json!({"paths": []})).is_err());
        assert!(flags_of(json!({"flags": -1})).is_err());
        assert!(hresult_of(json!({})).is_err());
    }

    #[test]
    fn policies_and_flags() {
        let (policy, paths) = policy_of(json!({
            "policy": 1, "policyName": "VDS_LBP_FAILOVER",
            "paths": [
                {"pathId": {"sourceId": "0x0000000000000001", "pathId": "0x0000000000000002"}, "primary": true, "weight": 7},
                {"pathId": {"sourceId": "0x0000000000000001", "pathId": "0x0000000000000003"}, "primary": false, "weight": 0}
            ]
        }))
        .unwrap();
        assert_eq!(policy, 1);
        assert_eq!(
            paths,
            vec![
                VdsPathPolicy {
                    path_id: VdsPathId {
                        ull_source_id: 1,
                        ull_path_id: 2
                    },
                    b_primary_path: 1,
                    ul_weight: 7
                },
                VdsPathPolicy {
                    path_id: VdsPathId {
                        ull_source_id: 1,
                        ull_path_id: 3
                    },
                    b_primary_path: 0,
                    ul_weight: 0
                },
            ]
        );
        assert_eq!(
            policy_of(json!({"policy": 2, "paths": []})).unwrap().1,
            vec![]
        );
        assert_eq!(
            flags_of(json!({"flags": 127, "policies": []})).unwrap(),
            0x7f
        );
        assert_eq!(
            hresult_of(json!({"hresult": 272130, "matched": 1})).unwrap(),
            0x0004_2702
        );
    }

    #[test]
    fn request_params() {
        let p = set_load_balance_policy_params(
            "lun0",
            99,
            &[VdsPathPolicy {
                path_id: VdsPathId {
                    ull_source_id: 0xa1,
                    ull_path_id: 2,
                },
                b_primary_path: -1,
                ul_weight: 5,
            }],
        );
        assert_eq!(
            serde_json::to_value(p).unwrap(),
            json!({"lun": "lun0", "policy": 99, "paths": [
                {"pathId": {"sourceId": "0x00000000000000a1", "pathId": "0x0000000000000002"}, "primary": true, "weight": 5}
            ]})
        );
        let hba_port = hba_port_param(&VdsHbaPortProp {
            wwn_node: VdsWwn {
                rguch_wwn: [0x20, 0, 0, 0x25, 0xb5, 0, 0, 0x0a],
            },
            wwn_port: VdsWwn {
                rguch_wwn: [0x21, 0, 0, 0x25, 0xb5, 0, 0, 0x0a],
            },
            port_type: 77,
            ..VdsHbaPortProp::default()
        });
        let h = SetHbaPortParams {
            hba_port,
            status: 5,
        };
        assert_eq!(
            serde_json::to_value(h).unwrap(),
            json!({"hbaPort": {"wwnNode": "20:00:00:25:b5:00:00:0a", "wwnPort": "21:00:00:25:b5:00:00:0a"}, "status": 5})
        );
    }
}
