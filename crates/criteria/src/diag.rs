//! Diagnostics: what went wrong, where, and what would be right.
//!
//! A [`Diagnostic`] carries a byte span relative to whatever text its producer saw (the criteria
//! parser sees only the criteria string). [`Diagnostics`] ties a list of them to a whole file and
//! renders them rustc-style (`error: ...`, `--> path:line:col`, the line, a caret, `= help: ...`).

use std::fmt;
use std::ops::Range;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor::NoColor};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub message: String,
    /// Byte offsets into the text the producer had.
    pub span: Range<usize>,
    /// Short text shown under the caret.
    pub label: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>, span: Range<usize>, label: impl Into<String>) -> Self {
        Diagnostic {
            message: message.into(),
            span,
            label: label.into(),
            help: None,
        }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Diagnostics for one file; every span is relative to `source`, the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    pub path: String,
    pub source: String,
    pub items: Vec<Diagnostic>,
}

/// A 1-based line and column (in chars) of a byte offset.
struct LineColumn {
    line: usize,
    column: usize,
}

impl Diagnostics {
    /// Renders every diagnostic without colour, rustc-style with ASCII borders, separated by
    /// blank lines.
    pub fn render(&self) -> String {
        let file = SimpleFile::new(self.path.as_str(), self.source.as_str());
        let config = term::Config {
            chars: term::Chars::ascii(),
            ..term::Config::default()
        };
        let mut out = NoColor::new(Vec::<u8>::new());
        for item in &self.items {
            let mut label = cs::Label::primary((), self.clamp(&item.span));
            if !item.label.is_empty() {
                label = label.with_message(&item.label);
            }
            let rendered = cs::Diagnostic::error()
                .with_message(&item.message)
                .with_labels(vec![label])
                .with_notes(item.help.iter().map(|h| format!("help: {h}")).collect());
            if term::emit(&mut out, &config, &file, &rendered).is_err() {
                // Spans are clamped to the source, so this only guards against a codespan bug;
                // still say what went wrong rather than nothing.
                return self
                    .items
                    .iter()
                    .map(|i| format!("error: {}\n", i.message))
                    .collect();
            }
        }
        String::from_utf8_lossy(&out.into_inner()).into_owned()
    }

    /// The diagnostics as a JSON array of
    /// `{file, line, column, end_line, end_column, message, label, help}`: 1-based, columns
    /// counted in chars, the end just past the span.
    pub fn to_json(&self) -> serde_json::Value {
        let items = self.items.iter().map(|item| {
            let span = self.clamp(&item.span);
            let start = self.line_column(span.start);
            let end = self.line_column(span.end);
            serde_json::json!({
                "file": self.path,
                "line": start.line,
                "column": start.column,
                "end_line": end.line,
                "end_column": end.column,
                "message": item.message,
                "label": item.label,
                "help": item.help,
            })
        });
        serde_json::Value::Array(items.collect())
    }

    /// Keeps a span inside the source and on char boundaries, so that rendering cannot fail.
    fn clamp(&self, span: &Range<usize>) -> Range<usize> {
        let boundary = |mut offset: usize| {
            offset = offset.min(self.source.len());
            while !self.source.is_char_boundary(offset) {
                offset -= 1;
            }
            offset
        };
        let start = boundary(span.start);
        start..boundary(span.end).max(start)
    }

    fn line_column(&self, offset: usize) -> LineColumn {
        let before = &self.source[..offset];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        LineColumn {
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Diagnostics {}
