use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{native_pty_system, CommandBuilder, PtySize};

use crate::support::{eventually, RunningEngine, BINARY};

const GOLD: &str = r#"
description = "Gold tier"
criteria = 'prop("tier") == "gold"'
"#;

/// The real `membrane console` in a pseudo-terminal attaches to the database an engine writes
/// to and shows the live member count; `q` quits it.
#[tokio::test(flavor = "multi_thread")]
async fn console_in_a_pty_shows_member_counts() {
    let engine = RunningEngine::start(&[("vip.toml", GOLD)]).await;
    for user in ["a", "b", "c"] {
        engine
            .identify(user, serde_json::json!({"tier": "gold"}))
            .await;
    }
    let store = engine.db.store.clone();
    eventually(Duration::from_secs(5), "three members", || {
        let store = store.clone();
        async move { (store.member_count("vip").await.ok()?? == 3).then_some(()) }
    })
    .await;

    let pty = native_pty_system()
        .openpty(PtySize {
            rows: 40,
            cols: 140,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut command = CommandBuilder::new(BINARY);
    command.arg("console");
    command.env("DATABASE_URL", &engine.db.url);
    command.env("TERM", "xterm-256color");
    let mut child = pty.slave.spawn_command(command).unwrap();
    drop(pty.slave);

    let screen = Arc::new(Mutex::new(vt100::Parser::new(40, 140, 0)));
    let mut reader = pty.master.try_clone_reader().unwrap();
    let parser = screen.clone();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = reader.read(&mut buffer) {
            if read == 0 {
                break;
            }
            parser.lock().unwrap().process(&buffer[..read]);
        }
    });
    let contents = || screen.lock().unwrap().screen().contents();

    let deadline = Instant::now() + Duration::from_secs(15);
    let row = loop {
        let text = contents();
        if let Some(line) = text.lines().find(|l| l.contains("vip") && l.contains('3')) {
            break line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no member count on screen:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let numbers: Vec<&str> = row.split_whitespace().collect();
    assert!(numbers.contains(&"3"), "row without the count 3: {row}");

    let mut writer = pty.master.take_writer().unwrap();
    writer.write_all(b"q").unwrap();
    writer.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "console exited with {status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "console did not quit on q");
        std::thread::sleep(Duration::from_millis(50));
    }
}
