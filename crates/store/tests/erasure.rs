//! Erasing a contact closes its memberships with `left` (reason `erased`) and removes its
//! events, properties and pending changes.

use chrono::Utc;
use membrane_store::testing::fresh_database;
use membrane_store::{EntryRule, Message, Source};

#[tokio::test]
async fn erasure_closes_memberships_and_removes_the_users_data() {
    let db = fresh_database().await.unwrap();
    let store = &db.store;
    let traits = serde_json::json!({"tier": "gold"})
        .as_object()
        .cloned()
        .unwrap();
    store
        .ingest(&[
            Message::Identify {
                message_id: None,
                user_id: "ana".into(),
                traits,
            },
            Message::Track {
                message_id: None,
                user_id: "ana".into(),
                event: "ping".into(),
                occurred_at: Utc::now(),
                properties: Default::default(),
            },
            // Bob's change shares ana's queue row and must outlive her erasure.
            Message::Track {
                message_id: None,
                user_id: "bob".into(),
                event: "ping".into(),
                occurred_at: Utc::now(),
                properties: Default::default(),
            },
        ])
        .await
        .unwrap();
    sqlx::query("INSERT INTO buckets (id, source_path, definition, criteria_hash) VALUES ('vip', 'x', 'x', 'h')")
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO timers (bucket_id, user_id, due_at) VALUES \
         ('vip', 'ana', now() + interval '1 day'), ('vip', 'bob', now() + interval '1 day')",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let mut round = store.begin_round().await.unwrap();
    round
        .join(
            "vip",
            &["ana".to_owned()],
            EntryRule::Unlimited,
            Source::Event,
            "criteria",
            Utc::now(),
        )
        .await
        .unwrap();
    round.commit().await.unwrap();
    assert_eq!(store.member_count("vip").await.unwrap(), Some(1));

    assert_eq!(store.erase_user("ana").await.unwrap(), 1);

    assert_eq!(store.member_count("vip").await.unwrap(), Some(0));
    assert!(!store.is_member("vip", "ana").await.unwrap());
    let transitions = store.transitions_after(0, 10).await.unwrap();
    let left = transitions.iter().find(|t| t.kind == "left").unwrap();
    assert_eq!(left.key, "bucket:vip:ana:left:1");
    assert_eq!(
        (left.source.as_str(), left.reason.as_str()),
        ("operator", "erased")
    );
    let queued: Vec<String> = sqlx::query_scalar(
        "SELECT e.entry->>'u' FROM eval_queue q \
         CROSS JOIN LATERAL jsonb_array_elements(q.entries) AS e(entry)",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(queued, ["bob"], "the queue keeps bob's change only");
    let timers: Vec<String> = sqlx::query_scalar("SELECT user_id FROM timers")
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(timers, ["bob"], "ana's timer is gone, bob's stays");
    for table in ["events", "contacts"] {
        let remaining: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {table} WHERE user_id = 'ana'"
        ))
        .fetch_one(store.pool())
        .await
        .unwrap();
        assert_eq!(remaining, 0, "{table} still holds ana");
    }
    // Erasing again is harmless.
    assert_eq!(store.erase_user("ana").await.unwrap(), 0);
}

/// An ingest that commits while its user is being erased can leave a queue entry whose contact
/// is gone. Nothing can be locked for it, yet it must not stay queued for ever; and it is not
/// evaluated, since only locked users are.
#[tokio::test]
async fn a_queue_entry_without_a_contact_is_removed_unevaluated() {
    let db = fresh_database().await.expect("a database");
    let store = &db.store;
    sqlx::query(
        "INSERT INTO eval_queue (entries, users) VALUES ('[{\"u\": \"ghost\", \"e\": [\"visit\"], \"p\": []}]', 1)",
    )
        .execute(store.pool())
        .await
        .expect("an orphan entry");
    let mut round = store.begin_round().await.expect("a round");
    let claimed = round.claim_queue(10).await.expect("a claim");
    assert_eq!(claimed, []);
    round.commit().await.expect("commit");
    assert_eq!(store.queued_changes().await.expect("queue"), 0);
}
