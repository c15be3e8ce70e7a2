//! Prometheus metrics (docs/OPERATIONS.md, metrics) at `http://METRICS_LISTEN/metrics` in the
//! OpenMetrics text format, encoded by `prometheus-client` from a snapshot of the engine's counters
//! taken on each scrape (nothing is kept twice); `/healthz` and `/readyz` beside them.
//!
//! The HTTP side is deliberately tiny — three GET routes, bounded request size, a timeout per
//! connection — since it serves a scraper on a management network, not the public.

use std::sync::Arc;
use std::time::Duration;

use lunmpio_engine::latency::BUCKET_BOUNDS_US;
use lunmpio_nbd::TransmissionMode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
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
    let response = answer(&head, service);
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

/// Whether the request's `Accept` header asks for OpenMetrics (Prometheus does).
fn accepts_openmetrics(head: &str) -> bool {
    head.lines().skip(1).any(|l| {
        l.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    })
}

/// The HTTP response to one request (its head): `/metrics`, `/healthz`, `/readyz`, else 404.
fn answer(head: &str, service: &ControlService) -> String {
    let request_line = head.lines().next().unwrap_or("");
    let (status, content_type, body) = match get_target(request_line) {
        Some("/metrics") if accepts_openmetrics(head) => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(service),
        ),
        // curl, older scrapers and text-format tools get the classic text format.
        Some("/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            classic_text(&render(service)),
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

/// The exposition (OpenMetrics text) for every LUN and path: a snapshot of the engine's counters,
/// encoded by `prometheus-client`.
pub fn render(m: &ControlService) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape::take(m)));
    let mut out = String::with_capacity(16 << 10);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        // Only a metric the encoder refuses can get here; say so rather than serve half a page.
        tracing::warn!("metrics encoding failed: {e}");
        return "# lunmpio: metrics encoding failed\n# EOF\n".to_string();
    }
    out
}

/// The OpenMetrics exposition in the classic Prometheus text format (0.0.4): family names are the
/// sample names (a counter's `_total`, an info's `_info`, which becomes a gauge), no `# UNIT`, no
/// `# EOF`. The samples themselves are the same.
fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The suffix of the family whose HELP line was just seen, applied to its TYPE line too.
    let family_suffix = |line: &str| -> Option<(&'static str, &'static str)> {
        let kind = line.strip_prefix("# TYPE ")?.rsplit(' ').next()?;
        match kind {
            "counter" => Some(("_total", "counter")),
            "info" => Some(("_info", "gauge")),
            _ => None,
        }
    };
    let lines: Vec<&str> = openmetrics.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rename = |line: &str, prefix: &str, suffix: &str, kind: Option<&str>| -> String {
            let rest = &line[prefix.len()..];
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            match kind {
                Some(kind) => format!("{prefix}{name}{suffix} {kind}"),
                None => format!("{prefix}{name}{suffix} {tail}"),
            }
        };
        if line.starts_with("# HELP ") {
            // The TYPE line follows the HELP line of its family.
            match lines.get(i + 1).and_then(|next| family_suffix(next)) {
                Some((suffix, _)) => out.push_str(&rename(line, "# HELP ", suffix, None)),
                None => out.push_str(line),
            }
        } else if let Some((suffix, kind)) = family_suffix(line) {
            out.push_str(&rename(line, "# TYPE ", suffix, Some(kind)));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Everything one scrape reports, taken at once (nothing is kept twice: the engine's counters are
/// the metrics).
#[derive(Debug)]
struct Scrape {
    luns: Vec<LunSnapshot>,
    events: Vec<(String, &'static str, u64)>,
    connections: u64,
    connections_evicted: u64,
    connections_refused: u64,
    /// Export connections since start by the transmission mode they negotiated.
    negotiated: [(&'static str, u64); 3],
    accept_errors: [(&'static str, u64); 3],
}

#[derive(Debug)]
struct LunSnapshot {
    name: String,
    stats: lunmpio_engine::LunStats,
    policy: lunmpio_vds::LoadBalancePolicy,
    info: Vec<lunmpio_vds::PathInfo>,
    usable_paths: usize,
}

impl Scrape {
    fn take(m: &ControlService) -> Scrape {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let errors = &m.accept_errors;
        Scrape {
            luns: m
                .luns
                .load()
                .iter()
                .map(|l| {
                    let mpio = l.mpio();
                    LunSnapshot {
                        name: l.name().to_string(),
                        stats: l.statistics(),
                        policy: mpio.policy(),
                        info: l.get_path_info(),
                        usable_paths: mpio.usable_path_count(),
                    }
                })
                .collect(),
            events: m.events.counts(),
            connections: m.server.connections() as u64,
            connections_evicted: m.server.connections_evicted(),
            connections_refused: m.server.connections_refused(),
            negotiated: [
                TransmissionMode::Simple,
                TransmissionMode::Structured,
                TransmissionMode::Extended,
            ]
            .map(|mode| (mode.name(), m.server.connections_negotiated(mode))),
            accept_errors: [
                ("nbd", m.server.accept_errors() + load(&errors.nbd)),
                ("control", load(&errors.control)),
                ("metrics", load(&errors.metrics)),
            ],
        }
    }

    fn paths(&self) -> impl Iterator<Item = (&str, &lunmpio_engine::PathStats)> {
        self.luns
            .iter()
            .flat_map(|l| l.stats.paths.iter().map(move |p| (l.name.as_str(), p)))
    }
}

type Labels = Vec<(&'static str, String)>;

/// A label value as the exposition formats want it: `\`, `"` and newlines escaped (the encoder
/// writes values as given, and names and URIs come from the config).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn path_labels(lun: &str, path: &str) -> Labels {
    vec![("lun", label(lun)), ("path", label(path))]
}

fn lun_labels(lun: &str) -> Labels {
    vec![("lun", label(lun))]
}

/// A counter family; `name` without `_total`, which the encoder adds.
fn counters<V: EncodeCounterValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, V, f64>(&value, None)?;
    }
    Ok(())
}

fn gauges<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        enc.encode_descriptor(
            "lunmpio_build",
            "The running program; its version in the label.",
            None,
            MetricType::Info,
        )?
        .encode_info(&vec![("version", label(env!("CARGO_PKG_VERSION")))])?;
        // One series per path with its descriptive labels, for joins (`* on(lun, path) group_left(uri)`).
        let mut info = enc.encode_descriptor(
            "lunmpio_path",
            "A path's URI, transport and interconnect.",
            None,
            MetricType::Info,
        )?;
        for lun in &self.luns {
            for p in &lun.info {
                let mut labels = path_labels(&lun.name, &p.name);
                labels.push(("uri", label(&p.uri)));
                labels.push(("transport", p.transport.name().to_string()));
                labels.push(("interconnect", p.hw_type.vds_name().to_string()));
                info.encode_info(&labels)?;
            }
        }
        self.encode_paths(&mut enc)?;
        self.encode_luns(&mut enc)?;
        self.encode_server(&mut enc)
    }
}

impl Scrape {
    fn encode_paths(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let per_path = |f: &dyn Fn(&lunmpio_engine::PathStats) -> u64| -> Vec<(Labels, u64)> {
            self.paths()
                .map(|(lun, p)| (path_labels(lun, &p.name), f(p)))
                .collect()
        };
        let by_op = self.paths().flat_map(|(lun, p)| {
            let other = p.ios.saturating_sub(p.reads + p.writes);
            [("read", p.reads), ("write", p.writes), ("other", other)].map(|(op, n)| {
                let mut labels = path_labels(lun, &p.name);
                labels.push(("op", op.to_string()));
                (labels, n)
            })
        });
        counters(
            enc,
            "lunmpio_path_ios",
            "Requests completed on a path, by operation.",
            by_op,
        )?;
        counters(
            enc,
            "lunmpio_path_read_bytes",
            "Bytes read through a path.",
            per_path(&|p| p.bytes_read),
        )?;
        counters(
            enc,
            "lunmpio_path_written_bytes",
            "Bytes written through a path.",
            per_path(&|p| p.bytes_written),
        )?;
        counters(
            enc,
            "lunmpio_path_errors",
            "Requests that failed on a path (and were re-driven or returned).",
            per_path(&|p| p.errors),
        )?;
        gauges(
            enc,
            "lunmpio_path_in_flight",
            "Requests in flight on a path.",
            per_path(&|p| p.in_flight),
        )?;
        gauges(
            enc,
            "lunmpio_path_in_flight_bytes",
            "Bytes in flight on a path.",
            per_path(&|p| p.in_flight_bytes),
        )?;
        gauges(
            enc,
            "lunmpio_path_status",
            "VDS_PATH_STATUS of a path: 0 unknown, 1 online, 5 failed, 7 standby.",
            per_path(&|p| p.status as u64),
        )?;
        counters(
            enc,
            "lunmpio_path_failovers",
            "Times I/O failed away from a path.",
            per_path(&|p| p.failovers),
        )?;
        gauges(
            enc,
            "lunmpio_path_timeout_seconds",
            "The adaptive deadline a request on the path gets now.",
            self.paths()
                .map(|(lun, p)| (path_labels(lun, &p.name), seconds(p.timeout_ms * 1000))),
        )?;
        gauges(
            enc,
            "lunmpio_path_hold_down_seconds",
            "What is left of a marginal (flapping) path's hold-down: it is kept out of service until then (0: none).",
            self.paths()
                .map(|(lun, p)| (path_labels(lun, &p.name), p.hold_down_ms as f64 / 1e3)),
        )?;
        let mut latency = enc.encode_descriptor(
            "lunmpio_path_latency_seconds",
            "Completion latency of requests on a path.",
            None,
            MetricType::Histogram,
        )?;
        for (lun, p) in self.paths() {
            // The engine's buckets are per bucket, the last one unbounded (+Inf).
            let buckets: Vec<(f64, u64)> = p
                .latency_buckets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        BUCKET_BOUNDS_US.get(i).map_or(f64::MAX, |us| seconds(*us)),
                        *n,
                    )
                })
                .collect();
            let count = p.latency_buckets.iter().sum();
            let labels = path_labels(lun, &p.name);
            latency
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(seconds(p.latency_sum_us), count, &buckets, None)?;
        }
        Ok(())
    }

    fn encode_luns(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let per_lun = |f: &dyn Fn(&LunSnapshot) -> u64| -> Vec<(Labels, u64)> {
            self.luns
                .iter()
                .map(|l| (lun_labels(&l.name), f(l)))
                .collect()
        };
        gauges(
            enc,
            "lunmpio_lun_paths",
            "Paths configured for the LUN.",
            per_lun(&|l| l.info.len() as u64),
        )?;
        gauges(
            enc,
            "lunmpio_lun_usable_paths",
            "Paths of the LUN that can carry I/O now (0: all paths down; /readyz is 503).",
            per_lun(&|l| l.usable_paths as u64),
        )?;
        gauges(
            enc,
            "lunmpio_lun_queued_ios",
            "Requests queued because no path is usable.",
            per_lun(&|l| l.stats.queued_ios),
        )?;
        gauges(
            enc,
            "lunmpio_lun_queued_bytes",
            "Bytes queued because no path is usable.",
            per_lun(&|l| l.stats.queued_bytes),
        )?;
        gauges(
            enc,
            "lunmpio_lun_in_doubt_writes",
            "Old copies of writes that a failed, hung or slow path may still execute, right now; each holds its range for new writes.",
            per_lun(&|l| l.stats.in_doubt_writes),
        )?;
        // Not `lunmpio_lun_in_doubt_writes` (the gauge's family): OpenMetrics family names are unique.
        counters(
            enc,
            "lunmpio_lun_in_doubt_copies",
            "Copies of writes ever put in doubt.",
            per_lun(&|l| l.stats.in_doubt_writes_total),
        )?;
        counters(
            enc,
            "lunmpio_lun_in_doubt_answered",
            "In-doubt copies released because their target answered them on the old connection.",
            per_lun(&|l| l.stats.in_doubt_answered_total),
        )?;
        counters(
            enc,
            "lunmpio_lun_in_doubt_fenced",
            "In-doubt copies released because their path's fence succeeded.",
            per_lun(&|l| l.stats.in_doubt_fenced_total),
        )?;
        counters(
            enc,
            "lunmpio_lun_in_doubt_expired",
            "In-doubt copies whose in_doubt_timeout passed unresolved: a late copy could overwrite newer data.",
            per_lun(&|l| l.stats.in_doubt_expired_total),
        )?;
        gauges(
            enc,
            "lunmpio_lun_in_doubt_oldest_seconds",
            "How long the oldest write in doubt now has been in doubt (0: none).",
            self.luns
                .iter()
                .map(|l| (lun_labels(&l.name), l.stats.in_doubt_oldest_ms as f64 / 1e3)),
        )?;
        gauges(
            enc,
            "lunmpio_lun_in_doubt_expires_in_seconds",
            "Time until the earliest in-doubt write's in_doubt_timeout lapses (no sample: none pending, or never).",
            self.luns.iter().filter_map(|l| {
                l.stats
                    .in_doubt_expires_in_ms
                    .map(|ms| (lun_labels(&l.name), ms as f64 / 1e3))
            }),
        )?;
        gauges(
            enc,
            "lunmpio_lun_all_paths_down_seconds",
            "How long the LUN has been without a usable path now (0 while it has one).",
            self.luns
                .iter()
                .map(|l| (lun_labels(&l.name), l.stats.all_paths_down_ms as f64 / 1e3)),
        )?;
        counters(
            enc,
            "lunmpio_lun_outage_seconds",
            "Time the LUN spent without a usable path since the daemon started, the current outage included.",
            self.luns.iter().map(|l| {
                (
                    lun_labels(&l.name),
                    l.stats.all_paths_down_ms_total as f64 / 1e3,
                )
            }),
        )?;
        let fences = self.luns.iter().flat_map(|l| {
            [
                ("ok", l.stats.fences_ok_total),
                ("failed", l.stats.fences_failed_total),
            ]
            .map(|(result, n)| {
                let mut labels = lun_labels(&l.name);
                labels.push(("result", result.to_string()));
                (labels, n)
            })
        });
        counters(enc, "lunmpio_lun_fences", "Fence runs by result.", fences)?;
        gauges(
            enc,
            "lunmpio_lun_policy",
            "VDS_LOADBALANCE_POLICY_ENUM of the LUN (1 failover ... 7 vendor specific = service-time).",
            per_lun(&|l| l.policy as u64),
        )?;
        let events = self.events.iter().map(|(lun, kind, n)| {
            let mut labels = lun_labels(lun);
            labels.push(("kind", kind.to_string()));
            (labels, *n)
        });
        counters(
            enc,
            "lunmpio_events",
            "Events of the event log (lunmpio events), by LUN and kind: a path going online, failed, standby or other, or a LUN-wide event.",
            events,
        )
    }

    fn encode_server(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let none = || Labels::new();
        gauges(
            enc,
            "lunmpio_nbd_connections",
            "Export (NBD client) connections being served.",
            [(none(), self.connections)],
        )?;
        counters(
            enc,
            "lunmpio_nbd_connections_evicted",
            "Idle export connections closed to make room at max_connections.",
            [(none(), self.connections_evicted)],
        )?;
        counters(
            enc,
            "lunmpio_nbd_connections_refused",
            "Export connections refused at max_connections (none idle to make room).",
            [(none(), self.connections_refused)],
        )?;
        counters(
            enc,
            "lunmpio_nbd_connections_negotiated",
            "Export connections since start, by the replies they negotiated: simple, structured, \
             or extended (NBD extended headers).",
            self.negotiated
                .iter()
                .map(|(mode, n)| (vec![("mode", mode.to_string())], *n)),
        )?;
        counters(
            enc,
            "lunmpio_accept_errors",
            "Failed accepts by listener (EMFILE: out of file descriptors).",
            self.accept_errors
                .iter()
                .map(|(listener, n)| (vec![("listener", listener.to_string())], *n)),
        )
    }
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

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label("x\ny"), "x\\ny");
        assert_eq!(label("plain-name_0"), "plain-name_0");
    }

    #[test]
    fn openmetrics_is_served_to_who_asks_and_the_classic_format_to_the_rest() {
        assert!(accepts_openmetrics(
            "GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n"
        ));
        assert!(accepts_openmetrics(
            "GET /metrics HTTP/1.1\r\naccept:application/openmetrics-text\r\n"
        ));
        assert!(!accepts_openmetrics(
            "GET /metrics HTTP/1.1\r\nAccept: */*\r\n"
        ));
        assert!(!accepts_openmetrics("GET /metrics HTTP/1.1\r\n"));
        let om = "# HELP x_build The program.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n\
                  # HELP x_ios Requests.\n# TYPE x_ios counter\nx_ios_total{op=\"read\"} 3\n\
                  # HELP x_lat Latency.\n# TYPE x_lat histogram\nx_lat_sum 0.5\nx_lat_count 2\n\
                  # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n# EOF\n";
        assert_eq!(
            classic_text(om),
            "# HELP x_build_info The program.\n# TYPE x_build_info gauge\nx_build_info{version=\"1\"} 1\n\
             # HELP x_ios_total Requests.\n# TYPE x_ios_total counter\nx_ios_total{op=\"read\"} 3\n\
             # HELP x_lat Latency.\n# TYPE x_lat histogram\nx_lat_sum 0.5\nx_lat_count 2\n\
             # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
