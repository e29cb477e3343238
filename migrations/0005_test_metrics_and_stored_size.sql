-- The best checkpoint's scores on the dataset's test split, measured once
-- at the end of a successful run (null without a test split).
ALTER TABLE jobs ADD COLUMN test_metrics jsonb;

-- The side a dataset's images are stored at (shorter side resized to it,
-- then the centre square); a model decodes /predict images the same way.
ALTER TABLE datasets ADD COLUMN stored_size integer NOT NULL DEFAULT 256;
ALTER TABLE models ADD COLUMN stored_size integer NOT NULL DEFAULT 256;
