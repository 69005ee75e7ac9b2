-- A task's edges are found through its steps, as its step transitions are: GetTask reads
-- them from the steps' side (`from_step_id`, the primary key's first column), retention
-- deletes them by the doomed tasks' step ids. The index by task was one of the three index
-- entries every edge wrote when its task was created (a diamond of seven steps has eight).
DROP INDEX workflow_step_edges_task;
