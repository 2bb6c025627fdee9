//! The target's tables, columns, statistics and indexes, read in a few catalog queries.
//!
//! Only user tables (not `pg_catalog`, `information_schema`, `pg_toast`), and only valid
//! indexes. Sizes come from `pg_class.relpages`: the size functions take a lock on the relation,
//! and a table under `ACCESS EXCLUSIVE` would stall the analysis.

use std::collections::HashMap;

use sqlx::{PgConnection, Row as _};

use super::model::{Column, ExistingIndex, IndexDef, Key, Table, TableName, TableWrites};

/// The schemas whose tables are the user's.
const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

/// Every user table of the database `conn` is connected to, with its columns' statistics, its
/// valid indexes and its write counters since the statistics were last reset.
pub async fn read_tables(conn: &mut PgConnection) -> Result<Vec<Table>, sqlx::Error> {
    let table_rows = sqlx::query(&format!(
        "/* keel-optimizer */ SELECT c.oid::int8 AS oid, n.nspname, c.relname, \
                greatest(c.reltuples, 0)::float8 AS reltuples, c.relpages::int8 AS relpages, \
                coalesce(s.n_tup_ins, 0)::float8 AS ins, coalesce(s.n_tup_upd, 0)::float8 AS upd, \
                coalesce(s.n_tup_hot_upd, 0)::float8 AS hot, coalesce(s.n_tup_del, 0)::float8 AS del \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
         WHERE c.relkind IN ('r', 'm', 'p') AND {USER_SCHEMAS} \
         ORDER BY n.nspname, c.relname"
    ))
    .fetch_all(&mut *conn)
    .await?;
    let mut tables = Vec::with_capacity(table_rows.len());
    let mut by_oid: HashMap<i64, usize> = HashMap::new();
    for row in &table_rows {
        by_oid.insert(row.try_get("oid")?, tables.len());
        tables.push(Table {
            name: TableName {
                schema: row.try_get("nspname")?,
                name: row.try_get("relname")?,
            },
            rows: row.try_get("reltuples")?,
            pages: row.try_get("relpages")?,
            columns: Vec::new(),
            indexes: Vec::new(),
            writes: TableWrites {
                inserted: row.try_get("ins")?,
                updated: row.try_get("upd")?,
                hot_updated: row.try_get("hot")?,
                deleted: row.try_get("del")?,
            },
            updated_columns: Vec::new(),
        });
    }
    if tables.is_empty() {
        return Ok(tables);
    }

    let columns = sqlx::query(&format!(
        "/* keel-optimizer */ SELECT a.attrelid::int8 AS oid, a.attname, \
                format_type(a.atttypid, a.atttypmod) AS type_name, t.typlen::int2 AS typlen, \
                t.typalign::text AS typalign, a.attnotnull, \
                s.avg_width::float8 AS avg_width, s.n_distinct::float8 AS n_distinct, \
                coalesce(s.null_frac, 0)::float8 AS null_frac, s.correlation::float8 AS correlation, \
                s.most_common_vals::text::text[] AS mcv, s.most_common_freqs::float8[] AS mcf, \
                s.histogram_bounds::text::text[] AS hist \
         FROM pg_attribute a \
         JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_type t ON t.oid = a.atttypid \
         LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname \
                             AND s.attname = a.attname AND NOT s.inherited \
         WHERE c.relkind IN ('r', 'm', 'p') AND {USER_SCHEMAS} AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attrelid, a.attnum"
    ))
    .fetch_all(&mut *conn)
    .await?;
    for row in &columns {
        let Some(&at) = by_oid.get(&row.try_get::<i64, _>("oid")?) else {
            continue;
        };
        let table = &mut tables[at];
        let n_distinct: Option<f64> = row.try_get("n_distinct")?;
        let align: String = row.try_get("typalign")?;
        table.columns.push(Column {
            name: row.try_get("attname")?,
            type_name: row.try_get("type_name")?,
            type_len: row.try_get("typlen")?,
            type_align: align.chars().next().unwrap_or('i'),
            not_null: row.try_get("attnotnull")?,
            avg_width: row.try_get("avg_width")?,
            // pg_stats gives a negative fraction of the rows when distinct values grow with the
            // table; the advisor wants a count.
            n_distinct: n_distinct.map(|d| {
                if d < 0.0 {
                    (-d * table.rows).max(1.0)
                } else {
                    d
                }
            }),
            null_frac: row.try_get("null_frac")?,
            correlation: row.try_get("correlation")?,
            most_common_vals: row
                .try_get::<Option<Vec<String>>, _>("mcv")?
                .unwrap_or_default(),
            most_common_freqs: row
                .try_get::<Option<Vec<f64>>, _>("mcf")?
                .unwrap_or_default(),
            histogram_bounds: row
                .try_get::<Option<Vec<String>>, _>("hist")?
                .unwrap_or_default(),
        });
    }

    let indexes = sqlx::query(&format!(
        "/* keel-optimizer */ SELECT i.indrelid::int8 AS oid, ic.relname AS index_name, \
                pg_get_indexdef(i.indexrelid) AS ddl, i.indisunique, \
                (i.indisprimary OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)) AS backs, \
                coalesce(s.idx_scan, 0)::int8 AS scans, (ic.relpages::int8 * current_setting('block_size')::int8) AS bytes, \
                i.indnkeyatts::int4 AS nkeys, am.amname, \
                pg_get_expr(i.indpred, i.indrelid) AS predicate, \
                ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnatts) k) AS keys, \
                ARRAY(SELECT (i.indoption[k - 1] & 1) = 1 FROM generate_series(1, i.indnkeyatts) k) AS descs, \
                ARRAY(SELECT i.indkey[k - 1] = 0 FROM generate_series(1, i.indnatts) k) AS exprs \
         FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
         JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_am am ON am.oid = ic.relam \
         LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid \
         WHERE i.indisvalid AND c.relkind IN ('r', 'm', 'p') AND {USER_SCHEMAS} \
         ORDER BY i.indrelid, ic.relname"
    ))
    .fetch_all(&mut *conn)
    .await?;
    for row in &indexes {
        let Some(&at) = by_oid.get(&row.try_get::<i64, _>("oid")?) else {
            continue;
        };
        let table = &mut tables[at];
        let keys: Vec<String> = row.try_get("keys")?;
        let descs: Vec<bool> = row.try_get("descs")?;
        let exprs: Vec<bool> = row.try_get("exprs")?;
        let nkeys = usize::try_from(row.try_get::<i32, _>("nkeys")?).unwrap_or(0);
        let amname: String = row.try_get("amname")?;
        let column_names: Vec<&str> = table.columns.iter().map(|c| c.name.as_str()).collect();
        let mut def = IndexDef {
            table: table.name.clone(),
            keys: Vec::new(),
            include: Vec::new(),
            predicate: row.try_get("predicate")?,
        };
        for (position, key) in keys.iter().enumerate() {
            let is_expression = exprs.get(position).copied().unwrap_or(false);
            let column = unquote(key);
            if position >= nkeys {
                def.include.push(column);
                continue;
            }
            def.keys.push(if is_expression {
                let columns = column_names
                    .iter()
                    .filter(|c| mentions(key, c))
                    .map(|c| (*c).to_owned())
                    .collect();
                Key::Expression {
                    sql: key.trim_start_matches('(').trim_end_matches(')').to_owned(),
                    columns,
                }
            } else {
                Key::Column {
                    name: column,
                    descending: descs.get(position).copied().unwrap_or(false),
                }
            });
        }
        // Only B-trees serve the searches the advisor proposes; a GIN or hash index is kept
        // as a fact about the table (its size, its write cost) but serves no candidate.
        if amname != "btree" {
            def.keys.clear();
        }
        table.indexes.push(ExistingIndex {
            name: row.try_get("index_name")?,
            def,
            ddl: row.try_get("ddl")?,
            unique: row.try_get("indisunique")?,
            backs_constraint: row.try_get("backs")?,
            scans: row.try_get("scans")?,
            size_bytes: row.try_get("bytes")?,
        });
    }
    Ok(tables)
}

/// An identifier as `pg_get_indexdef` prints it, without its quotes.
fn unquote(ident: &str) -> String {
    match ident.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => ident.to_owned(),
    }
}

/// Whether `expression` mentions `column` as a whole word.
fn mentions(expression: &str, column: &str) -> bool {
    expression.match_indices(column).any(|(at, _)| {
        let before = expression[..at].chars().next_back();
        let after = expression[at + column.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !word(before) && !word(after)
    })
}

/// The table `name` among `tables`.
pub fn find<'a>(tables: &'a [Table], name: &TableName) -> Option<&'a Table> {
    tables.iter().find(|t| &t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_whole_words() {
        assert!(mentions("lower(email)", "email"));
        assert!(!mentions("lower(email_2)", "email"));
        assert_eq!(unquote("\"Odd\"\"Name\""), "Odd\"Name");
    }
}
