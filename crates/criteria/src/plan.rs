//! Criteria lowered onto the facts they need: the form the reference evaluator and the compiler
//! share. Each leaf reads one fact by its index in [`Plan::facts`], the order of the ABI
//! manifest.

use std::collections::BTreeSet;

use crate::ast::{CmpOp, EventTest, Expr, Leaf, PropTest, Span};
use crate::eval;
use membrane_abi::{EventFilter, Fact, FactManifest, FactValue, PropertyTest};

/// Requirements of which a user must meet at least one.
pub type Clause = BTreeSet<Requirement>;

/// A fact (an index into [`Plan::facts`]) that is not blank: a property that is present, or an
/// event count of at least `at_least` (1 or more; 1 for properties).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    pub fact: usize,
    pub at_least: i64,
}

/// How many clauses [`Plan::required_facts`] keeps: an `or` multiplies them, and dropping some
/// only makes the requirement weaker, never wrong.
const MAX_CLAUSES: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub facts: Vec<Fact>,
    pub root: Node,
    /// Any leaf has a window or compares with `now()`: membership can flip with no event.
    pub time_based: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    /// `count(fact) CMP n`; `exists` is `> 0`, `not_exists` is `== 0`.
    Count {
        fact: usize,
        op: CmpOp,
        value: i64,
    },
    /// A property (a [`Fact::Property`]) tested under the brief's typing rules.
    Prop {
        fact: usize,
        test: PropertyTest,
    },
    /// A timestamp property (a [`Fact::PropertyTime`]) compared with `now + offset_secs`;
    /// false when the property is not a valid timestamp, whatever the operator.
    PropNow {
        fact: usize,
        op: CmpOp,
        offset_secs: i64,
    },
}

/// Criteria that cannot be lowered; validation reports these with more context first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("only property tests can appear inside `.where(...)`")]
    NotAFilter { span: Span },
}

impl Plan {
    pub fn new(expr: &Expr) -> Result<Plan, PlanError> {
        let mut lowering = Lowering::default();
        let root = lowering.node(expr)?;
        Ok(Plan {
            facts: lowering.facts,
            root,
            time_based: lowering.time_based,
        })
    }

    pub fn manifest(&self) -> FactManifest {
        FactManifest::new(self.facts.clone())
    }

    /// What a user needs to satisfy this plan: in every clause, at least one requirement met (a
    /// count of at least so many events, or a property key present). Sweeps look for
    /// candidates this way, so a user holding only facts the criteria cannot be true without
    /// is skipped.
    /// Empty when the structure proves nothing; validation still guarantees that a user with
    /// none of [`Plan::facts`] fails.
    pub fn required_facts(&self) -> Vec<Clause> {
        let blank = eval::blank_facts(&self.facts);
        required(&self.root, true, &blank)
    }
}

/// Clauses a user meets whenever `node` evaluates to `truth`.
fn required(node: &Node, truth: bool, blank: &[FactValue]) -> Vec<Clause> {
    match node {
        Node::Not(inner) => required(inner, !truth, blank),
        // Every item has the value: every item's clauses hold.
        Node::And(items) if truth => all_of(items, truth, blank),
        Node::Or(items) if !truth => all_of(items, truth, blank),
        // Some item has the value: one clause of each item, joined, holds.
        Node::And(items) | Node::Or(items) => {
            let mut joined = vec![Clause::new()];
            for item in items {
                let clauses = required(item, truth, blank);
                if clauses.is_empty() {
                    return Vec::new();
                }
                let product: BTreeSet<Clause> = joined
                    .iter()
                    .flat_map(|done| clauses.iter().map(move |c| done | c))
                    .collect();
                joined = product.into_iter().take(MAX_CLAUSES).collect();
            }
            joined
        }
        Node::Count { fact, .. } | Node::Prop { fact, .. } | Node::PropNow { fact, .. } => {
            // A leaf reads one fact: if it has another value when that fact is blank, the
            // fact cannot be blank.
            if eval::evaluate_node(node, blank, 0) == truth {
                return Vec::new();
            }
            let at_least = match node {
                Node::Count { value, .. } => least_count(node, *fact, *value, truth, blank),
                _ => 1,
            };
            vec![Clause::from([Requirement {
                fact: *fact,
                at_least,
            }])]
        }
    }
}

/// The least count (1 or more) at which the count leaf `node`, comparing fact `fact` with
/// `value`, evaluates to `truth`. A comparison with one literal only changes value at 1,
/// `value` and `value + 1`, so the least is one of those.
fn least_count(node: &Node, fact: usize, value: i64, truth: bool, blank: &[FactValue]) -> i64 {
    let mut facts = blank.to_vec();
    [1, value, value.saturating_add(1)]
        .into_iter()
        .filter(|&count| count >= 1)
        .filter(|&count| {
            facts[fact] = FactValue::Count(count);
            eval::evaluate_node(node, &facts, 0) == truth
        })
        .min()
        .unwrap_or(1)
}

fn all_of(items: &[Node], truth: bool, blank: &[FactValue]) -> Vec<Clause> {
    let clauses: BTreeSet<Clause> = items
        .iter()
        .flat_map(|item| required(item, truth, blank))
        .collect();
    clauses.into_iter().take(MAX_CLAUSES).collect()
}

#[derive(Default)]
struct Lowering {
    facts: Vec<Fact>,
    time_based: bool,
}

impl Lowering {
    fn fact_index(&mut self, fact: Fact) -> usize {
        match self.facts.iter().position(|known| *known == fact) {
            Some(index) => index,
            None => {
                self.facts.push(fact);
                self.facts.len() - 1
            }
        }
    }

    fn node(&mut self, expr: &Expr) -> Result<Node, PlanError> {
        Ok(match expr {
            Expr::And(items, _) => Node::And(self.nodes(items)?),
            Expr::Or(items, _) => Node::Or(self.nodes(items)?),
            Expr::Not(inner, _) => Node::Not(Box::new(self.node(inner)?)),
            Expr::Leaf(Leaf::Event(event)) => {
                self.time_based |= event.within_secs.is_some();
                let filter = event.filter.as_deref().map(filter_of).transpose()?;
                let fact = self.fact_index(Fact::EventCount {
                    event: event.name.clone(),
                    within_secs: event.within_secs,
                    filter,
                });
                let (op, value) = match event.test {
                    EventTest::Exists => (CmpOp::Gt, 0),
                    EventTest::NotExists => (CmpOp::Eq, 0),
                    EventTest::Count(op, value) => (op, value),
                };
                Node::Count { fact, op, value }
            }
            Expr::Leaf(Leaf::Prop(prop)) => match property_test(&prop.test) {
                Some(test) => Node::Prop {
                    fact: self.fact_index(Fact::Property {
                        key: prop.key.clone(),
                    }),
                    test,
                },
                None => {
                    let PropTest::CmpNow { op, offset_secs } = prop.test else {
                        unreachable!("property_test covers every other test")
                    };
                    self.time_based = true;
                    Node::PropNow {
                        fact: self.fact_index(Fact::PropertyTime {
                            key: prop.key.clone(),
                        }),
                        op,
                        offset_secs,
                    }
                }
            },
        })
    }

    fn nodes(&mut self, items: &[Expr]) -> Result<Vec<Node>, PlanError> {
        items.iter().map(|item| self.node(item)).collect()
    }
}

/// The ABI form of a property test; `None` for `now()` comparisons, which read a timestamp fact.
fn property_test(test: &PropTest) -> Option<PropertyTest> {
    Some(match test {
        PropTest::Cmp(cmp, value) => PropertyTest::Compare {
            cmp: *cmp,
            value: value.clone(),
        },
        PropTest::Exists => PropertyTest::Exists,
        PropTest::NotExists => PropertyTest::NotExists,
        PropTest::Contains(value) => PropertyTest::Contains {
            value: value.clone(),
        },
        PropTest::StartsWith(value) => PropertyTest::StartsWith {
            value: value.clone(),
        },
        PropTest::In(values) => PropertyTest::In {
            values: values.clone(),
        },
        PropTest::CmpNow { .. } => return None,
    })
}

/// Lowers the expression inside `.where(...)` onto the event's own properties.
fn filter_of(expr: &Expr) -> Result<EventFilter, PlanError> {
    let all = |items: &[Expr]| items.iter().map(filter_of).collect::<Result<Vec<_>, _>>();
    Ok(match expr {
        Expr::And(items, _) => EventFilter::All { of: all(items)? },
        Expr::Or(items, _) => EventFilter::Any { of: all(items)? },
        Expr::Not(inner, _) => EventFilter::Not {
            filter: Box::new(filter_of(inner)?),
        },
        Expr::Leaf(Leaf::Prop(prop)) => EventFilter::Test {
            key: prop.key.clone(),
            test: property_test(&prop.test).ok_or(PlanError::NotAFilter {
                span: prop.span.clone(),
            })?,
        },
        Expr::Leaf(Leaf::Event(event)) => {
            return Err(PlanError::NotAFilter {
                span: event.span.clone(),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse_criteria;

    /// Names the requirements of each required clause, e.g. `["checkout>=2"]` or
    /// `["plan", "visit>=1"]`.
    fn required_names(criteria: &str) -> Vec<Vec<String>> {
        let expr = parse_criteria(criteria).expect("criteria parse");
        let plan = Plan::new(&expr).expect("criteria lower");
        plan.required_facts()
            .into_iter()
            .map(|clause| {
                clause
                    .into_iter()
                    .map(|requirement| match &plan.facts[requirement.fact] {
                        Fact::EventCount { event, .. } => {
                            format!("{event}>={}", requirement.at_least)
                        }
                        Fact::Property { key } | Fact::PropertyTime { key } => key.clone(),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_conjunction_needs_each_fact_that_cannot_be_blank() {
        assert_eq!(
            required_names(
                r#"event("checkout").within(30d).count() >= 2 and (prop("plan") != "free" or event("support").within(7d).not_exists())"#
            ),
            [["checkout>=2"]]
        );
        assert_eq!(
            required_names(r#"prop("plan") == "pro" and event("visit").exists()"#),
            [vec!["plan"], vec!["visit>=1"]]
        );
    }

    #[test]
    fn a_disjunction_needs_a_fact_of_either_side() {
        assert_eq!(
            required_names(r#"event("a").exists() or (prop("b") == 1 and event("c").count() > 2)"#),
            [vec!["a>=1", "b"], vec!["a>=1", "c>=3"]]
        );
        assert_eq!(
            required_names(r#"not (event("a").not_exists() or prop("b") != 1)"#),
            [vec!["a>=1"], vec!["b"]]
        );
    }

    /// Every comparison, either way up, against a count searched from 0 to 12.
    #[test]
    fn a_count_requirement_is_the_least_count_that_satisfies() {
        let facts = vec![Fact::EventCount {
            event: "a".into(),
            within_secs: None,
            filter: None,
        }];
        for op in CmpOp::ALL {
            for value in -1..=5 {
                for negated in [false, true] {
                    let leaf = Node::Count { fact: 0, op, value };
                    let root = if negated {
                        Node::Not(Box::new(leaf))
                    } else {
                        leaf
                    };
                    let satisfied: Vec<i64> = (0..=12)
                        .filter(|&count| eval::evaluate_node(&root, &[FactValue::Count(count)], 0))
                        .collect();
                    let plan = Plan {
                        facts: facts.clone(),
                        root,
                        time_based: false,
                    };
                    let required = plan.required_facts();
                    let case = format!("{op:?} {value}, negated: {negated}");
                    match satisfied.first() {
                        Some(0) => assert!(required.is_empty(), "{case}: {required:?}"),
                        Some(&least) => assert_eq!(
                            required,
                            [Clause::from([Requirement {
                                fact: 0,
                                at_least: least
                            }])],
                            "{case}"
                        ),
                        None => assert!(
                            required.iter().flatten().all(|r| r.at_least >= 1),
                            "{case}: {required:?}"
                        ),
                    }
                }
            }
        }
    }

    #[test]
    fn a_count_needs_the_least_number_that_can_satisfy_it() {
        assert_eq!(
            required_names(r#"event("a").count() == 4 and not (event("b").count() <= 2)"#),
            [vec!["a>=4"], vec!["b>=3"]]
        );
        assert_eq!(
            required_names(r#"event("a").count() != 0 and not (event("b").count() != 1)"#),
            [vec!["a>=1"], vec!["b>=1"]]
        );
    }

    #[test]
    fn a_side_true_for_blank_users_proves_nothing() {
        assert_eq!(
            required_names(r#"event("a").exists() or event("b").count() < 3"#),
            Vec::<Vec<String>>::new()
        );
    }
}
