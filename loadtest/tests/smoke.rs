//! A short smoke run of the real `allot-load` binary against an in-process allotd on
//! 127.0.0.1 (a real gRPC server on a real RocksDB store): each mode and the main scenarios run
//! for about a second and must finish with zero errors. No speed is asserted here; speed is
//! measured with the release build (README "Performance").

use std::process::Command;
use std::sync::Arc;

use allot::clock::SystemClock;
use allot::config::Config;

/// Runs allot-load with `args` plus `--json` against `address`; returns the parsed report.
fn run(address: std::net::SocketAddr, args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_allot-load"))
        .args(["--addr", &address.to_string(), "--json", "--warmup-secs", "0", "--duration-secs", "1"])
        .args(args)
        .output()
        .expect("running allot-load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "allot-load {args:?} failed:\n{stderr}\n{stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mode_and_main_scenario_runs_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let running = allot::server::start(config, Arc::new(SystemClock)).await.unwrap();
    let address = running.grpc_address;
    let cases: Vec<Vec<&str>> = vec![
        vec!["--scenario", "health", "--setup", "--skus", "200", "--nodes", "3", "--concurrency", "2"],
        vec!["--scenario", "reserve", "--concurrency", "4", "--skus", "200", "--nodes", "3"],
        vec!["--scenario", "atp", "--rate", "300", "--concurrency", "4", "--skus", "200", "--nodes", "3"],
        vec![
            "--scenario",
            "reserve-batch",
            "--batch",
            "20",
            "--concurrency",
            "2",
            "--hot-skus",
            "5",
            "--skus",
            "200",
            "--nodes",
            "3",
        ],
        vec!["--scenario", "reserve-stream", "--concurrency", "4", "--skus", "200", "--nodes", "3"],
        // Two streams with four reservations in flight each; then the open loop on shared streams.
        vec![
            "--scenario",
            "reserve-stream",
            "--concurrency",
            "8",
            "--callers-per-stream",
            "4",
            "--skus",
            "200",
            "--nodes",
            "3",
        ],
        vec![
            "--scenario",
            "reserve-stream",
            "--rate",
            "500",
            "--concurrency",
            "4",
            "--callers-per-stream",
            "2",
            "--skus",
            "200",
            "--nodes",
            "3",
        ],
        vec!["--scenario", "mixed", "--concurrency", "4", "--skew", "0.99", "--skus", "200", "--nodes", "3"],
        vec!["--scenario", "checkout", "--concurrency", "2", "--skus", "200", "--nodes", "3"],
        vec!["--scenario", "order-checkout", "--concurrency", "2", "--skus", "200", "--nodes", "3"],
    ];
    for args in cases {
        let report = tokio::task::block_in_place(|| run(address, &args));
        assert_eq!(report["errors"], 0, "{args:?}: {report}");
        assert!(report["requests"].as_u64().unwrap_or(0) > 0, "{args:?}: nothing was sent: {report}");
        // The generator's own CPU in the window: a second of sending costs some.
        assert!(report["client_cpu_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{args:?}: {report}");
        assert!(report["client_cpu_us_per_request"].as_f64().unwrap_or(0.0) > 0.0, "{args:?}: {report}");
        if let Some(batch) = report.get("reserve_batch").filter(|batch| !batch.is_null()) {
            assert_eq!(batch["item_errors_by_code"], serde_json::json!({}), "{args:?}: {report}");
            assert!(batch["reservations"].as_u64().unwrap_or(0) > 0, "{args:?}: {report}");
        }
    }
    running.shutdown().await;
}
