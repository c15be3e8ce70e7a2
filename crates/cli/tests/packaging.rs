//! The files under `packaging/`: the example configuration parses with the daemon's own parser and
//! means what its comments say, and the systemd unit runs the daemon with the hardening it promises.

use std::path::PathBuf;
use std::time::Duration;

use lunmpio_daemon::config::{Config, ListenAddr};
use lunmpio_engine::{Failback, NoPathRetry};
use lunmpio_vds::LoadBalancePolicy;

fn packaging(file: &str) -> (String, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (text, path.display().to_string())
}

#[test]
fn example_config_parses() {
    let (text, file) = packaging("lunmpio.toml");
    let config = Config::parse(&text, &file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.daemon.nbd_listen,
        ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
    );
    assert_eq!(
        config.daemon.control_socket,
        PathBuf::from("/run/lunmpio/control.sock")
    );
    assert_eq!(config.daemon.state_dir, PathBuf::from("/var/lib/lunmpio"));
    assert_eq!(config.daemon.shutdown_timeout, Duration::from_secs(10));

    assert_eq!(config.luns.len(), 2);
    let db = &config.luns[0];
    assert_eq!(db.name, "db-data");
    assert_eq!(db.settings.policy, LoadBalancePolicy::DynLeastQueueDepth);
    assert_eq!(db.size_bytes, Some(100 << 30));
    assert!(db.shared_backing);
    assert_eq!(db.paths.len(), 4);
    assert_eq!(db.settings.io_timeout, Duration::from_secs(5));
    assert_eq!(
        db.settings.no_path_retry,
        NoPathRetry::For(Duration::from_secs(30))
    );

    let logs = &config.luns[1];
    assert_eq!(logs.settings.policy, LoadBalancePolicy::Failover);
    assert_eq!(
        logs.settings.failback,
        Failback::After(Duration::from_secs(30))
    );
    assert_eq!(logs.settings.no_path_retry, NoPathRetry::Fail);
    assert!(logs.paths[0].primary);
    assert_eq!(logs.paths[1].weight, 10);
    // Every LUN can be turned into the engine's view (ids, names).
    for lun in &config.luns {
        let spec = lun.to_spec();
        assert_eq!(spec.paths.len(), lun.paths.len());
    }
}

#[test]
fn systemd_unit_is_hardened() {
    let (text, _) = packaging("lunmpio.service");
    for line in [
        "ExecStart=/usr/bin/lunmpio serve --config /etc/lunmpio/lunmpio.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=lunmpio",
        "StateDirectory=lunmpio",
        "CapabilityBoundingSet=",
        "ReadWritePaths=/run/lunmpio /var/lib/lunmpio",
    ] {
        assert!(
            text.lines().any(|l| l.trim() == line),
            "missing `{line}` in lunmpio.service"
        );
    }
    for section in ["[Unit]", "[Service]", "[Install]"] {
        assert!(text.contains(section), "missing {section}");
    }
}

/// The socket units hand the daemon the listeners the example config names, by the names the daemon
/// looks for, and the service takes them (and keeps the socket's directory when it stops).
#[test]
fn socket_units_match_the_example_config() {
    let (config_text, file) = packaging("lunmpio.toml");
    let config = Config::parse(&config_text, &file).unwrap_or_else(|e| panic!("{e}"));
    let value = |text: &str, key: &str| -> String {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in the unit"))
            .to_string()
    };
    let (nbd, _) = packaging("lunmpio-nbd.socket");
    assert_eq!(
        ListenAddr::Tcp(value(&nbd, "ListenStream").parse().unwrap()),
        config.daemon.nbd_listen
    );
    assert_eq!(value(&nbd, "FileDescriptorName"), "nbd");
    assert_eq!(value(&nbd, "Service"), "lunmpio.service");
    let (control, _) = packaging("lunmpio-control.socket");
    assert_eq!(
        PathBuf::from(value(&control, "ListenStream")),
        config.daemon.control_socket
    );
    assert_eq!(value(&control, "FileDescriptorName"), "control");
    assert_eq!(value(&control, "SocketMode"), "0600");
    let (service, _) = packaging("lunmpio.service");
    assert_eq!(
        value(&service, "Sockets"),
        "lunmpio-nbd.socket lunmpio-control.socket"
    );
    assert_eq!(value(&service, "RuntimeDirectoryPreserve"), "yes");
}

fn packaging_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging")
}

/// Every `lunmpio_*` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("lunmpio_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// `promtool check rules` accepts packaging/prometheus/alerts.yml, `promtool test rules` passes its
/// unit tests (alerts_test.yml), and every alert has a test that expects it to fire.
#[test]
fn prometheus_alerts_pass_promtool_and_each_has_a_unit_test() {
    lunmpio_testkit::require_tool(
        "promtool",
        "prometheus` (or run scripts/install-deps, which installs only promtool",
    );
    let dir = packaging_dir().join("prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (rules, _) = packaging("prometheus/alerts.yml");
    let (tests, _) = packaging("prometheus/alerts_test.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 6, "{alerts:?}");
    for alert in alerts {
        // A test case that expects it: its alertname followed by a non-empty exp_alerts.
        let fires = tests.split("- eval_time:").any(|case| {
            case.contains(&format!("alertname: {alert}\n")) && case.contains("exp_labels:")
        });
        assert!(fires, "no unit test expects {alert} to fire");
    }
}

/// Every metric the alerts and the Grafana dashboard name exists in a live daemon's `/metrics`, so a
/// rename cannot silently blind them.
#[test]
fn every_metric_in_the_alerts_and_the_dashboard_is_served() {
    use lunmpio_testkit::*;
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let daemon = Daemon::spawn(&lun_toml("lun0", "round-robin", &target.uris));
    let (status, body) = http_get(daemon.metrics.as_deref().expect("metrics"), "/metrics");
    assert_eq!(status, 200);
    let served: std::collections::BTreeSet<String> = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l[..l.find(['{', ' ']).unwrap_or(l.len())].to_string())
        .collect();
    let (rules, _) = packaging("prometheus/alerts.yml");
    let (dashboard, _) = packaging("grafana/lunmpio.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    for (file, text) in [("alerts.yml", &rules), ("lunmpio.json", &dashboard)] {
        let named = metric_names(text);
        assert!(named.len() >= 5, "{file} names {named:?}");
        let missing: Vec<&String> = named.iter().filter(|n| !served.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "{file} names metrics a daemon does not serve: {missing:?}\nserved: {served:?}"
        );
    }
}

/// The Kubernetes manifests fit the daemon: the ConfigMap's config parses with the daemon's parser,
/// the probes ask /healthz and /readyz on the port the config's metrics listener uses, on an address
/// the kubelet reaches (host network), and the hostPath volumes are where the config keeps its
/// control socket and state.
#[test]
fn kubernetes_manifests_match_the_daemon() {
    let (configmap, file) = packaging("kubernetes/configmap.yaml");
    // The block under `lunmpio.toml: |`, de-indented.
    let lines: Vec<&str> = configmap.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "lunmpio.toml: |")
        .expect("lunmpio.toml in the ConfigMap")
        + 1;
    let indent = lines[start].len() - lines[start].trim_start().len();
    let toml: String = lines[start..]
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .map(|l| format!("{}\n", l.get(indent..).unwrap_or("")))
        .collect();
    let config = Config::parse(&toml, &file).unwrap_or_else(|e| panic!("{e}"));
    let metrics = config.daemon.metrics_listen.expect("metrics on");
    assert!(
        metrics.ip().is_unspecified(),
        "the kubelet probes the node address: {metrics}"
    );

    let (ds, _) = packaging("kubernetes/daemonset.yaml");
    let has = |line: &str| ds.lines().any(|l| l.trim() == line);
    for line in [
        "hostNetwork: true",
        "path: /healthz",
        "path: /readyz",
        &format!("containerPort: {}", metrics.port()),
        "args: [\"serve\", \"--config\", \"/etc/lunmpio/lunmpio.toml\"]",
        "mountPath: /etc/lunmpio",
        &format!(
            "mountPath: {}",
            config.daemon.control_socket.parent().unwrap().display()
        ),
        &format!("mountPath: {}", config.daemon.state_dir.display()),
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
        "drop: [\"ALL\"]",
    ] {
        assert!(has(line), "daemonset.yaml lacks `{line}`");
    }
    let grace: u64 = ds
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .expect("terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    assert!(
        Duration::from_secs(grace) > config.daemon.shutdown_timeout,
        "the pod is killed before the daemon's drain ends"
    );
}
