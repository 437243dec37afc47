//! The criteria syntax tree. Every node keeps the byte span it was parsed from (relative to the
//! criteria text) so that validation errors can point at it.

use std::ops::Range;

pub type Span = Range<usize>;

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `a and b and ...`, also `all(a, b, ...)`.
    And(Vec<Expr>, Span),
    /// `a or b or ...`, also `any(a, b, ...)`.
    Or(Vec<Expr>, Span),
    Not(Box<Expr>, Span),
    Leaf(Leaf),
}

impl Expr {
    pub fn span(&self) -> Span {
        match self {
            Expr::And(_, span) | Expr::Or(_, span) | Expr::Not(_, span) => span.clone(),
            Expr::Leaf(leaf) => leaf.span(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Leaf {
    Event(EventLeaf),
    Prop(PropLeaf),
}

impl Leaf {
    pub fn span(&self) -> Span {
        match self {
            Leaf::Event(e) => e.span.clone(),
            Leaf::Prop(p) => p.span.clone(),
        }
    }
}

/// `event("name")[.within(D)].exists() | .not_exists() | .count() CMP N`
#[derive(Debug, Clone, PartialEq)]
pub struct EventLeaf {
    pub name: String,
    pub name_span: Span,
    /// Window length in seconds; `None` = all of history.
    pub within_secs: Option<u64>,
    pub test: EventTest,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventTest {
    Exists,
    NotExists,
    Count(CmpOp, i64),
}

/// `prop("key") CMP literal`
#[derive(Debug, Clone, PartialEq)]
pub struct PropLeaf {
    pub key: String,
    pub test: PropTest,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PropTest {
    Cmp(CmpOp, Literal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    /// Applies the operator to an ordering.
    pub fn holds(self, ordering: std::cmp::Ordering) -> bool {
        use std::cmp::Ordering::*;
        match self {
            CmpOp::Eq => ordering == Equal,
            CmpOp::Ne => ordering != Equal,
            CmpOp::Lt => ordering == Less,
            CmpOp::Le => ordering != Greater,
            CmpOp::Gt => ordering == Greater,
            CmpOp::Ge => ordering != Less,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Str(String),
    Num(f64),
    Bool(bool),
    Null,
}
