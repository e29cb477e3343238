-- A deleted dataset whose jobs or models still refer to it keeps its row
-- (lineage) with status 'deleted'; its files are gone.
ALTER TABLE datasets DROP CONSTRAINT datasets_status_check;
ALTER TABLE datasets ADD CONSTRAINT datasets_status_check
    CHECK (status IN ('ready', 'failed', 'deleted'));
