//! Routing rules: configuration (the `[routing]` table), reloadable without a restart.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::domain::{Channel, NodeId};

/// One day in milliseconds.
const DAY_MS: u64 = 86_400_000;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingRules {
    /// Added to a plan per shipment beyond the first, in cents: splits must save more.
    pub split_penalty: i64,
    /// Transit speed for `estimated_days`.
    pub km_per_day: f64,
    /// When the capacity day starts, in minutes after 00:00 UTC.
    pub capacity_day_start_minute_utc: u32,
    /// The most shipments a plan may use (a request may ask for fewer).
    pub max_shipments_max: usize,
    /// Node sets the planner prices at most per request before it answers with the best plan
    /// found (then flagged not proven optimal, with its lower bound).
    pub expansion_budget: u64,
    /// Per channel, the only nodes that may serve it (on top of each node's own `channels`).
    /// A channel not listed may use every node.
    pub channel_nodes: BTreeMap<String, Vec<String>>,
}

impl Default for RoutingRules {
    fn default() -> Self {
        Self {
            split_penalty: 500,
            km_per_day: 800.0,
            capacity_day_start_minute_utc: 0,
            max_shipments_max: 10,
            expansion_budget: 100_000,
            channel_nodes: BTreeMap::new(),
        }
    }
}

impl RoutingRules {
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.split_penalty < 0 {
            problems.push("routing.split_penalty must not be negative".into());
        }
        if !(self.km_per_day.is_finite() && self.km_per_day > 0.0) {
            problems.push("routing.km_per_day must be a positive number".into());
        }
        if self.capacity_day_start_minute_utc >= 1_440 {
            problems.push("routing.capacity_day_start_minute_utc must be below 1440".into());
        }
        if self.max_shipments_max == 0 {
            problems.push("routing.max_shipments_max must be at least 1".into());
        }
        if self.expansion_budget == 0 {
            problems.push("routing.expansion_budget must be at least 1".into());
        }
        for (channel, nodes) in &self.channel_nodes {
            if Channel::parse(channel).is_err() {
                problems.push(format!("routing.channel_nodes: {channel:?} is not a valid channel"));
            }
            for node in nodes {
                if NodeId::parse(node).is_err() {
                    problems
                        .push(format!("routing.channel_nodes.{channel}: {node:?} is not a valid node id"));
                }
            }
        }
        problems
    }

    /// Whether the per-channel node lists let `node_id` serve `channel`.
    pub fn channel_allows(&self, channel: Option<&Channel>, node_id: &NodeId) -> bool {
        match channel.and_then(|channel| self.channel_nodes.get(channel.as_str())) {
            None => true,
            Some(nodes) => nodes.iter().any(|node| node == node_id.as_str()),
        }
    }

    /// The capacity day `now_ms` falls in (days since the epoch, shifted by the day start).
    pub fn capacity_day(&self, now_ms: u64) -> u64 {
        let offset_ms = u64::from(self.capacity_day_start_minute_utc) * 60_000;
        now_ms.saturating_sub(offset_ms) / DAY_MS
    }
}
