//! Choosing indexes for the whole workload: Extend (Schlosser, Kossmann, Boissier, ICDE 2019)
//! under a storage budget and an index count, net of write overhead, never accepting a set
//! under which any statement's plan costs more than with no new index.
//!
//! Each step weighs every move, adding a candidate or growing a chosen index (one more key
//! column, or a richer candidate that has it as a prefix, e.g. with `INCLUDE` columns), by its
//! cut of the workload's cost (reads weighted by calls, plus index maintenance) per added byte,
//! and takes the best. Moves are re-weighed lazily: a move whose last known ratio cannot beat
//! the best fresh one is not asked again that step (benefits shrink as the set grows), which
//! keeps what-if calls to a fraction of a full re-evaluation.

use std::collections::{BTreeSet, HashMap};

use sqlx::PgConnection;

use super::model::{IndexDef, Key, Table, TableName};
use super::plan::Plan;
use super::size;
use super::whatif::{Planned, WhatIf, WhatIfError};

/// A gain smaller than this share of a statement's cost is not checked, nor one under
/// [`Costing::Cold`](super::whatif::Costing::Cold).
const FRAGILE_GAIN: f64 = 1e-3;

/// A statement of the workload as the selection sees it.
#[derive(Debug)]
pub struct Statement {
    /// How to plan it.
    pub planned: Planned,
    /// Its weight: executions in the window.
    pub weight: f64,
    /// Its plan with no new index.
    pub base: Plan,
    /// Per table, the keys it searches, joins, sorts or groups on (what Extend appends).
    pub options: HashMap<TableName, Vec<Key>>,
    /// Per table, every column it reads there, when it does not read them all: what an index
    /// must hold (as keys or `INCLUDE`) to answer it with an index-only scan.
    pub covering: HashMap<TableName, Vec<String>>,
}

/// Rows an `UPDATE` changed in the window, and the columns it sets.
#[derive(Debug, Clone)]
pub struct Update {
    /// The table.
    pub table: TableName,
    /// Columns it sets.
    pub columns: Vec<String>,
    /// Rows it changed.
    pub rows: f64,
}

/// Limits and prices of a selection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes the new indexes may take (estimated real size).
    pub budget_bytes: i64,
    /// Most new indexes.
    pub max_indexes: usize,
    /// Planner cost units one index entry costs to write (insert, or non-HOT update).
    pub write_cost_per_row: f64,
}

/// The chosen set and what it costs.
#[derive(Debug)]
pub struct Selection {
    /// Chosen index ids (see [`WhatIf::def`]), in the order they were taken.
    pub chosen: Vec<usize>,
    /// Each statement's plan under the chosen set.
    pub plans: Vec<Plan>,
    /// Estimated size of each chosen index.
    pub sizes: HashMap<usize, i64>,
    /// Write overhead of each chosen index, in planner cost units over the window.
    pub write_costs: HashMap<usize, f64>,
    /// How each step went, for the evidence (`+ orders(status)`, `orders(a) → orders(a, b)`).
    pub steps: Vec<String>,
}

/// The best move of a step so far: the move, its ratio, the set it makes, the plans that
/// change, the bytes it adds.
type Best = (Move, f64, Vec<usize>, Vec<(usize, Plan)>, i64);

#[derive(Debug, Clone, PartialEq)]
enum Move {
    Add(usize),
    Replace { old: usize, new: usize },
}

/// The selection's working state.
#[derive(Debug)]
pub struct Selector<'a> {
    whatif: &'a mut WhatIf,
    statements: &'a [Statement],
    tables: &'a [Table],
    /// Per table: rows inserted, deleted, updates (with their columns) over the window.
    writes: HashMap<TableName, (f64, f64, Vec<Update>)>,
    limits: Limits,
    sizes: HashMap<usize, i64>,
}

impl<'a> Selector<'a> {
    /// A selector over `statements` (each with its base plan), writes per table as given.
    pub fn new(
        whatif: &'a mut WhatIf,
        statements: &'a [Statement],
        tables: &'a [Table],
        writes: HashMap<TableName, (f64, f64, Vec<Update>)>,
        limits: Limits,
    ) -> Self {
        Self {
            whatif,
            statements,
            tables,
            writes,
            limits,
            sizes: HashMap::new(),
        }
    }

    fn size(&mut self, id: usize) -> i64 {
        if let Some(size) = self.sizes.get(&id) {
            return *size;
        }
        let def = self.whatif.def(id).clone();
        let size = self
            .tables
            .iter()
            .find(|t| t.name == def.table)
            .map_or(i64::MAX / 4, |t| size::estimate_bytes(&def, t));
        self.sizes.insert(id, size);
        size
    }

    /// Write overhead of the new indexes `config` on `table`, in planner cost units.
    fn write_cost_on(&self, table: &TableName, config: &[usize]) -> f64 {
        let on_table: Vec<&IndexDef> = config
            .iter()
            .map(|id| self.whatif.def(*id))
            .filter(|d| &d.table == table)
            .collect();
        if on_table.is_empty() {
            return 0.0;
        }
        let Some((inserted, deleted, updates)) = self.writes.get(table) else {
            return 0.0;
        };
        let existing = self
            .tables
            .iter()
            .find(|t| &t.name == table)
            .map_or(0, |t| t.indexes.len()) as f64;
        let hot_share = self
            .tables
            .iter()
            .find(|t| &t.name == table)
            .map_or(0.0, |t| {
                if t.writes.updated > 0.0 {
                    t.writes.hot_updated / t.writes.updated
                } else {
                    1.0
                }
            });
        let new = on_table.len() as f64;
        let mut entries = new * (inserted + 0.2 * deleted);
        for update in updates {
            let touches = on_table.iter().any(|def| {
                def.columns()
                    .iter()
                    .any(|c| update.columns.iter().any(|u| u == c))
            });
            if touches {
                // Its HOT share becomes ordinary updates: an entry in every index, old and new.
                entries += update.rows * (hot_share * (existing + new) + (1.0 - hot_share) * new);
            } else {
                // Still HOT where it was; the rest writes every index, the new ones too.
                entries += update.rows * (1.0 - hot_share) * new;
            }
        }
        entries * self.limits.write_cost_per_row
    }

    /// The write overhead of one index of `config`: its share of its table's overhead.
    fn write_cost_of(&self, id: usize, config: &[usize]) -> f64 {
        let table = &self.whatif.def(id).table;
        let without: Vec<usize> = config.iter().copied().filter(|c| *c != id).collect();
        self.write_cost_on(table, config) - self.write_cost_on(table, &without)
    }

    /// Plans of every statement touching `table` under `config`; `None` when one gets more
    /// expensive than with no new index (the set is refused) or cannot be planned.
    async fn plans_on(
        &mut self,
        conn: &mut PgConnection,
        table: &TableName,
        config: &[usize],
    ) -> Result<Option<Vec<(usize, Plan)>>, sqlx::Error> {
        let mut out = Vec::new();
        for (at, statement) in self.statements.iter().enumerate() {
            if !statement.planned.tables.contains(table) {
                continue;
            }
            let plan = match self.whatif.plan(conn, at, &statement.planned, config).await {
                Ok(plan) => plan,
                Err(WhatIfError::Unplannable(_)) => return Ok(None),
                Err(WhatIfError::Session(error)) => return Err(error),
            };
            if plan.cost > statement.base.cost * (1.0 + 1e-9) + 1e-9 {
                return Ok(None);
            }
            out.push((at, plan));
        }
        Ok(Some(out))
    }

    /// Whether statement `at`'s gain from `current` to `config` vanishes under
    /// [`Costing::Cold`](super::whatif::Costing::Cold): such a gain is not counted, so no index
    /// is chosen for it (one chosen for other statements may still change its plan).
    async fn fragile(
        &mut self,
        conn: &mut PgConnection,
        at: usize,
        current: &[usize],
        config: &[usize],
    ) -> Result<bool, sqlx::Error> {
        let statement = &self.statements[at];
        let base = self
            .whatif
            .plan_cold(conn, at, &statement.planned, current)
            .await;
        let cold = self
            .whatif
            .plan_cold(conn, at, &statement.planned, config)
            .await;
        match (base, cold) {
            (Ok(base), Ok(cold)) => Ok(cold.cost >= base.cost * (1.0 - FRAGILE_GAIN)),
            (Err(WhatIfError::Session(error)), _) | (_, Err(WhatIfError::Session(error))) => {
                Err(error)
            }
            // It was planned with the default costs; unplannable here means no evidence.
            _ => Ok(true),
        }
    }

    /// Chosen indexes that no statement's plan uses.
    fn idle(&self, chosen: &[usize], plans: &[Plan]) -> Vec<usize> {
        chosen
            .iter()
            .copied()
            .filter(|id| {
                !plans.iter().any(|plan| {
                    plan.indexes
                        .iter()
                        .any(|name| self.whatif.by_name(name) == Some(*id))
                })
            })
            .collect()
    }

    /// Runs Extend; `progress` hears each step taken.
    pub async fn run(
        mut self,
        conn: &mut PgConnection,
        candidates: &[usize],
        progress: &(dyn Fn(&str, u64) + Send + Sync),
    ) -> Result<Selection, sqlx::Error> {
        let mut plans: Vec<Plan> = self.statements.iter().map(|s| s.base.clone()).collect();
        let mut chosen: Vec<usize> = Vec::new();
        let mut used_bytes: i64 = 0;
        let mut steps = Vec::new();
        // Last known (benefit per byte) of each move; unknown moves are weighed first.
        let mut moves: Vec<(Move, f64)> = candidates
            .iter()
            .map(|c| (Move::Add(*c), f64::INFINITY))
            .collect();

        loop {
            moves.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut best: Option<Best> = None;
            let mut fresh: Vec<(Move, f64)> = Vec::new();
            let mut rest = std::mem::take(&mut moves).into_iter();
            for (mv, stale) in rest.by_ref() {
                if let Some((_, best_ratio, ..)) = &best
                    && stale <= *best_ratio
                {
                    fresh.push((mv, stale));
                    break;
                }
                let (config, table, added) = match &mv {
                    Move::Add(id) => {
                        if chosen.contains(id) || chosen.len() >= self.limits.max_indexes {
                            continue;
                        }
                        let def = self.whatif.def(*id).clone();
                        // An index that a chosen one already serves adds nothing.
                        if chosen.iter().any(|c| {
                            def.is_prefix_of(self.whatif.def(*c)) && def.include.is_empty()
                        }) {
                            continue;
                        }
                        let mut config = chosen.clone();
                        config.push(*id);
                        (config, def.table, self.size(*id))
                    }
                    Move::Replace { old, new } => {
                        if !chosen.contains(old) || chosen.contains(new) {
                            continue;
                        }
                        let config: Vec<usize> = chosen
                            .iter()
                            .map(|c| if c == old { *new } else { *c })
                            .collect();
                        let added = self.size(*new) - self.size(*old);
                        (config, self.whatif.def(*new).table.clone(), added)
                    }
                };
                if used_bytes.saturating_add(added) > self.limits.budget_bytes {
                    continue;
                }
                let Some(new_plans) = self.plans_on(conn, &table, &config).await? else {
                    continue;
                };
                let mut benefit = 0.0;
                for (at, plan) in &new_plans {
                    let gain = plans[*at].cost - plan.cost;
                    if gain > plans[*at].cost * FRAGILE_GAIN
                        && self.fragile(conn, *at, &chosen, &config).await?
                    {
                        continue;
                    }
                    benefit += self.statements[*at].weight * gain;
                }
                benefit -=
                    self.write_cost_on(&table, &config) - self.write_cost_on(&table, &chosen);
                if benefit <= 1e-6 {
                    // Kept: it may pay off once the set changes (a replacement's base moves).
                    fresh.push((mv, 0.0));
                    continue;
                }
                let ratio = benefit / (added.max(8192) as f64);

                if best.as_ref().is_none_or(|(_, r, ..)| ratio > *r) {
                    if let Some((old_mv, old_ratio, ..)) = best.take() {
                        fresh.push((old_mv, old_ratio));
                    }
                    best = Some((mv, ratio, config, new_plans, added));
                } else {
                    fresh.push((mv, ratio));
                }
            }
            fresh.extend(rest);
            moves = fresh;
            let Some((mv, _, config, new_plans, added)) = best else {
                break;
            };
            let new_id = match mv {
                Move::Add(id) => {
                    steps.push(format!("+ {}", self.whatif.def(id).label()));
                    id
                }
                Move::Replace { old, new } => {
                    steps.push(format!(
                        "{} → {}",
                        self.whatif.def(old).label(),
                        self.whatif.def(new).label()
                    ));
                    moves.retain(|(m, _)| !matches!(m, Move::Replace { old: o, .. } if *o == old));
                    new
                }
            };
            chosen = config;
            used_bytes += added;
            for (at, plan) in new_plans {
                plans[at] = plan;
            }
            // An index the new one made idle (no plan uses it any more) goes: it would cost
            // space and writes for nothing.
            for idle in self.idle(&chosen, &plans) {
                let without: Vec<usize> = chosen.iter().copied().filter(|c| *c != idle).collect();
                let table = self.whatif.def(idle).table.clone();
                let Some(replanned) = self.plans_on(conn, &table, &without).await? else {
                    continue;
                };
                if replanned
                    .iter()
                    .all(|(at, p)| p.cost <= plans[*at].cost * (1.0 + 1e-9) + 1e-9)
                {
                    steps.push(format!("- {} (idle)", self.whatif.def(idle).label()));
                    used_bytes -= self.size(idle);
                    chosen = without;
                    for (at, plan) in replanned {
                        plans[at] = plan;
                    }
                }
            }
            progress(
                &steps.last().cloned().unwrap_or_default(),
                self.whatif.calls,
            );
            // Growing the new index: one more key column a statement on its table uses, or a
            // candidate that has it as a prefix.
            let def = self.whatif.def(new_id).clone();
            let mut grown: BTreeSet<IndexDef> = BTreeSet::new();
            if def.keys.len() < 4 && def.include.is_empty() {
                for statement in self.statements {
                    for key in statement.options.get(&def.table).into_iter().flatten() {
                        if def.keys.iter().any(|k| k.same_target(key)) {
                            continue;
                        }
                        let mut next = def.clone();
                        next.keys.push(key.clone());
                        grown.insert(next);
                    }
                }
            }
            // ... or the columns a statement reads there as INCLUDE, for an index-only scan.
            if def.include.is_empty() {
                for statement in self.statements {
                    let Some(reads) = statement.covering.get(&def.table) else {
                        continue;
                    };
                    let keyed: Vec<&str> = def.keys.iter().flat_map(Key::columns).collect();
                    let include: Vec<String> = reads
                        .iter()
                        .filter(|c| !keyed.contains(&c.as_str()))
                        .cloned()
                        .collect();
                    if !include.is_empty() && keyed.len() + include.len() <= 8 {
                        let mut next = def.clone();
                        next.include = include;
                        grown.insert(next);
                    }
                }
            }
            for candidate in candidates {
                let other = self.whatif.def(*candidate);
                // A candidate with it as a prefix, or the same keys with INCLUDE columns.
                let richer = def.is_prefix_of(other)
                    || (other.keys == def.keys
                        && other.predicate == def.predicate
                        && !other.include.is_empty());
                if other != &def && richer {
                    grown.insert(other.clone());
                }
            }
            for next in grown {
                let id = self.whatif.id(&next);
                moves.push((
                    Move::Replace {
                        old: new_id,
                        new: id,
                    },
                    f64::INFINITY,
                ));
            }
        }

        let mut write_costs = HashMap::new();
        for id in &chosen {
            write_costs.insert(*id, self.write_cost_of(*id, &chosen));
        }
        let sizes = chosen.iter().map(|id| (*id, self.size(*id))).collect();
        Ok(Selection {
            chosen,
            plans,
            sizes,
            write_costs,
            steps,
        })
    }
}
