-- When the worker finished the audio (synthesis.completed) and when storage had stored it (audio.stored):
-- with created_at and completed_at, a job's time queued, synthesizing and storing.
ALTER TABLE jobs ADD COLUMN synthesized_at timestamptz;
ALTER TABLE jobs ADD COLUMN stored_at timestamptz;
