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

/// `event("name")[.where(F)][.within(D)].exists() | .not_exists() | .count() CMP N`
#[derive(Debug, Clone, PartialEq)]
pub struct EventLeaf {
    pub name: String,
    pub name_span: Span,
    /// `.where(...)`: only property leaves (read from the event's own properties) combined
    /// with and/or/not/all/any; validation rejects anything else.
    pub filter: Option<Box<Expr>>,
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

/// `prop("key") ...`
#[derive(Debug, Clone, PartialEq)]
pub struct PropLeaf {
    pub key: String,
    pub test: PropTest,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PropTest {
    /// `prop(k) CMP literal`
    Cmp(CmpOp, Literal),
    /// `prop(k).exists()`
    Exists,
    /// `prop(k).not_exists()`
    NotExists,
    /// `prop(k).contains("s")`
    Contains(String),
    /// `prop(k).starts_with("s")`
    StartsWith(String),
    /// `prop(k).in([literal, ...])`
    In(Vec<Literal>),
    /// `prop(k) CMP now() [(+|-) DUR]`; `offset_secs` is signed.
    CmpNow { op: CmpOp, offset_secs: i64 },
}

pub use membrane_abi::{CmpOp, Literal};
