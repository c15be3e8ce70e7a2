//! The C ABI end to end: a C program (`tests/c/vds_client.c`), compiled here with the system C
//! compiler and linked against `liblunmpio_vds_com.so`, calls every method of IVdsLunMpio and
//! IVdsHwProviderPrivateMpio through the vtables against a live daemon (started in this process),
//! under valgrind; then the daemon is restarted without the LUN (the LUN object must answer
//! `VDS_E_OBJECT_DELETED`), and finally stopped: every call must fail with an HRESULT.
//!
//! `cc` and `valgrind` are required: the test fails (it does not skip) when either is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const LUN: &str = "lun0";

/// Fails the test with an install hint unless `tool` runs.
fn require(tool: &str, hint: &str) {
    match Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{tool} --version` failed ({s}); {hint}"),
        Err(e) => panic!("`{tool}` is required by this test and was not found ({e}); {hint}"),
    }
}

/// The directory holding the crate's `liblunmpio_vds_com.so`: `target/<profile>` when cargo uplifted
/// it (`cargo test -p lunmpio-vds-com`), else `target/<profile>/deps` (a workspace-wide nextest run
/// builds it there without the uplift).
fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe
        .parent()
        .expect("target/<profile>/deps/<test>")
        .to_path_buf();
    let profile = deps.parent().expect("target/<profile>").to_path_buf();
    for dir in [profile, deps] {
        if dir.join("liblunmpio_vds_com.so").exists() {
            return dir;
        }
    }
    panic!(
        "liblunmpio_vds_com.so is missing next to {}: build the crate (cargo test -p lunmpio-vds-com builds it)",
        exe.display()
    );
}

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles the C client with warnings as errors.
fn compile_client(out: &Path) {
    let root = crate_dir().join("../..");
    let libdir = library_dir();
    let output = Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-g",
            "-O1",
        ])
        .arg("-I")
        .arg(root.join("include"))
        .arg(crate_dir().join("tests/c/vds_client.c"))
        .arg("-L")
        .arg(&libdir)
        .arg("-llunmpio_vds_com")
        .arg(format!("-Wl,-rpath,{}", libdir.display()))
        .arg("-o")
        .arg(out)
        .output()
        .expect("run cc");
    assert!(
        output.status.success(),
        "cc failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A LUN of five paths: three file paths to one 64 MiB file (hard links, so the URIs differ) on
/// two HBA ports, an iSCSI-typed NBD path bound to 127.0.0.1 whose target refuses connections, and
/// an NBD-over-Unix path whose socket does not exist.
fn config(dir: &Path) -> String {
    let disk = dir.join("disk.img");
    let file = std::fs::File::create(&disk).unwrap();
    file.set_len(64 << 20).unwrap();
    drop(file);
    for name in ["disk-b.img", "disk-c.img"] {
        std::fs::hard_link(&disk, dir.join(name)).unwrap();
    }
    let d = dir.display();
    format!(
        r#"
[daemon]
nbd_listen = "127.0.0.1:0"
control_socket = "{d}/control.sock"
metrics_listen = ""
state_dir = "{d}/state"
shutdown_timeout = "2s"

[defaults]
policy = "round-robin"

[[lun]]
name = "{LUN}"
shared_backing = true

[[lun.path]]
uri = "file://{d}/disk.img"
name = "fc-a0"
interconnect = "fibre-channel"
hba_wwnn = "20:00:00:25:b5:00:00:01"
hba_wwpn = "21:00:00:25:b5:00:00:01"

[[lun.path]]
uri = "file://{d}/disk-b.img"
name = "fc-a1"
interconnect = "fibre-channel"
hba_wwnn = "20:00:00:25:b5:00:00:01"
hba_wwpn = "21:00:00:25:b5:00:00:01"

[[lun.path]]
uri = "file://{d}/disk-c.img"
name = "fc-b0"
interconnect = "fibre-channel"
hba_wwnn = "20:00:00:25:b5:00:00:02"
hba_wwpn = "21:00:00:25:b5:00:00:02"

[[lun.path]]
uri = "nbd://127.0.0.1:1/{LUN}"
name = "iscsi0"
interconnect = "iscsi"
bind = "127.0.0.1"

[[lun.path]]
uri = "nbd+unix:///{LUN}?socket={d}/missing.sock"
name = "unix0"
"#
    )
}

/// Waits until the three file paths are online (the others stay failed).
fn wait_for_paths(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = lunmpio_rpc::client::Client::connect(socket).expect("control socket");
        let info: Value = client
            .call("GetPathInfo", json!({ "lun": LUN }))
            .expect("GetPathInfo");
        let paths = info["paths"].as_array().expect("paths");
        let online = paths.iter().filter(|p| p["status"] == 1).count();
        if online == 3 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the file paths did not come online: {info:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the child if it is still running after `limit` (a hung C program must not hang the test).
fn watchdog(child: Arc<Mutex<Option<Child>>>, limit: Duration) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let mut guard = child.lock().unwrap();
            match guard.as_mut() {
                None => return,
                Some(c) => {
                    if c.try_wait().ok().flatten().is_some() {
                        return;
                    }
                }
            }
        }
        if let Some(c) = child.lock().unwrap().as_mut() {
            eprintln!("watchdog: the C client ran longer than {limit:?}; killing it");
            let _ = c.kill();
        }
    });
}

#[test]
fn c_client_through_the_vtables_against_a_live_daemon_under_valgrind() {
    require(
        "cc",
        "install a C compiler, e.g. `apt-get install gcc` (Debian/Ubuntu) or `dnf install gcc`",
    );
    require(
        "valgrind",
        "install valgrind, e.g. `apt-get install valgrind` (Debian/Ubuntu) or `dnf install valgrind`",
    );

    let dir = tempfile::Builder::new()
        .prefix("vds-com-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let client_exe = dir.path().join("vds_client");
    compile_client(&client_exe);

    let config_text = config(dir.path());
    let config = lunmpio_daemon::config::Config::parse(&config_text, "test.toml")
        .unwrap_or_else(|e| panic!("config: {e}"));
    // The same daemon after its LUN was removed (another LUN in its place), for the stale-object step.
    let without_lun = lunmpio_daemon::config::Config::parse(
        &config_text.replace(&format!("name = \"{LUN}\""), "name = \"other\""),
        "test.toml",
    )
    .unwrap_or_else(|e| panic!("config: {e}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let daemon = runtime
        .block_on(lunmpio_daemon::serve::Daemon::start(config))
        .expect("daemon starts");
    let socket = daemon.control_socket().to_path_buf();
    wait_for_paths(&socket);

    let mut child = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--error-exitcode=1",
            "--errors-for-leak-kinds=definite,indirect,possible",
            "--track-origins=yes",
        ])
        .arg(&client_exe)
        .arg(&socket)
        .arg(LUN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run valgrind");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let child = Arc::new(Mutex::new(Some(child)));
    watchdog(Arc::clone(&child), Duration::from_secs(180));

    let mut daemon = Some(daemon);
    let mut transcript = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        transcript.push_str(&line);
        transcript.push('\n');
        if line == "REMOVE-LUN" {
            let d = daemon.take().expect("a daemon runs");
            runtime.block_on(d.stop());
            let replacement = runtime
                .block_on(lunmpio_daemon::serve::Daemon::start(without_lun.clone()))
                .expect("the daemon starts without the LUN");
            daemon = Some(replacement);
            writeln!(stdin, "removed").unwrap();
            stdin.flush().unwrap();
        }
        if line == "STOP-DAEMON" {
            let d = daemon.take().expect("asked to stop once");
            runtime.block_on(d.stop());
            writeln!(stdin, "stopped").unwrap();
            stdin.flush().unwrap();
        }
    }
    let status = child.lock().unwrap().take().unwrap().wait().unwrap();
    let valgrind = stderr_reader.join().unwrap();
    if let Some(d) = daemon.take() {
        runtime.block_on(d.stop());
    }

    let summary: Vec<&str> = valgrind
        .lines()
        .filter(|l| {
            l.contains("ERROR SUMMARY")
                || l.contains("in use at exit")
                || l.contains("total heap usage")
                || l.contains("definitely lost")
                || l.contains("indirectly lost")
                || l.contains("possibly lost")
                || l.contains("All heap blocks were freed")
        })
        .collect();
    eprintln!(
        "--- C client stdout ---\n{transcript}--- valgrind summary ---\n{}",
        summary.join("\n")
    );
    assert!(
        status.success(),
        "the C client failed ({status}):\n--- stdout ---\n{transcript}--- stderr (valgrind and checks) ---\n{valgrind}"
    );
    assert!(
        transcript.contains("REMOVE-LUN") && transcript.contains("STOP-DAEMON"),
        "the client never reached the LUN-removal and daemon-stop steps"
    );
    assert!(
        transcript.contains("vds_client: all checks passed"),
        "{transcript}"
    );
    assert!(
        valgrind.contains("ERROR SUMMARY: 0 errors"),
        "valgrind reported errors:\n{valgrind}"
    );
    assert!(
        !valgrind.contains("definitely lost:") || valgrind.contains("definitely lost: 0 bytes"),
        "{valgrind}"
    );
}
