//! One shard: the SKUs that hash to it, each with its positions by node.

use std::collections::HashMap;

use super::NodeTable;
use crate::domain::{NodeId, Position, Sku, Totals};

type FxBuild = std::hash::BuildHasherDefault<rustc_hash::FxHasher>;

#[derive(Default)]
pub struct Shard {
    pub skus: HashMap<Sku, SkuStock, FxBuild>,
}

impl Shard {
    pub fn stock(&self, sku: &Sku) -> Option<&SkuStock> {
        self.skus.get(sku)
    }

    pub fn stock_mut(&mut self, sku: &Sku) -> &mut SkuStock {
        self.skus.entry(sku.clone()).or_default()
    }
}

/// The positions of one SKU, sorted by node id: lookups by binary search, and reads come out
/// in the order the API promises.
#[derive(Default)]
pub struct SkuStock {
    nodes: Vec<(NodeId, Position)>,
}

impl SkuStock {
    /// A SKU's positions already sorted by node id, without duplicates (as recovery reads them).
    pub fn from_sorted(nodes: Vec<(NodeId, Position)>) -> Self {
        debug_assert!(nodes.windows(2).all(|pair| pair[0].0 < pair[1].0));
        Self { nodes }
    }

    pub fn get(&self, node_id: &NodeId) -> Option<&Position> {
        self.nodes.binary_search_by(|(id, _)| id.cmp(node_id)).ok().map(|index| &self.nodes[index].1)
    }

    pub fn get_mut(&mut self, node_id: &NodeId) -> Option<&mut Position> {
        self.nodes.binary_search_by(|(id, _)| id.cmp(node_id)).ok().map(|index| &mut self.nodes[index].1)
    }

    /// Sets the position at `node_id`; a new entry keeps the id that `shared_id` gives (the
    /// node table's copy), asked for only then.
    pub fn set(&mut self, node_id: &NodeId, position: Position, shared_id: impl FnOnce() -> NodeId) {
        match self.nodes.binary_search_by(|(id, _)| id.cmp(node_id)) {
            Ok(index) => self.nodes[index].1 = position,
            Err(index) => self.nodes.insert(index, (shared_id(), position)),
        }
    }

    pub fn positions(&self) -> impl Iterator<Item = (&NodeId, &Position)> {
        self.nodes.iter().map(|(node_id, position)| (node_id, position))
    }

    /// The SKU's totals over enabled nodes, split by channel restriction.
    pub fn totals(&self, nodes: &NodeTable) -> Totals {
        let mut totals = Totals::default();
        for (node_id, position) in &self.nodes {
            let Some(node) = nodes.get(node_id) else { continue };
            let atp = position.atp(node);
            if node.channels.is_empty() {
                totals.unrestricted += atp;
            } else if node.enabled {
                totals.restricted.push((node_id.clone(), atp));
            }
        }
        totals
    }
}
