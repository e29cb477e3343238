-- The best checkpoint's scores on the dataset's test split, measured once
-- at the end of a successful run (null without a test split).
ALTER TABLE jobs ADD COLUMN test_metrics jsonb;
