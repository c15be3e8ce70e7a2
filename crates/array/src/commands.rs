//! `lunmpio target fault` and `lunmpio target status`: thin clients of a running target's control socket.

use std::process::ExitCode;

use serde_json::{Value, json};

use crate::args::{TargetFaultArgs, TargetFenceArgs, TargetStatusArgs};
use crate::fault_api;
use lunmpio_human::{format_duration, format_size};

pub fn fault(args: TargetFaultArgs) -> anyhow::Result<ExitCode> {
    let request = json!({"port": args.port, "fault": args.fault.to_string()});
    let response = fault_api::call(&args.control, &request)?;
    if response["ok"] == Value::Bool(true) {
        println!("port {}: {}", args.port, args.fault);
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("{}", error_text(&response))
    }
}

pub fn fence(args: TargetFenceArgs) -> anyhow::Result<ExitCode> {
    let request = json!({"port": args.port, "fence": true});
    let response = fault_api::call(&args.control, &request)?;
    if response["ok"] == Value::Bool(true) {
        println!(
            "port {}: fenced ({} connections reset, {} held requests discarded)",
            args.port,
            response["connectionsReset"].as_u64().unwrap_or(0),
            response["requestsDiscarded"].as_u64().unwrap_or(0)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("{}", error_text(&response))
    }
}

pub fn status(args: TargetStatusArgs) -> anyhow::Result<ExitCode> {
    let response = fault_api::call(&args.control, &json!({"status": true}))?;
    if response["ok"] != Value::Bool(true) {
        anyhow::bail!("{}", error_text(&response));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&response)?);
    } else {
        print!("{}", status_table(&response));
    }
    Ok(ExitCode::SUCCESS)
}

fn error_text(response: &Value) -> String {
    response["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("unexpected answer: {response}"))
}

/// Renders the status object for people. Missing fields render as `?` rather than failing: the table
/// must never be the reason an operator cannot see the state.
pub fn status_table(status: &Value) -> String {
    let export = &status["export"];
    let mut out = format!(
        "export {}  size {}  backing {}",
        export["name"].as_str().unwrap_or("?"),
        export["size"]
            .as_u64()
            .map(format_size)
            .unwrap_or_else(|| "?".into()),
        export["backing"].as_str().unwrap_or("?"),
    );
    if let Some(a) = export["allocatedBytes"].as_u64() {
        out.push_str(&format!(" ({} allocated)", format_size(a)));
    }
    out.push('\n');
    let header = [
        "PORT", "ADDRESS", "STATE", "FAULTS", "CONNS", "REQUESTS", "READ", "WRITTEN", "INJECTED",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for p in status["ports"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let num = |k: &str| {
            p[k].as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into())
        };
        let bytes = |k: &str| p[k].as_u64().map(format_size).unwrap_or_else(|| "?".into());
        rows.push(vec![
            num("port"),
            p["address"].as_str().unwrap_or("?").to_string(),
            p["state"].as_str().unwrap_or("?").to_string(),
            describe_faults(&p["faults"]),
            num("connections"),
            num("requests"),
            bytes("bytesRead"),
            bytes("bytesWritten"),
            num("errorsInjected"),
        ]);
    }
    out.push_str(&lunmpio_human::render_table(&rows));
    out
}

fn describe_faults(f: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(ms) = f["delayMs"].as_f64().filter(|ms| *ms > 0.0) {
        parts.push(format!(
            "delay={}",
            format_duration(std::time::Duration::from_secs_f64(ms / 1e3))
        ));
    }
    if let Some(p) = f["errorRate"].as_f64().filter(|p| *p > 0.0) {
        parts.push(format!("error-rate={}%", (p * 100.0 * 1e6).round() / 1e6));
    }
    if let Some(r) = f["rateBytesPerSec"].as_u64() {
        parts.push(format!("rate={}/s", format_size(r).replace(' ', "")));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_tolerates_missing_fields() {
        let t = status_table(&json!({}));
        assert!(t.contains("PORT"));
        let t = status_table(
            &json!({"export": {"name": "lun0", "size": 1048576, "backing": "memory 1 MiB"},
            "ports": [{"port": 0, "address": "127.0.0.1:1", "state": "up",
                "faults": {"delayMs": 200.0, "errorRate": 0.05, "rateBytesPerSec": 1048576},
                "connections": 1, "requests": 5, "bytesRead": 4096, "bytesWritten": 0, "errorsInjected": 0}]}),
        );
        assert!(t.contains("delay=200ms,error-rate=5%,rate=1MiB/s"), "{t}");
        assert!(t.contains("4 KiB"), "{t}");
    }
}
