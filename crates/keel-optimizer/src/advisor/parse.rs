//! Statement shapes from the PostgreSQL parser (`pg_query`).
//!
//! The advisor needs, per table, what a statement searches, joins, sorts, groups and reads. The
//! real parser gives the tree; this module resolves its names against the catalog (aliases,
//! unqualified columns, correlated subqueries) and classifies the predicates. What it cannot
//! resolve it leaves out rather than guesses: a missing fact costs one candidate, a wrong one
//! costs an index built for nothing.

use std::collections::BTreeMap;

use pg_query::protobuf::{
    self, AExpr, AExprKind, BoolExprType, BoolTestType, ColumnRef, CommonTableExpr, DeleteStmt,
    InsertStmt, JoinExpr, NullTestType, RangeVar, ResTarget, SelectStmt, SetOperation, SortByDir,
    SubLink, SubLinkType, UpdateStmt, WithClause, a_const,
};
use pg_query::{Node, NodeEnum, NodeRef};

use super::model::{Key, Table, TableName};
use super::shape::{
    Comparison, ConstantPredicate, ParamUse, StatementKind, StatementShape, TableUse,
};

/// Why a statement could not be read.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// How deep the walk goes into nested expressions and queries. The decoder already refuses
/// trees much deeper than this; the bound only keeps the walk's own stack small.
const MAX_DEPTH: usize = 400;

/// Functions whose result is an aggregate: never an index expression.
const AGGREGATES: &[&str] = &[
    "avg",
    "count",
    "sum",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "mode",
    "percentile_cont",
    "percentile_disc",
    "rank",
    "dense_rank",
    "row_number",
];

/// The shape of `sql` (one statement, `$n` parameters allowed), its tables resolved against
/// `tables` (unqualified names: `public` first, then any schema holding exactly one such table).
///
/// Names that resolve to nothing in `tables` (CTEs, subquery aliases, catalog views, typos) are
/// skipped, and so are ambiguous unqualified columns: the shape only states what is certain.
pub fn analyze(sql: &str, tables: &[Table]) -> Result<StatementShape, ParseError> {
    let parsed = match std::panic::catch_unwind(|| pg_query::parse(sql, 0)) {
        Ok(Ok(parsed)) => parsed,
        Ok(Err(pg_query::Error::Decode(_))) => {
            return shallow(sql, tables).ok_or_else(|| {
                ParseError(
                    "the statement is nested too deeply for its parse tree to be read".into(),
                )
            });
        }
        Ok(Err(e)) => return Err(ParseError(parser_message(e))),
        Err(_) => return Err(ParseError("the parser failed on this statement".into())),
    };
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return Err(ParseError("one statement expected".into()));
    };
    let mut analyzer = Analyzer::new(tables, parsed.protobuf.version);
    let kind = match raw.stmt.as_deref() {
        Some(node) => analyzer.statement(node, true),
        None => StatementKind::Other,
    };
    let param_count = analyzer.max_param.max(scanned_params(sql));
    Ok(StatementShape {
        kind,
        tables: analyzer.uses.into_iter().map(|(_, u)| u).collect(),
        param_count,
        params: analyzer.params,
        written: analyzer.written,
        updated_columns: analyzer.updated_columns,
    })
}

/// A `SELECT` nested too deeply for the tree decoder (it stops at 100 message levels, about 50
/// expression levels) still names its tables: planned with them, it only loses its candidates.
/// Writes are refused instead, as their updated columns would be unknown.
fn shallow(sql: &str, tables: &[Table]) -> Option<StatementShape> {
    let summary = std::panic::catch_unwind(|| pg_query::summary(sql, 0, -1))
        .ok()?
        .ok()?;
    if summary.protobuf.statement_types != ["SelectStmt"] {
        return None;
    }
    let analyzer = Analyzer::new(tables, 0);
    let mut found: Vec<usize> = Vec::new();
    for t in &summary.protobuf.tables {
        if t.schema_name.is_empty() && summary.protobuf.cte_names.contains(&t.table_name) {
            continue;
        }
        if let Some(i) = analyzer.lookup(&t.schema_name, &t.table_name)
            && !found.contains(&i)
        {
            found.push(i);
        }
    }
    Some(StatementShape {
        kind: StatementKind::Select,
        tables: found
            .into_iter()
            .filter_map(|i| tables.get(i))
            .map(|t| TableUse {
                table: Some(t.name.clone()),
                ..TableUse::default()
            })
            .collect(),
        param_count: scanned_params(sql),
        params: BTreeMap::new(),
        written: None,
        updated_columns: Vec::new(),
    })
}

fn parser_message(error: pg_query::Error) -> String {
    match error {
        pg_query::Error::Parse(message) | pg_query::Error::Scan(message) => message,
        other => other.to_string(),
    }
}

/// The highest `$n` the scanner sees: parameters in places the walk does not visit still count.
fn scanned_params(sql: &str) -> u32 {
    let Ok(tokens) = pg_query::scan_tokens(sql) else {
        return 0;
    };
    tokens
        .iter()
        .filter(|t| t.token == protobuf::Token::Param as i32)
        .filter_map(|t| {
            let start = usize::try_from(t.start).ok()?;
            let end = usize::try_from(t.end).ok()?;
            sql.get(start..end)?.strip_prefix('$')?.parse::<u32>().ok()
        })
        .max()
        .unwrap_or(0)
}

/// What a name in a `FROM` scope stands for.
#[derive(Debug, Clone)]
enum Source {
    /// A table of the catalog (its index in `tables`).
    Table(usize),
    /// A subquery, CTE or function: its output column names when known.
    Derived(Option<Vec<String>>),
}

/// One item of a `FROM` scope.
#[derive(Debug, Clone)]
struct Entry {
    /// The name columns are qualified with: the alias, else the relation's name.
    name: String,
    /// The schema, for `schema.table.column` references (only without an alias).
    schema: Option<String>,
    source: Source,
}

/// A column reference, resolved.
#[derive(Debug, Clone)]
enum Resolved {
    /// A column of a catalog table, through the scope entry `entry` (scope, item).
    Column {
        table: usize,
        column: String,
        entry: (usize, usize),
    },
    /// A column of a subquery, CTE or function in scope: not a table's, but another relation's
    /// (a comparison with it is a join).
    Derived { entry: (usize, usize) },
    /// `*` or `t.*` over these tables.
    Star(Vec<usize>),
    /// Not a catalog table's column (or ambiguous).
    Nothing,
}

/// A column an expression reads (`None` when it is a subquery's or CTE's), with the scope item
/// it comes through.
type Found = (Option<(usize, String)>, (usize, usize));

/// One side of a comparison.
#[derive(Debug)]
enum Operand<'n> {
    /// A plain column.
    Column {
        table: usize,
        column: String,
        entry: (usize, usize),
    },
    /// An expression over the columns of one scope entry (`lower(email)`).
    Expression {
        table: usize,
        node: &'n Node,
        columns: Vec<String>,
    },
    /// `$n` (possibly cast).
    Param(u32),
    /// A literal (possibly cast): fit for a partial index's predicate.
    Literal,
    /// Something constant for the statement (`date '1998-12-01' - interval '90' day`, `$1 + 1`).
    Value,
    /// Something depending on columns of these scope entries (another table's expression).
    Others(Vec<(usize, usize)>),
    /// Anything else (subqueries, aggregates, unresolved names).
    Unknown,
}

/// One output column of a `SELECT`.
#[derive(Debug, Clone)]
struct Output {
    name: Option<String>,
    column: Option<(usize, String)>,
    /// `*` or `t.*`: the outputs' names are not known.
    star: bool,
}

struct Analyzer<'a> {
    catalog: &'a [Table],
    version: i32,
    uses: Vec<(usize, TableUse)>,
    params: BTreeMap<u32, ParamUse>,
    max_param: u32,
    written: Option<TableName>,
    updated_columns: Vec<String>,
    /// `FROM` scopes, outermost first.
    scopes: Vec<Vec<Entry>>,
    /// CTE names visible, outermost `WITH` first.
    ctes: Vec<Vec<(String, Option<Vec<String>>)>>,
    depth: usize,
    /// Set just before walking an `EXISTS` query: its select list is not read.
    skip_targets: bool,
}

impl<'a> Analyzer<'a> {
    fn new(catalog: &'a [Table], version: i32) -> Self {
        Self {
            catalog,
            version,
            uses: Vec::new(),
            params: BTreeMap::new(),
            max_param: 0,
            written: None,
            updated_columns: Vec::new(),
            scopes: Vec::new(),
            ctes: Vec::new(),
            depth: 0,
            skip_targets: false,
        }
    }

    // ---- statements -------------------------------------------------------------------------

    fn statement(&mut self, node: &Node, top: bool) -> StatementKind {
        match &node.node {
            Some(NodeEnum::SelectStmt(s)) => {
                self.select(s);
                StatementKind::Select
            }
            Some(NodeEnum::InsertStmt(s)) => {
                self.insert(s, top);
                StatementKind::Insert
            }
            Some(NodeEnum::UpdateStmt(s)) => {
                self.update(s, top);
                StatementKind::Update
            }
            Some(NodeEnum::DeleteStmt(s)) => {
                self.delete(s, top);
                StatementKind::Delete
            }
            Some(NodeEnum::ExplainStmt(s)) => {
                // The explained statement is still read (its tables, its parameters), but an
                // EXPLAIN itself is not a statement to plan.
                if let Some(query) = s.query.as_deref() {
                    self.statement(query, false);
                }
                StatementKind::Other
            }
            _ => StatementKind::Other,
        }
    }

    /// The entry for the target of a write, its table recorded as used.
    fn target(&mut self, relation: Option<&RangeVar>, top: bool) -> Option<Entry> {
        let rv = relation?;
        let entry = self.range_var_entry(rv);
        if let Source::Table(t) = entry.source
            && top
            && self.written.is_none()
        {
            self.written = Some(self.catalog[t].name.clone());
        }
        Some(entry)
    }

    fn insert(&mut self, s: &InsertStmt, top: bool) {
        let pushed = self.with(s.with_clause.as_ref());
        let target = self.target(s.relation.as_ref(), top);
        if let Some(query) = s.select_stmt.as_deref() {
            self.statement(query, false);
        }
        let mut scope: Vec<Entry> = target.into_iter().collect();
        scope.push(Entry {
            name: "excluded".into(),
            schema: None,
            source: Source::Derived(None),
        });
        self.scopes.push(scope);
        if let Some(conflict) = s.on_conflict_clause.as_deref() {
            for item in &conflict.target_list {
                self.expr(item);
            }
            if let Some(w) = conflict.where_clause.as_deref() {
                self.expr(w);
            }
        }
        if let Some(returning) = &s.returning_clause {
            for item in &returning.exprs {
                self.expr(item);
            }
        }
        self.scopes.pop();
        self.pop_with(pushed);
    }

    fn update(&mut self, s: &UpdateStmt, top: bool) {
        let pushed = self.with(s.with_clause.as_ref());
        let target = self.target(s.relation.as_ref(), top);
        self.scopes.push(target.into_iter().collect());
        for item in &s.from_clause {
            self.walk_from_item(item);
        }
        for item in &s.target_list {
            if let Some(NodeEnum::ResTarget(r)) = &item.node
                && top
                && !r.name.is_empty()
            {
                push_unique(&mut self.updated_columns, &r.name);
            }
            self.expr(item);
        }
        if let Some(w) = s.where_clause.as_deref() {
            self.predicate(w, true);
        }
        if let Some(returning) = &s.returning_clause {
            for item in &returning.exprs {
                self.expr(item);
            }
        }
        self.scopes.pop();
        self.pop_with(pushed);
    }

    fn delete(&mut self, s: &DeleteStmt, top: bool) {
        let pushed = self.with(s.with_clause.as_ref());
        let target = self.target(s.relation.as_ref(), top);
        self.scopes.push(target.into_iter().collect());
        for item in &s.using_clause {
            self.walk_from_item(item);
        }
        if let Some(w) = s.where_clause.as_deref() {
            self.predicate(w, true);
        }
        if let Some(returning) = &s.returning_clause {
            for item in &returning.exprs {
                self.expr(item);
            }
        }
        self.scopes.pop();
        self.pop_with(pushed);
    }

    /// Makes a `WITH` clause's names visible (until `pop_with`), walking each CTE's query.
    fn with(&mut self, with: Option<&WithClause>) -> bool {
        let Some(with) = with else {
            return false;
        };
        self.ctes.push(Vec::new());
        for cte in &with.ctes {
            if let Some(NodeEnum::CommonTableExpr(cte)) = &cte.node {
                self.cte(cte, with.recursive);
            }
        }
        true
    }

    fn cte(&mut self, cte: &CommonTableExpr, recursive: bool) {
        let declared: Vec<String> = cte.aliascolnames.iter().filter_map(string_of).collect();
        if recursive {
            let columns = (!declared.is_empty()).then(|| declared.clone());
            if let Some(frame) = self.ctes.last_mut() {
                frame.push((cte.ctename.clone(), columns));
            }
        }
        let outputs = match cte.ctequery.as_deref().and_then(|q| q.node.as_ref()) {
            Some(NodeEnum::SelectStmt(s)) => Some(self.select(s)),
            Some(_) => {
                if let Some(query) = cte.ctequery.as_deref() {
                    self.statement(query, false);
                }
                None
            }
            None => None,
        };
        let columns = if declared.is_empty() {
            outputs.and_then(|o| output_names(&o))
        } else {
            Some(declared)
        };
        if let Some(frame) = self.ctes.last_mut() {
            frame.retain(|(name, _)| *name != cte.ctename);
            frame.push((cte.ctename.clone(), columns));
        }
    }

    fn pop_with(&mut self, pushed: bool) {
        if pushed {
            self.ctes.pop();
        }
    }

    /// Walks a `SELECT` (its own scope, the enclosing ones visible) and returns its outputs.
    fn select(&mut self, s: &SelectStmt) -> Vec<Output> {
        if self.depth >= MAX_DEPTH {
            return Vec::new();
        }
        self.depth += 1;
        let outputs = self.select_inner(s);
        self.depth -= 1;
        outputs
    }

    fn select_inner(&mut self, s: &SelectStmt) -> Vec<Output> {
        let skip_targets = std::mem::take(&mut self.skip_targets);
        let pushed = self.with(s.with_clause.as_ref());
        let set_op = SetOperation::try_from(s.op).unwrap_or(SetOperation::SetopNone);
        if !matches!(set_op, SetOperation::SetopNone | SetOperation::Undefined) {
            let outputs = s
                .larg
                .as_deref()
                .map(|l| self.select(l))
                .unwrap_or_default();
            if let Some(r) = s.rarg.as_deref() {
                self.select(r);
            }
            // ORDER BY / LIMIT of a set operation name its outputs, not tables: only their
            // parameters matter.
            self.scopes.push(Vec::new());
            for item in &s.sort_clause {
                self.expr(item);
            }
            for limit in [&s.limit_offset, &s.limit_count].into_iter().flatten() {
                self.expr(limit);
            }
            self.scopes.pop();
            self.pop_with(pushed);
            return outputs;
        }

        self.scopes.push(Vec::new());
        for item in &s.from_clause {
            self.walk_from_item(item);
        }
        for row in &s.values_lists {
            self.expr(row);
        }
        let mut outputs = Vec::new();
        for item in &s.target_list {
            let Some(NodeEnum::ResTarget(target)) = &item.node else {
                self.expr(item);
                continue;
            };
            let output = self.output(target);
            let star = output.star;
            outputs.push(output);
            if !(skip_targets && star) {
                self.expr(item);
            }
        }
        if let Some(w) = s.where_clause.as_deref() {
            self.predicate(w, true);
        }
        for item in &s.group_clause {
            if let Some((table, column)) = self.group_key(item, &outputs) {
                let u = self.use_mut(table);
                push_unique(&mut u.group_by, &column);
            }
            self.expr(item);
        }
        if let Some(having) = s.having_clause.as_deref() {
            self.expr(having);
        }
        for item in s.window_clause.iter().chain(&s.distinct_clause) {
            self.expr(item);
        }
        for item in &s.sort_clause {
            if let Some(NodeEnum::SortBy(sort)) = &item.node
                && let Some(key) = sort.node.as_deref()
                && let Some((table, column)) = self.sort_key(key, &outputs)
            {
                let descending = sort.sortby_dir == SortByDir::SortbyDesc as i32;
                let u = self.use_mut(table);
                if !u.order_by.iter().any(|(c, _)| *c == column) {
                    u.order_by.push((column, descending));
                }
            }
            self.expr(item);
        }
        for limit in [&s.limit_offset, &s.limit_count].into_iter().flatten() {
            self.expr(limit);
        }
        self.scopes.pop();
        self.pop_with(pushed);
        outputs
    }

    fn output(&self, target: &ResTarget) -> Output {
        let val = target.val.as_deref().and_then(|v| v.node.as_ref());
        let column = match val {
            Some(NodeEnum::ColumnRef(c)) => match self.resolve(c) {
                Resolved::Column { table, column, .. } => Some((table, column)),
                _ => None,
            },
            _ => None,
        };
        let name = if !target.name.is_empty() {
            Some(target.name.clone())
        } else {
            match val {
                Some(NodeEnum::ColumnRef(c)) => match c.fields.last().and_then(|f| f.node.as_ref())
                {
                    Some(NodeEnum::String(s)) => Some(s.sval.clone()),
                    _ => None,
                },
                Some(NodeEnum::FuncCall(f)) => f.funcname.last().and_then(string_of),
                _ => None,
            }
        };
        let star = matches!(val, Some(NodeEnum::ColumnRef(c))
            if c.fields.iter().any(|f| matches!(f.node, Some(NodeEnum::AStar(_)))));
        Output { name, column, star }
    }

    /// A `GROUP BY` item as a column: an input column first, then a select-list alias or
    /// position (as PostgreSQL does).
    fn group_key(&self, node: &Node, outputs: &[Output]) -> Option<(usize, String)> {
        match &node.node {
            Some(NodeEnum::ColumnRef(c)) => match self.resolve(c) {
                Resolved::Column { table, column, .. } => Some((table, column)),
                _ => single_name(c)
                    .and_then(|name| outputs.iter().find(|o| o.name.as_deref() == Some(name)))
                    .and_then(|o| o.column.clone()),
            },
            Some(NodeEnum::AConst(_)) => positional(node, outputs),
            _ => None,
        }
    }

    /// An `ORDER BY` item as a column: a select-list alias or position first, then an input
    /// column (as PostgreSQL does).
    fn sort_key(&self, node: &Node, outputs: &[Output]) -> Option<(usize, String)> {
        match &node.node {
            Some(NodeEnum::ColumnRef(c)) => {
                if let Some(name) = single_name(c)
                    && let Some(output) = outputs.iter().find(|o| o.name.as_deref() == Some(name))
                {
                    return output.column.clone();
                }
                match self.resolve(c) {
                    Resolved::Column { table, column, .. } => Some((table, column)),
                    _ => None,
                }
            }
            Some(NodeEnum::AConst(_)) => positional(node, outputs),
            _ => None,
        }
    }

    // ---- FROM -------------------------------------------------------------------------------

    fn walk_from_item(&mut self, node: &Node) {
        if self.depth >= MAX_DEPTH {
            return;
        }
        self.depth += 1;
        self.walk_from_item_inner(node);
        self.depth -= 1;
    }

    fn walk_from_item_inner(&mut self, node: &Node) {
        match &node.node {
            Some(NodeEnum::RangeVar(rv)) => {
                let entry = self.range_var_entry(rv);
                self.push_entry(entry);
            }
            Some(NodeEnum::JoinExpr(j)) => self.join(j),
            Some(NodeEnum::RangeSubselect(sub)) => {
                let outputs = match sub.subquery.as_deref().and_then(|q| q.node.as_ref()) {
                    Some(NodeEnum::SelectStmt(s)) => {
                        if sub.lateral {
                            self.select(s)
                        } else {
                            // Without LATERAL the subquery sees the enclosing queries but not
                            // its siblings in this FROM.
                            let siblings = self.scopes.pop().unwrap_or_default();
                            let outputs = self.select(s);
                            self.scopes.push(siblings);
                            outputs
                        }
                    }
                    _ => Vec::new(),
                };
                let (name, declared) = alias_parts(sub.alias.as_ref());
                let columns = if declared.is_empty() {
                    output_names(&outputs)
                } else {
                    Some(declared)
                };
                self.push_entry(Entry {
                    name: name.unwrap_or_default(),
                    schema: None,
                    source: Source::Derived(columns),
                });
            }
            Some(NodeEnum::RangeFunction(f)) => {
                for function in &f.functions {
                    self.expr(function);
                }
                let (name, declared) = alias_parts(f.alias.as_ref());
                let name = name.or_else(|| first_function_name(&f.functions));
                self.push_entry(Entry {
                    name: name.unwrap_or_default(),
                    schema: None,
                    source: Source::Derived((!declared.is_empty()).then_some(declared)),
                });
            }
            Some(NodeEnum::RangeTableSample(sample)) => {
                if let Some(relation) = sample.relation.as_deref() {
                    self.walk_from_item(relation);
                }
                for arg in sample.args.iter().chain(sample.repeatable.as_deref()) {
                    self.expr(arg);
                }
            }
            Some(other) => self.fallback(other),
            None => {}
        }
    }

    fn join(&mut self, j: &JoinExpr) {
        let start = self.current_len();
        if let Some(l) = j.larg.as_deref() {
            self.walk_from_item(l);
        }
        let middle = self.current_len();
        if let Some(r) = j.rarg.as_deref() {
            self.walk_from_item(r);
        }
        let end = self.current_len();
        for name in j.using_clause.iter().filter_map(string_of) {
            let left = self.claimant(&name, start..middle);
            let right = self.claimant(&name, middle..end);
            for t in [left, right].into_iter().flatten() {
                let u = self.use_mut(t);
                push_unique(&mut u.join, &name);
                push_unique(&mut u.referenced, &name);
            }
        }
        if let Some(quals) = j.quals.as_deref() {
            self.predicate(quals, false);
        }
        if let Some(alias) = &j.alias {
            // `(a JOIN b) AS x`: x's columns are not traced back to a and b.
            self.push_entry(Entry {
                name: alias.aliasname.clone(),
                schema: None,
                source: Source::Derived(None),
            });
        }
    }

    /// The one catalog table among the current scope's items `range` that has column `name`.
    fn claimant(&self, name: &str, range: std::ops::Range<usize>) -> Option<usize> {
        let scope = self.scopes.last()?;
        let mut found = None;
        for entry in scope.get(range)? {
            match &entry.source {
                Source::Table(t) if self.catalog[*t].column(name).is_some() => {
                    if found.is_some() {
                        return None;
                    }
                    found = Some(*t);
                }
                _ => {}
            }
        }
        found
    }

    fn current_len(&self) -> usize {
        self.scopes.last().map_or(0, Vec::len)
    }

    fn push_entry(&mut self, entry: Entry) {
        if let Some(scope) = self.scopes.last_mut() {
            scope.push(entry);
        }
    }

    /// A `FROM` relation as a scope item: a CTE's name, a catalog table (recorded as used) or
    /// something else the catalog does not hold.
    fn range_var_entry(&mut self, rv: &RangeVar) -> Entry {
        let alias = rv.alias.as_ref().map(|a| a.aliasname.clone());
        if rv.schemaname.is_empty()
            && let Some(columns) = self.cte_columns(&rv.relname)
        {
            return Entry {
                name: alias.unwrap_or_else(|| rv.relname.clone()),
                schema: None,
                source: Source::Derived(columns),
            };
        }
        match self.lookup(&rv.schemaname, &rv.relname) {
            Some(t) => {
                self.use_mut(t);
                Entry {
                    schema: alias.is_none().then(|| self.catalog[t].name.schema.clone()),
                    name: alias.unwrap_or_else(|| rv.relname.clone()),
                    source: Source::Table(t),
                }
            }
            None => Entry {
                name: alias.unwrap_or_else(|| rv.relname.clone()),
                schema: None,
                source: Source::Derived(None),
            },
        }
    }

    fn cte_columns(&self, name: &str) -> Option<Option<Vec<String>>> {
        self.ctes
            .iter()
            .rev()
            .flat_map(|frame| frame.iter().rev())
            .find(|(n, _)| n == name)
            .map(|(_, columns)| columns.clone())
    }

    fn lookup(&self, schema: &str, name: &str) -> Option<usize> {
        if !schema.is_empty() {
            return self
                .catalog
                .iter()
                .position(|t| t.name.schema == schema && t.name.name == name);
        }
        if let Some(t) = self
            .catalog
            .iter()
            .position(|t| t.name.schema == "public" && t.name.name == name)
        {
            return Some(t);
        }
        let mut found = self
            .catalog
            .iter()
            .enumerate()
            .filter(|(_, t)| t.name.name == name);
        match (found.next(), found.next()) {
            (Some((t, _)), None) => Some(t),
            _ => None,
        }
    }

    fn use_mut(&mut self, table: usize) -> &mut TableUse {
        let position = match self.uses.iter().position(|(t, _)| *t == table) {
            Some(p) => p,
            None => {
                let name = self.catalog.get(table).map(|t| t.name.clone());
                self.uses.push((
                    table,
                    TableUse {
                        table: name,
                        ..TableUse::default()
                    },
                ));
                self.uses.len() - 1
            }
        };
        &mut self.uses[position].1
    }

    // ---- names ------------------------------------------------------------------------------

    fn resolve(&self, c: &ColumnRef) -> Resolved {
        let mut names: Vec<&str> = Vec::new();
        let mut star = false;
        for field in &c.fields {
            match &field.node {
                Some(NodeEnum::String(s)) if !star => names.push(&s.sval),
                Some(NodeEnum::AStar(_)) if !star => star = true,
                _ => return Resolved::Nothing,
            }
        }
        if star {
            let tables = match names.as_slice() {
                [] => self
                    .scopes
                    .last()
                    .map(|scope| {
                        scope
                            .iter()
                            .filter_map(|e| match e.source {
                                Source::Table(t) => Some(t),
                                Source::Derived(_) => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                [q] => self.qualifier(None, q).into_iter().collect(),
                [s, q] | [_, s, q] => self.qualifier(Some(s), q).into_iter().collect(),
                _ => Vec::new(),
            };
            return Resolved::Star(tables);
        }
        let (schema, qualifier, column) = match names.as_slice() {
            [column] => return self.unqualified(column),
            [q, column] => (None, *q, *column),
            [s, q, column] | [_, s, q, column] => (Some(*s), *q, *column),
            _ => return Resolved::Nothing,
        };
        for (si, scope) in self.scopes.iter().enumerate().rev() {
            for (ei, entry) in scope.iter().enumerate() {
                if entry.name != qualifier
                    || (schema.is_some() && entry.schema.as_deref() != schema)
                {
                    continue;
                }
                return match entry.source {
                    Source::Table(t) if self.catalog[t].column(column).is_some() => {
                        Resolved::Column {
                            table: t,
                            column: column.to_owned(),
                            entry: (si, ei),
                        }
                    }
                    Source::Table(_) => Resolved::Nothing,
                    Source::Derived(_) => Resolved::Derived { entry: (si, ei) },
                };
            }
        }
        Resolved::Nothing
    }

    fn qualifier(&self, schema: Option<&str>, qualifier: &str) -> Option<usize> {
        self.scopes
            .iter()
            .rev()
            .flat_map(|scope| scope.iter())
            .find(|e| e.name == qualifier && (schema.is_none() || e.schema.as_deref() == schema))
            .and_then(|e| match e.source {
                Source::Table(t) => Some(t),
                Source::Derived(_) => None,
            })
    }

    /// An unqualified column: the innermost scope that has exactly one item with that column
    /// wins; two items with it in the same scope make it ambiguous (left out).
    fn unqualified(&self, column: &str) -> Resolved {
        for (si, scope) in self.scopes.iter().enumerate().rev() {
            let mut claims = scope.iter().enumerate().filter(|(_, e)| match &e.source {
                Source::Table(t) => self.catalog[*t].column(column).is_some(),
                Source::Derived(Some(columns)) => columns.iter().any(|c| c == column),
                Source::Derived(None) => false,
            });
            match (claims.next(), claims.next()) {
                (None, _) => continue,
                (Some((ei, entry)), None) => {
                    return match entry.source {
                        Source::Table(t) => Resolved::Column {
                            table: t,
                            column: column.to_owned(),
                            entry: (si, ei),
                        },
                        Source::Derived(_) => Resolved::Derived { entry: (si, ei) },
                    };
                }
                (Some(_), Some(_)) => return Resolved::Nothing,
            }
        }
        Resolved::Nothing
    }

    // ---- expressions ------------------------------------------------------------------------

    /// Walks an expression for the columns it reads and its parameters (sub-selects in their
    /// own scope).
    fn expr(&mut self, node: &Node) {
        if self.depth >= MAX_DEPTH {
            return;
        }
        self.depth += 1;
        self.expr_inner(node);
        self.depth -= 1;
    }

    fn expr_inner(&mut self, node: &Node) {
        let Some(inner) = &node.node else {
            return;
        };
        match inner {
            NodeEnum::ColumnRef(c) => self.reference(c),
            NodeEnum::ParamRef(p) => self.note_param(p.number),
            NodeEnum::SubLink(s) => {
                if let Some(test) = s.testexpr.as_deref() {
                    self.expr(test);
                }
                self.subquery(s);
            }
            other => match children(other) {
                Some(children) => {
                    for child in children {
                        self.expr(child);
                    }
                }
                None => self.fallback(other),
            },
        }
    }

    /// Nodes the walk does not know: their column references and parameters still count.
    fn fallback(&mut self, node: &NodeEnum) {
        let mut columns = Vec::new();
        for (found, _, _, _) in node.nodes() {
            match found {
                NodeRef::ColumnRef(c) => columns.push(c.clone()),
                NodeRef::ParamRef(p) => self.note_param(p.number),
                _ => {}
            }
        }
        for c in &columns {
            self.reference(c);
        }
    }

    fn reference(&mut self, c: &ColumnRef) {
        match self.resolve(c) {
            Resolved::Column { table, column, .. } => {
                let u = self.use_mut(table);
                push_unique(&mut u.referenced, &column);
            }
            Resolved::Star(tables) => {
                for t in tables {
                    self.use_mut(t).all_columns = true;
                }
            }
            Resolved::Derived { .. } | Resolved::Nothing => {}
        }
    }

    fn note_param(&mut self, number: i32) {
        if let Ok(n) = u32::try_from(number) {
            self.max_param = self.max_param.max(n);
        }
    }

    // ---- predicates -------------------------------------------------------------------------

    /// Walks a predicate, classifying its comparisons; `top` while still in the `WHERE`'s
    /// top-level `AND` (where a constant test may become a partial index's predicate).
    fn predicate(&mut self, node: &Node, top: bool) {
        if self.depth >= MAX_DEPTH {
            return;
        }
        self.depth += 1;
        self.predicate_inner(node, top);
        self.depth -= 1;
    }

    fn predicate_inner(&mut self, node: &Node, top: bool) {
        let Some(inner) = &node.node else {
            return;
        };
        match inner {
            NodeEnum::BoolExpr(b) => match BoolExprType::try_from(b.boolop) {
                Ok(BoolExprType::AndExpr) => {
                    for arg in &b.args {
                        self.predicate(arg, top);
                    }
                }
                Ok(BoolExprType::OrExpr) => {
                    for arg in &b.args {
                        self.predicate(arg, false);
                    }
                }
                _ => {
                    if let [arg] = b.args.as_slice()
                        && top
                        && self.plain(arg).is_some()
                    {
                        self.constant_predicate(node);
                    }
                    self.expr(node);
                }
            },
            NodeEnum::SubLink(s) => self.sublink(s),
            NodeEnum::AExpr(a) => {
                self.comparison(node, a, top);
                self.expr(node);
            }
            NodeEnum::NullTest(n) => {
                let known = NullTestType::try_from(n.nulltesttype)
                    .is_ok_and(|t| matches!(t, NullTestType::IsNull | NullTestType::IsNotNull));
                if top && known {
                    self.constant_predicate_on(node, n.arg.as_deref());
                }
                self.expr(node);
            }
            NodeEnum::BooleanTest(b) => {
                let known = BoolTestType::try_from(b.booltesttype)
                    .is_ok_and(|t| !matches!(t, BoolTestType::Undefined));
                if top && known {
                    self.constant_predicate_on(node, b.arg.as_deref());
                }
                self.expr(node);
            }
            NodeEnum::ColumnRef(_) => {
                if top {
                    self.constant_predicate_on(node, Some(node));
                }
                self.expr(node);
            }
            _ => self.expr(node),
        }
    }

    /// `EXISTS (…)` and `x IN (SELECT y …)`: the subquery is walked in its own scope; `IN`'s
    /// column and the subquery's output column are joined.
    fn sublink(&mut self, s: &SubLink) {
        let kind = SubLinkType::try_from(s.sub_link_type).unwrap_or(SubLinkType::Undefined);
        let equality = op_name(&s.oper_name).is_none_or(|op| op == "=");
        let left: Vec<Option<(usize, String)>> = match s.testexpr.as_deref() {
            Some(test) => match &test.node {
                Some(NodeEnum::RowExpr(row)) => row.args.iter().map(|a| self.plain(a)).collect(),
                _ => vec![self.plain(test)],
            },
            None => Vec::new(),
        };
        if let Some(test) = s.testexpr.as_deref() {
            self.expr(test);
        }
        let outputs = self.subquery(s);
        if kind == SubLinkType::AnySublink && equality && left.len() == outputs.len() {
            for (outer, inner) in left.iter().zip(&outputs) {
                if let (Some(outer), Some(inner)) = (outer, &inner.column) {
                    for (table, column) in [outer, inner] {
                        let u = self.use_mut(*table);
                        push_unique(&mut u.join, column);
                    }
                }
            }
        }
    }

    /// A sublink's query, walked in its own scope; `EXISTS` ignores its select list (`SELECT *`
    /// there reads no column).
    fn subquery(&mut self, s: &SubLink) -> Vec<Output> {
        match s.subselect.as_deref().and_then(|q| q.node.as_ref()) {
            Some(NodeEnum::SelectStmt(select)) => {
                self.skip_targets = s.sub_link_type == SubLinkType::ExistsSublink as i32;
                let outputs = self.select(select);
                self.skip_targets = false;
                outputs
            }
            _ => {
                if let Some(query) = s.subselect.as_deref() {
                    self.statement(query, false);
                }
                Vec::new()
            }
        }
    }

    fn comparison(&mut self, node: &Node, a: &AExpr, top: bool) {
        let Ok(kind) = AExprKind::try_from(a.kind) else {
            return;
        };
        let op = op_name(&a.name).unwrap_or_default();
        let (Some(lexpr), Some(rexpr)) = (a.lexpr.as_deref(), a.rexpr.as_deref()) else {
            return;
        };
        match kind {
            AExprKind::AexprOp => {
                let comparison = match op {
                    "=" => Comparison::Equal,
                    "<" | "<=" | ">" | ">=" => Comparison::Range,
                    "<>" | "!=" => Comparison::Other,
                    _ => return,
                };
                let left = self.operand(lexpr);
                let right = self.operand(rexpr);
                if let (
                    Operand::Column {
                        table: lt,
                        column: lc,
                        entry: le,
                    },
                    Operand::Column {
                        table: rt,
                        column: rc,
                        entry: re,
                    },
                ) = (&left, &right)
                {
                    if le != re && comparison == Comparison::Equal {
                        push_unique(&mut self.use_mut(*lt).join, lc);
                        push_unique(&mut self.use_mut(*rt).join, rc);
                    }
                    return;
                }
                let literal = matches!(left, Operand::Literal) || matches!(right, Operand::Literal);
                self.compare(&left, &right, comparison);
                self.compare(&right, &left, comparison);
                if top && literal && comparison == Comparison::Equal {
                    let column = [lexpr, rexpr].into_iter().find(|n| self.plain(n).is_some());
                    if column.is_some() {
                        self.constant_predicate_on(node, column);
                    }
                }
            }
            AExprKind::AexprOpAny => {
                let comparison = if op == "=" {
                    Comparison::Equal
                } else {
                    Comparison::Other
                };
                let left = self.operand(lexpr);
                let values = match &rexpr.node {
                    Some(NodeEnum::AArrayExpr(array)) => {
                        array.elements.iter().map(|e| self.operand(e)).collect()
                    }
                    _ => vec![self.operand(rexpr)],
                };
                self.compare_list(&left, &values, comparison);
            }
            AExprKind::AexprIn => {
                let comparison = if op == "=" {
                    Comparison::Equal
                } else {
                    Comparison::Other
                };
                let left = self.operand(lexpr);
                let values = match &rexpr.node {
                    Some(NodeEnum::List(list)) => {
                        list.items.iter().map(|e| self.operand(e)).collect()
                    }
                    _ => vec![self.operand(rexpr)],
                };
                self.compare_list(&left, &values, comparison);
            }
            AExprKind::AexprLike | AExprKind::AexprIlike | AExprKind::AexprSimilar => {
                let left = self.operand(lexpr);
                let right = self.operand(rexpr);
                // A B-tree serves `LIKE 'abc%'` (a range on the prefix) and, with a generic
                // plan's value unknown, maybe `LIKE $1`; nothing else here.
                let prefix = kind == AExprKind::AexprLike
                    && op == "~~"
                    && match &right {
                        Operand::Param(_) => true,
                        Operand::Literal => literal_string(rexpr).is_some_and(|p| {
                            !p.is_empty() && !p.starts_with('%') && !p.starts_with('_')
                        }),
                        _ => false,
                    };
                if prefix {
                    self.record(&left, Comparison::Range);
                }
                if let Operand::Param(n) = right {
                    self.param_use(&left, n, Comparison::Other);
                }
            }
            AExprKind::AexprBetween
            | AExprKind::AexprBetweenSym
            | AExprKind::AexprNotBetween
            | AExprKind::AexprNotBetweenSym => {
                let comparison =
                    if matches!(kind, AExprKind::AexprBetween | AExprKind::AexprBetweenSym) {
                        Comparison::Range
                    } else {
                        Comparison::Other
                    };
                let left = self.operand(lexpr);
                let bounds: Vec<Operand<'_>> = match &rexpr.node {
                    Some(NodeEnum::List(list)) => {
                        list.items.iter().map(|e| self.operand(e)).collect()
                    }
                    _ => Vec::new(),
                };
                self.compare_list(&left, &bounds, comparison);
            }
            AExprKind::AexprDistinct | AExprKind::AexprNotDistinct => {
                let left = self.operand(lexpr);
                let right = self.operand(rexpr);
                if let Operand::Param(n) = right {
                    self.param_use(&left, n, Comparison::Other);
                }
                if let Operand::Param(n) = left {
                    self.param_use(&right, n, Comparison::Other);
                }
            }
            _ => {}
        }
    }

    /// `subject <op> value`: what it says about `subject`.
    fn compare(&mut self, subject: &Operand<'_>, value: &Operand<'_>, comparison: Comparison) {
        match value {
            Operand::Param(n) => {
                self.record(subject, comparison);
                self.param_use(subject, *n, comparison);
            }
            Operand::Literal | Operand::Value => self.record(subject, comparison),
            Operand::Others(entries) => {
                // `a.x = b.y + 1`: a join on the plain column's side.
                if let Operand::Column {
                    table,
                    column,
                    entry,
                } = subject
                    && comparison == Comparison::Equal
                    && !entries.contains(entry)
                {
                    push_unique(&mut self.use_mut(*table).join, column);
                }
            }
            _ => {}
        }
    }

    /// `subject IN (values…)`, `BETWEEN`, `= ANY (…)`: a search only when every value is.
    fn compare_list(
        &mut self,
        subject: &Operand<'_>,
        values: &[Operand<'_>],
        comparison: Comparison,
    ) {
        if values.is_empty() {
            return;
        }
        let all_values = values
            .iter()
            .all(|v| matches!(v, Operand::Param(_) | Operand::Literal | Operand::Value));
        if all_values {
            self.record(subject, comparison);
        }
        for value in values {
            if let Operand::Param(n) = value {
                self.param_use(subject, *n, comparison);
            }
        }
    }

    fn record(&mut self, subject: &Operand<'_>, comparison: Comparison) {
        match subject {
            Operand::Column { table, column, .. } => {
                let u = self.use_mut(*table);
                match comparison {
                    Comparison::Equal => push_unique(&mut u.equality, column),
                    Comparison::Range => push_unique(&mut u.range, column),
                    Comparison::Other => {}
                }
            }
            Operand::Expression {
                table,
                node,
                columns,
            } => {
                if comparison == Comparison::Other {
                    return;
                }
                let Some(sql) = self.deparse_unqualified(node) else {
                    return;
                };
                let key = Key::Expression {
                    sql,
                    columns: columns.clone(),
                };
                let u = self.use_mut(*table);
                if !u.expressions.iter().any(|k| k.same_target(&key)) {
                    u.expressions.push(key);
                }
            }
            _ => {}
        }
    }

    fn param_use(&mut self, subject: &Operand<'_>, number: u32, comparison: Comparison) {
        let (table, column) = match subject {
            Operand::Column { table, column, .. } => (*table, column.clone()),
            Operand::Expression { table, columns, .. } => match columns.first() {
                Some(c) => (*table, c.clone()),
                None => return,
            },
            _ => return,
        };
        let Some(name) = self.catalog.get(table).map(|t| t.name.clone()) else {
            return;
        };
        self.params.entry(number).or_insert(ParamUse {
            table: name,
            column,
            comparison,
        });
    }

    /// What one side of a comparison is.
    fn operand<'n>(&self, node: &'n Node) -> Operand<'n> {
        match &node.node {
            Some(NodeEnum::ColumnRef(c)) => match self.resolve(c) {
                Resolved::Column {
                    table,
                    column,
                    entry,
                } => Operand::Column {
                    table,
                    column,
                    entry,
                },
                Resolved::Derived { entry } => Operand::Others(vec![entry]),
                _ => Operand::Unknown,
            },
            Some(NodeEnum::ParamRef(p)) => match u32::try_from(p.number) {
                Ok(n) => Operand::Param(n),
                Err(_) => Operand::Unknown,
            },
            Some(NodeEnum::AConst(c)) if !c.isnull => Operand::Literal,
            Some(NodeEnum::TypeCast(cast)) => match cast.arg.as_deref().map(|a| &a.node) {
                Some(Some(NodeEnum::ParamRef(p))) => match u32::try_from(p.number) {
                    Ok(n) => Operand::Param(n),
                    Err(_) => Operand::Unknown,
                },
                Some(Some(NodeEnum::AConst(c))) if !c.isnull => Operand::Literal,
                _ => self.composite(node),
            },
            _ => self.composite(node),
        }
    }

    /// An operand that is neither a plain column, a parameter nor a literal.
    fn composite<'n>(&self, node: &'n Node) -> Operand<'n> {
        let mut found = Vec::new();
        let mut params = false;
        if !self.inspect(node, &mut found, &mut params, 0) {
            return Operand::Unknown;
        }
        let Some((first, first_entry)) = found.first().cloned() else {
            return Operand::Value;
        };
        if let Some((table, _)) = first
            && !params
            && found.iter().all(|(c, e)| c.is_some() && *e == first_entry)
        {
            let mut columns = Vec::new();
            for (c, _) in &found {
                if let Some((_, column)) = c {
                    push_unique(&mut columns, column);
                }
            }
            return Operand::Expression {
                table,
                node,
                columns,
            };
        }
        let mut entries: Vec<(usize, usize)> = Vec::new();
        for (_, e) in &found {
            if !entries.contains(e) {
                entries.push(*e);
            }
        }
        Operand::Others(entries)
    }

    /// Collects the columns an expression reads; false when it holds something that keeps it
    /// from being an index expression or a constant (a subquery, an aggregate, an unresolved
    /// name, a node this walk does not know).
    fn inspect(
        &self,
        node: &Node,
        found: &mut Vec<Found>,
        params: &mut bool,
        depth: usize,
    ) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        let Some(inner) = &node.node else {
            return true;
        };
        match inner {
            NodeEnum::ColumnRef(c) => match self.resolve(c) {
                Resolved::Column {
                    table,
                    column,
                    entry,
                } => {
                    found.push((Some((table, column)), entry));
                    true
                }
                Resolved::Derived { entry } => {
                    found.push((None, entry));
                    true
                }
                _ => false,
            },
            NodeEnum::ParamRef(_) => {
                *params = true;
                true
            }
            NodeEnum::SubLink(_) => false,
            NodeEnum::FuncCall(f)
                if f.over.is_some()
                    || f.agg_star
                    || f.agg_distinct
                    || f.agg_filter.is_some()
                    || !f.agg_order.is_empty()
                    || f.funcname.last().and_then(string_of).is_some_and(|name| {
                        AGGREGATES.contains(&name.to_ascii_lowercase().as_str())
                    }) =>
            {
                false
            }
            other => match children(other) {
                Some(children) => children
                    .into_iter()
                    .all(|child| self.inspect(child, found, params, depth + 1)),
                None => false,
            },
        }
    }

    /// A plain column reference, resolved.
    fn plain(&self, node: &Node) -> Option<(usize, String)> {
        match &node.node {
            Some(NodeEnum::ColumnRef(c)) => match self.resolve(c) {
                Resolved::Column { table, column, .. } => Some((table, column)),
                _ => None,
            },
            _ => None,
        }
    }

    /// `NOT col` (the whole node is the predicate, its argument the column).
    fn constant_predicate(&mut self, node: &Node) {
        let arg = match &node.node {
            Some(NodeEnum::BoolExpr(b)) => b.args.first(),
            _ => None,
        };
        self.constant_predicate_on(node, arg);
    }

    /// Records `predicate` (a test of the plain column `column` against constants) as a
    /// partial index's possible predicate.
    fn constant_predicate_on(&mut self, predicate: &Node, column: Option<&Node>) {
        let Some((table, column)) = column.and_then(|c| self.plain(c)) else {
            return;
        };
        let Some(sql) = self.deparse_unqualified(predicate) else {
            return;
        };
        let u = self.use_mut(table);
        if !u.constant_predicates.iter().any(|p| p.sql == sql) {
            u.constant_predicates
                .push(ConstantPredicate { column, sql });
        }
    }

    /// `node` as SQL with its column references stripped to the column name, as an index
    /// definition (which names one table) writes them.
    fn deparse_unqualified(&self, node: &Node) -> Option<String> {
        let mut node = node.clone();
        unqualify(&mut node, 0);
        let target = Node {
            node: Some(NodeEnum::ResTarget(Box::new(ResTarget {
                val: Some(Box::new(node)),
                ..ResTarget::default()
            }))),
        };
        let select = SelectStmt {
            target_list: vec![target],
            op: SetOperation::SetopNone as i32,
            limit_option: protobuf::LimitOption::Default as i32,
            ..SelectStmt::default()
        };
        let tree = protobuf::ParseResult {
            version: self.version,
            stmts: vec![protobuf::RawStmt {
                stmt: Some(Box::new(Node {
                    node: Some(NodeEnum::SelectStmt(Box::new(select))),
                })),
                stmt_location: 0,
                stmt_len: 0,
            }],
        };
        let sql = pg_query::deparse(&tree, pg_query::DeparseOptions::default()).ok()?;
        let sql = sql.strip_prefix("SELECT ")?.trim();
        (!sql.is_empty()).then(|| sql.to_owned())
    }
}

/// The direct sub-expressions of an expression node; `None` for nodes this walk does not know
/// (a sub-select's query is not a child: it is walked in its own scope).
fn children(node: &NodeEnum) -> Option<Vec<&Node>> {
    fn opt<'n>(out: &mut Vec<&'n Node>, node: &'n Option<Box<Node>>) {
        if let Some(node) = node.as_deref() {
            out.push(node);
        }
    }
    let mut out = Vec::new();
    match node {
        NodeEnum::ColumnRef(_)
        | NodeEnum::ParamRef(_)
        | NodeEnum::AConst(_)
        | NodeEnum::SqlvalueFunction(_)
        | NodeEnum::SetToDefault(_)
        | NodeEnum::AStar(_)
        | NodeEnum::String(_)
        | NodeEnum::Integer(_)
        | NodeEnum::Float(_)
        | NodeEnum::Boolean(_)
        | NodeEnum::BitString(_) => {}
        NodeEnum::AExpr(e) => {
            opt(&mut out, &e.lexpr);
            opt(&mut out, &e.rexpr);
        }
        NodeEnum::BoolExpr(b) => out.extend(&b.args),
        NodeEnum::FuncCall(f) => {
            out.extend(&f.args);
            out.extend(&f.agg_order);
            opt(&mut out, &f.agg_filter);
            if let Some(w) = f.over.as_deref() {
                out.extend(&w.partition_clause);
                out.extend(&w.order_clause);
                opt(&mut out, &w.start_offset);
                opt(&mut out, &w.end_offset);
            }
        }
        NodeEnum::WindowDef(w) => {
            out.extend(&w.partition_clause);
            out.extend(&w.order_clause);
            opt(&mut out, &w.start_offset);
            opt(&mut out, &w.end_offset);
        }
        NodeEnum::TypeCast(t) => opt(&mut out, &t.arg),
        NodeEnum::CollateClause(c) => opt(&mut out, &c.arg),
        NodeEnum::NullTest(n) => opt(&mut out, &n.arg),
        NodeEnum::BooleanTest(b) => opt(&mut out, &b.arg),
        NodeEnum::CaseExpr(c) => {
            opt(&mut out, &c.arg);
            out.extend(&c.args);
            opt(&mut out, &c.defresult);
        }
        NodeEnum::CaseWhen(w) => {
            opt(&mut out, &w.expr);
            opt(&mut out, &w.result);
        }
        NodeEnum::CoalesceExpr(c) => out.extend(&c.args),
        NodeEnum::MinMaxExpr(m) => out.extend(&m.args),
        NodeEnum::RowExpr(r) => out.extend(&r.args),
        NodeEnum::AArrayExpr(a) => out.extend(&a.elements),
        NodeEnum::List(l) => out.extend(&l.items),
        NodeEnum::AIndirection(a) => {
            opt(&mut out, &a.arg);
            out.extend(&a.indirection);
        }
        NodeEnum::AIndices(i) => {
            opt(&mut out, &i.lidx);
            opt(&mut out, &i.uidx);
        }
        NodeEnum::ResTarget(r) => {
            opt(&mut out, &r.val);
            out.extend(&r.indirection);
        }
        NodeEnum::SortBy(s) => opt(&mut out, &s.node),
        NodeEnum::MultiAssignRef(m) => opt(&mut out, &m.source),
        NodeEnum::GroupingSet(g) => out.extend(&g.content),
        NodeEnum::NamedArgExpr(n) => opt(&mut out, &n.arg),
        NodeEnum::SubLink(s) => opt(&mut out, &s.testexpr),
        _ => return None,
    }
    Some(out)
}

/// Strips every column reference in `node` to its last name (`o.email` → `email`).
fn unqualify(node: &mut Node, depth: usize) {
    fn opt(node: &mut Option<Box<Node>>, depth: usize) {
        if let Some(node) = node.as_deref_mut() {
            unqualify(node, depth + 1);
        }
    }
    fn all(nodes: &mut [Node], depth: usize) {
        for node in nodes {
            unqualify(node, depth + 1);
        }
    }
    if depth > MAX_DEPTH {
        return;
    }
    let Some(inner) = node.node.as_mut() else {
        return;
    };
    match inner {
        NodeEnum::ColumnRef(c) if c.fields.len() > 1 => {
            let keep = c.fields.len() - 1;
            c.fields.drain(..keep);
        }
        NodeEnum::AExpr(e) => {
            opt(&mut e.lexpr, depth);
            opt(&mut e.rexpr, depth);
        }
        NodeEnum::BoolExpr(b) => all(&mut b.args, depth),
        NodeEnum::FuncCall(f) => all(&mut f.args, depth),
        NodeEnum::TypeCast(t) => opt(&mut t.arg, depth),
        NodeEnum::CollateClause(c) => opt(&mut c.arg, depth),
        NodeEnum::NullTest(n) => opt(&mut n.arg, depth),
        NodeEnum::BooleanTest(b) => opt(&mut b.arg, depth),
        NodeEnum::CaseExpr(c) => {
            opt(&mut c.arg, depth);
            all(&mut c.args, depth);
            opt(&mut c.defresult, depth);
        }
        NodeEnum::CaseWhen(w) => {
            opt(&mut w.expr, depth);
            opt(&mut w.result, depth);
        }
        NodeEnum::CoalesceExpr(c) => all(&mut c.args, depth),
        NodeEnum::MinMaxExpr(m) => all(&mut m.args, depth),
        NodeEnum::RowExpr(r) => all(&mut r.args, depth),
        NodeEnum::AArrayExpr(a) => all(&mut a.elements, depth),
        NodeEnum::List(l) => all(&mut l.items, depth),
        NodeEnum::AIndirection(a) => {
            opt(&mut a.arg, depth);
            all(&mut a.indirection, depth);
        }
        NodeEnum::AIndices(i) => {
            opt(&mut i.lidx, depth);
            opt(&mut i.uidx, depth);
        }
        NodeEnum::NamedArgExpr(n) => opt(&mut n.arg, depth),
        _ => {}
    }
}

fn string_of(node: &Node) -> Option<String> {
    match &node.node {
        Some(NodeEnum::String(s)) => Some(s.sval.clone()),
        _ => None,
    }
}

/// The last name of an operator or function name list (`pg_catalog.=` → `=`).
fn op_name(names: &[Node]) -> Option<&str> {
    names.last().and_then(|n| match &n.node {
        Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
        _ => None,
    })
}

fn single_name(c: &ColumnRef) -> Option<&str> {
    match c.fields.as_slice() {
        [field] => match &field.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        },
        _ => None,
    }
}

/// `ORDER BY 2` / `GROUP BY 2`: the second output, when it is a plain column.
fn positional(node: &Node, outputs: &[Output]) -> Option<(usize, String)> {
    let Some(NodeEnum::AConst(c)) = &node.node else {
        return None;
    };
    let Some(a_const::Val::Ival(i)) = &c.val else {
        return None;
    };
    let index = usize::try_from(i.ival).ok()?.checked_sub(1)?;
    outputs.get(index)?.column.clone()
}

/// A string literal's text (possibly cast).
fn literal_string(node: &Node) -> Option<&str> {
    match &node.node {
        Some(NodeEnum::AConst(c)) => match &c.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.as_str()),
            _ => None,
        },
        Some(NodeEnum::TypeCast(t)) => t.arg.as_deref().and_then(literal_string),
        _ => None,
    }
}

fn output_names(outputs: &[Output]) -> Option<Vec<String>> {
    if outputs.iter().any(|o| o.star) {
        return None;
    }
    let names: Vec<String> = outputs.iter().filter_map(|o| o.name.clone()).collect();
    (!names.is_empty()).then_some(names)
}

fn alias_parts(alias: Option<&protobuf::Alias>) -> (Option<String>, Vec<String>) {
    match alias {
        Some(alias) => (
            Some(alias.aliasname.clone()),
            alias.colnames.iter().filter_map(string_of).collect(),
        ),
        None => (None, Vec::new()),
    }
}

/// A function in `FROM` without an alias is named after the function.
fn first_function_name(functions: &[Node]) -> Option<String> {
    let first = functions.first()?;
    let call = match &first.node {
        Some(NodeEnum::List(list)) => list.items.first()?,
        _ => first,
    };
    match &call.node {
        Some(NodeEnum::FuncCall(f)) => f.funcname.last().and_then(string_of),
        _ => None,
    }
}

fn push_unique(list: &mut Vec<String>, value: &str) {
    if !list.iter().any(|v| v == value) {
        list.push(value.to_owned());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::advisor::model::Column;

    /// A table with `columns` (name, distinct values) and `rows` rows.
    pub(crate) fn table(schema: &str, name: &str, rows: f64, columns: &[(&str, f64)]) -> Table {
        Table {
            name: TableName {
                schema: schema.into(),
                name: name.into(),
            },
            rows,
            pages: (rows / 100.0) as i64,
            columns: columns
                .iter()
                .map(|(c, distinct)| Column {
                    name: (*c).into(),
                    type_name: "integer".into(),
                    type_len: 4,
                    type_align: 'i',
                    n_distinct: Some(*distinct),
                    ..Column::default()
                })
                .collect(),
            indexes: Vec::new(),
            writes: Default::default(),
            updated_columns: Vec::new(),
        }
    }

    pub(crate) fn app() -> Vec<Table> {
        vec![
            table(
                "public",
                "orders",
                1e6,
                &[
                    ("id", 1e6),
                    ("account_id", 1e4),
                    ("status", 4.0),
                    ("created_at", 9e5),
                    ("total", 1e5),
                    ("archived", 2.0),
                    ("deleted_at", 10.0),
                ],
            ),
            table(
                "public",
                "users",
                1e5,
                &[("id", 1e5), ("email", 1e5), ("name", 9e4)],
            ),
            table(
                "public",
                "customers",
                5e4,
                &[("id", 5e4), ("name", 4e4), ("region", 10.0)],
            ),
            table(
                "billing",
                "invoices",
                2e5,
                &[("id", 2e5), ("order_id", 2e5)],
            ),
            table("audit", "events", 10.0, &[("id", 10.0)]),
            table("audit", "orders", 10.0, &[("id", 10.0)]),
        ]
    }

    pub(crate) fn tpch() -> Vec<Table> {
        let t = |name: &str, rows: f64, cols: &[&str]| {
            let columns: Vec<(&str, f64)> = cols.iter().map(|c| (*c, 100.0)).collect();
            table("public", name, rows, &columns)
        };
        vec![
            t("region", 5.0, &["r_regionkey", "r_name", "r_comment"]),
            t(
                "nation",
                25.0,
                &["n_nationkey", "n_name", "n_regionkey", "n_comment"],
            ),
            t(
                "supplier",
                1e4,
                &[
                    "s_suppkey",
                    "s_name",
                    "s_address",
                    "s_nationkey",
                    "s_phone",
                    "s_acctbal",
                    "s_comment",
                ],
            ),
            t(
                "customer",
                1.5e5,
                &[
                    "c_custkey",
                    "c_name",
                    "c_address",
                    "c_nationkey",
                    "c_phone",
                    "c_acctbal",
                    "c_mktsegment",
                    "c_comment",
                ],
            ),
            t(
                "part",
                2e5,
                &[
                    "p_partkey",
                    "p_name",
                    "p_mfgr",
                    "p_brand",
                    "p_type",
                    "p_size",
                    "p_container",
                    "p_retailprice",
                    "p_comment",
                ],
            ),
            t(
                "partsupp",
                8e5,
                &[
                    "ps_partkey",
                    "ps_suppkey",
                    "ps_availqty",
                    "ps_supplycost",
                    "ps_comment",
                ],
            ),
            t(
                "orders",
                1.5e6,
                &[
                    "o_orderkey",
                    "o_custkey",
                    "o_orderstatus",
                    "o_totalprice",
                    "o_orderdate",
                    "o_orderpriority",
                    "o_clerk",
                    "o_shippriority",
                    "o_comment",
                ],
            ),
            t(
                "lineitem",
                6e6,
                &[
                    "l_orderkey",
                    "l_partkey",
                    "l_suppkey",
                    "l_linenumber",
                    "l_quantity",
                    "l_extendedprice",
                    "l_discount",
                    "l_tax",
                    "l_returnflag",
                    "l_linestatus",
                    "l_shipdate",
                    "l_commitdate",
                    "l_receiptdate",
                    "l_shipinstruct",
                    "l_shipmode",
                    "l_comment",
                ],
            ),
        ]
    }

    pub(crate) const TPCH: [&str; 22] = [
        "select l_returnflag, l_linestatus, sum(l_quantity) as sum_qty, sum(l_extendedprice) as sum_base_price, sum(l_extendedprice * (1 - l_discount)) as sum_disc_price, sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) as sum_charge, avg(l_quantity) as avg_qty, avg(l_extendedprice) as avg_price, avg(l_discount) as avg_disc, count(*) as count_order from lineitem where l_shipdate <= date '1998-12-01' - interval '90' day group by l_returnflag, l_linestatus order by l_returnflag, l_linestatus",
        "select s_acctbal, s_name, n_name, p_partkey, p_mfgr, s_address, s_phone, s_comment from part, supplier, partsupp, nation, region where p_partkey = ps_partkey and s_suppkey = ps_suppkey and p_size = 15 and p_type like '%BRASS' and s_nationkey = n_nationkey and n_regionkey = r_regionkey and r_name = 'EUROPE' and ps_supplycost = (select min(ps_supplycost) from partsupp, supplier, nation, region where p_partkey = ps_partkey and s_suppkey = ps_suppkey and s_nationkey = n_nationkey and n_regionkey = r_regionkey and r_name = 'EUROPE') order by s_acctbal desc, n_name, s_name, p_partkey limit 100",
        "select l_orderkey, sum(l_extendedprice * (1 - l_discount)) as revenue, o_orderdate, o_shippriority from customer, orders, lineitem where c_mktsegment = 'BUILDING' and c_custkey = o_custkey and l_orderkey = o_orderkey and o_orderdate < date '1995-03-15' and l_shipdate > date '1995-03-15' group by l_orderkey, o_orderdate, o_shippriority order by revenue desc, o_orderdate limit 10",
        "select o_orderpriority, count(*) as order_count from orders where o_orderdate >= date '1993-07-01' and o_orderdate < date '1993-07-01' + interval '3' month and exists (select * from lineitem where l_orderkey = o_orderkey and l_commitdate < l_receiptdate) group by o_orderpriority order by o_orderpriority",
        "select n_name, sum(l_extendedprice * (1 - l_discount)) as revenue from customer, orders, lineitem, supplier, nation, region where c_custkey = o_custkey and l_orderkey = o_orderkey and l_suppkey = s_suppkey and c_nationkey = s_nationkey and s_nationkey = n_nationkey and n_regionkey = r_regionkey and r_name = 'ASIA' and o_orderdate >= date '1994-01-01' and o_orderdate < date '1994-01-01' + interval '1' year group by n_name order by revenue desc",
        "select sum(l_extendedprice * l_discount) as revenue from lineitem where l_shipdate >= date '1994-01-01' and l_shipdate < date '1994-01-01' + interval '1' year and l_discount between .06 - 0.01 and .06 + 0.01 and l_quantity < 24",
        "select supp_nation, cust_nation, l_year, sum(volume) as revenue from (select n1.n_name as supp_nation, n2.n_name as cust_nation, extract(year from l_shipdate) as l_year, l_extendedprice * (1 - l_discount) as volume from supplier, lineitem, orders, customer, nation n1, nation n2 where s_suppkey = l_suppkey and o_orderkey = l_orderkey and c_custkey = o_custkey and s_nationkey = n1.n_nationkey and c_nationkey = n2.n_nationkey and ((n1.n_name = 'FRANCE' and n2.n_name = 'GERMANY') or (n1.n_name = 'GERMANY' and n2.n_name = 'FRANCE')) and l_shipdate between date '1995-01-01' and date '1996-12-31') as shipping group by supp_nation, cust_nation, l_year order by supp_nation, cust_nation, l_year",
        "select o_year, sum(case when nation = 'BRAZIL' then volume else 0 end) / sum(volume) as mkt_share from (select extract(year from o_orderdate) as o_year, l_extendedprice * (1 - l_discount) as volume, n2.n_name as nation from part, supplier, lineitem, orders, customer, nation n1, nation n2, region where p_partkey = l_partkey and s_suppkey = l_suppkey and l_orderkey = o_orderkey and o_custkey = c_custkey and c_nationkey = n1.n_nationkey and n1.n_regionkey = r_regionkey and r_name = 'AMERICA' and s_nationkey = n2.n_nationkey and o_orderdate between date '1995-01-01' and date '1996-12-31' and p_type = 'ECONOMY ANODIZED STEEL') as all_nations group by o_year order by o_year",
        "select nation, o_year, sum(amount) as sum_profit from (select n_name as nation, extract(year from o_orderdate) as o_year, l_extendedprice * (1 - l_discount) - ps_supplycost * l_quantity as amount from part, supplier, lineitem, partsupp, orders, nation where s_suppkey = l_suppkey and ps_suppkey = l_suppkey and ps_partkey = l_partkey and p_partkey = l_partkey and o_orderkey = l_orderkey and s_nationkey = n_nationkey and p_name like '%green%') as profit group by nation, o_year order by nation, o_year desc",
        "select c_custkey, c_name, sum(l_extendedprice * (1 - l_discount)) as revenue, c_acctbal, n_name, c_address, c_phone, c_comment from customer, orders, lineitem, nation where c_custkey = o_custkey and l_orderkey = o_orderkey and o_orderdate >= date '1993-10-01' and o_orderdate < date '1993-10-01' + interval '3' month and l_returnflag = 'R' and c_nationkey = n_nationkey group by c_custkey, c_name, c_acctbal, c_phone, n_name, c_address, c_comment order by revenue desc limit 20",
        "select ps_partkey, sum(ps_supplycost * ps_availqty) as value from partsupp, supplier, nation where ps_suppkey = s_suppkey and s_nationkey = n_nationkey and n_name = 'GERMANY' group by ps_partkey having sum(ps_supplycost * ps_availqty) > (select sum(ps_supplycost * ps_availqty) * 0.0001000000 from partsupp, supplier, nation where ps_suppkey = s_suppkey and s_nationkey = n_nationkey and n_name = 'GERMANY') order by value desc",
        "select l_shipmode, sum(case when o_orderpriority = '1-URGENT' or o_orderpriority = '2-HIGH' then 1 else 0 end) as high_line_count, sum(case when o_orderpriority <> '1-URGENT' and o_orderpriority <> '2-HIGH' then 1 else 0 end) as low_line_count from orders, lineitem where o_orderkey = l_orderkey and l_shipmode in ('MAIL', 'SHIP') and l_commitdate < l_receiptdate and l_shipdate < l_commitdate and l_receiptdate >= date '1994-01-01' and l_receiptdate < date '1994-01-01' + interval '1' year group by l_shipmode order by l_shipmode",
        "select c_count, count(*) as custdist from (select c_custkey, count(o_orderkey) from customer left outer join orders on c_custkey = o_custkey and o_comment not like '%special%requests%' group by c_custkey) as c_orders (c_custkey, c_count) group by c_count order by custdist desc, c_count desc",
        "select 100.00 * sum(case when p_type like 'PROMO%' then l_extendedprice * (1 - l_discount) else 0 end) / sum(l_extendedprice * (1 - l_discount)) as promo_revenue from lineitem, part where l_partkey = p_partkey and l_shipdate >= date '1995-09-01' and l_shipdate < date '1995-09-01' + interval '1' month",
        "with revenue0 (supplier_no, total_revenue) as (select l_suppkey, sum(l_extendedprice * (1 - l_discount)) from lineitem where l_shipdate >= date '1996-01-01' and l_shipdate < date '1996-01-01' + interval '3' month group by l_suppkey) select s_suppkey, s_name, s_address, s_phone, total_revenue from supplier, revenue0 where s_suppkey = supplier_no and total_revenue = (select max(total_revenue) from revenue0) order by s_suppkey",
        "select p_brand, p_type, p_size, count(distinct ps_suppkey) as supplier_cnt from partsupp, part where p_partkey = ps_partkey and p_brand <> 'Brand#45' and p_type not like 'MEDIUM POLISHED%' and p_size in (49, 14, 23, 45, 19, 3, 36, 9) and ps_suppkey not in (select s_suppkey from supplier where s_comment like '%Customer%Complaints%') group by p_brand, p_type, p_size order by supplier_cnt desc, p_brand, p_type, p_size",
        "select sum(l_extendedprice) / 7.0 as avg_yearly from lineitem, part where p_partkey = l_partkey and p_brand = 'Brand#23' and p_container = 'MED BOX' and l_quantity < (select 0.2 * avg(l_quantity) from lineitem where l_partkey = p_partkey)",
        "select c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice, sum(l_quantity) from customer, orders, lineitem where o_orderkey in (select l_orderkey from lineitem group by l_orderkey having sum(l_quantity) > 300) and c_custkey = o_custkey and o_orderkey = l_orderkey group by c_name, c_custkey, o_orderkey, o_orderdate, o_totalprice order by o_totalprice desc, o_orderdate limit 100",
        "select sum(l_extendedprice* (1 - l_discount)) as revenue from lineitem, part where (p_partkey = l_partkey and p_brand = 'Brand#12' and p_container in ('SM CASE', 'SM BOX', 'SM PACK', 'SM PKG') and l_quantity >= 1 and l_quantity <= 1 + 10 and p_size between 1 and 5 and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON') or (p_partkey = l_partkey and p_brand = 'Brand#23' and p_container in ('MED BAG', 'MED BOX', 'MED PKG', 'MED PACK') and l_quantity >= 10 and l_quantity <= 10 + 10 and p_size between 1 and 10 and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON') or (p_partkey = l_partkey and p_brand = 'Brand#34' and p_container in ('LG CASE', 'LG BOX', 'LG PACK', 'LG PKG') and l_quantity >= 20 and l_quantity <= 20 + 10 and p_size between 1 and 15 and l_shipmode in ('AIR', 'AIR REG') and l_shipinstruct = 'DELIVER IN PERSON')",
        "select s_name, s_address from supplier, nation where s_suppkey in (select ps_suppkey from partsupp where ps_partkey in (select p_partkey from part where p_name like 'forest%') and ps_availqty > (select 0.5 * sum(l_quantity) from lineitem where l_partkey = ps_partkey and l_suppkey = ps_suppkey and l_shipdate >= date '1994-01-01' and l_shipdate < date '1994-01-01' + interval '1' year)) and s_nationkey = n_nationkey and n_name = 'CANADA' order by s_name",
        "select s_name, count(*) as numwait from supplier, lineitem l1, orders, nation where s_suppkey = l1.l_suppkey and o_orderkey = l1.l_orderkey and o_orderstatus = 'F' and l1.l_receiptdate > l1.l_commitdate and exists (select * from lineitem l2 where l2.l_orderkey = l1.l_orderkey and l2.l_suppkey <> l1.l_suppkey) and not exists (select * from lineitem l3 where l3.l_orderkey = l1.l_orderkey and l3.l_suppkey <> l1.l_suppkey and l3.l_receiptdate > l3.l_commitdate) and s_nationkey = n_nationkey and n_name = 'SAUDI ARABIA' group by s_name order by numwait desc, s_name limit 100",
        "select cntrycode, count(*) as numcust, sum(c_acctbal) as totacctbal from (select substring(c_phone from 1 for 2) as cntrycode, c_acctbal from customer where substring(c_phone from 1 for 2) in ('13', '31', '23', '29', '30', '18', '17') and c_acctbal > (select avg(c_acctbal) from customer where c_acctbal > 0.00 and substring(c_phone from 1 for 2) in ('13', '31', '23', '29', '30', '18', '17')) and not exists (select * from orders where o_custkey = c_custkey)) as custsale group by cntrycode order by cntrycode",
    ];

    fn name(schema: &str, table: &str) -> TableName {
        TableName {
            schema: schema.into(),
            name: table.into(),
        }
    }

    fn shape(sql: &str, tables: &[Table]) -> StatementShape {
        match analyze(sql, tables) {
            Ok(shape) => shape,
            Err(e) => panic!("{sql}: {e}"),
        }
    }

    fn use_of<'s>(shape: &'s StatementShape, table: &str) -> &'s TableUse {
        shape
            .tables
            .iter()
            .find(|u| u.table.as_ref().is_some_and(|t| t.name == table))
            .unwrap_or_else(|| panic!("no use of {table} in {shape:#?}"))
    }

    #[test]
    fn aliases_implicit_joins_and_schemas() {
        let tables = app();
        let sh = shape(
            "select o.id, c.name from orders o, customers as c, pg_class \
             where o.account_id = c.id and o.status = $1 order by o.created_at desc",
            &tables,
        );
        assert_eq!(sh.kind, StatementKind::Select);
        assert_eq!(sh.tables.len(), 2);
        let orders = use_of(&sh, "orders");
        assert_eq!(orders.table, Some(name("public", "orders")));
        assert_eq!(orders.join, ["account_id"]);
        assert_eq!(orders.equality, ["status"]);
        assert_eq!(orders.order_by, [("created_at".to_owned(), true)]);
        assert_eq!(
            orders.referenced,
            ["id", "account_id", "status", "created_at"]
        );
        let customers = use_of(&sh, "customers");
        assert_eq!(customers.join, ["id"]);
        assert_eq!(customers.referenced, ["name", "id"]);
        assert_eq!(sh.param_count, 1);
        assert_eq!(
            sh.params.get(&1),
            Some(&ParamUse {
                table: name("public", "orders"),
                column: "status".into(),
                comparison: Comparison::Equal,
            })
        );

        // Unqualified: public first, else the one schema that has it; qualified: exactly.
        let sh = shape(
            "select 1 from invoices join audit.orders a on a.id = invoices.order_id",
            &tables,
        );
        assert_eq!(sh.tables[0].table, Some(name("billing", "invoices")));
        assert_eq!(sh.tables[1].table, Some(name("audit", "orders")));
        assert_eq!(sh.tables[0].join, ["order_id"]);

        // JOIN … USING joins both sides; explicit JOIN … ON too.
        let sh = shape(
            "select o.total from orders o join users u using (id) \
             left join customers c on c.id = o.account_id where u.email = $1",
            &tables,
        );
        assert_eq!(use_of(&sh, "users").join, ["id"]);
        assert_eq!(use_of(&sh, "orders").join, ["id", "account_id"]);
        assert_eq!(use_of(&sh, "customers").join, ["id"]);
        assert_eq!(use_of(&sh, "users").equality, ["email"]);
    }

    #[test]
    fn unqualified_columns_resolve_to_the_one_table_that_has_them() {
        let sh = shape(
            "select id, email, total from orders, users where email = $1 and total > 10",
            &app(),
        );
        let users = use_of(&sh, "users");
        let orders = use_of(&sh, "orders");
        // `id` is in both: ambiguous, left out.
        assert_eq!(users.referenced, ["email"]);
        assert_eq!(orders.referenced, ["total"]);
        assert_eq!(orders.range, ["total"]);
    }

    #[test]
    fn correlated_exists_is_a_join() {
        let sh = shape(
            "select * from orders o where o.status = $1 and exists \
             (select * from invoices i where i.order_id = o.id)",
            &app(),
        );
        let orders = use_of(&sh, "orders");
        assert!(orders.all_columns);
        assert_eq!(orders.join, ["id"]);
        let invoices = use_of(&sh, "invoices");
        assert_eq!(invoices.join, ["order_id"]);
        // EXISTS (SELECT * …) reads no column.
        assert!(!invoices.all_columns);

        // Unqualified correlated references reach the outer scope too, and IN (SELECT …) joins.
        let sh = shape(
            "select id from customers where not exists (select 1 from orders where account_id = \
             customers.id and status = 'open') and id in (select account_id from orders)",
            &app(),
        );
        assert_eq!(use_of(&sh, "orders").join, ["account_id"]);
        assert_eq!(use_of(&sh, "orders").equality, ["status"]);
        assert_eq!(use_of(&sh, "customers").join, ["id"]);
    }

    #[test]
    fn params_with_between_in_and_any() {
        let sh = shape(
            "select id from orders where created_at between $1 and $2 and status in ($3, $4) \
             and account_id = any($5) and $6 < total limit $7",
            &app(),
        );
        let orders = use_of(&sh, "orders");
        assert_eq!(orders.range, ["created_at", "total"]);
        assert_eq!(orders.equality, ["status", "account_id"]);
        assert_eq!(sh.param_count, 7);
        let expect = [
            (1, "created_at", Comparison::Range),
            (2, "created_at", Comparison::Range),
            (3, "status", Comparison::Equal),
            (4, "status", Comparison::Equal),
            (5, "account_id", Comparison::Equal),
            (6, "total", Comparison::Range),
        ];
        assert_eq!(sh.params.len(), expect.len());
        for (n, column, comparison) in expect {
            let p = &sh.params[&n];
            assert_eq!(
                (p.column.as_str(), p.comparison),
                (column, comparison),
                "${n}"
            );
        }
        // A prefix LIKE is a range; a leading wildcard is not.
        let sh = shape(
            "select id from users where name like 'ab%' and email like '%x' and id::text like $1",
            &app(),
        );
        assert_eq!(use_of(&sh, "users").range, ["name"]);
        assert_eq!(sh.params[&1].comparison, Comparison::Other);
    }

    #[test]
    fn expression_comparison() {
        let sh = shape("select u.id from users u where lower(u.email) = $1", &app());
        let users = use_of(&sh, "users");
        assert_eq!(
            users.expressions,
            [Key::Expression {
                sql: "lower(email)".into(),
                columns: vec!["email".into()],
            }]
        );
        assert!(users.equality.is_empty());
        assert_eq!(users.referenced, ["id", "email"]);
        assert_eq!(
            sh.params[&1],
            ParamUse {
                table: name("public", "users"),
                column: "email".into(),
                comparison: Comparison::Equal,
            }
        );
    }

    #[test]
    fn constant_predicates_for_partial_indexes() {
        let sh = shape(
            "select o.id from orders o where o.status = 'pending' and o.deleted_at is null \
             and not o.archived and o.total = 5 and o.account_id = $1 \
             and (o.created_at is not null or o.total = 6) order by o.created_at",
            &app(),
        );
        let orders = use_of(&sh, "orders");
        let sql: Vec<&str> = orders
            .constant_predicates
            .iter()
            .map(|p| p.sql.as_str())
            .collect();
        assert_eq!(
            sql,
            [
                "status = 'pending'",
                "deleted_at IS NULL",
                "NOT archived",
                "total = 5"
            ]
        );
        assert_eq!(orders.constant_predicates[0].column, "status");
        assert_eq!(orders.equality, ["status", "total", "account_id"]);
    }

    #[test]
    fn order_and_group_by_positions_and_aliases() {
        let sh = shape(
            "select status, account_id as acct, count(*) as n from orders \
             group by 1, acct order by n desc, 2 desc, status",
            &app(),
        );
        let orders = use_of(&sh, "orders");
        assert_eq!(orders.group_by, ["status", "account_id"]);
        assert_eq!(
            orders.order_by,
            [
                ("account_id".to_owned(), true),
                ("status".to_owned(), false)
            ]
        );
    }

    #[test]
    fn ctes_and_derived_tables_are_not_tables() {
        let sh = shape(
            "with orders as (select 1 as id) select id from orders",
            &app(),
        );
        assert!(sh.tables.is_empty(), "{sh:#?}");
        let sh = shape(
            "with recent as (select id, account_id from orders where created_at > $1) \
             select r.id, c.name from recent r join customers c on c.id = r.account_id \
             join (select id from users where email = $2) u on u.id = r.id",
            &app(),
        );
        assert_eq!(use_of(&sh, "orders").range, ["created_at"]);
        assert_eq!(use_of(&sh, "users").equality, ["email"]);
        assert_eq!(use_of(&sh, "customers").join, ["id"]);
        assert_eq!(sh.param_count, 2);
    }

    #[test]
    fn update_delete_insert() {
        let sh = shape(
            "update orders set status = $1, total = total + $2 where id = $3",
            &app(),
        );
        assert_eq!(sh.kind, StatementKind::Update);
        assert_eq!(sh.written, Some(name("public", "orders")));
        assert_eq!(sh.updated_columns, ["status", "total"]);
        let orders = use_of(&sh, "orders");
        assert_eq!(orders.equality, ["id"]);
        assert_eq!(orders.referenced, ["total", "id"]);
        assert_eq!(sh.param_count, 3);
        assert_eq!(sh.params[&3].column, "id");

        let sh = shape(
            "insert into orders (account_id, status) values ($1, $2), ($3, $4) \
             on conflict (id) do nothing",
            &app(),
        );
        assert_eq!(sh.kind, StatementKind::Insert);
        assert_eq!(sh.written, Some(name("public", "orders")));
        assert_eq!(sh.param_count, 4);
        assert_eq!(sh.tables.len(), 1);

        let sh = shape(
            "delete from orders o using customers c where o.account_id = c.id \
             and c.region = $1 and o.created_at < now() - interval '1 year'",
            &app(),
        );
        assert_eq!(sh.kind, StatementKind::Delete);
        assert_eq!(sh.written, Some(name("public", "orders")));
        assert_eq!(use_of(&sh, "orders").range, ["created_at"]);
        assert_eq!(use_of(&sh, "customers").equality, ["region"]);
        assert!(sh.updated_columns.is_empty());
    }

    #[test]
    fn errors() {
        let e = analyze("selec * from orders", &app()).err();
        assert!(
            e.as_ref().is_some_and(|e| e.0.contains("syntax error")),
            "{e:?}"
        );
        let e = analyze("select 1; select 2", &app()).err();
        assert_eq!(e.map(|e| e.0).as_deref(), Some("one statement expected"));
        assert!(analyze("", &app()).is_err());
        assert!(analyze("select 1\0", &app()).is_err());
    }

    #[test]
    fn odd_statements_do_not_panic() {
        for sql in [
            "select",
            "select $1",
            "values ($1, $2)",
            "vacuum orders",
            "explain select * from orders where id = $1",
            "create table x (a int)",
            "select * from generate_series(1, 10) g where g > $1",
            "select (select 1), array[1,2] @> array[$1]",
            "select id from orders union select id from users order by 1 limit $1",
            "select count(*) filter (where status = 'x') over (partition by account_id) from orders",
            "select * from orders o, lateral (select * from invoices i where i.order_id = o.id) x",
            "select row_to_json(o.*) from orders o where (o.id, o.status) = ($1, $2)",
            "select x.* from (values (1), (2)) x(a) where a = $1",
            "with recursive t(n) as (select 1 union all select n + 1 from t where n < 5) select * from t",
            "select * from orders where status is distinct from $1 and created_at at time zone 'utc' > $2",
            "select * from orders where status similar to 'a%' and status ilike $1 and total not between 1 and 2",
            "select * from orders where total = (select max(total) from orders) for update",
            "select coalesce(total, 0), greatest(total, 1), nullif(total, 0), total::text collate \"C\" from orders",
            "select json_object('a': 1), xmlelement(name a, status) from orders",
            "insert into orders select * from orders where id = $1 returning id",
            "update orders o set (status, total) = (select 'x', 1) from customers c where c.id = o.account_id returning o.*",
            "merge into orders o using customers c on c.id = o.account_id when matched then delete",
            "select * from public.orders, public.public.orders",
            "select orders.id, public.orders.total, o.nope, nope.id from orders o",
            "select $99999999999",
        ] {
            let _ = analyze(sql, &app());
            let _ = analyze(sql, &tpch());
        }
        let sh = shape(
            "select total from orders tablesample system ($1) where id = $2",
            &app(),
        );
        assert_eq!(use_of(&sh, "orders").equality, ["id"]);
        assert_eq!(sh.param_count, 2);
        let deep = format!("select {}1{}", "(".repeat(5000), ")".repeat(5000));
        let _ = analyze(&deep, &app());
        let deep = format!("select * from orders where {} id = 1", "not ".repeat(3000));
        let _ = analyze(&deep, &app());
    }

    #[test]
    fn deeply_nested_selects_keep_their_tables() {
        // Beyond the tree decoder's depth, a SELECT still names its tables.
        let concat = vec!["email"; 80].join(" || ");
        let sql =
            format!("select {concat} from users u join orders o on o.id = u.id where o.id = $2");
        let sh = shape(&sql, &app());
        assert_eq!(sh.kind, StatementKind::Select);
        let names: Vec<&str> = sh
            .tables
            .iter()
            .filter_map(|u| u.table.as_ref().map(|t| t.name.as_str()))
            .collect();
        assert_eq!(names, ["users", "orders"]);
        assert_eq!(sh.param_count, 2);
        // Read from the summary, not the tree: no column facts.
        assert!(sh.params.is_empty() && sh.tables.iter().all(|u| u.referenced.is_empty()));
        let sql = format!("update users set name = {concat} where id = $1");
        let e = analyze(&sql, &app()).err();
        assert!(e.is_some_and(|e| e.0.contains("nested too deeply")));
    }

    #[test]
    fn tpch_queries() {
        let tables = tpch();
        for (i, sql) in TPCH.iter().enumerate() {
            let sh = match analyze(sql, &tables) {
                Ok(sh) => sh,
                Err(e) => panic!("Q{}: {e}", i + 1),
            };
            assert_eq!(sh.kind, StatementKind::Select, "Q{}", i + 1);
            assert!(!sh.tables.is_empty(), "Q{}", i + 1);
        }
        let q3 = shape(TPCH[2], &tables);
        assert_eq!(use_of(&q3, "customer").equality, ["c_mktsegment"]);
        assert_eq!(use_of(&q3, "customer").join, ["c_custkey"]);
        assert!(
            use_of(&q3, "lineitem")
                .join
                .contains(&"l_orderkey".to_owned())
        );
        assert!(
            use_of(&q3, "orders")
                .join
                .contains(&"o_orderkey".to_owned())
        );
        assert_eq!(use_of(&q3, "orders").range, ["o_orderdate"]);
        assert_eq!(use_of(&q3, "lineitem").range, ["l_shipdate"]);
        assert_eq!(
            use_of(&q3, "customer").constant_predicates[0].sql,
            "c_mktsegment = 'BUILDING'"
        );

        let q5 = shape(TPCH[4], &tables);
        assert_eq!(q5.tables.len(), 6);
        assert_eq!(use_of(&q5, "region").equality, ["r_name"]);

        // Q17: the scalar subquery's correlation is a join on lineitem.l_partkey.
        let q17 = shape(TPCH[16], &tables);
        assert_eq!(use_of(&q17, "lineitem").join, ["l_partkey"]);
        assert_eq!(use_of(&q17, "part").equality, ["p_brand", "p_container"]);

        // Q20: nested IN subqueries and a correlated scalar one.
        let q20 = shape(TPCH[19], &tables);
        assert_eq!(use_of(&q20, "part").range, ["p_name"]);
        assert_eq!(use_of(&q20, "lineitem").join, ["l_partkey", "l_suppkey"]);
        assert_eq!(use_of(&q20, "supplier").join, ["s_suppkey", "s_nationkey"]);

        // Q21: lineitem joined to itself on l_orderkey through EXISTS / NOT EXISTS.
        let q21 = shape(TPCH[20], &tables);
        let lineitem = use_of(&q21, "lineitem");
        assert!(lineitem.join.contains(&"l_orderkey".to_owned()));
        assert!(!lineitem.all_columns);
        assert_eq!(use_of(&q21, "orders").equality, ["o_orderstatus"]);

        // Q22: substring(c_phone from 1 for 2) IN (…) is an expression key.
        let q22 = shape(TPCH[21], &tables);
        let customer = use_of(&q22, "customer");
        assert!(matches!(
            customer.expressions.as_slice(),
            [Key::Expression { columns, .. }] if columns == &["c_phone"]
        ));
    }
}
