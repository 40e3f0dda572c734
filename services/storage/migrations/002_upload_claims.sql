-- A voice_clone upload expires unless a voice claims it (then it lives, and goes, with the voice).
ALTER TABLE uploads ADD COLUMN voice_id text;
CREATE INDEX uploads_voice_idx ON uploads (account_id, voice_id) WHERE voice_id IS NOT NULL;
-- Unclaimed voice_clone uploads stored before this change expire like new ones, a day from now.
UPDATE objects SET expires_at = now() + interval '1 day'
WHERE kind = 'voice_recording' AND expires_at IS NULL
  AND key IN (SELECT key FROM uploads WHERE purpose = 'voice_clone' AND voice_id IS NULL);
