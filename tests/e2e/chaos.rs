//! The short chaos run in CI: three real `membrane run` processes under steady ingest, each
//! SIGKILLed and restarted ten times at random moments, through the same driver as
//! `membrane bench chaos` (which checks memberships against the reference evaluator, the
//! facts against what was sent, and every history and outbox key). This test reads the
//! database again on its own afterwards.

use std::collections::HashSet;

use membrane_store::testing::fresh_database;

use crate::support::run_bench;

const KILLS_PER_ENGINE: usize = 10;

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_engines_lose_and_duplicate_nothing() {
    let db = fresh_database().await.expect("a fresh test database");
    let kills = KILLS_PER_ENGINE.to_string();
    let args = [
        "chaos",
        "--database-url",
        &db.url,
        "--engines",
        "3",
        "--kills-per-engine",
        &kills,
        "--users",
        "300",
        "--seconds",
        "35",
        "--rate",
        "150",
    ];
    let output = run_bench(args.map(str::to_owned).to_vec()).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr:\n{stderr}"));
    assert!(
        output.status.success() && report["ok"] == true,
        "chaos run failed:\n{report:#}\nstderr:\n{stderr}"
    );

    let kills: Vec<u64> = report["kills_per_engine"]
        .as_array()
        .expect("kills per engine")
        .iter()
        .map(|k| k.as_u64().expect("a count"))
        .collect();
    assert_eq!(kills.len(), 3, "{report:#}");
    assert!(
        kills.iter().all(|&k| k >= KILLS_PER_ENGINE as u64),
        "{report:#}"
    );
    // The run was not vacuous: every bucket has members and the engines wrote transitions
    // from the real-time path and from the clock (the dwell marks). Which clock path writes a
    // mark, the timer or a sweep that found it overdue after a kill, is a race, so only their
    // sum is asserted; sweeps.rs pins the sweep path down deterministically.
    let members = report["members"].as_object().expect("members per bucket");
    assert_eq!(members.len(), 5, "{report:#}");
    let by_source = &report["transitions_by_source"];
    let written_by = |source: &str| by_source[source].as_u64().unwrap_or(0);
    assert!(written_by("event") > 100, "{report:#}");
    assert!(written_by("timer") + written_by("sweep") > 0, "{report:#}");

    // Independently of the driver: every outbox key once, member counts exact.
    let transitions = db.store.audit_transitions().await.expect("transitions");
    let keys: HashSet<&str> = transitions.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(
        keys.len(),
        transitions.len(),
        "a transition key appears twice"
    );
    for bucket in db.store.audit_buckets().await.expect("buckets") {
        assert_eq!(bucket.member_count, bucket.active_rows, "{bucket:?}");
    }
}
