-- Object index of the bucket: one row per object the storage service wrote.
CREATE TABLE objects (
    key          text PRIMARY KEY,
    account_id   text,                       -- NULL for system objects (bundled voices)
    kind         text NOT NULL,
    retention    text NOT NULL,
    content_type text NOT NULL,
    size         bigint NOT NULL CHECK (size >= 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,                -- NULL: permanent
    owner_ref    text                        -- job_id / voice_id / upload_id
);

CREATE INDEX objects_expires_at_idx ON objects (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX objects_account_id_idx ON objects (account_id) WHERE account_id IS NOT NULL;

-- Client uploads; the row goes with its object (sweep or purge).
CREATE TABLE uploads (
    upload_id  text PRIMARY KEY,
    account_id text NOT NULL,
    purpose    text NOT NULL,
    key        text NOT NULL UNIQUE REFERENCES objects (key) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX uploads_account_id_idx ON uploads (account_id);
