//! `membrane run` configured by a `membrane.toml` (flag > environment > file), read over HTTP
//! and with the read commands of the CLI.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use membrane_store::testing::fresh_database;
use serde_json::{json, Value};

use crate::support::{eventually, BINARY};

const BUYERS: &str = r#"
description = "Bought something"
criteria = 'event("purchase").exists()'
"#;

/// Kills the process when the test ends, however it ends.
struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `membrane ARGS --config CONFIG` with no database in the environment, so only the file
/// can supply it.
fn membrane(config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("DATABASE_URL")
        .env_remove("MEMBRANE_WRITE_KEYS")
        .env_remove("MEMBRANE_READ_TOKENS")
        .env_remove("MEMBRANE_CONFIG")
        .env("RUST_LOG", "warn");
    command
}

fn output(mut command: Command) -> Output {
    command.output().expect("membrane runs")
}

fn stdout_json(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_file_runs_the_engine_and_reads_work_over_http_and_the_cli() {
    let db = fresh_database().await.expect("a fresh test database");
    let dir = tempfile::tempdir().expect("a temp dir");
    let buckets = dir.path().join("segments");
    std::fs::create_dir(&buckets).expect("bucket dir");
    std::fs::write(buckets.join("buyers.toml"), BUYERS).expect("bucket file");
    let config = dir.path().join("membrane.toml");
    std::fs::write(
        &config,
        format!(
            r#"
database_url = "{url}"
listen = "127.0.0.1:0"
buckets = "{buckets}"
sweep_interval = "1m"
write_keys = ["file-write-key"]
read_tokens = ["file-read-token"]
log_format = "json"

[webhooks]
max_attempts = 3
"#,
            url = db.url,
            buckets = buckets.display()
        ),
    )
    .expect("config written");

    // The environment beats the file's write keys; a flag beats its read tokens.
    let mut run = membrane(&config, &["run", "--read-token", "flag-read-token"]);
    run.env("MEMBRANE_WRITE_KEYS", "env-write-key")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut engine = Engine(run.spawn().expect("membrane run starts"));
    let stdout = engine.0.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the engine prints its address");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let http = reqwest::Client::new();
    let track = |key: &'static str, user: &'static str| {
        let request = http
            .post(format!("{base}/v1/track"))
            .bearer_auth(key)
            .json(&json!({"userId": user, "event": "purchase"}));
        async move { request.send().await.expect("an answer").status() }
    };
    let read = |token: &'static str, path: String| {
        let request = http.get(format!("{base}{path}")).bearer_auth(token);
        async move {
            let response = request.send().await.expect("an answer");
            let status = response.status();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };

    assert_eq!(
        track("file-write-key", "ana").await,
        401,
        "the env key replaces the file's"
    );
    assert_eq!(track("env-write-key", "ana").await, 200);
    assert_eq!(read("file-read-token", "/v1/buckets".into()).await.0, 401);

    // The engine found its buckets where the file said, and ana entered.
    // (The backfill of the new bucket and ana's real-time join may commit in either order.)
    let bucket = eventually(Duration::from_secs(10), "ana in buyers", || async {
        let (status, body) = read("flag-read-token", "/v1/buckets/buyers".into()).await;
        assert_eq!(status, 200, "{body}");
        (body["count"] == json!(1) && body["backfilled"] == json!(true)).then_some(body)
    })
    .await;
    assert_eq!(bucket["status"], json!("ok"), "{bucket}");
    let (_, transitions) = read("flag-read-token", "/v1/transitions".into()).await;
    let cursor = transitions["next"].as_i64().expect("a cursor");

    // A long-poll answers when bob's transition commits.
    let waiting = {
        let request = http
            .get(format!("{base}/v1/transitions?after={cursor}&wait=20"))
            .bearer_auth("flag-read-token");
        tokio::spawn(async move {
            let started = Instant::now();
            let body: Value = request
                .send()
                .await
                .expect("an answer")
                .json()
                .await
                .expect("JSON");
            (body, started.elapsed())
        })
    };
    // So does `membrane transitions --follow`, one JSON line per transition.
    let mut follow = membrane(
        &config,
        &[
            "transitions",
            "--follow",
            "--format",
            "json",
            "--after",
            &cursor.to_string(),
        ],
    );
    follow.stdout(Stdio::piped());
    let mut follower = Engine(follow.spawn().expect("membrane transitions starts"));
    let follower_out = follower.0.stdout.take().expect("piped stdout");
    let (lines, followed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(follower_out).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(track("env-write-key", "bob").await, 200);
    let (body, waited) = waiting.await.expect("the long-poll ran");
    assert!(waited < Duration::from_secs(10), "waited {waited:?}");
    assert_eq!(
        body["transitions"][0]["key"],
        json!("bucket:buyers:bob:entered:1")
    );
    let line = followed
        .recv_timeout(Duration::from_secs(10))
        .expect("--follow prints the new transition");
    let followed: Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(followed["key"], json!("bucket:buyers:bob:entered:1"));
    drop(follower);

    let (status, members) = read(
        "flag-read-token",
        "/v1/buckets/buyers/members?limit=1".into(),
    )
    .await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(members["members"][0]["user_id"], json!("ana"));
    let next = members["next"].as_str().expect("a second page").to_owned();
    let (_, rest) = read(
        "flag-read-token",
        format!("/v1/buckets/buyers/members?limit=1&after={next}"),
    )
    .await;
    assert_eq!(rest["members"][0]["user_id"], json!("bob"));
    assert_eq!(rest["next"], Value::Null);
    let (_, user) = read("flag-read-token", "/v1/users/bob/buckets".into()).await;
    assert_eq!(user["buckets"][0]["bucket_id"], json!("buyers"));
    assert_eq!(user["buckets"][0]["epoch"], json!(1));

    // The CLI reads the same, with the database from the file.
    let members = stdout_json(&output(membrane(
        &config,
        &["members", "buyers", "--limit", "1", "--format", "json"],
    )));
    assert_eq!(members["members"][0]["user_id"], json!("ana"));
    let after = members["next"].as_str().expect("a cursor").to_owned();
    let rest = stdout_json(&output(membrane(
        &config,
        &["members", "buyers", "--after", &after, "--format", "json"],
    )));
    assert_eq!(rest["members"][0]["user_id"], json!("bob"));
    let user = stdout_json(&output(membrane(
        &config,
        &["user", "bob", "--format", "json"],
    )));
    assert_eq!(user["buckets"][0]["epoch"], json!(1));
    let feed = output(membrane(&config, &["transitions", "--format", "json"]));
    assert!(feed.status.success());
    let keys: Vec<String> = String::from_utf8_lossy(&feed.stdout)
        .lines()
        .map(|line| {
            let transition: Value = serde_json::from_str(line).expect("one JSON object a line");
            transition["key"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(
        keys,
        ["bucket:buyers:ana:entered:1", "bucket:buyers:bob:entered:1"]
    );
    let unknown = output(membrane(&config, &["members", "nope"]));
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no bucket `nope`"));
}

#[test]
fn a_config_file_with_an_unknown_key_is_refused_with_its_position_and_a_hint() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = dir.path().join("membrane.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nread_token = [\"x\"]\n").expect("written");

    let refused = output(membrane(&config, &["status"]));
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unknown key `read_token`"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2:1", config.display())),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `read_tokens`?"), "{stderr}");

    // Named by the environment instead of the flag: the same file, the same error.
    let refused = Command::new(BINARY)
        .arg("status")
        .env("MEMBRANE_CONFIG", &config)
        .output()
        .expect("membrane runs");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("did you mean `read_tokens`?"));

    let missing = output(membrane(&dir.path().join("absent.toml"), &["status"]));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read the configuration file"));
}
