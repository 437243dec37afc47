//! Checks on parsed criteria that the grammar alone cannot express.

use crate::ast::{CmpOp, EventLeaf, EventTest, Expr, Leaf, Literal, PropLeaf, PropTest};
use crate::diag::Diagnostic;
use crate::eval;
use crate::plan::Plan;

/// Event names with this prefix are written by membrane itself (bucket transitions).
pub const RESERVED_EVENT_PREFIX: &str = "bucket:";

/// Every problem with `expr`; empty when the criteria are valid. Spans are relative to the
/// criteria text `expr` was parsed from.
pub fn validate(expr: &Expr) -> Vec<Diagnostic> {
    let mut diags = Vec::new();
    check_leaves(expr, &mut diags);
    if let Some(diag) = check_blank_user(expr) {
        diags.push(diag);
    }
    diags
}

fn check_leaves(expr: &Expr, diags: &mut Vec<Diagnostic>) {
    match expr {
        Expr::And(items, _) | Expr::Or(items, _) => {
            items.iter().for_each(|item| check_leaves(item, diags))
        }
        Expr::Not(inner, _) => check_leaves(inner, diags),
        Expr::Leaf(Leaf::Event(event)) => check_event(event, diags),
        Expr::Leaf(Leaf::Prop(prop)) => check_prop(prop, diags),
    }
}

fn check_event(event: &EventLeaf, diags: &mut Vec<Diagnostic>) {
    if event.name.starts_with(RESERVED_EVENT_PREFIX) {
        diags.push(
            Diagnostic::new(
                format!(
                    "event names beginning `{RESERVED_EVENT_PREFIX}` are reserved for membrane's own transitions"
                ),
                event.name_span.clone(),
                "reserved event name",
            )
            .with_help("criteria cannot depend on bucket membership; pick an event your application sends"),
        );
    }
    if let EventTest::Count(_, value) = event.test {
        if value < 0 {
            diags.push(
                Diagnostic::new(
                    format!("an event count is never negative, so comparing it with {value} is meaningless"),
                    event.span.clone(),
                    "negative count",
                )
                .with_help("compare the count with 0 or more, e.g. `.count() >= 1`"),
            );
        }
    }
}

fn check_prop(prop: &PropLeaf, diags: &mut Vec<Diagnostic>) {
    let PropTest::Cmp(op, literal) = &prop.test;
    let ordering = matches!(op, CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge);
    let unordered = match literal {
        Literal::Bool(value) => Some(value.to_string()),
        Literal::Null => Some("null".to_string()),
        Literal::Str(_) | Literal::Num(_) => None,
    };
    if let (true, Some(literal)) = (ordering, unordered) {
        diags.push(
            Diagnostic::new(
                format!(
                    "`{}` cannot compare with `{literal}`: only == and != apply to booleans and null",
                    op.symbol()
                ),
                prop.span.clone(),
                "ordering comparison with a boolean or null",
            )
            .with_help(format!("write `prop(\"{}\") == {literal}` or `!= {literal}`", prop.key)),
        );
    }
}

/// Criteria true for a user with no events and no properties would put every user who never
/// did anything in the bucket. Rejecting them also guarantees a user can only enter through a
/// fact the criteria mention, which keeps the real-time candidate index exact.
fn check_blank_user(expr: &Expr) -> Option<Diagnostic> {
    let plan = Plan::new(expr);
    let blank_user_matches = eval::evaluate(&plan, &eval::blank_facts(&plan.facts), 0);
    blank_user_matches.then(|| {
        Diagnostic::new(
            "these criteria are true for a user with no events and no properties, so the bucket \
             would hold everyone who never did anything",
            expr.span(),
            "true for a blank user",
        )
        .with_help(
            "require something the user did or has: \
             `event(\"x\").within(7d).not_exists()` alone is rejected; \
             `event(\"x\").exists() and event(\"x\").within(7d).not_exists()` is fine",
        )
    })
}
