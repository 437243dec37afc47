//! Set-based fact gathering: the facts a predicate declares, for a whole batch of users, in two
//! statements whatever the batch size. `membrane_criteria::eval::gather_from_raw` is the oracle.

mod filter_sql;
mod timed;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use membrane_abi::{EventFilter, Fact, FactBatch, Slot, SlotValue};
use serde_json::Value;

use crate::round::Round;
use crate::Result;
use filter_sql::Statement;

/// Unix milliseconds of Postgres's earliest timestamptz (4714-11-24 00:00:00 UTC BC). No event
/// is older, so a window reaching further back is all of history.
const EARLIEST_POSTGRES_TIME_MS: i64 = -210_866_803_200_000;

/// An event-count fact to gather: its position in the fact list and its definition.
struct CountFact<'a> {
    index: usize,
    event: &'a str,
    /// The window's start; `None` = all of history.
    since: Option<DateTime<Utc>>,
    filter: Option<&'a EventFilter>,
}

impl Round {
    /// Returns one row per user (in `users` order), one value per fact (in `facts` order),
    /// written straight into the slot layout the predicate ABI hands to guests.
    pub async fn gather_facts(
        &mut self,
        users: &[String],
        facts: &[Fact],
        now: DateTime<Utc>,
    ) -> Result<FactBatch> {
        // The oracle works in whole milliseconds; truncating `now` the same way makes window
        // edges agree for events at any precision.
        let now_ms = now.timestamp_millis();
        // Users without events or a contact row keep these values.
        let blank: Vec<Slot> = facts.iter().map(Fact::blank_slot).collect();
        let mut batch = FactBatch::new(users.len(), &blank);
        if users.is_empty() {
            return Ok(batch);
        }
        let position: HashMap<&str, usize> = users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.as_str(), i))
            .collect();

        let count_facts: Vec<CountFact> = facts
            .iter()
            .enumerate()
            .filter_map(|(index, fact)| match fact {
                Fact::EventCount {
                    event,
                    within_secs,
                    filter,
                } => Some(CountFact {
                    index,
                    event,
                    since: within_secs.and_then(|secs| window_start(now_ms, secs)),
                    filter: filter.as_ref(),
                }),
                Fact::Property { .. } | Fact::PropertyTime { .. } => None,
            })
            .collect();
        if !count_facts.is_empty() {
            let statement = count_statement(users, &count_facts);
            let counts: Vec<(String, Vec<i64>)> =
                statement.query_as().fetch_all(&mut *self.tx).await?;
            for (user, per_fact) in counts {
                if let Some(&row) = position.get(user.as_str()) {
                    for (fact, count) in count_facts.iter().zip(per_fact) {
                        batch.set(row, fact.index, SlotValue::Count(count));
                    }
                }
            }
        }

        let property_facts: Vec<(usize, &str)> = facts
            .iter()
            .enumerate()
            .filter_map(|(index, fact)| match fact {
                Fact::Property { key } | Fact::PropertyTime { key } => Some((index, key.as_str())),
                Fact::EventCount { .. } => None,
            })
            .collect();
        if !property_facts.is_empty() {
            let keys: Vec<&str> = property_facts.iter().map(|&(_, key)| key).collect();
            let values: Vec<PropertyRow> = sqlx::query_as(PROPERTIES_SQL)
                .bind(users)
                .bind(&keys)
                .fetch_all(&mut *self.tx)
                .await?;
            for (user, ordinal, value, number, element_numbers) in values {
                let Some(&row) = position.get(user.as_str()) else {
                    continue;
                };
                let Some(&(index, _)) = usize::try_from(ordinal - 1)
                    .ok()
                    .and_then(|i| property_facts.get(i))
                else {
                    continue;
                };
                match facts[index] {
                    Fact::PropertyTime { .. } => batch.set(row, index, property_time(&value)),
                    _ => {
                        set_exact_property(&mut batch, row, index, &value, number, element_numbers)
                    }
                }
            }
        }
        Ok(batch)
    }
}

/// `now_ms - within_secs`, or `None` when the window reaches back past every storable instant
/// (including windows too large for the arithmetic).
fn window_start(now_ms: i64, within_secs: u64) -> Option<DateTime<Utc>> {
    let within_ms = i64::try_from(within_secs).ok()?.checked_mul(1000)?;
    let since_ms = now_ms.checked_sub(within_ms)?;
    if since_ms < EARLIEST_POSTGRES_TIME_MS {
        return None;
    }
    DateTime::from_timestamp_millis(since_ms)
}

/// One present contact property: user, 1-based position in the requested keys, its JSON value,
/// and its numbers as read by Postgres (the value itself when a number; each element of an
/// array, `None` for non-numbers).
type PropertyRow = (String, i64, Value, Option<f64>, Option<Vec<Option<f64>>>);

/// The requested keys ($2) of the batch's contacts ($1), one primary-key probe per user
/// whatever the table's statistics say. Numbers come back a second time as
/// float8, the exact nearest double: serde_json's default parser can be an ulp off on the long
/// plain decimals Postgres prints (`-5.32579466948816e229` comes back as 230 digits), and the
/// event filters compare with the same float8 reading.
const PROPERTIES_SQL: &str = "\
    SELECT c.user_id, k.ordinal, v.value, \
           CASE WHEN jsonb_typeof(v.value) = 'number' THEN v.value::float8 END, \
           CASE WHEN jsonb_typeof(v.value) = 'array' THEN ARRAY( \
               SELECT CASE WHEN jsonb_typeof(element) = 'number' THEN element::float8 END \
               FROM jsonb_array_elements(v.value) WITH ORDINALITY AS a(element, position) \
               ORDER BY position) END \
    FROM unnest($1::text[]) AS u(user_id) \
    CROSS JOIN LATERAL (SELECT user_id, properties FROM contacts WHERE user_id = u.user_id \
                        LIMIT 1) AS c \
    CROSS JOIN unnest($2::text[]) WITH ORDINALITY AS k(key, ordinal) \
    CROSS JOIN LATERAL (SELECT c.properties -> k.key) AS v(value) \
    WHERE c.properties ? k.key";

/// Sets a property value whose numbers (at the top level and as array elements: all the ABI
/// lays out) are Postgres's float8 readings.
fn set_exact_property(
    batch: &mut FactBatch,
    user: usize,
    fact: usize,
    value: &Value,
    number: Option<f64>,
    element_numbers: Option<Vec<Option<f64>>>,
) {
    match value {
        Value::Number(_) => match number {
            Some(exact) => batch.set(user, fact, SlotValue::Number(exact)),
            None => batch.set_json(user, fact, value),
        },
        Value::Array(items) => {
            let element_numbers = element_numbers.unwrap_or_default();
            batch.set_array(
                user,
                fact,
                items.iter().enumerate().map(|(i, item)| {
                    match element_numbers.get(i).copied().flatten() {
                        Some(exact) => SlotValue::Number(exact),
                        None => SlotValue::of_json(item),
                    }
                }),
            );
        }
        other => batch.set_json(user, fact, other),
    }
}

/// A contact property read as an RFC 3339 timestamp, with the parser the oracle uses.
fn property_time(value: &Value) -> SlotValue<'static> {
    value
        .as_str()
        .and_then(membrane_abi::parse_timestamp_ms)
        .map_or(SlotValue::Missing, SlotValue::Timestamp)
}

/// One grouped scan over the batch's events of the named kinds, counting every fact at once:
///
/// ```sql
/// SELECT e.user_id, ARRAY[count(*) FILTER (WHERE e.name = $3 AND e.occurred_at >= $4 AND …), …]
/// FROM events e WHERE e.user_id = ANY($1) AND e.name = ANY($2) [AND e.occurred_at >= $n]
/// GROUP BY e.user_id
/// ```
///
/// Users without matching events get no row (their counts stay 0).
fn count_statement(users: &[String], count_facts: &[CountFact<'_>]) -> Statement {
    let mut statement = Statement::default();
    let users = statement.bind_text_array(users.to_vec());
    let mut names: Vec<String> = count_facts.iter().map(|f| f.event.to_owned()).collect();
    names.sort_unstable();
    names.dedup();
    let names = statement.bind_text_array(names);

    let counts: Vec<String> = count_facts
        .iter()
        .map(|fact| {
            let mut conditions = vec![format!("e.name = {}", statement.bind_text(fact.event))];
            if let Some(since) = fact.since {
                conditions.push(format!(
                    "e.occurred_at >= {}",
                    statement.bind_timestamp(since)
                ));
            }
            if let Some(filter) = fact.filter {
                conditions.push(statement.event_filter(filter, "e.properties"));
            }
            format!("count(*) FILTER (WHERE {})", conditions.join(" AND "))
        })
        .collect();

    // When every fact is windowed, the scan can start at the oldest window (index range).
    let oldest_window = count_facts
        .iter()
        .map(|fact| fact.since)
        .min()
        .flatten()
        .map(|since| format!(" AND e.occurred_at >= {}", statement.bind_timestamp(since)));

    statement.push(&format!(
        "SELECT e.user_id, ARRAY[{}]::int8[] FROM events e \
         WHERE e.user_id = ANY({users}) AND e.name = ANY({names}){} \
         GROUP BY e.user_id",
        counts.join(", "),
        oldest_window.unwrap_or_default()
    ));
    statement
}
