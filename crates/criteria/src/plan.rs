//! Criteria lowered onto the facts they need: the form the reference evaluator and the compiler
//! share. Each leaf reads one fact by its index in [`Plan::facts`], the order of the ABI
//! manifest.

use crate::ast::{CmpOp, EventTest, Expr, Leaf, PropTest, Span};
use membrane_abi::{EventFilter, Fact, FactManifest, PropertyTest};

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
