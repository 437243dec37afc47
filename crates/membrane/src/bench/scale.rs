//! `membrane bench scale`: the clock at scale. A generated population (by default 1M users and
//! 10M events) and ten buckets, with the real engine in this process:
//!
//! 1. **Backfill**: the engine materializes all ten buckets; each one's time comes from its
//!    persisted progress row.
//! 2. **Sweep**: a full sweep of `composite` (time-based, about 100k members) against
//!    (a) the floor: the same pages with only their fact-gathering statements, nothing evaluated
//!    or written; and (b) per-member evaluation as the reference implementation sweeps
//!    composite buckets: each member's facts read with statements of its own, then evaluated.
//! 3. **Timer lag**: with every backfilled timer armed (one per `visited-today` member alone),
//!    fresh users send a `visit` backdated so that its one-day window ends a few seconds later;
//!    the lag of each is from that instant to the commit of its `left` transition.
//! 4. **Memory**: the peak resident set of this process (engine and driver).

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, TimeDelta, Utc};
use futures::{StreamExt, TryStreamExt};
use membrane_engine::{EngineHandle, LoadedBucket, SweepPages};
use membrane_store::bench::Population;
use membrane_store::{FactRequest, Message, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The bucket whose sweep is measured.
const SWEPT: &str = "composite";
/// The bucket whose window leaves measure timer lag, and its window.
const LAG_BUCKET: &str = "visited-today";
const LAG_WINDOW: Duration = Duration::from_secs(24 * 3600);
const LAG_USER_PREFIX: &str = "lag-";

/// Ten buckets over the generated population; the comments give their expected sizes at the
/// default population.
const BUCKETS: [(&str, &str); 10] = [
    // ~7%: page views are 45% of events, spread over 30 days.
    (
        "active-week",
        r#"event("page_view").within(7d).count() >= 3"#,
    ),
    // 30%.
    ("pro", r#"prop("plan") == "pro""#),
    (
        "big-spenders",
        r#"event("purchase").where(prop("amount") >= 100).count() >= 2"#,
    ),
    // Searched, but not in the last week: an absence bucket (clock-driven joins).
    (
        "lapsed-searchers",
        r#"event("search").exists() and event("search").within(7d).not_exists()"#,
    ),
    // ~100k: buyers with two checkouts this month, unless a free plan asked for support lately.
    (
        SWEPT,
        r#"event("checkout").within(30d).count() >= 2 and (prop("plan") != "free" or event("support").within(7d).not_exists())"#,
    ),
    ("new-signups", r#"prop("signup_at") >= now() - 30d"#),
    ("clicked-today", r#"event("click").within(1d).exists()"#),
    // Everyone: each user's first event is a visit in the last 23 hours.
    (LAG_BUCKET, r#"event("visit").within(1d).exists()"#),
    (
        "a-searchers",
        r#"event("search").where(prop("query").starts_with("a")).exists()"#,
    ),
    (
        "engaged-de",
        r#"prop("country") == "de" and event("page_view").count() >= 5"#,
    ),
];

#[derive(clap::Args)]
pub struct ScaleOptions {
    /// An empty database to run in (it is migrated). Without it, a fresh database is created
    /// on the server of DATABASE_URL, or in a private throwaway cluster when that is unset.
    #[arg(long)]
    database_url: Option<String>,
    /// Users of the generated population.
    #[arg(long, default_value_t = 1_000_000)]
    users: i64,
    /// Events of each generated user (so 10M events by default).
    #[arg(long, default_value_t = 10)]
    events_per_user: i64,
    /// Seed of the generator, in [-1, 1] (Postgres `setseed`).
    #[arg(long, default_value_t = 0.5, allow_hyphen_values = true)]
    seed: f64,
    /// Users per set-based page of sweeps and backfills (the engine's default).
    #[arg(long, default_value_t = 5_000)]
    page_size: i64,
    /// Pages of a sweep checked at once (as `membrane run --sweep-workers`).
    #[arg(long, default_value_t = 3)]
    sweep_workers: usize,
    /// Fresh users whose window leaves measure timer lag.
    #[arg(long, default_value_t = 20_000)]
    lag_users: usize,
    /// Seconds from sending the timer-lag events to the first of their window ends.
    #[arg(long, default_value_t = 10.0)]
    lag_lead: f64,
    /// Seconds over which those window ends are spread.
    #[arg(long, default_value_t = 30.0)]
    lag_spread: f64,
}

pub async fn run(options: ScaleOptions) -> Result<std::process::ExitCode> {
    if options.users < 1
        || options.events_per_user < 1
        || options.page_size < 1
        || options.sweep_workers < 1
    {
        bail!("--users, --events-per-user, --page-size and --sweep-workers must be at least 1");
    }
    // User ids have seven digits.
    if options.users > 10_000_000 {
        bail!("--users must be at most 10000000, not {}", options.users);
    }
    if !(-1.0..=1.0).contains(&options.seed) {
        bail!("--seed must be between -1 and 1, not {}", options.seed);
    }
    if options.lag_lead < 1.0 || options.lag_spread < 0.0 {
        bail!("--lag-lead must be at least 1 s and --lag-spread at least 0 s");
    }
    let (store, _, throwaway) =
        super::open_database("scale", options.database_url.as_deref()).await?;
    let buckets_dir = super::write_buckets(
        "scale",
        BUCKETS.iter().map(|(id, criteria)| (*id, *criteria)),
    )?;
    let result = measure(&store, &buckets_dir, &options).await;
    super::finish_run("scale", store, &buckets_dir, throwaway, result).await
}

async fn measure(store: &Store, buckets_dir: &Path, options: &ScaleOptions) -> Result<()> {
    println!(
        "membrane bench scale: {} users, {} events, {} buckets, {} cores",
        options.users,
        options.users * options.events_per_user,
        BUCKETS.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let started = Instant::now();
    store
        .generate_population(Population {
            users: options.users,
            events_per_user: options.events_per_user,
            seed: options.seed,
        })
        .await
        .context("cannot generate the population")?;
    println!(
        "generated, vacuumed and analyzed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let mut config = membrane_engine::EngineConfig::new(buckets_dir.to_owned());
    // The bench sweeps when it measures, not on an interval.
    config.sweep_interval = Duration::from_secs(365 * 24 * 3600);
    config.page_size = options.page_size;
    config.sweep_workers = options.sweep_workers;
    let workers = options.sweep_workers;
    let engine = membrane_engine::start(store.clone(), config)
        .await
        .context("cannot start the engine")?;
    backfill(store).await?;
    let sweep = sweep(store, &engine, options.page_size, workers).await?;
    let lag = timer_lag(store, options).await?;
    let memory = peak_memory()?;
    engine.shutdown().await;

    println!();
    println!(
        "sweep of `{SWEPT}` ({} members, {} users checked, {} pages at once):",
        sweep.members, sweep.checked, sweep.workers
    );
    for (index, (floor, full)) in sweep.floors.iter().zip(&sweep.sweeps).enumerate() {
        println!(
            "  pass {}: sweep {:.2} s; floor {:.2} s (finding the pages alone {:.2} s): {:.2}x the floor",
            index + 1,
            full.as_secs_f64(),
            floor.total.as_secs_f64(),
            floor.paging.as_secs_f64(),
            full.as_secs_f64() / floor.total.as_secs_f64()
        );
    }
    let best_sweep = sweep.sweeps.iter().min().copied().unwrap_or_default();
    println!(
        "  per-member evaluation of its {} members: {:.2} s, {:.0} µs a member; the faster sweep pass is {:.1}x faster",
        sweep.members,
        sweep.per_member.as_secs_f64(),
        sweep.per_member.as_secs_f64() * 1e6 / sweep.members.max(1) as f64,
        sweep.per_member.as_secs_f64() / best_sweep.as_secs_f64()
    );
    println!(
        "timer lag over {} window leaves with {} timers armed: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        lag.samples, lag.armed, lag.p50, lag.p99, lag.max
    );
    println!(
        "memory of this process (engine and driver): peak RSS {} MB, now {} MB",
        memory.peak_kb / 1024,
        memory.now_kb / 1024
    );
    if lag.samples < options.lag_users {
        bail!(
            "only {} of {} timer-lag users left `{LAG_BUCKET}`",
            lag.samples,
            options.lag_users
        );
    }
    Ok(())
}

async fn backfill(store: &Store) -> Result<()> {
    let started = Instant::now();
    let mut reported = Instant::now();
    loop {
        let done = super::backfilled_buckets(store).await?;
        if done == BUCKETS.len() {
            break;
        }
        if reported.elapsed() >= Duration::from_secs(30) {
            reported = Instant::now();
            println!(
                "  backfilling: {done} of {} buckets after {:.0} s",
                BUCKETS.len(),
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "backfilled every bucket in {:.1} s:",
        started.elapsed().as_secs_f64()
    );
    for timing in store.backfill_timings().await? {
        let took = timing
            .finished_at
            .map(|finished| (finished - timing.started_at).as_seconds_f64())
            .unwrap_or(f64::NAN);
        let members = store.member_count(&timing.bucket_id).await?.unwrap_or(0);
        println!(
            "  {:<18} {:>7.1} s for {} users, {} members",
            timing.bucket_id, took, timing.users_done, members
        );
    }
    Ok(())
}

struct SweepFigures {
    members: usize,
    workers: usize,
    checked: usize,
    floors: Vec<Floor>,
    sweeps: Vec<Duration>,
    per_member: Duration,
}

/// Floor and sweep alternate, twice, so neither alone runs on a cold cache; then members are
/// evaluated one by one.
async fn sweep(
    store: &Store,
    engine: &EngineHandle,
    page_size: i64,
    workers: usize,
) -> Result<SweepFigures> {
    let registry = engine.registry();
    let bucket = registry
        .buckets
        .get(SWEPT)
        .with_context(|| format!("bucket `{SWEPT}` did not load"))?;
    println!("sweeping `{SWEPT}`…");
    let mut floors = Vec::new();
    let mut sweeps = Vec::new();
    let mut checked = 0;
    for _ in 0..2 {
        let floor = sweep_floor(store, bucket, page_size, workers).await?;
        checked = floor.users;
        floors.push(floor);
        let started = Instant::now();
        let run = engine
            .sweep_now(SWEPT)
            .await?
            .context("another engine holds the sweep lock")?;
        sweeps.push(started.elapsed());
        if run.joined != 0 || run.left_count != 0 {
            println!(
                "  note: the sweep found work ({} joins, {} leaves)",
                run.joined, run.left_count
            );
        }
    }
    let (per_member, members) = per_member(store, bucket, page_size).await?;
    Ok(SweepFigures {
        members,
        workers,
        checked,
        floors,
        sweeps,
        per_member,
    })
}

/// The sweep's own pages with only the statements that gather their facts, as many pages at
/// once as the sweep checks: what any set-based evaluation of these users must read. Finding
/// the pages alone is timed first, for the breakdown.
async fn sweep_floor(
    store: &Store,
    bucket: &LoadedBucket,
    page_size: i64,
    workers: usize,
) -> Result<Floor> {
    let started = Instant::now();
    let mut pages = SweepPages::new(bucket, page_size);
    while pages.next(store).await?.is_some() {}
    let paging = started.elapsed();

    let started = Instant::now();
    let users = SweepPages::new(bucket, page_size)
        .into_stream(store)
        .map(|page| async move {
            let page = page?;
            let mut round = store.begin_round().await?;
            let request = FactRequest {
                users: &page,
                facts: &bucket.facts,
                page: true,
            };
            round.gather_facts_for(&[request], Utc::now()).await?;
            Ok::<_, anyhow::Error>(page.len())
        })
        .buffer_unordered(workers)
        .try_fold(0, |users, page| async move { Ok(users + page) })
        .await?;
    Ok(Floor {
        paging,
        total: started.elapsed(),
        users,
    })
}

struct Floor {
    /// Finding the pages' users alone.
    paging: Duration,
    /// Finding the pages and reading their facts.
    total: Duration,
    users: usize,
}

/// Evaluation member by member, as the reference implementation sweeps composite buckets: each
/// member's facts read with statements of its own, then evaluated. Nothing is written.
async fn per_member(
    store: &Store,
    bucket: &LoadedBucket,
    page_size: i64,
) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut round = store.begin_round().await?;
    let mut after = String::new();
    let mut members = 0;
    loop {
        let page = store.members_page(SWEPT, &after, page_size).await?;
        let Some(last) = page.last() else { break };
        after = last.clone();
        for member in &page {
            let now = Utc::now();
            let facts = round
                .gather_facts(std::slice::from_ref(member), &bucket.facts, now)
                .await?;
            bucket
                .predicate
                .evaluate_batch(&facts, now.timestamp_millis())?;
            members += 1;
        }
    }
    Ok((started.elapsed(), members))
}

struct TimerLag {
    armed: i64,
    samples: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

async fn timer_lag(store: &Store, options: &ScaleOptions) -> Result<TimerLag> {
    let armed = store.armed_timer_count().await?;
    println!(
        "timer lag: {} fresh users' windows end {:.0}–{:.0} s from now, {armed} timers armed…",
        options.lag_users,
        options.lag_lead,
        options.lag_lead + options.lag_spread
    );
    let cursor = store.last_transition_id().await?;
    let mut rng = StdRng::seed_from_u64(3);
    let sent = Utc::now();
    let window = TimeDelta::from_std(LAG_WINDOW)?;
    // Each user's visit, and so the instant its window ends: whole milliseconds, as stored.
    let mut window_ends: HashMap<String, DateTime<Utc>> = HashMap::new();
    let messages: Vec<Message> = (0..options.lag_users)
        .map(|n| {
            let user = format!("{LAG_USER_PREFIX}{n:06}");
            let ends_in = options.lag_lead + rng.random_range(0.0..=options.lag_spread);
            let ends_at = sent + TimeDelta::milliseconds((ends_in * 1e3) as i64);
            window_ends.insert(user.clone(), ends_at);
            Message::Track {
                message_id: None,
                user_id: user,
                event: "visit".to_owned(),
                occurred_at: ends_at - window,
                properties: serde_json::Map::new(),
            }
        })
        .collect();
    for chunk in messages.chunks(1_000) {
        store.ingest(chunk).await?;
    }
    if Utc::now() - sent > TimeDelta::milliseconds((options.lag_lead * 1e3) as i64) {
        bail!("sending the timer-lag events outlasted --lag-lead; raise it");
    }
    // Every window has ended by then; allow a generous margin for the last leaves.
    let deadline =
        Instant::now() + Duration::from_secs_f64(options.lag_lead + options.lag_spread + 60.0);
    let mut lags = Vec::new();
    while lags.len() < window_ends.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        lags = store
            .transitions_of_kind_after(cursor, "left")
            .await?
            .into_iter()
            .filter(|(bucket, _, _)| bucket == LAG_BUCKET)
            .filter_map(|(_, user, created_at)| {
                let ends_at = window_ends.get(&user)?;
                Some((created_at - *ends_at).as_seconds_f64() * 1e3)
            })
            .collect();
    }
    lags.sort_by(f64::total_cmp);
    if let Some(early) = lags.first().filter(|lag| **lag < 0.0) {
        bail!(
            "a window leave committed {:.1} ms before its window ended",
            -early
        );
    }
    let percentile = |p: f64| -> f64 {
        let rank = ((p * lags.len() as f64).ceil() as usize).clamp(1, lags.len().max(1));
        lags.get(rank - 1).copied().unwrap_or(f64::NAN)
    };
    Ok(TimerLag {
        armed,
        samples: lags.len(),
        p50: percentile(0.50),
        p99: percentile(0.99),
        max: lags.last().copied().unwrap_or(f64::NAN),
    })
}

struct Memory {
    peak_kb: u64,
    now_kb: u64,
}

/// `VmHWM` and `VmRSS` of this process.
fn peak_memory() -> Result<Memory> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("cannot read /proc/self/status for the process's memory")?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/self/status"))
    };
    Ok(Memory {
        peak_kb: field("VmHWM:")?,
        now_kb: field("VmRSS:")?,
    })
}
