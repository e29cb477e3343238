-- Datasets: an uploaded archive, validated and decoded once.
CREATE TABLE datasets (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    status       text NOT NULL CHECK (status IN ('ready', 'failed')),
    classes      jsonb NOT NULL,              -- ["daisy", "rose", ...], index = label
    counts       jsonb NOT NULL,              -- {"train": {"daisy": 40}, "val": {...}}
    num_train    integer NOT NULL,
    num_val      integer NOT NULL,
    bytes        bigint NOT NULL,             -- size of the uploaded archive
    artifact_key text NOT NULL,
    report       jsonb NOT NULL DEFAULT '{}', -- files skipped at ingest and why
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Jobs: the training queue and its record.
CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    dataset_id       uuid NOT NULL REFERENCES datasets (id),
    config           jsonb NOT NULL,          -- validated, defaults filled in
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority         integer NOT NULL DEFAULT 0,
    attempts         integer NOT NULL DEFAULT 0,
    max_attempts     integer NOT NULL DEFAULT 3,
    lease_owner      text,
    lease_expires_at timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    idempotency_key  text UNIQUE,
    error            text,
    epoch            integer NOT NULL DEFAULT 0, -- last finished epoch
    progress         jsonb,                   -- within the running epoch: {epoch, step, steps, images_per_second, eta_seconds}
    best_epoch       integer,
    best_metric      double precision,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_claimable ON jobs (priority DESC, created_at) WHERE status IN ('queued', 'running');

-- Runs: one per attempt of a job.
-- (An attempt handed back at shutdown is not counted, so two runs can share an attempt number.)
CREATE TABLE runs (
    id          uuid PRIMARY KEY,
    job_id      uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    worker      text NOT NULL,
    device      text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text CHECK (outcome IN ('succeeded', 'failed', 'cancelled', 'lost')),
    error       text,
    resumed_from_epoch integer,               -- the attempt continued after this epoch
    cached_features boolean                   -- the frozen backbone's features were computed once
);
CREATE INDEX runs_job ON runs (job_id);

-- One row per finished epoch; a retried attempt continues the same series.
CREATE TABLE epoch_metrics (
    job_id            uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    epoch             integer NOT NULL,
    run_id            uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    train_loss        double precision NOT NULL,
    train_accuracy    double precision NOT NULL,
    val_loss          double precision NOT NULL,
    val_accuracy      double precision NOT NULL,
    val_macro_f1      double precision NOT NULL,
    top_k             integer NOT NULL,
    val_top_k_accuracy double precision NOT NULL,
    frozen_stages     integer NOT NULL,       -- leading backbone stages frozen this epoch
    learning_rate     double precision NOT NULL,
    images_per_second double precision NOT NULL,
    seconds           double precision NOT NULL,
    per_class         jsonb NOT NULL,         -- [{label, precision, recall, f1, support}]
    confusion_matrix  jsonb NOT NULL,         -- rows: true label, columns: predicted
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, epoch)
);

CREATE TABLE checkpoints (
    id           uuid PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    run_id       uuid NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    epoch        integer NOT NULL,
    artifact_key text NOT NULL,
    metric       double precision NOT NULL,   -- the selection metric's value
    is_best      boolean NOT NULL DEFAULT false,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Models: the best checkpoint of a succeeded job, everything /predict needs.
CREATE TABLE models (
    id            uuid PRIMARY KEY,
    job_id        uuid NOT NULL UNIQUE REFERENCES jobs (id),
    dataset_id    uuid NOT NULL REFERENCES datasets (id),
    backbone      text NOT NULL,
    labels        jsonb NOT NULL,
    image_size    integer NOT NULL,
    normalization jsonb NOT NULL,             -- {"mean": [...], "std": [...]}
    artifact_key  text NOT NULL,
    epoch         integer NOT NULL,
    metrics       jsonb NOT NULL,             -- the best epoch's validation metrics
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Which model each alias serves; `default` is what /predict uses when no model is named.
CREATE TABLE deployments (
    alias       text PRIMARY KEY,
    model_id    uuid NOT NULL REFERENCES models (id),
    deployed_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    device       text NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
