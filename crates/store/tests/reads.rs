//! Reads for applications against a real database: member pages that stay stable while
//! members change, a user's buckets with epochs, bucket status, and transitions read past a
//! cursor that never skip one committed late.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::Utc;
use membrane_store::testing::fresh_database;
use membrane_store::{BucketVersion, EntryRule, MemberCursor, Source, Store};

async fn add_bucket(store: &Store, id: &str, time_based: bool) {
    store
        .record_bucket_version(&BucketVersion {
            id: id.to_owned(),
            source_path: format!("buckets/{id}.toml"),
            description: format!("the {id} bucket"),
            definition: "criteria = 'event(\"x\").exists()'".to_owned(),
            criteria_hash: format!("hash-{id}"),
            time_based,
        })
        .await
        .expect("bucket recorded");
}

async fn join(store: &Store, bucket: &str, users: &[&str]) {
    let users: Vec<String> = users.iter().map(|u| (*u).to_owned()).collect();
    let mut round = store.begin_round().await.expect("a round");
    round
        .join(
            bucket,
            &users,
            EntryRule::Unlimited,
            Source::Event,
            "criteria",
            Utc::now(),
        )
        .await
        .expect("joined");
    round.commit().await.expect("committed");
}

async fn leave(store: &Store, bucket: &str, users: &[&str]) {
    let mut round = store.begin_round().await.expect("a round");
    let active: HashMap<String, i32> = round
        .active_members(
            bucket,
            &users.iter().map(|u| (*u).to_owned()).collect::<Vec<_>>(),
        )
        .await
        .expect("active members")
        .into_iter()
        .map(|(user, member)| (user, member.epoch))
        .collect();
    let leaving: Vec<(String, i32)> = active.into_iter().collect();
    round
        .leave(bucket, &leaving, Source::Event, "criteria", Utc::now())
        .await
        .expect("left");
    round.commit().await.expect("committed");
}

fn user(n: usize) -> String {
    format!("user-{n:03}")
}

#[tokio::test]
async fn member_pages_neither_repeat_nor_skip_a_member_while_others_join_and_leave() {
    let db = fresh_database().await.expect("a fresh database");
    let store = &db.store;
    add_bucket(store, "vip", false).await;
    // Even numbers are members from the start; odd ones join during the paging.
    let initial: Vec<String> = (0..60).step_by(2).map(user).collect();
    join(
        store,
        "vip",
        &initial.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    // These leave mid-way; every other initial member stays throughout.
    let leavers: BTreeSet<String> = [user(10), user(30), user(50)].into();

    let mut seen = Vec::new();
    let mut cursor: Option<MemberCursor> = None;
    let mut page_number = 0;
    loop {
        let page = store
            .bucket_members("vip", cursor.as_ref(), 7)
            .await
            .expect("a page")
            .expect("the bucket exists");
        assert!(page.members.len() <= 7);
        seen.extend(page.members.iter().map(|m| m.user_id.clone()));
        // Change the membership between pages: joins before and after the cursor, the leavers
        // go (some already seen, some not yet), and one leaves and comes back.
        match page_number {
            0 => {
                join(store, "vip", &[&user(1), &user(41), &user(59)]).await;
                leave(store, "vip", &[&user(10), &user(50)]).await;
            }
            1 => {
                leave(store, "vip", &[&user(30), &user(2)]).await;
                join(store, "vip", &[&user(2), &user(3), &user(57)]).await;
            }
            _ => {}
        }
        page_number += 1;
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }

    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a user repeated: {seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, seen, "pages are in user order");
    for member in initial
        .iter()
        .filter(|u| !leavers.contains(*u) && **u != user(2))
    {
        assert!(
            seen.contains(member),
            "{member} was a member throughout and was skipped"
        );
    }
    // Joined after the cursor passed them: invisible. Joined ahead of it: seen.
    assert!(!seen.contains(&user(1)) && !seen.contains(&user(3)));
    assert!(seen.contains(&user(41)) && seen.contains(&user(57)) && seen.contains(&user(59)));
    assert!(!seen.contains(&user(50)), "left before its page was read");
}

#[tokio::test]
async fn member_pages_end_with_no_cursor_and_unknown_buckets_are_none() {
    let db = fresh_database().await.expect("a fresh database");
    let store = &db.store;
    add_bucket(store, "small", false).await;
    join(store, "small", &["a", "b"]).await;

    let page = store
        .bucket_members("small", None, 2)
        .await
        .expect("a page")
        .expect("the bucket exists");
    assert_eq!(page.members.len(), 2);
    assert_eq!(
        page.next, None,
        "an exactly full last page has no next page"
    );
    let page = store
        .bucket_members("small", Some(&MemberCursor::after_user("a")), 10)
        .await
        .expect("a page")
        .expect("the bucket exists");
    assert_eq!(page.members[0].user_id, "b");
    assert_eq!(page.members[0].epoch, 1);
    assert!(store
        .bucket_members("nope", None, 10)
        .await
        .expect("a read")
        .is_none());
}

#[test]
fn member_cursors_round_trip_and_reject_what_was_not_handed_out() {
    for user in ["a", "user-001", "ünïcødé 🙂", "with space/and:colon"] {
        let cursor = MemberCursor::after_user(user);
        assert_eq!(MemberCursor::parse(&cursor.token()), Ok(cursor));
    }
    for bad in ["", "abc", "zz", "ff", "c3"] {
        assert!(MemberCursor::parse(bad).is_err(), "{bad:?} was accepted");
    }
}

#[tokio::test]
async fn a_users_buckets_carry_their_epochs() {
    let db = fresh_database().await.expect("a fresh database");
    let store = &db.store;
    for bucket in ["alpha", "beta", "gamma"] {
        add_bucket(store, bucket, false).await;
    }
    join(store, "alpha", &["ana"]).await;
    join(store, "beta", &["ana", "bob"]).await;
    leave(store, "beta", &["ana"]).await;
    join(store, "beta", &["ana"]).await;
    join(store, "gamma", &["bob"]).await;

    let memberships = store.user_memberships("ana").await.expect("a read");
    let summary: Vec<(&str, i32)> = memberships
        .iter()
        .map(|m| (m.bucket_id.as_str(), m.epoch))
        .collect();
    assert_eq!(summary, [("alpha", 1), ("beta", 2)]);
    assert!(memberships[1].entered_at >= memberships[0].entered_at);
    assert!(store
        .user_memberships("nobody")
        .await
        .expect("a read")
        .is_empty());
}

#[tokio::test]
async fn bucket_status_tells_backfill_errors_and_counts() {
    let db = fresh_database().await.expect("a fresh database");
    let store = &db.store;
    add_bucket(store, "fresh", true).await;
    add_bucket(store, "done", false).await;
    let mut round = store.begin_round().await.expect("a round");
    round
        .mark_backfilled("done", "hash-done")
        .await
        .expect("marked");
    round.commit().await.expect("committed");
    join(store, "done", &["a", "b", "c"]).await;
    store
        .record_bucket_error("done", "buckets/done.toml", "broken", "error: oops")
        .await
        .expect("error recorded");

    let statuses = store.bucket_statuses().await.expect("a read");
    let ids: Vec<&str> = statuses.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["done", "fresh"]);
    let done = store
        .bucket_status("done")
        .await
        .expect("a read")
        .expect("known");
    assert!(done.backfilled && done.enabled && !done.time_based);
    assert_eq!(done.member_count, 3);
    assert_eq!(done.status, "error");
    assert_eq!(done.last_error.as_deref(), Some("error: oops"));
    assert_eq!(done.criteria_hash, "hash-done");
    let fresh = &statuses[1];
    assert!(!fresh.backfilled && fresh.time_based && fresh.last_error.is_none());
    assert!(store.bucket_status("nope").await.expect("a read").is_none());
}

#[tokio::test]
async fn transitions_since_pages_by_id_and_filters_by_bucket() {
    let db = fresh_database().await.expect("a fresh database");
    let store = &db.store;
    add_bucket(store, "one", false).await;
    add_bucket(store, "two", false).await;
    join(store, "one", &["a", "b"]).await;
    join(store, "two", &["a"]).await;
    leave(store, "one", &["a"]).await;

    let first = store.transitions_since(0, 2, None).await.expect("a read");
    assert_eq!(first.transitions.len(), 2);
    assert_eq!(first.next, first.transitions[1].id);
    let rest = store
        .transitions_since(first.next, 10, None)
        .await
        .expect("a read");
    assert_eq!(rest.transitions.len(), 2);
    assert!(rest.transitions[0].id > first.next);
    let end = store
        .transitions_since(rest.next, 10, None)
        .await
        .expect("a read");
    assert!(end.transitions.is_empty());
    assert_eq!(end.next, rest.next, "an empty page keeps the cursor");

    let one = store
        .transitions_since(0, 10, Some("one"))
        .await
        .expect("a read");
    let kinds: Vec<(&str, &str)> = one
        .transitions
        .iter()
        .map(|t| (t.user_id.as_str(), t.kind.as_str()))
        .collect();
    assert_eq!(kinds.len(), 3);
    assert!(one.transitions.iter().all(|t| t.bucket_id == "one"));
    assert!(kinds.contains(&("a", "left")));
}

/// Transaction A draws a transition id, B draws a later one and commits first. A reader must
/// not hand out B's id as a cursor while A can still commit below it.
#[tokio::test]
async fn a_transition_committed_late_below_the_cursor_is_never_skipped() {
    let db = fresh_database().await.expect("a fresh database");
    let store = &db.store;
    // Two buckets, so that the rounds do not wait for each other's member count.
    add_bucket(store, "slow", false).await;
    add_bucket(store, "fast", false).await;

    let mut slow = store.begin_round().await.expect("a round");
    slow.join(
        "slow",
        &["early-id".to_owned()],
        EntryRule::Unlimited,
        Source::Event,
        "criteria",
        Utc::now(),
    )
    .await
    .expect("joined, not committed");
    join(store, "fast", &["late-id"]).await;

    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.transitions_since(0, 10, None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !reader.is_finished(),
        "the read answered while an earlier id was uncommitted"
    );
    slow.commit().await.expect("committed");
    let page = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the read ends once the writer commits")
        .expect("the task ran")
        .expect("a read");
    let users: Vec<&str> = page
        .transitions
        .iter()
        .map(|t| t.user_id.as_str())
        .collect();
    assert_eq!(users, ["early-id", "late-id"], "both, in id order");
}
