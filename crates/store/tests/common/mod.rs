//! What the store's property tests share.

use std::future::Future;

use membrane_store::testing::fresh_database;
use membrane_store::Store;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Runs `check` on cases drawn from `strategy`, all in one fresh database: `PROPTEST_CASES` of
/// them, or `default_cases`. Panics with proptest's report of the smallest failing case.
pub fn check_cases<S, F, Fut>(default_cases: u32, strategy: S, check: F)
where
    S: Strategy,
    F: Fn(Store, S::Value) -> Fut,
    Fut: Future<Output = Result<(), TestCaseError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let database = runtime
        .block_on(fresh_database())
        .expect("a fresh test database");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(default_cases);
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let outcome = runner.run(&strategy, |case| {
        runtime.block_on(check(database.store.clone(), case))
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}
