-- Analytics reads history by time: the transitions that end a step attempt or finish a
-- task within a window, and the unfinished tasks by age, without scanning the rest.
CREATE INDEX task_transitions_finished ON task_transitions (created_at)
    WHERE to_state IN ('complete', 'error', 'cancelled');
CREATE INDEX workflow_step_transitions_settled ON workflow_step_transitions (created_at)
    WHERE from_state = 'in_progress';
CREATE INDEX tasks_unfinished ON tasks (created_at) WHERE status IN ('pending', 'in_progress');
