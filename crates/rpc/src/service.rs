//! The server side of the contract: [`Service`], one method per call, and [`answer`], which turns a
//! request line into a response line through it. The daemon implements `Service`; this module owns
//! everything between the socket's bytes and the typed call.

use std::future::Future;

use serde::Serialize;
use serde_json::Value;

use crate::call::{
    Call, GetEventsParams, LunParams, SetHbaPortParams, SetLoadBalancePolicyParams,
    SetPathStatusParams,
};
use crate::results::{
    DaemonInfo, Done, EventList, HbaPortResult, LoadBalancePolicyInfo, LunList, PathInfoList,
    ReloadResult, Statistics, SupportedLbPolicies, UpgradeStarted,
};
use crate::wire::{self, RpcError};

/// What a management server does, one method per call. Errors are VDS errors (`RpcError::from`).
pub trait Service: Sync {
    fn get_path_info(
        &self,
        p: LunParams,
    ) -> impl Future<Output = Result<PathInfoList, RpcError>> + Send;
    fn get_load_balance_policy(
        &self,
        p: LunParams,
    ) -> impl Future<Output = Result<LoadBalancePolicyInfo, RpcError>> + Send;
    fn set_load_balance_policy(
        &self,
        p: SetLoadBalancePolicyParams,
    ) -> impl Future<Output = Result<Done, RpcError>> + Send;
    fn get_supported_lb_policies(
        &self,
        p: LunParams,
    ) -> impl Future<Output = Result<SupportedLbPolicies, RpcError>> + Send;
    fn set_all_path_statuses_from_hba_port(
        &self,
        p: SetHbaPortParams,
    ) -> impl Future<Output = Result<HbaPortResult, RpcError>> + Send;
    fn list_luns(&self) -> impl Future<Output = Result<LunList, RpcError>> + Send;
    fn set_path_status(
        &self,
        p: SetPathStatusParams,
    ) -> impl Future<Output = Result<Done, RpcError>> + Send;
    fn get_statistics(
        &self,
        p: LunParams,
    ) -> impl Future<Output = Result<Statistics, RpcError>> + Send;
    fn get_events(
        &self,
        p: GetEventsParams,
    ) -> impl Future<Output = Result<EventList, RpcError>> + Send;
    fn get_daemon_info(&self) -> impl Future<Output = Result<DaemonInfo, RpcError>> + Send;
    fn reload(&self) -> impl Future<Output = Result<ReloadResult, RpcError>> + Send;
    fn upgrade(&self) -> impl Future<Output = Result<UpgradeStarted, RpcError>> + Send;
}

/// One request line in, one response line out (without the newline). Never panics on input.
pub async fn answer<S: Service>(service: &S, line: &str) -> String {
    let request = match wire::parse_request(line) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let result = match Call::parse(&request.method, request.params) {
        Ok(call) => perform(service, call).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(result) => wire::result_response(&request.id, result),
        Err(e) => wire::error_response(&request.id, &e),
    }
}

/// Runs one call; the result as the JSON value that goes on the wire.
pub async fn perform<S: Service>(service: &S, call: Call) -> Result<Value, RpcError> {
    match call {
        Call::GetPathInfo(p) => to_value(service.get_path_info(p).await?),
        Call::GetLoadBalancePolicy(p) => to_value(service.get_load_balance_policy(p).await?),
        Call::SetLoadBalancePolicy(p) => to_value(service.set_load_balance_policy(p).await?),
        Call::GetSupportedLbPolicies(p) => to_value(service.get_supported_lb_policies(p).await?),
        Call::SetAllPathStatusesFromHbaPort(p) => {
            to_value(service.set_all_path_statuses_from_hba_port(p).await?)
        }
        Call::ListLuns => to_value(service.list_luns().await?),
        Call::SetPathStatus(p) => to_value(service.set_path_status(p).await?),
        Call::GetStatistics(p) => to_value(service.get_statistics(p).await?),
        Call::GetEvents(p) => to_value(service.get_events(p).await?),
        Call::GetDaemonInfo => to_value(service.get_daemon_info().await?),
        Call::Reload => to_value(service.reload().await?),
        Call::Upgrade => to_value(service.upgrade().await?),
    }
}

/// A result as JSON. Through `Value`, whose objects keep their members sorted, so the line's member
/// order is the same whatever the order of a struct's fields.
fn to_value(result: impl Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(result).map_err(|e| {
        RpcError::from(lunmpio_vds::VdsError::internal(format!(
            "result does not serialize: {e}"
        )))
    })
}
