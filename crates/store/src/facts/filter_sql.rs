//! Translation of event filters (`.where(...)`) to SQL over `events.properties`, with exactly the
//! meaning `membrane_criteria::eval::filter_holds` gives them.
//!
//! Every expression built here is total: it is `true` or `false`, never SQL `NULL`, so that
//! `NOT` of a translated filter is its exact negation. Keys and literals always travel as bind
//! parameters; the SQL text only ever holds fixed fragments and `$n` placeholders.

use chrono::{DateTime, Utc};
use membrane_abi::{CmpOp, EventFilter, Literal, PropertyTest};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::QueryAs;
use sqlx::Postgres;

/// One bind parameter of a statement being built.
#[derive(Debug, Clone, PartialEq)]
enum Param {
    Text(String),
    TextArray(Vec<String>),
    BigInt(i64),
    Float(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
}

/// A SQL statement under construction together with its bind parameters, numbered from `$1`.
#[derive(Debug, Default)]
pub(super) struct Statement {
    sql: String,
    params: Vec<Param>,
}

impl Statement {
    /// Appends a fixed SQL fragment (never data).
    pub(super) fn push(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }

    pub(super) fn bind_text(&mut self, value: &str) -> String {
        self.bind(Param::Text(value.to_owned()))
    }

    pub(super) fn bind_text_array(&mut self, values: Vec<String>) -> String {
        self.bind(Param::TextArray(values))
    }

    pub(super) fn bind_int8(&mut self, value: i64) -> String {
        self.bind(Param::BigInt(value))
    }

    pub(super) fn bind_timestamp(&mut self, value: DateTime<Utc>) -> String {
        self.bind(Param::Timestamp(value))
    }

    /// Adds a parameter and returns its typed placeholder, e.g. `$3::text`.
    fn bind(&mut self, param: Param) -> String {
        let sql_type = match &param {
            Param::Text(_) => "text",
            Param::TextArray(_) => "text[]",
            Param::BigInt(_) => "int8",
            Param::Float(_) => "float8",
            Param::Bool(_) => "boolean",
            Param::Timestamp(_) => "timestamptz",
        };
        self.params.push(param);
        format!("${}::{sql_type}", self.params.len())
    }

    /// The statement as a sqlx query returning rows of type `Row`, planned afresh at each
    /// execution (unnamed): a connection's cached generic plan is only replaced when the
    /// table's statistics change, which without autovacuum is never, and one made while
    /// `events` was small stayed a seq scan as it grew (2.5 ms mean and 146 ms the slowest,
    /// against 0.2 ms by index).
    pub(super) fn query_as<Row>(&self) -> QueryAs<'_, Postgres, Row, PgArguments>
    where
        Row: for<'r> sqlx::FromRow<'r, PgRow>,
    {
        self.params
            .iter()
            .fold(sqlx::query_as(&self.sql), |query, param| match param {
                Param::Text(value) => query.bind(value),
                Param::TextArray(values) => query.bind(values),
                Param::BigInt(value) => query.bind(value),
                Param::Float(value) => query.bind(value),
                Param::Bool(value) => query.bind(value),
                Param::Timestamp(value) => query.bind(value),
            })
            .persistent(false)
    }

    /// A boolean SQL expression that holds for an event (its properties at `properties`, a
    /// jsonb expression) exactly when `filter_holds(filter, properties)` does.
    pub(super) fn event_filter(&mut self, filter: &EventFilter, properties: &str) -> String {
        match filter {
            EventFilter::All { of } => self.connective(of, properties, " AND ", "true"),
            EventFilter::Any { of } => self.connective(of, properties, " OR ", "false"),
            EventFilter::Not { filter } => {
                format!("(NOT {})", self.event_filter(filter, properties))
            }
            EventFilter::Test { key, test } => {
                let mut property = Property {
                    properties,
                    key,
                    expression: None,
                };
                self.property_test(&mut property, test)
            }
        }
    }

    /// `of` joined by `operator`; `empty` (the operator's identity) when there is nothing to join.
    fn connective(
        &mut self,
        of: &[EventFilter],
        properties: &str,
        operator: &str,
        empty: &str,
    ) -> String {
        if of.is_empty() {
            return empty.to_owned();
        }
        let parts: Vec<String> = of
            .iter()
            .map(|filter| self.event_filter(filter, properties))
            .collect();
        format!("({})", parts.join(operator))
    }

    fn property_test(&mut self, property: &mut Property<'_>, test: &PropertyTest) -> String {
        match test {
            PropertyTest::Compare {
                cmp,
                value: literal,
            } => self.compare(property, *cmp, literal),
            PropertyTest::Exists => exists(&property.sql(self)),
            PropertyTest::NotExists => format!("(NOT {})", exists(&property.sql(self))),
            PropertyTest::Contains { value: needle } => {
                let value = property.sql(self);
                let needle = self.bind_text(needle);
                // strpos finds the empty needle at 1, as the oracle wants; with a deterministic
                // collation it matches bytes, and a UTF-8 needle can only match at character
                // boundaries, so this is the oracle's byte substring test. For arrays,
                // containment of a one-string array holds exactly when some element is that
                // very string (nested arrays and objects never match a scalar).
                format!(
                    "(CASE jsonb_typeof({value}) \
                     WHEN 'string' THEN strpos({}, {needle}) > 0 \
                     WHEN 'array' THEN {value} @> jsonb_build_array({needle}) \
                     ELSE false END)",
                    string_text(&value)
                )
            }
            PropertyTest::StartsWith { value: prefix } => {
                let value = property.sql(self);
                let prefix = self.bind_text(prefix);
                // starts_with compares bytes (unlike LIKE, it has no metacharacters).
                of_type(
                    &value,
                    "string",
                    &format!("starts_with({}, {prefix})", string_text(&value)),
                )
            }
            PropertyTest::In { values } => {
                if values.is_empty() {
                    return "false".to_owned();
                }
                let parts: Vec<String> = values
                    .iter()
                    .map(|literal| self.compare(property, CmpOp::Eq, literal))
                    .collect();
                format!("({})", parts.join(" OR "))
            }
        }
    }

    /// The oracle's `compare_property`: a missing key or another type is false, except for
    /// `!=`, which is the negation of `==` in every case.
    fn compare(&mut self, property: &mut Property<'_>, cmp: CmpOp, literal: &Literal) -> String {
        if cmp == CmpOp::Ne {
            return format!("(NOT {})", self.compare(property, CmpOp::Eq, literal));
        }
        let operator = sql_operator(cmp);
        match literal {
            // Rust orders nothing against NaN while Postgres puts NaN above every number.
            Literal::Num(number) if number.is_nan() => "false".to_owned(),
            Literal::Num(number) => {
                let value = property.sql(self);
                let number = self.bind(Param::Float(*number));
                // A JSON number as float8 is its nearest double, the f64 the ABI carries.
                of_type(
                    &value,
                    "number",
                    &format!("({value})::float8 {operator} {number}"),
                )
            }
            Literal::Str(text) => {
                let value = property.sql(self);
                let text = self.bind_text(text);
                // The "C" collation compares UTF-8 bytes, as Rust orders strings.
                of_type(
                    &value,
                    "string",
                    &format!("{} COLLATE \"C\" {operator} {text}", string_text(&value)),
                )
            }
            Literal::Bool(flag) if cmp == CmpOp::Eq => {
                let value = property.sql(self);
                let flag = self.bind(Param::Bool(*flag));
                of_type(&value, "boolean", &format!("({value})::boolean = {flag}"))
            }
            Literal::Null if cmp == CmpOp::Eq => {
                format!(
                    "coalesce(jsonb_typeof({}) = 'null', false)",
                    property.sql(self)
                )
            }
            // Booleans and null have no order.
            Literal::Bool(_) | Literal::Null => "false".to_owned(),
        }
    }
}

/// The value a [`PropertyTest`] reads: a jsonb expression that is SQL `NULL` when the key is
/// missing. The key becomes a parameter only once the SQL mentions it, because a statement
/// must use every parameter it binds (tests like `b < true` are constant and read nothing).
struct Property<'a> {
    properties: &'a str,
    key: &'a str,
    expression: Option<String>,
}

impl Property<'_> {
    fn sql(&mut self, statement: &mut Statement) -> String {
        if let Some(expression) = &self.expression {
            return expression.clone();
        }
        let expression = format!("({} -> {})", self.properties, statement.bind_text(self.key));
        self.expression = Some(expression.clone());
        expression
    }
}

/// `condition` when `value` is a JSON value of `json_type`, else false. CASE (unlike AND)
/// guarantees the cast inside `condition` only runs on values of the right type.
fn of_type(value: &str, json_type: &str, condition: &str) -> String {
    format!("(CASE WHEN jsonb_typeof({value}) = '{json_type}' THEN {condition} ELSE false END)")
}

/// Present and not JSON null.
fn exists(value: &str) -> String {
    format!("coalesce(jsonb_typeof({value}) <> 'null', false)")
}

/// The text of a JSON string value (unquoted and unescaped).
fn string_text(value: &str) -> String {
    format!("({value} #>> '{{}}')")
}

fn sql_operator(cmp: CmpOp) -> &'static str {
    match cmp {
        CmpOp::Eq => "=",
        CmpOp::Ne => "<>",
        CmpOp::Lt => "<",
        CmpOp::Le => "<=",
        CmpOp::Gt => ">",
        CmpOp::Ge => ">=",
    }
}
