//! `membrane import` of JSONL and CSV files, killed mid-file (SIGKILL) or interrupted (SIGINT)
//! and run again: every row is applied exactly once, though no row has a `messageId`.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use membrane_store::testing::{fresh_database, TestDatabase};

use crate::support::BINARY;

/// Enough rows, in small batches, that the import is still running when it is stopped.
const ROWS: usize = 40_000;
const BATCH: &str = "100";

fn write_jsonl(path: &Path) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("file created"));
    for row in 0..ROWS {
        let message = serde_json::json!({
            "type": "track", "userId": format!("user-{}", row % 500), "event": "imported",
            "timestamp": "2026-11-01T10:00:00Z", "properties": {"row": row},
        });
        writeln!(file, "{message}").expect("row written");
    }
    file.flush().expect("file flushed");
}

fn write_csv(path: &Path) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("file created"));
    writeln!(
        file,
        "type,userId,event,timestamp,properties.row,properties.note"
    )
    .expect("header");
    for row in 0..ROWS {
        // A quoted cell with a comma and a line break: the checkpoint is by record, not line.
        let note = if row % 1000 == 0 {
            "\"a, b\nc\""
        } else {
            "plain"
        };
        writeln!(
            file,
            "track,user-{},imported,2026-11-01T10:00:00Z,{row},{note}",
            row % 500
        )
        .expect("row written");
    }
    file.flush().expect("file flushed");
}

fn import_command(db: &TestDatabase, file: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["import", "--batch", BATCH])
        .arg(file)
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn");
    command
}

fn run_to_end(db: &TestDatabase, file: &Path) -> Output {
    let output = import_command(db, file)
        .output()
        .expect("membrane import runs");
    assert!(
        output.status.success(),
        "membrane import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Lines committed so far by the file's import, and whether it completed.
async fn checkpoint(db: &TestDatabase) -> Option<(i64, bool)> {
    sqlx::query_as("SELECT line, completed_at IS NOT NULL FROM import_checkpoints")
        .fetch_optional(db.store.pool())
        .await
        .expect("checkpoints readable")
}

/// Waits until the import has committed some batches but not all, then sends `signal`.
async fn stop_mid_file(db: &TestDatabase, child: &mut Child, signal: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((line, completed)) = checkpoint(db).await {
            assert!(!completed, "the import finished before it could be stopped");
            if line > 0 {
                let status = Command::new("kill")
                    .args([signal, &child.id().to_string()])
                    .status()
                    .expect("kill runs");
                assert!(status.success(), "kill {signal} failed");
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the import never committed a batch"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn event_count(db: &TestDatabase) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT properties->>'row') FROM events")
        .fetch_one(db.store.pool())
        .await
        .expect("events countable")
}

async fn killed_then_resumed(file_name: &str, write: fn(&Path), signal: &str) -> Output {
    let db = fresh_database().await.expect("a fresh test database");
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join(file_name);
    write(&file);

    let mut child = import_command(&db, &file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("membrane import starts");
    stop_mid_file(&db, &mut child, signal).await;
    let first = child.wait_with_output().expect("the stopped import exits");
    assert!(!first.status.success(), "a stopped import reports failure");
    let (partial, _) = event_count(&db).await;
    assert!(
        partial > 0 && partial < ROWS as i64,
        "{partial} events after the stop"
    );

    let second = run_to_end(&db, &file);
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("resuming"), "{stdout}");
    assert_eq!(event_count(&db).await, (ROWS as i64, ROWS as i64));

    // Once complete, a third run imports nothing more.
    let third = run_to_end(&db, &file);
    let stdout = String::from_utf8_lossy(&third.stdout);
    assert!(stdout.contains("was imported completely"), "{stdout}");
    assert_eq!(event_count(&db).await.0, ROWS as i64);
    first
}

#[tokio::test(flavor = "multi_thread")]
async fn jsonl_import_killed_mid_file_resumes_exactly() {
    killed_then_resumed("events.jsonl", write_jsonl, "-KILL").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_import_killed_mid_file_resumes_exactly() {
    killed_then_resumed("events.csv", write_csv, "-KILL").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupted_import_says_where_it_stopped() {
    let first = killed_then_resumed("events.jsonl", write_jsonl, "-INT").await;
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stderr.contains("interrupted") && stderr.contains("run the same command again"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_errors_name_the_line_and_column() {
    let db = fresh_database().await.expect("a fresh test database");
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("bad.csv");
    // The quoted cell spans lines 2 and 3, so the bad row is on line 4.
    std::fs::write(
        &file,
        "type,userId,event,timestamp,properties.note\n\
         track,ada,signup,2026-11-01T10:00:00Z,\"two\nlines\"\n\
         track,ada,signup,yesterday,\n",
    )
    .expect("file written");
    let output = import_command(&db, &file).output().expect("import runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{}:4: column `timestamp`: `yesterday` is not",
        file.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    // The row before the bad one was in the same batch, which was not committed.
    assert_eq!(event_count(&db).await.0, 0);

    // CRLF line ends count as line ends.
    std::fs::write(
        &file,
        "type,userId,event\r\ntrack,ada,signup\r\ntrack,ada,\r\n",
    )
    .expect("file written");
    let output = import_command(&db, &file).output().expect("import runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:3: column `event`: missing `event`", file.display());
    assert!(stderr.contains(&expected), "{stderr}");

    std::fs::write(&file, "type,user,event\ntrack,ada,signup\n").expect("file written");
    let output = import_command(&db, &file).output().expect("import runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:1: column 2 `user` is unknown", file.display());
    assert!(stderr.contains(&expected), "{stderr}");
}
