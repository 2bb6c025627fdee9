//! What the advisor works on: the target's tables as the statistics describe them, the indexes
//! it already has, and index definitions (candidate or existing) in one comparable shape.

use std::fmt::{self, Write as _};

/// A table's schema-qualified name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// Schema (namespace) name.
    pub schema: String,
    /// Table name.
    pub name: String,
}

impl TableName {
    /// `schema.name`, each part quoted where it needs to be.
    pub fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One column as `pg_attribute`, `pg_type` and `pg_stats` describe it.
#[derive(Debug, Clone, Default)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type name as `format_type` prints it (`integer`, `character varying(40)`).
    pub type_name: String,
    /// `pg_type.typlen`: a fixed width in bytes, or -1 (varlena) / -2 (cstring).
    pub type_len: i16,
    /// `pg_type.typalign`: `c`, `s`, `i` or `d` (1, 2, 4, 8 bytes).
    pub type_align: char,
    /// Whether the column is `NOT NULL`.
    pub not_null: bool,
    /// `pg_stats.avg_width` (bytes of the stored value), if analyzed.
    pub avg_width: Option<f64>,
    /// Distinct values, as an absolute count (pg_stats' negative fractions resolved with the
    /// table's row count), if analyzed.
    pub n_distinct: Option<f64>,
    /// `pg_stats.null_frac`.
    pub null_frac: f64,
    /// `pg_stats.correlation` between the column's order and the heap's.
    pub correlation: Option<f64>,
    /// `pg_stats.most_common_vals`, as text.
    pub most_common_vals: Vec<String>,
    /// `pg_stats.most_common_freqs`, matching `most_common_vals`.
    pub most_common_freqs: Vec<f64>,
    /// `pg_stats.histogram_bounds`, as text.
    pub histogram_bounds: Vec<String>,
}

/// How often a table is written, over the same window as the workload's reads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TableWrites {
    /// Rows inserted.
    pub inserted: f64,
    /// Rows updated.
    pub updated: f64,
    /// Of the updated rows, those updated as heap-only tuples (no index touched).
    pub hot_updated: f64,
    /// Rows deleted.
    pub deleted: f64,
}

/// One table of the target database.
#[derive(Debug, Clone)]
pub struct Table {
    /// Its name.
    pub name: TableName,
    /// `pg_class.reltuples` (never below 0).
    pub rows: f64,
    /// `pg_class.relpages`.
    pub pages: i64,
    /// Columns in attribute order (dropped ones left out).
    pub columns: Vec<Column>,
    /// Its valid indexes.
    pub indexes: Vec<ExistingIndex>,
    /// Its writes over the workload's window.
    pub writes: TableWrites,
    /// Columns that the workload's `UPDATE`s change, with the rows those updates touched.
    pub updated_columns: Vec<(String, f64)>,
}

impl Table {
    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// An index the target already has.
#[derive(Debug, Clone)]
pub struct ExistingIndex {
    /// Index name (in the table's schema).
    pub name: String,
    /// Its definition in the advisor's shape.
    pub def: IndexDef,
    /// `pg_get_indexdef`.
    pub ddl: String,
    /// Whether it is unique.
    pub unique: bool,
    /// Whether it backs a constraint (primary key, unique, exclusion): never dropped.
    pub backs_constraint: bool,
    /// `pg_stat_user_indexes.idx_scan`.
    pub scans: i64,
    /// Size in bytes (from `pg_class.relpages`).
    pub size_bytes: i64,
}

/// One key of an index: a column or an expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A plain column, ascending or descending.
    Column {
        /// Column name.
        name: String,
        /// `DESC`.
        descending: bool,
    },
    /// An expression such as `lower(email)`, as deparsed SQL, with the columns it reads.
    Expression {
        /// The expression's SQL.
        sql: String,
        /// Columns it reads.
        columns: Vec<String>,
    },
}

impl Key {
    /// An ascending column key.
    pub fn column(name: impl Into<String>) -> Self {
        Key::Column {
            name: name.into(),
            descending: false,
        }
    }

    /// The columns this key reads.
    pub fn columns(&self) -> Vec<&str> {
        match self {
            Key::Column { name, .. } => vec![name.as_str()],
            Key::Expression { columns, .. } => columns.iter().map(String::as_str).collect(),
        }
    }

    /// Whether `self` and `other` index the same thing (direction aside).
    pub fn same_target(&self, other: &Key) -> bool {
        match (self, other) {
            (Key::Column { name: a, .. }, Key::Column { name: b, .. }) => a == b,
            (Key::Expression { sql: a, .. }, Key::Expression { sql: b, .. }) => a == b,
            _ => false,
        }
    }

    fn sql(&self) -> String {
        match self {
            Key::Column { name, descending } => {
                let mut out = quote_ident(name);
                if *descending {
                    out.push_str(" DESC");
                }
                out
            }
            Key::Expression { sql, .. } => format!("({sql})"),
        }
    }
}

/// A B-tree index definition, candidate or existing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexDef {
    /// The table it indexes.
    pub table: TableName,
    /// Its keys, in order.
    pub keys: Vec<Key>,
    /// `INCLUDE` columns (stored in leaves, not searchable).
    pub include: Vec<String>,
    /// A partial index's predicate, as SQL (`status = 'pending'`).
    pub predicate: Option<String>,
}

impl IndexDef {
    /// A plain index on `columns` of `table`.
    pub fn on(table: TableName, columns: &[&str]) -> Self {
        Self {
            table,
            keys: columns.iter().map(|c| Key::column(*c)).collect(),
            include: Vec::new(),
            predicate: None,
        }
    }

    /// The part after `ON`: `schema.table (keys) INCLUDE (...) WHERE ...`.
    fn body(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(Key::sql).collect();
        let mut out = format!("{} ({})", self.table.sql(), keys.join(", "));
        if !self.include.is_empty() {
            let include: Vec<String> = self.include.iter().map(|c| quote_ident(c)).collect();
            let _ = write!(out, " INCLUDE ({})", include.join(", "));
        }
        if let Some(predicate) = &self.predicate {
            let _ = write!(out, " WHERE {predicate}");
        }
        out
    }

    /// The statement HypoPG takes (`hypopg_create_index`).
    pub fn hypothetical_ddl(&self) -> String {
        format!("CREATE INDEX ON {}", self.body())
    }

    /// The statement that builds it for real without blocking writes.
    pub fn create_ddl(&self, index_name: &str) -> String {
        format!(
            "CREATE INDEX CONCURRENTLY {} ON {}",
            quote_ident(index_name),
            self.body()
        )
    }

    /// Every column it reads (keys, expressions, include, predicate columns are not known here).
    pub fn columns(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.keys.iter().flat_map(Key::columns).collect();
        out.extend(self.include.iter().map(String::as_str));
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether `self`'s keys are a prefix of `other`'s (or equal), on the same table with the
    /// same predicate: then `other` serves every search `self` would.
    pub fn is_prefix_of(&self, other: &IndexDef) -> bool {
        self.table == other.table
            && self.predicate == other.predicate
            && self.keys.len() <= other.keys.len()
            && self
                .keys
                .iter()
                .zip(&other.keys)
                .all(|(a, b)| a.same_target(b))
    }

    /// A short, readable label: `orders(account_id, created_at DESC) INCLUDE (total)`.
    pub fn label(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(Key::sql).collect();
        let mut out = format!("{}({})", self.table.name, keys.join(", "));
        if !self.include.is_empty() {
            let _ = write!(out, " INCLUDE ({})", self.include.join(", "));
        }
        if let Some(predicate) = &self.predicate {
            let _ = write!(out, " WHERE {predicate}");
        }
        out
    }
}

/// `name` quoted as an SQL identifier when it is not a plain lower-case one.
pub fn quote_ident(name: &str) -> String {
    let plain = !name.is_empty()
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// `value` as an SQL string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orders() -> TableName {
        TableName {
            schema: "public".into(),
            name: "orders".into(),
        }
    }

    #[test]
    fn writes_ddl_with_include_and_predicate() {
        let mut def = IndexDef::on(orders(), &["account_id", "Created"]);
        def.include = vec!["total".into()];
        def.predicate = Some("status = 'pending'".into());
        assert_eq!(
            def.create_ddl("keel_orders_1"),
            "CREATE INDEX CONCURRENTLY keel_orders_1 ON public.orders (account_id, \"Created\") \
             INCLUDE (total) WHERE status = 'pending'"
        );
        assert!(
            def.hypothetical_ddl()
                .starts_with("CREATE INDEX ON public.orders")
        );
    }

    #[test]
    fn tells_prefixes() {
        let one = IndexDef::on(orders(), &["a"]);
        let two = IndexDef::on(orders(), &["a", "b"]);
        assert!(one.is_prefix_of(&two));
        assert!(!two.is_prefix_of(&one));
        assert!(!IndexDef::on(orders(), &["b"]).is_prefix_of(&two));
    }

    #[test]
    fn quotes_what_needs_it() {
        assert_eq!(quote_ident("orders"), "orders");
        assert_eq!(quote_ident("Orders"), "\"Orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("o'k"), "'o''k'");
    }
}
