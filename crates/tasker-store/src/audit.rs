//! Whole-database checks for soak runs (`tasker-chaos`): what must hold after any mix of
//! crashes and outages. Read-only.

use uuid::Uuid;

use crate::{Result, Store};

/// Counts that must come out right after a soak.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    /// Tasks by status.
    pub tasks_by_status: Vec<(String, i64)>,
    /// Idempotency keys used by more than one task (must be 0).
    pub keys_on_several_tasks: i64,
    /// Steps with more than one transition to `complete` (must be 0).
    pub steps_completed_twice: i64,
    /// Steps not complete in tasks that are (must be 0).
    pub unfinished_steps_of_complete_tasks: i64,
    /// Events not yet relayed.
    pub outbox: i64,
}

/// One transition: its owner (task or step), its task, its place in the owner's history.
#[derive(Debug, Clone)]
pub struct AuditedTransition {
    pub id: Uuid,
    pub task_id: Uuid,
    pub owner: Uuid,
    pub sort_key: i32,
}

impl Store {
    pub async fn audit(&self) -> Result<Audit> {
        let client = self.client().await?;
        let statuses = client.query("SELECT status, count(*) FROM tasks GROUP BY status ORDER BY status", &[]).await?;
        let one = |sql: &'static str| {
            let client = &client;
            async move { client.query_one(sql, &[]).await.map(|row| row.get::<_, i64>(0)) }
        };
        Ok(Audit {
            tasks_by_status: statuses.iter().map(|r| (r.get(0), r.get(1))).collect(),
            keys_on_several_tasks: one(
                "SELECT count(*) FROM (SELECT idempotency_key FROM tasks WHERE idempotency_key IS NOT NULL \
                 GROUP BY idempotency_key HAVING count(*) > 1) k",
            )
            .await?,
            steps_completed_twice: one("SELECT count(*) FROM (SELECT workflow_step_id FROM workflow_step_transitions \
                 WHERE to_state = 'complete' GROUP BY workflow_step_id HAVING count(*) > 1) s")
            .await?,
            unfinished_steps_of_complete_tasks: one(
                "SELECT count(*) FROM workflow_steps s JOIN tasks t ON t.id = s.task_id \
                 WHERE t.status = 'complete' AND s.status NOT IN ('complete', 'resolved_manually')",
            )
            .await?,
            outbox: one(crate::outbox::OUTBOX_EVENTS).await?,
        })
    }

    /// Every transition, task and step, each with its owner and sort key.
    pub async fn audited_transitions(&self) -> Result<Vec<AuditedTransition>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, task_id, task_id, sort_key FROM task_transitions \
                 UNION ALL SELECT id, task_id, workflow_step_id, sort_key FROM workflow_step_transitions",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditedTransition { id: r.get(0), task_id: r.get(1), owner: r.get(2), sort_key: r.get(3) })
            .collect())
    }
}
