//! Criteria lowered onto the facts they need: the form the reference evaluator and the compiler
//! share. Each leaf reads one fact by its index in [`Plan::facts`], the order of the ABI
//! manifest.

use std::collections::BTreeSet;

use crate::ast::{CmpOp, EventTest, Expr, Leaf, PropTest, Span};
use crate::eval;
use membrane_abi::{EventFilter, Fact, FactManifest, FactValue, PropertyTest};

/// Facts (indices into [`Plan::facts`]) of which a user must have at least one.
pub type Clause = BTreeSet<usize>;

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

    /// What a user needs to satisfy this plan: in every clause, at least one fact that is not
    /// blank for them (an event of its name, or its property key). Sweeps look for candidates
    /// this way, so a user holding only facts the criteria cannot be true without is skipped.
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
                Vec::new()
            } else {
                vec![Clause::from([*fact])]
            }
        }
    }
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

    /// Names the facts of each required clause, e.g. `["checkout"]` or `["plan", "visit"]`.
    fn required_names(criteria: &str) -> Vec<Vec<String>> {
        let expr = parse_criteria(criteria).expect("criteria parse");
        let plan = Plan::new(&expr).expect("criteria lower");
        plan.required_facts()
            .into_iter()
            .map(|clause| {
                clause
                    .into_iter()
                    .map(|index| match &plan.facts[index] {
                        Fact::EventCount { event, .. } => event.clone(),
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
            [["checkout"]]
        );
        assert_eq!(
            required_names(r#"prop("plan") == "pro" and event("visit").exists()"#),
            [vec!["plan"], vec!["visit"]]
        );
    }

    #[test]
    fn a_disjunction_needs_a_fact_of_either_side() {
        assert_eq!(
            required_names(r#"event("a").exists() or (prop("b") == 1 and event("c").count() > 2)"#),
            [vec!["a", "b"], vec!["a", "c"]]
        );
        assert_eq!(
            required_names(r#"not (event("a").not_exists() or prop("b") != 1)"#),
            [vec!["a"], vec!["b"]]
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
