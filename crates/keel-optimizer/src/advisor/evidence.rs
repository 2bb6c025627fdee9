//! The evidence behind each recommendation, and the plain-language explanation written from it.
//! Every sentence is built from a measured or estimated fact; nothing is said that the numbers
//! beside it do not show.

use std::collections::HashMap;
use std::fmt::Write as _;

use sqlx::PgConnection;

use super::model::{Table, TableName};
use super::select::{Selection, Statement, Update};
use super::whatif::{WhatIf, WhatIfError};
use super::{DropAdvice, DropReason, Effect, Recommendation, StatementReport};

/// Bytes in a readable unit.
pub fn bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} GB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n >= 1024.0 * 1024.0 {
        format!("{:.1} MB", n / (1024.0 * 1024.0))
    } else {
        format!("{:.0} kB", n / 1024.0)
    }
}

fn short(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > 90 {
        format!("{}…", flat.chars().take(90).collect::<String>())
    } else {
        flat
    }
}

/// One recommendation per chosen index, best first, each with the statements it helps.
pub async fn recommendations(
    conn: &mut PgConnection,
    whatif: &mut WhatIf,
    statements: &[Statement],
    selection: &Selection,
    reports: &[StatementReport],
    statement_report: &[usize],
) -> Result<Vec<Recommendation>, sqlx::Error> {
    let mut out = Vec::new();
    for id in &selection.chosen {
        let def = whatif.def(*id).clone();
        let without: Vec<usize> = selection
            .chosen
            .iter()
            .copied()
            .filter(|c| c != id)
            .collect();
        let mut effects = Vec::new();
        let mut benefit = 0.0;
        for (at, statement) in statements.iter().enumerate() {
            if !statement.planned.tables.contains(&def.table) {
                continue;
            }
            let after = &selection.plans[at];
            let uses = after
                .indexes
                .iter()
                .any(|name| whatif.by_name(name) == Some(*id));
            let plan_without = match whatif.plan(conn, at, &statement.planned, &without).await {
                Ok(plan) => plan,
                Err(WhatIfError::Session(error)) => return Err(error),
                Err(WhatIfError::Unplannable(_)) => statement.base.clone(),
            };
            benefit += statement.weight * (plan_without.cost - after.cost);
            if !uses {
                continue;
            }
            let report = &reports[statement_report[at]];
            let names = |name: &str| whatif.by_name(name).map(|i| whatif.def(i).label());
            effects.push(Effect {
                query_id: report.query_id,
                text: report.text.clone(),
                cost_before: statement.base.cost,
                cost_after: after.cost,
                plan_before: statement.base.shape(&names),
                plan_after: after.shape(&names),
                share_of_time: report.share_of_time,
            });
        }
        let write_cost = selection.write_costs.get(id).copied().unwrap_or(0.0);
        let estimated_bytes = selection.sizes.get(id).copied().unwrap_or(0);
        let hypopg_bytes = whatif.hypopg_size(conn, *id).await.ok();
        let share_of_time = effects
            .iter()
            .map(|e| e.share_of_time)
            .sum::<f64>()
            .min(1.0);
        effects.sort_by(|a, b| {
            (b.cost_before - b.cost_after).total_cmp(&(a.cost_before - a.cost_after))
        });
        let mut recommendation = Recommendation {
            index: def,
            estimated_bytes,
            hypopg_bytes,
            write_cost,
            benefit: benefit - write_cost,
            effects,
            share_of_time,
            explanation: String::new(),
        };
        recommendation.explanation = explain(&recommendation);
        out.push(recommendation);
    }
    out.sort_by(|a, b| b.benefit.total_cmp(&a.benefit));
    Ok(out)
}

/// The explanation of one recommendation, from its facts.
pub fn explain(r: &Recommendation) -> String {
    let mut text = String::new();
    let n = r.effects.len();
    let _ = write!(
        text,
        "An index on {} would serve {} statement{}",
        r.index.label(),
        n,
        if n == 1 { "" } else { "s" }
    );
    if r.share_of_time > 0.0 {
        let _ = write!(
            text,
            " taking {:.1}% of the instance's query time",
            r.share_of_time * 100.0
        );
    }
    text.push('.');
    if let Some(top) = r.effects.first() {
        let cut = if top.cost_before > 0.0 {
            (1.0 - top.cost_after / top.cost_before) * 100.0
        } else {
            0.0
        };
        let _ = write!(
            text,
            " The most helped, `{}`, is planned today as {} (cost {:.0}); with the index as {} \
             (cost {:.0}), {:.1}% cheaper.",
            short(&top.text),
            top.plan_before,
            top.cost_before,
            top.plan_after,
            top.cost_after,
            cut
        );
    }
    let _ = write!(
        text,
        " Estimated size {} from the table's statistics",
        bytes(r.estimated_bytes)
    );
    if let Some(hypopg) = r.hypopg_bytes {
        let _ = write!(text, " (HypoPG estimates {})", bytes(hypopg));
    }
    text.push('.');
    if r.write_cost > 0.0 {
        let _ = write!(
            text,
            " Keeping it up to date costs about {:.0} planner cost units of writes over the window, \
             against a read saving of {:.0}.",
            r.write_cost,
            r.benefit + r.write_cost
        );
    } else {
        text.push_str(" The workload shows no writes to this table, so it adds no write cost.");
    }
    text
}

/// Existing indexes to drop: unused ones (no scan since the statistics were reset) and
/// redundant ones (the same keys as, or a prefix of, another B-tree on the table). Indexes that
/// back a constraint or are unique stay: they enforce something.
pub fn drops(
    tables: &[Table],
    writes: &HashMap<TableName, (f64, f64, Vec<Update>)>,
    write_cost_per_row: f64,
) -> Vec<DropAdvice> {
    let mut out = Vec::new();
    for table in tables {
        let entries = writes.get(&table.name).map_or(0.0, |(ins, _, updates)| {
            ins + updates.iter().map(|u| u.rows).sum::<f64>()
        });
        let write_cost = entries * write_cost_per_row;
        for index in &table.indexes {
            if index.backs_constraint || index.unique || index.def.keys.is_empty() {
                continue;
            }
            let covering = table.indexes.iter().find(|other| {
                other.name != index.name
                    && !other.def.keys.is_empty()
                    && index.def.include.is_empty()
                    && index.def.is_prefix_of(&other.def)
                    // Of two identical indexes, the later name goes.
                    && (other.def.keys.len() > index.def.keys.len() || other.name < index.name)
            });
            let (reason, why) = if let Some(other) = covering {
                (
                    DropReason::Redundant(other.name.clone()),
                    format!(
                        "{} on {} is redundant: {} has the same leading keys and serves every \
                         search it does.",
                        index.name, table.name, other.name
                    ),
                )
            } else if index.scans == 0 {
                (
                    DropReason::Unused,
                    format!(
                        "{} on {} has not been scanned since the statistics were last reset.",
                        index.name, table.name
                    ),
                )
            } else {
                continue;
            };
            out.push(DropAdvice {
                table: table.name.clone(),
                index: index.name.clone(),
                ddl: index.ddl.clone(),
                reason,
                size_bytes: index.size_bytes,
                write_cost,
                explanation: format!(
                    "{why} Dropping it frees {} and about {write_cost:.0} planner cost units of \
                     writes over the window.",
                    bytes(index.size_bytes)
                ),
            });
        }
    }
    out
}
