//! `lunmpio serve` given bad input: a path to another volume, bad configurations, HTTP requests off the
//! metrics route, and a SIGTERM with I/O stuck in flight.

use std::process::Command;
use std::time::{Duration, Instant};

use lunmpio_testkit::*;
use serde_json::json;

#[test]
fn a_path_to_a_volume_of_another_size_is_refused_and_never_used() {
    let right = TargetSpec::memory("32MiB", 2).spawn();
    let wrong = TargetSpec::memory("16MiB", 1).spawn();
    let uris = vec![
        right.uri(0).to_string(),
        right.uri(1).to_string(),
        wrong.uri(0).to_string(),
    ];
    let daemon = Daemon::spawn(&format!(
        "[defaults]\ncheck_interval = \"100ms\"\n\n{}",
        lun_toml("lun0", "round-robin", &uris)
    ));
    daemon.wait_path_status("lun0", "p2", "VDS_MPS_FAILED", Duration::from_secs(10));
    let info = daemon.rpc_ok("GetPathInfo", json!({ "lun": "lun0" }));
    let p2 = info["paths"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "p2")
        .unwrap();
    let reason = p2["statusReason"].as_str().unwrap_or_default();
    assert!(reason.contains("identity mismatch"), "reason: {p2}");
    let luns = daemon.rpc_ok("ListLuns", json!({}));
    assert_eq!(
        luns["luns"][0]["size"],
        32 << 20,
        "the majority's size: {luns}"
    );
    assert_eq!(luns["luns"][0]["usablePaths"], 2, "{luns}");
    let events = daemon.rpc_ok("GetEvents", json!({ "lun": "lun0" }));
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "p2"
                && e["cause"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("identity mismatch")),
        "the refusal is in the event log: {events}"
    );

    // Writes and reads through the export, across several health-check rounds of the refused path.
    block_on(async {
        let client = nbd_connect(&daemon.nbd, "lun0").await;
        let data = bytes::Bytes::from(pseudo_random(64 << 10, 5));
        for i in 0..64u64 {
            client
                .write(
                    i * (64 << 10),
                    data.clone(),
                    lunmpio_nbd::CommandFlags::empty(),
                )
                .await
                .unwrap();
            client.read(i * (64 << 10), 64 << 10).await.unwrap();
        }
        client.flush().await.unwrap();
        client.disconnect().await;
    });
    // The refused path is retried by its health check (a reconnect after the one at start) and refused
    // again.
    let retried = wait_until(Duration::from_secs(10), || {
        wrong.status()["ports"][0]["connectionsTotal"]
            .as_u64()
            .unwrap()
            >= 2
    });
    assert!(
        retried,
        "the refused path was never retried: {}",
        wrong.status()
    );
    wait_until(Duration::from_secs(2), || {
        wrong.status()["ports"][0]["connections"] == 0
    });
    let stats = daemon.stats("lun0");
    assert_eq!(
        path_counter(&stats, "p2", "ios"),
        0,
        "the refused path carried I/O: {stats}"
    );
    assert_eq!(daemon.path_status("lun0", "p2"), "VDS_MPS_FAILED");
    assert!(path_counter(&stats, "p0", "writes") + path_counter(&stats, "p1", "writes") >= 64);
    let port = &wrong.status()["ports"][0];
    for counter in ["writes", "bytesWritten"] {
        assert_eq!(port[counter], 0, "the wrong volume saw {counter}: {port}");
    }
    // Not even the health check's read probe may touch it: a reconnected path's handshake already
    // tells its size, so identity is checked before any request goes to the volume.
    for counter in ["reads", "bytesRead", "requests"] {
        assert_eq!(
            port[counter], 0,
            "the wrong volume saw {counter} (a probe read before the identity check?): {port}"
        );
    }
}

/// Runs `lunmpio serve` on a config that must be refused; returns stderr.
fn refused(config_text: Option<&str>) -> (String, std::path::PathBuf) {
    let dir = tempdir();
    let config = dir.path().join("lunmpio.toml");
    let socket = dir.path().join("control.sock");
    if let Some(text) = config_text {
        let text = text
            .replace("SOCKET", &socket.display().to_string())
            .replace("STATE", &dir.path().join("state").display().to_string());
        std::fs::write(&config, text).unwrap();
    }
    let mut c = Command::new(lunmpio_bin());
    c.arg("serve").arg("--config").arg(&config);
    let started = Instant::now();
    let out = run(&mut c, Duration::from_secs(20));
    assert!(
        !out.status.success(),
        "serve accepted a bad config:\n{}",
        stderr_text(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusal took {:?}",
        started.elapsed()
    );
    assert!(
        !socket.exists(),
        "the control socket was created before the config was checked"
    );
    assert!(
        stdout_text(&out).is_empty(),
        "no ready line: {}",
        stdout_text(&out)
    );
    (stderr_text(&out), config)
}

const HEAD: &str = "[daemon]\nnbd_listen = \"127.0.0.1:0\"\ncontrol_socket = \"SOCKET\"\nmetrics_listen = \"\"\nstate_dir = \"STATE\"\n";

#[test]
fn a_bad_config_stops_startup_naming_the_key_and_the_line() {
    // Unknown key (line 7).
    let (err, file) = refused(Some(&format!("{HEAD}[defaults]\ncolour = \"blue\"\n")));
    assert!(
        err.contains("colour") && err.contains(&format!("{}:7:", file.display())),
        "{err}"
    );
    // Unknown key in a path table (line 10).
    let (err, file) = refused(Some(&format!(
        "{HEAD}[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://127.0.0.1:1/a\"\nwieght = 3\n"
    )));
    assert!(
        err.contains("wieght") && err.contains(&format!("{}:10:", file.display())),
        "{err}"
    );
    // Bad value (line 7).
    let (err, file) = refused(Some(&format!("{HEAD}[defaults]\nio_timeout = \"soon\"\n")));
    assert!(
        err.contains("defaults.io_timeout") && err.contains(&format!("{}:7:", file.display())),
        "{err}"
    );
    let (err, _) = refused(Some(&format!("{HEAD}[defaults]\npolicy = \"fastest\"\n")));
    assert!(
        err.contains("defaults.policy") && err.contains("fastest"),
        "{err}"
    );
    // A bad [daemon] value.
    let (err, _) = refused(Some(
        "[daemon]\nnbd_listen = \"nowhere\"\ncontrol_socket = \"SOCKET\"\nstate_dir = \"STATE\"\n",
    ));
    assert!(err.contains("daemon.nbd_listen"), "{err}");
    // Duplicate LUN name (line 11).
    let (err, file) = refused(Some(&format!(
        "{HEAD}[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://127.0.0.1:1/a\"\n[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://127.0.0.1:1/b\"\n"
    )));
    assert!(
        err.contains("lun[1].name")
            && err.contains("duplicate")
            && err.contains(&format!("{}:11:", file.display())),
        "{err}"
    );
    // Not TOML at all.
    let (err, file) = refused(Some("[daemon\n"));
    assert!(err.contains(&format!("{}:1:", file.display())), "{err}");
    // Missing file.
    let (err, file) = refused(None);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn metrics_answer_get_metrics_with_every_family_and_404_elsewhere() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    let addr = daemon
        .metrics
        .clone()
        .expect("metrics address in the ready line");
    drive_reads(&daemon.nbd, "lun0", 20);
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    for family in [
        "# TYPE lunmpio_path_ios_total counter",
        "# TYPE lunmpio_path_read_bytes_total counter",
        "# TYPE lunmpio_path_written_bytes_total counter",
        "# TYPE lunmpio_path_errors_total counter",
        "# TYPE lunmpio_path_in_flight gauge",
        "# TYPE lunmpio_path_status gauge",
        "# TYPE lunmpio_path_failovers_total counter",
        "# TYPE lunmpio_path_latency_seconds histogram",
        "# TYPE lunmpio_lun_queued_ios gauge",
        "# TYPE lunmpio_lun_policy gauge",
        "# TYPE lunmpio_lun_usable_paths gauge",
        "# TYPE lunmpio_events_total counter",
        "# TYPE lunmpio_build_info gauge",
        "# TYPE lunmpio_path_hold_down_seconds gauge",
        "# TYPE lunmpio_lun_all_paths_down_seconds gauge",
        "# TYPE lunmpio_lun_outage_seconds_total counter",
    ] {
        assert!(body.contains(family), "missing {family:?} in:\n{body}");
    }
    for line in [
        "lunmpio_path_ios_total{lun=\"lun0\",path=\"p0\",op=\"read\"} 10",
        "lunmpio_path_ios_total{lun=\"lun0\",path=\"p1\",op=\"read\"} 10",
        "lunmpio_path_status{lun=\"lun0\",path=\"p1\"} 1",
        "lunmpio_path_read_bytes_total{lun=\"lun0\",path=\"p0\"} 40960",
        "lunmpio_path_latency_seconds_count{lun=\"lun0\",path=\"p0\"} 10",
        "lunmpio_path_latency_seconds_bucket{le=\"+Inf\",lun=\"lun0\",path=\"p0\"} 10",
        "lunmpio_lun_queued_ios{lun=\"lun0\"} 0",
        "lunmpio_lun_policy{lun=\"lun0\"} 2",
        "lunmpio_lun_usable_paths{lun=\"lun0\"} 2",
        "lunmpio_events_total{lun=\"lun0\",kind=\"path_online\"} 2",
        &format!(
            "lunmpio_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
        &format!(
            "lunmpio_path_info{{lun=\"lun0\",path=\"p1\",uri=\"{}\",transport=\"tcp\",interconnect=\"VDS_HWT_UNKNOWN\"}} 1",
            target.uris[1]
        ),
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }
    // Every sample line parses as NAME{LABELS} VALUE.
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (_, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {l:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {l:?}");
    }
    for path in ["/", "/metricsx", "/favicon.ico", "/metrics/x"] {
        let (status, _) = http_get(&addr, path);
        assert_eq!(status, 404, "GET {path}");
    }
    // Prometheus's own parser (promtool) accepts the classic text and finds nothing to lint.
    require_tool(
        "promtool",
        "prometheus` (or run scripts/install-deps, which installs only promtool",
    );
    let mut lint = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        lint.stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
    }
    let lint = lint.wait_with_output().unwrap();
    assert!(
        lint.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    // A scraper that asks for OpenMetrics (Prometheus does) gets it: the same samples, families named
    // without `_total`, and the closing `# EOF`.
    let (status, head, om) = http_get_with(
        &addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    );
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Type: application/openmetrics-text"),
        "{head}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE lunmpio_path_ios counter\n"), "{om}");
    assert!(om.contains("# TYPE lunmpio_build info\n"), "{om}");
    // OpenMetrics family names are unique (a gauge and a counter may not share one).
    let mut families: Vec<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let count = families.len();
    families.sort_unstable();
    families.dedup();
    assert_eq!(families.len(), count, "a family name twice in:\n{om}");
    let samples = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        samples(&om).len(),
        samples(&body).len(),
        "the same samples in both formats"
    );
}

/// `/healthz` answers while the daemon runs; `/readyz` answers 200 while every LUN has a usable path
/// and 503 naming the LUN when one has none (every port of its target down), and 200 again once a
/// path is back: what a Kubernetes readiness probe or a load balancer reads.
#[test]
fn healthz_and_readyz_follow_the_luns_usable_paths() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    let addr = daemon.metrics.clone().expect("metrics address");
    assert_eq!(http_get(&addr, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(&addr, "/readyz"), (200, "ready\n".to_string()));
    target.fault(0, "down");
    target.fault(1, "down");
    daemon.wait_path_status("lun0", "p0", "VDS_MPS_FAILED", Duration::from_secs(10));
    daemon.wait_path_status("lun0", "p1", "VDS_MPS_FAILED", Duration::from_secs(10));
    let (status, body) = http_get(&addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no usable path for lun0"), "{body}");
    assert_eq!(http_get(&addr, "/healthz").0, 200, "alive while not ready");
    let sample = |series: &str| -> f64 {
        let (_, body) = http_get(&addr, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
    };
    // The outage is measured while it lasts (the LUN is path-less once its control task says so).
    assert!(wait_until(Duration::from_secs(10), || {
        sample("lunmpio_lun_all_paths_down_seconds{lun=\"lun0\"}") > 0.0
    }));
    target.fault(1, "up");
    daemon.wait_path_status("lun0", "p1", "VDS_MPS_ONLINE", Duration::from_secs(10));
    assert_eq!(http_get(&addr, "/readyz"), (200, "ready\n".to_string()));
    assert!(wait_until(Duration::from_secs(10), || {
        sample("lunmpio_lun_all_paths_down_seconds{lun=\"lun0\"}") == 0.0
    }));
    assert!(
        sample("lunmpio_lun_outage_seconds_total{lun=\"lun0\"}") > 0.0,
        "the outage is counted"
    );
}

#[test]
fn sigterm_with_io_stuck_in_flight_exits_within_shutdown_timeout() {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let mut daemon = Daemon::spawn_with(
        "shutdown_timeout = \"2s\"",
        &format!(
            "[defaults]\nio_timeout = \"60s\"\nadaptive_timeout = false\ncheck_interval = \"30s\"\n\n{}",
            lun_toml("lun0", "round-robin", &target.uris)
        ),
    );
    target.fault(0, "hang");
    target.fault(1, "hang");
    let addr = daemon.nbd.clone();
    let reader = std::thread::spawn(move || {
        block_on(async {
            let client = nbd_connect(&addr, "lun0").await;
            let reads: Vec<_> = (0..8u64).map(|i| client.read(i * 4096, 4096)).collect();
            futures::future::join_all(reads).await
        })
    });
    let stuck = wait_until(Duration::from_secs(10), || {
        daemon.stats("lun0")["paths"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["inFlight"].as_u64().unwrap())
            .sum::<u64>()
            >= 8
    });
    assert!(
        stuck,
        "reads never got stuck on the hung paths: {}",
        daemon.stats("lun0")
    );
    let started = Instant::now();
    let status = daemon.terminate(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        took <= Duration::from_millis(2000 + 1500),
        "exit took {took:?} with shutdown_timeout 2s"
    );
    assert!(
        took >= Duration::from_millis(1500),
        "exit took {took:?}: did it wait for the drain at all?"
    );
    assert!(
        status.success(),
        "exit status {status}\nlog:\n{}",
        daemon.log()
    );
    // The client is not left hanging: its requests fail (or its connection ends).
    let results = reader.join().unwrap();
    assert!(results.iter().all(|r| r.is_err()), "{results:?}");
}
