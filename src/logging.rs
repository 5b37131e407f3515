//! Where the gateway's log lines go: the systemd journal (with fields kept as journal
//! fields) when systemd runs it, else stderr as text or JSON lines. (The durable log of
//! device messages is [`crate::buffer`]; this is the diagnostic one.)

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logs go to the journal (with fields kept as journal fields) when systemd runs us and no
/// format was asked for, else to stderr as text or JSON lines.
pub fn init(default: &str, format: Option<Format>) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let journald = if format.is_none() && stderr_is_journal() {
        tracing_journald::layer().ok()
    } else {
        None
    };
    let result = match (journald, format) {
        (Some(journald), _) => registry.with(journald).try_init(),
        (None, Some(Format::Json)) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        (None, _) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(colour_on_stderr()),
            )
            .try_init(),
    };
    if let Err(e) = result {
        eprintln!("cannot set up logging: {e}");
    }
}

/// Colours only for a person at a terminal: a file, a pipe or a log shipper gets plain
/// `key=value` text. `NO_COLOR` (no-color.org) turns them off anywhere.
fn colour_on_stderr() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// systemd sets `JOURNAL_STREAM=<device>:<inode>` for a service whose stderr is the journal;
/// comparing it with stderr itself (as sd_journal_stream_fd(3) advises) ignores a variable
/// inherited by a child whose stderr was redirected elsewhere.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    // Compared as decimal text: the integer types of `st_dev` and `st_ino` differ by target.
    rustix::fs::fstat(std::io::stderr())
        .is_ok_and(|stat| stat.st_dev.to_string() == dev && stat.st_ino.to_string() == ino)
}
