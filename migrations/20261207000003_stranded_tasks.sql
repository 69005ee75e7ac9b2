-- Tasks in progress, by their row's last change. Every batch of the orchestrator leaves a
-- task it works on with a step enqueued, in progress or waiting for a retry, or settles it
-- (complete, error). A task in progress with none of those is waiting for an evaluation
-- that only a request would bring: after an operator's retry or resolve (which resumes
-- the task) whose request was lost, with task-api killed in between or the commit's answer
-- lost with its connection. The sweeper finds such tasks by this index, looking only at
-- tasks unchanged for `pending_task_timeout`. One more index entry per task, at its start.
CREATE INDEX tasks_in_progress ON tasks (updated_at) WHERE status = 'in_progress';
