//! B-tree index sizes estimated from the statistics, laid out the way `CREATE INDEX` lays out a
//! new index on PostgreSQL 13+ (nbtsort.c), deduplication included.
//!
//! HypoPG sizes every row as one leaf tuple plus a flat 20% bloat, so it overestimates most where
//! keys repeat (see the notes on index sizes). The model here follows the build:
//!
//! - a leaf tuple is `MAXALIGN(IndexTupleData + key data)` plus a 4-byte line pointer; a tuple
//!   with a NULL key carries an 8-byte null bitmap header instead of none;
//! - the build deduplicates every run of equal keys into posting-list tuples of at most
//!   `MAXALIGN_DOWN(BLCKSZ / 10) - 4` = 812 bytes (not `BTMaxItemSize`: that limit is for inserts
//!   into a page that fills), unless an `INCLUDE` column or a key type that is not
//!   "equalimage" (`numeric`, floats, `jsonb`, …) turns deduplication off;
//! - leaves are packed until less than 10% of the page is free (fillfactor 90), where a posting
//!   list of the page's last tuple counts as free since its high key drops it; inner pages are
//!   packed to 70%; one metapage.
//!
//! How many times each key repeats comes from `n_distinct` and the most common values (counts
//! of the rest assumed Poisson-like), widths of text keys from the values the statistics
//! sample, the rows of a partial index from its predicate's selectivity.

use std::collections::HashMap;

use super::model::{Column, IndexDef, Key, Table};

/// `BLCKSZ`.
const BLOCK: f64 = 8192.0;
/// Free space of an empty page as `PageGetFreeSpace` sees it while the build fills it:
/// 8192 − 24 (page header) − 16 (B-tree special space) − 4 (line pointer reserved for the high
/// key) − 4 (`PageGetFreeSpace` keeps room for one more line pointer).
const EMPTY_PAGE_FREE: f64 = 8144.0;
/// A leaf page is finished when less than this is free: `BLCKSZ * (100 - fillfactor 90) / 100`.
const LEAF_FULL: f64 = 819.0;
/// An inner page is finished when less than this is free: `BLCKSZ * (100 - 70) / 100`.
const INNER_FULL: f64 = 2457.0;
/// `ItemIdData`.
const LINE_POINTER: f64 = 4.0;
/// `IndexTupleData` (heap TID and `t_info`), already MAXALIGNed.
const TUPLE_HEADER: f64 = 8.0;
/// `IndexTupleData` followed by the null bitmap, MAXALIGNed, in a tuple with a NULL key.
const NULL_TUPLE_HEADER: f64 = 16.0;
/// `ItemPointerData`: one heap TID in a posting list.
const HEAP_TID: f64 = 6.0;
/// Largest posting-list tuple the build forms: `MAXALIGN_DOWN(BLCKSZ * 10 / 100) - 4`.
const MAX_POSTING: f64 = 812.0;
/// Beyond this many key combinations the per-class layout collapses a column to its average.
const MAX_CLASSES: usize = 4096;
/// Selectivity of a predicate clause the estimator cannot read.
const UNKNOWN_SELECTIVITY: f64 = 0.5;
/// PostgreSQL's default selectivities for equality and for a range comparison.
const DEFAULT_EQ_SELECTIVITY: f64 = 0.005;
const DEFAULT_RANGE_SELECTIVITY: f64 = 1.0 / 3.0;

/// What the estimate found, for the advice's evidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizeEstimate {
    /// Estimated size in bytes (`pages × 8192`).
    pub bytes: i64,
    /// Pages in all: metapage, inner pages and leaves.
    pub pages: i64,
    /// Leaf pages.
    pub leaf_pages: i64,
    /// Rows the index holds (the table's, scaled by a partial index's predicate).
    pub rows: f64,
    /// Leaf tuples after deduplication (posting lists count once).
    pub leaf_tuples: f64,
    /// Average bytes of one plain leaf tuple, line pointer included.
    pub tuple_bytes: f64,
    /// Whether the build deduplicates it (no `INCLUDE`, key types that allow it, repeated keys).
    pub deduplicated: bool,
}

/// Estimated size in bytes of `def` built on `table`.
pub fn estimate_bytes(def: &IndexDef, table: &Table) -> i64 {
    estimate(def, table).bytes
}

/// Estimated layout of `def` built by `CREATE INDEX` on `table`, from its statistics.
pub fn estimate(def: &IndexDef, table: &Table) -> SizeEstimate {
    let table_rows = table.rows.max(0.0);
    let predicate = def
        .predicate
        .as_deref()
        .map(|sql| Predicate::read(sql, table))
        .unwrap_or_default();
    let rows = table_rows * predicate.selectivity;

    let keys: Vec<ColumnModel> = def
        .keys
        .iter()
        .map(|key| ColumnModel::of_key(key, table, &predicate))
        .collect();
    let include: Vec<ColumnModel> = def
        .include
        .iter()
        .map(|name| {
            let model = match table.column(name) {
                Some(column) => ColumnModel::of_column(column, table_rows),
                None => ColumnModel::unknown(table_rows),
            };
            model.restricted(predicate.restrictions.get(name))
        })
        .collect();

    let mut leaf_columns: Vec<&ColumnModel> = keys.iter().collect();
    leaf_columns.extend(include.iter());
    let plain_tuple = expected_tuple(&leaf_columns);

    // PostgreSQL turns deduplication off for INCLUDE indexes and for key types whose equal
    // values may differ in their bytes (`_bt_allequalimage`).
    let dedup_possible = include.is_empty() && keys.iter().all(|k| k.dedup_safe);
    let mut leaf = Leaf::default();
    let mut distinct_keys = rows;
    if dedup_possible && !keys.is_empty() && rows >= 2.0 {
        if let [key] = keys.as_slice() {
            distinct_keys = key.single_key_groups(rows, &mut leaf);
        } else {
            let space: f64 = keys
                .iter()
                .map(|k| k.distinct_after(rows) + if k.null_frac > 0.0 { 1.0 } else { 0.0 })
                .product::<f64>()
                .max(1.0);
            // Key combinations present among the rows if rows fall into the combinations
            // independently and evenly.
            distinct_keys = (space * -(-rows / space).exp_m1()).clamp(1.0, rows);
            leaf.add_groups(distinct_keys, rows / distinct_keys, plain_tuple);
        }
    } else {
        leaf.add(Leaf::group(1, plain_tuple), rows);
    }
    // "Deduplicated" when posting lists save at least 1% of the tuples, not a stray pair.
    let deduplicated = leaf.items < rows * 0.99;

    let leaf_pages = if leaf.items < 0.5 {
        0.0
    } else {
        let size = leaf.bytes / leaf.items;
        let extra = leaf.extra / leaf.items;
        // The build finishes a page when the free space, plus the posting list of the last
        // tuple (which becomes the high key without it), drops below the fillfactor's share;
        // that last tuple moves on to the next page.
        let soft = ((EMPTY_PAGE_FREE - LEAF_FULL + extra) / size).floor();
        let hard = ((EMPTY_PAGE_FREE - 8.0) / size).floor() - 1.0;
        let per_page = soft.min(hard).max(2.0);
        (leaf.items / per_page).ceil()
    };

    // Pivot tuples keep only as many key columns as separate neighbouring leaves (suffix
    // truncation), plus a heap TID when equal keys span pages.
    let mut pivot_columns: Vec<&ColumnModel> = Vec::new();
    let mut prefix_distinct = 1.0;
    for key in &keys {
        pivot_columns.push(key);
        prefix_distinct *= key.distinct_after(rows).max(1.0);
        if prefix_distinct >= leaf_pages * 2.0 {
            break;
        }
    }
    let pivot_tid = if distinct_keys < leaf_pages * 2.0 {
        8.0
    } else {
        0.0
    };
    let pivot = expected_tuple(&pivot_columns) + pivot_tid + LINE_POINTER;
    let per_inner_page = ((EMPTY_PAGE_FREE - INNER_FULL) / pivot).floor().max(2.0);
    let mut inner_pages = 0.0;
    let mut level = leaf_pages;
    while level > 1.0 {
        level = (level / per_inner_page).ceil();
        inner_pages += level;
    }

    let pages = 1.0 + leaf_pages + inner_pages;
    SizeEstimate {
        bytes: (pages * BLOCK) as i64,
        pages: pages as i64,
        leaf_pages: leaf_pages as i64,
        rows,
        leaf_tuples: leaf.items,
        tuple_bytes: plain_tuple + LINE_POINTER,
        deduplicated,
    }
}

/// Leaf tuples, their bytes (line pointers included) and the bytes of their posting lists.
#[derive(Debug, Clone, Copy, Default)]
struct Leaf {
    items: f64,
    bytes: f64,
    extra: f64,
}

impl Leaf {
    fn add(&mut self, other: Leaf, times: f64) {
        self.items += other.items * times;
        self.bytes += other.bytes * times;
        self.extra += other.extra * times;
    }

    /// `k` equal keys of a plain tuple of `tuple` bytes, as the build stores them: posting
    /// lists of at most [`MAX_POSTING`] bytes, a lone one as a plain tuple.
    fn group(k: u64, tuple: f64) -> Leaf {
        let per_posting = ((MAX_POSTING - 4.0 - tuple) / HEAP_TID).floor();
        if k == 0 {
            return Leaf::default();
        }
        if k == 1 || per_posting < 2.0 {
            let k = k as f64;
            return Leaf {
                items: k,
                bytes: k * (tuple + LINE_POINTER),
                extra: 0.0,
            };
        }
        let per_posting = per_posting as u64;
        let posting = |n: u64| maxalign(tuple + HEAP_TID * n as f64);
        let full = (k / per_posting) as f64;
        let mut out = Leaf {
            items: full,
            bytes: full * (posting(per_posting) + LINE_POINTER),
            extra: full * (posting(per_posting) - tuple),
        };
        match k % per_posting {
            0 => {}
            1 => out.add(Leaf::group(1, tuple), 1.0),
            rest => out.add(
                Leaf {
                    items: 1.0,
                    bytes: posting(rest) + LINE_POINTER,
                    extra: posting(rest) - tuple,
                },
                1.0,
            ),
        }
        out
    }

    /// A group of `k` equal keys where `k` is an expected count, between two whole counts.
    fn group_of(k: f64, tuple: f64) -> Leaf {
        let low = k.floor().max(0.0);
        let share = k - low;
        let mut out = Leaf::default();
        out.add(Leaf::group(low as u64, tuple), 1.0 - share);
        out.add(Leaf::group(low as u64 + 1, tuple), share);
        out
    }

    /// `groups` distinct keys holding `mean` rows each on average, counts spread like a
    /// zero-truncated Poisson distribution (what independent, even draws give).
    fn add_groups(&mut self, groups: f64, mean: f64, tuple: f64) {
        if groups <= 0.0 {
            return;
        }
        if mean <= 1.0 + 1e-9 {
            self.add(Leaf::group(1, tuple), groups * mean);
            return;
        }
        let lambda = ztp_lambda(mean);
        if lambda > 5000.0 {
            // Counts this large vary little relative to their mean.
            self.add(Leaf::group_of(mean, tuple), groups);
            return;
        }
        let last = (lambda + 10.0 * lambda.sqrt() + 10.0).ceil() as u64;
        let norm = (-(-lambda).exp_m1()).ln();
        let mut log_p = -lambda - norm; // log P(k) for k = 0, before the loop's first step
        let mut total = 0.0;
        let mut sum = Leaf::default();
        for k in 1..=last {
            log_p += lambda.ln() - (k as f64).ln();
            let p = log_p.exp();
            if p > 0.0 {
                sum.add(Leaf::group(k, tuple), p);
                total += p;
            }
        }
        if total > 0.0 {
            self.add(sum, groups / total);
        }
    }
}

/// λ of the zero-truncated Poisson distribution with mean `mean` (> 1): λ / (1 − e^−λ) = mean.
fn ztp_lambda(mean: f64) -> f64 {
    let (mut low, mut high) = (0.0_f64, mean);
    for _ in 0..100 {
        let mid = (low + high) / 2.0;
        let value = if mid < 1e-12 {
            1.0
        } else {
            mid / -(-mid).exp_m1()
        };
        if value < mean {
            low = mid;
        } else {
            high = mid;
        }
    }
    (low + high) / 2.0
}

fn maxalign(bytes: f64) -> f64 {
    (bytes / 8.0).ceil() * 8.0
}

fn align_to(offset: f64, align: f64) -> f64 {
    (offset / align).ceil() * align
}

/// One index column (a key or an `INCLUDE` column) as the statistics describe it, with the
/// partial index's predicate applied.
#[derive(Debug, Clone)]
struct ColumnModel {
    /// Alignment in bytes (`typalign`).
    align: f64,
    /// `typlen > 0`: fixed width, always aligned. Otherwise a varlena, whose `width` includes
    /// its header (statistics measure stored values) and which is unaligned when short.
    fixed: bool,
    /// Fraction of the indexed rows that are NULL.
    null_frac: f64,
    /// Most common values: (fraction of the indexed rows, stored width).
    common: Vec<(f64, f64)>,
    /// The most common values as pg_stats prints them, matching `common`.
    common_values: Vec<String>,
    /// Fraction of the rows with any other non-NULL value.
    rest_frac: f64,
    /// Distinct other values among the table's rows.
    rest_distinct: f64,
    /// Widths of other values as sampled (equally likely), or their average alone.
    rest_widths: Vec<f64>,
    /// Rows of the table (for how many distinct values a partial index keeps).
    table_rows: f64,
    /// Whether deduplication is safe for its type.
    dedup_safe: bool,
    /// Whether its type pads values with spaces (`character(n)`).
    padded: bool,
}

impl ColumnModel {
    fn of_key(key: &Key, table: &Table, predicate: &Predicate) -> ColumnModel {
        let rows = table.rows.max(0.0);
        match key {
            Key::Column { name, .. } => match table.column(name) {
                Some(column) => ColumnModel::of_column(column, rows)
                    .restricted(predicate.restrictions.get(name)),
                None => ColumnModel::unknown(rows),
            },
            // Without statistics of its own, an expression over one column is taken to be as
            // wide and as distinct as that column (`lower(email)`): for a deterministic function
            // its distinct values are at most the column's.
            Key::Expression { columns, .. } => match columns.as_slice() {
                [only] => match table.column(only) {
                    Some(column) => ColumnModel::of_column(column, rows),
                    None => ColumnModel::unknown(rows),
                },
                _ => {
                    let width: f64 = columns
                        .iter()
                        .filter_map(|c| table.column(c).and_then(|c| c.avg_width))
                        .sum();
                    let mut model = ColumnModel::unknown(rows);
                    if width > 0.0 {
                        model.rest_widths = vec![width];
                    }
                    model
                }
            },
        }
    }

    /// A column the statistics say nothing about: a unique 32-byte varlena.
    fn unknown(table_rows: f64) -> ColumnModel {
        ColumnModel {
            align: 4.0,
            fixed: false,
            null_frac: 0.0,
            common: Vec::new(),
            common_values: Vec::new(),
            rest_frac: 1.0,
            rest_distinct: table_rows.max(1.0),
            rest_widths: vec![32.0],
            table_rows,
            dedup_safe: true,
            padded: false,
        }
    }

    fn of_column(column: &Column, table_rows: f64) -> ColumnModel {
        let fixed = column.type_len > 0;
        let align = match column.type_align {
            'c' => 1.0,
            's' => 2.0,
            'd' => 8.0,
            _ => 4.0,
        };
        let null_frac = if column.not_null {
            0.0
        } else {
            column.null_frac.clamp(0.0, 1.0)
        };
        let average = if fixed {
            f64::from(column.type_len)
        } else {
            column.avg_width.unwrap_or(32.0).max(1.0)
        };
        let sampled = !fixed && stores_text_as_printed(&column.type_name);
        let width_of = |value: &str| {
            if fixed {
                average
            } else if sampled {
                varlena_width(value.len())
            } else {
                average
            }
        };
        let common: Vec<(f64, f64)> = column
            .most_common_vals
            .iter()
            .zip(&column.most_common_freqs)
            .map(|(value, freq)| (freq.clamp(0.0, 1.0), width_of(value)))
            .collect();
        let common_frac: f64 = common.iter().map(|(f, _)| f).sum();
        let rest_frac = (1.0 - null_frac - common_frac).max(0.0);
        let distinct = column.n_distinct.unwrap_or(table_rows).max(1.0);
        let rest_distinct = (distinct - common.len() as f64).max(1.0);
        let rest_widths = if sampled && !column.histogram_bounds.is_empty() {
            column
                .histogram_bounds
                .iter()
                .map(|v| varlena_width(v.len()))
                .collect()
        } else {
            vec![average]
        };
        ColumnModel {
            align,
            fixed,
            null_frac,
            common,
            common_values: column.most_common_vals.clone(),
            rest_frac,
            rest_distinct,
            rest_widths,
            table_rows,
            dedup_safe: dedup_safe(&column.type_name),
            padded: blank_padded(&column.type_name),
        }
    }

    /// The column among the rows a predicate's clause on it keeps.
    fn restricted(mut self, restriction: Option<&Restriction>) -> ColumnModel {
        let Some(restriction) = restriction else {
            return self;
        };
        // The predicate selects on this column itself: every value it keeps is there.
        if *restriction != Restriction::Other {
            self.table_rows = 0.0;
        }
        match restriction {
            Restriction::Equal(values) => {
                let widths: Vec<f64> = values.iter().map(|v| self.literal_width(v)).collect();
                let share = 1.0 / widths.len().max(1) as f64;
                self.common = widths.into_iter().map(|w| (share, w)).collect();
                self.common_values.clone_from(values);
                self.null_frac = 0.0;
                self.rest_frac = 0.0;
            }
            Restriction::NotEqual(_) | Restriction::NotNull => {
                if let Restriction::NotEqual(value) = restriction {
                    let position = self
                        .common_values
                        .iter()
                        .position(|v| same_value(self.padded, v, value));
                    if let Some(at) = position.filter(|&at| at < self.common.len()) {
                        self.common.remove(at);
                        self.common_values.remove(at);
                    }
                }
                self.null_frac = 0.0;
                let total: f64 = self.common.iter().map(|(f, _)| f).sum::<f64>() + self.rest_frac;
                if total > 0.0 {
                    for entry in &mut self.common {
                        entry.0 /= total;
                    }
                    self.rest_frac /= total;
                }
            }
            Restriction::IsNull => {
                self.common.clear();
                self.common_values.clear();
                self.rest_frac = 0.0;
                self.null_frac = 1.0;
            }
            Restriction::Other => {}
        }
        self
    }

    fn literal_width(&self, value: &str) -> f64 {
        if self.fixed {
            self.rest_widths.first().copied().unwrap_or(8.0)
        } else {
            varlena_width(value.len())
        }
    }

    /// Distinct non-NULL values among `rows` indexed rows.
    fn distinct_after(&self, rows: f64) -> f64 {
        let common: f64 = self
            .common
            .iter()
            .map(|(f, _)| self.kept(f * self.table_rows, rows))
            .sum();
        common + self.rest_groups(rows)
    }

    /// Probability that a value with `in_table` rows in the table keeps at least one among
    /// `rows` indexed rows, when the predicate picks rows independently of this column.
    fn kept(&self, in_table: f64, rows: f64) -> f64 {
        if self.table_rows <= 0.0 || rows >= self.table_rows {
            return 1.0;
        }
        let picked = (rows / self.table_rows).clamp(0.0, 1.0);
        1.0 - (1.0 - picked).powf(in_table.max(1.0))
    }

    /// Distinct values of the rest among `rows` indexed rows.
    fn rest_groups(&self, rows: f64) -> f64 {
        let rest_rows = self.rest_frac * rows;
        if rest_rows <= 0.0 {
            return 0.0;
        }
        let per_value = self.rest_frac * self.table_rows / self.rest_distinct;
        (self.rest_distinct * self.kept(per_value, rows))
            .max(1.0)
            .min(rest_rows)
    }

    /// Leaf tuples of a single-column index on this column over `rows` rows: NULLs and each
    /// common value as one group of equal keys, the rest as groups of Poisson-like counts.
    /// Returns the distinct keys.
    fn single_key_groups(&self, rows: f64, leaf: &mut Leaf) -> f64 {
        let mut distinct = 0.0;
        if self.null_frac > 0.0 {
            leaf.add(
                Leaf::group_of(self.null_frac * rows, NULL_TUPLE_HEADER),
                1.0,
            );
            distinct += 1.0;
        }
        for &(freq, width) in &self.common {
            leaf.add(Leaf::group_of(freq * rows, self.tuple_of(width)), 1.0);
            distinct += self.kept(freq * self.table_rows, rows);
        }
        let groups = self.rest_groups(rows);
        if groups > 0.0 {
            let share = 1.0 / self.rest_widths.len() as f64;
            let mean = self.rest_frac * rows / groups;
            for &width in &self.rest_widths {
                leaf.add_groups(groups * share, mean, self.tuple_of(width));
            }
            distinct += groups;
        }
        distinct.clamp(1.0, rows)
    }

    /// The plain tuple of this column alone holding a value `width` bytes wide.
    fn tuple_of(&self, width: f64) -> f64 {
        let mut offset = TUPLE_HEADER;
        self.place(&mut offset, width);
        maxalign(offset)
    }

    /// Places a value of `width` bytes at `offset`, aligned as the tuple would store it.
    fn place(&self, offset: &mut f64, width: f64) {
        // A varlena of up to 127 bytes (header included) is stored with a 1-byte header and
        // no alignment padding.
        if self.fixed || width > 127.0 {
            *offset = align_to(*offset, self.align);
        }
        *offset += width;
    }

    /// Its values as (probability, width, NULL = None) classes.
    fn classes(&self) -> Vec<(f64, Option<f64>)> {
        let mut out = Vec::with_capacity(self.common.len() + self.rest_widths.len() + 1);
        if self.null_frac > 0.0 {
            out.push((self.null_frac, None));
        }
        out.extend(self.common.iter().map(|&(f, w)| (f, Some(w))));
        let share = self.rest_frac / self.rest_widths.len().max(1) as f64;
        if share > 0.0 {
            out.extend(self.rest_widths.iter().map(|&w| (share, Some(w))));
        }
        out
    }

    /// Its classes reduced to NULL and one average width.
    fn collapsed(&self) -> Vec<(f64, Option<f64>)> {
        let classes = self.classes();
        let present: f64 = classes.iter().filter(|c| c.1.is_some()).map(|c| c.0).sum();
        let mut out = Vec::new();
        if self.null_frac > 0.0 {
            out.push((self.null_frac, None));
        }
        if present > 0.0 {
            let average = classes
                .iter()
                .filter_map(|&(p, w)| w.map(|w| p * w))
                .sum::<f64>()
                / present;
            out.push((present, Some(average)));
        }
        out
    }
}

/// Expected MAXALIGNed size of a plain tuple (line pointer excluded) holding `columns`, over
/// the combinations of their values' widths and NULLs.
fn expected_tuple(columns: &[&ColumnModel]) -> f64 {
    let mut per_column: Vec<Vec<(f64, Option<f64>)>> = Vec::with_capacity(columns.len());
    let mut combinations = 1_usize;
    for column in columns {
        let mut classes = column.classes();
        if classes.is_empty() {
            classes = vec![(1.0, None)];
        }
        if combinations.saturating_mul(classes.len()) > MAX_CLASSES {
            classes = column.collapsed();
        }
        combinations = combinations.saturating_mul(classes.len().max(1));
        per_column.push(classes);
    }
    let total: f64 = per_column
        .iter()
        .map(|c| c.iter().map(|x| x.0).sum::<f64>())
        .product();
    if total <= 0.0 {
        return TUPLE_HEADER;
    }
    let mut sum = 0.0;
    let mut choice = vec![0_usize; per_column.len()];
    loop {
        let mut probability = 1.0;
        let mut any_null = false;
        for (classes, &at) in per_column.iter().zip(&choice) {
            probability *= classes[at].0;
            any_null |= classes[at].1.is_none();
        }
        let mut offset = if any_null {
            NULL_TUPLE_HEADER
        } else {
            TUPLE_HEADER
        };
        for ((classes, &at), column) in per_column.iter().zip(&choice).zip(columns) {
            if let Some(width) = classes[at].1 {
                column.place(&mut offset, width);
            }
        }
        sum += probability * maxalign(offset);
        // Next combination, like an odometer.
        let mut position = 0;
        loop {
            if position == choice.len() {
                return sum / total;
            }
            choice[position] += 1;
            if choice[position] < per_column[position].len() {
                break;
            }
            choice[position] = 0;
            position += 1;
        }
    }
}

/// Stored width of a varlena value of `len` bytes: a 1-byte header when short, else 4.
fn varlena_width(len: usize) -> f64 {
    let len = len as f64;
    if len + 1.0 <= 127.0 {
        len + 1.0
    } else {
        len + 4.0
    }
}

/// Whether the type pads its values with spaces (`character(n)`), which comparisons ignore.
fn blank_padded(type_name: &str) -> bool {
    let name = type_name.trim();
    name == "character" || name == "bpchar" || name.starts_with("character(")
}

/// Whether `a` and `b` are one value: pg_stats shows `character(n)` values padded
/// (`'BUILDING  '`) where a statement says `'BUILDING'`.
fn same_value(padded: bool, a: &str, b: &str) -> bool {
    if padded {
        a.trim_end_matches(' ') == b.trim_end_matches(' ')
    } else {
        a == b
    }
}

/// Whether values of the type print as their stored bytes (so sampled values give widths).
fn stores_text_as_printed(type_name: &str) -> bool {
    type_name == "text"
        || type_name == "citext"
        || type_name.starts_with("character varying")
        || type_name.starts_with("character(")
        || type_name == "character"
}

/// Whether B-tree deduplication is safe for the type: those whose default operator class has no
/// `equalimage` support are not (PostgreSQL 15's catalog: numeric, float4/8, interval, jsonb,
/// tsvector, tsquery, arrays, ranges and multiranges, records). Nor is `character(n)`, measured:
/// PostgreSQL 15 says "index … cannot use deduplication" (DEBUG1) when it builds one, and the
/// index is as large as with `deduplicate_items = off` (TPC-H's `part(p_brand)`: 6.3 MB, not
/// the 1.4 MB a deduplicated build would take).
fn dedup_safe(type_name: &str) -> bool {
    let name = type_name.trim();
    !(name.starts_with("numeric")
        || blank_padded(name)
        || name == "real"
        || name == "double precision"
        || name.starts_with("interval")
        || name == "jsonb"
        || name == "tsvector"
        || name == "tsquery"
        || name == "record"
        || name.ends_with("[]")
        || name.ends_with("range"))
}

/// What a partial index's predicate keeps, as far as its simple clauses tell.
#[derive(Debug, Clone)]
struct Predicate {
    /// Fraction of the table's rows it keeps.
    selectivity: f64,
    /// Clauses on single columns, by column.
    restrictions: HashMap<String, Restriction>,
}

impl Default for Predicate {
    fn default() -> Self {
        Predicate {
            selectivity: 1.0,
            restrictions: HashMap::new(),
        }
    }
}

/// One clause of a predicate on one column.
#[derive(Debug, Clone, PartialEq)]
enum Restriction {
    /// `col = v`, `col IN (…)`, `col = ANY (ARRAY[…])`: printed values.
    Equal(Vec<String>),
    /// `col <> v`.
    NotEqual(String),
    /// `col IS NULL`.
    IsNull,
    /// `col IS NOT NULL`.
    NotNull,
    /// A range comparison or anything else on the column.
    Other,
}

impl Predicate {
    /// Reads `sql` (as written or as `pg_get_expr` prints it): `AND`ed simple clauses; a clause
    /// it cannot read counts as keeping half the rows.
    fn read(sql: &str, table: &Table) -> Predicate {
        let mut out = Predicate::default();
        let whole = strip_parens(sql.trim());
        if split_top_level(whole, "OR").len() > 1 {
            out.selectivity = UNKNOWN_SELECTIVITY;
            return out;
        }
        for clause in split_top_level(whole, "AND") {
            let Some((column, restriction, range)) = read_clause(strip_parens(clause.trim()))
            else {
                out.selectivity *= UNKNOWN_SELECTIVITY;
                continue;
            };
            let Some(stats) = table.column(&column) else {
                out.selectivity *= UNKNOWN_SELECTIVITY;
                continue;
            };
            out.selectivity *= if range {
                DEFAULT_RANGE_SELECTIVITY
            } else {
                clause_selectivity(stats, table.rows, &restriction)
            };
            // Two clauses on one column: the estimate keeps the first one's shape.
            out.restrictions.entry(column).or_insert(restriction);
        }
        out.selectivity = out.selectivity.clamp(0.0, 1.0);
        out
    }
}

/// Fraction of the rows where `restriction` holds on `column`.
fn clause_selectivity(column: &Column, rows: f64, restriction: &Restriction) -> f64 {
    let null_frac = if column.not_null {
        0.0
    } else {
        column.null_frac.clamp(0.0, 1.0)
    };
    let padded = blank_padded(&column.type_name);
    let equal = |value: &str| -> f64 {
        if let Some(at) = column
            .most_common_vals
            .iter()
            .position(|v| same_value(padded, v, value))
        {
            return column.most_common_freqs.get(at).copied().unwrap_or(0.0);
        }
        let Some(distinct) = column.n_distinct else {
            return DEFAULT_EQ_SELECTIVITY;
        };
        let common: f64 = column.most_common_freqs.iter().sum();
        let others = (distinct - column.most_common_vals.len() as f64).max(1.0);
        let rest = (1.0 - null_frac - common).max(0.0);
        // pg_stats keeps every value common enough to matter: an unlisted value is one of
        // the rest, unless there is no rest.
        if rows > 0.0 {
            (rest / others).min(1.0)
        } else {
            0.0
        }
    };
    match restriction {
        Restriction::Equal(values) => values.iter().map(|v| equal(v)).sum::<f64>().min(1.0),
        Restriction::NotEqual(value) => (1.0 - null_frac - equal(value)).max(0.0),
        Restriction::IsNull => null_frac,
        Restriction::NotNull => 1.0 - null_frac,
        Restriction::Other => UNKNOWN_SELECTIVITY,
    }
}

/// A clause `col op literal`, `col IS [NOT] NULL`, `col IN (…)` or `col = ANY (ARRAY[…])`:
/// the column, the restriction and whether it is a range comparison.
fn read_clause(clause: &str) -> Option<(String, Restriction, bool)> {
    let upper = clause.to_ascii_uppercase();
    if let Some(left) = upper.strip_suffix(" IS NOT NULL") {
        return Some((
            column_name(&clause[..left.len()])?,
            Restriction::NotNull,
            false,
        ));
    }
    if let Some(left) = upper.strip_suffix(" IS NULL") {
        return Some((
            column_name(&clause[..left.len()])?,
            Restriction::IsNull,
            false,
        ));
    }
    if let Some(at) = find_top_level(clause, " IN ") {
        if upper[..at].ends_with(" NOT") {
            return None;
        }
        let column = column_name(&clause[..at])?;
        let values = split_list(strip_parens(clause[at + 4..].trim()))?;
        return Some((column, Restriction::Equal(values), false));
    }
    for operator in ["<>", "!=", "<=", ">=", "=", "<", ">"] {
        let Some(at) = find_top_level(clause, operator) else {
            continue;
        };
        let column = column_name(&clause[..at])?;
        let right = clause[at + operator.len()..].trim();
        if operator == "=" {
            let upper_right = right.to_ascii_uppercase();
            if let Some(array) = upper_right.strip_prefix("ANY") {
                let inner = strip_parens(right[right.len() - array.len()..].trim());
                let inner = strip_cast(inner);
                let list = inner
                    .get(..6)
                    .filter(|p| p.eq_ignore_ascii_case("ARRAY["))
                    .and_then(|_| inner.strip_suffix(']'))
                    .map(|l| &l[6..])?;
                return Some((column, Restriction::Equal(split_list(list)?), false));
            }
        }
        let value = literal(right)?;
        return Some(match operator {
            "=" => (column, Restriction::Equal(vec![value]), false),
            "<>" | "!=" => (column, Restriction::NotEqual(value), false),
            _ => (column, Restriction::Other, true),
        });
    }
    None
}

/// Comma-separated literals.
fn split_list(list: &str) -> Option<Vec<String>> {
    let values: Option<Vec<String>> = split_top_level_on(list, ',')
        .into_iter()
        .map(|v| literal(v.trim()))
        .collect();
    values.filter(|v| !v.is_empty())
}

/// The column a clause's left side names: `status`, `"Status"`, `(status)::text`, `o.status`.
fn column_name(left: &str) -> Option<String> {
    let bare = strip_parens(strip_cast(strip_parens(left.trim())).trim());
    let name = match bare.rfind('.') {
        Some(at) if !bare.ends_with('"') || bare[at + 1..].starts_with('"') => &bare[at + 1..],
        _ => bare,
    };
    if let Some(quoted) = name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        return Some(quoted.replace("\"\"", "\""));
    }
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    plain.then(|| name.to_ascii_lowercase())
}

/// A literal as pg_stats prints it: `'pending'::text` → `pending`, `42`, `true` → `t`.
fn literal(text: &str) -> Option<String> {
    let text = strip_cast(strip_parens(text.trim())).trim();
    let text = strip_parens(text);
    if let Some(body) = text.strip_prefix('\'') {
        let body = body.strip_suffix('\'')?;
        return Some(body.replace("''", "'"));
    }
    match text.to_ascii_lowercase().as_str() {
        "true" => return Some("t".to_owned()),
        "false" => return Some("f".to_owned()),
        _ => {}
    }
    let numeric = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    numeric.then(|| text.to_owned())
}

/// `text` without a trailing `::type` cast (outside quotes and parentheses).
fn strip_cast(text: &str) -> &str {
    match find_top_level(text, "::") {
        Some(at) => text[..at].trim_end(),
        None => text,
    }
}

/// `text` without parentheses that enclose all of it.
fn strip_parens(mut text: &str) -> &str {
    loop {
        let trimmed = text.trim();
        let Some(inner) = trimmed.strip_prefix('(').and_then(|t| t.strip_suffix(')')) else {
            return trimmed;
        };
        // `(a) = (b)` starts and ends with parentheses that are not one pair.
        if !balanced(inner) {
            return trimmed;
        }
        text = inner;
    }
}

/// Whether parentheses in `text` never close more than they opened (outside quotes).
fn balanced(text: &str) -> bool {
    let mut depth = 0_i32;
    let mut quoted = false;
    for c in text.chars() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0
}

/// Byte offset of the first `needle` outside quotes and parentheses (case-insensitive).
fn find_top_level(text: &str, needle: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let needle = needle.as_bytes();
    let (mut depth, mut single, mut double) = (0_i32, false, false);
    let mut at = 0;
    while at < bytes.len() {
        let c = bytes[at];
        match c {
            b'\'' if !double => single = !single,
            b'"' if !single => double = !double,
            b'(' | b'[' if !single && !double => depth += 1,
            b')' | b']' if !single && !double => depth -= 1,
            _ => {}
        }
        if depth == 0
            && !single
            && !double
            && c != b'\''
            && c != b'"'
            && bytes.len() - at >= needle.len()
            && bytes[at..at + needle.len()].eq_ignore_ascii_case(needle)
        {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// `text` split on the keyword `word` (`AND`, `OR`) where it stands alone at the top level.
fn split_top_level<'a>(text: &'a str, word: &str) -> Vec<&'a str> {
    let mut parts = Vec::new();
    let mut rest = text;
    let spaced = format!(" {word} ");
    while let Some(at) = find_top_level(rest, &spaced) {
        parts.push(&rest[..at]);
        rest = &rest[at + spaced.len()..];
    }
    parts.push(rest);
    parts
}

/// `text` split on `separator` at the top level.
fn split_top_level_on(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text;
    let mut buf = [0_u8; 4];
    let needle = separator.encode_utf8(&mut buf);
    while let Some(at) = find_top_level(rest, needle) {
        parts.push(&rest[..at]);
        rest = &rest[at + needle.len()..];
    }
    parts.push(rest);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisor::model::{TableName, TableWrites};

    fn column(name: &str, type_name: &str, len: i16, align: char) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            type_len: len,
            type_align: align,
            not_null: true,
            avg_width: Some(if len > 0 { f64::from(len) } else { 8.0 }),
            ..Column::default()
        }
    }

    fn table(rows: f64, columns: Vec<Column>) -> Table {
        Table {
            name: TableName {
                schema: "public".into(),
                name: "t".into(),
            },
            rows,
            pages: 0,
            columns,
            indexes: Vec::new(),
            writes: TableWrites::default(),
            updated_columns: Vec::new(),
        }
    }

    fn on(table: &Table, columns: &[&str]) -> IndexDef {
        IndexDef::on(table.name.clone(), columns)
    }

    #[test]
    fn unique_int_keys_fill_leaves_to_ninety_percent() {
        let mut id = column("id", "integer", 4, 'i');
        id.n_distinct = Some(1_000_000.0);
        let t = table(1_000_000.0, vec![id]);
        let estimate = estimate(&on(&t, &["id"]), &t);
        // 16-byte tuples + 4-byte line pointers, 366 a leaf: 2,733 leaves, 10 inner, 1 meta
        // (a built int4 primary key of 1M rows is 2,745 pages).
        assert_eq!(estimate.leaf_pages, 2733);
        assert!((2740..=2750).contains(&estimate.pages), "{estimate:?}");
        assert!(!estimate.deduplicated);
        assert_eq!(estimate.tuple_bytes, 20.0);
    }

    #[test]
    fn repeated_keys_are_stored_as_posting_lists() {
        let mut status = column("status", "text", -1, 'i');
        status.n_distinct = Some(2.0);
        status.most_common_vals = vec!["paid".into(), "pending".into()];
        status.most_common_freqs = vec![0.5, 0.5];
        let t = table(1_000_000.0, vec![status]);
        let estimate = estimate(&on(&t, &["status"]), &t);
        assert!(estimate.deduplicated);
        // 132 heap TIDs in an 808-byte posting tuple, 9 of them a leaf: ~842 leaves.
        assert!((840..=860).contains(&estimate.leaf_pages), "{estimate:?}");
    }

    #[test]
    fn numeric_keys_and_include_columns_are_not_deduplicated() {
        let mut total = column("total", "numeric(10,2)", -1, 'i');
        total.n_distinct = Some(10.0);
        let mut account = column("account_id", "integer", 4, 'i');
        account.n_distinct = Some(10.0);
        let t = table(100_000.0, vec![total, account]);
        assert!(!estimate(&on(&t, &["total"]), &t).deduplicated);
        assert!(estimate(&on(&t, &["account_id"]), &t).deduplicated);
        let mut covering = on(&t, &["account_id"]);
        covering.include = vec!["total".into()];
        assert!(!estimate(&covering, &t).deduplicated);
    }

    #[test]
    fn nulls_are_indexed_with_a_bitmap() {
        let mut shipped = column("shipped_at", "timestamp with time zone", 8, 'd');
        shipped.not_null = false;
        shipped.null_frac = 0.5;
        shipped.n_distinct = Some(500_000.0);
        let t = table(1_000_000.0, vec![shipped]);
        let estimate = estimate(&on(&t, &["shipped_at"]), &t);
        // Half 16-byte tuples (unique timestamps): 1,366 leaves; half NULLs in posting lists of
        // 132: 421 leaves.
        assert!(estimate.deduplicated);
        assert!(estimate.rows == 1_000_000.0);
        assert!((1750..=1820).contains(&estimate.leaf_pages), "{estimate:?}");
    }

    #[test]
    fn partial_indexes_scale_rows_by_the_predicate() {
        let mut status = column("status", "text", -1, 'i');
        status.n_distinct = Some(3.0);
        status.most_common_vals = vec!["paid".into(), "pending".into(), "shipped".into()];
        status.most_common_freqs = vec![0.7, 0.1, 0.2];
        let mut id = column("id", "bigint", 8, 'd');
        id.n_distinct = Some(1_000_000.0);
        let t = table(1_000_000.0, vec![status, id]);
        let mut def = on(&t, &["id"]);
        def.predicate = Some("(status = 'pending'::text)".into());
        let estimate = estimate(&def, &t);
        assert!((estimate.rows - 100_000.0).abs() < 1.0, "{estimate:?}");
        def.predicate = Some("status IN ('paid', 'shipped')".into());
        assert!((super::estimate(&def, &t).rows - 900_000.0).abs() < 1.0);
        def.predicate = Some("status <> 'paid' AND id IS NOT NULL".into());
        assert!((super::estimate(&def, &t).rows - 300_000.0).abs() < 1.0);
        def.predicate = Some("(status = ANY (ARRAY['paid'::text, 'pending'::text]))".into());
        assert!((super::estimate(&def, &t).rows - 800_000.0).abs() < 1.0);
        def.predicate = Some("id > 10".into());
        assert!((super::estimate(&def, &t).rows - 333_333.3).abs() < 1.0);
    }

    #[test]
    fn reads_clauses() {
        assert_eq!(
            read_clause("(status)::text = 'it''s'::text"),
            Some((
                "status".into(),
                Restriction::Equal(vec!["it's".into()]),
                false
            ))
        );
        assert_eq!(
            read_clause("\"Deleted\" IS NULL"),
            Some(("Deleted".into(), Restriction::IsNull, false))
        );
        assert_eq!(
            read_clause("active = true"),
            Some(("active".into(), Restriction::Equal(vec!["t".into()]), false))
        );
        assert_eq!(read_clause("lower(email) = 'x'"), None);
        assert_eq!(strip_parens("(a) = (b)"), "(a) = (b)");
    }

    #[test]
    fn empty_tables_have_a_metapage() {
        let t = table(0.0, vec![column("id", "integer", 4, 'i')]);
        assert_eq!(estimate_bytes(&on(&t, &["id"]), &t), 8192);
    }
}
