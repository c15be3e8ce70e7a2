//! The control socket's request decoding: a line of arbitrary bytes through `parse_request`, then the
//! parameters of every method. Must never panic; every refusal is an error response.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lunmpio_rpc::{
    GetEventsParams, LunParams, SetHbaPortParams, SetLoadBalancePolicyParams, SetPathStatusParams, params,
};

fuzz_target!(|data: &[u8]| {
    let line = String::from_utf8_lossy(data);
    let Ok(request) = lunmpio_rpc::parse_request(&line) else { return };
    let p = request.params;
    let _ = params::<LunParams>("x", p.clone());
    let _ = params::<GetEventsParams>("x", p.clone());
    let _ = params::<SetPathStatusParams>("x", p.clone()).map(|s| lunmpio_rpc::status_value(s.status));
    let _ = params::<SetHbaPortParams>("x", p.clone());
    if let Ok(s) = params::<SetLoadBalancePolicyParams>("x", p) {
        let _ = s.policy.to_raw();
    }
});
