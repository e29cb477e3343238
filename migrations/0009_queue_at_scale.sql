-- The queue at scale (tens of thousands of queued jobs and more).
--
-- A claim takes the most urgent queued job, `status = 'queued' ORDER BY
-- priority DESC, created_at`, from an index of queued jobs only: running
-- jobs, whose heartbeats and progress rewrite their rows every few seconds,
-- never sit in the range a claim walks (the index it replaces also held
-- them, at its head). Jobs whose lease expired are found by their own
-- index, as the reaper finds them.
CREATE INDEX jobs_queued ON jobs (priority DESC, created_at) WHERE status = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE status = 'running';
DROP INDEX jobs_claimable;
-- `GET /jobs` pages newest first, by (created_at, id).
CREATE INDEX jobs_newest ON jobs (created_at DESC, id DESC);
-- A dataset's jobs: deleting a dataset asks for them (and the foreign key
-- checks them).
CREATE INDEX jobs_dataset ON jobs (dataset_id);
