//! Set-based fact gathering: the facts predicates declare, for whole batches of users (one per
//! bucket of a round), in two statements whatever the batch sizes and however many buckets.
//! `membrane_criteria::eval::gather_from_raw` is the oracle.

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
pub(crate) const EARLIEST_POSTGRES_TIME_MS: i64 = -210_866_803_200_000;

/// Index entries a span read scans per user of its page at most. A scanned entry costs about a
/// tenth of a probe (measured at 1M users: 16k entries in 3.5 ms, 10k probes in 22 ms), so a
/// span too sparse to finish within the cap costs its page at most about half its probes
/// before the rest of the page falls back to them.
const SPAN_ENTRIES_PER_USER: usize = 8;

/// An event-count fact to gather: its position in the fact list and its definition.
#[derive(Clone, Copy)]
struct CountFact<'a> {
    index: usize,
    event: &'a str,
    /// The window's start; `None` = all of history.
    since: Option<DateTime<Utc>>,
    /// Declared with a window (even one reaching past all of history): the clock needs the
    /// instants of the events it counts.
    windowed: bool,
    filter: Option<&'a EventFilter>,
}

/// Per user row and per fact, the instants the clock needs (see
/// [`Round::gather_window_events`]).
pub type WindowEvents = Vec<Vec<Vec<i64>>>;

/// One batch of a round's fact gathering: users to evaluate against one predicate, and the facts
/// that predicate declares.
#[derive(Debug, Clone, Copy)]
pub struct FactRequest<'a> {
    pub users: &'a [String],
    pub facts: &'a [Fact],
    /// The users are a page: most users between the first and the last in user order (a
    /// backfill's or a sweep's page). Event counts are then read as ranges of that span, not
    /// with a probe per user (see [`span_arm`]).
    pub page: bool,
}

/// One arm of a counting statement: the users it probes and the facts it counts for them.
struct CountArm<'a> {
    batch: usize,
    users: Vec<String>,
    facts: Vec<CountFact<'a>>,
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
        let mut batches = self
            .gather_facts_for(
                &[FactRequest {
                    users,
                    facts,
                    page: false,
                }],
                now,
            )
            .await?;
        Ok(batches.pop().expect("one fact batch per request"))
    }

    /// [`Round::gather_facts`] for several batches at once (a round's candidate buckets), one
    /// fact batch per request in order: one statement counts the events of every batch and one
    /// reads every batch's properties, so a round costs two round trips however many buckets
    /// it evaluates.
    pub async fn gather_facts_for(
        &mut self,
        requests: &[FactRequest<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<FactBatch>> {
        let (batches, _) = self
            .gather_facts_and_window_events_for(requests, &[], now)
            .await?;
        Ok(batches)
    }

    /// [`Round::gather_facts_for`], and for each request whose flag in `timed` is set (missing
    /// flags are unset) what the clock needs beyond the values: per user and fact, the
    /// instants of the events a windowed count counts (see [`Round::gather_window_events`]).
    /// The counting statement reads those events anyway, so the instants cost no statement of
    /// their own.
    pub async fn gather_facts_and_window_events_for(
        &mut self,
        requests: &[FactRequest<'_>],
        timed: &[bool],
        now: DateTime<Utc>,
    ) -> Result<(Vec<FactBatch>, Vec<WindowEvents>)> {
        // The oracle works in whole milliseconds; truncating `now` the same way makes window
        // edges agree for events at any precision.
        let now_ms = now.timestamp_millis();
        // Users without events or a contact row keep these values.
        let mut batches: Vec<FactBatch> = requests
            .iter()
            .map(|request| {
                let blank: Vec<Slot> = request.facts.iter().map(Fact::blank_slot).collect();
                FactBatch::new(request.users.len(), &blank)
            })
            .collect();
        let mut window_events: Vec<WindowEvents> = requests
            .iter()
            .map(|request| vec![vec![Vec::new(); request.facts.len()]; request.users.len()])
            .collect();
        let positions = user_rows(requests);

        let count_facts: Vec<Vec<CountFact>> = requests
            .iter()
            .map(|request| count_facts(request.facts, now_ms))
            .collect();
        let wants_instants = |batch: usize| timed.get(batch).copied().unwrap_or(false);
        let mut probes: Vec<CountArm> = Vec::new();
        let mut pages = Vec::new();
        for (batch, (request, facts)) in requests.iter().zip(&count_facts).enumerate() {
            if request.users.is_empty() || facts.is_empty() {
                continue;
            }
            if request.page {
                pages.push(batch);
            } else {
                probes.push(CountArm {
                    batch,
                    users: request.users.to_vec(),
                    facts: facts.clone(),
                });
            }
        }
        if !pages.is_empty() {
            let mut spans = Statement::default();
            let mut reads: Vec<(usize, CountFact, usize)> = Vec::new();
            let mut arms = Vec::new();
            for &batch in &pages {
                let users = requests[batch].users;
                let (Some(first), Some(last)) = (users.iter().min(), users.iter().max()) else {
                    continue;
                };
                let cap = users.len().saturating_mul(SPAN_ENTRIES_PER_USER);
                for fact in &count_facts[batch] {
                    let instants = fact.windowed && wants_instants(batch);
                    let span = (first.as_str(), last.as_str());
                    arms.push(span_arm(&mut spans, reads.len(), span, cap, fact, instants));
                    reads.push((batch, *fact, cap));
                }
            }
            spans.push(&arms.join(" UNION ALL "));
            let rows: Vec<SpanRow> = spans.query_as().fetch_all(&mut *self.tx).await?;
            // Per batch, the facts whose span read stopped at its cap, and the least user such
            // a read did not finish.
            let mut unfinished: HashMap<usize, (Vec<CountFact>, String)> = HashMap::new();
            for (arm, scanned, last_scanned, users, instants) in rows {
                let Some(&(batch, fact, cap)) =
                    usize::try_from(arm).ok().and_then(|arm| reads.get(arm))
                else {
                    continue;
                };
                // A read that stopped at its cap knows every user before its last one.
                let bound =
                    last_scanned.filter(|_| usize::try_from(scanned).is_ok_and(|n| n >= cap));
                let mut counts: HashMap<usize, (i64, Vec<i64>)> = HashMap::new();
                let mut instants = instants.into_iter();
                for user in users {
                    let at = instants.next();
                    if bound.as_ref().is_some_and(|bound| &user >= bound) {
                        continue; // probed below
                    }
                    let Some(&row) = positions[batch].get(user.as_str()) else {
                        continue; // in the span, not in the page
                    };
                    let (count, at_list) = counts.entry(row).or_default();
                    *count += 1;
                    at_list.extend(at.map(|at| at.timestamp_millis()));
                }
                for (row, (count, at_list)) in counts {
                    batches[batch].set(row, fact.index, SlotValue::Count(count));
                    if fact.windowed && wants_instants(batch) {
                        window_events[batch][row][fact.index] = at_list;
                    }
                }
                if let Some(bound) = bound {
                    let (facts, from) = unfinished
                        .entry(batch)
                        .or_insert_with(|| (Vec::new(), bound.clone()));
                    facts.push(fact);
                    if bound < *from {
                        *from = bound;
                    }
                }
            }
            // The rest of those pages is probed. A user the span had counted for one of the
            // facts gets the same full count again.
            for (batch, (facts, from)) in unfinished {
                let users: Vec<String> = requests[batch]
                    .users
                    .iter()
                    .filter(|user| **user >= from)
                    .cloned()
                    .collect();
                if !users.is_empty() {
                    probes.push(CountArm {
                        batch,
                        users,
                        facts,
                    });
                }
            }
        }
        if !probes.is_empty() {
            let mut counting = Statement::default();
            let arms: Vec<String> = probes
                .iter()
                .enumerate()
                .map(|(arm, probe)| {
                    count_arm(&mut counting, arm, probe, wants_instants(probe.batch))
                })
                .collect();
            counting.push(&arms.join(" UNION ALL "));
            let counts: Vec<(i32, String, Vec<i64>, Vec<i64>)> =
                counting.query_as().fetch_all(&mut *self.tx).await?;
            for (arm, user, per_fact, instants) in counts {
                let Some(probe) = usize::try_from(arm).ok().and_then(|arm| probes.get(arm)) else {
                    continue;
                };
                let batch = probe.batch;
                let Some(&row) = positions[batch].get(user.as_str()) else {
                    continue;
                };
                // The instants of each windowed fact, in fact order: as many as it counted.
                let mut instants = instants.into_iter();
                for (fact, count) in probe.facts.iter().zip(per_fact) {
                    batches[batch].set(row, fact.index, SlotValue::Count(count));
                    if fact.windowed && wants_instants(batch) {
                        window_events[batch][row][fact.index] = instants
                            .by_ref()
                            .take(usize::try_from(count).unwrap_or(0))
                            .collect();
                    }
                }
            }
        }

        // Per batch, the positions of its property facts; the statement numbers a batch's
        // requested keys from 1 in this order.
        let property_facts: Vec<Vec<(usize, &str)>> = requests
            .iter()
            .map(|request| {
                request
                    .facts
                    .iter()
                    .enumerate()
                    .filter_map(|(index, fact)| match fact {
                        Fact::Property { key } | Fact::PropertyTime { key } => {
                            Some((index, key.as_str()))
                        }
                        Fact::EventCount { .. } => None,
                    })
                    .collect()
            })
            .collect();
        let (mut user_batches, mut user_ids) = (Vec::new(), Vec::new());
        let (mut key_batches, mut keys, mut ordinals) = (Vec::new(), Vec::new(), Vec::new());
        for (batch, (request, properties)) in requests.iter().zip(&property_facts).enumerate() {
            if properties.is_empty() {
                continue;
            }
            let batch = crate::round::request_index(batch);
            for user in request.users {
                user_batches.push(batch);
                user_ids.push(user.as_str());
            }
            for (ordinal, (_, key)) in (1_i64..).zip(properties) {
                key_batches.push(batch);
                keys.push(*key);
                ordinals.push(ordinal);
            }
        }
        if !user_ids.is_empty() {
            let values: Vec<PropertyRow> = sqlx::query_as(PROPERTIES_SQL)
                .bind(&user_batches)
                .bind(&user_ids)
                .bind(&key_batches)
                .bind(&keys)
                .bind(&ordinals)
                .fetch_all(&mut *self.tx)
                .await?;
            for (batch, user, ordinal, value, number, element_numbers) in values {
                let Some(batch) = usize::try_from(batch).ok().filter(|b| *b < requests.len())
                else {
                    continue;
                };
                let Some(&row) = positions[batch].get(user.as_str()) else {
                    continue;
                };
                let Some(&(index, _)) = usize::try_from(ordinal - 1)
                    .ok()
                    .and_then(|i| property_facts[batch].get(i))
                else {
                    continue;
                };
                let target = &mut batches[batch];
                match requests[batch].facts[index] {
                    Fact::PropertyTime { .. } => target.set(row, index, property_time(&value)),
                    _ => set_exact_property(target, row, index, &value, number, element_numbers),
                }
            }
        }
        Ok((batches, window_events))
    }
}

/// Per request, each user's row in its batch.
fn user_rows<'a>(requests: &[FactRequest<'a>]) -> Vec<HashMap<&'a str, usize>> {
    requests
        .iter()
        .map(|request| {
            request
                .users
                .iter()
                .enumerate()
                .map(|(row, user)| (user.as_str(), row))
                .collect()
        })
        .collect()
}

/// The event-count facts among `facts`, with their windows' starts at `now_ms`.
fn count_facts(facts: &[Fact], now_ms: i64) -> Vec<CountFact<'_>> {
    facts
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
                windowed: within_secs.is_some(),
                filter: filter.as_ref(),
            }),
            Fact::Property { .. } | Fact::PropertyTime { .. } => None,
        })
        .collect()
}

/// `now_ms - within_secs`, or `None` when the window reaches back past every storable instant
/// (including windows too large for the arithmetic).
pub(crate) fn window_start(now_ms: i64, within_secs: u64) -> Option<DateTime<Utc>> {
    let within_ms = i64::try_from(within_secs).ok()?.checked_mul(1000)?;
    let since_ms = now_ms.checked_sub(within_ms)?;
    if since_ms < EARLIEST_POSTGRES_TIME_MS {
        return None;
    }
    DateTime::from_timestamp_millis(since_ms)
}

/// One present contact property: batch, user, 1-based position in the batch's requested keys,
/// its JSON value, and its numbers as read by Postgres (the value itself when a number; each
/// element of an array, `None` for non-numbers).
type PropertyRow = (
    i32,
    String,
    i64,
    Value,
    Option<f64>,
    Option<Vec<Option<f64>>>,
);

/// The requested keys of each batch (batch $3, key $4, ordinal $5) of the batch's contacts
/// (batch $1, user $2), one primary-key probe per user whatever the table's statistics say.
/// Numbers come back a second time as float8, the exact nearest double: serde_json's default
/// parser can be an ulp off on the long plain decimals Postgres prints
/// (`-5.32579466948816e229` comes back as 230 digits), and the event filters compare with the
/// same float8 reading.
const PROPERTIES_SQL: &str = "\
    SELECT u.batch, c.user_id, k.ordinal, v.value, \
           CASE WHEN jsonb_typeof(v.value) = 'number' THEN v.value::float8 END, \
           CASE WHEN jsonb_typeof(v.value) = 'array' THEN ARRAY( \
               SELECT CASE WHEN jsonb_typeof(element) = 'number' THEN element::float8 END \
               FROM jsonb_array_elements(v.value) WITH ORDINALITY AS a(element, position) \
               ORDER BY position) END \
    FROM unnest($1::int4[], $2::text[]) AS u(batch, user_id) \
    CROSS JOIN LATERAL (SELECT user_id, properties FROM contacts WHERE user_id = u.user_id \
                        LIMIT 1) AS c \
    JOIN unnest($3::int4[], $4::text[], $5::int8[]) AS k(batch, key, ordinal) \
        ON k.batch = u.batch \
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

/// One scan of each of the arm's users' events of the named kinds, counting every fact of the
/// arm at once, as one arm of the round's counting statement; with `instants`, the last column
/// also lists, for each windowed fact in order, the instants (Unix ms, rounded down as the
/// oracle reads them) of the events it counted:
///
/// ```sql
/// SELECT <arm>, u.user_id, c.counts, c.instants FROM unnest($1) AS u(user_id)
/// CROSS JOIN LATERAL (
///     SELECT ARRAY[count(*) FILTER (WHERE e.name = $3 AND e.occurred_at >= $4 AND …), …] AS counts,
///            coalesce(array_agg(<ms>) FILTER (WHERE e.name = $3 AND …), '{}') || … AS instants
///     FROM events e WHERE e.user_id = u.user_id AND e.name = ANY($2) [AND e.occurred_at >= $n]
///     HAVING count(*) > 0) AS c
/// ```
///
/// A probe of `events (name, user_id, occurred_at)` per user (one descent per name), whatever
/// the statistics say: written as `e.user_id = ANY($1)` with a `GROUP BY`, a table that grew
/// since it was last analyzed was scanned whole for every arm (52 ms against 12 ms for 1,000 users of a
/// 260k-event table). Users without matching events get no row (their counts stay 0).
fn count_arm(statement: &mut Statement, arm: usize, probe: &CountArm, instants: bool) -> String {
    let count_facts = &probe.facts;
    let users = statement.bind_text_array(probe.users.clone());
    let mut names: Vec<String> = count_facts.iter().map(|f| f.event.to_owned()).collect();
    names.sort_unstable();
    names.dedup();
    let names = statement.bind_text_array(names);

    let mut counts = Vec::with_capacity(count_facts.len());
    let mut windowed_instants = Vec::new();
    for fact in count_facts {
        let mut conditions = vec![format!("e.name = {}", statement.bind_text(fact.event))];
        conditions.extend(counted_conditions(statement, fact, "e"));
        let condition = conditions.join(" AND ");
        if instants && fact.windowed {
            windowed_instants.push(format!(
                "coalesce(array_agg(floor(extract(epoch FROM e.occurred_at) * 1000)::int8) \
                          FILTER (WHERE {condition}), '{{}}')"
            ));
        }
        counts.push(format!("count(*) FILTER (WHERE {condition})"));
    }
    let instants = if windowed_instants.is_empty() {
        "'{}'::int8[]".to_owned()
    } else {
        windowed_instants.join(" || ")
    };

    // When every fact is windowed, the scan can start at the oldest window (index range).
    let oldest_window = count_facts
        .iter()
        .map(|fact| fact.since)
        .min()
        .flatten()
        .map(|since| format!(" AND e.occurred_at >= {}", statement.bind_timestamp(since)));

    format!(
        "SELECT {arm}::int4, u.user_id, c.counts, c.instants \
         FROM unnest({users}) AS u(user_id) CROSS JOIN LATERAL ( \
             SELECT ARRAY[{}]::int8[] AS counts, {instants} AS instants FROM events e \
             WHERE e.user_id = u.user_id AND e.name = ANY({names}){} \
             HAVING count(*) > 0) AS c",
        counts.join(", "),
        oldest_window.unwrap_or_default()
    )
}

/// What an event of the fact's name must meet to be counted, over the event row `alias`: its
/// window and its filter (none when the fact has neither).
fn counted_conditions(statement: &mut Statement, fact: &CountFact<'_>, alias: &str) -> Vec<String> {
    let mut conditions = Vec::new();
    if let Some(since) = fact.since {
        let since = statement.bind_timestamp(since);
        conditions.push(format!("{alias}.occurred_at >= {since}"));
    }
    if let Some(filter) = fact.filter {
        conditions.push(statement.event_filter(filter, &format!("{alias}.properties")));
    }
    conditions
}

/// One span read's result: its arm, the index entries it scanned, the last user scanned, and
/// the user and instant of each event the fact counts, in user order.
type SpanRow = (i32, i64, Option<String>, Vec<String>, Vec<DateTime<Utc>>);

/// One fact's events across a page's span of users, as one arm of the span statement: the
/// entries of `events (name, user_id, occurred_at)` from the page's first user to its last, in
/// index order and at most `cap` of them, each checked against the fact's window and filter
/// after it is read, so that `cap` bounds what is scanned:
///
/// ```sql
/// SELECT <arm>, count(*), max(s.user_id),
///        coalesce(array_agg(s.user_id) FILTER (WHERE <window and filter>), '{}'),
///        coalesce(array_agg(s.occurred_at) FILTER (WHERE …), '{}')
/// FROM (SELECT e.user_id, e.occurred_at FROM events e
///       WHERE e.name = $1 AND e.user_id BETWEEN $2 AND $3
///       ORDER BY e.user_id, e.occurred_at LIMIT $4) AS s
/// ```
///
/// A page is dense in its span (at 1M users a sweep page of 5,000 spans about 43k users), so
/// reading the span costs a fraction of a probe per user. A read that stops at `cap` still
/// knows every user before its last scanned one; the rest are probed.
fn span_arm(
    statement: &mut Statement,
    arm: usize,
    (first, last): (&str, &str),
    cap: usize,
    fact: &CountFact<'_>,
    instants: bool,
) -> String {
    let name = statement.bind_text(fact.event);
    let (first, last) = (statement.bind_text(first), statement.bind_text(last));
    let cap = statement.bind_int8(i64::try_from(cap).unwrap_or(i64::MAX));
    let conditions = counted_conditions(statement, fact, "s");
    let counted = if conditions.is_empty() {
        String::new()
    } else {
        format!(" FILTER (WHERE {})", conditions.join(" AND "))
    };
    let instants = if instants {
        format!("coalesce(array_agg(s.occurred_at){counted}, '{{}}')")
    } else {
        "'{}'::timestamptz[]".to_owned()
    };
    let properties = if fact.filter.is_some() {
        ", e.properties"
    } else {
        ""
    };
    format!(
        "SELECT {arm}::int4, count(*), max(s.user_id), \
                coalesce(array_agg(s.user_id){counted}, '{{}}'), {instants} \
         FROM (SELECT e.user_id, e.occurred_at{properties} FROM events e \
               WHERE e.name = {name} AND e.user_id >= {first} AND e.user_id <= {last} \
               ORDER BY e.user_id, e.occurred_at LIMIT {cap}) AS s"
    )
}
