-- An operator's retry starts a new round of attempts without reusing attempt numbers:
-- `attempts` keeps counting for the step's whole life (it is the fencing token a report
-- must echo), and `attempts_before_retry` is where the current round began, so the round
-- may make `max_attempts` attempts of its own.
ALTER TABLE workflow_steps
    ADD COLUMN attempts_before_retry integer NOT NULL DEFAULT 0 CHECK (attempts_before_retry >= 0);
