-- A purge that some service never confirmed within the deadline ends `failed`, naming those services.
ALTER TABLE purges ADD COLUMN IF NOT EXISTS failed_at timestamptz;
ALTER TABLE purges ADD COLUMN IF NOT EXISTS missing text[];
CREATE INDEX IF NOT EXISTS purges_open ON purges (requested_at) WHERE completed_at IS NULL AND failed_at IS NULL;
