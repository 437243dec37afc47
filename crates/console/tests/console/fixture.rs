//! A fixed, in-memory scene for console tests: no database, no wall clock.

use chrono::{DateTime, TimeDelta, Utc};
use membrane_store::console::{
    BucketDetail, BucketSummary, ConsoleSnapshot, DatabaseInfo, EngineHeartbeat, MemberRow,
    QueueStats, SweepRun, TransitionRow,
};

pub const BIG_SPENDERS_ERROR: &str = "\
error: expected a comparison operator
 --> buckets/big-spenders.toml:3:14
  |
3 |   prop(\"ltv\") >> 1000
  |              ^^ expected one of ==, !=, <, <=, >, >=";

pub fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2025-01-01T12:00:00Z")
        .expect("valid timestamp")
        .to_utc()
}

fn ago(seconds: i64) -> DateTime<Utc> {
    now() - TimeDelta::seconds(seconds)
}

fn bucket(id: &str, description: &str, member_count: i64) -> BucketSummary {
    BucketSummary {
        id: id.to_owned(),
        description: description.to_owned(),
        enabled: true,
        status: "ok".to_owned(),
        last_error: None,
        time_based: false,
        member_count,
        entered_1m: 0,
        left_1m: 0,
        updated_at: ago(3_600),
        last_sweep: None,
        backfilled: true,
        backfill: None,
    }
}

pub fn sweep(bucket_id: &str, finished_seconds_ago: i64) -> SweepRun {
    SweepRun {
        bucket_id: bucket_id.to_owned(),
        engine_id: "engine-a".to_owned(),
        started_at: ago(finished_seconds_ago) - TimeDelta::milliseconds(250),
        finished_at: ago(finished_seconds_ago),
        checked: 1_204,
        joined: 3,
        left_count: 1,
    }
}

fn transition(
    id: i64,
    bucket_id: &str,
    user_id: &str,
    kind: &str,
    seconds_ago: i64,
) -> TransitionRow {
    TransitionRow {
        id,
        key: format!("bucket:{bucket_id}:{user_id}:{kind}:1"),
        bucket_id: bucket_id.to_owned(),
        user_id: user_id.to_owned(),
        kind: kind.to_owned(),
        epoch: 1,
        label: None,
        source: "event".to_owned(),
        reason: "criteria".to_owned(),
        occurred_at: ago(seconds_ago),
    }
}

/// Three buckets (one time-based and swept, one failing, one disabled), a feed of every kind of
/// transition, one live engine and a small queue. `active_users` sets the first bucket's size so
/// successive snapshots build a trend.
pub fn snapshot(active_users: i64) -> ConsoleSnapshot {
    let active = BucketSummary {
        time_based: true,
        entered_1m: 12,
        left_1m: 4,
        last_sweep: Some(sweep("active-users", 42)),
        ..bucket(
            "active-users",
            "Had a session in the last 7 days",
            active_users,
        )
    };
    let failing = BucketSummary {
        status: "error".to_owned(),
        last_error: Some(BIG_SPENDERS_ERROR.to_owned()),
        entered_1m: 1,
        ..bucket("big-spenders", "Lifetime value over 1000", 87)
    };
    let disabled = BucketSummary {
        enabled: false,
        ..bucket("newsletter", "Subscribed to the newsletter", 0)
    };
    let dwell = TransitionRow {
        kind: "dwell".to_owned(),
        label: Some("1d".to_owned()),
        source: "timer".to_owned(),
        reason: "dwell".to_owned(),
        ..transition(104, "active-users", "alice", "dwell", 2)
    };
    let left_by_timer = TransitionRow {
        epoch: 2,
        source: "timer".to_owned(),
        ..transition(103, "active-users", "carol", "left", 5)
    };
    ConsoleSnapshot {
        taken_at: now(),
        database: DatabaseInfo {
            name: "membrane".to_owned(),
            server: "10.0.0.5:5432".to_owned(),
        },
        buckets: vec![active, failing, disabled],
        transitions: vec![
            dwell,
            left_by_timer,
            transition(102, "big-spenders", "bob", "entered", 9),
            transition(101, "active-users", "bob", "entered", 14),
        ],
        engines: vec![EngineHeartbeat {
            id: "engine-a".to_owned(),
            host: "worker-1".to_owned(),
            pid: 4242,
            started_at: ago(7_200),
            last_seen_at: ago(1),
            stats: r#"{"timers_due": 2, "workers": 4}"#.parse().expect("valid JSON"),
        }],
        queue: QueueStats {
            depth: 17,
            depth_capped: false,
            oldest_enqueued_at: Some(ago(3)),
        },
    }
}

pub fn big_spenders_detail() -> BucketDetail {
    let member = |user_id: &str, epoch: i32, seconds_ago: i64| MemberRow {
        user_id: user_id.to_owned(),
        epoch,
        entered_at: ago(seconds_ago),
    };
    BucketDetail {
        id: "big-spenders".to_owned(),
        source_path: "buckets/big-spenders.toml".to_owned(),
        definition: "description = \"Lifetime value over 1000\"\ncriteria = '''\n  prop(\"ltv\") > 1000\n'''".to_owned(),
        criteria_hash: "9f2c4e1a7b3d5f60".to_owned(),
        backfilled_hash: Some("9f2c4e1a7b3d5f60".to_owned()),
        members: vec![member("alice", 1, 86_400), member("bob", 2, 9)],
        transitions: vec![transition(102, "big-spenders", "bob", "entered", 9)],
        sweeps: vec![sweep("big-spenders", 120), sweep("big-spenders", 720)],
    }
}
