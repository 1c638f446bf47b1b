//! Admin service: online backup (a RocksDB checkpoint) and restore by starting on it.

mod common;

use std::sync::Arc;

use allot::clock::SystemClock;
use allot::proto::v1;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_is_consistent_and_restores_into_a_second_daemon() {
    // Goal: Backup writes a complete data directory while the daemon serves; a daemon started
    // on it answers like the original (stock, reservations, orders, events); bad directories
    // are INVALID_ARGUMENT and write nothing. Method: state through the API, a backup, more
    // writes after it (absent from the copy), then a second in-process daemon on the backup.
    let dir = tempfile::tempdir().unwrap();
    let running = allot::server::start(common::test_config(&dir.path().join("data")), Arc::new(SystemClock))
        .await
        .unwrap();
    let endpoint = format!("http://{}", running.grpc_address);
    let mut inventory = common::inventory_client(running.grpc_address).await;
    let mut admin = v1::admin_client::AdminClient::connect(endpoint.clone()).await.unwrap();
    let mut orders = v1::orders_client::OrdersClient::connect(endpoint).await.unwrap();
    inventory
        .upsert_nodes(v1::UpsertNodesRequest { nodes: vec![common::node("DC-1", 40.0, -74.0)] })
        .await
        .unwrap();
    let entries =
        (0..500).map(|index| common::stock(&format!("SKU-{index:03}"), "DC-1", 10 + index)).collect();
    inventory.set_stock(v1::SetStockRequest { entries }).await.unwrap();
    let held = inventory.reserve(at_dc1("backup-hold", "SKU-001", 3, 0)).await.unwrap().into_inner();
    let order = orders
        .capture_order(v1::CaptureOrderRequest {
            channel: "web".into(),
            external_order_id: "backup-order".into(),
            ship_to: Some(v1::Address {
                line1: "1 Main St".into(),
                city: "Newark".into(),
                postal_code: "07102".into(),
                country: "US".into(),
                lat: 40.7,
                lon: -74.1,
                ..v1::Address::default()
            }),
            lines: vec![v1::capture_order_request::Line {
                line_id: "1".into(),
                sku: "SKU-002".into(),
                qty: 2,
                unit_price: 100,
            }],
            payment: Some(v1::Payment {
                authorization_id: "a".into(),
                status: v1::payment::Status::Authorized as i32,
                amount: 200,
            }),
            ..v1::CaptureOrderRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(order.status, v1::order::Status::Allocated as i32);

    for (raw, what) in [
        ("", "empty"),
        ("relative/backup", "relative"),
        (dir.path().to_str().unwrap(), "existing"),
        ("/nonexistent-parent-allot/backup", "missing parent"),
    ] {
        let status = admin.backup(v1::BackupRequest { dir: raw.into() }).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status}");
        assert!(status.message().contains("dir"), "{what}: {status}");
    }

    let backup_dir = dir.path().join("backup-1");
    let backup = admin
        .backup(v1::BackupRequest { dir: backup_dir.to_str().unwrap().into() })
        .await
        .unwrap()
        .into_inner();
    assert!(backup.files > 0 && backup.bytes > 0, "{backup:?}");
    assert!(backup.last_event_sequence >= 503, "500 stock.set, a reservation and an order: {backup:?}");
    // A write after the backup is not in it.
    inventory
        .set_stock(v1::SetStockRequest { entries: vec![common::stock("SKU-LATE", "DC-1", 1)] })
        .await
        .unwrap();
    let skus: Vec<String> = (0..500).map(|index| format!("SKU-{index:03}")).collect();
    let original = inventory
        .get_availability(v1::GetAvailabilityRequest { skus: skus.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    // Restore: a copy of the backup is a data directory.
    let restored_dir = dir.path().join("restored");
    common::copy_dir(&backup_dir, &restored_dir);
    let config = common::test_config(&restored_dir);
    let restored = allot::server::start(config, Arc::new(SystemClock)).await.unwrap();
    let endpoint = format!("http://{}", restored.grpc_address);
    let mut inventory2 = common::inventory_client(restored.grpc_address).await;
    let mut orders2 = v1::orders_client::OrdersClient::connect(endpoint).await.unwrap();
    let copy = inventory2
        .get_availability(v1::GetAvailabilityRequest { skus, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(copy, original, "the restored daemon's availability equals the original's");
    let reservation = inventory2
        .get_reservation(v1::GetReservationRequest { reservation_id: held.reservation_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reservation.lines.len(), 1);
    let restored_order = orders2
        .get_order(v1::GetOrderRequest { order_id: order.order_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored_order.lines, order.lines);
    let late = inventory2
        .get_availability(v1::GetAvailabilityRequest { skus: vec!["SKU-LATE".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(late.items[0].nodes.is_empty(), "a write after the backup is not in it");
    drop((inventory, inventory2, admin, orders, orders2));
    restored.shutdown().await;
    running.shutdown().await;
}

/// A one-line Reserve of `qty` units of `sku` at DC-1 under `key`.
fn at_dc1(key: &str, sku: &str, qty: i64, ttl_ms: u64) -> v1::ReserveRequest {
    v1::ReserveRequest {
        idempotency_key: key.into(),
        lines: vec![common::line(sku, "DC-1", qty)],
        ttl_ms,
        reference: String::new(),
        channel: String::new(),
    }
}

/// `sku` at `node_id` as GetAvailability serves it.
async fn position_at(inventory: &mut common::InventoryClient, sku: &str, node_id: &str) -> v1::Position {
    let request = v1::GetAvailabilityRequest { skus: vec![sku.into()], ..Default::default() };
    let items = inventory.get_availability(request).await.unwrap().into_inner().items;
    items[0].nodes.iter().find(|position| position.node_id == node_id).cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistency_check_is_clean_after_traffic_recomputes_reserved_and_names_a_lost_position() {
    // Goal: the checker finds nothing after real traffic (reserves, releases, an order shipped
    // in part, a shortage); a stale reserved count in a position's record (as format 3 kept
    // it) is recomputed at start-up; and the checker names exactly the position whose record
    // went missing under a reservation, both on request and from the background run
    // (metric); that reservation can still be released. Method: traffic, Check; stop; tamper
    // with the store offline; restart; Check again (twice).
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let running = allot::server::start(common::test_config(&data), Arc::new(SystemClock)).await.unwrap();
    let endpoint = format!("http://{}", running.grpc_address);
    let mut inventory = common::inventory_client(running.grpc_address).await;
    let mut admin = v1::admin_client::AdminClient::connect(endpoint.clone()).await.unwrap();
    let mut orders = v1::orders_client::OrdersClient::connect(endpoint.clone()).await.unwrap();
    let mut fulfilment = v1::fulfilment_client::FulfilmentClient::connect(endpoint).await.unwrap();
    inventory
        .upsert_nodes(v1::UpsertNodesRequest {
            nodes: vec![common::node("DC-1", 40.0, -74.0), common::node("DC-2", 41.0, -75.0)],
        })
        .await
        .unwrap();
    let mut entries = Vec::new();
    for index in 0..50 {
        entries.push(common::stock(&format!("SKU-{index:02}"), "DC-1", 20));
        entries.push(common::stock(&format!("SKU-{index:02}"), "DC-2", 20));
    }
    inventory.set_stock(v1::SetStockRequest { entries }).await.unwrap();
    for index in 0..40 {
        let reserved = inventory
            .reserve(at_dc1(&format!("check-{index}"), &format!("SKU-{:02}", index % 50), 2, 60_000))
            .await
            .unwrap()
            .into_inner();
        if index % 3 == 0 {
            let release = v1::ReleaseReservationRequest { reservation_id: reserved.reservation_id };
            inventory.release_reservation(release).await.unwrap();
        }
    }
    let order = orders
        .capture_order(v1::CaptureOrderRequest {
            channel: "web".into(),
            external_order_id: "check-order".into(),
            ship_to: Some(v1::Address {
                line1: "1 Main St".into(),
                city: "Newark".into(),
                postal_code: "07102".into(),
                country: "US".into(),
                lat: 40.1,
                lon: -74.1,
                ..v1::Address::default()
            }),
            lines: vec![
                v1::capture_order_request::Line {
                    line_id: "1".into(),
                    sku: "SKU-45".into(),
                    qty: 5,
                    unit_price: 1,
                },
                v1::capture_order_request::Line {
                    line_id: "2".into(),
                    sku: "SKU-46".into(),
                    qty: 4,
                    unit_price: 1,
                },
            ],
            payment: Some(v1::Payment {
                authorization_id: "a".into(),
                status: v1::payment::Status::Authorized as i32,
                amount: 9,
            }),
            ..v1::CaptureOrderRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let fo = order.fulfilment_order_ids[0].clone();
    let shipped = fulfilment
        .confirm_shipment(v1::ConfirmShipmentRequest {
            fulfilment_order_id: fo.clone(),
            idempotency_key: "check-ship".into(),
            lines: vec![v1::SkuQty { sku: "SKU-45".into(), qty: 2 }],
            carrier: "DHL".into(),
            tracking_number: "1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // A fulfilment order's reservation moves only with it: the Inventory service may not
    // release, confirm or extend it (that would free units the node is about to ship).
    let reservation_id = shipped.reservation_id.clone();
    let status = inventory
        .release_reservation(v1::ReleaseReservationRequest { reservation_id: reservation_id.clone() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert!(status.message().contains("fulfilment order"), "{status}");
    let status = inventory
        .extend_reservation(v1::ExtendReservationRequest { reservation_id, ttl_ms: 1_000 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    fulfilment
        .report_shortage(v1::ReportShortageRequest {
            fulfilment_order_id: fo,
            sku: "SKU-46".into(),
            missing_qty: 1,
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let report = admin.check(v1::CheckRequest { listed_max: 0 }).await.unwrap().into_inner();
    assert!(report.clean, "{report:?}");
    assert_eq!(report.positions_checked, 100, "{report:?}");
    assert!(report.reservations_checked >= 41 && report.orders_checked == 1, "{report:?}");
    let reserved_before = position_at(&mut inventory, "SKU-07", "DC-1").await.reserved;
    drop((inventory, admin, orders, fulfilment));
    running.shutdown().await;

    // Tamper 1: SKU-07 at DC-1's record in the layout of store format 3, which kept the
    // reserved count, claiming 5 more reserved units than its reservations hold. Since format 4
    // start-up adds up the open reservations instead: the stale count is ignored.
    let sku = allot::domain::Sku::parse("SKU-07").unwrap();
    let node = allot::domain::NodeId::parse("DC-1").unwrap();
    {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Format3PositionRecord {
            #[prost(int64, tag = "1")]
            on_hand: i64,
            #[prost(int64, tag = "2")]
            reserved: i64,
        }
        let (store, _) = allot::store::Store::open(&data, &allot::store::StoreOptions::default()).unwrap();
        let record = Format3PositionRecord { on_hand: 20, reserved: reserved_before + 5 };
        let value = allot::store::records::encode(allot::store::records::Kind::Position, &record);
        let cf = store.cf(allot::store::Cf::Positions);
        store.db().put_cf(cf, allot::store::keys::position(&sku, &node), value).unwrap();
        store.flush().unwrap();
    }
    let running = allot::server::start(common::test_config(&data), Arc::new(SystemClock)).await.unwrap();
    let mut inventory = common::inventory_client(running.grpc_address).await;
    let mut admin =
        v1::admin_client::AdminClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    let position = position_at(&mut inventory, "SKU-07", "DC-1").await;
    assert_eq!((position.on_hand, position.reserved), (20, reserved_before), "{position:?}");
    let report = admin.check(v1::CheckRequest { listed_max: 0 }).await.unwrap().into_inner();
    assert!(report.clean, "{report:?}");
    drop((inventory, admin));
    running.shutdown().await;

    // Tamper 2: SKU-07 at DC-1's record deleted, while a reservation holds units there (only
    // a damaged store is like that: positions are never deleted).
    {
        let (store, _) = allot::store::Store::open(&data, &allot::store::StoreOptions::default()).unwrap();
        let cf = store.cf(allot::store::Cf::Positions);
        store.db().delete_cf(cf, allot::store::keys::position(&sku, &node)).unwrap();
        store.flush().unwrap();
    }
    let mut config = common::test_config(&data);
    config.server.consistency_check_interval_ms = 100;
    let running = allot::server::start(config, Arc::new(SystemClock)).await.unwrap();
    let mut admin =
        v1::admin_client::AdminClient::connect(format!("http://{}", running.grpc_address)).await.unwrap();
    let report = admin.check(v1::CheckRequest { listed_max: 0 }).await.unwrap().into_inner();
    assert!(!report.clean);
    assert_eq!(report.drift_count, 1, "{report:?}");
    assert_eq!(
        report.drift,
        vec![v1::check_response::Drift {
            sku: "SKU-07".into(),
            node_id: "DC-1".into(),
            reserved: 0,
            held: reserved_before,
        }]
    );
    // The background run exports it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let scrape = common::http_get(running.metrics_address, "/metrics").await;
        if scrape.lines().any(|line| line == "allot_consistency_drift 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no allot_consistency_drift 1 in:\n{scrape}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The reservation at the lost position can still be released (a replay of its Reserve
    // names it): nothing to give back there, and the drift is gone with the hold.
    let mut inventory = common::inventory_client(running.grpc_address).await;
    let replay = inventory.reserve(at_dc1("check-7", "SKU-07", 2, 60_000)).await.unwrap().into_inner();
    let release = v1::ReleaseReservationRequest { reservation_id: replay.reservation_id };
    let released = inventory.release_reservation(release).await.unwrap().into_inner();
    assert_eq!(released.status, v1::reservation::Status::Released as i32, "{released:?}");
    let report = admin.check(v1::CheckRequest { listed_max: 0 }).await.unwrap().into_inner();
    assert!(report.clean, "{report:?}");
    drop((inventory, admin));
    running.shutdown().await;
}
