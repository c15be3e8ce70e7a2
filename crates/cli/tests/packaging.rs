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
