//! Configuration: one TOML file, every key optional with a documented default, unknown keys
//! rejected by name. `validate()` reports every problem at once rather than the first.
//! Must not import anything but `domain` and `store` option types.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::Limits;
use crate::orders::OrderRules;
use crate::routing::RoutingRules;
use crate::store::Durability;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the RocksDB store lives.
    pub data_dir: PathBuf,
    /// gRPC address; port 0 picks a free port (the bound address is logged).
    pub listen: SocketAddr,
    /// Prometheus `/metrics` address, its own port.
    pub metrics_listen: SocketAddr,
    pub store: StoreConfig,
    pub index: IndexConfig,
    pub server: ServerConfig,
    pub limits: Limits,
    /// Distributed order management rules; reloaded on SIGHUP.
    pub routing: RoutingRules,
    /// Order capture: fraud holds, routing of orders, backorder retry.
    pub orders: OrderRules,
    /// Bearer tokens and their roles; none = no authentication.
    pub auth: AuthConfig,
    /// TLS and mutual TLS on the gRPC port; absent = plaintext.
    pub tls: TlsConfig,
}

/// The longest `store.commit_interval_us`: every durable write may wait this long.
pub const COMMIT_INTERVAL_US_MAX: u64 = 10_000;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// "fsync" (default: an acknowledged change survives power loss) or "buffered".
    pub durability: Durability,
    /// Mutations waiting for the commit thread; beyond this, requests are shed.
    pub commit_queue_len_max: usize,
    /// Mutations per group commit at most.
    pub commit_batch_len_max: usize,
    /// The least time from the start of one group commit to the start of the next, in µs
    /// (0, the default: none). Under load, fewer and larger commits: each device flush costs
    /// the same whatever it carries, and a host or a cloud volume may cap or charge flushes
    /// per second. A commit never waits when the last one started longer ago than this, but a
    /// lone caller sending one write after another waits for it every time (at most one write
    /// per interval), which is why it is off by default.
    pub commit_interval_us: u64,
    /// Availability changes kept for `from_sequence` resumes.
    pub change_retention: u64,
    /// Events (the audit trail and WatchEvents feed) kept on disk; older ones are trimmed.
    pub event_retention: u64,
    /// RocksDB memtable size per column family.
    pub write_buffer_bytes: usize,
    /// Size of a journal segment (the write-ahead journal in `<data_dir>/journal`); each full
    /// segment makes RocksDB flush, so it also bounds what a restart replays.
    pub journal_segment_bytes: u64,
    /// Free space the data directory's file system must keep: below it, every write is refused
    /// with RESOURCE_EXHAUSTED before anything changes (reads go on), until space returns. A
    /// write that fails anyway stops the daemon without acknowledging. 0 = no guard.
    pub disk_free_min_bytes: u64,
    /// How often the free space is measured.
    pub disk_check_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IndexConfig {
    /// Lock shards of the availability index; a power of two.
    pub shard_count: usize,
    /// How long released, expired and fulfilled reservations stay readable.
    pub terminal_reservation_retention_ms: u64,
    /// How long an idempotency key is remembered.
    pub idempotency_retention_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Requests being processed at once; beyond this, RESOURCE_EXHAUSTED.
    pub in_flight_max: usize,
    /// Open WatchAvailability streams at most.
    pub watchers_max: usize,
    /// Commit batches a watcher may fall behind before it is dropped.
    pub watch_buffer_batches: usize,
    /// Items buffered per watch stream towards the client.
    pub watch_out_len_max: usize,
    /// How often due reservations are expired.
    pub expiry_sweep_interval_ms: u64,
    /// Reservations expired per sweep at most.
    pub expiry_batch_len_max: usize,
    /// How often retention purges run.
    pub purge_interval_ms: u64,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_drain_ms: u64,
    /// How often the consistency checker runs in the background (it pauses writers for
    /// about one scan of the reservations); 0 = only on request (Admin.Check).
    pub consistency_check_interval_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            listen: "127.0.0.1:50051".parse().expect("valid address"),
            metrics_listen: "127.0.0.1:9464".parse().expect("valid address"),
            store: StoreConfig::default(),
            index: IndexConfig::default(),
            server: ServerConfig::default(),
            limits: Limits::default(),
            routing: RoutingRules::default(),
            orders: OrderRules::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            durability: Durability::Fsync,
            commit_queue_len_max: 65_536,
            commit_batch_len_max: 8_192,
            commit_interval_us: 0,
            change_retention: 1_000_000,
            event_retention: 50_000_000,
            write_buffer_bytes: 64 * 1024 * 1024,
            journal_segment_bytes: 64 * 1024 * 1024,
            disk_free_min_bytes: 256 * 1024 * 1024,
            disk_check_interval_ms: 250,
        }
    }
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            shard_count: 256,
            terminal_reservation_retention_ms: 24 * 3_600 * 1_000,
            idempotency_retention_ms: 24 * 3_600 * 1_000,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            in_flight_max: 16_384,
            watchers_max: 1_024,
            watch_buffer_batches: 4_096,
            watch_out_len_max: 1_024,
            expiry_sweep_interval_ms: 100,
            expiry_batch_len_max: 10_000,
            purge_interval_ms: 60_000,
            shutdown_drain_ms: 10_000,
            consistency_check_interval_ms: 3_600_000,
        }
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Checkout services: availability, reservations, routing and allocation, order capture.
    Checkout,
    /// Marketplace connectors: availability and its feed, order capture and the event feed.
    Connector,
    /// Warehouses and stores: their fulfilment orders, shipments, returns, stock syncs.
    Fulfilment,
    /// Operators: everything (nodes, stock, holds, stats, backup, checks, config).
    Admin,
}

/// One configured token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it (for logs; never the token).
    pub name: String,
    pub role: Role,
    /// Lower-case hex SHA-256 of the token (`allotd --hash-token` prints it).
    pub sha256: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Empty: no authentication.
    pub tokens: Vec<TokenConfig>,
}

impl AuthConfig {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut names = std::collections::HashSet::new();
        let mut digests = std::collections::HashSet::new();
        for (index, token) in self.tokens.iter().enumerate() {
            if token.name.is_empty() || !names.insert(token.name.as_str()) {
                problems.push(format!("auth.tokens[{index}].name: empty or used twice"));
            }
            if decode_digest(&token.sha256).is_none() {
                problems.push(format!("auth.tokens[{index}].sha256: not 64 lower-case hex digits"));
            } else if !digests.insert(token.sha256.as_str()) {
                problems.push(format!("auth.tokens[{index}].sha256: the same token is configured twice"));
            }
        }
        problems
    }
}

/// TLS on the gRPC port (rustls). The files are PEM and read at start-up; a missing or
/// unreadable file stops the start with its name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain; with `key_file`, turns TLS on.
    pub cert_file: Option<PathBuf>,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates for client certificates: when set, every client must present a
    /// certificate signed by one of them (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.cert_file.is_some() != self.key_file.is_some() {
            problems.push("tls.cert_file and tls.key_file go together: set both or neither".into());
        }
        if self.client_ca_file.is_some() && self.cert_file.is_none() {
            problems
                .push("tls.client_ca_file needs tls.cert_file and tls.key_file (mutual TLS is TLS)".into());
        }
        problems
    }
}

/// A token digest as configured: 64 lower-case hex digits.
pub(crate) fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)) {
        return None;
    }
    let mut digest = [0u8; 32];
    for (index, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).ok()?;
    }
    Some(digest)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text)
            .map_err(|message| ConfigError::Parse { path: path.display().to_string(), message })
    }

    /// Parses TOML; an unknown key is an error naming the key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|error| error.to_string())
    }

    /// Every problem, one line each; empty when the configuration can run.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = self.limits.problems();
        problems.extend(self.routing.problems());
        problems.extend(self.orders.problems());
        problems.extend(self.auth.problems());
        problems.extend(self.tls.problems());
        if self.store.disk_check_interval_ms == 0 {
            problems.push("store.disk_check_interval_ms must be at least 1".into());
        }
        if !self.index.shard_count.is_power_of_two() || self.index.shard_count > 65_536 {
            problems.push(format!(
                "index.shard_count {} must be a power of two up to 65536",
                self.index.shard_count
            ));
        }
        let positive = [
            ("store.commit_queue_len_max", self.store.commit_queue_len_max),
            ("store.commit_batch_len_max", self.store.commit_batch_len_max),
            ("server.in_flight_max", self.server.in_flight_max),
            ("server.watchers_max", self.server.watchers_max),
            ("server.watch_buffer_batches", self.server.watch_buffer_batches),
            ("server.watch_out_len_max", self.server.watch_out_len_max),
            ("server.expiry_batch_len_max", self.server.expiry_batch_len_max),
        ];
        for (name, value) in positive {
            if value == 0 {
                problems.push(format!("{name} must be at least 1"));
            }
        }
        if self.store.journal_segment_bytes < crate::store::journal::SEGMENT_BYTES_MIN {
            problems.push(format!(
                "store.journal_segment_bytes must be at least {}",
                crate::store::journal::SEGMENT_BYTES_MIN
            ));
        }
        if self.store.commit_interval_us > COMMIT_INTERVAL_US_MAX {
            problems.push(format!("store.commit_interval_us must be at most {COMMIT_INTERVAL_US_MAX}"));
        }
        if self.store.change_retention == 0 {
            problems.push("store.change_retention must be at least 1".into());
        }
        if self.store.event_retention < 1_000 {
            problems.push("store.event_retention must be at least 1000".into());
        }
        // Expired units must be back in ATP within a second (API.md).
        if self.server.expiry_sweep_interval_ms == 0 || self.server.expiry_sweep_interval_ms > 500 {
            problems.push("server.expiry_sweep_interval_ms must be between 1 and 500".into());
        }
        if self.server.purge_interval_ms == 0 {
            problems.push("server.purge_interval_ms must be at least 1".into());
        }
        if self.listen == self.metrics_listen && self.listen.port() != 0 {
            problems.push("listen and metrics_listen must differ".into());
        }
        problems
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        // Goal: a typo in the config is an error naming the key. Method: parse a bad key.
        let error = Config::from_toml("[store]\ndurabilty = \"fsync\"\n").unwrap_err();
        assert!(error.contains("durabilty"), "{error}");
    }

    #[test]
    fn defaults_are_valid_and_problems_are_all_listed() {
        // Goal: the embedded default runs; validate lists every problem. Method: two bad keys.
        assert_eq!(Config::default().problems(), Vec::<String>::new());
        let config = Config::from_toml("[index]\nshard_count = 3\n[server]\nin_flight_max = 0\n").unwrap();
        let problems = config.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn commit_interval_is_bounded() {
        // Goal: a commit interval beyond the maximum (every durable write would wait that
        // long) is refused by name; the maximum itself and 0 (no pacing) are accepted.
        let problems =
            |us: u64| Config::from_toml(&format!("[store]\ncommit_interval_us = {us}\n")).unwrap().problems();
        assert_eq!(problems(0), Vec::<String>::new());
        assert_eq!(problems(COMMIT_INTERVAL_US_MAX), Vec::<String>::new());
        let too_long = problems(COMMIT_INTERVAL_US_MAX + 1);
        assert!(too_long.len() == 1 && too_long[0].contains("store.commit_interval_us"), "{too_long:?}");
    }

    #[test]
    fn example_file_documents_the_defaults() {
        // Goal: deploy/allot.toml (the documented reference) is exactly the built-in default.
        // Method: parse it and compare.
        let example = Config::from_toml(include_str!("../deploy/allot.toml")).unwrap();
        assert_eq!(example, Config::default());
    }

    #[test]
    fn kubernetes_config_map_is_the_example_with_pod_addresses() {
        // Goal: the config embedded in deploy/k8s/configmap.yaml does not drift from the
        // documented defaults. Method: cut it out of the YAML block (4-space indent), parse,
        // and compare with the defaults after setting the three pod-specific settings.
        let yaml = include_str!("../deploy/k8s/configmap.yaml");
        let start = yaml.find("  allot.toml: |\n").expect("the allot.toml key") + "  allot.toml: |\n".len();
        let embedded: String = yaml[start..]
            .lines()
            .map(|line| line.strip_prefix("    ").unwrap_or(line))
            .collect::<Vec<_>>()
            .join("\n");
        let parsed = Config::from_toml(&embedded).unwrap();
        let expected = Config {
            data_dir: PathBuf::from("/var/lib/allot"),
            listen: "0.0.0.0:50051".parse().unwrap(),
            metrics_listen: "0.0.0.0:9464".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(parsed, expected);
        // Every key written out, like the example (a missing key would silently default).
        let mut example: toml::Table = include_str!("../deploy/allot.toml").parse().unwrap();
        let embedded: toml::Table = embedded.parse().unwrap();
        for (key, value) in
            [("data_dir", "/var/lib/allot"), ("listen", "0.0.0.0:50051"), ("metrics_listen", "0.0.0.0:9464")]
        {
            example.insert(key.into(), toml::Value::String(value.into()));
        }
        assert_eq!(embedded, example, "deploy/k8s/configmap.yaml lists other keys than deploy/allot.toml");
    }

    #[test]
    fn partial_file_keeps_defaults() {
        // Goal: keys left out take their defaults. Method: one key set.
        let config =
            Config::from_toml("data_dir = \"/tmp/x\"\n[store]\ndurability = \"buffered\"\n").unwrap();
        assert_eq!(config.store.durability, Durability::Buffered);
        assert_eq!(config.index, IndexConfig::default());
    }
}
