//! B-tree index sizes estimated from the statistics.

use super::model::{IndexDef, Table};

/// Estimated size in bytes of `def` built on `table`.
pub fn estimate_bytes(def: &IndexDef, table: &Table) -> i64 {
    let _ = (def, table);
    0
}
