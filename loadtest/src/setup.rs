//! `--setup`: the data set through the API: `--nodes` warehouses spread over the US and
//! `--on-hand` units of each of `--skus` SKUs at every node. Must not import the drivers.

use std::time::Instant;

use allot::proto::v1;
use tonic::transport::Channel;

use crate::flags::Flags;
use crate::scenarios::{node_id, sku_id};

/// Positions written per SetStock call.
const SETUP_BATCH_LEN: usize = 10_000;
/// Message size limit of the setup client (a SetStock batch is ~50 bytes per entry).
const SETUP_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

pub async fn setup(channel: &Channel, flags: &Flags) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = v1::inventory_client::InventoryClient::new(channel.clone())
        .max_decoding_message_size(SETUP_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(SETUP_MESSAGE_BYTES_MAX);
    let nodes = (0..flags.nodes)
        .map(|index| v1::Node {
            node_id: node_id(index),
            r#type: v1::node::Type::Warehouse as i32,
            // Spread over the continental US, deterministically.
            location: Some(v1::Location {
                lat: 25.0 + (index as f64 * 7.3) % 24.0,
                lon: -124.0 + (index as f64 * 13.7) % 57.0,
            }),
            enabled: true,
            can_ship: true,
            can_pickup: false,
            daily_capacity: 0,
            processing_days: 1,
            priority: 0,
            rates: Some(v1::ShippingRates { base_cost: 500, cost_per_km: 1, cost_per_unit: 10 }),
            default_safety_stock: 0,
            channels: Vec::new(),
        })
        .collect();
    client.upsert_nodes(v1::UpsertNodesRequest { nodes }).await?;
    let started = Instant::now();
    let mut batch = Vec::with_capacity(SETUP_BATCH_LEN);
    let mut written = 0usize;
    for sku in 0..flags.skus {
        for node in 0..flags.nodes {
            batch.push(v1::StockEntry {
                sku: sku_id(sku),
                node_id: node_id(node),
                on_hand: flags.on_hand,
                safety_stock: None,
            });
            if batch.len() == SETUP_BATCH_LEN {
                written += batch.len();
                client.set_stock(v1::SetStockRequest { entries: std::mem::take(&mut batch) }).await?;
            }
        }
    }
    if !batch.is_empty() {
        written += batch.len();
        client.set_stock(v1::SetStockRequest { entries: batch }).await?;
    }
    eprintln!(
        "setup: {} nodes, {written} positions of {} units in {:.1} s",
        flags.nodes,
        flags.on_hand,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
