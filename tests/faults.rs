//! Storage faults against the real `allotd` (tests/common/daemon.rs):
//! - a full disk, for real: the data directory on a small tmpfs filled by a ballast file.
//!   With the guard (`store.disk_free_min_bytes`), writes are refused with RESOURCE_EXHAUSTED
//!   before anything changes, reads go on, and writes resume when the ballast goes. Without
//!   it, the write that hits ENOSPC stops the daemon (exit 70) and nothing it did not
//!   acknowledge is claimed; everything it acknowledged is there after a restart.
//! - failed appends and fsyncs injected between append, fsync and acknowledgement, and a file
//!   system that refuses the journal's direct writes (fail points, `--features failpoints`,
//!   which the README's test command enables);
//! - a corrupt record, in a value (our CRC) and in an SST block (RocksDB's checksum): start-up
//!   refuses and names where.
//!
//! The tmpfs tests need root (CAP_SYS_ADMIN), as CI has; they say so when mount is refused.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use allot::proto::v1;
use common::daemon::Daemon;
use common::{InventoryClient, inventory_client, line, node, stock};
use tonic::Code;

const NODE: &str = "DC-1";
const SKU: &str = "SKU-1";
const MIB: u64 = 1024 * 1024;
/// Allows the daemon's guard (every 20 ms here) and a debug build to notice a change.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

/// A tmpfs of a fixed size mounted on a fresh directory; unmounted on drop.
struct SmallDisk {
    mount: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_bytes: u64) -> SmallDisk {
        let mount = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_bytes}"),
                "allot-test",
                mount.path().to_str().unwrap(),
            ])
            .output()
            .expect("running mount");
        assert!(
            output.status.success(),
            "these tests put the data directory on a small tmpfs and need root to mount it: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallDisk { mount }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount.path().join(name)
    }

    fn free_bytes(&self) -> u64 {
        let stat = rustix::fs::statvfs(self.mount.path()).unwrap();
        stat.f_bavail * stat.f_frsize
    }

    /// Writes a ballast file until `leave` bytes are free (or the disk is full, for 0).
    fn fill(&self, leave: u64) -> PathBuf {
        let path = self.path("ballast");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        let chunk = vec![0x5a_u8; 64 * 1024];
        loop {
            let free = self.free_bytes();
            if free <= leave {
                break;
            }
            let len = (free - leave).min(chunk.len() as u64) as usize;
            match file.write_all(&chunk[..len]) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(28) => break, // ENOSPC
                Err(error) => panic!("writing the ballast: {error}"),
            }
        }
        file.sync_all().ok();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.mount.path()).status();
    }
}

fn reserve_request(key: &str, qty: i64) -> v1::ReserveRequest {
    v1::ReserveRequest {
        idempotency_key: key.into(),
        lines: vec![line(SKU, NODE, qty)],
        ttl_ms: 0,
        reference: format!("ref-{key}"),
        channel: String::new(),
    }
}

async fn set_up(client: &mut InventoryClient, on_hand: i64) {
    client.upsert_nodes(v1::UpsertNodesRequest { nodes: vec![node(NODE, 52.0, 4.9)] }).await.unwrap();
    client.set_stock(v1::SetStockRequest { entries: vec![stock(SKU, NODE, on_hand)] }).await.unwrap();
}

/// (on_hand, reserved) of the one position.
async fn stock_of(client: &mut InventoryClient) -> (i64, i64) {
    let response = client
        .get_availability(v1::GetAvailabilityRequest {
            skus: vec![SKU.into()],
            channel: String::new(),
            node_ids: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let position = &response.items[0].nodes[0];
    (position.on_hand, position.reserved)
}

/// Each acknowledged reservation (id → qty) is present and HELD-or-CONFIRMED with its qty.
async fn assert_present(client: &mut InventoryClient, acknowledged: &BTreeMap<String, i64>) {
    for (id, qty) in acknowledged {
        let reservation = client
            .get_reservation(v1::GetReservationRequest { reservation_id: id.clone() })
            .await
            .unwrap_or_else(|status| panic!("acknowledged reservation {id} is gone: {status}"))
            .into_inner();
        assert_eq!(reservation.lines[0].qty, *qty, "{id}");
        assert_eq!(reservation.status, v1::reservation::Status::Held as i32, "{id}");
    }
}

fn scrape_value(scrape: &str, metric: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|line| line.starts_with(metric) && line[metric.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

fn guarded_config(free_min_bytes: u64) -> String {
    // Small memtables: the default 64 MiB would not fit the small disk.
    format!(
        "[store]\ndisk_free_min_bytes = {free_min_bytes}\ndisk_check_interval_ms = 20\n\
         write_buffer_bytes = 1048576\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_until_space_returns() {
    // Goal: below disk_free_min_bytes every write is RESOURCE_EXHAUSTED naming the disk, with
    // nothing changed, reads and health go on, the metrics say so, and writes resume once
    // space returns; everything acknowledged survives kill -9. Method: a 64 MiB tmpfs, a
    // ballast that leaves 4 MiB against a 16 MiB minimum, then the ballast removed.
    let disk = SmallDisk::mount(64 * MIB);
    let data = disk.path("data");
    let config = guarded_config(16 * MIB);
    let daemon = Daemon::start_with_config(&data, &config);
    let mut client = inventory_client(daemon.grpc_address).await;
    set_up(&mut client, 1_000).await;
    let mut acknowledged = BTreeMap::new();
    let response = client.reserve(reserve_request("before", 3)).await.unwrap().into_inner();
    acknowledged.insert(response.reservation_id, 3);

    let ballast = disk.fill(4 * MIB);
    // Writes that slip in before the guard's next measurement are ordinary acknowledged ones.
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    let refusal = loop {
        let key = format!("during-{}", acknowledged.len());
        match client.reserve(reserve_request(&key, 1)).await {
            Ok(response) => {
                acknowledged.insert(response.into_inner().reservation_id, 1);
            }
            Err(status) => break status,
        }
        assert!(Instant::now() < deadline, "writes were never refused with {} bytes free", disk.free_bytes());
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(refusal.code(), Code::ResourceExhausted, "{refusal:?}");
    assert!(refusal.message().contains("disk space low"), "{refusal:?}");
    let held: i64 = acknowledged.values().sum();

    // Every kind of write is refused, nothing changes, reads and health go on.
    let set = client.set_stock(v1::SetStockRequest { entries: vec![stock(SKU, NODE, 5)] }).await.unwrap_err();
    assert_eq!(set.code(), Code::ResourceExhausted, "{set:?}");
    let upsert = client
        .upsert_nodes(v1::UpsertNodesRequest { nodes: vec![node("DC-2", 50.0, 4.0)] })
        .await
        .unwrap_err();
    assert_eq!(upsert.code(), Code::ResourceExhausted, "{upsert:?}");
    assert_eq!(stock_of(&mut client).await, (1_000, held));
    let scrape = common::http_get(daemon.metrics_address, "/metrics").await;
    assert_eq!(scrape_value(&scrape, "allot_disk_writes_refused"), Some(1.0), "{scrape}");
    assert!(scrape_value(&scrape, "allot_disk_free_bytes").unwrap() < (16 * MIB) as f64);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", daemon.grpc_address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    // Space returns: writes resume without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + NOTICE_TIMEOUT;
    let response = loop {
        match client.reserve(reserve_request("after", 2)).await {
            Ok(response) => break response.into_inner(),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "writes did not resume with {} bytes free",
                    disk.free_bytes()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    acknowledged.insert(response.reservation_id, 2);
    let scrape = common::http_get(daemon.metrics_address, "/metrics").await;
    assert_eq!(scrape_value(&scrape, "allot_disk_writes_refused"), Some(0.0));

    daemon.kill9();
    let daemon = Daemon::start_with_config(&data, &config);
    let mut client = inventory_client(daemon.grpc_address).await;
    assert_present(&mut client, &acknowledged).await;
    assert_eq!(stock_of(&mut client).await, (1_000, acknowledged.values().sum::<i64>()));
    daemon.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_fails_stops_the_daemon_without_acknowledging() {
    // Goal: with the guard off, the write that meets a full disk stops the daemon (exit 70,
    // FATAL in the log) instead of answering OK, and every reservation it did acknowledge
    // is there after a restart with space. Method: a 32 MiB tmpfs filled to the last byte,
    // then reservations from four clients until the daemon exits.
    let disk = SmallDisk::mount(32 * MIB);
    let data = disk.path("data");
    let config = guarded_config(0);
    let mut daemon = Daemon::start_with_config(&data, &config);
    let mut client = inventory_client(daemon.grpc_address).await;
    set_up(&mut client, 1_000_000).await;
    let ballast = disk.fill(0);

    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let mut client = inventory_client(daemon.grpc_address).await;
        tasks.spawn(async move {
            let mut acknowledged = BTreeMap::new();
            let mut refused = None;
            for index in 0..200_000 {
                let request = reserve_request(&format!("w{worker}-{index}"), 1);
                match client.reserve(request).await {
                    Ok(response) => {
                        acknowledged.insert(response.into_inner().reservation_id, 1);
                    }
                    Err(status) => {
                        refused = Some(status);
                        break;
                    }
                }
            }
            (acknowledged, refused)
        });
    }
    let mut acknowledged = BTreeMap::new();
    while let Some(result) = tasks.join_next().await {
        let (mine, refused) = result.unwrap();
        let status = refused.expect("the daemon kept acknowledging writes on a full disk");
        // The connection broke: the daemon never answered these with an error of its own.
        assert!(matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Internal), "{status:?}");
        acknowledged.extend(mine);
    }
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("allotd did not stop");
    assert_eq!(status.code(), Some(70), "{}", daemon.log());
    assert!(daemon.log().contains("FATAL"), "{}", daemon.log());
    eprintln!("acknowledged {} reservations before the disk filled", acknowledged.len());

    std::fs::remove_file(&ballast).unwrap();
    let daemon = Daemon::start_with_config(&data, &config);
    let mut client = inventory_client(daemon.grpc_address).await;
    assert_present(&mut client, &acknowledged).await;
    // Unacknowledged ones may or may not have reached the disk, never more than were sent.
    let (on_hand, reserved) = stock_of(&mut client).await;
    assert_eq!(on_hand, 1_000_000);
    assert!(reserved >= acknowledged.len() as i64 && reserved <= acknowledged.len() as i64 + 4, "{reserved}");
    daemon.terminate();
}

/// The last event sequence (0 when the log is empty), read through WatchEvents.
#[cfg(feature = "failpoints")]
async fn last_event_sequence(address: std::net::SocketAddr) -> u64 {
    let mut orders = v1::orders_client::OrdersClient::connect(format!("http://{address}")).await.unwrap();
    let mut stream = orders
        .watch_events(v1::WatchEventsRequest { from_sequence: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut last = 0;
    while let Ok(Ok(Some(event))) = tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
        last = event.sequence;
    }
    last
}

/// Starts a daemon whose third commit batch meets `fail_point` (the first two: UpsertNodes
/// and SetStock), reserves once, and returns what the client saw and the stopped daemon.
#[cfg(feature = "failpoints")]
async fn reserve_into_fail_point(data: &Path, fail_point: &str) -> (tonic::Status, u64) {
    let failpoints = format!("{fail_point}=2*off->return");
    let mut daemon = Daemon::start_with_env(data, "", &[("FAILPOINTS", failpoints.as_str())]);
    let mut client = inventory_client(daemon.grpc_address).await;
    set_up(&mut client, 10).await;
    let before = last_event_sequence(daemon.grpc_address).await;
    let status = client.reserve(reserve_request("doomed", 4)).await.expect_err("acknowledged");
    let exit = daemon.wait_exit(Duration::from_secs(30)).expect("allotd did not stop");
    assert_eq!(exit.code(), Some(70), "{}", daemon.log());
    assert!(daemon.log().contains("FATAL: injected"), "{}", daemon.log());
    (status, before)
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_loses_nothing_acknowledged_and_keeps_nothing_unacknowledged() {
    // Goal: an append that fails stops the daemon before acknowledging, and the change it
    // carried is nowhere after a restart (memory never reached disk). Method: the fail point
    // before write_opt on the Reserve's batch; then restart without fail points.
    let dir = tempfile::tempdir().unwrap();
    let (status, before) = reserve_into_fail_point(dir.path(), "commit-before-write").await;
    assert_ne!(status.code(), Code::Ok);
    let daemon = Daemon::start(dir.path());
    let mut client = inventory_client(daemon.grpc_address).await;
    assert_eq!(stock_of(&mut client).await, (10, 0));
    assert_eq!(last_event_sequence(daemon.grpc_address).await, before);
    // The key was never used: it reserves afresh.
    let response = client.reserve(reserve_request("doomed", 4)).await.unwrap().into_inner();
    assert_eq!(response.status, v1::reserve_response::Status::Reserved as i32);
    assert_eq!(stock_of(&mut client).await, (10, 4));
    daemon.terminate();
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_after_the_append_is_resolved_by_replaying_the_key() {
    // Goal: a batch that reached the log but whose fsync "failed" stops the daemon
    // unacknowledged; after a restart the change is either there (then replaying its key
    // returns it, and nothing doubles) or not. Here RocksDB did write it, so it is there.
    // Method: the fail point after write_opt; restart; replay the same key.
    let dir = tempfile::tempdir().unwrap();
    let (status, before) = reserve_into_fail_point(dir.path(), "commit-after-write").await;
    assert_ne!(status.code(), Code::Ok);
    let daemon = Daemon::start(dir.path());
    let mut client = inventory_client(daemon.grpc_address).await;
    assert_eq!(stock_of(&mut client).await, (10, 4));
    assert!(last_event_sequence(daemon.grpc_address).await > before);
    let replay = client.reserve(reserve_request("doomed", 4)).await.unwrap().into_inner();
    assert_eq!(replay.status, v1::reserve_response::Status::Reserved as i32);
    assert_eq!(stock_of(&mut client).await, (10, 4), "the replay reserved twice");
    daemon.terminate();
}

/// The open flags of each of `pid`'s descriptors on a journal segment (`/proc/PID/fdinfo`).
#[cfg(feature = "failpoints")]
fn journal_descriptor_flags(pid: u32) -> Vec<u32> {
    let mut flags = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        if !target.to_string_lossy().ends_with(".jnl") {
            continue;
        }
        let fdinfo = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(info) = std::fs::read_to_string(fdinfo) else { continue };
        let octal =
            info.lines().find_map(|line| line.strip_prefix("flags:")).expect("fdinfo names the flags");
        flags.push(u32::from_str_radix(octal.trim(), 8).unwrap());
    }
    flags
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_system_that_refuses_direct_writes_gets_page_cache_writes_and_fsync() {
    // Goal: where O_DIRECT is refused (at the open, or at a direct write after some went
    // through), the journal falls back to page-cache writes made durable by fdatasync: the
    // daemon says so, keeps no direct descriptor, and every acknowledged reservation, written
    // either way, is there after kill -9. Method: fail points that return EINVAL; 60
    // reservations; kill -9; restart without fail points.
    const O_DIRECT: u32 = 0o40000;
    for (fail_point, says) in [
        ("journal-direct-open=return", "cannot write with O_DIRECT here"),
        // The first direct writes are set-up's (nodes, stock); the fifth is a reservation's.
        ("journal-direct-write=4*off->return", "direct writes were refused"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start_with_env(dir.path(), "", &[("FAILPOINTS", fail_point)]);
        let mut client = inventory_client(daemon.grpc_address).await;
        set_up(&mut client, 100).await;
        let mut acknowledged = BTreeMap::new();
        for index in 0..60 {
            let response =
                client.reserve(reserve_request(&format!("k{index}"), 1)).await.unwrap().into_inner();
            assert_eq!(response.status, v1::reserve_response::Status::Reserved as i32, "{fail_point}");
            acknowledged.insert(response.reservation_id, 1);
        }
        assert!(daemon.log().contains(says), "{fail_point}: {}", daemon.log());
        let flags = journal_descriptor_flags(daemon.pid());
        assert!(!flags.is_empty(), "{fail_point}: no journal segment open");
        assert!(flags.iter().all(|flags| flags & O_DIRECT == 0), "{fail_point}: {flags:?}");
        daemon.kill9();

        let daemon = Daemon::start(dir.path());
        let mut client = inventory_client(daemon.grpc_address).await;
        assert_present(&mut client, &acknowledged).await;
        assert_eq!(stock_of(&mut client).await, (100, 60), "{fail_point}");
        // The next start-up writes through again (no fail points): a direct descriptor.
        let flags = journal_descriptor_flags(daemon.pid());
        assert!(flags.iter().any(|flags| flags & O_DIRECT != 0), "{flags:?}");
        daemon.terminate();
    }
}

/// A data directory with one node, one position and one reservation, cleanly shut down.
async fn stopped_store(data: &Path) {
    let daemon = Daemon::start(data);
    let mut client = inventory_client(daemon.grpc_address).await;
    set_up(&mut client, 10).await;
    client.reserve(reserve_request("r", 1)).await.unwrap();
    assert!(daemon.terminate().success());
}

/// Runs allotd on `data` expecting it to refuse to start; returns its stderr.
fn refused_start(data: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_allotd"))
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env_remove("ALLOT_CONFIG")
        .env_remove("FAILPOINTS")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "allotd started on a corrupt store:\n{stderr}");
    eprintln!("allotd refused to start: {}", stderr.lines().last().unwrap_or_default());
    stderr
}

fn open_raw(data: &Path) -> rocksdb::DB {
    let names = rocksdb::DB::list_cf(&rocksdb::Options::default(), data).unwrap();
    rocksdb::DB::open_cf(&rocksdb::Options::default(), data, names).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_stops_start_up_and_names_its_key() {
    // Goal: a value whose checksum does not match is never used: start-up stops and names the
    // column family and key. Method: flip one payload byte of the position record with
    // RocksDB directly, then start.
    let dir = tempfile::tempdir().unwrap();
    stopped_store(dir.path()).await;
    {
        let db = open_raw(dir.path());
        let positions = db.cf_handle("positions").unwrap();
        let (key, value) = db.iterator_cf(&positions, rocksdb::IteratorMode::Start).next().unwrap().unwrap();
        let mut value = value.to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        db.put_cf(&positions, &key, value).unwrap();
    }
    let stderr = refused_start(dir.path());
    assert!(
        stderr.contains("corrupt record in column family positions at key")
            && stderr.contains(SKU)
            && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_file_stops_start_up_and_names_the_file() {
    // Goal: damage below our records (a flipped bit in an SST data block) is caught by
    // RocksDB's block checksums at start-up and reported with the file, never read as data.
    // Method: flush everything to table files, flip a byte in the middle of each, start.
    let dir = tempfile::tempdir().unwrap();
    stopped_store(dir.path()).await;
    {
        let db = open_raw(dir.path());
        for name in rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap() {
            db.flush_cf(&db.cf_handle(&name).unwrap()).unwrap();
        }
    }
    let mut damaged = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|extension| extension == "sst") {
            let mut bytes = std::fs::read(&path).unwrap();
            // The first data block starts at offset 0; its payload is well inside it.
            let at = 16.min(bytes.len() / 4);
            bytes[at] ^= 0xff;
            std::fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0, "no table file to damage");
    let stderr = refused_start(dir.path());
    assert!(stderr.contains("Corruption") && stderr.contains(".sst"), "{stderr}");
}
