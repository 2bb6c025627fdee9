//! What one statement does with the tables it touches, read from its parse tree
//! ([`crate::advisor::parse::analyze`]): the facts candidates and parameter values come from.

use std::collections::BTreeMap;

use super::model::{Key, TableName};

/// The kind of statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// `SELECT` (or `WITH … SELECT`, `VALUES`).
    Select,
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// Anything else (DDL, `COPY`, utility statements): not planned, reported with the reason.
    Other,
}

/// How a parameter (`$n`) or a constant is compared with a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `=`, `IN (…)`, `= ANY(…)`.
    Equal,
    /// `<`, `<=`, `>`, `>=`, `BETWEEN`.
    Range,
    /// `LIKE 'abc%'` and other operators.
    Other,
}

/// A parameter of the statement and the column it is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamUse {
    /// The table of the column.
    pub table: TableName,
    /// The column (or, for an expression such as `lower(email) = $1`, the column inside it).
    pub column: String,
    /// How it is compared.
    pub comparison: Comparison,
}

/// A predicate of the statement with a constant on one side (`status = 'pending'`,
/// `deleted_at IS NULL`, `NOT archived`): what a partial index can be built for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConstantPredicate {
    /// The column it tests.
    pub column: String,
    /// The predicate as SQL, with the column unqualified (`status = 'pending'`), fit for a
    /// partial index's `WHERE`.
    pub sql: String,
}

/// What the statement does with one table (each appearance of a table in `FROM`, merged).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableUse {
    /// The table, resolved against the catalog.
    pub table: Option<TableName>,
    /// Columns compared for equality with a constant or parameter (`a = $1`, `a IN (…)`).
    pub equality: Vec<String>,
    /// Columns compared with a range (`a > $1`, `a BETWEEN …`, `a LIKE 'x%'`).
    pub range: Vec<String>,
    /// Columns joined with another table's (`o.customer_id = c.id`).
    pub join: Vec<String>,
    /// `ORDER BY` columns of this table, in order, with `DESC`.
    pub order_by: Vec<(String, bool)>,
    /// `GROUP BY` columns of this table.
    pub group_by: Vec<String>,
    /// Every column of this table the statement reads anywhere (select list, predicates,
    /// joins, sort, group): what an index must hold for an index-only scan.
    pub referenced: Vec<String>,
    /// Whether the statement reads every column (`SELECT *`, `t.*`): no covering index then.
    pub all_columns: bool,
    /// Constant predicates on this table (candidates for partial indexes).
    pub constant_predicates: Vec<ConstantPredicate>,
    /// Expressions compared for equality or range (`lower(email) = $1`), as index keys.
    pub expressions: Vec<Key>,
}

/// A statement's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct StatementShape {
    /// Its kind.
    pub kind: StatementKind,
    /// Each table it reads or writes (`FROM`, `JOIN`, subqueries, CTEs, the target of a write),
    /// one entry per table.
    pub tables: Vec<TableUse>,
    /// Highest parameter number (`$3` → 3); 0 when it has none.
    pub param_count: u32,
    /// For parameters compared with a column, that column (keyed by the parameter's number).
    pub params: BTreeMap<u32, ParamUse>,
    /// The table an `INSERT`, `UPDATE` or `DELETE` writes.
    pub written: Option<TableName>,
    /// Columns an `UPDATE` sets.
    pub updated_columns: Vec<String>,
}
