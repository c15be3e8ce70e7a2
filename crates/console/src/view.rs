//! The console's screen: widgets drawn from the [`Model`] and the [`Ui`] state. Pure drawing, tested
//! on ratatui's `TestBackend` at 80×24 (the smallest screen it is made for) and larger.

use lunmpio_human::format_size;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Borders, Cell, Clear, List, ListItem, ListState, Paragraph, Row, Table, TableState, Tabs,
};

use crate::model::{Model, PathRow};

/// What the user has chosen and is being asked.
#[derive(Debug, Default, Clone)]
pub struct Ui {
    /// Index into the LUN list.
    pub lun: usize,
    /// Index into the paths table.
    pub path: usize,
    pub dialog: Option<Dialog>,
    /// The last action's outcome (the VDS result), shown above the key help.
    pub message: Option<String>,
    /// Refresh period, shown in the title.
    pub interval_ms: u64,
    /// The LUN an open policy dialog is for.
    pub lun_name: Option<String>,
}

/// A question on top of the screen.
#[derive(Debug, Clone, PartialEq)]
pub enum Dialog {
    /// Pick a policy among those the LUN supports (config name, VDS value).
    Policy {
        options: Vec<(String, i32)>,
        selected: usize,
    },
    /// y/n before an action that changes the daemon.
    Confirm { question: String, action: Action },
}

/// A change the console asks the daemon for, once confirmed.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    SetPolicy {
        lun: String,
        policy: String,
    },
    /// SetPathStatus: `status` 1 reinstate, 5 fail, 7 standby.
    SetPathStatus {
        lun: String,
        path: lunmpio_vds::PathId,
        name: String,
        status: i64,
    },
}

const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The last `width` values as a one-line sparkline, scaled to their own maximum.
pub fn sparkline(values: &[u64], width: usize) -> String {
    let tail = &values[values.len().saturating_sub(width)..];
    let max = tail.iter().copied().max().unwrap_or(0);
    tail.iter()
        .map(|v| {
            if max == 0 {
                ' '
            } else {
                SPARK[((*v as f64 / max as f64) * 7.0).round() as usize]
            }
        })
        .collect()
}

fn status_style(status: &str) -> Style {
    match status {
        "ONLINE" => Style::new().fg(Color::Green),
        "FAILED" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "STANDBY" => Style::new().fg(Color::Cyan),
        _ => Style::new().fg(Color::Yellow),
    }
}

fn latency(us: u64) -> String {
    match us {
        0 => "-".into(),
        us if us < 10_000 => format!("{us}µs"),
        us => format!("{}ms", us / 1000),
    }
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, model: &Model, ui: &Ui) {
    let [title, tabs, summary, paths, events, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Min(4),
        Constraint::Length(2),
    ])
    .areas(frame.area());
    draw_title(frame, title, model, ui);
    draw_tabs(frame, tabs, model, ui);
    draw_summary(frame, summary, model);
    draw_paths(frame, paths, model, ui);
    draw_events(frame, events, model);
    draw_footer(frame, footer, ui);
    if let Some(dialog) = &ui.dialog {
        draw_dialog(frame, dialog);
    }
}

fn draw_title(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let daemon = model.snapshot.as_ref().map_or_else(
        || "connecting…".to_string(),
        |s| format!("daemon {} pid {}", s.daemon.version, s.daemon.pid),
    );
    let line = Line::from(vec![
        Span::styled("lunmpio top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!("  {daemon}  every {} ms", ui.interval_ms)),
    ]);
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_tabs(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let names: Vec<String> = model
        .snapshot
        .as_ref()
        .map(|s| s.luns.iter().map(|l| l.name.clone()).collect())
        .unwrap_or_default();
    let tabs = Tabs::new(names)
        .select(ui.lun)
        .highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    frame.render_widget(tabs, area);
}

fn draw_summary(frame: &mut Frame, area: Rect, model: &Model) {
    let Some(s) = &model.snapshot else {
        return;
    };
    let Some(lun) = s
        .luns
        .iter()
        .find(|l| Some(&l.name) == s.lun.as_ref().map(|d| &d.name))
    else {
        frame.render_widget(Paragraph::new("no LUN"), area);
        return;
    };
    let stats = s.lun.as_ref().map(|d| &d.stats);
    let usable_style = match lun.usable_paths {
        0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        1 if lun.paths > 1 => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::Green),
    };
    let line = Line::from(vec![
        Span::raw(format!(
            "{}  {}  policy {}  ",
            lun.name,
            format_size(lun.size),
            lun.policy_config_name
        )),
        Span::styled(
            format!("usable {}/{}", lun.usable_paths, lun.paths),
            usable_style,
        ),
        Span::raw(format!(
            "  queued {}  in-doubt {}",
            stats.map_or(0, |s| s.queued_ios),
            stats.map_or(0, |s| s.in_doubt_writes)
        )),
    ]);
    frame.render_widget(Paragraph::new(line), area);
}

fn path_row(row: &PathRow, spark_width: usize) -> Row<'static> {
    Row::new(vec![
        Cell::from(row.name.clone()),
        Cell::from(Span::styled(row.status, status_style(row.status))),
        Cell::from(format!("{:.0}", row.iops)),
        Cell::from(format!("{:.1}", row.mib_s)),
        Cell::from(latency(row.p99_us)),
        Cell::from(row.in_flight.to_string()),
        Cell::from(sparkline(&row.history, spark_width)),
        Cell::from(row.reason.clone()),
    ])
}

/// The paths table (a row per path: status, IOPS, MiB/s, p99, QD, IOPS trend, reason) for `width`
/// columns: the one widget of `lunmpio top` and of the demo's live view.
pub fn paths_table(rows: &[PathRow], width: u16) -> Table<'static> {
    // The sparkline and the reason share what the fixed columns (and the spaces between the
    // columns) leave; the sparkline shows at most half a minute at the default refresh.
    let fixed = 10 + 8 + 8 + 7 + 7 + 4 + 7;
    let spark_width = ((width as usize).saturating_sub(fixed) / 2).clamp(8, 30);
    let widths = [
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(7),
        Constraint::Length(4),
        Constraint::Length(spark_width as u16),
        Constraint::Fill(1),
    ];
    let header = Row::new([
        "PATH",
        "STATUS",
        "IOPS",
        "MiB/s",
        "p99",
        "QD",
        "IOPS TREND",
        "REASON",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    Table::new(rows.iter().map(|r| path_row(r, spark_width)), widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
}

fn draw_paths(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let table = paths_table(&model.rows, area.width)
        .block(Block::new().borders(Borders::TOP).title(" paths "));
    let mut state =
        TableState::default().with_selected((!model.rows.is_empty()).then_some(ui.path));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_events(frame: &mut Frame, area: Rect, model: &Model) {
    let shown = area.height.saturating_sub(1) as usize;
    let items: Vec<ListItem> = model
        .events
        .iter()
        .rev()
        .take(shown)
        .map(|e| {
            let time = e.time.get(11..19).unwrap_or(&e.time);
            let what = match (&e.path, &e.to_name) {
                (Some(path), Some(to)) => {
                    format!("{}/{path} → {}", e.lun, to.trim_start_matches("VDS_MPS_"))
                }
                (Some(path), None) => format!("{}/{path}", e.lun),
                (None, _) => e.lun.clone(),
            };
            ListItem::new(format!("{time} {what}: {}", e.cause))
        })
        .collect();
    let list = List::new(items).block(
        Block::new()
            .borders(Borders::TOP)
            .title(" events, newest first "),
    );
    frame.render_widget(list, area);
}

fn draw_footer(frame: &mut Frame, area: Rect, ui: &Ui) {
    let [message, keys] =
        Layout::vertical([Constraint::Length(1), Constraint::Length(1)]).areas(area);
    if let Some(m) = &ui.message {
        frame.render_widget(
            Paragraph::new(m.as_str()).style(Style::new().add_modifier(Modifier::BOLD)),
            message,
        );
    }
    let help = "q quit  ←/→ LUN  ↑/↓ path  p policy  f fail  s standby  r reinstate";
    frame.render_widget(
        Paragraph::new(help).style(Style::new().fg(Color::DarkGray)),
        keys,
    );
}

/// A box of `width`×`height` cells in the middle of `area`.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let width = width.min(area.width);
    let height = height.min(area.height);
    Rect::new(
        area.x + (area.width - width) / 2,
        area.y + (area.height - height) / 2,
        width,
        height,
    )
}

fn draw_dialog(frame: &mut Frame, dialog: &Dialog) {
    match dialog {
        Dialog::Policy { options, selected } => {
            let area = centered(frame.area(), 44, options.len() as u16 + 4);
            let items: Vec<ListItem> = options
                .iter()
                .map(|(name, value)| ListItem::new(format!("{name} ({value})")))
                .collect();
            let list = List::new(items)
                .block(Block::bordered().title(" policy: ↑/↓, Enter, Esc "))
                .highlight_style(Style::new().add_modifier(Modifier::REVERSED))
                .highlight_symbol("> ");
            frame.render_widget(Clear, area);
            frame.render_stateful_widget(
                list,
                area,
                &mut ListState::default().with_selected(Some(*selected)),
            );
        }
        Dialog::Confirm { question, .. } => {
            let area = centered(
                frame.area(),
                (question.chars().count() as u16 + 4).max(30),
                4,
            );
            let text = vec![
                Line::from(question.as_str()),
                Line::from("y: yes   n or Esc: no"),
            ];
            frame.render_widget(Clear, area);
            frame.render_widget(
                Paragraph::new(text).block(Block::bordered().title(" confirm ")),
                area,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::snapshot;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use std::time::{Duration, Instant};

    fn screen(model: &Model, ui: &Ui, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, model, ui)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn model(failed: bool) -> Model {
        let mut m = Model::default();
        let t0 = Instant::now();
        m.update(snapshot(1000, false), t0);
        m.update(snapshot(2000, failed), t0 + Duration::from_secs(1));
        m
    }

    #[test]
    fn the_screen_fits_80_by_24_with_paths_statuses_and_rates() {
        let text = screen(
            &model(true),
            &Ui {
                interval_ms: 1000,
                ..Ui::default()
            },
            80,
            24,
        );
        for want in [
            "lunmpio top",
            "daemon 0.1.0 pid 42",
            "lun0",
            "policy round-robin",
            "usable 1/2",
            "ctrlA",
            "ONLINE",
            "ctrlB",
            "FAILED",
            "1000",
            "250µs",
            "q quit",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        // It grows with the window: the reason column shows at 120 columns.
        let wide = screen(&model(true), &Ui::default(), 120, 30);
        assert!(wide.contains("connection refused"), "{wide}");
    }

    #[test]
    fn dialogs_are_drawn_on_top() {
        let ui = Ui {
            dialog: Some(Dialog::Policy {
                options: vec![("failover".into(), 1), ("round-robin".into(), 2)],
                selected: 1,
            }),
            ..Ui::default()
        };
        let text = screen(&model(false), &ui, 80, 24);
        assert!(
            text.contains("> round-robin (2)") && text.contains("failover (1)"),
            "{text}"
        );
        let ui = Ui {
            dialog: Some(Dialog::Confirm {
                question: "fail path ctrlA of lun0?".into(),
                action: Action::SetPolicy {
                    lun: "lun0".into(),
                    policy: "failover".into(),
                },
            }),
            message: Some("SetPathStatus ctrlB: S_OK".into()),
            ..Ui::default()
        };
        let text = screen(&model(false), &ui, 80, 24);
        assert!(
            text.contains("fail path ctrlA of lun0?") && text.contains("y: yes"),
            "{text}"
        );
        assert!(text.contains("SetPathStatus ctrlB: S_OK"), "{text}");
    }

    #[test]
    fn sparklines_scale_to_their_own_maximum() {
        assert_eq!(sparkline(&[0, 0], 5), "  ");
        assert_eq!(sparkline(&[0, 5, 10], 5), "▁▅█");
        assert_eq!(sparkline(&[10, 0, 5, 10], 2), "▅█", "only the last `width`");
    }
}
