//! A small blocking client of the control socket, for the command line, the demo, the C ABI and the
//! tests (none needs an async runtime for one request at a time). The typed methods send a [`Call`]
//! and decode its result type; [`Client::call`] and [`Client::raw`] are for tests of odd input.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use serde::de::DeserializeOwned;

use crate::call::{
    Call, GetEventsParams, HbaPortParam, LunParams, SetHbaPortParams, SetLoadBalancePolicyParams,
    SetPathStatusParams,
};
use crate::results::{
    DaemonInfo, Done, EventList, HbaPortResult, LoadBalancePolicyInfo, LunList, PathInfoList,
    ReloadResult, Statistics, SupportedLbPolicies, UpgradeStarted,
};
use crate::{LINE_BYTES_MAX, RpcError};

/// How long one call may take before the client gives up on the daemon.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{0}")]
    Rpc(RpcError),
    /// The daemon could not be reached, or the conversation broke.
    #[error("control socket {path}: {message}")]
    Io { path: PathBuf, message: String },
    /// The daemon's result does not have the method's result type (a daemon of another version?).
    #[error("{method}: unexpected result from the daemon: {message}")]
    BadResult {
        method: &'static str,
        message: String,
    },
}

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Client::connect_with_timeout(path, CALL_TIMEOUT)
    }

    /// Like [`Client::connect`], with a different bound on each call (the C ABI uses a shorter one,
    /// so a stuck daemon cannot hold a management program for long).
    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let io = |e: std::io::Error| ClientError::Io {
            path: path.to_path_buf(),
            message: if e.kind() == std::io::ErrorKind::NotFound
                || e.kind() == std::io::ErrorKind::ConnectionRefused
            {
                format!(
                    "{e} (is `lunmpio serve` running? pick its socket with --socket or LUNMPIO_SOCKET)"
                )
            } else {
                e.to_string()
            },
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// One call: the result, or the daemon's error.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let line =
            json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }).to_string();
        self.send_line(&line)?;
        let response = self.read_line()?;
        let mut value: Value =
            serde_json::from_str(&response).map_err(|e| self.io(format!("bad response: {e}")))?;
        if value.get("id") != Some(&json!(id)) {
            return Err(self.io(format!("response to another request: {response}")));
        }
        if let Some(error) = value.get_mut("error") {
            let error: RpcError = serde_json::from_value(error.take())
                .map_err(|e| self.io(format!("bad error object: {e}")))?;
            return Err(ClientError::Rpc(error));
        }
        Ok(value
            .get_mut("result")
            .map(Value::take)
            .unwrap_or(Value::Null))
    }

    /// One typed call: its result decoded as `T`.
    pub fn perform<T: DeserializeOwned>(&mut self, call: &Call) -> Result<T, ClientError> {
        let result = self.call(call.method(), call.params())?;
        serde_json::from_value(result).map_err(|e| ClientError::BadResult {
            method: call.method(),
            message: e.to_string(),
        })
    }

    pub fn get_path_info(&mut self, lun: &str) -> Result<PathInfoList, ClientError> {
        self.perform(&Call::GetPathInfo(lun_params(lun)))
    }

    pub fn get_load_balance_policy(
        &mut self,
        lun: &str,
    ) -> Result<LoadBalancePolicyInfo, ClientError> {
        self.perform(&Call::GetLoadBalancePolicy(lun_params(lun)))
    }

    pub fn set_load_balance_policy(
        &mut self,
        params: SetLoadBalancePolicyParams,
    ) -> Result<Done, ClientError> {
        self.perform(&Call::SetLoadBalancePolicy(params))
    }

    pub fn get_supported_lb_policies(
        &mut self,
        lun: &str,
    ) -> Result<SupportedLbPolicies, ClientError> {
        self.perform(&Call::GetSupportedLbPolicies(lun_params(lun)))
    }

    /// `status` as a VDS number (1 online, 5 failed, 7 standby).
    pub fn set_all_path_statuses_from_hba_port(
        &mut self,
        hba_port: HbaPortParam,
        status: i64,
    ) -> Result<HbaPortResult, ClientError> {
        self.perform(&Call::SetAllPathStatusesFromHbaPort(SetHbaPortParams {
            hba_port,
            status,
        }))
    }

    pub fn list_luns(&mut self) -> Result<LunList, ClientError> {
        self.perform(&Call::ListLuns)
    }

    pub fn get_daemon_info(&mut self) -> Result<DaemonInfo, ClientError> {
        self.perform(&Call::GetDaemonInfo)
    }

    /// Asks the daemon to read its config file again and apply the difference.
    pub fn reload(&mut self) -> Result<ReloadResult, ClientError> {
        self.perform(&Call::Reload)
    }

    /// Asks the daemon to hand over to its program file (see [`UpgradeStarted`]).
    pub fn upgrade(&mut self) -> Result<UpgradeStarted, ClientError> {
        self.perform(&Call::Upgrade)
    }

    /// `status` as a VDS number (1 reinstate, 5 fail, 7 standby).
    pub fn set_path_status(
        &mut self,
        lun: &str,
        path_id: lunmpio_vds::PathId,
        status: i64,
    ) -> Result<Done, ClientError> {
        self.perform(&Call::SetPathStatus(SetPathStatusParams {
            lun: lun.to_owned(),
            path_id,
            status,
        }))
    }

    pub fn get_statistics(&mut self, lun: &str) -> Result<Statistics, ClientError> {
        self.perform(&Call::GetStatistics(lun_params(lun)))
    }

    /// Events after `since` (a `seq`; all kept events for 0), of one LUN or of all.
    pub fn get_events(&mut self, lun: Option<&str>, since: u64) -> Result<EventList, ClientError> {
        self.perform(&Call::GetEvents(GetEventsParams {
            lun: lun.map(str::to_owned),
            since: Some(since),
        }))
    }

    /// Sends a raw line and returns the raw response line (for tests of malformed input).
    pub fn raw(&mut self, line: &str) -> Result<String, ClientError> {
        self.send_line(line)?;
        self.read_line()
    }

    fn send_line(&mut self, line: &str) -> Result<(), ClientError> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|e| self.io(e.to_string()))
    }

    fn read_line(&mut self) -> Result<String, ClientError> {
        let mut response = String::new();
        let n = (&mut self.reader)
            .take(LINE_BYTES_MAX as u64 * 16)
            .read_line(&mut response)
            .map_err(|e| self.io(e.to_string()))?;
        if n == 0 {
            return Err(self.io("the daemon closed the connection".into()));
        }
        Ok(response.trim_end().to_string())
    }

    fn io(&self, message: String) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            message,
        }
    }
}

fn lun_params(lun: &str) -> LunParams {
    LunParams {
        lun: lun.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_missing_daemon_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = Client::connect(&dir.path().join("none.sock"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("is `lunmpio serve` running"), "{e}");
    }

    #[test]
    fn calls_round_trip_results_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            for answer in [r#"{"ok":1}"#, "error"] {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let request = crate::parse_request(&line).unwrap();
                let response = if answer == "error" {
                    crate::error_response(
                        &request.id,
                        &RpcError::from(lunmpio_vds::VdsError::object_not_found("no LUN")),
                    )
                } else {
                    crate::result_response(&request.id, serde_json::from_str(answer).unwrap())
                };
                writer
                    .write_all(format!("{response}\n").as_bytes())
                    .unwrap();
            }
        });
        let mut c = Client::connect(&path).unwrap();
        assert_eq!(c.call("ListLuns", json!({})).unwrap(), json!({"ok": 1}));
        match c.call("GetPathInfo", json!({"lun": "x"})).unwrap_err() {
            ClientError::Rpc(e) => {
                assert_eq!(e.describe_code(), "VDS_E_OBJECT_NOT_FOUND 0x80042405")
            }
            other => panic!("{other}"),
        }
        server.join().unwrap();
    }
}
