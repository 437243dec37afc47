//! `membrane run`: the engine and the HTTP API in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use membrane_engine::EngineConfig;
use membrane_store::Store;

use crate::config::FileConfig;

/// Options of `membrane run`. Each falls back to the configuration file, then to its default
/// (clap itself puts the flag before the environment).
#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// Directory of bucket files, watched for changes [default: buckets].
    #[arg(long, env = "MEMBRANE_BUCKETS")]
    pub buckets: Option<PathBuf>,
    /// How often time-based buckets are swept, in seconds [default: 60].
    #[arg(long, env = "MEMBRANE_SWEEP_INTERVAL")]
    pub sweep_interval: Option<f64>,
    /// Users claimed per real-time round (whole queue rows, one per ingest transaction, until
    /// they hold this many) [default: 2000].
    #[arg(long, env = "MEMBRANE_ROUND_SIZE")]
    pub round_size: Option<u32>,
    /// Real-time rounds run at once, each on its own connection [default: 2].
    #[arg(long, env = "MEMBRANE_REALTIME_WORKERS")]
    pub realtime_workers: Option<usize>,
    /// Pages of one sweep checked at once, each on its own connection [default: 3].
    #[arg(long, env = "MEMBRANE_SWEEP_WORKERS")]
    pub sweep_workers: Option<usize>,
    /// Address of the HTTP API (port 0 picks a free port; the address is printed)
    /// [default: 127.0.0.1:8080].
    #[arg(long, env = "MEMBRANE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Accepted write keys for ingest, comma-separated. Without any, ingest is open.
    #[arg(long, env = "MEMBRANE_WRITE_KEYS", value_delimiter = ',')]
    pub write_key: Vec<String>,
    /// Accepted read tokens for the read endpoints, comma-separated. Without any, reads are open.
    #[arg(long, env = "MEMBRANE_READ_TOKENS", value_delimiter = ',')]
    pub read_token: Vec<String>,
}

/// What `membrane run` runs with, once flags, environment, file and defaults are merged.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub buckets: PathBuf,
    pub sweep_interval: Duration,
    pub round_size: Option<u32>,
    pub realtime_workers: Option<usize>,
    pub sweep_workers: Option<usize>,
    pub listen: SocketAddr,
    pub write_keys: Vec<String>,
    pub read_tokens: Vec<String>,
    pub webhooks: membrane_engine::webhooks::WebhookConfig,
}

impl EngineArgs {
    /// Flag or environment, else the file, else the default.
    pub fn resolve(self, file: &FileConfig) -> RunSettings {
        let or_file = |given: Vec<String>, from_file: &Option<Vec<String>>| {
            if given.is_empty() {
                from_file.clone().unwrap_or_default()
            } else {
                given
            }
        };
        let mut webhooks = membrane_engine::webhooks::WebhookConfig::default();
        file.webhooks.apply(&mut webhooks);
        RunSettings {
            buckets: self
                .buckets
                .or_else(|| file.buckets.clone())
                .unwrap_or_else(|| PathBuf::from("buckets")),
            sweep_interval: self
                .sweep_interval
                .map(|seconds| Duration::from_secs_f64(seconds.max(0.05)))
                .or(file.sweep_interval)
                .unwrap_or(Duration::from_secs(60)),
            round_size: self.round_size.or(file.round_size),
            realtime_workers: self.realtime_workers.or(file.realtime_workers),
            sweep_workers: self.sweep_workers.or(file.sweep_workers),
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8080))),
            write_keys: or_file(self.write_key, &file.write_keys),
            read_tokens: or_file(self.read_token, &file.read_tokens),
            webhooks,
        }
    }
}

/// Runs the engine and the HTTP API until Ctrl-C (or until the console quits).
pub async fn serve(store: Store, args: RunSettings, console: bool) -> Result<()> {
    if !args.buckets.is_dir() {
        bail!(
            "bucket directory {} does not exist: pass --buckets DIR",
            args.buckets.display()
        );
    }
    let mut config = EngineConfig::new(args.buckets.clone());
    config.sweep_interval = args.sweep_interval.max(Duration::from_millis(50));
    config.set_realtime(args.round_size, args.realtime_workers);
    if let Some(workers) = args.sweep_workers {
        config.sweep_workers = workers.max(1);
    }
    config.webhooks = args.webhooks.clone();
    let engine = membrane_engine::start(store.clone(), config)
        .await
        .context("cannot start the engine")?;
    if args.write_keys.is_empty() {
        tracing::warn!(
            "no write keys configured (--write-key / MEMBRANE_WRITE_KEYS / write_keys): ingest is open"
        );
    }
    if args.read_tokens.is_empty() {
        tracing::warn!(
            "no read tokens configured (--read-token / MEMBRANE_READ_TOKENS / read_tokens): reads are open"
        );
    }
    let ingest_metrics = membrane_http::IngestMetrics::default();
    let api = membrane_http::router(
        store.clone(),
        membrane_http::ApiConfig {
            write_keys: args.write_keys.clone(),
            read_tokens: args.read_tokens.clone(),
            metrics: ingest_metrics.clone(),
        },
    )
    .merge(metrics_route(
        store.clone(),
        engine.stats(),
        &ingest_metrics,
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!("listening on http://{address}");
    if !console {
        println!("listening on http://{address}");
    }
    let server = tokio::spawn(async move { axum::serve(listener, api).await });
    if console {
        membrane_console::run(store).await?;
    } else {
        tokio::signal::ctrl_c().await?;
    }
    server.abort();
    engine.shutdown().await;
    Ok(())
}

/// `GET /metrics` in Prometheus text format: this engine's counters, its ingest counters, and
/// the queue's depth and lag read from the database at scrape time.
fn metrics_route(
    store: Store,
    stats: &membrane_engine::Stats,
    ingest: &membrane_http::IngestMetrics,
) -> axum::Router {
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;

    let mut registry = prometheus_client::registry::Registry::default();
    stats.register(&mut registry);
    ingest.register(&mut registry);
    let depth: Gauge = Gauge::default();
    let lag: Gauge<f64, AtomicU64> = Gauge::default();
    registry.register(
        "membrane_queue_depth",
        "Users with unprocessed changes in the evaluation queue (capped)",
        depth.clone(),
    );
    registry.register_with_unit(
        "membrane_queue_lag",
        "Age of the oldest unprocessed evaluation-queue entry",
        prometheus_client::registry::Unit::Seconds,
        lag.clone(),
    );
    let registry = std::sync::Arc::new(registry);
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (store, registry, depth, lag) =
                (store.clone(), registry.clone(), depth.clone(), lag.clone());
            async move {
                use axum::http::{header, StatusCode};
                use axum::response::IntoResponse;
                match store.queue_lag().await {
                    Ok(queue) => {
                        depth.set(queue.depth);
                        lag.set(queue.oldest_seconds);
                    }
                    Err(error) => tracing::warn!("metrics: cannot read the queue: {error}"),
                }
                let mut text = String::new();
                match prometheus_client::encoding::text::encode(&mut text, &registry) {
                    Ok(()) => (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(error) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
                    }
                }
            }
        }),
    )
}
