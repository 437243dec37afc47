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

/// The users at even positions and those at odd ones: two batches whose spans interleave.
#[allow(dead_code)] // not every test binary splits batches
pub fn alternate(users: &[String]) -> (Vec<String>, Vec<String>) {
    let at = |parity: usize| users.iter().skip(parity).step_by(2).cloned().collect();
    (at(0), at(1))
}

/// Rows of the even and the odd users (see [`alternate`]) back in the users' order.
#[allow(dead_code)]
pub fn interleave<T>(even: Vec<T>, odd: Vec<T>) -> Vec<T> {
    let mut odd = odd.into_iter();
    even.into_iter()
        .flat_map(|row| std::iter::once(row).chain(odd.next()))
        .collect()
}

/// Runs a hand-checked `test` against a fresh database's store.
#[allow(dead_code)] // not every test binary has hand-checked tests
pub fn in_fresh_database<F, Fut>(test: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let database = fresh_database().await.expect("a fresh test database");
        test(database.store.clone()).await;
    });
}
