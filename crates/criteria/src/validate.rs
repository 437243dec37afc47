//! Checks on parsed criteria that the grammar alone cannot express.

use crate::ast::{CmpOp, EventLeaf, EventTest, Expr, Leaf, Literal, PropLeaf, PropTest};
use crate::diag::Diagnostic;
use crate::eval;
use crate::plan::{Plan, PlanError};

/// Event names with this prefix are written by membrane itself (bucket transitions).
pub const RESERVED_EVENT_PREFIX: &str = "bucket:";

/// The plan of valid criteria, or every problem with them. Spans are relative to the criteria
/// text `expr` was parsed from.
pub fn validate(expr: &Expr) -> Result<Plan, Vec<Diagnostic>> {
    let mut diags = Vec::new();
    check_leaves(expr, None, &mut diags);
    match Plan::new(expr) {
        Ok(plan) => {
            if blank_user_passes(&plan) {
                diags.push(blank_user_diagnostic(expr));
            }
            match diags.is_empty() {
                true => Ok(plan),
                false => Err(diags),
            }
        }
        Err(err) => {
            // The leaf checks report everything the planner refuses, with more context; this
            // is only a fallback should the two ever disagree.
            if diags.is_empty() {
                diags.push(plan_error_diagnostic(&err));
            }
            Err(diags)
        }
    }
}

fn plan_error_diagnostic(err: &PlanError) -> Diagnostic {
    match err {
        PlanError::NotAFilter { span } => {
            Diagnostic::new(err.to_string(), span.clone(), "not a property test")
        }
    }
}

/// Checks every leaf; `filtered` is the event whose `.where(...)` encloses `expr`, if any.
fn check_leaves(expr: &Expr, filtered: Option<&EventLeaf>, diags: &mut Vec<Diagnostic>) {
    match expr {
        Expr::And(items, _) | Expr::Or(items, _) => items
            .iter()
            .for_each(|item| check_leaves(item, filtered, diags)),
        Expr::Not(inner, _) => check_leaves(inner, filtered, diags),
        Expr::Leaf(Leaf::Event(event)) => {
            if let Some(outer) = filtered {
                diags.push(event_in_filter(outer, event));
            }
            check_event(event, diags);
            if let Some(filter) = &event.filter {
                check_leaves(filter, Some(event), diags);
            }
        }
        Expr::Leaf(Leaf::Prop(prop)) => {
            if let (Some(outer), PropTest::CmpNow { .. }) = (filtered, &prop.test) {
                diags.push(now_in_filter(outer, prop));
            }
            check_prop(prop, diags);
        }
    }
}

fn event_in_filter(outer: &EventLeaf, inner: &EventLeaf) -> Diagnostic {
    Diagnostic::new(
        "`event(...)` cannot appear inside `.where(...)`",
        inner.span.clone(),
        "not a property test",
    )
    .with_help(format!(
        "the filter is applied to each `{}` event's own properties when facts are gathered, so \
         it can only test them with `prop(\"key\")`; to also require `{}`, join a separate \
         condition with `and`",
        outer.name, inner.name
    ))
}

fn now_in_filter(outer: &EventLeaf, prop: &PropLeaf) -> Diagnostic {
    Diagnostic::new(
        "`now()` cannot appear inside `.where(...)`",
        prop.span.clone(),
        "compares with `now()`",
    )
    .with_help(format!(
        "the filter is applied to each `{}` event's own properties when facts are gathered, and \
         compares them with fixed values only; to keep recent events, use `.within(14d)`",
        outer.name
    ))
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
    match &prop.test {
        PropTest::Cmp(op, literal) => {
            if let Some(diag) = ordering_without_order(prop, *op, literal) {
                diags.push(diag);
            }
        }
        PropTest::In(values) if values.is_empty() => diags.push(
            Diagnostic::new(
                "`.in([])` with an empty list never matches",
                prop.span.clone(),
                "empty list",
            )
            .with_help(format!(
                "list at least one value, e.g. `prop(\"{}\").in([\"de\", \"fr\"])`",
                prop.key
            )),
        ),
        PropTest::In(_)
        | PropTest::Exists
        | PropTest::NotExists
        | PropTest::Contains(_)
        | PropTest::StartsWith(_)
        | PropTest::CmpNow { .. } => {}
    }
}

/// `<`, `<=`, `>` and `>=` order numbers, strings and timestamps; against a boolean or null
/// they would always be false.
fn ordering_without_order(prop: &PropLeaf, op: CmpOp, literal: &Literal) -> Option<Diagnostic> {
    let ordering = matches!(op, CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge);
    let unordered = match literal {
        Literal::Bool(value) => value.to_string(),
        Literal::Null => "null".to_string(),
        Literal::Str(_) | Literal::Num(_) => return None,
    };
    ordering.then(|| {
        Diagnostic::new(
            format!(
                "`{}` cannot compare with `{unordered}`: only == and != apply to booleans and null",
                op.symbol()
            ),
            prop.span.clone(),
            "ordering comparison with a boolean or null",
        )
        .with_help(format!(
            "write `prop(\"{}\") == {unordered}` or `!= {unordered}`",
            prop.key
        ))
    })
}

/// Criteria true for a user with no events and no properties would put every user who never
/// did anything in the bucket. Rejecting them also guarantees a user can only enter through a
/// fact the criteria mention, which keeps the real-time candidate index exact.
fn blank_user_passes(plan: &Plan) -> bool {
    // A blank user's facts do not depend on the instant: any will do.
    eval::evaluate(plan, &eval::blank_facts(&plan.facts), 0)
}

fn expr_blank_user_passes(expr: &Expr) -> bool {
    Plan::new(expr).is_ok_and(|plan| blank_user_passes(&plan))
}

/// Points at the part of `expr` (true for a blank user) that lets the blank user in, and says
/// how to fix that kind of condition.
fn blank_user_diagnostic(expr: &Expr) -> Diagnostic {
    let culprit = blank_user_culprit(expr);
    Diagnostic::new(
        "these criteria are true for a user with no events and no properties, so the bucket \
         would hold everyone who never did anything",
        culprit.span(),
        "true for a blank user",
    )
    .with_help(blank_user_help(culprit))
}

/// The smallest part of `expr` (true for a blank user) that is true for a blank user on its own
/// and makes the whole true: the first conjunct, the first true disjunct, down to a leaf or `not`.
fn blank_user_culprit(expr: &Expr) -> &Expr {
    match expr {
        Expr::And(items, _) => items.first().map_or(expr, blank_user_culprit),
        Expr::Or(items, _) => items
            .iter()
            .find(|item| expr_blank_user_passes(item))
            .map_or(expr, blank_user_culprit),
        Expr::Not(..) | Expr::Leaf(_) => expr,
    }
}

fn blank_user_help(culprit: &Expr) -> String {
    match culprit {
        Expr::Leaf(Leaf::Event(event)) => format!(
            "a user who never sent `{name}` passes this; also require something the user did, \
             e.g. `event(\"{name}\").exists() and event(\"{name}\").within(7d).not_exists()`",
            name = event.name
        ),
        Expr::Leaf(Leaf::Prop(prop)) if prop.test == PropTest::NotExists => format!(
            "a user without `{key}` passes this; also require something the user did or has, \
             e.g. `event(\"signup\").exists() and prop(\"{key}\").not_exists()`",
            key = prop.key
        ),
        Expr::Leaf(Leaf::Prop(prop)) => format!(
            "`!=` is also true when `{key}` is missing; to require the property, write \
             `prop(\"{key}\").exists() and prop(\"{key}\") != ...`",
            key = prop.key
        ),
        Expr::Not(inner, _) => format!(
            "`not` turns a condition a blank user fails into one they pass; also require \
             something the user did or has, e.g. `{}.exists() and not ...`",
            first_fact(inner)
        ),
        Expr::And(..) | Expr::Or(..) => "require something the user did or has, e.g. \
                                          `event(\"x\").exists() and ...`"
            .to_string(),
    }
}

/// `event("name")` or `prop("key")` of the first leaf in `expr`, as written in criteria.
fn first_fact(expr: &Expr) -> String {
    match expr {
        Expr::And(items, _) | Expr::Or(items, _) => items
            .first()
            .map_or_else(|| "event(\"x\")".to_string(), first_fact),
        Expr::Not(inner, _) => first_fact(inner),
        Expr::Leaf(Leaf::Event(event)) => format!("event({:?})", event.name),
        Expr::Leaf(Leaf::Prop(prop)) => format!("prop({:?})", prop.key),
    }
}
