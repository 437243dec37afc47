//! What the clock needs beyond the fact values: for every windowed event count, the instants of
//! the events it counts now, since each one leaving its window can flip the criteria.
//! `membrane_criteria::clock::timed_facts_from_raw` is the oracle (its `window_events`).

use chrono::{DateTime, Utc};
use membrane_abi::Fact;

use super::filter_sql::Statement;
use super::{user_rows, window_start, FactRequest};
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
        let mut batches = self
            .gather_window_events_for(&[FactRequest { users, facts }], now)
            .await?;
        Ok(batches.pop().expect("one list per request"))
    }

    /// [`Round::gather_window_events`] for several batches at once, in one statement.
    pub async fn gather_window_events_for(
        &mut self,
        requests: &[FactRequest<'_>],
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<Vec<Vec<i64>>>>> {
        let mut batches: Vec<Vec<Vec<Vec<i64>>>> = requests
            .iter()
            .map(|request| vec![vec![Vec::new(); request.facts.len()]; request.users.len()])
            .collect();
        let mut statement = Statement::default();
        let arms: Vec<String> = requests
            .iter()
            .enumerate()
            .filter(|(_, request)| !request.users.is_empty())
            .flat_map(|(batch, request)| {
                window_event_arms(&mut statement, batch, request, now.timestamp_millis())
            })
            .collect();
        if arms.is_empty() {
            return Ok(batches);
        }
        statement.push(&arms.join(" UNION ALL "));
        let positions = user_rows(requests);
        let found: Vec<(i32, String, i32, Vec<i64>)> =
            statement.query_as().fetch_all(&mut *self.tx).await?;
        for (batch, user, fact, instants) in found {
            let (Ok(batch), Ok(fact)) = (usize::try_from(batch), usize::try_from(fact)) else {
                continue;
            };
            let Some(&row) = positions.get(batch).and_then(|p| p.get(user.as_str())) else {
                continue;
            };
            if let Some(slot) = batches[batch][row].get_mut(fact) {
                *slot = instants;
            }
        }
        Ok(batches)
    }
}

/// ```sql
/// SELECT <batch>, e.user_id, <fact index>, array_agg(<occurred_at in ms, rounded down>)
/// FROM events e WHERE e.user_id = ANY($1) AND e.name = $2 AND e.occurred_at >= $3 AND <filter>
/// GROUP BY e.user_id
/// ```
/// One arm per windowed fact of the batch (none when no fact is windowed), to be joined with
/// `UNION ALL`.
fn window_event_arms(
    statement: &mut Statement,
    batch: usize,
    request: &FactRequest<'_>,
    now_ms: i64,
) -> Vec<String> {
    let windowed: Vec<_> = request
        .facts
        .iter()
        .enumerate()
        .filter_map(|(index, fact)| match fact {
            Fact::EventCount {
                event,
                within_secs: Some(within_secs),
                filter,
            } => Some((index, event, *within_secs, filter)),
            _ => None,
        })
        .collect();
    if windowed.is_empty() {
        return Vec::new();
    }
    let users = statement.bind_text_array(request.users.to_vec());
    windowed
        .into_iter()
        .map(|(index, event, within_secs, filter)| {
            let mut conditions = vec![
                format!("e.user_id = ANY({users})"),
                format!("e.name = {}", statement.bind_text(event)),
            ];
            // A window reaching back past every storable instant counts all of history.
            if let Some(since) = window_start(now_ms, within_secs) {
                conditions.push(format!(
                    "e.occurred_at >= {}",
                    statement.bind_timestamp(since)
                ));
            }
            if let Some(filter) = filter {
                conditions.push(statement.event_filter(filter, "e.properties"));
            }
            format!(
                "SELECT {batch}::int4, e.user_id, {index}::int4, \
                        array_agg(floor(extract(epoch FROM e.occurred_at) * 1000)::int8) \
                 FROM events e WHERE {} GROUP BY e.user_id",
                conditions.join(" AND ")
            )
        })
        .collect()
}
