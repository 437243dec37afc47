//! The terminal console: a ratatui dashboard over what engines persist.
//!
//! [`run`] owns the terminal and the I/O; the state ([`App`]), key handling ([`handle_key`])
//! and drawing ([`render`]) are pure so they can be tested on ratatui's `TestBackend`.

mod app;
mod format;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use crossterm::event::{self, Event};
use membrane_store::console::{self as reads, BucketDetail, ConsoleSnapshot};
use membrane_store::Store;
use tokio::sync::{mpsc, watch, Notify};

pub use app::{handle_key, Action, App, DetailState, Pane, View, SIZE_HISTORY_LEN};
pub use ui::render;

const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// Newest transitions read for the live feed: more than fit on any screen.
const FEED_LIMIT: i64 = 200;
/// Members, transitions and sweeps read for the detail view.
const DETAIL_LIMIT: i64 = 100;
/// How often the input thread checks whether the console has exited.
const INPUT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// What background tasks report to the UI loop.
enum Update {
    Snapshot(membrane_store::Result<ConsoleSnapshot>),
    Detail {
        bucket_id: String,
        detail: membrane_store::Result<Option<BucketDetail>>,
    },
    OperatorOutcome(String),
}

/// Restores the terminal when dropped, so every way out of [`run`] (return, error, unwind)
/// leaves the user's shell usable. Panics are also covered by ratatui's panic hook, which
/// restores before the panic message is printed.
struct RestoreTerminalOnDrop;

impl Drop for RestoreTerminalOnDrop {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Runs the console on the current terminal until the operator quits (`q` or Ctrl-C).
pub async fn run(store: Store) -> anyhow::Result<()> {
    // Created first so a failure halfway through entering raw mode is undone too.
    let _restore = RestoreTerminalOnDrop;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;

    let (updates_tx, mut updates) = mpsc::unbounded_channel();
    let (watched_bucket_tx, watched_bucket) = watch::channel(None::<String>);
    let refresh_now = Arc::new(Notify::new());
    let refresher = tokio::spawn(refresh_loop(
        store.clone(),
        watched_bucket,
        Arc::clone(&refresh_now),
        updates_tx.clone(),
    ));
    let mut terminal_events = spawn_terminal_event_reader();

    let mut app = App::default();
    let outcome = loop {
        terminal.draw(|frame| render(frame, &app))?;
        tokio::select! {
            Some(update) = updates.recv() => apply_update(&mut app, update),
            terminal_event = terminal_events.recv() => {
                let key = match terminal_event {
                    Some(Ok(Event::Key(key))) => key,
                    // A resize (or anything else) only needs the redraw at the top of the loop.
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => break Err(error).context("cannot read the terminal"),
                    None => break Err(anyhow::anyhow!("the terminal input reader stopped")),
                };
                match handle_key(&mut app, key) {
                    Action::None => {}
                    Action::Quit => break Ok(()),
                    Action::Refresh => refresh_now.notify_one(),
                    Action::SetEnabled { bucket_id, enabled } => {
                        tokio::spawn(set_enabled(
                            store.clone(),
                            bucket_id,
                            enabled,
                            updates_tx.clone(),
                            Arc::clone(&refresh_now),
                        ));
                    }
                }
                let watched = app.detail_bucket().map(str::to_owned);
                watched_bucket_tx.send_if_modified(|current| {
                    let changed = *current != watched;
                    *current = watched;
                    changed
                });
            }
        }
    };
    refresher.abort();
    outcome
}

fn apply_update(app: &mut App, update: Update) {
    match update {
        Update::Snapshot(Ok(snapshot)) => app.apply_snapshot(snapshot),
        Update::Detail {
            bucket_id,
            detail: Ok(detail),
        } => app.apply_detail(&bucket_id, detail),
        Update::Snapshot(Err(error))
        | Update::Detail {
            detail: Err(error), ..
        } => {
            app.refresh_error = Some(error.to_string());
        }
        Update::OperatorOutcome(message) => app.status_message = Some(message),
    }
}

/// Reads the store every [`REFRESH_INTERVAL`], at once when asked, and when the detail view
/// switches buckets. Runs apart from the UI loop so a slow database never blocks the keys.
async fn refresh_loop(
    store: Store,
    mut watched_bucket: watch::Receiver<Option<String>>,
    refresh_now: Arc<Notify>,
    updates: mpsc::UnboundedSender<Update>,
) {
    let mut ticker = tokio::time::interval(REFRESH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = refresh_now.notified() => {}
            changed = watched_bucket.changed() => if changed.is_err() { return },
        }
        let snapshot = reads::snapshot(&store, FEED_LIMIT).await;
        if updates.send(Update::Snapshot(snapshot)).is_err() {
            return;
        }
        let bucket_id = watched_bucket.borrow_and_update().clone();
        if let Some(bucket_id) = bucket_id {
            let detail = reads::bucket_detail(&store, &bucket_id, DETAIL_LIMIT).await;
            if updates.send(Update::Detail { bucket_id, detail }).is_err() {
                return;
            }
        }
    }
}

async fn set_enabled(
    store: Store,
    bucket_id: String,
    enabled: bool,
    updates: mpsc::UnboundedSender<Update>,
    refresh_now: Arc<Notify>,
) {
    let verb = if enabled { "enabled" } else { "disabled" };
    let message = match reads::set_bucket_enabled(&store, &bucket_id, enabled).await {
        Ok(true) => format!("{verb} bucket {bucket_id}"),
        Ok(false) => format!("bucket {bucket_id} no longer exists"),
        Err(error) => format!("could not change bucket {bucket_id}: {error}"),
    };
    // The UI may have quit meanwhile; then nobody needs the outcome.
    let _ = updates.send(Update::OperatorOutcome(message));
    refresh_now.notify_one();
}

/// Reads terminal events on a thread of its own: crossterm's reads block.
fn spawn_terminal_event_reader() -> mpsc::UnboundedReceiver<std::io::Result<Event>> {
    let (events_tx, events) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while !events_tx.is_closed() {
            let next = match event::poll(INPUT_POLL_INTERVAL) {
                Ok(false) => continue,
                Ok(true) => event::read(),
                Err(error) => Err(error),
            };
            let failed = next.is_err();
            if events_tx.send(next).is_err() || failed {
                return;
            }
        }
    });
    events
}
