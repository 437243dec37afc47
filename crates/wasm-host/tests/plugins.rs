//! The Rust plugins in `plugins/`: each is rebuilt from source for wasm32 and must agree with
//! the committed `.wasm` the bucket files load (same manifest, same verdicts on known rows), so
//! a source change without `plugins/build.sh` fails here instead of drifting silently. Also
//! covers the config path: `[config]` reaches the plugin, and a rejected one fails the load
//! with the plugin's own explanation.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;

use membrane_abi::FactValue::{self, Count};
use membrane_wasm::{Engine, Limits, LoadError, Predicate};
use serde_json::json;

static ENGINE: LazyLock<Engine> =
    LazyLock::new(|| Engine::new(Limits::default()).expect("engine starts"));

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds `plugins/<name>` for wasm32 and returns the fresh module.
fn build_from_source(name: &str) -> Vec<u8> {
    let root = repo_root();
    let target_dir = root.join("target/plugins");
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "--target", "wasm32-unknown-unknown"])
        .arg("--manifest-path")
        .arg(root.join("plugins").join(name).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .expect("cargo runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stderr.contains("can't find crate for `core`")
            || stderr.contains("target may not be installed")
        {
            panic!(
                "the wasm32 target is missing; install it with \
                 `rustup target add wasm32-unknown-unknown`\n{stderr}"
            );
        }
        panic!("building plugin {name} failed:\n{stderr}");
    }
    let artifact = target_dir
        .join("wasm32-unknown-unknown/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&artifact).unwrap_or_else(|e| panic!("{}: {e}", artifact.display()))
}

fn committed(name: &str) -> Vec<u8> {
    let path = repo_root().join("plugins").join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}; run plugins/build.sh", path.display()))
}

/// Loads both modules with `config`, checks they declare the same facts and give `expected` on
/// `rows`.
fn committed_matches_source(
    name: &str,
    config: serde_json::Value,
    rows: &[Vec<FactValue>],
    expected: &[bool],
) {
    let load = |bytes: &[u8], origin: &str| -> Predicate {
        ENGINE
            .load_with_config(bytes, &config)
            .unwrap_or_else(|e| panic!("{origin} {name} does not load: {e}"))
    };
    let fresh = load(&build_from_source(name), "freshly built");
    let shipped = load(&committed(name), "committed");
    let stale = "plugins/{name}.wasm is stale: rebuild it with plugins/build.sh";
    assert_eq!(shipped.manifest(), fresh.manifest(), "{stale}");
    assert_eq!(fresh.evaluate(rows, 0).expect("fresh evaluates"), expected);
    assert_eq!(
        shipped.evaluate(rows, 0).expect("committed evaluates"),
        expected,
        "{stale}"
    );
}

#[test]
fn churn_risk_matches_its_source() {
    let row = |counts: [i64; 5]| counts.into_iter().map(Count).collect::<Vec<_>>();
    committed_matches_source(
        "churn-risk",
        json!({"threshold": 2, "weights": {"no_purchase": 1.5, "session_decline": 0.5}}),
        // (sessions 7d, sessions 90d, carts 30d, orders 30d, orders 90d)
        &[
            row([0, 0, 5, 0, 0]),
            row([0, 13, 0, 0, 0]),
            row([0, 13, 0, 1, 1]),
            row([1, 1, 1, 0, 0]),
            row([1, 26, 0, 0, 0]),
        ],
        &[false, true, false, true, false],
    );
}

#[test]
fn refund_ratio_matches_its_source() {
    committed_matches_source(
        "refund-ratio",
        json!({"max_ratio": 0.5, "min_orders": 2}),
        // (orders 90d, refunds 90d)
        &[
            vec![Count(0), Count(0)],
            vec![Count(0), Count(3)],
            vec![Count(1), Count(1)],
            vec![Count(2), Count(1)],
            vec![Count(2), Count(2)],
            vec![Count(4), Count(3)],
        ],
        &[false, false, false, false, true, true],
    );
}

#[test]
fn config_changes_the_verdict() {
    let strict = ENGINE
        .load_with_config(&committed("refund-ratio"), &json!({"max_ratio": 0.9}))
        .expect("loads");
    let lenient = ENGINE
        .load_with_config(&committed("refund-ratio"), &json!({"max_ratio": 0.1}))
        .expect("loads");
    let rows = [vec![Count(4), Count(1)]];
    assert_eq!(strict.evaluate(&rows, 0).expect("evaluates"), [false]);
    assert_eq!(lenient.evaluate(&rows, 0).expect("evaluates"), [true]);
}

#[test]
fn a_rejected_config_fails_the_load_with_the_plugins_reason() {
    let error = ENGINE
        .load_with_config(&committed("churn-risk"), &json!({"threshold": -1}))
        .expect_err("rejected");
    assert!(
        matches!(&error, LoadError::ConfigRejected { code: 1, message: Some(m) } if m == "threshold must be greater than 0, got -1"),
        "{error}"
    );
    let missing = ENGINE
        .load(&committed("refund-ratio"))
        .expect_err("rejected");
    assert!(
        missing.to_string().contains("missing field `max_ratio`"),
        "{missing}"
    );
}
