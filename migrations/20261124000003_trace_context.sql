-- The W3C trace context a task was created in (its CreateTask span's): carried with its
-- step executions and put on its lifecycle events, so one task is one trace.
ALTER TABLE tasks
    ADD COLUMN traceparent text NOT NULL DEFAULT '',
    ADD COLUMN tracestate text NOT NULL DEFAULT '';
