//! The calls: every method's wire name and typed parameters, and [`Call`], a request's method and
//! parameters parsed once.

use lunmpio_vds::{LoadBalancePolicy, PathId, VdsError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wire::{METHOD_NOT_FOUND, RpcError};

/// Every method, by its wire name.
pub mod method {
    pub const GET_PATH_INFO: &str = "GetPathInfo";
    pub const GET_LOAD_BALANCE_POLICY: &str = "GetLoadBalancePolicy";
    pub const SET_LOAD_BALANCE_POLICY: &str = "SetLoadBalancePolicy";
    pub const GET_SUPPORTED_LB_POLICIES: &str = "GetSupportedLbPolicies";
    pub const SET_ALL_PATH_STATUSES_FROM_HBA_PORT: &str = "SetAllPathStatusesFromHbaPort";
    pub const LIST_LUNS: &str = "ListLuns";
    pub const SET_PATH_STATUS: &str = "SetPathStatus";
    pub const GET_STATISTICS: &str = "GetStatistics";
    pub const GET_EVENTS: &str = "GetEvents";
    pub const GET_DAEMON_INFO: &str = "GetDaemonInfo";
    pub const RELOAD: &str = "Reload";
    pub const UPGRADE: &str = "Upgrade";
    pub const ALL: &[&str] = &[
        GET_PATH_INFO,
        GET_LOAD_BALANCE_POLICY,
        SET_LOAD_BALANCE_POLICY,
        GET_SUPPORTED_LB_POLICIES,
        SET_ALL_PATH_STATUSES_FROM_HBA_PORT,
        LIST_LUNS,
        SET_PATH_STATUS,
        GET_STATISTICS,
        GET_EVENTS,
        GET_DAEMON_INFO,
        RELOAD,
        UPGRADE,
    ];
}

/// Decodes a method's parameters; anything that does not fit is `E_INVALIDARG` naming the problem.
pub fn params<T: for<'de> Deserialize<'de>>(method: &str, params: Value) -> Result<T, RpcError> {
    serde_json::from_value(params)
        .map_err(|e| RpcError::from(VdsError::invalid_arg(format!("{method}: bad params: {e}"))))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LunParams {
    pub lun: String,
}

/// A policy as input: its number, its VDS name or its config name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PolicyValue {
    Number(i64),
    Name(String),
}

impl PolicyValue {
    /// The raw VDS value to validate (numbers go through unchanged so the VDS rules see them; a
    /// number outside i32 is `E_INVALIDARG` here).
    pub fn to_raw(&self) -> Result<i32, VdsError> {
        match self {
            PolicyValue::Number(n) => i32::try_from(*n).map_err(|_| {
                VdsError::invalid_arg(format!("{n} is not a valid load-balance policy"))
            }),
            PolicyValue::Name(name) => LoadBalancePolicy::parse_any(name).map(|p| p as i32),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathPolicyParam {
    pub path_id: PathId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetLoadBalancePolicyParams {
    pub lun: String,
    pub policy: PolicyValue,
    #[serde(default)]
    pub paths: Vec<PathPolicyParam>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SetPathStatusParams {
    pub lun: String,
    pub path_id: PathId,
    pub status: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HbaPortParam {
    #[serde(rename_all = "camelCase")]
    Wwn {
        wwn_node: String,
        wwn_port: String,
    },
    Initiator {
        initiator: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SetHbaPortParams {
    pub hba_port: HbaPortParam,
    pub status: i64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetEventsParams {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lun: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// A status given over the wire as a 64-bit JSON number, narrowed to the VDS `int` (out of range is
/// `E_INVALIDARG`, as any undefined value).
pub fn status_value(status: i64) -> Result<i32, VdsError> {
    i32::try_from(status)
        .map_err(|_| VdsError::invalid_arg(format!("{status} is not a valid path status")))
}

/// One request's method and parameters, parsed once. Parameters stay as the client gave them (a
/// policy by number or name, a status as a 64-bit number): judging them is the VDS rules' work,
/// in the order the rules check (an unknown LUN before a bad value).
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    GetPathInfo(LunParams),
    GetLoadBalancePolicy(LunParams),
    SetLoadBalancePolicy(SetLoadBalancePolicyParams),
    GetSupportedLbPolicies(LunParams),
    SetAllPathStatusesFromHbaPort(SetHbaPortParams),
    /// Takes no parameters (any given are ignored).
    ListLuns,
    SetPathStatus(SetPathStatusParams),
    GetStatistics(LunParams),
    GetEvents(GetEventsParams),
    /// Takes no parameters (any given are ignored).
    GetDaemonInfo,
    /// Takes no parameters (any given are ignored): the daemon reads its config file again.
    Reload,
    /// Takes no parameters (any given are ignored): the daemon hands over to the program file it was
    /// started from.
    Upgrade,
}

impl Call {
    /// A method name and its `params` object to a call: an unknown method is `METHOD_NOT_FOUND`
    /// (listing the methods), parameters that do not fit are `E_INVALIDARG` naming the problem.
    pub fn parse(name: &str, raw: Value) -> Result<Call, RpcError> {
        Ok(match name {
            method::GET_PATH_INFO => Call::GetPathInfo(params(name, raw)?),
            method::GET_LOAD_BALANCE_POLICY => Call::GetLoadBalancePolicy(params(name, raw)?),
            method::SET_LOAD_BALANCE_POLICY => Call::SetLoadBalancePolicy(params(name, raw)?),
            method::GET_SUPPORTED_LB_POLICIES => Call::GetSupportedLbPolicies(params(name, raw)?),
            method::SET_ALL_PATH_STATUSES_FROM_HBA_PORT => {
                Call::SetAllPathStatusesFromHbaPort(params(name, raw)?)
            }
            method::LIST_LUNS => Call::ListLuns,
            method::SET_PATH_STATUS => Call::SetPathStatus(params(name, raw)?),
            method::GET_STATISTICS => Call::GetStatistics(params(name, raw)?),
            method::GET_EVENTS => Call::GetEvents(params(name, raw)?),
            method::GET_DAEMON_INFO => Call::GetDaemonInfo,
            method::RELOAD => Call::Reload,
            method::UPGRADE => Call::Upgrade,
            other => {
                return Err(RpcError::standard(
                    METHOD_NOT_FOUND,
                    format!(
                        "unknown method {other:?}; methods: {}",
                        method::ALL.join(", ")
                    ),
                ));
            }
        })
    }

    /// The method's wire name.
    pub fn method(&self) -> &'static str {
        match self {
            Call::GetPathInfo(_) => method::GET_PATH_INFO,
            Call::GetLoadBalancePolicy(_) => method::GET_LOAD_BALANCE_POLICY,
            Call::SetLoadBalancePolicy(_) => method::SET_LOAD_BALANCE_POLICY,
            Call::GetSupportedLbPolicies(_) => method::GET_SUPPORTED_LB_POLICIES,
            Call::SetAllPathStatusesFromHbaPort(_) => method::SET_ALL_PATH_STATUSES_FROM_HBA_PORT,
            Call::ListLuns => method::LIST_LUNS,
            Call::SetPathStatus(_) => method::SET_PATH_STATUS,
            Call::GetStatistics(_) => method::GET_STATISTICS,
            Call::GetEvents(_) => method::GET_EVENTS,
            Call::GetDaemonInfo => method::GET_DAEMON_INFO,
            Call::Reload => method::RELOAD,
            Call::Upgrade => method::UPGRADE,
        }
    }

    /// The `params` object to send.
    pub fn params(&self) -> Value {
        let value = match self {
            Call::GetPathInfo(p)
            | Call::GetLoadBalancePolicy(p)
            | Call::GetSupportedLbPolicies(p)
            | Call::GetStatistics(p) => serde_json::to_value(p),
            Call::SetLoadBalancePolicy(p) => serde_json::to_value(p),
            Call::SetAllPathStatusesFromHbaPort(p) => serde_json::to_value(p),
            Call::ListLuns | Call::GetDaemonInfo | Call::Reload | Call::Upgrade => {
                Ok(Value::Object(Default::default()))
            }
            Call::SetPathStatus(p) => serde_json::to_value(p),
            Call::GetEvents(p) => serde_json::to_value(p),
        };
        // Every parameter type is a struct of strings, numbers and such structs: always an object.
        value.expect("parameters serialize to a JSON object")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_method_parses_to_its_call_and_back() {
        let id = json!({"sourceId": "0x0000000000000001", "pathId": "0x0000000000000002"});
        let examples = [
            (method::GET_PATH_INFO, json!({"lun": "a"})),
            (method::GET_LOAD_BALANCE_POLICY, json!({"lun": "a"})),
            (
                method::SET_LOAD_BALANCE_POLICY,
                json!({"lun": "a", "policy": "failover", "paths": [{"pathId": id, "primary": true}]}),
            ),
            (method::GET_SUPPORTED_LB_POLICIES, json!({"lun": "a"})),
            (
                method::SET_ALL_PATH_STATUSES_FROM_HBA_PORT,
                json!({"hbaPort": {"initiator": "10.0.0.1"}, "status": 5}),
            ),
            (method::LIST_LUNS, json!({})),
            (
                method::SET_PATH_STATUS,
                json!({"lun": "a", "pathId": id, "status": 7}),
            ),
            (method::GET_STATISTICS, json!({"lun": "a"})),
            (method::GET_EVENTS, json!({"lun": "a", "since": 4})),
            (method::GET_DAEMON_INFO, json!({})),
            (method::RELOAD, json!({})),
            (method::UPGRADE, json!({})),
        ];
        assert_eq!(examples.len(), method::ALL.len());
        for (name, params) in examples {
            let call = Call::parse(name, params.clone()).unwrap();
            assert_eq!(call.method(), name);
            assert_eq!(call.params(), params, "{name}");
            assert_eq!(Call::parse(name, call.params()).unwrap(), call);
        }
    }

    #[test]
    fn an_unknown_method_lists_the_methods() {
        let e = Call::parse("Frobnicate", json!({})).unwrap_err();
        assert_eq!(e.code, METHOD_NOT_FOUND);
        assert!(
            e.message.contains("GetPathInfo, GetLoadBalancePolicy"),
            "{}",
            e.message
        );
        let e = Call::parse(method::GET_STATISTICS, json!({})).unwrap_err();
        assert!(e.message.contains("missing field `lun`"), "{}", e.message);
    }
}
