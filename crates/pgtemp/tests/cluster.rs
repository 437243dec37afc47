//! Starts real throwaway clusters from the installed Postgres binaries.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use membrane_pgtemp::TempCluster;

/// Set in the child process of `killed_owner_leaves_nothing_behind`.
const OWNER_ROLE_VAR: &str = "MEMBRANE_PGTEMP_TEST_OWNER";
/// How the child tells the parent which cluster it started.
const STARTED_MARKER: &str = "membrane-pgtemp-started";

fn psql_select_one(url: &str) -> String {
    let output = Command::new("psql")
        .args([url, "-X", "-A", "-t", "-c", "select 1"])
        .output()
        .expect("psql runs");
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn port_is_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

fn wait_until(patience: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}

#[test]
fn serves_queries_and_drop_removes_everything() {
    let cluster = TempCluster::start().expect("cluster starts");
    let dir = cluster.dir().to_path_buf();
    let port = cluster.port();
    assert!(dir.join("data/PG_VERSION").is_file());
    assert!(cluster.url().starts_with("postgres://"));

    assert_eq!(psql_select_one(&cluster.url()), "1");

    drop(cluster);
    assert!(!dir.exists(), "{} still exists", dir.display());
    assert!(!port_is_open(port), "port {port} still accepts connections");
}

#[test]
fn clusters_are_independent() {
    let first = TempCluster::start().expect("first cluster starts");
    let second = TempCluster::start().expect("second cluster starts");
    assert_ne!(first.port(), second.port());
    assert_ne!(first.dir(), second.dir());
    assert_eq!(psql_select_one(&second.url()), "1");
}

/// A test binary keeps its cluster in a `static` that is never dropped, and a demo may be
/// SIGKILLed: the reaper must still stop the server and delete the directory.
#[test]
fn killed_owner_leaves_nothing_behind() {
    if std::env::var_os(OWNER_ROLE_VAR).is_some() {
        run_as_owner();
    }

    let mut owner = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "killed_owner_leaves_nothing_behind",
            "--nocapture",
        ])
        .env(OWNER_ROLE_VAR, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("owner process starts");
    let stdout = owner.stdout.take().expect("piped stdout");
    let started = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            let rest = line.strip_prefix(STARTED_MARKER)?.trim().to_owned();
            let (port, dir) = rest.split_once(' ')?;
            Some((port.parse::<u16>().ok()?, PathBuf::from(dir)))
        });
    let Some((port, dir)) = started else {
        let _ = owner.kill();
        panic!("the owner process did not report a started cluster");
    };
    assert!(port_is_open(port));

    owner.kill().expect("SIGKILL the owner");
    owner.wait().expect("reap the owner");

    assert!(
        wait_until(Duration::from_secs(30), || !port_is_open(port)
            && !dir.exists()),
        "after the owner was killed: port {port} open = {}, {} exists = {}",
        port_is_open(port),
        dir.display(),
        Path::new(&dir).exists()
    );
}

/// The child's side: start a cluster, report it, and wait to be killed.
fn run_as_owner() -> ! {
    let cluster = TempCluster::start().expect("cluster starts");
    println!(
        "{STARTED_MARKER} {} {}",
        cluster.port(),
        cluster.dir().display()
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
