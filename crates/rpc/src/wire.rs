//! JSON-RPC 2.0 framing: one request line in, one response line out; the error object and its codes.

use lunmpio_vds::{Hresult, VdsError};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const PARSE_ERROR: i32 = -32700;
pub const INVALID_REQUEST: i32 = -32600;
pub const METHOD_NOT_FOUND: i32 = -32601;

/// Longest request line the daemon reads; longer lines are refused (a bound on memory per client).
pub const LINE_BYTES_MAX: usize = 1 << 20;

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
