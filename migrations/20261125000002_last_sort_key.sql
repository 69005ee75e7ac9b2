-- Each task and step keeps the sort key of its latest transition, written with its status
-- in every transition. Reading a step used to look its latest transition up (a sub-select
-- per step read) and locking tasks took a second statement for theirs; now both come with
-- the row. The `most_recent` transition rows stay as they are (the history's own marker).
-- Upgrading rewrites every task and step row once, below.
ALTER TABLE tasks ADD COLUMN last_sort_key integer NOT NULL DEFAULT 0;
ALTER TABLE workflow_steps ADD COLUMN last_sort_key integer NOT NULL DEFAULT 0;

UPDATE tasks t SET last_sort_key = tr.sort_key
FROM task_transitions tr WHERE tr.task_id = t.id AND tr.most_recent;
UPDATE workflow_steps s SET last_sort_key = tr.sort_key
FROM workflow_step_transitions tr WHERE tr.workflow_step_id = s.id AND tr.most_recent;
