-- API keys: bearer tokens with a scope. Only a SHA-256 of the secret is
-- kept; the token is shown once, when created.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    name         text NOT NULL,
    scope        text NOT NULL CHECK (scope IN ('admin', 'predict')),
    -- The public part of the token, to find the row without scanning.
    prefix       text NOT NULL UNIQUE,
    secret_hash  bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
