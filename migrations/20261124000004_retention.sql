-- Retention: the finished tasks by when they finished, oldest first.
CREATE INDEX tasks_finished ON tasks (completed_at) WHERE status IN ('complete', 'error', 'cancelled');
