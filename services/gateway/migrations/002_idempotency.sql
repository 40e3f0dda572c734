-- Answers to POST requests sent with an Idempotency-Key, replayed to a retry of the same request.
CREATE TABLE idempotency_keys (
    account_id   uuid NOT NULL,
    idem_key     text NOT NULL,
    fingerprint  text NOT NULL,
    status_code  integer,            -- NULL while the first request is still in flight
    headers      jsonb,
    body         bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    -- An in-flight claim lapses after this, so a crashed replica does not block the key until it expires.
    locked_until timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (account_id, idem_key)
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
