//! `nbds://` paths: TLS 1.3 (NBD_OPT_STARTTLS) from lunmpio's paths to servers we did not write,
//! with certificates made in the test: qemu-nbd with `tls-creds-x509` (which verifies our client
//! certificate) and nbdkit `--tls=require`. Verified I/O flows over both; a server certificate
//! from another CA, a client without a certificate, and a plain `nbd://` path to a TLS-only server
//! each leave the path Failed with the reason, carrying no I/O, while the daemon serves on.

use std::time::Duration;

use lunmpio_testkit::fio::Fio;
use lunmpio_testkit::tls::{Certs, make_certs};
use lunmpio_testkit::*;

const WAIT: Duration = Duration::from_secs(15);

/// qemu-nbd serving a 64 MiB image over TLS on a free TCP port (`-e 4`: several paths), verifying
/// its clients' certificates.
fn qemu_nbd_tls(certs: &Certs) -> (ProcessGuard, u16, tempfile::TempDir) {
    require_tool("qemu-nbd", "qemu-utils");
    let dir = tempdir();
    let image = dir.path().join("disk.img");
    run_ok(
        tool("qemu-img")
            .args(["create", "-f", "raw"])
            .arg(&image)
            .arg("64M"),
    );
    let port = free_port();
    let guard = spawn_tcp_server(
        "qemu-nbd",
        tool("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                certs.dir.path().display()
            ))
            .args([
                "--tls-creds",
                "tls0",
                "-f",
                "raw",
                "-x",
                "vol",
                "-e",
                "4",
                "-t",
            ])
            .args(["-b", "127.0.0.1", "-p", &port.to_string()])
            .arg(&image),
        port,
    );
    (guard, port, dir)
}

/// nbdkit refusing every option but STARTTLS before TLS, over a 64 MiB RAM disk.
fn nbdkit_tls(certs: &Certs) -> (ProcessGuard, u16) {
    require_tool("nbdkit", "nbdkit");
    let port = free_port();
    let guard = spawn_tcp_server(
        "nbdkit",
        tool("nbdkit")
            .args(["--foreground", "--exit-with-parent", "--tls=require"])
            .arg(format!("--tls-certificates={}", certs.dir.path().display()))
            .args(["-i", "127.0.0.1", "-p", &port.to_string(), "memory", "64M"]),
        port,
    );
    (guard, port)
}

fn tls_path(name: &str, uri: &str, ca: &std::path::Path, client: Option<&Certs>) -> String {
    let mut t = format!(
        "[[lun.path]]\nname = \"{name}\"\nuri = \"{uri}\"\ntls_ca = \"{}\"\n",
        ca.display()
    );
    if let Some(c) = client {
        t.push_str(&format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            c.client_cert().display(),
            c.client_key().display()
        ));
    }
    t
}

#[test]
fn nbds_paths_to_qemu_nbd_and_nbdkit_carry_verified_io() {
    let certs = make_certs("lunmpio test CA");
    let (_qemu, qport, _img) = qemu_nbd_tls(&certs);
    let (_kit, kport) = nbdkit_tls(&certs);
    // The CA from [defaults], the client certificate from the LUN q, the paths name only URIs.
    let config = format!(
        "[defaults]\ntls_ca = \"{}\"\n\
         [[lun]]\nname = \"q\"\npolicy = \"round-robin\"\nshared_backing = true\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [[lun.path]]\nname = \"q0\"\nuri = \"nbds://127.0.0.1:{qport}/vol\"\n\
         [[lun.path]]\nname = \"q1\"\nuri = \"nbds://localhost:{qport}/vol\"\n\
         [[lun]]\nname = \"k\"\n\
         [[lun.path]]\nname = \"k0\"\nuri = \"nbds://127.0.0.1:{kport}/\"\n\
         [[lun.path]]\nname = \"k1-plain\"\nuri = \"nbd://127.0.0.1:{kport}/\"\n",
        certs.ca().display(),
        certs.client_cert().display(),
        certs.client_key().display(),
    );
    let daemon = Daemon::spawn(&config);
    // nbdkit --tls=require refuses the plain path; the TLS keys of [defaults] do not make it TLS.
    daemon.wait_path_status("k", "k1-plain", "VDS_MPS_FAILED", WAIT);
    for (lun, path) in [("q", "q0"), ("q", "q1"), ("k", "k0")] {
        daemon.wait_path_status(lun, path, "VDS_MPS_ONLINE", WAIT);
    }
    for lun in ["q", "k"] {
        let fio = Fio::start(&daemon.uri(lun), Duration::from_secs(2), &[]);
        fio.finish(Duration::from_secs(60))
            .assert_clean(&format!("TLS LUN {lun}"));
    }
    let ios = daemon.path_ios("q");
    assert!(
        ios.iter().all(|n| *n > 0),
        "both TLS paths carried I/O: {ios:?}"
    );
}

#[test]
fn a_path_that_fails_tls_is_failed_with_the_reason_and_carries_nothing() {
    let certs = make_certs("lunmpio test CA");
    let other = make_certs("some other CA");
    let (_qemu, qport, _img) = qemu_nbd_tls(&certs);
    let (_kit, kport) = nbdkit_tls(&certs);
    let config = format!(
        "[[lun]]\nname = \"q\"\npolicy = \"round-robin\"\nshared_backing = true\n{}{}{}\
         [[lun]]\nname = \"k\"\n{}[[lun.path]]\nname = \"plain\"\nuri = \"nbd://127.0.0.1:{kport}/\"\n",
        tls_path(
            "good",
            &format!("nbds://127.0.0.1:{qport}/vol"),
            &certs.ca(),
            Some(&certs)
        ),
        // The server's certificate is not signed by the CA this path trusts.
        tls_path(
            "wrong-ca",
            &format!("nbds://localhost:{qport}/vol"),
            &other.ca(),
            Some(&certs)
        ),
        // qemu-nbd verifies its peers: no client certificate, no connection.
        tls_path(
            "no-cert",
            &format!("nbds://127.0.0.1:{qport}/vol?tls-hostname=localhost"),
            &certs.ca(),
            None,
        ),
        tls_path(
            "k0",
            &format!("nbds://127.0.0.1:{kport}/"),
            &certs.ca(),
            None
        ),
    );
    let daemon = Daemon::spawn(&config);
    daemon.wait_path_status("q", "good", "VDS_MPS_ONLINE", WAIT);
    daemon.wait_path_status("k", "k0", "VDS_MPS_ONLINE", WAIT);
    for (lun, path, says) in [
        ("q", "wrong-ca", "certificate"),
        ("q", "no-cert", "client certificate"),
        ("k", "plain", "the server requires TLS"),
    ] {
        daemon.wait_path_status(lun, path, "VDS_MPS_FAILED", WAIT);
        let reason = daemon.path_reason(lun, path);
        eprintln!("{lun}/{path}: {reason}");
        assert!(
            reason.contains(says),
            "{lun}/{path}: {reason:?} should mention {says:?}"
        );
    }
    let fio = Fio::start(&daemon.uri("q"), Duration::from_secs(2), &[]);
    fio.finish(Duration::from_secs(60))
        .assert_clean("a LUN with failed TLS paths");
    let stats = daemon.stats("q");
    for p in stats["paths"].as_array().unwrap() {
        if p["name"] != "good" {
            assert_eq!(p["ios"], 0, "a path that failed TLS carried I/O: {p}");
        }
    }
}

/// An `nbds://` path without `tls_ca`, and TLS keys on a plain path, stop the start with the key
/// and the line.
#[test]
fn tls_keys_are_checked_at_start() {
    let dir = tempdir();
    let config = dir.path().join("lunmpio.toml");
    for (text, says) in [
        (
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbds://127.0.0.1:1/x\"\n",
            "needs tls_ca",
        ),
        (
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbd://127.0.0.1:1/x\"\ntls_ca = \"/etc/hostname\"\n",
            "nbds:// paths only",
        ),
        (
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbds://127.0.0.1:1/x\"\ntls_ca = \"/nonexistent/ca.pem\"\n",
            "/nonexistent/ca.pem",
        ),
        (
            "[[lun]]\nname = \"a\"\n[[lun.path]]\nuri = \"nbds://127.0.0.1:1/x\"\ntls_ca = \"ca.pem\"\ntls_cert = \"c.pem\"\n",
            "tls_cert and tls_key go together",
        ),
        ("[daemon]\ntls = \"maybe\"\n", "not off, on or require"),
        (
            "[daemon]\ntls = \"require\"\n",
            "needs tls_cert and tls_key",
        ),
        (
            "[daemon]\ntls_cert = \"c.pem\"\n",
            "to use TLS on the exports",
        ),
        (
            "[daemon]\ntls = \"on\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
            "/nonexistent/c.pem",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = run(
            std::process::Command::new(lunmpio_bin())
                .args(["doctor", "--config"])
                .arg(&config),
            Duration::from_secs(10),
        );
        let stdout = stdout_text(&out);
        assert_eq!(out.status.code(), Some(2), "{stdout}");
        assert!(
            stdout.contains("config.invalid") && stdout.contains(says),
            "{says:?} missing:\n{stdout}"
        );
    }
}

/// A daemon whose exports speak TLS (`tls = mode`), with the test's server certificate.
fn tls_daemon(certs: &Certs, mode: &str, client_ca: bool) -> (Daemon, Target) {
    let target = TargetSpec::memory("16MiB", 2).spawn();
    let mut extra = format!(
        "tls = \"{mode}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        certs.path("server-cert.pem").display(),
        certs.path("server-key.pem").display()
    );
    if client_ca {
        extra.push_str(&format!("tls_client_ca = \"{}\"\n", certs.ca().display()));
    }
    let daemon = Daemon::spawn_with(&extra, &lun_toml("lun0", "round-robin", &target.uris));
    (daemon, target)
}

/// nbdinfo over `nbds://` with libnbd's `tls-certificates` directory (its `ca-cert.pem`, and
/// `client-cert.pem`/`client-key.pem` when there).
fn nbdinfo_tls(daemon: &Daemon, dir: &std::path::Path) -> std::process::Output {
    require_tool("nbdinfo", "libnbd-bin");
    run(
        tool("nbdinfo").arg("--json").arg(format!(
            "nbds://{}/lun0?tls-certificates={}",
            daemon.nbd,
            dir.display()
        )),
        Duration::from_secs(20),
    )
}

/// A directory with only the CA of `certs` (a client without a certificate of its own).
fn ca_only(certs: &Certs) -> tempfile::TempDir {
    let dir = tempdir();
    std::fs::copy(certs.ca(), dir.path().join("ca-cert.pem")).unwrap();
    dir
}

/// `tls = "require"`: nbdinfo and qemu-img reach the export over TLS with the right CA; a plain
/// client is refused (NBD_REP_ERR_TLS_REQD) and a client trusting another CA fails its handshake,
/// both cleanly, and the export serves on.
#[test]
fn the_export_requires_tls_and_real_clients_use_it() {
    let certs = make_certs("lunmpio test CA");
    let other = make_certs("some other CA");
    let (daemon, _target) = tls_daemon(&certs, "require", false);
    let ca = ca_only(&certs);
    let out = nbdinfo_tls(&daemon, ca.path());
    assert!(
        out.status.success(),
        "nbdinfo over TLS: {}",
        stderr_text(&out)
    );
    assert!(
        stdout_text(&out).contains("\"export-size\": 16777216"),
        "{}",
        stdout_text(&out)
    );

    require_tool("qemu-img", "qemu-utils");
    let qemu = run(
        tool("qemu-img")
            .args(["info", "--output=json", "--object"])
            .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", ca.path().display()))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=lun0,tls-creds=tls0",
                daemon.nbd.rsplit(':').next().unwrap()
            )),
        Duration::from_secs(20),
    );
    assert!(
        qemu.status.success(),
        "qemu-img over TLS: {}",
        stderr_text(&qemu)
    );
    assert!(
        stdout_text(&qemu).contains("\"virtual-size\": 16777216"),
        "{}",
        stdout_text(&qemu)
    );

    let plain = run(
        tool("nbdinfo").arg(format!("nbd://{}/lun0", daemon.nbd)),
        Duration::from_secs(20),
    );
    assert!(
        !plain.status.success(),
        "a plain client was served by a TLS-only export"
    );
    let wrong = nbdinfo_tls(&daemon, ca_only(&other).path());
    assert!(
        !wrong.status.success(),
        "a client trusting another CA got through"
    );
    let again = nbdinfo_tls(&daemon, ca.path());
    assert!(
        again.status.success(),
        "the export serves on: {}",
        stderr_text(&again)
    );
}

/// Mutual TLS (`tls_client_ca`): a client without a certificate is refused, one with a certificate
/// the CA signed is served; `tls = "on"` serves plain clients and TLS clients alike.
#[test]
fn mutual_tls_and_optional_tls() {
    let certs = make_certs("lunmpio test CA");
    let (daemon, _t) = tls_daemon(&certs, "require", true);
    assert!(
        !nbdinfo_tls(&daemon, ca_only(&certs).path())
            .status
            .success(),
        "no client certificate"
    );
    let with_cert = nbdinfo_tls(&daemon, certs.dir.path());
    assert!(
        with_cert.status.success(),
        "with a client certificate: {}",
        stderr_text(&with_cert)
    );

    let (daemon, _t) = tls_daemon(&certs, "on", false);
    assert!(
        nbdinfo_tls(&daemon, ca_only(&certs).path())
            .status
            .success(),
        "TLS when offered"
    );
    let plain = run(
        tool("nbdinfo").arg(format!("nbd://{}/lun0", daemon.nbd)),
        Duration::from_secs(20),
    );
    assert!(
        plain.status.success(),
        "plain when TLS is only offered: {}",
        stderr_text(&plain)
    );
}

/// New certificates are taken by a reload without dropping a connection: fio keeps verifying over
/// the old session while the files change, and new clients need the new CA.
#[test]
fn a_reload_takes_new_certificates_and_keeps_connections() {
    let first = make_certs("first CA");
    let second = make_certs("second CA");
    let live = tempdir();
    for name in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(first.path(name), live.path().join(name)).unwrap();
    }
    let target = TargetSpec::memory("64MiB", 2).spawn();
    let daemon = Daemon::spawn_with(
        &format!(
            "tls = \"on\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            live.path().join("server-cert.pem").display(),
            live.path().join("server-key.pem").display()
        ),
        &lun_toml("lun0", "round-robin", &target.uris),
    );
    assert!(
        nbdinfo_tls(&daemon, ca_only(&first).path())
            .status
            .success()
    );
    // A plain fio keeps a connection through the reload (fio's nbd engine has no TLS).
    let mut fio = Fio::start(&daemon.uri("lun0"), Duration::from_secs(3), &[]);
    for name in ["server-cert.pem", "server-key.pem"] {
        std::fs::copy(second.path(name), live.path().join(name)).unwrap();
    }
    let out = run(daemon.cli().arg("reload"), Duration::from_secs(20));
    assert!(out.status.success(), "reload: {}", stderr_text(&out));
    fio.assert_running("after the reload");
    assert!(
        !nbdinfo_tls(&daemon, ca_only(&first).path())
            .status
            .success(),
        "the old CA"
    );
    let new = nbdinfo_tls(&daemon, ca_only(&second).path());
    assert!(new.status.success(), "the new CA: {}", stderr_text(&new));
    fio.finish(Duration::from_secs(60))
        .assert_clean("a reload of TLS certificates");
}

/// A live upgrade cannot hand a TLS session over: the connection is closed at a request boundary
/// with every reply written, and a client that reconnects (qemu's `reconnect-delay`) goes on over a
/// new TLS session with the new program, its data intact and no error.
#[test]
fn a_live_upgrade_closes_tls_sessions_cleanly_and_qemu_reconnects() {
    require_tool("qemu-io", "qemu-utils");
    let certs = make_certs("lunmpio test CA");
    let (daemon, _t) = tls_daemon(&certs, "require", false);
    let ca = ca_only(&certs);
    let port = daemon.nbd.rsplit(':').next().unwrap().to_string();
    // Write, wait while the daemon upgrades, read back and check, write again.
    let qemu = ProcessGuard::spawn(
        "qemu-io",
        tool("qemu-io")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                ca.path().display()
            ))
            .arg("--image-opts")
            .arg(format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=lun0,\
                 tls-creds=tls0,reconnect-delay=10"
            ))
            .args([
                "-c",
                "write -P 0x5a 0 1M",
                "-c",
                "sleep 4000",
                "-c",
                "read -P 0x5a 0 1M",
            ])
            .args(["-c", "write -P 0x6b 1M 1M", "-c", "read -P 0x6b 1M 1M"]),
    );
    // The first write is through before the upgrade starts.
    assert!(wait_until(WAIT, || daemon
        .path_ios("lun0")
        .iter()
        .sum::<u64>()
        > 0));
    let out = run(daemon.cli().arg("upgrade"), Duration::from_secs(150));
    assert!(out.status.success(), "upgrade: {}", stderr_text(&out));
    let done = qemu.wait_output(Duration::from_secs(60));
    let text = stdout_text(&done);
    assert!(
        done.status.success(),
        "qemu-io: {text}{}",
        stderr_text(&done)
    );
    assert!(
        !text.contains("Pattern verification failed") && !text.to_lowercase().contains("error"),
        "{text}"
    );
    assert_eq!(
        text.matches("read 1048576/1048576 bytes").count(),
        2,
        "{text}"
    );
    let info = daemon.rpc_ok("GetDaemonInfo", serde_json::json!({}));
    assert_eq!(info["upgrades"], 1, "{info}");
    // The TLS connection ended at its request boundary: the handover did not wait it out.
    let log = daemon.log();
    assert!(
        !log.contains("did not detach"),
        "the handover waited for the TLS connection:\n{log}"
    );
}
