//! The `membrane` command line: check bucket files, run the engine, watch it in the console,
//! import events, read memberships and transitions, and run the demo.

mod bench;
mod config;
mod demo;
mod import;
mod reads;
mod serve;
mod webhooks;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use membrane_store::Store;

/// Ingest and rounds allocate per message and per row; glibc's allocator took about 6% of the
/// CPU of a `bench ingest` run.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "membrane",
    version,
    about = "Live, rule-defined groups of users over Postgres"
)]
struct Cli {
    /// Configuration file (default: ./membrane.toml when present). Flags and environment
    /// variables override it.
    #[arg(long, global = true, env = config::CONFIG_ENV)]
    config: Option<PathBuf>,
    /// Log lines as `human` text or `json` objects.
    #[arg(long, global = true, value_enum, env = "MEMBRANE_LOG_FORMAT")]
    log_format: Option<config::LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Human,
    Json,
}

#[derive(clap::Args)]
struct Database {
    /// Postgres URL of the membrane database (or `database_url` in the configuration file).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
}

impl Database {
    /// The flag or environment, else the configuration file.
    fn url(self, file: &config::FileConfig) -> Result<String> {
        self.database_url
            .or_else(|| file.database_url.clone())
            .context(
                "no database: pass --database-url, set DATABASE_URL, \
                 or set database_url in membrane.toml",
            )
    }
}

#[derive(Subcommand)]
enum Command {
    /// Check bucket files (default: buckets/) and report every error with file:line:col.
    Check {
        paths: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Apply the database migrations.
    Migrate {
        #[command(flatten)]
        db: Database,
    },
    /// Run the engine: HTTP ingest, real-time evaluation, sweeps and hot reload.
    Run {
        #[command(flatten)]
        db: Database,
        #[command(flatten)]
        engine: serve::EngineArgs,
        /// Also open the console in this terminal.
        #[arg(long)]
        console: bool,
    },
    /// Print every bucket's state as the engines recorded it: members, enabled, errors.
    Status {
        #[command(flatten)]
        db: Database,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Switch a bucket on: every engine evaluates it again from its next round.
    Enable {
        #[command(flatten)]
        db: Database,
        /// The bucket id, as `membrane status` lists it.
        bucket: String,
    },
    /// Switch a bucket off: every engine stops evaluating it at once (real time, sweeps,
    /// backfills, timers); its members and transitions stay.
    Disable {
        #[command(flatten)]
        db: Database,
        /// The bucket id, as `membrane status` lists it.
        bucket: String,
    },
    /// A bucket's active members by user id, one page at a time.
    Members {
        #[command(flatten)]
        db: Database,
        #[command(flatten)]
        page: reads::MembersArgs,
    },
    /// The buckets a user is in now, with epochs and entry times.
    User {
        #[command(flatten)]
        db: Database,
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Transitions after a cursor (a transition id), oldest first.
    Transitions {
        #[command(flatten)]
        db: Database,
        #[command(flatten)]
        feed: reads::TransitionsArgs,
    },
    /// Open the console on a database an engine writes to.
    Console {
        #[command(flatten)]
        db: Database,
    },
    /// Import Segment messages from a JSONL or CSV file, with progress; a re-run after a crash
    /// or Ctrl-C resumes where the last committed batch ended.
    Import {
        #[command(flatten)]
        db: Database,
        #[command(flatten)]
        args: import::ImportArgs,
    },
    /// Webhook endpoints, their dead letters and replays.
    Webhooks {
        #[command(flatten)]
        db: Database,
        #[command(subcommand)]
        command: webhooks::WebhooksCommand,
    },
    /// A private Postgres (unless DATABASE_URL is set), sample users, live traffic and the console.
    Demo {
        #[command(flatten)]
        options: demo::DemoOptions,
    },
    /// Benchmarks and torture runs of the real engine.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(error) => {
            match error.downcast_ref::<config::ConfigError>() {
                // Already rendered rustc-style, `error:` prefix included.
                Some(config::ConfigError::Invalid(diagnostics)) => {
                    eprint!("{}", diagnostics.render())
                }
                _ => eprintln!("error: {error:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let file = config::load(cli.config.as_deref())?;
    let log_format = cli
        .log_format
        .or(file.log_format)
        .unwrap_or(config::LogFormat::Human);
    let init_logs = |to_file: Option<&Path>| init_logs(to_file, log_format);
    match cli.command {
        Command::Check { paths, format } => return Ok(check(&paths, format)),
        Command::Migrate { db } => {
            init_logs(None);
            connect(&db.url(&file)?).await?;
            println!("migrations applied");
        }
        Command::Run {
            db,
            engine,
            console,
        } => {
            let store = connect(&db.url(&file)?).await?;
            let logs = console.then(|| std::env::temp_dir().join("membrane.log"));
            init_logs(logs.as_deref());
            serve::serve(store, engine.resolve(&file), console).await?;
        }
        Command::Status { db, format } => {
            let store = attach(&db.url(&file)?).await?;
            return status(&store, format).await;
        }
        Command::Enable { db, bucket } => {
            return switch_bucket(&db.url(&file)?, &bucket, true).await
        }
        Command::Disable { db, bucket } => {
            return switch_bucket(&db.url(&file)?, &bucket, false).await
        }
        Command::Members { db, page } => {
            reads::members(&attach(&db.url(&file)?).await?, page).await?;
        }
        Command::User { db, id, format } => {
            reads::user(&attach(&db.url(&file)?).await?, &id, format).await?;
        }
        Command::Transitions { db, feed } => {
            reads::transitions(&attach(&db.url(&file)?).await?, feed).await?;
        }
        Command::Console { db } => {
            membrane_console::run(attach(&db.url(&file)?).await?).await?;
        }
        Command::Import { db, args } => {
            init_logs(None);
            let store = connect(&db.url(&file)?).await?;
            import::import(&store, &args).await?;
        }
        Command::Webhooks { db, command } => {
            let store = connect(&db.url(&file)?).await?;
            webhooks::run(&store, command).await?;
        }
        Command::Demo { options } => demo::run(options, log_format).await?,
        Command::Bench { command } => {
            init_logs(None);
            return bench::run(command).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs go to stderr (or `file`, while a console owns the terminal), filtered by `RUST_LOG`,
/// as human-readable lines or one JSON object per line.
fn init_logs(file: Option<&Path>, format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let json = format == config::LogFormat::Json;
    let writer = match file.and_then(|path| std::fs::File::create(path).ok()) {
        Some(log) => {
            tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::sync::Mutex::new(log))
        }
        None => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(file.is_none())
        .with_writer(writer);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Connects without migrating: for commands that only read what an engine wrote.
async fn attach(url: &str) -> Result<Store> {
    Store::connect(url)
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))
}

/// Connects and applies migrations.
async fn connect(url: &str) -> Result<Store> {
    let store = Store::connect(url)
        .await
        .with_context(|| format!("cannot connect to {}", redact(url)))?;
    store.migrate().await.context("cannot apply migrations")?;
    Ok(store)
}

fn check(paths: &[PathBuf], format: Format) -> std::process::ExitCode {
    let default = [PathBuf::from("buckets")];
    let paths = if paths.is_empty() {
        &default[..]
    } else {
        paths
    };
    let mut buckets = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if path.is_dir() {
            let report = membrane_criteria::bucket::load_dir(path);
            buckets.extend(report.buckets);
            errors.extend(report.errors);
        } else {
            match membrane_criteria::bucket::load_bucket(path) {
                Ok(bucket) => buckets.push(bucket),
                Err(diagnostics) => errors.push(diagnostics),
            }
        }
    }
    match format {
        Format::Human => {
            for diagnostics in &errors {
                eprint!("{}", diagnostics.render());
            }
            for bucket in &buckets {
                println!("ok  {}  ({})", bucket.id, bucket.path.display());
            }
            let problems: usize = errors.iter().map(|d| d.items.len()).sum();
            if problems > 0 {
                eprintln!(
                    "error: {problems} problem(s) in {} file(s); {} bucket(s) ok",
                    errors.len(),
                    buckets.len()
                );
            } else {
                println!("{} bucket(s) ok", buckets.len());
            }
        }
        Format::Json => {
            let report = serde_json::json!({
                "ok": buckets.iter().map(|b| serde_json::json!({"id": b.id, "file": b.path.display().to_string()})).collect::<Vec<_>>(),
                "errors": errors.iter().map(|d| d.to_json()).collect::<Vec<_>>(),
            });
            println!("{report:#}");
        }
    }
    // 0: all good, 1: problems found, 2 is left to usage errors (clap).
    if errors.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

/// Sets a bucket's enable switch; exit code 1 when no such bucket is recorded.
async fn switch_bucket(url: &str, bucket: &str, enabled: bool) -> Result<std::process::ExitCode> {
    let store = attach(url).await?;
    let found = membrane_store::console::set_bucket_enabled(&store, bucket, enabled)
        .await
        .with_context(|| format!("cannot switch bucket `{bucket}`"))?;
    if !found {
        eprintln!(
            "error: no bucket `{bucket}` in {}\n  = help: `membrane status` lists the buckets the engines recorded",
            redact(url)
        );
        return Ok(std::process::ExitCode::from(1));
    }
    println!(
        "bucket `{bucket}` {}",
        if enabled { "enabled" } else { "disabled" }
    );
    Ok(std::process::ExitCode::SUCCESS)
}

/// Exit code 1 when any bucket's latest version failed to load or faulted.
async fn status(store: &Store, format: Format) -> Result<std::process::ExitCode> {
    let snapshot = membrane_store::console::snapshot(store, 0).await?;
    match format {
        Format::Human => {
            for bucket in &snapshot.buckets {
                let switch = if bucket.enabled {
                    "enabled"
                } else {
                    "disabled"
                };
                println!(
                    "{:<24} {:<8} {:<9} {:>9} members{}",
                    bucket.id,
                    bucket.status,
                    switch,
                    bucket.member_count,
                    backfill_note(bucket)
                );
                if let Some(error) = &bucket.last_error {
                    for line in error.lines() {
                        println!("    {line}");
                    }
                }
            }
        }
        Format::Json => {
            let buckets: Vec<serde_json::Value> = snapshot
                .buckets
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "id": b.id, "status": b.status, "enabled": b.enabled,
                        "members": b.member_count, "last_error": b.last_error,
                        "backfilled": b.backfilled,
                        "backfill": b.backfill.as_ref().map(|p| serde_json::json!({
                            "percent": p.percent(), "users_done": p.users_done,
                            "total_estimate": p.total_estimate, "started_at": p.started_at,
                            "finished_at": p.finished_at,
                        })),
                    })
                })
                .collect();
            println!("{:#}", serde_json::json!({ "buckets": buckets }));
        }
    }
    let failing = snapshot.buckets.iter().any(|b| b.status == "error");
    Ok(if failing {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}

/// `  backfill 42% (4200/10000 users)` while the serving version's backfill runs.
fn backfill_note(bucket: &membrane_store::console::BucketSummary) -> String {
    if bucket.backfilled || bucket.status == "removed" {
        return String::new();
    }
    match &bucket.backfill {
        Some(progress) => format!(
            "  backfill {}% ({}/{} users)",
            progress.percent(),
            progress.users_done,
            progress.total_estimate
        ),
        None => "  backfill pending".to_owned(),
    }
}
