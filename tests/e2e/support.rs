//! Drives the real `membrane` binary against a fresh database of its own.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use membrane_store::testing::{fresh_database, TestDatabase};
use membrane_store::TransitionRow;

pub const BINARY: &str = env!("CARGO_BIN_EXE_membrane");
pub const WRITE_KEY: &str = "e2e-write-key";

/// A `membrane run` process with its own database and bucket directory; killed on drop.
pub struct RunningEngine {
    pub db: TestDatabase,
    pub buckets: tempfile::TempDir,
    pub base_url: String,
    child: Child,
    http: reqwest::Client,
}

impl RunningEngine {
    /// Writes `files` (name, contents) into a fresh bucket directory and starts the engine.
    pub async fn start(files: &[(&str, &str)]) -> RunningEngine {
        let db = fresh_database().await.expect("a fresh test database");
        let buckets = tempfile::tempdir().expect("a temp dir");
        for (name, contents) in files {
            std::fs::write(buckets.path().join(name), contents).expect("bucket file written");
        }
        let mut child = Command::new(BINARY)
            .args(["run", "--listen", "127.0.0.1:0", "--sweep-interval", "0.5"])
            .arg("--buckets")
            .arg(buckets.path())
            .env("DATABASE_URL", &db.url)
            .env("MEMBRANE_WRITE_KEYS", WRITE_KEY)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("membrane run starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the engine prints its address");
        let base_url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        RunningEngine {
            db,
            buckets,
            base_url,
            child,
            http: reqwest::Client::new(),
        }
    }

    pub fn bucket_path(&self, name: &str) -> PathBuf {
        self.buckets.path().join(name)
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base_url))
            .bearer_auth(WRITE_KEY)
            .json(&body)
            .send()
            .await
            .expect("the engine answers")
    }

    /// Posts `body` and asserts it was accepted.
    async fn post_accepted(&self, path: &str, body: serde_json::Value) {
        let response = self.post(path, body).await;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{path} refused: {text}");
    }

    pub async fn track(&self, user: &str, event: &str) {
        let message_id = format!("{user}-{event}-{}", nanos());
        self.post_accepted(
            "/v1/track",
            serde_json::json!({"userId": user, "event": event, "messageId": message_id}),
        )
        .await;
    }

    pub async fn identify(&self, user: &str, traits: serde_json::Value) {
        self.post_accepted(
            "/v1/identify",
            serde_json::json!({"userId": user, "traits": traits}),
        )
        .await;
    }

    /// The engine's `GET /metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base_url))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn transitions(&self) -> Vec<TransitionRow> {
        self.db
            .store
            .transitions_after(0, 10_000)
            .await
            .expect("transitions readable")
    }

    /// Polls until a transition matching `wanted` exists; panics after `timeout`.
    pub async fn wait_for_transition(
        &self,
        timeout: Duration,
        wanted: impl Fn(&TransitionRow) -> bool,
    ) -> TransitionRow {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.transitions().await.into_iter().find(&wanted) {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no matching transition within {timeout:?}; have {:#?}",
                self.transitions().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RunningEngine {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

/// Polls `probe` until it returns `Some`, panicking with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Runs `membrane bench <args>` to its end (with `RUST_LOG=warn`) and returns what it printed.
pub async fn run_bench(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BINARY)
            .arg("bench")
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
    })
    .await
    .expect("the bench runs")
    .expect("the membrane binary starts")
}
