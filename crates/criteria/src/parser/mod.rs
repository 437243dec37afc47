//! The criteria parser: text → [`Expr`], or every error it could find.
//!
//! ```text
//! expr  := or ;  or := and ("or" and)* ;  and := unary ("and" unary)* ;  unary := "not" unary | atom
//! atom  := "(" expr ")" | "all(" expr ("," expr)* ")" | "any(" expr ("," expr)* ")" | leaf
//! leaf  := event("name") modifier* ( .exists() | .not_exists() | .count() CMP INT )
//!        | prop("key") CMP literal | prop("key") CMP now() [("+" | "-") DUR]
//!        | prop("key") ( .exists() | .not_exists() | .contains(STR) | .starts_with(STR)
//!                      | .in([literal ("," literal)*]) )
//! modifier := .where(expr) | .within(DUR)       -- in either order, each at most once
//! literal  := STR | NUMBER | true | false | null
//! ```
//!
//! Strings are double-quoted, on one line, with the escapes `\"`, `\\`, `\n`, `\t`, `\r` and
//! `\u{...}` (1–6 hex digits). Numbers are an optional minus, digits and an optional fraction.
//! Durations are written bare: `within(14d)`, `now() - 14d` (also `now()-14d`). `.in([])` and
//! anything inside `.where(...)` parse; [`crate::validate`] says what is wrong with them.
//!
//! Error recovery: when a condition cannot be parsed, the parser skips to the next `and`/`or`
//! or `,` at the same nesting level (or the bracket closing the enclosing group) and carries
//! on, so that one run reports every broken condition.

mod lexer;

use crate::ast::{CmpOp, EventLeaf, EventTest, Expr, Leaf, Literal, PropLeaf, PropTest, Span};
use crate::diag::Diagnostic;
use crate::duration::{parse_duration, DurationError};
use lexer::{Token, TokenKind};

pub(crate) use lexer::tokenize;

/// Deeper nesting of `not`, parentheses, `all`/`any` and `.where` than this is rejected, which
/// keeps every recursive walk over the tree (here, in the planner and in the compiler) far from
/// the stack limit.
pub const MAX_NESTING: usize = 64;

/// Functions that may start a condition; used for "did you mean" hints.
const CONDITION_FUNCTIONS: &[&str] = &["event", "prop", "not", "all", "any"];
/// Words that are never a misspelt function, so they get no "did you mean" hint.
const KEYWORDS: &[&str] = &["and", "or", "true", "false", "null"];
const EVENT_TESTS: &str = "`.exists()`, `.not_exists()` or `.count()`";
const PROP_TESTS: &str = "a comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`) or one of `.exists()`, \
                          `.not_exists()`, `.contains(...)`, `.starts_with(...)`, `.in([...])`";
const COMPARISONS: &str = "a comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`)";
const DURATION_EXAMPLE: &str = "a duration such as `14d`";

/// What a method is called on: each has its own methods, and a method of the other one gets
/// a hint rather than a bare "unknown method".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiver {
    Event,
    Prop,
}

impl Receiver {
    fn methods(self) -> &'static [&'static str] {
        match self {
            Receiver::Event => &["where", "within", "exists", "not_exists", "count"],
            Receiver::Prop => &["exists", "not_exists", "contains", "starts_with", "in"],
        }
    }

    fn function(self) -> &'static str {
        match self {
            Receiver::Event => "event",
            Receiver::Prop => "prop",
        }
    }

    fn other(self) -> Receiver {
        match self {
            Receiver::Event => Receiver::Prop,
            Receiver::Prop => Receiver::Event,
        }
    }

    /// What may follow the receiver, for help texts.
    fn usage(self) -> &'static str {
        match self {
            Receiver::Event => {
                "`.where(...)` and/or `.within(14d)`, then one of `.exists()`, `.not_exists()` \
                 or `.count()`"
            }
            Receiver::Prop => {
                "a comparison such as `== \"pro\"`, or one of `.exists()`, `.not_exists()`, \
                 `.contains(\"...\")`, `.starts_with(\"...\")` or `.in([...])`"
            }
        }
    }
}

/// Parses criteria text. Spans in the result (and in the errors) are byte offsets into `src`.
pub fn parse_criteria(src: &str) -> Result<Expr, Vec<Diagnostic>> {
    let lexed = tokenize(src);
    let mut parser = Parser {
        src,
        tokens: &lexed.tokens,
        pos: 0,
        depth: 0,
        filter_depth: 0,
        diags: Vec::new(),
    };
    let parsed = parser.criteria();
    let garbled_from = lexed.unterminated_string.unwrap_or(usize::MAX);
    let mut diags = lexed.diags;
    diags.extend(
        parser
            .diags
            .into_iter()
            .filter(|d| d.span.start < garbled_from),
    );
    diags.sort_by_key(|d| (d.span.start, d.span.end));
    match parsed {
        Ok(expr) if diags.is_empty() => Ok(expr),
        _ => Err(diags),
    }
}

/// A parse function gave up; the reason is already in `Parser::diags`.
struct Failed;

type Parse<T> = Result<T, Failed>;

struct Parser<'a> {
    src: &'a str,
    tokens: &'a [Token],
    pos: usize,
    /// Current nesting of `not`, parentheses, `all`/`any` and `.where`.
    depth: usize,
    /// How many `.where(...)` filters enclose the current position (for help texts).
    filter_depth: usize,
    diags: Vec<Diagnostic>,
}

/// The closest of `candidates` to a misspelt `word`, if it is close enough to be a likely typo.
pub(crate) fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    candidates
        .iter()
        .map(|candidate| (strsim::jaro_winkler(word, candidate), *candidate))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, candidate)| candidate)
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        // `tokenize` always ends with Eof and `bump` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek_kind(&self) -> &TokenKind {
        &self.peek().kind
    }

    fn bump(&mut self) -> Token {
        let token = self.peek().clone();
        if token.kind != TokenKind::Eof {
            self.pos += 1;
        }
        token
    }

    fn at_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek_kind(), TokenKind::Ident(name) if name == keyword)
    }

    /// End of the last consumed token.
    fn prev_end(&self) -> usize {
        match self.pos.checked_sub(1) {
            Some(prev) => self.tokens[prev].span.end,
            None => 0,
        }
    }

    fn fail(&mut self, diag: Diagnostic) -> Failed {
        self.diags.push(diag);
        Failed
    }

    /// How the next token reads in an error message.
    fn describe_next(&self) -> String {
        let token = self.peek();
        match &token.kind {
            TokenKind::Eof => "the end of the criteria".to_string(),
            TokenKind::Str(_) => format!("the string `{}`", self.excerpt(&token.span)),
            _ => format!("`{}`", self.excerpt(&token.span)),
        }
    }

    /// Source text of a span, shortened for messages.
    fn excerpt(&self, span: &Span) -> String {
        const MAX_CHARS: usize = 40;
        let text = &self.src[span.clone()];
        if text.chars().count() <= MAX_CHARS {
            text.to_string()
        } else {
            format!("{}…", text.chars().take(MAX_CHARS).collect::<String>())
        }
    }

    /// A report that `expected` should come next (after the source text since `after_start`, if
    /// given), pointing at what came instead.
    fn expected_diag(&self, expected: &str, after_start: Option<usize>) -> Diagnostic {
        let after = match after_start {
            Some(start) => format!(" after `{}`", self.excerpt(&(start..self.prev_end()))),
            None => String::new(),
        };
        let message = format!("expected {expected}{after}, found {}", self.describe_next());
        let span = match self.peek_kind() {
            TokenKind::Eof => self.prev_end()..self.prev_end(),
            _ => self.peek().span.clone(),
        };
        Diagnostic::new(message, span, format!("expected {expected}"))
    }

    fn expected(&mut self, expected: &str, after_start: Option<usize>) -> Failed {
        let diag = self.expected_diag(expected, after_start);
        self.fail(diag)
    }

    /// Consumes a token of exactly `kind` or reports it missing.
    fn expect(&mut self, kind: TokenKind, shown: &str, after_start: usize) -> Parse<Span> {
        if *self.peek_kind() == kind {
            Ok(self.bump().span)
        } else {
            Err(self.expected(shown, Some(after_start)))
        }
    }

    fn expect_string(&mut self, what: &str, after_start: usize) -> Parse<(String, Span)> {
        match self.peek_kind() {
            TokenKind::Str(value) if value.is_empty() => {
                let span = self.peek().span.clone();
                Err(self.fail(Diagnostic::new(
                    format!("the {what} must not be empty"),
                    span,
                    format!("empty {what}"),
                )))
            }
            TokenKind::Str(value) => {
                let value = value.clone();
                Ok((value, self.bump().span))
            }
            _ => Err(self.expected(
                &format!("the {what} as a double-quoted string"),
                Some(after_start),
            )),
        }
    }

    fn expect_cmp(&mut self, after_start: usize) -> Parse<CmpOp> {
        match *self.peek_kind() {
            TokenKind::Cmp(op) => {
                self.bump();
                Ok(op)
            }
            _ => Err(self.expected(COMPARISONS, Some(after_start))),
        }
    }

    /// `()` after a method name that takes no arguments.
    fn expect_no_args(&mut self, after_start: usize) -> Parse<()> {
        self.expect(TokenKind::LParen, "`()`", after_start)?;
        self.expect(TokenKind::RParen, "`)`", after_start)?;
        Ok(())
    }

    /// The whole criteria: one expression and nothing after it.
    fn criteria(&mut self) -> Parse<Expr> {
        if *self.peek_kind() == TokenKind::Eof {
            return Err(self.fail(
                Diagnostic::new(
                    "the criteria are empty",
                    0..self.src.len(),
                    "expected a condition",
                )
                .with_help("write a condition such as `event(\"signup\").exists()`"),
            ));
        }
        let expr = self.or_expr();
        if *self.peek_kind() != TokenKind::Eof {
            self.trailing_input();
        }
        expr
    }

    fn trailing_input(&mut self) {
        let token = self.peek().clone();
        let diag = match &token.kind {
            TokenKind::RParen => Diagnostic::new("unmatched `)`", token.span, "no `(` opens this"),
            kind => {
                let found = self.describe_next();
                let diag = Diagnostic::new(
                    format!("expected `and`, `or` or the end of the criteria, found {found}"),
                    token.span,
                    "expected `and` or `or` before this",
                );
                match kind {
                    TokenKind::Ident(word)
                        if matches!(word.to_lowercase().as_str(), "and" | "or") =>
                    {
                        diag.with_help(format!("keywords are lowercase: `{}`", word.to_lowercase()))
                    }
                    TokenKind::Comma => diag.with_help(
                        "to list conditions with commas, wrap them in `all(...)` or `any(...)`",
                    ),
                    _ => diag,
                }
            }
        };
        self.diags.push(diag);
    }

    fn or_expr(&mut self) -> Parse<Expr> {
        self.chain("or", Self::and_expr, Expr::Or)
    }

    fn and_expr(&mut self) -> Parse<Expr> {
        self.chain("and", Self::unary, Expr::And)
    }

    /// `item (keyword item)*`, flattened into one node. A broken item is reported, skipped,
    /// and the rest of the chain still parsed so that its errors are reported too.
    fn chain(
        &mut self,
        keyword: &str,
        item: fn(&mut Self) -> Parse<Expr>,
        combine: fn(Vec<Expr>, Span) -> Expr,
    ) -> Parse<Expr> {
        let mut items = Vec::new();
        let mut failed = false;
        loop {
            let start = self.pos;
            match item(self) {
                Ok(expr) => items.push(expr),
                Err(Failed) => {
                    failed = true;
                    self.recover(start);
                }
            }
            if !self.at_keyword(keyword) {
                break;
            }
            self.bump();
        }
        match (failed, items.len()) {
            (true, _) | (false, 0) => Err(Failed),
            (false, 1) => Ok(items.remove(0)),
            (false, _) => {
                let span = items[0].span().start..items[items.len() - 1].span().end;
                Ok(combine(items, span))
            }
        }
    }

    /// `item ("," item)*`, stopping before `close`. A broken item is reported, skipped, and
    /// the remaining items still parsed; a trailing comma is reported.
    fn comma_separated<T>(
        &mut self,
        close: &TokenKind,
        mut item: impl FnMut(&mut Self) -> Parse<T>,
    ) -> Parse<Vec<T>> {
        let mut items = Vec::new();
        let mut failed = false;
        loop {
            let start = self.pos;
            match item(self) {
                Ok(value) => items.push(value),
                Err(Failed) => {
                    failed = true;
                    self.recover(start);
                }
            }
            if *self.peek_kind() != TokenKind::Comma {
                break;
            }
            let comma = self.bump().span;
            if self.peek_kind() == close {
                self.diags.push(Diagnostic::new(
                    "trailing `,`",
                    comma,
                    "remove this comma: nothing follows it",
                ));
                break;
            }
        }
        if failed {
            Err(Failed)
        } else {
            Ok(items)
        }
    }

    /// Skips the rest of a broken item that began at token `start`: up to the next `and`, `or`
    /// or `,` outside the brackets the item itself opened, the bracket that closes an
    /// enclosing group, or the end.
    fn recover(&mut self, start: usize) {
        let mut nesting = 0usize;
        let mut index = start;
        while let Some(token) = self.tokens.get(index) {
            match &token.kind {
                TokenKind::Eof => break,
                TokenKind::LParen | TokenKind::LBracket => nesting += 1,
                TokenKind::RParen | TokenKind::RBracket | TokenKind::Comma if nesting == 0 => break,
                TokenKind::RParen | TokenKind::RBracket => nesting -= 1,
                TokenKind::Ident(word) if nesting == 0 && (word == "and" || word == "or") => break,
                _ => {}
            }
            index += 1;
        }
        self.pos = self.pos.max(index);
    }

    /// Runs `inner` one nesting level deeper, or reports that there are too many levels.
    fn nested<T>(&mut self, inner: impl FnOnce(&mut Self) -> Parse<T>) -> Parse<T> {
        if self.depth >= MAX_NESTING {
            let span = self.peek().span.clone();
            return Err(self.fail(Diagnostic::new(
                format!("the criteria are nested too deeply (more than {MAX_NESTING} levels)"),
                span,
                "too deep",
            )));
        }
        self.depth += 1;
        let result = inner(self);
        self.depth -= 1;
        result
    }

    fn unary(&mut self) -> Parse<Expr> {
        if !self.at_keyword("not") {
            return self.atom();
        }
        let start = self.bump().span.start;
        let inner = self.nested(Self::unary)?;
        let span = start..inner.span().end;
        Ok(Expr::Not(Box::new(inner), span))
    }

    fn atom(&mut self) -> Parse<Expr> {
        let token = self.peek().clone();
        match &token.kind {
            TokenKind::LParen => {
                self.bump();
                let inner = self.nested(Self::or_expr)?;
                if *self.peek_kind() != TokenKind::RParen {
                    let diag = self
                        .expected_diag("`)`", None)
                        .with_help("every `(` needs a matching `)`");
                    return Err(self.fail(diag));
                }
                self.bump();
                Ok(inner)
            }
            TokenKind::Ident(name) => match name.as_str() {
                "event" => self.event_leaf(),
                "prop" => self.prop_leaf(),
                "all" => self.combinator(Expr::And),
                "any" => self.combinator(Expr::Or),
                _ => Err(self.not_a_condition(name)),
            },
            _ => Err(self.expected_condition()),
        }
    }

    fn expected_condition(&mut self) -> Failed {
        let mut diag = self.expected_diag(
            "a condition such as `event(\"x\").exists()`, `prop(\"k\") == 1`, `not` or `(`",
            None,
        );
        if self.filter_depth > 0 {
            diag = diag.with_help(
                "inside `.where(...)`, test the event's own properties with `prop(\"key\")`, \
                 e.g. `.where(prop(\"amount\") >= 100)`",
            );
        }
        self.fail(diag)
    }

    /// A name where a condition should start: a misspelt function, a stray keyword, `now`.
    fn not_a_condition(&mut self, name: &str) -> Failed {
        let span = self.peek().span.clone();
        if name == "now" {
            return self.fail(
                Diagnostic::new(
                    "a condition cannot start with `now()`",
                    span,
                    "not a condition",
                )
                .with_help(
                    "put the property first and flip the comparison, \
                         e.g. `prop(\"trial_ends_at\") < now()`",
                ),
            );
        }
        let suggestion = match KEYWORDS.contains(&name) {
            true => None,
            false => suggest(name, CONDITION_FUNCTIONS),
        };
        let Some(suggestion) = suggestion else {
            return self.expected_condition();
        };
        self.fail(Diagnostic::new(
            format!("unknown function `{name}`, did you mean `{suggestion}`?"),
            span,
            format!("did you mean `{suggestion}`?"),
        ))
    }

    /// `all(e, ...)` or `any(e, ...)`, at least one condition.
    fn combinator(&mut self, combine: fn(Vec<Expr>, Span) -> Expr) -> Parse<Expr> {
        let name_token = self.bump();
        let name = self.excerpt(&name_token.span);
        let start = name_token.span.start;
        self.expect(TokenKind::LParen, "`(`", start)?;
        if *self.peek_kind() == TokenKind::RParen {
            let span = start..self.bump().span.end;
            return Err(self.fail(
                Diagnostic::new(
                    format!("`{name}()` needs at least one condition"),
                    span,
                    "no conditions",
                )
                .with_help(format!(
                    "list conditions separated by commas, \
                     e.g. `{name}(event(\"signup\").exists(), prop(\"plan\") == \"pro\")`"
                )),
            ));
        }
        let items =
            self.nested(|parser| parser.comma_separated(&TokenKind::RParen, Self::or_expr))?;
        let end = self.expect(TokenKind::RParen, "`,` or `)`", start)?.end;
        Ok(combine(items, start..end))
    }

    /// `.name` after a leaf's receiver: the method name, its span and where its dot starts.
    fn method_name(&mut self, leaf_start: usize, expected: &str) -> Parse<(String, Span, usize)> {
        if *self.peek_kind() != TokenKind::Dot {
            return Err(self.expected(expected, Some(leaf_start)));
        }
        let dot_start = self.bump().span.start;
        let TokenKind::Ident(method) = self.peek_kind() else {
            return Err(self.expected(expected, Some(leaf_start)));
        };
        let method = method.clone();
        Ok((method, self.bump().span, dot_start))
    }

    /// `event("name") modifier* ( .exists() | .not_exists() | .count() CMP INT )`
    fn event_leaf(&mut self) -> Parse<Expr> {
        let start = self.bump().span.start;
        self.expect(TokenKind::LParen, "`(`", start)?;
        let (name, name_span) = self.expect_string("event name", start)?;
        self.expect(TokenKind::RParen, "`)`", start)?;

        // Outer `Some`: the modifier was given; inner `None`: it was broken (and reported).
        let mut filter: Option<Option<Box<Expr>>> = None;
        let mut within_secs: Option<Option<u64>> = None;
        let (test, test_start) = loop {
            let (method, method_span, dot_start) = self.method_name(start, EVENT_TESTS)?;
            match method.as_str() {
                "where" if filter.is_some() => {
                    return Err(self.duplicate_modifier(&method, method_span));
                }
                "within" if within_secs.is_some() => {
                    return Err(self.duplicate_modifier(&method, method_span));
                }
                "where" => filter = Some(self.filter(start)?),
                "within" => within_secs = Some(self.window(start)?),
                "exists" => {
                    self.expect_no_args(start)?;
                    break (EventTest::Exists, dot_start);
                }
                "not_exists" => {
                    self.expect_no_args(start)?;
                    break (EventTest::NotExists, dot_start);
                }
                "count" => {
                    self.expect_no_args(start)?;
                    let op = self.expect_cmp(start)?;
                    break (EventTest::Count(op, self.count_value(start)?), dot_start);
                }
                _ => {
                    return Err(self.unknown_method(
                        &method,
                        method_span,
                        start..dot_start,
                        Receiver::Event,
                    ))
                }
            }
        };
        self.modifier_after_test(test_start)?;
        Ok(Expr::Leaf(Leaf::Event(EventLeaf {
            name,
            name_span,
            filter: filter.flatten(),
            within_secs: within_secs.flatten(),
            test,
            span: start..self.prev_end(),
        })))
    }

    fn duplicate_modifier(&mut self, method: &str, span: Span) -> Failed {
        let help = match method {
            "where" => "combine the conditions in one filter: `.where(prop(\"a\") == 1 and prop(\"b\") == 2)`",
            _ => "an event condition has one window; for two windows write two conditions joined by `and`",
        };
        self.fail(
            Diagnostic::new(
                format!("`.{method}(...)` is given twice"),
                span,
                format!("second `.{method}(...)`"),
            )
            .with_help(help),
        )
    }

    /// `.where(...)` or `.within(...)` after the test (which began at `test_start`): they
    /// must come first.
    fn modifier_after_test(&mut self, test_start: usize) -> Parse<()> {
        let modifier = match (self.peek_kind(), self.tokens.get(self.pos + 1)) {
            (TokenKind::Dot, Some(token)) => match &token.kind {
                TokenKind::Ident(method) if method == "where" || method == "within" => {
                    (method.clone(), token.span.clone())
                }
                _ => return Ok(()),
            },
            _ => return Ok(()),
        };
        let (method, span) = modifier;
        let test = self.excerpt(&(test_start..self.prev_end()));
        Err(self.fail(
            Diagnostic::new(
                format!("`.{method}(...)` must come before `{test}`"),
                span,
                "too late",
            )
            .with_help("the test comes last: `event(\"x\").where(...).within(7d).exists()`"),
        ))
    }

    /// `receiver` is the span of the leaf before the dot of the unknown method.
    fn unknown_method(
        &mut self,
        method: &str,
        span: Span,
        receiver_span: Span,
        receiver: Receiver,
    ) -> Failed {
        let receiver_text = self.excerpt(&receiver_span);
        let other = receiver.other();
        let message = if other.methods().contains(&method) {
            format!(
                "`.{method}()` applies to `{}(...)`, not to `{}(...)`",
                other.function(),
                receiver.function()
            )
        } else if let Some(suggestion) = suggest(method, receiver.methods()) {
            format!("unknown method `.{method}()`, did you mean `.{suggestion}()`?")
        } else {
            format!("unknown method `.{method}()` on `{receiver_text}`")
        };
        self.fail(
            Diagnostic::new(message, span, "unknown method").with_help(format!(
                "after `{receiver_text}` write {}",
                receiver.usage()
            )),
        )
    }

    /// `(expr)` after `.where`. Errors inside are reported and the filter is then `None`
    /// (never used, since the parse as a whole fails).
    fn filter(&mut self, leaf_start: usize) -> Parse<Option<Box<Expr>>> {
        let open = self.expect(TokenKind::LParen, "`(`", leaf_start)?;
        if *self.peek_kind() == TokenKind::RParen {
            let span = open.start..self.bump().span.end;
            self.diags.push(
                Diagnostic::new(
                    "`.where()` needs a condition on the event's properties",
                    span,
                    "empty filter",
                )
                .with_help("e.g. `.where(prop(\"amount\") >= 100)`, or leave out `.where()`"),
            );
            return Ok(None);
        }
        self.filter_depth += 1;
        let inner = self.nested(Self::or_expr);
        self.filter_depth -= 1;
        match inner {
            Ok(expr) => {
                self.expect(TokenKind::RParen, "`)`", leaf_start)?;
                Ok(Some(Box::new(expr)))
            }
            // The broken condition was skipped up to the `)` closing the filter, if any.
            Err(Failed) if *self.peek_kind() == TokenKind::RParen => {
                self.bump();
                Ok(None)
            }
            Err(Failed) => Err(Failed),
        }
    }

    /// `(DUR)` after `.within`. A bad duration is reported but does not stop parsing; the
    /// result is then `None`.
    fn window(&mut self, leaf_start: usize) -> Parse<Option<u64>> {
        self.expect(TokenKind::LParen, "`(`", leaf_start)?;
        let secs = self.duration(
            leaf_start,
            "to count all of history, leave out `.within(...)`",
        )?;
        self.expect(TokenKind::RParen, "`)`", leaf_start)?;
        Ok(secs)
    }

    /// A bare duration such as `14d`. A bad one is reported and gives `None`; `zero_help`
    /// explains what to write instead of a zero duration.
    fn duration(&mut self, leaf_start: usize, zero_help: &str) -> Parse<Option<u64>> {
        let token = self.peek().clone();
        let secs = match &token.kind {
            TokenKind::Numeric(text) => self.checked_duration(text, token.span.clone(), zero_help),
            TokenKind::Str(text) => {
                self.diags.push(
                    Diagnostic::new(
                        "durations are written without quotes",
                        token.span.clone(),
                        "remove the quotes",
                    )
                    .with_help(format!("write `{text}`, not `\"{text}\"`")),
                );
                None
            }
            _ => return Err(self.expected(DURATION_EXAMPLE, Some(leaf_start))),
        };
        self.bump();
        Ok(secs)
    }

    fn checked_duration(&mut self, text: &str, span: Span, zero_help: &str) -> Option<u64> {
        parse_duration(text)
            .map_err(|err| {
                let mut diag = Diagnostic::new(err.to_string(), span, "invalid duration");
                if matches!(err, DurationError::Zero(_)) {
                    diag = diag.with_help(zero_help);
                }
                self.diags.push(diag);
            })
            .ok()
    }

    /// The whole number after `.count() CMP`. Negative numbers parse (validation rejects them,
    /// with a better message than a syntax error could give).
    fn count_value(&mut self, leaf_start: usize) -> Parse<i64> {
        let token = self.peek().clone();
        let TokenKind::Numeric(text) = &token.kind else {
            return Err(self.expected("a whole number", Some(leaf_start)));
        };
        self.bump();
        text.parse::<i64>().map_err(|_| {
            let digits_only = text
                .trim_start_matches('-')
                .chars()
                .all(|c| c.is_ascii_digit());
            let (message, label) = match digits_only {
                true => (
                    format!("`{text}` is too large for an event count"),
                    format!("at most {}", i64::MAX),
                ),
                false => (
                    format!("`{text}` is not a whole number"),
                    "expected a whole number".to_string(),
                ),
            };
            self.fail(Diagnostic::new(message, token.span.clone(), label))
        })
    }

    /// `prop("key")` followed by a comparison or a method.
    fn prop_leaf(&mut self) -> Parse<Expr> {
        let start = self.bump().span.start;
        self.expect(TokenKind::LParen, "`(`", start)?;
        let (key, _) = self.expect_string("property key", start)?;
        self.expect(TokenKind::RParen, "`)`", start)?;
        let test = match *self.peek_kind() {
            TokenKind::Cmp(op) => {
                self.bump();
                self.compared_value(op, start)?
            }
            TokenKind::Dot => self.prop_method(start)?,
            _ => return Err(self.expected_prop_test(start)),
        };
        Ok(Expr::Leaf(Leaf::Prop(PropLeaf {
            key,
            test,
            span: start..self.prev_end(),
        })))
    }

    fn expected_prop_test(&mut self, leaf_start: usize) -> Failed {
        let mut diag = self.expected_diag(PROP_TESTS, Some(leaf_start));
        if let TokenKind::Ident(word) = self.peek_kind() {
            if Receiver::Prop.methods().contains(&word.as_str()) {
                diag = diag.with_help(format!("methods are called with a dot: `.{word}(...)`"));
            }
        }
        self.fail(diag)
    }

    /// What follows `prop("key") CMP`: a literal, or `now()` with an optional offset.
    fn compared_value(&mut self, op: CmpOp, leaf_start: usize) -> Parse<PropTest> {
        if !self.at_keyword("now") {
            return Ok(PropTest::Cmp(op, self.literal(leaf_start)?));
        }
        self.bump();
        self.expect_no_args(leaf_start)?;
        let offset_secs = self.now_offset(leaf_start)?;
        Ok(PropTest::CmpNow { op, offset_secs })
    }

    /// The optional `+ DUR` or `- DUR` after `now()`, in seconds; 0 when absent. A bad
    /// duration is reported and fails the leaf.
    fn now_offset(&mut self, leaf_start: usize) -> Parse<i64> {
        const ZERO_HELP: &str = "write `now()` alone to compare with the evaluation instant";
        let token = self.peek().clone();
        let (negative, secs) = match &token.kind {
            TokenKind::Plus | TokenKind::Minus => {
                self.bump();
                (
                    token.kind == TokenKind::Minus,
                    self.duration(leaf_start, ZERO_HELP)?,
                )
            }
            // `now()-14d`: the lexer reads `-14d` as one token.
            TokenKind::Numeric(text) if text.starts_with('-') => {
                self.bump();
                let span = token.span.start + 1..token.span.end;
                (true, self.checked_duration(&text[1..], span, ZERO_HELP))
            }
            _ => return Ok(0),
        };
        // Durations are at most 100 years, far inside i64.
        let secs = secs.ok_or(Failed)? as i64;
        Ok(if negative { -secs } else { secs })
    }

    /// `.exists()`, `.not_exists()`, `.contains(STR)`, `.starts_with(STR)` or `.in([...])`.
    fn prop_method(&mut self, leaf_start: usize) -> Parse<PropTest> {
        let (method, method_span, dot_start) = self.method_name(leaf_start, PROP_TESTS)?;
        Ok(match method.as_str() {
            "exists" => {
                self.expect_no_args(leaf_start)?;
                PropTest::Exists
            }
            "not_exists" => {
                self.expect_no_args(leaf_start)?;
                PropTest::NotExists
            }
            "contains" => PropTest::Contains(self.string_argument(leaf_start)?),
            "starts_with" => PropTest::StartsWith(self.string_argument(leaf_start)?),
            "in" => PropTest::In(self.literal_list(leaf_start)?),
            _ => {
                return Err(self.unknown_method(
                    &method,
                    method_span,
                    leaf_start..dot_start,
                    Receiver::Prop,
                ))
            }
        })
    }

    /// `("text")` after `.contains` or `.starts_with`.
    fn string_argument(&mut self, leaf_start: usize) -> Parse<String> {
        self.expect(TokenKind::LParen, "`(`", leaf_start)?;
        let TokenKind::Str(value) = self.peek_kind() else {
            let mut diag = self.expected_diag("a double-quoted string", Some(leaf_start));
            if matches!(
                self.peek_kind(),
                TokenKind::Numeric(_) | TokenKind::Ident(_)
            ) {
                let text = self.excerpt(&self.peek().span);
                diag = diag.with_help(format!(
                    "this test compares text; to look for {text}, quote it: `\"{text}\"`"
                ));
            }
            return Err(self.fail(diag));
        };
        let value = value.clone();
        self.bump();
        self.expect(TokenKind::RParen, "`)`", leaf_start)?;
        Ok(value)
    }

    /// `([literal, ...])` after `.in`. An empty list parses; validation rejects it.
    fn literal_list(&mut self, leaf_start: usize) -> Parse<Vec<Literal>> {
        self.expect(TokenKind::LParen, "`(`", leaf_start)?;
        if *self.peek_kind() != TokenKind::LBracket {
            let diag = self
                .expected_diag("`[`", Some(leaf_start))
                .with_help("list the values in brackets: `.in([\"de\", \"fr\"])`");
            return Err(self.fail(diag));
        }
        self.bump();
        let values = match *self.peek_kind() {
            TokenKind::RBracket => Vec::new(),
            _ => self.comma_separated(&TokenKind::RBracket, |parser| parser.literal(leaf_start))?,
        };
        self.expect(TokenKind::RBracket, "`,` or `]`", leaf_start)?;
        self.expect(TokenKind::RParen, "`)`", leaf_start)?;
        Ok(values)
    }

    /// `STR | NUMBER | true | false | null`
    fn literal(&mut self, leaf_start: usize) -> Parse<Literal> {
        let token = self.peek().clone();
        let literal = match &token.kind {
            TokenKind::Str(value) => Literal::Str(value.clone()),
            TokenKind::Numeric(text) => self.number(text, &token.span)?,
            TokenKind::Ident(word) => match word.as_str() {
                "true" => Literal::Bool(true),
                "false" => Literal::Bool(false),
                "null" => Literal::Null,
                _ => return Err(self.expected_literal(leaf_start)),
            },
            _ => return Err(self.expected_literal(leaf_start)),
        };
        self.bump();
        Ok(literal)
    }

    fn expected_literal(&mut self, leaf_start: usize) -> Failed {
        let mut diag = self.expected_diag(
            "a value (a string, a number, `true`, `false` or `null`)",
            Some(leaf_start),
        );
        match self.peek_kind() {
            TokenKind::Ident(word) => {
                diag = diag.with_help(format!(
                    "to compare with the text {word}, quote it: `\"{word}\"`"
                ));
            }
            TokenKind::Minus => {
                diag = diag.with_help("write a negative number without a space: `-2`");
            }
            _ => {}
        }
        self.fail(diag)
    }

    fn number(&mut self, text: &str, span: &Span) -> Parse<Literal> {
        let plain_number = text
            .trim_start_matches('-')
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.');
        match text.parse::<f64>() {
            Ok(value) if plain_number && value.is_finite() => Ok(Literal::Num(value)),
            _ => Err(self.fail(Diagnostic::new(
                format!("`{text}` is not a number"),
                span.clone(),
                "expected a number such as `3` or `-2.5`",
            ))),
        }
    }
}
