//! Criteria lowered onto the facts they need: the form the reference evaluator and the compiler
//! share. Each leaf reads one fact by its index in [`Plan::facts`], the order of the ABI
//! manifest.

use crate::ast::{CmpOp, EventTest, Expr, Leaf, Literal, PropTest};
use membrane_abi::{Fact, FactManifest};

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
    /// A property compared with a literal under the brief's typing rules.
    PropCmp {
        fact: usize,
        op: CmpOp,
        value: Literal,
    },
}

impl Plan {
    pub fn new(expr: &Expr) -> Plan {
        let mut facts = Vec::new();
        let mut time_based = false;
        let root = lower(expr, &mut facts, &mut time_based);
        Plan {
            facts,
            root,
            time_based,
        }
    }

    pub fn manifest(&self) -> FactManifest {
        FactManifest::new(self.facts.clone())
    }
}

fn fact_index(facts: &mut Vec<Fact>, fact: Fact) -> usize {
    match facts.iter().position(|known| *known == fact) {
        Some(index) => index,
        None => {
            facts.push(fact);
            facts.len() - 1
        }
    }
}

fn lower(expr: &Expr, facts: &mut Vec<Fact>, time_based: &mut bool) -> Node {
    match expr {
        Expr::And(items, _) => {
            Node::And(items.iter().map(|e| lower(e, facts, time_based)).collect())
        }
        Expr::Or(items, _) => Node::Or(items.iter().map(|e| lower(e, facts, time_based)).collect()),
        Expr::Not(inner, _) => Node::Not(Box::new(lower(inner, facts, time_based))),
        Expr::Leaf(Leaf::Event(event)) => {
            *time_based |= event.within_secs.is_some();
            let fact = fact_index(
                facts,
                Fact::EventCount {
                    event: event.name.clone(),
                    within_secs: event.within_secs,
                },
            );
            let (op, value) = match event.test {
                EventTest::Exists => (CmpOp::Gt, 0),
                EventTest::NotExists => (CmpOp::Eq, 0),
                EventTest::Count(op, value) => (op, value),
            };
            Node::Count { fact, op, value }
        }
        Expr::Leaf(Leaf::Prop(prop)) => {
            let fact = fact_index(
                facts,
                Fact::Property {
                    key: prop.key.clone(),
                },
            );
            match &prop.test {
                PropTest::Cmp(op, value) => Node::PropCmp {
                    fact,
                    op: *op,
                    value: value.clone(),
                },
            }
        }
    }
}
