//! Key handling: what each key does to the state and asks of the run loop.

use crate::fixture;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use membrane_console::{handle_key, Action, App, DetailState, Pane, View};

fn app() -> App {
    let mut app = App::default();
    app.apply_snapshot(fixture::snapshot(1_200));
    app
}

fn press(app: &mut App, code: KeyCode) -> Action {
    handle_key(app, KeyEvent::from(code))
}

fn type_text(app: &mut App, text: &str) {
    for character in text.chars() {
        press(app, KeyCode::Char(character));
    }
}

#[test]
fn q_and_ctrl_c_quit() {
    assert_eq!(press(&mut app(), KeyCode::Char('q')), Action::Quit);
    let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
    assert_eq!(handle_key(&mut app(), ctrl_c), Action::Quit);
}

#[test]
fn j_and_k_move_the_selection_within_bounds() {
    let mut app = app();
    assert_eq!(app.selected_bucket.as_deref(), Some("active-users"));
    press(&mut app, KeyCode::Char('k'));
    assert_eq!(app.selected_bucket.as_deref(), Some("active-users"));
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Down);
    press(&mut app, KeyCode::Down);
    assert_eq!(app.selected_bucket.as_deref(), Some("newsletter"));
    press(&mut app, KeyCode::Up);
    assert_eq!(app.selected_bucket.as_deref(), Some("big-spenders"));
}

#[test]
fn filter_narrows_the_buckets_and_esc_clears_it() {
    let mut app = app();
    press(&mut app, KeyCode::Char('/'));
    // While typing, letters are filter text, not commands.
    type_text(&mut app, "news");
    assert_eq!(app.filter, "news");
    assert_eq!(app.selected_bucket.as_deref(), Some("newsletter"));
    press(&mut app, KeyCode::Enter);
    assert!(!app.editing_filter);
    let visible: Vec<_> = app.visible_buckets().iter().map(|b| b.id.clone()).collect();
    assert_eq!(visible, ["newsletter"]);
    press(&mut app, KeyCode::Esc);
    assert_eq!(app.filter, "");
    assert_eq!(app.visible_buckets().len(), 3);
}

#[test]
fn e_toggles_the_selected_bucket() {
    let mut app = app();
    assert_eq!(
        press(&mut app, KeyCode::Char('e')),
        Action::SetEnabled {
            bucket_id: "active-users".to_owned(),
            enabled: false
        }
    );
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Char('j'));
    assert_eq!(
        press(&mut app, KeyCode::Char('e')),
        Action::SetEnabled {
            bucket_id: "newsletter".to_owned(),
            enabled: true
        }
    );
}

#[test]
fn enter_opens_the_detail_and_esc_goes_back() {
    let mut app = app();
    press(&mut app, KeyCode::Char('j'));
    press(&mut app, KeyCode::Enter);
    assert_eq!(app.view, View::BucketDetail("big-spenders".to_owned()));
    assert_eq!(app.detail_bucket(), Some("big-spenders"));
    assert_eq!(app.detail, DetailState::Loading);

    // A detail fetched for another bucket (a late reply) is ignored.
    app.apply_detail("active-users", None);
    assert_eq!(app.detail, DetailState::Loading);
    app.apply_detail("big-spenders", None);
    assert_eq!(app.detail, DetailState::Missing);

    press(&mut app, KeyCode::Esc);
    assert_eq!(app.view, View::Overview);
    assert_eq!(app.detail_bucket(), None);
}

#[test]
fn tab_cycles_the_panes_of_the_view() {
    let mut app = app();
    assert_eq!(app.focus, Pane::Buckets);
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.focus, Pane::Feed);
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.focus, Pane::Errors);
    press(&mut app, KeyCode::Tab);
    assert_eq!(app.focus, Pane::Buckets);
    press(&mut app, KeyCode::BackTab);
    assert_eq!(app.focus, Pane::Errors);
}

#[test]
fn scrolling_stops_at_the_last_row() {
    let mut app = app();
    press(&mut app, KeyCode::Tab);
    for _ in 0..10 {
        press(&mut app, KeyCode::Char('j'));
    }
    assert_eq!(app.scroll_of(Pane::Feed), app.feed.len() - 1);
}

#[test]
fn paused_feed_keeps_its_rows_while_the_rest_refreshes() {
    let mut app = app();
    press(&mut app, KeyCode::Char('p'));
    let mut newer = fixture::snapshot(1_300);
    newer.transitions.clear();
    app.apply_snapshot(newer);
    assert_eq!(app.feed.len(), 4);
    assert_eq!(
        app.bucket("active-users").map(|b| b.member_count),
        Some(1_300)
    );
    press(&mut app, KeyCode::Char('p'));
    app.apply_snapshot(fixture::snapshot(1_300));
    let mut emptied = fixture::snapshot(1_300);
    emptied.transitions.clear();
    app.apply_snapshot(emptied);
    assert!(app.feed.is_empty());
}

#[test]
fn size_history_is_bounded_and_forgets_removed_buckets() {
    let mut app = App::default();
    for size in 0..(membrane_console::SIZE_HISTORY_LEN as i64 + 10) {
        app.apply_snapshot(fixture::snapshot(size));
    }
    let history = &app.size_history["active-users"];
    assert_eq!(history.len(), membrane_console::SIZE_HISTORY_LEN);
    assert_eq!(
        history.back(),
        Some(&(membrane_console::SIZE_HISTORY_LEN as i64 + 9))
    );

    let mut fewer = fixture::snapshot(1);
    fewer.buckets.retain(|bucket| bucket.id != "newsletter");
    app.apply_snapshot(fewer);
    assert!(!app.size_history.contains_key("newsletter"));
}

#[test]
fn help_is_an_overlay_closed_by_esc_or_question_mark() {
    let mut app = app();
    press(&mut app, KeyCode::Char('?'));
    assert!(app.help_visible);
    // Keys other than closing ones do nothing under the overlay.
    press(&mut app, KeyCode::Char('j'));
    assert_eq!(app.selected_bucket.as_deref(), Some("active-users"));
    press(&mut app, KeyCode::Esc);
    assert!(!app.help_visible);
    press(&mut app, KeyCode::Char('?'));
    press(&mut app, KeyCode::Char('?'));
    assert!(!app.help_visible);
}
