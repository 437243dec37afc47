//! Set-based fact gathering: the facts a predicate declares, for a whole batch of users, in two
//! statements whatever the batch size. `membrane_criteria::eval::gather_from_raw` is the oracle.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use membrane_abi::{Fact, FactValue};
use serde_json::Value;

use crate::round::Round;
use crate::Result;

impl Round {
    /// Returns one row per user (in `users` order), one value per fact (in `facts` order).
    pub async fn gather_facts(
        &mut self,
        users: &[String],
        facts: &[Fact],
        now: DateTime<Utc>,
    ) -> Result<Vec<Vec<FactValue>>> {
        let mut rows: Vec<Vec<FactValue>> = users
            .iter()
            .map(|_| vec![FactValue::Missing; facts.len()])
            .collect();
        let position: HashMap<&str, usize> = users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.as_str(), i))
            .collect();

        let mut count_facts = Vec::new();
        let (mut names, mut since) = (Vec::new(), Vec::<Option<DateTime<Utc>>>::new());
        let mut wants_properties = false;
        for (index, fact) in facts.iter().enumerate() {
            match fact {
                Fact::EventCount { event, within_secs } => {
                    for row in rows.iter_mut() {
                        row[index] = FactValue::Count(0);
                    }
                    count_facts.push(index);
                    names.push(event.clone());
                    since.push(within_secs.map(|w| now - Duration::seconds(w as i64)));
                }
                Fact::Property { .. } => wants_properties = true,
            }
        }

        if !count_facts.is_empty() && !users.is_empty() {
            // One grouped scan of the batch's events; pairs with no events stay at 0.
            let counts: Vec<(String, i64, i64)> = sqlx::query_as(
                "SELECT e.user_id, f.ord, count(*) \
                 FROM unnest($2::text[], $3::timestamptz[]) WITH ORDINALITY AS f(name, since, ord) \
                 JOIN events e ON e.name = f.name \
                      AND e.occurred_at >= coalesce(f.since, '-infinity'::timestamptz) \
                 WHERE e.user_id = ANY($1) \
                 GROUP BY e.user_id, f.ord",
            )
            .bind(users)
            .bind(&names)
            .bind(&since)
            .fetch_all(&mut *self.tx)
            .await?;
            for (user, ordinal, count) in counts {
                if let Some(&row) = position.get(user.as_str()) {
                    let fact = count_facts[(ordinal - 1) as usize];
                    rows[row][fact] = FactValue::Count(count);
                }
            }
        }

        if wants_properties && !users.is_empty() {
            let contacts: Vec<(String, Value)> =
                sqlx::query_as("SELECT user_id, properties FROM contacts WHERE user_id = ANY($1)")
                    .bind(users)
                    .fetch_all(&mut *self.tx)
                    .await?;
            for (user, properties) in contacts {
                let Some(&row) = position.get(user.as_str()) else {
                    continue;
                };
                for (index, fact) in facts.iter().enumerate() {
                    if let Fact::Property { key } = fact {
                        rows[row][index] = FactValue::from_json(properties.get(key));
                    }
                }
            }
        }
        Ok(rows)
    }
}
