-- Backbones users upload as TorchScript modules (POST /backbones).
CREATE TABLE script_backbones (
    name          text PRIMARY KEY,
    image_size    integer NOT NULL,
    normalization jsonb NOT NULL,
    feature_dim   integer NOT NULL,
    parameters    bigint NOT NULL,
    -- [{"prefix": "layer1"}, ...], first to last.
    stages        jsonb NOT NULL,
    -- The final linear layer removed from forward (`fc`), if any.
    removed_layer text,
    source_file   text,
    bytes         bigint NOT NULL,
    sha256        text NOT NULL,
    artifact_key  text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
