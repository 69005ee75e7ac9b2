use std::{sync::Mutex, time::Instant};

use tasker_domain::{IllegalTransition, state::UnknownState};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the store. Callers map these to their own surface (gRPC status
/// in task-api); `Unavailable` means the database could not be reached or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    /// A task was to be created from its name's latest template, and a newer version
    /// had been registered meanwhile (nothing was written).
    #[error("{0}")]
    Superseded(String),
    #[error("database: {}", describe(.0))]
    Database(tokio_postgres::Error),
    #[error("database pool: {}", with_causes(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// No host the URL names could be reached.
    #[error("database: could not connect to {0}")]
    Connect(String),
    /// The migrator could not reach the database, or lost its connection.
    #[error("database unreachable: {0}")]
    Unreachable(String),
    /// A migration waited too long for a lock that others hold, and was rolled back.
    #[error("migration rolled back: a lock it needs was held elsewhere past the lock timeout: {0}")]
    Blocked(String),
    #[error("database configuration: {0}")]
    Config(String),
    #[error("migration: {0}")]
    Migrate(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// SQLSTATE `read_only_sql_transaction`: the server refuses writes. A standby does (a
/// failover that left this connection on a node no longer the primary), and so does a
/// server or database set `default_transaction_read_only` (maintenance).
pub(crate) const READ_ONLY: &str = "25006";

/// When a statement of this process last met a read-only server.
static READ_ONLY_SEEN: Mutex<Option<Instant>> = Mutex::new(None);

/// When a statement last found the server refusing writes ([`READ_ONLY`]): the pools then
/// open new connections in place of those opened before, which may be sessions on a
/// standby (or read-only ones) that would refuse writes for as long as they live.
pub(crate) fn read_only_seen() -> Option<Instant> {
    *READ_ONLY_SEEN.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_read_only(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| db.code().code() == READ_ONLY)
}

/// The server was found refusing writes (see [`read_only_seen`]).
pub(crate) fn note_read_only() {
    *READ_ONLY_SEEN.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_read_only(&e) {
            note_read_only();
        }
        Error::Database(e)
    }
}

impl Error {
    pub(crate) fn config(e: impl std::fmt::Display) -> Self {
        Error::Config(e.to_string())
    }

    pub(crate) fn migrate(e: impl std::fmt::Display) -> Self {
        Error::Migrate(e.to_string())
    }

    /// The migrator's error: [`Error::Unreachable`] when the database could not be
    /// reached or the connection failed, [`Error::Blocked`] when a migration ran out of
    /// `lock_timeout` (both worth waiting for), [`Error::Migrate`] otherwise.
    pub(crate) fn migrator(e: sqlx::migrate::MigrateError) -> Self {
        use sqlx::migrate::MigrateError;
        let cause = match &e {
            MigrateError::Execute(cause) | MigrateError::ExecuteMigration(cause, _) => Some(cause),
            _ => None,
        };
        match cause {
            Some(cause) if sqlx_unreachable(cause) => Error::Unreachable(e.to_string()),
            // a standby, or a database set read-only: it may be promoted, or set back
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some(READ_ONLY) => {
                Error::Unreachable(format!("the database refuses writes (read-only): {e}"))
            }
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
                Error::Blocked(e.to_string())
            }
            _ => Error::migrate(e),
        }
    }

    /// The migrator's error connecting to `host`, sorted as [`Error::migrator`] does.
    pub(crate) fn migrator_connect(e: sqlx::Error, host: &str) -> Self {
        if sqlx_unreachable(&e) { Error::Unreachable(format!("{host}: {e}")) } else { Error::migrate(e) }
    }

    /// `true` when the database could not be reached or failed, rather than the request
    /// being wrong: worth retrying later. (A lost connection, a server shutting down or out
    /// of resources, a serialization failure or deadlock, a server refusing writes for now
    /// (read-only); not a statement the server refused for what it held.)
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Pool(_) | Error::Connect(_) | Error::Unreachable(_) | Error::Blocked(_) | Error::Migrate(_) => true,
            Error::Database(e) => match e.as_db_error() {
                None => true,
                Some(db) => {
                    is_read_only(e)
                        || ["08", "40", "53", "57", "58"].iter().any(|class| db.code().code().starts_with(class))
                }
            },
            _ => false,
        }
    }

    /// `true` when the database could not be reached at all: nothing answered, the
    /// connection failed, or the server is starting, shutting down or out of connections.
    /// Not a server that answered and refused (a wrong password, a database that does not
    /// exist) or a migration that failed. A service starting waits for the first, and
    /// stops with the second.
    pub fn is_unreachable(&self) -> bool {
        use deadpool_postgres::PoolError;
        match self {
            Error::Connect(_) | Error::Unreachable(_) | Error::Pool(PoolError::Timeout(_)) => true,
            Error::Database(e) | Error::Pool(PoolError::Backend(e)) => {
                e.as_db_error().is_none_or(|db| unreachable_class(db.code().code()))
            }
            _ => false,
        }
    }

    /// `true` when a service starting should wait and try again: the database out of
    /// reach ([`Error::is_unreachable`]), or a migration that stepped back from a lock
    /// held elsewhere ([`Error::Blocked`]).
    pub fn is_worth_waiting_for(&self) -> bool {
        self.is_unreachable() || matches!(self, Error::Blocked(_))
    }

    /// `true` when an orchestrator batch decided from the tasks it kept in memory found, at
    /// its fence, that one of them had changed since (SQLSTATE `TK001`, raised by
    /// `tasker_fence`): nothing the batch sent was written, and its connection is clean.
    pub fn is_stale_kept(&self) -> bool {
        matches!(self, Error::Database(e) if e.as_db_error().is_some_and(|db| db.code().code() == STALE_KEPT))
    }

    /// The tasks a fence found changed (or told otherwise than stored), when this is its
    /// error ([`Error::is_stale_kept`]) and it named them.
    pub fn stale_tasks(&self) -> Option<Vec<uuid::Uuid>> {
        let Error::Database(e) = self else { return None };
        let db = e.as_db_error().filter(|db| db.code().code() == STALE_KEPT)?;
        db.detail()?.split(',').map(|id| id.trim().parse().ok()).collect()
    }

    /// `true` when the database refused a value it was asked to store (SQLSTATE class 22,
    /// data exception: a character it cannot hold, a number out of range): the same
    /// request will fail again, however often it is retried.
    pub fn is_refused_value(&self) -> bool {
        matches!(self, Error::Database(e) if e.as_db_error().is_some_and(|db| db.code().code().starts_with("22")))
    }
}

/// Whether sqlx failed to reach the server or lost its connection (see
/// [`Error::is_unreachable`]). A connection closed before the server said anything is a
/// protocol error to sqlx ("unexpected response from SSLRequest"): what a proxy in front
/// of a server that is down does.
fn sqlx_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| unreachable_class(&code)),
        _ => false,
    }
}

/// SQLSTATE classes of a server that cannot serve now: 08 (connection exception), 53
/// (insufficient resources: too many connections), 57 (operator intervention: starting
/// up, shutting down).
fn unreachable_class(code: &str) -> bool {
    ["08", "53", "57"].iter().any(|class| code.starts_with(class))
}

/// SQLSTATE `lock_not_available`: `lock_timeout` ran out.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The SQLSTATE the fence raises for a kept task that changed.
pub(crate) const STALE_KEPT: &str = "TK001";

/// The server's message when it sent one (tokio-postgres shows only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => with_causes(e),
    }
}

/// An error and what caused it ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"), for errors whose message leaves the cause out.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

impl From<UnknownState> for Error {
    fn from(e: UnknownState) -> Self {
        Error::Corrupt(e.to_string())
    }
}
