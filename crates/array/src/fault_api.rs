//! The simulated array's control socket: a Unix socket (mode 0600) taking one JSON object per line.
//!
//! ```text
//! {"port":0,"fault":"down"}      -> {"ok":true,"port":0,"fault":"down","state":{...}}
//! {"port":0,"fence":true}        -> {"ok":true,"port":0,"connectionsReset":1,"requestsDiscarded":3}
//! {"status":true}                -> {"ok":true,"export":{...},"ports":[...]}
//! anything else                  -> {"ok":false,"error":"..."}   (the connection stays usable)
//! ```
//!
//! Deliberately not the daemon's JSON-RPC interface (§8): the array is a test fixture standing in for a
//! vendor's storage, and a two-verb protocol keeps it scriptable with `socat`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::Array;
use super::fault::Fault;

/// Longest request line accepted; a real request is under 100 bytes.
const MAX_LINE: u64 = 64 << 10;

pub struct ControlServer {
    path: PathBuf,
    stop: CancellationToken,
}

impl ControlServer {
    /// Creates the socket (replacing a stale one) and starts answering on it.
    pub fn start(path: &Path, array: Arc<Array>) -> anyhow::Result<ControlServer> {
        remove_stale_socket(path)?;
        // Faults can take the array down: only the owner may send them. The socket is created under
        // a restrictive umask, so it is never reachable by others, not even between bind and chmod.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let listener = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener =
            listener.with_context(|| format!("cannot create control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set mode 0600 on {}", path.display()))?;
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, array, stop.clone()));
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
        })
    }

    pub fn stop(self) {
        self.stop.cancel();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes a socket file left by a previous run, but never a live socket or a non-socket file.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        anyhow::bail!(
            "control socket path {} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "control socket {} is in use by another running target",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("cannot remove stale control socket {}", path.display()))
}

async fn accept_loop(listener: UnixListener, array: Arc<Array>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_client(stream, array.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_client(stream: UnixStream, array: Arc<Array>) {
    let (read, mut write) = stream.into_split();
    let mut reader = AsyncBufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        let too_long = line.last() != Some(&b'\n') && n as u64 == MAX_LINE;
        let response = if too_long {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else if let Ok(Request::Fence { port }) = parse_request(&line) {
            // The one request that waits: for the fenced connections to be gone.
            match array.fence(port).await {
                Ok(r) => json!({"ok": true, "port": port, "fenced": true,
                    "connectionsReset": r.connections_reset, "requestsDiscarded": r.requests_discarded}),
                Err(e) => json!({"ok": false, "error": e}),
            }
        } else {
            handle_request(&line, &array)
        };
        let mut out = response.to_string();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() || too_long {
            return;
        }
    }
}

/// Answers one request line. Never panics on any input.
pub fn handle_request(line: &[u8], array: &Array) -> Value {
    match parse_request(line) {
        Ok(Request::Status) => {
            let mut status = array.status_json();
            status["ok"] = true.into();
            status
        }
        Ok(Request::Fault { port, fault }) => match array.apply_fault(port, fault) {
            Ok(()) => json!({"ok": true, "port": port, "fault": fault.to_string()}),
            Err(e) => json!({"ok": false, "error": e}),
        },
        Ok(Request::Fence { .. }) => {
            json!({"ok": false, "error": "fence is answered by the connection loop"})
        }
        Err(e) => json!({"ok": false, "error": e}),
    }
}

#[derive(Debug, PartialEq)]
pub enum Request {
    Status,
    Fault { port: usize, fault: Fault },
    Fence { port: usize },
}

const REQUEST_HELP: &str = r#"expected {"port":N,"fault":"down|up|hang|delay=200ms|error-rate=5%|rate=50MiB|clear"}, {"port":N,"fence":true} or {"status":true}"#;

pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| format!("invalid JSON: {e}; {REQUEST_HELP}"))?;
    let Value::Object(map) = value else {
        return Err(format!("request is not a JSON object; {REQUEST_HELP}"));
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "port" | "fault" | "status" | "fence"))
    {
        return Err(format!("unknown field `{unknown}`; {REQUEST_HELP}"));
    }
    let port_of = |port: &Value| {
        port.as_u64()
            .and_then(|p| usize::try_from(p).ok())
            .ok_or_else(|| format!("`port` must be a non-negative integer, got {port}"))
    };
    if let Some(fence) = map.get("fence") {
        return match (fence, map.get("port"), map.len()) {
            (Value::Bool(true), Some(port), 2) => Ok(Request::Fence {
                port: port_of(port)?,
            }),
            (Value::Bool(true), None, _) => Err(format!("missing `port`; {REQUEST_HELP}")),
            (Value::Bool(true), _, _) => Err(format!("`fence` takes only `port`; {REQUEST_HELP}")),
            _ => Err(format!("`fence` must be true; {REQUEST_HELP}")),
        };
    }
    match (map.get("status"), map.get("port"), map.get("fault")) {
        (Some(Value::Bool(true)), None, None) => Ok(Request::Status),
        (Some(_), None, None) => Err(format!("`status` must be true; {REQUEST_HELP}")),
        (None, Some(port), Some(fault)) => {
            let port = port_of(port)?;
            let fault = fault
                .as_str()
                .ok_or_else(|| format!("`fault` must be a string, got {fault}"))?;
            Ok(Request::Fault {
                port,
                fault: Fault::parse(fault)?,
            })
        }
        (None, Some(_), None) => Err(format!("missing `fault`; {REQUEST_HELP}")),
        (None, None, Some(_)) => Err(format!("missing `port`; {REQUEST_HELP}")),
        _ => Err(REQUEST_HELP.to_string()),
    }
}

/// Client side, for `lunmpio target fault|status`: one request, one response line.
pub fn call(socket: &Path, request: &Value) -> anyhow::Result<Value> {
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot connect to control socket {} (is `lunmpio target --control {}` running?)",
            socket.display(),
            socket.display()
        )
    })?;
    // A hung array must not hang the CLI; the array answers control requests even while its ports hang
    // (a fence waits up to 10 s for the connections it reset).
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = request.to_string();
    line.push('\n');
    (&stream)
        .write_all(line.as_bytes())
        .with_context(|| format!("cannot send to control socket {}", socket.display()))?;
    let mut response = String::new();
    Read::take(BufReader::new(&stream), MAX_LINE * 64)
        .read_line(&mut response)
        .with_context(|| format!("no answer from control socket {}", socket.display()))?;
    if response.is_empty() {
        anyhow::bail!(
            "control socket {} closed without answering",
            socket.display()
        );
    }
    serde_json::from_str(&response).with_context(|| {
        format!(
            "invalid answer from control socket {}: {response}",
            socket.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests() {
        assert_eq!(parse_request(br#"{"status":true}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"port":3,"fence":true}"#),
            Ok(Request::Fence { port: 3 })
        );
        assert_eq!(
            parse_request(br#"{"port":2,"fault":"error-rate=5%"}"#),
            Ok(Request::Fault {
                port: 2,
                fault: Fault::ErrorRate(0.05)
            })
        );
    }

    #[test]
    fn rejects_bad_requests_with_a_reason() {
        for (line, needle) in [
            (&b"not json"[..], "invalid JSON"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"port":-1,"fault":"down"}"#, "non-negative integer"),
            (br#"{"port":"0","fault":"down"}"#, "non-negative integer"),
            (br#"{"port":0,"fault":5}"#, "must be a string"),
            (br#"{"port":0,"fault":"delay=soon"}"#, "invalid duration"),
            (br#"{"port":0}"#, "missing `fault`"),
            (br#"{"fault":"down"}"#, "missing `port`"),
            (br#"{"status":false}"#, "must be true"),
            (br#"{"status":true,"port":1}"#, "expected"),
            (br#"{"port":0,"fault":"down","x":1}"#, "unknown field `x`"),
            (br#"{"fence":true}"#, "missing `port`"),
            (br#"{"port":0,"fence":false}"#, "must be true"),
            (
                br#"{"port":0,"fence":true,"fault":"down"}"#,
                "takes only `port`",
            ),
            (br#"{"port":"x","fence":true}"#, "non-negative integer"),
            (b"", "invalid JSON"),
        ] {
            let err = parse_request(line).unwrap_err();
            assert!(
                err.contains(needle),
                "{}: {err}",
                String::from_utf8_lossy(line)
            );
        }
    }
}
