//! Hot reload: a change under `buckets/` is parsed, compiled and test-instantiated off the hot
//! path, then the whole registry is swapped in at once; rounds already running finish on the
//! version they started with.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::{EngineError, Shared};

/// Rebuilds the registry from disk, persists what loaded and what failed, and swaps it in.
pub(crate) async fn reload_now(shared: &Arc<Shared>) -> Result<(), EngineError> {
    let builder = shared.clone();
    let reload = tokio::task::spawn_blocking(move || {
        builder
            .registry
            .load()
            .reload(&builder.config.buckets_dir, &builder.wasm)
    })
    .await
    .map_err(|e| EngineError::Internal(format!("bucket reload panicked: {e}")))?;

    let store = &shared.store;
    for bucket in &reload.changed {
        store.record_bucket_version(&bucket.version()).await?;
    }
    for failure in &reload.failures {
        tracing::warn!(bucket = %failure.id, "bucket file failed to load:\n{}", failure.message);
        store
            .record_bucket_error(
                &failure.id,
                &failure.path.display().to_string(),
                &failure.source,
                &failure.message,
            )
            .await?;
    }
    if !reload.removed.is_empty() {
        store.record_buckets_removed(&reload.removed).await?;
    }
    for bucket in &reload.changed {
        tracing::info!(bucket = %bucket.id(), hash = %bucket.hash, "bucket version serving");
    }
    shared.registry.store(Arc::new(reload.registry));
    shared.stats.reloads.inc();
    shared.backfill_due.notify_one();
    Ok(())
}

/// Watches the buckets directory (and `plugins/` beside it) and reloads after each burst of
/// changes.
pub(crate) fn watch(
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) -> Result<impl Future<Output = ()>, EngineError> {
    let (changed, mut changes) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = changed.send(());
        }
    })
    .map_err(|source| EngineError::Watch {
        path: shared.config.buckets_dir.clone(),
        source,
    })?;
    // Plugin modules live in `plugins/` beside `buckets/` (see `resolve_plugin_path`): a rebuilt
    // module reloads its buckets like an edited bucket file does.
    let plugins_dir = shared
        .config
        .buckets_dir
        .parent()
        .map(|root| root.join("plugins"))
        .filter(|dir| dir.is_dir());
    for dir in std::iter::once(&shared.config.buckets_dir).chain(plugins_dir.as_ref()) {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| EngineError::Watch {
                path: dir.clone(),
                source,
            })?;
    }
    Ok(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                change = changes.recv() => if change.is_none() { return },
            }
            // Editors save in several steps; let the burst settle before reading.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while changes.try_recv().is_ok() {}
            if let Err(error) = reload_now(&shared).await {
                shared.stats.errors.inc();
                tracing::error!("reload failed: {error}");
            }
        }
    })
}
