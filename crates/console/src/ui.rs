//! Drawing the console from an [`App`]: pure, so tests render it on a `TestBackend`.

use chrono::{DateTime, Utc};
use membrane_store::console::{
    BucketDetail, BucketSummary, ConsoleSnapshot, EngineHeartbeat, SweepRun, TransitionRow,
};
use ratatui::layout::{Constraint, Flex, Layout, Rect};
use ratatui::style::{Color, Style, Stylize};
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Block, BorderType, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap,
};
use ratatui::Frame;

use crate::app::{error_lines, App, DetailState, Pane, View};
use crate::format::{age, elapsed, trend};

/// An engine whose heartbeat is older than this is shown as down.
const ENGINE_ALIVE_WITHIN_SECONDS: i64 = 15;
/// Samples shown in the buckets table's trend column.
const TREND_WIDTH: usize = 12;

pub fn render(frame: &mut Frame, app: &App) {
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    render_header(frame, header, app);
    match (&app.snapshot, &app.view) {
        (None, _) => frame.render_widget(
            Paragraph::new(connecting_text(app)).block(Block::bordered()),
            body,
        ),
        (Some(snapshot), View::Overview) => render_overview(frame, body, app, snapshot),
        (Some(snapshot), View::BucketDetail(id)) => {
            render_detail(frame, body, app, snapshot, id);
        }
    }
    render_footer(frame, footer, app);
    if app.help_visible {
        render_help(frame, frame.area());
    }
}

fn connecting_text(app: &App) -> Text<'static> {
    match &app.refresh_error {
        Some(error) => Text::from(vec![
            Line::from("Cannot read the database:".red().bold()),
            Line::from(error.clone()),
        ]),
        None => Text::from("Connecting to the database…"),
    }
}

fn render_header(frame: &mut Frame, area: Rect, app: &App) {
    let mut spans = vec![" membrane ".black().on_cyan().bold(), Span::raw(" ")];
    // First, so a long error is not cut off; the figures after it are the last good refresh's.
    if let Some(error) = &app.refresh_error {
        spans.extend([format!("⚠ {error}").red().bold(), separator()]);
    }
    if let Some(snapshot) = &app.snapshot {
        let alive = alive_engines(snapshot).count();
        let engines_style = if alive == 0 { Color::Red } else { Color::Green };
        let total_members: i64 = snapshot.buckets.iter().map(|b| b.member_count).sum();
        let errors = app.error_buckets().len();
        spans.extend([
            Span::raw(format!(
                "{}/{}",
                snapshot.database.server, snapshot.database.name
            )),
            separator(),
            Span::styled(
                format!("engines {alive}/{}", snapshot.engines.len()),
                engines_style,
            ),
            separator(),
            Span::raw(queue_text(snapshot)),
            separator(),
            Span::raw(format!(
                "buckets {} · memberships {total_members}",
                snapshot.buckets.len()
            )),
        ]);
        if errors > 0 {
            spans.extend([separator(), format!("{errors} in error").red().bold()]);
        }
    }
    frame.render_widget(Line::from(spans), area);
}

fn separator() -> Span<'static> {
    Span::raw(" │ ").dark_gray()
}

fn alive_engines(snapshot: &ConsoleSnapshot) -> impl Iterator<Item = &EngineHeartbeat> {
    snapshot
        .engines
        .iter()
        .filter(|engine| engine_alive(snapshot.taken_at, engine))
}

fn engine_alive(now: DateTime<Utc>, engine: &EngineHeartbeat) -> bool {
    now.signed_duration_since(engine.last_seen_at).num_seconds() <= ENGINE_ALIVE_WITHIN_SECONDS
}

fn queue_text(snapshot: &ConsoleSnapshot) -> String {
    let queue = &snapshot.queue;
    let more = if queue.depth_capped { "+" } else { "" };
    match queue.oldest_enqueued_at {
        Some(oldest) => format!(
            "queue {}{more} · lag {}",
            queue.depth,
            age(snapshot.taken_at, oldest)
        ),
        None => "queue 0".to_owned(),
    }
}

fn render_overview(frame: &mut Frame, area: Rect, app: &App, snapshot: &ConsoleSnapshot) {
    let errors = app.error_buckets();
    let engines_height = snapshot.engines.len().clamp(1, 4) as u16 + 2;
    let errors_height = if errors.is_empty() { 0 } else { 9 };
    let [engines_area, buckets_area, errors_area, feed_area] = Layout::vertical([
        Constraint::Length(engines_height),
        Constraint::Fill(1),
        Constraint::Length(errors_height),
        Constraint::Fill(1),
    ])
    .areas(area);
    render_engines(frame, engines_area, snapshot);
    render_buckets(frame, buckets_area, app, snapshot.taken_at);
    if !errors.is_empty() {
        render_errors(frame, errors_area, app, &errors);
    }
    render_feed(frame, feed_area, app);
}

fn pane_block<'a>(title: impl Into<Line<'a>>, focused: bool) -> Block<'a> {
    let block = Block::bordered().title(title);
    if focused {
        block
            .border_type(BorderType::Thick)
            .border_style(Style::new().cyan())
    } else {
        block.border_style(Style::new().dark_gray())
    }
}

fn header_row<const N: usize>(titles: [&'static str; N]) -> Row<'static> {
    Row::new(titles).style(Style::new().bold().underlined())
}

fn render_engines(frame: &mut Frame, area: Rect, snapshot: &ConsoleSnapshot) {
    let block = pane_block(format!(" Engines ({}) ", snapshot.engines.len()), false);
    if snapshot.engines.is_empty() {
        let empty = Paragraph::new("No engine has reported a heartbeat.".yellow()).block(block);
        frame.render_widget(empty, area);
        return;
    }
    let rows = snapshot.engines.iter().map(|engine| {
        let alive = engine_alive(snapshot.taken_at, engine);
        let state = if alive { "up".green() } else { "down".red() };
        let stats = engine
            .stats
            .as_object()
            .map(|stats| {
                stats
                    .iter()
                    .map(|(key, value)| format!("{key}={value}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            })
            .unwrap_or_default();
        Row::new([
            Cell::from(engine.id.clone()),
            Cell::from(state),
            Cell::from(format!("{}:{}", engine.host, engine.pid)),
            Cell::from(format!(
                "seen {} ago",
                age(snapshot.taken_at, engine.last_seen_at)
            )),
            Cell::from(format!("up {}", age(snapshot.taken_at, engine.started_at))),
            Cell::from(stats),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(16),
            Constraint::Length(4),
            Constraint::Length(22),
            Constraint::Length(12),
            Constraint::Length(8),
            Constraint::Fill(1),
        ],
    )
    .block(block);
    frame.render_widget(table, area);
}

/// The bucket's state in one word; a failing bucket that is also disabled reads `error·off`.
fn status_span(bucket: &BucketSummary) -> Span<'static> {
    match (bucket.status.as_str(), bucket.enabled) {
        ("error", true) => "error".red().bold(),
        ("error", false) => "error·off".red().bold(),
        ("removed", _) => "removed".dark_gray(),
        (_, false) => "disabled".yellow(),
        ("ok", true) if !bucket.backfilled => match &bucket.backfill {
            Some(progress) => format!("fill {}%", progress.percent()).yellow(),
            None => "fill …".yellow(),
        },
        (status, true) => status.to_owned().green(),
    }
}

fn rate_cell(count: i64, sign: char, color: Color) -> Cell<'static> {
    if count == 0 {
        Cell::from(format!("{sign}0")).dark_gray()
    } else {
        Cell::from(format!("{sign}{count}")).fg(color)
    }
}

fn render_buckets(frame: &mut Frame, area: Rect, app: &App, now: DateTime<Utc>) {
    let visible = app.visible_buckets();
    let rows = visible.iter().map(|bucket| {
        let sweep = bucket
            .last_sweep
            .as_ref()
            .map_or_else(String::new, |sweep| {
                format!(
                    "{} ago · {}",
                    age(now, sweep.finished_at),
                    elapsed(sweep.finished_at - sweep.started_at)
                )
            });
        Row::new([
            Cell::from(bucket.id.clone()),
            Cell::from(status_span(bucket)),
            Cell::from(if bucket.time_based { "clock" } else { "event" }),
            Cell::from(Line::from(bucket.member_count.to_string()).right_aligned()),
            rate_cell(bucket.entered_1m, '+', Color::Green),
            rate_cell(bucket.left_1m, '−', Color::Red),
            Cell::from(trend(&app.recent_sizes(&bucket.id, TREND_WIDTH))).cyan(),
            Cell::from(sweep),
            Cell::from(bucket.description.clone()).dark_gray(),
        ])
    });
    let total = app.snapshot.as_ref().map_or(0, |s| s.buckets.len());
    let title = if app.filter.is_empty() {
        format!(" Buckets ({total}) ")
    } else {
        format!(" Buckets ({}/{total}) /{} ", visible.len(), app.filter)
    };
    let table = Table::new(
        rows,
        [
            Constraint::Length(20),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(9),
            Constraint::Length(7),
            Constraint::Length(7),
            Constraint::Length(TREND_WIDTH as u16),
            Constraint::Length(16),
            Constraint::Fill(1),
        ],
    )
    .header(header_row([
        "BUCKET",
        "STATUS",
        "KIND",
        "  MEMBERS",
        "IN/1m",
        "OUT/1m",
        "TREND",
        "LAST SWEEP",
        "DESCRIPTION",
    ]))
    .row_highlight_style(Style::new().reversed())
    .highlight_symbol("▶ ")
    .block(pane_block(title, app.focus == Pane::Buckets));
    let mut state = TableState::new().with_selected(app.selected_index());
    frame.render_stateful_widget(table, area, &mut state);
}

fn render_errors(frame: &mut Frame, area: Rect, app: &App, errors: &[&BucketSummary]) {
    let lines: Vec<Line> = errors
        .iter()
        .flat_map(|bucket| {
            let title = Line::from(vec![
                bucket.id.clone().red().bold(),
                " — the previous version keeps serving".dark_gray(),
            ]);
            std::iter::once(title)
                .chain(error_lines(bucket).map(|line| Line::from(line.to_owned())))
        })
        .collect();
    let paragraph = Paragraph::new(lines)
        .scroll((app.scroll_of(Pane::Errors) as u16, 0))
        .block(pane_block(
            format!(" Errors ({}) ", errors.len()),
            app.focus == Pane::Errors,
        ));
    frame.render_widget(paragraph, area);
}

fn kind_span(transition: &TransitionRow) -> Span<'static> {
    let text = match &transition.label {
        Some(label) => format!("{} {label}", transition.kind),
        None => transition.kind.clone(),
    };
    match transition.kind.as_str() {
        "entered" => text.green(),
        "left" => text.red(),
        _ => text.yellow(),
    }
}

fn transition_rows<'a>(
    transitions: &'a [TransitionRow],
    skip: usize,
    with_bucket: bool,
) -> impl Iterator<Item = Row<'static>> + 'a {
    transitions.iter().skip(skip).map(move |transition| {
        let mut cells = vec![
            Cell::from(transition.occurred_at.format("%H:%M:%S").to_string()),
            Cell::from(kind_span(transition)),
        ];
        if with_bucket {
            cells.push(Cell::from(transition.bucket_id.clone()));
        }
        cells.extend([
            Cell::from(transition.user_id.clone()),
            Cell::from(Line::from(transition.epoch.to_string()).right_aligned()),
            Cell::from(format!("{} / {}", transition.source, transition.reason)).dark_gray(),
        ]);
        Row::new(cells)
    })
}

fn render_feed(frame: &mut Frame, area: Rect, app: &App) {
    let state = if app.feed_paused {
        "PAUSED".black().on_yellow()
    } else {
        "live".green()
    };
    let title = Line::from(vec![
        Span::raw(" Transitions "),
        state,
        Span::raw(" (times in UTC) "),
    ]);
    let table = Table::new(
        transition_rows(&app.feed, app.scroll_of(Pane::Feed), true),
        [
            Constraint::Length(8),
            Constraint::Length(12),
            Constraint::Length(20),
            Constraint::Length(24),
            Constraint::Length(5),
            Constraint::Fill(1),
        ],
    )
    .header(header_row([
        "TIME",
        "KIND",
        "BUCKET",
        "USER",
        "EPOCH",
        "SOURCE / REASON",
    ]))
    .block(pane_block(title, app.focus == Pane::Feed));
    frame.render_widget(table, area);
}

fn render_detail(
    frame: &mut Frame,
    area: Rect,
    app: &App,
    snapshot: &ConsoleSnapshot,
    bucket_id: &str,
) {
    let detail = match &app.detail {
        DetailState::Loaded(detail) => detail,
        DetailState::Loading => {
            let loading = Paragraph::new(format!("Loading bucket {bucket_id}…"));
            frame.render_widget(loading.block(Block::bordered()), area);
            return;
        }
        DetailState::Missing => {
            let missing = Paragraph::new(format!("Bucket {bucket_id} does not exist (any more)."));
            frame.render_widget(missing.block(Block::bordered()), area);
            return;
        }
    };
    let summary = app.bucket(bucket_id);
    let definition_lines = detail.definition.lines().count() as u16;
    let error_height = summary.map_or(0, |bucket| match error_lines(bucket).count() as u16 {
        0 => 0,
        lines => lines + 2,
    });
    let [facts_area, definition_area, error_area, lists_area] = Layout::vertical([
        Constraint::Length(6),
        Constraint::Length(definition_lines.clamp(1, 8) + 2),
        Constraint::Length(error_height),
        Constraint::Fill(1),
    ])
    .areas(area);
    let [facts_text_area, size_area] =
        Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)]).areas(facts_area);

    frame.render_widget(
        Paragraph::new(detail_facts(detail, summary, snapshot.taken_at))
            .block(pane_block(format!(" Bucket {bucket_id} "), false)),
        facts_text_area,
    );
    let samples = app.recent_sizes(bucket_id, usize::from(size_area.width.saturating_sub(2)));
    frame.render_widget(size_sparkline(&samples), size_area);
    frame.render_widget(
        Paragraph::new(detail.definition.clone())
            .wrap(Wrap { trim: false })
            .block(pane_block(
                format!(" Definition · {} ", detail.source_path),
                false,
            )),
        definition_area,
    );
    if let Some(bucket) = summary.filter(|_| error_height > 0) {
        let diagnostic = error_lines(bucket).map(|line| Line::from(line.to_owned()).red());
        frame.render_widget(
            Paragraph::new(diagnostic.collect::<Vec<_>>()).block(pane_block(
                " Last error (the previous version keeps serving) ",
                false,
            )),
            error_area,
        );
    }
    let member_count = summary.map_or(0, |bucket| bucket.member_count);
    render_detail_lists(
        frame,
        lists_area,
        app,
        detail,
        member_count,
        snapshot.taken_at,
    );
}

/// Sizes drawn above their minimum so that a few joins show on a large bucket; the title
/// gives the range.
fn size_sparkline(samples: &[i64]) -> Sparkline<'static> {
    let low = samples.iter().copied().min().unwrap_or(0);
    let high = samples.iter().copied().max().unwrap_or(0);
    let title = format!(
        " Size · {low}–{high} over the last {} refreshes ",
        samples.len()
    );
    Sparkline::default()
        .data(
            samples
                .iter()
                .map(|&size| (size - low) as u64)
                .collect::<Vec<_>>(),
        )
        .style(Style::new().cyan())
        .block(pane_block(title, false))
}

fn detail_facts(
    detail: &BucketDetail,
    summary: Option<&BucketSummary>,
    now: DateTime<Utc>,
) -> Text<'static> {
    let mut lines = Vec::new();
    if let Some(bucket) = summary {
        lines.push(Line::from(bucket.description.clone()).italic());
        lines.push(Line::from(vec![
            Span::raw("status "),
            status_span(bucket),
            Span::raw(format!(
                " · {} · updated {} ago",
                if bucket.time_based {
                    "time-based"
                } else {
                    "event-driven"
                },
                age(now, bucket.updated_at)
            )),
        ]));
        lines.push(Line::from(vec![
            Span::raw(format!("members {} · ", bucket.member_count)),
            format!("+{}", bucket.entered_1m).green(),
            Span::raw(" "),
            format!("−{}", bucket.left_1m).red(),
            Span::raw(" in the last minute"),
        ]));
    }
    let progress = summary.and_then(|bucket| bucket.backfill.as_ref());
    let backfill = match (&detail.backfilled_hash, progress) {
        (Some(hash), _) if *hash == detail.criteria_hash => "backfilled".green(),
        (_, Some(progress)) => format!(
            "backfill {}% ({}/{} users)",
            progress.percent(),
            progress.users_done,
            progress.total_estimate
        )
        .yellow(),
        _ => "backfill pending".yellow(),
    };
    lines.push(Line::from(vec![
        Span::raw(format!("criteria {} · ", short_hash(&detail.criteria_hash))),
        backfill,
    ]));
    Text::from(lines)
}

fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn render_detail_lists(
    frame: &mut Frame,
    area: Rect,
    app: &App,
    detail: &BucketDetail,
    member_count: i64,
    now: DateTime<Utc>,
) {
    let [members_area, transitions_area, sweeps_area] = Layout::horizontal([
        Constraint::Percentage(28),
        Constraint::Percentage(42),
        Constraint::Percentage(30),
    ])
    .areas(area);

    let members = detail
        .members
        .iter()
        .skip(app.scroll_of(Pane::Members))
        .map(|member| {
            Row::new([
                Cell::from(member.user_id.clone()),
                Cell::from(Line::from(member.epoch.to_string()).right_aligned()),
                Cell::from(age(now, member.entered_at)),
            ])
        });
    let members_table = Table::new(
        members,
        [
            Constraint::Fill(1),
            Constraint::Length(5),
            Constraint::Length(6),
        ],
    )
    .header(header_row(["USER", "EPOCH", "IN FOR"]))
    .block(pane_block(
        format!(" Members ({} of {member_count}) ", detail.members.len()),
        app.focus == Pane::Members,
    ));
    frame.render_widget(members_table, members_area);

    let transitions_table = Table::new(
        transition_rows(
            &detail.transitions,
            app.scroll_of(Pane::BucketTransitions),
            false,
        ),
        [
            Constraint::Length(8),
            Constraint::Length(12),
            Constraint::Length(12),
            Constraint::Length(5),
            Constraint::Fill(1),
        ],
    )
    .header(header_row([
        "TIME",
        "KIND",
        "USER",
        "EPOCH",
        "SOURCE / REASON",
    ]))
    .block(pane_block(
        " Recent transitions ",
        app.focus == Pane::BucketTransitions,
    ));
    frame.render_widget(transitions_table, transitions_area);

    let sweeps = detail
        .sweeps
        .iter()
        .skip(app.scroll_of(Pane::Sweeps))
        .map(|sweep| sweep_row(sweep, now));
    let sweeps_table = Table::new(
        sweeps,
        [
            Constraint::Length(5),
            Constraint::Length(6),
            Constraint::Fill(1),
            Constraint::Length(6),
            Constraint::Length(6),
        ],
    )
    .header(header_row(["AGO", "TOOK", "CHECKED", "JOIN", "LEFT"]))
    .block(pane_block(" Sweeps ", app.focus == Pane::Sweeps));
    frame.render_widget(sweeps_table, sweeps_area);
}

fn sweep_row(sweep: &SweepRun, now: DateTime<Utc>) -> Row<'static> {
    Row::new([
        Cell::from(age(now, sweep.finished_at)),
        Cell::from(elapsed(sweep.finished_at - sweep.started_at)),
        Cell::from(Line::from(sweep.checked.to_string()).right_aligned()),
        Cell::from(Line::from(format!("+{}", sweep.joined)).right_aligned()).green(),
        Cell::from(Line::from(format!("−{}", sweep.left_count)).right_aligned()).red(),
    ])
}

/// Key hints, and instead of them the filter prompt while it is being typed.
fn render_footer(frame: &mut Frame, area: Rect, app: &App) {
    let line = if app.editing_filter {
        Line::from(vec![
            "/".cyan().bold(),
            Span::raw(app.filter.clone()),
            "█".cyan(),
            "   Enter keep · Esc clear".dark_gray(),
        ])
    } else {
        let hints: &[(&str, &str)] = match app.view {
            View::Overview => &[
                ("?", "help"),
                ("q", "quit"),
                ("/", "filter"),
                ("Tab", "pane"),
                ("j/k", "move"),
                ("Enter", "detail"),
                ("e", "enable/disable"),
                ("p", "pause feed"),
            ],
            View::BucketDetail(_) => &[
                ("?", "help"),
                ("q", "quit"),
                ("Esc", "back"),
                ("Tab", "pane"),
                ("j/k", "scroll"),
                ("e", "enable/disable"),
            ],
        };
        let mut spans: Vec<Span> = hints
            .iter()
            .flat_map(|(key, what)| {
                [
                    format!(" {key} ").black().on_dark_gray(),
                    Span::raw(format!(" {what}  ")),
                ]
            })
            .collect();
        if let Some(message) = &app.status_message {
            spans.extend([separator(), Span::raw(message.clone()).yellow()]);
        }
        Line::from(spans)
    };
    frame.render_widget(line, area);
}

const HELP: &[(&str, &str)] = &[
    ("?", "show / hide this help"),
    ("q, Ctrl-C", "quit"),
    (
        "/",
        "filter buckets by id or description (Enter keeps, Esc clears)",
    ),
    ("Esc", "back to the overview, or clear the filter"),
    ("Tab, Shift-Tab", "focus the next / previous pane"),
    ("j/k, ↓/↑", "move the selection or scroll the focused pane"),
    ("PgDn/PgUp", "move by ten rows"),
    ("Enter", "open the selected bucket"),
    ("e", "enable / disable the selected bucket"),
    ("p", "pause / resume the transitions feed"),
    ("r", "refresh now"),
];

fn render_help(frame: &mut Frame, area: Rect) {
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(key, what)| Line::from(vec![format!("{key:>16}  ").cyan().bold(), Span::raw(*what)]))
        .collect();
    let [popup] = Layout::horizontal([Constraint::Length(76)])
        .flex(Flex::Center)
        .areas(area);
    let [popup] = Layout::vertical([Constraint::Length(lines.len() as u16 + 2)])
        .flex(Flex::Center)
        .areas(popup);
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::bordered()
                .border_type(BorderType::Rounded)
                .title(" Help — press ? or Esc to close ".bold())
                .border_style(Style::new().cyan()),
        ),
        popup,
    );
}
