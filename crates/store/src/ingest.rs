//! Ingest: events and profile updates, their idempotency keys, the contacts they touch and the
//! evaluation-queue entries they cause, all in one transaction.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::{Result, Store};

/// Channel woken when the evaluation queue receives entries.
pub const QUEUE_CHANNEL: &str = "membrane_queue";

/// One validated message, ready to apply.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Track {
        message_id: Option<String>,
        user_id: String,
        event: String,
        occurred_at: DateTime<Utc>,
        properties: Map<String, Value>,
    },
    Identify {
        message_id: Option<String>,
        user_id: String,
        /// Merged key by key into the contact's properties; a null value removes the key.
        traits: Map<String, Value>,
    },
}

impl Message {
    fn message_id(&self) -> Option<&str> {
        match self {
            Message::Track { message_id, .. } | Message::Identify { message_id, .. } => {
                message_id.as_deref()
            }
        }
    }

    fn user_id(&self) -> &str {
        match self {
            Message::Track { user_id, .. } | Message::Identify { user_id, .. } => user_id,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestOutcome {
    pub applied: usize,
    /// Messages skipped because their `messageId` was applied before (or earlier in the batch).
    pub duplicates: usize,
}

/// What changed for one user: the evaluator uses it to select candidate buckets.
#[derive(Debug, Default)]
struct UserChange {
    event_names: Vec<String>,
    /// Final property edits, folded in message order.
    set: Map<String, Value>,
    removed: Vec<String>,
}

impl UserChange {
    fn touched_keys(&self) -> Vec<String> {
        self.set
            .keys()
            .cloned()
            .chain(self.removed.iter().cloned())
            .collect()
    }
}

impl Store {
    /// Applies `messages` all-or-nothing: events, property merges, message-id records and
    /// evaluation-queue entries commit together, and evaluators are woken on commit.
    pub async fn ingest(&self, messages: &[Message]) -> Result<IngestOutcome> {
        let mut tx = self.pool().begin().await?;
        let outcome = Self::ingest_in(&mut tx, messages).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// [`Store::ingest`] inside the caller's transaction, so more can commit with it.
    pub(crate) async fn ingest_in(
        tx: &mut sqlx::PgConnection,
        messages: &[Message],
    ) -> Result<IngestOutcome> {
        // Sorted (bytewise, as the ids' `COLLATE "C"` key orders them): concurrent ingests
        // sharing ids then insert them in one order and wait for each other instead of
        // deadlocking, which failed grouped requests that repeated each other's messages.
        let candidate_ids: Vec<String> = messages
            .iter()
            .filter_map(|m| m.message_id())
            .collect::<BTreeSet<&str>>()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let fresh_ids: HashSet<String> = sqlx::query_scalar(
            "INSERT INTO ingested_messages (message_id) SELECT unnest($1::text[]) \
             ON CONFLICT DO NOTHING RETURNING message_id",
        )
        .bind(&candidate_ids)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();

        let mut claimed = HashSet::new();
        let mut outcome = IngestOutcome::default();
        let mut changes: BTreeMap<&str, UserChange> = BTreeMap::new();
        let (mut ev_users, mut ev_names, mut ev_times, mut ev_props) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for message in messages {
            if let Some(id) = message.message_id() {
                // Only the first occurrence of a fresh id applies.
                if !fresh_ids.contains(id) || !claimed.insert(id) {
                    outcome.duplicates += 1;
                    continue;
                }
            }
            outcome.applied += 1;
            let change = changes.entry(message.user_id()).or_default();
            match message {
                Message::Track {
                    user_id,
                    event,
                    occurred_at,
                    properties,
                    ..
                } => {
                    if !change.event_names.contains(event) {
                        change.event_names.push(event.clone());
                    }
                    ev_users.push(user_id.clone());
                    ev_names.push(event.clone());
                    ev_times.push(*occurred_at);
                    ev_props.push(Value::Object(properties.clone()));
                }
                Message::Identify { traits, .. } => {
                    for (key, value) in traits {
                        if value.is_null() {
                            change.set.remove(key);
                            if !change.removed.contains(key) {
                                change.removed.push(key.clone());
                            }
                        } else {
                            change.removed.retain(|k| k != key);
                            change.set.insert(key.clone(), value.clone());
                        }
                    }
                }
            }
        }
        if changes.is_empty() {
            return Ok(outcome);
        }

        // Users in sorted order (BTreeMap): concurrent ingests creating the same contacts wait
        // for each other in one order.
        let users: Vec<String> = changes.keys().map(|u| u.to_string()).collect();
        let entries: Vec<Value> = changes
            .iter()
            .map(|(user, change)| {
                serde_json::json!({
                    "u": user,
                    "e": change.event_names,
                    "p": change.touched_keys(),
                })
            })
            .collect();
        let queued_users = entries.len() as i32;
        // One statement (one round trip) writes the contacts, the events and the transaction's
        // queue row (every changed user in one row) and wakes the evaluators on commit.
        //
        // Known users are skipped by an index probe (`OFFSET 0`: one per user, as in the
        // round's lookups, whatever the statistics say): the insert's conflict path costs
        // more, and nearly every user of a batch is known.
        //
        // Events and queue entries take no row lock: a round evaluating one of these users
        // meanwhile either sees this ingest or not (it commits at once), and the queue entry
        // it has not claimed brings the user back in the next round.
        sqlx::query(
            "WITH added_contacts AS ( \
                 INSERT INTO contacts (user_id) SELECT u FROM unnest($1::text[]) AS u \
                 WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.user_id = u OFFSET 0) \
                 ON CONFLICT DO NOTHING), \
             added_events AS ( \
                 INSERT INTO events (user_id, name, occurred_at, properties) \
                 SELECT * FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::jsonb[])), \
             queued AS ( \
                 INSERT INTO eval_queue (entries, users) VALUES ($6, $7)) \
             SELECT pg_notify($8, '')",
        )
        .bind(&users)
        .bind(&ev_users)
        .bind(&ev_names)
        .bind(&ev_times)
        .bind(&ev_props)
        .bind(Value::Array(entries))
        .bind(queued_users)
        .bind(QUEUE_CHANNEL)
        .execute(&mut *tx)
        .await?;
        // Only a property edit writes the contact row; those rows are locked first, in user
        // order, because sweeps and backfills lock their users in that order and an UPDATE's
        // own order could deadlock with them (real-time claims skip locked users and never
        // wait).
        let edited: Vec<(&str, &UserChange)> = changes
            .iter()
            .filter(|(_, c)| !c.set.is_empty() || !c.removed.is_empty())
            .map(|(u, c)| (*u, c))
            .collect();
        if !edited.is_empty() {
            let edited_users: Vec<&str> = edited.iter().map(|(u, _)| *u).collect();
            sqlx::query(
                "SELECT 1 FROM contacts WHERE user_id = ANY($1) ORDER BY user_id FOR NO KEY UPDATE",
            )
            .bind(&edited_users)
            .execute(&mut *tx)
            .await?;
            let sets: Vec<Value> = edited
                .iter()
                .map(|(_, c)| Value::Object(c.set.clone()))
                .collect();
            let removals: Vec<Value> = edited
                .iter()
                .map(|(_, c)| Value::from(c.removed.clone()))
                .collect();
            sqlx::query(
                "UPDATE contacts AS c SET \
                   properties = (c.properties - ARRAY(SELECT jsonb_array_elements_text(r.removed))) || r.set, \
                   updated_at = now() \
                 FROM unnest($1::text[], $2::jsonb[], $3::jsonb[]) AS r(user_id, set, removed) \
                 WHERE c.user_id = r.user_id",
            )
            .bind(&edited_users)
            .bind(&sets)
            .bind(&removals)
            .execute(&mut *tx)
            .await?;
        }
        Ok(outcome)
    }
}

impl Store {
    /// Erases a user: every active membership is closed with a `left` transition (source
    /// `operator`, reason `erased`) and the user's events, properties, pending changes and timers
    /// are deleted, in one transaction. Returns how many memberships were closed.
    pub async fn erase_user(&self, user_id: &str) -> Result<i64> {
        let mut tx = self.pool().begin().await?;
        // Waits for any round evaluating this user, and holds later ones off until we commit.
        sqlx::query("SELECT 1 FROM contacts WHERE user_id = $1 FOR UPDATE")
            .bind(user_id)
            .execute(&mut *tx)
            .await?;
        let closed: i64 = sqlx::query_scalar(
            "WITH closed AS ( \
                 UPDATE memberships SET status = 'left', left_at = now() \
                 WHERE user_id = $1 AND status = 'active' \
                 RETURNING bucket_id, epoch), \
             emitted AS ( \
                 INSERT INTO transitions (key, bucket_id, user_id, kind, epoch, source, reason, occurred_at) \
                 SELECT 'bucket:' || bucket_id || ':' || $1 || ':left:' || epoch, \
                        bucket_id, $1, 'left', epoch, 'operator', 'erased', now() \
                 FROM closed \
                 ON CONFLICT (key) DO NOTHING), \
             counted AS ( \
                 UPDATE buckets b SET member_count = b.member_count - c.closed \
                 FROM (SELECT bucket_id, count(*) AS closed FROM closed GROUP BY bucket_id) c \
                 WHERE b.id = c.bucket_id) \
             SELECT count(*) FROM closed",
        )
        .bind(user_id)
        .fetch_one(&mut *tx)
        .await?;
        if closed > 0 {
            sqlx::query("SELECT pg_notify($1, 'erased')")
                .bind(crate::TRANSITIONS_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        let delete_events = format!(
            "WITH RECURSIVE {} DELETE FROM events e \
             WHERE e.name = ANY({}) AND e.user_id = $1",
            crate::EVENT_NAMES,
            crate::ALL_EVENT_NAMES
        );
        for statement in [
            delete_events.as_str(),
            // The user's entries leave their queue rows, and rows left empty go.
            "WITH touched AS ( \
                 SELECT q.id, coalesce(jsonb_agg(e.entry) FILTER (WHERE e.entry->>'u' <> $1), \
                                       '[]'::jsonb) AS kept \
                 FROM eval_queue q CROSS JOIN LATERAL jsonb_array_elements(q.entries) AS e(entry) \
                 WHERE q.entries @> jsonb_build_array(jsonb_build_object('u', $1)) \
                 GROUP BY q.id), \
             emptied AS ( \
                 DELETE FROM eval_queue q USING touched t \
                 WHERE q.id = t.id AND jsonb_array_length(t.kept) = 0) \
             UPDATE eval_queue q SET entries = t.kept, users = jsonb_array_length(t.kept) \
             FROM touched t WHERE q.id = t.id AND jsonb_array_length(t.kept) > 0",
            // One primary-key probe per recorded bucket (timers have no index on user_id).
            "DELETE FROM timers WHERE ctid = ANY(ARRAY( \
                 SELECT t.ctid FROM buckets b CROSS JOIN LATERAL ( \
                     SELECT ctid FROM timers WHERE bucket_id = b.id AND user_id = $1 LIMIT 1) AS t))",
            "DELETE FROM contacts WHERE user_id = $1",
        ] {
            sqlx::query(statement)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(closed)
    }
}
