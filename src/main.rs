//! The `edgegate` command: parse the CLI, load and validate the config, set up logging, and
//! hand over to [`edgegate::run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use edgegate::Control;
use edgegate::config::{Config, ConfigError};

/// EX_USAGE from sysexits.h: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "edgegate",
    version,
    about = "Edge IoT gateway: MQTT in, durable local log, Kafka out"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/edgegate/gateway.toml"
    )]
    config: PathBuf,
    /// Log filter (`info`, `debug`, `edgegate=debug,rdkafka=warn`); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration and exit: 0 when valid, 64 with every problem otherwise.
    Validate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    let config = match load(&cli.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Validate => {
            println!("{}: valid", cli.config.display());
            ExitCode::SUCCESS
        }
        Command::Run => run(config, &cli.config),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        match &e {
            ConfigError::Invalid(found) => {
                for problem in found {
                    eprintln!("{problem}");
                }
                eprintln!(
                    "{}: {} problem(s); nothing was started",
                    path.display(),
                    found.len()
                );
            }
            ConfigError::Read { .. } => eprintln!("{e}"),
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

fn run(config: Config, path: &Path) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (control_tx, control_rx) = mpsc::channel(4);
        let signals = tokio::spawn(handle_signals(
            path.to_owned(),
            shutdown.clone(),
            control_tx,
        ));
        let result = edgegate::run(config, &base, shutdown, control_rx).await;
        signals.abort();
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "The gateway stopped on an error.");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM and SIGINT stop the gateway; SIGHUP re-reads the config and reloads what can be
/// reloaded. A config that fails validation on reload is logged and ignored.
async fn handle_signals(
    path: PathBuf,
    shutdown: CancellationToken,
    control: mpsc::Sender<Control>,
) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("Cannot install signal handlers; stop the gateway with SIGKILL.");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!(signal = "SIGTERM", "Stopping."); shutdown.cancel(); }
            _ = int.recv() => { tracing::info!(signal = "SIGINT", "Stopping."); shutdown.cancel(); }
            _ = hup.recv() => match Config::load(&path) {
                Ok(config) => { let _ = control.send(Control::Reload(Box::new(config))).await; }
                Err(e) => tracing::error!(config = %path.display(), problems = %e, "Not reloading: the config is invalid."),
            },
        }
    }
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
