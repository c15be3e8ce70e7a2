//! `lunmpio`: user-space multipath I/O for block storage. This file only wires the CLI to its commands;
//! every command returns an exit code or an error that names the problem.

use std::process::ExitCode;

use clap::Parser;

mod args;
mod rpc_commands;

use args::{Cli, Command, LogFormat, TargetAction};
use lunmpio_array::commands as target_commands;
use lunmpio_daemon::serve;
use rpc_commands as manage;

/// Runs a long-lived command, then stops the runtime without waiting for blocking threads that are
/// stuck (a hung local device holds its system call forever): the command has already drained what
/// could complete within its own `shutdown_timeout`.
fn run_to_end<T>(
    rt: tokio::runtime::Runtime,
    command: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let result = rt.block_on(command);
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

/// `lunmpio doctor`: the report on stdout, its worst severity as the exit status.
fn doctor(args: &args::DoctorArgs) -> anyhow::Result<ExitCode> {
    let report = lunmpio_daemon::doctor::run(&lunmpio_daemon::doctor::DoctorOptions {
        config: args.config.clone(),
        socket: args.socket.clone(),
        client_timeout: args.client_timeout,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(ExitCode::from(report.exit_code()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo talks to people on stdout and shows every event in its own view; its log would only
    // interleave with that, so it logs errors only unless RUST_LOG asks for more.
    let default_level = if matches!(cli.command, Command::Demo(_)) {
        "error"
    } else {
        "info"
    };
    init_logging(cli.log_format, default_level);
    let result = match cli.command {
        Command::Target(target) => match target.action {
            Some(TargetAction::Fault(args)) => target_commands::fault(args),
            Some(TargetAction::Status(args)) => target_commands::status(args),
            Some(TargetAction::Fence(args)) => target_commands::fence(args),
            None => runtime()
                .and_then(|rt| run_to_end(rt, lunmpio_array::run(target.serve)))
                .map(|()| ExitCode::SUCCESS),
        },
        Command::Demo(args) => runtime().and_then(|rt| rt.block_on(lunmpio_demo::run(args))),
        // Listeners from systemd, and a live upgrade's handover, are taken while this is the only
        // thread (it edits the environment).
        Command::Serve(args) => serve::activation::Inherited::take_from_env()
            .and_then(|inherited| {
                let handover = serve::upgrade::Incoming::take_from_env()?;
                runtime().and_then(|rt| run_to_end(rt, serve::run(args, inherited, handover)))
            })
            .map(|()| ExitCode::SUCCESS),
        Command::Doctor(args) => doctor(&args),
        Command::Top(args) => lunmpio_console::run(&lunmpio_console::TopOptions {
            socket: args.socket,
            interval: args.interval,
            lun: args.lun,
        })
        .map(|()| ExitCode::SUCCESS)
        .map_err(anyhow::Error::from),
        Command::UpgradeCheck => {
            println!("{}", serve::upgrade::check_line());
            Ok(ExitCode::SUCCESS)
        }
        Command::Upgrade(o) => manage::upgrade(&o),
        Command::Luns(o) => manage::luns(&o),
        Command::Topology(o) => manage::topology(&o),
        Command::Paths(a) => manage::paths(&a.options, &a.lun),
        Command::Policy(c) => manage::policy(&c.options, c.action),
        Command::Policies(a) => manage::policies(&a.options, &a.lun),
        Command::Path(c) => manage::path(&c.options, c.action),
        Command::HbaPort(c) => manage::hba_port(&c.options, c.action),
        Command::Stats(a) => manage::stats(&a.options, &a.lun),
        Command::Events(a) => manage::events(&a.options, a.lun, a.since, a.follow),
        Command::Reload(o) => manage::reload(&o),
        Command::Daemon(o) => manage::daemon(&o),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "lunmpio",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lunmpio: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = std::env::var("LUNMPIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        builder.worker_threads(n.max(1));
    }
    builder
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
}

fn init_logging(format: LogFormat, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; logs captured by tests or supervisors stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
