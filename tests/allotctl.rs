//! End-to-end tests of the `allotctl` binary against a real `allotd` child process
//! (`common::daemon`): file imports with bad rows, queries, reservations, backup and restore,
//! `--json` output, and the exit codes scripts rely on (0 ok, 1 daemon error, 2 usage or bad
//! input, 3 unreachable, 4 partial import, 5 INSUFFICIENT). Expected values are checked
//! through the daemon's own gRPC API (GetAvailability), never through allotctl alone.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use allot::proto::v1;
use common::daemon::Daemon;
use serde_json::Value;

/// Exit codes documented in `allotctl --help`.
const EXIT_OK: i32 = 0;
const EXIT_DAEMON_ERROR: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_UNREACHABLE: i32 = 3;
const EXIT_PARTIAL: i32 = 4;
const EXIT_INSUFFICIENT: i32 = 5;

/// SKUs per GetAvailability request in the checks (the daemon's default limit).
const SKUS_PER_QUERY: usize = 1_000;
/// The node ids every test imports.
const NODE_IDS: [&str; 4] = ["N0", "N1", "N2", "N3"];

// ----- helpers -------------------------------------------------------------------------------

/// One finished allotctl run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|error| panic!("stdout is not one JSON document ({error}):\n{}", self.describe()))
    }

    fn describe(&self) -> String {
        format!("exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }

    fn expect(self, code: i32) -> Run {
        assert_eq!(self.code, code, "unexpected exit code:\n{}", self.describe());
        self
    }
}

/// Runs allotctl with `--addr address` (when given) in `cwd`, with no ALLOT_* variables of the
/// developer's environment leaking in.
fn allotctl_in(cwd: Option<&Path>, address: Option<SocketAddr>, args: &[&str]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_allotctl"));
    if let Some(address) = address {
        command.arg("--addr").arg(address.to_string());
    }
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let output = command
        .args(args)
        .env_remove("ALLOT_ADDR")
        .env_remove("ALLOT_TIMEOUT_MS")
        .env_remove("ALLOT_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("running allotctl");
    Run {
        // A signal death has no code: -1 fails every expectation with the output shown.
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn allotctl(daemon: &Daemon, args: &[&str]) -> Run {
    allotctl_in(None, Some(daemon.grpc_address), args)
}

/// The line numbers of every `line N: ...` report on stderr.
fn reported_lines(stderr: &str) -> BTreeSet<u64> {
    stderr
        .lines()
        .filter_map(|line| line.strip_prefix("line "))
        .map(|rest| rest.split(':').next().unwrap().parse().expect("a line number"))
        .collect()
}

/// GetAvailability of every SKU, straight from the daemon's API.
fn availability(address: SocketAddr, skus: &[String]) -> Vec<v1::AvailabilityItem> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = common::inventory_client(address).await;
        let mut items = Vec::with_capacity(skus.len());
        for chunk in skus.chunks(SKUS_PER_QUERY) {
            let request = v1::GetAvailabilityRequest { skus: chunk.to_vec(), ..Default::default() };
            items.extend(client.get_availability(request).await.expect("GetAvailability").into_inner().items);
        }
        items
    })
}

/// (sku, node) → (on_hand, reserved, safety_stock) of every position of these SKUs.
fn positions(address: SocketAddr, skus: &[String]) -> BTreeMap<(String, String), (i64, i64, i64)> {
    availability(address, skus)
        .into_iter()
        .flat_map(|item| {
            let sku = item.sku;
            item.nodes.into_iter().map(move |position| {
                (
                    (sku.clone(), position.node_id),
                    (position.on_hand, position.reserved, position.safety_stock),
                )
            })
        })
        .collect()
}

/// A node CSV with `NODE_IDS`, exercising defaults (no enabled/can_ship columns).
fn write_nodes_csv(path: &Path) {
    let mut text = String::from("node_id,type,lat,lon,base_cost,cost_per_km,cost_per_unit,channels\n");
    for (index, node_id) in NODE_IDS.iter().enumerate() {
        writeln!(text, "{node_id},WAREHOUSE,{}.5,-7{index}.0,500,1,10,", 40 + index).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A TCP port nothing listens on (bound, then released).
fn closed_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

// ----- tests ---------------------------------------------------------------------------------

#[test]
fn stock_import_of_100k_rows_reports_bad_lines_and_stores_every_good_row() {
    // Goal: a 100,000-row stock CSV with bad rows of every kind (client-side and daemon-side)
    // imports every good row, reports exactly the bad lines, and exits 4; atp, reserve and
    // release then work on it. Method: generate the file with an expected model, import it
    // with allotctl --json, compare every position with GetAvailability, then drive atp,
    // reserve, reservation show/release through allotctl and check the positions again.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"));
    write_nodes_csv(&dir.path().join("nodes.csv"));
    let nodes = allotctl(&daemon, &["nodes", "import", dir.path().join("nodes.csv").to_str().unwrap()]);
    nodes.expect(EXIT_OK);

    const ROWS: usize = 100_000;
    let sku = |row: usize| format!("SKU-{:05}", row / NODE_IDS.len());
    let mut text = String::with_capacity(ROWS * 24);
    text.push_str("sku,node_id,on_hand,safety_stock\n");
    let mut expected: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
    let mut bad_lines = BTreeSet::new();
    for row in 0..ROWS {
        // Line 1 is the header.
        let line = row as u64 + 2;
        let node_id = NODE_IDS[row % NODE_IDS.len()];
        let bad = match row {
            10 => Some(format!("SKU BAD,{node_id},5,")),
            5_003 => Some(format!("{},{node_id},abc,", sku(row))),
            20_000 => Some(format!("{},{node_id},-4,", sku(row))),
            33_333 => Some(format!("{},N9,4,", sku(row))),
            50_001 => Some(format!("{},{node_id}", sku(row))),
            60_000 => Some(format!("{},{node_id},1,", "S".repeat(129))),
            // Above the daemon's quantity_max: only the daemon can tell (two in one batch).
            77_777 | 77_780 => Some(format!("{},{node_id},2000000000000,", sku(row))),
            99_999 => Some(format!("{},{node_id},1,0,extra", sku(row))),
            _ => None,
        };
        if let Some(bad) = bad {
            text.push_str(&bad);
            text.push('\n');
            bad_lines.insert(line);
            continue;
        }
        // Row 1,000 repeats the key of row 999 in the same batch: the batch is flushed early
        // and the later row wins.
        let (sku, node_id) = if row == 1_000 { (sku(999), NODE_IDS[999 % 4]) } else { (sku(row), node_id) };
        let on_hand = (row % 97) as i64 + if row == 1_000 { 700 } else { 0 };
        let safety_stock = if row % 10 == 0 { Some(1) } else { None };
        match safety_stock {
            Some(safety) => writeln!(text, "{sku},{node_id},{on_hand},{safety}").unwrap(),
            None => writeln!(text, "{sku},{node_id},{on_hand},").unwrap(),
        }
        expected.insert((sku, node_id.to_string()), (on_hand, 0, safety_stock.unwrap_or(0)));
    }
    let csv_path = dir.path().join("stock.csv");
    std::fs::write(&csv_path, text).unwrap();

    let import =
        allotctl(&daemon, &["--json", "stock", "import", csv_path.to_str().unwrap()]).expect(EXIT_PARTIAL);
    assert_eq!(
        reported_lines(&import.stderr),
        bad_lines,
        "stderr must report exactly the bad lines:\n{}",
        import.stderr
    );
    for line in [77_779, 77_782] {
        assert!(
            import.stderr.contains(&format!("line {line}: on_hand: 2000000000000 is above the limit")),
            "the daemon's rejection is mapped back to line {line}:\n{}",
            import.stderr
        );
    }
    let summary = import.json();
    assert_eq!(summary["rows"], ROWS as u64);
    assert_eq!(summary["rejected"], bad_lines.len() as u64);
    assert_eq!(summary["stored"], (ROWS - bad_lines.len()) as u64);
    let rejected_lines: BTreeSet<u64> = summary["rejected_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["line"].as_u64().unwrap())
        .collect();
    assert_eq!(rejected_lines, bad_lines);

    // Every good row is there, with nothing else: the bad rows' keys have no position.
    let skus: Vec<String> = (0..ROWS / NODE_IDS.len()).map(|index| format!("SKU-{index:05}")).collect();
    let stored = positions(daemon.grpc_address, &skus);
    assert_eq!(stored.len(), expected.len(), "positions stored vs good rows");
    assert!(stored == expected, "the daemon's positions differ from the file's good rows");

    // atp through allotctl agrees with the daemon.
    // SKU-00250 lost its N0 row to the duplicate of row 1,000: three positions.
    let atp = allotctl(&daemon, &["--json", "atp", "SKU-00001", "SKU-00250"]).expect(EXIT_OK).json();
    let items = atp["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    for item in items {
        let sku = item["sku"].as_str().unwrap();
        let total: i64 = expected
            .iter()
            .filter(|((key_sku, _), _)| key_sku == sku)
            .map(|(_, (on_hand, _, safety))| (on_hand - safety).max(0))
            .sum();
        let node_count = expected.keys().filter(|(key_sku, _)| key_sku == sku).count();
        assert_eq!(item["total_atp"], total, "total_atp of {sku}");
        assert_eq!(item["nodes"].as_array().unwrap().len(), node_count, "positions of {sku}");
    }

    // Reserve, show, release.
    let reserved = allotctl(
        &daemon,
        &["--json", "reserve", "--key", "cart-1", "--ttl-ms", "3600000", "SKU-00001:N1:2", "SKU-00003:N2:1"],
    )
    .expect(EXIT_OK)
    .json();
    assert_eq!(reserved["status"], "RESERVED");
    assert!(reserved["expires_at"].is_string(), "a TTL reservation has expires_at: {reserved}");
    let reservation_id = reserved["reservation_id"].as_str().unwrap().to_string();
    let held = positions(daemon.grpc_address, &["SKU-00001".to_string()]);
    assert_eq!(held[&("SKU-00001".to_string(), "N1".to_string())].1, 2, "2 units reserved");

    let shown = allotctl(&daemon, &["--json", "reservation", "show", &reservation_id]).expect(EXIT_OK).json();
    assert_eq!(shown["status"], "HELD");
    assert_eq!(shown["lines"].as_array().unwrap().len(), 2);
    let released =
        allotctl(&daemon, &["--json", "reservation", "release", &reservation_id]).expect(EXIT_OK).json();
    assert_eq!(released["status"], "RELEASED");
    let after = positions(daemon.grpc_address, &["SKU-00001".to_string(), "SKU-00003".to_string()]);
    assert!(after.values().all(|&(_, reserved, _)| reserved == 0), "release returned every unit: {after:?}");

    // More than exists: INSUFFICIENT is exit 5 with the shortfall, and holds nothing.
    let short =
        allotctl(&daemon, &["--json", "reserve", "--key", "cart-2", "--ttl-ms", "0", "SKU-00001:N1:100000"])
            .expect(EXIT_INSUFFICIENT)
            .json();
    assert_eq!(short["status"], "INSUFFICIENT");
    assert_eq!(short["shortfalls"][0]["requested"], 100_000);
}

#[test]
fn backup_then_restore_on_a_second_daemon_serves_identical_availability() {
    // Goal: `allotctl backup` with a relative DIR writes a complete data directory; a second
    // daemon started on a copy of it answers exactly like the first, reservations included.
    // Method: import JSON nodes and 20,000 stock rows, hold one reservation, release another,
    // adjust one position; back up; start allotd on a copy; compare GetAvailability of every
    // SKU on both daemons, the reservations, and the tail of the event feed.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"));
    let nodes: Vec<Value> = NODE_IDS
        .iter()
        .enumerate()
        .map(|(index, node_id)| {
            serde_json::json!({
                "node_id": node_id,
                "type": if index == 3 { "STORE" } else { "WAREHOUSE" },
                "location": { "lat": 40.0 + index as f64, "lon": -74.0 },
                "default_safety_stock": index,
                "rates": { "base_cost": 500, "cost_per_km": 1, "cost_per_unit": 10 },
            })
        })
        .collect();
    std::fs::write(dir.path().join("nodes.json"), serde_json::to_string_pretty(&nodes).unwrap()).unwrap();
    allotctl(&daemon, &["nodes", "import", dir.path().join("nodes.json").to_str().unwrap()]).expect(EXIT_OK);

    const SKU_COUNT: usize = 5_000;
    let skus: Vec<String> = (0..SKU_COUNT).map(|index| format!("B-{index:04}")).collect();
    let mut text = String::from("sku,node_id,on_hand\n");
    for (index, sku) in skus.iter().enumerate() {
        for node_id in NODE_IDS {
            writeln!(text, "{sku},{node_id},{}", 10 + index % 13).unwrap();
        }
    }
    std::fs::write(dir.path().join("stock.csv"), text).unwrap();
    allotctl(&daemon, &["stock", "import", dir.path().join("stock.csv").to_str().unwrap()]).expect(EXIT_OK);

    let held = allotctl(
        &daemon,
        &["--json", "reserve", "--key", "keep", "--ttl-ms", "0", "B-0001:N0:3", "B-0002:N3:2"],
    )
    .expect(EXIT_OK)
    .json();
    let held_id = held["reservation_id"].as_str().unwrap().to_string();
    let gone = allotctl(&daemon, &["--json", "reserve", "--key", "drop", "--ttl-ms", "0", "B-0003:N1:4"])
        .expect(EXIT_OK)
        .json();
    let gone_id = gone["reservation_id"].as_str().unwrap().to_string();
    allotctl(&daemon, &["reservation", "release", &gone_id]).expect(EXIT_OK);
    let adjusted = allotctl(
        &daemon,
        &[
            "--json",
            "stock",
            "adjust",
            "--adjustment-id",
            "damage-1",
            "B-0004",
            "N2",
            "-5",
            "--reason",
            "damaged",
        ],
    )
    .expect(EXIT_OK)
    .json();
    assert_eq!(adjusted["positions"][0]["on_hand"], 10 + 4 - 5);

    // A relative DIR is resolved against allotctl's working directory, not the daemon's.
    let backup = allotctl_in(Some(dir.path()), Some(daemon.grpc_address), &["--json", "backup", "backup-1"])
        .expect(EXIT_OK)
        .json();
    let backup_dir = dir.path().join("backup-1");
    assert_eq!(backup["dir"], backup_dir.to_str().unwrap());
    assert!(backup["files"].as_u64().unwrap() > 0, "{backup}");
    assert!(backup_dir.join("CURRENT").exists(), "the backup is a RocksDB directory");
    let last_event_sequence = backup["last_event_sequence"].as_u64().unwrap();
    assert!(last_event_sequence >= (SKU_COUNT * NODE_IDS.len()) as u64, "{backup}");
    // Backing up into the same directory again is refused, naming the problem.
    let again = allotctl_in(Some(dir.path()), Some(daemon.grpc_address), &["backup", "backup-1"])
        .expect(EXIT_DAEMON_ERROR);
    assert!(again.stderr.contains("INVALID_ARGUMENT"), "{}", again.describe());

    let restored_dir = dir.path().join("restored");
    common::copy_dir(&backup_dir, &restored_dir);
    let restored = Daemon::start(&restored_dir);

    let before = availability(daemon.grpc_address, &skus);
    let after = availability(restored.grpc_address, &skus);
    assert_eq!(before.len(), SKU_COUNT);
    assert!(before == after, "the restored daemon's availability differs from the original's");
    let sample: Vec<String> =
        ["B-0001", "B-0002", "B-0003", "B-0004"].iter().map(|sku| sku.to_string()).collect();
    let sample_positions = positions(restored.grpc_address, &sample);
    assert_eq!(sample_positions[&("B-0001".into(), "N0".into())].1, 3, "the held reservation is restored");
    assert_eq!(sample_positions[&("B-0002".into(), "N3".into())].1, 2);
    assert_eq!(sample_positions[&("B-0003".into(), "N1".into())].1, 0, "the released one stays released");
    assert_eq!(sample_positions[&("B-0004".into(), "N2".into())].0, 9, "the adjustment is restored");

    let held_after = allotctl(&restored, &["--json", "reservation", "show", &held_id]).expect(EXIT_OK).json();
    assert_eq!(held_after["status"], "HELD");
    let gone_after = allotctl(&restored, &["--json", "reservation", "show", &gone_id]).expect(EXIT_OK).json();
    assert_eq!(gone_after["status"], "RELEASED");

    // The event log ends at the backup's last sequence on both daemons, with the same events.
    let from = (last_event_sequence - 4).to_string();
    let tail = |daemon: &Daemon| {
        allotctl(daemon, &["--json", "events", "tail", "--from", &from, "--idle-ms", "2000"])
            .expect(EXIT_OK)
            .stdout
    };
    let (original_tail, restored_tail) = (tail(&daemon), tail(&restored));
    assert_eq!(original_tail, restored_tail);
    let sequences: Vec<u64> = restored_tail
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(sequences, (last_event_sequence - 4..=last_event_sequence).collect::<Vec<_>>());
}

#[test]
fn usage_errors_and_bad_input_files_exit_2_before_connecting() {
    // Goal: bad arguments and unusable input files are exit 2, and are found before any
    // connection (so even with no daemon listening the code is 2, not 3). Method: run each
    // against an address nothing listens on.
    let dir = tempfile::tempdir().unwrap();
    let nowhere = Some(closed_address());
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let bad_header = write("bad-header.csv", "sku,node,on_hand\nA,N0,1\n");
    let no_header = write("no-header.csv", "A,N0,1\n");
    let empty = write("empty.csv", "");
    let nodes_txt = write("nodes.txt", "node_id,lat,lon\nN0,1,2\n");
    let nodes_not_array = write("nodes.json", "{\"node_id\": \"N0\"}");
    let missing = dir.path().join("missing.csv").to_str().unwrap().to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["frobnicate"],
        vec!["atp"],
        vec!["atp", "SKU WITH SPACE"],
        vec!["reserve", "--key", "k", "--ttl-ms", "0", "SKU-1:N0"],
        vec!["reserve", "--key", "k", "--ttl-ms", "0", "SKU-1:N0:0"],
        vec!["reserve", "--ttl-ms", "0", "SKU-1:N0:1"],
        vec!["stock", "adjust", "--adjustment-id", "a", "SKU-1", "N0", "0"],
        vec!["stock", "import", &missing],
        vec!["stock", "import", &bad_header],
        vec!["stock", "import", &no_header],
        vec!["stock", "import", &empty],
        vec!["stock", "import", "--batch-size", "20000", &bad_header],
        vec!["nodes", "import", &nodes_txt],
        vec!["nodes", "import", &nodes_not_array],
        vec!["order", "list", "--status", "NOPE"],
    ];
    for args in cases {
        let run = allotctl_in(None, nowhere, &args);
        assert_eq!(run.code, EXIT_USAGE, "allotctl {args:?}:\n{}", run.describe());
    }
    // An address that is not one.
    let run = allotctl_in(None, None, &["--addr", "http://[::1", "health"]);
    assert_eq!(run.code, EXIT_USAGE, "{}", run.describe());
    // --help is not an error.
    allotctl_in(None, None, &["stock", "import", "--help"]).expect(EXIT_OK);
}

#[test]
fn unreachable_daemon_exits_3() {
    // Goal: no daemon at the address is exit 3, with a JSON error document under --json.
    // Method: point allotctl at a port nothing listens on.
    let nowhere = Some(closed_address());
    for args in [vec!["health"], vec!["atp", "SKU-1"], vec!["nodes", "list"]] {
        let run = allotctl_in(None, nowhere, &args);
        assert_eq!(run.code, EXIT_UNREACHABLE, "allotctl {args:?}:\n{}", run.describe());
        assert!(run.stderr.contains("cannot connect"), "{}", run.describe());
    }
    let run = allotctl_in(None, nowhere, &["--json", "health"]);
    assert_eq!(run.code, EXIT_UNREACHABLE);
    assert_eq!(run.json()["error"]["code"], "CONNECT");
}

#[test]
fn json_output_of_every_command_parses_and_daemon_errors_exit_1() {
    // Goal: with --json every command prints one parseable JSON document (events tail: one
    // object per line), and a daemon error is exit 1 with its code in the error document.
    // Method: a fresh daemon, a little data, each command once, parsed with serde_json.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"));
    write_nodes_csv(&dir.path().join("nodes.csv"));
    let imported =
        allotctl(&daemon, &["--json", "nodes", "import", dir.path().join("nodes.csv").to_str().unwrap()])
            .expect(EXIT_OK)
            .json();
    assert_eq!(imported["stored"], NODE_IDS.len());

    let listed = allotctl(&daemon, &["--json", "nodes", "list"]).expect(EXIT_OK).json();
    let listed = listed["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), NODE_IDS.len());
    assert_eq!(listed[0]["node_id"], "N0");
    assert_eq!(listed[0]["type"], "WAREHOUSE");
    assert_eq!(listed[0]["enabled"], true, "a missing enabled column defaults to true");
    assert_eq!(listed[0]["can_ship"], true);
    assert_eq!(listed[0]["rates"]["base_cost"], 500);

    // A receipt on a new position, then a shrinkage.
    let adjusted =
        allotctl(&daemon, &["--json", "stock", "adjust", "--adjustment-id", "po-1", "J-1", "N0", "12"])
            .expect(EXIT_OK)
            .json();
    assert_eq!(adjusted["positions"][0]["on_hand"], 12);
    allotctl(&daemon, &["--json", "stock", "adjust", "--adjustment-id", "dmg-1", "J-1", "N0", "-2"])
        .expect(EXIT_OK);
    let atp = allotctl(&daemon, &["--json", "atp", "J-1", "UNKNOWN-SKU"]).expect(EXIT_OK).json();
    assert_eq!(atp["items"][0]["total_atp"], 10);
    assert_eq!(atp["items"][1]["total_atp"], 0);
    assert_eq!(atp["items"][1]["nodes"].as_array().unwrap().len(), 0);

    let health = allotctl(&daemon, &["--json", "health"]).expect(EXIT_OK).json();
    assert_eq!(health["status"], "SERVING");
    let stats = allotctl(&daemon, &["--json", "stats"]).expect(EXIT_OK).json();
    assert_eq!(stats["orders_total"], 0);
    let orders = allotctl(&daemon, &["--json", "order", "list"]).expect(EXIT_OK).json();
    assert_eq!(orders["orders"].as_array().unwrap().len(), 0);

    let events = allotctl(&daemon, &["--json", "events", "tail", "--idle-ms", "2000"]).expect(EXIT_OK);
    let events: Vec<Value> = events.stdout.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(events.len(), 2, "one event per adjustment: {events:?}");
    assert_eq!(events[0]["type"], "stock.adjusted");
    assert_eq!(events[1]["sequence"], events[0]["sequence"].as_u64().unwrap() + 1);
    let limited = allotctl(&daemon, &["--json", "events", "tail", "--limit", "1"]).expect(EXIT_OK);
    assert_eq!(limited.stdout.lines().count(), 1);

    // Daemon errors: exit 1, the code on stderr and in the JSON document.
    let unknown =
        allotctl(&daemon, &["--json", "reservation", "show", "rsv-999999"]).expect(EXIT_DAEMON_ERROR);
    assert_eq!(unknown.json()["error"]["code"], "NOT_FOUND");
    assert!(unknown.stderr.contains("NOT_FOUND"), "{}", unknown.describe());
    let no_order = allotctl(&daemon, &["order", "show", "ord-424242"]).expect(EXIT_DAEMON_ERROR);
    assert!(no_order.stderr.contains("NOT_FOUND"), "{}", no_order.describe());
    // Removing more than is on hand is refused whole.
    let too_much =
        allotctl(&daemon, &["--json", "stock", "adjust", "--adjustment-id", "dmg-2", "J-1", "N0", "-50"])
            .expect(EXIT_DAEMON_ERROR);
    assert_eq!(too_much.json()["error"]["code"], "FAILED_PRECONDITION");

    // The human tables print too (a smoke check of the renderer).
    let table = allotctl(&daemon, &["atp", "J-1"]).expect(EXIT_OK);
    assert!(table.stdout.starts_with("SKU"), "{}", table.describe());
    assert!(table.stdout.contains("(total)"), "{}", table.describe());
}

#[test]
fn check_reports_a_consistent_daemon_with_exit_0() {
    // Goal: `allotctl check` runs the daemon's consistency checker: exit 0 and clean after
    // ordinary traffic, in text and --json. (Drift detection itself is tested in
    // tests/admin.rs, where a record is tampered with offline.) Method: import, reserve,
    // release, then check.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"));
    let nodes = dir.path().join("nodes.csv");
    write_nodes_csv(&nodes);
    allotctl(&daemon, &["nodes", "import", nodes.to_str().unwrap()]).expect(EXIT_OK);
    let stock = dir.path().join("stock.csv");
    std::fs::write(&stock, "sku,node_id,on_hand\nSKU-1,N0,10\nSKU-2,N1,5\n").unwrap();
    allotctl(&daemon, &["stock", "import", stock.to_str().unwrap()]).expect(EXIT_OK);
    allotctl(&daemon, &["reserve", "--key", "check-1", "--ttl-ms", "60000", "SKU-1:N0:3"]).expect(EXIT_OK);
    let text = allotctl(&daemon, &["check"]).expect(EXIT_OK);
    assert!(text.stdout.contains("clean") && text.stdout.contains("true"), "{}", text.describe());
    let json = allotctl(&daemon, &["--json", "check"]).expect(EXIT_OK).json();
    assert_eq!(json["clean"], true);
    assert_eq!(json["positions_checked"], 2);
    assert_eq!(json["drift_count"], 0);
}
