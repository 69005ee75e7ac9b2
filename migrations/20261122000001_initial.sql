-- Tasker's system of record (design §3). Current state lives in `status` columns and is
-- written in the same transaction as the transition row; the transition tables are the
-- audit log; `outbox` holds lifecycle events until the event-publisher relays them.

CREATE TABLE task_namespaces (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- A registered template: immutable per namespace/name/version.
CREATE TABLE named_tasks (
    id            uuid PRIMARY KEY,
    namespace_id  uuid NOT NULL REFERENCES task_namespaces (id),
    name          text NOT NULL,
    version       text NOT NULL,
    -- semver parts, so "latest" orders numerically
    major         bigint NOT NULL,
    minor         bigint NOT NULL,
    patch         bigint NOT NULL,
    pre           text NOT NULL DEFAULT '',
    description   text NOT NULL DEFAULT '',
    template      jsonb NOT NULL,
    content_hash  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (namespace_id, name, version)
);
CREATE INDEX named_tasks_latest ON named_tasks (namespace_id, name, major DESC, minor DESC, patch DESC);

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    named_task_id    uuid NOT NULL REFERENCES named_tasks (id),
    namespace        text NOT NULL,
    name             text NOT NULL,
    version          text NOT NULL,
    status           text NOT NULL,
    context          jsonb NOT NULL,
    tags             text[] NOT NULL DEFAULT '{}',
    initiator        text NOT NULL DEFAULT '',
    source_system    text NOT NULL DEFAULT '',
    reason           text NOT NULL DEFAULT '',
    priority         integer NOT NULL DEFAULT 0,
    idempotency_key  text,
    request_hash     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    completed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tasks_idempotency_key ON tasks (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_listing ON tasks (namespace, name, created_at DESC, id DESC);
CREATE INDEX tasks_created ON tasks (created_at DESC, id DESC);
-- the sweeper looks for tasks stuck in `pending`
CREATE INDEX tasks_pending ON tasks (updated_at) WHERE status = 'pending';

CREATE TABLE workflow_steps (
    id                uuid PRIMARY KEY,
    task_id           uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    name              text NOT NULL,
    handler           text NOT NULL,
    handler_config    jsonb NOT NULL DEFAULT '{}',
    retryable         boolean NOT NULL,
    max_attempts      integer NOT NULL CHECK (max_attempts >= 1),
    attempts          integer NOT NULL DEFAULT 0,
    timeout_ms        bigint NOT NULL,
    status            text NOT NULL,
    next_attempt_at   timestamptz,
    -- parents not yet complete or resolved: the step is ready when this reaches 0
    pending_parents   integer NOT NULL,
    dependency_level  integer NOT NULL,
    results           jsonb,
    last_error        jsonb,
    enqueued_at       timestamptz,
    started_at        timestamptz,
    completed_at      timestamptz,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, name)
);
-- unfinished steps of a task: readiness and finalization look only at these
CREATE INDEX workflow_steps_unfinished ON workflow_steps (task_id, status)
    WHERE status NOT IN ('complete', 'resolved_manually');
-- the retry scheduler
CREATE INDEX workflow_steps_retry_due ON workflow_steps (next_attempt_at) WHERE status = 'waiting_for_retry';
-- the sweeper: attempts in flight
CREATE INDEX workflow_steps_in_flight ON workflow_steps (updated_at) WHERE status IN ('enqueued', 'in_progress');

CREATE TABLE workflow_step_edges (
    task_id       uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    from_step_id  uuid NOT NULL REFERENCES workflow_steps (id) ON DELETE CASCADE,
    to_step_id    uuid NOT NULL REFERENCES workflow_steps (id) ON DELETE CASCADE,
    PRIMARY KEY (from_step_id, to_step_id)
);
CREATE INDEX workflow_step_edges_to ON workflow_step_edges (to_step_id);
CREATE INDEX workflow_step_edges_task ON workflow_step_edges (task_id);

CREATE TABLE task_transitions (
    id           uuid PRIMARY KEY,
    task_id      uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    from_state   text,
    to_state     text NOT NULL,
    sort_key     integer NOT NULL,
    most_recent  boolean NOT NULL,
    metadata     jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (task_id, sort_key)
);
CREATE UNIQUE INDEX task_transitions_most_recent ON task_transitions (task_id) WHERE most_recent;

CREATE TABLE workflow_step_transitions (
    id                uuid PRIMARY KEY,
    workflow_step_id  uuid NOT NULL REFERENCES workflow_steps (id) ON DELETE CASCADE,
    task_id           uuid NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
    from_state        text,
    to_state          text NOT NULL,
    sort_key          integer NOT NULL,
    most_recent       boolean NOT NULL,
    metadata          jsonb NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workflow_step_id, sort_key)
);
CREATE UNIQUE INDEX workflow_step_transitions_most_recent ON workflow_step_transitions (workflow_step_id) WHERE most_recent;
CREATE INDEX workflow_step_transitions_task ON workflow_step_transitions (task_id);

-- Lifecycle events waiting to be relayed, in commit order per task (every change to a
-- task happens under its row lock, so its events get increasing ids).
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL,
    task_id      uuid NOT NULL,
    routing_key  text NOT NULL,
    payload      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Wake the event-publisher when events are written (one notification per transaction:
-- Postgres folds identical notifications).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tasker_outbox', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
