//! `lunmpio top`: the loop that refreshes the [`Model`] from the control socket, draws it, and acts
//! on keys. Changes (policy, path status) go through a confirmation and report the daemon's VDS
//! result. It ends on `q`, Esc, Ctrl-C, or when the daemon goes away, with the reason.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lunmpio_rpc::client::{Client, ClientError};
use lunmpio_rpc::{PolicyValue, SetLoadBalancePolicyParams};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::model::{LunDetail, Model, Snapshot};
use crate::view::{self, Action, Dialog, Ui};

/// How long the daemon has to answer each call before the console calls it gone.
const ANSWER_MAX: Duration = Duration::from_secs(5);
/// Bounds of the refresh period.
pub const INTERVAL_MIN: Duration = Duration::from_millis(100);
pub const INTERVAL_MAX: Duration = Duration::from_secs(60);

/// Why the console stopped.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("the daemon went away: {0}")]
    DaemonGone(String),
    #[error("cannot connect to the daemon: {0}")]
    Connect(String),
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// `lunmpio top`'s options.
#[derive(Debug, Clone)]
pub struct TopOptions {
    pub socket: PathBuf,
    pub interval: Duration,
    /// The LUN shown first (else the first one).
    pub lun: Option<String>,
}

/// Runs the console until the user quits (Ok) or the daemon goes away (Err, with the reason). The
/// terminal is restored in every case, panics included (ratatui's hook).
pub fn run(options: &TopOptions) -> Result<(), TopError> {
    assert!(
        (INTERVAL_MIN..=INTERVAL_MAX).contains(&options.interval),
        "the caller bounds the interval"
    );
    // Connect before taking over the screen, so a wrong socket is a plain error message.
    let mut client = connect(&options.socket)?;
    let mut terminal = ratatui::try_init()?;
    let result = event_loop(&mut terminal, &mut client, options);
    ratatui::try_restore()?;
    result
}

fn connect(socket: &Path) -> Result<Client, TopError> {
    Client::connect_with_timeout(socket, ANSWER_MAX).map_err(|e| TopError::Connect(e.to_string()))
}

/// A failed call: an RPC error is the daemon's answer (shown); anything else means it is gone.
fn gone(e: ClientError) -> TopError {
    TopError::DaemonGone(e.to_string())
}

fn lun_detail(client: &mut Client, name: &str) -> Result<LunDetail, ClientError> {
    Ok(LunDetail {
        name: name.to_string(),
        paths: client.get_path_info(name)?.paths,
        stats: client.get_statistics(name)?,
        supported: client.get_supported_lb_policies(name)?,
    })
}

fn refresh(
    client: &mut Client,
    model: &mut Model,
    ui: &mut Ui,
    wanted: Option<&str>,
) -> Result<(), TopError> {
    let daemon = client.get_daemon_info().map_err(gone)?;
    let luns = client.list_luns().map_err(gone)?.luns;
    if let Some(name) = wanted
        && let Some(i) = luns.iter().position(|l| l.name == name)
    {
        ui.lun = i;
    }
    ui.lun = ui.lun.min(luns.len().saturating_sub(1));
    let lun = match luns.get(ui.lun) {
        None => None,
        Some(l) => match lun_detail(client, &l.name) {
            Ok(detail) => Some(detail),
            // The LUN went between ListLuns and these calls (a reload removed it): the next
            // refresh shows the new list. Only a lost connection ends the console.
            Err(ClientError::Rpc(e)) => {
                ui.message = Some(format!("{}: {e}", l.name));
                None
            }
            Err(e) => return Err(gone(e)),
        },
    };
    let events = client
        .get_events(None, model.last_event_seq)
        .map_err(gone)?
        .events;
    model.add_events(events);
    model.update(Snapshot { daemon, luns, lun }, Instant::now());
    ui.path = ui.path.min(model.rows.len().saturating_sub(1));
    Ok(())
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    client: &mut Client,
    options: &TopOptions,
) -> Result<(), TopError> {
    let mut model = Model::default();
    let mut ui = Ui {
        interval_ms: options.interval.as_millis() as u64,
        ..Ui::default()
    };
    refresh(client, &mut model, &mut ui, options.lun.as_deref())?;
    let mut next = Instant::now() + options.interval;
    loop {
        terminal.draw(|f| view::draw(f, &model, &ui))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            match event::read()? {
                Event::Key(key) if key.kind != KeyEventKind::Release => {
                    let lun_before = ui.lun;
                    match on_key(key, &model, &mut ui) {
                        Step::Quit => return Ok(()),
                        Step::Act(action) => {
                            ui.message = Some(perform(client, &action)?);
                            next = Instant::now(); // show the change at once
                        }
                        Step::Stay if ui.lun != lun_before => next = Instant::now(),
                        Step::Stay => {}
                    }
                }
                // A resize redraws at the new size on the next pass.
                _ => {}
            }
        }
        if Instant::now() >= next {
            refresh(client, &mut model, &mut ui, None)?;
            next = Instant::now() + options.interval;
        }
    }
}

/// What a key asks for.
#[derive(Debug, PartialEq)]
enum Step {
    Stay,
    Quit,
    Act(Action),
}

fn on_key(key: KeyEvent, model: &Model, ui: &mut Ui) -> Step {
    if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
        return Step::Quit;
    }
    match ui.dialog.take() {
        Some(dialog) => on_dialog_key(key.code, dialog, ui),
        None => on_screen_key(key.code, model, ui),
    }
}

fn on_dialog_key(code: KeyCode, dialog: Dialog, ui: &mut Ui) -> Step {
    match dialog {
        Dialog::Policy {
            options,
            mut selected,
        } => match code {
            KeyCode::Up | KeyCode::Char('k') => {
                selected = selected.saturating_sub(1);
                ui.dialog = Some(Dialog::Policy { options, selected });
            }
            KeyCode::Down | KeyCode::Char('j') => {
                selected = (selected + 1).min(options.len().saturating_sub(1));
                ui.dialog = Some(Dialog::Policy { options, selected });
            }
            KeyCode::Enter => {
                if let (Some((name, _)), Some(lun)) = (options.get(selected), ui.lun_name.clone()) {
                    ui.dialog = Some(Dialog::Confirm {
                        question: format!("set the policy of {lun} to {name}?"),
                        action: Action::SetPolicy {
                            lun,
                            policy: name.clone(),
                        },
                    });
                }
            }
            KeyCode::Esc | KeyCode::Char('q') => {}
            _ => ui.dialog = Some(Dialog::Policy { options, selected }),
        },
        Dialog::Confirm { question, action } => match code {
            KeyCode::Char('y') | KeyCode::Char('Y') => return Step::Act(action),
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc | KeyCode::Char('q') => {
                ui.message = Some("cancelled".into());
            }
            _ => ui.dialog = Some(Dialog::Confirm { question, action }),
        },
    }
    Step::Stay
}

fn on_screen_key(code: KeyCode, model: &Model, ui: &mut Ui) -> Step {
    let luns = model.snapshot.as_ref().map_or(0, |s| s.luns.len());
    let detail = model.snapshot.as_ref().and_then(|s| s.lun.as_ref());
    match code {
        KeyCode::Char('q') | KeyCode::Esc => return Step::Quit,
        KeyCode::Right | KeyCode::Tab if luns > 0 => {
            ui.lun = (ui.lun + 1) % luns;
            ui.path = 0;
        }
        KeyCode::Left | KeyCode::BackTab if luns > 0 => {
            ui.lun = (ui.lun + luns - 1) % luns;
            ui.path = 0;
        }
        KeyCode::Up | KeyCode::Char('k') => ui.path = ui.path.saturating_sub(1),
        KeyCode::Down | KeyCode::Char('j') => {
            ui.path = (ui.path + 1).min(model.rows.len().saturating_sub(1));
        }
        KeyCode::Char('p') => {
            if let Some(d) = detail {
                let options: Vec<(String, i32)> = d
                    .supported
                    .policies
                    .iter()
                    .map(|p| (p.name.clone(), p.policy))
                    .collect();
                let current = model
                    .snapshot
                    .as_ref()
                    .and_then(|s| s.luns.iter().find(|l| l.name == d.name))
                    .map(|l| l.policy);
                let selected = options
                    .iter()
                    .position(|(_, v)| Some(*v) == current)
                    .unwrap_or(0);
                ui.lun_name = Some(d.name.clone());
                ui.dialog = Some(Dialog::Policy { options, selected });
            }
        }
        KeyCode::Char(c @ ('f' | 's' | 'r')) => {
            if let (Some(d), Some(row)) = (detail, model.rows.get(ui.path)) {
                let (verb, status) = match c {
                    'f' => ("fail", 5),
                    's' => ("stand by", 7),
                    _ => ("reinstate", 1),
                };
                ui.dialog = Some(Dialog::Confirm {
                    question: format!("{verb} path {} of {}?", row.name, d.name),
                    action: Action::SetPathStatus {
                        lun: d.name.clone(),
                        path: row.id,
                        name: row.name.clone(),
                        status,
                    },
                });
            }
        }
        _ => {}
    }
    Step::Stay
}

/// Asks the daemon; the message to show is its VDS result. Only a lost daemon is an error.
fn perform(client: &mut Client, action: &Action) -> Result<String, TopError> {
    let (what, result) = match action {
        Action::SetPolicy { lun, policy } => (
            format!("SetLoadBalancePolicy {lun} {policy}"),
            client
                .set_load_balance_policy(SetLoadBalancePolicyParams {
                    lun: lun.clone(),
                    policy: PolicyValue::Name(policy.clone()),
                    paths: Vec::new(),
                })
                .map(|_| ()),
        ),
        Action::SetPathStatus {
            lun,
            path,
            name,
            status,
        } => (
            format!(
                "SetPathStatus {lun}/{name} {}",
                match status {
                    5 => "VDS_MPS_FAILED",
                    7 => "VDS_MPS_STANDBY",
                    _ => "VDS_MPS_ONLINE",
                }
            ),
            client.set_path_status(lun, *path, *status).map(|_| ()),
        ),
    };
    match result {
        Ok(()) => Ok(format!("{what}: S_OK")),
        Err(ClientError::Rpc(e)) => Ok(format!("{what}: {e}")),
        Err(e) => Err(gone(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::snapshot;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn model() -> Model {
        let mut m = Model::default();
        m.update(snapshot(10, false), Instant::now());
        m
    }

    #[test]
    fn a_policy_change_is_picked_then_confirmed() {
        let m = model();
        let mut ui = Ui::default();
        assert_eq!(on_key(key(KeyCode::Char('p')), &m, &mut ui), Step::Stay);
        assert!(
            matches!(&ui.dialog, Some(Dialog::Policy { selected: 1, .. })),
            "starts at the current policy: {:?}",
            ui.dialog
        );
        on_key(key(KeyCode::Up), &m, &mut ui);
        on_key(key(KeyCode::Enter), &m, &mut ui);
        assert!(
            matches!(&ui.dialog, Some(Dialog::Confirm { question, .. }) if question == "set the policy of lun0 to failover?")
        );
        assert_eq!(
            on_key(key(KeyCode::Char('y')), &m, &mut ui),
            Step::Act(Action::SetPolicy {
                lun: "lun0".into(),
                policy: "failover".into()
            })
        );
        assert!(ui.dialog.is_none());
    }

    #[test]
    fn a_path_action_asks_first_and_no_cancels() {
        let m = model();
        let mut ui = Ui::default();
        on_key(key(KeyCode::Down), &m, &mut ui);
        on_key(key(KeyCode::Char('f')), &m, &mut ui);
        assert!(
            matches!(&ui.dialog, Some(Dialog::Confirm { question, .. }) if question == "fail path ctrlB of lun0?")
        );
        assert_eq!(on_key(key(KeyCode::Char('n')), &m, &mut ui), Step::Stay);
        assert_eq!(
            (ui.dialog.is_none(), ui.message.as_deref()),
            (true, Some("cancelled"))
        );
        on_key(key(KeyCode::Char('r')), &m, &mut ui);
        assert!(matches!(
            on_key(key(KeyCode::Char('y')), &m, &mut ui),
            Step::Act(Action::SetPathStatus { status: 1, .. })
        ));
    }

    #[test]
    fn q_esc_and_ctrl_c_quit_but_q_in_a_dialog_only_closes_it() {
        let m = model();
        let mut ui = Ui::default();
        assert_eq!(on_key(key(KeyCode::Char('q')), &m, &mut ui), Step::Quit);
        assert_eq!(on_key(key(KeyCode::Esc), &m, &mut ui), Step::Quit);
        assert_eq!(
            on_key(
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
                &m,
                &mut ui
            ),
            Step::Quit
        );
        on_key(key(KeyCode::Char('p')), &m, &mut ui);
        assert_eq!(on_key(key(KeyCode::Char('q')), &m, &mut ui), Step::Stay);
        assert!(ui.dialog.is_none());
    }
}
