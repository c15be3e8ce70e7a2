//! One path choice per policy for 2, 8 and 64 paths (docs/BENCHMARKS.md: ≤ 50 ns at 8 paths, no worse than
//! linear growth to 64).
//!
//! `cargo bench -p lunmpio-vds -- --warm-up-time 1 --measurement-time 2`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use lunmpio_vds::{
    Candidate, CandidateClass, LoadBalancePolicy, PathId, PathLoad, Selector, SelectorSnapshot,
};
use std::hint::black_box;
use std::sync::Arc;

const NOW_NS: u64 = 1_000_000_000;

/// `n` Active candidates with a realistic spread of load and latency history.
fn snapshot(policy: LoadBalancePolicy, n: usize) -> SelectorSnapshot {
    let candidates = (0..n)
        .map(|i| {
            let load = Arc::new(PathLoad::new());
            for k in 0..8 {
                load.on_dispatch(4096);
                load.on_complete(
                    4096,
                    100_000 + (i as u64 % 5) * 20_000,
                    NOW_NS - 1_000_000 + k * 1000,
                );
            }
            for _ in 0..(i * 7 % 5) {
                load.on_dispatch(4096 << (i % 3));
            }
            Candidate {
                index: i,
                path_id: PathId::new(1, i as u64),
                weight: (i as u32 * 3) % 4,
                primary: i % 2 == 0,
                class: CandidateClass::Active,
                load,
            }
        })
        .collect();
    SelectorSnapshot::new(policy, candidates)
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for policy in LoadBalancePolicy::ALL.iter().copied() {
        for n in [2usize, 8, 64] {
            let snap = snapshot(policy, n);
            let selector = Selector::new();
            group.bench_with_input(BenchmarkId::new(policy.config_name(), n), &n, |b, _| {
                b.iter(|| {
                    selector.pick(
                        black_box(&snap),
                        black_box(4096),
                        black_box(NOW_NS),
                        black_box(0),
                    )
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
