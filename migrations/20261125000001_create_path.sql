-- Creating a task, from profiling the benchmark (pg_stat_statements under 16 clients).

-- Every new task's foreign key to its template took a FOR KEY SHARE lock on the
-- template's row, and concurrent creations of one template all lock that one row: each
-- lock past the first turns the row's locker into a new MultiXact (written to the WAL,
-- looked up by every later locker). Template versions are immutable and nothing deletes
-- them (the API has no such call), and a task's template id comes from the template the
-- caller has just read, so the key cannot dangle.
ALTER TABLE tasks DROP CONSTRAINT tasks_named_task_id_fkey;

-- Each step's foreign key to its task looked the task up and locked it again, once per
-- step, in the statement that had just inserted the task. Steps are written only by the
-- store, with their task; deleting finished tasks (retention) deletes their steps in the
-- same statement, as it does their edges and transitions.
ALTER TABLE workflow_steps DROP CONSTRAINT workflow_steps_task_id_fkey;
