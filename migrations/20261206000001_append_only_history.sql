-- The transition tables become append-only: a row, once written, is never changed. Which
-- row is an owner's current one was marked twice: by `most_recent` (turned off on the
-- previous row by an UPDATE in every transaction that moved the owner, and kept to one per
-- owner by a partial unique index) and by the owner's own `last_sort_key`, written with its
-- status in the same statement since 20261125000002. The owner's key is the one kept: the
-- current transition is the row whose sort key is the owner's `last_sort_key`, and
-- UNIQUE (owner, sort_key) still refuses two writers moving one owner from the same state.
-- Each step of a task cost two of those UPDATEs (never HOT: the column is in the partial
-- index's predicate), each a new row version with entries in the table's other indexes.
--
-- Expand, then contract: this version neither reads nor writes `most_recent`, but a
-- replica of the previous version may still be running beside it while a deployment rolls
-- (the services migrate at start), and that one writes the flag. So the flag loses its
-- index and its NOT NULL (rows written from now on leave it NULL: not tracked), and the
-- column itself is dropped by a later release, once no replica of the previous version can
-- be running. Existing rows are not rewritten.
DROP INDEX task_transitions_most_recent;
DROP INDEX workflow_step_transitions_most_recent;
ALTER TABLE task_transitions ALTER COLUMN most_recent DROP NOT NULL;
ALTER TABLE workflow_step_transitions ALTER COLUMN most_recent DROP NOT NULL;
