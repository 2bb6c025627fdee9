//! Aligned columns that fit the terminal without breaking a word.
//!
//! A table for people drops its least important columns until the rest fit the width, then
//! wraps the cells of wrapping columns between words (at spaces, and after commas). A word is
//! never split: a cell wider than the terminal stays on one line, so it can still be copied.
//! `-o wide` shows every column, unwrapped, however wide that is.

use std::io::IsTerminal as _;

/// Spaces between two columns.
const GAP: usize = 2;
/// Width of a table when the terminal's cannot be known.
const DEFAULT_WIDTH: usize = 80;
/// Narrowest a wrapping column is made to keep a line within the width.
const MIN_WRAP_WIDTH: usize = 10;
/// Narrowest a truncating column is made before other columns are dropped: less of a query's
/// text than this says too little to be worth the column.
const MIN_TRUNCATE_WIDTH: usize = 30;
/// What ends a cell cut to fit its column.
const ELLIPSIS: char = '…';

/// How wide a table may be: the terminal's, else `$COLUMNS`, else 80.
pub(crate) fn terminal_width() -> usize {
    let stdout = std::io::stdout();
    if stdout.is_terminal()
        && let Some((terminal_size::Width(width), _)) = terminal_size::terminal_size_of(&stdout)
        && width > 0
    {
        return usize::from(width);
    }
    columns_setting(std::env::var("COLUMNS").ok().as_deref())
}

/// `$COLUMNS` when it is a positive number, else the default.
fn columns_setting(raw: Option<&str>) -> usize {
    raw.and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|w| *w > 0)
        .unwrap_or(DEFAULT_WIDTH)
}

/// How a table is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// At most this many characters a line (unless a single word is wider).
    Fit(usize),
    /// Every column, no wrapping.
    Wide,
}

impl Layout {
    /// `Wide` for `-o wide`, else fitted to the terminal.
    pub(crate) fn for_output(output: crate::cli::Output) -> Layout {
        match output {
            crate::cli::Output::Wide => Layout::Wide,
            _ => Layout::Fit(terminal_width()),
        }
    }
}

/// One column of a table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Column {
    header: &'static str,
    /// 0: always shown; higher numbers are dropped first when the table does not fit.
    drop_order: u8,
    /// Cells may wrap between words.
    wrap: bool,
    /// Cells may be cut to the column's width, ending in `…` (text that is shown whole
    /// elsewhere: `-o wide`, `-o json`).
    truncate: bool,
    /// Shown only with `-o wide`.
    wide_only: bool,
}

impl Column {
    /// A column that is always shown, on one line.
    pub(crate) const fn keep(header: &'static str) -> Column {
        Column {
            header,
            drop_order: 0,
            wrap: false,
            truncate: false,
            wide_only: false,
        }
    }

    /// A column dropped when the table does not fit, those with higher `order` first.
    pub(crate) const fn optional(header: &'static str, order: u8) -> Column {
        Column {
            header,
            drop_order: order,
            wrap: false,
            truncate: false,
            wide_only: false,
        }
    }

    /// A column shown only with `-o wide`.
    pub(crate) const fn wide(header: &'static str) -> Column {
        Column {
            header,
            drop_order: u8::MAX,
            wrap: false,
            truncate: false,
            wide_only: true,
        }
    }

    /// The same column, its cells wrapping between words.
    pub(crate) const fn wrapping(self) -> Column {
        Column { wrap: true, ..self }
    }

    /// The same column, its cells cut to what the terminal leaves it (never below 30
    /// characters, or the header's width), ending in `…`; whole with `-o wide`.
    pub(crate) const fn truncating(self) -> Column {
        Column {
            truncate: true,
            ..self
        }
    }
}

/// Rows of cells under a header.
#[derive(Debug)]
pub(crate) struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
    header: bool,
}

impl Table {
    pub(crate) fn new(columns: &[Column]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
            header: true,
        }
    }

    /// A table without a header line (a list of fields and values).
    pub(crate) fn headless(columns: &[Column]) -> Table {
        Table {
            header: false,
            ..Table::new(columns)
        }
    }

    /// Adds a row; an empty cell shows as `-`.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines, without a trailing newline.
    pub(crate) fn render(&self, layout: Layout) -> String {
        let cell = |row: &[String], i: usize| -> String {
            match row.get(i).map(|c| c.trim()) {
                Some(c) if !c.is_empty() => c.to_owned(),
                _ => "-".to_owned(),
            }
        };
        let mut shown: Vec<usize> = (0..self.columns.len())
            .filter(|&i| layout == Layout::Wide || !self.columns[i].wide_only)
            .collect();
        let header_width = |i: usize| {
            if self.header {
                width(self.columns[i].header)
            } else {
                0
            }
        };
        let natural = |i: usize| {
            self.rows
                .iter()
                .map(|r| width(&cell(r, i)))
                .chain([header_width(i)])
                .max()
                .unwrap_or(0)
        };
        let least = |i: usize| {
            if layout == Layout::Wide {
                return natural(i);
            }
            if self.columns[i].truncate {
                return natural(i).min(header_width(i).max(MIN_TRUNCATE_WIDTH));
            }
            if !self.columns[i].wrap {
                return natural(i);
            }
            self.rows
                .iter()
                .flat_map(|r| {
                    words(&cell(r, i))
                        .into_iter()
                        .map(|(word, _)| width(word))
                        .collect::<Vec<_>>()
                })
                .chain([header_width(i)])
                .max()
                .unwrap_or(0)
        };
        let total = |shown: &[usize], w: &dyn Fn(usize) -> usize| {
            shown.iter().map(|&i| w(i)).sum::<usize>() + GAP * shown.len().saturating_sub(1)
        };

        let mut widths: Vec<usize> = vec![0; self.columns.len()];
        match layout {
            Layout::Wide => {
                for &i in &shown {
                    widths[i] = natural(i);
                }
            }
            Layout::Fit(limit) => {
                // Drop the least important columns until the rest fit at their narrowest.
                while total(&shown, &least) > limit {
                    let Some(pos) = shown
                        .iter()
                        .enumerate()
                        .filter(|(_, i)| self.columns[**i].drop_order > 0)
                        .max_by_key(|(pos, i)| (self.columns[**i].drop_order, *pos))
                        .map(|(pos, _)| pos)
                    else {
                        break;
                    };
                    shown.remove(pos);
                }
                for &i in &shown {
                    widths[i] = least(i);
                }
                let used = total(&shown, &least);
                if used > limit {
                    // Nothing left to drop, and a word too wide to fit: wrapping columns take
                    // what is left (the wide word overflows alone, the rest still fits).
                    let mut over = used - limit;
                    for &i in shown.iter().rev() {
                        if self.columns[i].wrap || self.columns[i].truncate {
                            let floor = header_width(i).max(MIN_WRAP_WIDTH);
                            let less = widths[i].saturating_sub(floor).min(over);
                            widths[i] -= less;
                            over -= less;
                        }
                    }
                } else {
                    // What is left goes to the wrapping columns, left to right.
                    let mut spare = limit - used;
                    for &i in &shown {
                        let more = natural(i).saturating_sub(widths[i]).min(spare);
                        widths[i] += more;
                        spare -= more;
                    }
                }
            }
        }

        let mut lines = Vec::new();
        if self.header {
            let header: Vec<Vec<String>> = shown
                .iter()
                .map(|&i| vec![self.columns[i].header.to_owned()])
                .collect();
            push_row(&mut lines, &header, &shown, &widths);
        }
        for row in &self.rows {
            let cells: Vec<Vec<String>> = shown
                .iter()
                .map(|&i| {
                    let text = cell(row, i);
                    if layout == Layout::Wide {
                        vec![text]
                    } else if self.columns[i].truncate {
                        vec![truncate(&text, widths[i])]
                    } else if self.columns[i].wrap {
                        wrap(&text, widths[i])
                    } else {
                        vec![text]
                    }
                })
                .collect();
            push_row(&mut lines, &cells, &shown, &widths);
        }
        lines.join("\n")
    }
}

/// Appends one row, as many lines as its tallest cell, each cell padded to its column.
fn push_row(lines: &mut Vec<String>, cells: &[Vec<String>], shown: &[usize], widths: &[usize]) {
    let height = cells.iter().map(Vec::len).max().unwrap_or(1);
    for n in 0..height {
        let mut line = String::new();
        for (pos, (cell, &i)) in cells.iter().zip(shown).enumerate() {
            let text = cell.get(n).map(String::as_str).unwrap_or("");
            if pos > 0 {
                line.push_str(&" ".repeat(GAP));
            }
            line.push_str(text);
            if pos + 1 < cells.len() {
                line.push_str(&" ".repeat(widths[i].saturating_sub(width(text))));
            }
        }
        lines.push(line.trim_end().to_owned());
    }
}

/// Characters on screen (Keel's own text is ASCII; names and labels are).
fn width(text: &str) -> usize {
    text.chars().count()
}

/// The words of `text` with what joins each to the one before: a space, or nothing after a
/// comma (`a=1,b=2` breaks after the comma, and the comma stays with its word).
fn words(text: &str) -> Vec<(&str, &'static str)> {
    let mut out = Vec::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let mut joiner = " ";
        let mut rest = word;
        while let Some(at) = rest.find(',') {
            if at + 1 >= rest.len() {
                break;
            }
            out.push((&rest[..=at], joiner));
            joiner = "";
            rest = &rest[at + 1..];
        }
        out.push((rest, joiner));
    }
    out
}

/// `text` cut to at most `limit` characters, the last of them `…` when it was cut.
fn truncate(text: &str, limit: usize) -> String {
    if width(text) <= limit {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(limit.saturating_sub(1)).collect();
    cut.truncate(cut.trim_end().len());
    cut.push(ELLIPSIS);
    cut
}

/// `text` in lines of at most `limit` characters, broken only between words.
fn wrap(text: &str, limit: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for (word, joiner) in words(text) {
        if line.is_empty() {
            line.push_str(word);
        } else if width(&line) + width(joiner) + width(word) <= limit {
            line.push_str(joiner);
            line.push_str(word);
        } else {
            lines.push(std::mem::take(&mut line));
            line.push_str(word);
        }
    }
    lines.push(line);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(&[
            Column::keep("NAME"),
            Column::optional("LABELS", 2).wrapping(),
            Column::optional("URL", 3),
            Column::wide("ID"),
        ]);
        t.row(vec![
            "orders-db".into(),
            "tier=db,region=eu-west-1,owner=payments-team".into(),
            "postgres://app:****@orders.db.internal:5432/orders".into(),
            "0190a5d1-ac96-774b-bcce-b302099a8057".into(),
        ]);
        t.row(vec![
            "cache".into(),
            String::new(),
            "redis://cache:6379".into(),
            "x".into(),
        ]);
        t
    }

    #[test]
    fn a_fitted_table_drops_columns_and_wraps_between_words() {
        let text = sample().render(Layout::Fit(40));
        for line in text.lines() {
            assert!(line.chars().count() <= 40, "{line:?} in\n{text}");
        }
        assert!(!text.contains("URL") && !text.contains("ID"), "{text}");
        // Every label whole, on some line.
        for label in ["tier=db,", "region=eu-west-1,", "owner=payments-team"] {
            assert!(
                text.lines().any(|l| l.contains(label)),
                "{label} in\n{text}"
            );
        }
        assert!(text.contains("cache      -"), "{text}");
    }

    #[test]
    fn wide_shows_every_column_on_one_line() {
        let text = sample().render(Layout::Wide);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.contains("0190a5d1-ac96-774b-bcce-b302099a8057"),
            "{text}"
        );
        assert!(text.contains("tier=db,region=eu-west-1,owner=payments-team"));
    }

    #[test]
    fn a_word_wider_than_the_terminal_stays_whole() {
        let mut t = Table::new(&[Column::keep("NAME"), Column::keep("VALUE").wrapping()]);
        t.row(vec![
            "a".into(),
            "short x".repeat(3) + " " + &"y".repeat(50),
        ]);
        let text = t.render(Layout::Fit(30));
        assert!(text.contains(&"y".repeat(50)), "{text}");
    }

    #[test]
    fn a_wrapped_cell_keeps_every_line() {
        let mut t = Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
        t.row(vec!["url:".into(), "x".repeat(60)]);
        t.row(vec![
            "labels:".into(),
            "aaaa=1111,bbbb=2222,cccc=3333,dddd=4444".into(),
        ]);
        let text = t.render(Layout::Fit(30));
        assert!(
            text.contains("dddd=4444") && text.contains(&"x".repeat(60)),
            "{text}"
        );
        // The 60 x overflow alone; the rest wraps within 30 characters.
        for line in text.lines().filter(|l| !l.contains('x')) {
            assert!(line.chars().count() <= 30, "{line:?} in\n{text}");
        }
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn a_truncating_column_takes_what_is_left_and_ends_in_an_ellipsis() {
        let text = "SELECT o.id, o.total FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.region = $1";
        let table = |layout| {
            let mut t = Table::new(&[
                Column::optional("QUERYID", 2),
                Column::keep("CALLS"),
                Column::optional("ROWS", 3),
                Column::keep("TEXT").truncating(),
            ]);
            t.row(vec![
                "-8270145529340217213".into(),
                "12".into(),
                "120".into(),
                text.into(),
            ]);
            t.render(layout)
        };
        let fitted = table(Layout::Fit(60));
        for line in fitted.lines() {
            assert!(line.chars().count() <= 60, "{line:?} in\n{fitted}");
        }
        assert_eq!(fitted.lines().count(), 2, "one line a row:\n{fitted}");
        assert!(fitted.contains("-8270145529340217213"), "{fitted}");
        assert!(!fitted.contains("ROWS"), "dropped first:\n{fitted}");
        let row = fitted.lines().nth(1).expect("row");
        assert!(row.ends_with('…') && row.chars().count() == 60, "{row:?}");
        // Narrower, the id goes before the text is cut below 30 characters.
        let narrow = table(Layout::Fit(45));
        assert!(!narrow.contains("-8270145529340217213"), "{narrow}");
        assert!(narrow.lines().all(|l| l.chars().count() <= 45), "{narrow}");
        // Whole with -o wide.
        assert!(table(Layout::Wide).contains(text));
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abc def", 5), "abc…");
    }

    #[test]
    fn columns_setting_falls_back_to_80() {
        assert_eq!(columns_setting(Some("120")), 120);
        assert_eq!(columns_setting(Some(" 100 ")), 100);
        assert_eq!(columns_setting(Some("0")), 80);
        assert_eq!(columns_setting(Some("wide")), 80);
        assert_eq!(columns_setting(None), 80);
    }

    #[test]
    fn wrap_breaks_after_commas_and_at_spaces() {
        assert_eq!(wrap("a=1,b=2,c=3", 8), ["a=1,b=2,", "c=3"]);
        assert_eq!(wrap("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap("trailing,", 3), ["trailing,"]);
    }
}
