-- The orchestrator keeps the tasks it is working on in memory between batches, and a
-- batch decided from that kept state writes in one round trip instead of two. The fence
-- goes first in that round trip: it locks the tasks (in id order, as every batch does)
-- and then, with a snapshot taken after the locks, checks that each task and its steps
-- are still what the orchestrator kept. Every change to a task or a step comes with a
-- transition that raises the owner's `last_sort_key` by one (a step's `pending_parents`
-- changes only with its parent's transition), so the task's own key and the sum of its
-- steps' keys are equal to the kept ones exactly when nothing changed since. When they
-- differ, the fence raises SQLSTATE TK001: the transaction is aborted, nothing it sent
-- is written, and the orchestrator decides the batch again from what it reads.
CREATE FUNCTION tasker_fence(ids uuid[], task_keys integer[], step_keys bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM FROM tasks WHERE id = ANY (ids) ORDER BY id FOR UPDATE;
    IF EXISTS (
        SELECT FROM unnest(ids, task_keys, step_keys) AS k (id, task_key, step_key)
        LEFT JOIN tasks t ON t.id = k.id
        WHERE t.last_sort_key IS DISTINCT FROM k.task_key
           OR (SELECT COALESCE(sum(s.last_sort_key), 0) FROM workflow_steps s WHERE s.task_id = k.id)
              <> k.step_key
    ) THEN
        RAISE EXCEPTION 'a kept task changed since it was kept' USING ERRCODE = 'TK001';
    END IF;
END
$$;
