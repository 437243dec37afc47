//! The criteria parser: text → [`Expr`], or every error it could find.
//!
//! ```text
//! expr  := or ;  or := and ("or" and)* ;  and := unary ("and" unary)* ;  unary := "not" unary | atom
//! atom  := "(" expr ")" | leaf
//! leaf  := event("name") [.within(DUR)] ( .exists() | .not_exists() | .count() CMP INT )
//!        | prop("key") CMP literal
//! ```
//!
//! Strings are double-quoted, on one line, with the escapes `\"`, `\\`, `\n`, `\t`, `\r` and
//! `\u{...}` (1–6 hex digits). Numbers are an optional minus, digits and an optional fraction.
//! Durations are written bare: `within(14d)`.
//!
//! Error recovery: when a condition cannot be parsed, the parser skips to the next `and`/`or`
//! at the same nesting level (or the `)` closing the enclosing group) and carries on, so that
//! one run reports every broken condition.

mod lexer;

use crate::ast::{CmpOp, EventLeaf, EventTest, Expr, Leaf, Literal, PropLeaf, PropTest, Span};
use crate::diag::Diagnostic;
use crate::duration::parse_duration;
use lexer::{Token, TokenKind};

pub(crate) use lexer::tokenize;

/// Deeper nesting of `not` and parentheses than this is rejected, which keeps every recursive
/// walk over the tree (here, in the planner and in the compiler) far from the stack limit.
pub const MAX_NESTING: usize = 64;

/// Functions that may start a condition; used for "did you mean" hints.
const CONDITION_FUNCTIONS: &[&str] = &["event", "prop", "not"];
/// Methods that may follow `event("...")`.
const EVENT_METHODS: &[&str] = &["within", "exists", "not_exists", "count"];
const EVENT_TESTS: &str = "`.exists()`, `.not_exists()` or `.count()`";
const COMPARISONS: &str = "a comparison (`==`, `!=`, `<`, `<=`, `>`, `>=`)";

/// Parses criteria text. Spans in the result (and in the errors) are byte offsets into `src`.
pub fn parse_criteria(src: &str) -> Result<Expr, Vec<Diagnostic>> {
    let lexed = tokenize(src);
    let mut parser = Parser {
        src,
        tokens: &lexed.tokens,
        pos: 0,
        depth: 0,
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
    /// Current nesting of `not` and parentheses.
    depth: usize,
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

    /// Skips the rest of a broken condition that began at token `start`: up to the next `and` or
    /// `or` outside the parentheses the condition itself opened, the `)` that closes an enclosing
    /// group, or the end.
    fn recover(&mut self, start: usize) {
        let mut nesting = 0usize;
        let mut index = start;
        while let Some(token) = self.tokens.get(index) {
            match &token.kind {
                TokenKind::Eof => break,
                TokenKind::LParen => nesting += 1,
                TokenKind::RParen if nesting == 0 => break,
                TokenKind::RParen => nesting -= 1,
                TokenKind::Ident(word) if nesting == 0 && (word == "and" || word == "or") => break,
                _ => {}
            }
            index += 1;
        }
        self.pos = self.pos.max(index);
    }

    /// Enters one level of nesting, or reports that there are too many.
    fn nest(&mut self) -> Parse<()> {
        if self.depth >= MAX_NESTING {
            let span = self.peek().span.clone();
            return Err(self.fail(Diagnostic::new(
                format!("the criteria are nested too deeply (more than {MAX_NESTING} levels)"),
                span,
                "too deep",
            )));
        }
        self.depth += 1;
        Ok(())
    }

    fn unary(&mut self) -> Parse<Expr> {
        if !self.at_keyword("not") {
            return self.atom();
        }
        let start = self.bump().span.start;
        self.nest()?;
        let inner = self.unary();
        self.depth -= 1;
        let inner = inner?;
        let span = start..inner.span().end;
        Ok(Expr::Not(Box::new(inner), span))
    }

    fn atom(&mut self) -> Parse<Expr> {
        let token = self.peek().clone();
        match &token.kind {
            TokenKind::LParen => {
                self.bump();
                self.nest()?;
                let inner = self.or_expr();
                self.depth -= 1;
                let inner = inner?;
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
                _ => Err(self.not_a_condition(name)),
            },
            _ => Err(self.expected_condition()),
        }
    }

    fn expected_condition(&mut self) -> Failed {
        self.expected(
            "a condition such as `event(\"x\").exists()`, `prop(\"k\") == 1`, `not` or `(`",
            None,
        )
    }

    /// A name where a condition should start: a misspelt function, a stray keyword, a literal.
    fn not_a_condition(&mut self, name: &str) -> Failed {
        let Some(suggestion) = suggest(name, CONDITION_FUNCTIONS) else {
            return self.expected_condition();
        };
        let span = self.peek().span.clone();
        self.fail(Diagnostic::new(
            format!("unknown function `{name}`, did you mean `{suggestion}`?"),
            span,
            format!("did you mean `{suggestion}`?"),
        ))
    }

    /// `event("name") [.within(DUR)] ( .exists() | .not_exists() | .count() CMP INT )`
    fn event_leaf(&mut self) -> Parse<Expr> {
        let start = self.bump().span.start;
        self.expect(TokenKind::LParen, "`(`", start)?;
        let (name, name_span) = self.expect_string("event name", start)?;
        self.expect(TokenKind::RParen, "`)`", start)?;

        let mut within_secs = None;
        let test = loop {
            if *self.peek_kind() != TokenKind::Dot {
                return Err(self.expected(EVENT_TESTS, Some(start)));
            }
            let dot_start = self.bump().span.start;
            let method = match self.peek_kind() {
                TokenKind::Ident(method) => method.clone(),
                _ => return Err(self.expected(EVENT_TESTS, Some(start))),
            };
            let method_span = self.bump().span;
            match method.as_str() {
                "within" if within_secs.is_some() => {
                    return Err(self.fail(Diagnostic::new(
                        "`.within(...)` is given twice",
                        method_span,
                        "second window",
                    )));
                }
                "within" => within_secs = Some(self.window(start)?),
                "exists" => {
                    self.expect_no_args(start)?;
                    break EventTest::Exists;
                }
                "not_exists" => {
                    self.expect_no_args(start)?;
                    break EventTest::NotExists;
                }
                "count" => {
                    self.expect_no_args(start)?;
                    let op = self.expect_cmp(start)?;
                    break EventTest::Count(op, self.count_value(start)?);
                }
                _ => return Err(self.unknown_method(&method, method_span, start..dot_start)),
            }
        };
        Ok(Expr::Leaf(Leaf::Event(EventLeaf {
            name,
            name_span,
            within_secs: within_secs.flatten(),
            test,
            span: start..self.prev_end(),
        })))
    }

    /// `receiver` is the span of the leaf before the dot of the unknown method.
    fn unknown_method(&mut self, method: &str, span: Span, receiver: Span) -> Failed {
        let receiver = self.excerpt(&receiver);
        let message = match suggest(method, EVENT_METHODS) {
            Some(suggestion) => {
                format!("unknown method `.{method}()`, did you mean `.{suggestion}()`?")
            }
            None => format!("unknown method `.{method}()` on `{receiver}`"),
        };
        self.fail(
            Diagnostic::new(message, span, "unknown method").with_help(format!(
                "after `{receiver}` write `.within(14d)` and/or one of {EVENT_TESTS}"
            )),
        )
    }

    /// `(DUR)` after `.within`. A bad duration is reported but does not stop parsing; the
    /// result is then `None` (never used, since the parse as a whole fails).
    fn window(&mut self, leaf_start: usize) -> Parse<Option<u64>> {
        self.expect(TokenKind::LParen, "`(`", leaf_start)?;
        let token = self.peek().clone();
        let secs = match &token.kind {
            TokenKind::Numeric(text) => match parse_duration(text) {
                Ok(secs) => Some(secs),
                Err(err) => {
                    self.diags.push(Diagnostic::new(
                        err.to_string(),
                        token.span.clone(),
                        "invalid duration",
                    ));
                    None
                }
            },
            TokenKind::Str(text) => {
                self.diags.push(
                    Diagnostic::new(
                        "durations are written without quotes",
                        token.span.clone(),
                        "remove the quotes",
                    )
                    .with_help(format!("write `within({text})`")),
                );
                None
            }
            _ => return Err(self.expected("a duration such as `14d`", Some(leaf_start))),
        };
        self.bump();
        self.expect(TokenKind::RParen, "`)`", leaf_start)?;
        Ok(secs)
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
            self.fail(Diagnostic::new(
                format!("`{text}` is not a whole number"),
                token.span.clone(),
                "expected a whole number",
            ))
        })
    }

    /// `prop("key") CMP literal`
    fn prop_leaf(&mut self) -> Parse<Expr> {
        let start = self.bump().span.start;
        self.expect(TokenKind::LParen, "`(`", start)?;
        let (key, _) = self.expect_string("property key", start)?;
        self.expect(TokenKind::RParen, "`)`", start)?;
        let op = self.expect_cmp(start)?;
        let value = self.literal(start)?;
        Ok(Expr::Leaf(Leaf::Prop(PropLeaf {
            key,
            test: PropTest::Cmp(op, value),
            span: start..self.prev_end(),
        })))
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
        if let TokenKind::Ident(word) = self.peek_kind() {
            diag = diag.with_help(format!(
                "to compare with the text {word}, quote it: `\"{word}\"`"
            ));
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
