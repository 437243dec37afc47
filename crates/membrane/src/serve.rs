//! `membrane run`: the engine and the HTTP API in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use membrane_engine::EngineConfig;
use membrane_store::Store;

/// Options of `membrane run`.
#[derive(clap::Args, Clone)]
pub struct EngineArgs {
    /// Directory of bucket files, watched for changes.
    #[arg(long, default_value = "buckets")]
    pub buckets: PathBuf,
    /// How often time-based buckets are swept, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub sweep_interval: f64,
    /// Address of the HTTP API (port 0 picks a free port; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Accepted write keys for ingest, comma-separated. Without any, ingest is open.
    #[arg(long, env = "MEMBRANE_WRITE_KEYS", value_delimiter = ',')]
    pub write_key: Vec<String>,
    /// Accepted read tokens for the read endpoints, comma-separated. Without any, reads are open.
    #[arg(long, env = "MEMBRANE_READ_TOKENS", value_delimiter = ',')]
    pub read_token: Vec<String>,
}

/// Runs the engine and the HTTP API until Ctrl-C (or until the console quits).
pub async fn serve(store: Store, args: EngineArgs, console: bool) -> Result<()> {
    if !args.buckets.is_dir() {
        bail!(
            "bucket directory {} does not exist: pass --buckets DIR",
            args.buckets.display()
        );
    }
    let mut config = EngineConfig::new(args.buckets.clone());
    config.sweep_interval = Duration::from_secs_f64(args.sweep_interval.max(0.05));
    let engine = membrane_engine::start(store.clone(), config)
        .await
        .context("cannot start the engine")?;
    if args.write_key.is_empty() {
        tracing::warn!(
            "no write keys configured (--write-key / MEMBRANE_WRITE_KEYS): ingest is open"
        );
    }
    if args.read_token.is_empty() {
        tracing::warn!(
            "no read tokens configured (--read-token / MEMBRANE_READ_TOKENS): reads are open"
        );
    }
    let ingest_metrics = membrane_http::IngestMetrics::default();
    let api = membrane_http::router(
        store.clone(),
        membrane_http::ApiConfig {
            write_keys: args.write_key.clone(),
            read_tokens: args.read_token.clone(),
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
        "Unprocessed evaluation-queue entries (capped)",
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
