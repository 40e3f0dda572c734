-- The retention sweep deletes finished jobs (and their text) by completion time.
CREATE INDEX jobs_finished_completed ON jobs (completed_at) WHERE status <> 'pending';
