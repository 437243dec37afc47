//! The test-database helpers, against `DATABASE_URL` when set, else a private cluster.

use membrane_store::testing::{fresh_database, url_with_database};

#[tokio::test]
async fn fresh_databases_are_distinct_and_migrated() {
    let first = fresh_database().await.expect("first database");
    let second = fresh_database().await.expect("second database");
    assert_ne!(first.name, second.name);
    assert_ne!(first.url, second.url);

    for database in [&first, &second] {
        let current: String = sqlx::query_scalar("select current_database()")
            .fetch_one(database.store.pool())
            .await
            .expect("current_database()");
        assert_eq!(current, database.name);
        let buckets: i64 = sqlx::query_scalar("select count(*) from buckets")
            .fetch_one(database.store.pool())
            .await
            .expect("the migrations created buckets");
        assert_eq!(buckets, 0);
    }
}

#[test]
fn database_urls_keep_the_server_and_its_options() {
    let cases = [
        (
            "postgres://root@127.0.0.1:5432/postgres",
            "postgres://root@127.0.0.1:5432/t",
        ),
        (
            "postgres://u:p@db:5432/postgres?sslmode=disable&application_name=x",
            "postgres://u:p@db:5432/t?sslmode=disable&application_name=x",
        ),
        ("postgres://localhost", "postgres://localhost/t"),
        (
            "postgresql:///postgres?host=/var/run/postgresql",
            "postgresql:///t?host=/var/run/postgresql",
        ),
    ];
    for (server, expected) in cases {
        assert_eq!(url_with_database(server, "t").expect(server), expected);
    }
    assert!(url_with_database("not a url", "t").is_err());
}

#[tokio::test]
async fn a_dropped_database_is_gone_from_the_server() {
    let keeper = fresh_database().await.expect("a fresh database");
    let dropped = fresh_database().await.expect("another fresh database");
    let name = dropped.name.clone();
    dropped.drop_now().await.expect("the database drops");
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(keeper.store.pool())
        .await
        .expect("pg_database reads");
    assert_eq!(left, 0, "{name} is still on the server");
}
