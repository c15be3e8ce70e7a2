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
