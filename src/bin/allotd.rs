//! allotd: the Allot daemon. Thin: flags, configuration, logging, run, exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use allot::clock::SystemClock;

/// mimalloc instead of glibc malloc: under load the daemon makes many small allocations on
/// many threads; with glibc, malloc was a quarter of the daemon's CPU under Allocate load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use allot::config::Config;

/// Inventory promising and order routing daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Flags {
    /// TOML configuration file (without it, the embedded defaults).
    #[arg(long, env = "ALLOT_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long, env = "ALLOT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address, HOST:PORT; port 0 picks one (overrides `listen`).
    #[arg(long, env = "ALLOT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Metrics listen address, HOST:PORT (overrides `metrics_listen`).
    #[arg(long, env = "ALLOT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Log format: text or json.
    #[arg(long, env = "ALLOT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Print the effective configuration problems (if any) and exit.
    #[arg(long)]
    check_config: bool,
    /// Read a bearer token from stdin and print its SHA-256, the form `[auth] tokens` stores
    /// (the token itself never goes into the config or the shell history).
    #[arg(long)]
    hash_token: bool,
}

fn main() -> ExitCode {
    // No transparent huge pages for this process (before the heap grows). mimalloc asks for
    // them on its arenas, and the kernel then zeroes -- and with `defrag=madvise`, first
    // compacts -- 2 MiB at once inside the page fault of whichever thread touched the memory
    // first: a tokio worker or the commit thread stalled for up to 250 ms while the
    // reservation table grew. Without them, ReserveBatch (100 per call, 4 callers) measured
    // p99.9 22-29 ms and max 44-54 ms per call instead of 69-112 ms and 86-183 ms. A kernel
    // without the prctl just keeps its default.
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("allotd: could not turn transparent huge pages off ({error}); going on");
    }
    let flags = Flags::parse();
    if flags.hash_token {
        let mut token = String::new();
        if std::io::stdin().read_line(&mut token).is_err() || token.trim().is_empty() {
            eprintln!("allotd: --hash-token reads the token from stdin (one line)");
            return ExitCode::from(2);
        }
        println!("{}", allot::api::auth::hash_token(token.trim()));
        return ExitCode::SUCCESS;
    }
    init_logging(&flags.log_format);
    // Fault-injection builds only (`--features failpoints`): fail points from the FAILPOINTS
    // environment variable, e.g. FAILPOINTS=commit-before-write=return.
    #[cfg(feature = "failpoints")]
    let _failpoints = {
        tracing::warn!(failpoints = ?std::env::var("FAILPOINTS").ok(), "built with fail points (testing only)");
        fail::FailScenario::setup()
    };
    let mut config = match &flags.config {
        Some(path) => match Config::from_file(path) {
            Ok(config) => config,
            Err(error) => {
                eprintln!("allotd: {error}");
                return ExitCode::from(2);
            }
        },
        None => Config::default(),
    };
    if let Some(data_dir) = flags.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(listen) = flags.listen {
        config.listen = listen;
    }
    if let Some(metrics_listen) = flags.metrics_listen {
        config.metrics_listen = metrics_listen;
    }
    if let Err(error) = config.validate() {
        eprintln!("allotd: {error}");
        return ExitCode::from(2);
    }
    if flags.check_config {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("allotd: starting the runtime: {error}");
            return ExitCode::from(1);
        }
    };
    let config_path = flags.config.clone();
    runtime.block_on(async move {
        // The handlers go in before the daemon starts (and says it serves): a SIGTERM or SIGHUP
        // that came between "serving" and a later installation killed the process with the
        // default action instead of a graceful shutdown (seen in a test that stops the daemon
        // right after it is ready).
        let signals = match Signals::install() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("allotd: installing the signal handlers: {error}");
                return ExitCode::from(1);
            }
        };
        let running = match allot::server::start(config, Arc::new(SystemClock)).await {
            Ok(running) => running,
            Err(error) => {
                tracing::error!(%error, "allotd could not start");
                eprintln!("allotd: {error}");
                return ExitCode::from(1);
            }
        };
        // Recovery built the state from large temporary vectors; hand the pages they used back
        // to the system now instead of keeping them in the allocator's free lists (about
        // 200 MB with 10M positions and 1M reservations).
        // SAFETY: mi_collect only walks mimalloc's own heaps; any thread may call it any time.
        unsafe { libmimalloc_sys::mi_collect(true) };
        let trigger = running.shutdown_trigger();
        let Signals { mut terminate, mut interrupt, hangup } = signals;
        tokio::spawn(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            }
            trigger.send_replace(true);
        });
        let core = running.core.clone();
        tokio::spawn(async move { reload_on_sighup(hangup, config_path, core).await });
        running.wait().await;
        ExitCode::SUCCESS
    })
}

/// SIGHUP re-reads the configuration file and applies what can change at run time (the
/// routing rules); anything else needs a restart and is left as it is.
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    config_path: Option<PathBuf>,
    core: Arc<allot::api::Core>,
) {
    while hangup.recv().await.is_some() {
        let Some(path) = &config_path else {
            tracing::info!("SIGHUP: running on the embedded defaults, nothing to reload");
            continue;
        };
        match Config::from_file(path).and_then(|config| config.validate().map(|()| config)) {
            Ok(config) => {
                core.index.set_routing_rules(config.routing);
                tracing::info!(config = %path.display(), "SIGHUP: routing rules reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "SIGHUP: configuration not reloaded, keeping the current one")
            }
        }
    }
}

/// The signals allotd handles, registered at once (tokio installs a handler when the stream
/// is created, not when it is first awaited).
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    /// SIGHUP re-reads the configuration.
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ALLOT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
