//! Candidate indexes from statement shapes.

use super::model::{IndexDef, Table};
use super::shape::StatementShape;

/// Candidate indexes for one statement.
pub fn for_statement(shape: &StatementShape, tables: &[Table]) -> Vec<IndexDef> {
    let _ = (shape, tables);
    Vec::new()
}

/// Keys of `table` the statement searches, joins, sorts or groups on.
pub fn column_options(
    shape: &StatementShape,
    table: &super::model::TableName,
) -> Vec<super::model::Key> {
    let _ = (shape, table);
    Vec::new()
}
