//! Talking to the daemon: one JSON-RPC call = one connection to its control socket, and every
//! failure turned into an HRESULT (plus a message for [`crate::lunmpio_last_error_message`]).
//!
//! A connection per call keeps the objects stateless and thread-safe without a lock, never reuses a
//! connection to a daemon that has since restarted, and never has to guess whether a half-done
//! request should be retried. A connect on a local Unix socket costs microseconds; these are
//! management calls.
//!
//! | what happened | HRESULT |
//! |---|---|
//! | the daemon answered with a VDS error | that HRESULT (`code` of the JSON-RPC error) |
//! | the daemon is not running, went away, or the conversation broke (`ClientError::Io`) | `VDS_E_OBJECT_DELETED` |
//! | the daemon does not know the method (JSON-RPC -32601: an older daemon) | `VDS_E_NOT_SUPPORTED` |
//! | any other JSON-RPC error without an HRESULT, or an error whose code is not a failure | `VDS_E_PROVIDER_FAILURE` |
//! | an answer that does not have the documented shape | `VDS_E_BAD_PROVIDER_DATA` |

use std::cell::RefCell;
use std::path::Path;

use lunmpio_rpc::client::{Client, ClientError};
use lunmpio_rpc::{Call, METHOD_NOT_FOUND};
use serde::de::DeserializeOwned;

use crate::abi::{
    HResult, VDS_E_BAD_PROVIDER_DATA, VDS_E_NOT_SUPPORTED, VDS_E_OBJECT_DELETED,
    VDS_E_PROVIDER_FAILURE,
};
use crate::convert::BadData;

/// Bound on one management call from C: a daemon that is alive but stuck fails the call with
/// `VDS_E_OBJECT_DELETED` after this long instead of holding the caller for the client's default 30 s.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records the message behind the HRESULT this thread is about to return.
pub fn set_last_error(message: impl Into<String>) {
    let message = message.into();
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

pub fn clear_last_error() {
    LAST_ERROR.with(|e| e.borrow_mut().clear());
}

pub fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

/// Fails with an HRESULT and remembers why.
pub fn fail(hresult: HResult, message: impl Into<String>) -> HResult {
    set_last_error(message);
    hresult
}

/// The HRESULT of a client error.
pub fn hresult_of(error: &ClientError) -> HResult {
    match error {
        ClientError::Io { .. } => VDS_E_OBJECT_DELETED,
        ClientError::BadResult { .. } => VDS_E_BAD_PROVIDER_DATA,
        ClientError::Rpc(e) if e.code == METHOD_NOT_FOUND => VDS_E_NOT_SUPPORTED,
        ClientError::Rpc(e) => match e.hresult() {
            Some(h) if h.0 < 0 => h.0,
            _ => VDS_E_PROVIDER_FAILURE,
        },
    }
}

/// One call to the daemon at `socket`, its result decoded as `T`.
pub fn perform<T: DeserializeOwned>(socket: &Path, call: &Call) -> Result<T, HResult> {
    let result = Client::connect_with_timeout(socket, CALL_TIMEOUT)
        .and_then(|mut client| client.perform(call));
    result.map_err(|e| fail(hresult_of(&e), format!("{}: {e}", call.method())))
}

/// A decoding failure as `VDS_E_BAD_PROVIDER_DATA`.
pub fn bad_data(e: BadData) -> HResult {
    fail(VDS_E_BAD_PROVIDER_DATA, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{E_INVALIDARG, VDS_E_OBJECT_NOT_FOUND};
    use lunmpio_rpc::RpcError;

    #[test]
    fn error_mapping() {
        let io = ClientError::Io {
            path: "/x".into(),
            message: "gone".into(),
        };
        assert_eq!(hresult_of(&io), VDS_E_OBJECT_DELETED);
        let rpc = |code| ClientError::Rpc(RpcError::standard(code, "m"));
        assert_eq!(
            hresult_of(&rpc(VDS_E_OBJECT_NOT_FOUND)),
            VDS_E_OBJECT_NOT_FOUND
        );
        assert_eq!(hresult_of(&rpc(E_INVALIDARG)), E_INVALIDARG);
        let bad = ClientError::BadResult {
            method: "GetPathInfo",
            message: "missing field `paths`".into(),
        };
        assert_eq!(hresult_of(&bad), VDS_E_BAD_PROVIDER_DATA);
        assert_eq!(hresult_of(&rpc(METHOD_NOT_FOUND)), VDS_E_NOT_SUPPORTED);
        assert_eq!(hresult_of(&rpc(-32700)), VDS_E_PROVIDER_FAILURE);
        assert_eq!(
            hresult_of(&rpc(0x0004_2702)),
            VDS_E_PROVIDER_FAILURE,
            "an error never becomes a success"
        );
    }

    #[test]
    fn a_missing_daemon_is_object_deleted_with_a_message() {
        let dir = tempfile::tempdir().unwrap();
        let h = perform::<lunmpio_rpc::LunList>(&dir.path().join("none.sock"), &Call::ListLuns)
            .unwrap_err();
        assert_eq!(h, VDS_E_OBJECT_DELETED);
        assert!(last_error().contains("ListLuns"), "{}", last_error());
    }
}
