-- A task's edges are found through its steps, as its step transitions are: GetTask reads
-- them from the steps' side (`from_step_id`, the primary key's first column), retention
-- deletes them by the doomed tasks' step ids. The index by task was three entries of each
-- task's creation in eight (a diamond of seven steps writes eight edges).
DROP INDEX workflow_step_edges_task;
