-- A task's request from task-api carries the task as task-api wrote it, so that the
-- orchestrator can decide the task's first batch from that, in one round trip, as it does
-- every batch of a task it keeps. `tasker_fence` compares sort keys only, which tells that
-- nothing changed since, not that the request told the truth: anyone who may publish to
-- the orchestrator's queue (through the default exchange, which a worker's broker user may
-- too) could name a task of theirs and make up its steps. So the first batch decided from
-- a request's task also sends this check, after the fence (the task locked): the task's
-- namespace, name, version and trace context, each of its steps (handler, config, limits,
-- parents to wait for) and its edges must be exactly what the request told, else SQLSTATE
-- TK001 (naming the task as its DETAIL) aborts the transaction, nothing is written or
-- dispatched, and the batch is decided again from what is read.
CREATE FUNCTION tasker_fence_created(
    told_task uuid, told_head text[], told_ids uuid[], told_names text[], told_handlers text[],
    told_configs text[], told_max_attempts integer[], told_retryable boolean[], told_timeouts bigint[],
    told_parents integer[], told_from uuid[], told_to uuid[]
) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (
        SELECT FROM tasks t
        WHERE t.id = told_task AND ARRAY[t.namespace, t.name, t.version, t.traceparent, t.tracestate] = told_head
    ) OR (SELECT count(*) FROM workflow_steps s WHERE s.task_id = told_task) <> cardinality(told_ids)
      OR (
        SELECT count(DISTINCT s.id) FROM workflow_steps s
        JOIN unnest(told_ids, told_names, told_handlers, told_configs, told_max_attempts, told_retryable,
                    told_timeouts, told_parents) AS u (id, name, handler, config, attempts, retryable, timeout, parents)
            ON s.id = u.id
        WHERE s.task_id = told_task AND s.name = u.name AND s.handler = u.handler
          AND s.handler_config = u.config::jsonb AND s.max_attempts = u.attempts
          AND s.retryable = u.retryable AND s.timeout_ms = u.timeout AND s.pending_parents = u.parents
    ) <> cardinality(told_ids)
      OR (SELECT count(*) FROM workflow_step_edges e WHERE e.from_step_id = ANY (told_ids)) <> cardinality(told_from)
      OR (
        SELECT count(DISTINCT (e.from_step_id, e.to_step_id)) FROM workflow_step_edges e
        JOIN unnest(told_from, told_to) AS u (f, t) ON e.from_step_id = u.f AND e.to_step_id = u.t
        WHERE e.task_id = told_task
    ) <> cardinality(told_from)
    THEN
        RAISE EXCEPTION 'a task as its request told it differs from the stored one'
            USING ERRCODE = 'TK001', DETAIL = told_task::text;
    END IF;
END
$$;
