//! The demo's last phase: the daemon replaces its own program under load (`lunmpio upgrade`).
//!
//! The main scenario's daemon runs inside the demo's process, and an upgrade execs the process it runs
//! in. This phase therefore runs a daemon of its own: `lunmpio serve` as a child process, over two ports
//! of a second simulated array, with a fresh verifying workload through its export. The demo asks that
//! daemon to upgrade in the middle of the load. It then reports what the workload saw: errors,
//! mismatches and the slowest request. It also checks that the PID did not change.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lunmpio_array::{Array, ArrayConfig, Backing};
use lunmpio_nbd::{Client, ConnectOptions, Endpoint};
use serde_json::{Value, json};

use crate::view::Output;
use crate::workload::Workload;

const LUN: &str = "lun1";
const SIZE: u64 = 64 << 20;
const REGION: u64 = 32 << 20;
const DEPTH: usize = 16;
/// Load before and after the upgrade.
const SETTLE: Duration = Duration::from_millis(800);
const UPGRADE_WAIT: Duration = Duration::from_secs(60);

pub struct Outcome {
    pub json: Value,
    pub held: bool,
}

/// Runs the phase; `scratch` holds its config, control socket and state.
pub async fn run(scratch: &Path, output: &Output) -> anyhow::Result<Outcome> {
    let program = std::env::current_exe().context("the demo's own program")?;
    let array = Array::start(ArrayConfig {
        backing: Backing::Memory { size: SIZE },
        name: Some(LUN.into()),
        ports: 2,
        listen: "127.0.0.1:0".into(),
        block_size: None,
    })
    .await?;
    let result = with_array(&program, scratch, &array, output).await;
    array.shutdown(Duration::from_secs(1)).await;
    result
}

async fn with_array(
    program: &Path,
    scratch: &Path,
    array: &Array,
    output: &Output,
) -> anyhow::Result<Outcome> {
    let socket = scratch.join("upgrade-control.sock");
    let config = scratch.join("upgrade.toml");
    let mut text = format!(
        "[daemon]\nnbd_listen = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\nmetrics_listen = \"\"\n\
         state_dir = \"{}\"\n\n[[lun]]\nname = \"{LUN}\"\n",
        socket.display(),
        scratch.join("upgrade-state").display()
    );
    for (i, uri) in array.uris().iter().enumerate() {
        text += &format!("[[lun.path]]\nuri = \"{uri}\"\nname = \"port{i}\"\n");
    }
    std::fs::write(&config, text)?;
    let mut child = tokio::process::Command::new(program)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start `lunmpio serve` for the upgrade phase")?;
    let result = serve_and_upgrade(&mut child, &socket, output).await;
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    result
}

async fn serve_and_upgrade(
    child: &mut tokio::process::Child,
    socket: &Path,
    output: &Output,
) -> anyhow::Result<Outcome> {
    use tokio::io::AsyncBufReadExt as _;
    let stdout = child.stdout.take().context("the daemon's stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the daemon did not start within 30 s")??
        .context("the daemon ended before it was ready")?;
    // Keep reading its stdout (an upgraded program prints its ready line again).
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let address = ready
        .split("; ")
        .find_map(|part| part.strip_prefix("nbd "))
        .context("no NBD address in the daemon's ready line")?
        .to_string();
    let (host, port) = address.rsplit_once(':').context("the NBD address")?;
    let mut options = ConnectOptions::new(
        Endpoint::Tcp {
            host: host.to_string(),
            port: port.parse()?,
            bind: None,
        },
        LUN,
    );
    options.connect_timeout = Duration::from_secs(5);
    let client = Client::connect(options).await?;
    let epoch = Instant::now();
    let workload = Workload::new(client.clone(), REGION, epoch, 0x7570_6772_6164_6521);
    let workers = workload.start(DEPTH);
    tokio::time::sleep(SETTLE).await;

    let pid_before = child.id();
    let before = workload.now_ns();
    let socket_owned = socket.to_path_buf();
    let upgraded = tokio::task::spawn_blocking(move || upgrade(&socket_owned)).await?;
    let after = workload.now_ns();
    tokio::time::sleep(SETTLE).await;
    workload.stop();
    for w in workers {
        let _ = w.await;
    }
    let (checked, final_mismatches) = workload.verify_all().await;
    client.disconnect().await;

    let c = &workload.counters;
    let errors = c.errors.load(std::sync::atomic::Ordering::Relaxed);
    let mismatches = c.mismatches.load(std::sync::atomic::Ordering::Relaxed) + final_mismatches;
    // The slowest request that overlapped the upgrade: the client-visible stall.
    let stall_ns = workload
        .slow_ios()
        .iter()
        .filter(|s| s.end_ns >= before && s.start_ns <= after)
        .map(|s| s.end_ns - s.start_ns)
        .max()
        .unwrap_or(0);
    let (info, took) = upgraded?;
    let same_pid = pid_before == Some(info.pid);
    let held = errors == 0 && mismatches == 0 && same_pid && info.upgrades == 1;
    // The workload remembers only requests slower than its threshold (5 ms).
    let stall = if stall_ns == 0 {
        "no request took 5 ms or more during the upgrade".to_string()
    } else {
        format!(
            "its slowest request during the upgrade took {:.1} ms",
            stall_ns as f64 / 1e6
        )
    };
    output.line(&format!(
        "── live upgrade: `lunmpio serve` (pid {}) replaced its program under load in {} ms; the \
         workload saw {errors} error(s), {mismatches} mismatch(es), {stall}; {checked} blocks read \
         back; pid {}",
        info.pid,
        took.as_millis(),
        if same_pid { "unchanged" } else { "CHANGED" }
    ));
    Ok(Outcome {
        json: json!({
            "pid": info.pid,
            "samePid": same_pid,
            "upgrades": info.upgrades,
            "tookMs": took.as_millis() as u64,
            // 0: no request took 5 ms or more (the workload's threshold for slow requests).
            "stallMs": stall_ns as f64 / 1e6,
            "errors": errors,
            "mismatches": mismatches,
            "blocksVerified": checked,
            "held": held,
        }),
        held,
    })
}

/// Asks the daemon to upgrade and waits until the new program serves (as `lunmpio upgrade` does).
fn upgrade(socket: &Path) -> anyhow::Result<(lunmpio_rpc::DaemonInfo, Duration)> {
    let started = Instant::now();
    let begun = lunmpio_rpc::client::Client::connect(socket)?.upgrade()?;
    loop {
        if let Ok(info) = lunmpio_rpc::client::Client::connect(socket)
            .map_err(anyhow::Error::from)
            .and_then(|mut c| Ok(c.get_daemon_info()?))
        {
            if info.upgrades > begun.upgrades {
                return Ok((info, started.elapsed()));
            }
            anyhow::ensure!(
                info.upgrades_failed == begun.upgrades_failed,
                "the upgrade failed: {}",
                info.last_upgrade_error.unwrap_or_default()
            );
        }
        anyhow::ensure!(
            started.elapsed() < UPGRADE_WAIT,
            "the upgrade did not finish within {UPGRADE_WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
