//! `membrane bench ingest`: the real engine and HTTP API in this process, fed over HTTP by a
//! load generator, against 20 generated buckets.
//!
//! 1. **Sustained rate**: `--events` track messages for `--users` users, sent as fast as the API
//!    takes them over `--connections` keep-alive connections in `POST /v1/batch` requests; the
//!    clock stops when the evaluation queue is empty, that is when every membership effect of
//!    every event has committed.
//! 2. **Latency**: `--rate` events per second for `--seconds`, each from a new user whose event
//!    makes them enter a bucket; the latency of an event is from just before its request is
//!    sent to its `entered` transition's insert in the committing round. It starts from a
//!    checkpoint: otherwise the kernel writes back phase 1's hundreds of megabytes during it
//!    (30 s after they were written), and commits wait behind that (fsyncs of 60-100 ms were
//!    measured then, against 0.2 ms otherwise), which is phase 1's cost, not this rate's.
//! 3. **Floor**: the rows of phase 1 loaded with one raw `COPY` into a table shaped like
//!    `events`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, Utc};
use membrane_store::bench::EventRow;
use membrane_store::Store;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::Mutex;

const BUCKETS: usize = 20;
const WRITE_KEY: &str = "bench-write-key";

#[derive(clap::Args)]
pub struct IngestOptions {
    /// Events of the sustained-rate phase.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Distinct users of the sustained-rate phase.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Messages per `POST /v1/batch` request in the sustained-rate phase.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent HTTP connections of the load generator.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Events per second of the latency phase.
    #[arg(long, default_value_t = 5_000)]
    rate: u32,
    /// Duration of the latency phase, in seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// How often the engine sweeps time-based buckets, in seconds (as `membrane run`).
    #[arg(long, default_value_t = 60.0)]
    sweep_interval: f64,
    /// Users the engine claims per real-time round (as `membrane run --round-size`).
    #[arg(long)]
    round_size: Option<u32>,
    /// Real-time rounds the engine runs at once (as `membrane run --realtime-workers`).
    #[arg(long)]
    realtime_workers: Option<usize>,
}

pub async fn run(options: IngestOptions) -> Result<std::process::ExitCode> {
    if options.events == 0 || options.users == 0 || options.batch == 0 || options.rate == 0 {
        bail!("--events, --users, --batch and --rate must be at least 1");
    }
    let (store, _, throwaway) = super::open_database("ingest", None).await?;
    let buckets_dir = write_buckets()?;
    let result = measure(&store, &buckets_dir, &options).await;
    super::finish_run("ingest", store, &buckets_dir, throwaway, result).await
}

async fn measure(store: &Store, buckets_dir: &Path, options: &IngestOptions) -> Result<()> {
    let mut config = membrane_engine::EngineConfig::new(buckets_dir.to_owned());
    config.sweep_interval = Duration::from_secs_f64(options.sweep_interval.max(0.05));
    config.set_realtime(options.round_size, options.realtime_workers);
    let engine = membrane_engine::start(store.clone(), config)
        .await
        .context("cannot start the engine")?;
    wait_for_backfills(store).await?;
    let api = membrane_http::router(
        store.clone(),
        membrane_http::ApiConfig {
            write_keys: vec![WRITE_KEY.to_owned()],
            read_tokens: Vec::new(),
            metrics: membrane_http::IngestMetrics::default(),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/batch", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, api).await });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections)
        .build()?;
    let sender = Sender { client, url };

    println!(
        "membrane bench ingest: {BUCKETS} buckets, {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let (sustained, rows) = sustained_rate(store, &sender, options).await?;
    match store.checkpoint().await {
        Ok(took) => println!(
            "checkpoint after the sustained rate: {:.2} s",
            took.as_secs_f64()
        ),
        Err(error) => println!(
            "note: no checkpoint before the latency phase ({error}); it may pay for writing \
             back the sustained rate's data"
        ),
    }
    let latency = latency_at_rate(store, &sender, options).await?;
    let copy = store.copy_events_floor(&rows).await?;
    let copy_rate = rows.len() as f64 / copy.as_secs_f64();

    println!();
    println!("sustained, HTTP batch ingest to committed membership effects:");
    println!(
        "  {} events for {} users in {:.2} s (HTTP accepted all after {:.2} s): {:.0} events/s",
        options.events,
        options.users,
        sustained.drained.as_secs_f64(),
        sustained.accepted.as_secs_f64(),
        options.events as f64 / sustained.drained.as_secs_f64()
    );
    println!(
        "  raw COPY of the same {} rows into a table shaped like `events`: {:.2} s, {:.0} rows/s",
        rows.len(),
        copy.as_secs_f64(),
        copy_rate
    );
    println!(
        "  membrane end to end / raw COPY: {:.3}",
        options.events as f64 / sustained.drained.as_secs_f64() / copy_rate
    );
    println!(
        "latency at {} events/s for {} s ({} events sent at {:.0} events/s):",
        options.rate, options.seconds, latency.sent, latency.achieved_rate
    );
    println!(
        "  event to `entered` transition: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} transitions",
        latency.p50.as_secs_f64() * 1e3,
        latency.p99.as_secs_f64() * 1e3,
        latency.max.as_secs_f64() * 1e3,
        latency.samples
    );
    if latency.missing > 0 {
        bail!(
            "{} latency-phase events produced no `entered` transition",
            latency.missing
        );
    }
    server.abort();
    engine.shutdown().await;
    Ok(())
}

/// Twenty buckets of five shapes; bucket `b<i>` mentions events `e<i>` and `e<i+1>`, so every
/// event is a candidate for two buckets, and a single `e<i>` event of a new user (with an
/// `amount` of at least 100 and a `/pricing` path, as the generator sends) enters `b<i>`.
fn write_buckets() -> Result<PathBuf> {
    let buckets: Vec<(String, String)> = (0..BUCKETS)
        .map(|i| {
            let (this, next) = (format!("e{i}"), format!("e{}", (i + 1) % BUCKETS));
            let criteria = match i % 5 {
                0 => format!(r#"event("{this}").exists()"#),
                1 => format!(
                    r#"event("{this}").within(1h).count() >= 1 or event("{next}").count() >= 5"#
                ),
                2 => format!(
                    r#"event("{this}").where(prop("amount") >= 100).exists() and event("{next}").within(1d).not_exists()"#
                ),
                3 => format!(r#"any(event("{this}").count() >= 1, prop("plan") == "pro")"#),
                _ => format!(
                    r#"event("{this}").where(prop("path").starts_with("/pricing")).within(7d).count() >= 1"#
                ),
            };
            (format!("b{i:02}"), criteria)
        })
        .collect();
    super::write_buckets(
        "ingest",
        buckets
            .iter()
            .map(|(id, criteria)| (id.as_str(), criteria.as_str())),
    )
}

async fn wait_for_backfills(store: &Store) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = super::backfilled_buckets(store).await?;
        if done == BUCKETS {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {done} of {BUCKETS} buckets were backfilled after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone)]
struct Sender {
    client: reqwest::Client,
    url: String,
}

impl Sender {
    async fn post(&self, body: Vec<u8>) -> Result<()> {
        let response = self
            .client
            .post(&self.url)
            .basic_auth(WRITE_KEY, None::<&str>)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .context("batch request failed")?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("batch rejected with {status}: {text}");
        }
        Ok(())
    }
}

fn track(user: &str, event: &str, at: DateTime<Utc>, rng: &mut StdRng) -> (Value, EventRow) {
    let properties = json!({
        "amount": rng.random_range(100..300),
        "path": if rng.random_bool(0.5) { "/pricing/team" } else { "/pricing/enterprise" },
    });
    let message = json!({
        "type": "track",
        "userId": user,
        "event": event,
        "properties": properties,
        "timestamp": at.to_rfc3339(),
        "messageId": format!("{user}-{}", rng.random::<u64>()),
    });
    let row = EventRow {
        user_id: user.to_owned(),
        name: event.to_owned(),
        occurred_at: at,
        properties,
    };
    (message, row)
}

fn batch_body(messages: Vec<Value>) -> Vec<u8> {
    json!({ "batch": messages }).to_string().into_bytes()
}

struct Sustained {
    accepted: Duration,
    drained: Duration,
}

async fn sustained_rate(
    store: &Store,
    sender: &Sender,
    options: &IngestOptions,
) -> Result<(Sustained, Vec<EventRow>)> {
    let mut rng = StdRng::seed_from_u64(1);
    let now = Utc::now();
    let mut rows = Vec::with_capacity(options.events);
    let mut bodies = Vec::new();
    let mut messages = Vec::with_capacity(options.batch);
    for _ in 0..options.events {
        let user = format!("user-{}", rng.random_range(0..options.users));
        let event = format!("e{}", rng.random_range(0..BUCKETS));
        let (message, row) = track(&user, &event, now, &mut rng);
        messages.push(message);
        rows.push(row);
        if messages.len() == options.batch {
            bodies.push(batch_body(std::mem::take(&mut messages)));
        }
    }
    if !messages.is_empty() {
        bodies.push(batch_body(messages));
    }
    println!(
        "sustained rate: sending {} events in {} requests over {} connections…",
        options.events,
        bodies.len(),
        options.connections
    );
    let queue = Arc::new(Mutex::new(bodies.into_iter()));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.connections.max(1) {
        let (queue, sender) = (queue.clone(), sender.clone());
        workers.spawn(async move {
            loop {
                let next = queue.lock().await.next();
                match next {
                    Some(body) => sender.post(body).await?,
                    None => return Ok::<(), anyhow::Error>(()),
                }
            }
        });
    }
    while let Some(outcome) = workers.join_next().await {
        outcome??;
    }
    let accepted = started.elapsed();
    wait_for_empty_queue(store).await?;
    Ok((
        Sustained {
            accepted,
            drained: started.elapsed(),
        },
        rows,
    ))
}

async fn wait_for_empty_queue(store: &Store) -> Result<()> {
    loop {
        if store.queue_is_empty().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Latency {
    sent: usize,
    achieved_rate: f64,
    samples: usize,
    missing: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

async fn latency_at_rate(
    store: &Store,
    sender: &Sender,
    options: &IngestOptions,
) -> Result<Latency> {
    let cursor = store.last_transition_id().await?;
    // A request every 10 ms.
    let per_request = (options.rate as usize / 100).max(1);
    let requests = options.seconds as usize * options.rate as usize / per_request;
    println!(
        "latency: {} events/s for {} s, {per_request} events per request every {:.1} ms…",
        options.rate,
        options.seconds,
        per_request as f64 * 1e3 / options.rate as f64
    );
    let mut rng = StdRng::seed_from_u64(2);
    let mut sent_at: HashMap<String, DateTime<Utc>> = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(
        per_request as f64 / options.rate as f64,
    ));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = tokio::task::JoinSet::new();
    let started = Instant::now();
    for request in 0..requests {
        ticker.tick().await;
        let now = Utc::now();
        let messages: Vec<Value> = (0..per_request)
            .map(|n| {
                let user = format!("fresh-{request}-{n}");
                let event = format!("e{}", rng.random_range(0..BUCKETS));
                sent_at.insert(user.clone(), now);
                track(&user, &event, now, &mut rng).0
            })
            .collect();
        let sender = sender.clone();
        in_flight.spawn(async move { sender.post(batch_body(messages)).await });
    }
    while let Some(outcome) = in_flight.join_next().await {
        outcome??;
    }
    let achieved_rate = sent_at.len() as f64 / started.elapsed().as_secs_f64();
    wait_for_empty_queue(store).await?;

    let mut latencies = Vec::with_capacity(sent_at.len());
    let mut entered = HashSet::new();
    for (_, user, created_at) in store.transitions_of_kind_after(cursor, "entered").await? {
        if let Some(sent) = sent_at.get(&user) {
            latencies.push((created_at - *sent).to_std().unwrap_or_default());
            entered.insert(user);
        }
    }
    latencies.sort_unstable();
    let percentile = |p: f64| -> Duration {
        let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len().max(1));
        latencies.get(rank - 1).copied().unwrap_or_default()
    };
    Ok(Latency {
        sent: sent_at.len(),
        achieved_rate,
        samples: latencies.len(),
        missing: sent_at.len() - entered.len(),
        p50: percentile(0.50),
        p99: percentile(0.99),
        max: latencies.last().copied().unwrap_or_default(),
    })
}
