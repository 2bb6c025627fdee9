//! Candidate indexes from statement shapes.
//!
//! A candidate is cheap to propose and costly to judge (each one is a what-if plan per statement
//! it might serve), so this proposes only the shapes a B-tree can serve a statement with: one
//! column per search, the composite a DBA would write (equality first, then one range or the
//! sort), its covering and partial variants, expression keys; and drops what the table already
//! has or is too small to need.

use super::model::{IndexDef, Key, Table, TableName};
use super::shape::{StatementShape, TableUse};

/// Tables with fewer rows are read whole about as fast as through any index.
pub const MIN_ROWS: f64 = 1000.0;
/// Key columns per candidate: past this, an index is rarely worth its size and write cost.
pub const MAX_KEYS: usize = 4;
/// Key plus `INCLUDE` columns of a covering candidate: a wider one is a second copy of the table.
pub const MAX_COVERING: usize = 8;
/// A single-column candidate gets a covering variant only when the statement reads at most this
/// many of the table's columns (else the composite's covering variant is the one worth costing).
const SINGLE_COVERING_REFERENCED: usize = 6;

/// Candidate indexes for one statement, for every table it uses (looked up in `tables`).
///
/// Tables not in `tables` or smaller than [`MIN_ROWS`] get none. Every candidate has 1 to
/// [`MAX_KEYS`] keys, none repeats another, and none is already served by a valid index of the
/// table (its keys a prefix of that index's, same predicate, its `INCLUDE` columns held there).
pub fn for_statement(shape: &StatementShape, tables: &[Table]) -> Vec<IndexDef> {
    let mut out = Vec::new();
    for (i, u) in shape.tables.iter().enumerate() {
        let Some(name) = &u.table else {
            continue;
        };
        let Some(table) = tables.iter().find(|t| &t.name == name) else {
            continue;
        };
        if table.rows < MIN_ROWS {
            continue;
        }
        // An index can only deliver the statement's order when the ORDER BY is this table's
        // alone.
        let order_here =
            !u.order_by.is_empty()
                && shape.tables.iter().enumerate().all(|(j, other)| {
                    j == i || other.order_by.is_empty() || other.table == u.table
                });
        for def in table_candidates(u, table, order_here) {
            push(&mut out, def, table);
        }
    }
    out
}

/// The keys the selection may append to an index it has chosen for `table` (Extend): the
/// columns the statement searches, joins, sorts or groups on, each once, ascending except for
/// `ORDER BY` columns, which keep the statement's direction so the extended index can still
/// deliver the order.
pub fn column_options(shape: &StatementShape, table: &TableName) -> Vec<Key> {
    let uses: Vec<&TableUse> = shape
        .tables
        .iter()
        .filter(|u| u.table.as_ref() == Some(table))
        .collect();
    let descending = |column: &str| {
        uses.iter()
            .flat_map(|u| &u.order_by)
            .find(|(c, _)| c == column)
            .is_some_and(|(_, d)| *d)
    };
    let mut out: Vec<Key> = Vec::new();
    for u in &uses {
        let names = u
            .equality
            .iter()
            .chain(&u.range)
            .chain(&u.join)
            .chain(u.order_by.iter().map(|(c, _)| c))
            .chain(&u.group_by);
        for name in names {
            if out.iter().any(|k| k.columns() == [name.as_str()]) {
                continue;
            }
            out.push(Key::Column {
                name: name.clone(),
                descending: descending(name),
            });
        }
    }
    out
}

/// The candidates for one table's use, before deduplication and the existing-index check.
fn table_candidates(u: &TableUse, table: &Table, order_here: bool) -> Vec<IndexDef> {
    let known = |c: &String| table.column(c).is_some();
    let mut equality: Vec<&String> = u.equality.iter().filter(|c| known(c)).collect();
    // More distinct values first: the leading column narrows the search the most.
    equality.sort_by(|a, b| distinct(table, b).total_cmp(&distinct(table, a)));
    let range: Vec<&String> = u.range.iter().filter(|c| known(c)).collect();
    let join: Vec<&String> = u.join.iter().filter(|c| known(c)).collect();
    let order: Vec<(&String, bool)> = u
        .order_by
        .iter()
        .filter(|(c, _)| known(c))
        .map(|(c, d)| (c, *d))
        .collect();
    let group: Vec<&String> = u.group_by.iter().filter(|c| known(c)).collect();
    let referenced: Vec<&String> = u.referenced.iter().filter(|c| known(c)).collect();

    let plain = |name: &str| Key::column(name);
    let index = |keys: Vec<Key>, predicate: Option<&str>| IndexDef {
        table: table.name.clone(),
        keys: limit(keys),
        include: Vec::new(),
        predicate: predicate.map(str::to_owned),
    };
    let equality_keys: Vec<Key> = equality.iter().map(|c| plain(c)).collect();
    // `ORDER BY` keys after equality columns (an equality column is constant: not a sort key).
    let order_keys = |skip: &[&String]| -> Vec<Key> {
        order
            .iter()
            .filter(|(c, _)| !skip.contains(c))
            .map(|(c, d)| Key::Column {
                name: (*c).clone(),
                descending: *d,
            })
            .collect()
    };

    let mut out = Vec::new();

    // Single columns.
    let mut singles: Vec<&String> = Vec::new();
    for c in equality
        .iter()
        .chain(&range)
        .chain(&join)
        .chain(order.iter().map(|(c, _)| c))
        .chain(&group)
    {
        if !singles.contains(c) {
            singles.push(c);
        }
    }
    let single_defs: Vec<IndexDef> = singles
        .iter()
        .map(|c| index(vec![plain(c)], None))
        .collect();

    // The composites: equality, then one range column or the sort; equality then a join column.
    let mut ideals: Vec<IndexDef> = Vec::new();
    if let Some(r) = range.iter().find(|r| !equality.contains(r)) {
        let mut keys = equality_keys.clone();
        keys.push(plain(r));
        ideals.push(index(keys, None));
    }
    if order_here {
        let sort = order_keys(&equality);
        if !sort.is_empty() {
            let mut keys = equality_keys.clone();
            keys.extend(sort);
            ideals.push(index(keys, None));
        }
    }
    let first_range = range.iter().find(|r| !equality.contains(r));
    for j in join.iter().filter(|j| !equality.contains(j)) {
        // The inner side of a nested loop: searched on the join column per outer row, then
        // filtered on the range.
        let mut keys = equality_keys.clone();
        keys.push(plain(j));
        if !equality.is_empty() {
            ideals.push(index(keys.clone(), None));
        }
        if let Some(r) = first_range.filter(|r| **r != *j) {
            keys.push(plain(r));
            ideals.push(index(keys, None));
        }
    }
    if equality.len() > 1 {
        ideals.push(index(equality_keys.clone(), None));
    }

    // Covering variants: the same searches answered from the index alone.
    let mut covering: Vec<IndexDef> = Vec::new();
    if !u.all_columns {
        let singles_too = referenced.len() <= SINGLE_COVERING_REFERENCED;
        let bases = ideals
            .iter()
            .chain(single_defs.iter().filter(|_| singles_too));
        for base in bases {
            let held: Vec<&str> = base.keys.iter().flat_map(Key::columns).collect();
            let include: Vec<String> = referenced
                .iter()
                .filter(|c| !held.contains(&c.as_str()))
                .map(|c| (*c).clone())
                .collect();
            if include.is_empty() || base.keys.len() + include.len() > MAX_COVERING {
                continue;
            }
            covering.push(IndexDef {
                include,
                ..base.clone()
            });
        }
    }

    // Partial variants: the rows a constant predicate keeps, searched on the rest.
    let mut partial: Vec<IndexDef> = Vec::new();
    for predicate in &u.constant_predicates {
        if !known(&predicate.column) {
            continue;
        }
        let others: Vec<&String> = equality
            .iter()
            .copied()
            .filter(|c| **c != predicate.column)
            .collect();
        let other_keys: Vec<Key> = others.iter().map(|c| plain(c)).collect();
        let mut variants: Vec<Vec<Key>> = Vec::new();
        if let Some(r) = range
            .iter()
            .find(|r| **r != &predicate.column && !others.contains(r))
        {
            let mut keys = other_keys.clone();
            keys.push(plain(r));
            variants.push(keys);
        }
        if order_here {
            let mut skip = others.clone();
            skip.push(&predicate.column);
            let sort = order_keys(&skip);
            if !sort.is_empty() {
                let mut keys = other_keys.clone();
                keys.extend(sort);
                variants.push(keys);
            }
        }
        if variants.is_empty() && !other_keys.is_empty() {
            variants.push(other_keys);
        }
        if variants.is_empty() {
            // Nothing else searched: the rows kept, reached through a join or by the tested
            // column itself.
            for j in join.iter().filter(|j| ***j != predicate.column) {
                variants.push(vec![plain(j)]);
            }
            variants.push(vec![plain(&predicate.column)]);
        }
        for keys in variants {
            partial.push(index(keys, Some(&predicate.sql)));
        }
    }

    // Expression keys, alone and after the equality columns.
    let mut expressions: Vec<IndexDef> = Vec::new();
    for expression in &u.expressions {
        let Key::Expression { columns, .. } = expression else {
            continue;
        };
        if !columns.iter().all(known) {
            continue;
        }
        expressions.push(index(vec![expression.clone()], None));
        if !equality_keys.is_empty() {
            let mut keys = equality_keys.clone();
            keys.push(expression.clone());
            expressions.push(index(keys, None));
        }
    }

    out.extend(single_defs);
    out.extend(ideals);
    out.extend(covering);
    out.extend(partial);
    out.extend(expressions);
    out
}

fn distinct(table: &Table, column: &str) -> f64 {
    table
        .column(column)
        .and_then(|c| c.n_distinct)
        .unwrap_or(-1.0)
}

/// Keys with repeats dropped, at most [`MAX_KEYS`].
fn limit(keys: Vec<Key>) -> Vec<Key> {
    let mut out: Vec<Key> = Vec::new();
    for key in keys {
        if out.len() == MAX_KEYS {
            break;
        }
        if !out.iter().any(|k| k.same_target(&key)) {
            out.push(key);
        }
    }
    out
}

/// Adds `def` unless it is empty, already proposed, or served by an index `table` has.
fn push(out: &mut Vec<IndexDef>, def: IndexDef, table: &Table) {
    if def.keys.is_empty() || out.contains(&def) {
        return;
    }
    let served = table.indexes.iter().any(|existing| {
        def.is_prefix_of(&existing.def) && {
            let held = existing.def.columns();
            def.include.iter().all(|c| held.contains(&c.as_str()))
        }
    });
    if !served {
        out.push(def);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisor::model::ExistingIndex;
    use crate::advisor::parse::analyze;
    use crate::advisor::parse::tests::{TPCH, app, tpch};

    fn candidates(sql: &str, tables: &[Table]) -> Vec<IndexDef> {
        let shape = match analyze(sql, tables) {
            Ok(shape) => shape,
            Err(e) => panic!("{sql}: {e}"),
        };
        for_statement(&shape, tables)
    }

    fn labels(defs: &[IndexDef]) -> Vec<String> {
        defs.iter().map(IndexDef::label).collect()
    }

    fn has(defs: &[IndexDef], label: &str) -> bool {
        defs.iter().any(|d| d.label() == label)
    }

    fn with_primary_key(mut tables: Vec<Table>, table: &str, column: &str) -> Vec<Table> {
        for t in &mut tables {
            if t.name.name == table && t.name.schema == "public" {
                t.indexes.push(ExistingIndex {
                    name: format!("{table}_pkey"),
                    def: IndexDef::on(t.name.clone(), &[column]),
                    ddl: String::new(),
                    unique: true,
                    backs_constraint: true,
                    scans: 0,
                    size_bytes: 0,
                });
            }
        }
        tables
    }

    #[test]
    fn ideal_composite_puts_selective_equality_first_then_the_sort() {
        let defs = candidates(
            "select id, total from orders where status = $1 and account_id = $2 \
             order by created_at desc limit 20",
            &app(),
        );
        let all = labels(&defs);
        assert!(
            has(&defs, "orders(account_id, status, created_at DESC)"),
            "{all:?}"
        );
        assert!(
            has(
                &defs,
                "orders(account_id, status, created_at DESC) INCLUDE (id, total)"
            ),
            "{all:?}"
        );
        for single in ["account_id", "status", "created_at"] {
            assert!(has(&defs, &format!("orders({single})")), "{all:?}");
        }
        // No two the same, none wider than four keys.
        for (i, d) in defs.iter().enumerate() {
            assert!(!defs[i + 1..].contains(d), "{all:?}");
            assert!(!d.keys.is_empty() && d.keys.len() <= MAX_KEYS);
        }
    }

    #[test]
    fn range_after_equality() {
        let defs = candidates(
            "select count(*) from orders where account_id = $1 and created_at >= $2",
            &app(),
        );
        assert!(
            has(&defs, "orders(account_id, created_at)"),
            "{:?}",
            labels(&defs)
        );
    }

    #[test]
    fn partial_index_for_a_constant_predicate() {
        let defs = candidates(
            "select id from orders where status = 'pending' order by created_at limit 10",
            &app(),
        );
        assert!(
            has(&defs, "orders(created_at) WHERE status = 'pending'"),
            "{:?}",
            labels(&defs)
        );
        let defs = candidates("select id from orders where deleted_at is null", &app());
        assert!(
            has(&defs, "orders(deleted_at) WHERE deleted_at IS NULL"),
            "{:?}",
            labels(&defs)
        );
    }

    #[test]
    fn existing_primary_key_serves_its_prefix() {
        let tables = with_primary_key(app(), "orders", "id");
        let defs = candidates("select total from orders where id = $1", &tables);
        assert!(!has(&defs, "orders(id)"), "{:?}", labels(&defs));
        // The covering variant is not served by the key alone.
        assert!(
            has(&defs, "orders(id) INCLUDE (total)"),
            "{:?}",
            labels(&defs)
        );
        let defs = candidates("select * from orders where id = $1", &tables);
        assert!(defs.is_empty(), "{:?}", labels(&defs));
    }

    #[test]
    fn expression_keys() {
        let defs = candidates("select id from users where lower(email) = $1", &app());
        let expression = defs.iter().find(
            |d| matches!(d.keys.as_slice(), [Key::Expression { sql, .. }] if sql == "lower(email)"),
        );
        let Some(expression) = expression else {
            panic!("{:?}", labels(&defs));
        };
        assert_eq!(
            expression.hypothetical_ddl(),
            "CREATE INDEX ON public.users ((lower(email)))"
        );
        let defs = candidates(
            "select id from users where lower(email) = $1 and name = $2",
            &app(),
        );
        assert!(
            has(&defs, "users(name, (lower(email)))"),
            "{:?}",
            labels(&defs)
        );
    }

    #[test]
    fn small_and_unknown_tables_get_nothing() {
        let defs = candidates("select id from audit.events where id = $1", &app());
        assert!(defs.is_empty(), "{:?}", labels(&defs));
        let defs = candidates("select * from nowhere where x = $1", &app());
        assert!(defs.is_empty());
    }

    #[test]
    fn no_covering_for_select_star_and_at_most_four_keys() {
        let defs = candidates(
            "select * from lineitem where l_orderkey = $1 and l_partkey = $2 and l_suppkey = $3 \
             and l_linenumber = $4 and l_shipmode = $5 and l_returnflag = $6",
            &tpch(),
        );
        assert!(!defs.is_empty());
        assert!(defs.iter().all(|d| d.include.is_empty()));
        assert!(defs.iter().all(|d| d.keys.len() <= MAX_KEYS));
        assert!(defs.iter().any(|d| d.keys.len() == MAX_KEYS));
    }

    #[test]
    fn tpch_q3_joins() {
        let defs = candidates(TPCH[2], &tpch());
        let all = labels(&defs);
        for label in [
            "lineitem(l_orderkey)",
            "orders(o_orderkey)",
            "orders(o_custkey)",
            "customer(c_mktsegment)",
            "customer(c_mktsegment, c_custkey)",
            "customer(c_custkey) WHERE c_mktsegment = 'BUILDING'",
            "orders(o_custkey, o_orderdate)",
            "lineitem(l_shipdate)",
        ] {
            assert!(has(&defs, label), "{label} not in {all:?}");
        }
        // Every TPC-H query gives candidates without panicking.
        for sql in TPCH {
            let _ = candidates(sql, &tpch());
        }
    }

    #[test]
    fn column_options_keep_the_sort_direction() {
        let tables = app();
        let shape = match analyze(
            "select id from orders where account_id = $1 and total > $2 \
             order by created_at desc",
            &tables,
        ) {
            Ok(shape) => shape,
            Err(e) => panic!("{e}"),
        };
        let orders = tables[0].name.clone();
        assert_eq!(
            column_options(&shape, &orders),
            vec![
                Key::column("account_id"),
                Key::column("total"),
                Key::Column {
                    name: "created_at".into(),
                    descending: true
                },
            ]
        );
        let users = tables[1].name.clone();
        assert!(column_options(&shape, &users).is_empty());
    }
}
