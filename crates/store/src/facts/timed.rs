//! What the clock needs beyond the fact values: for every windowed event count, the instants of
//! the events it counts now, since each one leaving its window can flip the criteria.
//! `membrane_criteria::clock::timed_facts_from_raw` is the oracle (its `window_events`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use membrane_abi::Fact;

use super::filter_sql::Statement;
use super::window_start;
use crate::round::Round;
use crate::Result;

impl Round {
    /// One row per user (in `users` order), one list per fact (in `facts` order): for a windowed
    /// [`Fact::EventCount`], the occurrence instants (Unix ms, rounded down as the oracle reads
    /// them) of the events it counts at `now`, in no particular order; empty for every other
    /// fact. One statement for the whole batch, each windowed fact an index range scan.
    pub async fn gather_window_events(
        &mut self,
        users: &[String],
        facts: &[Fact],
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<Vec<i64>>>> {
        let mut rows = vec![vec![Vec::new(); facts.len()]; users.len()];
        let Some(statement) = window_events_statement(users, facts, now.timestamp_millis()) else {
            return Ok(rows);
        };
        let position: HashMap<&str, usize> = users
            .iter()
            .enumerate()
            .map(|(i, user)| (user.as_str(), i))
            .collect();
        let found: Vec<(String, i32, Vec<i64>)> =
            statement.query_as().fetch_all(&mut *self.tx).await?;
        for (user, fact, instants) in found {
            let (Some(&row), Ok(fact)) = (position.get(user.as_str()), usize::try_from(fact))
            else {
                continue;
            };
            if let Some(slot) = rows[row].get_mut(fact) {
                *slot = instants;
            }
        }
        Ok(rows)
    }
}

/// ```sql
/// SELECT e.user_id, <fact index>, array_agg(<occurred_at in ms, rounded down>)
/// FROM events e WHERE e.user_id = ANY($1) AND e.name = $2 AND e.occurred_at >= $3 AND <filter>
/// GROUP BY e.user_id
/// UNION ALL …   -- one arm per windowed fact
/// ```
/// `None` when no fact is windowed.
fn window_events_statement(users: &[String], facts: &[Fact], now_ms: i64) -> Option<Statement> {
    let mut statement = Statement::default();
    let users = statement.bind_text_array(users.to_vec());
    let mut arms = Vec::new();
    for (index, fact) in facts.iter().enumerate() {
        let Fact::EventCount {
            event,
            within_secs: Some(within_secs),
            filter,
        } = fact
        else {
            continue;
        };
        let mut conditions = vec![
            format!("e.user_id = ANY({users})"),
            format!("e.name = {}", statement.bind_text(event)),
        ];
        // A window reaching back past every storable instant counts all of history.
        if let Some(since) = window_start(now_ms, *within_secs) {
            conditions.push(format!(
                "e.occurred_at >= {}",
                statement.bind_timestamp(since)
            ));
        }
        if let Some(filter) = filter {
            conditions.push(statement.event_filter(filter, "e.properties"));
        }
        arms.push(format!(
            "SELECT e.user_id, {index}::int4, \
                    array_agg(floor(extract(epoch FROM e.occurred_at) * 1000)::int8) \
             FROM events e WHERE {} GROUP BY e.user_id",
            conditions.join(" AND ")
        ));
    }
    if arms.is_empty() {
        return None;
    }
    statement.push(&arms.join(" UNION ALL "));
    Some(statement)
}
