-- The billing quota hold a job consumes: carried in job.ready (turned into usage) and job.failed (released).
-- Nullable: jobs made with billing off, or before holds existed, have none.
ALTER TABLE jobs ADD COLUMN hold_id text;
