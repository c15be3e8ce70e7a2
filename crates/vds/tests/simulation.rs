//! Deterministic discrete-event simulation of the selectors under load.
//!
//! Virtual time in ns; each path is a server with exponentially distributed service times (seeded) and
//! a number of workers: one (a FIFO server, like a disk behind a single queue) or many (like an NBD
//! target serving requests in parallel, `qemu-nbd -e 32`); the workload is a closed loop: a fixed number
//! of I/Os in flight, a new one issued the instant one completes. Everything goes through the real `LunMpio` snapshot, `Selector::pick` and `PathLoad`
//! bookkeeping.

use lunmpio_vds::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

const IO_BYTES: u32 = 4096;
const NS_PER_S: u64 = 1_000_000_000;

/// splitmix64: tiny, seeded, and stable across dependency versions.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Exponentially distributed with the given mean (at least 1 ns).
    fn exponential(&mut self, mean_ns: u64) -> u64 {
        let u = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        ((-u.ln()) * mean_ns as f64).max(1.0) as u64
    }
}

struct Sim {
    lun: LunMpio,
    snap: SelectorSnapshot,
    selector: Selector,
    rng: Rng,
    /// Mean service time per path, changeable during the run.
    service_ns_mean: Vec<u64>,
    /// Per path, when each of its workers is next free (one worker: a FIFO server).
    workers_free_ns: Vec<Vec<u64>>,
    /// (completion time, sequence, path index, issue time)
    events: BinaryHeap<Reverse<(u64, u64, usize, u64)>>,
    sequence: u64,
    completed: Vec<u64>,
}

impl Sim {
    fn new(policy: LoadBalancePolicy, service_ns_mean: Vec<u64>, seed: u64) -> Sim {
        Sim::with_workers(policy, service_ns_mean, 1, seed)
    }

    fn with_workers(
        policy: LoadBalancePolicy,
        service_ns_mean: Vec<u64>,
        workers: usize,
        seed: u64,
    ) -> Sim {
        let paths = (0..service_ns_mean.len() as u64)
            .map(|id| PathConfig {
                id,
                name: format!("port{id}"),
                uri: format!("nbd://10.0.{id}.10/lun0"),
                transport: Transport::Tcp,
                hw_type: HwProviderType::Unknown,
                endpoints: PathEndpoints::None,
                primary: id == 0,
                weight: 0,
            })
            .collect();
        let mut lun = LunMpio::new(LunConfig {
            name: "lun0".into(),
            source_id: 1,
            policy: LoadBalancePolicy::RoundRobin,
            multi_path_safe: true,
            paths,
        })
        .unwrap();
        lun.set_load_balance_policy(policy as i32, &[]).unwrap();
        for id in 0..service_ns_mean.len() as u64 {
            lun.set_oper_status(PathId::new(1, id), OperStatus::Online);
        }
        let snap = lun.selector_snapshot();
        let n = service_ns_mean.len();
        Sim {
            lun,
            snap,
            selector: Selector::new(),
            rng: Rng(seed),
            service_ns_mean,
            workers_free_ns: vec![vec![0; workers]; n],
            events: BinaryHeap::new(),
            sequence: 0,
            completed: vec![0; n],
        }
    }

    fn dispatch(&mut self, now_ns: u64) {
        let picked = self
            .selector
            .pick(&self.snap, IO_BYTES, now_ns, 0)
            .expect("a path");
        let candidate = &self.snap.candidates()[picked];
        let path = candidate.index;
        candidate.load.on_dispatch(IO_BYTES);
        // The worker free first takes it.
        let workers = &mut self.workers_free_ns[path];
        let worker = (0..workers.len())
            .min_by_key(|&w| workers[w])
            .expect("a path has a worker");
        let start_ns = now_ns.max(workers[worker]);
        let finish_ns = start_ns + self.rng.exponential(self.service_ns_mean[path]);
        workers[worker] = finish_ns;
        self.sequence += 1;
        self.events
            .push(Reverse((finish_ns, self.sequence, path, now_ns)));
    }

    /// Runs the closed loop until `end_ns`; returns the completions in this run.
    fn run(&mut self, queue_depth: usize, start_ns: u64, end_ns: u64) -> u64 {
        while self.events.len() < queue_depth {
            self.dispatch(start_ns);
        }
        let mut completed = 0;
        while let Some(&Reverse((finish_ns, _, _, _))) = self.events.peek() {
            if finish_ns > end_ns {
                break;
            }
            let Reverse((finish_ns, _, path, issued_ns)) = self.events.pop().unwrap();
            self.lun.paths()[path]
                .load()
                .on_complete(IO_BYTES, finish_ns - issued_ns, finish_ns);
            self.completed[path] += 1;
            completed += 1;
            self.dispatch(finish_ns);
        }
        completed
    }
}

/// One port 4× slower than the other three.
const SKEWED_NS: [u64; 4] = [100_000, 100_000, 100_000, 400_000];

fn throughput(policy: LoadBalancePolicy, seed: u64) -> (u64, Vec<u64>) {
    let mut sim = Sim::new(policy, SKEWED_NS.to_vec(), seed);
    let ios = sim.run(32, 0, 2 * NS_PER_S);
    (ios, sim.completed)
}

#[test]
fn least_queue_depth_and_service_time_beat_round_robin_on_a_skewed_port() {
    for seed in [1, 2, 3] {
        let (rr, rr_split) = throughput(LoadBalancePolicy::RoundRobin, seed);
        let (lqd, lqd_split) = throughput(LoadBalancePolicy::DynLeastQueueDepth, seed);
        let (st, st_split) = throughput(LoadBalancePolicy::VendorSpecific, seed);
        let (lb, _) = throughput(LoadBalancePolicy::LeastBlocks, seed);
        eprintln!(
            "seed {seed}: round-robin {rr} {rr_split:?}; least-queue-depth {lqd} ({:.2}x) {lqd_split:?}; \
             service-time {st} ({:.2}x) {st_split:?}; least-blocks {lb} ({:.2}x)",
            lqd as f64 / rr as f64,
            st as f64 / rr as f64,
            lb as f64 / rr as f64
        );
        assert!(
            lqd as f64 >= 1.5 * rr as f64,
            "least-queue-depth {lqd} vs round-robin {rr}"
        );
        assert!(
            st as f64 >= 1.5 * rr as f64,
            "service-time {st} vs round-robin {rr}"
        );
        // Round robin is exactly even across the ports (up to the I/Os still in flight at the end).
        assert!(rr_split.iter().max().unwrap() - rr_split.iter().min().unwrap() <= 32);
    }
}

/// At one I/O in flight every port is idle at each pick: least-queue-depth rotates over all four, while
/// service-time knows the slow one and avoids it.
#[test]
fn service_time_beats_least_queue_depth_at_low_queue_depth() {
    let run = |policy| Sim::new(policy, SKEWED_NS.to_vec(), 3).run(1, 0, 2 * NS_PER_S);
    let (lqd, st) = (
        run(LoadBalancePolicy::DynLeastQueueDepth),
        run(LoadBalancePolicy::VendorSpecific),
    );
    eprintln!(
        "queue depth 1: least-queue-depth {lqd}, service-time {st} ({:.2}x)",
        st as f64 / lqd as f64
    );
    assert!(
        st as f64 >= 1.5 * lqd as f64,
        "service-time {st} vs least-queue-depth {lqd}"
    );
}

#[test]
fn simulation_is_deterministic() {
    assert_eq!(
        throughput(LoadBalancePolicy::VendorSpecific, 7),
        throughput(LoadBalancePolicy::VendorSpecific, 7)
    );
}

/// Light load (one I/O in flight): a slow port gets no I/O except probes, so only probing can notice
/// that it recovered.
#[test]
fn service_time_notices_a_recovered_port_within_bounded_time() {
    let mut sim = Sim::new(
        LoadBalancePolicy::VendorSpecific,
        vec![100_000, 100_000, 100_000, 1_000_000],
        11,
    );
    let recovered_at_ns = NS_PER_S;
    sim.run(1, 0, recovered_at_ns);
    let slow = sim.lun.paths()[3].load().clone();
    let fast_ns = sim.lun.paths()[0].load().latency_ns_ewma();
    assert!(
        slow.latency_ns_ewma() > 4 * fast_ns,
        "slow {} fast {}",
        slow.latency_ns_ewma(),
        fast_ns
    );
    let slow_share_before = sim.completed[3];
    let probes_before = sim.selector.probes();
    // Bounded probe cost: each idle port at most once per its stale window (the fast ports that lost
    // the tie at one I/O in flight are idle too, and get probed as well).
    let window_ns = select_probe_stale_ns(fast_ns).min(select_probe_stale_ns(1_000_000));
    assert!(
        probes_before <= 3 * (recovered_at_ns / window_ns + 1),
        "{probes_before} probes"
    );
    assert!(
        slow_share_before <= probes_before + 1,
        "slow port got {slow_share_before} I/Os"
    );

    sim.service_ns_mean[3] = 100_000;
    let step_ns = 10_000_000;
    let mut now_ns = recovered_at_ns;
    let noticed_ns = loop {
        sim.run(1, now_ns, now_ns + step_ns);
        now_ns += step_ns;
        // Noticed: its estimate is within 2x of the true service time again (it was 10x).
        if slow.latency_ns_ewma() <= 2 * 100_000 {
            break now_ns - recovered_at_ns;
        }
        assert!(
            now_ns - recovered_at_ns < 2 * NS_PER_S,
            "recovery not noticed within 2 s"
        );
    };
    eprintln!(
        "recovered port noticed after {} ms ({} probes in all); probes before recovery {probes_before} in 1 s",
        noticed_ns / 1_000_000,
        sim.selector.probes() - probes_before
    );
    assert!(noticed_ns <= NS_PER_S / 2, "noticed after {noticed_ns} ns");

    // Under load the recovered port carries a fair share again.
    let before = sim.completed.clone();
    sim.run(32, now_ns, now_ns + NS_PER_S);
    let during: Vec<u64> = sim
        .completed
        .iter()
        .zip(&before)
        .map(|(a, b)| a - b)
        .collect();
    let total: u64 = during.iter().sum();
    eprintln!("after recovery, under load: {during:?}");
    assert!(during[3] * 5 >= total, "recovered port share {during:?}");
}

/// Three healthy ports and one 200× slower, each serving 32 requests in parallel (an NBD target, not a
/// disk queue), at 32 I/Os in flight. The share of each healthy port, interval by interval, stays near
/// a third: a selector must not herd onto whichever port has carried the most lately. (A completion-gap
/// service time does herd on such ports: the more a port carries, the shorter the gaps between its
/// completions and the faster it looks; shares swung between 3% and 90% every few intervals.)
#[test]
fn healthy_parallel_ports_keep_even_shares_under_service_time() {
    for policy in [
        LoadBalancePolicy::VendorSpecific,
        LoadBalancePolicy::DynLeastQueueDepth,
    ] {
        let mut sim =
            Sim::with_workers(policy, vec![100_000, 100_000, 100_000, 20_000_000], 32, 13);
        let interval_ns = NS_PER_S / 20;
        let mut share_min: f64 = 1.0;
        let mut shares = Vec::new();
        let mut total = 0;
        for i in 0..40 {
            let before = sim.completed.clone();
            total += sim.run(32, i * interval_ns, (i + 1) * interval_ns);
            let during: Vec<u64> = (0..4).map(|p| sim.completed[p] - before[p]).collect();
            let healthy: u64 = during[..3].iter().sum();
            for &d in &during[..3] {
                share_min = share_min.min(d as f64 / healthy.max(1) as f64);
            }
            shares.push(during);
        }
        eprintln!(
            "{}: {total} I/Os, smallest healthy share in a 50 ms interval {share_min:.2}; {:?}",
            policy.config_name(),
            &shares[..8]
        );
        assert!(
            share_min >= 0.25,
            "{}: a healthy port's share fell to {share_min:.2} (even is 0.33): {shares:?}",
            policy.config_name()
        );
    }
}

fn select_probe_stale_ns(service_ns: u64) -> u64 {
    (lunmpio_vds::select::PROBE_STALE_FACTOR * service_ns)
        .max(lunmpio_vds::select::PROBE_STALE_NS_MIN)
}

#[test]
fn failover_sends_everything_to_the_primary() {
    let mut sim = Sim::new(LoadBalancePolicy::Failover, SKEWED_NS.to_vec(), 5);
    sim.run(32, 0, NS_PER_S / 10);
    assert_eq!(
        sim.completed.iter().filter(|c| **c > 0).count(),
        1,
        "{:?}",
        sim.completed
    );
}
