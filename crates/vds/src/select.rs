//! The path selectors: one per load-balance policy, behind one [`Selector::pick`].
//!
//! Three pieces, split by who writes them and how often:
//!
//! - [`PathLoad`] — per path, shared (`Arc`), atomics only, written by the data path on every dispatch
//!   and completion: requests and bytes in flight, latency and service-time estimates, and the
//!   `unusable` flag the data path raises *at once* when a path faults or is fenced, so selectors skip
//!   it before the control plane has published a new snapshot.
//! - [`SelectorSnapshot`] — immutable, rebuilt by the control plane after every change
//!   ([`crate::LunMpio::selector_snapshot`]): the policy and the *candidates* (usable paths only), in
//!   class order (Active, then Standby, then AdminStandby), each with its weight, primary flag and load.
//! - [`Selector`] — one per LUN, lives across snapshots: a rotor for tie rotation and the probe clock of
//!   service-time.
//!
//! [`Selector::pick`] does no allocation and takes no lock: it reads the snapshot and a few atomics per
//! candidate, and does one `fetch_add` on the rotor. It walks the classes in order and returns the
//! policy's choice among the first class that has a pickable candidate (not `unusable`, not excluded),
//! so a Standby path is used only when no Active path can be, and left again as soon as one can.
//!
//! # The policies
//!
//! | policy | within a class |
//! |---|---|
//! | Failover | the first pickable candidate in snapshot order (primary first, then weight, then id) |
//! | Round Robin | every candidate in turn: the rotor picks the start, the first pickable from there wins |
//! | Round Robin with Subset | as Round Robin; the snapshot has put non-primaries into the Standby class |
//! | Dynamic Least Queue Depth | fewest requests in flight; ties rotate |
//! | Weighted Paths | least weight; ties rotate |
//! | Least Blocks | fewest bytes in flight; ties rotate |
//! | service-time (Vendor Specific) | least expected completion time (below); ties rotate; idle stale paths are probed |
//!
//! "Ties rotate": the tied candidates are collected during the scan (on the stack) and the rotor picks
//! one of them, so k equal candidates share evenly. Round Robin (and RRWS) start at `rotor % n` and
//! take the first pickable candidate from there: O(1) when nothing is excluded or unusable.
//!
//! # service-time
//!
//! Per path, [`PathLoad::on_complete`] keeps an EWMA of the issue-to-completion *latency* and of the
//! I/O size, and from both the latency per byte (Q10 fixed point, computed at completion so that a pick
//! never divides). The expected completion time of a new I/O of `b` bytes is
//!
//! ```text
//! estimate = max( (requests_in_flight + 1) × latency_ns,          -- queue depth, weighted by latency
//!                 (bytes_in_flight + b)    × latency_ns_per_byte ) -- bytes queued, for large transfers
//! ```
//!
//! Among paths of equal latency this is least-queue-depth; a slower path gets fewer requests in
//! proportion, and a path whose latency rises (because it is loaded, or degraded) sheds load: the
//! feedback is negative, so the split is stable. The latency is measured per request, not as the gap
//! between completions (dm historical-service-time's measure): on a path that serves many requests in
//! parallel — any NBD target — that gap shrinks as the path carries more, so the busiest path looks the
//! fastest and the selector herds onto it (healthy paths' shares swung between 0% and 90% from one
//! half-second to the next; the simulation test reproduces it). On a path that serves one request at
//! a time the latency counts the queue twice, which only spreads the load more evenly. Ties on the
//! estimate go to fewer requests in flight, then rotate. A path with no measurement yet estimates 0,
//! so it gets I/O (spread by its in-flight count) until its first completions measure it.
//!
//! EWMA weight: 1/8 for a new sample; 1/2 when the path had been quiet for longer than
//! `PROBE_STALE_FACTOR` × its estimate, because then the history is old news.
//!
//! **Probing.** A path that was slow gets little or no I/O, so without help a path that recovered would
//! never be measured again. When a pick happens, an Active-class candidate that is idle (nothing in
//! flight) and *stale* — no completion for `max(PROBE_STALE_FACTOR × latency_ns, PROBE_STALE_NS_MIN)` —
//! is picked instead of the best, at most once per `PROBE_INTERVAL_NS_MIN` per LUN (a CAS on the
//! selector's probe clock). The probe's completion refreshes the path (with the 1/2 weight), and a path
//! in flight is never stale, so each path is probed at most once per stale window, and the LUN at most
//! once per interval: the cost is bounded at a few slow I/Os per second, and a recovered path is
//! noticed within a few stale windows (see the simulation test).

use crate::types::{LoadBalancePolicy, PathId};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// At most this many candidates, one per path: the `exclude` mask of [`Selector::pick`] is a `u64`.
pub const CANDIDATES_MAX: usize = crate::limits::PATHS_PER_LUN_MAX;
const _: () = assert!(CANDIDATES_MAX <= u64::BITS as usize);

/// EWMA weight of a new sample, as a shift: 1/8.
pub const EWMA_SHIFT: u32 = 3;
/// EWMA weight of a sample after a quiet period (history is stale), as a shift: 1/2.
pub const EWMA_STALE_SHIFT: u32 = 1;
/// Fixed-point fraction bits of the per-byte latency.
pub const SERVICE_PER_BYTE_SHIFT: u32 = 10;

/// A path is stale when it completed nothing for this many times its latency …
pub const PROBE_STALE_FACTOR: u64 = 16;
/// … or for this long, whichever is longer.
pub const PROBE_STALE_NS_MIN: u64 = 50_000_000;
/// At most one probe per LUN per this interval.
pub const PROBE_INTERVAL_NS_MIN: u64 = 10_000_000;

/// One path's load, shared by the data path (writer) and the selectors (readers). Atomics only;
/// cache-line aligned so that two paths' counters never share a line.
///
/// ```
/// use lunmpio_vds::PathLoad;
/// let load = PathLoad::new();
/// load.on_dispatch(4096);
/// assert_eq!((load.requests_in_flight(), load.bytes_in_flight()), (1, 4096));
/// load.on_complete(4096, 200_000, 1_000_000);
/// assert_eq!((load.requests_in_flight(), load.bytes_in_flight()), (0, 0));
/// assert_eq!(load.latency_ns_ewma(), 200_000);
/// assert_eq!(load.completions(), 1);
/// ```
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct PathLoad {
    unusable: AtomicBool,
    requests_in_flight: AtomicU64,
    bytes_in_flight: AtomicU64,
    /// Issue-to-completion latency (service-time's measure, and statistics).
    latency_ns_ewma: AtomicU64,
    io_bytes_ewma: AtomicU64,
    /// `latency_ns_ewma << SERVICE_PER_BYTE_SHIFT / io_bytes_ewma`.
    latency_per_byte_q10: AtomicU64,
    completion_last_ns: AtomicU64,
    completions: AtomicU64,
}

fn ewma(old: u64, sample: u64, shift: u32) -> u64 {
    if old == 0 {
        return sample;
    }
    // old + (sample - old) / 2^shift, in signed arithmetic on u64 values that fit in i128.
    let next = old as i128 + ((sample as i128 - old as i128) >> shift);
    next.max(1) as u64
}

fn saturating_decrement(counter: &AtomicU64, by: u64, what: &str) {
    let previous = counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |value| {
            Some(value.saturating_sub(by))
        })
        .unwrap_or(0);
    debug_assert!(previous >= by, "{what} underflow: {previous} - {by}");
}

impl PathLoad {
    pub fn new() -> PathLoad {
        PathLoad::default()
    }

    /// An I/O of `bytes` was sent on this path.
    #[inline]
    pub fn on_dispatch(&self, bytes: u32) {
        self.requests_in_flight.fetch_add(1, Ordering::AcqRel);
        self.bytes_in_flight
            .fetch_add(u64::from(bytes), Ordering::AcqRel);
    }

    /// Like [`PathLoad::on_dispatch`], but only within bounds: at most `requests_max` requests and
    /// `bytes_max` bytes in flight (one request of any size is admitted on an idle path, so a large I/O
    /// is never starved). Returns whether it was counted in; the caller waits for room otherwise.
    ///
    /// ```
    /// # use lunmpio_vds::PathLoad;
    /// let load = PathLoad::new();
    /// assert!(load.try_dispatch(64 << 20, 8, 1 << 20), "idle: admitted whatever its size");
    /// assert!(!load.try_dispatch(4096, 8, 1 << 20), "over the byte bound");
    /// load.on_complete(64 << 20, 1_000, 2_000);
    /// assert!(load.try_dispatch(4096, 8, 1 << 20));
    /// ```
    pub fn try_dispatch(&self, bytes: u32, requests_max: u64, bytes_max: u64) -> bool {
        let bytes = u64::from(bytes);
        let admitted = self
            .bytes_in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |in_flight| {
                let fits = in_flight == 0 || in_flight.saturating_add(bytes) <= bytes_max;
                (fits && self.requests_in_flight.load(Ordering::Acquire) < requests_max)
                    .then_some(in_flight + bytes)
            })
            .is_ok();
        if admitted {
            self.requests_in_flight.fetch_add(1, Ordering::AcqRel);
        }
        admitted
    }

    /// An I/O of `bytes` dispatched earlier completed after `latency_ns`, at monotonic time `now_ns`.
    /// Only data transfers (`bytes > 0`) teach the latency estimate.
    pub fn on_complete(&self, bytes: u32, latency_ns: u64, now_ns: u64) {
        saturating_decrement(&self.requests_in_flight, 1, "requests in flight");
        saturating_decrement(&self.bytes_in_flight, u64::from(bytes), "bytes in flight");

        if bytes == 0 {
            // FLUSH, TRIM, WRITE_ZEROES: their latency says little about how fast this path moves
            // data (a 5 ms flush would push reads away from it), so only data transfers are learnt.
            self.completion_last_ns.fetch_max(now_ns, Ordering::AcqRel);
            self.completions.fetch_add(1, Ordering::AcqRel);
            return;
        }
        let completion_last_ns = self.completion_last_ns.load(Ordering::Acquire);
        let latency_old = self.latency_ns_ewma.load(Ordering::Relaxed);
        let quiet = completion_last_ns == 0
            || now_ns.saturating_sub(completion_last_ns)
                > PROBE_STALE_FACTOR
                    .saturating_mul(latency_old)
                    .max(PROBE_STALE_NS_MIN);
        let shift = if quiet { EWMA_STALE_SHIFT } else { EWMA_SHIFT };

        // Load-modify-store, not CAS: two racing completions may lose one sample of an average, which
        // is harmless, and it keeps the completion path wait-free.
        let latency_new = ewma(latency_old, latency_ns.max(1), shift);
        self.latency_ns_ewma.store(latency_new, Ordering::Relaxed);
        let bytes_new = ewma(
            self.io_bytes_ewma.load(Ordering::Relaxed),
            u64::from(bytes),
            EWMA_SHIFT,
        );
        self.io_bytes_ewma.store(bytes_new, Ordering::Relaxed);
        self.latency_per_byte_q10.store(
            (latency_new << SERVICE_PER_BYTE_SHIFT) / bytes_new,
            Ordering::Relaxed,
        );

        self.completion_last_ns.fetch_max(now_ns, Ordering::AcqRel);
        self.completions.fetch_add(1, Ordering::AcqRel);
    }

    /// An I/O dispatched earlier will not complete here (the path failed; it is re-driven elsewhere):
    /// take it out of the in-flight counts without a latency sample.
    pub fn on_abandon(&self, bytes: u32) {
        saturating_decrement(&self.requests_in_flight, 1, "requests in flight");
        saturating_decrement(&self.bytes_in_flight, u64::from(bytes), "bytes in flight");
    }

    /// The data path saw this path fault or fenced it: selectors skip it from now on.
    pub fn mark_unusable(&self) {
        self.unusable.store(true, Ordering::Release);
    }

    /// The control plane put the path back into service.
    pub fn mark_usable(&self) {
        self.unusable.store(false, Ordering::Release);
    }

    #[inline]
    pub fn is_unusable(&self) -> bool {
        self.unusable.load(Ordering::Acquire)
    }

    #[inline]
    pub fn requests_in_flight(&self) -> u64 {
        self.requests_in_flight.load(Ordering::Relaxed)
    }

    #[inline]
    pub fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight.load(Ordering::Relaxed)
    }

    /// EWMA of issue-to-completion latency; 0 before the first completion.
    pub fn latency_ns_ewma(&self) -> u64 {
        self.latency_ns_ewma.load(Ordering::Relaxed)
    }

    /// Monotonic time of the last completion; 0 before the first.
    pub fn completion_last_ns(&self) -> u64 {
        self.completion_last_ns.load(Ordering::Relaxed)
    }

    pub fn completions(&self) -> u64 {
        self.completions.load(Ordering::Relaxed)
    }

    /// service-time's estimate for a new I/O of `io_bytes`, in ns × 2^10 (comparable across paths).
    #[inline]
    pub fn estimate_q10(&self, io_bytes: u32) -> u64 {
        let in_flight = self.requests_in_flight.load(Ordering::Relaxed);
        let latency_ns = self.latency_ns_ewma.load(Ordering::Relaxed);
        let by_count = (in_flight + 1)
            .saturating_mul(latency_ns)
            .saturating_mul(1 << SERVICE_PER_BYTE_SHIFT);
        let bytes = self.bytes_in_flight.load(Ordering::Relaxed) + u64::from(io_bytes);
        let by_bytes = bytes.saturating_mul(self.latency_per_byte_q10.load(Ordering::Relaxed));
        by_count.max(by_bytes)
    }

    /// Idle and without a completion for longer than its stale window.
    #[inline]
    fn is_stale_idle(&self, now_ns: u64) -> bool {
        if self.requests_in_flight.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let window = PROBE_STALE_FACTOR
            .saturating_mul(self.latency_ns_ewma())
            .max(PROBE_STALE_NS_MIN);
        now_ns.saturating_sub(self.completion_last_ns()) > window
    }
}

/// A candidate's class: the selector uses a class only when no earlier class has a pickable candidate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum CandidateClass {
    /// Carries I/O.
    Active = 0,
    /// Policy standby: non-primary under Failover / Round Robin with Subset, or a path awaiting failback.
    Standby = 1,
    /// Administratively standby: used only after every policy standby, because an administrator asked.
    AdminStandby = 2,
}

impl CandidateClass {
    pub const COUNT: usize = 3;

    /// Whether VDS reports this class as Standby.
    pub const fn is_standby(self) -> bool {
        !matches!(self, CandidateClass::Active)
    }
}

/// One usable path as the selector sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Index of the path in [`crate::LunMpio::paths`] at the time of the snapshot.
    pub index: usize,
    pub path_id: PathId,
    pub weight: u32,
    pub primary: bool,
    pub class: CandidateClass,
    pub load: Arc<PathLoad>,
}

/// The immutable input of [`Selector::pick`]: the policy and the candidates in canonical order.
#[derive(Clone, Debug)]
pub struct SelectorSnapshot {
    policy: LoadBalancePolicy,
    candidates: Vec<Candidate>,
    /// `candidates[class_start[c]..class_start[c + 1]]` is class `c`.
    class_start: [usize; CandidateClass::COUNT + 1],
}

impl SelectorSnapshot {
    /// Sorts `candidates` into canonical order — class, then (Failover only) primary first, then weight,
    /// then path id — and indexes the class boundaries.
    ///
    /// Panics on more than [`CANDIDATES_MAX`] candidates or a duplicate path id (callers build these
    /// from a validated [`crate::LunMpio`]).
    pub fn new(policy: LoadBalancePolicy, mut candidates: Vec<Candidate>) -> SelectorSnapshot {
        assert!(
            candidates.len() <= CANDIDATES_MAX,
            "{} candidates, at most {CANDIDATES_MAX}",
            candidates.len()
        );
        let failover = policy == LoadBalancePolicy::Failover;
        candidates.sort_by_key(|c| (c.class, failover && !c.primary, c.weight, c.path_id));
        assert!(
            candidates.windows(2).all(|w| w[0].path_id != w[1].path_id),
            "duplicate path id among candidates"
        );
        let mut class_start = [0; CandidateClass::COUNT + 1];
        for (c, start) in class_start.iter_mut().enumerate() {
            *start = candidates.partition_point(|candidate| (candidate.class as usize) < c);
        }
        debug_assert_eq!(class_start[CandidateClass::COUNT], candidates.len());
        SelectorSnapshot {
            policy,
            candidates,
            class_start,
        }
    }

    /// No candidate: every I/O must wait for a path (the engine's no-path handling).
    pub fn empty(policy: LoadBalancePolicy) -> SelectorSnapshot {
        SelectorSnapshot::new(policy, Vec::new())
    }

    pub fn policy(&self) -> LoadBalancePolicy {
        self.policy
    }

    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }

    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The candidates of one class.
    pub fn class(&self, class: CandidateClass) -> &[Candidate] {
        let c = class as usize;
        &self.candidates[self.class_start[c]..self.class_start[c + 1]]
    }
}

/// The per-LUN selector state that outlives snapshots. `Sync`: many threads may pick at once.
///
/// ```
/// use lunmpio_vds::{Candidate, CandidateClass, LoadBalancePolicy, PathId, PathLoad, Selector, SelectorSnapshot};
/// use std::sync::Arc;
/// let candidates = (0..3).map(|i| Candidate {
///     index: i, path_id: PathId::new(1, i as u64), weight: 0, primary: false,
///     class: CandidateClass::Active, load: Arc::new(PathLoad::new()),
/// }).collect();
/// let snap = SelectorSnapshot::new(LoadBalancePolicy::RoundRobin, candidates);
/// let selector = Selector::new();
/// let picks: Vec<usize> = (0..6).map(|_| selector.pick(&snap, 4096, 0, 0).unwrap()).collect();
/// assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
/// // Candidate 1 was already tried for this I/O:
/// assert_ne!(selector.pick(&snap, 4096, 0, 1 << 1), Some(1));
/// ```
#[derive(Debug, Default)]
pub struct Selector {
    rotor: AtomicU64,
    probe_last_ns: AtomicU64,
    probes: AtomicU64,
}

impl Selector {
    pub fn new() -> Selector {
        Selector::default()
    }

    /// Probes taken so far (service-time).
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Picks the candidate for one I/O of `io_bytes` at monotonic time `now_ns`, skipping candidates
    /// whose bit is set in `exclude` (already tried for this I/O) and those marked unusable. Returns an
    /// index into `snap.candidates()`, or `None` when nothing is pickable.
    #[inline]
    pub fn pick(
        &self,
        snap: &SelectorSnapshot,
        io_bytes: u32,
        now_ns: u64,
        exclude: u64,
    ) -> Option<usize> {
        if snap.candidates.is_empty() {
            return None;
        }
        // One rotor step per I/O, shared by all classes: exactly even rotation within a class.
        let rotor = match snap.policy {
            LoadBalancePolicy::Failover => 0,
            _ => self.rotor.fetch_add(1, Ordering::Relaxed),
        };
        for c in 0..CandidateClass::COUNT {
            let (start, end) = (snap.class_start[c], snap.class_start[c + 1]);
            if start == end {
                continue;
            }
            let picked =
                self.pick_in_class(snap, start, end, io_bytes, now_ns, exclude, rotor, c == 0);
            if let Some(index) = picked {
                debug_assert!(index >= start && index < end);
                debug_assert!(exclude & (1u64 << index) == 0);
                return Some(index);
            }
        }
        None
    }

    /// Convenience: the picked candidate itself.
    pub fn pick_candidate<'s>(
        &self,
        snap: &'s SelectorSnapshot,
        io_bytes: u32,
        now_ns: u64,
        exclude: u64,
    ) -> Option<&'s Candidate> {
        self.pick(snap, io_bytes, now_ns, exclude)
            .map(|i| &snap.candidates[i])
    }

    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn pick_in_class(
        &self,
        snap: &SelectorSnapshot,
        start: usize,
        end: usize,
        io_bytes: u32,
        now_ns: u64,
        exclude: u64,
        rotor: u64,
        active: bool,
    ) -> Option<usize> {
        let candidates = &snap.candidates;
        let pickable = |i: usize| exclude & (1u64 << i) == 0 && !candidates[i].load.is_unusable();
        let n = end - start;
        match snap.policy {
            LoadBalancePolicy::Failover => (start..end).find(|&i| pickable(i)),
            LoadBalancePolicy::RoundRobin | LoadBalancePolicy::RoundRobinWithSubset => {
                let first = (rotor % n as u64) as usize;
                (0..n)
                    .map(|k| start + (first + k) % n)
                    .find(|&i| pickable(i))
            }
            LoadBalancePolicy::DynLeastQueueDepth => least_by(start, n, rotor, pickable, |i| {
                candidates[i].load.requests_in_flight() as u128
            }),
            LoadBalancePolicy::WeightedPaths => {
                least_by(start, n, rotor, pickable, |i| candidates[i].weight as u128)
            }
            LoadBalancePolicy::LeastBlocks => least_by(start, n, rotor, pickable, |i| {
                candidates[i].load.bytes_in_flight() as u128
            }),
            LoadBalancePolicy::VendorSpecific => {
                if active && let Some(i) = self.probe(snap, start, end, now_ns, pickable) {
                    return Some(i);
                }
                least_by(start, n, rotor, pickable, |i| {
                    let load = &candidates[i].load;
                    (u128::from(load.estimate_q10(io_bytes)) << 32)
                        | u128::from(load.requests_in_flight().min(u32::MAX as u64))
                })
            }
        }
    }

    /// service-time's probe: an idle, stale Active candidate, at most once per interval per LUN.
    #[inline]
    fn probe(
        &self,
        snap: &SelectorSnapshot,
        start: usize,
        end: usize,
        now_ns: u64,
        pickable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let probe_last_ns = self.probe_last_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(probe_last_ns) < PROBE_INTERVAL_NS_MIN {
            return None;
        }
        let stale =
            (start..end).find(|&i| pickable(i) && snap.candidates[i].load.is_stale_idle(now_ns))?;
        // Only one of several racing pickers takes the probe.
        self.probe_last_ns
            .compare_exchange(probe_last_ns, now_ns, Ordering::AcqRel, Ordering::Relaxed)
            .ok()?;
        self.probes.fetch_add(1, Ordering::Relaxed);
        Some(stale)
    }
}

/// The pickable index in `start..start + n` with the least key. Ties rotate evenly: the tied indices
/// are collected (on the stack) and the rotor chooses among them, so k tied candidates get 1/k each
/// wherever they sit in the class.
#[inline]
fn least_by(
    start: usize,
    n: usize,
    rotor: u64,
    pickable: impl Fn(usize) -> bool,
    key: impl Fn(usize) -> u128,
) -> Option<usize> {
    debug_assert!(n <= CANDIDATES_MAX);
    let mut ties = [0u8; CANDIDATES_MAX];
    let mut tie_count = 0usize;
    let mut least = u128::MAX;
    for i in start..start + n {
        if !pickable(i) {
            continue;
        }
        let value = key(i);
        if value < least || tie_count == 0 {
            least = value;
            tie_count = 0;
        } else if value > least {
            continue;
        }
        ties[tie_count] = i as u8;
        tie_count += 1;
    }
    if tie_count == 0 {
        return None;
    }
    Some(usize::from(ties[(rotor % tie_count as u64) as usize]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: u64, weight: u32, primary: bool, class: CandidateClass) -> Candidate {
        Candidate {
            index: id as usize,
            path_id: PathId::new(1, id),
            weight,
            primary,
            class,
            load: Arc::new(PathLoad::new()),
        }
    }

    fn active(n: u64) -> Vec<Candidate> {
        (0..n)
            .map(|i| candidate(i, 0, false, CandidateClass::Active))
            .collect()
    }

    fn counts(selector: &Selector, snap: &SelectorSnapshot, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; snap.candidates().len()];
        for _ in 0..picks {
            counts[selector.pick(snap, 4096, 0, 0).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn snapshot_orders_by_class_primary_weight_id() {
        let snap = SelectorSnapshot::new(
            LoadBalancePolicy::Failover,
            vec![
                candidate(1, 5, false, CandidateClass::Standby),
                candidate(2, 1, false, CandidateClass::AdminStandby),
                candidate(3, 9, true, CandidateClass::Active),
                candidate(4, 5, false, CandidateClass::Standby),
                candidate(5, 0, false, CandidateClass::Standby),
            ],
        );
        let ids: Vec<u64> = snap
            .candidates()
            .iter()
            .map(|c| c.path_id.path_id)
            .collect();
        assert_eq!(ids, [3, 5, 1, 4, 2]);
        assert_eq!(snap.class(CandidateClass::Standby).len(), 3);
        assert_eq!(snap.class(CandidateClass::AdminStandby).len(), 1);
    }

    #[test]
    fn empty_snapshot_picks_nothing() {
        let snap = SelectorSnapshot::empty(LoadBalancePolicy::RoundRobin);
        assert!(snap.is_empty());
        assert_eq!(Selector::new().pick(&snap, 0, 0, 0), None);
    }

    #[test]
    fn round_robin_is_exactly_even() {
        let snap = SelectorSnapshot::new(LoadBalancePolicy::RoundRobin, active(5));
        assert_eq!(counts(&Selector::new(), &snap, 500), [100; 5]);
    }

    #[test]
    fn failover_uses_first_then_next() {
        let mut c = active(3);
        c[0].primary = true;
        c[1].class = CandidateClass::Standby;
        c[1].weight = 7;
        c[2].class = CandidateClass::Standby;
        c[2].weight = 3;
        let snap = SelectorSnapshot::new(LoadBalancePolicy::Failover, c);
        let selector = Selector::new();
        assert_eq!(counts(&selector, &snap, 10), [10, 0, 0]);
        snap.candidates()[0].load.mark_unusable();
        // Lowest weight among the standbys: path 2 (weight 3), which sorts before path 1.
        assert_eq!(snap.candidates()[1].path_id.path_id, 2);
        assert_eq!(counts(&selector, &snap, 10), [0, 10, 0]);
        assert_eq!(selector.pick(&snap, 0, 0, 1 << 1), Some(2));
        assert_eq!(selector.pick(&snap, 0, 0, 0b110), None);
        snap.candidates()[0].load.mark_usable();
        assert_eq!(selector.pick(&snap, 0, 0, 0), Some(0));
    }

    #[test]
    fn least_queue_depth_and_least_blocks() {
        let snap = SelectorSnapshot::new(LoadBalancePolicy::DynLeastQueueDepth, active(3));
        let selector = Selector::new();
        snap.candidates()[0].load.on_dispatch(4096);
        snap.candidates()[1].load.on_dispatch(4096);
        assert_eq!(selector.pick(&snap, 0, 0, 0), Some(2));
        snap.candidates()[2].load.on_dispatch(1 << 20);
        snap.candidates()[2].load.on_dispatch(1 << 20);
        assert!(matches!(selector.pick(&snap, 0, 0, 0), Some(0 | 1)));

        let snap = SelectorSnapshot::new(LoadBalancePolicy::LeastBlocks, active(3));
        snap.candidates()[0].load.on_dispatch(1 << 20);
        snap.candidates()[1].load.on_dispatch(4096);
        snap.candidates()[1].load.on_dispatch(4096);
        snap.candidates()[2].load.on_dispatch(65536);
        assert_eq!(selector.pick(&snap, 0, 0, 0), Some(1));
    }

    #[test]
    fn weighted_paths_takes_only_the_lightest_and_rotates_ties() {
        let mut c = active(4);
        for (candidate, weight) in c.iter_mut().zip([3, 1, 1, 2]) {
            candidate.weight = weight;
        }
        let snap = SelectorSnapshot::new(LoadBalancePolicy::WeightedPaths, c);
        let selector = Selector::new();
        assert_eq!(counts(&selector, &snap, 100), [50, 50, 0, 0]);
        snap.candidates()[0].load.mark_unusable();
        snap.candidates()[1].load.mark_unusable();
        assert_eq!(counts(&selector, &snap, 10), [0, 0, 10, 0]);
    }

    #[test]
    fn standby_only_when_no_active() {
        let mut c = active(3);
        c[2].class = CandidateClass::Standby;
        let snap = SelectorSnapshot::new(LoadBalancePolicy::RoundRobinWithSubset, c);
        let selector = Selector::new();
        assert_eq!(counts(&selector, &snap, 10), [5, 5, 0]);
        assert_eq!(selector.pick(&snap, 0, 0, 0b11), Some(2));
    }

    #[test]
    fn only_data_transfers_teach_the_latency_estimate() {
        let load = PathLoad::new();
        load.on_dispatch(4096);
        load.on_complete(4096, 100_000, 1_000_000);
        let estimate = load.estimate_q10(4096);
        // A slow FLUSH (no payload) completes: counted, but the path does not look slower for reads.
        load.on_dispatch(0);
        load.on_complete(0, 5_000_000, 6_000_000);
        assert_eq!(load.latency_ns_ewma(), 100_000);
        assert_eq!(load.estimate_q10(4096), estimate);
        assert_eq!(load.completions(), 2);
        assert_eq!(load.completion_last_ns(), 6_000_000);
        assert_eq!(load.requests_in_flight(), 0);
    }

    #[test]
    fn service_time_prefers_the_faster_path() {
        let snap = SelectorSnapshot::new(LoadBalancePolicy::VendorSpecific, active(2));
        let (fast, slow) = (&snap.candidates()[0].load, &snap.candidates()[1].load);
        let mut now = 1_000_000_000;
        for _ in 0..32 {
            fast.on_dispatch(4096);
            slow.on_dispatch(4096);
            now += 1_000_000;
            fast.on_complete(4096, 100_000, now);
            slow.on_complete(4096, 1_000_000, now);
        }
        assert!(fast.latency_ns_ewma() < slow.latency_ns_ewma());
        let selector = Selector::new();
        // Fill up the fast path until its queue makes it as slow as the idle slow path.
        let mut picks = [0; 2];
        for _ in 0..20 {
            let i = selector.pick(&snap, 4096, now, 0).unwrap();
            snap.candidates()[i].load.on_dispatch(4096);
            picks[i] += 1;
        }
        assert!(picks[0] > picks[1] * 3, "{picks:?}");
        assert!(picks[1] > 0, "{picks:?}");
    }

    #[test]
    fn service_time_probes_a_stale_idle_path_at_a_bounded_rate() {
        let snap = SelectorSnapshot::new(LoadBalancePolicy::VendorSpecific, active(2));
        let (fast, slow) = (&snap.candidates()[0].load, &snap.candidates()[1].load);
        slow.on_dispatch(4096);
        slow.on_complete(4096, 10_000_000, 10_000_000);
        fast.on_dispatch(4096);
        fast.on_complete(4096, 100_000, 10_000_000);
        let selector = Selector::new();
        let mut now = 10_000_000;
        // Not yet stale: the fast path wins.
        assert_eq!(selector.pick(&snap, 4096, now, 0), Some(0));
        now += PROBE_STALE_NS_MIN.max(PROBE_STALE_FACTOR * 10_000_000) + 1;
        fast.on_dispatch(4096);
        fast.on_complete(4096, 100_000, now);
        assert_eq!(
            selector.pick(&snap, 4096, now, 0),
            Some(1),
            "the stale slow path is probed"
        );
        assert_eq!(selector.probes(), 1);
        // Within the probe interval, no second probe even though path 1 is still idle and stale.
        assert_eq!(selector.pick(&snap, 4096, now + 1, 0), Some(0));
        assert_eq!(selector.probes(), 1);
    }

    #[test]
    fn completion_bookkeeping_never_underflows_in_release_terms() {
        let load = PathLoad::new();
        load.on_dispatch(10);
        load.on_abandon(10);
        assert_eq!((load.requests_in_flight(), load.bytes_in_flight()), (0, 0));
        assert_eq!(load.completions(), 0);
        assert!(!load.is_unusable());
        load.mark_unusable();
        assert!(load.is_unusable());
    }

    #[test]
    fn ewma_moves_by_the_weight() {
        assert_eq!(ewma(0, 800, EWMA_SHIFT), 800);
        assert_eq!(ewma(800, 0, EWMA_SHIFT), 700);
        assert_eq!(ewma(800, 1600, EWMA_SHIFT), 900);
        assert_eq!(ewma(800, 0, EWMA_STALE_SHIFT), 400);
    }
}
