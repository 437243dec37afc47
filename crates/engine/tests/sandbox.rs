//! A bucket version that faults at run time is taken out of service alone: the version it
//! replaced serves again, other buckets never notice, and the fault is persisted for the
//! console and the CLI.

use std::time::{Duration, Instant};

use chrono::Utc;
use membrane_engine::EngineConfig;
use membrane_store::testing::fresh_database;
use membrane_store::{Message, Store};

/// A plugin that counts `ping`s and traps once a user has three of them. It passes the load
/// checks (its trial run sees no pings) and faults only on real data.
const TRAPS_AT_THREE_PINGS: &str = r#"
(module
  (@custom "membrane.facts" "{\"abi\":1,\"facts\":[{\"kind\":\"event_count\",\"event\":\"ping\"}]}")
  (memory (export "memory") 1)
  (func (export "membrane_abi_version") (result i32) i32.const 1)
  (func (export "membrane_alloc") (param $bytes i32) (result i32)
    (local $needed i32)
    (local.set $needed
      (i32.sub (i32.shr_u (i32.add (i32.add (local.get $bytes) (i32.const 1024)) (i32.const 65535))
                          (i32.const 16))
               (memory.size)))
    (if (i32.gt_s (local.get $needed) (i32.const 0))
      (then (if (i32.lt_s (memory.grow (local.get $needed)) (i32.const 0))
        (then (return (i32.const -1))))))
    (i32.const 1024))
  (func (export "membrane_eval") (param $in i32) (param $users i32) (param $out i32) (param $now i64) (result i32)
    (local $i i32) (local $count i64)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $users)))
        (local.set $count (i64.load offset=8 (i32.add (local.get $in) (i32.mul (local.get $i) (i32.const 16)))))
        (if (i64.ge_s (local.get $count) (i64.const 3)) (then unreachable))
        (i32.store8 (i32.add (local.get $out) (local.get $i)) (i64.gt_s (local.get $count) (i64.const 0)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.const 0)))
"#;

async fn ping(store: &Store, user: &str, times: usize) {
    let messages: Vec<Message> = (0..times)
        .map(|_| Message::Track {
            message_id: None,
            user_id: user.to_owned(),
            event: "ping".to_owned(),
            occurred_at: Utc::now(),
            properties: Default::default(),
        })
        .collect();
    store.ingest(&messages).await.unwrap();
}

async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_faulting_version_is_replaced_by_the_one_before_it() {
    let db = fresh_database().await.unwrap();
    let store = db.store.clone();
    let dir = tempfile::tempdir().unwrap();
    let buckets = dir.path().join("buckets");
    std::fs::create_dir(&buckets).unwrap();
    std::fs::write(
        buckets.join("flaky.toml"),
        "criteria = 'event(\"ping\").exists()'\n",
    )
    .unwrap();
    std::fs::write(
        buckets.join("steady.toml"),
        "criteria = 'event(\"ping\").count() >= 1'\n",
    )
    .unwrap();
    let engine = membrane_engine::start(store.clone(), EngineConfig::new(buckets.clone()))
        .await
        .unwrap();
    let first_version = engine.registry().buckets["flaky"].hash.clone();

    let plugin = dir.path().join("traps.wasm");
    std::fs::write(&plugin, wat::parse_str(TRAPS_AT_THREE_PINGS).unwrap()).unwrap();
    std::fs::write(
        buckets.join("flaky.toml"),
        format!("plugin = {:?}\n", plugin.display().to_string()),
    )
    .unwrap();
    eventually("the plugin version to serve", async || {
        engine.registry().buckets["flaky"].hash != first_version
    })
    .await;

    ping(&store, "calm", 1).await;
    eventually("calm to join flaky under the plugin", async || {
        store.is_member("flaky", "calm").await.unwrap()
    })
    .await;

    ping(&store, "loud", 3).await;
    eventually("loud to join through the previous version", async || {
        store.is_member("flaky", "loud").await.unwrap()
    })
    .await;
    assert_eq!(engine.registry().buckets["flaky"].hash, first_version);
    assert!(store.is_member("steady", "loud").await.unwrap());

    let snapshot = membrane_store::console::snapshot(&store, 10).await.unwrap();
    let flaky = snapshot.buckets.iter().find(|b| b.id == "flaky").unwrap();
    assert_eq!(flaky.status, "error");
    let error = flaky.last_error.clone().unwrap_or_default();
    assert!(error.contains("faulted at run time"), "{error}");
    assert!(error.contains("previous version"), "{error}");

    // The faulted version is not loaded again while its file is unchanged.
    std::fs::write(
        buckets.join("steady.toml"),
        "criteria = 'event(\"ping\").count() >= 2'\n",
    )
    .unwrap();
    eventually("the steady edit to serve", async || {
        store.member_count("steady").await.unwrap() == Some(1)
    })
    .await;
    assert_eq!(engine.registry().buckets["flaky"].hash, first_version);
    engine.shutdown().await;
}
