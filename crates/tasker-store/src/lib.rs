//! Tasker's Postgres store: the schema's migrations (sqlx's migrator, checksummed and
//! advisory-locked) and every SQL statement the services run (deadpool-postgres, prepared
//! statements). Nothing outside this crate writes SQL.
//!
//! State changes go through a [`Tx`]: it holds the task row locks and buffers status
//! changes, transition rows and outbox events, which it writes in a few batched statements
//! sent with its next read or its commit (one pipeline, one round trip), so a change, its
//! audit row and its event always commit together.

mod analytics;
mod audit;
mod counter;
mod error;
mod operator;
mod orchestration;
mod outbox;
mod rows;
mod tasks;
mod templates;
mod tls;
mod tx;
mod watchdog;

use std::{sync::Arc, time::Duration};

use deadpool_postgres::{ManagerConfig, Pool, RecyclingMethod};

use crate::tls::Target;

pub use analytics::{
    BottleneckRows, ErrorFigures, HealthRows, OldestTask, Percentiles, PerformanceRow, Scope, StepFigures, TaskFigures,
};
pub use audit::{Audit, AuditedTransition};
pub use counter::statements_executed;
pub use error::{Error, Result};
pub use operator::Actor;
pub use orchestration::{
    CreatedStep, Dispatch, Loaded, MAX_KEPT_STEPS, Progress, Standing, StepRow, TaskHead, WholeTask,
};
pub use outbox::{OutboxBatch, OutboxEvent, OutboxListener};
pub use rows::{EdgeRow, StepView, TaskRow, TaskView, TransitionRow};
pub use tasks::{CreateOutcome, NewTask, TaskFilter, TaskPage, TaskRef};
pub use templates::{RegisterOutcome, TemplateRecord};
pub use tx::{StepChange, Tx};

/// This build's migrations. Migrations a newer build applied are left alone, not refused:
/// each migration keeps the schema usable by the build before it (ARCHITECTURE.md's
/// invariant "A deployment rolls, forward or back, one build at a time"), so a replica of
/// the previous build still starts (a rolling deployment's old replicas restarting, or a
/// rollback) against a database one build ahead.
static MIGRATOR: sqlx::migrate::Migrator =
    sqlx::migrate::Migrator { ignore_missing: true, ..sqlx::migrate!("../../migrations") };

/// How long the migrator waits for its connection (the pools bound theirs with the
/// URL's `connect_timeout` and the watchdog). The migrations themselves are not bounded:
/// one may rightly run long.
const MIGRATOR_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a migration waits for a lock before it steps back ([`Error::Blocked`]): a
/// statement waiting for a lock holds every later one on that table behind it, so a
/// migration queued behind a long transaction would stall the running replicas' writes
/// for as long.
pub const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies every pending migration of this build (see [`MIGRATOR`] for those of a newer
/// one). Safe to run from several processes at once: sqlx holds an advisory lock while it
/// migrates. A migration that waits longer than [`MIGRATION_LOCK_TIMEOUT`] for a lock is
/// rolled back ([`Error::Blocked`]), to be tried again.
pub async fn migrate(database_url: &str) -> Result<()> {
    migrate_waiting(database_url, MIGRATION_LOCK_TIMEOUT).await
}

/// [`migrate`], waiting at most `lock_timeout` for a lock.
pub async fn migrate_waiting(database_url: &str, lock_timeout: Duration) -> Result<()> {
    // sqlx's migrator future is not `Send` for every lifetime (the "Acquire is not general
    // enough" limitation), so it runs to completion on a blocking thread of its own, and
    // callers can spawn this future freely.
    let url = database_url.to_owned();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        runtime.block_on(async {
            use sqlx::{ConnectOptions, Connection};
            // each host the URL names, in order, as the pools connect
            let mut connected = Err(Error::Config("the database URL names no host".into()));
            for options in tls::sqlx_options(&url)? {
                let options = options.options([("lock_timeout", format!("{}ms", lock_timeout.as_millis()))]);
                // a silent server is given up on, as the pools' connections do
                let host = format!("{}:{}", options.get_host(), options.get_port());
                connected = match tokio::time::timeout(MIGRATOR_CONNECT_TIMEOUT, options.connect()).await {
                    Ok(connected) => connected.map_err(|e| Error::migrator_connect(e, &host)),
                    Err(_) => Err(Error::Unreachable(format!("{host}: no answer within {MIGRATOR_CONNECT_TIMEOUT:?}"))),
                };
                if connected.is_ok() {
                    break;
                }
            }
            let mut conn = connected?;
            MIGRATOR.run(&mut conn).await.map_err(Error::migrator)?;
            conn.close().await.map_err(Error::migrate)
        })
    })
    .await
    .map_err(Error::migrate)?
}

/// Whether the server refuses writes now (a standby, or `default_transaction_read_only`):
/// readiness fails while it does, and the pool opens new connections in place of those
/// opened before (which may be the read-only sessions).
pub async fn read_only(store: &Store) -> Result<bool> {
    let client = store.client().await?;
    counter::count(1);
    let read_only: bool = client.query_one("SELECT current_setting('transaction_read_only') = 'on'", &[]).await?.get(0);
    if read_only {
        error::note_read_only();
    }
    Ok(read_only)
}

/// The migrations this build carries that the database has not applied (successfully):
/// empty when the schema is current.
pub async fn pending_migrations(store: &Store) -> Result<Vec<i64>> {
    let client = store.client().await?;
    counter::count(1);
    let applied: Vec<i64> = match client.query("SELECT version FROM _sqlx_migrations WHERE success", &[]).await {
        Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
        // no migration table: nothing applied
        Err(e) if e.as_db_error().is_some_and(|db| db.code().code() == "42P01") => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    Ok(MIGRATOR.iter().map(|m| m.version).filter(|v| !applied.contains(v)).collect())
}

/// Creates the database the URL names if it does not exist, connecting to the server's
/// `postgres` database to do so.
pub async fn ensure_database(database_url: &str) -> Result<()> {
    use futures::StreamExt;
    let target = Target::parse(database_url)?;
    let name = target
        .config
        .get_dbname()
        .ok_or_else(|| Error::Config("the database URL names no database".into()))?
        .to_owned();
    let silence = watchdog::Silence::new(DEFAULT_STATEMENT_TIMEOUT);
    let (client, mut messages) = target.with_dbname("postgres").connect(&silence).await?;
    let conn = tokio::spawn(async move { while messages.next().await.is_some() {} });
    let exists = client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await?.is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        client.batch_execute(&format!("CREATE DATABASE \"{quoted}\"")).await?;
    }
    drop(client);
    let _ = conn.await;
    Ok(())
}

/// See [`Store::pool_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    pub max: usize,
    pub open: usize,
    pub idle: usize,
    pub waiting: usize,
}

/// What a pool's statements are, which decides how Postgres may plan them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Statements of any shape: task-api's listings and analytics scan windows of history
    /// and join them, where a hash join over a sequential scan is the right plan.
    General,
    /// Only statements that reach their rows by key or through an index: the
    /// orchestrator's transactions and sweeps, the relay's claims. Their connections plan
    /// without sequential scans, hash joins or merge joins.
    ///
    /// A connection keeps a statement's generic plan until the table is analyzed again, and
    /// a plan made while a table was nearly empty (a new database, or a quiet outbox) scans
    /// it whole: cheapest then, and repeated on every batch as the table grows, until
    /// autovacuum gets round to it, or for ever where it is off. B3 on an empty database
    /// read 3.8 million step rows that way; with these plans Postgres used an eighth to a
    /// fifth less CPU (alternating rounds).
    ///
    /// They also plan each statement once per connection (`force_generic_plan`). Left to
    /// choose, Postgres planned most of them afresh on every batch (a generic plan for
    /// `id = ANY($1)` never looks cheaper than a custom one), about half a millisecond a
    /// batch on the critical path; priced as above, the generic plan is the same index plan.
    ///
    /// And they never compile a plan to machine code (`jit=off`). A statement with no
    /// index path, such as the readiness check's read of the migrations table, still scans,
    /// at the price the disabled scan is given (10¹⁰), far past `jit_above_cost`: Postgres
    /// compiled it, with inlining and optimization, on every execution, 15 ms of a core
    /// (55–80 ms the first time in a session) for a read of a few rows that takes 0.2 ms
    /// uncompiled, on every readiness probe. Nothing these sessions run is long enough to
    /// gain from compiling.
    Keyed,
}

/// How a [`Workload::Keyed`] session plans: index paths and nested loops only (a plan
/// with no alternative still runs; these only price the others out), planned once, never
/// compiled.
const KEYED_PLANS: &str = "-c enable_seqscan=off -c enable_hashjoin=off -c enable_mergejoin=off \
     -c plan_cache_mode=force_generic_plan -c jit=off";

/// The longest a statement may run unless configured otherwise
/// (`database.statement_timeout`).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A pool of connections to Tasker's database.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// The URL as parsed, for connections outside the pool (the relay's LISTEN).
    target: Target,
    /// The statement timeout, and when a connection last found the server silent.
    silence: Arc<watchdog::Silence>,
    /// Lazy wake-ups of the event relay, shared by this pool's transactions.
    waker: outbox::RelayWaker,
}

impl Store {
    /// Builds the pool and checks that the database answers; statements may run for
    /// [`DEFAULT_STATEMENT_TIMEOUT`].
    pub async fn connect(database_url: &str, pool_size: usize, workload: Workload) -> Result<Store> {
        Store::connect_with(database_url, pool_size, workload, DEFAULT_STATEMENT_TIMEOUT).await
    }

    /// Builds the pool and checks that the database answers. Postgres cancels a statement
    /// that runs past `statement_timeout`, and a connection whose server sends nothing for
    /// that long and two seconds more while an answer is awaited fails as lost (a partition,
    /// a frozen host: `watchdog.rs`); the pool then opens new connections in place of those
    /// opened before.
    pub async fn connect_with(
        database_url: &str,
        pool_size: usize,
        workload: Workload,
        statement_timeout: Duration,
    ) -> Result<Store> {
        let mut target = Target::parse(database_url)?;
        if workload == Workload::Keyed {
            // the server's settings for these sessions, after any `options` the URL gives
            let options = target.config.get_options().map(|o| format!("{o} ")).unwrap_or_default();
            target.config.options(format!("{options}{KEYED_PLANS}"));
        }
        let silence = watchdog::Silence::new(statement_timeout);
        let manager = target.manager(silence.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let noticed = silence.clone();
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            // a connection opened before the server was last found silent went through
            // that silence too: open a new one rather than wait out its silence again; and
            // one opened before a statement last met a server refusing writes may be a
            // session on a standby (or a read-only one) for as long as it lives
            .pre_recycle(deadpool_postgres::Hook::sync_fn(move |_, metrics| {
                if noticed.last_noticed().is_some_and(|at| metrics.created <= at) {
                    return Err(deadpool_postgres::HookError::message("opened before the database went silent"));
                }
                if error::read_only_seen().is_some_and(|at| metrics.created <= at) {
                    return Err(deadpool_postgres::HookError::message("opened before the database refused writes"));
                }
                Ok(())
            }))
            .build()
            .map_err(Error::config)?;
        let store = Store { waker: outbox::RelayWaker::new(pool.clone()), pool, target, silence };
        store.ping().await?;
        Ok(store)
    }

    /// Readiness: a round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        let client = self.pool.get().await?;
        counter::count(1);
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Starts a transaction (its `BEGIN` goes out with its first round trip).
    pub async fn begin(&self) -> Result<Tx> {
        Ok(Tx::new(self.pool.get().await?, self.waker.clone()))
    }

    /// The pool now: its limit, connections open, idle among them, and callers waiting
    /// for one.
    pub fn pool_status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus { max: s.max_size, open: s.size, idle: s.available, waiting: s.waiting }
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }
}

/// Runs `reads`, statements of `client` that must agree with each other, in one pipeline
/// between `BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY` and `COMMIT`: every one of
/// them sees the database as of one instant. On their own each would see what had
/// committed when it ran, and a commit between two of them would show in one and not the
/// other (a task's history ending in a transition its status does not have yet).
pub(crate) async fn one_snapshot<T>(
    client: &deadpool_postgres::Object,
    reads: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, tokio_postgres::Error> {
    crate::counter::count(2);
    // futures are first polled, and so sent, in the order they are listed
    let (_, read, _) = futures::try_join!(
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"),
        reads,
        client.batch_execute("COMMIT"),
    )?;
    Ok(read)
}

/// The outcome of [`one_snapshot`]; after a failure its connection, which may still be
/// inside the transaction, is closed rather than pooled.
pub(crate) fn closed_on_error<T>(
    client: deadpool_postgres::Object,
    read: std::result::Result<T, tokio_postgres::Error>,
) -> Result<T> {
    if read.is_err() {
        drop(deadpool_postgres::Object::take(client));
    }
    Ok(read?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database that goes silent (a partition, a frozen host: nothing closed, nothing
    /// answered) fails the statement waiting on it once the statement timeout and its
    /// grace have passed, as a lost connection; once it answers again, the pool's new
    /// connections work. A statement that merely runs long is cancelled by the server at
    /// the timeout, and its connection stays.
    #[tokio::test]
    async fn a_silent_database_is_noticed_and_left_behind() {
        let env = tasker_test_support::TestEnv::new().await;
        let proxy = tasker_test_support::FaultProxy::for_url(&env.config.database.url).await;
        let url = proxy.url(&env.config.database.url);
        let store = Store::connect_with(&url, 2, Workload::General, Duration::from_secs(1)).await.unwrap();
        store.ping().await.unwrap();

        proxy.silence();
        let started = std::time::Instant::now();
        let error = store.ping().await.expect_err("nothing answers");
        let waited = started.elapsed();
        assert!(error.is_unavailable(), "{error}");
        assert!((Duration::from_secs(3)..Duration::from_secs(8)).contains(&waited), "noticed after {waited:?}");

        proxy.heal();
        store.ping().await.expect("a new connection answers");
        let client = store.client().await.unwrap();
        let error = client.simple_query("SELECT pg_sleep(4)").await.expect_err("past the statement timeout");
        assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{error}");
        client.simple_query("SELECT 1").await.expect("the connection is still good");
        drop(client);
        env.cleanup().await;
    }

    /// A database out of reach (refusing connections, or silent) is told from one that
    /// answers and refuses: a service starting waits for the first and stops with the
    /// second.
    #[tokio::test]
    async fn an_unreachable_database_is_told_from_one_that_refuses() {
        let env = tasker_test_support::TestEnv::new().await;
        let proxy = tasker_test_support::FaultProxy::for_url(&env.config.database.url).await;
        let url = proxy.url(&env.config.database.url);
        let connect =
            |url: String| async move { Store::connect_with(&url, 1, Workload::General, Duration::from_secs(1)).await };

        proxy.down();
        let error = migrate(&url).await.expect_err("nothing listens");
        assert!(error.is_unreachable(), "{error}");
        let error = connect(url.clone()).await.err().expect("nothing listens");
        assert!(error.is_unreachable(), "{error}");

        proxy.heal();
        proxy.silence();
        let error = migrate(&url).await.expect_err("nothing answers");
        assert!(error.is_unreachable() && error.to_string().contains("no answer within"), "{error}");
        let error = connect(url.clone()).await.err().expect("nothing answers");
        assert!(error.is_unreachable(), "{error}");

        proxy.heal();
        migrate(&url).await.expect("the database is back");
        connect(url.clone()).await.expect("the database is back");
        let missing = tasker_test_support::replace_database(&url, "tasker_no_such_database");
        let stranger = format!("postgres://tasker_no_such_role@{}/postgres", proxy.addr());
        for url in [missing, stranger] {
            let error = migrate(&url).await.expect_err("refused");
            assert!(!error.is_unreachable(), "{error}");
            let error = connect(url).await.err().expect("refused");
            assert!(!error.is_unreachable(), "{error}");
        }
        env.cleanup().await;
    }

    /// A migration that cannot get a lock it needs steps back after the lock timeout
    /// instead of queueing behind the holder (and holding every later statement on that
    /// table behind itself), and succeeds once the lock is free.
    #[tokio::test]
    async fn a_migration_blocked_by_a_lock_steps_back_and_is_tried_again() {
        let env = tasker_test_support::TestEnv::new().await;
        let url = &env.config.database.url;
        let holder = env.database().await;
        holder.batch_execute("BEGIN; LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE").await.unwrap();
        let error = tokio::time::timeout(Duration::from_secs(5), migrate_waiting(url, Duration::from_secs(1)))
            .await
            .expect("stepped back, not queued behind the lock")
            .expect_err("the table is locked");
        assert!(matches!(error, Error::Blocked(_)) && error.is_worth_waiting_for(), "{error}");
        holder.batch_execute("ROLLBACK").await.unwrap();
        migrate_waiting(url, Duration::from_secs(1)).await.expect("the lock is free");
        drop(holder);
        env.cleanup().await;
    }

    /// A database that refuses writes (a standby; here one set `default_transaction_read_only`)
    /// is waited for at start, not taken for a failed migration, and found out by the
    /// readiness check; once it takes writes again the migrator goes through.
    #[tokio::test]
    async fn a_database_refusing_writes_is_waited_for() {
        let env = tasker_test_support::TestEnv::new().await;
        let url = &env.config.database.url;
        let name = url.rsplit('/').next().unwrap().to_owned();
        let admin = env.database().await;
        admin
            .batch_execute(&format!("ALTER DATABASE \"{name}\" SET default_transaction_read_only = on"))
            .await
            .unwrap();
        let error = migrate(url).await.expect_err("writes refused");
        assert!(error.is_worth_waiting_for() && error.to_string().contains("read-only"), "{error}");
        let store = Store::connect(url, 1, Workload::General).await.unwrap();
        assert!(read_only(&store).await.unwrap(), "the readiness check sees it");
        admin.batch_execute(&format!("ALTER DATABASE \"{name}\" RESET default_transaction_read_only")).await.unwrap();
        migrate(url).await.expect("writes taken again");
        assert!(!read_only(&store).await.unwrap(), "the session found read-only was left behind");
        drop((admin, store));
        env.cleanup().await;
    }

    /// A client that goes silent inside a transaction does not hold its locks for good:
    /// the server ends its session once it has been idle in the transaction for the
    /// statement timeout, and another writer gets the lock.
    #[tokio::test]
    async fn a_transaction_whose_client_went_silent_gives_its_locks_up() {
        let env = tasker_test_support::TestEnv::new().await;
        let proxy = tasker_test_support::FaultProxy::for_url(&env.config.database.url).await;
        let far = proxy.url(&env.config.database.url);
        let far = Store::connect_with(&far, 1, Workload::General, Duration::from_secs(1)).await.unwrap();
        let near = Store::connect(&env.config.database.url, 1, Workload::General).await.unwrap();
        let mut tx = far.begin().await.unwrap();
        tx.round_trip(&[("SELECT pg_advisory_xact_lock(20261207)", &[])], false).await.unwrap();

        proxy.silence();
        let client = near.client().await.unwrap();
        client
            .batch_execute("BEGIN; SELECT pg_advisory_xact_lock(20261207); ROLLBACK")
            .await
            .expect("the lock is given up before this statement's own timeout (10 s)");
        drop((client, tx));
        proxy.heal();
        env.cleanup().await;
    }

    /// The readiness check's read of the migrations table has no index path, so a keyed
    /// session prices its scan past `jit_above_cost`: it runs, but is never compiled.
    #[tokio::test]
    async fn keyed_sessions_never_compile_a_plan() {
        let env = tasker_test_support::TestEnv::new().await;
        let store = Store::connect(&env.config.database.url, 1, Workload::Keyed).await.unwrap();
        assert_eq!(pending_migrations(&store).await.unwrap(), Vec::<i64>::new());
        let client = store.client().await.unwrap();
        let explain = "EXPLAIN SELECT version FROM _sqlx_migrations WHERE success";
        let plan: Vec<String> = client.query(explain, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert!(plan[0].starts_with("Seq Scan") && plan[0].contains("10000000000"), "{plan:#?}");
        assert!(!plan.iter().any(|line| line.starts_with("JIT")), "{plan:#?}");
        drop(client);
        env.cleanup().await;
    }
}
