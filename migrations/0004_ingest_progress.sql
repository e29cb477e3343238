-- Datasets are visible while they ingest (status 'ingesting', with progress
-- that a client can poll); a held-out test split is counted beside train/val.
ALTER TABLE datasets DROP CONSTRAINT datasets_status_check;
ALTER TABLE datasets ADD CONSTRAINT datasets_status_check
    CHECK (status IN ('ingesting', 'ready', 'failed', 'deleted'));
ALTER TABLE datasets ADD COLUMN num_test integer NOT NULL DEFAULT 0;
-- {stage, done, total} while ingesting; null once ready.
ALTER TABLE datasets ADD COLUMN progress jsonb;
-- Bumped by the ingest every second: an 'ingesting' row that stops moving
-- belongs to a process that died, and is removed.
ALTER TABLE datasets ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
