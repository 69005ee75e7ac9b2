//! Counts the statements this process sends to Postgres (B7 of the benchmark: database
//! load while idle). Every statement goes through [`Counted::statement`] or [`count`].

use std::sync::atomic::{AtomicU64, Ordering};

use deadpool_postgres::Object;
use tokio_postgres::Statement;

static STATEMENTS: AtomicU64 = AtomicU64::new(0);

/// Statements sent since the process started.
pub fn statements_executed() -> u64 {
    STATEMENTS.load(Ordering::Relaxed)
}

pub(crate) fn count(n: u64) {
    STATEMENTS.fetch_add(n, Ordering::Relaxed);
}

/// A prepared (cached) statement, counted as one execution.
pub(crate) trait Counted {
    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error>;
}

impl Counted for Object {
    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        count(1);
        self.prepare_cached(sql).await
    }
}
