//! The planner: given demand lines and candidate nodes (each with its fixed shipment cost,
//! per-unit cost and ATP per line), choose the set of nodes and the units each ships.
//!
//! Objective, compared lexicographically: (unrouted units, Σ shipment costs + split_penalty ×
//! (shipments − 1)), so a plan that routes more units always wins whatever the rates, then the
//! cheaper one; ties break by the used nodes' (higher priority, then node_id) in that order.
//!
//! For a fixed set of nodes the optimal assignment is greedy: each SKU's units go to the set's
//! nodes in ascending per-unit cost (the per-unit cost does not depend on the SKU), so pricing a
//! set is exact and cheap. The search is a branch-and-bound over node sets in ascending fixed
//! cost, with a lower bound from the cheapest possible source per line and the most units the
//! remaining nodes could still cover. It starts from a greedy plan (best single node, then the
//! best node to add while the objective improves) and stops after `expansion_budget` sets: the
//! result is then the best plan found, flagged not proven optimal, with the root lower bound
//! as its quality bound (cost − lower_bound is at most the gap to the optimum).
//! Pure: no locks, no I/O, no clocks. HOT PATH: allocation-light, no logging.

use std::cmp::Reverse;

/// What the planner minimises, compared field by field in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Objective {
    /// Units no shipment carries.
    pub unrouted: i128,
    /// Shipping cost plus the split penalties, in cents.
    pub cost: i128,
}

impl Objective {
    const WORST: Objective = Objective { unrouted: i128::MAX, cost: i128::MAX };
}

/// One node that may ship.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Base cost plus distance cost of one shipment, in cents.
    pub fixed_cost: i64,
    pub cost_per_unit: i64,
    pub priority: i64,
    /// Index of the node in the caller's table; ties break on the caller's node order, which
    /// is node_id order.
    pub order: usize,
    /// Units this node can ship per line: min(ATP, line qty), one entry per line.
    pub available: Vec<i64>,
}

#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Most shipments (nodes) in the plan; at least 1.
    pub max_shipments: usize,
    /// Added per shipment beyond the first, in cents.
    pub split_penalty: i64,
    /// Sets priced at most before the search stops with the best plan so far.
    pub expansion_budget: u64,
}

/// Units one node ships, per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Index into the candidates.
    pub candidate: usize,
    pub units: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Ordered by candidate order (node_id).
    pub assignments: Vec<Assignment>,
    /// Units not routed, per line.
    pub unrouted: Vec<i64>,
    /// Shipping cost of the assignments, in cents (no split penalty).
    pub cost: i64,
    /// The objective (see the module comment).
    pub objective: Objective,
    /// Whether the search finished, proving the plan optimal.
    pub optimal: bool,
    /// A lower bound on the objective of any plan (the root bound); equals `objective` when
    /// the search proved it.
    pub lower_bound: Objective,
    /// Node sets priced.
    pub expansions: u64,
}

/// The best set found so far.
#[derive(Clone)]
struct Best {
    objective: Objective,
    /// (higher priority first, order) of the nodes that ship, sorted: the tie-break key.
    tie_key: Vec<(Reverse<i64>, usize)>,
    /// The nodes that ship.
    set: Vec<usize>,
}

struct Search<'a> {
    demand: &'a [i64],
    candidates: &'a [Candidate],
    options: PlanOptions,
    /// Candidate indexes in ascending fixed cost (then priority, order): the branching order.
    by_fixed: Vec<usize>,
    /// Rank of each candidate in ascending per-unit cost (then priority, order): filling order.
    unit_rank: Vec<usize>,
    /// suffix_available[i * lines + line]: units of `line` the candidates by_fixed[i..] hold
    /// together (one flat table: the bound reads it in the innermost loop).
    suffix_available: Vec<i64>,
    /// Units per line the current set holds together (kept as nodes are pushed and popped).
    set_available: Vec<i64>,
    /// Cheapest per-unit cost of any candidate holding each line.
    min_unit_cost: Vec<i64>,
    best: Option<Best>,
    expansions: u64,
    exhausted: bool,
    /// Reused buffers: no allocation while pricing.
    scratch_remaining: Vec<i64>,
    scratch_filling: Vec<usize>,
    scratch_shipping: Vec<usize>,
}

/// Plans `demand` (units per line) over `candidates`.
pub fn plan(demand: &[i64], candidates: &[Candidate], options: PlanOptions) -> Plan {
    assert!(options.max_shipments >= 1, "max_shipments is at least 1");
    assert!(candidates.iter().all(|candidate| candidate.available.len() == demand.len()));
    let mut by_fixed: Vec<usize> = (0..candidates.len()).collect();
    by_fixed.sort_by_key(|index| {
        let candidate = &candidates[*index];
        (candidate.fixed_cost, Reverse(candidate.priority), candidate.order)
    });
    let mut by_unit: Vec<usize> = (0..candidates.len()).collect();
    by_unit.sort_by_key(|index| {
        let candidate = &candidates[*index];
        (candidate.cost_per_unit, Reverse(candidate.priority), candidate.order)
    });
    let mut unit_rank = vec![0; candidates.len()];
    for (rank, index) in by_unit.iter().enumerate() {
        unit_rank[*index] = rank;
    }
    let lines = demand.len();
    let mut suffix_available = vec![0i64; (candidates.len() + 1) * lines];
    for position in (0..candidates.len()).rev() {
        let candidate = &candidates[by_fixed[position]];
        for line in 0..lines {
            suffix_available[position * lines + line] =
                suffix_available[(position + 1) * lines + line].saturating_add(candidate.available[line]);
        }
    }
    let min_unit_cost = (0..demand.len())
        .map(|line| {
            candidates
                .iter()
                .filter(|candidate| candidate.available[line] > 0)
                .map(|candidate| candidate.cost_per_unit)
                .min()
                .unwrap_or(0)
        })
        .collect();
    let mut search = Search {
        demand,
        candidates,
        options,
        by_fixed,
        unit_rank,
        suffix_available,
        set_available: vec![0; demand.len()],
        min_unit_cost,
        best: None,
        expansions: 0,
        exhausted: false,
        scratch_remaining: vec![0; demand.len()],
        scratch_filling: Vec::with_capacity(options.max_shipments),
        scratch_shipping: Vec::with_capacity(options.max_shipments),
    };
    let root_bound = search.bound(0, 0, 0);
    // A good first plan makes the search prune early: the best single node is cheap to find.
    search.greedy(1);
    let mut set = Vec::with_capacity(options.max_shipments);
    search.branch(0, 0, &mut set);
    let optimal = !search.exhausted;
    if !optimal {
        // The budget ran out: make sure the answer is at least the greedy plan.
        search.greedy(options.max_shipments);
    }
    let best_set = search.best.take().map(|best| best.set).unwrap_or_default();
    let (objective, assignments, unrouted, cost) = search.assign(&best_set);
    Plan {
        assignments,
        unrouted,
        cost,
        objective,
        optimal,
        lower_bound: if optimal { objective } else { root_bound.min(objective) },
        expansions: search.expansions,
    }
}

/// The greedy baseline alone (for comparison in tests and benches).
pub fn plan_greedy(demand: &[i64], candidates: &[Candidate], options: PlanOptions) -> Plan {
    // With no budget the search stops at once and answers with the full greedy plan.
    let budget_zero = PlanOptions { expansion_budget: 0, ..options };
    let mut plan = plan(demand, candidates, budget_zero);
    plan.optimal = false;
    plan
}

impl Search<'_> {
    /// The objective of a set, and which of its nodes ship (in `scratch_shipping`).
    /// Fills each line from the set's nodes in per-unit order; allocation-free.
    fn price(&mut self, set: &[usize]) -> Objective {
        self.scratch_filling.clear();
        self.scratch_filling.extend_from_slice(set);
        let unit_rank = &self.unit_rank;
        self.scratch_filling.sort_unstable_by_key(|index| unit_rank[*index]);
        self.scratch_remaining.copy_from_slice(self.demand);
        self.scratch_shipping.clear();
        let mut objective: i128 = 0;
        for &index in &self.scratch_filling {
            let candidate = &self.candidates[index];
            let mut units: i128 = 0;
            for (line, remaining) in self.scratch_remaining.iter_mut().enumerate() {
                let take = (*remaining).min(candidate.available[line]);
                if take > 0 {
                    *remaining -= take;
                    units += take as i128;
                }
            }
            if units > 0 {
                objective += candidate.fixed_cost as i128 + candidate.cost_per_unit as i128 * units;
                self.scratch_shipping.push(index);
            }
        }
        let splits = self.scratch_shipping.len().saturating_sub(1) as i128;
        let unrouted: i128 = self.scratch_remaining.iter().map(|qty| *qty as i128).sum();
        Objective { unrouted, cost: objective + splits * self.options.split_penalty as i128 }
    }

    /// Builds the assignments of a set (the winner only).
    fn assign(&mut self, set: &[usize]) -> (Objective, Vec<Assignment>, Vec<i64>, i64) {
        let objective = self.price(set);
        self.scratch_remaining.copy_from_slice(self.demand);
        let mut assignments = Vec::with_capacity(self.scratch_filling.len());
        let mut cost: i128 = 0;
        for &index in &self.scratch_filling {
            let candidate = &self.candidates[index];
            let mut units = vec![0i64; self.demand.len()];
            let mut total: i128 = 0;
            for (line, remaining) in self.scratch_remaining.iter_mut().enumerate() {
                let take = (*remaining).min(candidate.available[line]);
                if take > 0 {
                    units[line] = take;
                    *remaining -= take;
                    total += take as i128;
                }
            }
            if total > 0 {
                cost += candidate.fixed_cost as i128 + candidate.cost_per_unit as i128 * total;
                assignments.push(Assignment { candidate: index, units });
            }
        }
        assignments.sort_by_key(|assignment| self.candidates[assignment.candidate].order);
        (objective, assignments, self.scratch_remaining.clone(), i64::try_from(cost).unwrap_or(i64::MAX))
    }

    /// Offers the set just priced (its shipping nodes are in `scratch_shipping`).
    fn offer(&mut self, objective: Objective) {
        if let Some(best) = &self.best {
            if objective > best.objective {
                return;
            }
            let tie_key = self.tie_key();
            if objective == best.objective && tie_key >= best.tie_key {
                return;
            }
            self.best = Some(Best { objective, tie_key, set: self.scratch_shipping.clone() });
        } else {
            let tie_key = self.tie_key();
            self.best = Some(Best { objective, tie_key, set: self.scratch_shipping.clone() });
        }
    }

    fn tie_key(&self) -> Vec<(Reverse<i64>, usize)> {
        // Reverse, not negation: -i64::MIN overflows.
        let mut key: Vec<(Reverse<i64>, usize)> = self
            .scratch_shipping
            .iter()
            .map(|index| (Reverse(self.candidates[*index].priority), self.candidates[*index].order))
            .collect();
        key.sort_unstable();
        key
    }

    /// A lower bound on any plan containing the current set (`set_len` nodes, holding
    /// `set_available`) plus nodes from by_fixed[next..].
    fn bound(&self, next: usize, fixed_sum: i128, set_len: usize) -> Objective {
        let mut bound = fixed_sum + set_len.saturating_sub(1) as i128 * self.options.split_penalty as i128;
        let mut unrouted: i128 = 0;
        let mut set_falls_short = false;
        let lines = self.demand.len();
        let suffix = &self.suffix_available[next * lines..(next + 1) * lines];
        let per_line = self.set_available.iter().zip(suffix).zip(self.demand).zip(&self.min_unit_cost);
        for (((in_set, in_suffix), demand), min_unit_cost) in per_line {
            let (in_set, demand) = (*in_set as i128, *demand as i128);
            let routed = (in_set + *in_suffix as i128).min(demand);
            if in_set < routed {
                set_falls_short = true;
            }
            unrouted += demand - routed;
            bound += routed * *min_unit_cost as i128;
        }
        // Routing what the set cannot needs one more node, the cheapest being by_fixed[next]
        // (leaving those units unrouted instead makes `unrouted` larger, which loses anyway).
        if set_falls_short && let Some(&index) = self.by_fixed.get(next) {
            let split = if set_len == 0 { 0 } else { self.options.split_penalty as i128 };
            bound += self.candidates[index].fixed_cost as i128 + split;
        }
        Objective { unrouted, cost: bound }
    }

    /// Adds (`sign` 1) or removes (−1) a candidate's units from `set_available`.
    fn add_to_set(&mut self, index: usize, sign: i64) {
        for (held, units) in self.set_available.iter_mut().zip(&self.candidates[index].available) {
            *held += sign * units;
        }
    }

    /// The best single node, then (up to `steps` nodes) the best node to add while that
    /// improves the objective.
    fn greedy(&mut self, steps: usize) {
        let count = self.candidates.len();
        let mut set: Vec<usize> = Vec::with_capacity(self.options.max_shipments);
        let mut current: Option<Objective> = None;
        while set.len() < self.options.max_shipments.min(steps) {
            let mut step: Option<(usize, Objective)> = None;
            for index in 0..count {
                if set.contains(&index) {
                    continue;
                }
                set.push(index);
                let objective = self.price(&set);
                let useful = self.scratch_shipping.len() == set.len();
                set.pop();
                if useful && step.is_none_or(|(_, best)| objective < best) {
                    step = Some((index, objective));
                }
            }
            let Some((index, objective)) = step else { break };
            if current.is_some_and(|current| objective >= current) {
                break;
            }
            set.push(index);
            current = Some(objective);
        }
        if current.is_some() {
            let objective = self.price(&set);
            self.offer(objective);
        }
    }

    /// Depth-first over sets in ascending fixed cost: extends `set` with by_fixed[next..].
    fn branch(&mut self, next: usize, fixed_sum: i128, set: &mut Vec<usize>) {
        if set.len() >= self.options.max_shipments {
            return;
        }
        for position in next..self.by_fixed.len() {
            if self.expansions >= self.options.expansion_budget {
                self.exhausted = true;
                return;
            }
            let index = self.by_fixed[position];
            let fixed = fixed_sum + self.candidates[index].fixed_cost as i128;
            let best = self.best.as_ref().map_or(Objective::WORST, |best| best.objective);
            set.push(index);
            self.add_to_set(index, 1);
            let bound = self.bound(position + 1, fixed, set.len());
            if bound > best {
                self.add_to_set(index, -1);
                set.pop();
                // Candidates further on cost at least as much to add and leave at least as many
                // units unrouted (the pool shrinks): when that alone loses, so does every later
                // one.
                let fixed_only = fixed + set.len() as i128 * self.options.split_penalty as i128;
                if (Objective { unrouted: bound.unrouted, cost: fixed_only }) > best {
                    return;
                }
                continue;
            }
            self.expansions += 1;
            let objective = self.price(set);
            // A set with a node that ships nothing is dominated by the set without it.
            let useful = self.scratch_shipping.len() == set.len();
            if useful {
                self.offer(objective);
                self.branch(position + 1, fixed, set);
            }
            self.add_to_set(index, -1);
            set.pop();
            if self.exhausted {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(order: usize, fixed_cost: i64, cost_per_unit: i64, available: &[i64]) -> Candidate {
        Candidate { fixed_cost, cost_per_unit, priority: 0, order, available: available.to_vec() }
    }

    fn options(max_shipments: usize, split_penalty: i64) -> PlanOptions {
        PlanOptions { max_shipments, split_penalty, expansion_budget: 100_000 }
    }

    #[test]
    fn single_node_when_cheapest() {
        // Goal: one node that holds everything and is cheapest wins. Method: hand-computed.
        let candidates = [candidate(0, 1_000, 10, &[5, 5]), candidate(1, 600, 10, &[5, 5])];
        let plan = plan(&[5, 5], &candidates, options(3, 0));
        assert_eq!(plan.assignments, vec![Assignment { candidate: 1, units: vec![5, 5] }]);
        assert_eq!(plan.cost, 600 + 100);
        assert!(plan.optimal);
    }

    #[test]
    fn split_only_when_no_single_node_suffices_or_it_pays() {
        // Goal: a split when no node holds everything; one node over two when the penalty
        // outweighs the saving. Method: hand-computed costs.
        let candidates = [candidate(0, 500, 10, &[5, 0]), candidate(1, 500, 10, &[0, 5])];
        let plan = plan(&[5, 5], &candidates, options(2, 100));
        assert_eq!(plan.assignments.len(), 2);
        assert_eq!(plan.cost, 500 + 50 + 500 + 50);
        assert_eq!(plan.objective, Objective { unrouted: 0, cost: 1_100 + 100 });

        // A holds both lines at 2,000; B+C hold one line each at 500 + 500 = 1,000 + units.
        let candidates = [
            candidate(0, 2_000, 10, &[5, 5]),
            candidate(1, 500, 10, &[5, 0]),
            candidate(2, 500, 10, &[0, 5]),
        ];
        // Saving 1,000 with a penalty of 1,500: stay with one node.
        assert_eq!(plan_assignments(&candidates, options(3, 1_500)), vec![0]);
        // Penalty 500: the split saves 500 net.
        assert_eq!(plan_assignments(&candidates, options(3, 500)), vec![1, 2]);
        // max_shipments 1 forbids the split whatever it saves.
        assert_eq!(plan_assignments(&candidates, options(1, 0)), vec![0]);
    }

    fn plan_assignments(candidates: &[Candidate], options: PlanOptions) -> Vec<usize> {
        plan(&[5, 5], candidates, options).assignments.iter().map(|assignment| assignment.candidate).collect()
    }

    #[test]
    fn routes_most_units_first() {
        // Goal: the plan routes as many units as possible before minding cost. Method: the
        // cheap node holds less.
        let candidates = [candidate(0, 100, 1, &[3]), candidate(1, 10_000, 1, &[5])];
        let plan = plan(&[5], &candidates, options(1, 0));
        assert_eq!(plan.assignments[0].candidate, 1);
        assert_eq!(plan.unrouted, vec![0]);
        let plan = super::plan(&[9], &candidates, options(1, 0));
        assert_eq!(plan.unrouted, vec![4]);
    }

    #[test]
    fn ties_break_by_priority_then_order() {
        // Goal: equal costs pick the higher priority, then the lower node order. Method: three
        // identical nodes.
        let mut candidates =
            vec![candidate(0, 100, 1, &[5]), candidate(1, 100, 1, &[5]), candidate(2, 100, 1, &[5])];
        assert_eq!(plan(&[5], &candidates, options(1, 0)).assignments[0].candidate, 0);
        candidates[2].priority = 7;
        assert_eq!(plan(&[5], &candidates, options(1, 0)).assignments[0].candidate, 2);
    }
}
