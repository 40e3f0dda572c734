-- Word timestamps of a job that asked for them ([{"word", "start", "end"}], seconds); null otherwise.
ALTER TABLE jobs ADD COLUMN words jsonb;
