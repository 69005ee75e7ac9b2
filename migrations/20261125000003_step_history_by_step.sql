-- A step's transition rows are found through their step: the task's history reads them by
-- the task's step ids, retention deletes them by the doomed tasks' steps, both with the
-- (workflow_step_id, sort_key) key. An index by task was one more entry for every
-- transition row and for every `most_recent` flip (a flip is never a HOT update: the
-- column is in the partial unique index's predicate), on the hottest table there is.
DROP INDEX workflow_step_transitions_task;
