//! `membrane bench`: measurements of the real engine on this machine, each in a fresh database
//! (a private throwaway cluster unless `DATABASE_URL` is set).

mod ingest;

use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// HTTP batch ingest to committed membership effects, with 20 buckets: sustained events per
    /// second, event-to-transition latency at a fixed rate, and the raw-COPY floor.
    Ingest(ingest::IngestOptions),
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Ingest(options) => ingest::run(options).await,
    }
}
