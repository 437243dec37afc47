use std::process::Command;

use crate::support::{repo_root, BINARY};

#[test]
fn check_accepts_the_shipped_buckets() {
    let output = Command::new(BINARY)
        .arg("check")
        .arg(repo_root().join("buckets"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn check_reports_a_broken_file_with_a_caret_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.toml");
    std::fs::write(
        &file,
        "criteria = 'event(\"signup\").within(7x).exists()'\n",
    )
    .unwrap();
    let output = Command::new(BINARY)
        .arg("check")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.toml:1:"), "{stderr}");
    assert!(stderr.contains('^'), "{stderr}");

    let json = Command::new(BINARY)
        .args(["check", "--format", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(json.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["errors"][0][0]["line"], 1);
}
