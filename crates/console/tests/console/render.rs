//! Snapshot tests of the console's screens, drawn from a fixed in-memory scene.

use crate::fixture;
use crossterm::event::{KeyCode, KeyEvent};
use membrane_console::{handle_key, render, App};
use ratatui::backend::TestBackend;
use ratatui::style::Color;
use ratatui::Terminal;

fn draw(app: &App) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(120, 36)).expect("test backend");
    terminal
        .draw(|frame| render(frame, app))
        .expect("drawing on a test backend");
    terminal
}

/// An app that has seen a bucket grow over a few refreshes.
fn app_after_refreshes() -> App {
    let mut app = App::default();
    for size in [1_180, 1_190, 1_185, 1_200, 1_214] {
        app.apply_snapshot(fixture::snapshot(size));
    }
    app
}

fn press(app: &mut App, code: KeyCode) {
    handle_key(app, KeyEvent::from(code));
}

#[test]
fn overview() {
    let terminal = draw(&app_after_refreshes());
    insta::assert_snapshot!(terminal.backend());
}

#[test]
fn overview_colours_transitions_by_kind() {
    let terminal = draw(&app_after_refreshes());
    let buffer = terminal.backend().buffer();
    let colour_of_word = |word: &str| {
        let y = (0..buffer.area.height)
            .find(|&y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
                    .contains(&format!(" {word} "))
            })
            .expect("a feed row with that kind");
        let x = (0..buffer.area.width - word.len() as u16)
            .find(|&x| {
                (0..word.len() as u16)
                    .map(|i| buffer[(x + i, y)].symbol())
                    .collect::<String>()
                    == word
            })
            .expect("the word on that row");
        buffer[(x, y)].fg
    };
    assert_eq!(colour_of_word("entered"), Color::Green);
    assert_eq!(colour_of_word("left"), Color::Red);
    assert_eq!(colour_of_word("dwell 1d"), Color::Yellow);
}

#[test]
fn overview_filtered_and_paused() {
    let mut app = app_after_refreshes();
    press(&mut app, KeyCode::Char('/'));
    for character in "spend".chars() {
        press(&mut app, KeyCode::Char(character));
    }
    press(&mut app, KeyCode::Enter);
    press(&mut app, KeyCode::Char('p'));
    let terminal = draw(&app);
    insta::assert_snapshot!(terminal.backend());
}

#[test]
fn help_overlay() {
    let mut app = app_after_refreshes();
    press(&mut app, KeyCode::Char('?'));
    insta::assert_snapshot!(draw(&app).backend());
}

#[test]
fn bucket_detail_shows_the_full_diagnostic() {
    let mut app = app_after_refreshes();
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Enter);
    app.apply_detail("big-spenders", Some(fixture::big_spenders_detail()));
    let terminal = draw(&app);
    let screen = terminal.backend().to_string();
    for line in fixture::BIG_SPENDERS_ERROR.lines() {
        assert!(screen.contains(line), "detail view lacks {line:?}");
    }
    insta::assert_snapshot!(terminal.backend());
}

#[test]
fn before_the_first_refresh() {
    insta::assert_snapshot!(draw(&App::default()).backend());
}

#[test]
fn filter_prompt_while_typing() {
    let mut app = app_after_refreshes();
    press(&mut app, KeyCode::Char('/'));
    for character in "news".chars() {
        press(&mut app, KeyCode::Char(character));
    }
    let screen = draw(&app).backend().to_string();
    let footer = screen.lines().last().expect("a footer line");
    assert!(footer.contains("/news█"), "footer: {footer}");
}

#[test]
fn header_and_engines_pane_say_when_something_is_wrong() {
    let mut app = App::default();
    let mut snapshot = fixture::snapshot(1);
    snapshot.engines.clear();
    app.apply_snapshot(snapshot);
    app.refresh_error = Some("connection refused".to_owned());
    let screen = draw(&app).backend().to_string();
    let header = screen.lines().next().expect("a header line");
    assert!(header.contains("engines 0/0"), "header: {header}");
    assert!(header.contains("⚠ connection refused"), "header: {header}");
    assert!(screen.contains("No engine has reported a heartbeat."));
}

#[test]
fn a_running_backfill_shows_its_percentage() {
    let mut snapshot = fixture::snapshot(1_214);
    let bucket = &mut snapshot.buckets[0];
    bucket.backfilled = false;
    bucket.backfill = Some(membrane_store::BackfillProgress {
        bucket_id: bucket.id.clone(),
        criteria_hash: "h1".to_owned(),
        cursor: "user-0420".to_owned(),
        users_done: 420,
        total_estimate: 1_000,
        started_at: fixture::now(),
        finished_at: None,
    });
    let mut app = App::default();
    app.apply_snapshot(snapshot);
    let terminal = draw(&app);
    let screen: String = terminal
        .backend()
        .buffer()
        .content()
        .iter()
        .map(|cell| cell.symbol())
        .collect();
    assert!(screen.contains("fill 42%"), "{}", terminal.backend());
}
