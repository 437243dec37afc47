//! `membrane import`: bulk-loads Segment messages from a JSONL file through the same validation
//! and ingest transaction as the HTTP API.

use std::path::Path;

use anyhow::{Context, Result};
use membrane_store::Store;

pub async fn import(store: &Store, file: &Path, batch: usize) -> Result<()> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    );
    let now = chrono::Utc::now();
    let mut pending = Vec::with_capacity(batch);
    let (mut applied, mut duplicates) = (0, 0);
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let location = format!("{}:{}", file.display(), index + 1);
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{location}: not a JSON object"))?;
        let message = membrane_http::parse_message(&value, None, "", now)
            .map_err(|e| anyhow::anyhow!("{location}: field `{}`: {}", e.pointer, e.message))?;
        pending.push(message);
        if pending.len() >= batch.max(1) {
            let outcome = store.ingest(&pending).await?;
            applied += outcome.applied;
            duplicates += outcome.duplicates;
            pending.clear();
        }
    }
    let outcome = store.ingest(&pending).await?;
    applied += outcome.applied;
    duplicates += outcome.duplicates;
    println!("imported {applied} message(s), skipped {duplicates} duplicate(s)");
    Ok(())
}
