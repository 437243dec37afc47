//! Segment's official Python library (segment-analytics-python) sends to a real `membrane run`
//! over its own transport (gzip, HTTP Basic write key, background batches with `sentAt`), and
//! the memberships change as the buckets say.
//!
//! The library is installed once into a virtualenv under the cargo target dir and reused; an
//! install that fails fails the test (it needs PyPI, which CI reaches).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::{repo_root, RunningEngine, WRITE_KEY};

/// Pinned, so a new release cannot change what this test exercises unnoticed.
const LIBRARY: &str = "segment-analytics-python==2.4.0";

const BUCKETS: &[(&str, &str)] = &[
    ("pro.toml", "criteria = 'prop(\"plan\") == \"pro\"'\n"),
    (
        "buyers.toml",
        "criteria = 'event(\"Order Completed\").exists()'\n",
    ),
    (
        "recent-buyers.toml",
        "criteria = 'event(\"Order Completed\").within(1d).exists()'\n",
    ),
    (
        "pricing-viewers.toml",
        "criteria = 'event(\"Viewed Pricing Page\").where(prop(\"path\") == \"/pricing\").exists()'\n",
    ),
    (
        "regulars.toml",
        "criteria = 'event(\"ping\").count() >= 5'\n",
    ),
    ("free.toml", "criteria = 'prop(\"plan\") == \"free\"'\n"),
];

/// The virtualenv's Python with the library importable, installing it on first use.
fn python_with_library() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("segment-analytics-python-2.4.0");
    let python = venv.join("bin").join("python");
    let installed = venv.join(".installed");
    if installed.exists() {
        return python;
    }
    // A half-made venv from an interrupted install is rebuilt from scratch.
    let _ = std::fs::remove_dir_all(&venv);
    run_install(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    run_install(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(LIBRARY),
    );
    std::fs::write(&installed, LIBRARY).expect("the install marker is written");
    python
}

fn run_install(command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?} (is python3 installed?): {e}"));
    assert!(
        output.status.success(),
        "installing {LIBRARY} failed: {command:?}\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn official_python_library_changes_memberships() {
    let python = python_with_library();
    let engine = RunningEngine::start(BUCKETS).await;
    let script = repo_root().join("tests/e2e/segment_client/send.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .args([engine.base_url.as_str(), WRITE_KEY])
        .output()
        .await
        .expect("the client script runs");
    assert!(
        output.status.success(),
        "the Segment client failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let expected = [
        ("pro", "ada"),
        ("buyers", "ada"),
        ("recent-buyers", "ada"),
        ("buyers", "grace"),
        ("pricing-viewers", "lin"),
        ("regulars", "bob"),
        ("free", "anon-7"),
    ];
    for (bucket, user) in expected {
        let key = format!("bucket:{bucket}:{user}:entered:1");
        engine
            .wait_for_transition(Duration::from_secs(10), |t| t.key == key)
            .await;
    }
    // Grace's order is three days old by the client's clock (`timestamp` against the batch's
    // `sentAt`): she bought, but not recently. Her event was evaluated with her `buyers` entry.
    let grace_is_recent = engine
        .db
        .store
        .is_member("recent-buyers", "grace")
        .await
        .expect("membership readable");
    assert!(!grace_is_recent, "a three-day-old order counted as recent");
    let mut entered: Vec<String> = engine
        .transitions()
        .await
        .into_iter()
        .map(|t| t.key)
        .collect();
    entered.sort();
    let mut wanted: Vec<String> = expected
        .iter()
        .map(|(bucket, user)| format!("bucket:{bucket}:{user}:entered:1"))
        .collect();
    wanted.sort();
    assert_eq!(entered, wanted);
    // Every message arrived once: the pings came in several batches of two.
    let metrics = engine.metrics().await;
    assert!(
        metrics.contains("membrane_ingested_messages_total 10"),
        "{metrics}"
    );
}

/// Compressed bodies the engine cannot use are refused precisely, and nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn unusable_compressed_bodies_are_refused() {
    use std::io::Write;
    let engine = RunningEngine::start(BUCKETS).await;
    let gzip = |bytes: &[u8]| {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(bytes).expect("writing to a Vec");
        encoder.finish().expect("finishing into a Vec")
    };
    let message = br#"{"userId": "ada", "event": "ping"}"#;
    // 600 KiB of spaces inside the JSON: small compressed, too large inflated.
    let mut bomb = br#"{"userId": "ada", "event": "ping""#.to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 600 * 1024));
    bomb.push(b'}');
    let cases = [
        (
            "br",
            message.to_vec(),
            415,
            "unsupported Content-Encoding `br`",
        ),
        ("gzip", message.to_vec(), 400, "the gzip body is corrupt"),
        (
            "gzip",
            gzip(&bomb),
            413,
            "inflates to more than 524288 bytes",
        ),
    ];
    let http = reqwest::Client::new();
    for (encoding, body, status, wanted) in cases {
        let response = http
            .post(format!("{}/v1/track", engine.base_url))
            .basic_auth(WRITE_KEY, Some(""))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(body)
            .send()
            .await
            .expect("the engine answers");
        assert_eq!(response.status(), status, "{encoding}");
        let error: serde_json::Value = response.json().await.expect("a JSON error");
        let text = error["error"]["message"].as_str().unwrap_or_default();
        assert!(text.contains(wanted), "{encoding}: {error}");
        assert_eq!(error["error"]["pointer"], "", "{error}");
    }
    let accepted = http
        .post(format!("{}/v1/track", engine.base_url))
        .basic_auth(WRITE_KEY, Some(""))
        .header("content-encoding", "gzip")
        .body(gzip(message))
        .send()
        .await
        .expect("the engine answers");
    assert_eq!(accepted.status(), 200);
    let metrics = engine.metrics().await;
    // Only the well-formed gzip body was applied.
    assert!(
        metrics.contains("membrane_ingested_messages_total 1\n"),
        "{metrics}"
    );
}
