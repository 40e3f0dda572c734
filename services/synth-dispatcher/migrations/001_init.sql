CREATE TABLE jobs (
    job_id           uuid PRIMARY KEY,
    account_id       text NOT NULL,
    voice_id         text NOT NULL,
    text             text NOT NULL,
    lang             text NOT NULL,
    backend          text NOT NULL,
    cache_key        text NOT NULL,
    response_format  text NOT NULL DEFAULT 'wav',
    status           text NOT NULL CHECK (status IN ('pending', 'ready', 'failed')),
    attempts         integer NOT NULL DEFAULT 1,
    characters       integer NOT NULL,
    request          jsonb NOT NULL,
    audio_key        text,
    audio_expires_at timestamptz,
    error            text,
    error_code       text,
    synthesis_ms     integer,
    audio_seconds    double precision,
    executor_ref     text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    deadline_at      timestamptz NOT NULL,
    completed_at     timestamptz
);
CREATE INDEX jobs_account_created ON jobs (account_id, created_at);
CREATE INDEX jobs_account_voice ON jobs (account_id, voice_id);
CREATE INDEX jobs_pending_deadline ON jobs (deadline_at) WHERE status = 'pending';
CREATE INDEX jobs_pending_cache_key ON jobs (account_id, cache_key) WHERE status = 'pending';
CREATE INDEX jobs_audio_key ON jobs (audio_key);

-- One entry per account and cache key: a system voice's audio is never shared across accounts,
-- so a cache hit cannot tell one account what another has synthesized.
CREATE TABLE cache_entries (
    account_id   text NOT NULL,
    cache_key    text NOT NULL,
    voice_id     text NOT NULL,
    job_id       uuid NOT NULL,
    audio_key    text NOT NULL,
    expires_at   timestamptz,
    synthesis_ms integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, cache_key)
);
CREATE INDEX cache_entries_audio_key ON cache_entries (audio_key);
CREATE INDEX cache_entries_voice ON cache_entries (account_id, voice_id);
