//! Every SQL statement membrane runs lives in this crate: migrations, ingest, the evaluation
//! queue, fact gathering, memberships and the transitions outbox, bucket state and console reads.

pub mod audit;
pub mod bench;
pub mod buckets;
pub mod console;
pub mod facts;
pub mod imports;
pub mod ingest;
pub mod maintenance;
pub mod membership;
pub mod reads;
pub mod round;
pub mod testing;
pub mod timers;
pub mod webhooks;

pub use buckets::{
    BackfillProgress, BucketLock, BucketSwitch, BucketVersion, BucketWork, CandidateClause,
    EventRequirement, SweepPage, SweepRun,
};
pub use facts::{FactRequest, WindowEvents};
pub use imports::{ImportCheckpoint, ImportFile, ImportProgress};
pub use ingest::{IngestOutcome, Message, QUEUE_CHANNEL};
pub use maintenance::HotTable;
pub use membership::{
    ActiveMember, Admission, Applied, Departure, DwellDue, EntryRule, Source, TRANSITIONS_CHANNEL,
};
pub use reads::{
    BadCursor, BucketStatus, MemberCursor, MembersPage, QueueLag, TransitionRow, TransitionsPage,
    UserMembership,
};
pub use round::{QueuedUser, Round};
pub use timers::{ArmPolicy, Arming, DueTimer, TimerClaim, TIMERS_CHANNEL};

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// A recursive CTE, `event_names(name)`, of every distinct event name (and a final `NULL`): a
/// skip scan of `events (name, user_id, occurred_at)`, one index descent per name. Events are
/// indexed name first, so a read of one user's events of every name probes each name's range:
/// `WITH RECURSIVE {EVENT_NAMES} ... WHERE e.name = ANY({ALL_EVENT_NAMES}) AND e.user_id = ...`.
const EVENT_NAMES: &str = "event_names(name) AS ( \
    (SELECT name FROM events ORDER BY name LIMIT 1) \
    UNION ALL \
    SELECT (SELECT e.name FROM events e WHERE e.name > n.name ORDER BY e.name LIMIT 1) \
    FROM event_names n WHERE n.name IS NOT NULL)";

/// The names [`EVENT_NAMES`] found, as an array computed once per statement.
const ALL_EVENT_NAMES: &str = "ARRAY(SELECT name FROM event_names WHERE name IS NOT NULL)";

/// A handle on the membrane database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    pub async fn connect(url: &str) -> Result<Store> {
        // Every statement here is short, and many run at once on few cores. Parallel workers
        // cost more to start than they save (a round's counting statement, an `Append` of one
        // arm per bucket, took 73 ms in a `Gather` whose arms ran in 9), and JIT compilation
        // of a plan whose estimate crosses `jit_above_cost` takes hundreds of milliseconds.
        let options = PgConnectOptions::from_str(url)?
            .options([("max_parallel_workers_per_gather", "0"), ("jit", "off")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// Applies every pending migration in `migrations/`.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection (of all clones); used before a private cluster is stopped.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A LISTEN connection: wakes a task when another process commits work for it.
pub struct Notifications {
    listener: sqlx::postgres::PgListener,
}

impl Notifications {
    /// Waits for the next notification and returns its payload.
    pub async fn recv(&mut self) -> Result<String> {
        Ok(self.listener.recv().await?.payload().to_owned())
    }
}

impl Store {
    pub async fn listen(&self, channels: &[&str]) -> Result<Notifications> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen_all(channels.iter().copied()).await?;
        Ok(Notifications { listener })
    }
}
