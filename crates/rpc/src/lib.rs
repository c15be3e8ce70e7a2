//! lunmpio's management protocol (PRODUCT.md §8): JSON-RPC 2.0 over the daemon's Unix control socket,
//! one JSON object per line in each direction, any number of requests per connection.
//!
//! Method names are the VDS names. Errors are JSON-RPC error objects whose `code` is the HRESULT as a
//! signed 32-bit integer, with `data: {"hresult": "0x80042405", "name": "VDS_E_OBJECT_NOT_FOUND"}`;
//! only malformed JSON (-32700), a non-object or non-request (-32600) and an unknown method (-32601)
//! use the standard JSON-RPC codes. Parameters that do not fit a method are `E_INVALIDARG`.
//!
//! This crate holds the wire types and the typed parameters of every method (shared by the daemon,
//! the command line and the C ABI) and a small blocking [`client::Client`].

pub mod client;

use lunmpio_vds::{Hresult, LoadBalancePolicy, PathId, VdsError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;

/// Longest request line the daemon reads; longer lines are refused (a bound on memory per client).
pub const LINE_BYTES_MAX: usize = 1 << 20;

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
    ];
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[error("{message} ({})", self.describe_code())]
pub struct RpcError {
    pub code: i32,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl RpcError {
    pub fn standard(code: i32, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// The HRESULT, when the error carries one (every error but the standard JSON-RPC ones).
    pub fn hresult(&self) -> Option<Hresult> {
        (![PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND].contains(&self.code))
            .then_some(Hresult(self.code))
    }

    /// `VDS_E_OBJECT_NOT_FOUND 0x80042405`, or the JSON-RPC code.
    pub fn describe_code(&self) -> String {
        match self.hresult() {
            Some(h) => format!("{} {}", h.name(), h.as_hex()),
            None => format!("JSON-RPC {}", self.code),
        }
    }
}

impl From<VdsError> for RpcError {
    fn from(e: VdsError) -> Self {
        RpcError {
            code: e.hresult.0,
            message: e.message,
            data: Some(json!({ "hresult": e.hresult.as_hex(), "name": e.hresult.name() })),
        }
    }
}

/// A parsed request line.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Value,
    pub method: String,
    pub params: Value,
}

/// Parses one request line. On failure, the error response to send back (the connection stays
/// usable either way).
pub fn parse_request(line: &str) -> Result<Request, String> {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Err(error_response(
                &Value::Null,
                &RpcError::standard(PARSE_ERROR, format!("parse error: {e}")),
            ));
        }
    };
    let Value::Object(mut object) = value else {
        return Err(error_response(
            &Value::Null,
            &RpcError::standard(INVALID_REQUEST, "a request must be a JSON object"),
        ));
    };
    let id = object.remove("id").unwrap_or(Value::Null);
    if !matches!(id, Value::Null | Value::Number(_) | Value::String(_)) {
        return Err(error_response(
            &Value::Null,
            &RpcError::standard(INVALID_REQUEST, "id must be a number, a string or null"),
        ));
    }
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(error_response(
            &id,
            &RpcError::standard(INVALID_REQUEST, "jsonrpc must be \"2.0\""),
        ));
    }
    let Some(Value::String(method)) = object.remove("method") else {
        return Err(error_response(
            &id,
            &RpcError::standard(INVALID_REQUEST, "method must be a string"),
        ));
    };
    let params = object.remove("params").unwrap_or_else(|| json!({}));
    if !params.is_object() {
        return Err(error_response(
            &id,
            &RpcError::from(VdsError::invalid_arg("params must be a JSON object")),
        ));
    }
    Ok(Request { id, method, params })
}

pub fn result_response(id: &Value, result: Value) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "result": result }).to_string()
}

pub fn error_response(id: &Value, error: &RpcError) -> String {
    json!({ "jsonrpc": "2.0", "id": id, "error": error }).to_string()
}

/// Decodes a method's parameters; anything that does not fit is `E_INVALIDARG` naming the problem.
pub fn params<T: for<'de> Deserialize<'de>>(method: &str, params: Value) -> Result<T, RpcError> {
    serde_json::from_value(params)
        .map_err(|e| RpcError::from(VdsError::invalid_arg(format!("{method}: bad params: {e}"))))
}

// ---- parameters of each method ----

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

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(response: &str) -> RpcError {
        let v: Value = serde_json::from_str(response).unwrap();
        assert_eq!(v["jsonrpc"], "2.0");
        serde_json::from_value(v["error"].clone()).unwrap()
    }

    #[test]
    fn malformed_lines_get_the_standard_codes() {
        assert_eq!(
            error_of(&parse_request("{not json").unwrap_err()).code,
            PARSE_ERROR
        );
        assert_eq!(
            error_of(&parse_request("[1,2]").unwrap_err()).code,
            INVALID_REQUEST
        );
        assert_eq!(
            error_of(&parse_request(r#"{"jsonrpc":"2.0","id":1}"#).unwrap_err()).code,
            INVALID_REQUEST
        );
        assert_eq!(
            error_of(&parse_request(r#"{"jsonrpc":"1.0","id":1,"method":"X"}"#).unwrap_err()).code,
            INVALID_REQUEST
        );
        let e = error_of(
            &parse_request(r#"{"jsonrpc":"2.0","id":1,"method":"GetPathInfo","params":[1]}"#)
                .unwrap_err(),
        );
        assert_eq!(e.hresult(), Some(Hresult::E_INVALIDARG));
    }

    #[test]
    fn requests_parse_with_default_params() {
        let r = parse_request(r#"{"jsonrpc":"2.0","id":"a","method":"ListLuns"}"#).unwrap();
        assert_eq!(
            (r.id, r.method.as_str(), r.params),
            (json!("a"), "ListLuns", json!({}))
        );
    }

    #[test]
    fn vds_errors_carry_hresult_and_name() {
        let e = RpcError::from(VdsError::object_not_found("no LUN \"x\""));
        assert_eq!(e.code, 0x80042405u32 as i32);
        assert_eq!(e.data.as_ref().unwrap()["hresult"], "0x80042405");
        assert_eq!(e.data.as_ref().unwrap()["name"], "VDS_E_OBJECT_NOT_FOUND");
        assert_eq!(e.describe_code(), "VDS_E_OBJECT_NOT_FOUND 0x80042405");
        assert!(
            RpcError::standard(METHOD_NOT_FOUND, "x")
                .hresult()
                .is_none()
        );
    }

    #[test]
    fn params_accept_ids_as_strings_or_numbers_and_policies_by_any_name() {
        let p: SetLoadBalancePolicyParams = params(
            "SetLoadBalancePolicy",
            json!({"lun": "lun0", "policy": "round-robin", "paths": [{"pathId": {"sourceId": "0x0000000000000007", "pathId": 3}, "primary": true}]}),
        )
        .unwrap();
        assert_eq!(p.policy.to_raw().unwrap(), 2);
        assert_eq!(p.paths[0].path_id, PathId::new(7, 3));
        assert_eq!(
            PolicyValue::Name("VDS_LBP_FAILOVER".into())
                .to_raw()
                .unwrap(),
            1
        );
        assert_eq!(
            PolicyValue::Number(9).to_raw().unwrap(),
            9,
            "range is checked by the VDS rules"
        );
        assert!(PolicyValue::Number(1 << 40).to_raw().is_err());
        let e = params::<LunParams>("GetPathInfo", json!({"lun": 3})).unwrap_err();
        assert_eq!(e.hresult(), Some(Hresult::E_INVALIDARG));
        let e = params::<LunParams>("GetPathInfo", json!({"lun": "a", "extra": 1})).unwrap_err();
        assert!(e.message.contains("extra"), "{}", e.message);
        let h: SetHbaPortParams = params(
            "x",
            json!({"hbaPort": {"initiator": "10.0.0.5"}, "status": 5}),
        )
        .unwrap();
        assert_eq!(
            h.hba_port,
            HbaPortParam::Initiator {
                initiator: "10.0.0.5".into()
            }
        );
        let h: SetHbaPortParams = params("x", json!({"hbaPort": {"wwnNode": "20:00:00:25:b5:00:00:0a", "wwnPort": "0x2100002" }, "status": 1})).unwrap();
        assert!(matches!(h.hba_port, HbaPortParam::Wwn { .. }));
    }
}
