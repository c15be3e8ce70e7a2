//! Prometheus metrics (docs/OPERATIONS.md, metrics) at `http://METRICS_LISTEN/metrics`, in the text exposition
//! format, rendered on each scrape from the engine's counters (nothing is kept twice).
//!
//! The HTTP side is deliberately tiny — one GET route, bounded request size, a timeout per
//! connection — since it serves a scraper on a management network, not the public.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use lunmpio_engine::latency::BUCKET_BOUNDS_US;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::control_socket::ControlService;

/// Bytes of an HTTP request we read before answering (headers of a scrape are far smaller).
const REQUEST_BYTES_MAX: usize = 8192;
/// Scrapes served at once; more wait in the listen backlog.
const SCRAPES_MAX: usize = 16;
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves scrapes until `stop`: one request per connection, answered and closed.
pub async fn serve(
    listener: TcpListener,
    service: Arc<ControlService>,
    stop: tokio_util::sync::CancellationToken,
) {
    let errors = Arc::clone(&service.accept_errors);
    super::fds::accept_loop(
        listener,
        "metrics",
        &errors.metrics,
        SCRAPES_MAX,
        stop,
        |stream| {
            let service = Arc::clone(&service);
            async move {
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, scrape(stream, &service)).await;
            }
        },
    )
    .await;
}

/// Reads one HTTP request (at most `REQUEST_BYTES_MAX`), answers `GET /metrics` with the exposition
/// and anything else with 404, and closes.
async fn scrape(
    mut stream: tokio::net::TcpStream,
    service: &ControlService,
) -> std::io::Result<()> {
    let mut request = vec![0u8; REQUEST_BYTES_MAX];
    let mut used = 0;
    while used < request.len() {
        let n = stream.read(&mut request[used..]).await?;
        if n == 0 {
            break;
        }
        used += n;
        if request[..used].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&request[..used]);
    let response = answer(head.lines().next().unwrap_or(""), service);
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// The target of a `GET` request line (`GET /metrics HTTP/1.1`, or HTTP/0.9's `GET /metrics`).
fn get_target(request_line: &str) -> Option<&str> {
    let mut words = request_line.split(' ');
    (words.next() == Some("GET"))
        .then(|| words.next())
        .flatten()
}

/// The HTTP response to one request line: `/metrics`, `/healthz`, `/readyz`, else 404.
fn answer(request_line: &str, service: &ControlService) -> String {
    let (status, content_type, body) = match get_target(request_line) {
        Some("/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(service),
        ),
        // Alive: the daemon's main runtime answered this request.
        Some("/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        Some("/readyz") => match not_ready(service) {
            None => ("200 OK", "text/plain", "ready\n".to_string()),
            Some(why) => ("503 Service Unavailable", "text/plain", why),
        },
        _ => (
            "404 Not Found",
            "text/plain",
            "lunmpio: GET /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Ready means every LUN has a path that can carry I/O now; None when ready, else which are not.
fn not_ready(service: &ControlService) -> Option<String> {
    let luns = service.luns.load();
    let down: Vec<&str> = luns
        .iter()
        .filter(|l| l.mpio().usable_path_count() == 0)
        .map(|l| l.name())
        .collect();
    (!down.is_empty()).then(|| format!("not ready: no usable path for {}\n", down.join(", ")))
}

/// The exposition text for every LUN and path.
pub fn render(m: &ControlService) -> String {
    let mut out = String::with_capacity(16 << 10);
    // Gather each LUN's numbers once per scrape.
    let luns: Vec<_> = m
        .luns
        .load()
        .iter()
        .map(|l| (l.name().to_string(), l.statistics(), l.mpio().policy()))
        .collect();

    let _ = writeln!(
        out,
        "# HELP lunmpio_build_info The running program (always 1; its version in the label).\n\
         # TYPE lunmpio_build_info gauge\nlunmpio_build_info{{version=\"{}\"}} 1",
        esc(env!("CARGO_PKG_VERSION"))
    );
    // One series per path with its descriptive labels, for joins (`* on(lun, path) group_left(uri)`).
    let _ = writeln!(
        out,
        "# HELP lunmpio_path_info A path's URI, transport and interconnect (always 1).\n# TYPE lunmpio_path_info gauge"
    );
    for lun in m.luns.load().iter() {
        for p in lun.get_path_info() {
            let _ = writeln!(
                out,
                "lunmpio_path_info{{lun=\"{}\",path=\"{}\",uri=\"{}\",transport=\"{}\",interconnect=\"{}\"}} 1",
                esc(lun.name()),
                esc(&p.name),
                esc(&p.uri),
                esc(p.transport.name()),
                esc(p.hw_type.vds_name())
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP lunmpio_path_ios_total Requests completed on a path, by operation.\n# TYPE lunmpio_path_ios_total counter"
    );
    for (lun, stats, _) in &luns {
        for p in &stats.paths {
            let other = p.ios.saturating_sub(p.reads + p.writes);
            for (op, n) in [("read", p.reads), ("write", p.writes), ("other", other)] {
                let _ = writeln!(
                    out,
                    "lunmpio_path_ios_total{{lun=\"{}\",path=\"{}\",op=\"{op}\"}} {n}",
                    esc(lun),
                    esc(&p.name)
                );
            }
        }
    }

    let section = |out: &mut String,
                   name: &str,
                   kind: &str,
                   help: &str,
                   rows: Vec<(String, String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, suffix, value) in rows {
            let _ = writeln!(out, "{name}{suffix}{{{labels}}} {value}");
        }
    };
    let per_path =
        |f: &dyn Fn(&lunmpio_engine::PathStats) -> String| -> Vec<(String, String, String)> {
            luns.iter()
                .flat_map(|(lun, stats, _)| {
                    stats.paths.iter().map(move |p| {
                        (
                            format!("lun=\"{}\",path=\"{}\"", esc(lun), esc(&p.name)),
                            String::new(),
                            f(p),
                        )
                    })
                })
                .collect()
        };
    section(
        &mut out,
        "lunmpio_path_read_bytes_total",
        "counter",
        "Bytes read through a path.",
        per_path(&|p| p.bytes_read.to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_written_bytes_total",
        "counter",
        "Bytes written through a path.",
        per_path(&|p| p.bytes_written.to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_errors_total",
        "counter",
        "Requests that failed on a path (and were re-driven or returned).",
        per_path(&|p| p.errors.to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_in_flight",
        "gauge",
        "Requests in flight on a path.",
        per_path(&|p| p.in_flight.to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_in_flight_bytes",
        "gauge",
        "Bytes in flight on a path.",
        per_path(&|p| p.in_flight_bytes.to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_status",
        "gauge",
        "VDS_PATH_STATUS of a path: 0 unknown, 1 online, 5 failed, 7 standby.",
        per_path(&|p| (p.status as i32).to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_failovers_total",
        "counter",
        "Times I/O failed away from a path.",
        per_path(&|p| p.failovers.to_string()),
    );
    section(
        &mut out,
        "lunmpio_path_timeout_seconds",
        "gauge",
        "The adaptive deadline a request on the path gets now.",
        per_path(&|p| secs(p.timeout_ms * 1000)),
    );

    // Latency histogram: cumulative buckets in seconds.
    let _ = writeln!(
        out,
        "# HELP lunmpio_path_latency_seconds Completion latency of requests on a path.\n# TYPE lunmpio_path_latency_seconds histogram"
    );
    for (lun, stats, _) in &luns {
        for p in &stats.paths {
            let labels = format!("lun=\"{}\",path=\"{}\"", esc(lun), esc(&p.name));
            let mut cumulative = 0u64;
            for (i, count) in p.latency_buckets.iter().enumerate() {
                cumulative += count;
                let le = BUCKET_BOUNDS_US
                    .get(i)
                    .map(|us| secs(*us))
                    .unwrap_or_else(|| "+Inf".into());
                let _ = writeln!(
                    out,
                    "lunmpio_path_latency_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "lunmpio_path_latency_seconds_sum{{{labels}}} {}",
                secs(p.latency_sum_us)
            );
            let _ = writeln!(
                out,
                "lunmpio_path_latency_seconds_count{{{labels}}} {cumulative}"
            );
        }
    }

    let per_lun = |f: &dyn Fn(
        &lunmpio_engine::LunStats,
        lunmpio_vds::LoadBalancePolicy,
    ) -> String|
     -> Vec<(String, String, String)> {
        luns.iter()
            .map(|(lun, stats, policy)| {
                (
                    format!("lun=\"{}\"", esc(lun)),
                    String::new(),
                    f(stats, *policy),
                )
            })
            .collect()
    };
    section(
        &mut out,
        "lunmpio_lun_queued_ios",
        "gauge",
        "Requests queued because no path is usable.",
        per_lun(&|s, _| s.queued_ios.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_queued_bytes",
        "gauge",
        "Bytes queued because no path is usable.",
        per_lun(&|s, _| s.queued_bytes.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_in_doubt_writes",
        "gauge",
        "Old copies of writes that a failed, hung or slow path may still execute, right now; each holds its range for new writes.",
        per_lun(&|s, _| s.in_doubt_writes.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_in_doubt_writes_total",
        "counter",
        "Copies of writes ever put in doubt.",
        per_lun(&|s, _| s.in_doubt_writes_total.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_in_doubt_answered_total",
        "counter",
        "In-doubt copies released because their target answered them on the old connection.",
        per_lun(&|s, _| s.in_doubt_answered_total.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_in_doubt_fenced_total",
        "counter",
        "In-doubt copies released because their path's fence succeeded.",
        per_lun(&|s, _| s.in_doubt_fenced_total.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_in_doubt_expired_total",
        "counter",
        "In-doubt copies whose in_doubt_timeout passed unresolved: a late copy could overwrite newer data.",
        per_lun(&|s, _| s.in_doubt_expired_total.to_string()),
    );
    section(
        &mut out,
        "lunmpio_lun_fences_total",
        "counter",
        "Fence runs by result.",
        luns.iter()
            .flat_map(|(lun, stats, _)| {
                [
                    (
                        format!("lun=\"{}\",result=\"ok\"", esc(lun)),
                        String::new(),
                        stats.fences_ok_total.to_string(),
                    ),
                    (
                        format!("lun=\"{}\",result=\"failed\"", esc(lun)),
                        String::new(),
                        stats.fences_failed_total.to_string(),
                    ),
                ]
            })
            .collect(),
    );
    let server = &m.server;
    let errors = &m.accept_errors;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    section(
        &mut out,
        "lunmpio_nbd_connections",
        "gauge",
        "Export (NBD client) connections being served.",
        vec![(
            String::new(),
            String::new(),
            server.connections().to_string(),
        )],
    );
    section(
        &mut out,
        "lunmpio_nbd_connections_evicted_total",
        "counter",
        "Idle export connections closed to make room at max_connections.",
        vec![(
            String::new(),
            String::new(),
            server.connections_evicted().to_string(),
        )],
    );
    section(
        &mut out,
        "lunmpio_nbd_connections_refused_total",
        "counter",
        "Export connections refused at max_connections (none idle to make room).",
        vec![(
            String::new(),
            String::new(),
            server.connections_refused().to_string(),
        )],
    );
    section(
        &mut out,
        "lunmpio_accept_errors_total",
        "counter",
        "Failed accepts by listener (EMFILE: out of file descriptors).",
        vec![
            (
                "listener=\"nbd\"".into(),
                String::new(),
                (server.accept_errors() + load(&errors.nbd)).to_string(),
            ),
            (
                "listener=\"control\"".into(),
                String::new(),
                load(&errors.control).to_string(),
            ),
            (
                "listener=\"metrics\"".into(),
                String::new(),
                load(&errors.metrics).to_string(),
            ),
        ],
    );
    let path_counts: Vec<(String, usize, usize)> = m
        .luns
        .load()
        .iter()
        .map(|l| {
            let mpio = l.mpio();
            (
                l.name().to_string(),
                mpio.paths().len(),
                mpio.usable_path_count(),
            )
        })
        .collect();
    section(
        &mut out,
        "lunmpio_lun_paths",
        "gauge",
        "Paths configured for the LUN.",
        path_counts
            .iter()
            .map(|(lun, n, _)| {
                (
                    format!("lun=\"{}\"", esc(lun)),
                    String::new(),
                    n.to_string(),
                )
            })
            .collect(),
    );
    section(
        &mut out,
        "lunmpio_lun_usable_paths",
        "gauge",
        "Paths of the LUN that can carry I/O now (0: all paths down; /readyz is 503).",
        path_counts
            .iter()
            .map(|(lun, _, n)| {
                (
                    format!("lun=\"{}\"", esc(lun)),
                    String::new(),
                    n.to_string(),
                )
            })
            .collect(),
    );
    section(
        &mut out,
        "lunmpio_lun_policy",
        "gauge",
        "VDS_LOADBALANCE_POLICY_ENUM of the LUN (1 failover ... 7 vendor specific = service-time).",
        per_lun(&|_, p| (p as i32).to_string()),
    );
    out
}

fn secs(us: u64) -> String {
    format!("{}", us as f64 / 1e6)
}

/// Escapes a label value (backslash, quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_get_of_a_known_route_is_routed() {
        assert_eq!(get_target("GET /readyz HTTP/1.1"), Some("/readyz"));
        assert_eq!(get_target("GET /metrics"), Some("/metrics"), "HTTP/0.9");
        assert_eq!(get_target("POST /metrics HTTP/1.1"), None);
        assert_eq!(get_target(""), None);
        assert_eq!(get_target("GET"), None);
    }
}
