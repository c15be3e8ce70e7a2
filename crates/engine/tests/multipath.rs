//! The multipath LUN end to end, in-process: three paths (each through its own fault proxy) to one
//! memory target, exercised by many concurrent verifying clients while paths are cut, hung and
//! restored. The daemon's interop suite repeats the important cases with real processes and signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lunmpio_engine::transport::{PathTarget, Reply, Request};
use lunmpio_engine::{
    EventLog, Failback, Lun, LunOptions, LunSettings, LunSpec, NoPathRetry, PathSpec,
};
use lunmpio_nbd::{CommandFlags, NbdErrno};
use lunmpio_testkit::inprocess::{FaultProxy, Memory, ProxyMode, pattern, serve};
use lunmpio_vds::{Hresult, LoadBalancePolicy, PathId, PathPolicyInput, PathStatus};

const SIZE_BYTES: u64 = 16 << 20;
const BLOCK: u64 = 4096;

struct Rig {
    _dir: tempfile::TempDir,
    store: Arc<Memory>,
    proxies: Vec<FaultProxy>,
    lun: Lun,
    events: Arc<EventLog>,
}

fn path_spec(i: usize, uri: String) -> PathSpec {
    PathSpec {
        id: i as u64 + 1,
        name: format!("p{i}"),
        target: PathTarget::parse(&uri, None).unwrap(),
        uri,
        primary: false,
        weight: 0,
        bind: None,
        interconnect: None,
        hba_wwns: None,
        fence: None,
    }
}

async fn rig(paths: usize, settings: LunSettings, tweak: impl FnOnce(&mut Vec<PathSpec>)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Memory::new(SIZE_BYTES);
    let target = serve(dir.path(), "target", Arc::clone(&store), SIZE_BYTES, true);
    let proxies: Vec<FaultProxy> = (0..paths)
        .map(|i| FaultProxy::start(dir.path(), &format!("p{i}"), target.clone()))
        .collect();
    let mut specs: Vec<PathSpec> = proxies
        .iter()
        .enumerate()
        .map(|(i, p)| path_spec(i, p.uri()))
        .collect();
    tweak(&mut specs);
    let spec = LunSpec {
        name: "lun0".into(),
        source_id: 7,
        settings,
        size_bytes: None,
        wwid: None,
        shared_backing: false,
        paths: specs,
    };
    let events = Arc::new(EventLog::new());
    let options = LunOptions {
        state_dir: Some(dir.path().join("state")),
        startup_timeout: Some(Duration::from_secs(5)),
        carry: None,
    };
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let lun = Lun::start(spec, options, Arc::clone(&events))
        .await
        .unwrap();
    Rig {
        _dir: dir,
        store,
        proxies,
        lun,
        events,
    }
}

fn fast_settings(policy: LoadBalancePolicy) -> LunSettings {
    LunSettings {
        policy,
        io_timeout: Duration::from_secs(2),
        check_interval: Duration::from_millis(100),
        no_path_retry: NoPathRetry::For(Duration::from_secs(10)),
        ..LunSettings::default()
    }
}

fn path_ios(lun: &Lun) -> Vec<u64> {
    lun.statistics().paths.iter().map(|p| p.ios).collect()
}

async fn read(lun: &Lun, offset: u64, length: u32) -> Result<Bytes, lunmpio_engine::IoError> {
    match lun.submit(Request::Read { offset, length }).await? {
        Reply::Read(b) => Ok(b),
        other => panic!("read answered {other:?}"),
    }
}

async fn write(lun: &Lun, offset: u64, data: Bytes) -> Result<(), lunmpio_engine::IoError> {
    lun.submit(Request::Write {
        offset,
        data,
        flags: CommandFlags::empty(),
    })
    .await
    .map(|_| ())
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn status_of(lun: &Lun, name: &str) -> (PathStatus, String) {
    let info = lun.get_path_info();
    let p = info.iter().find(|p| p.name == name).expect("path");
    (p.status, p.status_reason.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly_over_all_paths() {
    let r = rig(3, fast_settings(LoadBalancePolicy::RoundRobin), |_| {}).await;
    for i in 0..300u64 {
        read(&r.lun, (i % 100) * BLOCK, BLOCK as u32).await.unwrap();
    }
    assert_eq!(path_ios(&r.lun), vec![100, 100, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_weighted_and_subset_follow_their_definitions() {
    let r = rig(3, fast_settings(LoadBalancePolicy::Failover), |paths| {
        paths[1].primary = true;
        paths[0].weight = 10;
        paths[1].weight = 20;
        paths[2].weight = 5;
    })
    .await;
    for i in 0..50u64 {
        read(&r.lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    assert_eq!(
        path_ios(&r.lun),
        vec![0, 50, 0],
        "failover: the primary only"
    );
    let (_, policies) = r.lun.get_load_balance_policy();
    assert!(policies[1].primary);

    r.lun
        .set_load_balance_policy(LoadBalancePolicy::WeightedPaths as i32, vec![])
        .await
        .unwrap();
    for i in 0..50u64 {
        read(&r.lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    assert_eq!(
        path_ios(&r.lun),
        vec![0, 50, 50],
        "weighted paths: the lightest only"
    );

    // Unlisted paths keep their primary flag, so p1 (primary under Failover) is listed as non-primary.
    let primaries = [(0u64, true), (1, false), (2, true)].map(|(i, primary)| PathPolicyInput {
        path_id: PathId::new(7, i + 1),
        primary: Some(primary),
        weight: None,
    });
    r.lun
        .set_load_balance_policy(
            LoadBalancePolicy::RoundRobinWithSubset as i32,
            primaries.to_vec(),
        )
        .await
        .unwrap();
    for i in 0..60u64 {
        read(&r.lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    let ios = path_ios(&r.lun);
    assert_eq!(
        ios[1], 50,
        "round robin with subset: no I/O on the non-primary"
    );
    assert_eq!((ios[0], ios[2]), (30, 80), "primaries in turn");
}

/// Many clients write and verify their own blocks while the storage behind the paths misbehaves.
struct Workload {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Result<u64, String>>>,
    max_stall_us: Arc<AtomicU64>,
}

fn start_workload(lun: &Lun, clients: u64) -> Workload {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let max_stall_us = Arc::new(AtomicU64::new(0));
    let tasks = (0..clients)
        .map(|client| {
            let (lun, stop, max_stall_us) =
                (lun.clone(), Arc::clone(&stop), Arc::clone(&max_stall_us));
            tokio::spawn(async move {
                let mut generation = 0u64;
                let mut ios = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let block = client * 32 + generation % 32;
                    let data = pattern(block * 1_000_003 + generation, BLOCK as usize);
                    let started = Instant::now();
                    write(&lun, block * BLOCK, data.clone())
                        .await
                        .map_err(|e| format!("write: {e} ({:?})", e.errno))?;
                    let back = read(&lun, block * BLOCK, BLOCK as u32)
                        .await
                        .map_err(|e| format!("read: {e} ({:?})", e.errno))?;
                    max_stall_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if back != data {
                        return Err(format!("mismatch at block {block} generation {generation}"));
                    }
                    generation += 1;
                    ios += 2;
                }
                Ok(ios)
            })
        })
        .collect();
    Workload {
        stop,
        tasks,
        max_stall_us,
    }
}

impl Workload {
    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let mut ios = 0;
        for t in self.tasks {
            ios += t
                .await
                .unwrap()
                .expect("no client-visible error, no mismatch");
        }
        (
            ios,
            Duration::from_micros(self.max_stall_us.load(Ordering::Relaxed)),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_path_is_failed_at_once_and_comes_back() {
    // A write on the connection that is cut is in doubt, and with no fence the next write to its
    // block waits `in_doubt_timeout` (30 s by default; this test took that long). The target here
    // finishes what it holds as soon as its side closes, so a short hold is safe, and the verifying
    // workload would see an old copy that landed after a newer write.
    let settings = LunSettings {
        in_doubt_timeout: Some(Duration::from_secs(3)),
        ..fast_settings(LoadBalancePolicy::RoundRobin)
    };
    let r = rig(3, settings, |_| {}).await;
    let w = start_workload(&r.lun, 8);
    wait_for("some I/O on every path", || {
        path_ios(&r.lun).iter().all(|&n| n > 20)
    })
    .await;
    r.proxies[1].set(ProxyMode::Cut);
    wait_for("p1 failed", || {
        status_of(&r.lun, "p1").0 == PathStatus::Failed
    })
    .await;
    let before = path_ios(&r.lun)[1];
    wait_for("I/O continues on the others", || path_ios(&r.lun)[0] > 200).await;
    assert_eq!(path_ios(&r.lun)[1], before, "no I/O on a failed path");
    r.proxies[1].set(ProxyMode::Up);
    wait_for("p1 back online", || {
        status_of(&r.lun, "p1").0 == PathStatus::Online
    })
    .await;
    wait_for("p1 carries I/O again", || path_ios(&r.lun)[1] > before + 20).await;
    let (ios, stall) = w.finish().await;
    assert!(ios > 0);
    let stats = r.lun.statistics();
    assert!(stats.paths[1].failovers >= 1);
    let events = r.events.since(0, Some("lun0"));
    assert!(
        events
            .iter()
            .any(|e| e.path_name.as_deref() == Some("p1") && e.to == Some(PathStatus::Failed)),
        "{events:#?}"
    );
    assert!(events.iter().any(|e| e.path_name.as_deref() == Some("p1")
        && e.to == Some(PathStatus::Online)
        && e.cause.contains("reconnected")));
    eprintln!("cut: {ios} I/Os, longest client stall {stall:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_path_is_detected_fenced_and_writes_are_not_lost() {
    let r = rig(3, fast_settings(LoadBalancePolicy::RoundRobin), |_| {}).await;
    let w = start_workload(&r.lun, 8);
    wait_for("latency learned on every path", || {
        path_ios(&r.lun).iter().all(|&n| n > 100)
    })
    .await;
    r.proxies[2].set(ProxyMode::Hang);
    wait_for("p2 failed", || {
        status_of(&r.lun, "p2").0 == PathStatus::Failed
    })
    .await;
    let reason = status_of(&r.lun, "p2").1;
    assert!(
        reason.contains("probe") || reason.contains("timed out"),
        "{reason}"
    );
    let before = path_ios(&r.lun)[0];
    wait_for("I/O continues", || path_ios(&r.lun)[0] > before + 100).await;
    r.proxies[2].set(ProxyMode::Up);
    wait_for("p2 back", || {
        status_of(&r.lun, "p2").0 == PathStatus::Online
    })
    .await;
    let (_, stall) = w.finish().await;
    assert!(
        stall < Duration::from_secs(2),
        "a hang stalls clients less than io_timeout: {stall:?}"
    );
    eprintln!("hang: longest client stall {stall:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_to_a_different_volume_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = serve(
        dir.path(),
        "good",
        Memory::new(SIZE_BYTES),
        SIZE_BYTES,
        true,
    );
    let other = serve(
        dir.path(),
        "other",
        Memory::new(SIZE_BYTES * 2),
        SIZE_BYTES * 2,
        true,
    );
    let uri = |s: &std::path::Path| format!("nbd+unix:///lun0?socket={}", s.display());
    let spec = LunSpec {
        name: "lun0".into(),
        source_id: 1,
        settings: fast_settings(LoadBalancePolicy::RoundRobin),
        size_bytes: Some(SIZE_BYTES),
        wwid: None,
        shared_backing: false,
        paths: vec![path_spec(0, uri(&good)), path_spec(1, uri(&other))],
    };
    let lun = Lun::start(spec, LunOptions::default(), Arc::new(EventLog::new()))
        .await
        .unwrap();
    let (status, reason) = status_of(&lun, "p1");
    assert_eq!(status, PathStatus::Failed);
    assert!(reason.contains("identity mismatch"), "{reason}");
    for i in 0..20u64 {
        read(&lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    assert_eq!(path_ios(&lun), vec![20, 0], "never carries I/O");
    assert_eq!(lun.geometry().size_bytes, SIZE_BYTES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_fail_returns_eio_at_once() {
    let mut settings = fast_settings(LoadBalancePolicy::RoundRobin);
    settings.no_path_retry = NoPathRetry::Fail;
    let r = rig(2, settings, |_| {}).await;
    read(&r.lun, 0, 4096).await.unwrap();
    for p in &r.proxies {
        p.set(ProxyMode::Cut);
    }
    wait_for("both failed", || {
        r.lun
            .get_path_info()
            .iter()
            .all(|p| p.status == PathStatus::Failed)
    })
    .await;
    let started = Instant::now();
    let e = read(&r.lun, 0, 4096).await.unwrap_err();
    assert_eq!(e.errno, NbdErrno::Io);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_path_queue_holds_io_until_a_path_returns() {
    let r = rig(2, fast_settings(LoadBalancePolicy::RoundRobin), |_| {}).await;
    write(&r.lun, 0, pattern(1, 4096)).await.unwrap();
    for p in &r.proxies {
        p.set(ProxyMode::Cut);
    }
    wait_for("both failed", || {
        r.lun
            .get_path_info()
            .iter()
            .all(|p| p.status == PathStatus::Failed)
    })
    .await;
    let lun = r.lun.clone();
    let queued = tokio::spawn(async move { read(&lun, 0, 4096).await });
    wait_for("the read is queued", || r.lun.statistics().queued_ios == 1).await;
    assert_eq!(r.lun.statistics().queued_bytes, 4096);
    r.proxies[0].set(ProxyMode::Up);
    let data = tokio::time::timeout(Duration::from_secs(10), queued)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(data, pattern(1, 4096));
    assert_eq!(r.lun.statistics().queued_ios, 0);
    let causes: Vec<String> = r
        .events
        .since(0, None)
        .into_iter()
        .map(|e| e.cause)
        .collect();
    assert!(
        causes.iter().any(|c| c.starts_with("all paths down")),
        "{causes:?}"
    );
    assert!(
        causes.iter().any(|c| c.contains("resuming 1 queued")),
        "{causes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_failback_keeps_a_repaired_path_standby_until_reinstated() {
    let mut settings = fast_settings(LoadBalancePolicy::RoundRobin);
    settings.failback = Failback::Manual;
    let r = rig(2, settings, |_| {}).await;
    r.proxies[0].set(ProxyMode::Cut);
    read(&r.lun, 0, 4096).await.unwrap();
    wait_for("p0 failed", || {
        status_of(&r.lun, "p0").0 == PathStatus::Failed
    })
    .await;
    r.proxies[0].set(ProxyMode::Up);
    wait_for("p0 standby", || {
        status_of(&r.lun, "p0").0 == PathStatus::Standby
    })
    .await;
    let before = path_ios(&r.lun)[0];
    for i in 0..20u64 {
        read(&r.lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    assert_eq!(path_ios(&r.lun)[0], before, "standby until reinstated");
    r.lun
        .set_path_status(PathId::new(7, 1), PathStatus::Online as i32)
        .await
        .unwrap();
    assert_eq!(status_of(&r.lun, "p0").0, PathStatus::Online);
    for i in 0..20u64 {
        read(&r.lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    assert_eq!(path_ios(&r.lun)[0], before + 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_calls_validate_persist_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = Memory::new(SIZE_BYTES);
    let t1 = serve(dir.path(), "t1", Arc::clone(&store), SIZE_BYTES, true);
    let t2 = serve(dir.path(), "t2", store, SIZE_BYTES, true);
    let uri = format!("nbd+unix:///lun0?socket={}", t1.display());
    let uri2 = format!("nbd+unix:///lun0?socket={}", t2.display());
    let spec = LunSpec {
        name: "lun0".into(),
        source_id: 9,
        settings: fast_settings(LoadBalancePolicy::RoundRobin),
        size_bytes: None,
        wwid: None,
        shared_backing: false,
        paths: vec![path_spec(0, uri), path_spec(1, uri2)],
    };
    let options = LunOptions {
        state_dir: Some(dir.path().to_path_buf()),
        startup_timeout: None,
        carry: None,
    };
    let lun = Lun::start(spec.clone(), options.clone(), Arc::new(EventLog::new()))
        .await
        .unwrap();
    let unknown = PathPolicyInput {
        path_id: PathId::new(9, 99),
        primary: Some(true),
        weight: None,
    };
    let e = lun
        .set_load_balance_policy(1, vec![unknown])
        .await
        .unwrap_err();
    assert_eq!(e.hresult, Hresult::VDS_E_OBJECT_NOT_FOUND);
    let e = lun.set_load_balance_policy(0, vec![]).await.unwrap_err();
    assert_eq!(e.hresult, Hresult::E_INVALIDARG);
    assert_eq!(
        lun.get_load_balance_policy().0,
        LoadBalancePolicy::RoundRobin,
        "a failed Set changes nothing"
    );
    lun.set_load_balance_policy(LoadBalancePolicy::DynLeastQueueDepth as i32, vec![])
        .await
        .unwrap();
    lun.set_path_status(PathId::new(9, 2), PathStatus::Standby as i32)
        .await
        .unwrap();
    lun.shutdown();
    drop(lun);
    let again = Lun::start(spec, options, Arc::new(EventLog::new()))
        .await
        .unwrap();
    assert_eq!(
        again.get_load_balance_policy().0,
        LoadBalancePolicy::DynLeastQueueDepth
    );
    assert_eq!(status_of(&again, "p1").0, PathStatus::Standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_without_multi_conn_allow_failover_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Memory::new(SIZE_BYTES);
    let t1 = serve(dir.path(), "t1", Arc::clone(&store), SIZE_BYTES, false);
    let t2 = serve(dir.path(), "t2", store, SIZE_BYTES, false);
    let uri = |s: &std::path::Path| format!("nbd+unix:///lun0?socket={}", s.display());
    let spec = LunSpec {
        name: "lun0".into(),
        source_id: 3,
        settings: fast_settings(LoadBalancePolicy::RoundRobin),
        size_bytes: None,
        wwid: None,
        shared_backing: false,
        paths: vec![path_spec(0, uri(&t1)), path_spec(1, uri(&t2))],
    };
    let lun = Lun::start(spec, LunOptions::default(), Arc::new(EventLog::new()))
        .await
        .unwrap();
    assert_eq!(lun.get_supported_lb_policies().0, 0x01);
    assert_eq!(lun.get_load_balance_policy().0, LoadBalancePolicy::Failover);
    let e = lun
        .set_load_balance_policy(LoadBalancePolicy::RoundRobin as i32, vec![])
        .await
        .unwrap_err();
    assert_eq!(e.hresult, Hresult::VDS_E_NOT_SUPPORTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_fans_out_and_eio_on_every_path_reaches_the_client() {
    let r = rig(3, fast_settings(LoadBalancePolicy::RoundRobin), |_| {}).await;
    for i in 0..6u64 {
        write(&r.lun, i * BLOCK, pattern(i, BLOCK as usize))
            .await
            .unwrap();
    }
    assert!(matches!(
        r.lun
            .submit(Request::Flush {
                flags: CommandFlags::empty()
            })
            .await,
        Ok(Reply::Done)
    ));
    // A request-level error comes back at once and is not retried.
    let e = read(&r.lun, SIZE_BYTES, 4096).await.unwrap_err();
    assert_eq!(e.errno, NbdErrno::Inval);
    assert_eq!(
        r.store.reads.load(Ordering::Relaxed),
        0,
        "never sent: the client checks bounds"
    );
}

/// The rig's LUN started again over the same paths, with what it carried (an upgrade or a reload
/// does this).
async fn restart(
    rig: &Rig,
    carry: lunmpio_engine::LunCarry,
    startup_timeout: Duration,
) -> Result<Lun, lunmpio_vds::VdsError> {
    let spec = LunSpec {
        name: "lun0".into(),
        source_id: 7,
        settings: fast_settings(LoadBalancePolicy::RoundRobin),
        size_bytes: None,
        wwid: None,
        shared_backing: false,
        paths: rig
            .proxies
            .iter()
            .enumerate()
            .map(|(i, p)| path_spec(i, p.uri()))
            .collect(),
    };
    let options = LunOptions {
        state_dir: None,
        startup_timeout: Some(startup_timeout),
        carry: Some(carry),
    };
    Lun::start(spec, options, Arc::clone(&rig.events)).await
}

/// What a LUN carries across its own restart (an upgrade, a reload): counters go on, and a marginal
/// path stays held down for the rest of its hold-down, while another path serves.
#[tokio::test]
async fn a_restarted_lun_keeps_its_counters_and_a_carried_hold_down() {
    let rig = rig(2, fast_settings(LoadBalancePolicy::RoundRobin), |_| {}).await;
    for i in 0..8u64 {
        read(&rig.lun, i * BLOCK, BLOCK as u32).await.unwrap();
    }
    let mut carry = rig.lun.carry().await.expect("a running LUN carries");
    assert_eq!(carry.paths.iter().map(|p| p.counters.ios).sum::<u64>(), 8);
    let p0 = carry.paths.iter_mut().find(|p| p.path_id == 1).unwrap();
    p0.hold_left_ms = Some(60_000);
    p0.hold_level = 1;
    let ios_before: Vec<u64> = carry.paths.iter().map(|p| p.counters.ios).collect();
    rig.lun.shutdown();
    rig.lun.closed().await;

    let again = restart(&rig, carry, Duration::from_secs(5)).await.unwrap();
    assert_eq!(path_ios(&again), ios_before, "the counters went on");
    let info = again.get_path_info();
    let (p0, p1) = (&info[0], &info[1]);
    assert_eq!(p0.status, PathStatus::Failed, "{p0:?}");
    assert!(
        p0.status_reason.contains("carried over a restart"),
        "{p0:?}"
    );
    assert_eq!(p1.status, PathStatus::Online, "{p1:?}");
    read(&again, 0, BLOCK as u32).await.unwrap();
    again.shutdown();
}

/// A path that was failed when the LUN last ran starts failed with its reason, and the restart does
/// not wait on it: here its target hangs, and connecting would take the whole startup timeout.
#[tokio::test]
async fn a_path_failed_before_a_restart_does_not_hold_it() {
    let rig = rig(2, fast_settings(LoadBalancePolicy::RoundRobin), |_| {}).await;
    rig.proxies[0].set(ProxyMode::Hang);
    let mut carry = rig.lun.carry().await.expect("a running LUN carries");
    carry
        .paths
        .iter_mut()
        .find(|p| p.path_id == 1)
        .unwrap()
        .failed_reason = Some("probe got no reply within 250ms".into());
    rig.lun.shutdown();
    rig.lun.closed().await;

    // Bounded well below the 30 s startup timeout a connection attempt to the hung target would take.
    let again = tokio::time::timeout(
        Duration::from_secs(10),
        restart(&rig, carry, Duration::from_secs(30)),
    )
    .await
    .expect("the restart did not wait for the failed path")
    .unwrap();
    let info = again.get_path_info();
    assert_eq!(info[0].status, PathStatus::Failed);
    assert!(info[0].status_reason.contains("no reply"), "{:?}", info[0]);
    assert_eq!(info[1].status, PathStatus::Online);
    read(&again, 0, BLOCK as u32).await.unwrap();
    again.shutdown();
}
