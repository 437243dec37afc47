//! The console's state and its key handling, free of I/O so tests can drive it directly.

use std::collections::{HashMap, VecDeque};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use membrane_store::console::{BucketDetail, BucketSummary, ConsoleSnapshot, TransitionRow};

/// Member counts remembered per bucket for the size trend: two minutes at the refresh rate.
pub const SIZE_HISTORY_LEN: usize = 240;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    Overview,
    BucketDetail(String),
}

/// The panes `Tab` moves between; which ones exist depends on the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pane {
    Buckets,
    Feed,
    Errors,
    Members,
    BucketTransitions,
    Sweeps,
}

/// What the run loop must do after a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Refresh,
    SetEnabled { bucket_id: String, enabled: bool },
}

/// The detail view's data, fetched separately from the overview snapshot.
#[derive(Debug, Clone, PartialEq)]
pub enum DetailState {
    Loading,
    Missing,
    Loaded(Box<BucketDetail>),
}

#[derive(Debug, Clone)]
pub struct App {
    /// The latest overview, `None` until the first refresh lands.
    pub snapshot: Option<ConsoleSnapshot>,
    /// What the feed shows: the snapshot's transitions, frozen while the feed is paused.
    pub feed: Vec<TransitionRow>,
    pub feed_paused: bool,
    pub view: View,
    pub help_visible: bool,
    pub focus: Pane,
    /// The selected bucket by id, so the selection survives buckets appearing and disappearing.
    pub selected_bucket: Option<String>,
    pub filter: String,
    pub editing_filter: bool,
    pub detail: DetailState,
    /// Scroll offsets of the list panes (the buckets pane scrolls with its selection instead).
    pub scroll: HashMap<Pane, usize>,
    /// Member counts of successive refreshes, oldest first.
    pub size_history: HashMap<String, VecDeque<i64>>,
    /// The outcome of the last operator action, shown in the footer.
    pub status_message: Option<String>,
    /// Why the last refresh failed; cleared by the next successful one.
    pub refresh_error: Option<String>,
}

impl Default for App {
    fn default() -> Self {
        App {
            snapshot: None,
            feed: Vec::new(),
            feed_paused: false,
            view: View::Overview,
            help_visible: false,
            focus: Pane::Buckets,
            selected_bucket: None,
            filter: String::new(),
            editing_filter: false,
            detail: DetailState::Loading,
            scroll: HashMap::new(),
            size_history: HashMap::new(),
            status_message: None,
            refresh_error: None,
        }
    }
}

impl App {
    pub fn apply_snapshot(&mut self, snapshot: ConsoleSnapshot) {
        for bucket in &snapshot.buckets {
            let history = self.size_history.entry(bucket.id.clone()).or_default();
            if history.len() == SIZE_HISTORY_LEN {
                history.pop_front();
            }
            history.push_back(bucket.member_count);
        }
        self.size_history
            .retain(|id, _| snapshot.buckets.iter().any(|bucket| &bucket.id == id));
        if !self.feed_paused {
            self.feed = snapshot.transitions.clone();
        }
        self.snapshot = Some(snapshot);
        self.refresh_error = None;
        self.keep_selection_visible();
        if self.focus == Pane::Errors && self.error_buckets().is_empty() {
            self.focus = Pane::Buckets;
        }
    }

    /// Takes a fetched detail if the detail view still shows that bucket.
    pub fn apply_detail(&mut self, bucket_id: &str, detail: Option<BucketDetail>) {
        if self.detail_bucket() == Some(bucket_id) {
            self.detail = match detail {
                Some(detail) => DetailState::Loaded(Box::new(detail)),
                None => DetailState::Missing,
            };
        }
    }

    /// The bucket whose detail the run loop should keep fetching.
    pub fn detail_bucket(&self) -> Option<&str> {
        match &self.view {
            View::BucketDetail(id) => Some(id),
            View::Overview => None,
        }
    }

    /// Buckets whose id or description contains the filter (ignoring case), in snapshot order.
    pub fn visible_buckets(&self) -> Vec<&BucketSummary> {
        let Some(snapshot) = &self.snapshot else {
            return Vec::new();
        };
        let needle = self.filter.to_lowercase();
        snapshot
            .buckets
            .iter()
            .filter(|bucket| {
                bucket.id.to_lowercase().contains(&needle)
                    || bucket.description.to_lowercase().contains(&needle)
            })
            .collect()
    }

    pub fn error_buckets(&self) -> Vec<&BucketSummary> {
        self.snapshot
            .iter()
            .flat_map(|snapshot| &snapshot.buckets)
            .filter(|bucket| bucket.status == "error")
            .collect()
    }

    pub fn bucket(&self, id: &str) -> Option<&BucketSummary> {
        self.snapshot
            .as_ref()?
            .buckets
            .iter()
            .find(|bucket| bucket.id == id)
    }

    /// Index of the selected bucket within [`App::visible_buckets`].
    pub fn selected_index(&self) -> Option<usize> {
        let selected = self.selected_bucket.as_deref()?;
        self.visible_buckets()
            .iter()
            .position(|bucket| bucket.id == selected)
    }

    /// The bucket's last `count` member counts, oldest first.
    pub fn recent_sizes(&self, bucket_id: &str, count: usize) -> Vec<i64> {
        let Some(history) = self.size_history.get(bucket_id) else {
            return Vec::new();
        };
        history
            .iter()
            .skip(history.len().saturating_sub(count))
            .copied()
            .collect()
    }

    pub fn scroll_of(&self, pane: Pane) -> usize {
        self.scroll.get(&pane).copied().unwrap_or(0)
    }

    /// Keeps a visible bucket selected when the filter or the bucket list changes.
    fn keep_selection_visible(&mut self) {
        if self.selected_index().is_none() {
            self.selected_bucket = self
                .visible_buckets()
                .first()
                .map(|bucket| bucket.id.clone());
        }
    }

    fn panes(&self) -> Vec<Pane> {
        match self.view {
            View::Overview if self.error_buckets().is_empty() => vec![Pane::Buckets, Pane::Feed],
            View::Overview => vec![Pane::Buckets, Pane::Feed, Pane::Errors],
            View::BucketDetail(_) => vec![Pane::Members, Pane::BucketTransitions, Pane::Sweeps],
        }
    }

    fn cycle_focus(&mut self, forward: bool) {
        let panes = self.panes();
        let current = panes.iter().position(|pane| *pane == self.focus);
        let next = match (current, forward) {
            (None, _) => 0,
            (Some(index), true) => (index + 1) % panes.len(),
            (Some(index), false) => (index + panes.len() - 1) % panes.len(),
        };
        self.focus = panes[next];
    }

    /// Moves the focused pane's selection or scroll by `delta` rows (clamped at the ends).
    fn move_in_focused_pane(&mut self, delta: isize) {
        if self.focus == Pane::Buckets {
            let visible = self.visible_buckets();
            let Some(last) = visible.len().checked_sub(1) else {
                return;
            };
            let next = self
                .selected_index()
                .map_or(0, |index| index.saturating_add_signed(delta).min(last));
            self.selected_bucket = Some(visible[next].id.clone());
        } else {
            let last = self.pane_len(self.focus).saturating_sub(1);
            let offset = self.scroll.entry(self.focus).or_default();
            *offset = offset.saturating_add_signed(delta).min(last);
        }
    }

    /// Rows a scrolling pane holds, to stop its scroll at the last one.
    fn pane_len(&self, pane: Pane) -> usize {
        let detail = match &self.detail {
            DetailState::Loaded(detail) => Some(detail.as_ref()),
            DetailState::Loading | DetailState::Missing => None,
        };
        match pane {
            Pane::Buckets => self.visible_buckets().len(),
            Pane::Feed => self.feed.len(),
            Pane::Errors => self
                .error_buckets()
                .iter()
                .map(|bucket| error_lines(bucket).count() + 1)
                .sum(),
            Pane::Members => detail.map_or(0, |detail| detail.members.len()),
            Pane::BucketTransitions => detail.map_or(0, |detail| detail.transitions.len()),
            Pane::Sweeps => detail.map_or(0, |detail| detail.sweeps.len()),
        }
    }

    fn open_selected_bucket(&mut self) {
        if let Some(id) = self.selected_bucket.clone() {
            self.view = View::BucketDetail(id);
            self.detail = DetailState::Loading;
            self.focus = Pane::Members;
            for pane in [Pane::Members, Pane::BucketTransitions, Pane::Sweeps] {
                self.scroll.remove(&pane);
            }
        }
    }

    fn back_to_overview(&mut self) {
        self.view = View::Overview;
        self.detail = DetailState::Loading;
        self.focus = Pane::Buckets;
    }

    /// The bucket `e` acts on: the one shown in detail, else the selected one.
    fn toggle_enabled_action(&self) -> Action {
        let target = self
            .detail_bucket()
            .or(self.selected_bucket.as_deref())
            .and_then(|id| self.bucket(id));
        match target {
            Some(bucket) => Action::SetEnabled {
                bucket_id: bucket.id.clone(),
                enabled: !bucket.enabled,
            },
            None => Action::None,
        }
    }

    fn edit_filter(&mut self, key: KeyEvent) {
        match key.code {
            KeyCode::Enter => self.editing_filter = false,
            KeyCode::Esc => {
                self.editing_filter = false;
                self.filter.clear();
            }
            KeyCode::Backspace => {
                self.filter.pop();
            }
            KeyCode::Char(character) => self.filter.push(character),
            _ => {}
        }
        self.keep_selection_visible();
    }
}

/// The lines of a bucket's last error (a multi-line, rustc-style diagnostic).
pub fn error_lines(bucket: &BucketSummary) -> std::str::Lines<'_> {
    bucket.last_error.as_deref().unwrap_or_default().lines()
}

/// Applies one key press to the state and says what the run loop must do about it.
pub fn handle_key(app: &mut App, key: KeyEvent) -> Action {
    if key.kind != KeyEventKind::Press {
        return Action::None;
    }
    let ctrl_c = key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
    if ctrl_c {
        return Action::Quit;
    }
    if app.editing_filter {
        app.edit_filter(key);
        return Action::None;
    }
    if app.help_visible {
        match key.code {
            KeyCode::Char('q') => return Action::Quit,
            KeyCode::Char('?') | KeyCode::Esc => app.help_visible = false,
            _ => {}
        }
        return Action::None;
    }
    match key.code {
        KeyCode::Char('q') => return Action::Quit,
        KeyCode::Char('?') => app.help_visible = true,
        KeyCode::Char('r') => return Action::Refresh,
        KeyCode::Char('p') => app.feed_paused = !app.feed_paused,
        KeyCode::Char('e') => return app.toggle_enabled_action(),
        KeyCode::Tab => app.cycle_focus(true),
        KeyCode::BackTab => app.cycle_focus(false),
        KeyCode::Char('j') | KeyCode::Down => app.move_in_focused_pane(1),
        KeyCode::Char('k') | KeyCode::Up => app.move_in_focused_pane(-1),
        KeyCode::PageDown => app.move_in_focused_pane(10),
        KeyCode::PageUp => app.move_in_focused_pane(-10),
        KeyCode::Char('/') if app.view == View::Overview => {
            app.editing_filter = true;
            app.focus = Pane::Buckets;
        }
        KeyCode::Enter if app.view == View::Overview => app.open_selected_bucket(),
        KeyCode::Esc if app.view != View::Overview => app.back_to_overview(),
        KeyCode::Esc => {
            app.filter.clear();
            app.keep_selection_visible();
        }
        _ => {}
    }
    Action::None
}
