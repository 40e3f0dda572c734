CREATE TABLE accounts (
    account_id  uuid PRIMARY KEY,
    label       text,
    email       text,
    status      text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Only a hash of each key is kept; the plaintext is shown once, at creation.
CREATE TABLE api_keys (
    key_id       uuid PRIMARY KEY,
    account_id   uuid NOT NULL REFERENCES accounts (account_id) ON DELETE CASCADE,
    key_hash     text NOT NULL UNIQUE,
    key_prefix   text NOT NULL,
    label        text,
    rate_per_minute integer,
    max_concurrent  integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_account ON api_keys (account_id);

-- Which services have confirmed a purge of an account.
CREATE TABLE purges (
    purge_id     uuid PRIMARY KEY,
    account_id   text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    confirmed    jsonb NOT NULL DEFAULT '{}'::jsonb,
    completed_at timestamptz
);

-- A key minted after a Stripe checkout, kept until its single read by the success page.
CREATE TABLE checkout_keys (
    checkout_token text PRIMARY KEY,
    account_id     uuid NOT NULL,
    api_key        text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    shown_at       timestamptz
);
