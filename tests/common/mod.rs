//! Shared test helpers: an in-process index on a real RocksDB, in-process servers on port 0,
//! the real `allotd` binary as a child process (`daemon`), and gRPC clients (`orders` has those
//! of the Orders and Fulfilment tests).
#![allow(dead_code)]

pub mod daemon;
pub mod orders;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use allot::clock::Clock;
use allot::config::Config;
use allot::domain::Limits;
use allot::events::Feed;
use allot::index::{Index, IndexOptions};
use allot::proto::v1;
use allot::store::{self, Durability, Store, StoreOptions, WalOptions};

/// An index over a real store, without gRPC: for model tests.
pub struct Engine {
    pub index: Arc<Index>,
    pub store: Arc<Store>,
    commit_thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    pub fn open(dir: &Path, clock: Arc<dyn Clock>) -> Engine {
        Engine::open_with_queue(dir, clock, 4096)
    }

    /// `open`, with a commit queue of `queue_len_max` mutations (a small one sheds writers).
    pub fn open_with_queue(dir: &Path, clock: Arc<dyn Clock>, queue_len_max: usize) -> Engine {
        let (store, recovered) = Store::open(dir, &StoreOptions::default()).expect("open store");
        let store = Arc::new(store);
        let feed = Arc::new(Feed::new(1024, 16));
        let (wal, commit_thread) = store::wal::start(
            store.clone(),
            WalOptions {
                durability: Durability::Fsync,
                queue_len_max,
                batch_len_max: 512,
                commit_interval: std::time::Duration::ZERO,
                change_retention: 100_000,
                event_retention: 1_000_000,
                disk_guard: None,
            },
            Box::new(move |changes, _events| feed.publish(changes)),
        );
        let index = Arc::new(Index::new(
            IndexOptions {
                shard_count: 8,
                terminal_retention_ms: u64::MAX / 4,
                idempotency_retention_ms: u64::MAX / 4,
                limits: Limits::default(),
                rules: allot::routing::RoutingRules::default(),
            },
            recovered,
            wal,
            clock,
        ));
        Engine { index, store, commit_thread: Some(commit_thread) }
    }

    /// Stops the commit thread after it wrote everything queued, and closes the store.
    pub fn close(mut self) {
        self.index.wal().stop();
        if let Some(thread) = self.commit_thread.take() {
            thread.join().expect("commit thread");
        }
    }
}

/// A config for an in-process or child daemon on free ports under `dir`.
pub fn test_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    }
}

pub type InventoryClient = v1::inventory_client::InventoryClient<tonic::transport::Channel>;

pub async fn inventory_client(address: SocketAddr) -> InventoryClient {
    let endpoint = format!("http://{address}");
    for _ in 0..100 {
        if let Ok(client) = v1::inventory_client::InventoryClient::connect(endpoint.clone()).await {
            return client;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("could not connect to {endpoint}");
}

pub fn node(node_id: &str, lat: f64, lon: f64) -> v1::Node {
    v1::Node {
        node_id: node_id.into(),
        r#type: v1::node::Type::Warehouse as i32,
        location: Some(v1::Location { lat, lon }),
        enabled: true,
        can_ship: true,
        can_pickup: false,
        daily_capacity: 0,
        processing_days: 1,
        priority: 0,
        rates: Some(v1::ShippingRates { base_cost: 500, cost_per_km: 1, cost_per_unit: 10 }),
        default_safety_stock: 0,
        channels: Vec::new(),
    }
}

pub fn line(sku: &str, node_id: &str, qty: i64) -> v1::ReserveLine {
    v1::ReserveLine { sku: sku.into(), node_id: node_id.into(), qty }
}

pub fn stock(sku: &str, node_id: &str, on_hand: i64) -> v1::StockEntry {
    v1::StockEntry { sku: sku.into(), node_id: node_id.into(), on_hand, safety_stock: None }
}

/// Copies a directory tree (a backup into a new data directory).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// GET `path` over plain HTTP/1.0 and return the whole response (status line and body): the
/// metrics endpoint, std only.
pub async fn http_get(address: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .await
    .unwrap()
}
