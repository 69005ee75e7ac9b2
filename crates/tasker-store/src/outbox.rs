//! The transactional outbox: events written with their state change, relayed in order by
//! the event-publisher and deleted once the broker confirmed them.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, types::ToSql};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Result, Store, Tx, counter::Counted};

/// One relay at a time holds this transaction-scoped advisory lock, so several
/// event-publisher replicas never interleave and per-task order holds.
const RELAY_LOCK: i64 = 0x7461_736b_6572; // "tasker"

/// Wakes the relay: sent right after a transaction that wrote events commits, outside it
/// (see the migration `hot_path`). Never fails: without the wake-up, the relay only waits
/// for its next poll.
///
/// A NOTIFY is a transaction of its own that takes an xid, and Postgres holds one
/// database-wide lock from queueing the notification until the commit is done: committed
/// synchronously, every wake-up in the database waited on the one before it to reach the
/// disk (seen under load as `Lock:object` waits on `NOTIFY`). It commits asynchronously
/// instead: it is delivered at commit all the same, and a wake-up lost to a crash is
/// covered by the relay's polling.
async fn wake_relay(client: &tokio_postgres::Client) -> std::result::Result<(), tokio_postgres::Error> {
    let wake = "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY tasker_outbox; COMMIT";
    crate::counter::count(4);
    if let Err(error) = client.batch_execute(wake).await {
        tracing::debug!(%error, "could not wake the event relay");
    }
    Ok(())
}

/// How long a lazy wake-up of the relay waits, gathering the commits that ask for one.
const LAZY_WAKE: Duration = Duration::from_millis(50);

/// Wakes the relay lazily: within [`LAZY_WAKE`], once for every commit that asks
/// meanwhile. Each [`Store`] has one, shared by its transactions.
///
/// For events nobody waits on the moment they are made: a created task's `task.created`,
/// a step's move within a running task. Under many clients a wake-up per create cost more
/// than a tenth of each create's CPU (B4: 1.05 / 1.29 → 0.96 / 1.09 ms a create without
/// them, alternating), and one task at a time each hop's wake-up set the relay's claim and
/// publishes going on the two cores while the next hop ran. This bounds them at 20 a
/// second per process; a commit that ends a task wakes the relay at once
/// ([`waking`]), and the relay then takes every event before it, in order. Call it once
/// the commit is done: the wake-up is sent after the call, so after the commit.
#[derive(Clone)]
pub(crate) struct RelayWaker {
    pool: deadpool_postgres::Pool,
    due: Arc<std::sync::atomic::AtomicBool>,
}

impl RelayWaker {
    pub(crate) fn new(pool: deadpool_postgres::Pool) -> RelayWaker {
        RelayWaker { pool, due: Default::default() }
    }

    pub(crate) fn soon(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if self.due.swap(true, SeqCst) {
            return; // the one due goes after this commit too
        }
        let (pool, due) = (self.pool.clone(), self.due.clone());
        tokio::spawn(async move {
            tokio::time::sleep(LAZY_WAKE).await;
            // commits done before this see it due and are covered by the wake-up below;
            // those after schedule the next
            due.store(false, SeqCst);
            if let Ok(client) = pool.get().await {
                let _ = wake_relay(&client).await;
            }
        });
    }
}

/// Runs `work` on `client` with the relay's wake-up (when `wake`) sent right behind it,
/// and returns as soon as `work` is done: the wake-up's answer, which comes after
/// `work`'s, is read and dropped by the connection, so no caller waits for the relay's
/// `NOTIFY` to be committed before going on (a batch that ended a task publishes its
/// executions, a cancelled task is answered). `work` must send its requests when first
/// polled, as tokio-postgres's calls do: the wake-up is polled after it, so it goes out
/// after them and runs after their commit.
pub(crate) async fn waking<T, E>(
    client: &tokio_postgres::Client,
    wake: bool,
    work: impl std::future::Future<Output = std::result::Result<T, E>>,
) -> std::result::Result<T, E> {
    if !wake {
        return work.await;
    }
    let (work, wake) = (std::pin::pin!(work), std::pin::pin!(wake_relay(client)));
    // `select` polls `work` first, then the wake-up
    match futures::future::select(work, wake).await {
        futures::future::Either::Left((done, _wake)) => done,
        futures::future::Either::Right((_, work)) => work.await,
    }
}

/// How many events the outbox holds (each row holds one or more).
pub(crate) const OUTBOX_EVENTS: &str = "SELECT COALESCE(sum(cardinality(event_ids)), 0)::int8 FROM outbox";

/// One event claimed from the outbox.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_id: Uuid,
    pub routing_key: String,
    /// The CloudEvent, JSON text.
    pub payload: String,
}

/// Outbox rows claimed for relaying (each the events of one transaction), their events in
/// order. Call [`OutboxBatch::complete`] once every event is confirmed by the broker, or
/// [`OutboxBatch::release`] to relay nothing; dropping the batch (on an error) closes its
/// connection, which releases the rows and the lock too, but later.
pub struct OutboxBatch {
    tx: Tx,
    /// The claimed rows' ids.
    ids: Vec<i64>,
    pub events: Vec<OutboxEvent>,
}

impl OutboxBatch {
    /// How many outbox rows were claimed (each holds one or more of `events`).
    pub fn claimed(&self) -> usize {
        self.ids.len()
    }

    /// Gives the rows back without relaying them (and releases the relay lock at once).
    pub async fn release(self) -> Result<()> {
        self.tx.rollback().await
    }

    /// Deletes the relayed rows and commits, without waiting for the commit to reach the
    /// disk: a delete lost to a crash only relays those events again (each keeps its id,
    /// which is how subscribers drop a duplicate), and the relay's next claim waits for no
    /// flush that the writers of the state changes are waiting for too.
    pub async fn complete(mut self) -> Result<()> {
        let ids = std::mem::take(&mut self.ids);
        self.tx.push_write("SET LOCAL synchronous_commit = off", Vec::new());
        self.tx.push_write("DELETE FROM outbox WHERE id = ANY($1)", vec![Box::new(ids)]);
        self.tx.commit().await
    }
}

impl Store {
    /// Events written and not yet relayed.
    pub async fn outbox_depth(&self) -> Result<u64> {
        let client = self.client().await?;
        let stmt = client.statement(OUTBOX_EVENTS).await?;
        Ok(client.query_one(&stmt, &[]).await?.get::<_, i64>(0).max(0) as u64)
    }

    /// Claims the events of up to `limit` of the oldest outbox rows (each a transaction's
    /// events). `None` when another relay holds the lock; an empty batch when there is
    /// nothing to relay.
    ///
    /// The claim stays open while its events are published, and may sit idle for up to
    /// `hold` waiting for the broker's confirms (every other session is ended by the
    /// server once idle in a transaction for `database.statement_timeout`). A broker slower
    /// to confirm than that, but within the relay's own bound, is then waited for: ended
    /// under the relay, the claim would give its rows back undeleted, to be published
    /// again and again for as long as confirms stayed that slow.
    pub async fn claim_outbox(&self, limit: i64, hold: Duration) -> Result<Option<OutboxBatch>> {
        let mut tx = self.begin().await?;
        let hold = format!("{}ms", hold.as_millis().max(1));
        // one round trip: the rows are read only to be thrown away when the lock is taken
        let (lock, rows): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 1]) = ([&RELAY_LOCK, &hold], [&limit]);
        let mut results = tx
            .round_trip(
                &[
                    (
                        "SELECT pg_try_advisory_xact_lock($1), \
                         set_config('idle_in_transaction_session_timeout', $2, true)",
                        &lock,
                    ),
                    ("SELECT id, event_ids, routing_keys, payloads FROM outbox ORDER BY id LIMIT $1", &rows),
                ],
                false,
            )
            .await?
            .into_iter();
        let locked: bool = results.next().and_then(|r| r.first().map(|r| r.get(0))).unwrap_or(false);
        if !locked {
            tx.rollback().await?;
            return Ok(None);
        }
        let claimed = results.next().unwrap_or_default();
        let mut ids = Vec::with_capacity(claimed.len());
        let mut events = Vec::new();
        for row in &claimed {
            ids.push(row.get(0));
            // the arrays are of one length (a constraint of the table)
            let (ids_of_row, keys, payloads): (Vec<Uuid>, Vec<String>, Vec<String>) =
                (row.get(1), row.get(2), row.get(3));
            events.extend(
                ids_of_row.into_iter().zip(keys).zip(payloads).map(|((event_id, routing_key), payload)| OutboxEvent {
                    event_id,
                    routing_key,
                    payload,
                }),
            );
        }
        Ok(Some(OutboxBatch { tx, ids, events }))
    }

    /// Listens for `tasker_outbox` notifications on a dedicated connection, reconnecting
    /// when it drops, until `shutdown`.
    pub fn listen_outbox(&self, shutdown: CancellationToken) -> OutboxListener {
        let notify = Arc::new(Notify::new());
        let (target, silence) = (self.target.clone(), self.silence.clone());
        let wake = notify.clone();
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                if let Err(error) = listen(&target, &silence, &wake, &shutdown).await {
                    tracing::warn!(%error, "outbox listener lost its connection; polling until it is back");
                }
                // wake once in case something was written while not listening
                wake.notify_one();
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        OutboxListener { notify }
    }
}

async fn listen(
    target: &crate::tls::Target,
    silence: &Arc<crate::watchdog::Silence>,
    wake: &Notify,
    shutdown: &CancellationToken,
) -> Result<()> {
    let (client, mut messages) = target.connect(silence).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    client.batch_execute("LISTEN tasker_outbox").await?;
    wake.notify_one();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            got = rx.recv() => match got {
                Some(()) => wake.notify_one(),
                None => break Ok(()),
            },
        }
    };
    drop(client);
    match pump.await {
        Ok(Err(e)) => Err(e.into()),
        _ => result,
    }
}

/// Wakes the relay when events are written.
#[derive(Clone)]
pub struct OutboxListener {
    notify: Arc<Notify>,
}

impl OutboxListener {
    /// Resolves at the next notification (or at once if one arrived since the last call).
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}
