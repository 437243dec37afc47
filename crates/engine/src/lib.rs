//! The running engine: the bucket registry with hot reload, the real-time evaluator, durable
//! timers, sweeps, backfills and heartbeats. All coordination with other engine processes goes through
//! Postgres; nothing here assumes it is the only engine.

mod background;
pub mod evaluate;
pub mod registry;
mod reload;
mod timers;
pub mod webhooks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use membrane_store::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use background::SweepPages;
pub use registry::{LoadFailure, LoadedBucket, Registry};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] membrane_store::StoreError),
    #[error("bucket `{bucket}`: predicate failed: {source}")]
    Predicate {
        bucket: String,
        source: membrane_wasm::EvalError,
    },
    #[error("cannot start the WASM sandbox: {0}")]
    Sandbox(#[from] membrane_wasm::EngineError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("bucket `{0}` is not served by this engine (no such file, or it failed to load)")]
    UnknownBucket(String),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub buckets_dir: PathBuf,
    pub engine_id: String,
    /// How often time-based buckets are re-checked set-based.
    pub sweep_interval: Duration,
    /// Users claimed per real-time round (whole queue rows until they hold this many).
    pub batch_size: i64,
    /// Real-time rounds this engine runs at once (each on its own connection): while one
    /// waits for Postgres, another evaluates.
    pub realtime_workers: usize,
    /// Users per set-based page of sweeps and backfills.
    pub page_size: i64,
    /// Pages of one sweep checked at once, each on its own connection: while Postgres reads
    /// one page's facts, the engine evaluates another's.
    pub sweep_workers: usize,
    /// Poll interval of the queue when no notification arrives.
    pub poll_interval: Duration,
    /// Whether this engine fires due timers. Every engine arms them; with this off (say, for
    /// an ingest-only process) others fire them, and sweeps remain the backstop.
    pub fire_timers: bool,
    pub wasm_limits: membrane_wasm::Limits,
    pub webhooks: webhooks::WebhookConfig,
}

impl EngineConfig {
    pub fn new(buckets_dir: PathBuf) -> EngineConfig {
        EngineConfig {
            buckets_dir,
            engine_id: format!("engine-{}-{}", std::process::id(), rand_suffix()),
            sweep_interval: Duration::from_secs(60),
            batch_size: 2_000,
            realtime_workers: 2,
            page_size: 5_000,
            sweep_workers: 3,
            poll_interval: Duration::from_millis(250),
            fire_timers: true,
            wasm_limits: membrane_wasm::Limits::default(),
            webhooks: webhooks::WebhookConfig::default(),
        }
    }

    /// Overrides the real-time round size and worker count where given (each at least 1).
    pub fn set_realtime(&mut self, round_size: Option<u32>, workers: Option<usize>) {
        if let Some(size) = round_size {
            self.batch_size = i64::from(size.max(1));
        }
        if let Some(workers) = workers {
            self.realtime_workers = workers.max(1);
        }
    }
}

fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{nanos:08x}")
}

/// The engine's counters: published in heartbeats (for the console) and as Prometheus metrics.
/// Cloning shares the underlying values.
#[derive(Debug, Clone)]
pub struct Stats {
    pub rounds: Counter,
    pub evaluations: Counter,
    pub transitions: Family<TransitionKind, Counter>,
    pub sweeps: Counter,
    /// Changes a sweep made, by kind (`joined`, `left`, `dwell`): work a timer should have done.
    pub sweep_found_work: Family<TransitionKind, Counter>,
    pub reloads: Counter,
    pub errors: Counter,
    /// Seconds spent inside predicate calls (one observation per bucket batch).
    pub wasm_seconds: Histogram,
    /// Timers armed or moved to a new instant.
    pub timers_armed: Counter,
    /// Due timers claimed and evaluated by this engine.
    pub timers_fired: Counter,
    /// Fired timers that changed nothing (per bucket batch: fired minus memberships changed and
    /// dwell marks written): their user had been evaluated since, or the bucket moved on.
    pub timers_stale: Counter,
    /// Seconds from a timer's instant to the instant it was evaluated.
    pub timer_lag_seconds: Histogram,
    /// Timers due and not yet fired, as this engine last counted them.
    pub timers_due: Gauge,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionKind {
    pub kind: &'static str,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            rounds: Counter::default(),
            evaluations: Counter::default(),
            transitions: Family::default(),
            sweeps: Counter::default(),
            sweep_found_work: Family::default(),
            reloads: Counter::default(),
            errors: Counter::default(),
            // 10 µs .. ~1.3 s
            wasm_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 9)),
            timers_armed: Counter::default(),
            timers_fired: Counter::default(),
            timers_stale: Counter::default(),
            // 1 ms .. ~65 s
            timer_lag_seconds: Histogram::new(exponential_buckets(1e-3, 2.0, 17)),
            timers_due: Gauge::default(),
        }
    }
}

impl Stats {
    fn transitions_of(&self, kind: &'static str) -> u64 {
        self.transitions
            .get_or_create(&TransitionKind { kind })
            .get()
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "rounds": self.rounds.get(),
            "evaluations": self.evaluations.get(),
            "transitions": self.transitions_of("entered") + self.transitions_of("left") + self.transitions_of("dwell"),
            "sweeps": self.sweeps.get(),
            "reloads": self.reloads.get(),
            "errors": self.errors.get(),
            "timers_armed": self.timers_armed.get(),
            "timers_fired": self.timers_fired.get(),
            "timers_stale": self.timers_stale.get(),
            "timers_due": self.timers_due.get(),
        })
    }

    /// Registers every counter under `membrane_*` names.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "membrane_rounds",
            "Real-time evaluation rounds committed",
            self.rounds.clone(),
        );
        registry.register(
            "membrane_evaluations",
            "User evaluations against a bucket",
            self.evaluations.clone(),
        );
        registry.register(
            "membrane_transitions",
            "Transitions written, by kind",
            self.transitions.clone(),
        );
        registry.register(
            "membrane_sweeps",
            "Bucket sweeps completed",
            self.sweeps.clone(),
        );
        registry.register(
            "membrane_sweep_found_work",
            "Changes sweeps made that a timer should have made, by kind",
            self.sweep_found_work.clone(),
        );
        registry.register(
            "membrane_reloads",
            "Bucket directory reloads",
            self.reloads.clone(),
        );
        registry.register(
            "membrane_errors",
            "Failed rounds, sweeps, backfills and faulted predicates",
            self.errors.clone(),
        );
        registry.register_with_unit(
            "membrane_wasm_call",
            "Time inside predicate calls, per bucket batch",
            prometheus_client::registry::Unit::Seconds,
            self.wasm_seconds.clone(),
        );
        registry.register(
            "membrane_timers_armed",
            "Timers armed or moved to a new instant",
            self.timers_armed.clone(),
        );
        registry.register(
            "membrane_timers_fired",
            "Due timers claimed and evaluated",
            self.timers_fired.clone(),
        );
        registry.register(
            "membrane_timers_stale",
            "Fired timers whose evaluation changed nothing",
            self.timers_stale.clone(),
        );
        registry.register_with_unit(
            "membrane_timer_lag",
            "Time from a timer's instant to its evaluation",
            prometheus_client::registry::Unit::Seconds,
            self.timer_lag_seconds.clone(),
        );
        registry.register(
            "membrane_timers_due",
            "Timers due and not yet fired",
            self.timers_due.clone(),
        );
    }
}

/// State shared by the engine's tasks.
pub(crate) struct Shared {
    store: Store,
    config: EngineConfig,
    wasm: membrane_wasm::Engine,
    registry: ArcSwap<Registry>,
    stats: Stats,
    /// Woken after each reload: a bucket may need its members materialized.
    backfill_due: tokio::sync::Notify,
}

/// A running engine. Dropping it without [`EngineHandle::shutdown`] aborts its tasks.
pub struct EngineHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl EngineHandle {
    pub fn registry(&self) -> Arc<Registry> {
        self.shared.registry.load_full()
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Sweeps one bucket now, as the periodic sweep would but whenever it last ran, and returns
    /// the run; `None` when another engine is sweeping it.
    pub async fn sweep_now(
        &self,
        bucket_id: &str,
    ) -> Result<Option<membrane_store::SweepRun>, EngineError> {
        let bucket = self
            .shared
            .registry
            .load()
            .buckets
            .get(bucket_id)
            .cloned()
            .ok_or_else(|| EngineError::UnknownBucket(bucket_id.to_owned()))?;
        background::sweep_now(&self.shared, &bucket).await
    }

    /// Stops every task after its current round and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// When no other engine is alive, buckets recorded in the database that this engine's files do
/// not define are gone (their files were removed while nothing ran): mark them removed, or
/// every round would wait for an engine that serves them.
pub(crate) async fn retire_unserved_buckets(shared: &Shared) -> Result<(), EngineError> {
    let store = &shared.store;
    if store.other_engines_alive(&shared.config.engine_id).await? {
        return Ok(());
    }
    let switches = store.bucket_switches().await?;
    let retired: Vec<String> = shared
        .registry
        .load()
        .behind(&switches)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if !retired.is_empty() {
        tracing::info!(buckets = ?retired, "buckets without a file here and no other engine: marked removed");
        store.record_buckets_removed(&retired).await?;
    }
    Ok(())
}

/// Loads `buckets/`, records what loaded and what failed, and starts the engine's tasks.
pub async fn start(store: Store, config: EngineConfig) -> Result<EngineHandle, EngineError> {
    let shared = Arc::new(Shared {
        wasm: membrane_wasm::Engine::new(config.wasm_limits)?,
        store,
        config,
        registry: ArcSwap::from_pointee(Registry::default()),
        stats: Stats::default(),
        backfill_due: tokio::sync::Notify::new(),
    });
    reload::reload_now(&shared).await?;
    retire_unserved_buckets(&shared).await?;
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let watcher = reload::watch(shared.clone(), stopped.clone())?;
    tasks.spawn(watcher);
    let (wakeups, woken) = watch::channel(0);
    tasks.spawn(background::queue_wakeups(
        shared.clone(),
        wakeups,
        stopped.clone(),
    ));
    for _ in 0..shared.config.realtime_workers.max(1) {
        tasks.spawn(background::realtime(
            shared.clone(),
            woken.clone(),
            stopped.clone(),
        ));
    }
    tasks.spawn(background::sweeps(shared.clone(), stopped.clone()));
    if shared.config.fire_timers {
        tasks.spawn(timers::fire(shared.clone(), stopped.clone()));
    }
    tasks.spawn(background::backfills(shared.clone(), stopped.clone()));
    tasks.spawn(webhooks::deliver(shared.clone(), stopped.clone()));
    tasks.spawn(background::vacuums(shared.clone(), stopped.clone()));
    tasks.spawn(background::heartbeats(shared.clone(), stopped));
    Ok(EngineHandle {
        shared,
        stop,
        tasks,
    })
}
