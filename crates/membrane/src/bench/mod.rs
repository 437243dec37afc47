//! `membrane bench`: benchmarks and torture runs of the real engine. Each one is a variant of
//! [`BenchCommand`] with its options and its own module; add a new one the same way.

mod chaos;
mod ingest;

use anyhow::Result;

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
}

pub async fn run(command: BenchCommand) -> Result<std::process::ExitCode> {
    match command {
        BenchCommand::Chaos(options) => chaos::run(options).await,
        BenchCommand::Ingest(options) => ingest::run(options).await,
    }
}
