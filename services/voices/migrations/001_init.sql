CREATE TABLE voices (
    voice_id      uuid PRIMARY KEY,
    account_id    text NOT NULL,
    name          text NOT NULL,
    backend       text NOT NULL,
    lang          text NOT NULL,
    ref_text      text,
    family        text,
    reference_key text NOT NULL,
    quality       jsonb,
    profile       jsonb NOT NULL DEFAULT '{}'::jsonb,
    metadata      jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX voices_account_created ON voices (account_id, created_at);
