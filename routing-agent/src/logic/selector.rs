//! core/v1 `NodeSelector` semantics, as Kubernetes evaluates them for node affinity:
//! terms are ORed, the requirements inside a term are ANDed, an empty term list or an empty
//! term matches nothing, and an absent selector matches every node.
//!
//! Written by hand because no maintained crate evaluates a `NodeSelector` outside the
//! scheduler; the rules follow `k8s.io/component-helpers/scheduling/corev1/nodeaffinity`.
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeSelector, NodeSelectorRequirement, NodeSelectorTerm};

/// The node facts a selector can look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    /// A node with `labels` given as `(key, value)` pairs.
    pub fn new(name: &str, labels: &[(&str, &str)]) -> Self {
        NodeInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// A selector that cannot be evaluated. `field` is relative to the Route
/// (`spec.nodeSelector.nodeSelectorTerms[0].matchExpressions[1].values`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError {
    pub field: String,
    pub reason: String,
}

/// Does `selector` select `node`? Validates the whole selector first, so that a broken
/// term is reported even when an earlier one matches.
pub fn matches(selector: Option<&NodeSelector>, node: &NodeInfo) -> Result<bool, SelectorError> {
    let Some(selector) = selector else {
        return Ok(true);
    };
    let base = "spec.nodeSelector.nodeSelectorTerms";
    for (i, term) in selector.node_selector_terms.iter().enumerate() {
        for (j, req) in term.match_expressions.iter().flatten().enumerate() {
            check_expression(req).map_err(|(f, reason)| SelectorError {
                field: format!("{base}[{i}].matchExpressions[{j}]{f}"),
                reason,
            })?;
        }
        for (j, req) in term.match_fields.iter().flatten().enumerate() {
            check_field(req).map_err(|(f, reason)| SelectorError {
                field: format!("{base}[{i}].matchFields[{j}]{f}"),
                reason,
            })?;
        }
    }
    Ok(selector
        .node_selector_terms
        .iter()
        .any(|t| term_matches(t, node)))
}

fn term_matches(term: &NodeSelectorTerm, node: &NodeInfo) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| requirement_matches(r, Some(node.name.as_str())))
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        op @ ("Gt" | "Lt") => {
            let (Some(v), Ok(bound)) = (value, values[0].parse::<i64>()) else {
                return false;
            };
            match v.parse::<i64>() {
                Ok(v) if op == "Gt" => v > bound,
                Ok(v) => v < bound,
                Err(_) => false,
            }
        }
        _ => false,
    }
}

type Check = Result<(), (&'static str, String)>;

fn check_expression(req: &NodeSelectorRequirement) -> Check {
    if req.key.is_empty() {
        return Err((".key", "must not be empty".into()));
    }
    let n = req.values.as_ref().map_or(0, Vec::len);
    match req.operator.as_str() {
        "In" | "NotIn" if n == 0 => Err((
            ".values",
            format!("operator {} needs at least one value", req.operator),
        )),
        "Exists" | "DoesNotExist" if n != 0 => Err((
            ".values",
            format!("operator {} takes no values", req.operator),
        )),
        "Gt" | "Lt" => {
            let values = req.values.as_deref().unwrap_or_default();
            if values.len() != 1 {
                return Err((
                    ".values",
                    format!("operator {} needs exactly one value", req.operator),
                ));
            }
            values[0].parse::<i64>().map(|_| ()).map_err(|_| {
                (
                    ".values",
                    format!(
                        "operator {} needs an integer, got {:?}",
                        req.operator, values[0]
                    ),
                )
            })
        }
        "In" | "NotIn" | "Exists" | "DoesNotExist" => Ok(()),
        other => Err((
            ".operator",
            format!("unknown operator {other:?} (In, NotIn, Exists, DoesNotExist, Gt, Lt)"),
        )),
    }
}

fn check_field(req: &NodeSelectorRequirement) -> Check {
    if req.key != "metadata.name" {
        return Err((
            ".key",
            format!(
                "{:?} is not supported; matchFields supports metadata.name",
                req.key
            ),
        ));
    }
    match req.operator.as_str() {
        "In" | "NotIn" if req.values.as_ref().is_some_and(|v| !v.is_empty()) => Ok(()),
        "In" | "NotIn" => Err((
            ".values",
            format!("operator {} needs at least one value", req.operator),
        )),
        other => Err((
            ".operator",
            format!("{other:?} is not supported in matchFields (In, NotIn)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo::new(name, labels)
    }

    fn req(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn exprs(terms: Vec<Vec<NodeSelectorRequirement>>) -> NodeSelector {
        NodeSelector {
            node_selector_terms: terms
                .into_iter()
                .map(|e| NodeSelectorTerm {
                    match_expressions: Some(e),
                    match_fields: None,
                })
                .collect(),
        }
    }

    fn one(r: NodeSelectorRequirement, n: &NodeInfo) -> bool {
        matches(Some(&exprs(vec![vec![r]])), n).unwrap()
    }

    #[test]
    fn absent_selector_matches_every_node() {
        assert!(matches(None, &node("a", &[])).unwrap());
    }

    #[test]
    fn empty_term_list_and_empty_term_match_nothing() {
        let n = node("a", &[("pool", "x")]);
        assert!(
            !matches(
                Some(&NodeSelector {
                    node_selector_terms: vec![]
                }),
                &n
            )
            .unwrap()
        );
        let empty_term = NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm::default()],
        };
        assert!(!matches(Some(&empty_term), &n).unwrap());
        assert!(!matches(Some(&exprs(vec![vec![]])), &n).unwrap());
    }

    #[test]
    fn in_and_not_in() {
        let n = node("a", &[("pool", "x")]);
        assert!(one(req("pool", "In", &["y", "x"]), &n));
        assert!(!one(req("pool", "In", &["y"]), &n));
        assert!(
            !one(req("zone", "In", &["x"]), &n),
            "missing label never matches In"
        );
        assert!(one(req("pool", "NotIn", &["y"]), &n));
        assert!(!one(req("pool", "NotIn", &["x"]), &n));
        assert!(
            one(req("zone", "NotIn", &["x"]), &n),
            "missing label matches NotIn"
        );
    }

    #[test]
    fn exists_and_does_not_exist() {
        let n = node("a", &[("pool", "")]);
        assert!(
            one(req("pool", "Exists", &[]), &n),
            "empty value still exists"
        );
        assert!(!one(req("zone", "Exists", &[]), &n));
        assert!(one(req("zone", "DoesNotExist", &[]), &n));
        assert!(!one(req("pool", "DoesNotExist", &[]), &n));
    }

    #[test]
    fn gt_and_lt_compare_integers() {
        let n = node("a", &[("cpus", "8"), ("name", "eight")]);
        assert!(one(req("cpus", "Gt", &["4"]), &n));
        assert!(!one(req("cpus", "Gt", &["8"]), &n));
        assert!(one(req("cpus", "Lt", &["16"]), &n));
        assert!(!one(req("cpus", "Lt", &["8"]), &n));
        assert!(one(req("cpus", "Gt", &["-3"]), &n));
        assert!(
            !one(req("name", "Gt", &["1"]), &n),
            "non-integer label never matches"
        );
        assert!(
            !one(req("missing", "Lt", &["100"]), &n),
            "missing label never matches"
        );
    }

    #[test]
    fn gt_lt_values_are_validated() {
        let n = node("a", &[("cpus", "8")]);
        for values in [&[][..], &["1", "2"][..], &["eight"][..]] {
            let sel = exprs(vec![vec![req("cpus", "Gt", values)]]);
            let e = matches(Some(&sel), &n).unwrap_err();
            assert_eq!(
                e.field,
                "spec.nodeSelector.nodeSelectorTerms[0].matchExpressions[0].values"
            );
        }
    }

    #[test]
    fn malformed_requirements_are_errors_with_their_path() {
        let n = node("a", &[]);
        let cases = [
            (req("k", "In", &[]), ".values"),
            (req("k", "NotIn", &[]), ".values"),
            (req("k", "Exists", &["v"]), ".values"),
            (req("k", "DoesNotExist", &["v"]), ".values"),
            (req("k", "Equals", &["v"]), ".operator"),
            (req("", "Exists", &[]), ".key"),
        ];
        for (r, suffix) in cases {
            // The broken requirement sits in the second term; the first term matches.
            let sel = exprs(vec![vec![req("x", "DoesNotExist", &[])], vec![r.clone()]]);
            let e = matches(Some(&sel), &n).unwrap_err();
            assert_eq!(
                e.field,
                format!("spec.nodeSelector.nodeSelectorTerms[1].matchExpressions[0]{suffix}"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn terms_are_ored_requirements_anded() {
        let n = node("a", &[("pool", "x"), ("zone", "1")]);
        let and_fails = exprs(vec![vec![
            req("pool", "In", &["x"]),
            req("zone", "In", &["2"]),
        ]]);
        assert!(!matches(Some(&and_fails), &n).unwrap());
        let or_holds = exprs(vec![
            vec![req("pool", "In", &["x"]), req("zone", "In", &["2"])],
            vec![req("zone", "In", &["1"])],
        ]);
        assert!(matches(Some(&or_holds), &n).unwrap());
    }

    #[test]
    fn match_fields_select_by_name_and_and_with_expressions() {
        let fields = |op: &str, v: &[&str]| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![req("metadata.name", op, v)]),
            }],
        };
        assert!(
            matches(
                Some(&fields("In", &["worker-pool-y"])),
                &node("worker-pool-y", &[])
            )
            .unwrap()
        );
        assert!(!matches(Some(&fields("In", &["worker-pool-y"])), &node("other", &[])).unwrap());
        assert!(
            matches(
                Some(&fields("NotIn", &["worker-pool-y"])),
                &node("other", &[])
            )
            .unwrap()
        );
        let both = NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![req("pool", "In", &["x"])]),
                match_fields: Some(vec![req("metadata.name", "In", &["a"])]),
            }],
        };
        assert!(matches(Some(&both), &node("a", &[("pool", "x")])).unwrap());
        assert!(!matches(Some(&both), &node("a", &[("pool", "y")])).unwrap());
        assert!(!matches(Some(&both), &node("b", &[("pool", "x")])).unwrap());
    }

    #[test]
    fn match_fields_reject_other_keys_and_operators() {
        let f = |key: &str, op: &str| NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![req(key, op, &["a"])]),
            }],
        };
        let e = matches(Some(&f("metadata.uid", "In")), &node("a", &[])).unwrap_err();
        assert_eq!(
            e.field,
            "spec.nodeSelector.nodeSelectorTerms[0].matchFields[0].key"
        );
        let e = matches(Some(&f("metadata.name", "Gt")), &node("a", &[])).unwrap_err();
        assert_eq!(
            e.field,
            "spec.nodeSelector.nodeSelectorTerms[0].matchFields[0].operator"
        );
    }
}
