//! Hot reload covers plugin modules: rebuilding `plugins/x.wasm` swaps the bucket's predicate
//! just as editing its bucket file would.

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::Utc;
use membrane_criteria::{compile::compile, parser::parse_criteria, plan::Plan};
use membrane_engine::EngineConfig;
use membrane_store::testing::fresh_database;
use membrane_store::{Message, Store};

/// A predicate module, as a plugin would ship it, compiled from criteria text.
fn module(criteria: &str) -> Vec<u8> {
    let expr = parse_criteria(criteria).unwrap();
    compile(&Plan::new(&expr).unwrap()).wasm
}

async fn track(store: &Store, user: &str, event: &str) {
    let message = Message::Track {
        message_id: None,
        user_id: user.to_owned(),
        event: event.to_owned(),
        occurred_at: Utc::now(),
        properties: Default::default(),
    };
    store.ingest(&[message]).await.unwrap();
}

async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuilt_plugin_module_is_reloaded() {
    let db = fresh_database().await.unwrap();
    let store = db.store.clone();
    let root = tempfile::tempdir().unwrap();
    let (buckets, plugins) = (root.path().join("buckets"), root.path().join("plugins"));
    std::fs::create_dir(&buckets).unwrap();
    std::fs::create_dir(&plugins).unwrap();
    write(
        &plugins.join("signal.wasm"),
        &module(r#"event("ping").exists()"#),
    );
    write(
        &buckets.join("signal.toml"),
        b"plugin = \"plugins/signal.wasm\"\n",
    );
    let engine = membrane_engine::start(store.clone(), EngineConfig::new(buckets.clone()))
        .await
        .unwrap();
    let first = engine.registry().buckets["signal"].hash.clone();

    track(&store, "pinger", "ping").await;
    eventually("pinger to join", async || {
        store.is_member("signal", "pinger").await.unwrap()
    })
    .await;

    write(
        &plugins.join("signal.wasm"),
        &module(r#"event("pong").exists()"#),
    );
    eventually("the rebuilt module to serve", async || {
        engine.registry().buckets["signal"].hash != first
    })
    .await;
    track(&store, "ponger", "pong").await;
    eventually("ponger to join through the new module", async || {
        store.is_member("signal", "ponger").await.unwrap()
    })
    .await;
    engine.shutdown().await;
}

/// A bucket recorded by an engine that has since stopped, and whose file this engine does not
/// have, is retired instead of holding up the queue.
#[tokio::test(flavor = "multi_thread")]
async fn buckets_only_a_stopped_engine_served_do_not_hold_up_the_queue() {
    let db = fresh_database().await.unwrap();
    let store = db.store.clone();
    let first = tempfile::tempdir().unwrap();
    write(
        &first.path().join("old.toml"),
        b"criteria = 'event(\"ping\").exists()'\n",
    );
    let engine = membrane_engine::start(store.clone(), EngineConfig::new(first.path().into()))
        .await
        .unwrap();
    engine.shutdown().await;

    let second = tempfile::tempdir().unwrap();
    write(
        &second.path().join("new.toml"),
        b"criteria = 'event(\"ping\").exists()'\n",
    );
    let engine = membrane_engine::start(store.clone(), EngineConfig::new(second.path().into()))
        .await
        .unwrap();
    track(&store, "pinger", "ping").await;
    eventually("pinger to join the new bucket", async || {
        store.is_member("new", "pinger").await.unwrap()
    })
    .await;
    engine.shutdown().await;
}
