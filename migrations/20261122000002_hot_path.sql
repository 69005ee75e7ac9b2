-- Hot-path tuning, from profiling the benchmark (pg_stat_statements, EXPLAIN ANALYZE).

-- Edges and transition rows are written only by the store, in the same transaction as
-- the steps and tasks they belong to, and never change afterwards. Their foreign keys
-- cost a look-up and a row lock per row (about 90 per 7-step task over its life, most of
-- the cost of creating a task). Integrity holds by construction; a task's steps still go
-- with it (workflow_steps.task_id keeps its ON DELETE CASCADE), and edges and transitions
-- are indexed by task_id for whatever deletes a task to delete them alongside.
ALTER TABLE workflow_step_edges
    DROP CONSTRAINT workflow_step_edges_task_id_fkey,
    DROP CONSTRAINT workflow_step_edges_from_step_id_fkey,
    DROP CONSTRAINT workflow_step_edges_to_step_id_fkey;
ALTER TABLE task_transitions DROP CONSTRAINT task_transitions_task_id_fkey;
ALTER TABLE workflow_step_transitions
    DROP CONSTRAINT workflow_step_transitions_workflow_step_id_fkey,
    DROP CONSTRAINT workflow_step_transitions_task_id_fkey;

-- Every state change updates a step or task row and flips a transition row, and every
-- event is inserted into the outbox and deleted once relayed: vacuum these tables by a
-- fixed count of dead rows rather than a share of the table, so a busy system does not
-- wait until a fifth of a large table is dead.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);
ALTER TABLE workflow_steps SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE tasks SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.05);
ALTER TABLE workflow_step_transitions SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE task_transitions SET (autovacuum_vacuum_scale_factor = 0.05);

-- A transaction that sends NOTIFY holds a database-wide lock from just before its commit
-- until the commit is flushed, so notifying from the outbox trigger made every commit
-- that wrote an event wait for the one before it (no group commit; seen as
-- Lock:object waits on COMMIT). The store now sends NOTIFY right after COMMIT instead,
-- outside the transaction, where it writes nothing and holds the lock only briefly. A
-- notification lost to a crash in between is covered by the relay's polling.
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
