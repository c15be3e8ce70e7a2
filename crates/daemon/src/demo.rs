//! `lunmpio demo`: the self-contained showcase.
//!
//! The full scenario of PRODUCT.md §11 (a multipath LUN surviving crashes, hangs and slow paths) needs the
//! multipath engine. Until then the demo exercises what exists: the simulated array over real loopback
//! TCP, driven by lunmpio's own NBD client. It proves that every controller port serves the same LUN
//! (data written through one port verifies through another) and shows each fault's effect as a client
//! sees it. Exit status: 0 when every block verified and every fault behaved, 1 otherwise.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use lunmpio_nbd::{
    Client, ClientError, CommandFlags, ConnectOptions, Endpoint, NbdErrno, TransmissionFlags,
};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::cli::DemoArgs;
use crate::target::fault::Fault;
use crate::target::{Array, ArrayConfig, Backing};
use crate::target_cli::status_table;
use crate::units::{format_duration, format_size};

const BLOCK: u32 = 4096;
const PORTS: u16 = 4;
const LUN_SIZE: u64 = 256 << 20;
const QUEUE_DEPTH: usize = 32;

struct Plan {
    blocks: usize,
    delay: Duration,
    hang_probe: Duration,
    error_reads: usize,
    rate: u64,
    rate_bytes: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                blocks: 512,
                delay: Duration::from_millis(30),
                hang_probe: Duration::from_millis(150),
                error_reads: 40,
                rate: 16 << 20,
                rate_bytes: 2 << 20,
            }
        } else {
            Plan {
                blocks: 4096,
                delay: Duration::from_millis(100),
                hang_probe: Duration::from_millis(500),
                error_reads: 200,
                rate: 8 << 20,
                rate_bytes: 8 << 20,
            }
        }
    }
}

/// Tally of what the demo saw.
#[derive(Default)]
struct Tally {
    ios: u64,
    bytes: u64,
    mismatches: u64,
    checks_failed: Vec<String>,
}

impl Tally {
    fn check(&mut self, ok: bool, what: String) {
        let mark = if ok { "ok " } else { "FAIL" };
        println!("    [{mark}] {what}");
        if !ok {
            self.checks_failed.push(what);
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let plan = Plan::new(args.quick);
    println!("lunmpio demo");
    println!(
        "  The full demo (a multipath LUN riding through port crashes, hangs and slow paths) arrives with the\n  \
         multipath engine. This runs the simulated array: {PORTS} controller ports over loopback TCP, checked\n  \
         with lunmpio's own NBD client, then one fault per port through the same machinery as\n  \
         `lunmpio target fault`.\n"
    );

    let array = Array::start(ArrayConfig {
        backing: Backing::Memory { size: LUN_SIZE },
        name: Some("lun0".into()),
        ports: PORTS,
        listen: "127.0.0.1:0".into(),
    })
    .await?;
    println!(
        "simulated array: export `{}`, {} RAM disk, controller ports:",
        array.name(),
        format_size(array.size())
    );
    for (i, uri) in array.uris().iter().enumerate() {
        println!("  port {i}: {uri}");
    }

    let mut tally = Tally::default();
    let result = scenario(&array, &plan, &mut tally).await;
    array.shutdown(Duration::from_secs(2)).await;
    result?;

    println!("\nper-port counters:");
    for line in status_table(&array.status_json()).lines() {
        println!("  {line}");
    }
    println!("\nsummary");
    println!(
        "  I/Os by the demo client: {} ({})",
        tally.ios,
        format_size(tally.bytes)
    );
    println!("  verification mismatches: {}", tally.mismatches);
    println!(
        "  fault checks: {} failed{}",
        tally.checks_failed.len(),
        if tally.checks_failed.is_empty() {
            String::new()
        } else {
            format!(": {}", tally.checks_failed.join("; "))
        }
    );
    println!("  elapsed: {}", format_duration(started.elapsed()));
    if tally.mismatches == 0 && tally.checks_failed.is_empty() {
        println!("  result: PASS");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("  result: FAIL");
        Ok(ExitCode::FAILURE)
    }
}

async fn connect(addr: SocketAddr, export: &str) -> Result<Client, ClientError> {
    let endpoint = Endpoint::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
        bind: None,
    };
    let mut options = ConnectOptions::new(endpoint, export);
    options.connect_timeout = Duration::from_secs(2);
    Client::connect(options).await
}

async fn connect_all(array: &Array) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::new();
    for (i, addr) in array.addrs().into_iter().enumerate() {
        let c = connect(addr, array.name())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to controller port {i} ({addr}): {e}"))?;
        clients.push(c);
    }
    Ok(clients)
}

/// A self-describing block: offset, sequence number, random fill, and a CRC32C of all of it at the end,
/// so a block read back is checked both for integrity and for being *this* block at *this* offset.
fn make_block(rng: &mut SmallRng, offset: u64, seq: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(BLOCK as usize);
    b.put_u64(offset);
    b.put_u64(seq);
    let mut fill = vec![0u8; BLOCK as usize - 20];
    rng.fill_bytes(&mut fill);
    b.put_slice(&fill);
    let crc = crc32c::crc32c(&b);
    b.put_u32(crc);
    b.freeze()
}

fn block_ok(data: &[u8], expected: &[u8]) -> bool {
    data.len() == BLOCK as usize && data == expected && {
        let (body, crc) = data.split_at(BLOCK as usize - 4);
        crc32c::crc32c(body).to_be_bytes() == crc
    }
}

async fn scenario(array: &Array, plan: &Plan, tally: &mut Tally) -> anyhow::Result<()> {
    let mut clients = connect_all(array).await?;
    let info = clients[0].info();
    println!(
        "\nconnected to every port: size {}, multi-conn {}, block sizes {}/{}/{}",
        format_size(info.size),
        info.flags.contains(TransmissionFlags::CAN_MULTI_CONN),
        info.block_size.min,
        info.block_size.preferred,
        info.block_size.max_payload
    );

    // 1. Verifying workload: write through port i % N, read back through port (i + 1) % N.
    println!("\n1. data written through one port reads back through another");
    let mut rng = SmallRng::seed_from_u64(0x006c_756e_6d70_696f);
    let total_blocks = LUN_SIZE / BLOCK as u64;
    let mut offsets: Vec<u64> =
        rand::seq::index::sample(&mut rng, total_blocks as usize, plan.blocks)
            .into_iter()
            .map(|i| i as u64 * BLOCK as u64)
            .collect();
    offsets.sort_unstable();
    let blocks: Vec<(u64, Bytes)> = offsets
        .iter()
        .enumerate()
        .map(|(seq, &off)| (off, make_block(&mut rng, off, seq as u64)))
        .collect();
    let t = Instant::now();
    let n = clients.len();
    let writes = futures::stream::iter(blocks.iter().enumerate().map(|(i, (off, data))| {
        let c = clients[i % n].clone();
        let (off, data) = (*off, data.clone());
        async move { c.write(off, data, CommandFlags::empty()).await }
    }))
    .buffer_unordered(QUEUE_DEPTH)
    .collect::<Vec<_>>()
    .await;
    let write_errors = writes.iter().filter(|r| r.is_err()).count();
    // One flush covers every connection: the export is CAN_MULTI_CONN.
    clients[0]
        .flush()
        .await
        .map_err(|e| anyhow::anyhow!("flush failed: {e}"))?;
    let write_time = t.elapsed();
    let t = Instant::now();
    let mismatches = verify(&clients, &blocks, 1).await;
    let read_time = t.elapsed();
    let bytes = blocks.len() as u64 * BLOCK as u64;
    tally.ios += 2 * blocks.len() as u64 + 1;
    tally.bytes += 2 * bytes;
    tally.mismatches += mismatches;
    println!(
        "    wrote {} random blocks ({}) through ports 0-{} in {}, read them back through the next port in {}",
        blocks.len(),
        format_size(bytes),
        n - 1,
        format_duration(write_time),
        format_duration(read_time)
    );
    tally.check(write_errors == 0, format!("write errors: {write_errors}"));
    tally.check(mismatches == 0, format!("mismatches: {mismatches}"));

    // 2. Port 0: down, then up.
    println!("\n2. port 0: down (reset connections, refuse new ones), then up");
    let addr0 = array.addrs()[0];
    array
        .apply_fault(0, Fault::Down)
        .map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let seen = tokio::time::timeout(Duration::from_secs(5), clients[0].read(0, BLOCK)).await;
    let reset_ok = matches!(&seen, Ok(Err(e)) if e.is_path_fault());
    tally.check(
        reset_ok,
        format!(
            "connected client sees the path fail after {}: {}",
            format_duration(t.elapsed()),
            describe(&seen)
        ),
    );
    let refused = connect(addr0, array.name()).await;
    tally.check(
        refused.is_err(),
        format!(
            "new connection refused: {}",
            refused
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_else(|| "connected!".into())
        ),
    );
    array
        .apply_fault(0, Fault::Up)
        .map_err(anyhow::Error::msg)?;
    match connect(addr0, array.name()).await {
        Ok(c) => {
            clients[0] = c;
            let m = verify(&clients[..1], &blocks[..blocks.len().min(64)], 0).await;
            tally.ios += blocks.len().min(64) as u64;
            tally.mismatches += m;
            tally.check(
                m == 0,
                format!(
                    "after up: reconnected, {} blocks verify",
                    blocks.len().min(64)
                ),
            );
        }
        Err(e) => tally.check(false, format!("after up: reconnect failed: {e}")),
    }

    // 3. Port 1: hang, then up.
    println!("\n3. port 1: hang (answer nothing), then up");
    array
        .apply_fault(1, Fault::Hang)
        .map_err(anyhow::Error::msg)?;
    let c1 = clients[1].clone();
    let (off, expected) = blocks[0].clone();
    let held = tokio::spawn(async move {
        let t = Instant::now();
        (c1.read(off, BLOCK).await, t.elapsed())
    });
    tokio::time::sleep(plan.hang_probe).await;
    tally.check(
        !held.is_finished(),
        format!(
            "a read is still unanswered after {}",
            format_duration(plan.hang_probe)
        ),
    );
    array
        .apply_fault(1, Fault::Up)
        .map_err(anyhow::Error::msg)?;
    match tokio::time::timeout(Duration::from_secs(5), held).await {
        Ok(Ok((Ok(data), waited))) => {
            tally.ios += 1;
            let ok = block_ok(&data, &expected);
            if !ok {
                tally.mismatches += 1;
            }
            tally.check(
                ok,
                format!(
                    "after up the held read completes (waited {}) with the right data",
                    format_duration(waited)
                ),
            );
        }
        other => tally.check(
            false,
            format!("after up the held read did not complete: {other:?}"),
        ),
    }

    // 4. Port 2: added latency.
    println!("\n4. port 2: delay={}", format_duration(plan.delay));
    let before = time_reads(&clients[2], &blocks, 8).await;
    array
        .apply_fault(2, Fault::Delay(plan.delay))
        .map_err(anyhow::Error::msg)?;
    let during = time_reads(&clients[2], &blocks, 8).await;
    array
        .apply_fault(2, Fault::Clear)
        .map_err(anyhow::Error::msg)?;
    tally.ios += 16;
    tally.check(
        during.iter().all(|d| *d >= plan.delay),
        format!(
            "read latency {} before, {} during (every read >= {})",
            format_duration(median(&before)),
            format_duration(median(&during)),
            format_duration(plan.delay)
        ),
    );

    // 5. Port 3: error rate, then a bandwidth cap.
    println!("\n5. port 3: error-rate=50%, then clear");
    array
        .apply_fault(3, Fault::ErrorRate(0.5))
        .map_err(anyhow::Error::msg)?;
    let (eio, other) = count_errors(&clients[3], &blocks, plan.error_reads).await;
    array
        .apply_fault(3, Fault::Clear)
        .map_err(anyhow::Error::msg)?;
    let (eio_after, other_after) = count_errors(&clients[3], &blocks, plan.error_reads).await;
    tally.ios += 2 * plan.error_reads as u64;
    tally.check(
        eio > 0 && eio < plan.error_reads && other == 0,
        format!(
            "{eio} of {} reads answered EIO ({other} other errors)",
            plan.error_reads
        ),
    );
    tally.check(
        eio_after + other_after == 0,
        format!("after clear: {} errors", eio_after + other_after),
    );

    println!(
        "\n6. port 3: rate={}/s",
        format_size(plan.rate).replace(' ', "")
    );
    array
        .apply_fault(3, Fault::Rate(Some(plan.rate)))
        .map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    let chunk: u32 = 256 << 10;
    let reads = futures::stream::iter((0..plan.rate_bytes / chunk as u64).map(|i| {
        let c = clients[3].clone();
        async move { c.read(i * chunk as u64, chunk).await }
    }))
    .buffer_unordered(4)
    .collect::<Vec<_>>()
    .await;
    let took = t.elapsed();
    array
        .apply_fault(3, Fault::Clear)
        .map_err(anyhow::Error::msg)?;
    tally.ios += reads.len() as u64;
    tally.bytes += plan.rate_bytes;
    let measured = plan.rate_bytes as f64 / took.as_secs_f64();
    // The bucket allows a 50 ms burst, so the lower bound is (N - burst) / R; assert only that.
    let floor = (plan.rate_bytes as f64 - plan.rate as f64 * 0.05) / plan.rate as f64;
    tally.check(
        reads.iter().all(|r| r.is_ok()) && took.as_secs_f64() >= floor * 0.95,
        format!(
            "read {} in {} = {}/s (cap {}/s)",
            format_size(plan.rate_bytes),
            format_duration(took),
            format_size(measured as u64),
            format_size(plan.rate)
        ),
    );

    // 7. Everything still verifies through every port.
    println!("\n7. after all faults: every block verifies through every port");
    let mut total = 0;
    for shift in 0..clients.len() {
        total += verify(&clients, &blocks, shift).await;
        tally.ios += blocks.len() as u64;
    }
    tally.mismatches += total;
    tally.check(total == 0, format!("mismatches: {total}"));

    for c in &clients {
        c.disconnect().await;
    }
    Ok(())
}

/// Reads every block through port (i + shift) % N and counts blocks that are not what was written.
async fn verify(clients: &[Client], blocks: &[(u64, Bytes)], shift: usize) -> u64 {
    let n = clients.len();
    futures::stream::iter(blocks.iter().enumerate().map(|(i, (off, expected))| {
        let c = clients[(i + shift) % n].clone();
        let off = *off;
        async move {
            match c.read(off, BLOCK).await {
                Ok(data) => !block_ok(&data, expected),
                Err(_) => true,
            }
        }
    }))
    .buffer_unordered(QUEUE_DEPTH)
    .filter(|bad| futures::future::ready(*bad))
    .count()
    .await as u64
}

async fn time_reads(client: &Client, blocks: &[(u64, Bytes)], n: usize) -> Vec<Duration> {
    let mut out = Vec::new();
    for (off, _) in blocks.iter().take(n) {
        let t = Instant::now();
        let _ = client.read(*off, BLOCK).await;
        out.push(t.elapsed());
    }
    out
}

async fn count_errors(client: &Client, blocks: &[(u64, Bytes)], n: usize) -> (usize, usize) {
    let results = futures::stream::iter((0..n).map(|i| {
        let c = client.clone();
        let off = blocks[i % blocks.len()].0;
        async move { c.read(off, BLOCK).await }
    }))
    .buffer_unordered(QUEUE_DEPTH)
    .collect::<Vec<_>>()
    .await;
    let eio = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ClientError::Server {
                    errno: NbdErrno::Io,
                    ..
                })
            )
        })
        .count();
    let errors = results.iter().filter(|r| r.is_err()).count();
    (eio, errors - eio)
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

fn describe<T>(r: &Result<Result<T, ClientError>, tokio::time::error::Elapsed>) -> String {
    match r {
        Ok(Ok(_)) => "the read succeeded!".into(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 5s".into(),
    }
}
