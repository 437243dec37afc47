//! Bucket files: one TOML file per bucket (see the brief, section 2).
//!
//! The file is parsed into a spanned TOML tree and every key is checked by hand, so that each
//! error points at the exact key or value at fault, and criteria errors point into the file.

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::ast::Expr;
use crate::diag::{Diagnostic, Diagnostics};
use crate::duration::parse_duration;
use crate::parser::{parse_criteria, suggest, tokenize};
use crate::plan::Plan;
use crate::validate::validate;

#[derive(Debug, Clone, PartialEq)]
pub struct BucketDef {
    pub id: String,
    pub description: String,
    /// The bucket file, as given to the loader.
    pub path: PathBuf,
    /// The whole bucket file.
    pub source: String,
    pub body: BucketBody,
    pub enabled: bool,
    pub entry_limit: EntryLimit,
    pub min_dwell_secs: Option<u64>,
    pub max_dwell_secs: Option<u64>,
    /// Ascending by time.
    pub dwell: Vec<DwellMark>,
    pub dwell_every_secs: Option<u64>,
    pub reconcile_joins: ReconcileJoins,
    pub on_change: OnChange,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BucketBody {
    Criteria {
        text: String,
        expr: Expr,
        plan: Plan,
    },
    Plugin {
        /// See [`resolve_plugin_path`].
        path: PathBuf,
        /// The `[config]` table (an empty object when absent).
        config: serde_json::Value,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryLimit {
    Unlimited,
    Once,
    OncePerPeriod { period_secs: u64 },
}

/// A `dwell` transition emitted once a member has been in the bucket for `secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DwellMark {
    /// The duration as written in the file, e.g. `7d`.
    pub label: String,
    pub secs: u64,
}

/// `reconcile_joins`: whether the clock-driven sweep may produce joins (for absence criteria).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconcileJoins {
    /// `"auto"` (the default): the engine decides from the criteria.
    Auto,
    /// `true`
    Always,
    /// `false`
    Never,
}

/// `on_change`: what happens to membership changes caused by editing the criteria.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnChange {
    /// `"silent"` (the default): joins are silent, leaves emit.
    Silent,
    /// `"emit"`: joins and leaves both emit.
    Emit,
}

impl BucketDef {
    /// Hex SHA-256 identifying the definition of membership, to notice when it changes.
    ///
    /// For criteria: of `criteria:` followed by the criteria's tokens joined by single spaces, so
    /// changes to whitespace or line breaks (outside strings) do not count as changes. For
    /// plugins: of `plugin:`, the path, a newline and the config as canonical JSON (keys
    /// sorted); the engine mixes in the module bytes.
    pub fn criteria_hash(&self) -> String {
        let hashed = match &self.body {
            BucketBody::Criteria { text, .. } => format!("criteria:{}", canonical_criteria(text)),
            BucketBody::Plugin { path, config } => {
                let mut json = String::new();
                canonical_json(config, &mut json);
                format!("plugin:{}\n{json}", path.display())
            }
        };
        hex::encode(Sha256::digest(hashed.as_bytes()))
    }

    /// Membership can change with no event arriving: a window or a `now()` comparison in the
    /// criteria. Plugins receive the clock, so they are assumed time-based.
    pub fn time_based(&self) -> bool {
        match &self.body {
            BucketBody::Criteria { plan, .. } => plan.time_based,
            BucketBody::Plugin { .. } => true,
        }
    }
}

fn canonical_criteria(text: &str) -> String {
    let tokens = tokenize(text).tokens;
    let pieces: Vec<&str> = tokens
        .iter()
        .map(|token| &text[token.span.clone()])
        .collect();
    pieces.join(" ").trim_end().to_string()
}

/// JSON with object keys sorted, whatever map type serde_json was built with.
fn canonical_json(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by_key(|(key, _)| *key);
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                canonical_json(item, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Where a bucket's `plugin` path points. Absolute paths are used as they are. Paths starting
/// with `plugins/` are relative to the project root, taken to be the parent of the directory
/// holding the bucket file (`<root>/buckets/x.toml` → `<root>/plugins/...`). Any other relative
/// path is relative to the bucket file's directory.
pub fn resolve_plugin_path(bucket_path: &Path, plugin: &str) -> PathBuf {
    let plugin = Path::new(plugin);
    let bucket_dir = bucket_path.parent().unwrap_or(Path::new(""));
    if plugin.is_absolute() {
        plugin.to_path_buf()
    } else if plugin.starts_with("plugins") {
        match bucket_dir.parent() {
            Some(root) => root.join(plugin),
            None => bucket_dir.join("..").join(plugin),
        }
    } else {
        bucket_dir.join(plugin)
    }
}

const KEYS: &[&str] = &[
    "id",
    "description",
    "criteria",
    "plugin",
    "config",
    "enabled",
    "entry_limit",
    "entry_period",
    "min_dwell",
    "max_dwell",
    "dwell",
    "dwell_every",
    "reconcile_joins",
    "on_change",
];

const ID_RULE: &str =
    "an id is 1 to 63 characters of a-z, 0-9, `_` and `-`, starting with a letter or digit";

fn is_valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && id.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Parses the bucket file at `path` whose contents are `text`.
pub fn parse_bucket(path: &Path, text: &str) -> Result<BucketDef, Diagnostics> {
    parse_with_id_span(path, text).map(|(def, _)| def)
}

/// Reads and parses one bucket file; an unreadable file is reported like any other error.
pub fn load_bucket(path: &Path) -> Result<BucketDef, Diagnostics> {
    load_with_id_span(path).map(|(def, _)| def)
}

/// The result of loading a directory of bucket files.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckReport {
    pub buckets: Vec<BucketDef>,
    /// One entry per file with errors.
    pub errors: Vec<Diagnostics>,
}

/// Loads every `*.toml` file in `dir` (sorted by name). A file whose id is already taken by an
/// earlier file is reported (at its own id) and left out.
pub fn load_dir(dir: &Path) -> CheckReport {
    let mut report = CheckReport {
        buckets: Vec::new(),
        errors: Vec::new(),
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            report
                .errors
                .push(unreadable(dir, "bucket directory", &err));
            return report;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml") && path.is_file())
        .collect();
    paths.sort();
    for path in paths {
        match load_with_id_span(&path) {
            Err(diags) => report.errors.push(diags),
            Ok((def, id_span)) => match report.buckets.iter().find(|known| known.id == def.id) {
                Some(first) => {
                    let diag = Diagnostic::new(
                        format!(
                            "bucket id `{}` is already used by `{}`",
                            def.id,
                            first.path.display()
                        ),
                        id_span,
                        "duplicate id",
                    )
                    .with_help(
                        "bucket ids must be unique: rename one file or set a different `id`",
                    );
                    report
                        .errors
                        .push(file_diagnostics(&def.path, &def.source, vec![diag]));
                }
                None => report.buckets.push(def),
            },
        }
    }
    report
}

fn load_with_id_span(path: &Path) -> Result<(BucketDef, Range<usize>), Diagnostics> {
    let text = fs::read_to_string(path).map_err(|err| unreadable(path, "bucket file", &err))?;
    parse_with_id_span(path, &text)
}

fn unreadable(path: &Path, what: &str, err: &std::io::Error) -> Diagnostics {
    let diag = Diagnostic::new(format!("cannot read {what}: {err}"), 0..0, "");
    file_diagnostics(path, "", vec![diag])
}

fn file_diagnostics(path: &Path, source: &str, mut items: Vec<Diagnostic>) -> Diagnostics {
    items.sort_by_key(|d| (d.span.start, d.span.end));
    Diagnostics {
        path: path.display().to_string(),
        source: source.to_string(),
        items,
    }
}

/// Parses a bucket file; also returns the span of the `id` value (empty at the start of the
/// file when the id comes from the file name) for duplicate-id errors.
fn parse_with_id_span(path: &Path, text: &str) -> Result<(BucketDef, Range<usize>), Diagnostics> {
    let table = DeTable::parse(text).map_err(|err| {
        let span = err.span().unwrap_or(0..0);
        let message = format!("invalid TOML: {}", err.message().trim_end());
        file_diagnostics(
            path,
            text,
            vec![Diagnostic::new(message, span, "invalid TOML here")],
        )
    })?;
    let mut reader = Reader {
        table: table.get_ref(),
        source: text,
        diags: Vec::new(),
    };
    let parsed = reader.bucket(path);
    match parsed {
        Some(parsed) if reader.diags.is_empty() => Ok(parsed),
        _ => Err(file_diagnostics(path, text, reader.diags)),
    }
}

type Entry<'t, 'i> = (
    &'t Spanned<std::borrow::Cow<'i, str>>,
    &'t Spanned<DeValue<'i>>,
);

/// Reads the keys of one bucket table, collecting every problem in `diags`. Readers return
/// `None` for an absent or broken value; only the absence is then the caller's business.
struct Reader<'t, 'i> {
    table: &'t DeTable<'i>,
    source: &'t str,
    diags: Vec<Diagnostic>,
}

impl<'t, 'i> Reader<'t, 'i> {
    fn entry(&self, key: &str) -> Option<Entry<'t, 'i>> {
        self.table.iter().find(|(name, _)| name.get_ref() == key)
    }

    fn value(&self, key: &str) -> Option<&'t Spanned<DeValue<'i>>> {
        self.entry(key).map(|(_, value)| value)
    }

    fn report(&mut self, diag: Diagnostic) {
        self.diags.push(diag);
    }

    fn wrong_type(&mut self, key: &str, expected: &str, value: &Spanned<DeValue<'_>>) {
        self.report(Diagnostic::new(
            format!(
                "`{key}` must be {expected}, found {}",
                value.get_ref().type_str()
            ),
            value.span(),
            format!("expected {expected}"),
        ));
    }

    fn string(&mut self, key: &str) -> Option<(&'t str, Range<usize>)> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::String(text) => Some((text.as_ref(), value.span())),
            _ => {
                self.wrong_type(key, "a string", value);
                None
            }
        }
    }

    fn bool(&mut self, key: &str) -> Option<bool> {
        let value = self.value(key)?;
        match value.get_ref() {
            DeValue::Boolean(flag) => Some(*flag),
            _ => {
                self.wrong_type(key, "`true` or `false`", value);
                None
            }
        }
    }

    fn duration_value(&mut self, text: &str, span: Range<usize>) -> Option<u64> {
        parse_duration(text)
            .map_err(|err| self.report(Diagnostic::new(err.to_string(), span, "invalid duration")))
            .ok()
    }

    fn duration(&mut self, key: &str) -> Option<(u64, Range<usize>)> {
        let (text, span) = self.string(key)?;
        Some((self.duration_value(text, span.clone())?, span))
    }

    /// A string that must be one of `options`.
    fn choice(
        &mut self,
        key: &str,
        options: &[&'static str],
    ) -> Option<(&'static str, Range<usize>)> {
        let (text, span) = self.string(key)?;
        if let Some(option) = options.iter().find(|option| **option == text) {
            return Some((*option, span));
        }
        let listed: Vec<String> = options.iter().map(|o| format!("`\"{o}\"`")).collect();
        let mut diag = Diagnostic::new(
            format!(
                "`{key}` must be one of {}, found `\"{text}\"`",
                listed.join(", ")
            ),
            span,
            "unknown option",
        );
        if let Some(suggestion) = suggest(text, options) {
            diag = diag.with_help(format!("did you mean `\"{suggestion}\"`?"));
        }
        self.report(diag);
        None
    }

    fn unknown_keys(&mut self) {
        for (key, _) in self.table.iter() {
            let name = key.get_ref().as_ref();
            if KEYS.contains(&name) {
                continue;
            }
            let help = match suggest(name, KEYS) {
                Some(suggestion) => format!("did you mean `{suggestion}`?"),
                None => format!("known keys are {}", KEYS.join(", ")),
            };
            self.report(
                Diagnostic::new(format!("unknown key `{name}`"), key.span(), "unknown key")
                    .with_help(help),
            );
        }
    }

    fn bucket(&mut self, path: &Path) -> Option<(BucketDef, Range<usize>)> {
        self.unknown_keys();
        let id = self.id(path);
        let description = self
            .string("description")
            .map_or("", |(text, _)| text)
            .to_string();
        let body = self.body(path);
        let enabled = self.bool("enabled").unwrap_or(true);
        let entry_limit = self.entry_limit();
        let min_dwell = self.duration("min_dwell");
        let max_dwell = self.duration("max_dwell");
        if let (Some((min, _)), Some((max, max_span))) = (&min_dwell, &max_dwell) {
            if max < min {
                self.report(Diagnostic::new(
                    "`max_dwell` is shorter than `min_dwell`",
                    max_span.clone(),
                    "must be at least `min_dwell`",
                ));
            }
        }
        let dwell = self.dwell_marks();
        let dwell_every = self.duration("dwell_every");
        let reconcile_joins = self.reconcile_joins();
        let on_change = match self.choice("on_change", &["silent", "emit"]) {
            Some(("emit", _)) => OnChange::Emit,
            _ => OnChange::Silent,
        };
        let ((id, id_span), body) = (id?, body?);
        let def = BucketDef {
            id,
            description,
            path: path.to_path_buf(),
            source: self.source.to_string(),
            body,
            enabled,
            entry_limit,
            min_dwell_secs: min_dwell.map(|(secs, _)| secs),
            max_dwell_secs: max_dwell.map(|(secs, _)| secs),
            dwell,
            dwell_every_secs: dwell_every.map(|(secs, _)| secs),
            reconcile_joins,
            on_change,
        };
        Some((def, id_span))
    }

    /// The `id` key, or else the file stem.
    fn id(&mut self, path: &Path) -> Option<(String, Range<usize>)> {
        if let Some(value) = self.value("id") {
            let (id, span) = self.string("id")?;
            if !is_valid_id(id) {
                self.report(
                    Diagnostic::new(
                        format!("`{id}` is not a valid bucket id"),
                        value.span(),
                        "invalid id",
                    )
                    .with_help(ID_RULE),
                );
                return None;
            }
            return Some((id.to_string(), span));
        }
        let stem = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !is_valid_id(&stem) {
            self.report(
                Diagnostic::new(
                    format!("the file name `{stem}` is not a valid bucket id"),
                    0..0,
                    "no `id` key, so the id comes from the file name",
                )
                .with_help(format!("{ID_RULE}; rename the file or set `id = \"...\"`")),
            );
            return None;
        }
        Some((stem, 0..0))
    }

    fn body(&mut self, path: &Path) -> Option<BucketBody> {
        let criteria = self.entry("criteria");
        let plugin = self.entry("plugin");
        match (criteria, plugin) {
            (Some((first, _)), Some((second, _))) => {
                let later = if first.span().start > second.span().start {
                    first
                } else {
                    second
                };
                self.report(
                    Diagnostic::new(
                        "a bucket has either `criteria` or `plugin`, not both",
                        later.span(),
                        "second definition of membership",
                    )
                    .with_help(
                        "keep `criteria` for rules written here, or `plugin` for a WASM module",
                    ),
                );
                None
            }
            (None, None) => {
                self.report(
                    Diagnostic::new(
                        "a bucket needs `criteria` or `plugin`",
                        0..0,
                        "neither is set",
                    )
                    .with_help("add e.g. `criteria = '''event(\"signup\").exists()'''`"),
                );
                None
            }
            (Some(_), None) => {
                if let Some((config, _)) = self.entry("config") {
                    self.report(Diagnostic::new(
                        "`config` applies only to plugin buckets",
                        config.span(),
                        "not used by criteria",
                    ));
                }
                self.criteria()
            }
            (None, Some(_)) => self.plugin(path),
        }
    }

    fn criteria(&mut self) -> Option<BucketBody> {
        let (text, span) = self.string("criteria")?;
        let positions = StringPositions::new(self.source, span);
        let to_file = |diags: Vec<Diagnostic>| {
            diags.into_iter().map(|mut diag| {
                diag.span = positions.to_file(diag.span.start)..positions.to_file(diag.span.end);
                diag
            })
        };
        let expr = match parse_criteria(text) {
            Ok(expr) => expr,
            Err(diags) => {
                self.diags.extend(to_file(diags));
                return None;
            }
        };
        let plan = match validate(&expr) {
            Ok(plan) => plan,
            Err(problems) => {
                self.diags.extend(to_file(problems));
                return None;
            }
        };
        Some(BucketBody::Criteria {
            text: text.to_string(),
            expr,
            plan,
        })
    }

    fn plugin(&mut self, path: &Path) -> Option<BucketBody> {
        let (plugin, _) = self.string("plugin")?;
        let config = match self.value("config") {
            None => serde_json::Value::Object(serde_json::Map::new()),
            Some(value) if value.get_ref().is_table() => self.json(value)?,
            Some(value) => {
                self.wrong_type("config", "a table", value);
                return None;
            }
        };
        Some(BucketBody::Plugin {
            path: resolve_plugin_path(path, plugin),
            config,
        })
    }

    /// A TOML value as JSON for the plugin: datetimes become strings.
    fn json(&mut self, value: &Spanned<DeValue<'_>>) -> Option<serde_json::Value> {
        use serde_json::Value;
        let converted = match value.get_ref() {
            DeValue::String(text) => Value::String(text.to_string()),
            DeValue::Boolean(flag) => Value::Bool(*flag),
            DeValue::Datetime(datetime) => Value::String(datetime.to_string()),
            DeValue::Integer(integer) => {
                match i64::from_str_radix(integer.as_str(), integer.radix()) {
                    Ok(number) => Value::from(number),
                    Err(_) => return self.bad_config_value(value, "integers must fit in 64 bits"),
                }
            }
            DeValue::Float(float) => {
                match float
                    .as_str()
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                {
                    Some(number) => Value::Number(number),
                    None => return self.bad_config_value(value, "numbers must be finite"),
                }
            }
            DeValue::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.json(item))
                    .collect::<Option<_>>()?,
            ),
            DeValue::Table(table) => Value::Object(
                table
                    .iter()
                    .map(|(key, item)| Some((key.get_ref().to_string(), self.json(item)?)))
                    .collect::<Option<_>>()?,
            ),
        };
        Some(converted)
    }

    fn bad_config_value(
        &mut self,
        value: &Spanned<DeValue<'_>>,
        rule: &str,
    ) -> Option<serde_json::Value> {
        self.report(Diagnostic::new(
            format!("this `config` value cannot be passed to the plugin: {rule}"),
            value.span(),
            "not representable as JSON",
        ));
        None
    }

    fn entry_limit(&mut self) -> EntryLimit {
        let limit = self.choice("entry_limit", &["unlimited", "once", "once_per_period"]);
        let period = self.duration("entry_period");
        match (limit, period) {
            (Some(("once_per_period", _)), Some((period_secs, _))) => {
                EntryLimit::OncePerPeriod { period_secs }
            }
            (Some(("once_per_period", span)), None) => {
                if self.value("entry_period").is_none() {
                    self.report(
                        Diagnostic::new(
                            "`entry_limit = \"once_per_period\"` needs `entry_period`",
                            span,
                            "no period given",
                        )
                        .with_help("add e.g. `entry_period = \"30d\"`"),
                    );
                }
                EntryLimit::Unlimited
            }
            (limit, _) => {
                if let Some((key, _)) = self.entry("entry_period") {
                    self.report(
                        Diagnostic::new(
                            "`entry_period` applies only with `entry_limit = \"once_per_period\"`",
                            key.span(),
                            "no effect",
                        )
                        .with_help(
                            "set `entry_limit = \"once_per_period\"` or remove `entry_period`",
                        ),
                    );
                }
                match limit {
                    Some(("once", _)) => EntryLimit::Once,
                    _ => EntryLimit::Unlimited,
                }
            }
        }
    }

    fn dwell_marks(&mut self) -> Vec<DwellMark> {
        let Some(value) = self.value("dwell") else {
            return Vec::new();
        };
        let DeValue::Array(items) = value.get_ref() else {
            self.wrong_type(
                "dwell",
                "an array of durations such as `[\"1d\", \"7d\"]`",
                value,
            );
            return Vec::new();
        };
        let mut marks: Vec<DwellMark> = Vec::new();
        for item in items.iter() {
            let DeValue::String(label) = item.get_ref() else {
                self.wrong_type("dwell", "an array of duration strings", item);
                continue;
            };
            let Some(secs) = self.duration_value(label, item.span()) else {
                continue;
            };
            if marks.iter().any(|mark| mark.secs == secs) {
                self.report(Diagnostic::new(
                    format!("`{label}` is listed twice in `dwell`"),
                    item.span(),
                    "duplicate dwell time",
                ));
                continue;
            }
            marks.push(DwellMark {
                label: label.to_string(),
                secs,
            });
        }
        marks.sort_by_key(|mark| mark.secs);
        marks
    }

    fn reconcile_joins(&mut self) -> ReconcileJoins {
        let Some(value) = self.value("reconcile_joins") else {
            return ReconcileJoins::Auto;
        };
        match value.get_ref() {
            DeValue::Boolean(true) => ReconcileJoins::Always,
            DeValue::Boolean(false) => ReconcileJoins::Never,
            DeValue::String(text) if text == "auto" => ReconcileJoins::Auto,
            _ => {
                self.wrong_type("reconcile_joins", "`\"auto\"`, `true` or `false`", value);
                ReconcileJoins::Auto
            }
        }
    }
}

/// Maps byte offsets in a decoded TOML string back to offsets in the file, so that criteria
/// errors point into the bucket file. Exact for literal strings (`'...'`, `'''...'''`) and for
/// basic strings with the usual escapes; line-ending backslashes in `"""` strings map to the
/// start of the next text.
struct StringPositions {
    /// File offset of each byte of the decoded string, plus one past the end.
    file_offsets: Vec<usize>,
}

impl StringPositions {
    /// `span` is the span of the whole string value, quotes included.
    fn new(source: &str, span: Range<usize>) -> Self {
        let raw = source.get(span.clone()).unwrap_or("");
        let (quote_len, basic) = match raw {
            _ if raw.starts_with("'''") => (3, false),
            _ if raw.starts_with("\"\"\"") => (3, true),
            _ => (1, raw.starts_with('"')),
        };
        let mut content = raw
            .get(quote_len..raw.len().saturating_sub(quote_len))
            .unwrap_or("");
        let mut offset = span.start + quote_len;
        // TOML drops a newline right after the opening delimiter of a multi-line string.
        if quote_len == 3 {
            for newline in ["\r\n", "\n"] {
                if let Some(rest) = content.strip_prefix(newline) {
                    content = rest;
                    offset += newline.len();
                    break;
                }
            }
        }
        let mut file_offsets = Vec::with_capacity(content.len() + 1);
        let mut chars = content.char_indices().peekable();
        while let Some((index, c)) = chars.next() {
            let at = offset + index;
            if !(basic && c == '\\') {
                file_offsets.extend(std::iter::repeat_n(at, c.len_utf8()));
                continue;
            }
            let Some((_, letter)) = chars.next() else {
                break;
            };
            let (hex_digits, decoded_len) = match letter {
                'u' => (4, None),
                'U' => (8, None),
                'x' => (2, None),
                _ if letter.is_whitespace() => {
                    // A line-ending backslash: the backslash and all following whitespace vanish.
                    while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
                    continue;
                }
                _ => (0, Some(1)),
            };
            let digits: String = (0..hex_digits)
                .filter_map(|_| chars.next().map(|(_, c)| c))
                .collect();
            let decoded_len = decoded_len.unwrap_or_else(|| {
                u32::from_str_radix(&digits, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .map_or(1, char::len_utf8)
            });
            file_offsets.extend(std::iter::repeat_n(at, decoded_len));
        }
        file_offsets.push(offset + content.len());
        StringPositions { file_offsets }
    }

    fn to_file(&self, decoded_offset: usize) -> usize {
        let last = self.file_offsets.len() - 1;
        self.file_offsets[decoded_offset.min(last)]
    }
}
