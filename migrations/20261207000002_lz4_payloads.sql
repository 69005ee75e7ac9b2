-- The payloads Postgres compresses on Tasker's paths are compressed with LZ4 instead of
-- the default pglz: a task's context (written by every CreateTask, read for every
-- execution), a step's results, and an outbox row's events (every batch writes one, the
-- relay reads it once and deletes it; a batch of a few dozen events is tens of KB).
-- Postgres compresses a value only when its row passes about 2 KB, so small payloads are
-- untouched either way; on a 28 KB outbox row the insert took 0.1–0.3 ms less, and a
-- 283 KB context was written in 7.2 ms instead of 12.4–13.3 (docs/performance.md), for
-- values about 4 % larger. Values already stored keep the method they were written with,
-- and Postgres reads either, so a build from before this migration runs beside it. A
-- server built without LZ4 support keeps pglz.
DO $$
BEGIN
    ALTER TABLE tasks ALTER COLUMN context SET COMPRESSION lz4;
    ALTER TABLE workflow_steps ALTER COLUMN results SET COMPRESSION lz4;
    ALTER TABLE outbox ALTER COLUMN payloads SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'this server has no LZ4 support: payloads stay compressed with pglz';
END
$$;
