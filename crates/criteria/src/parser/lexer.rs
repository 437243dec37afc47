//! Splits criteria text into tokens. The lexer never stops at a bad character: it reports it,
//! skips or repairs it, and carries on, so that the parser can report further errors too.

use crate::ast::{CmpOp, Span};
use crate::diag::Diagnostic;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenKind {
    /// A name: `event`, `prop`, `exists`, and the keywords `and`, `or`, `not`, `true`, `false`,
    /// `null` (the parser tells them apart).
    Ident(String),
    /// A double-quoted string, escapes already decoded.
    Str(String),
    /// A number as written, with any letters glued to it (`14d`): the parser decides whether it
    /// wants a number, a whole number or a duration there.
    Numeric(String),
    Cmp(CmpOp),
    LParen,
    RParen,
    /// `[` and `]` delimit the list of `.in([...])`.
    LBracket,
    RBracket,
    Dot,
    Comma,
    /// `+` and `-` standing alone (not the sign of a number): the offset of `now() + 14d`.
    Plus,
    Minus,
    Eof,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub kind: TokenKind,
    pub span: Span,
}

pub(crate) struct Lexed {
    /// Always ends with one [`TokenKind::Eof`].
    pub tokens: Vec<Token>,
    pub diags: Vec<Diagnostic>,
    /// Where the first unterminated string starts: what follows it is garbled, so parse errors
    /// from there on are noise.
    pub unterminated_string: Option<usize>,
}

pub(crate) fn tokenize(src: &str) -> Lexed {
    let mut lexer = Lexer {
        src,
        pos: 0,
        lexed: Lexed {
            tokens: Vec::new(),
            diags: Vec::new(),
            unterminated_string: None,
        },
    };
    lexer.run();
    lexer.lexed
}

struct Lexer<'s> {
    src: &'s str,
    pos: usize,
    lexed: Lexed,
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

impl Lexer<'_> {
    fn rest(&self) -> &str {
        &self.src[self.pos..]
    }

    fn peek_char(&self, nth: usize) -> Option<char> {
        self.rest().chars().nth(nth)
    }

    /// Advances while `keep` holds and returns where the run ended.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) -> usize {
        let run = self.rest().find(|c| !keep(c)).unwrap_or(self.rest().len());
        self.pos += run;
        self.pos
    }

    fn push(&mut self, kind: TokenKind, start: usize) {
        self.lexed.tokens.push(Token {
            kind,
            span: start..self.pos,
        });
    }

    fn run(&mut self) {
        while let Some(c) = self.peek_char(0) {
            let start = self.pos;
            let next = self.peek_char(1);
            match c {
                _ if c.is_whitespace() => {
                    self.take_while(char::is_whitespace);
                }
                '=' | '!' | '<' | '>' => self.comparison(c, next),
                '&' | '|' => self.c_style_operator(c, next),
                '"' | '\'' => self.string(c),
                _ if c.is_ascii_digit()
                    || (c == '-' && next.is_some_and(|n| n.is_ascii_digit())) =>
                {
                    self.pos += 1;
                    let end = self.take_while(|c| c.is_ascii_digit());
                    // A fraction only when a digit follows the dot: `1.5`, but `1.exists` stays 1 . exists.
                    let mut after_dot = self.src[end..].chars();
                    if after_dot.next() == Some('.')
                        && after_dot.next().is_some_and(|d| d.is_ascii_digit())
                    {
                        self.pos += 1;
                        self.take_while(|c| c.is_ascii_digit());
                    }
                    self.take_while(is_ident_char);
                    self.push(
                        TokenKind::Numeric(self.src[start..self.pos].to_string()),
                        start,
                    );
                }
                '(' | ')' | '[' | ']' | '.' | ',' | '+' | '-' => {
                    self.pos += 1;
                    let kind = match c {
                        '(' => TokenKind::LParen,
                        ')' => TokenKind::RParen,
                        '[' => TokenKind::LBracket,
                        ']' => TokenKind::RBracket,
                        '.' => TokenKind::Dot,
                        ',' => TokenKind::Comma,
                        '+' => TokenKind::Plus,
                        _ => TokenKind::Minus,
                    };
                    self.push(kind, start);
                }
                _ if c.is_ascii_alphabetic() || c == '_' => {
                    self.take_while(is_ident_char);
                    self.push(
                        TokenKind::Ident(self.src[start..self.pos].to_string()),
                        start,
                    );
                }
                _ => {
                    self.pos += c.len_utf8();
                    self.lexed.diags.push(Diagnostic::new(
                        format!("unexpected character `{c}`"),
                        start..self.pos,
                        "not part of the criteria language",
                    ));
                }
            }
        }
        self.lexed.tokens.push(Token {
            kind: TokenKind::Eof,
            span: self.src.len()..self.src.len(),
        });
    }

    /// `==`, `!=`, `<`, `<=`, `>`, `>=`. A lone `=` or `!` is reported and read as the likely
    /// intent (`==`, `!=`) so that parsing can go on.
    fn comparison(&mut self, first: char, second: Option<char>) {
        let start = self.pos;
        if let (true, Some(reversed @ ('<' | '>'))) = (first == '=', second) {
            return self.reversed_comparison(reversed);
        }
        let with_equals = second == Some('=');
        self.pos += if with_equals { 2 } else { 1 };
        let op = match (first, with_equals) {
            ('=', true) => CmpOp::Eq,
            ('!', true) => CmpOp::Ne,
            ('<', false) => CmpOp::Lt,
            ('<', true) => CmpOp::Le,
            ('>', false) => CmpOp::Gt,
            ('>', true) => CmpOp::Ge,
            ('=', false) => {
                self.lexed.diags.push(
                    Diagnostic::new("`=` is not a comparison", start..self.pos, "use `==`")
                        .with_help(
                            "compare for equality with `==`, e.g. `prop(\"plan\") == \"pro\"`",
                        ),
                );
                CmpOp::Eq
            }
            _ => {
                self.lexed.diags.push(
                    Diagnostic::new("unexpected `!`", start..self.pos, "not an operator here")
                        .with_help("write `!=` for inequality or `not` to negate a condition"),
                );
                CmpOp::Ne
            }
        };
        self.push(TokenKind::Cmp(op), start);
    }

    /// `=>` and `=<` are reported and read as `>=` and `<=`.
    fn reversed_comparison(&mut self, second: char) {
        let start = self.pos;
        self.pos += 2;
        let (meant, op) = match second {
            '>' => (">=", CmpOp::Ge),
            _ => ("<=", CmpOp::Le),
        };
        self.lexed.diags.push(Diagnostic::new(
            format!("`={second}` is not a comparison"),
            start..self.pos,
            format!("did you mean `{meant}`?"),
        ));
        self.push(TokenKind::Cmp(op), start);
    }

    /// `&&` and `||` are reported and read as `and` / `or`.
    fn c_style_operator(&mut self, first: char, second: Option<char>) {
        let start = self.pos;
        self.pos += if second == Some(first) { 2 } else { 1 };
        let keyword = if first == '&' { "and" } else { "or" };
        self.lexed.diags.push(Diagnostic::new(
            format!("unexpected `{}`", &self.src[start..self.pos]),
            start..self.pos,
            format!("write `{keyword}`"),
        ));
        self.push(TokenKind::Ident(keyword.to_string()), start);
    }

    /// A double-quoted string on one line. Escapes: `\"`, `\\`, `\n`, `\t`, `\r` and `\u{...}`
    /// (1 to 6 hex digits naming a Unicode scalar value). Single-quoted strings are reported
    /// and read as if double-quoted.
    fn string(&mut self, quote: char) {
        let start = self.pos;
        self.pos += 1;
        if quote == '\'' {
            self.lexed.diags.push(
                Diagnostic::new("strings use double quotes", start..start + 1, "use `\"`")
                    .with_help("write `\"name\"`, not `'name'`"),
            );
        }
        let mut value = String::new();
        loop {
            let Some(c) = self.peek_char(0) else {
                return self.unterminated(start, value);
            };
            match c {
                '\n' => return self.unterminated(start, value),
                _ if c == quote => {
                    self.pos += 1;
                    break;
                }
                '\\' => {
                    if let Some(decoded) = self.escape() {
                        value.push(decoded);
                    }
                }
                _ => {
                    self.pos += c.len_utf8();
                    value.push(c);
                }
            }
        }
        self.push(TokenKind::Str(value), start);
    }

    fn unterminated(&mut self, start: usize, value: String) {
        self.lexed.unterminated_string.get_or_insert(start);
        self.lexed.diags.push(
            Diagnostic::new(
                "unterminated string",
                start..self.pos,
                "this string is never closed",
            )
            .with_help("add a closing `\"` before the end of the line"),
        );
        self.push(TokenKind::Str(value), start);
    }

    /// Decodes the escape at `pos` (which is at the backslash); `None` after reporting a bad one.
    fn escape(&mut self) -> Option<char> {
        let start = self.pos;
        self.pos += 1;
        let Some(letter) = self.peek_char(0).filter(|c| *c != '\n') else {
            return self.bad_escape(start, "a backslash must be followed by an escape letter");
        };
        self.pos += letter.len_utf8();
        match letter {
            '"' => Some('"'),
            '\\' => Some('\\'),
            'n' => Some('\n'),
            't' => Some('\t'),
            'r' => Some('\r'),
            'u' => self.unicode_escape(start),
            _ => self.bad_escape(start, &format!("unknown escape `\\{letter}`")),
        }
    }

    fn unicode_escape(&mut self, start: usize) -> Option<char> {
        if self.peek_char(0) != Some('{') {
            return self.bad_escape(start, "`\\u` must be followed by `{`, e.g. `\\u{e9}`");
        }
        self.pos += 1;
        let digits_start = self.pos;
        let digits_end = self.take_while(|c| c.is_ascii_hexdigit());
        let digits = &self.src[digits_start..digits_end];
        if self.peek_char(0) != Some('}') || digits.is_empty() || digits.len() > 6 {
            return self.bad_escape(start, "expected 1 to 6 hex digits and `}` in `\\u{...}`");
        }
        self.pos += 1;
        let scalar = u32::from_str_radix(digits, 16)
            .ok()
            .and_then(char::from_u32);
        if scalar.is_none() {
            return self.bad_escape(
                start,
                &format!("`\\u{{{digits}}}` is not a Unicode character"),
            );
        }
        scalar
    }

    fn bad_escape(&mut self, start: usize, message: &str) -> Option<char> {
        self.lexed.diags.push(
            Diagnostic::new(message, start..self.pos, "invalid escape")
                .with_help("known escapes are `\\\"`, `\\\\`, `\\n`, `\\t`, `\\r` and `\\u{...}`"),
        );
        None
    }
}
