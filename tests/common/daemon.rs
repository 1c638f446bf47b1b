//! Running the real `allotd` binary as a child process (crash tests).
//!
//! The daemon listens on port 0 for gRPC and metrics; the bound addresses are read back from
//! its `allotd serving` log line on stderr. A thread keeps draining stderr for the life of the
//! child, so a chatty daemon never blocks on a full pipe, and the captured log goes into every
//! panic message this module raises. Std only: no signal crate, `kill -TERM` does SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a daemon may take to log that it serves (a debug build on a busy 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a graceful shutdown may take: the daemon's default drain (10 s) plus the flush.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a waiting helper looks at the child again.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Log lines kept for panic messages; older ones are dropped (the start-up lines stay useful).
const LOG_LINES_MAX: usize = 2_000;

/// The captured stderr lines of one child, shared with the draining thread.
type Log = Arc<Mutex<Vec<String>>>;

/// A running `allotd` child process.
pub struct Daemon {
    /// The process; `Drop` kills it if a test ends (or panics) without stopping it.
    pub child: Child,
    /// Where gRPC is served (the port the daemon picked).
    pub grpc_address: SocketAddr,
    /// Where `/metrics` is served (its own port).
    pub metrics_address: SocketAddr,
    /// The data directory, kept so a test can restart on the same state.
    pub data_dir: PathBuf,
    /// Stderr lines so far, ANSI escapes stripped: for failure messages.
    log: Log,
}

impl Daemon {
    /// Starts `allotd` on `data_dir` with free ports and waits until it logs that it serves.
    /// Panics with the captured log if it exits or is not ready within `READY_TIMEOUT`.
    pub fn start(data_dir: &Path) -> Daemon {
        Daemon::spawn(data_dir, None)
    }

    /// Like `start`, with `config_toml` as the daemon's configuration file (`--config`). The
    /// file is written into `data_dir` as `allotd-test.toml` (RocksDB leaves files it does not
    /// know alone), so a restart with the same text finds the same configuration; the flags
    /// still set the data directory and the ports.
    pub fn start_with_config(data_dir: &Path, config_toml: &str) -> Daemon {
        Daemon::start_with_env(data_dir, config_toml, &[])
    }

    /// Like `start_with_config`, with extra environment variables (e.g. FAILPOINTS).
    pub fn start_with_env(data_dir: &Path, config_toml: &str, env: &[(&str, &str)]) -> Daemon {
        std::fs::create_dir_all(data_dir).expect("creating the data directory");
        let config_path = data_dir.join("allotd-test.toml");
        std::fs::write(&config_path, config_toml).expect("writing the test configuration");
        Daemon::spawn_with(data_dir, Some(&config_path), env)
    }

    fn spawn(data_dir: &Path, config_path: Option<&Path>) -> Daemon {
        Daemon::spawn_with(data_dir, config_path, &[])
    }

    fn spawn_with(data_dir: &Path, config_path: Option<&Path>, env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(env!("CARGO_BIN_EXE_allotd"));
        command.env_remove("FAILPOINTS");
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(config_path) = config_path {
            command.arg("--config").arg(config_path);
        }
        let mut child = command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .env("ALLOT_LOG", "info")
            // A developer's environment must not change what the test runs or how it logs.
            .env_remove("ALLOT_CONFIG")
            .env_remove("ALLOT_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning allotd");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let (ready_sender, ready_receiver) = mpsc::channel::<(SocketAddr, SocketAddr)>();
        {
            let log = log.clone();
            std::thread::Builder::new()
                .name("allotd-stderr".into())
                .spawn(move || drain_stderr(stderr, &log, ready_sender))
                .expect("spawning the stderr thread");
        }
        let started = Instant::now();
        let (grpc_address, metrics_address) = match ready_receiver.recv_timeout(READY_TIMEOUT) {
            Ok(addresses) => addresses,
            Err(error) => {
                let waited = started.elapsed();
                let _ = child.kill();
                let status = child.wait();
                // The thread has seen EOF (or will shortly): give it a moment to record the tail.
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "allotd on {} did not report `allotd serving` ({error:?} after {waited:?}; exit: \
                     {status:?}); its log:\n{}",
                    data_dir.display(),
                    join_log(&log)
                );
            }
        };
        Daemon { child, grpc_address, metrics_address, data_dir: data_dir.to_path_buf(), log }
    }

    /// The process id, e.g. for logging.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn log(&self) -> String {
        join_log(&self.log)
    }

    /// SIGKILL (`kill -9`): no shutdown code runs. Returns once the process is gone. Panics
    /// with the log if the daemon had already exited on its own (a crash the test must see).
    pub fn kill9(mut self) {
        self.assert_running("kill -9");
        self.child.kill().expect("sending SIGKILL to allotd");
        self.child.wait().expect("waiting for the killed allotd");
    }

    /// SIGTERM, then waits for the exit (graceful shutdown); panics with the log on timeout.
    pub fn terminate(mut self) -> ExitStatus {
        self.assert_running("SIGTERM");
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("running kill -TERM");
        assert!(sent.success(), "kill -TERM {pid} failed: {sent}");
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling allotd") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "allotd (pid {pid}) did not exit within {TERMINATE_TIMEOUT:?} of SIGTERM; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits for the daemon to exit on its own (a fatal error); None if it still runs after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling allotd") {
                // The draining thread may still be recording the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn assert_running(&mut self, before: &str) {
        if let Some(status) = self.child.try_wait().expect("polling allotd") {
            // The thread may still be recording the last lines.
            std::thread::sleep(Duration::from_millis(100));
            panic!("allotd exited on its own ({status}) before {before}; its log:\n{}", self.log());
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test must not leave a daemon holding the data directory's lock.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads stderr to EOF: records every line, and reports the addresses of the serving line once.
fn drain_stderr(stderr: std::process::ChildStderr, log: &Log, ready: mpsc::Sender<(SocketAddr, SocketAddr)>) {
    let mut ready = Some(ready);
    let mut reader = BufReader::new(stderr);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = strip_ansi(&String::from_utf8_lossy(&raw)).trim_end().to_string();
        if ready.is_some()
            && line.contains("allotd serving")
            && let Some(addresses) = serving_addresses(&line)
            && let Some(sender) = ready.take()
        {
            let _ = sender.send(addresses);
        }
        let mut lines = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if lines.len() >= LOG_LINES_MAX {
            lines.remove(0);
        }
        lines.push(line);
    }
}

/// `grpc=127.0.0.1:PORT` and `metrics=http://127.0.0.1:PORT/metrics` from the serving line.
fn serving_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let field = |name: &str| -> Option<&str> {
        let start = line.find(name)? + name.len();
        let rest = &line[start..];
        let end = rest.find(|c: char| c.is_whitespace() || c == '"' || c == ',').unwrap_or(rest.len());
        Some(&rest[..end])
    };
    let grpc = field("grpc=")?.parse().ok()?;
    let metrics = field("metrics=")?;
    let metrics = metrics.strip_prefix("http://").unwrap_or(metrics);
    let metrics = metrics.split('/').next()?.parse().ok()?;
    Some((grpc, metrics))
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final` and two-byte `ESC x`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // CSI: parameters and intermediates, then one final byte in '@'..='~'. Any other
        // escape is two characters, both dropped.
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

fn join_log(log: &Log) -> String {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).join("\n")
}
