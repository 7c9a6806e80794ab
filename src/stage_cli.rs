//! Shared plumbing for stage binaries: logging, error reporting, progress bars.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Runs a stage's `main`: sets up `tracing` on stderr (`RUST_LOG`, default `info`), runs `body`,
/// and on error prints the whole error chain and exits with status 1.
pub fn main(body: impl FnOnce() -> anyhow::Result<()>) {
    restore_sigpipe();
    init_logging(false);
    if let Err(err) = body() {
        // Not eprintln!: on a full disk the log cannot take the message, and a panic would turn
        // exit status 1 into 101.
        let _ = std::io::Write::write_fmt(&mut std::io::stderr(), format_args!("error: {err:#}\n"));
        std::process::exit(1);
    }
}

/// Installs the `tracing` subscriber on stderr; `verbose` raises the default level to debug.
pub fn init_logging(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Makes a closed stdout end the process quietly, as for any Unix tool (`halo status | head -1`),
/// instead of Rust's default of ignoring SIGPIPE and panicking on the failed write.
pub fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to its default has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A progress bar over `len` items on stderr, hidden when stderr is not a terminal.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Test hook for crash recovery: when the environment variable `HALO_FAULT_<NAME>` holds
/// `count`, the process sends itself SIGKILL (no unwinding, no cleanup, exactly like being
/// killed from outside). Used by the tests of resumable stages.
pub fn fault_point(name: &str, count: usize) {
    let var = format!("HALO_FAULT_{}", name.to_uppercase());
    if std::env::var(&var).ok().and_then(|v| v.parse::<usize>().ok()) == Some(count) {
        tracing::warn!("{var}={count}: killing this process for a crash test");
        // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
