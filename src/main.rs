//! The `edgegate` command: parse the CLI, load and validate the config, set up logging, and
//! hand over to [`edgegate::run`] (or to [`edgegate::admin::status`] for `edgegate status`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use edgegate::Control;
use edgegate::config::{Config, ConfigError};
use edgegate::forward::dead_letter;

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
    /// Log line format on stderr. Without it: the systemd journal with structured fields
    /// when systemd runs the gateway, text on stderr otherwise.
    #[arg(long, global = true, value_enum)]
    log_format: Option<edgegate::logging::Format>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration and exit: 0 when valid, 64 with every problem otherwise.
    Validate,
    /// Summarise a running gateway from its admin endpoint ([admin] listen). Exit code 0
    /// when ready (also while Kafka is down and it buffers), 1 when not ready, 2 when it
    /// cannot be reached.
    Status {
        /// Ask this address instead of the configured one.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
    },
    /// Print the records Kafka refused for good (the dead-letter log under the buffer
    /// dir), oldest first, one JSON object per line: the error, the Kafka topic and key,
    /// the device, the headers and the payload (text, or hex when not UTF-8). Reads the
    /// files without locking them, so it is safe while the gateway runs.
    DeadLetters {
        /// Print at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Add or update a device's password in a password file ([auth] password_file). The
    /// password is read from the terminal (twice), or as one line from stdin when it is not
    /// a terminal. The file keeps only argon2id hashes and is written atomically with mode 0600.
    Passwd {
        /// The password file; created if absent.
        #[arg(long)]
        file: PathBuf,
        /// The device's username.
        username: String,
    },
}

fn main() -> ExitCode {
    edgegate::memory::limit_arenas();
    let cli = Cli::parse();
    edgegate::logging::init(&cli.log_level, cli.log_format);
    let command = cli.command.unwrap_or(Command::Run);
    // `status --admin ADDR` needs no config: it may run where the config is not readable.
    if let Command::Status { admin: Some(addr) } = command {
        return status(addr);
    }
    if let Command::Passwd { file, username } = &command {
        return passwd(file, username);
    }
    let config = match load(&cli.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match command {
        // Loading checked everything, the files the config names included.
        Command::Validate => {
            println!("{}: valid", cli.config.display());
            ExitCode::SUCCESS
        }
        Command::Run => run(config, &cli.config),
        Command::DeadLetters { limit } => dead_letters(&config, limit),
        Command::Passwd { .. } => ExitCode::SUCCESS,
        Command::Status { .. } => {
            match config
                .admin
                .enabled
                .then(|| config.admin.client_addr())
                .flatten()
            {
                Some(addr) => status(addr),
                None => {
                    eprintln!(
                        "[admin] is disabled in {}: there is nothing to ask (or pass --admin ADDR)",
                        cli.config.display()
                    );
                    ExitCode::from(edgegate::admin::status::EXIT_UNREACHABLE)
                }
            }
        }
    }
}

fn passwd(file: &Path, username: &str) -> ExitCode {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("Password for {username}: "));
        let second = rpassword::prompt_password("Again: ");
        match (first, second) {
            (Ok(a), Ok(b)) if a == b => a,
            (Ok(_), Ok(_)) => {
                eprintln!("the passwords differ; nothing was changed");
                return ExitCode::from(EXIT_CONFIG);
            }
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("cannot read the password: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().read_line(&mut line) {
            eprintln!("cannot read the password from stdin: {e}");
            return ExitCode::FAILURE;
        }
        line.trim_end_matches(['\n', '\r']).to_owned()
    };
    match edgegate::auth::passwd::set(file, username, password.as_bytes()) {
        Ok(existed) => {
            let verb = if existed { "updated" } else { "added" };
            eprintln!("{}: {verb} {username}", file.display());
            ExitCode::SUCCESS
        }
        Err(e @ edgegate::auth::PasswdError::Input(_)) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn dead_letters(config: &Config, limit: Option<usize>) -> ExitCode {
    let log = match config.log_config() {
        Ok(log) => log,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let dir = dead_letter::log_config(&log).dir;
    match dead_letter::print(&log, limit, std::io::stdout().lock()) {
        None => {
            eprintln!(
                "{}: no dead-letter log (nothing was ever refused)",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Some(Ok(printed)) => {
            eprintln!(
                "{} dead-lettered record(s) shown from {}",
                printed.records,
                dir.display()
            );
            if printed.unreadable > 0 {
                eprintln!(
                    "{} could not be read (see \"unreadable\")",
                    printed.unreadable
                );
            }
            ExitCode::SUCCESS
        }
        Some(Err(e)) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn status(addr: std::net::SocketAddr) -> ExitCode {
    use edgegate::admin::status;
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(status::query(addr)) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::from(summary.exit_code())
        }
        Err(e) => {
            println!("edgegate at {addr}: UNREACHABLE");
            eprintln!("{e}");
            ExitCode::from(status::EXIT_UNREACHABLE)
        }
    }
}

/// A tokio runtime with timers and I/O, or the exit code after saying why there is none.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
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
    edgegate::memory::start_giving_back();
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let (control_tx, control_rx) = mpsc::channel(4);
        let signals = tokio::spawn(handle_signals(
            path.to_owned(),
            shutdown.clone(),
            control_tx,
        ));
        let result = edgegate::run(config, shutdown, control_rx).await;
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

/// SIGTERM and SIGINT stop the gateway; SIGHUP has it load the config again and reload what
/// can be reloaded (see `edgegate::reload`).
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
            _ = hup.recv() => { let _ = control.send(Control::Reload(path.clone())).await; }
        }
    }
}
