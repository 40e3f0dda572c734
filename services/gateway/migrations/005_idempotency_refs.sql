-- Audio answers are kept as a reference (job and format), re-read on replay, never as their bytes; each
-- in-flight claim holds a lease token, renewed while its request runs, so a crashed replica's claim lapses
-- soon and a late renewal or completion from a replica whose lease was taken over changes nothing.
ALTER TABLE idempotency_keys
    ADD COLUMN lease_token  uuid,
    ADD COLUMN voice_id     text,
    ADD COLUMN job_id       uuid,
    ADD COLUMN audio_format text;
-- Audio bodies stored before this change: a retry simply runs again (a cache hit answers the same audio).
DELETE FROM idempotency_keys WHERE body IS NOT NULL AND headers::text LIKE '%audio/%';
CREATE INDEX idempotency_keys_voice ON idempotency_keys (account_id, voice_id) WHERE voice_id IS NOT NULL;
