//! Claiming the evaluation queue: one row per ingest transaction, claimed oldest first up to
//! about the round's number of users; users another round holds go back to the queue.

use chrono::Utc;
use membrane_store::testing::fresh_database;
use membrane_store::{Message, Store};

fn visit(user: &str) -> Message {
    Message::Track {
        message_id: None,
        user_id: user.to_owned(),
        event: "visit".into(),
        occurred_at: Utc::now(),
        properties: Default::default(),
    }
}

async fn ingest(store: &Store, users: &[&str]) {
    let messages: Vec<Message> = users.iter().map(|user| visit(user)).collect();
    store.ingest(&messages).await.expect("ingest");
}

fn ids(claimed: &[membrane_store::QueuedUser]) -> Vec<&str> {
    claimed.iter().map(|user| user.user_id.as_str()).collect()
}

#[tokio::test]
async fn rows_are_claimed_oldest_first_until_the_round_is_full() {
    let db = fresh_database().await.expect("a database");
    let store = &db.store;
    ingest(store, &["a", "b"]).await;
    ingest(store, &["c", "d"]).await;
    ingest(store, &["e"]).await;
    assert_eq!(store.queued_changes().await.expect("queue"), 5);

    // Three users asked: the first row holds two, so the second is taken too, and the third
    // stays for the next round.
    let mut round = store.begin_round().await.expect("a round");
    let claimed = round.claim_queue(3).await.expect("a claim");
    assert_eq!(ids(&claimed), ["a", "b", "c", "d"]);
    round.commit().await.expect("commit");
    assert_eq!(store.queued_changes().await.expect("queue"), 1);
}

#[tokio::test]
async fn users_another_round_holds_are_queued_again_for_after_it() {
    let db = fresh_database().await.expect("a database");
    let store = &db.store;
    ingest(store, &["a"]).await;
    ingest(store, &["a", "b"]).await;

    // The first round takes the first row and holds `a`.
    let mut first = store.begin_round().await.expect("a round");
    assert_eq!(ids(&first.claim_queue(1).await.expect("a claim")), ["a"]);
    // The second takes the other row, evaluates `b` and puts `a`'s newer change back.
    let mut second = store.begin_round().await.expect("a round");
    let claimed = second.claim_queue(10).await.expect("a claim");
    assert_eq!(ids(&claimed), ["b"]);
    second.commit().await.expect("commit");
    assert_eq!(store.queued_changes().await.expect("queue"), 2);

    first.commit().await.expect("commit");
    let mut third = store.begin_round().await.expect("a round");
    let claimed = third.claim_queue(10).await.expect("a claim");
    assert_eq!(ids(&claimed), ["a"]);
    assert_eq!(claimed[0].event_names, ["visit"]);
    third.commit().await.expect("commit");
    assert_eq!(store.queued_changes().await.expect("queue"), 0);
}
