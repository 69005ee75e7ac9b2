-- `tasker_fence_created` reads only the task's own rows, however its plan was priced.
--
-- The orchestrator's sessions plan each statement once, on its first run, with index paths
-- and nested loops only (`Workload::Keyed`), and keep that plan until the tables' statistics
-- change. The check's edge query joined the told edges to the table with the task as a
-- filter, not as an index condition (edges have no index by task). Planned while the table
-- was small, it read the whole of an edge index for every task started, the index growing
-- with every task created until the next ANALYZE: 287 buffers a call after 1,000 edges in
-- a benchmark run, 556 after 16,000.
--
-- Each table is now read once, through an index condition on the task's own keys (its
-- steps by `task_id`, its edges by their parents' ids, the told steps'), with the told rows
-- joined as the inner side of a left join, which no plan can turn into a scan of the table.
-- What is checked is unchanged: the task's namespace, name, version and trace context, each
-- step (name, handler, config, limits, parents to wait for) and each edge exactly as told,
-- none left out, none told twice (`IS DISTINCT FROM` refuses arrays that are NULL too), in
-- one expression, as before.
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
    ) OR (
        -- the task's steps, and those of them exactly as told
        SELECT ARRAY[count(DISTINCT s.id), count(DISTINCT s.id) FILTER (
                   WHERE (s.name, s.handler, s.handler_config, s.max_attempts, s.retryable, s.timeout_ms,
                          s.pending_parents)
                       = (u.name, u.handler, u.config::jsonb, u.attempts, u.retryable, u.timeout, u.parents))]
        FROM workflow_steps s
        LEFT JOIN unnest(told_ids, told_names, told_handlers, told_configs, told_max_attempts, told_retryable,
                         told_timeouts, told_parents)
             AS u (id, name, handler, config, attempts, retryable, timeout, parents) ON u.id = s.id
        WHERE s.task_id = told_task
    ) IS DISTINCT FROM ARRAY[cardinality(told_ids), cardinality(told_ids)]::bigint[]
      OR (
        -- the edges from those steps, and those of them told
        SELECT ARRAY[count(DISTINCT (e.from_step_id, e.to_step_id)),
                     count(DISTINCT (e.from_step_id, e.to_step_id)) FILTER (WHERE u.f IS NOT NULL AND e.task_id = told_task)]
        FROM workflow_step_edges e
        LEFT JOIN unnest(told_from, told_to) AS u (f, t) ON u.f = e.from_step_id AND u.t = e.to_step_id
        WHERE e.from_step_id = ANY (told_ids)
    ) IS DISTINCT FROM ARRAY[cardinality(told_from), cardinality(told_from)]::bigint[]
    THEN
        RAISE EXCEPTION 'a task as its request told it differs from the stored one'
            USING ERRCODE = 'TK001', DETAIL = told_task::text;
    END IF;
END
$$;
