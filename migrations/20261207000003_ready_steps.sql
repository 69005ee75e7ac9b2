-- Steps ready to run but not dispatched: pending with every parent done. A task's
-- evaluation enqueues them in the transaction that makes them ready, so outside a pending
-- task (whose roots wait for its first evaluation) one stays here only when an operator's
-- retry or resolve committed and the request that hands the task back to the orchestrator
-- was lost (task-api killed, or the commit's answer lost with its connection). The
-- sweeper finds such tasks by this index. Its entries are the roots of each task as it is
-- created and the steps operators repair: one more index entry per root step.
CREATE INDEX workflow_steps_ready ON workflow_steps (updated_at) WHERE status = 'pending' AND pending_parents = 0;
