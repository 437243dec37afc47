//! `membrane bench`: benchmarks and torture runs of the real engine. Each one is a variant of
//! [`BenchCommand`] with its options and its own module; add a new one the same way.

mod chaos;
mod ingest;
mod scale;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use membrane_store::testing::TestDatabase;
use membrane_store::Store;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Engine processes SIGKILLed and restarted at random moments under steady ingest;
    /// afterwards memberships must equal a from-scratch recomputation with the reference
    /// evaluator and every transition must be written exactly once. Prints a JSON report;
    /// exit code 1 when any check failed.
    Chaos(chaos::ChaosOptions),
    /// HTTP batch ingest to committed membership effects, with 20 buckets: sustained events per
    /// second, event-to-transition latency at a fixed rate, and the raw-COPY floor.
    Ingest(ingest::IngestOptions),
    /// The clock at scale: a generated population (1M users, 10M events by default) and ten
    /// buckets; backfill time per bucket, a full sweep of a composite time-based bucket against
    /// its fact-gathering floor and against per-member evaluation, timer lag with every
    /// backfilled timer armed, and the process's peak memory.
    Scale(scale::ScaleOptions),
}

pub async fn run(command: BenchCommand) -> Result<std::process::ExitCode> {
    match command {
        BenchCommand::Chaos(options) => chaos::run(options).await,
        BenchCommand::Ingest(options) => ingest::run(options).await,
        BenchCommand::Scale(options) => scale::run(options).await,
    }
}

/// Writes one bucket file per `(id, criteria)` into a new temporary directory named after
/// `bench`, and returns the directory.
fn write_buckets<'a>(
    bench: &str,
    buckets: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("membrane-bench-{bench}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (id, criteria) in buckets {
        let path = dir.join(format!("{id}.toml"));
        std::fs::write(&path, format!("criteria = '''\n  {criteria}\n'''\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// The database a bench runs in: `url` (migrated here; it must be empty), or else a fresh one
/// on the server of DATABASE_URL, or in a private throwaway cluster when that is unset. Also
/// returns its URL, and the fresh database to keep alive while the bench runs.
async fn open_database(
    bench: &str,
    url: Option<&str>,
) -> Result<(Store, String, Option<TestDatabase>)> {
    match url {
        Some(url) => {
            let store = Store::connect(url)
                .await
                .with_context(|| format!("cannot connect to {}", crate::redact(url)))?;
            store.migrate().await.context("cannot apply migrations")?;
            if !store.is_empty().await? {
                bail!(
                    "{} already holds contacts or buckets: the {bench} bench needs an empty database",
                    crate::redact(url)
                );
            }
            Ok((store, url.to_owned(), None))
        }
        None => {
            let db = membrane_store::testing::fresh_database()
                .await
                .context("cannot create a database for the run")?;
            eprintln!("{bench}: database {}", db.name);
            Ok((db.store.clone(), db.url.clone(), Some(db)))
        }
    }
}

/// How many buckets have a finished backfill.
async fn backfilled_buckets(store: &Store) -> Result<usize> {
    Ok(store
        .bucket_switches()
        .await?
        .values()
        .filter(|switch| switch.backfilled_hash.is_some())
        .count())
}

/// Ends a bench run: removes its bucket directory, closes the store and, when the run
/// succeeded, drops the fresh database it ran in (at scale it holds gigabytes); a failed run's
/// database is kept for inspection and named.
async fn finish_run(
    bench: &str,
    store: Store,
    buckets_dir: &std::path::Path,
    throwaway: Option<TestDatabase>,
    result: Result<()>,
) -> Result<std::process::ExitCode> {
    // Best effort: the private cluster (if any) goes away with the process anyway.
    let _ = std::fs::remove_dir_all(buckets_dir);
    store.close().await;
    if let Some(database) = throwaway {
        if result.is_err() {
            eprintln!("{bench}: database {} kept for inspection", database.name);
        } else if let Err(error) = database.drop_now().await {
            eprintln!("{bench}: {error}");
        }
    }
    result.map(|()| std::process::ExitCode::SUCCESS)
}
