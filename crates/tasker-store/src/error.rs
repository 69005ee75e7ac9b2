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
    #[error("database: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database configuration: {0}")]
    Config(String),
    #[error("migration: {0}")]
    Migrate(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl Error {
    pub(crate) fn config(e: impl std::fmt::Display) -> Self {
        Error::Config(e.to_string())
    }

    pub(crate) fn migrate(e: impl std::fmt::Display) -> Self {
        Error::Migrate(e.to_string())
    }

    /// `true` when the database could not be reached or failed, rather than the request
    /// being wrong: worth retrying later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Database(_) | Error::Pool(_) | Error::Migrate(_))
    }
}

/// The server's message when it sent one (tokio-postgres shows only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl From<UnknownState> for Error {
    fn from(e: UnknownState) -> Self {
        Error::Corrupt(e.to_string())
    }
}
