-- Client webhooks: endpoints an account registered, and every delivery to them with its attempts.
CREATE TABLE webhook_endpoints (
    webhook_id      uuid PRIMARY KEY,
    account_id      uuid NOT NULL,
    url             text NOT NULL,
    events          text[] NOT NULL,
    description     text,
    -- The signing secret is needed in clear to sign; it is shown to the client at creation and rotation only.
    secret          text NOT NULL,
    -- After a rotation the previous secret still signs (a second v1=) until it lapses.
    previous_secret text,
    previous_secret_expires_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account_id, url)
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id);

-- A per-request webhook_url: this job's outcome goes to that endpoint whatever it subscribed to.
CREATE TABLE webhook_job_targets (
    job_id      uuid NOT NULL,
    webhook_id  uuid NOT NULL REFERENCES webhook_endpoints (webhook_id) ON DELETE CASCADE,
    account_id  uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, webhook_id)
);

-- One event for one endpoint. No foreign key: the account.purged delivery outlives the account's endpoints and
-- carries their URL and secrets itself (secrets_snapshot); it is removed once it ends.
CREATE TABLE webhook_deliveries (
    delivery_id     uuid PRIMARY KEY,
    event_id        text NOT NULL,
    event_type      text NOT NULL,
    webhook_id      uuid NOT NULL,
    account_id      uuid NOT NULL,
    url             text NOT NULL,
    payload         text NOT NULL,
    secrets_snapshot text[],
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'parked')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz,
    UNIQUE (event_id, webhook_id)
);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (webhook_id, created_at DESC);
CREATE INDEX webhook_deliveries_stalled ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id  uuid NOT NULL REFERENCES webhook_deliveries (delivery_id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    status_code  integer,
    error        text,
    response     text,
    PRIMARY KEY (delivery_id, attempt)
);
