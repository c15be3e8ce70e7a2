//! The demo's verifying workload: random reads and writes through the NBD export, many in flight.
//!
//! The region under test is cut into stripes of [`STRIPE_BLOCKS`] blocks. A worker locks one stripe
//! for the length of one request (a try-lock: a busy stripe is skipped), so the expected content of
//! every block is exact: each block records the generation last written and the CRC32C of that
//! content. A write puts a fresh generation into every block it covers; a read checks every block it
//! returns against the record. A block's content names its own index and generation, so a mismatch
//! says whether the data was stale, misplaced or garbage.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use lunmpio_nbd::{Client, CommandFlags};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

pub const BLOCK: u64 = 4096;
pub const STRIPE_BLOCKS: u64 = 16;
const MAGIC: &[u8; 4] = b"LMPD";
/// Requests slower than this are remembered, to measure the stall around each fault.
const SLOW: Duration = Duration::from_millis(5);
/// How many error and mismatch descriptions are kept for the report.
const SAMPLES_MAX: usize = 8;
/// A block whose content is unknown (a write to it failed): not checked until written again.
const UNKNOWN: u64 = u64::MAX;

/// A request slower than [`SLOW`]: start and end in nanoseconds since the demo's epoch.
#[derive(Debug, Clone, Copy)]
pub struct SlowIo {
    pub start_ns: u64,
    pub end_ns: u64,
}

/// Counters shared by the workers, the view and the report.
#[derive(Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
    pub mismatches: AtomicU64,
    pub latency_sum_ns: AtomicU64,
    pub max_latency_ns: AtomicU64,
    pub in_flight: AtomicU64,
}

impl Counters {
    pub fn ios(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
            + self.writes.load(Ordering::Relaxed)
            + self.flushes.load(Ordering::Relaxed)
    }
}

pub struct Workload {
    client: Client,
    epoch: Instant,
    blocks: u64,
    /// Per block: generation << 32 | crc32c of the expected content.
    expected: Box<[AtomicU64]>,
    busy: Box<[AtomicBool]>,
    zero_crc: u32,
    seed: u64,
    pub counters: Counters,
    slow: Mutex<Vec<SlowIo>>,
    pub error_samples: Mutex<Vec<String>>,
    pub mismatch_samples: Mutex<Vec<String>>,
    stop: AtomicBool,
}

impl Workload {
    /// A workload over the first `region` bytes of the export (rounded down to whole stripes).
    pub fn new(client: Client, region: u64, epoch: Instant, seed: u64) -> Arc<Workload> {
        let stripes = (region / (BLOCK * STRIPE_BLOCKS)).max(1);
        let blocks = stripes * STRIPE_BLOCKS;
        let zero_crc = crc32c::crc32c(&vec![0u8; BLOCK as usize]);
        Arc::new(Workload {
            client,
            epoch,
            blocks,
            expected: (0..blocks)
                .map(|_| AtomicU64::new(u64::from(zero_crc)))
                .collect(),
            busy: (0..stripes).map(|_| AtomicBool::new(false)).collect(),
            zero_crc,
            seed,
            counters: Counters::default(),
            slow: Mutex::new(Vec::new()),
            error_samples: Mutex::new(Vec::new()),
            mismatch_samples: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        })
    }

    pub fn region_bytes(&self) -> u64 {
        self.blocks * BLOCK
    }

    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Starts `depth` workers; each keeps one request in flight until [`Workload::stop`].
    pub fn start(self: &Arc<Self>, depth: usize) -> Vec<tokio::task::JoinHandle<()>> {
        (0..depth)
            .map(|w| {
                let me = Arc::clone(self);
                tokio::spawn(async move { me.worker(w as u64).await })
            })
            .collect()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn slow_ios(&self) -> Vec<SlowIo> {
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn worker(&self, id: u64) {
        let mut rng = SmallRng::seed_from_u64(self.seed ^ (id.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
        let stripes = self.busy.len() as u64;
        while !self.stop.load(Ordering::Acquire) {
            if rng.random_ratio(1, 256) {
                let start = self.now_ns();
                self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
                let result = self.client.flush().await;
                self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                self.finish(start, 0);
                if let Err(e) = result {
                    self.error(format!("FLUSH failed: {e}"));
                }
                continue;
            }
            let stripe = rng.random_range(0..stripes);
            let Some(_lock) = StripeLock::try_new(&self.busy[stripe as usize]) else {
                tokio::task::yield_now().await;
                continue;
            };
            let first = stripe * STRIPE_BLOCKS + rng.random_range(0..STRIPE_BLOCKS);
            let end = (stripe + 1) * STRIPE_BLOCKS;
            let count = rng.random_range(1..=(end - first));
            if rng.random_ratio(2, 5) {
                self.write(first, count, &mut rng).await;
            } else {
                self.read(first, count).await;
            }
        }
    }

    async fn write(&self, first: u64, count: u64, rng: &mut SmallRng) {
        let mut data = BytesMut::with_capacity((count * BLOCK) as usize);
        let mut records = Vec::with_capacity(count as usize);
        for b in first..first + count {
            let old = self.expected[b as usize].load(Ordering::Relaxed);
            let generation = if old == UNKNOWN { 1 } else { (old >> 32) + 1 };
            let generation = generation + u64::from(rng.random_range(0..4u32)); // not guessable
            let start = data.len();
            fill_block(&mut data, b, generation as u32, self.seed);
            let crc = crc32c::crc32c(&data[start..]);
            records.push(((generation & 0xffff_ffff) << 32) | u64::from(crc));
        }
        let start = self.now_ns();
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = self
            .client
            .write(first * BLOCK, data.freeze(), CommandFlags::empty())
            .await;
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.finish(start, count * BLOCK);
        match result {
            Ok(()) => {
                for (i, r) in records.into_iter().enumerate() {
                    self.expected[first as usize + i].store(r, Ordering::Relaxed);
                }
            }
            Err(e) => {
                // What is on the disk now is unknown: either version may be there.
                for b in first..first + count {
                    self.expected[b as usize].store(UNKNOWN, Ordering::Relaxed);
                }
                self.error(format!(
                    "WRITE of {count} block(s) at block {first} failed: {e}"
                ));
            }
        }
    }

    async fn read(&self, first: u64, count: u64) {
        let start = self.now_ns();
        self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = self
            .client
            .read(first * BLOCK, (count * BLOCK) as u32)
            .await;
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.finish(start, count * BLOCK);
        match result {
            Ok(data) => {
                self.check(first, count, &data);
            }
            Err(e) => self.error(format!(
                "READ of {count} block(s) at block {first} failed: {e}"
            )),
        }
    }

    /// Checks `data` (blocks `first..first+count`) against the records; returns the mismatches.
    fn check(&self, first: u64, count: u64, data: &Bytes) -> u64 {
        if data.len() as u64 != count * BLOCK {
            self.mismatch(format!(
                "READ at block {first}: {} bytes returned, {} asked for",
                data.len(),
                count * BLOCK
            ));
            return 1;
        }
        let mut bad = 0;
        for (i, chunk) in data.chunks(BLOCK as usize).enumerate() {
            let b = first + i as u64;
            let record = self.expected[b as usize].load(Ordering::Relaxed);
            if record == UNKNOWN {
                continue;
            }
            let crc = crc32c::crc32c(chunk);
            if crc == record as u32 {
                continue;
            }
            bad += 1;
            self.mismatch(format!(
                "block {b}: expected generation {}, found {}",
                record >> 32,
                describe_block(chunk, self.zero_crc == crc)
            ));
        }
        bad
    }

    /// Reads the whole region back and checks every block; returns (blocks checked, mismatches).
    pub async fn verify_all(&self) -> (u64, u64) {
        const CHUNK_BLOCKS: u64 = 256;
        let mut checked = 0;
        let mut mismatches = 0;
        let mut first = 0;
        let mut pending = futures::stream::FuturesOrdered::new();
        while first < self.blocks || !pending.is_empty() {
            while first < self.blocks && pending.len() < 8 {
                let count = CHUNK_BLOCKS.min(self.blocks - first);
                let client = self.client.clone();
                let at = first;
                pending.push_back(async move {
                    (
                        at,
                        count,
                        client.read(at * BLOCK, (count * BLOCK) as u32).await,
                    )
                });
                first += count;
            }
            use futures::StreamExt;
            if let Some((at, count, result)) = pending.next().await {
                self.counters.reads.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .bytes
                    .fetch_add(count * BLOCK, Ordering::Relaxed);
                match result {
                    Ok(data) => {
                        mismatches += self.check(at, count, &data);
                        checked += count;
                    }
                    Err(e) => self.error(format!("final READ at block {at} failed: {e}")),
                }
            }
        }
        (checked, mismatches)
    }

    fn finish(&self, start_ns: u64, bytes: u64) {
        let end_ns = self.now_ns();
        let latency = end_ns.saturating_sub(start_ns);
        let c = &self.counters;
        c.bytes.fetch_add(bytes, Ordering::Relaxed);
        c.latency_sum_ns.fetch_add(latency, Ordering::Relaxed);
        c.max_latency_ns.fetch_max(latency, Ordering::Relaxed);
        if latency >= SLOW.as_nanos() as u64 {
            self.slow
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(SlowIo { start_ns, end_ns });
        }
    }

    fn error(&self, text: String) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        push_sample(&self.error_samples, text);
    }

    fn mismatch(&self, text: String) {
        self.counters.mismatches.fetch_add(1, Ordering::Relaxed);
        push_sample(&self.mismatch_samples, text);
    }
}

fn push_sample(samples: &Mutex<Vec<String>>, text: String) {
    let mut s = samples.lock().unwrap_or_else(|p| p.into_inner());
    if s.len() < SAMPLES_MAX {
        s.push(text);
    }
}

/// Holds a stripe for one request; released on drop.
struct StripeLock<'a>(&'a AtomicBool);

impl<'a> StripeLock<'a> {
    fn try_new(flag: &'a AtomicBool) -> Option<StripeLock<'a>> {
        flag.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| StripeLock(flag))
    }
}

impl Drop for StripeLock<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Block `b`, generation `generation`: magic, index, generation, then bytes derived from all three.
fn fill_block(out: &mut BytesMut, b: u64, generation: u32, seed: u64) {
    out.put_slice(MAGIC);
    out.put_u64(b);
    out.put_u32(generation);
    let mut rng = SmallRng::seed_from_u64(seed ^ (b << 20) ^ u64::from(generation));
    let mut fill = [0u8; (BLOCK - 16) as usize];
    rng.fill_bytes(&mut fill);
    out.put_slice(&fill);
}

fn describe_block(chunk: &[u8], zeros: bool) -> String {
    if zeros {
        return "zeros (never written)".into();
    }
    if chunk.len() >= 16 && &chunk[..4] == MAGIC {
        let b = u64::from_be_bytes(chunk[4..12].try_into().unwrap_or_default());
        let g = u32::from_be_bytes(chunk[12..16].try_into().unwrap_or_default());
        format!("block {b} generation {g}")
    } else {
        "unrecognised data".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_describe_themselves() {
        let mut b = BytesMut::new();
        fill_block(&mut b, 42, 7, 1);
        assert_eq!(b.len(), BLOCK as usize);
        assert_eq!(describe_block(&b, false), "block 42 generation 7");
        let mut c = BytesMut::new();
        fill_block(&mut c, 42, 8, 1);
        assert_ne!(crc32c::crc32c(&b), crc32c::crc32c(&c));
        assert_eq!(describe_block(&[0u8; 4096], true), "zeros (never written)");
    }
}
