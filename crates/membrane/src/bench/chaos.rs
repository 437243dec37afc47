//! `membrane bench chaos`: crash safety of the real binary. Several `membrane run` processes
//! share one database and one bucket directory while ingest clients send Segment batches over
//! HTTP; each engine is SIGKILLed and restarted many times at random moments (mid-round,
//! mid-sweep, mid-backfill of a bucket added during the run). When ingest stops and the engines
//! have caught up, the audit recomputes everything from scratch:
//!
//! - the events and properties in the database are exactly what the clients sent (each
//!   message id applied once, identifies in order);
//! - the active memberships equal the reference evaluator's verdicts on those facts;
//! - every (bucket, user) history is well formed: epochs 1..n, only the last one active, one
//!   `left` per closed epoch, at most one `entered` per epoch, each transition under its key
//!   with its membership's instant, every key once;
//! - member counts are exact, every backfill finished, and no backfill page was counted twice;
//! - every member in the bucket with a `dwell` mark has it (timers and sweeps run under the
//!   kills too).
//!
//! The CI test (`tests/e2e/chaos.rs`) runs this same driver with small parameters.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::{DateTime, TimeDelta, Utc};
use membrane_criteria::bucket::{BucketBody, BucketDef};
use membrane_criteria::eval::{evaluate, gather_from_raw, RawEvent};
use membrane_store::audit::{AuditMembership, AuditTransition};
use membrane_store::Store;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

#[derive(clap::Args, Clone, Debug)]
pub struct ChaosOptions {
    /// An empty database to run in (it is migrated). Without it, a fresh database is created
    /// on the server of DATABASE_URL, or in a private throwaway cluster when that is unset.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Engine processes (`membrane run`).
    #[arg(long, default_value_t = 3)]
    pub engines: usize,
    /// SIGKILLs per engine, each followed by a restart, at random moments of the run.
    #[arg(long, default_value_t = 30)]
    pub kills_per_engine: usize,
    /// Distinct users the clients send messages for.
    #[arg(long, default_value_t = 5_000)]
    pub users: usize,
    /// How long ingest runs while engines are being killed, in seconds.
    #[arg(long, default_value_t = 180.0)]
    pub seconds: f64,
    /// Messages per second, over all clients.
    #[arg(long, default_value_t = 300.0)]
    pub rate: f64,
    /// Concurrent ingest clients (each owns a share of the users).
    #[arg(long, default_value_t = 2)]
    pub clients: usize,
    /// Seed of the workload and the kill schedule (default: from the clock; it is reported).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Buckets with day-long windows, so the clock cannot move membership during a run and the
/// audit can recompute it at any instant: `.where` filters, type mismatches, absence, every
/// entry limit, and a `dwell` mark that timers (or sweeps) must write under the kills.
const BUCKETS: &[(&str, &str)] = &[
    (
        "carts.toml",
        r#"criteria = '''
  event("added_to_cart").within(1d).count() >= 2 and prop("plan") != "churned"
'''
dwell = ["1s"]
"#,
    ),
    (
        "big-spenders.toml",
        r#"criteria = '''
  prop("ltv") >= 500 and prop("tier").in(["gold", "platinum"])
'''
entry_limit = "once"
"#,
    ),
    (
        "lapsed.toml",
        r#"criteria = '''
  event("session_start").exists() and event("session_start").within(1d).not_exists()
'''
"#,
    ),
    (
        "pricing.toml",
        r#"criteria = '''
  prop("plan").in(["free", "trial"])
  and event("page_viewed").where(prop("path").starts_with("/pricing")).within(1d).exists()
'''
entry_limit = "once_per_period"
entry_period = "1s"
"#,
    ),
];

/// Written into the bucket directory part-way through the run: its backfill (silent joins,
/// resumable progress) runs while engines are being killed.
const LATE_BUCKET: (&str, &str) = (
    "late-orders.toml",
    r#"criteria = '''
  event("order_completed").where(prop("amount") >= 100).exists() and prop("tier") != "bronze"
'''
"#,
);

/// The bucket whose members must all carry their `dwell` mark.
const DWELL_BUCKET: (&str, &str) = ("carts", "1s");

const WRITE_KEY: &str = "chaos-write-key";
const SWEEP_INTERVAL_SECS: &str = "1";

pub async fn run(options: ChaosOptions) -> Result<std::process::ExitCode> {
    if options.engines == 0 || options.clients == 0 || options.users < options.clients {
        bail!("--engines and --clients must be at least 1, and --users at least --clients");
    }
    let seed = options.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default()
    });
    eprintln!("chaos: seed {seed}");
    let (store, database_url, _throwaway) =
        super::open_database("chaos", options.database_url.as_deref()).await?;
    let work = tempfile::tempdir().context("cannot create a temporary directory")?;
    let report = drive(&options, seed, &store, &database_url, work.path()).await;
    match report {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            if report.problems.is_empty() {
                Ok(std::process::ExitCode::SUCCESS)
            } else {
                let kept = work.keep();
                eprintln!(
                    "chaos: {} problem(s); engine logs kept in {}",
                    report.problems.len(),
                    kept.join("logs").display()
                );
                Ok(std::process::ExitCode::from(1))
            }
        }
        Err(error) => {
            let kept = work.keep();
            eprintln!("chaos: engine logs kept in {}", kept.join("logs").display());
            Err(error)
        }
    }
}

/// The database to run in, migrated and empty, and the throwaway database (kept alive for
/// the run) when one was created.
async fn drive(
    options: &ChaosOptions,
    seed: u64,
    store: &Store,
    database_url: &str,
    work: &Path,
) -> Result<Report> {
    let buckets_dir = work.join("buckets");
    let logs_dir = work.join("logs");
    std::fs::create_dir_all(&buckets_dir)?;
    std::fs::create_dir_all(&logs_dir)?;
    for (name, text) in BUCKETS {
        std::fs::write(buckets_dir.join(name), text)?;
    }
    let fleet = Arc::new(Fleet {
        binary: std::env::current_exe().context("cannot find the membrane binary")?,
        database_url: database_url.to_owned(),
        buckets_dir: buckets_dir.clone(),
        logs_dir,
    });
    let mut engines = Vec::new();
    for index in 0..options.engines {
        engines.push(fleet.clone().start(index, 0).await?);
    }
    let addresses: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(
        engines.iter().map(|e| Some(e.base_url.clone())).collect(),
    ));

    let run_for = Duration::from_secs_f64(options.seconds);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..options.clients {
        clients.spawn(ingest_client(
            client,
            options.clone(),
            seed,
            started + run_for,
            addresses.clone(),
        ));
    }

    let mut rng = StdRng::seed_from_u64(seed ^ 0x6b69_6c6c);
    let schedule = kill_schedule(&mut rng, options, run_for);
    let late_at = run_for.mul_f64(0.4);
    let mut late_written = false;
    let mut kills = vec![0usize; options.engines];
    for (at, index) in schedule {
        if !late_written && at >= late_at {
            sleep_until(started + late_at).await;
            std::fs::write(buckets_dir.join(LATE_BUCKET.0), LATE_BUCKET.1)?;
            late_written = true;
        }
        sleep_until(started + at).await;
        lock(&addresses)[index] = None;
        engines[index].kill()?;
        kills[index] += 1;
        // Sometimes at once, sometimes after the others had a moment alone.
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        engines[index] = fleet.clone().start(index, kills[index]).await?;
        lock(&addresses)[index] = Some(engines[index].base_url.clone());
    }
    if !late_written {
        std::fs::write(buckets_dir.join(LATE_BUCKET.0), LATE_BUCKET.1)?;
    }

    let mut sent = Vec::new();
    let (mut duplicates, mut retries) = (0, 0);
    while let Some(joined) = clients.join_next().await {
        let log = joined.context("an ingest client panicked")??;
        duplicates += log.duplicates;
        retries += log.retries;
        sent.extend(log.messages);
    }
    let ingest_seconds = started.elapsed().as_secs_f64();

    settle(store, Duration::from_secs(120)).await?;
    // Dwell marks come due one second after a join; timers write them, or a (1 s) sweep does
    // when a kill held a timer up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for engine in &mut engines {
        engine.kill()?;
    }
    let mut report = audit(store, &buckets_dir, &sent).await?;
    report.seed = seed;
    report.kills = kills;
    report.duplicates_sent = duplicates;
    report.retries = retries;
    report.ingest_seconds = ingest_seconds;
    report.total_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn sleep_until(instant: Instant) {
    tokio::time::sleep_until(instant.into()).await;
}

/// `kills_per_engine` kills of each engine at uniformly random instants of the run, in time
/// order, the engines in random order.
fn kill_schedule(
    rng: &mut StdRng,
    options: &ChaosOptions,
    run_for: Duration,
) -> Vec<(Duration, usize)> {
    let mut victims: Vec<usize> = (0..options.engines)
        .flat_map(|index| std::iter::repeat_n(index, options.kills_per_engine))
        .collect();
    victims.shuffle(rng);
    let mut instants: Vec<Duration> = victims
        .iter()
        .map(|_| run_for.mul_f64(rng.random_range(0.02..0.95)))
        .collect();
    instants.sort();
    instants.into_iter().zip(victims).collect()
}

/// Waits until every change is processed and every bucket's serving version is backfilled.
async fn settle(store: &Store, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let queued = store.queued_changes().await?;
        let buckets = store.audit_buckets().await?;
        let pending: Vec<&str> = buckets
            .iter()
            .filter(|b| {
                b.status != "removed" && b.backfilled_hash.as_ref() != Some(&b.criteria_hash)
            })
            .map(|b| b.id.as_str())
            .collect();
        let expected = BUCKETS.len() + 1;
        if queued == 0 && pending.is_empty() && buckets.len() == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the engines did not settle within {limit:?}: {queued} queued changes, \
                 buckets not backfilled {pending:?}, {} of {expected} buckets recorded",
                buckets.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Engine processes.

struct Fleet {
    binary: PathBuf,
    database_url: String,
    buckets_dir: PathBuf,
    logs_dir: PathBuf,
}

struct EngineProcess {
    child: Child,
    /// Held open: the engine's stdout stays a live pipe for as long as it runs.
    _stdout: BufReader<ChildStdout>,
    base_url: String,
}

impl Fleet {
    /// Starts `membrane run` and waits until it listens (after its buckets are loaded).
    async fn start(self: Arc<Self>, index: usize, generation: usize) -> Result<EngineProcess> {
        tokio::task::spawn_blocking(move || self.start_blocking(index, generation))
            .await
            .context("the engine starter panicked")?
    }

    fn start_blocking(&self, index: usize, generation: usize) -> Result<EngineProcess> {
        let log_path = self
            .logs_dir
            .join(format!("engine-{index}-{generation}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(&self.binary)
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(["--sweep-interval", SWEEP_INTERVAL_SECS])
            .arg("--buckets")
            .arg(&self.buckets_dir)
            .env("DATABASE_URL", &self.database_url)
            .env("MEMBRANE_WRITE_KEYS", WRITE_KEY)
            .env_remove("MEMBRANE_LOG_FORMAT")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        let stdout = child
            .stdout
            .take()
            .context("the engine's stdout is piped")?;
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let Some(base_url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "engine {index} did not start (it printed {line:?}); its log: {}",
                log_path.display()
            );
        };
        Ok(EngineProcess {
            base_url: base_url.to_owned(),
            child,
            _stdout: stdout,
        })
    }
}

impl EngineProcess {
    /// SIGKILL: no clean shutdown, whatever it was doing.
    fn kill(&mut self) -> Result<()> {
        self.child.kill().context("cannot kill an engine")?;
        self.child.wait().context("cannot reap an engine")?;
        Ok(())
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Ingest clients.

/// What one client had acknowledged, in order.
struct ClientLog {
    messages: Vec<Value>,
    duplicates: usize,
    retries: usize,
}

/// Sends batches of random messages for its own users until `deadline`, each batch retried
/// (on any live engine) until one acknowledges it: message ids make a retry of a batch that
/// was applied before its engine died a no-op, and batches are sent one after the other, so
/// every user's identifies apply in order.
async fn ingest_client(
    client: usize,
    options: ChaosOptions,
    seed: u64,
    deadline: Instant,
    addresses: Arc<Mutex<Vec<Option<String>>>>,
) -> Result<ClientLog> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(client as u64 * 0x9e37_79b9));
    let users: Vec<usize> = (client..options.users).step_by(options.clients).collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut log = ClientLog {
        messages: Vec::new(),
        duplicates: 0,
        retries: 0,
    };
    let per_client_rate = (options.rate / options.clients as f64).max(1.0);
    let mut serial = 0usize;
    while Instant::now() < deadline {
        let size = rng.random_range(1..=12);
        let mut batch = Vec::with_capacity(size);
        for _ in 0..size {
            if rng.random_bool(0.05) && !log.messages.is_empty() {
                batch.push(log.messages.choose(&mut rng).cloned().unwrap_or_default());
                log.duplicates += 1;
                continue;
            }
            // A tenth of the users get a third of the traffic: their memberships churn.
            let user = if rng.random_bool(0.33) {
                users[rng.random_range(0..users.len().div_ceil(10))]
            } else {
                *users.choose(&mut rng).unwrap_or(&client)
            };
            serial += 1;
            batch.push(random_message(
                &mut rng,
                &format!("c{client}-{serial}"),
                user,
            ));
        }
        send(&http, &addresses, &mut rng, &batch, &mut log.retries).await?;
        log.messages.extend(batch);
        let pause = Duration::from_secs_f64(size as f64 / per_client_rate);
        tokio::time::sleep(pause).await;
    }
    Ok(log)
}

async fn send(
    http: &reqwest::Client,
    addresses: &Mutex<Vec<Option<String>>>,
    rng: &mut StdRng,
    batch: &[Value],
    retries: &mut usize,
) -> Result<()> {
    let body = json!({ "batch": batch });
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let live: Vec<String> = lock(addresses).iter().flatten().cloned().collect();
        if let Some(base_url) = live.choose(rng) {
            let sent = http
                .post(format!("{base_url}/v1/batch"))
                .bearer_auth(WRITE_KEY)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) if response.status().is_client_error() => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    bail!("a batch was refused ({status}): {text}");
                }
                // The engine died under the request, or failed the round: try again.
                Ok(_) | Err(_) => *retries += 1,
            }
        }
        if Instant::now() > give_up {
            bail!("no engine accepted a batch for 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn user_name(index: usize) -> String {
    format!("user-{index:06}")
}

/// A track (55%) or an identify. Event times are whole milliseconds either well inside the
/// 1-day windows or well outside them, so the run's own duration changes no verdict.
fn random_message(rng: &mut StdRng, message_id: &str, user: usize) -> Value {
    if rng.random_bool(0.55) {
        let age_ms: i64 = if rng.random_bool(0.8) {
            rng.random_range(0..12 * 3_600_000)
        } else {
            rng.random_range(3 * 86_400_000..10 * 86_400_000)
        };
        let at = DateTime::from_timestamp_millis(Utc::now().timestamp_millis() - age_ms)
            .unwrap_or_default();
        let (event, properties) = random_event(rng);
        json!({
            "type": "track", "messageId": message_id, "userId": user_name(user),
            "event": event, "properties": properties,
            "timestamp": at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        })
    } else {
        json!({
            "type": "identify", "messageId": message_id, "userId": user_name(user),
            "traits": random_traits(rng),
        })
    }
}

fn random_event(rng: &mut StdRng) -> (&'static str, Map<String, Value>) {
    let name = *[
        "added_to_cart",
        "order_completed",
        "page_viewed",
        "session_start",
    ]
    .choose(rng)
    .unwrap_or(&"session_start");
    let mut properties = Map::new();
    match name {
        "order_completed" => {
            let amount = match rng.random_range(0..6) {
                0 => Value::Null,
                1 => json!("150"),
                _ => json!(rng.random_range(1..300)),
            };
            if !amount.is_null() {
                properties.insert("amount".into(), amount);
            }
        }
        "page_viewed" => {
            let path = ["/pricing", "/pricing/team", "/docs", "/", "/Pricing"]
                .choose(rng)
                .unwrap_or(&"/");
            properties.insert("path".into(), json!(path));
        }
        _ => {}
    }
    (name, properties)
}

/// One to three trait updates; a null removes the key.
fn random_traits(rng: &mut StdRng) -> Map<String, Value> {
    let mut traits = Map::new();
    for _ in 0..rng.random_range(1..=3) {
        let key = *["plan", "ltv", "tier"].choose(rng).unwrap_or(&"plan");
        let value = if rng.random_bool(0.15) {
            Value::Null
        } else {
            match key {
                "plan" => json!(["free", "trial", "pro", "churned"].choose(rng)),
                "ltv" if rng.random_bool(0.1) => json!("900"),
                "ltv" => json!(rng.random_range(0..1000)),
                _ => json!(["gold", "silver", "platinum", "bronze"].choose(rng)),
            }
        };
        traits.insert(key.to_owned(), value);
    }
    traits
}

// ---------------------------------------------------------------------------------------------
// The audit.

#[derive(Debug, Default)]
struct Report {
    seed: u64,
    kills: Vec<usize>,
    messages_sent: usize,
    duplicates_sent: usize,
    retries: usize,
    ingest_seconds: f64,
    total_seconds: f64,
    users: usize,
    events: usize,
    members: BTreeMap<String, usize>,
    transitions: usize,
    transitions_by_source: BTreeMap<String, usize>,
    problems: Vec<String>,
}

impl Report {
    fn to_json(&self) -> Value {
        const SHOWN: usize = 30;
        json!({
            "ok": self.problems.is_empty(),
            "seed": self.seed,
            "kills_per_engine": self.kills,
            "messages_sent": self.messages_sent,
            "duplicates_sent": self.duplicates_sent,
            "ingest_retries": self.retries,
            "ingest_seconds": self.ingest_seconds,
            "total_seconds": self.total_seconds,
            "users": self.users,
            "events": self.events,
            "members": self.members,
            "transitions": self.transitions,
            "transitions_by_source": self.transitions_by_source,
            "problem_count": self.problems.len(),
            "problems": self.problems.iter().take(SHOWN).collect::<Vec<_>>(),
        })
    }
}

/// Per user: events as (name, instant, properties) sorted, and merged properties.
#[derive(Debug, Default, PartialEq)]
struct Facts {
    events: BTreeMap<String, Vec<(String, i64, String)>>,
    properties: BTreeMap<String, Map<String, Value>>,
}

impl Facts {
    /// What the acknowledged messages must have produced: each message id once, in order.
    fn sent(messages: &[Value]) -> Facts {
        let mut facts = Facts::default();
        let mut applied = HashSet::new();
        for message in messages {
            let id = message["messageId"].as_str().unwrap_or_default();
            if !applied.insert(id) {
                continue;
            }
            let user = message["userId"].as_str().unwrap_or_default().to_owned();
            let properties = facts.properties.entry(user.clone()).or_default();
            if message["type"] == "track" {
                let at = message["timestamp"]
                    .as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map_or(0, |t| t.timestamp_millis());
                facts.events.entry(user).or_default().push((
                    message["event"].as_str().unwrap_or_default().to_owned(),
                    at,
                    message["properties"].to_string(),
                ));
            } else if let Some(traits) = message["traits"].as_object() {
                for (key, value) in traits {
                    if value.is_null() {
                        properties.remove(key);
                    } else {
                        properties.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        facts.sort();
        facts
    }

    fn sort(&mut self) {
        for events in self.events.values_mut() {
            events.sort();
        }
    }
}

async fn audit(store: &Store, buckets_dir: &Path, sent: &[Value]) -> Result<Report> {
    let mut report = Report {
        messages_sent: sent.len(),
        ..Report::default()
    };
    let problems = &mut report.problems;
    let now = store.database_now().await?;

    // 1. The facts: exactly what was acknowledged.
    let mut stored = Facts::default();
    let mut raw_events: HashMap<String, Vec<RawEvent>> = HashMap::new();
    for event in store.audit_events().await? {
        let properties = event.properties.as_object().cloned().unwrap_or_default();
        stored
            .events
            .entry(event.user_id.clone())
            .or_default()
            .push((
                event.name.clone(),
                event.occurred_at.timestamp_millis(),
                Value::Object(properties.clone()).to_string(),
            ));
        raw_events.entry(event.user_id).or_default().push(RawEvent {
            name: event.name,
            occurred_at_ms: event.occurred_at.timestamp_millis(),
            properties,
        });
        report.events += 1;
    }
    for (user, properties) in store.audit_contacts().await? {
        stored
            .properties
            .insert(user, properties.as_object().cloned().unwrap_or_default());
    }
    stored.sort();
    report.users = stored.properties.len();
    let expected_facts = Facts::sent(sent);
    if stored != expected_facts {
        let users: BTreeSet<&String> = expected_facts
            .properties
            .keys()
            .chain(stored.properties.keys())
            .collect();
        for user in users {
            let (want, have) = (
                (
                    expected_facts.events.get(user),
                    expected_facts.properties.get(user),
                ),
                (stored.events.get(user), stored.properties.get(user)),
            );
            if want != have {
                problems.push(format!(
                    "facts of {user}: sent {want:?}, the database holds {have:?}"
                ));
            }
        }
    }

    // 2. Memberships: the reference evaluator over the stored facts, from scratch.
    let definitions = membrane_criteria::bucket::load_dir(buckets_dir);
    if !definitions.errors.is_empty() {
        bail!("the chaos buckets do not load");
    }
    let expected = expected_members(&definitions.buckets, &stored, &raw_events, now);
    let memberships = store.audit_memberships().await?;
    let actual: BTreeSet<(String, String)> = memberships
        .iter()
        .filter(|m| m.active)
        .map(|m| (m.bucket_id.clone(), m.user_id.clone()))
        .collect();
    for pair in expected.symmetric_difference(&actual) {
        let (bucket, user) = pair;
        problems.push(format!(
            "{bucket}/{user}: the reference says member = {}, the database says {}",
            expected.contains(pair),
            actual.contains(pair)
        ));
    }
    for (bucket, _) in &actual {
        *report.members.entry(bucket.clone()).or_default() += 1;
    }

    // 3. Histories and the outbox.
    let transitions = store.audit_transitions().await?;
    report.transitions = transitions.len();
    let mut keys = HashSet::new();
    for transition in &transitions {
        if !keys.insert(transition.key.as_str()) {
            problems.push(format!("transition key {} written twice", transition.key));
        }
        *report
            .transitions_by_source
            .entry(transition.source.clone())
            .or_default() += 1;
    }
    let limits: HashMap<&str, &BucketDef> = definitions
        .buckets
        .iter()
        .map(|def| (def.id.as_str(), def))
        .collect();
    check_histories(&memberships, &transitions, &limits, now, problems);

    // 4. Bucket state.
    for bucket in store.audit_buckets().await? {
        if bucket.member_count != bucket.active_rows {
            problems.push(format!(
                "{}: member_count {} but {} active rows",
                bucket.id, bucket.member_count, bucket.active_rows
            ));
        }
        if bucket.backfilled_hash.as_ref() != Some(&bucket.criteria_hash) {
            problems.push(format!("{}: backfill never finished", bucket.id));
        }
        match bucket.backfill_users_done {
            Some(done) if done as usize > report.users => problems.push(format!(
                "{}: the backfill counted {done} users of {}: a page was done twice",
                bucket.id, report.users
            )),
            Some(_) => {}
            None => problems.push(format!("{}: no backfill progress recorded", bucket.id)),
        }
    }
    Ok(report)
}

fn expected_members(
    buckets: &[BucketDef],
    facts: &Facts,
    events: &HashMap<String, Vec<RawEvent>>,
    now: DateTime<Utc>,
) -> BTreeSet<(String, String)> {
    let now_ms = now.timestamp_millis();
    let mut members = BTreeSet::new();
    for bucket in buckets {
        let BucketBody::Criteria { plan, .. } = &bucket.body else {
            continue;
        };
        for (user, properties) in &facts.properties {
            let user_events = events.get(user).map_or(&[][..], Vec::as_slice);
            let values = gather_from_raw(&plan.facts, user_events, properties, now_ms);
            if evaluate(plan, &values, now_ms) {
                members.insert((bucket.id.clone(), user.clone()));
            }
        }
    }
    members
}

fn check_histories(
    memberships: &[AuditMembership],
    transitions: &[AuditTransition],
    buckets: &HashMap<&str, &BucketDef>,
    now: DateTime<Utc>,
    problems: &mut Vec<String>,
) {
    type Pair<'a> = (&'a str, &'a str);
    let mut epochs: BTreeMap<Pair, Vec<&AuditMembership>> = BTreeMap::new();
    for row in memberships {
        epochs
            .entry((&row.bucket_id, &row.user_id))
            .or_default()
            .push(row);
    }
    let mut written: HashMap<Pair, Vec<&AuditTransition>> = HashMap::new();
    for transition in transitions {
        written
            .entry((&transition.bucket_id, &transition.user_id))
            .or_default()
            .push(transition);
    }
    for (pair @ (bucket, user), rows) in &epochs {
        let mut problem = |what: String| problems.push(format!("{bucket}/{user}: {what}"));
        let history: Vec<String> = rows
            .iter()
            .map(|r| format!("{}{}", r.epoch, if r.active { "*" } else { "" }))
            .collect();
        for (index, row) in rows.iter().enumerate() {
            let last = index + 1 == rows.len();
            if row.epoch != index as i32 + 1
                || (row.active && !last)
                || row.active == row.left_at.is_some()
            {
                problem(format!("malformed epochs {history:?}"));
            }
        }
        let empty = Vec::new();
        let pair_transitions = written.get(pair).unwrap_or(&empty);
        for transition in pair_transitions {
            let mut expected_key = format!(
                "bucket:{bucket}:{user}:{}:{}",
                transition.kind, transition.epoch
            );
            if let Some(label) = &transition.label {
                expected_key = format!("{expected_key}:{label}");
            }
            if transition.key != expected_key {
                problem(format!("key {} should be {expected_key}", transition.key));
            }
            let Some(row) = rows.get(transition.epoch as usize - 1) else {
                problem(format!(
                    "{} for a missing epoch {}",
                    transition.kind, transition.epoch
                ));
                continue;
            };
            let instant = match transition.kind.as_str() {
                "entered" => Some(row.entered_at),
                "left" => row.left_at,
                _ => None,
            };
            if instant.is_some_and(|at| at != transition.occurred_at) {
                problem(format!(
                    "{} of epoch {} at {} but the membership says {instant:?}",
                    transition.kind, transition.epoch, transition.occurred_at
                ));
            }
        }
        for row in rows {
            let of_kind = |kind: &str| {
                pair_transitions
                    .iter()
                    .filter(|t| t.epoch == row.epoch && t.kind == kind)
                    .count()
            };
            if of_kind("left") != usize::from(!row.active) {
                problem(format!(
                    "epoch {} has {} `left`",
                    row.epoch,
                    of_kind("left")
                ));
            }
            if of_kind("entered") > 1 {
                problem(format!(
                    "epoch {} has {} `entered`",
                    row.epoch,
                    of_kind("entered")
                ));
            }
            let once = buckets.get(bucket).is_some_and(|def| {
                matches!(def.entry_limit, membrane_criteria::bucket::EntryLimit::Once)
            });
            if once && row.epoch > 1 && of_kind("entered") > 0 {
                problem(format!(
                    "entry_limit once, but epoch {} emitted `entered`",
                    row.epoch
                ));
            }
            let marked = pair_transitions.iter().any(|t| {
                t.epoch == row.epoch
                    && t.kind == "dwell"
                    && t.label.as_deref() == Some(DWELL_BUCKET.1)
            });
            let due = row.active && row.entered_at <= now - TimeDelta::seconds(3);
            if *bucket == DWELL_BUCKET.0 && due && !marked {
                problem(format!(
                    "epoch {} entered at {} has no `dwell` {} mark",
                    row.epoch, row.entered_at, DWELL_BUCKET.1
                ));
            }
        }
    }
}
