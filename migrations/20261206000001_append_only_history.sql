-- The transition tables become append-only: a row, once written, is never changed. Which
-- row is an owner's current one was marked twice: by `most_recent` (turned off on the
-- previous row by an UPDATE in every transaction that moved the owner, and kept to one per
-- owner by a partial unique index) and by the owner's own `last_sort_key`, written with its
-- status in the same statement since 20261125000002. The owner's key is the one kept: the
-- current transition is the row whose sort key is the owner's `last_sort_key`, and
-- UNIQUE (owner, sort_key) still refuses two writers moving one owner from the same state.
-- Each step of a task cost two of those UPDATEs (never HOT: the column is in the partial
-- index's predicate), each a new row version with entries in the table's other indexes.
-- Dropping the column drops the partial unique indexes with it; existing rows are not
-- rewritten.
ALTER TABLE task_transitions DROP COLUMN most_recent;
ALTER TABLE workflow_step_transitions DROP COLUMN most_recent;
