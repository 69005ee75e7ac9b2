-- The fence names the tasks it found changed, as the DETAIL of the TK001 it raises:
-- their ids, comma-separated (`tasker_fence_created` names its task the same way). The
-- orchestrator then stops keeping those tasks only; the others of the batch, read again
-- as the batch is decided from reads, stay kept. Before this, one changed task (an
-- operator's action, a made-up request) cost every task of its batch the one-round-trip
-- path for the rest of its life.
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
