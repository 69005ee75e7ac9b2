-- One outbox row per transaction that writes events, holding them in the order they were
-- made, instead of one row per event. An orchestrator batch writes one or two events per
-- step it changes, each a heap tuple and a primary-key entry inserted, then deleted once
-- relayed, and read back by the relay: the per-event tuples were the largest share of the
-- outbox's cost. Order still holds: a transaction's events are in its row in order, and a
-- task's transactions are serialized by its row lock, so their rows' ids increase.
ALTER TABLE outbox DROP COLUMN task_id;
ALTER TABLE outbox ALTER COLUMN event_id TYPE uuid[] USING ARRAY[event_id];
ALTER TABLE outbox ALTER COLUMN routing_key TYPE text[] USING ARRAY[routing_key];
ALTER TABLE outbox ALTER COLUMN payload TYPE text[] USING ARRAY[payload];
ALTER TABLE outbox RENAME COLUMN event_id TO event_ids;
ALTER TABLE outbox RENAME COLUMN routing_key TO routing_keys;
ALTER TABLE outbox RENAME COLUMN payload TO payloads;
ALTER TABLE outbox ADD CONSTRAINT outbox_events_whole CHECK (
    cardinality(event_ids) > 0
    AND cardinality(routing_keys) = cardinality(event_ids)
    AND cardinality(payloads) = cardinality(event_ids)
);

-- A batch's payloads together often pass the 2 kB at which a value is compressed and moved
-- out of line: lz4 compresses several times faster than the default pglz. A server built
-- without lz4 keeps the default.
DO $$
BEGIN
    ALTER TABLE outbox ALTER COLUMN payloads SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 is not available; the outbox keeps the default compression';
END
$$;
