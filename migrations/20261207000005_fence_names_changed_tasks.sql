-- The fences name the tasks they found changed (or told otherwise than stored), as the
-- DETAIL of the TK001 they raise: their ids, comma-separated. The orchestrator then stops
-- keeping those tasks only; the others of the batch, read again as the batch is decided
-- from reads, stay kept. Before this, one changed task (an operator's action, a made-up
-- request) cost every task of its batch the one-round-trip path for the rest of its life.
CREATE OR REPLACE FUNCTION tasker_fence(ids uuid[], task_keys integer[], step_keys bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    PERFORM FROM tasks WHERE id = ANY (ids) ORDER BY id FOR UPDATE;
    SELECT string_agg(k.id::text, ',') INTO changed
    FROM unnest(ids, task_keys, step_keys) AS k (id, task_key, step_key)
    LEFT JOIN tasks t ON t.id = k.id
    WHERE t.last_sort_key IS DISTINCT FROM k.task_key
       OR (SELECT COALESCE(sum(s.last_sort_key), 0) FROM workflow_steps s WHERE s.task_id = k.id)
          <> k.step_key;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'a kept task changed since it was kept' USING ERRCODE = 'TK001', DETAIL = changed;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION tasker_fence_created(
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
