//! `membrane demo`: a private Postgres (unless DATABASE_URL is set), a few thousand users with a
//! month of history, the engine on `buckets/`, a live stream of plausible traffic, and the
//! console. Quitting the console stops everything and removes the private cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use membrane_store::{Message, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

#[derive(clap::Args)]
pub struct DemoOptions {
    /// Postgres URL to use instead of a private throwaway cluster.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Directory of bucket files.
    #[arg(long, default_value = "buckets")]
    buckets: PathBuf,
    /// Number of sample users.
    #[arg(long, default_value_t = 3000)]
    users: usize,
    /// Live events per second.
    #[arg(long, default_value_t = 80)]
    rate: u32,
    /// Run headless for this many seconds instead of opening the console (for scripts).
    #[arg(long)]
    headless_secs: Option<u64>,
}

pub async fn run(options: DemoOptions, log_format: crate::config::LogFormat) -> Result<()> {
    let log = std::env::temp_dir().join("membrane-demo.log");
    crate::init_logs(
        options.headless_secs.is_none().then_some(log.as_path()),
        log_format,
    );
    if !options.buckets.is_dir() {
        anyhow::bail!(
            "bucket directory {} does not exist: run the demo from the repository root or pass --buckets DIR",
            options.buckets.display()
        );
    }
    // Kept alive until the end of the demo; dropping it stops and removes the cluster.
    let (cluster, url) = match &options.database_url {
        Some(url) => (None, url.clone()),
        None => {
            eprintln!("starting a private Postgres cluster…");
            let cluster = tokio::task::spawn_blocking(membrane_pgtemp::TempCluster::start)
                .await?
                .context("cannot start a private Postgres cluster")?;
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let store = crate::connect(&url).await?;

    eprintln!(
        "creating {} sample users with a month of history…",
        options.users
    );
    let mut rng = StdRng::seed_from_u64(7);
    let now = Utc::now();
    let mut population: Vec<Persona> = (0..options.users)
        .map(|i| Persona::new(i, &mut rng))
        .collect();
    for chunk in population.chunks_mut(200) {
        let messages: Vec<Message> = chunk
            .iter_mut()
            .flat_map(|persona| persona.history(now, &mut rng))
            .collect();
        store.ingest(&messages).await?;
    }
    // The history is evaluated by the backfill, not replayed through the real-time path.
    discard_seed_queue(&store).await?;

    let mut config = membrane_engine::EngineConfig::new(options.buckets.clone());
    config.sweep_interval = Duration::from_secs(5);
    let engine = membrane_engine::start(store.clone(), config)
        .await
        .context("cannot start the engine")?;

    let traffic_store = store.clone();
    let rate = options.rate.max(1);
    let traffic = tokio::spawn(async move {
        let mut rng = StdRng::seed_from_u64(11);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let count = (rate as f64 / 4.0).ceil() as usize;
            let messages: Vec<Message> = (0..count)
                .map(|_| {
                    let index = rng.random_range(0..population.len());
                    population[index].live_message(Utc::now(), &mut rng)
                })
                .collect();
            if let Err(error) = traffic_store.ingest(&messages).await {
                tracing::warn!("demo traffic: {error}");
            }
        }
    });

    match options.headless_secs {
        Some(secs) => {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            print_counts(&store).await?;
        }
        None => membrane_console::run(store.clone()).await?,
    }
    traffic.abort();
    engine.shutdown().await;
    store.close().await;
    drop(cluster);
    Ok(())
}

/// Discards the queue entries the seeding produced: the backfill evaluates everyone anyway.
async fn discard_seed_queue(store: &Store) -> Result<()> {
    let mut round = store.begin_round().await?;
    while !round.claim_queue(10_000).await?.is_empty() {}
    round.commit().await?;
    Ok(())
}

async fn print_counts(store: &Store) -> Result<()> {
    let snapshot = membrane_store::console::snapshot(store, 0).await?;
    for bucket in snapshot.buckets {
        println!("{:<24} {:>6} members", bucket.id, bucket.member_count);
    }
    Ok(())
}

/// A sample user: how often they come back, shop and pay.
struct Persona {
    user_id: String,
    plan: &'static str,
    activity: f64,
    buyer: f64,
    traits: Map<String, Value>,
}

const COUNTRIES: [&str; 6] = ["US", "DE", "FR", "BR", "IN", "JP"];
const PAGES: [&str; 5] = ["/", "/pricing", "/docs", "/blog", "/product"];

impl Persona {
    fn new(index: usize, rng: &mut StdRng) -> Persona {
        let plan = match rng.random_range(0..10) {
            0..=2 => "trial",
            3..=6 => "free",
            7..=8 => "pro",
            _ => "enterprise",
        };
        let mut traits = Map::new();
        traits.insert("plan".into(), json!(plan));
        traits.insert(
            "country".into(),
            json!(COUNTRIES[rng.random_range(0..COUNTRIES.len())]),
        );
        if plan == "trial" {
            traits.insert("trial_days_left".into(), json!(rng.random_range(0..15)));
        }
        traits.insert("lifetime_value".into(), json!(0));
        Persona {
            user_id: format!("user-{index:05}"),
            plan,
            // Some users are heavy, most are light, some have gone quiet.
            activity: rng.random::<f64>().powi(3),
            buyer: rng.random::<f64>(),
            traits,
        }
    }

    fn track(&self, event: &str, at: DateTime<Utc>, properties: Value) -> Message {
        Message::Track {
            message_id: None,
            user_id: self.user_id.clone(),
            event: event.to_owned(),
            occurred_at: at,
            properties: properties.as_object().cloned().unwrap_or_default(),
        }
    }

    fn identify(&self) -> Message {
        Message::Identify {
            message_id: None,
            user_id: self.user_id.clone(),
            traits: self.traits.clone(),
        }
    }

    /// A month of sessions, page views, carts and orders.
    fn history(&mut self, now: DateTime<Utc>, rng: &mut StdRng) -> Vec<Message> {
        let mut messages = Vec::new();
        let quiet_days = if self.activity < 0.05 { 15 } else { 0 };
        for day in quiet_days..30 {
            if rng.random::<f64>() > self.activity.max(0.03) {
                continue;
            }
            let at = now
                - chrono::Duration::days(day)
                - chrono::Duration::minutes(rng.random_range(0..1440));
            messages.extend(self.session(at, rng));
        }
        messages.push(self.identify());
        messages
    }

    fn session(&mut self, at: DateTime<Utc>, rng: &mut StdRng) -> Vec<Message> {
        let mut messages = vec![self.track("session_start", at, json!({}))];
        for _ in 0..rng.random_range(1..4) {
            let page = PAGES[rng.random_range(0..PAGES.len())];
            messages.push(self.track("page_viewed", at, json!({ "path": page })));
        }
        if rng.random::<f64>() < self.buyer * 0.5 {
            messages.push(self.track("added_to_cart", at, json!({ "sku": "sku-1" })));
            if rng.random::<f64>() < self.buyer {
                let amount = rng.random_range(20..400);
                messages.push(self.track("order_completed", at, json!({ "amount": amount })));
                let total = self.traits["lifetime_value"].as_i64().unwrap_or(0) + amount;
                self.traits.insert("lifetime_value".into(), json!(total));
            }
        }
        messages
    }

    /// One live action: mostly activity, sometimes a profile change.
    fn live_message(&mut self, now: DateTime<Utc>, rng: &mut StdRng) -> Message {
        match rng.random_range(0..20) {
            0 if self.plan == "trial" => {
                let left = self
                    .traits
                    .get("trial_days_left")
                    .and_then(Value::as_i64)
                    .unwrap_or(14);
                self.traits
                    .insert("trial_days_left".into(), json!((left - 1).max(0)));
                self.identify()
            }
            1..=3 => self.track("added_to_cart", now, json!({ "sku": "sku-2" })),
            4 => {
                let amount = rng.random_range(20..400);
                let total = self.traits["lifetime_value"].as_i64().unwrap_or(0) + amount;
                self.traits.insert("lifetime_value".into(), json!(total));
                self.track("order_completed", now, json!({ "amount": amount }))
            }
            5 => self.identify(),
            6..=11 => self.track("page_viewed", now, json!({ "path": "/" })),
            _ => self.track("session_start", now, json!({})),
        }
    }
}
