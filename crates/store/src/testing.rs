//! Databases for tests.
//!
//! Tests run against `DATABASE_URL` when it is set, else against one private throwaway cluster
//! per test process (see `membrane-pgtemp`). Every test gets its own freshly created and
//! migrated database, so tests never see each other's rows and may run in parallel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use membrane_pgtemp::{PgTempError, TempCluster};
use sqlx::{Connection, PgConnection};

use crate::{Store, StoreError};

/// Test databases are named `membrane_test_<pid>_<counter>_<random>`; the pid tells whether
/// the process that created one is still running.
const TEST_DATABASE_PREFIX: &str = "membrane_test_";

#[derive(Debug, thiserror::Error)]
pub enum TestDbError {
    #[error("could not start the private test cluster: {0}")]
    Cluster(#[source] Arc<PgTempError>),
    #[error(
        "the test server URL is not of the form postgres://[user@]host[:port][/database][?options]"
    )]
    MalformedUrl,
    #[error("could not connect to the test server's maintenance database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("could not create test database {name}: {source}")]
    Create {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not set up test database {name}: {source}")]
    Setup {
        name: String,
        #[source]
        source: StoreError,
    },
    #[error("could not drop test database {name}: {source}")]
    Drop {
        name: String,
        #[source]
        source: sqlx::Error,
    },
}

/// A database of its own for one test, with the real migrations applied. It is not dropped
/// with the value (that would need async work in `Drop`): a throwaway cluster disappears with
/// the process, and on a shared server the next test run drops it.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    pub url: String,
    pub store: Store,
}

impl TestDatabase {
    /// Drops the database now, closing the store's connections first, instead of leaving it
    /// to the next run on the server (a benchmark's can hold gigabytes).
    pub async fn drop_now(self) -> Result<(), TestDbError> {
        self.store.close().await;
        let mut maintenance = PgConnection::connect(&server_url()?)
            .await
            .map_err(TestDbError::Connect)?;
        let dropped = sqlx::query(&format!(
            r#"DROP DATABASE IF EXISTS "{}" WITH (FORCE)"#,
            self.name
        ))
        .execute(&mut maintenance)
        .await;
        let _ = maintenance.close().await;
        dropped.map(drop).map_err(|source| TestDbError::Drop {
            name: self.name,
            source,
        })
    }
}

/// The server tests run against: `DATABASE_URL` when set, else one private cluster per process.
/// The URL names a maintenance database, from which test databases are created.
pub fn server_url() -> Result<String, TestDbError> {
    if let Some(url) = shared_server_url() {
        return Ok(url);
    }
    // Never dropped: the cluster's reaper stops and deletes it when the process exits.
    static CLUSTER: OnceLock<Result<TempCluster, Arc<PgTempError>>> = OnceLock::new();
    match CLUSTER.get_or_init(|| TempCluster::start().map_err(Arc::new)) {
        Ok(cluster) => Ok(cluster.url()),
        Err(error) => Err(TestDbError::Cluster(Arc::clone(error))),
    }
}

/// The URL of database `name` on the test server.
pub fn database_url_for(name: &str) -> Result<String, TestDbError> {
    url_with_database(&server_url()?, name)
}

/// `server_url` with its database (the URL path) replaced by `database`, keeping the user,
/// host, port and query options.
pub fn url_with_database(server_url: &str, database: &str) -> Result<String, TestDbError> {
    let (scheme, rest) = server_url
        .split_once("://")
        .ok_or(TestDbError::MalformedUrl)?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path_and_options) = rest.split_at(authority_end);
    let options_start = path_and_options
        .find(['?', '#'])
        .unwrap_or(path_and_options.len());
    let options = &path_and_options[options_start..];
    Ok(format!("{scheme}://{authority}/{database}{options}"))
}

/// A fresh, uniquely named database with the real migrations applied.
pub async fn fresh_database() -> Result<TestDatabase, TestDbError> {
    // May block for a second or two the first time, while the private cluster starts.
    let server_url = server_url()?;
    let mut maintenance = PgConnection::connect(&server_url)
        .await
        .map_err(TestDbError::Connect)?;
    if shared_server_url().is_some() {
        drop_abandoned_databases(&mut maintenance).await;
    }

    let name = unique_database_name();
    let created = sqlx::query(&format!(r#"CREATE DATABASE "{name}""#))
        .execute(&mut maintenance)
        .await;
    // Closing politely only saves the server a log line; the database exists either way.
    let _ = maintenance.close().await;
    created.map_err(|source| TestDbError::Create {
        name: name.clone(),
        source,
    })?;

    let url = url_with_database(&server_url, &name)?;
    let setup = async {
        let store = Store::connect(&url).await?;
        store.migrate().await?;
        Ok(store)
    };
    match setup.await {
        Ok(store) => Ok(TestDatabase { name, url, store }),
        Err(source) => Err(TestDbError::Setup { name, source }),
    }
}

fn shared_server_url() -> Option<String> {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
}

fn unique_database_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // The random part keeps names unique when processes on different machines share a server
    // and happen to have the same pid.
    format!(
        "{TEST_DATABASE_PREFIX}{}_{}_{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// Best effort: drops test databases on a shared server whose creating process is gone and
/// that nobody is connected to (a connection means a live test, perhaps from another machine
/// or container, where the pid means nothing here).
async fn drop_abandoned_databases(maintenance: &mut PgConnection) {
    let names: Vec<String> = match sqlx::query_scalar(
        r"SELECT datname FROM pg_database d
          WHERE datname LIKE 'membrane\_test\_%'
            AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datid = d.oid)",
    )
    .fetch_all(&mut *maintenance)
    .await
    {
        Ok(names) => names,
        Err(error) => {
            tracing::debug!("listing old test databases: {error}");
            return;
        }
    };
    for name in names {
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if membrane_pgtemp::process_is_alive(pid) {
            continue;
        }
        let dropped = sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
            .execute(&mut *maintenance)
            .await;
        match dropped {
            Ok(_) => tracing::debug!("dropped abandoned test database {name}"),
            Err(error) => tracing::debug!("dropping abandoned test database {name}: {error}"),
        }
    }
}

fn creator_pid(database_name: &str) -> Option<u32> {
    database_name
        .strip_prefix(TEST_DATABASE_PREFIX)?
        .split('_')
        .next()?
        .parse()
        .ok()
}
