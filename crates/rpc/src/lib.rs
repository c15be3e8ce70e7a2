//! lunmpio's management contract (docs/MANAGEMENT.md): JSON-RPC 2.0 over the daemon's Unix control
//! socket, one JSON object per line in each direction, any number of requests per connection.
//!
//! Method names are the VDS names. Errors are JSON-RPC error objects whose `code` is the HRESULT as a
//! signed 32-bit integer, with `data: {"hresult": "0x80042405", "name": "VDS_E_OBJECT_NOT_FOUND"}`;
//! only malformed JSON (-32700), a non-object or non-request (-32600) and an unknown method (-32601)
//! use the standard JSON-RPC codes. Parameters that do not fit a method are `E_INVALIDARG`.
//!
//! The whole contract lives here, shared by the daemon, the command line, the demo, the C ABI and
//! the tests:
//! - [`wire`]: the JSON-RPC framing and the error object;
//! - [`call`]: every method's parameters and [`Call`], a request parsed once;
//! - [`results`]: every method's result, typed;
//! - [`service`]: the [`Service`] trait a server implements, and [`service::answer`] (line in,
//!   line out);
//! - [`client`]: a blocking, typed client.

pub mod call;
pub mod client;
pub mod results;
pub mod service;
pub mod wire;

pub use call::{
    Call, GetEventsParams, HbaPortParam, LunParams, PathPolicyParam, PolicyValue, SetHbaPortParams,
    SetLoadBalancePolicyParams, SetPathStatusParams, method, params, status_value,
};
pub use results::{
    DaemonInfo, Done, EventList, EventRecord, HbaPortInfo, HbaPortResult, IpAddressInfo,
    LoadBalancePolicyInfo, LunList, LunSummary, PathInfo, PathInfoList, PathStats, ReloadFailure,
    ReloadResult, Statistics, SupportedLbPolicies, SupportedPolicy, UpgradeStarted,
};
pub use service::Service;
pub use wire::{
    INVALID_REQUEST, LINE_BYTES_MAX, METHOD_NOT_FOUND, PARSE_ERROR, Request, RpcError,
    error_response, parse_request, result_response,
};

#[cfg(test)]
mod tests {
    use super::*;
    use lunmpio_vds::{Hresult, PathId, VdsError};
    use serde_json::{Value, json};

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
