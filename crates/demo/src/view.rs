//! The demo's live view and its summary text.
//!
//! On a terminal a panel (phase, policy, workload rates, and the paths table of `lunmpio top`: status,
//! IOPS, MiB/s, p99, in flight, an IOPS trend, reason) is redrawn four times a second at the bottom of
//! the screen in a ratatui inline viewport, with event lines scrolling above it.
//! Anywhere else (a pipe, a file, `TERM=dumb`) the same information comes as plain lines: every
//! event and action as it happens, and one status line every few seconds.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use lunmpio_engine::{Event, Lun};
use lunmpio_vds::PathStatus;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::plot::{Marker, Sample};
use super::workload::Workload;
use lunmpio_human::format_duration;
use lunmpio_human::render_table;

const TICK: Duration = Duration::from_millis(250);
/// Lines of the panel above the paths table (phase, workload).
const PANEL_HEAD_LINES: u16 = 2;

/// The demo's terminal: an inline viewport at the bottom of the screen.
type Tui = ratatui::Terminal<ratatui::backend::CrosstermBackend<Box<dyn Write + Send>>>;

/// Where people read the demo: stdout, or stderr when stdout carries the JSON summary.
#[derive(Clone)]
pub struct Output {
    stderr: bool,
}

impl Output {
    pub fn stdout() -> Output {
        Output { stderr: false }
    }

    pub fn stderr() -> Output {
        Output { stderr: true }
    }

    pub fn is_terminal(&self) -> bool {
        if self.stderr {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        }
    }

    pub fn write(&self, text: &str) {
        // A closed pipe must not stop the demo; the summary still decides the exit status.
        if self.stderr {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(text.as_bytes());
            let _ = e.flush();
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(text.as_bytes());
            let _ = o.flush();
        }
    }

    /// An inline viewport of `height` lines at the bottom of this output's terminal. Only on stdout:
    /// the viewport asks the terminal where its cursor is, and crossterm writes that question to
    /// stdout, which carries the JSON summary when the view is on stderr (`--json`).
    fn tui(&self, height: u16) -> Option<Tui> {
        if self.stderr {
            return None;
        }
        let writer: Box<dyn Write + Send> = Box::new(std::io::stdout());
        ratatui::Terminal::with_options(
            ratatui::backend::CrosstermBackend::new(writer),
            ratatui::TerminalOptions {
                viewport: ratatui::Viewport::Inline(height),
            },
        )
        .ok()
    }

    pub fn line(&self, text: &str) {
        self.write(&format!("{text}\n"));
    }

    pub fn block(&self, text: &str) {
        self.write(text);
    }
}

/// Shared by the scenario (phases, actions), the event follower and the ticker.
#[derive(Clone)]
pub struct Live {
    inner: Arc<Inner>,
}

struct Inner {
    lun: Lun,
    workload: Arc<Workload>,
    output: Output,
    tty: bool,
    epoch: Instant,
    plain_every: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    phase: String,
    pending: Vec<String>,
    ticking: bool,
    events: Vec<Event>,
    samples: Vec<Sample>,
    markers: Vec<Marker>,
    max_queued: u64,
    /// IOPS of each path at each tick (for the trend column), oldest first.
    history: Vec<std::collections::VecDeque<u64>>,
}

pub struct Ticker {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Live {
    pub fn new(
        lun: Lun,
        workload: Arc<Workload>,
        output: Output,
        tty: bool,
        epoch: Instant,
        plain_every: Duration,
    ) -> Live {
        Live {
            inner: Arc::new(Inner {
                lun,
                workload,
                output,
                tty,
                epoch,
                plain_every,
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stamp(&self) -> String {
        format!("[{:>6.2}s]", self.inner.epoch.elapsed().as_secs_f64())
    }

    /// An action or a note, timestamped; shown with the next redraw (or at once when not ticking).
    pub fn say(&self, text: String) {
        let line = format!("{} {text}", self.stamp());
        let mut s = self.state();
        if s.ticking {
            s.pending.push(line);
        } else {
            drop(s);
            self.inner.output.line(&line);
        }
    }

    pub fn set_phase(&self, number: usize, name: &str) {
        self.state().phase = format!("{number}. {name}");
    }

    pub fn marker(&self, label: &str, fault: bool) {
        let t = self.inner.epoch.elapsed().as_secs_f64();
        self.state().markers.push(Marker {
            t,
            label: label.to_string(),
            fault,
        });
    }

    pub fn events(&self) -> Vec<Event> {
        self.state().events.clone()
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.state().samples.clone()
    }

    pub fn markers(&self) -> Vec<Marker> {
        self.state().markers.clone()
    }

    pub fn max_queued(&self) -> u64 {
        self.state().max_queued
    }

    /// Turns every event of the daemon's log into a line of the view (and keeps it for the report).
    pub fn follow_events(
        &self,
        mut rx: broadcast::Receiver<Event>,
        epoch_system: SystemTime,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let t = e
                            .time
                            .duration_since(epoch_system)
                            .unwrap_or_default()
                            .as_secs_f64();
                        let text = match (&e.path_name, e.from, e.to) {
                            (Some(p), Some(from), Some(to)) => format!(
                                "[{t:>6.2}s]   event: {p}: {} → {}: {}",
                                short(from),
                                short(to),
                                e.cause
                            ),
                            (Some(p), _, _) => format!("[{t:>6.2}s]   event: {p}: {}", e.cause),
                            _ => format!("[{t:>6.2}s]   event: {}: {}", e.lun, e.cause),
                        };
                        let mut s = me.state();
                        s.events.push(e);
                        if s.ticking {
                            s.pending.push(text);
                        } else {
                            drop(s);
                            me.inner.output.line(&text);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        me.say(format!("({n} events not shown: the view fell behind)"));
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    }

    pub fn start_ticker(&self) -> Ticker {
        self.state().ticking = true;
        let stop = CancellationToken::new();
        let me = self.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut last = Snapshot::take(&me);
            let height = PANEL_HEAD_LINES + 1 + last.paths.len() as u16;
            // A terminal that cannot host the viewport (its size or cursor cannot be read) gets the
            // plain lines instead.
            let mut tui = if me.inner.tty {
                me.inner.output.tui(height)
            } else {
                None
            };
            let mut last_plain = Instant::now();
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval.tick().await;
            loop {
                let stopping = tokio::select! {
                    _ = token.cancelled() => true,
                    _ = interval.tick() => false,
                };
                let now = Snapshot::take(&me);
                let rates = now.rates(&last);
                last = now;
                me.draw(&rates, &mut tui, &mut last_plain, stopping);
                if stopping {
                    return;
                }
            }
        });
        Ticker { stop, task }
    }

    pub async fn stop_ticker(&self, ticker: Ticker) {
        ticker.stop.cancel();
        let _ = ticker.task.await;
        let pending = {
            let mut s = self.state();
            s.ticking = false;
            std::mem::take(&mut s.pending)
        };
        for line in pending {
            self.inner.output.line(&line);
        }
    }

    /// One redraw: the lines that came since the last one, then the panel (or, without a terminal,
    /// a status line every few seconds).
    fn draw(&self, rates: &Rates, tui: &mut Option<Tui>, last_plain: &mut Instant, last: bool) {
        let (pending, phase, rows) = {
            let mut s = self.state();
            s.samples.push(Sample {
                t: rates.t,
                mib_per_s: rates.paths.iter().map(|p| p.mib_per_s).collect(),
            });
            s.max_queued = s.max_queued.max(rates.queued);
            s.history.resize_with(rates.paths.len(), Default::default);
            let rows = rates
                .paths
                .iter()
                .zip(s.history.iter_mut())
                .enumerate()
                .map(|(i, (p, history))| {
                    if history.len() == lunmpio_console::model::HISTORY_MAX {
                        history.pop_front();
                    }
                    history.push_back(p.iops.round() as u64);
                    lunmpio_console::model::PathRow {
                        id: lunmpio_vds::PathId {
                            source_id: 0,
                            path_id: i as u64,
                        },
                        name: p.name.clone(),
                        status: lunmpio_console::model::status_word(p.status.vds_name()),
                        reason: p.reason.clone(),
                        iops: p.iops,
                        mib_s: p.mib_per_s,
                        p99_us: p.p99_us,
                        in_flight: p.in_flight,
                        history: history.iter().copied().collect(),
                    }
                })
                .collect::<Vec<_>>();
            (std::mem::take(&mut s.pending), s.phase.clone(), rows)
        };
        let policy = self.inner.lun.mpio().policy().config_name();
        if let Some(terminal) = tui {
            let drawn = self.draw_panel(terminal, &pending, rates, &phase, policy, &rows, last);
            if drawn.is_ok() {
                return;
            }
            // The terminal went away (closed, or not one after all): plain lines from now on.
            *tui = None;
        }
        let mut out = String::new();
        for line in &pending {
            out.push_str(line);
            out.push('\n');
        }
        if last_plain.elapsed() >= self.inner.plain_every && !last {
            *last_plain = Instant::now();
            let paths: Vec<String> = rates
                .paths
                .iter()
                .map(|p| format!("{} {} {:.1}", p.name, short(p.status), p.mib_per_s))
                .collect();
            out.push_str(&format!(
                "[{:>6.2}s] {} | {policy} | {:.0} IOPS {:.1} MiB/s | {} MiB/s | errors {} mismatches {}{}\n",
                rates.t,
                phase,
                rates.iops,
                rates.mib_per_s,
                paths.join(", "),
                rates.errors,
                rates.mismatches,
                if rates.queued > 0 {
                    format!(" | {} queued (no path)", rates.queued)
                } else {
                    String::new()
                }
            ));
        }
        if !out.is_empty() {
            self.inner.output.write(&out);
        }
    }

    /// The lines above the viewport, then the panel: two lines of phase and workload, and the paths
    /// table of `lunmpio top` (`lunmpio_console::view::paths_table`). On the last draw the cursor
    /// moves below the panel, which stays on the screen.
    #[allow(clippy::too_many_arguments)]
    fn draw_panel(
        &self,
        terminal: &mut Tui,
        pending: &[String],
        rates: &Rates,
        phase: &str,
        policy: &str,
        rows: &[lunmpio_console::model::PathRow],
        last: bool,
    ) -> std::io::Result<()> {
        use ratatui::layout::{Constraint, Layout};
        use ratatui::style::{Modifier, Style};
        use ratatui::widgets::{Paragraph, Widget};
        if !pending.is_empty() {
            let text = pending.join("\n");
            let width = terminal.size()?.width.max(1) as usize;
            // Lines longer than the screen wrap: ask for the rows they take.
            let height: usize = pending
                .iter()
                .map(|l| l.chars().count().div_ceil(width).max(1))
                .sum();
            terminal.insert_before(height.min(u16::MAX as usize) as u16, |buf| {
                Paragraph::new(text)
                    .wrap(ratatui::widgets::Wrap { trim: false })
                    .render(buf.area, buf);
            })?;
        }
        let head = vec![
            ratatui::text::Line::styled(
                format!("── t={:.1}s  phase {phase}  ·  policy {policy}", rates.t),
                Style::new().add_modifier(Modifier::BOLD),
            ),
            ratatui::text::Line::from(format!(
                "   workload: {:>7.0} IOPS {:>7.1} MiB/s  in flight {:>3}  I/Os {}  errors {}  mismatches {}  queued {}",
                rates.iops,
                rates.mib_per_s,
                rates.in_flight,
                rates.ios,
                rates.errors,
                rates.mismatches,
                rates.queued
            )),
        ];
        let frame = terminal.draw(|f| {
            let [top, table] =
                Layout::vertical([Constraint::Length(PANEL_HEAD_LINES), Constraint::Fill(1)])
                    .areas(f.area());
            f.render_widget(Paragraph::new(head), top);
            f.render_widget(lunmpio_console::view::paths_table(rows, table.width), table);
            // The cursor stays visible (on the panel's last line): a demo stopped with Ctrl-C
            // leaves the shell with a cursor.
            let area = f.area();
            f.set_cursor_position((0, area.y + area.height.saturating_sub(1)));
        })?;
        if last {
            let area = frame.area;
            terminal.set_cursor_position((0, area.y + area.height.saturating_sub(1)))?;
            self.inner.output.write("\n");
        }
        Ok(())
    }
}

struct Snapshot {
    at: Instant,
    t: f64,
    ios: u64,
    bytes: u64,
    errors: u64,
    mismatches: u64,
    in_flight: u64,
    queued: u64,
    /// Name, status, I/Os, bytes, in flight, p99 latency (µs), reason.
    paths: Vec<(String, PathStatus, u64, u64, u64, u64, String)>,
}

impl Snapshot {
    fn take(live: &Live) -> Snapshot {
        let c = &live.inner.workload.counters;
        let stats = live.inner.lun.statistics();
        let info = live.inner.lun.get_path_info();
        let reason = |name: &str| {
            info.iter()
                .find(|p| p.name == name)
                .map(|p| p.status_reason.clone())
                .unwrap_or_default()
        };
        Snapshot {
            at: Instant::now(),
            t: live.inner.epoch.elapsed().as_secs_f64(),
            ios: c.ios(),
            bytes: c.bytes.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            mismatches: c.mismatches.load(Ordering::Relaxed),
            in_flight: c.in_flight.load(Ordering::Relaxed),
            queued: stats.queued_ios,
            paths: super::by_name(&stats.paths)
                .into_iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.status,
                        p.reads + p.writes,
                        p.bytes_read + p.bytes_written,
                        p.in_flight,
                        p.latency_p99_us,
                        if p.status == PathStatus::Online {
                            String::new()
                        } else {
                            reason(&p.name)
                        },
                    )
                })
                .collect(),
        }
    }

    fn rates(&self, before: &Snapshot) -> Rates {
        let secs = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        Rates {
            t: self.t,
            ios: self.ios,
            iops: per(self.ios, before.ios),
            mib_per_s: per(self.bytes, before.bytes) / 1048576.0,
            errors: self.errors,
            mismatches: self.mismatches,
            in_flight: self.in_flight,
            queued: self.queued,
            paths: self
                .paths
                .iter()
                .enumerate()
                .map(
                    |(i, (name, status, ios, bytes, in_flight, p99_us, reason))| {
                        let (b_ios, b_bytes) = before.paths.get(i).map_or((0, 0), |p| (p.2, p.3));
                        PathRate {
                            name: name.clone(),
                            status: *status,
                            iops: per(*ios, b_ios),
                            mib_per_s: per(*bytes, b_bytes) / 1048576.0,
                            in_flight: *in_flight,
                            p99_us: *p99_us,
                            reason: reason.clone(),
                        }
                    },
                )
                .collect(),
        }
    }
}

struct Rates {
    t: f64,
    ios: u64,
    iops: f64,
    mib_per_s: f64,
    errors: u64,
    mismatches: u64,
    in_flight: u64,
    queued: u64,
    paths: Vec<PathRate>,
}

struct PathRate {
    name: String,
    status: PathStatus,
    iops: f64,
    mib_per_s: f64,
    in_flight: u64,
    p99_us: u64,
    reason: String,
}

/// `Online`, `Failed`, … from `VDS_MPS_ONLINE`.
pub fn short(status: PathStatus) -> &'static str {
    match status {
        PathStatus::Online => "Online",
        PathStatus::Failed => "Failed",
        PathStatus::Standby => "Standby",
        PathStatus::Unknown => "Unknown",
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn millis(v: &Value) -> String {
    match v.as_f64() {
        Some(ms) => format_duration(Duration::from_secs_f64(ms.max(0.0) / 1e3)),
        None => "-".into(),
    }
}

/// The summary for people, from the same object `--json` prints.
pub fn summary_text(j: &Value, paths: &[String], crash_goal: Duration) -> String {
    let mut s = String::from("\nsummary\n");
    let u = |k: &str| j[k].as_u64().unwrap_or(0);
    s.push_str(&format!(
        "  workload       {} I/Os ({} reads, {} writes, {} flushes), {}, in {}\n",
        grouped(u("ios")),
        grouped(u("reads")),
        grouped(u("writes")),
        grouped(u("flushes")),
        lunmpio_human::format_size(u("bytes")),
        millis(&j["durationMs"])
    ));
    s.push_str(&format!(
        "  errors         {}   (seen by the workload; must be 0)\n",
        u("errors")
    ));
    s.push_str(&format!(
        "  mismatches     {}   (every read checked against the last write; final pass: {} blocks)\n",
        u("mismatches"),
        grouped(u("blocksVerifiedAtEnd"))
    ));
    s.push_str(&format!(
        "  longest stall  {} overall; {} while a path was left\n",
        millis(&j["maxStallMs"]),
        millis(&j["maxStallWithPathLeftMs"])
    ));
    if let Some(a) = j["allPathsDown"].as_object() {
        s.push_str(&format!(
            "  all paths down {} outage: up to {} I/Os queued, longest wait {}, none failed\n",
            millis(&a["outageMs"]),
            a["queuedIosMax"].as_u64().unwrap_or(0),
            millis(&a["stallMs"])
        ));
    }

    s.push_str("\n  failovers (fault → path Failed → I/O re-driven on the other paths)\n");
    let mut rows = vec![vec![
        "  PATH".to_string(),
        "FAULT".into(),
        "DETECTED".into(),
        "STALL".into(),
        "CAUSE".into(),
    ]];
    for f in j["failovers"].as_array().into_iter().flatten() {
        let mut stall = millis(&f["stallMs"]);
        if f["fault"] == "down" && num(&f["stallMs"]) > crash_goal.as_secs_f64() * 1e3 {
            stall.push_str(&format!(" (goal {})", format_duration(crash_goal)));
        }
        rows.push(vec![
            format!("  {}", f["path"].as_str().unwrap_or("")),
            f["fault"].as_str().unwrap_or("").into(),
            millis(&f["detectMs"]),
            stall,
            f["cause"].as_str().unwrap_or("").into(),
        ]);
    }
    s.push_str(&render_table(&rows));

    s.push_str("\n  share of I/O per path, by phase\n");
    let mut header = vec![
        "  #".to_string(),
        "PHASE".into(),
        "POLICY".into(),
        "MiB/s".into(),
        "IOPS".into(),
        "LAT".into(),
    ];
    header.extend(paths.iter().cloned());
    let mut rows = vec![header];
    for p in j["phases"].as_array().into_iter().flatten() {
        let mut row = vec![
            format!("  {}", p["phase"]),
            p["name"].as_str().unwrap_or("").into(),
            p["policy"].as_str().unwrap_or("").into(),
            format!("{:.1}", num(&p["mibPerSec"])),
            format!("{:.0}", num(&p["iops"])),
            millis(&p["meanLatencyMs"]),
        ];
        for name in paths {
            row.push(format!("{:.0}%", num(&p["shares"][name]) * 100.0));
        }
        rows.push(row);
    }
    s.push_str(&render_table(&rows));

    s.push_str("\n  guarantees (docs/GUARANTEES.md)\n");
    for c in j["checks"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "    [{}] {}: {}\n",
            if c["held"] == true { " ok " } else { "FAIL" },
            c["name"].as_str().unwrap_or(""),
            c["detail"].as_str().unwrap_or("")
        ));
    }
    for key in ["errorSamples", "mismatchSamples"] {
        for e in j[key].as_array().into_iter().flatten() {
            s.push_str(&format!("    {}\n", e.as_str().unwrap_or("")));
        }
    }
    s.push_str(&format!(
        "\n  result: {}\n",
        if j["guaranteesHeld"] == true {
            "PASS: every guarantee held"
        } else {
            "FAIL: a guarantee was broken (exit status 1)"
        }
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1234567), "1,234,567");
    }
}
