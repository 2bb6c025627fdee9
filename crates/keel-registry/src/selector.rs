//! Kubernetes label selectors: `tier=db,region in (eu,us),!legacy`.

use crate::validate::{self, Invalid};

/// One clause of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value`: also matches instances without the key, as in Kubernetes.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)`: also matches instances without the key.
    NotIn(String, Vec<String>),
    /// `key`.
    Exists(String),
    /// `!key`.
    NotExists(String),
}

const MAX_SELECTOR: usize = 4096;

/// Parses a selector; an empty one selects everything.
pub(crate) fn parse(selector: &str) -> Result<Vec<Requirement>, Invalid> {
    let invalid = |reason: String| Invalid::new("label_selector", reason);
    if selector.len() > MAX_SELECTOR {
        return Err(invalid(format!(
            "is {} bytes long; at most {MAX_SELECTOR} are allowed",
            selector.len()
        )));
    }
    let mut requirements = Vec::new();
    for clause in split_clauses(selector).map_err(invalid)? {
        let clause = clause.trim();
        if clause.is_empty() {
            return Err(invalid(
                "has an empty clause; separate clauses with single commas".into(),
            ));
        }
        requirements.push(
            parse_clause(clause)
                .map_err(|reason| invalid(format!("clause {clause:?}: {reason}")))?,
        );
    }
    Ok(requirements)
}

/// Splits on commas outside parentheses.
fn split_clauses(selector: &str) -> Result<Vec<&str>, String> {
    if selector.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut clauses = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                clauses.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("has unbalanced or nested parentheses".into());
        }
    }
    if depth != 0 {
        return Err("has an unclosed '('".into());
    }
    clauses.push(&selector[start..]);
    Ok(clauses)
}

fn parse_clause(clause: &str) -> Result<Requirement, String> {
    if let Some(key) = clause.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(key.trim())?));
    }
    if let Some((key, value)) = clause.split_once("!=") {
        return Ok(Requirement::NotEquals(
            key_of(key.trim())?,
            value_of(value.trim())?,
        ));
    }
    if let Some((key, value)) = clause.split_once("==").or_else(|| clause.split_once('=')) {
        return Ok(Requirement::Equals(
            key_of(key.trim())?,
            value_of(value.trim())?,
        ));
    }
    let words: Vec<&str> = clause.splitn(2, char::is_whitespace).collect();
    if let [key, rest] = words[..] {
        let rest = rest.trim_start();
        let (negated, list) = if let Some(list) = rest.strip_prefix("notin") {
            (true, list)
        } else if let Some(list) = rest.strip_prefix("in") {
            (false, list)
        } else {
            return Err(
                "expected key=value, key!=value, key in (…), key notin (…), key or !key".into(),
            );
        };
        let list = list.trim();
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or("the values of in/notin go in parentheses: key in (a,b)")?;
        let values = inner
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if values.iter().all(String::is_empty) {
            return Err("in/notin needs at least one value".into());
        }
        let key = key_of(key)?;
        return Ok(if negated {
            Requirement::NotIn(key, values)
        } else {
            Requirement::In(key, values)
        });
    }
    Ok(Requirement::Exists(key_of(clause)?))
}

fn key_of(key: &str) -> Result<String, String> {
    validate::label_key(key).map_err(|e| e.reason)?;
    Ok(key.to_owned())
}

fn value_of(value: &str) -> Result<String, String> {
    let mut labels = std::collections::HashMap::new();
    labels.insert("k".to_owned(), value.to_owned());
    validate::labels(&labels).map_err(|e| e.reason)?;
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::Requirement::*;
    use super::*;

    fn check(selector: &str, expected: Result<Vec<Requirement>, &str>) {
        match (parse(selector), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{selector}"),
            (Err(err), Err(needle)) => {
                assert!(err.to_string().contains(needle), "{selector}: {err}")
            }
            (got, want) => panic!("{selector}: got {got:?}, want {want:?}"),
        }
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn selectors() {
        check("", Ok(vec![]));
        check("tier=db", Ok(vec![Equals(s("tier"), s("db"))]));
        check(
            "tier==db, env!=prod",
            Ok(vec![
                Equals(s("tier"), s("db")),
                NotEquals(s("env"), s("prod")),
            ]),
        );
        check(
            "region in (eu, us),zone notin (a),legacy,!beta",
            Ok(vec![
                In(s("region"), vec![s("eu"), s("us")]),
                NotIn(s("zone"), vec![s("a")]),
                Exists(s("legacy")),
                NotExists(s("beta")),
            ]),
        );
        check(
            "app.kubernetes.io/name=shop",
            Ok(vec![Equals(s("app.kubernetes.io/name"), s("shop"))]),
        );
        check("tier=db,", Err("empty clause"));
        check("region in (eu", Err("unclosed"));
        check("region in eu", Err("in parentheses"));
        check("region within (eu)", Err("expected key=value"));
        check("bad key=x", Err("is not a Kubernetes label key"));
        check("tier=not ok", Err("not a Kubernetes label value"));
        check(&"a=b,".repeat(2000), Err("at most 4096"));
    }
}
