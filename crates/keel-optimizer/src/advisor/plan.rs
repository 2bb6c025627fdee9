//! What an `EXPLAIN (FORMAT JSON)` plan says: its total cost, which indexes it uses and a short
//! shape a reader can compare (`Seq Scan on orders` → `Index Only Scan using … on orders`).

use serde_json::Value;

/// A plan, reduced to what the advisor compares.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The root's `Total Cost`.
    pub cost: f64,
    /// Every scan node: `Seq Scan on orders`, `Index Only Scan using orders_pkey on orders`.
    pub scans: Vec<String>,
    /// Names of the indexes the plan uses.
    pub indexes: Vec<String>,
}

impl Plan {
    /// The plan of one `EXPLAIN (FORMAT JSON)` answer.
    pub fn from_json(explain: &Value) -> Option<Plan> {
        let root = explain.get(0)?.get("Plan")?;
        let mut plan = Plan {
            cost: root.get("Total Cost")?.as_f64()?,
            scans: Vec::new(),
            indexes: Vec::new(),
        };
        walk(root, &mut plan);
        Some(plan)
    }

    /// The scans, joined for display, with `names` turning index names into readable labels.
    pub fn shape(&self, names: &dyn Fn(&str) -> Option<String>) -> String {
        if self.scans.is_empty() {
            return "no table scan".to_owned();
        }
        let mut out: Vec<String> = Vec::new();
        for scan in &self.scans {
            let mut text = scan.clone();
            if let Some((head, rest)) = scan.split_once(" using ") {
                let (index, tail) = rest.split_once(" on ").unwrap_or((rest, ""));
                if let Some(label) = names(index) {
                    text = if tail.is_empty() {
                        format!("{head} using {label}")
                    } else {
                        format!("{head} using {label} on {tail}")
                    };
                }
            }
            out.push(text);
        }
        out.join("; ")
    }
}

fn walk(node: &Value, plan: &mut Plan) {
    let kind = node.get("Node Type").and_then(Value::as_str).unwrap_or("");
    let relation = node.get("Relation Name").and_then(Value::as_str);
    let index = node.get("Index Name").and_then(Value::as_str);
    if let Some(index) = index {
        plan.indexes.push(index.to_owned());
    }
    match (relation, index) {
        (Some(relation), Some(index)) => {
            plan.scans
                .push(format!("{kind} using {index} on {relation}"));
        }
        (Some(relation), None) if kind.contains("Scan") => {
            plan.scans.push(format!("{kind} on {relation}"));
        }
        (None, Some(index)) => plan.scans.push(format!("{kind} using {index}")),
        _ => {}
    }
    if let Some(children) = node.get("Plans").and_then(Value::as_array) {
        for child in children {
            walk(child, plan);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cost_scans_and_indexes() {
        let explain = serde_json::json!([{ "Plan": {
            "Node Type": "Nested Loop", "Total Cost": 42.5,
            "Plans": [
                { "Node Type": "Seq Scan", "Relation Name": "orders", "Total Cost": 10.0 },
                { "Node Type": "Index Only Scan", "Relation Name": "users",
                  "Index Name": "<13001>btree_users_email", "Total Cost": 1.0 },
                { "Node Type": "Bitmap Heap Scan", "Relation Name": "events", "Plans": [
                    { "Node Type": "Bitmap Index Scan", "Index Name": "events_at" } ] }
            ]
        }}]);
        let plan = Plan::from_json(&explain).expect("a plan");
        assert_eq!(plan.cost, 42.5);
        assert_eq!(plan.indexes, vec!["<13001>btree_users_email", "events_at"]);
        let shape = plan.shape(&|name| match name {
            "<13001>btree_users_email" => Some("users(email)".to_owned()),
            "events_at" => Some("events(at)".to_owned()),
            _ => None,
        });
        assert_eq!(
            shape,
            "Seq Scan on orders; Index Only Scan using users(email) on users; \
             Bitmap Heap Scan on events; Bitmap Index Scan using events(at)"
        );
    }
}
