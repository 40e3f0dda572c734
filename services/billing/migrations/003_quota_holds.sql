-- Characters reserved for synthesis requests that passed the quota check but have not finished yet:
-- the quota counts usage + unexpired holds, so a burst of requests cannot all pass on the same usage.
-- job.ready turns a hold into usage (same transaction), job.failed or a cache hit releases it, and
-- expires_at bounds how long a lost event can keep characters held.
-- Tables are unqualified: the migration runs with the billing schema first on the search path.
CREATE TABLE quota_holds (
    hold_id     text PRIMARY KEY,
    account_id  text NOT NULL,
    characters  integer NOT NULL CHECK (characters >= 0),
    created_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
CREATE INDEX quota_holds_account_expires_idx ON quota_holds (account_id, expires_at);
